// Device and host helpers shared by the CUDA kernels of FAdam (fadam_cuda.cu) and FAdafactor
// (fadafactor_cuda.cu): the block shape, the kernels' argument (Args), the loads and stores of one
// fragment, the deterministic block reductions, the per-chunk loops, and the one launcher shape of
// every kernel (launch_plan). Included after cuda/launch.h, so the same helpers compile with nvcc
// and with HIP-CPU ([note: one CUDA source, two compilers]).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cuda/multi_tensor_plan.h"
#include "fadam_math.h"
#include "fadam_ops.h"
#include "op_boundary.h"

namespace fadam::cuda {

// 512 threads: PyTorch's multi-tensor block size. A 64K chunk is then 32 fragments per thread
// (float32) or 16 (bf16), enough loop trips to hide the per-block prologue.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// At least 2 resident blocks (1024 threads) per SM: caps registers at 64 per thread. Without it
// the bf16/fp16 phase-B kernels take 72 registers, which leaves one 512-thread block per SM (25%
// occupancy) and too few loads in flight to saturate HBM.
constexpr int kMinBlocks = 2;
// FAdafactor's phase-S tile kernel (fadafactor_cuda.cu) keeps each lane's column sums of 8
// columns in registers (16 in float64): tiles of at most 32 x 8 = 256 columns. factor_tile() gives
// isqrt(chunk_size) = 256 at the 65536 chunk; larger chunks are refused (kCudaLimits).
constexpr int kMaxTileCols = 256;

// What the CUDA kernels take beyond the op contract ([note: the op boundary]): 32-bit indices
// inside a chunk and in the plan's block entries, a slot read as one 128-bit load, and the tile
// width above. Not `inline`: an internal-linkage constant per library, since fadam_fused._C and
// _C_cuda_emulated (kDeviceType CPU) are loaded into one process, where the dynamic linker would
// give both libraries one copy of an inline variable.
constexpr KernelLimits kCudaLimits{kDeviceType, "the CUDA kernels", int64_t{1} << 30,
                                          /*aligned_partials=*/true, kMaxTileCols,
                                          /*int32_geometry=*/true,
                                          /*stochastic_rounding=*/false,
                                          /*check_chunk_size=*/65536};

// ---- the kernels' argument ------------------------------------------------------------------------

// Launch-wide scalars (the LaunchDesc's host scalars) and device pointers, for every kernel.
struct Scalars : HostScalars {
  double* partials;  // [n_slots, 2]
  float* skip;       // one element
  int64_t chunk_size;
};

// The one argument of every kernel, passed by value in the kernel parameter space with the
// launch's tables (one Tables struct per optimizer: the tensor and block tables of [note: CUDA
// multi-tensor plan]), as PyTorch's MultiTensorApply passes its TensorListMetadata.
template <typename Tables>
struct Args {
  Tables t;
  Scalars s;
};

// ---- loads and stores of one fragment ---------------------------------------------------------

template <typename T, int N>
struct alignas(16) Pack {
  T v[N];
};

// Loads a fragment into float32 lanes. kFull: all V elements, with one 128-bit load per 16 bytes
// (LDG.E.128); otherwise `count` (< V, or V on the unaligned path) element loads, the remaining
// lanes set to `pad`.
template <bool kFull, int V, typename T>
__device__ __forceinline__ void load_frag(float (&out)[V], const T* p, int count, float pad) {
  constexpr int kPer = 16 / sizeof(T);  // elements per 128-bit piece
  static_assert(V % kPer == 0, "a fragment is whole 128-bit pieces");
  if constexpr (kFull) {
#pragma unroll
    for (int q = 0; q < V / kPer; ++q) {
      const Pack<T, kPer> pk = reinterpret_cast<const Pack<T, kPer>*>(p)[q];
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        out[q * kPer + j] = static_cast<float>(pk.v[j]);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      out[j] = j < count ? static_cast<float>(p[j]) : pad;
    }
  }
}

// Stores a fragment, rounding float32 to T (round to nearest even for bf16 / fp16).
template <bool kFull, int V, typename T>
__device__ __forceinline__ void store_frag(T* p, const float (&in)[V], int count) {
  constexpr int kPer = 16 / sizeof(T);
  if constexpr (kFull) {
#pragma unroll
    for (int q = 0; q < V / kPer; ++q) {
      Pack<T, kPer> pk;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        pk.v[j] = static_cast<T>(in[q * kPer + j]);
      }
      reinterpret_cast<Pack<T, kPer>*>(p)[q] = pk;
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < count) {
        p[j] = static_cast<T>(in[j]);
      }
    }
  }
}

// Calls body(i, count, kFull) for the fragments of this thread in a chunk of n elements, in
// order. The vector/scalar choice is made once per fragment, so each path is straight-line code
// (deciding per load and per store kept 8 predicates live and spilled one of them in phase B).
template <int V, typename Body>
__device__ __forceinline__ void for_each_frag(int n, bool vec, Body&& body) {
  for (int i = threadIdx.x * V; i < n; i += kThreads * V) {
    const int count = min(V, n - i);
    if (vec && count == V) {
      body(i, V, std::true_type{});
    } else {
      body(i, count, std::false_type{});
    }
  }
}

// ---- deterministic block reductions -----------------------------------------------------------

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    x += __shfl_down_sync(0xffffffffu, x, off);
  }
  return x;
}

// Sum of (a, b) over the block in a fixed tree; the result is valid in thread 0. `scratch` holds
// 2 * kWarps doubles. Ends with a barrier, so scratch may be reused right after.
__device__ __forceinline__ void block_sum2(double& a, double& b, double* scratch) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    scratch[warp] = a;
    scratch[kWarps + warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kWarps ? scratch[lane] : 0.0;
    b = lane < kWarps ? scratch[kWarps + lane] : 0.0;
    a = warp_sum(a);
    b = warp_sum(b);
  }
  __syncthreads();
}

// ---- per-block scalars ------------------------------------------------------------------------

// Per-tensor flag bits of the kernels' tables.
constexpr uint8_t kFlagFused = 1;    // fuse_one_chunk && nchunks == 1
constexpr uint8_t kFlagVector = 2;   // all pointers 16-byte aligned and chunk_size % V == 0

struct BlockScalars {
  float b2hat;            // FAdam's f update (0 for FAdafactor, whose f needs no update)
  float one_minus_b2hat;
  float grad_mul;  // (maximize ? -1 : 1) / grad_scale, in float64 then rounded (as the CPU kernel)
  float lr;
  float inv_s1;
  float inv_s2;
};

// For thread 0, into shared memory: fim_coeffs() runs two float64 pow()s, once per block, not per
// thread. `step` is the tensor's step (nullptr: no f update, b2hat unused).
__device__ __forceinline__ BlockScalars block_scalars(const HostScalars& s, const float* step) {
  BlockScalars bs{};
  if (step != nullptr) {
    const FimCoeffs fc = fim_coeffs(s.beta2, static_cast<double>(*step));
    bs.b2hat = fc.b2hat;
    bs.one_minus_b2hat = fc.one_minus_b2hat;
  }
  bs.grad_mul = grad_mul_of(s.maximize, s.grad_scale);
  bs.lr = lr_of(s.lr_ptr, s.lr_is_double, s.lr);
  bs.inv_s1 = 1.0f;
  bs.inv_s2 = 1.0f;
  return bs;
}

// ---- per-chunk loops, for any source of f --------------------------------------------------------
//
// `fim` gives each fragment its f: `auto ff = fim.template frag<kFull, V>(i, count)` is the f of
// the fragment at i, ff.at(e, g_e) the element's f for this step (called for e = 0, 1, ... in
// order, and for the padding lanes past `count`, which must get a finite f), and ff.store() keeps
// the fragment's f (phase B). FAdam (StoredFim, fadam_cuda.cu) loads the stored f with the
// fragment's other operands, updates it with g and stores it back; FAdafactor (FactoredFim,
// fadafactor_cuda.cu) computes (R_i / sum R) C_j element by element and stores nothing (keeping
// f out of registers until it is used: its phase B would spill otherwise). Phases A and B call
// ff.at() on the same inputs, so phase A reduces the f that phase B applies, bit for bit.

// Phase-A work on n elements: float64 sums of ghat^2 and w^2 (per thread, in fragment order) and
// the overflow check of the scaled gradient ([note: the overflow rule] in fadam_math.h; its g * g
// is fim_update()'s).
template <bool kSqrt, typename scalar_t, typename Fim>
__device__ __forceinline__ void reduce_frags(const scalar_t* grad, const scalar_t* param, int n,
                                             bool vec, const Fim& fim, float grad_mul, float p,
                                             float eps_p, double& s1, double& s2, bool& bad) {
  constexpr int V = 16 / sizeof(scalar_t);
  for_each_frag<V>(n, vec, [&](int i, int count, auto full) {
    constexpr bool kFull = decltype(full)::value;
    float g[V], theta[V];
    load_frag<kFull>(g, grad + i, count, 0.0f);
    load_frag<kFull>(theta, param + i, count, 0.0f);
    auto ff = fim.template frag<kFull, V>(i, count);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float gj = g[j] * grad_mul;
      bad |= overflows(gj);
      const float r = fisher_inv_denom<kSqrt>(ff.at(j, gj), p, eps_p);
      if (kFull || j < count) {  // not the padding of a ragged fragment (fadam_cuda.cu header)
        const double ghat = static_cast<double>(gj * r);
        const double w = static_cast<double>(theta[j] * r);
        s1 += ghat * ghat;
        s2 += w * w;
      }
    }
  });
}

// The overflow check alone (phase A of a fused one-chunk tensor, or with clipping off).
template <typename scalar_t>
__device__ __forceinline__ void check_frags(const scalar_t* grad, int n, bool vec, float grad_mul,
                                            bool& bad) {
  constexpr int V = 16 / sizeof(scalar_t);
  for_each_frag<V>(n, vec, [&](int i, int count, auto full) {
    float g[V];
    load_frag<decltype(full)::value>(g, grad + i, count, 0.0f);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      bad |= overflows(g[j] * grad_mul);
    }
  });
}

// Phase-B work on n elements: f (the same ff.at() calls as reduce_frags), the momentum and the
// parameter, stored in place.
template <bool kSqrt, typename scalar_t, typename Fim>
__device__ __forceinline__ void update_frags(scalar_t* param, const scalar_t* grad, float* mom,
                                             int n, bool vec, const Fim& fim,
                                             const BlockScalars& bs, const HostScalars& s) {
  constexpr int V = 16 / sizeof(scalar_t);
  for_each_frag<V>(n, vec, [&](int i, int count, auto full) {
    constexpr bool kFull = decltype(full)::value;
    float g[V], theta[V], m[V];
    load_frag<kFull>(g, grad + i, count, 0.0f);
    load_frag<kFull>(theta, param + i, count, 0.0f);
    auto ff = fim.template frag<kFull, V>(i, count);
    load_frag<kFull>(m, mom + i, count, 0.0f);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float gj = g[j] * bs.grad_mul;
      const float r = fisher_inv_denom<kSqrt>(ff.at(j, gj), s.p, s.eps_p);
      fadam_update(theta[j], m[j], gj * r, theta[j] * r, s.beta1, s.one_minus_beta1, bs.inv_s1,
                   bs.inv_s2, bs.lr, s.weight_decay);
    }
    ff.store();
    store_frag<kFull>(mom + i, m, count);
    store_frag<kFull>(param + i, theta, count);
  });
}

// ---- the clip scales of phase B ------------------------------------------------------------------
//
// [note: fused one-chunk tensors]
// A one-chunk tensor (fuse_one_chunk) does both phases in one phase-B block: the reduce pass
// brings the chunk into L1/L2 and the update pass re-reads it from there, one HBM pass, while the
// chunks of the resident blocks fit in L2: 264 resident blocks on an H100 (132 SMs x 2) x 12 B x n
// <= 50 MB holds up to n ~ 16K elements per tensor (A100: 216 blocks, 40 MB, n ~ 15K). Larger
// one-chunk tensors (up to 64K) may miss and cost phase A's 12 B/param again, no more than the
// unfused path.

// Phase A's end: the block's (s1, s2) in a fixed tree, stored by thread 0 into its slot (one
// writer per slot: no atomics, no cleanup kernel).
__device__ __forceinline__ void store_slot(double s1, double s2, double* slot, double* scratch) {
  block_sum2(s1, s2, scratch);
  if (threadIdx.x == 0) {
    slot[0] = s1;
    slot[1] = s2;
  }
}

// Adds this thread's share of a tensor's slots (thread t: slots t, t + 512, ... in order).
__device__ __forceinline__ void sum_slots(const double* partials, int64_t slot0, int nslots,
                                          double& s1, double& s2) {
  // One 128-bit load per slot: partials is a contiguous [n_slots, 2] float64 tensor from the
  // caching allocator (512-byte aligned), so every slot is 16-byte aligned.
  const double2* slots = reinterpret_cast<const double2*>(partials) + slot0;
  for (int k = threadIdx.x; k < nslots; k += kThreads) {
    const double2 v = slots[k];
    s1 += v.x;
    s2 += v.y;
  }
}

// Phase B's clip scales into bs.inv_s1 / bs.inv_s2 for every thread: a fused one-chunk tensor's
// sums from reduce_fused(s1, s2) (both phases in this block), another tensor's from its `nslots`
// slots; the block's total in a fixed tree. No-op (scales 1) with clipping off.
template <typename ReduceFused>
__device__ __forceinline__ void clip_scales(const HostScalars& s, bool fused,
                                            const double* partials, int64_t slot0, int nslots,
                                            int64_t numel, BlockScalars& bs, double* scratch,
                                            ReduceFused&& reduce_fused) {
  if (!s.clipping) {
    return;
  }
  double s1 = 0.0, s2 = 0.0;
  if (fused) {
    reduce_fused(s1, s2);
  } else {
    sum_slots(partials, slot0, nslots, s1, s2);
  }
  block_sum2(s1, s2, scratch);
  if (threadIdx.x == 0) {
    bs.inv_s1 = static_cast<float>(clip_inv_scale(s1, numel, s.clip));
    bs.inv_s2 = static_cast<float>(clip_inv_scale(s2, numel, s.clip));
  }
  __syncthreads();
}

// ---- host side ----------------------------------------------------------------------------------

inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

inline std::vector<int64_t> numels_of(at::TensorList params) {
  std::vector<int64_t> out;
  out.reserve(params.size());
  for (const auto& p : params) {
    out.push_back(p.numel());
  }
  return out;
}

// One instantiation of a kernel: its storage dtype and whether p == 0.5 (dispatch()).
template <typename scalar_t, bool kSqrt>
struct Instance {
  using type = scalar_t;
  static constexpr bool sqrt = kSqrt;
};

// The launcher of every kernel: `kernel_of(Instance<scalar_t, kSqrt>{})` is the kernel for the
// group's dtype and p, launched once per launch of `plan` on the params' device and stream, with
// its tables filled by Tables::fill(launch, d). One shape for both optimizers, as PyTorch's
// multi_tensor_apply serves all its fused optimizers.
template <typename Tables, typename KernelOf>
void launch_plan(const LaunchDesc& d, const std::vector<Launch>& plan, KernelOf&& kernel_of) {
  // 32764 bytes is the kernel-parameter limit on Volta+ with CUDA 12.1+ (4096 before).
  static_assert(sizeof(Args<Tables>) <= 32764, "launch tables exceed the kernel parameter space");
  if (plan.empty()) {
    return;  // no block to run (no tensors, or none that this kernel works on)
  }
  Args<Tables> args{};
  static_cast<HostScalars&>(args.s) = d.s;
  args.s.partials = d.partials;
  args.s.skip = d.skip;
  args.s.chunk_size = d.chunk_size;
  const LaunchScope scope(d.device);
  dispatch(d.dtype, d.p, [&]<typename scalar_t, bool kSqrt>() {
    const auto kernel = kernel_of(Instance<scalar_t, kSqrt>{});
    for (const Launch& launch : plan) {
      args.t.fill(launch, d);
      scope.launch(kernel, static_cast<unsigned>(launch.blocks.size()), kThreads, args);
    }
  });
}

}  // namespace fadam::cuda
