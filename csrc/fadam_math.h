// The FAdam per-element math, written once for every C++ backend.
//
// [note: FAdam math lives here]
// The CPU kernel (csrc/cpu/, with T = float and T = at::vec::Vectorized<float>) and the CUDA kernels
// (csrc/cuda/, T = float) both call these functions, so there is one definition of the algorithm in
// C++, as PyTorch keeps one `adam_math` for all its fused Adam functors. The Triton kernels mirror it
// in one @triton.jit helper (triton_kernels/). The algorithm (docs/design.md section 1):
//
//   t     = t + 1                                   (done by the caller before phase A)
//   b2hat = beta2 (1 - beta2^(t-1)) / (1 - beta2^t)  Adafactor-style bias correction, 0 at t = 1
//   f     = b2hat f + (1 - b2hat) g^2
//   d     = f^p + eps^(2p)
//   ghat  = g / d,                 s1 = max(1, RMS(ghat) / clip)
//   m     = beta1 m + (1 - beta1) ghat / s1
//   w     = theta / d,             s2 = max(1, RMS(w) / clip)
//   theta = theta - lr (m + weight_decay w / s2)
//
// Precision: every element is loaded from its storage dtype (float32 / bfloat16 / float16) into
// float32 and all element math is float32 ("opmath", as ATen's opmath_t). Step scalars (b2hat, the
// clip scales) are float64 and rounded to float32 once per tensor. Sums of squares for the two RMS
// values accumulate in float64: with eps = 1e-30 and an always-zero gradient, w is about 1e29 and
// w^2 = 1e58 overflows float32 (max 3.4e38) but not float64 (max 1.8e308). The CPU kernel sums
// short blocks in float32 first and redoes in float64 any block that overflowed (SumSq in
// csrc/cpu/fadam_cpu.cpp: an overflow-safe equivalent, docs/design.md section 5).
//
// Phase A and phase B both call fim_update() and fisher_denom() on the same inputs, so the f (and
// hence the ghat) that phase A reduces is bit for bit the f that phase B stores. The CPU build uses
// -ffp-contract=off so the scalar tail and the vector body round alike; nvcc compiles both phases'
// calls from this one inline definition.
#pragma once

#include <c10/macros/Macros.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

namespace fadam {

// sqrt and pow for the value type T. Specialised here for float (host and device); the CPU kernel
// specialises it for at::vec::Vectorized<float>.
template <typename T>
struct Prim;

template <>
struct Prim<float> {
  C10_HOST_DEVICE static inline float sqrt(float x) {
    return ::sqrtf(x);
  }
  C10_HOST_DEVICE static inline float pow(float x, float p) {
    return ::powf(x, p);
  }
};

// Adafactor-style bias correction of the FIM EMA, in float64. `t` is the step count after the
// increment (t >= 1): 0 at t = 1 (so f = g^2 exactly), tending to beta2 as t grows.
C10_HOST_DEVICE inline double b2hat_of(double beta2, double t) {
  const double num = 1.0 - ::pow(beta2, t - 1.0);
  const double den = 1.0 - ::pow(beta2, t);
  return beta2 * num / den;
}

// 1 / max(1, RMS / clip) from a float64 sum of squares. clip <= 0 turns clipping off (clip=None
// or 0 means s = 1), and so does an empty tensor (RMS of nothing is not 0/0 = NaN here).
// A sum that is not finite (NaN or inf) comes from a non-finite parameter (a non-finite gradient
// skips the step before phase B uses the sums): it counts as s = inf, so 1/s = 0 and that tensor's
// clipped weight decay is 0 for the step while the NaN stays in its own element (NaN * 0 = NaN),
// on every backend and in the reference (docs/design.md section 6). `!(x <= DBL_MAX)` is the
// finiteness test for a sum of squares (never -inf) that nvcc and g++ compile alike.
C10_HOST_DEVICE inline double clip_inv_scale(double sumsq, int64_t numel, double clip) {
  if (!(clip > 0.0) || numel == 0) {
    return 1.0;
  }
  if (!(sumsq <= DBL_MAX)) {
    return 0.0;
  }
  const double s = ::sqrt(sumsq / static_cast<double>(numel)) / clip;
  return s > 1.0 ? 1.0 / s : 1.0;
}

// The gradient multiplier: (maximize ? -1 : 1) / grad_scale in float64, rounded to float32 once.
// grad_scale points at GradScaler's one-element float32 scale, or is nullptr; the CPU launcher
// calls this on the host, the CUDA kernels once per block (the scale lives on the device).
C10_HOST_DEVICE inline float grad_mul_of(bool maximize, const float* grad_scale) {
  double mul = maximize ? -1.0 : 1.0;
  if (grad_scale != nullptr) {
    mul /= static_cast<double>(*grad_scale);
  }
  return static_cast<float>(mul);
}

// The step's lr as float32: *lr_ptr (float64 or float32, read where the kernel runs), else `lr`.
C10_HOST_DEVICE inline float lr_of(const void* lr_ptr, bool is_double, float lr) {
  if (lr_ptr == nullptr) {
    return lr;
  }
  return is_double ? static_cast<float>(*static_cast<const double*>(lr_ptr))
                   : *static_cast<const float*>(lr_ptr);
}

// The step's lr in float64: *lr_ptr (float64, or float32 widened), else `lr`. AdaFisher forms
// lr / (1 - beta^t) in float64 before rounding it ([note: AdaFisher math] below).
C10_HOST_DEVICE inline double lr64_of(const void* lr_ptr, bool is_double, double lr) {
  if (lr_ptr == nullptr) {
    return lr;
  }
  return is_double ? *static_cast<const double*>(lr_ptr)
                   : static_cast<double>(*static_cast<const float*>(lr_ptr));
}

// [note: the overflow rule]
// A step is skipped (phase B writes nothing, the caller counts a skipped step: what a NaN
// gradient does, docs/design.md section 6) when, for any gradient element, the scaled gradient
// g = grad * grad_mul_of() in float32 has a float32 square g * g that is not finite: NaN and inf
// gradients, and finite ones from |g| >= 2^64 = 1.845e19 (g * g rounds past float32's max,
// 3.40e38, to inf). Such a g makes FAdam's f = b2hat f + (1 - b2hat) g^2 inf, and d = inf then
// freezes that element for good (ghat = w = 0). FAdafactor also skips when a new row sum R_i or
// column sum C_j, rounded to float32 by factor_update(), is not finite: at step 1 (b2hat = 0) a
// (6, 9) gradient of 1e19 gives R_i = 9e38 and a (2000, 2) one of 5e17 gives C_j = 5e38, and an
// inf R or C makes f, then every parameter, momentum, R and C of the matrix, NaN. The kernels
// check it in FAdam's phase A, for every tensor (the gradient-only pass of fused one-chunk
// tensors, and of clipping off, squares the g it reads), and in FAdafactor's phase S (g * g in
// the tiles, R and C in the combine).

// 0 where g * g is finite in float32, NaN where it is not (inf - inf or NaN - NaN): vector code
// adds it up over a chunk and tests the sum once (the CPU kernels).
template <typename T>
C10_HOST_DEVICE inline T overflow_probe(T g) {
  const T sq = g * g;
  return sq - sq;
}

// The rule for one element: true when g * g is not finite in float32 (the step is skipped).
C10_HOST_DEVICE inline bool overflows(float g) {
  return overflow_probe(g) != 0.0f;
}

// The rule for a new R_i or C_j (factor_update()): true when it is finite in float32.
C10_HOST_DEVICE inline bool factor_ok(float x) {
  return x - x == 0.0f;
}

// Per-tensor coefficients: float32, computed once per tensor from float64 step scalars.
struct FimCoeffs {
  float b2hat;            // beta2-hat of this tensor's step
  float one_minus_b2hat;  // 1 - b2hat, rounded from float64 (not 1.0f - b2hat)
};

C10_HOST_DEVICE inline FimCoeffs fim_coeffs(double beta2, double step) {
  const double b = b2hat_of(beta2, step);
  return {static_cast<float>(b), static_cast<float>(1.0 - b)};
}

// f = b2hat f + (1 - b2hat) g^2
template <typename T>
C10_HOST_DEVICE inline T fim_update(T f, T g, T b2hat, T one_minus_b2hat) {
  return b2hat * f + one_minus_b2hat * (g * g);
}

// d = f^p + eps^(2p); kSqrt selects the p = 0.5 path (sqrt is exact and much cheaper than pow).
// eps_p is eps^(2p), computed on the host in float64.
template <bool kSqrt, typename T>
C10_HOST_DEVICE inline T fisher_denom(T f, T p, T eps_p) {
  if constexpr (kSqrt) {
    return Prim<T>::sqrt(f) + eps_p;
  } else {
    return Prim<T>::pow(f, p) + eps_p;
  }
}

// 1 / d. Both natural quantities share one denominator (ghat = g / d, w = theta / d), so one
// division and two multiplies replace two divisions: division and sqrt bound the CPU kernel
// (phase A takes ~0.64x the time with two divisions, bench/NOTES.md), and the result is within
// 1 ulp of x / d.
template <bool kSqrt, typename T>
C10_HOST_DEVICE inline T fisher_inv_denom(T f, T p, T eps_p) {
  return T(1.0f) / fisher_denom<kSqrt>(f, p, eps_p);
}

// Phase B, one element: momentum of the clipped natural gradient, then the parameter update with
// the clipped natural weight decay. inv_s1 / inv_s2 are 1 / s from clip_inv_scale().
template <typename T>
C10_HOST_DEVICE inline void fadam_update(
    T& theta,
    T& m,
    T ghat,
    T w,
    T beta1,
    T one_minus_beta1,
    T inv_s1,
    T inv_s2,
    T lr,
    T weight_decay) {
  m = beta1 * m + one_minus_beta1 * (ghat * inv_s1);
  theta = theta - lr * (m + weight_decay * (w * inv_s2));
}

// [note: FAdafactor math]
// FAdafactor (docs/design.md, section 8) keeps, for a parameter of shape (..., n, m), row sums R (n)
// and column sums C (m) of g^2 instead of f, and uses f_ij = (R_i / sum_k R_k) C_j; d, ghat, the
// clip scales, m, w and theta are FAdam's (fisher_denom, fadam_update above). The fused step
// ([note: the FAdafactor op contract] in fadam_fused/op_contract.py) calls:
//   combine_factors() per matrix: factor_update() once per row and column, after the per-tile
//   float64 sums of g^2 are combined, and the overflow rule on the new R and C;
//   row_norm() once per row, with the float64 sum of the rounded new R of its matrix;
//   factored_fim() per element, in phase A and phase B alike (the same bits in both).
// R_i / sum R is taken first because it is <= 1: R_i C_j overflows float32 for |g| ~ 1e9 on a
// 1000 x 1000 matrix (R_i C_j ~ n m g^4) while f ~ g^2 does not.

// New R_i (or C_j) from its old value and this step's sum of g^2 over the row (column), in float64
// and rounded to float32 once. b2hat from b2hat_of().
C10_HOST_DEVICE inline float factor_update(float old, double sum_sq, double b2hat) {
  return static_cast<float>(b2hat * static_cast<double>(old) + (1.0 - b2hat) * sum_sq);
}

// The new factors of one matrix's n rows (or columns), i = first, first + step, ... < n: factor i
// from its ntiles tile partials parts[k * n + i], added in tile order, and its old value
// (factor_update()). Returns whether all of them are finite in float32 ([note: the overflow
// rule]). The CPU combine walks every i (first 0, step 1), a CUDA thread its own (threadIdx.x,
// kThreads); Index is int there, as the kernel's other in-matrix indices.
template <typename Index>
C10_HOST_DEVICE inline bool combine_factors(const double* parts, Index n, Index ntiles,
                                            const float* old, float* out, double b2hat,
                                            Index first, Index step) {
  bool ok = true;
  for (Index i = first; i < n; i += step) {
    double sum = 0.0;
    for (Index k = 0; k < ntiles; ++k) {
      sum += parts[static_cast<int64_t>(k) * n + i];
    }
    out[i] = factor_update(old[i], sum, b2hat);
    ok &= factor_ok(out[i]);
  }
  return ok;
}

// R_i / sum R, or 0 when sum R is 0 (an all-zero gradient at step 1: f = 0, d = eps^(2p), no 0/0).
C10_HOST_DEVICE inline float row_norm(float row, double total) {
  return total > 0.0 ? static_cast<float>(static_cast<double>(row) / total) : 0.0f;
}

// f_ij = (R_i / sum R) C_j, from row_norm() and the new C_j.
template <typename T>
C10_HOST_DEVICE inline T factored_fim(T row_norm_i, T col_j) {
  return row_norm_i * col_j;
}

// [note: AdaFisher math]
// AdaFisher's update of one element ([note: the AdaFisher op contract] in
// fadam_fused/op_contract.py; docs/design.md, section 10), for every C++ backend (T = float, or
// the CPU's Vectorized<float>); the Triton kernels mirror it in triton_kernels/_adafisher_kernels.py.
// The order of operations is the published implementation's and the oracle's
// (reference.adafisher_update_tensor): each step is rounded to float32 as the oracle's float32
// run rounds it, so a float32 parameter follows it to the last ulp or so.
//   F = S[e / cols] H[e % cols] + damping  (1 where cols == 0)
//   AdaFisher:   m = beta m + (1 - beta) (g + wd theta);  theta = theta - float32(lr / bc) (m / F)
//   AdaFisherW:  m = beta m + (1 - beta) g;               theta = theta - lr (m / bc / F + wd theta)
// with bc = 1 - beta^t in float64 (t after the increment), rounded to float32 once per tensor.

// Per-tensor coefficients: `a` is float32(lr / bc) (AdaFisher) or float32(lr) (AdaFisherW), `bc`
// float32(bc) (read by AdaFisherW only).
struct AdaCoeffs {
  float a, bc;
};

C10_HOST_DEVICE inline AdaCoeffs ada_coeffs(double beta, double step, double lr, bool decoupled) {
  const double bc = 1.0 - ::pow(beta, step);
  return {static_cast<float>(decoupled ? lr : lr / bc), static_cast<float>(bc)};
}

template <typename T>
C10_HOST_DEVICE inline T adafisher_fim(T s, T h, T damping) {
  return s * h + damping;
}

template <bool kDecoupled, typename T>
C10_HOST_DEVICE inline void adafisher_update(T& theta, T& m, T g, T fim, T beta, T one_minus_beta,
                                             T weight_decay, T a, T bc) {
  if constexpr (kDecoupled) {
    m = beta * m + one_minus_beta * g;
    theta = theta - a * (m / bc / fim + weight_decay * theta);
  } else {
    m = beta * m + one_minus_beta * (g + weight_decay * theta);
    theta = theta - a * (m / fim);
  }
}

}  // namespace fadam
