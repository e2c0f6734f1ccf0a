// Shared host-side pieces of the FAdam and FAdafactor ops: the partial-sum layout, the host step
// scalars, FAdafactor's tiles and region offsets, and the dtype dispatch. The checks of every op
// argument, and the launch description built from them, are csrc/op_boundary.h's
// ([note: the op boundary]); kernels assume what those checks establish.
//
// [note: the two-phase op contract]  (docs/design.md section 3; schemas: fadam_fused/op_contract.py)
// One call of each op covers one (device, dtype) group of tensors.
//
// partials: float64 [n_slots, 2]. Tensor i owns nchunks(i) = max(1, ceil(numel_i / chunk_size))
//   consecutive slots, in list order (slot_offsets() below); slot (i, c) holds
//   (sum ghat^2, sum w^2) over chunk c of tensor i. Phase A writes them; phase B of a block adds up
//   its tensor's slots in slot order, so the total does not depend on scheduling: deterministic.
//   A distributed wrapper may replace a tensor's slots between the phases (e.g. all-reduced totals
//   in the first slot and zeros after it): phase B only ever adds them up. Phase B divides the
//   total by the local numel, so a sharded parameter's wrapper scales the all-reduced sums by
//   local_numel / global_numel to get the RMS of the whole logical tensor (docs/design.md
//   section 7).
// clip: <= 0 turns clipping off. Phase A then only checks the gradients ([note: the overflow
//   rule] in fadam_math.h; reads g: 4 B/param) and writes no slot; phase B reads no slot (s1 = s2 = 1) and a one-chunk
//   tensor skips its reduction pass. partials keeps its [n_slots, 2] shape either way.
// fuse_one_chunk: when true, a tensor with nchunks == 1 is done entirely in phase B (both phases
//   in one block, the data re-read from cache: one HBM pass); phase A then leaves its slot unwritten
//   and reads only its gradient, for the overflow check. A sharded wrapper passes false.
// skip: float32, one element. Phase A stores 1 into it when a scaled gradient's float32 square is
//   not finite: NaN, inf or |g| >= 1.845e19 ([note: the overflow rule]). It never stores 0 (the
//   caller zeroes it, or seeds it with GradScaler's found_inf). Phase B is a no-op when
//   skip != 0, so a skipped step leaves parameters and state bit-identical.
// steps: float32 0-dim tensors on the parameters' device, already incremented for this step (t >= 1).
// grad_scale: optional float32 one-element tensor; gradients are divided by it in registers (never
//   written back). maximize negates the gradient in registers too.
// lr: the float `lr`, unless `lr_tensor` (float32 or float64, one element, on the params' device)
//   is given; anything else is refused (describe() in op_boundary.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "fadam_math.h"

namespace fadam {

// Chunks (= partial-sum slots) of a tensor: an empty tensor still owns one slot. The one
// definition for the CPU kernels, the CUDA plan (cuda/multi_tensor_plan.h) and the op checks
// (op_boundary.h).
inline int64_t nchunks_of(int64_t numel, int64_t chunk_size) {
  return numel <= chunk_size ? 1 : (numel + chunk_size - 1) / chunk_size;
}

// offsets[i] is the first slot of tensor i; offsets[n] is the number of slots.
inline std::vector<int64_t> slot_offsets(at::TensorList tensors, int64_t chunk_size) {
  std::vector<int64_t> offsets(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) {
    offsets[i + 1] = offsets[i] + nchunks_of(tensors[i].numel(), chunk_size);
  }
  return offsets;
}

// The host step scalars of every op, prepared once by describe() (op_boundary.h) for the CPU and
// the CUDA launchers, so both accept the same inputs and round the same way (the Triton launcher
// uses the Python twin, op_contract.host_scalars). Device pointers (grad_scale, lr_tensor) are
// read where the kernel runs: grad_mul_of() and lr_of() in fadam_math.h. An op that takes no
// lr, beta1, beta2, eps, p or clip gets OpArgs' placeholders, which its kernels do not read.
struct HostScalars {
  double beta2;
  double clip;                 // <= 0: clipping off
  bool clipping;               // clip > 0
  bool maximize;
  bool lr_is_double;           // lr_ptr is float64 (else float32)
  const void* lr_ptr;          // lr_tensor's element, or nullptr: then `lr`
  const float* grad_scale;     // grad_scale's element, or nullptr
  float p;
  float eps_p;                 // eps^(2p), from float64
  float lr;
  float beta1;
  float one_minus_beta1;       // 1 - beta1 from the float32 beta1, in float64, rounded once
  float weight_decay;
  // AdaFisher's update ([note: the AdaFisher op contract] in fadam_fused/op_contract.py).
  double lr64;                 // `lr` unrounded: lr / (1 - beta^t) is formed in float64
  double beta;                 // bc = 1 - beta^t in float64
  float beta_f;                // beta rounded to float32
  float one_minus_beta;        // 1 - beta in float64, rounded once
  float damping;
  bool decoupled;              // AdaFisherW
};

// Where tensor i of AdaFisher's update finds F = S[e / cols] H[e % cols] + damping: S at
// factors[s_offset], H at factors[h_offset]; cols == 0 means F = 1.
struct AdaLayout {
  int64_t s_offset, h_offset, cols;
};

// How phase S of FAdafactor cuts a factored tensor: the C++ twin of op_contract.factor_tile()
// ([note: the FAdafactor op contract] in fadam_fused/op_contract.py). The tensor is `batch`
// matrices of rows x cols, cut into tiles of tile_rows x tile_cols.
struct FactorTile {
  int64_t batch, rows, cols, tile_rows, tile_cols;
  int64_t row_tiles() const {
    return (rows + tile_rows - 1) / tile_rows;
  }
  int64_t col_tiles() const {
    return (cols + tile_cols - 1) / tile_cols;
  }
  // float64 elements of factor_partials per matrix: [col_tiles, rows] row partials, then
  // [row_tiles, cols] column partials.
  int64_t partials_per_matrix() const {
    return col_tiles() * rows + row_tiles() * cols;
  }
  // float32 elements of factors per matrix: R (rows), C (cols), R / sum R (rows).
  int64_t factors_per_matrix() const {
    return 2 * rows + cols;
  }
};

inline FactorTile factor_tile(at::IntArrayRef sizes, int64_t chunk_size) {
  int64_t batch = 1;
  for (size_t d = 0; d + 2 < sizes.size(); ++d) {
    batch *= sizes[d];
  }
  const int64_t rows = sizes[sizes.size() - 2], cols = sizes[sizes.size() - 1];
  int64_t isqrt = static_cast<int64_t>(std::sqrt(static_cast<double>(chunk_size)));
  while (isqrt * isqrt > chunk_size) --isqrt;
  while ((isqrt + 1) * (isqrt + 1) <= chunk_size) ++isqrt;
  const int64_t tile_cols = std::max<int64_t>(1, std::min(cols, isqrt));
  const int64_t tile_rows = std::max<int64_t>(1, std::min(rows, chunk_size / tile_cols));
  return {batch, rows, cols, tile_rows, tile_cols};
}

// Where tensor i's regions start in factor_partials (float64) and factors (float32); the last
// entry of each is its total size. The C++ twin of op_contract.factor_offsets().
struct FactorOffsets {
  std::vector<int64_t> partials, factors;
};

inline FactorOffsets factor_offsets(const std::vector<FactorTile>& tiles) {
  FactorOffsets o{{0}, {0}};
  for (const auto& t : tiles) {
    o.partials.push_back(o.partials.back() + t.batch * t.partials_per_matrix());
    o.factors.push_back(o.factors.back() + t.batch * t.factors_per_matrix());
  }
  return o;
}

// Calls f.template operator()<scalar_t, kSqrt>() for the storage dtype and p: every kernel of every
// backend is instantiated per (float32 / bfloat16 / float16, p == 0.5). describe() has already
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
      TORCH_INTERNAL_ASSERT(false, "fadam_fused: unsupported dtype ", dtype);
  }
}

}  // namespace fadam
