"""FAdam: its kind (state, bucket, phases), the drop-in optimizer, and the functional form.

A FAdam bucket is one stage and an update: phase A (read-only: the non-finite check and the
per-chunk RMS sums) and phase B (the update), the two ops of [note: the two-phase op contract]
in op_contract.py, on whichever backend's op set the plan chose (the reference's included).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import backends, checks, engine, plan, sharded
from .engine import Bucket, Kind
from .hyper import Hyper, check as check_hyper
from .optimizer import FisherOptimizer, check_backend

__all__ = ["FAdam", "fadam", "KIND"]


class FAdamBucket(Bucket):
    """Tensors with FAdam's full FIM that one backend steps together."""

    stages = 1

    def __init__(self, backend: str, hyper: Hyper, params: list[Tensor], grads: list[Tensor],
                 states: Sequence[Tensor], shards: sharded.Layout | None) -> None:
        self.ops = backends.fused(backend)
        self.hyper, self.params, self.grads, self.shards = hyper, params, grads, shards
        self.momentums, self.fims, self.steps = (list(states[k::3]) for k in range(3))
        self.device = params[0].device
        self.partials: Tensor | None = None

    def stage(self, k: int, skip: Tensor, grad_scale: Tensor | None) -> list[sharded.Reduction]:
        h, ops = self.hyper, self.ops
        self.partials = engine.new_partials(self.params, ops.chunk_size, self.shards)
        ops.phase_a(self.params, self.grads, self.fims, self.steps, self.partials, skip,
                    grad_scale, beta2=h.beta2, eps=h.eps, p=h.p, clip=h.clip, maximize=h.maximize,
                    chunk_size=ops.chunk_size, fuse_one_chunk=self.shards is None)
        if self.shards is None:
            return []
        if h.clip > 0:
            return [sharded.slot_reduction(self.partials, ops.chunk_size, self.shards)]
        return [sharded.flag_reduction(self.shards)]

    def update(self, skip: Tensor, grad_scale: Tensor | None) -> None:
        h, ops = self.hyper, self.ops
        lr_tensor, lr = engine.lr_args(h.lr, self.device)
        ops.phase_b(self.params, self.grads, self.fims, self.momentums, self.steps, self.partials,
                    skip, grad_scale, lr_tensor, lr=lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps,
                    p=h.p, clip=h.clip, weight_decay=h.weight_decay, maximize=h.maximize,
                    chunk_size=ops.chunk_size, fuse_one_chunk=self.shards is None,
                    rounding=list(h.rounding))
        self.partials = None


class FAdamKind(Kind):
    """A parameter with FAdam's state: ``step``, ``momentum`` and a full ``fim``."""

    name = "fadam"
    state_keys = ("momentum", "fim", "step")

    def state_shapes(self, param: Tensor) -> dict[str, torch.Size]:
        return {"momentum": param.shape, "fim": param.shape}

    def new_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"step": engine.new_step(param),
                "momentum": engine.new_state_tensor(param, 0.0),
                "fim": engine.new_state_tensor(param, 1.0)}

    def bucket(self, backend, hyper, params, grads, states, shards, originals) -> Bucket:
        return FAdamBucket(backend, hyper, params, grads, states, shards)


KIND = FAdamKind()


class FAdam(FisherOptimizer):
    r"""FAdam (Hwang 2024): Adam as a natural gradient optimizer, with fused kernels.

    .. math::
        t &\leftarrow t + 1, \qquad
        \hat\beta_2 = \beta_2 \frac{1 - \beta_2^{t-1}}{1 - \beta_2^{t}} \\
        f &\leftarrow \hat\beta_2 f + (1 - \hat\beta_2)\, g^2, \qquad d = f^{p} + \epsilon^{2p} \\
        \hat g &= g / d, \qquad m \leftarrow \beta_1 m + (1 - \beta_1)\,
            \frac{\hat g}{\max(1, \mathrm{RMS}(\hat g) / c)} \\
        w &= \theta / d, \qquad \theta \leftarrow \theta - \eta \left(m + \lambda\,
            \frac{w}{\max(1, \mathrm{RMS}(w) / c)}\right)

    RMS is over all elements of one parameter tensor. The momentum is not bias-corrected; the FIM
    starts at 1 and its EMA is bias-corrected Adafactor-style (so ``f = g^2`` after step 1).

    Args:
        params: parameters or param groups (dicts), as for any torch.optim optimizer; named
            parameters (``model.named_parameters()``) give errors that name them.
        lr (float or Tensor, default 1e-3): learning rate :math:`\eta`. A 0-dim tensor lets
            ``torch.compile(opt.step)`` reuse one graph while a scheduler changes it (a float lr
            is a constant of the compiled graph: every new value recompiles).
        betas (tuple, default (0.9, 0.999)): momentum and FIM EMA coefficients.
        eps (float, default 1e-8): :math:`\epsilon`. The paper recommends 1e-15 for LLM-scale
            models; values down to 1e-30 are safe at p = 0.5 (the RMS sums are overflow-safe).
            ``eps**(2p)`` must be a normal float32 (>= 1.2e-38); smaller values are refused.
        clip (float or None, default 1.0): :math:`c`, the RMS clip threshold; None or 0 turns the
            clipping of the natural gradient and of the weight decay off. Without clipping the
            weight decay :math:`\lambda\theta / d` is not bounded: where the gradient has been
            zero, :math:`d \approx \epsilon`, and one step moves a parameter by about
            :math:`\eta \lambda \theta / \epsilon` (the paper's rule; with the defaults and
            ``clip=None``, one step of an all-zero gradient multiplies a parameter by about
            -99). Keep clipping on, or set ``weight_decay=0``, where gradients can vanish.
        weight_decay (float, default 1e-3): :math:`\lambda`, applied as a natural gradient.
        p (float, default 0.5): the FIM exponent; 0.5 divides by the square root like Adam.
        maximize (bool, default False): maximize the objective (the gradient is negated in the
            kernel; ``p.grad`` is never changed).
        backend (str or None, default None): ``"cuda"``, ``"triton"``, ``"cpu"`` (fused C++),
            ``"reference"`` (the plain-PyTorch oracle), or None to pick the fastest available for
            each device. The group stores this request, never the resolved choice, so a checkpoint
            moves between machines.
        bf16_rounding (str, default "nearest"): how a bfloat16 parameter (and a bfloat16
            momentum) is written: "nearest" rounds to nearest even, as torch; "stochastic" rounds
            up with probability equal to the fraction of an ulp the float32 result lies above
            the truncation, so the expected stored value is the float32 one and updates below
            half an ulp are not lost: bfloat16 training without a float32 master copy
            ([note: stochastic rounding] in op_contract.py). Other dtypes ignore it. Every
            backend draws the same bits.
        rounding_seed (int or None, default None): the group's seed of the rounding bits, mixed
            with each parameter's position in the optimizer; None draws one from torch's
            default CPU generator when the group rounds stochastically (torch.manual_seed makes
            it reproducible). Saved in ``state_dict`` with the group, so a resumed run
            continues the same bits.
        momentum_dtype (torch.dtype, default torch.float32): the momentum state's dtype;
            torch.bfloat16 keeps 6 B of state per parameter instead of 8 (the FIM, and
            FAdafactor's factors, stay float32).

    Numbers may be Python or numpy scalars (and one-element CPU tensors for all but lr, which may
    be a tensor on any device); the groups store them as floats.

    State per parameter: ``step`` (float32 0-dim tensor on the parameter's device), ``momentum``
    and ``fim`` (float32 whatever the parameter dtype, the momentum in ``momentum_dtype``: with
    beta2 = 0.999 a bfloat16 FIM cannot move, as 0.999 f rounds back to f).

    Non-finite values: if any gradient of a step holds a NaN or inf, or one whose square
    overflows float32 (|g| >= 1.8e19 after GradScaler's scale: the FIM would become inf and the
    tensor would never move again), the whole step is skipped on the device (parameters, state
    and step counts are left bit-identical) and :attr:`skipped_steps`, a float32 0-dim tensor on
    the first parameter's device, goes up by one. Reading it is the only sync; the step itself
    never syncs. It is not part of ``state_dict``. With a ``torch.amp.GradScaler``, its
    ``found_inf`` also skips the step and its scale is divided out in the kernel. A NaN or inf in
    a *parameter* does not skip the step: with clipping on, that tensor's RMS(w) counts as
    infinite, so its clipped weight decay is 0 for the step and the NaN stays in its own element.

    ``step()`` validates every param group, plans, and runs all of them as one step (engine.py,
    [note: the step engine]), so a non-finite gradient in any group skips every group.
    """

    kinds = (KIND,)

    @staticmethod
    def kind_of(param: Tensor) -> Kind:
        return KIND


def fadam(
    params: list[Tensor],
    grads: list[Tensor],
    momentums: list[Tensor],
    fims: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    clip: float | None,
    weight_decay: float,
    p: float,
    maximize: bool,
    backend: str | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Tensor | None:
    """Functional FAdam: one step over parallel tensor lists; see :class:`FAdam` for the math.

    ``state_steps`` are float32 0-dim tensors on each parameter's device; momentums and fims are
    float32 tensors shaped (and laid out) like their parameters. Every list is checked as the
    optimizer checks its parameters, gradients and state, before anything is written, and an
    error names ``params[i]``. Returns the skip flag (a 0-dim float32 tensor, 1 if the step was
    skipped because a gradient was not finite), or None for empty lists.
    """
    n = len(params)
    if not (len(grads) == len(momentums) == len(fims) == len(state_steps) == n):
        raise ValueError(f"fadam: params, grads, momentums, fims and state_steps must have the "
                         f"same length, got {n}, {len(grads)}, {len(momentums)}, {len(fims)}, "
                         f"{len(state_steps)}")
    values = dict(lr=lr, betas=(beta1, beta2), eps=eps, clip=clip, weight_decay=weight_decay,
                  p=p, maximize=maximize)
    hyper = check_hyper(values, read_lr=False)
    check_backend(backend)
    name = "params[{}]".format
    for i, param in enumerate(params):
        why = checks.param_refusal("fadam", param, name(i))
        if why is not None:
            raise ValueError(why)
    states = {param: dict(momentum=m, fim=f, step=s)
              for param, m, f, s in zip(params, momentums, fims, state_steps)}
    if len(states) != n:
        raise ValueError("fadam: the same tensor appears twice in params; pass each once")
    planner = plan.Planner("fadam", states, FAdam.kind_of, owns_state=False)
    planner.group(0, params, grads, backend=backend, lr=lr, name=name)
    lists, layout = ([], [], []), []
    planner.emit(*lists, layout)
    buckets = plan.make_buckets([hyper], {KIND.name: KIND}, *lists, layout)
    skip, _ = engine.run_step(buckets, grad_scale=grad_scale, found_inf=found_inf)
    return skip
