// Vector helpers shared by the CPU kernels (fadam_cpu.cpp, fadafactor_cpu.cpp): float32 lanes
// loaded from the storage dtype, float64 lanes for sums of squares, and the (tensor, chunk) work
// items that the threads of at::parallel_for take heaviest first.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "fadam_math.h"
#include "fadam_ops.h"
#include "op_boundary.h"
#include "stochastic_round.h"

namespace fadam {

// The per-vector helpers of the element loops (loads and stores, the stochastic rounding hash).
// GCC left Rounder::bits, store_lanes and load_mom as calls, one per 8 elements with the vectors
// passed through the stack: FAdam's bfloat16 step with stochastic rounding took 1.38-1.69x the
// time of round to nearest on one thread, 1.01-1.05x inlined (bench/NOTES.md).
#define FADAM_VEC_INLINE [[gnu::always_inline]] inline

// The CPU kernels take every op call the contract allows ([note: the op boundary]).
constexpr KernelLimits kCpuLimits{c10::DeviceType::CPU, "the CPU kernels"};

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = fVec::size();

template <>
struct Prim<fVec> {
  static inline fVec sqrt(fVec x) {
    return x.sqrt();
  }
  static inline fVec pow(fVec x, fVec p) {
    return x.pow(p);
  }
};

// Loads kLanes elements of the storage dtype as float32 lanes, and stores them back.
template <typename scalar_t>
inline fVec load_float(const scalar_t* ptr) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return fVec::loadu(ptr);
  } else {
    fVec out;
    at::vec::load_to_float<scalar_t>(ptr, out);
    return out;
  }
}

template <typename scalar_t>
inline void store_float(scalar_t* ptr, fVec v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    v.store(ptr);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(ptr, kLanes);
  }
}

// Software prefetch, once per 64-byte line of a stream walked by vectors: the line
// kPrefetchBytes past element k of p, when element k starts a vector in the line's first
// kLanes elements. FAdafactor's loops convert, divide and take square roots per element, and
// from DRAM that work does not overlap the hardware prefetcher's misses: 4 KB ahead took its
// phase B 0.88-0.93x as long on the default list (2 threads; 1-16 KB gave 0.88-0.94x), a row
// below in phase S 0.84x (bench/NOTES.md). Past the end of a tensor it fetches a line that is
// not used: a prefetch never faults.
constexpr int64_t kPrefetchBytes = 4096;

template <typename T>
FADAM_VEC_INLINE void prefetch_ahead(const T* p, int64_t k) {
  constexpr auto kLine = static_cast<uint64_t>(64 / sizeof(T));  // elements per line
  if (static_cast<uint64_t>(k) % kLine < kLanes) {  // unsigned: an and, not a signed remainder
    __builtin_prefetch(reinterpret_cast<const char*>(p + k) + kPrefetchBytes);
  }
}

// `count` <= kLanes elements at `ptr` as float32 lanes; the missing lanes are 0.
template <typename scalar_t>
inline fVec load_padded(const scalar_t* ptr, int64_t count) {
  if (count == kLanes) {
    return load_float(ptr);
  }
  alignas(64) scalar_t buf[kLanes] = {};
  std::memcpy(buf, ptr, count * sizeof(scalar_t));
  return load_float(buf);
}

// ---- stochastic rounding ([note: stochastic rounding] in fadam_fused/op_contract.py) --------

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The vector constants of the hash, 8 lanes each, defined in sr_consts.cpp.
// Written as _mm256_set1_epi32(constant) in the loops, GCC rebuilt each one on every vector of
// 8 elements (mov, vmovd, vpbroadcastd: 12 of the stochastic store's ~35 instructions with the
// stream key's); read from an object whose values it cannot see, each is a memory operand of
// the vpmulld that uses it.
struct alignas(32) SrConsts {
  uint32_t fmix_mul1[8];  // fmix32's multipliers
  uint32_t fmix_mul2[8];
  uint32_t pair_step[8];  // 0, 1, 2, 3, 0, 1, 2, 3: a vector's 4 pairs, once per stream
};
// (Hidden: one library's symbol, addressed relative to the code, not through the GOT.)
extern const SrConsts kSrConsts __attribute__((visibility("hidden")));

FADAM_VEC_INLINE __m256i lanes_of(const uint32_t (&v)[8]) {
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(v));
}

// fmix32 of 8 uint32 lanes.
FADAM_VEC_INLINE __m256i fmix32_x8(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, lanes_of(kSrConsts.fmix_mul1));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, lanes_of(kSrConsts.fmix_mul2));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

// fmix32 of 4 uint32 lanes: the 8-lane one on the low half (the high lanes are don't-care; a
// 256-bit vpmulld costs what a 128-bit one does on Zen 2 and later).
FADAM_VEC_INLINE __m128i fmix32_x4(__m128i h) {
  return _mm256_castsi256_si128(fmix32_x8(_mm256_castsi128_si256(h)));
}

// bf16_bits_stochastic of csrc/stochastic_round.h, 8 lanes at a time: the bfloat16 bits (in
// each lane's low half) of float32 lanes x rounded stochastically with the 16 random bits of
// each lane in r (< 2^16). An infinity's low 16 bits are 0, so (bits(x) + r) >> 16 keeps it as
// round to nearest does: only a NaN needs its own case (0x7FC0, as torch's .to(bfloat16)), and
// NaNs are rare, so one test of the lanes skips the blend otherwise.
FADAM_VEC_INLINE __m256i stochastic_lanes(__m256 x, __m256i r) {
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(x), r), 16);
}

FADAM_VEC_INLINE __m256 nan_lanes(__m256 x) {
  return _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
}

FADAM_VEC_INLINE __m256i with_nan(__m256i bits, __m256 nan) {
  return _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
}

// 8 lanes of x into 8 bfloat16 at out.
FADAM_VEC_INLINE void stochastic_bf16_x8(__m256 x, __m256i r, uint16_t* out) {
  __m256i bits = stochastic_lanes(x, r);
  const __m256 nan = nan_lanes(x);
  if (!_mm256_testz_ps(nan, nan)) [[unlikely]] {
    bits = with_nan(bits, nan);
  }
  // 8 x uint32 (< 2^16) -> 8 x uint16: packus works per 128-bit half, then the halves' low
  // quadwords are joined.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
}

// The same for two operands of 8 lanes (a parameter and its momentum), with one NaN test and
// one pack for both: 16 of the ~37 instructions per 8 elements of the two-stream store were the
// two single-operand stores' tests, packs and permutes. (One vcmpps finds a NaN in either
// operand: unordered is true when x0 or x1 is a NaN.)
FADAM_VEC_INLINE void stochastic_bf16_x8x2(__m256 x0, __m256i r0, uint16_t* out0, __m256 x1,
                                           __m256i r1, uint16_t* out1) {
  __m256i b0 = stochastic_lanes(x0, r0), b1 = stochastic_lanes(x1, r1);
  const __m256 either = _mm256_cmp_ps(x0, x1, _CMP_UNORD_Q);
  if (!_mm256_testz_ps(either, either)) [[unlikely]] {
    b0 = with_nan(b0, nan_lanes(x0));
    b1 = with_nan(b1, nan_lanes(x1));
  }
  // packus interleaves the halves' quadwords (b0 0-3, b1 0-3 | b0 4-7, b1 4-7); 0xD8 orders
  // them (b0 0-7 | b1 0-7).
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b0, b1), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out0), _mm256_castsi256_si128(packed));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out1), _mm256_extracti128_si256(packed, 1));
}

// The 16-bit halves of 4 pair hashes as 8 lanes: lane 2j the low half of h_j (the even element
// of pair j), lane 2j + 1 its high half: exactly the zero extension of 8 uint16 (vpmovzxwd).
FADAM_VEC_INLINE __m256i pair_halves(__m128i h) {
  return _mm256_cvtepu16_epi32(h);
}
#endif

// One tensor's stochastic rounding in a CPU kernel: its row of the op's rounding list and the
// stream keys of its pairs below 2^32 (csrc/stochastic_round.h: tensor_key from the step read on
// the host, then stream_key). `on` is false for round to nearest (an empty rounding list).
struct Rounder {
  bool on = false;
  // Whether a vector that starts on an even logical index takes the vector path (bits): the
  // tensor (or shard) is one run of the logical tensor whose pairs, and a vector's worth past
  // its end (a ragged tail is hashed as a whole vector), all lie below 2^32, so their stream
  // keys are skeys'. Decided once here, so the loops test only the parity per vector. Tested
  // per vector (the run, the 2^32 bound, the pair's high half), those checks and the fallback
  // call's operands, spilled to the stack before them, were 21 of the two-stream store's ~60
  // instructions per 8 elements (objdump); it is ~39 now, round to nearest's two stores ~28.
  bool fast = false;
  uint32_t key = 0;
  // stream_key(key, 0, s): lanes 0-3 stream 0 (the parameter's), lanes 4-7 stream 1 (the
  // momentum's), so that a vector's two streams take their keys in one memory operand.
  alignas(32) std::array<uint32_t, 8> skeys{};
  RoundingArgs where{};

  Rounder() = default;
  Rounder(const LaunchDesc& d, size_t i, double step) {
    if (!d.rounding.empty()) {
      on = true;
      where = d.rounding[i];
      key = tensor_key(where.seed, static_cast<uint32_t>(static_cast<int64_t>(step)));
      for (const uint32_t stream : {kStreamParam, kStreamMomentum}) {
        std::fill_n(skeys.begin() + 4 * stream, 4, stream_key(key, 0, stream));
      }
      const auto last = static_cast<uint64_t>(where.base + d.params[i].numel() + kLanes);
      fast = where.whole() && where.base >= 0 && (last >> 1) < UINT32_MAX;
    }
  }

  uint32_t skey(uint32_t pair_hi, uint32_t stream) const {
    return pair_hi == 0 ? skeys[4 * stream] : stream_key(key, pair_hi, stream);
  }

  // kLanes lanes of v rounded stochastically to bfloat16 bits; lane j is local element e0 + j.
  FADAM_VEC_INLINE void bits(fVec v, int64_t e0, uint32_t stream, uint16_t* out) const {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    const uint64_t first = static_cast<uint64_t>(where.base + e0);
    if (fast && (first & 1) == 0) [[likely]] {
      const __m128i key4 = _mm_load_si128(reinterpret_cast<const __m128i*>(&skeys[4 * stream]));
      for_each_x8<1>({v}, first, [&](__m256i pairs, const __m256* x, int64_t q) {
        const __m128i h = fmix32_x4(_mm_xor_si128(_mm256_castsi256_si128(pairs), key4));
        stochastic_bf16_x8(x[0], pair_halves(h), out + q);
      });
      return;
    }
#endif
    bits_general<1>({v}, e0, {stream}, {out});
  }

  // The bits of a parameter's vector th (stream kStreamParam) and of its momentum's m
  // (kStreamMomentum), the same elements: one 8-lane fmix32 hashes 8 elements' pairs of both
  // streams, and the two share one NaN test and one pack (stochastic_bf16_x8x2).
  FADAM_VEC_INLINE void bits(fVec th, fVec m, int64_t e0, uint16_t* out_th,
                             uint16_t* out_m) const {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    const uint64_t first = static_cast<uint64_t>(where.base + e0);
    if (fast && (first & 1) == 0) [[likely]] {
      const __m256i keys = _mm256_load_si256(reinterpret_cast<const __m256i*>(skeys.data()));
      for_each_x8<2>({th, m}, first, [&](__m256i pairs, const __m256* x, int64_t q) {
        const __m256i h = fmix32_x8(_mm256_xor_si256(pairs, keys));
        stochastic_bf16_x8x2(x[0], pair_halves(_mm256_castsi256_si128(h)), out_th + q, x[1],
                             pair_halves(_mm256_extracti128_si256(h, 1)), out_m + q);
      });
      return;
    }
#endif
    bits_general<2>({th, m}, e0, {kStreamParam, kStreamMomentum}, {out_th, out_m});
  }

 private:
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // body(pairs, x, q) for each 8 lanes q, q + 8, ... of the kStreams vectors vs whose lane 0 is
  // the even logical element `first`: pairs holds the lanes' 4 pair indices twice (lanes 0-3 and
  // 4-7), x[s] the 8 float32 lanes of vs[s]. AVX-512's 16 lanes are two such halves.
  template <int kStreams, typename Body>
  FADAM_VEC_INLINE static void for_each_x8(const std::array<fVec, kStreams>& vs, uint64_t first,
                                           Body body) {
    const uint32_t p0 = static_cast<uint32_t>(first >> 1);
    if constexpr (kLanes == 8) {
      __m256 x[kStreams];
      for (int s = 0; s < kStreams; ++s) {
        x[s] = vs[s];
      }
      body(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(p0)),
                            lanes_of(kSrConsts.pair_step)),
           x, 0);
    } else {
      alignas(64) float x[kStreams][kLanes];
      for (int s = 0; s < kStreams; ++s) {
        vs[s].store(x[s]);
      }
      for (int64_t q = 0; q < kLanes; q += 8) {
        __m256 xq[kStreams];
        for (int s = 0; s < kStreams; ++s) {
          xq[s] = _mm256_load_ps(x[s] + q);
        }
        body(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(p0 + q / 2)),
                              lanes_of(kSrConsts.pair_step)),
             xq, q);
      }
    }
  }
#endif

  // bits() element by element, for any index (rounding_bits): a strided shard, an odd start,
  // pairs at or past 2^32, or a build without AVX2. Out of line and cold: the vector path keeps
  // its registers.
  template <int kStreams>
  [[gnu::noinline, gnu::cold]] void bits_general(
      const std::array<fVec, kStreams>& vs, int64_t e0,
      const std::array<uint32_t, kStreams>& streams,
      const std::array<uint16_t*, kStreams>& outs) const {
    alignas(64) float x[kStreams][kLanes];
    for (int s = 0; s < kStreams; ++s) {
      vs[s].store(x[s]);
    }
    for (int s = 0; s < kStreams; ++s) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const uint64_t index = where.index(e0 + j);
        const uint64_t pair = index >> 1;
        const uint32_t h = pair_bits(skey(static_cast<uint32_t>(pair >> 32), streams[s]),
                                     static_cast<uint32_t>(pair));
        outs[s][j] = bf16_bits_stochastic(x[s][j], pair_half(h, index));
      }
    }
  }
};

// Stores `count` lanes of v into dst (local element e0 onwards) in dtype T: stochastically
// rounded when T is bfloat16 and `r` is on, else to nearest (store_float).
template <typename T>
FADAM_VEC_INLINE void store_lanes(T* dst, fVec v, int64_t count, const Rounder& r, int64_t e0,
                                  uint32_t stream) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (r.on) {
      // A whole vector's bits go straight to dst: a staging buffer and a memcpy of a runtime
      // size (a libc call per 8 elements) are for the ragged tail only.
      if (count == kLanes) {
        r.bits(v, e0, stream, reinterpret_cast<uint16_t*>(dst));
        return;
      }
      alignas(64) uint16_t out[kLanes];
      r.bits(v, e0, stream, out);
      std::memcpy(dst, out, count * sizeof(uint16_t));
      return;
    }
  }
  if (count == kLanes) {
    store_float(dst, v);
  } else {
    alignas(64) T buf[kLanes];
    store_float(buf, v);
    std::memcpy(dst, buf, count * sizeof(T));
  }
}

// The element type of a momentum: bfloat16 or float32.
template <bool kBf16>
using Mom = std::conditional_t<kBf16, at::BFloat16, float>;

// A momentum of float32 or bfloat16 (momentum_dtype), loaded as float32 lanes (zero-padded past
// `count`) and stored back (bfloat16: stochastically when `r` is on, stream 1).
FADAM_VEC_INLINE fVec load_mom(const void* m, bool bf16, int64_t i, int64_t count) {
  if (bf16) {
    const auto* p = static_cast<const at::BFloat16*>(m) + i;
    if (count == kLanes) {
      return load_float(p);
    }
    alignas(64) at::BFloat16 buf[kLanes] = {};
    std::memcpy(buf, p, count * sizeof(at::BFloat16));
    return load_float(buf);
  }
  const auto* p = static_cast<const float*>(m) + i;
  if (count == kLanes) {
    return fVec::loadu(p);
  }
  alignas(64) float buf[kLanes] = {};
  std::memcpy(buf, p, count * sizeof(float));
  return fVec::loadu(buf);
}

FADAM_VEC_INLINE void store_mom(void* m, bool bf16, fVec v, int64_t i, int64_t count,
                                const Rounder& r) {
  if (bf16) {
    store_lanes(static_cast<at::BFloat16*>(m) + i, v, count, r, i, kStreamMomentum);
  } else {
    v.store(static_cast<float*>(m) + i, count);
  }
}

// Stores `count` lanes of a bfloat16 parameter (stream kStreamParam) and of its bfloat16 momentum
// (kStreamMomentum), local elements e0 onwards, both stochastically rounded when `r` is on: the
// two streams' pair hashes are one 8-lane fmix32 (Rounder::bits), the same bits as two
// store_lanes calls. Off: round to nearest, as store_lanes.
FADAM_VEC_INLINE void store_lanes(at::BFloat16* theta, fVec th, at::BFloat16* mom, fVec m,
                                  int64_t count, const Rounder& r, int64_t e0) {
  if (!r.on) {
    store_lanes(theta, th, count, r, e0, kStreamParam);
    store_lanes(mom, m, count, r, e0, kStreamMomentum);
    return;
  }
  if (count == kLanes) {
    r.bits(th, m, e0, reinterpret_cast<uint16_t*>(theta), reinterpret_cast<uint16_t*>(mom));
    return;
  }
  alignas(64) uint16_t out[2][kLanes];
  r.bits(th, m, e0, out[0], out[1]);
  std::memcpy(theta, out[0], count * sizeof(uint16_t));
  std::memcpy(mom, out[1], count * sizeof(uint16_t));
}

// Phase B's stores of one vector of a parameter and its momentum (float32 or bfloat16): the
// two-stream store_lanes above when both are bfloat16.
template <typename scalar_t>
FADAM_VEC_INLINE void store_param_mom(scalar_t* theta, fVec th, void* m, bool mom_bf16, fVec mv,
                                      int64_t i, int64_t count, const Rounder& r) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (mom_bf16) {
      store_lanes(theta + i, th, static_cast<at::BFloat16*>(m) + i, mv, count, r, i);
      return;
    }
  }
  store_lanes(theta + i, th, count, r, i, kStreamParam);
  store_mom(m, mom_bf16, mv, i, count, r);
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
using dVec = at::vec::Vectorized<double>;

// The low and high halves of a float vector, widened to float64 vectors.
inline std::pair<dVec, dVec> widen(fVec v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  return {dVec(_mm512_cvtps_pd(_mm512_castps512_ps256(x))),
          dVec(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))))};
#else
  const __m256 x = v;
  return {dVec(_mm256_cvtps_pd(_mm256_castps256_ps128(x))),
          dVec(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)))};
#endif
}

// float64 lanes, kLanes of them, held in registers.
struct WideLanes {
  dVec lo{0.0}, hi{0.0};
  inline void add(fVec v) {  // += v, widened
    const auto [a, b] = widen(v);
    lo = lo + a;
    hi = hi + b;
  }
  inline void add_square(fVec v) {  // += v * v in float64, one rounding (explicit FMA)
    const auto [a, b] = widen(v);
    lo = at::vec::fmadd(a, a, lo);
    hi = at::vec::fmadd(b, b, hi);
  }
  inline double total() const {
    alignas(64) double t[2 * dVec::size()];
    lo.store(t);
    hi.store(t + dVec::size());
    double s = 0.0;
    for (double x : t) {
      s += x;
    }
    return s;
  }
};
#else
struct WideLanes {
  std::array<double, kLanes> lane{};
  template <typename Op>
  inline void each(fVec v, Op op) {
    alignas(64) float t[kLanes];
    v.store(t);
    for (int64_t j = 0; j < kLanes; ++j) {
      lane[j] = op(lane[j], static_cast<double>(t[j]));
    }
  }
  inline void add(fVec v) {
    each(v, [](double acc, double x) { return acc + x; });
  }
  inline void add_square(fVec v) {
    each(v, [](double acc, double x) { return std::fma(x, x, acc); });
  }
  inline double total() const {
    double s = 0.0;
    for (double x : lane) {
      s += x;
    }
    return s;
  }
};
#endif

// True when every lane of v is +-0 (one vector compare on AVX2 / AVX-512). x - x and x * 0 are 0
// for finite x and NaN for inf or NaN, so this is the finiteness test of both accumulators below.
inline bool all_zero(fVec v) {
  return v.zero_mask() == (1 << kLanes) - 1;
}

// Sums of squares (float64 or an overflow-safe equivalent, docs/design.md section 5). Each float
// lane sums kBlockVectors squares in float32, one FMA per vector; flush() then widens that block
// partial and adds it to float64 lanes, in element order. Widening every square instead (two
// conversions and two float64 FMAs per vector and sum) made the reduction loop 1.6-1.9x slower
// (in L2; bench/NOTES.md): most of phase A's arithmetic.
//
// Overflow: ghat^2 is bounded (|ghat| <= 1 / sqrt(1 - beta2) at p = 0.5) but w^2 is not: with
// eps = 1e-30 and a zero gradient w is ~1e28 and w^2 overflows float32 (max 3.4e38). A block whose
// partial is not finite is summed again in float64 from its ghat and w, which the caller
// recomputes with the same instructions (fadam_cpu.cpp's reduce_chunk, fadafactor_cpu.cpp's
// reduce_range); the result is what float64 throughout would give, up to the float32 rounding of
// 8 squares per lane (relative 5e-7, on an RMS that is itself rounded to float32 as 1 / s).
// Squares below 1.2e-38 lose precision in float32; they reach the RMS only when the whole
// tensor's RMS is < 1e-19, where s = max(1, RMS / clip) = 1.
constexpr int64_t kBlockVectors = 8;

struct SumSq {
  fVec block{0.f};
  WideLanes wide;
  inline void add(fVec v) {
    block = at::vec::fmadd(v, v, block);
  }
  inline bool block_is_finite() const {
    return all_zero(block - block);
  }
  // Adds the block partial to the float64 lanes (the caller checked it) and starts a new block.
  inline void flush() {
    wide.add(block);
    block = fVec(0.f);
  }
  // Drops the block partial: the caller sums the block again with add_wide().
  inline void discard() {
    block = fVec(0.f);
  }
  inline void add_wide(fVec v) {
    wide.add_square(v);
  }
  inline double total() const {
    return wide.total();
  }
};

// Runs `body(offset, count)` over [begin, end) in vectors of kLanes, count = kLanes but for the
// last, partial vector (count < kLanes), which `body` loads into zero-padded copies (Lanes::load):
// it sees whole fVec lanes either way.
//
// Flattened: GCC kept some bodies out of line, one call per 8 elements with the vectors passed
// through the stack (AdaFisher's update along a row of the factors, FAdam's bfloat16-momentum
// update of a fused one-chunk tensor), and at::vec's float32 -> bfloat16 conversion a call too.
template <typename Body>
[[gnu::flatten]] inline void for_each_vector(int64_t begin, int64_t end, Body body) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    body(i, kLanes);
  }
  if (i < end) {
    body(i, end - i);
  }
}

// The sums of squares of [begin, end) by blocks of kBlockVectors vectors, in element order:
// first(i, count) adds a vector's ghat and w to s_ghat and s_w (SumSq::add), and a block whose
// float32 partials are not finite is dropped and summed again in float64 by wide(i, count)
// (SumSq::add_wide), from the same ghat and w. FAdam's reduce_chunk (fadam_cpu.cpp) and
// FAdafactor's reduce_range (a row segment at a time, fadafactor_cpu.cpp) both sum this way.
template <typename First, typename Wide>
inline void sum_blocks(int64_t begin, int64_t end, SumSq& s_ghat, SumSq& s_w, First first,
                       Wide wide) {
  for (int64_t b = begin; b < end; b += kBlockVectors * kLanes) {
    const int64_t e = std::min(end, b + kBlockVectors * kLanes);
    for_each_vector(b, e, first);
    if (s_ghat.block_is_finite() && s_w.block_is_finite()) {
      s_ghat.flush();
      s_w.flush();
    } else {
      s_ghat.discard();
      s_w.discard();
      for_each_vector(b, e, wide);
    }
  }
}

// Per-thread scratch of the CPU kernels' fused one-chunk tensors ([note: CPU fused one-chunk
// tensors] in fadam_cpu.cpp): r = 1/d for up to one chunk (2^20 floats, 4 MiB) in whole vectors,
// kept across steps so a step allocates nothing (thread_local: one per worker of the thread pool;
// FAdam's and FAdafactor's phase B use it in turn, never at once).
inline float* kept_buffer(int64_t numel) {
  thread_local std::vector<float> buf;
  const auto need = static_cast<size_t>((numel + kLanes - 1) / kLanes * kLanes);
  if (buf.size() < need) {
    buf.resize(need);
  }
  return buf.data();
}

// The launch's element constants as float32 lanes, from the LaunchDesc's host scalars.
struct Consts {
  float grad_mul;  // grad_mul_of(): (maximize ? -1 : 1) / grad_scale, read here on the host
  fVec p, eps_p, vgrad_mul;
  // grad_mul is exactly 1 (no maximize, no grad scale): the common case skips the multiply, one
  // of the 7-8 multiplies per vector that load the FMA pipes in each loop (x * 1 = x, so the
  // bits are the same either way).
  bool unit_grad;
  explicit Consts(const HostScalars& s)
      : grad_mul(grad_mul_of(s.maximize, s.grad_scale)),
        p(s.p),
        eps_p(s.eps_p),
        vgrad_mul(grad_mul),
        unit_grad(grad_mul == 1.0f) {}
  // The loaded gradient times grad_mul.
  inline fVec scale_grad(fVec g) const {
    return unit_grad ? g : g * vgrad_mul;
  }
};

// The per-element constants of the update (fadam_update()), with a tensor's clip scales.
struct UpdateConsts {
  fVec beta1, one_minus_beta1, inv_s1, inv_s2, lr, weight_decay;
  UpdateConsts(const HostScalars& s, float lr_, float inv1, float inv2)
      : beta1(s.beta1),
        one_minus_beta1(s.one_minus_beta1),
        inv_s1(inv1),
        inv_s2(inv2),
        lr(lr_),
        weight_decay(s.weight_decay) {}
};

// The overflow check of [begin, end) of a gradient ([note: the overflow rule] in fadam_math.h):
// FAdam's phase A of a fused one-chunk tensor, or of any chunk with clipping off, and
// AdaFisher's nonfinite_check. Only the overflow check
// (one multiply more per vector than a finiteness check: free, the loop waits on memory), so
// only the gradient is read (4 B per float32 element; Lanes::load would read f and theta too).
// The chunk is read as kStreams quarters walked side by side: one sequential stream per
// thread left read bandwidth unused, and four streams took 5-8% less time (bench/NOTES.md). The
// reduction and update loops read 3-4 streams already.
template <typename scalar_t>
inline bool check_chunk(const void* grad, int64_t begin, int64_t end, const Consts& c) {
  constexpr int64_t kStreams = 4;
  const auto* g = static_cast<const scalar_t*>(grad);
  const auto add_check = [&](fVec& acc, fVec x) { acc = acc + overflow_probe(c.scale_grad(x)); };
  const int64_t quarter = (end - begin) / (kStreams * kLanes) * kLanes;
  std::array<fVec, kStreams> acc;
  acc.fill(fVec(0.f));
  for (int64_t i = begin; i < begin + quarter; i += kLanes) {
    for (int64_t k = 0; k < kStreams; ++k) {
      add_check(acc[k], load_float(g + i + k * quarter));
    }
  }
  fVec overflow(0.f);
  for (const fVec& a : acc) {
    overflow = overflow + a;
  }
  // The rest: fewer than kStreams * kLanes elements.
  for_each_vector(begin + kStreams * quarter, end, [&](int64_t i, int64_t count) {
    if (count == kLanes) {
      add_check(overflow, load_float(g + i));
    } else {
      alignas(64) scalar_t buf[kLanes] = {};
      std::memcpy(buf, g + i, count * sizeof(scalar_t));
      add_check(overflow, load_float(buf));
    }
  });
  return all_zero(overflow);
}

struct Item {
  int32_t tensor;
  int64_t chunk;
  int64_t cost;  // bytes the item moves: the scheduling weight
};

// The (tensor, chunk) items of one phase, heaviest first. `cost(numel, fused)` is the bytes an
// item of `numel` elements moves; `fused` says that the tensor is one chunk done in one task.
template <typename Cost>
inline std::vector<Item> make_items(const LaunchDesc& d, Cost cost) {
  std::vector<Item> items;
  for (const auto i : c10::irange(d.params.size())) {
    const int64_t numel = d.params[i].numel();
    for (int64_t c = 0; c < d.nchunks(i); ++c) {
      const int64_t len = std::min(d.chunk_size, numel - c * d.chunk_size);
      items.push_back({static_cast<int32_t>(i), c, cost(len, d.fused(i))});
    }
  }
  // Longest first: the last items to start are the shortest, so the threads finish together.
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

// Runs body(item) once for every item, the threads taking the next item as they free up.
//
// Static splitting (at::parallel_for over the item list) gives each thread a contiguous run of
// items, and items differ 100x in cost: one thread can get every large chunk, and 2 threads then
// take as long as 1 (bench/NOTES.md). Each item writes only its own slot and elements, so which
// thread runs it changes no bit of the result.
//
// A launch whose items move less than kSerialBytes in all runs on the calling thread: waking the
// pool costs more than the work there, and with more runnable threads than cores (the shared VM)
// its barrier waits out a time slice of a descheduled worker. FAdafactor's step calls FAdam's
// two ops on its vectors (the default list's 29 norm weights, 15k elements, ~0.7 MB): they took
// 10.7 and 10.9 ms (median, load average 8) of its 190 ms step on 2 threads (bench/NOTES.md).
constexpr int64_t kSerialBytes = int64_t{1} << 20;

template <typename Body>
inline void for_each_item(const std::vector<Item>& items, Body body) {
  const auto n = static_cast<int64_t>(items.size());
  int64_t total = 0;
  for (const Item& it : items) {
    total += it.cost;
  }
  if (total < kSerialBytes) {
    for (const Item& it : items) {
      body(it);
    }
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < n;
         k = next.fetch_add(1, std::memory_order_relaxed)) {
      body(items[k]);
    }
  });
}

}  // namespace fadam
