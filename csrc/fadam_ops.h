// Shared host-side pieces of the two FAdam ops: the partial-sum layout and the input checks that
// every backend's launcher runs before touching memory. Kernels assume what these checks establish.
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
// clip: <= 0 turns clipping off. Phase A then only checks the gradients for non-finite values
//   (reads g: 4 B/param) and writes no slot; phase B reads no slot (s1 = s2 = 1) and a one-chunk
//   tensor skips its reduction pass. partials keeps its [n_slots, 2] shape either way.
// fuse_one_chunk: when true, a tensor with nchunks == 1 is done entirely in phase B (both phases
//   in one block, the data re-read from cache: one HBM pass); phase A then leaves its slot unwritten
//   and reads only its gradient, for the non-finite check. A sharded wrapper passes false.
// skip: float32, one element. Phase A stores 1 into it when a gradient holds a NaN or inf (it never
//   stores 0: the caller zeroes it, or seeds it with GradScaler's found_inf). Phase B is a no-op
//   when skip != 0, so a non-finite gradient leaves parameters and state bit-identical.
// steps: float32 0-dim tensors on the parameters' device, already incremented for this step (t >= 1).
// grad_scale: optional float32 one-element tensor; gradients are divided by it in registers (never
//   written back). maximize negates the gradient in registers too.
// lr: the float `lr`, unless `lr_tensor` (float32 or float64, one element, on the params' device)
//   is given; anything else is refused (host_scalars() below).
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
// definition for the CPU kernels, the CUDA plan (cuda/multi_tensor_plan.h) and the checks below.
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

// Checks shared by phase A and phase B of every backend. `moms` may be empty (phase A reads no
// momentum). The messages name the list and the index, since the Python layer has already checked
// the user-facing shapes and names (fadam_fused/optimizer.py); these guard direct op calls.
inline void check_group(
    const char* op,
    c10::DeviceType device_type,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList fims,
    at::TensorList moms,
    at::TensorList steps,
    const at::Tensor& partials,
    const at::Tensor& skip,
    const c10::optional<at::Tensor>& grad_scale,
    int64_t chunk_size) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && fims.size() == n && steps.size() == n, op,
              ": params, grads, fims and steps must have the same length, got ", n, ", ",
              grads.size(), ", ", fims.size(), ", ", steps.size());
  TORCH_CHECK(moms.empty() || moms.size() == n, op, ": momentums must have one tensor per param");
  TORCH_CHECK(chunk_size > 0, op, ": chunk_size must be positive, got ", chunk_size);
  TORCH_CHECK(skip.device().type() == device_type && skip.scalar_type() == at::kFloat &&
                  skip.numel() == 1,
              op, ": skip must be a one-element float32 tensor on the params' device");
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->device().type() == device_type &&
                    grad_scale->scalar_type() == at::kFloat && grad_scale->numel() == 1,
                op, ": grad_scale must be a one-element float32 tensor on the params' device");
  }
  TORCH_CHECK(partials.device().type() == device_type && partials.scalar_type() == at::kDouble &&
                  partials.dim() == 2 && partials.size(1) == 2 && partials.is_contiguous(),
              op, ": partials must be a contiguous float64 [n_slots, 2] tensor on the device");
  if (n == 0) {
    return;
  }
  const auto device = params[0].device();
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(device.type() == device_type, op, ": params must be on ", device_type, ", got ",
              device);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": params must be float32, bfloat16 or float16, got ", dtype);
  int64_t n_slots = 0;
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device() == device && p.scalar_type() == dtype, op, ": params[", i,
                "] must share the device and dtype of params[0] (", device, ", ", dtype, ")");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i,
                "] must be dense and non-overlapping");
    auto same_layout = [&](const at::Tensor& t, const char* name, at::ScalarType want) {
      TORCH_CHECK(t.device() == device && t.scalar_type() == want && t.sizes() == p.sizes() &&
                      t.strides() == p.strides(),
                  op, ": ", name, "[", i, "] must be a ", want, " tensor on ", device,
                  " with the sizes and strides of params[", i, "]");
    };
    same_layout(grads[i], "grads", dtype);
    same_layout(fims[i], "fims", at::kFloat);
    if (!moms.empty()) {
      same_layout(moms[i], "momentums", at::kFloat);
    }
    TORCH_CHECK(steps[i].device() == device && steps[i].scalar_type() == at::kFloat &&
                    steps[i].numel() == 1,
                op, ": steps[", i, "] must be a one-element float32 tensor on ", device);
    n_slots += nchunks_of(p.numel(), chunk_size);
  }
  TORCH_CHECK(partials.size(0) == n_slots, op, ": partials must have ", n_slots,
              " rows for chunk_size ", chunk_size, ", got ", partials.size(0));
  TORCH_CHECK(skip.device() == device, op, ": skip must be on ", device);
}

// The host step scalars of both phases, prepared once for the CPU and the CUDA launchers so both
// accept the same inputs and round the same way (the Triton launcher uses the Python twin, op_contract.host_scalars).
// Device pointers (grad_scale, lr_tensor) are read where the kernel runs: grad_mul_of() and
// lr_of() in fadam_math.h.
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
};

// Phase A passes lr = beta1 = weight_decay = 0 and no lr_tensor (it uses none of them).
// `device` is the params' device (checked by check_group()).
inline HostScalars host_scalars(const char* op, const at::Device& device, double beta2, double eps,
                                double p, double clip, bool maximize,
                                const c10::optional<at::Tensor>& grad_scale,
                                const c10::optional<at::Tensor>& lr_tensor = c10::nullopt,
                                double lr = 0.0, double beta1 = 0.0, double weight_decay = 0.0) {
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->device() == device, op, ": grad_scale must be on ", device, ", got ",
                grad_scale->device());
  }
  if (lr_tensor.has_value()) {
    const auto dtype = lr_tensor->scalar_type();
    TORCH_CHECK(lr_tensor->numel() == 1 && (dtype == at::kFloat || dtype == at::kDouble) &&
                    lr_tensor->device() == device,
                op, ": lr_tensor must be a one-element float32 or float64 tensor on ", device,
                ", got ", dtype, " of ", lr_tensor->numel(), " elements on ", lr_tensor->device());
  }
  HostScalars s{};
  s.beta2 = beta2;
  s.clip = clip;
  s.clipping = clip > 0.0;
  s.maximize = maximize;
  s.lr_ptr = lr_tensor.has_value() ? lr_tensor->const_data_ptr() : nullptr;
  s.lr_is_double = lr_tensor.has_value() && lr_tensor->scalar_type() == at::kDouble;
  s.grad_scale = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  s.p = static_cast<float>(p);
  s.eps_p = static_cast<float>(std::pow(eps, 2.0 * p));
  s.lr = static_cast<float>(lr);
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - static_cast<double>(s.beta1));
  s.weight_decay = static_cast<float>(weight_decay);
  return s;
}

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

// Checks of the FAdafactor ops' tensor lists; empty lists (fim_rows in phase A, momentums in
// phases S and A) are not checked. Returns each tensor's tile geometry.
inline std::vector<FactorTile> check_factored_group(
    const char* op,
    c10::DeviceType device_type,
    at::TensorList params,
    at::TensorList grads,
    at::TensorList fim_rows,
    at::TensorList fim_cols,
    at::TensorList moms,
    const at::Tensor& factors,
    int64_t chunk_size) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": params and grads must have the same length");
  TORCH_CHECK(fim_rows.size() == fim_cols.size() && (fim_rows.empty() || fim_rows.size() == n),
              op, ": fim_rows and fim_cols must have one tensor per param");
  TORCH_CHECK(moms.empty() || moms.size() == n, op, ": momentums must have one tensor per param");
  TORCH_CHECK(chunk_size > 0, op, ": chunk_size must be positive, got ", chunk_size);
  TORCH_CHECK(factors.device().type() == device_type && factors.scalar_type() == at::kFloat &&
                  factors.dim() == 1,
              op, ": factors must be a 1-dim float32 tensor on the params' device");
  std::vector<FactorTile> tiles;
  int64_t n_factors = 0;
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device().type() == device_type && p.device() == params[0].device() &&
                    p.scalar_type() == params[0].scalar_type(),
                op, ": params[", i, "] must share the device and dtype of params[0]");
    TORCH_CHECK(p.dim() >= 2 && p.is_contiguous(), op, ": params[", i,
                "] must be contiguous with 2 or more dims");
    const auto dtype = p.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                ": params must be float32, bfloat16 or float16, got ", dtype);
    TORCH_CHECK(grads[i].sizes() == p.sizes() && grads[i].scalar_type() == dtype &&
                    grads[i].device() == p.device() && grads[i].is_contiguous(),
                op, ": grads[", i, "] must be contiguous, with the sizes, dtype and device of "
                "params[", i, "]");
    auto check_state = [&](const at::Tensor& t, at::IntArrayRef want, const char* name) {
      TORCH_CHECK(t.sizes() == want && t.scalar_type() == at::kFloat &&
                      t.device() == p.device() && t.is_contiguous(),
                  op, ": ", name, "[", i, "] must be a contiguous float32 tensor of sizes ", want,
                  " on ", p.device(), ", got ", t.sizes());
    };
    if (!fim_rows.empty()) {
      std::vector<int64_t> cols(p.sizes().begin(), p.sizes().end() - 2);
      cols.push_back(p.size(-1));
      check_state(fim_rows[i], p.sizes().slice(0, p.dim() - 1), "fim_rows");
      check_state(fim_cols[i], cols, "fim_cols");
    }
    if (!moms.empty()) {
      check_state(moms[i], p.sizes(), "momentums");
    }
    tiles.push_back(factor_tile(p.sizes(), chunk_size));
    n_factors += tiles.back().batch * tiles.back().factors_per_matrix();
  }
  TORCH_CHECK(factors.numel() == n_factors, op, ": factors must have ", n_factors,
              " elements, got ", factors.numel());
  return tiles;
}

// Calls f.template operator()<scalar_t, kSqrt>() for the storage dtype and p: every kernel of every
// backend is instantiated per (float32 / bfloat16 / float16, p == 0.5). check_group() has already
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

}  // namespace fadam
