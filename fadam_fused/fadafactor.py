"""FAdafactor (Hwang 2024, Algorithm 2): FAdam with a factored FIM, as a member of the family.

Parameters of 2 or more dims are of the factored kind (``fim_row`` / ``fim_col`` state, a bucket
of two stages: phase S, then phase A, then the update phase B: the three ops of [note: the
FAdafactor op contract] in op_contract.py); the others are FAdam's kind. Validation, the
one-step run with its non-finite skip, GradScaler, skipped_steps and load_state_dict are the
engine's and the shell's (optimizer.FisherOptimizer).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import backends, engine, op_contract, reference, sharded
from .engine import Bucket, Kind
from .fadam import KIND as FADAM
from .hyper import Hyper
from .optimizer import FisherOptimizer

__all__ = ["FAdafactor", "KIND"]


def factored_state_shapes(param: Tensor) -> dict[str, torch.Size]:
    """The float32 state tensors (besides ``step``) of a factored parameter, shape (..., n, m)."""
    shape = param.shape
    return {"momentum": shape, "fim_row": shape[:-1], "fim_col": shape[:-2] + shape[-1:]}


class FactoredBucket(Bucket):
    """Parameters of 2 or more dims with a factored FIM that one backend steps together.

    [note: sharded FAdafactor]
    On DTensor parameters ([note: sharded parameters] in sharded.py) R and C are sums over the
    logical matrix: a rank's phase S sums g^2 over its own block only. For every tensor whose
    matrices are split (a placement that shards dim -2 or -1), the bucket hands the engine, after
    phase S, each matrix's float64 row sums (added up over the mesh dims that split its columns),
    column sums (over those that split its rows), and two totals for sum R: the old R of its rows
    (over the row-splitting dims) and the sum of g^2 (over both). The new R, C and R / sum R of
    the rank's rows and columns are then computed here from the reduced sums with the kernels'
    rounding (fadam::factor_update, fadam::row_norm: each in float64, rounded once), with sum R
    = b2hat sum(R_old) + (1 - b2hat) sum(g^2) in float64 (the one-process kernel adds the rounded
    R instead: a relative difference of about 1e-7). Tensors split only on leading (batch) dims
    need no exchange: each matrix is whole on its rank. A row or column sum that overflows
    raises the skip flag before phase A, and the flag travels in the second all-reduce (the RMS
    sums, or the flag alone with clipping off), so every rank agrees. Bytes per tensor per step:
    8 (B (n + m) + 2 B) over the splitting mesh dims, plus FAdam's 16 for the RMS sums.
    """

    stages = 2  # phase S (the factors), then phase A (the RMS sums, with clipping on)

    def __init__(self, backend: str, hyper: Hyper, params: list[Tensor], grads: list[Tensor],
                 states: Sequence[Tensor], shards: sharded.Layout | None) -> None:
        self.ops = backends.factored(backend)
        self.hyper, self.params, self.grads, self.shards = hyper, params, grads, shards
        self.momentums, self.fim_rows, self.fim_cols, self.steps = (
            list(states[k::4]) for k in range(4))
        self.device = params[0].device
        # Scratch between the phases.
        self.factors: Tensor | None = None
        self.partials: Tensor | None = None
        self.overflow: Tensor | None = None  # a sharded bucket's factor overflow (0-dim bool)

    def stage(self, k: int, skip: Tensor, grad_scale: Tensor | None) -> list[sharded.Reduction]:
        h, ops = self.hyper, self.ops
        fuse = self.shards is None
        if k == 0:
            factor_partials, self.factors = op_contract.new_factor_buffers(
                self.params, ops.chunk_size,
                # Only the reference backend takes float64 parameters: its factors keep their
                # precision (the fused kernels' are float32).
                dtype=torch.float64 if self.params[0].dtype == torch.float64 else torch.float32)
            ops.phase_s(self.params, self.grads, self.fim_rows, self.fim_cols, self.steps,
                        factor_partials, self.factors, skip, grad_scale, beta2=h.beta2,
                        maximize=h.maximize, chunk_size=ops.chunk_size)
            return [] if fuse else [self._factor_reduction(factor_partials)]
        if self.overflow is not None:
            skip.copy_(torch.maximum(skip, self.overflow.to(skip.dtype)))
            self.overflow = None
        self.partials = engine.new_partials(self.params, ops.chunk_size, self.shards)
        if h.clip > 0:  # without clipping no RMS is needed: phase A has nothing to do
            ops.phase_a(self.params, self.grads, self.factors, self.partials, grad_scale,
                        eps=h.eps, p=h.p, clip=h.clip, maximize=h.maximize,
                        chunk_size=ops.chunk_size, fuse_one_chunk=fuse)
        if fuse:
            return []
        if h.clip > 0:
            return [sharded.slot_reduction(self.partials, ops.chunk_size, self.shards)]
        return [sharded.flag_reduction(self.shards)]

    def _factor_reduction(self, factor_partials: Tensor) -> sharded.Reduction:
        """The sums of [note: sharded FAdafactor], as one Reduction whose ``done`` writes the
        factors of the split tensors."""
        layout, chunk = self.shards, self.ops.chunk_size
        split = []  # (tensor index, mesh, row-splitting dims, column-splitting dims)
        for i in range(len(self.params)):
            rows = layout.mesh_dims_splitting(i, [-2])
            cols = layout.mesh_dims_splitting(i, [-1])
            if rows or cols:
                split.append((i, layout.meshes[i], rows, cols))
        red = sharded.layout_reduction(layout)
        if not split:
            return red
        sums = op_contract.factor_sums(factor_partials, self.params, chunk)
        row_sums = [sums[i][0].reshape(-1) for i, *_ in split]
        col_sums = [sums[i][1].reshape(-1) for i, *_ in split]
        old_totals = [self.fim_rows[i].to(torch.float64).reshape(sums[i][0].shape).sum(-1)
                      for i, *_ in split]
        g2_totals = [sums[i][0].sum(-1) for i, *_ in split]
        parts = row_sums + col_sums + old_totals + g2_totals
        red.values = torch.cat(parts)
        # Segments in the order of `parts`: each tensor's four sums with their mesh dims.
        offset = 0
        for group, dims_of in ((row_sums, lambda r, c: c), (col_sums, lambda r, c: r),
                               (old_totals, lambda r, c: r),
                               (g2_totals, lambda r, c: tuple(sorted(set(r) | set(c))))):
            for values, (_, mesh, rows, cols) in zip(group, split):
                red.segment(offset, offset + values.numel(),
                            sharded.groups_of(mesh, dims_of(rows, cols)))
                offset += values.numel()
        sizes = [t.numel() for t in parts]
        red.done = lambda total: self._write_factors(split, sums, total.split(sizes))
        return red

    def _write_factors(self, split, sums, totals) -> None:
        """The new R, C and R / sum R of the split tensors from their reduced sums."""
        beta2, count = self.hyper.beta2, len(split)
        overflow = torch.zeros((), dtype=torch.bool, device=self.device)
        offsets = op_contract.factor_offsets(self.params, self.ops.chunk_size)[1]
        for j, (i, *_) in enumerate(split):
            row_sum, col_sum, old_total, g2_total = (totals[j + q * count] for q in range(4))
            param = self.params[i]
            regions = op_contract.factor_regions(self.factors, offsets[i], param.shape)
            b = reference.b2hat(beta2, self.steps[i])
            rows = (b * self.fim_rows[i].to(torch.float64).reshape(-1) + (1 - b) * row_sum)
            cols = (b * self.fim_cols[i].to(torch.float64).reshape(-1) + (1 - b) * col_sum)
            rows, cols = rows.to(regions[0].dtype), cols.to(regions[1].dtype)
            total = (b * old_total + (1 - b) * g2_total)[:, None]
            rows64 = rows.to(torch.float64).view(total.shape[0], -1)
            positive = total > 0
            row_norm = torch.where(positive, rows64 / torch.where(positive, total, 1), 0)
            regions[0].copy_(rows.view(regions[0].shape))
            regions[1].copy_(cols.view(regions[1].shape))
            regions[2].copy_(row_norm.view(regions[2].shape))
            overflow |= ~(torch.isfinite(rows).all() & torch.isfinite(cols).all())
        self.overflow = overflow

    def update(self, skip: Tensor, grad_scale: Tensor | None) -> None:
        h, ops = self.hyper, self.ops
        lr_tensor, lr = engine.lr_args(h.lr, self.device)
        ops.phase_b(self.params, self.grads, self.fim_rows, self.fim_cols, self.momentums,
                    self.steps, self.factors, self.partials, skip, grad_scale, lr_tensor, lr=lr,
                    beta1=h.beta1, eps=h.eps, p=h.p, clip=h.clip, weight_decay=h.weight_decay,
                    maximize=h.maximize, chunk_size=ops.chunk_size,
                    fuse_one_chunk=self.shards is None, rounding=list(h.rounding))
        if self.shards is not None:
            # A rank whose block of a split matrix is empty (FSDP2's last rows) still holds R or
            # C for its rows or columns: kept in step with the other ranks' copies here (the ops
            # have no element to update, and may write no factor).
            keep = skip.reshape(()) != 0
            offsets = op_contract.factor_offsets(self.params, ops.chunk_size)[1]
            for i, param in enumerate(self.params):
                if param.numel() == 0:
                    rows, cols, _ = op_contract.factor_regions(self.factors, offsets[i],
                                                               param.shape)
                    for state, new in ((self.fim_rows[i], rows), (self.fim_cols[i], cols)):
                        state.copy_(torch.where(keep, state, new.reshape(state.shape)))
        self.factors = self.partials = None


def _factor_placements(param: Tensor, drop: int) -> tuple:
    """The placements of a factor of DTensor `param` that sums over tensor dim `drop` (-1: R, -2:
    C): a mesh dim that shards the dropped dim holds whole sums of it (Replicate); dims after it
    move one down; leading (batch) dims keep their placement."""
    from torch.distributed.tensor import Replicate, Shard

    try:  # FSDP2 over tensor parallel shards one dim twice, the outer one strided
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:
        _StridedShard = ()

    def moved(pl, dim):
        if isinstance(pl, _StridedShard):
            return _StridedShard(dim, split_factor=pl.split_factor)
        return Shard(dim)

    ndim, drop = param.ndim, drop % param.ndim
    out = []
    for pl in param.placements:
        dim = getattr(pl, "dim", None)
        if pl.is_replicate() or dim is None:
            out.append(pl)
        elif dim % ndim == drop:
            out.append(Replicate())
        else:
            out.append(moved(pl, dim % ndim - (dim % ndim > drop)))
    return tuple(out)


def _ones_factor(param: Tensor, local_shape, drop: int) -> Tensor:
    """A factor (R or C) of `param` filled with 1, placed like the parameter's rows or columns."""
    with torch.inference_mode(False):
        local = torch.ones(local_shape, dtype=torch.float32, device=param.device)
        if not sharded.is_dtensor(param):
            return local
        shape = list(param.shape)
        del shape[drop]
        stride = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            stride[d] = stride[d + 1] * shape[d + 1]
        return sharded.DTensor.from_local(local, param.device_mesh,
                                          _factor_placements(param, drop), run_check=False,
                                          shape=torch.Size(shape), stride=tuple(stride))


class FactoredKind(Kind):
    """A parameter of 2 or more dims with FAdafactor's state: ``step``, ``momentum``, and the
    row and column sums ``fim_row`` (R, shape[:-1]) and ``fim_col`` (C, shape[:-2] + shape[-1:])."""

    name = "fadafactor"
    state_keys = ("momentum", "fim_row", "fim_col", "step")

    def state_shapes(self, param: Tensor) -> dict[str, torch.Size]:
        return factored_state_shapes(param)

    def new_state(self, param: Tensor) -> dict[str, Tensor]:
        local = sharded.local(param).shape
        return {"step": engine.new_step(param),
                "momentum": engine.new_state_tensor(param, 0.0),
                "fim_row": _ones_factor(param, local[:-1], -1),
                "fim_col": _ones_factor(param, local[:-2] + local[-1:], -2)}

    def unfused_reason(self, param: Tensor) -> str | None:
        # The kernels walk rows of the last dim, so a dense but permuted parameter
        # (channels_last) runs on the reference.
        return None if param.is_contiguous() else "is not contiguous"

    def bucket(self, backend, hyper, params, grads, states, shards, originals) -> Bucket:
        return FactoredBucket(backend, hyper, params, grads, states, shards)


KIND = FactoredKind()


class FAdafactor(FisherOptimizer):
    r"""FAdafactor (Hwang 2024, Algorithm 2): FAdam with an Adafactor-style factored FIM.

    For a parameter of shape :math:`(\dots, n, m)` (2 or more dims; leading dims are a batch of
    matrices, each with its own factors), the diagonal FIM is the rank-1 product of its row and
    column sums of :math:`g^2`:

    .. math::
        R &\leftarrow \hat\beta_2 R + (1 - \hat\beta_2) \textstyle\sum_j g_{:,j}^2, \qquad
        C \leftarrow \hat\beta_2 C + (1 - \hat\beta_2) \textstyle\sum_i g_{i,:}^2 \\
        f_{ij} &= \frac{R_i}{\sum_k R_k} C_j \quad (0 \text{ where } \textstyle\sum_k R_k = 0)

    then :math:`d, \hat g`, the clip scales, :math:`m, w` and :math:`\theta` exactly as
    :class:`FAdam` (whose docstring has them). Parameters of fewer than 2 dims keep FAdam's full
    FIM. :math:`R` and :math:`C` start at 1; at step 1 :math:`\hat\beta_2 = 0`, so the start
    value never counts.

    Same arguments and defaults as :class:`FAdam`: ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
    clip=1.0, weight_decay=1e-3, p=0.5``, ``maximize``, ``backend`` (and, as there, ``clip=None``
    leaves the weight decay unbounded where gradients vanish: one step of an all-zero gradient
    moves a parameter by about ``lr * weight_decay / eps`` times itself). The paper's
    1B-parameter LLM was trained with ``betas=(0.9, 0.99), eps=1e-12, weight_decay=0.1``.

    State per parameter: ``step``, ``momentum`` (float32, like the parameter) and, for 2+ dims,
    ``fim_row`` (R, shape ``param.shape[:-1]``) and ``fim_col`` (C, shape
    ``param.shape[:-2] + param.shape[-1:]``), float32; for fewer dims ``fim``. That is about 4
    bytes per parameter against FAdam's 8.

    Backends: every one of :class:`FAdam`'s (``"cuda"``, ``"triton"``, ``"cpu"``,
    ``"reference"``, chosen the same way) has FAdafactor kernels, and sharded (DTensor) parameters
    (FSDP2, tensor parallel, HSDP) step as the whole logical tensor would: R and C are sums over
    the whole matrix (docs/design.md, section 8). Everything else (the non-finite skip, which also covers a row or column sum that overflows
    float32; GradScaler; no host sync; state_dict moving across backends and devices) is as in
    :class:`FAdam`.
    """

    kinds = (KIND, FADAM)

    @staticmethod
    def kind_of(param: Tensor) -> Kind:
        return KIND if param.dim() >= 2 else FADAM

