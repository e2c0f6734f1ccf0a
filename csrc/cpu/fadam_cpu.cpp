// CPU kernels of the two FAdam ops (TORCH_LIBRARY_IMPL(fadam_fused, CPU)).
//
// Work is split into (tensor, chunk) items of chunk_size elements and spread over threads with
// at::parallel_for. Inside an item the element math (csrc/fadam_math.h) runs on
// at::vec::Vectorized<float>: 8 float lanes with the AVX2 build (setup.py), loaded from the storage
// dtype and computed in float32. The ragged end of a chunk is copied into zero-padded stack buffers
// and run through the same vector code, so every element of a tensor rounds the same way whatever
// its position, and phase A reproduces phase B's f bit for bit.
//
// Reductions are deterministic: each item sums its squares into fixed float64 lanes in element
// order and writes one partial slot; a tensor's total is the sum of its slots in slot order. The
// result does not depend on the thread count or on how parallel_for splits the items.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "fadam_math.h"
#include "fadam_ops.h"

namespace fadam {

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

namespace {

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

// Float64 sums of squares, one accumulator per float lane, added in element order. Squaring in
// float32 would overflow for |x| > 1.8e19, which eps = 1e-20 reaches (csrc/fadam_math.h).
struct SumSq {
#if defined(CPU_CAPABILITY_AVX2)
  // Widening with the two halves of the register: the generic path below (store + scalar loop)
  // made phase A compute-bound, 44 ms against 18 ms for 32M float32 elements on one core.
  at::vec::Vectorized<double> lo{0.0}, hi{0.0};
  inline void add(fVec v) {
    const __m256 x = v;
    const at::vec::Vectorized<double> a(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
    const at::vec::Vectorized<double> b(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
    // Explicit FMAs (not contraction, which -ffp-contract=off forbids): one rounding per
    // square-and-add, the same on every run.
    lo = at::vec::fmadd(a, a, lo);
    hi = at::vec::fmadd(b, b, hi);
  }
  inline double total() const {
    alignas(64) double t[8];
    lo.store(t);
    hi.store(t + 4);
    double s = 0.0;
    for (double x : t) {
      s += x;
    }
    return s;
  }
#else
  std::array<double, kLanes> lane{};
  inline void add(fVec v) {
    alignas(64) float t[kLanes];
    v.store(t);
    for (int64_t j = 0; j < kLanes; ++j) {
      lane[j] += static_cast<double>(t[j]) * static_cast<double>(t[j]);
    }
  }
  inline double total() const {
    double s = 0.0;
    for (double x : lane) {
      s += x;
    }
    return s;
  }
#endif
};

// Step scalars shared by the whole launch, as float32 lanes.
struct Consts {
  fVec p, eps_p, grad_mul;
};

struct TensorPtrs {
  void* param;
  const void* grad;
  float* fim;
  float* mom;  // nullptr in phase A
  int64_t numel;
  FimCoeffs fc;
};

// Runs `body(offset, count)` over [begin, end) in vectors of kLanes; the last, partial vector is
// run by the caller-provided `tail` on padded copies. Both see whole fVec lanes.
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

// One group of lanes at element offset `i` of tensor `t`, `count` <= kLanes valid lanes.
// Padded lanes hold g = 0, f = 1, theta = 0, m = 0: d = 1 + eps_p > 0, so they add exact zeros to
// both sums even with eps = 0, and their results are never stored.
template <typename scalar_t>
struct Lanes {
  fVec g, f, theta, m;

  inline void load(const TensorPtrs& t, int64_t i, int64_t count, const Consts& c, bool with_m) {
    const auto* gp = static_cast<const scalar_t*>(t.grad) + i;
    const auto* pp = static_cast<const scalar_t*>(t.param) + i;
    if (count == kLanes) {
      g = load_float(gp);
      theta = load_float(pp);
      f = fVec::loadu(t.fim + i);
      m = with_m ? fVec::loadu(t.mom + i) : fVec(0.f);
    } else {
      alignas(64) scalar_t gb[kLanes] = {};
      alignas(64) scalar_t pb[kLanes] = {};
      alignas(64) float fb[kLanes];
      alignas(64) float mb[kLanes] = {};
      std::fill(fb, fb + kLanes, 1.0f);
      std::memcpy(gb, gp, count * sizeof(scalar_t));
      std::memcpy(pb, pp, count * sizeof(scalar_t));
      std::memcpy(fb, t.fim + i, count * sizeof(float));
      if (with_m) {
        std::memcpy(mb, t.mom + i, count * sizeof(float));
      }
      g = load_float(gb);
      theta = load_float(pb);
      f = fVec::loadu(fb);
      m = fVec::loadu(mb);
    }
    g = g * c.grad_mul;
  }

  inline void store(const TensorPtrs& t, int64_t i, int64_t count) const {
    auto* pp = static_cast<scalar_t*>(t.param) + i;
    if (count == kLanes) {
      store_float(pp, theta);
      f.store(t.fim + i);
      m.store(t.mom + i);
    } else {
      alignas(64) scalar_t pb[kLanes];
      store_float(pb, theta);
      std::memcpy(pp, pb, count * sizeof(scalar_t));
      f.store(t.fim + i, count);
      m.store(t.mom + i, count);
    }
  }
};

// g * 0 is NaN exactly when g is inf or NaN: one multiply-add per vector detects a non-finite
// gradient while the data is in registers anyway (SPEC section 5: "for free").
inline bool all_finite(fVec acc) {
  alignas(64) float t[kLanes];
  acc.store(t);
  for (int64_t j = 0; j < kLanes; ++j) {
    if (std::isnan(t[j])) {
      return false;
    }
  }
  return true;
}

// Phase A of one chunk: the sums of ghat^2 and w^2 (when `with_sums`) and the non-finite check.
template <typename scalar_t, bool kSqrt>
inline bool reduce_chunk(const TensorPtrs& t, int64_t begin, int64_t end, const Consts& c,
                         bool with_sums, double* sums) {
  const fVec b2hat(t.fc.b2hat), omb2(t.fc.one_minus_b2hat), zero(0.f);
  fVec nonfinite(0.f);
  SumSq s_ghat, s_w;
  for_each_vector(begin, end, [&](int64_t i, int64_t count) {
    Lanes<scalar_t> x;
    x.load(t, i, count, c, /*with_m=*/false);
    nonfinite = nonfinite + x.g * zero;
    if (with_sums) {
      const fVec f = fim_update(x.f, x.g, b2hat, omb2);
      const fVec r = fisher_inv_denom<kSqrt>(f, c.p, c.eps_p);
      s_ghat.add(x.g * r);
      s_w.add(x.theta * r);
    }
  });
  if (with_sums) {
    sums[0] = s_ghat.total();
    sums[1] = s_w.total();
  }
  return all_finite(nonfinite);
}

template <typename scalar_t, bool kSqrt>
inline void update_chunk(const TensorPtrs& t, int64_t begin, int64_t end, const Consts& c,
                         float inv_s1, float inv_s2, float lr, float beta1, float weight_decay) {
  const fVec b2hat(t.fc.b2hat), omb2(t.fc.one_minus_b2hat);
  const fVec vbeta1(beta1), vomb1(static_cast<float>(1.0 - static_cast<double>(beta1)));
  const fVec vinv1(inv_s1), vinv2(inv_s2), vlr(lr), vwd(weight_decay);
  for_each_vector(begin, end, [&](int64_t i, int64_t count) {
    Lanes<scalar_t> x;
    x.load(t, i, count, c, /*with_m=*/true);
    x.f = fim_update(x.f, x.g, b2hat, omb2);
    const fVec r = fisher_inv_denom<kSqrt>(x.f, c.p, c.eps_p);
    fadam_update(x.theta, x.m, x.g * r, x.theta * r, vbeta1, vomb1, vinv1, vinv2, vlr, vwd);
    x.store(t, i, count);
  });
}

struct Item {
  int32_t tensor;
  int64_t chunk;
};

std::vector<Item> make_items(at::TensorList params, int64_t chunk_size) {
  std::vector<Item> items;
  for (const auto i : c10::irange(params.size())) {
    const int64_t n = nchunks_of(params[i].numel(), chunk_size);
    for (int64_t c = 0; c < n; ++c) {
      items.push_back({static_cast<int32_t>(i), c});
    }
  }
  return items;
}

std::vector<TensorPtrs> make_ptrs(at::TensorList params, at::TensorList grads, at::TensorList fims,
                                  at::TensorList moms, at::TensorList steps, double beta2) {
  std::vector<TensorPtrs> out;
  out.reserve(params.size());
  for (const auto i : c10::irange(params.size())) {
    const double step = static_cast<double>(*steps[i].const_data_ptr<float>());
    out.push_back({params[i].data_ptr(), grads[i].const_data_ptr(), fims[i].data_ptr<float>(),
                   moms.empty() ? nullptr : moms[i].data_ptr<float>(), params[i].numel(),
                   fim_coeffs(beta2, step)});
  }
  return out;
}

Consts make_consts(double eps, double p, bool maximize, const c10::optional<at::Tensor>& grad_scale) {
  double mul = maximize ? -1.0 : 1.0;
  if (grad_scale.has_value()) {
    mul /= static_cast<double>(*grad_scale->const_data_ptr<float>());
  }
  return {fVec(static_cast<float>(p)), fVec(static_cast<float>(std::pow(eps, 2.0 * p))),
          fVec(static_cast<float>(mul))};
}

// Both phases dispatch on (storage dtype, p == 0.5) the same way. check_group() has already
// restricted the dtype to these three.
template <typename F>
void dispatch(at::ScalarType dtype, double p, F&& f) {
  auto with_p = [&]<typename scalar_t>() {
    if (p == 0.5) {
      f.template operator()<scalar_t, true>();
    } else {
      f.template operator()<scalar_t, false>();
    }
  };
  switch (dtype) {
    case at::kFloat:
      return with_p.template operator()<float>();
    case at::kBFloat16:
      return with_p.template operator()<at::BFloat16>();
    case at::kHalf:
      return with_p.template operator()<at::Half>();
    default:
      TORCH_CHECK(false, "fadam_fused: unsupported dtype ", dtype);
  }
}

void phase_a_cpu(at::TensorList params, at::TensorList grads, at::TensorList fims,
                 at::TensorList steps, at::Tensor partials, at::Tensor skip,
                 const c10::optional<at::Tensor>& grad_scale, double beta2, double eps, double p,
                 bool maximize, int64_t chunk_size, bool fuse_one_chunk) {
  check_group("fadam_phase_a", c10::DeviceType::CPU, params, grads, fims, {}, steps, partials,
              skip, grad_scale, chunk_size);
  if (params.empty()) {
    return;
  }
  const auto items = make_items(params, chunk_size);
  const auto ptrs = make_ptrs(params, grads, fims, {}, steps, beta2);
  const auto offsets = slot_offsets(params, chunk_size);
  const Consts consts = make_consts(eps, p, maximize, grad_scale);
  double* out = partials.data_ptr<double>();
  std::atomic<bool> any_nonfinite{false};
  dispatch(params[0].scalar_type(), p, [&]<typename scalar_t, bool kSqrt>() {
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const Item it = items[k];
        const TensorPtrs& t = ptrs[it.tensor];
        const int64_t begin = it.chunk * chunk_size;
        const int64_t end = std::min(t.numel, begin + chunk_size);
        const bool with_sums = !(fuse_one_chunk && offsets[it.tensor + 1] - offsets[it.tensor] == 1);
        double* slot = out + 2 * (offsets[it.tensor] + it.chunk);
        if (!reduce_chunk<scalar_t, kSqrt>(t, begin, end, consts, with_sums, slot)) {
          any_nonfinite.store(true, std::memory_order_relaxed);
        }
      }
    });
  });
  if (any_nonfinite.load()) {
    *skip.data_ptr<float>() = 1.0f;
  }
}

void phase_b_cpu(at::TensorList params, at::TensorList grads, at::TensorList fims,
                 at::TensorList moms, at::TensorList steps, const at::Tensor& partials,
                 const at::Tensor& skip, const c10::optional<at::Tensor>& grad_scale,
                 const c10::optional<at::Tensor>& lr_tensor, double lr, double beta1, double beta2,
                 double eps, double p, double clip, double weight_decay, bool maximize,
                 int64_t chunk_size, bool fuse_one_chunk) {
  check_group("fadam_phase_b", c10::DeviceType::CPU, params, grads, fims, moms, steps, partials,
              skip, grad_scale, chunk_size);
  TORCH_CHECK(moms.size() == params.size(), "fadam_phase_b: one momentum per param is required");
  if (params.empty() || *skip.const_data_ptr<float>() != 0.0f) {
    return;  // SPEC section 5: a non-finite gradient anywhere skips the whole step.
  }
  if (lr_tensor.has_value()) {
    TORCH_CHECK(lr_tensor->numel() == 1 && lr_tensor->device().is_cpu(),
                "fadam_phase_b: lr_tensor must be a one-element CPU tensor");
    lr = lr_tensor->to(at::kDouble).const_data_ptr<double>()[0];
  }
  const auto items = make_items(params, chunk_size);
  const auto ptrs = make_ptrs(params, grads, fims, moms, steps, beta2);
  const auto offsets = slot_offsets(params, chunk_size);
  const Consts consts = make_consts(eps, p, maximize, grad_scale);
  const double* slots = partials.const_data_ptr<double>();
  const bool clipping = clip > 0.0;

  dispatch(params[0].scalar_type(), p, [&]<typename scalar_t, bool kSqrt>() {
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const Item it = items[k];
        const TensorPtrs& t = ptrs[it.tensor];
        const int64_t first = offsets[it.tensor], last = offsets[it.tensor + 1];
        double sums[2] = {0.0, 0.0};
        if (clipping && fuse_one_chunk && last - first == 1) {
          // Both phases in one task: the reduction pulls the tensor into cache and the update
          // below re-reads it from there, so DRAM sees g, f, theta once (SPEC section 3).
          reduce_chunk<scalar_t, kSqrt>(t, 0, t.numel, consts, true, sums);
        } else if (clipping) {
          // The tensor's phase-A slots in slot order: every chunk of the tensor gets the same
          // bits (a few hundred additions at most: chunks are 2^20 elements on the CPU).
          for (int64_t s = first; s < last; ++s) {
            sums[0] += slots[2 * s];
            sums[1] += slots[2 * s + 1];
          }
        }
        const auto inv_s1 = static_cast<float>(clip_inv_scale(sums[0], t.numel, clip));
        const auto inv_s2 = static_cast<float>(clip_inv_scale(sums[1], t.numel, clip));
        const int64_t begin = it.chunk * chunk_size;
        const int64_t end = std::min(t.numel, begin + chunk_size);
        update_chunk<scalar_t, kSqrt>(t, begin, end, consts, inv_s1, inv_s2,
                                      static_cast<float>(lr), static_cast<float>(beta1),
                                      static_cast<float>(weight_decay));
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fadam_fused, CPU, m) {
  m.impl("fadam_phase_a", &phase_a_cpu);
  m.impl("fadam_phase_b", &phase_b_cpu);
}

}  // namespace fadam
