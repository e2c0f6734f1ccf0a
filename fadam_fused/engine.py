"""The step engine: one step for every optimizer of the family.

[note: the step engine]
A step is validate -> plan -> counters -> stages -> update (docs/design.md, section 2):

1. validate (plan.Planner): every group's hyperparameters, then every parameter, gradient and
   state tensor, before anything is written; each error names the parameter;
2. plan (plan.make_buckets): the checked tensors become ``Bucket``s, one per (param group,
   backend, device, dtype, sharded, kind), each holding its kind's op set (a fused backend's ops
   or the reference's, with the same contract);
3. counters: every bucket's step tensors go up by one (the phases read t);
4. stages: every bucket's pre-update phases, stage by stage. Stage k of every bucket runs, then
   the skip flags of all devices are combined and, for sharded tensors, the sums stage k made
   are all-reduced with the flag in one packed collective per process group
   (``sharded.all_reduce``). FAdam has one stage (phase A), FAdafactor two (phase S, then A);
5. update: every bucket's update phase, a no-op where the combined flag is set; then the
   counters of a skipped step are put back.

A non-finite gradient anywhere therefore skips the whole step, on every device and rank. The
engine never asks what kind of bucket it holds: a kind (``Kind``) declares its state and makes
its buckets, and a bucket runs its own stages and says which of its sums shard. An optimizer
joins the family by declaring which kind steps each parameter (``optimizer.FisherOptimizer``).
"""

from __future__ import annotations

import abc
import operator
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from . import _ext, op_contract, sharded
from .hyper import Hyper

__all__ = ["Kind", "Bucket", "run_step", "lr_args", "on"]


class Bucket(abc.ABC):
    """Tensors of one kind that one backend steps together (one param group, device, dtype).

    ``stage(k)`` runs pre-update stage k (0 <= k < ``stages``): read-only on parameters and state,
    it may only raise ``skip`` and fill the bucket's own scratch, and returns the reductions its
    sharded tensors need before the next stage (``sharded.Reduction``; none for plain tensors).
    ``update`` is the last phase; the ops it calls do nothing when ``skip`` is nonzero.
    """

    stages: ClassVar[int] = 1
    steps: list[Tensor]
    device: torch.device

    @abc.abstractmethod
    def stage(self, k: int, skip: Tensor, grad_scale: Tensor | None) -> list[sharded.Reduction]:
        ...

    @abc.abstractmethod
    def update(self, skip: Tensor, grad_scale: Tensor | None) -> None:
        ...


class Kind(abc.ABC):
    """The extension point: how an optimizer of the family steps one kind of parameter.

    A kind declares its per-parameter state (``state_keys``, ``state_shapes``, ``new_state``),
    which parameters its fused kernels cannot take (they then run on the reference op set), and
    makes the bucket that steps a list of its parameters. Kinds are module-level singletons; the
    plan names them by ``name``.
    """

    name: ClassVar[str]
    # The parameter's state tensors in the order ``bucket`` takes them; "step" is always last.
    state_keys: ClassVar[tuple[str, ...]]

    def __init__(self) -> None:
        # state -> its tensors in state_keys order (KeyError if one is missing), in C.
        self.state_of = operator.itemgetter(*self.state_keys)

    @abc.abstractmethod
    def state_shapes(self, param: Tensor) -> dict[str, torch.Size]:
        """The float32 state tensors of `param` besides ``step``, by key, with their shapes."""

    @abc.abstractmethod
    def new_state(self, param: Tensor) -> dict[str, Tensor]:
        """The state of `param` before its first step."""

    def param_refusal(self, who: str, param: Tensor, name: str) -> str | None:
        """Why this kind cannot step `param` at all, beyond what every kind refuses (checked
        when the parameter joins the optimizer): None if it can."""
        return None

    def has_kernels(self, backend: str) -> bool:
        """Whether fused backend `backend` has this kind's kernels (else: the reference)."""
        return True

    def unfused_reason(self, param: Tensor) -> str | None:
        """Why this kind's fused kernels cannot step `param` beyond what every kind shares
        (dtype, density): None if they can."""
        return None

    @abc.abstractmethod
    def bucket(self, backend: str, hyper: Any, params: list[Tensor], grads: list[Tensor],
               states: Sequence[Tensor], shards: sharded.Layout | None,
               originals: list[Tensor]) -> Bucket:
        """A bucket of `params` (local shards when `shards` says how they are sharded, of the
        optimizer's `originals`), with `states` their state tensors in ``state_keys`` order,
        parameter by parameter, and `hyper` their group's hyperparameters."""


def new_state_tensor(param: Tensor, value: float) -> Tensor:
    """A float32 state tensor shaped and laid out like `param` (a DTensor's placed like it),
    filled with `value`, made outside inference mode so that it can be trained."""
    with torch.inference_mode(False):
        return torch.full_like(param, value, dtype=torch.float32,
                               memory_format=torch.preserve_format)


def new_step(param: Tensor) -> Tensor:
    """The step counter of a parameter's state: a float32 0-dim tensor on its device."""
    with torch.inference_mode(False):
        return torch.zeros((), dtype=torch.float32, device=param.device)


def on(value: Tensor | None, device: torch.device) -> Tensor | None:
    """`value` on `device`. Asynchronous towards an accelerator; towards the CPU it waits, since
    a CPU kernel reads the value on the host right away (non_blocking=True there returned a
    pinned tensor still being filled, and a CUDA NaN flag read as 0)."""
    if value is None or value.device == device:
        return value
    return value.to(device, non_blocking=device.type != "cpu")


def lr_args(lr: float | Tensor, device: torch.device) -> tuple[Tensor | None, float]:
    """(lr_tensor, lr) as the ops take them: a one-element float32/float64 tensor on `device`,
    or a float."""
    if not isinstance(lr, Tensor):
        return None, float(lr)
    if lr.device.type == "cpu" and device.type != "cpu":
        # A CPU lr with accelerator parameters (e.g. a checkpoint loaded with map_location="cpu"):
        # read on the host, as torch's fused Adam does; no device sync, and no pageable
        # host-to-device copy in every step.
        return None, float(lr)  # sync-ok: a CPU tensor
    if lr.dtype not in (torch.float32, torch.float64):
        lr = lr.float()  # a bfloat16 lr is widened on its own device, exactly
    return on(lr, device), 0.0


def new_partials(bucket_params: Sequence[Tensor], chunk_size: int,
                 shards: sharded.Layout | None) -> Tensor:
    """The float64 [n_slots, 2] RMS partial sums of a bucket's phase A ([note: the two-phase op
    contract]). A sharded bucket's are zeroed: their sums leave phase A whatever the tensor's
    size (fuse_one_chunk=False), and an empty shard's slot is never written."""
    partials = op_contract.new_partials(bucket_params, chunk_size)
    if shards is not None:
        partials.zero_()
    return partials


def run_step(buckets: Sequence[Bucket], *, grad_scale: Tensor | None = None,
             found_inf: Tensor | None = None,
             refused: bool = False) -> tuple[Tensor | None, Tensor | None]:
    """Runs one step over planned buckets ([note: the step engine]).

    Returns (skip, refused_elsewhere). skip is a float32 0-dim tensor, 1 if the step was skipped
    (a gradient anywhere was not finite or overflowed, found_inf was set, or on a sharded run
    some rank refused the step), None when there is nothing to step. refused_elsewhere, on a
    sharded run, counts the ranks that refused the step (sharded.all_reduce), else None. ``refused``: this rank's validation failed (a
    sharded run, see plan.Planner): its kernels run on placeholders with the flag already set,
    so that every rank takes part in the same collectives and nothing changes anywhere.
    Steps are incremented before the stages and the flag is subtracted afterwards, as torch's
    fused Adam does with found_inf, so a skipped step leaves them bit-identical.
    """
    if not buckets:
        return None, None
    refused_elsewhere = None
    skips: dict[torch.device, Tensor] = {}
    scales: dict[torch.device, Tensor | None] = {}
    for bucket in buckets:
        device = bucket.device
        if device not in skips:
            flag = torch.zeros((), dtype=torch.float32, device=device)
            if found_inf is not None:
                flag = (on(found_inf, device).reshape(()) != 0).to(torch.float32)
            if refused:
                flag = torch.ones((), dtype=torch.float32, device=device)
            skips[device] = flag
            scales[device] = on(grad_scale, device)

    for bucket in buckets:
        if bucket.steps:
            advance_steps(bucket.steps)
    for k in range(max(bucket.stages for bucket in buckets)):
        reductions = []
        for bucket in buckets:
            if k < bucket.stages:
                reductions += bucket.stage(k, skips[bucket.device], scales[bucket.device])
        if reductions:
            _combine_devices(skips)
            refused_elsewhere = sharded.all_reduce(reductions, skips, refused=refused)
    _combine_devices(skips)

    for bucket in buckets:
        skip = skips[bucket.device]
        bucket.update(skip, scales[bucket.device])
        # Undo the increment of a skipped step. A CPU flag is read on the host with no device to
        # wait for, and a step that ran (nearly all of them) then saves a foreach over every step
        # tensor. Traced (torch.compile) and on accelerators the subtraction always runs.
        if bucket.steps and (skip.device.type != "cpu" or torch.compiler.is_compiling()
                             or bool(skip)):  # sync-ok: a CPU tensor
            torch._foreach_add_(bucket.steps, skip, alpha=-1)
    return next(iter(skips.values())), refused_elsewhere


def advance_steps(steps: list[Tensor]) -> None:
    """Adds 1 to every step counter of a bucket (all on one device). On the CPU, outside a
    trace, through fadam_fused::advance_steps when the C++ kernels are loaded: torch's
    _foreach_add_ costs ~2.2 us per CPU tensor, 9 ms per step for 4096 parameters; the op
    ~0.1 ms, with the same bits."""
    if (steps[0].device.type == "cpu" and "CPU" in _ext.KERNELS
            and not torch.compiler.is_compiling()):
        torch.ops.fadam_fused.advance_steps(steps)
    else:
        torch._foreach_add_(steps, 1)


def _combine_devices(skips: dict[torch.device, Tensor]) -> None:
    """One NaN anywhere skips the step everywhere. Combined on an accelerator when there is one;
    a CPU bucket next to a GPU one must wait for the GPU's flag (its kernel reads it on the
    host), the only sync of a step, and only in that mix."""
    if len(skips) < 2:
        return
    devices = sorted(skips, key=lambda d: d.type == "cpu")
    total = torch.stack([on(skips[d], devices[0]) for d in devices]).amax()
    for d in devices:
        skips[d].copy_(on(total, d))


def first_device(param_groups: Sequence[dict[str, Any]]) -> torch.device:
    """The device of the first parameter of any group (the CPU for an optimizer with none)."""
    for group in param_groups:
        for param in group["params"]:
            return param.device
    return torch.device("cpu")
