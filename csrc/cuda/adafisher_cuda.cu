// CUDA kernels of AdaFisher's two ops (TORCH_LIBRARY_IMPL(fadam_fused, CUDA)): nonfinite_check and
// adafisher_update ([note: the AdaFisher op contract] in fadam_fused/op_contract.py; the math is
// [note: AdaFisher math] in csrc/fadam_math.h). Like fadam_cuda.cu, this source also compiles with
// g++ and HIP-CPU into the emulated test build ([note: one CUDA source, two compilers] in
// cuda/launch.h); the launchers read the op's LaunchDesc ([note: the op boundary] in
// csrc/op_boundary.h) and launch through launch_plan() (kernel_common.cuh).
//
// Multi-tensor, no reduction: one launch per op per group for any number of tensors (unless the
// tables fill, [note: CUDA multi-tensor plan]), a block per chunk of 65536 elements (a tensor of
// more than 1024 chunks gives each block ceil(nchunks / 1024) consecutive chunks, as FAdam's
// phase B). Threads take fragments of V = 16 / sizeof(scalar_t) elements with 128-bit loads where
// every pointer is aligned, as in fadam_cuda.cu.
//
// - check_kernel: reads g (4 B/param in float32), stores 1 into skip where a scaled g * g is not
//   finite ([note: the overflow rule]).
// - update_kernel: unless skip != 0, reads g, m, theta and writes m, theta (20 B/param in
//   float32). F = S[e / cols] H[e % cols] + damping comes from the two vectors (L1/L2 hits: a
//   block's 64K elements touch at most 64K / cols + 1 S values and cols H values): the row and
//   column of a fragment's first element are one 32-bit division, the next elements step the
//   column and wrap it. A bfloat16 theta and a bfloat16 momentum (momentum_dtype) are stored by
//   stochastic rounding when the op is given a rounding list ([note: stochastic rounding] in
//   fadam_fused/op_contract.py): the bits of csrc/stochastic_round.h, as the CPU kernels draw.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cuda/multi_tensor_plan.h"
#include "fadam_math.h"
#include "fadam_ops.h"
// Last: the emulated build includes HIP-CPU's runtime here, after every torch header.
#include "cuda/launch.h"
#include "cuda/kernel_common.cuh"

namespace fadam::cuda::adafisher {
namespace {

// The tables of one launch (structure of arrays, as fadam_cuda.cu's).
struct Tables : CommonTables {
  const void* grad[kMaxTensors];
  void* param[kMaxTensors];    // nullptr in the check
  void* mom[kMaxTensors];      // nullptr in the check; float32, or bfloat16 (momentum_dtype)
  const float* step[kMaxTensors];
  const float* s[kMaxTensors];  // S of the tensor (row values)
  const float* h[kMaxTensors];  // H of the tensor (column values)
  int64_t cols[kMaxTensors];    // 0: F = 1

  void fill(const Launch& launch, const LaunchDesc& d) {
    const bool update = !d.moms.empty();
    fill_tables(*this, launch, d, [&](size_t k, size_t i, const PlanTensor&) {
      grad[k] = d.grads[i].const_data_ptr();
      param[k] = update ? d.params[i].data_ptr() : nullptr;
      mom[k] = update ? d.moms[i].data_ptr() : nullptr;
      step[k] = update ? d.steps[i].const_data_ptr<float>() : nullptr;
      s[k] = update ? d.factors + d.ada[i].s_offset : nullptr;
      h[k] = update ? d.factors + d.ada[i].h_offset : nullptr;
      cols[k] = update ? d.ada[i].cols : 0;
      return vector_ok(d, grad[k], param[k], mom[k]);  // the check's param and mom: nullptr
    });
  }
};

using AdaArgs = Args<Tables>;

// Blocks of both kernels: each tensor's chunks, at most kMaxPhaseBBlocksPerTensor blocks per
// tensor (phase_b_blocks()), none for an empty tensor (nothing to read or write).
std::vector<Launch> plan_of(const LaunchDesc& d) {
  std::vector<Launch> launches;
  for (size_t i = 0; i < d.params.size(); ++i) {
    PlanTensor t{static_cast<int64_t>(i), d.nchunks(i), d.slots[i], 1, false};
    append_blocks(launches, t, phase_b_blocks(t, d.params[i].numel()));
  }
  return trim_plan(std::move(launches));
}

// The chunk of block `chunk` of tensor `tensor`: its first element and element count.
__device__ __forceinline__ int chunk_len(const Tables& t, int tensor, int64_t begin,
                                         int64_t chunk_size) {
  const int64_t left = t.numel[tensor] - begin;
  return static_cast<int>(left < chunk_size ? (left > 0 ? left : 0) : chunk_size);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    check_kernel(const __grid_constant__ AdaArgs args) {
  const Tables& t = args.t;
  const int tensor = t.block_tensor[blockIdx.x];
  const int64_t chunk0 = t.block_chunk[blockIdx.x];
  const int64_t chunk_end = min(chunk0 + t.per_block[tensor],
                                static_cast<int64_t>(t.nchunks[tensor]));
  // grad_mul_of() per thread: one float64 division, once per block of 64K elements.
  const float grad_mul = grad_mul_of(false, args.s.grad_scale);
  const bool vec = (t.flags[tensor] & kFlagVector) != 0;
  bool bad = false;
  for (int64_t chunk = chunk0; chunk < chunk_end; ++chunk) {
    const int64_t begin = chunk * args.s.chunk_size;
    const auto* grad = static_cast<const scalar_t*>(t.grad[tensor]) + begin;
    check_frags(grad, chunk_len(t, tensor, begin, args.s.chunk_size), vec, grad_mul, bad);
  }
  if (bad) {
    *args.s.skip = 1.0f;  // every writer stores the same value; 0 is never stored
  }
}

// ---- the update, and its stochastic rounding ([note: stochastic rounding] in
// fadam_fused/op_contract.py; the bits are csrc/stochastic_round.h's, as the CPU kernels')


// The update's tables: Tables and each tensor's rounding row (zeros when the op rounds to
// nearest: never read then). 32 B per tensor: 4 KiB more kernel argument at 128 tensors.
struct UpdateTables : Tables {
  RoundingArgs round[kMaxTensors];
  bool stochastic;  // the op was given a rounding list (and a bfloat16 param or momentum)

  void fill(const Launch& launch, const LaunchDesc& d) {
    Tables::fill(launch, d);
    stochastic = !d.rounding.empty();
    for (size_t k = 0; k < launch.tensors.size(); ++k) {
      round[k] = stochastic ? d.rounding[static_cast<size_t>(launch.tensors[k].tensor)]
                            : RoundingArgs{};
    }
  }
};

using UpdateArgs = Args<UpdateTables>;

// A fragment of the momentum (float32 or bfloat16) as float32 lanes, zero past `count`: 128-bit
// pieces where V fills them, else (a bfloat16 momentum of float32 parameters: V = 4, 8 bytes)
// element by element.
template <bool kFull, int V, typename T>
__device__ __forceinline__ void load_mom_frag(float (&out)[V], const T* p, int count) {
  if constexpr (V % (16 / sizeof(T)) == 0) {
    load_frag<kFull>(out, p, count, 0.0f);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      out[j] = (kFull || j < count) ? static_cast<float>(p[j]) : 0.0f;
    }
  }
}

// Stores a fragment of float32 lanes in T: a bfloat16 one stochastically rounded when
// `stochastic` (lane j draws the bits of logical element r.index(e0 + j) in `stream`), else to
// nearest even (store_frag). The stochastic bits are stored as they are (a NaN as 0x7FC0, the
// oracle's), not through a float32 -> bfloat16 conversion.
template <bool kFull, int V, typename T>
__device__ __forceinline__ void store_rounded(T* p, const float (&in)[V], int count,
                                              bool stochastic, uint32_t key,
                                              const RoundingArgs& r, int64_t e0,
                                              uint32_t stream) {
  constexpr int kPer = 16 / sizeof(T);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (stochastic) {
      // kernel_common.cuh's store: whole vector pieces on the aligned path (a bfloat16 momentum
      // of float32 parameters: 4 elements, one 64-bit store), else `count` element stores.
      store_lanes<kFull, V>(p, count, [&](int j) {
        return T(bf16_bits_stochastic(in[j], rounding_bits(key, r.index(e0 + j), stream)),
                 T::from_bits());
      });
      return;
    }
  }
  if constexpr (V % kPer == 0) {
    store_frag<kFull>(p, in, count);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (kFull || j < count) {
        p[j] = static_cast<T>(in[j]);
      }
    }
  }
}

// The one store of the update's results: theta in the storage dtype, m in float32 or bfloat16;
// a bfloat16 one stochastically rounded when the op was given a rounding list, else to nearest.
// Element i of the chunk that begins at `begin`: local element begin + i of the tensor.
template <bool kFull, int V, typename scalar_t, typename mom_t>
__device__ __forceinline__ void store_update(scalar_t* param, mom_t* mom, const float (&theta)[V],
                                             const float (&m)[V], int count, bool stochastic,
                                             uint32_t key, const RoundingArgs& r, int64_t e0) {
  store_rounded<kFull>(mom, m, count, stochastic, key, r, e0, kStreamMomentum);
  store_rounded<kFull>(param, theta, count, stochastic, key, r, e0, kStreamParam);
}

struct AdaBlock {
  float grad_mul;
  AdaCoeffs co;
  uint32_t key;  // tensor_key(seed, t) of the block's tensor when it rounds stochastically
};

template <typename scalar_t, typename mom_t, bool kDecoupled>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    update_kernel(const __grid_constant__ UpdateArgs args) {
  // A gradient anywhere in the step whose square is not finite, or GradScaler's found_inf: the
  // check (or the scaler) ran earlier on this stream, so *skip is final; uniform over the block.
  if (*args.s.skip != 0.0f) {
    return;
  }
  __shared__ AdaBlock ab;
  const UpdateTables& t = args.t;
  const Scalars& s = args.s;
  const int tensor = t.block_tensor[blockIdx.x];
  const int64_t chunk0 = t.block_chunk[blockIdx.x];
  const RoundingArgs& where = t.round[tensor];
  if (threadIdx.x == 0) {  // two float64 operations and a pow, once per block
    const float step = *t.step[tensor];
    ab.grad_mul = grad_mul_of(s.maximize, s.grad_scale);
    ab.co = ada_coeffs(s.beta, static_cast<double>(step),
                       lr64_of(s.lr_ptr, s.lr_is_double, s.lr64), kDecoupled);
    ab.key = tensor_key(where.seed, static_cast<uint32_t>(static_cast<int64_t>(step)));
  }
  __syncthreads();
  constexpr int V = 16 / sizeof(scalar_t);
  const int64_t chunk_end = min(chunk0 + t.per_block[tensor],
                                static_cast<int64_t>(t.nchunks[tensor]));
  const bool vec = (t.flags[tensor] & kFlagVector) != 0;
  const int64_t cols = t.cols[tensor];
  const float* sv = t.s[tensor];
  const float* hv = t.h[tensor];
  for (int64_t chunk = chunk0; chunk < chunk_end; ++chunk) {
    const int64_t begin = chunk * s.chunk_size;
    const int n = chunk_len(t, tensor, begin, s.chunk_size);
    auto* param = static_cast<scalar_t*>(t.param[tensor]) + begin;
    const auto* grad = static_cast<const scalar_t*>(t.grad[tensor]) + begin;
    auto* mom = static_cast<mom_t*>(t.mom[tensor]) + begin;
    // The chunk's first element is row row0, column col0; col0 + i < 2^31 (cols < 2^30 and
    // chunk_size <= 2^30, checked by describe()), so a fragment's row and column take one
    // 32-bit division.
    const int64_t row0 = cols > 0 ? begin / cols : 0;
    const uint32_t col0 = cols > 0 ? static_cast<uint32_t>(begin % cols) : 0u;
    const uint32_t ucols = static_cast<uint32_t>(cols);
    for_each_frag<V>(n, vec, [&](int i, int count, auto full) {
      constexpr bool kFull = decltype(full)::value;
      float g[V], theta[V], m[V];
      load_frag<kFull>(g, grad + i, count, 0.0f);
      load_frag<kFull>(theta, param + i, count, 0.0f);
      load_mom_frag<kFull>(m, mom + i, count);
      uint32_t col = 0;
      int64_t row = 0;
      if (cols > 0) {
        const uint32_t q = col0 + static_cast<uint32_t>(i);
        row = row0 + q / ucols;
        col = q % ucols;
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float fim = 1.0f;
        if (cols > 0 && (kFull || j < count)) {  // padding lanes would read past S
          fim = adafisher_fim(sv[row], hv[col], s.damping);
          if (++col == ucols) {
            col = 0;
            ++row;
          }
        }
        adafisher_update<kDecoupled>(theta[j], m[j], g[j] * ab.grad_mul, fim, s.beta_f,
                                     s.one_minus_beta, s.weight_decay, ab.co.a, ab.co.bc);
      }
      store_update<kFull>(param + i, mom + i, theta, m, count, t.stochastic, ab.key, where,
                          begin + i);
    });
  }
}

// ---- host side --------------------------------------------------------------------------------

void nonfinite_check(const LaunchDesc& d) {
  launch_plan<Tables>(d, plan_of(d),
                      []<typename K>(K) { return &check_kernel<typename K::type>; });
}

void update(const LaunchDesc& d) {
  // describe() leaves p at 0.5: launch_plan's dispatch picks one Instance per dtype; the
  // momentum's dtype and the decoupling pick among four kernels.
  launch_plan<UpdateTables>(d, plan_of(d), [&]<typename K>(K) {
    using T = typename K::type;
    if (d.mom_bf16) {
      return d.s.decoupled ? &update_kernel<T, c10::BFloat16, true>
                           : &update_kernel<T, c10::BFloat16, false>;
    }
    return d.s.decoupled ? &update_kernel<T, float, true> : &update_kernel<T, float, false>;
  });
}

}  // namespace
}  // namespace fadam::cuda::adafisher

// The emulated build registers its kernels under cuda_emulated_nonfinite_check /
// cuda_emulated_adafisher_update (defined by fadam_fused._ext with op_contract.define_adafisher_ops
// before it loads that build), so they never shadow the CPU kernels.
TORCH_LIBRARY_IMPL(fadam_fused, FADAM_CUDA_DISPATCH_KEY, m) {
  using fadam::cuda::kCudaLimits;
  namespace a = fadam::cuda::adafisher;
  m.impl(FADAM_CUDA_OP("nonfinite_check", "cuda_emulated_nonfinite_check"),
         &fadam::nonfinite_check_op<kCudaLimits, &a::nonfinite_check>);
  m.impl(FADAM_CUDA_OP("adafisher_update", "cuda_emulated_adafisher_update"),
         &fadam::adafisher_update_op<kCudaLimits, &a::update>);
}
