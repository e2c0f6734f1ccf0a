// CUDA kernels of the two FAdam ops (TORCH_LIBRARY_IMPL(fadam_fused, CUDA)), docs/design.md
// section 3. The same source also compiles with g++ and HIP-CPU into the emulated test build
// ([note: one CUDA source, two compilers] in cuda/launch.h, which holds all that differs). The
// launchers read the op's LaunchDesc ([note: the op boundary] in csrc/op_boundary.h) and launch
// through launch_plan() (kernel_common.cuh), as FAdafactor's do.
//
// Multi-tensor: a launch covers up to kMaxTensors tensors and kMaxBlocks blocks whose tables are
// passed by value ([note: CUDA multi-tensor plan] in multi_tensor_plan.h, which also says what each
// block does). One launch per phase per group unless the tables fill.
//
// Element math: csrc/fadam_math.h, the header the CPU kernel uses ([note: FAdam math lives here]).
// Each element is loaded from its storage dtype into float32 and all element math is float32;
// step scalars (b2hat, grad scale, clip scales, lr) are float64 on the device and rounded to
// float32 once per block; sums of squares accumulate in float64 (w^2 overflows float32 with
// eps = 1e-30: docs/design.md section 5).
//
// Clipping off (clip <= 0): phase A only checks every gradient (reads g, writes no slot) and phase
// B reads no slot and does not reduce one-chunk tensors: 32 B/param for every tensor.
//
// Thread -> element mapping. A block has kThreads = 512 threads; a thread handles "fragments" of
// V = 16 / sizeof(scalar_t) consecutive elements (4 for float32, 8 for bf16/fp16: one 128-bit
// load of the param or grad, one or two of the float32 state), fragment k of a chunk going to
// thread k % 512. When all pointers of a tensor are 16-byte aligned and chunk_size % V == 0 the
// full fragments use 128-bit loads and stores; otherwise (and for the ragged last fragment) the
// same fragments are loaded element by element. Both paths visit the same elements in the same
// order per thread, so the float64 sums, and hence every output, are bitwise the same whatever the
// alignment: deterministic for the same values, not just for the same addresses. Padding lanes of
// a ragged fragment hold g = 0, theta = 0, f = 1 and are kept out of the sums: at t = 1
// (b2hat = 0) their new f is 0, so d = eps^(2p) may be 0 or a float32 denormal and
// 0 * (1 / d) = NaN would turn clipping off for the whole tensor.
//
// Reductions are deterministic: each thread adds its fragments in order, a warp combines with
// __shfl_down_sync in a fixed tree, and warp 0 combines the 16 warp sums in a fixed tree. Phase A
// stores a chunk's (sum ghat^2, sum w^2) into the chunk's slot with a plain store (one writer per
// slot; no atomics, no cleanup kernel). Phase B sums a tensor's slots with the same fixed tree:
// thread t adds slots t, t + 512, ... in order. A one-chunk tensor gives the same total through
// either path (its single slot plus exact zeros), so fuse_one_chunk does not change results.
//
// Indexing: a chunk's base pointer is offset by (int64) chunk * chunk_size, so tensors of more
// than 2^31 elements work; indices inside a chunk are int32 (chunk_size <= 2^30 is checked).
//
// Precision flags: setup.py compiles this file with --fmad=false, so fim_update() and the float64
// sums round each operation separately, as the CPU build does (-ffp-contract=off): phase A and
// phase B cannot be contracted differently, and CUDA agrees with CPU except for the order of the
// float64 sums and the last ulp of powf (p != 0.5). The kernels are memory bound (about 12 flops
// per 40 bytes), so the lost FMAs cost nothing measurable.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/multi_tensor_plan.h"
#include "fadam_math.h"
#include "fadam_ops.h"
// Last: the emulated build includes HIP-CPU's runtime here, after every torch header.
#include "cuda/launch.h"
#include "cuda/kernel_common.cuh"

namespace fadam::cuda {
namespace {

// The tables of one launch (structure of arrays: no padding between fields), after the columns
// of every kernel's tables.
struct Tables : CommonTables {
  const void* grad[kMaxTensors];
  void* param[kMaxTensors];
  float* fim[kMaxTensors];
  void* mom[kMaxTensors];  // nullptr in phase A; float32, or bfloat16 (Scalars::mom_bf16)
  const float* step[kMaxTensors];
  int64_t slot0[kMaxTensors];

  // Fills the tables of one launch of the plan (host side).
  void fill(const Launch& launch, const LaunchDesc& d) {
    fill_tables(*this, launch, d, [&](size_t k, size_t i, const PlanTensor& pt) {
      param[k] = d.params[i].data_ptr();
      grad[k] = d.grads[i].const_data_ptr();
      fim[k] = d.fims[i].data_ptr<float>();
      mom[k] = d.moms.empty() ? nullptr : d.moms[i].data_ptr();
      step[k] = d.steps[i].const_data_ptr<float>();
      slot0[k] = pt.slot0;
      return vector_ok(d, param[k], grad[k], fim[k], mom[k]);
    });
  }
};

// The kernels' argument: the rounding kernels' tables add the rounding rows (WithRounding).
template <bool kRound>
using FAdamArgs = Args<std::conditional_t<kRound, WithRounding<Tables>, Tables>>;

// ---- per-chunk operands -----------------------------------------------------------------------

// FAdam's f: the stored f of the fragment, updated with this step's g (fim_update), and stored
// back by phase B (the Fim interface of kernel_common.cuh).
struct StoredFim {
  float* fim;  // the chunk's f
  float b2hat, one_minus_b2hat;

  template <bool kFull, int V>
  struct Frag {
    float* ptr;
    int count;
    float b2hat, one_minus_b2hat;
    float f[V];

    __device__ __forceinline__ float at(int e, float g) {
      f[e] = fim_update(f[e], g, b2hat, one_minus_b2hat);
      return f[e];
    }
    __device__ __forceinline__ void store() const {
      store_frag<kFull>(ptr, f, count);
    }
  };

  template <bool kFull, int V>
  __device__ __forceinline__ Frag<kFull, V> frag(int i, int count) const {
    Frag<kFull, V> ff{fim + i, count, b2hat, one_minus_b2hat, {}};
    load_frag<kFull>(ff.f, fim + i, count, 1.0f);
    return ff;
  }
};

template <typename scalar_t>
struct ChunkPtrs {
  scalar_t* param;
  const scalar_t* grad;
  float* f;
  void* mom;
  int n;     // elements in the chunk
  bool vec;  // 128-bit path allowed

  __device__ __forceinline__ StoredFim fim(const BlockScalars& bs) const {
    return {f, bs.b2hat, bs.one_minus_b2hat};
  }
};

// A chunk's operands; `mom_bf16`: the rounding kernels' bfloat16 momentums.
template <typename scalar_t, typename Tables>
__device__ __forceinline__ ChunkPtrs<scalar_t> chunk_ptrs(const Tables& t, int tensor,
                                                          int64_t chunk, int64_t chunk_size,
                                                          bool mom_bf16) {
  const int64_t begin = chunk * chunk_size;  // int64: tensors over 2^31 elements
  const int64_t left = t.numel[tensor] - begin;
  ChunkPtrs<scalar_t> c;
  c.param = static_cast<scalar_t*>(t.param[tensor]) + begin;
  c.grad = static_cast<const scalar_t*>(t.grad[tensor]) + begin;
  c.f = t.fim[tensor] + begin;
  c.mom = t.mom[tensor] == nullptr ? nullptr : mom_at<true>(t.mom[tensor], begin, mom_bf16);
  c.n = static_cast<int>(left < chunk_size ? (left > 0 ? left : 0) : chunk_size);
  c.vec = (t.flags[tensor] & kFlagVector) != 0;
  return c;
}

// ---- kernels ----------------------------------------------------------------------------------

// __grid_constant__: the tables stay in the kernel parameter bank (indexed constant loads with a
// block-uniform index) instead of being copied to local memory.
template <typename scalar_t, bool kSqrt>
__global__ void __launch_bounds__(kThreads, kMinBlocks) fadam_phase_a_kernel(const __grid_constant__ FAdamArgs<false> args) {
  __shared__ BlockScalars bs;
  __shared__ double scratch[2 * kWarps];
  const int tensor = args.t.block_tensor[blockIdx.x];
  const int64_t chunk = args.t.block_chunk[blockIdx.x];
  if (threadIdx.x == 0) {
    bs = block_scalars(args.s, args.t.step[tensor]);
  }
  __syncthreads();
  const auto c = chunk_ptrs<scalar_t>(args.t, tensor, chunk, args.s.chunk_size, false);
  bool bad = false;
  if (!args.s.clipping || (args.t.flags[tensor] & kFlagFused)) {
    // Only the overflow check: phase B reduces a fused tensor, and without clipping nothing
    // needs the sums.
    check_frags(c.grad, c.n, c.vec, bs.grad_mul, bad);
  } else {
    double s1 = 0.0, s2 = 0.0;
    reduce_frags<kSqrt>(c.grad, c.param, c.n, c.vec, c.fim(bs), bs.grad_mul, args.s.p,
                        args.s.eps_p, s1, s2, bad);
    store_slot(s1, s2, args.s.partials + 2 * (args.t.slot0[tensor] + chunk), scratch);
  }
  if (bad) {
    *args.s.skip = 1.0f;  // every writer stores the same value; 0 is never stored
  }
}

// kRound: the rounding instantiation ([note: stochastic rounding on CUDA] in kernel_common.cuh).
template <typename scalar_t, bool kSqrt, bool kRound>
__global__ void __launch_bounds__(kThreads, kMinBlocks) fadam_phase_b_kernel(const __grid_constant__ FAdamArgs<kRound> args) {
  __shared__ BlockScalars bs;
  __shared__ double scratch[2 * kWarps];
  phase_b_block<kSqrt, kRound, /*kFimUpdate=*/true>(
      args, bs, scratch,
      [](const auto& t, const Scalars& s, int tensor, int64_t chunk) {
        return chunk_ptrs<scalar_t>(t, tensor, chunk, s.chunk_size, kRound && s.mom_bf16);
      },
      [](const auto&, int) {});
}

// ---- host side --------------------------------------------------------------------------------

void phase_a(const LaunchDesc& d) {
  launch_plan<Tables>(
      d, make_plan(numels_of(d.params), d.chunk_size, d.fuse_one_chunk, Phase::A),
      []<typename K>(K) { return &fadam_phase_a_kernel<typename K::type, K::sqrt>; });
}

void phase_b(const LaunchDesc& d) {
  launch_phase_b<Tables>(
      d, make_plan(numels_of(d.params), d.chunk_size, d.fuse_one_chunk, Phase::B),
      []<typename K, typename R>(K, R) {
        return &fadam_phase_b_kernel<typename K::type, K::sqrt, R::value>;
      });
}

// ---- the plan as an op, for tests (tests/test_cuda_build.py) -----------------------------------

// One row per block, in launch order:
//   (launch, local tensor index, tensor index, first chunk, end chunk (exclusive), kind, slot0).
at::Tensor cuda_plan(std::vector<int64_t> numels, int64_t chunk_size, bool fuse_one_chunk,
                     std::string phase, int64_t max_tensors, int64_t max_blocks) {
  TORCH_CHECK(phase == "a" || phase == "b", "cuda_plan: phase must be 'a' or 'b', got ", phase);
  const Phase ph = phase == "a" ? Phase::A : Phase::B;
  const auto plan = make_plan(numels, chunk_size, fuse_one_chunk, ph,
                              max_tensors < 0 ? kMaxTensors : max_tensors,
                              max_blocks < 0 ? kMaxBlocks : max_blocks);
  int64_t rows = 0;
  for (const auto& l : plan) {
    rows += static_cast<int64_t>(l.blocks.size());
  }
  at::Tensor out = at::empty({rows, 7}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (size_t li = 0; li < plan.size(); ++li) {
    for (const PlanBlock& b : plan[li].blocks) {
      const PlanTensor& t = plan[li].tensors[b.local];
      const BlockKind kind = ph == Phase::A ? (t.fused ? BlockKind::kCheckOnly : BlockKind::kReduce)
                                            : (t.fused ? BlockKind::kFused : BlockKind::kUpdate);
      *o++ = static_cast<int64_t>(li);
      *o++ = b.local;
      *o++ = t.tensor;
      *o++ = b.chunk;
      *o++ = std::min<int64_t>(b.chunk + t.per_block, t.nchunks);
      *o++ = static_cast<int64_t>(kind);
      *o++ = t.slot0;
    }
  }
  return out;
}

std::vector<int64_t> cuda_plan_limits() {
  return {kMaxTensors, kMaxBlocks, kMaxPhaseBBlocksPerTensor, kThreads};
}

}  // namespace
}  // namespace fadam::cuda

TORCH_LIBRARY_FRAGMENT(fadam_fused, m) {
  // Host-only planning, exposed for tests; exists only in builds with the CUDA kernels
  // (cuda_plan, or cuda_emulated_plan in the emulated build).
  m.def(FADAM_CUDA_OP("cuda_plan", "cuda_emulated_plan") "(int[] numels, int chunk_size, bool fuse_one_chunk, str phase, "
        "int max_tensors=-1, int max_blocks=-1) -> Tensor",
        &fadam::cuda::cuda_plan);
  // (max tensors per launch, max blocks per launch, max phase-B blocks per tensor, threads/block)
  m.def(FADAM_CUDA_OP("cuda_plan_limits", "cuda_emulated_plan_limits") "() -> int[]", &fadam::cuda::cuda_plan_limits);
}

// The emulated build registers its kernels under ops of their own, cuda_emulated_phase_a/b (defined
// with the same schemas by fadam_fused/op_contract.py), so they never shadow the CPU kernels of
// fadam_phase_a/b.
TORCH_LIBRARY_IMPL(fadam_fused, FADAM_CUDA_DISPATCH_KEY, m) {
  using fadam::cuda::kCudaLimits;
  m.impl(FADAM_CUDA_OP("fadam_phase_a", "cuda_emulated_phase_a"),
         &fadam::fadam_phase_a_op<kCudaLimits, &fadam::cuda::phase_a>);
  m.impl(FADAM_CUDA_OP("fadam_phase_b", "cuda_emulated_phase_b"),
         &fadam::fadam_phase_b_op<kCudaLimits, &fadam::cuda::phase_b>);
}
