"""FAdafactor (Hwang 2024, Algorithm 2): FAdam with a factored FIM, as a member of the family.

Parameters of 2 or more dims are of the factored kind (``fim_row`` / ``fim_col`` state, a bucket
of two stages: phase S, then phase A, then the update phase B: the three ops of [note: the
FAdafactor op contract] in op_contract.py); the others are FAdam's kind. Validation, the
one-step run with its non-finite skip, GradScaler, skipped_steps and load_state_dict are the
engine's and the shell's (optimizer.FisherOptimizer).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from . import backends, engine, op_contract, sharded
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
    """Parameters of 2 or more dims with a factored FIM that one backend steps together."""

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

    def stage(self, k: int, skip: Tensor, grad_scale: Tensor | None) -> list[sharded.Reduction]:
        h, ops = self.hyper, self.ops
        if k == 0:
            factor_partials, self.factors = op_contract.new_factor_buffers(
                self.params, ops.chunk_size,
                # Only the reference backend takes float64 parameters: its factors keep their
                # precision (the fused kernels' are float32).
                dtype=torch.float64 if self.params[0].dtype == torch.float64 else torch.float32)
            ops.phase_s(self.params, self.grads, self.fim_rows, self.fim_cols, self.steps,
                        factor_partials, self.factors, skip, grad_scale, beta2=h.beta2,
                        maximize=h.maximize, chunk_size=ops.chunk_size)
            return []
        self.partials = engine.new_partials(self.params, ops.chunk_size, self.shards)
        if h.clip > 0:  # without clipping no RMS is needed: phase A has nothing to do
            ops.phase_a(self.params, self.grads, self.factors, self.partials, grad_scale,
                        eps=h.eps, p=h.p, clip=h.clip, maximize=h.maximize,
                        chunk_size=ops.chunk_size, fuse_one_chunk=True)
        return []

    def update(self, skip: Tensor, grad_scale: Tensor | None) -> None:
        h, ops = self.hyper, self.ops
        lr_tensor, lr = engine.lr_args(h.lr, self.device)
        ops.phase_b(self.params, self.grads, self.fim_rows, self.fim_cols, self.momentums,
                    self.factors, self.partials, skip, grad_scale, lr_tensor, lr=lr,
                    beta1=h.beta1, eps=h.eps, p=h.p, clip=h.clip, weight_decay=h.weight_decay,
                    maximize=h.maximize, chunk_size=ops.chunk_size, fuse_one_chunk=True)
        self.factors = self.partials = None


class FactoredKind(Kind):
    """A parameter of 2 or more dims with FAdafactor's state: ``step``, ``momentum``, and the
    row and column sums ``fim_row`` (R, shape[:-1]) and ``fim_col`` (C, shape[:-2] + shape[-1:])."""

    name = "fadafactor"
    state_keys = ("momentum", "fim_row", "fim_col", "step")

    def state_shapes(self, param: Tensor) -> dict[str, torch.Size]:
        return factored_state_shapes(param)

    def new_state(self, param: Tensor) -> dict[str, Tensor]:
        state = {"step": engine.new_step(param),
                 "momentum": engine.new_state_tensor(param, 0.0)}
        with torch.inference_mode(False):
            for key, shape in factored_state_shapes(param).items():
                if key != "momentum":
                    state[key] = torch.ones(shape, dtype=torch.float32, device=param.device)
        return state

    def param_refusal(self, who: str, param: Tensor, name: str) -> str | None:
        if sharded.is_dtensor(param):
            return (f"{who} cannot optimize {name}: sharded (DTensor) parameters of 2 or more "
                    "dims are not supported by FAdafactor yet; use FAdam for them")
        return None

    def unfused_reason(self, param: Tensor) -> str | None:
        # The kernels walk rows of the last dim, so a dense but permuted parameter
        # (channels_last) runs on the reference.
        return None if param.is_contiguous() else "is not contiguous"

    def bucket(self, backend, hyper, params, grads, states, shards) -> Bucket:
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
    ``"reference"``, chosen the same way) has FAdafactor kernels. Sharded (DTensor) parameters of
    2 or more dims are not supported yet and are refused when they join the optimizer.
    Everything else (the non-finite skip, which also covers a row or column sum that overflows
    float32; GradScaler; no host sync; state_dict moving across backends and devices) is as in
    :class:`FAdam`.
    """

    kinds = (KIND, FADAM)

    @staticmethod
    def kind_of(param: Tensor) -> Kind:
        return KIND if param.dim() >= 2 else FADAM

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip: float | None = 1.0,
        weight_decay: float = 1e-3,
        p: float = 0.5,
        *,
        maximize: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, clip=clip,
                                      weight_decay=weight_decay, p=p, maximize=maximize,
                                      backend=backend))

