// CPU kernels of AdaFisher's two ops (TORCH_LIBRARY_IMPL(fadam_fused, CPU)): nonfinite_check and
// adafisher_update ([note: the AdaFisher op contract] in fadam_fused/op_contract.py). Each
// launcher reads its inputs from the op's LaunchDesc ([note: the op boundary] in
// csrc/op_boundary.h).
//
// Work is split into (tensor, chunk) items of chunk_size elements that the threads take heaviest
// first (for_each_item in cpu_vec.h), as FAdam's kernels do. Inside an item the element math
// ([note: AdaFisher math] in csrc/fadam_math.h) runs on Vectorized<float> lanes loaded from the
// storage dtype. No reduction: the update reads g, m, theta and writes m, theta (20 B/param in
// float32), the check reads g (4 B). F is formed per vector from S and H, never stored: the
// chunk is walked row by row (a row is `cols` elements of one output channel, with one S value
// and `cols` consecutive H values), so H is a contiguous vector load and S a broadcast. A
// one-column tensor (a bias, a norm's weight) reads S as the contiguous vector instead. Ragged
// ends of a row go through the same vector code on zero-padded copies, so every element rounds
// the same way whatever its position.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "cpu/cpu_vec.h"
#include "fadam_math.h"
#include "fadam_ops.h"
#include "op_boundary.h"

namespace fadam {

namespace {

// One tensor of an update call, and its per-tensor coefficients (ada_coeffs()).
struct AdaTensor {
  void* param;
  const void* grad;
  void* mom;  // float32, or bfloat16 when mom_bf16 (momentum_dtype)
  int64_t numel;
  const float* s;  // S: one value per row
  const float* h;  // H: one value per column
  int64_t cols;    // 0: F = 1
  AdaCoeffs co;
  bool mom_bf16;
  Rounder round;  // stochastic rounding of a bfloat16 theta / m (off: to nearest)
};

// The launch's constants as lanes.
struct AdaConsts {
  fVec beta, one_minus_beta, weight_decay, damping;
  explicit AdaConsts(const HostScalars& s)
      : beta(s.beta_f),
        one_minus_beta(s.one_minus_beta),
        weight_decay(s.weight_decay),
        damping(s.damping) {}
};

// `count` (<= kLanes) floats from p as lanes; the lanes past `count` are `pad`.
inline fVec load_lanes(const float* p, int64_t count, float pad) {
  if (count == kLanes) {
    return fVec::loadu(p);
  }
  alignas(64) float buf[kLanes];
  std::fill(buf, buf + kLanes, pad);
  std::memcpy(buf, p, count * sizeof(float));
  return fVec::loadu(buf);
}

// The one store of the update's results, through cpu_vec.h's store_param_mom: theta in the
// storage dtype, m in float32 or bfloat16; a bfloat16 one rounded stochastically when the
// tensor's Rounder is on ([note: stochastic rounding]), else to nearest even (a bfloat16 theta
// and m share one 8-lane pair hash, as FAdam's phase B).
template <typename scalar_t>
FADAM_VEC_INLINE void store_update(const AdaTensor& t, int64_t i, int64_t count, fVec theta,
                                   fVec m) {
  store_param_mom(static_cast<scalar_t*>(t.param), theta, t.mom, t.mom_bf16, m, i, count, t.round);
}

// Calls body(i, count, F) for the vectors of [begin, end) of tensor t, F the lanes' Fisher.
// Padded lanes get F from padding (1 for S and H): finite, and never stored.
template <typename Body>
inline void for_each_fim(const AdaTensor& t, int64_t begin, int64_t end, const AdaConsts& c,
                         Body body) {
  if (t.cols == 0) {
    const fVec one(1.0f);
    for_each_vector(begin, end, [&](int64_t i, int64_t count) { body(i, count, one); });
    return;
  }
  if (t.cols == 1) {  // S runs along the elements
    const fVec h(t.h[0]);
    for_each_vector(begin, end, [&](int64_t i, int64_t count) {
      body(i, count, adafisher_fim(load_lanes(t.s + i, count, 1.0f), h, c.damping));
    });
    return;
  }
  int64_t row = begin / t.cols;
  int64_t col = begin % t.cols;
  for (int64_t i = begin; i < end; ++row, col = 0) {
    const int64_t stop = std::min(end, i + (t.cols - col));
    const fVec s(t.s[row]);
    const float* h = t.h + col - i;  // h[j] is element j's H within this row
    for_each_vector(i, stop, [&](int64_t j, int64_t count) {
      body(j, count, adafisher_fim(s, load_lanes(h + j, count, 1.0f), c.damping));
    });
    i = stop;
  }
}

template <typename scalar_t, bool kDecoupled>
void update_chunk(const AdaTensor& t, int64_t begin, int64_t end, const Consts& cg,
                  const AdaConsts& c) {
  const fVec a(t.co.a), bc(t.co.bc);
  const auto* gp = static_cast<const scalar_t*>(t.grad);
  const auto* pp = static_cast<const scalar_t*>(t.param);
  for_each_fim(t, begin, end, c, [&](int64_t i, int64_t count, fVec fim) {
    const fVec g = cg.scale_grad(load_padded(gp + i, count));
    fVec theta = load_padded(pp + i, count);
    fVec m = load_mom(t.mom, t.mom_bf16, i, count);
    adafisher_update<kDecoupled>(theta, m, g, fim, c.beta, c.one_minus_beta, c.weight_decay, a,
                                 bc);
    store_update<scalar_t>(t, i, count, theta, m);
  });
}

// Calls f.template operator()<scalar_t>() for the storage dtype (describe() allowed three).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  dispatch(dtype, 0.5, [&]<typename scalar_t, bool>() { f.template operator()<scalar_t>(); });
}

void nonfinite_check(const LaunchDesc& d) {
  if (d.empty()) {
    return;
  }
  const int64_t gsize = d.params[0].element_size();
  const auto items = make_items(d, [&](int64_t len, bool) { return len * gsize; });
  const Consts consts(d.s);  // maximize is false here: the sign changes no square
  std::atomic<bool> any_overflow{false};
  dispatch_dtype(d.dtype, [&]<typename scalar_t>() {
    for_each_item(items, [&](const Item& it) {
      const int64_t numel = d.params[it.tensor].numel();
      const int64_t begin = it.chunk * d.chunk_size;
      const int64_t end = std::min(numel, begin + d.chunk_size);
      if (!check_chunk<scalar_t>(d.params[it.tensor].const_data_ptr(), begin, end, consts)) {
        any_overflow.store(true, std::memory_order_relaxed);
      }
    });
  });
  if (any_overflow.load()) {
    *d.skip = 1.0f;  // never 0: the caller zeroes it or seeds it with found_inf
  }
}

void adafisher_update(const LaunchDesc& d) {
  if (d.empty() || *d.skip != 0.0f) {
    return;  // a skipped step changes nothing, bit for bit
  }
  const double lr = lr64_of(d.s.lr_ptr, d.s.lr_is_double, d.s.lr64);
  std::vector<AdaTensor> ts;
  ts.reserve(d.params.size());
  for (const auto i : c10::irange(d.params.size())) {
    const AdaLayout& l = d.ada[i];
    const double step = static_cast<double>(*d.steps[i].const_data_ptr<float>());
    ts.push_back({d.params[i].data_ptr(), d.grads[i].const_data_ptr(), d.moms[i].data_ptr(),
                  d.params[i].numel(), d.factors + l.s_offset, d.factors + l.h_offset, l.cols,
                  ada_coeffs(d.s.beta, step, lr, d.s.decoupled), d.mom_bf16,
                  Rounder(d, i, step)});
  }
  // Bytes per element: g and theta read, theta written (3 x the storage size), m read and written
  // (float32 or bfloat16).
  const int64_t esize = d.params[0].element_size();
  const int64_t bytes = 3 * esize + 2 * (d.mom_bf16 ? 2 : 4);
  const auto items = make_items(d, [&](int64_t len, bool) { return len * bytes; });
  const Consts cg(d.s);
  const AdaConsts c(d.s);
  dispatch_dtype(d.dtype, [&]<typename scalar_t>() {
    for_each_item(items, [&](const Item& it) {
      const AdaTensor& t = ts[it.tensor];
      const int64_t begin = it.chunk * d.chunk_size;
      const int64_t end = std::min(t.numel, begin + d.chunk_size);
      if (d.s.decoupled) {
        update_chunk<scalar_t, true>(t, begin, end, cg, c);
      } else {
        update_chunk<scalar_t, false>(t, begin, end, cg, c);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fadam_fused, CPU, m) {
  m.impl("nonfinite_check", &nonfinite_check_op<kCpuLimits, &nonfinite_check>);
  m.impl("adafisher_update", &adafisher_update_op<kCpuLimits, &adafisher_update>);
}

}  // namespace fadam
