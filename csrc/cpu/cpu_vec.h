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
#include <utility>
#include <vector>

#include "fadam_math.h"
#include "fadam_ops.h"
#include "op_boundary.h"

namespace fadam {

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

// Runs `body(offset, count)` over [begin, end) in vectors of kLanes, count = kLanes but for the
// last, partial vector (count < kLanes), which `body` loads into zero-padded copies (Lanes::load):
// it sees whole fVec lanes either way.
template <typename Body>
inline void for_each_vector(int64_t begin, int64_t end, Body body) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    body(i, kLanes);
  }
  if (i < end) {
    body(i, end - i);
  }
}

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
template <typename Body>
inline void for_each_item(const std::vector<Item>& items, Body body) {
  const auto n = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < n;
         k = next.fetch_add(1, std::memory_order_relaxed)) {
      body(items[k]);
    }
  });
}

}  // namespace fadam
