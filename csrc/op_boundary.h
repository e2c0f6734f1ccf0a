// The C++ boundary of the seven ops, written once for every backend: their C++ signatures, every
// check of their arguments, and the validated launch description the launchers read.
//
// [note: the op boundary]
// A backend registers `&fadam_phase_a_op<kLimits, &launcher>` (likewise for the six other ops).
// That function is the op's C++ signature (the schema is defined in fadam_fused/op_contract.py);
// it builds a LaunchDesc with describe() and calls the backend's launcher with it. describe() runs
// every check of the contract ([note: the two-phase op contract] in fadam_ops.h, [note: the
// FAdafactor op contract] in fadam_fused/op_contract.py) and of the backend's KernelLimits before
// anything runs, so a refused call changes nothing, and prepares once what every launcher needs:
// the host scalars, the slot offsets, the factor tiles and their offsets, the buffer pointers.
// The launchers (CPU FAdam, CPU FAdafactor, CUDA FAdam, CUDA FAdafactor, and the emulated CUDA
// build) take their inputs from the LaunchDesc only: none derives a scalar or repeats a check.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "fadam_ops.h"
#include "stochastic_round.h"

namespace fadam {

// What a backend's kernels take beyond the op contract; the defaults are no limit (the CPU's).
struct KernelLimits {
  c10::DeviceType device_type;
  const char* kernels;                   // the kernels' name in messages
  int64_t max_chunk_size = INT64_MAX;
  bool aligned_partials = false;         // the slots are read as 128-bit loads
  int64_t max_tile_cols = INT64_MAX;     // FAdafactor phase S
  bool int32_geometry = false;           // chunks, matrices, rows and columns fit 32-bit indices
  int64_t check_chunk_size = int64_t{1} << 20;  // the chunk of nonfinite_check, which takes none
};

enum class OpKind {
  kFAdamA, kFAdamB, kFactoredS, kFactoredA, kFactoredB,
  kNonfiniteCheck, kAdaFisherUpdate  // [note: the AdaFisher op contract] in op_contract.py
};

// The arguments of one op call, by name. An absent list or tensor is one the op does not take.
struct OpArgs {
  OpKind kind;
  at::TensorList params, grads;
  std::optional<at::TensorList> fims, fim_rows, fim_cols, moms, steps;
  const at::Tensor* partials = nullptr;
  const at::Tensor* factor_partials = nullptr;
  const at::Tensor* factors = nullptr;
  const at::Tensor* skip = nullptr;
  const c10::optional<at::Tensor>* grad_scale = nullptr;
  const c10::optional<at::Tensor>* lr_tensor = nullptr;
  // Phase A passes no lr, beta1 or weight_decay; FAdafactor's A and B no beta2; its phase S no
  // eps, p or clip (p = 0.5 then picks one instantiation of the kernels it dispatches).
  double lr = 0.0, beta1 = 0.0, beta2 = 0.0, eps = 1.0, p = 0.5, clip = 0.0, weight_decay = 0.0;
  bool maximize = false;
  int64_t chunk_size = 0;
  bool fuse_one_chunk = false;
  // The update ops' stochastic rounding list ([note: stochastic rounding] in
  // fadam_fused/op_contract.py): empty, or 4 int64 per tensor.
  at::IntArrayRef rounding;
  // AdaFisher's update: (s_offset, h_offset, cols) per tensor into `factors`, its momentum
  // coefficient and damping.
  std::optional<at::IntArrayRef> factor_layout;
  double beta = 0.0, damping = 0.0;
  bool decoupled = false;
};

// One validated op call: all a launcher reads. Lists the op does not take are empty, pointers
// nullptr. Pointers to tensors the op does not mutate are const_cast from const_data_ptr (read
// only in the kernels); the others come from data_ptr.
struct LaunchDesc {
  const char* op = "";
  at::Device device{c10::DeviceType::CPU};  // params[0]'s (when there are params)
  at::ScalarType dtype = at::kFloat;        // params[0]'s
  at::TensorList params, grads, fims, fim_rows, fim_cols, moms, steps;
  double* partials = nullptr;          // float64 [n_slots, 2]
  double* factor_partials = nullptr;   // float64, factor_off.partials.back() elements
  float* factors = nullptr;            // float32, factor_off.factors.back() elements
  float* skip = nullptr;               // one element
  HostScalars s{};
  double p = 0.5;                      // the op's p: dispatch() takes the sqrt path on p == 0.5
  int64_t chunk_size = 0;
  bool fuse_one_chunk = false;
  std::vector<int64_t> slots;          // slot_offsets(params): tensor i's first slot, then n_slots
  std::vector<FactorTile> tiles;       // FAdafactor: tensor i's tiles
  FactorOffsets factor_off;            // FAdafactor: tensor i's regions of the two factor buffers
  // Stochastic rounding: one row per tensor when the op was given a rounding list AND the
  // parameters are bfloat16 (other dtypes ignore it), else empty: round to nearest.
  std::vector<RoundingArgs> rounding;
  bool mom_bf16 = false;               // the momentums are bfloat16 (else float32)
  std::vector<AdaLayout> ada;          // AdaFisher's update: tensor i's S and H in `factors`

  bool empty() const {
    return params.empty();
  }
  int64_t nchunks(size_t i) const {
    return slots[i + 1] - slots[i];
  }
  // A tensor of one chunk done entirely in phase B ([note: the two-phase op contract]).
  bool fused(size_t i) const {
    return fuse_one_chunk && nchunks(i) == 1;
  }
};

namespace detail {

template <typename T>
T* mutable_ptr(const at::Tensor& t, bool mutated) {
  return mutated ? t.data_ptr<T>() : const_cast<T*>(t.const_data_ptr<T>());
}

}  // namespace detail

// Checks an op call and describes it. The messages name the op, the list and the index: the
// Python layer has already checked the user-facing shapes and names (fadam_fused/optimizer.py);
// these guard direct op calls and say what the kernels assume.
inline LaunchDesc describe(const char* op, const KernelLimits& lim, const OpArgs& a) {
  const bool factored = a.kind == OpKind::kFactoredS || a.kind == OpKind::kFactoredA ||
                        a.kind == OpKind::kFactoredB;
  const size_t n = a.params.size();
  auto list = [&](const std::optional<at::TensorList>& l, const char* name) -> at::TensorList {
    if (!l.has_value()) {
      return {};
    }
    TORCH_CHECK(l->size() == n, op, ": ", name, " must have one tensor per param (", n, "), got ",
                l->size());
    return *l;
  };
  LaunchDesc d;
  d.op = op;
  d.params = a.params;
  d.grads = list(a.grads, "grads");
  d.fims = list(a.fims, "fims");
  d.fim_rows = list(a.fim_rows, "fim_rows");
  d.fim_cols = list(a.fim_cols, "fim_cols");
  d.moms = list(a.moms, "momentums");
  d.steps = list(a.steps, "steps");
  d.p = a.p;
  d.chunk_size = a.chunk_size;
  d.fuse_one_chunk = a.fuse_one_chunk;
  TORCH_CHECK(a.chunk_size > 0, op, ": chunk_size must be positive, got ", a.chunk_size);
  TORCH_CHECK(a.chunk_size <= lim.max_chunk_size, op, ": chunk_size must be at most ",
              lim.max_chunk_size, " for ", lim.kernels, " (32-bit indices inside a chunk), got ",
              a.chunk_size);
  if (n == 0) {
    return d;  // nothing is read or written
  }

  // ---- the parameters and their per-tensor operands
  const at::Device device = a.params[0].device();
  const at::ScalarType dtype = a.params[0].scalar_type();
  TORCH_CHECK(device.type() == lim.device_type, op, ": params must be on ", lim.device_type,
              ", got ", device);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": params must be float32, bfloat16 or float16, got ", dtype);
  d.device = device;
  d.dtype = dtype;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    TORCH_CHECK(p.device() == device && p.scalar_type() == dtype, op, ": params[", i,
                "] must share the device and dtype of params[0] (", device, ", ", dtype, ")");
    if (!factored) {
      TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i,
                  "] must be dense and non-overlapping");
    } else {
      TORCH_CHECK(p.dim() >= 2 && p.is_contiguous(), op, ": params[", i,
                  "] must be contiguous with 2 or more dims");
    }
    // The element-wise operands: params[i]'s sizes and strides (contiguous for FAdafactor).
    auto same_layout = [&](at::TensorList l, const char* name, at::ScalarType want) {
      if (l.empty()) {
        return;
      }
      const at::Tensor& t = l[i];
      TORCH_CHECK(t.device() == device && t.scalar_type() == want && t.sizes() == p.sizes() &&
                      t.strides() == p.strides(),
                  op, ": ", name, "[", i, "] must be a ", want, " tensor on ", device,
                  " with the sizes and strides of params[", i, "]");
    };
    same_layout(d.grads, "grads", dtype);
    same_layout(d.fims, "fims", at::kFloat);
    // Momentums: float32, or bfloat16 (momentum_dtype=torch.bfloat16), the same for the list.
    same_layout(d.moms, "momentums", d.moms.empty() ? at::kFloat : d.moms[0].scalar_type());
    auto factor_state = [&](at::TensorList l, const char* name, at::IntArrayRef want) {
      if (l.empty()) {
        return;
      }
      const at::Tensor& t = l[i];
      TORCH_CHECK(t.sizes() == want && t.scalar_type() == at::kFloat && t.device() == device &&
                      t.is_contiguous(),
                  op, ": ", name, "[", i, "] must be a contiguous float32 tensor of sizes ", want,
                  " on ", device, ", got ", t.sizes());
    };
    if (!d.fim_rows.empty()) {
      std::vector<int64_t> cols(p.sizes().begin(), p.sizes().end() - 2);
      cols.push_back(p.size(-1));
      factor_state(d.fim_rows, "fim_rows", p.sizes().slice(0, p.dim() - 1));
      factor_state(d.fim_cols, "fim_cols", cols);
    }
    if (!d.steps.empty()) {
      const at::Tensor& t = d.steps[i];
      TORCH_CHECK(t.device() == device && t.scalar_type() == at::kFloat && t.numel() == 1, op,
                  ": steps[", i, "] must be a one-element float32 tensor on ", device);
    }
  }

  if (!d.moms.empty()) {
    const at::ScalarType m = d.moms[0].scalar_type();
    TORCH_CHECK(m == at::kFloat || m == at::kBFloat16, op,
                ": momentums must be float32 or bfloat16, got ", m);
    d.mom_bf16 = m == at::kBFloat16;
  }
  if (!a.rounding.empty()) {
    TORCH_CHECK(a.rounding.size() == 4 * n, op, ": rounding must be empty or hold 4 int64 per "
                "tensor ([seed, base, inner_local, inner_global]), got ", a.rounding.size(),
                " for ", n, " tensors");
    for (size_t i = 0; i < n; ++i) {
      const RoundingArgs r{a.rounding[4 * i], a.rounding[4 * i + 1], a.rounding[4 * i + 2],
                           a.rounding[4 * i + 3]};
      TORCH_CHECK(r.base >= 0 && r.inner_local > 0 && r.inner_global >= r.inner_local, op,
                  ": rounding[", 4 * i, ":", 4 * i + 4, "] of params[", i, "] must have base >= "
                  "0 and 0 < inner_local <= inner_global, got base ", r.base, ", inner_local ",
                  r.inner_local, ", inner_global ", r.inner_global);
      if (dtype == at::kBFloat16 || d.mom_bf16) {
        d.rounding.push_back(r);
      }
    }
  }

  // ---- chunks, slots and factor tiles
  d.slots = slot_offsets(a.params, a.chunk_size);
  if (lim.int32_geometry) {
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK(d.nchunks(i) <= INT32_MAX, op, ": params[", i, "] has ", a.params[i].numel(),
                  " elements: more than 2^31 chunks of ", a.chunk_size, " for ", lim.kernels);
    }
  }
  if (factored) {
    for (size_t i = 0; i < n; ++i) {
      const FactorTile t = factor_tile(a.params[i].sizes(), a.chunk_size);
      TORCH_CHECK(t.tile_cols <= lim.max_tile_cols, op, ": chunk_size ", a.chunk_size,
                  " makes tiles ", t.tile_cols, " columns wide; ", lim.kernels, " take at most ",
                  lim.max_tile_cols, " (chunk_size < ",
                  (lim.max_tile_cols + 1) * (lim.max_tile_cols + 1), ")");
      TORCH_CHECK(!lim.int32_geometry || (t.batch <= INT32_MAX && t.rows < (int64_t{1} << 30) &&
                                          t.cols <= (int64_t{1} << 30)),
                  op, ": params[", i, "] is ", t.batch, " matrices of ", t.rows, " x ", t.cols,
                  "; ", lim.kernels, " take fewer than 2^31 matrices, fewer than 2^30 rows and at "
                  "most 2^30 columns");
      d.tiles.push_back(t);
    }
    d.factor_off = factor_offsets(d.tiles);
  }

  // ---- the buffers and the one-element tensors
  auto on_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, ", got ",
                t.device());
  };
  const bool mutates_partials = a.kind == OpKind::kFAdamA || a.kind == OpKind::kFactoredA;
  const bool mutates_skip = a.kind == OpKind::kFAdamA || a.kind == OpKind::kFactoredS ||
                            a.kind == OpKind::kNonfiniteCheck;
  const bool mutates_factors = a.kind == OpKind::kFactoredS;
  if (a.partials != nullptr) {
    const at::Tensor& t = *a.partials;
    on_device(t, "partials");
    TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == 2 && t.size(1) == 2 &&
                    t.is_contiguous(),
                op, ": partials must be a contiguous float64 [n_slots, 2] tensor");
    TORCH_CHECK(t.size(0) == d.slots.back(), op, ": partials must have ", d.slots.back(),
                " rows for chunk_size ", a.chunk_size, ", got ", t.size(0));
    d.partials = detail::mutable_ptr<double>(t, mutates_partials);
    TORCH_CHECK(!lim.aligned_partials || reinterpret_cast<uintptr_t>(d.partials) % 16 == 0, op,
                ": partials must be 16-byte aligned for ", lim.kernels,
                " (a slot is read as one 128-bit load)");
  }
  if (a.factor_partials != nullptr) {
    const at::Tensor& t = *a.factor_partials;
    on_device(t, "factor_partials");
    TORCH_CHECK(t.scalar_type() == at::kDouble && t.is_contiguous() &&
                    t.numel() == d.factor_off.partials.back(),
                op, ": factor_partials must be a contiguous float64 tensor of ",
                d.factor_off.partials.back(), " elements, got ", t.numel());
    d.factor_partials = detail::mutable_ptr<double>(t, mutates_factors);
  }
  if (a.factors != nullptr && a.kind == OpKind::kAdaFisherUpdate) {
    // [note: the AdaFisher op contract]: every tensor's S and H pieces lie inside `factors`, and
    // S H^T has the tensor's numel (rows = numel / cols), so the kernels index without checks.
    const at::Tensor& t = *a.factors;
    on_device(t, "factors");
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.is_contiguous(), op,
                ": factors must be a contiguous 1-dim float32 tensor, got ", t.scalar_type(),
                " of sizes ", t.sizes());
    const at::IntArrayRef layout = *a.factor_layout;
    TORCH_CHECK(layout.size() == 3 * n, op, ": factor_layout must hold 3 integers per param (",
                3 * n, "), got ", layout.size());
    const int64_t size = t.numel();
    for (size_t i = 0; i < n; ++i) {
      const int64_t s_off = layout[3 * i], h_off = layout[3 * i + 1], cols = layout[3 * i + 2];
      const int64_t numel = a.params[i].numel();
      TORCH_CHECK(cols >= 0, op, ": factor_layout gives params[", i, "] ", cols, " columns");
      int64_t rows = 0;
      if (cols > 0) {
        TORCH_CHECK(numel % cols == 0, op, ": params[", i, "] has ", numel,
                    " elements, not a whole number of rows of ", cols, " columns");
        rows = numel / cols;
        TORCH_CHECK(s_off >= 0 && h_off >= 0 && s_off <= size - rows && h_off <= size - cols,
                    op, ": factor_layout of params[", i, "] (S at ", s_off, ", ", rows,
                    " rows; H at ", h_off, ", ", cols, " columns) reaches past factors (", size,
                    " elements)");
        TORCH_CHECK(!lim.int32_geometry || (rows <= INT32_MAX && cols < (int64_t{1} << 30)), op,
                    ": params[", i, "] is ", rows, " rows of ", cols, " columns; ", lim.kernels,
                    " take fewer than 2^31 rows and 2^30 columns");
      }
      d.ada.push_back({s_off, h_off, cols});
    }
    d.factors = const_cast<float*>(t.const_data_ptr<float>());
  } else if (a.factors != nullptr) {
    const at::Tensor& t = *a.factors;
    on_device(t, "factors");
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.is_contiguous() &&
                    t.numel() == d.factor_off.factors.back(),
                op, ": factors must be a contiguous 1-dim float32 tensor of ",
                d.factor_off.factors.back(), " elements, got ", t.sizes());
    d.factors = detail::mutable_ptr<float>(t, mutates_factors);
  }
  auto one_float = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == device && t.scalar_type() == at::kFloat && t.numel() == 1, op, ": ",
                name, " must be a one-element float32 tensor on ", device, ", got ",
                t.scalar_type(), " of ", t.numel(), " elements on ", t.device());
  };
  if (a.skip != nullptr) {
    one_float(*a.skip, "skip");
    d.skip = detail::mutable_ptr<float>(*a.skip, mutates_skip);
  }
  const bool scaled = a.grad_scale != nullptr && a.grad_scale->has_value();
  if (scaled) {
    one_float(**a.grad_scale, "grad_scale");
  }
  const bool lr_given = a.lr_tensor != nullptr && a.lr_tensor->has_value();
  if (lr_given) {
    const at::Tensor& t = **a.lr_tensor;
    TORCH_CHECK(t.numel() == 1 && (t.scalar_type() == at::kFloat ||
                                   t.scalar_type() == at::kDouble) && t.device() == device,
                op, ": lr_tensor must be a one-element float32 or float64 tensor on ", device,
                ", got ", t.scalar_type(), " of ", t.numel(), " elements on ", t.device());
  }

  // ---- the host step scalars: one rounding for every backend (op_contract.host_scalars is the
  // Triton launcher's twin). Device values (grad_scale, lr_tensor) stay pointers, read where the
  // kernel runs: grad_mul_of() and lr_of() in fadam_math.h.
  HostScalars& s = d.s;
  s.beta2 = a.beta2;
  s.clip = a.clip;
  s.clipping = a.clip > 0.0;
  s.maximize = a.maximize;
  s.lr_ptr = lr_given ? (*a.lr_tensor)->const_data_ptr() : nullptr;
  s.lr_is_double = lr_given && (*a.lr_tensor)->scalar_type() == at::kDouble;
  s.grad_scale = scaled ? (*a.grad_scale)->const_data_ptr<float>() : nullptr;
  s.p = static_cast<float>(a.p);
  s.eps_p = static_cast<float>(std::pow(a.eps, 2.0 * a.p));
  s.lr = static_cast<float>(a.lr);
  s.beta1 = static_cast<float>(a.beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - static_cast<double>(s.beta1));
  s.weight_decay = static_cast<float>(a.weight_decay);
  // AdaFisher ([note: the AdaFisher op contract]): the rounding of the float64 oracle's float32
  // run, whose torch ops round each Python scalar to float32 (beta, 1 - beta from float64,
  // weight_decay, damping, lr); lr / bc is formed in float64 per tensor, so lr stays float64 too.
  s.lr64 = a.lr;
  s.beta = a.beta;
  s.beta_f = static_cast<float>(a.beta);
  s.one_minus_beta = static_cast<float>(1.0 - a.beta);
  s.damping = static_cast<float>(a.damping);
  s.decoupled = a.decoupled;
  return d;
}

// ---- the seven ops' C++ signatures ---------------------------------------------------------------
//
// kLaunch is the backend's launcher of that op, kLimits its kernels' limits ([note: the op
// boundary]). Argument order and names: the schemas of fadam_fused/op_contract.py.

using Launcher = void (*)(const LaunchDesc&);

template <const KernelLimits& kLimits, Launcher kLaunch>
void fadam_phase_a_op(at::TensorList params, at::TensorList grads, at::TensorList fims,
                      at::TensorList steps, at::Tensor partials, at::Tensor skip,
                      const c10::optional<at::Tensor>& grad_scale, double beta2, double eps,
                      double p, double clip, bool maximize, int64_t chunk_size,
                      bool fuse_one_chunk) {
  kLaunch(describe("fadam_phase_a", kLimits,
                   {.kind = OpKind::kFAdamA, .params = params, .grads = grads, .fims = fims,
                    .steps = steps, .partials = &partials, .skip = &skip,
                    .grad_scale = &grad_scale, .beta2 = beta2, .eps = eps, .p = p, .clip = clip,
                    .maximize = maximize, .chunk_size = chunk_size,
                    .fuse_one_chunk = fuse_one_chunk}));
}

template <const KernelLimits& kLimits, Launcher kLaunch>
void fadam_phase_b_op(at::TensorList params, at::TensorList grads, at::TensorList fims,
                      at::TensorList moms, at::TensorList steps, const at::Tensor& partials,
                      const at::Tensor& skip, const c10::optional<at::Tensor>& grad_scale,
                      const c10::optional<at::Tensor>& lr_tensor, double lr, double beta1,
                      double beta2, double eps, double p, double clip, double weight_decay,
                      bool maximize, int64_t chunk_size, bool fuse_one_chunk,
                      at::IntArrayRef rounding) {
  kLaunch(describe("fadam_phase_b", kLimits,
                   {.kind = OpKind::kFAdamB, .params = params, .grads = grads, .fims = fims,
                    .moms = moms, .steps = steps, .partials = &partials, .skip = &skip,
                    .grad_scale = &grad_scale, .lr_tensor = &lr_tensor, .lr = lr, .beta1 = beta1,
                    .beta2 = beta2, .eps = eps, .p = p, .clip = clip,
                    .weight_decay = weight_decay, .maximize = maximize,
                    .chunk_size = chunk_size, .fuse_one_chunk = fuse_one_chunk,
                    .rounding = rounding}));
}

template <const KernelLimits& kLimits, Launcher kLaunch>
void fadafactor_phase_s_op(at::TensorList params, at::TensorList grads, at::TensorList fim_rows,
                           at::TensorList fim_cols, at::TensorList steps,
                           at::Tensor factor_partials, at::Tensor factors, at::Tensor skip,
                           const c10::optional<at::Tensor>& grad_scale, double beta2,
                           bool maximize, int64_t chunk_size) {
  kLaunch(describe("fadafactor_phase_s", kLimits,
                   {.kind = OpKind::kFactoredS, .params = params, .grads = grads,
                    .fim_rows = fim_rows, .fim_cols = fim_cols, .steps = steps,
                    .factor_partials = &factor_partials, .factors = &factors, .skip = &skip,
                    .grad_scale = &grad_scale, .beta2 = beta2, .maximize = maximize,
                    .chunk_size = chunk_size}));
}

template <const KernelLimits& kLimits, Launcher kLaunch>
void fadafactor_phase_a_op(at::TensorList params, at::TensorList grads, const at::Tensor& factors,
                           at::Tensor partials, const c10::optional<at::Tensor>& grad_scale,
                           double eps, double p, double clip, bool maximize, int64_t chunk_size,
                           bool fuse_one_chunk) {
  kLaunch(describe("fadafactor_phase_a", kLimits,
                   {.kind = OpKind::kFactoredA, .params = params, .grads = grads,
                    .partials = &partials, .factors = &factors, .grad_scale = &grad_scale,
                    .eps = eps, .p = p, .clip = clip, .maximize = maximize,
                    .chunk_size = chunk_size, .fuse_one_chunk = fuse_one_chunk}));
}

template <const KernelLimits& kLimits, Launcher kLaunch>
void fadafactor_phase_b_op(at::TensorList params, at::TensorList grads, at::TensorList fim_rows,
                           at::TensorList fim_cols, at::TensorList moms, at::TensorList steps,
                           const at::Tensor& factors,
                           const at::Tensor& partials, const at::Tensor& skip,
                           const c10::optional<at::Tensor>& grad_scale,
                           const c10::optional<at::Tensor>& lr_tensor, double lr, double beta1,
                           double eps, double p, double clip, double weight_decay, bool maximize,
                           int64_t chunk_size, bool fuse_one_chunk, at::IntArrayRef rounding) {
  kLaunch(describe("fadafactor_phase_b", kLimits,
                   {.kind = OpKind::kFactoredB, .params = params, .grads = grads,
                    .fim_rows = fim_rows, .fim_cols = fim_cols, .moms = moms, .steps = steps,
                    .partials = &partials, .factors = &factors, .skip = &skip,
                    .grad_scale = &grad_scale, .lr_tensor = &lr_tensor, .lr = lr, .beta1 = beta1,
                    .eps = eps, .p = p, .clip = clip, .weight_decay = weight_decay,
                    .maximize = maximize, .chunk_size = chunk_size,
                    .fuse_one_chunk = fuse_one_chunk, .rounding = rounding}));
}

template <const KernelLimits& kLimits, Launcher kLaunch>
void nonfinite_check_op(at::TensorList grads, at::Tensor skip,
                        const c10::optional<at::Tensor>& grad_scale) {
  // The gradients stand in for the params: the check reads nothing else.
  kLaunch(describe("nonfinite_check", kLimits,
                   {.kind = OpKind::kNonfiniteCheck, .params = grads, .grads = grads,
                    .skip = &skip, .grad_scale = &grad_scale,
                    .chunk_size = kLimits.check_chunk_size}));
}

template <const KernelLimits& kLimits, Launcher kLaunch>
void adafisher_update_op(at::TensorList params, at::TensorList grads, at::TensorList moms,
                         at::TensorList steps, const at::Tensor& factors,
                         at::IntArrayRef factor_layout, const at::Tensor& skip,
                         const c10::optional<at::Tensor>& grad_scale,
                         const c10::optional<at::Tensor>& lr_tensor, double lr, double beta,
                         double weight_decay, double damping, bool decoupled, bool maximize,
                         int64_t chunk_size, at::IntArrayRef rounding) {
  kLaunch(describe("adafisher_update", kLimits,
                   {.kind = OpKind::kAdaFisherUpdate, .params = params, .grads = grads,
                    .moms = moms, .steps = steps, .factors = &factors, .skip = &skip,
                    .grad_scale = &grad_scale, .lr_tensor = &lr_tensor, .lr = lr,
                    .weight_decay = weight_decay, .maximize = maximize, .chunk_size = chunk_size,
                    .rounding = rounding, .factor_layout = factor_layout, .beta = beta,
                    .damping = damping, .decoupled = decoupled}));
}

}  // namespace fadam
