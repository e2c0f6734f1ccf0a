"""FAdafactor (Hwang 2024, Algorithm 2): FAdam with a factored FIM, as a subclass of FAdam.

It changes only what [note: optimizer extension point] in optimizer.py lets a subclass change:
the state (``fim_row`` / ``fim_col`` for parameters of 2 or more dims, FAdam's ``fim`` for the
others), its creation, and the routing, in which factored tensors go to a ``FactoredBucket`` (a
``PhaseRunner`` running the three ops of [note: the FAdafactor op contract] in op_contract.py)
and the others to FAdam's own buckets. Validation, the one-step run with its non-finite skip,
GradScaler, skipped_steps and load_state_dict are FAdam's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from . import backends, op_contract, reference, sharded
from .optimizer import BUCKET_KINDS, FAdam, Hyper, PhaseRunner, _lr_args

__all__ = ["FAdafactor"]

def factored_state_shapes(param: Tensor) -> dict[str, torch.Size]:
    """The float32 state tensors (besides ``step``) FAdafactor keeps for `param`."""
    if not reference.is_factored(param):
        return {"momentum": param.shape, "fim": param.shape}
    shape = param.shape
    return {"momentum": shape, "fim_row": shape[:-1], "fim_col": shape[:-2] + shape[-1:]}


def _param_check(param: Tensor, backend: str | None) -> str | None:
    if sharded.is_dtensor(param):
        return ("sharded (DTensor) parameters are not supported by FAdafactor yet (the row and "
                "column sums would need their own all-reduce); use FAdam")
    return None


class FAdafactor(FAdam):
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
    clip=1.0, weight_decay=1e-3, p=0.5``. The paper's 1B-parameter LLM was trained with
    ``betas=(0.9, 0.99), eps=1e-12, weight_decay=0.1``.

    State per parameter: ``step``, ``momentum`` (float32, like the parameter) and, for 2+ dims,
    ``fim_row`` (R, shape ``param.shape[:-1]``) and ``fim_col`` (C, shape
    ``param.shape[:-2] + param.shape[-1:]``), float32; for fewer dims ``fim``. That is about 4
    bytes per parameter against FAdam's 8.

    Backends: every one of :class:`FAdam`'s (``"cuda"``, ``"triton"``, ``"cpu"``,
    ``"reference"``, chosen the same way) has FAdafactor kernels. Sharded (DTensor) parameters
    are not supported yet.
    Everything else (non-finite skip, GradScaler, no host sync, state_dict moving across
    backends and devices) is as in :class:`FAdam`.
    """

    _param_check = staticmethod(_param_check)
    _state_shapes = staticmethod(factored_state_shapes)

    @staticmethod
    def _new_state(param: Tensor) -> dict[str, Any]:
        state = {"step": torch.zeros((), dtype=torch.float32, device=param.device),
                 "momentum": torch.zeros_like(param, dtype=torch.float32,
                                              memory_format=torch.preserve_format)}
        for key, shape in factored_state_shapes(param).items():
            if key != "momentum":
                state[key] = torch.ones(shape, dtype=torch.float32, device=param.device)
        return state

    @staticmethod
    def _route(param: Tensor, name: str) -> tuple[str, str]:
        if not reference.is_factored(param):
            return name, "fadam"
        # The kernels walk rows of the last dim, so a dense but permuted parameter (channels_last)
        # runs on the reference.
        if not param.is_contiguous():
            name = "reference"
        return name, "factored"


@dataclasses.dataclass
class FactoredBucket(PhaseRunner):
    """Factored tensors of one group, device and dtype that one backend steps together."""

    backend: str  # "reference" or a backend of backends.FACTORED_KERNELS
    hyper: Hyper
    params: list[Tensor] = dataclasses.field(default_factory=list)
    grads: list[Tensor] = dataclasses.field(default_factory=list)
    momentums: list[Tensor] = dataclasses.field(default_factory=list)
    fim_rows: list[Tensor] = dataclasses.field(default_factory=list)
    fim_cols: list[Tensor] = dataclasses.field(default_factory=list)
    steps: list[Tensor] = dataclasses.field(default_factory=list)
    shards: None = None  # sharded parameters are refused (_param_check)
    # Scratch between the phases of a fused backend.
    factors: Tensor | None = None
    partials: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    STATE_KEYS: ClassVar[tuple[str, ...]] = ("momentum", "fim_row", "fim_col", "step")

    def take_state(self, states: Sequence[Tensor]) -> None:
        """Fills the state lists from the parameters' state tensors in STATE_KEYS order."""
        self.momentums, self.fim_rows, self.fim_cols, self.steps = (
            list(states[k::4]) for k in range(4))

    def phase_a(self, skip: Tensor, grad_scale: Tensor | None) -> None:
        h = self.hyper
        if self.backend == "reference":
            skip.copy_(torch.maximum(skip, reference.nonfinite_flag(self.grads)))
            return
        ops = backends.factored(self.backend)
        factor_partials, self.factors = op_contract.new_factor_buffers(self.params,
                                                                        ops.chunk_size)
        ops.phase_s(self.params, self.grads, self.fim_rows, self.fim_cols, self.steps,
                    factor_partials, self.factors, skip, grad_scale, beta2=h.beta2,
                    maximize=h.maximize, chunk_size=ops.chunk_size)
        self.partials = op_contract.new_partials(self.params, ops.chunk_size)
        if h.clip > 0:  # without clipping no RMS is needed: phase A has nothing to do
            ops.phase_a(self.params, self.grads, self.factors, self.partials, grad_scale,
                        eps=h.eps, p=h.p, clip=h.clip, maximize=h.maximize,
                        chunk_size=ops.chunk_size, fuse_one_chunk=True)

    def phase_b(self, skip: Tensor, grad_scale: Tensor | None) -> None:
        h = self.hyper
        if self.backend == "reference":
            for param, grad, m, rows, cols, step in zip(self.params, self.grads, self.momentums,
                                                        self.fim_rows, self.fim_cols, self.steps):
                reference.fadafactor_update_tensor(
                    param, grad, m, rows, cols, step, skip, lr=h.lr, beta1=h.beta1,
                    beta2=h.beta2, eps=h.eps, clip=h.clip, weight_decay=h.weight_decay, p=h.p,
                    maximize=h.maximize, grad_scale=grad_scale)
            return
        ops = backends.factored(self.backend)
        lr_tensor, lr = _lr_args(h.lr, self.device)
        ops.phase_b(self.params, self.grads, self.fim_rows, self.fim_cols, self.momentums,
                    self.factors, self.partials, skip, grad_scale, lr_tensor, lr=lr,
                    beta1=h.beta1, eps=h.eps, p=h.p, clip=h.clip, weight_decay=h.weight_decay,
                    maximize=h.maximize, chunk_size=ops.chunk_size, fuse_one_chunk=True)
        self.factors = self.partials = None


BUCKET_KINDS["factored"] = FactoredBucket
