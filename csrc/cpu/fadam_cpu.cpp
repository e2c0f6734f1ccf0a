// CPU kernels of the two FAdam ops (TORCH_LIBRARY_IMPL(fadam_fused, CPU)); each launcher reads
// its inputs from the op's LaunchDesc ([note: the op boundary] in csrc/op_boundary.h).
//
// Work is split into (tensor, chunk) items of chunk_size elements, which the threads of
// at::parallel_for take heaviest first as they free up (for_each_item). Inside an item the element
// math (csrc/fadam_math.h) runs on at::vec::Vectorized<float>: 16 float lanes with the AVX-512
// build, 8 with AVX2 (setup.py, FADAM_CPU_VEC), loaded from the storage dtype and computed in
// float32. The ragged end of a chunk is copied into zero-padded stack buffers
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
#include <utility>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu_vec.h"
#include "fadam_math.h"
#include "fadam_ops.h"

namespace fadam {

namespace {

struct TensorPtrs {
  void* param;
  const void* grad;
  float* fim;
  void* mom;  // nullptr in phase A; float32, or bfloat16 when mom_bf16
  int64_t numel;
  FimCoeffs fc;
  bool mom_bf16;
  Rounder round;  // phase B's stochastic rounding of a bfloat16 theta / m (off: to nearest)
};

// One group of lanes at element offset `i` of tensor `t`, `count` <= kLanes valid lanes. kF / kM
// say whether f / m are loaded (and stored): each loop touches only the operands it needs.
// Padded lanes hold g = 0, f = 1, theta = 0, m = 0. Their results are never stored, and
// reduce_chunk() keeps them out of the sums: at t = 1 (b2hat = 0) their new f is 0, d = eps^(2p)
// may be 0 or a float32 denormal, and 0 * (1 / d) = 0 * inf = NaN.
template <typename scalar_t, bool kF, bool kM>
struct Lanes {
  fVec g, theta, f{1.f}, m{0.f};

  inline void load(const TensorPtrs& t, int64_t i, int64_t count, const Consts& c) {
    const auto* gp = static_cast<const scalar_t*>(t.grad) + i;
    const auto* pp = static_cast<const scalar_t*>(t.param) + i;
    if (count == kLanes) {
      g = load_float(gp);
      theta = load_float(pp);
      if constexpr (kF) {
        f = fVec::loadu(t.fim + i);
      }
      if constexpr (kM) {
        m = load_mom(t.mom, t.mom_bf16, i, count);
      }
    } else {
      alignas(64) scalar_t gb[kLanes] = {};
      alignas(64) scalar_t pb[kLanes] = {};
      std::memcpy(gb, gp, count * sizeof(scalar_t));
      std::memcpy(pb, pp, count * sizeof(scalar_t));
      g = load_float(gb);
      theta = load_float(pb);
      if constexpr (kF) {
        alignas(64) float fb[kLanes];
        std::fill(fb, fb + kLanes, 1.0f);
        std::memcpy(fb, t.fim + i, count * sizeof(float));
        f = fVec::loadu(fb);
      }
      if constexpr (kM) {
        m = load_mom(t.mom, t.mom_bf16, i, count);
      }
    }
    g = c.scale_grad(g);
  }

  // Stores theta, and f and m where loaded (Vectorized::store(ptr, count) stores `count` lanes);
  // a bfloat16 theta or m stochastically rounded when the tensor's Rounder is on.
  inline void store(const TensorPtrs& t, int64_t i, int64_t count) const {
    if constexpr (kM) {
      store_param_mom(static_cast<scalar_t*>(t.param), theta, t.mom, t.mom_bf16, m, i, count,
                      t.round);
    } else {
      store_lanes(static_cast<scalar_t*>(t.param) + i, theta, count, t.round, i, kStreamParam);
    }
    if constexpr (kF) {
      f.store(t.fim + i, count);
    }
  }
};

// Phase A of one chunk: (sum ghat^2, sum w^2) over [begin, end) into sums[0..1], by blocks of
// kBlockVectors vectors in element order (SumSq); returns false if a gradient's square is not
// finite ([note: the overflow rule] in fadam_math.h). With kKeep (phase B of a fused tensor,
// [note: CPU fused one-chunk tensors]) it also stores the new f in place and r = 1/d into
// rbuf[i - begin]; the sums are the same bits either way.
//
// The overflow rule: overflow_probe(g) = g * g - g * g is NaN exactly when g * g is inf or NaN,
// and the square is fim_update()'s own (the compiler computes it once), so a subtract and an add
// per vector (on the add pipes, which these loops leave idler than the multiply pipes) check it
// while the data is in registers anyway, and all_zero() reads the accumulator once per chunk.
// check_chunk() does the same on the gradient alone.
template <typename scalar_t, bool kSqrt, bool kKeep = false>
inline bool reduce_chunk(const TensorPtrs& t, int64_t begin, int64_t end, const Consts& c,
                         double* sums, float* rbuf = nullptr) {
  const fVec b2hat(t.fc.b2hat), omb2(t.fc.one_minus_b2hat), zero(0.f);
  fVec overflow(0.f);
  SumSq s_ghat, s_w;
  // The ragged tail: padded lanes add nothing to the sums (see Lanes).
  const auto valid = [&](fVec v, int64_t count) {
    return count < kLanes ? fVec::set(zero, v, count) : v;
  };
  const auto first_pass = [&](int64_t i, int64_t count) {
    Lanes<scalar_t, /*kF=*/true, /*kM=*/false> x;
    x.load(t, i, count, c);
    if constexpr (!kKeep) {
      overflow = overflow + overflow_probe(x.g);  // phase B runs only when phase A found none
    }
    const fVec f = fim_update(x.f, x.g, b2hat, omb2);
    const fVec r = fisher_inv_denom<kSqrt>(f, c.p, c.eps_p);
    s_ghat.add(valid(x.g * r, count));
    s_w.add(valid(x.theta * r, count));
    if constexpr (kKeep) {
      f.store(t.fim + i, count);
      r.store(rbuf + (i - begin));  // rbuf holds whole vectors: the padded lanes land there too
    }
  };
  // A block whose float32 partial overflowed, summed again in float64 from the same ghat and w:
  // the same r, recomputed from the unchanged f, or with kKeep (f is already the new one) read
  // back from rbuf.
  const auto float64_pass = [&](int64_t i, int64_t count) {
    Lanes<scalar_t, /*kF=*/!kKeep, /*kM=*/false> x;
    x.load(t, i, count, c);
    fVec r;
    if constexpr (kKeep) {
      r = fVec::loadu(rbuf + (i - begin));
    } else {
      r = fisher_inv_denom<kSqrt>(fim_update(x.f, x.g, b2hat, omb2), c.p, c.eps_p);
    }
    s_ghat.add_wide(valid(x.g * r, count));
    s_w.add_wide(valid(x.theta * r, count));
  };
  sum_blocks(begin, end, s_ghat, s_w, first_pass, float64_pass);
  sums[0] = s_ghat.total();
  sums[1] = s_w.total();
  return all_zero(overflow);
}

// Phase B of one chunk: the new f (the same calls as reduce_chunk, so bitwise the same f), then
// the momentum and the parameter.
template <typename scalar_t, bool kSqrt>
inline void update_chunk(const TensorPtrs& t, int64_t begin, int64_t end, const Consts& c,
                         const UpdateConsts& u) {
  const fVec b2hat(t.fc.b2hat), omb2(t.fc.one_minus_b2hat);
  for_each_vector(begin, end, [&](int64_t i, int64_t count) {
    Lanes<scalar_t, /*kF=*/true, /*kM=*/true> x;
    x.load(t, i, count, c);
    x.f = fim_update(x.f, x.g, b2hat, omb2);
    const fVec r = fisher_inv_denom<kSqrt>(x.f, c.p, c.eps_p);
    fadam_update(x.theta, x.m, x.g * r, x.theta * r, u.beta1, u.one_minus_beta1, u.inv_s1,
                 u.inv_s2, u.lr, u.weight_decay);
    x.store(t, i, count);
  });
}

// Phase B of a fused one-chunk tensor after reduce_chunk<..., kKeep = true> over the whole
// tensor: f is already stored and r = 1/d comes from rbuf, so this pass reads g, theta, r and m
// and writes m and theta. ghat = g * r and w = theta * r are the products update_chunk forms:
// the same bits.
template <typename scalar_t>
inline void update_kept_chunk(const TensorPtrs& t, const float* rbuf, const Consts& c,
                              const UpdateConsts& u) {
  for_each_vector(0, t.numel, [&](int64_t i, int64_t count) {
    Lanes<scalar_t, /*kF=*/false, /*kM=*/true> x;
    x.load(t, i, count, c);
    const fVec r = fVec::loadu(rbuf + i);
    fadam_update(x.theta, x.m, x.g * r, x.theta * r, u.beta1, u.one_minus_beta1, u.inv_s1,
                 u.inv_s2, u.lr, u.weight_decay);
    x.store(t, i, count);
  });
}

// The tensors' pointers and this step's FIM coefficients (the steps are read here, on the host).
std::vector<TensorPtrs> make_ptrs(const LaunchDesc& d) {
  std::vector<TensorPtrs> out;
  out.reserve(d.params.size());
  for (const auto i : c10::irange(d.params.size())) {
    const double step = static_cast<double>(*d.steps[i].const_data_ptr<float>());
    void* mom = d.moms.empty() ? nullptr : d.moms[i].data_ptr();
    out.push_back({d.params[i].data_ptr(), d.grads[i].const_data_ptr(),
                   d.fims[i].data_ptr<float>(), mom, d.params[i].numel(),
                   fim_coeffs(d.s.beta2, step), d.mom_bf16, Rounder(d, i, step)});
  }
  return out;
}

void phase_a(const LaunchDesc& d) {
  if (d.empty()) {
    return;
  }
  // Only the gradient check (no slot written) for a fused one-chunk tensor, which phase B
  // reduces, and for every tensor with clipping off.
  const bool clipping = d.s.clipping;
  const auto check_only = [&](bool fused) { return fused || !clipping; };
  // Bytes per element: a checked tensor reads g (4 B in float32); the others read g, f and theta
  // (12 B).
  const int64_t gsize = d.params[0].element_size();
  const auto items = make_items(d, [&](int64_t len, bool fused) {
    return len * (check_only(fused) ? gsize : 2 * gsize + 4);
  });
  const auto ptrs = make_ptrs(d);
  const Consts consts(d.s);
  std::atomic<bool> any_overflow{false};
  dispatch(d.dtype, d.p, [&]<typename scalar_t, bool kSqrt>() {
    for_each_item(items, [&](const Item& it) {
      const TensorPtrs& t = ptrs[it.tensor];
      const int64_t begin = it.chunk * d.chunk_size;
      const int64_t end = std::min(t.numel, begin + d.chunk_size);
      double* slot = d.partials + 2 * (d.slots[it.tensor] + it.chunk);
      const bool finite = check_only(d.fused(it.tensor))
                              ? check_chunk<scalar_t>(t.grad, begin, end, consts)
                              : reduce_chunk<scalar_t, kSqrt>(t, begin, end, consts, slot);
      if (!finite) {
        any_overflow.store(true, std::memory_order_relaxed);
      }
    });
  });
  if (any_overflow.load()) {
    *d.skip = 1.0f;
  }
}

void phase_b(const LaunchDesc& d) {
  if (d.empty() || *d.skip != 0.0f) {
    return;  // phase A found an overflow anywhere: the whole step is skipped
  }
  const float lr_f = lr_of(d.s.lr_ptr, d.s.lr_is_double, d.s.lr);
  const bool clipping = d.s.clipping;
  // [note: CPU fused one-chunk tensors] With clipping, a tensor of one chunk (2^20 elements on
  // the CPU) does both phases in one task of phase B while its data is in cache: a reduction that
  // streams g, f, theta from memory, stores the new f (final: phase A has decided the skip) and
  // keeps r = 1/d in a per-thread scratch buffer, then an update that re-reads g, theta and r
  // from cache and needs no sqrt or division (0.8x the time of recomputing them, bench/NOTES.md).
  // DRAM sees g, f, theta once (docs/design.md section 4).
  // Bytes per element: the update moves 2 G + 2 P + 16 (28 B in float32); a fused tensor is
  // first reduced (another G + P + 4, from cache, at the same arithmetic cost).
  const int64_t esize = d.params[0].element_size();
  const auto items = make_items(d, [&](int64_t len, bool f) {
    return len * (4 * esize + 16 + (f && clipping ? 2 * esize + 4 : 0));
  });
  const auto ptrs = make_ptrs(d);
  const Consts consts(d.s);
  const double* slots = d.partials;
  const auto update_consts = [&](const TensorPtrs& t, const double* sums) {
    return UpdateConsts(d.s, lr_f, static_cast<float>(clip_inv_scale(sums[0], t.numel, d.s.clip)),
                        static_cast<float>(clip_inv_scale(sums[1], t.numel, d.s.clip)));
  };

  dispatch(d.dtype, d.p, [&]<typename scalar_t, bool kSqrt>() {
    for_each_item(items, [&](const Item& it) {
      const TensorPtrs& t = ptrs[it.tensor];
      double sums[2] = {0.0, 0.0};
      if (clipping && d.fused(it.tensor)) {
        float* rbuf = kept_buffer(t.numel);
        reduce_chunk<scalar_t, kSqrt, /*kKeep=*/true>(t, 0, t.numel, consts, sums, rbuf);
        update_kept_chunk<scalar_t>(t, rbuf, consts, update_consts(t, sums));
        return;
      }
      if (clipping) {
        // The tensor's phase-A slots in slot order: every chunk of the tensor gets the same
        // bits (a few hundred additions at most: chunks are 2^20 elements on the CPU).
        for (int64_t s = d.slots[it.tensor]; s < d.slots[it.tensor + 1]; ++s) {
          sums[0] += slots[2 * s];
          sums[1] += slots[2 * s + 1];
        }
      }
      const int64_t begin = it.chunk * d.chunk_size;
      const int64_t end = std::min(t.numel, begin + d.chunk_size);
      update_chunk<scalar_t, kSqrt>(t, begin, end, consts, update_consts(t, sums));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fadam_fused, CPU, m) {
  m.impl("fadam_phase_a", &fadam_phase_a_op<kCpuLimits, &phase_a>);
  m.impl("fadam_phase_b", &fadam_phase_b_op<kCpuLimits, &phase_b>);
}

}  // namespace fadam
