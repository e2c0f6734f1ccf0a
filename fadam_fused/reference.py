r"""The correctness oracle: FAdam and FAdafactor in plain PyTorch, one tensor at a time, written
for clarity.

Every fused backend is tested against this file. It is never optimised.

The algorithm (Hwang 2024, "FAdam: Adam is a natural gradient optimizer using diagonal empirical
Fisher information", Algorithm 1; docs/design.md, section 1). For each parameter tensor :math:`\theta` with
gradient :math:`g`, step count :math:`t` (0 before the first step), momentum :math:`m` (init 0) and
diagonal empirical Fisher :math:`f` (init 1):

.. math::
    t &\leftarrow t + 1 \\
    \hat\beta_2 &= \beta_2 \frac{1 - \beta_2^{t-1}}{1 - \beta_2^{t}}
        \quad\text{(Adafactor-style bias correction; 0 at } t = 1\text{)} \\
    f &\leftarrow \hat\beta_2 f + (1 - \hat\beta_2)\, g^2 \\
    d &= f^{p} + \epsilon^{2p} \\
    \hat g &= g / d, \qquad s_1 = \max(1, \mathrm{RMS}(\hat g) / c) \\
    m &\leftarrow \beta_1 m + (1 - \beta_1)\, \hat g / s_1 \\
    w &= \theta / d, \qquad s_2 = \max(1, \mathrm{RMS}(w) / c) \\
    \theta &\leftarrow \theta - \eta\, (m + \lambda\, w / s_2)

with :math:`\mathrm{RMS}(x) = \sqrt{\mathrm{mean}(x^2)}` over all elements of the tensor, clip
:math:`c` (``clip=None`` or 0: :math:`s_1 = s_2 = 1`), learning rate :math:`\eta` and weight decay
:math:`\lambda`. ``maximize=True`` negates :math:`g` (out of place).

Precision: math in float32 (``upcast=False``, the precision the fused kernels promise) or float64
(``upcast=True``, the ground truth the tests measure everything against), whatever the storage
dtype; step scalars in float64; sums of squares in float64 (with ``eps=1e-30`` and a zero gradient
:math:`w \approx 10^{29}` and :math:`w^2` overflows float32).

FAdafactor (Algorithm 2 of the paper; docs/design.md, section 8) replaces f of a parameter with 2
or more dims by a rank-1 factoring of row and column sums of g^2 (factored_fim); the rest of the
step is FAdam's (_apply).

Non-finite gradients (docs/design.md, section 6): if any gradient of the step holds a NaN or inf, or
its square overflows (FAdafactor: or a new row or column sum), or ``found_inf`` from a GradScaler
is set, nothing changes: parameters, state and step counts keep their exact values. The decision
is a device tensor, never a host sync.

The ``reference`` backend is this file's math behind the op contract of the fused backends
(``FADAM_OPS``, ``FADAFACTOR_OPS``: [note: the two-phase op contract] and [note: the FAdafactor op
contract] in op_contract.py), one tensor at a time: every tensor is one chunk (one partial-sum
slot, one factor tile), phase A writes the slots only when the caller asks for them
(``fuse_one_chunk=False``, sharded tensors), and phase B reads the same skip flag.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import op_contract


# ---- the gradient and the non-finite rule -------------------------------------------------------


def _compute_dtype(t: Tensor, upcast: bool = False) -> torch.dtype:
    return torch.float64 if upcast or t.dtype == torch.float64 else torch.float32


def _multiplier(grad_scale: Tensor | None, maximize: bool, compute: torch.dtype,
                device: torch.device) -> Tensor | float:
    """(maximize ? -1 : 1) / grad_scale in float64, rounded to the compute dtype once: the
    kernels' gradient multiplier (fadam::grad_mul_of in csrc/fadam_math.h)."""
    sign = -1.0 if maximize else 1.0
    if grad_scale is None:
        return sign
    scale = grad_scale.to(device=device, dtype=torch.float64).reshape(())
    return (sign / scale).to(compute)


def _inputs(param, grad, *, maximize, grad_scale, upcast):
    """The compute dtype, and the step's g (scaled, maybe negated) and theta in it."""
    compute = _compute_dtype(param, upcast)
    g = grad.to(compute) * _multiplier(grad_scale, maximize, compute, grad.device)
    return compute, g, param.to(compute)


def nonfinite_flag(grads: Sequence[Tensor], found_inf: Tensor | None = None, *,
                   grad_scale: Tensor | None = None) -> Tensor:
    """A float32 0-dim tensor: 1.0 if the step must be skipped, else 0.0.

    Skipped when found_inf is set, or when for any gradient element the scaled gradient g (in
    the compute precision: float32, float64 for float64 gradients) has a square g * g that is
    not finite: a NaN or inf gradient, or one whose square overflows (|g| >= 1.8e19 in float32),
    which would make the FIM inf and freeze the tensor (docs/design.md, section 6).
    """
    device = grads[0].device if grads else (found_inf.device if found_inf is not None else "cpu")
    flag = torch.zeros((), dtype=torch.float32, device=device)
    for grad in grads:
        compute = _compute_dtype(grad)
        g = grad.to(compute) * _multiplier(grad_scale, False, compute, grad.device)
        bad = (~torch.isfinite(g * g)).any()
        flag = torch.maximum(flag, bad.to(device=device, dtype=torch.float32))
    if found_inf is not None:
        seen = (found_inf.reshape(()) != 0).to(device=device, dtype=torch.float32)
        flag = torch.maximum(flag, seen)
    return flag


def b2hat(beta2: float, t: Tensor) -> Tensor:
    """beta2 (1 - beta2^(t-1)) / (1 - beta2^t) in float64, for the step count t after the increment."""
    t = t.to(torch.float64)
    return beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t)


# ---- FAdam --------------------------------------------------------------------------------------


def _clip_scale(x: Tensor, clip: float | None, sumsq: Tensor | None = None,
                numel: int | None = None) -> Tensor:
    """max(1, RMS(x) / clip) in float64; 1 when clipping is off or x is empty.

    With `sumsq` and `numel` the RMS is sqrt(sumsq / numel) instead: the sum of squares of x was
    computed elsewhere (a phase A, or the all-reduce of a sharded tensor's sums, scaled to this
    shard's numel by fadam_fused.sharded).

    A non-finite RMS (a NaN or inf in the parameter behind w) counts as infinite: x / s is then 0
    for every finite element and the NaN stays in its own element (docs/design.md, section 6).
    """
    if sumsq is None:
        sumsq, numel = x.to(torch.float64).square().sum(), x.numel()
    if not clip or numel == 0:
        return torch.ones((), dtype=torch.float64, device=x.device)
    rms = (sumsq.to(device=x.device, dtype=torch.float64) / numel).sqrt()
    scale = torch.clamp(rms / clip, min=1.0)
    return torch.where(torch.isfinite(scale), scale, torch.inf)


def _natural(param, grad, fim, step, *, beta2, eps, p, maximize, grad_scale, upcast):
    """The compute dtype, and the step's g, theta, new f, ghat = g / d and w = theta / d in it."""
    compute, g, theta = _inputs(param, grad, maximize=maximize, grad_scale=grad_scale,
                                upcast=upcast)
    f = fim.to(compute)

    bhat = b2hat(beta2, step.to(g.device)).to(compute)
    f = bhat * f + (1 - bhat) * g * g
    d = f**p + eps ** (2 * p)
    return compute, g, theta, f, g / d, theta / d


def _square_sums(ghat: Tensor, w: Tensor) -> Tensor:
    return torch.stack([ghat.to(torch.float64).square().sum(), w.to(torch.float64).square().sum()])


def square_sums(
    param: Tensor,
    grad: Tensor,
    fim: Tensor,
    step: Tensor,
    *,
    beta2: float,
    eps: float,
    p: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    upcast: bool = False,
) -> Tensor:
    """float64 [2]: (sum ghat^2, sum w^2) of this tensor, the two sums its RMS values need.

    For a shard of a sharded parameter: the sums of all shards add up to those of the whole
    tensor, which update_tensor(sums=..., numel=...) then uses. Arguments as in update_tensor.
    """
    _, _, _, _, ghat, w = _natural(param, grad, fim, step, beta2=beta2, eps=eps, p=p,
                                   maximize=maximize, grad_scale=grad_scale, upcast=upcast)
    return _square_sums(ghat, w)


def update_tensor(
    param: Tensor,
    grad: Tensor,
    momentum: Tensor,
    fim: Tensor,
    step: Tensor,
    skip: Tensor,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    clip: float | None,
    weight_decay: float,
    p: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    upcast: bool = False,
    sums: Tensor | None = None,
    numel: int | None = None,
    rounding: Sequence[int] | None = None,
) -> None:
    """One FAdam update of one tensor, in place, unless `skip` (a 0-dim tensor) is nonzero.

    `step` is this tensor's step count already incremented for this step (t >= 1); it is read,
    not written. Math is float32, or float64 with `upcast` or a float64 parameter.

    The two RMS values are over this tensor, unless its sums were computed elsewhere: then from
    `sums` (float64 [2]: sum ghat^2 and sum w^2, see square_sums) over `numel` elements.

    `rounding`: this tensor's [seed, base, inner_local, inner_global] row of the ops' rounding
    list: a bfloat16 parameter and a bfloat16 momentum are then stored by stochastic rounding
    (store_rounded); None: to nearest.
    """
    compute, g, theta, f, ghat, w = _natural(param, grad, fim, step, beta2=beta2, eps=eps, p=p,
                                             maximize=maximize, grad_scale=grad_scale,
                                             upcast=upcast)
    _apply(param, momentum, skip, compute, theta, ghat, w, lr=lr, beta1=beta1, clip=clip,
           weight_decay=weight_decay, sums=sums, numel=numel, rounding=rounding, step=step)
    fim.copy_(torch.where(skip.to(fim.device) != 0, fim, f.to(fim.dtype)))


def _apply(param, momentum, skip, compute, theta, ghat, w, *, lr, beta1, clip, weight_decay,
           sums=None, numel=None, rounding=None, step=None) -> None:
    """The clipped momentum and parameter update from ghat and w (shared by FAdam and
    FAdafactor, which differ only in f); writes `param` and `momentum` unless `skip`."""
    sum_ghat2, sum_w2 = (None, None) if sums is None else sums
    m = momentum.to(compute)
    s1 = _clip_scale(ghat, clip, sum_ghat2, numel).to(compute)
    m = beta1 * m + (1 - beta1) * (ghat / s1)
    s2 = _clip_scale(w, clip, sum_w2, numel).to(compute)
    # reshape(()): an lr of shape (1,) must not broadcast a 0-dim parameter to (1,).
    lr_t = lr.to(device=theta.device, dtype=compute).reshape(()) if isinstance(lr, Tensor) else lr
    theta = theta - lr_t * (m + weight_decay * (w / s2))

    keep = skip.to(param.device) != 0
    store_rounded(param, theta, keep, rounding, step, 0)
    store_rounded(momentum, m, keep, rounding, step, 1)


def store_rounded(dst: Tensor, new: Tensor, keep: Tensor, rounding: Sequence[int] | None,
                  step: Tensor | None, stream: int) -> None:
    """dst <- new (unless `keep`) in dst's dtype: to nearest, or for a bfloat16 dst with a
    `rounding` row [seed, base, inner_local, inner_global] stochastically, element e of dst's
    memory order drawing rounding_bits(seed, step, logical_index(...)[e], stream)."""
    if rounding is None or len(rounding) == 0 or dst.dtype != torch.bfloat16:
        value = new.to(dst.dtype)
    else:
        seed, base, inner_local, inner_global = (int(x) for x in rounding)
        order = (list(range(dst.dim())) if dst.is_contiguous()
                 else sorted(range(dst.dim()), key=lambda d: -dst.stride(d)))
        x = new.expand(dst.shape).permute(order).reshape(-1).to(torch.float32)
        index = logical_index(x.numel(), base, inner_local, inner_global, x.device)
        bits = rounding_bits(seed, step, index, stream)
        permuted = [dst.shape[d] for d in order]
        inverse = [order.index(d) for d in range(dst.dim())]
        value = round_bf16_stochastic(x, bits).view(permuted).permute(inverse)
    dst.copy_(torch.where(keep, dst, value))


# ---- FAdafactor (the paper's Algorithm 2) -------------------------------------------------------


def is_factored(param: Tensor) -> bool:
    """FAdafactor factors the FIM of parameters with 2 or more dims; fewer keep FAdam's full f."""
    return param.dim() >= 2


def factor_sums(g: Tensor) -> tuple[Tensor, Tensor]:
    """float64 row sums (..., n) and column sums (..., m) of g^2, squared in float64 from the
    compute-dtype g (as the kernels: finite for every finite float32 g)."""
    g2 = g.to(torch.float64).square()
    return g2.sum(-1), g2.sum(-2)


def new_factors(fim_row: Tensor, fim_col: Tensor, row_sums: Tensor, col_sums: Tensor,
                step: Tensor, *, beta2: float, compute: torch.dtype
                ) -> tuple[Tensor, Tensor, Tensor]:
    """The new R, C and R / sum R in the compute dtype, from the old R, C and this step's float64
    sums of g^2: each EMA in float64 and rounded once (fadam::factor_update), R / sum R from the
    float64 sum of the rounded R, 0 where that sum is 0 (fadam::row_norm)."""
    bhat = b2hat(beta2, step.to(row_sums.device))
    rows = (bhat * fim_row.to(torch.float64) + (1 - bhat) * row_sums).to(compute)
    cols = (bhat * fim_col.to(torch.float64) + (1 - bhat) * col_sums).to(compute)
    total = rows.to(torch.float64).sum(-1, keepdim=True)
    positive = total > 0
    row_norm = torch.where(positive, rows.to(torch.float64) / torch.where(positive, total, 1), 0)
    return rows, cols, row_norm.to(compute)


def _factored_f(row_norm: Tensor, cols: Tensor) -> Tensor:
    """f_ij = (R_i / sum R) C_j (fadam::factored_fim)."""
    return row_norm[..., :, None] * cols[..., None, :]


def factored_fim(param: Tensor, grad: Tensor, fim_row: Tensor, fim_col: Tensor, step: Tensor, *,
                 beta2: float, maximize: bool, grad_scale: Tensor | None = None,
                 upcast: bool = False) -> tuple[torch.dtype, Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""The compute dtype, g, theta, the new row and column sums R, C and the factored f.

    For a parameter of shape (..., n, m) (leading dims batched: each (n, m) matrix has its own R
    and C), with :math:`\hat\beta_2` as in FAdam:

    .. math::
        R_i &\leftarrow \hat\beta_2 R_i + (1 - \hat\beta_2) \sum_j g_{ij}^2, \qquad
        C_j \leftarrow \hat\beta_2 C_j + (1 - \hat\beta_2) \sum_i g_{ij}^2 \\
        f_{ij} &= \frac{R_i}{\sum_k R_k} C_j \quad (0 \text{ where } \textstyle\sum_k R_k = 0)

    Sums, not means (docs/design.md, section 8). R_i / sum R <= 1 is taken first: R_i C_j
    overflows float32 where f itself does not. An all-zero gradient at step 1 gives R = 0 and so
    f = 0, never 0 / 0; f is then d = eps^(2p) as for FAdam.
    """
    compute, g, theta = _inputs(param, grad, maximize=maximize, grad_scale=grad_scale,
                                upcast=upcast)
    rows, cols, row_norm = new_factors(fim_row, fim_col, *factor_sums(g), step, beta2=beta2,
                                       compute=compute)
    return compute, g, theta, rows, cols, _factored_f(row_norm, cols)


def fadafactor_update_tensor(param: Tensor, grad: Tensor, momentum: Tensor, fim_row: Tensor,
                             fim_col: Tensor, step: Tensor, skip: Tensor, *, beta2: float,
                             eps: float, p: float, maximize: bool,
                             grad_scale: Tensor | None = None, upcast: bool = False,
                             **update) -> None:
    """One FAdafactor update of one parameter of 2 or more dims, in place, unless `skip`.

    `fim_row` has shape param.shape[:-1] (R), `fim_col` param.shape[:-2] + param.shape[-1:]
    (C). Then d, ghat, the clip scales, m, w and theta exactly as FAdam (update_tensor, whose
    arguments these are: `update` holds lr, beta1, clip and weight_decay); parameters of fewer
    dims are updated by update_tensor itself.
    """
    compute, g, theta, rows, cols, f = factored_fim(
        param, grad, fim_row, fim_col, step, beta2=beta2, maximize=maximize,
        grad_scale=grad_scale, upcast=upcast)
    d = f**p + eps ** (2 * p)
    _apply(param, momentum, skip, compute, theta, g / d, theta / d, **update)
    keep = skip.to(param.device) != 0
    fim_row.copy_(torch.where(keep, fim_row, rows.to(fim_row.dtype)))
    fim_col.copy_(torch.where(keep, fim_col, cols.to(fim_col.dtype)))


def fadam_reference(
    params: list[Tensor],
    grads: list[Tensor],
    momentums: list[Tensor],
    fims: list[Tensor],
    state_steps: list[Tensor],
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    upcast: bool = False,
    **hyper,
) -> Tensor:
    """One whole FAdam step over a list of tensors; returns the skip flag (0-dim float32 tensor).

    `hyper` are FAdam's hyperparameters as update_tensor takes them (lr, beta1, beta2, eps, clip,
    weight_decay, p, maximize). Steps are incremented (unless the step is skipped); every tensor
    is updated in place.
    """
    skip = nonfinite_flag(grads, found_inf, grad_scale=grad_scale)
    for param, grad, m, f, step in zip(params, grads, momentums, fims, state_steps, strict=True):
        t = step + 1
        update_tensor(param, grad, m, f, t, skip, grad_scale=grad_scale, upcast=upcast, **hyper)
        step.copy_(torch.where(skip.to(step.device) != 0, step, t))
    return skip


# ---- the reference backend: the op contract, one tensor at a time -------------------------------

# Every tensor is one chunk: one partial-sum slot, and one factor tile per matrix.
CHUNK_SIZE = 1 << 62


def _raise_flag(skip: Tensor, flag: Tensor) -> None:
    skip.copy_(torch.maximum(skip, flag.to(skip.device).reshape(skip.shape)))


def _fadam_phase_a(params, grads, fims, steps, partials, skip, grad_scale, *, beta2, eps, p, clip,
                   maximize, chunk_size, fuse_one_chunk) -> None:
    _raise_flag(skip, nonfinite_flag(grads, grad_scale=grad_scale))
    if clip <= 0 or fuse_one_chunk:  # every tensor is one chunk: phase B sums it itself
        return
    for i, (param, grad, fim, step) in enumerate(zip(params, grads, fims, steps)):
        partials[i] = square_sums(param, grad, fim, step, beta2=beta2, eps=eps, p=p,
                                  maximize=maximize, grad_scale=grad_scale)


def _rounding_row(rounding: Sequence[int], i: int) -> Sequence[int] | None:
    return rounding[4 * i:4 * i + 4] if len(rounding) else None


def _fadam_phase_b(params, grads, fims, momentums, steps, partials, skip, grad_scale, lr_tensor,
                   *, lr, beta1, beta2, eps, p, clip, weight_decay, maximize, chunk_size,
                   fuse_one_chunk, rounding=()) -> None:
    lr = lr if lr_tensor is None else lr_tensor
    given = clip > 0 and not fuse_one_chunk
    for i, (param, grad, fim, m, step) in enumerate(zip(params, grads, fims, momentums, steps)):
        update_tensor(param, grad, m, fim, step, skip, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      clip=clip, weight_decay=weight_decay, p=p, maximize=maximize,
                      grad_scale=grad_scale, sums=partials[i] if given else None,
                      numel=param.numel() if given else None,
                      rounding=_rounding_row(rounding, i))


def _fadafactor_phase_s(params, grads, fim_rows, fim_cols, steps, factor_partials, factors, skip,
                        grad_scale, *, beta2, maximize, chunk_size) -> None:
    flag = nonfinite_flag(grads, grad_scale=grad_scale)
    partial_offsets, factor_offsets = op_contract.factor_offsets(params, chunk_size)
    for i, (param, grad, fim_row, fim_col, step) in enumerate(
            zip(params, grads, fim_rows, fim_cols, steps)):
        compute, g, _ = _inputs(param, grad, maximize=maximize, grad_scale=grad_scale,
                                upcast=False)
        row_sums, col_sums = factor_sums(g)
        n, m = param.shape[-2], param.shape[-1]
        if param.numel() > 0:
            # One tile per matrix: its partials are its row sums, then its column sums (an empty
            # matrix has none).
            sums = factor_partials[partial_offsets[i]:partial_offsets[i + 1]].view(-1, n + m)
            sums[:, :n] = row_sums.reshape(-1, n)
            sums[:, n:] = col_sums.reshape(-1, m)
        rows, cols, row_norm = new_factors(fim_row, fim_col, row_sums, col_sums, step,
                                           beta2=beta2, compute=compute)
        for region, value in zip(op_contract.factor_regions(factors, factor_offsets[i], param.shape),
                                 (rows, cols, row_norm)):
            region.copy_(value)
        # An overflow of a row or column sum is a non-finite event (docs/design.md, section 6).
        overflow = ~(torch.isfinite(rows).all() & torch.isfinite(cols).all())
        flag = torch.maximum(flag, overflow.to(flag.device, torch.float32))
    _raise_flag(skip, flag)


def _factored_natural(param, grad, factors, offset, *, eps, p, maximize, grad_scale):
    compute, g, theta = _inputs(param, grad, maximize=maximize, grad_scale=grad_scale,
                                upcast=False)
    rows, cols, row_norm = op_contract.factor_regions(factors, offset, param.shape)
    d = _factored_f(row_norm.to(compute), cols.to(compute)) ** p + eps ** (2 * p)
    return compute, theta, rows, cols, g / d, theta / d


def _fadafactor_phase_a(params, grads, factors, partials, grad_scale, *, eps, p, clip, maximize,
                        chunk_size, fuse_one_chunk) -> None:
    if clip <= 0 or fuse_one_chunk:
        return
    offsets = op_contract.factor_offsets(params, chunk_size)[1]
    for i, (param, grad) in enumerate(zip(params, grads)):
        *_, ghat, w = _factored_natural(param, grad, factors, offsets[i], eps=eps, p=p,
                                        maximize=maximize, grad_scale=grad_scale)
        partials[i] = _square_sums(ghat, w)


def _fadafactor_phase_b(params, grads, fim_rows, fim_cols, momentums, steps, factors, partials,
                        skip, grad_scale, lr_tensor, *, lr, beta1, eps, p, clip, weight_decay,
                        maximize, chunk_size, fuse_one_chunk, rounding=()) -> None:
    lr = lr if lr_tensor is None else lr_tensor
    given = clip > 0 and not fuse_one_chunk
    offsets = op_contract.factor_offsets(params, chunk_size)[1]
    keep = skip.reshape(()) != 0
    for i, (param, grad, fim_row, fim_col, m) in enumerate(
            zip(params, grads, fim_rows, fim_cols, momentums)):
        compute, theta, rows, cols, ghat, w = _factored_natural(
            param, grad, factors, offsets[i], eps=eps, p=p, maximize=maximize,
            grad_scale=grad_scale)
        _apply(param, m, skip, compute, theta, ghat, w, lr=lr, beta1=beta1, clip=clip,
               weight_decay=weight_decay, sums=partials[i] if given else None,
               numel=param.numel() if given else None, rounding=_rounding_row(rounding, i),
               step=steps[i])
        fim_row.copy_(torch.where(keep, fim_row, rows.to(fim_row.dtype)))
        fim_col.copy_(torch.where(keep, fim_col, cols.to(fim_col.dtype)))


FADAM_OPS = op_contract.PhaseOps("reference", _fadam_phase_a, _fadam_phase_b, CHUNK_SIZE)
FADAFACTOR_OPS = op_contract.FactoredOps("reference", _fadafactor_phase_s, _fadafactor_phase_a,
                                         _fadafactor_phase_b, CHUNK_SIZE)


# ---- AdaFisher (Gomes et al., ICLR 2025) --------------------------------------------------------


def memory_order(t: Tensor) -> Tensor:
    """A dense tensor as a contiguous view of its dims permuted into memory order (a
    channels_last tensor's dims as (N, H, W, C)): flattening it walks memory in order."""
    if t.is_contiguous():
        return t
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order)


def adafisher_fim(shape, factors: Tensor, s_offset: int, h_offset: int, cols: int,
                  damping: float, compute: torch.dtype) -> Tensor | float:
    """F in memory order for a tensor of `shape` ([note: the AdaFisher op contract]): the flat
    S[e / cols] H[e % cols] + damping, or 1 (cols == 0: a parameter of no supported layer)."""
    if cols == 0:
        return 1.0
    numel = 1
    for size in shape:
        numel *= size
    rows = numel // cols
    s = factors[s_offset:s_offset + rows].to(compute)
    h = factors[h_offset:h_offset + cols].to(compute)
    return (s[:, None] * h[None, :]).reshape(-1) + damping


def adafisher_update_tensor(param: Tensor, grad: Tensor, momentum: Tensor, step: Tensor,
                            skip: Tensor, fim: Tensor | float, *, lr: float | Tensor,
                            beta: float, weight_decay: float, decoupled: bool, maximize: bool,
                            grad_scale: Tensor | None = None, upcast: bool = False,
                            rounding: Sequence[int] | None = None) -> None:
    """One AdaFisher (or, `decoupled`, AdaFisherW) update of one tensor, in place, unless `skip`.

    `fim` is F flattened in the parameter's memory order (adafisher_fim), or 1; `step` is t after
    the increment. The order of operations is the published implementation's:
    AdaFisher   m = beta m + (1 - beta) (g + wd theta),  theta = theta - (lr / bc) (m / F)
    AdaFisherW  m = beta m + (1 - beta) g,               theta = theta - lr (m / bc / F + wd theta)
    with bc = 1 - beta^t in float64. `rounding`: this tensor's row of the op's rounding list, as
    update_tensor's (a bfloat16 theta and a bfloat16 m stored by stochastic rounding).
    """
    compute, g, theta = _inputs(memory_order(param), memory_order(grad), maximize=maximize,
                                grad_scale=grad_scale, upcast=upcast)
    g, theta = g.reshape(-1), theta.reshape(-1)
    m = memory_order(momentum).to(compute).reshape(-1)
    bc = 1 - beta ** step.to(device=theta.device, dtype=torch.float64)
    lr_t = lr.to(device=theta.device, dtype=torch.float64).reshape(()) if isinstance(
        lr, Tensor) else lr
    if decoupled:
        m = beta * m + (1 - beta) * g
        theta = theta - (lr_t * (m / bc.to(compute) / fim + weight_decay * theta)).to(compute)
    else:
        m = beta * m + (1 - beta) * (g + weight_decay * theta)
        theta = theta - (lr_t / bc).to(compute) * (m / fim)
    keep = skip.to(param.device).reshape(()) != 0
    for stream, (dst, new) in enumerate(((param, theta), (momentum, m))):
        view = memory_order(dst)  # contiguous: its flat order is dst's memory order
        store_rounded(view, new.view(view.shape), keep, rounding, step, stream)


def _nonfinite_check(grads, skip, grad_scale) -> None:
    _raise_flag(skip, nonfinite_flag(grads, grad_scale=grad_scale))


def _adafisher_update(params, grads, momentums, steps, factors, factor_layout, skip, grad_scale,
                      lr_tensor, *, lr, beta, weight_decay, damping, decoupled, maximize,
                      chunk_size, rounding=()) -> None:
    lr = lr if lr_tensor is None else lr_tensor
    for i, (param, grad, m, step) in enumerate(zip(params, grads, momentums, steps)):
        s_offset, h_offset, cols = factor_layout[3 * i:3 * i + 3]
        compute = _compute_dtype(param)
        fim = adafisher_fim(param.shape, factors, s_offset, h_offset, cols, damping, compute)
        adafisher_update_tensor(param, grad, m, step, skip, fim, lr=lr, beta=beta,
                                weight_decay=weight_decay, decoupled=decoupled,
                                maximize=maximize, grad_scale=grad_scale,
                                rounding=_rounding_row(rounding, i))


ADAFISHER_OPS = op_contract.AdaFisherOps("reference", _nonfinite_check, _adafisher_update,
                                         CHUNK_SIZE)


class AdaFisherReference:
    """The AdaFisher algorithm in float64 (or any dtype), one layer and one parameter at a time,
    written for clarity: the oracle of fadam_fused.AdaFisher ([note: AdaFisher factors] in
    adafisher.py; docs/design.md, section 10).

    It measures its own factors with its own hooks, the way the published implementation does
    (a conv's H through an im2col copy of the input, torch.nn.functional.unfold), with the rules
    this library documents: the calls of one step give one factor update (their mean), pairing
    by ownership, F = 1 outside supported layers. ``step()`` then updates every parameter with
    a gradient, one at a time. No fused kernel, no engine: a second, independent implementation.
    """

    LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.LayerNorm)

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, beta: float = 0.9,
                 weight_decay: float = 0.0, damping: float = 1e-3,
                 gammas: tuple[float, float] = (0.92, 0.008), update_interval: int = 100,
                 decoupled: bool = False) -> None:
        self.lr, self.beta, self.weight_decay, self.damping = lr, beta, weight_decay, damping
        self.gammas, self.update_interval, self.decoupled = gammas, update_interval, decoupled
        self.params = [p for p in model.parameters()]
        self.momentum = {p: torch.zeros_like(p) for p in self.params}
        self.steps = {p: 0 for p in self.params}
        self.calls = 0  # step() calls so far
        self.H: dict[torch.nn.Module, Tensor] = {}
        self.S: dict[torch.nn.Module, Tensor] = {}
        self.seen: dict[torch.nn.Module, list[tuple[Tensor, Tensor]]] = {}
        self.owner: dict[int, tuple[torch.nn.Module, str]] = {}
        for module in model.modules():
            if isinstance(module, self.LAYERS) and module.weight is not None:
                if isinstance(module, torch.nn.BatchNorm2d) and module.bias is None:
                    continue
                if isinstance(module, torch.nn.LayerNorm) and len(module.normalized_shape) != 1:
                    continue
                for role in ("weight", "bias"):
                    p = getattr(module, role)
                    if p is not None:
                        self.owner.setdefault(id(p), (module, role))
                self.seen[module] = []
                module.register_forward_hook(self._keep_input)

    def _keep_input(self, module, args, output):
        if self.calls % self.update_interval or not torch.is_grad_enabled():
            return
        x = args[0].detach()
        output.register_hook(lambda g: self.seen[module].append((x, g.detach())))

    # The factors of one call, as the published implementation computes them.
    @staticmethod
    def factors(module: torch.nn.Module, x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        nn = torch.nn
        if isinstance(module, nn.Linear):
            h = x.reshape(-1, x.shape[-1])
            if module.bias is not None:
                h = torch.cat([h, h.new_ones(h.shape[0], 1)], 1)
            s = s.reshape(-1, s.shape[-1])
            return (h * h).sum(0) / h.shape[0], (s * s).sum(0) / s.shape[0]
        if isinstance(module, nn.Conv2d):
            if x.dim() == 3:
                x, s = x.unsqueeze(0), s.unsqueeze(0)
            x = nn.functional.pad(x, module._reversed_padding_repeated_twice,
                                  mode="constant" if module.padding_mode == "zeros"
                                  else module.padding_mode)
            patches = nn.functional.unfold(x, module.kernel_size, module.dilation, 0,
                                           module.stride)  # (B, C kh kw, L): im2col
            b, _, positions = patches.shape
            g = module.groups
            patches = patches.view(b, g, -1, positions).permute(0, 1, 3, 2)
            h = patches.reshape(b * g * positions, -1)  # rows: batch, group, position
            if module.bias is not None:
                h = torch.cat([h, h.new_ones(h.shape[0], 1)], 1)
            s = s.permute(0, 2, 3, 1).reshape(-1, s.shape[1])
            return (h * h).sum(0) / h.shape[0], (s * s).sum(0) / s.shape[0]
        if isinstance(module, nn.BatchNorm2d):
            spatial = x.shape[2] * x.shape[3]
            sum_h = x.sum((0, 2, 3))[:, None] / spatial ** 2
            h_bar = torch.cat([sum_h, torch.ones_like(sum_h)], 1)
            sum_s = s.sum((0, 2, 3))
            return (h_bar * h_bar).sum(0) / x.shape[0] ** 2, sum_s * sum_s / s.shape[0]
        dims = [d for d in range(x.dim()) if d != 1]  # LayerNorm
        norm = 1
        for d in dims[1:]:
            norm *= x.shape[d]
        sum_h = x.sum(dims)[:, None] / norm ** 2
        h_bar = torch.cat([sum_h, torch.ones_like(sum_h)], 1)
        sum_s = s.sum(tuple(range(s.dim() - 1)))
        return (h_bar * h_bar).sum(0) / x.shape[0] ** 2, sum_s * sum_s / s.shape[0]

    @staticmethod
    def minmax(x: Tensor) -> Tensor:
        x = x.clone()
        x[x == float("inf")] = 1.0
        x[x == float("-inf")] = 0.0
        return (x - x.min()) / (x.max() - x.min() + 1e-6)

    def F(self, param: Tensor) -> Tensor | float:
        """F of `param`: S H^T + damping in the shape of the parameter, or 1."""
        owned = self.owner.get(id(param))
        if owned is None:
            return 1.0
        module, role = owned
        full = torch.outer(self.S[module], self.H[module]) + self.damping  # (out, in [+ 1])
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
            return full[:, 0] if role == "weight" else full[:, 1]
        if role == "bias":
            return full[:, -1]
        return full[:, :param[0].numel()].reshape(param.shape)

    @torch.no_grad()
    def step(self) -> None:
        if self.calls % self.update_interval == 0:
            g1, g2 = self.gammas
            for module, calls in self.seen.items():
                if module not in self.H:  # the running factors start at 1
                    weight = module.weight
                    h_len = (2 if weight.dim() == 1 else
                             weight[0].numel() + (module.bias is not None))
                    self.H[module] = torch.ones(h_len, dtype=weight.dtype)
                    self.S[module] = torch.ones(weight.shape[0], dtype=weight.dtype)
                if not calls:
                    continue
                pairs = [self.factors(module, x, s) for x, s in calls]
                h_new = sum(p[0] for p in pairs) / len(pairs)
                s_new = sum(p[1] for p in pairs) / len(pairs)
                self.H[module] = (1 - g1) * self.H[module] + g2 * self.minmax(h_new)
                self.S[module] = (1 - g1) * self.S[module] + g2 * self.minmax(s_new)
                calls.clear()
        for param in self.params:
            if param.grad is None:
                continue
            self.steps[param] += 1
            g, m, wd = param.grad, self.momentum[param], self.weight_decay
            bc = 1 - self.beta ** self.steps[param]
            f = self.F(param)
            if self.decoupled:
                m.mul_(self.beta).add_(g, alpha=1 - self.beta)
                param.sub_(self.lr * (m / bc / f + wd * param))
            else:
                m.mul_(self.beta).add_(g + wd * param, alpha=1 - self.beta)
                param.add_(m / f, alpha=-self.lr / bc)
        self.calls += 1


# ---- bfloat16 stochastic rounding ---------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mul32(a: Tensor, b: int) -> Tensor:
    """(a * b) mod 2^32 for int64 tensors of uint32 values, without int64 overflow: the 16-bit
    halves of a times b stay below 2^48."""
    low, high = a & 0xFFFF, a >> 16
    return (low * b + (((high * b) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser (op_contract's [note: stochastic rounding])."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def rounding_bits(seed: int, step: Tensor, index: Tensor, stream: int) -> Tensor:
    """16 random bits (int64 in [0, 65536)) per element, from (seed, step, the element's index in
    the logical tensor, stream: 0 the parameter, 1 the momentum), as every backend draws them."""
    h = torch.full_like(index, seed & _MASK32)
    t = step.to(device=index.device, dtype=torch.int64).reshape(()) & _MASK32
    pair = index >> 1
    h = _fmix32(h ^ t)
    h = _fmix32(h ^ (pair >> 32) ^ ((stream * 0x9E3779B9) & _MASK32))
    h = _fmix32(h ^ (pair & _MASK32))
    return torch.where((index & 1) == 0, h & 0xFFFF, h >> 16)


def logical_index(numel: int, base: int, inner_local: int, inner_global: int,
                  device: torch.device) -> Tensor:
    """The logical index of each element of a tensor's local block in memory order: base +
    (e // inner_local) * inner_global + e % inner_local (op_contract's [note: stochastic
    rounding]; a whole tensor: base 0, inner_local = inner_global)."""
    e = torch.arange(numel, dtype=torch.int64, device=device)
    if inner_local <= 0:
        return e + base
    return base + (e // inner_local) * inner_global + e % inner_local


def round_bf16_stochastic(x: Tensor, bits: Tensor) -> Tensor:
    """float32 `x` to bfloat16, rounding the magnitude up with probability equal to the
    fraction of a bfloat16 ulp that x lies above its truncation: the 16 random `bits` are added
    to x's low 16 bits and the sum truncated. NaN and inf round to nearest (unchanged)."""
    x = x.to(torch.float32)
    u = x.view(torch.int32).to(torch.int64) & _MASK32
    rounded = ((u + bits) & _MASK32) >> 16 << 16
    rounded = torch.where(rounded >= 1 << 31, rounded - (1 << 32), rounded).to(torch.int32)
    out = rounded.view(torch.float32).to(torch.bfloat16)
    return torch.where(torch.isfinite(x), out, x.to(torch.bfloat16))
