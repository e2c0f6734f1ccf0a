// Device and host helpers shared by the CUDA kernels of FAdam (fadam_cuda.cu) and FAdafactor
// (fadafactor_cuda.cu): the block shape, the kernels' argument (Args), the loads and stores of one
// fragment, the deterministic block reductions, the per-chunk loops, and the one launcher shape of
// every kernel (launch_plan). Included after cuda/launch.h, so the same helpers compile with nvcc
// and with HIP-CPU ([note: one CUDA source, two compilers]).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cuda/multi_tensor_plan.h"
#include "fadam_math.h"
#include "fadam_ops.h"
#include "op_boundary.h"
#include "stochastic_round.h"

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
                                          /*check_chunk_size=*/65536};

// ---- the kernels' argument ------------------------------------------------------------------------

// Launch-wide scalars (the LaunchDesc's host scalars) and device pointers, for every kernel.
struct Scalars : HostScalars {
  double* partials;  // [n_slots, 2]
  float* skip;       // one element
  int64_t chunk_size;
  bool mom_bf16;     // the momentums are bfloat16 (only the rounding kernels take them)
  bool rounding;     // the op's rounding list is non-empty: each tensor's row is in its tables
};

// The columns of every kernel's tables (the tensor and block tables of [note: CUDA multi-tensor
// plan]); each kernel's Tables derives from it and adds its own (structure of arrays: 8320 bytes
// with no padding, so the derived columns start 8-byte aligned).
struct CommonTables {
  int64_t numel[kMaxTensors];
  int32_t nchunks[kMaxTensors];
  int32_t per_block[kMaxTensors];
  uint8_t flags[kMaxTensors];
  uint16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];  // the block's chunk (or tile, or matrix)
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

// One vector load or store: 16 bytes, or 8 (the 4-element bfloat16 momentum of a float32
// fragment).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of T per vector piece of a V-element fragment: 16 bytes, or the whole fragment when
// it is smaller.
template <typename T, int V>
constexpr int kPieceOf = 16 / sizeof(T) < V ? 16 / sizeof(T) : V;

// Loads a fragment into float32 lanes. kFull: all V elements, with one 128-bit load per 16 bytes
// (LDG.E.128); otherwise `count` (< V, or V on the unaligned path) element loads, the remaining
// lanes set to `pad`.
template <bool kFull, int V, typename T>
__device__ __forceinline__ void load_frag(float (&out)[V], const T* p, int count, float pad) {
  constexpr int kPer = kPieceOf<T, V>;  // elements per vector piece
  static_assert(V % kPer == 0, "a fragment is whole vector pieces");
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

// Stores a fragment, lane j's value lane(j) (of type T): with kFull one vector store per piece,
// otherwise `count` element stores.
template <bool kFull, int V, typename T, typename Lane>
__device__ __forceinline__ void store_lanes(T* p, int count, Lane&& lane) {
  constexpr int kPer = kPieceOf<T, V>;
  if constexpr (kFull) {
#pragma unroll
    for (int q = 0; q < V / kPer; ++q) {
      Pack<T, kPer> pk;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        pk.v[j] = lane(q * kPer + j);
      }
      reinterpret_cast<Pack<T, kPer>*>(p)[q] = pk;
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < count) {
        p[j] = lane(j);
      }
    }
  }
}

// Stores a fragment, rounding float32 to T (round to nearest even for bf16 / fp16).
template <bool kFull, int V, typename T>
__device__ __forceinline__ void store_frag(T* p, const float (&in)[V], int count) {
  store_lanes<kFull, V>(p, count, [&](int j) { return static_cast<T>(in[j]); });
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
  uint32_t key;    // the rounding kernels: tensor_key(seed, t) of the block's tensor
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

// ---- stochastic rounding of phase B's stores ---------------------------------------------------
//
// [note: stochastic rounding on CUDA]
// Each phase-B kernel has two instantiations per dtype and p. kRound false stores theta to
// nearest and a float32 m, with the tables of round to nearest: nothing of the rounding reaches
// it. kRound true runs when the op has a rounding list or bfloat16 momentums
// (launch_phase_b()); its tables add each tensor's row of the rounding list (WithRounding: 32 B
// per tensor that the other launches do not copy), and it branches on the launch-wide
// s.rounding and s.mom_bf16 (uniform over the grid). The bits are csrc/stochastic_round.h's, drawn
// as the CPU kernels draw them (cpu_vec.h's Rounder): key = tensor_key(seed, t) once per block,
// t the tensor's step read on the device (no host sync; graph capturable), the stream keys once
// per fragment, and one fmix32 per element and stream (pair_bits of the element's pair, of which
// it takes its half; the CPU's vectors use each pair hash twice, a thread here would keep both
// halves live across its fragment for little: the kernel is memory-bound).

// A chunk's rounding: its tensor's row of the rounding list (in the kernel parameter space), the
// tensor's key, and the chunk's first local element.
struct ChunkRounding {
  const RoundingArgs* where;
  uint32_t key;
  int64_t e0;
};

// tensor_key of a tensor's seed and step (steps[i] as an integer, as the CPU kernels read it).
__device__ __forceinline__ uint32_t step_key(const RoundingArgs& where, const float* step) {
  return tensor_key(where.seed, static_cast<uint32_t>(static_cast<int64_t>(*step)));
}

// The momentum from element `i` of a chunk's: float32, or bfloat16 in the rounding kernels when
// the launch's momentums are.
template <bool kRound>
__device__ __forceinline__ void* mom_at(void* mom, int64_t i, bool bf16) {
  if (kRound && bf16) {
    return static_cast<c10::BFloat16*>(mom) + i;
  }
  return static_cast<float*>(mom) + i;
}

template <bool kRound, bool kFull, int V>
__device__ __forceinline__ void load_mom(float (&out)[V], const void* mom, int count, bool bf16) {
  if (kRound && bf16) {
    load_frag<kFull>(out, static_cast<const c10::BFloat16*>(mom), count, 0.0f);
  } else {
    load_frag<kFull>(out, static_cast<const float*>(mom), count, 0.0f);
  }
}

// The bfloat16 bits of a fragment's theta (stream 0, when scalar_t is bfloat16) and of its m
// (stream 1, when `mom_bf16`), lane j being local element e + j. A fragment that is one run of
// logical indices (a whole tensor, or inside a run of a strided shard) whose pairs do not cross a
// multiple of 2^32 takes the stream keys of its first pair; another (a fragment across the end of
// a run, or 2^32) takes RoundingArgs::index and the stream keys lane by lane.
template <typename scalar_t, bool kFull, int V>
__device__ __forceinline__ void rounding_bits_of(uint32_t (&theta_bits)[V / 2],
                                                 uint32_t (&m_bits)[V / 2],
                                                 const float (&theta)[V], const float (&m)[V],
                                                 int count, bool mom_bf16,
                                                 const ChunkRounding& cr, int64_t e) {
  const RoundingArgs& w = *cr.where;
  uint64_t first = static_cast<uint64_t>(w.base + e);
  bool run = true;
  if (!w.whole()) {
    const int64_t q = e / w.inner_local;
    const int64_t rem = e - q * w.inner_local;
    first = static_cast<uint64_t>(w.base + q * w.inner_global + rem);
    run = rem <= w.inner_local - V;
  }
  const uint32_t pair_hi = static_cast<uint32_t>(first >> 33);
  run = run && static_cast<uint32_t>(first >> 1) <= UINT32_MAX - V / 2;
  const uint32_t theta_key = stream_key(cr.key, pair_hi, kStreamParam);
  const uint32_t m_key = stream_key(cr.key, pair_hi, kStreamMomentum);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if (kFull || j < count) {
      const uint64_t index = run ? first + j : w.index(e + j);
      const uint32_t lo = static_cast<uint32_t>(index >> 1);
      const int shift = 16 * (j % 2);  // two lanes per word, the even one low
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        const uint32_t k = run ? theta_key : stream_key(cr.key, static_cast<uint32_t>(index >> 33),
                                                        kStreamParam);
        const uint32_t b = bf16_bits_stochastic(theta[j], pair_half(pair_bits(k, lo), index));
        theta_bits[j / 2] = shift == 0 ? b : theta_bits[j / 2] | (b << shift);
      }
      if (mom_bf16) {
        const uint32_t k = run ? m_key : stream_key(cr.key, static_cast<uint32_t>(index >> 33),
                                                    kStreamMomentum);
        const uint32_t b = bf16_bits_stochastic(m[j], pair_half(pair_bits(k, lo), index));
        m_bits[j / 2] = shift == 0 ? b : m_bits[j / 2] | (b << shift);
      }
    }
  }
}

template <bool kFull, int V>
__device__ __forceinline__ void store_bits(c10::BFloat16* p, const uint32_t (&bits)[V / 2],
                                           int count) {
  store_lanes<kFull, V>(p, count, [&](int j) {
    return c10::BFloat16(static_cast<uint16_t>(bits[j / 2] >> (16 * (j % 2))),
                         c10::BFloat16::from_bits());
  });
}

// The rounding kernels' stores of a fragment (local elements e, e + 1, ...): m float32 or
// bfloat16 (s.mom_bf16), and with s.rounding a bfloat16 theta and a bfloat16 m rounded
// stochastically, else to nearest. (The other kernels store theta to nearest and m float32.)
template <bool kFull, int V, typename scalar_t>
__device__ __forceinline__ void store_update(scalar_t* param, void* mom, const float (&theta)[V],
                                             const float (&m)[V], int count, const Scalars& s,
                                             const ChunkRounding& cr, int64_t e) {
  if (s.rounding) {
    uint32_t theta_bits[V / 2], m_bits[V / 2];
    rounding_bits_of<scalar_t, kFull>(theta_bits, m_bits, theta, m, count, s.mom_bf16, cr, e);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      store_bits<kFull, V>(param, theta_bits, count);
    } else {
      store_frag<kFull>(param, theta, count);
    }
    if (s.mom_bf16) {
      store_bits<kFull, V>(static_cast<c10::BFloat16*>(mom), m_bits, count);
    } else {
      store_frag<kFull>(static_cast<float*>(mom), m, count);
    }
    return;
  }
  if (s.mom_bf16) {  // bfloat16 momentums to nearest
    store_frag<kFull>(static_cast<c10::BFloat16*>(mom), m, count);
  } else {
    store_frag<kFull>(static_cast<float*>(mom), m, count);
  }
  store_frag<kFull>(param, theta, count);
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
// parameter, stored in place. The kRound kernels pass their chunk's rounding `cr` (store_update());
// the others pass nullptr and store theta to nearest and a float32 m, as before the rounding
// kernels existed (naming `cr` in their fragment loop spilled 24 bytes in FAdafactor's bf16 / fp16
// phase B on sm_90).
template <bool kSqrt, bool kRound, typename scalar_t, typename Fim>
__device__ __forceinline__ void update_frags(scalar_t* param, const scalar_t* grad, void* mom,
                                             int n, bool vec, const Fim& fim,
                                             const BlockScalars& bs, const Scalars& s,
                                             const ChunkRounding* cr) {
  constexpr int V = 16 / sizeof(scalar_t);
  for_each_frag<V>(n, vec, [&](int i, int count, auto full) {
    constexpr bool kFull = decltype(full)::value;
    float g[V], theta[V], m[V];
    load_frag<kFull>(g, grad + i, count, 0.0f);
    load_frag<kFull>(theta, param + i, count, 0.0f);
    auto ff = fim.template frag<kFull, V>(i, count);
    void* mi = mom_at<kRound>(mom, i, s.mom_bf16);
    load_mom<kRound, kFull>(m, mi, count, s.mom_bf16);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float gj = g[j] * bs.grad_mul;
      const float r = fisher_inv_denom<kSqrt>(ff.at(j, gj), s.p, s.eps_p);
      fadam_update(theta[j], m[j], gj * r, theta[j] * r, s.beta1, s.one_minus_beta1, bs.inv_s1,
                   bs.inv_s2, bs.lr, s.weight_decay);
    }
    ff.store();
    if constexpr (kRound) {
      store_update<kFull>(param + i, mi, theta, m, count, s, *cr, cr->e0 + i);
    } else {
      store_frag<kFull>(static_cast<float*>(mi), m, count);
      store_frag<kFull>(param + i, theta, count);
    }
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

// ---- phase B's block ------------------------------------------------------------------------------

// What a phase-B block of FAdam or FAdafactor does, after its kernel has declared the block's
// shared scalars and scratch: the skip check, the block scalars (b2hat from the tensor's step when
// kFimUpdate: FAdam's f update), first_block(t, tensor) in a tensor's first block (FAdafactor's
// copy of its new factors), the clip scales and the update of the block's chunks. chunk_of(t, s,
// tensor, chunk) gives a chunk's operands (param, grad, mom, n, vec) and its source of f,
// c.fim(bs) (the Fim of the per-chunk loops above).
template <bool kSqrt, bool kRound, bool kFimUpdate, typename Tables, typename ChunkOf,
          typename FirstBlock>
__device__ __forceinline__ void phase_b_block(const Args<Tables>& args, BlockScalars& bs,
                                              double* scratch, ChunkOf&& chunk_of,
                                              FirstBlock&& first_block) {
  // An overflow anywhere in the group skips the whole step ([note: the overflow rule]). The
  // phases before ran earlier on this stream, so *skip is final; the branch is uniform over the
  // block.
  if (*args.s.skip != 0.0f) {
    return;
  }
  const Tables& t = args.t;
  const Scalars& s = args.s;
  const int tensor = t.block_tensor[blockIdx.x];
  const int64_t chunk0 = t.block_chunk[blockIdx.x];
  if (threadIdx.x == 0) {
    bs = block_scalars(s, kFimUpdate ? t.step[tensor] : nullptr);
    if constexpr (kRound) {
      if (s.rounding) {
        bs.key = step_key(t.round[tensor], t.step[tensor]);
      }
    }
  }
  __syncthreads();
  if (chunk0 == 0) {
    first_block(t, tensor);
  }
  // A fused tensor does both phases in this block ([note: fused one-chunk tensors]).
  clip_scales(s, (t.flags[tensor] & kFlagFused) != 0, s.partials, t.slot0[tensor],
              t.nchunks[tensor], t.numel[tensor], bs, scratch, [&](double& s1, double& s2) {
    const auto c = chunk_of(t, s, tensor, int64_t{0});
    bool unused = false;
    reduce_frags<kSqrt>(c.grad, c.param, c.n, c.vec, c.fim(bs), bs.grad_mul, s.p, s.eps_p, s1,
                        s2, unused);
  });
  const int64_t chunk_end = min(chunk0 + t.per_block[tensor], static_cast<int64_t>(t.nchunks[tensor]));
  for (int64_t chunk = chunk0; chunk < chunk_end; ++chunk) {
    const auto c = chunk_of(t, s, tensor, chunk);
    if constexpr (kRound) {
      const ChunkRounding cr{&t.round[tensor], bs.key, chunk * s.chunk_size};
      update_frags<kSqrt, true>(c.param, c.grad, c.mom, c.n, c.vec, c.fim(bs), bs, s, &cr);
    } else {
      update_frags<kSqrt, false>(c.param, c.grad, c.mom, c.n, c.vec, c.fim(bs), bs, s, nullptr);
    }
  }
}

// ---- host side ----------------------------------------------------------------------------------

inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Whether a tensor's full fragments may take vector loads and stores: every pointer 16-byte
// aligned (nullptr, an operand the kernel does not take, is) and chunks of whole fragments.
template <typename... Ptrs>
bool vector_ok(const LaunchDesc& d, const Ptrs*... ptrs) {
  return d.chunk_size % (16 / static_cast<int64_t>(d.params[0].element_size())) == 0 &&
         (aligned16(ptrs) && ...);
}

// Fills the columns every kernel's tables share (CommonTables), for one launch (host side): per
// tensor its numel, chunks and flags, `vec = tensor(k, i, pt)` having filled the kernel's own
// columns of local tensor k (the op's tensor i, its plan entry pt) and said whether its
// fragments may be vectors; per block its local tensor and chunk (or tile, or matrix: the plan
// entry's `chunk`).
template <typename Tensor>
void fill_tables(CommonTables& t, const Launch& launch, const LaunchDesc& d, Tensor&& tensor) {
  for (size_t k = 0; k < launch.tensors.size(); ++k) {
    const PlanTensor& pt = launch.tensors[k];
    const auto i = static_cast<size_t>(pt.tensor);
    const bool vec = tensor(k, i, pt);
    t.numel[k] = d.params[i].numel();
    t.nchunks[k] = static_cast<int32_t>(pt.nchunks);
    t.per_block[k] = static_cast<int32_t>(pt.per_block);
    t.flags[k] = static_cast<uint8_t>((pt.fused ? kFlagFused : 0) | (vec ? kFlagVector : 0));
  }
  for (size_t b = 0; b < launch.blocks.size(); ++b) {
    t.block_tensor[b] = static_cast<uint16_t>(launch.blocks[b].local);
    t.block_chunk[b] = launch.blocks[b].chunk;
  }
}

// The tables of a rounding kernel ([note: stochastic rounding on CUDA]): the optimizer's, plus
// each tensor's row of the op's rounding list (a default row when the list is empty: bfloat16
// momentums to nearest).
template <typename Base>
struct WithRounding : Base {
  RoundingArgs round[kMaxTensors];

  void fill(const Launch& launch, const LaunchDesc& d) {
    Base::fill(launch, d);
    for (size_t k = 0; k < launch.tensors.size(); ++k) {
      round[k] = d.rounding.empty() ? RoundingArgs{}
                                    : d.rounding[static_cast<size_t>(launch.tensors[k].tensor)];
    }
  }
};

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
  args.s.mom_bf16 = d.mom_bf16;
  args.s.rounding = !d.rounding.empty();
  const LaunchScope scope(d.device);
  dispatch(d.dtype, d.p, [&]<typename scalar_t, bool kSqrt>() {
    const auto kernel = kernel_of(Instance<scalar_t, kSqrt>{});
    for (const Launch& launch : plan) {
      args.t.fill(launch, d);
      scope.launch(kernel, static_cast<unsigned>(launch.blocks.size()), kThreads, args);
    }
  });
}

// The launches of a phase-B kernel: `kernel_of(Instance<scalar_t, kSqrt>{}, round)` is its
// kRound = decltype(round)::value instantiation, the rounding one (with WithRounding tables) when
// the op has a rounding list or bfloat16 momentums ([note: stochastic rounding on CUDA]).
template <typename Tables, typename KernelOf>
void launch_phase_b(const LaunchDesc& d, const std::vector<Launch>& plan, KernelOf&& kernel_of) {
  if (d.mom_bf16 || !d.rounding.empty()) {
    launch_plan<WithRounding<Tables>>(
        d, plan, [&]<typename K>(K k) { return kernel_of(k, std::true_type{}); });
  } else {
    launch_plan<Tables>(d, plan, [&]<typename K>(K k) { return kernel_of(k, std::false_type{}); });
  }
}

}  // namespace fadam::cuda
