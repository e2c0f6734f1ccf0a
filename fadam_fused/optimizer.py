"""FAdam: the drop-in torch.optim.Optimizer, its functional core, and the step runner.

The layout follows torch/optim/adam.py: ``__init__`` validates and builds ``defaults``,
``_init_group`` creates state lazily, ``step`` hands the tensors to one functional ``fadam(...)``,
which runs each (device, dtype) bucket on the backend chosen by ``backends.resolve``.

One thing differs from Adam: a step is two phases (SPEC section 3), and the non-finite skip covers
the whole step (SPEC section 5), so *every* bucket of *every* param group runs phase A before any
bucket runs phase B. ``_StepRunner`` holds the buckets between the phases.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import backends, reference, sharded

__all__ = ["FAdam", "fadam"]


def _validate_hyperparameters(lr, betas, eps, clip, weight_decay, p, backend) -> None:
    """torch.optim's ValueError messages, plus FAdam's clip, p and backend."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.is_floating_point():
            raise ValueError(f"Tensor lr must be a floating-point tensor, got {lr.dtype}")
    elif not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if clip is not None and not 0.0 <= clip:
        raise ValueError(f"Invalid clip value: {clip}; use None or 0 to turn clipping off")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not 0.0 < p:
        raise ValueError(f"Invalid p value: {p}; the FIM exponent p must be > 0 (0.5 = square root)")
    if backend is not None and backend not in backends.BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; expected None or one of {backends.BACKENDS}")


class FAdam(Optimizer):
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
        params: parameters or param groups (dicts), as for any torch.optim optimizer.
        lr (float or Tensor, default 1e-3): learning rate :math:`\eta`.
        betas (tuple, default (0.9, 0.999)): momentum and FIM EMA coefficients.
        eps (float, default 1e-8): :math:`\epsilon`. The paper recommends 1e-15 for LLM-scale
            models; values down to 1e-30 are safe (the RMS sums are overflow-safe).
        clip (float or None, default 1.0): :math:`c`, the RMS clip threshold; None or 0 turns the
            clipping of the natural gradient and of the weight decay off.
        weight_decay (float, default 1e-3): :math:`\lambda`, applied as a natural gradient.
        p (float, default 0.5): the FIM exponent; 0.5 divides by the square root like Adam.
        maximize (bool, default False): maximize the objective (the gradient is negated in the
            kernel; ``p.grad`` is never changed).
        backend (str or None, default None): ``"cuda"``, ``"triton"``, ``"cpu"`` (fused C++),
            ``"reference"`` (the plain-PyTorch oracle), or None to pick the fastest available for
            each device. The group stores this request, never the resolved choice, so a checkpoint
            moves between machines.

    State per parameter: ``step`` (float32 0-dim tensor on the parameter's device), ``momentum``
    and ``fim`` (float32 whatever the parameter dtype: with beta2 = 0.999 a bfloat16 FIM cannot
    move, as 0.999 f rounds back to f).

    Non-finite gradients: if any gradient of a step holds a NaN or inf, the whole step is skipped
    on the device (parameters, state and step counts are left bit-identical) and
    :attr:`skipped_steps`, a float32 0-dim tensor on the first parameter's device, goes up by one.
    Reading it is the only sync; the step itself never syncs. It is not part of ``state_dict``.
    With a ``torch.amp.GradScaler``, its ``found_inf`` also skips the step and its scale is
    divided out in the kernel.
    """

    # GradScaler.step sets `grad_scale` and `found_inf` on the optimizer instead of unscaling
    # the gradients itself, as it does for torch's fused Adam.
    _step_supports_amp_scaling = True

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
        _validate_hyperparameters(lr, betas, eps, clip, weight_decay, p, backend)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, clip=clip, weight_decay=weight_decay,
                        p=p, maximize=maximize, backend=backend)
        self.skipped_steps: Tensor | None = None
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:  # validated after torch has filled in the defaults, and undone if invalid
            _validate_hyperparameters(group["lr"], group["betas"], group["eps"], group["clip"],
                                      group["weight_decay"], group["p"], group["backend"])
            for i, param in enumerate(group["params"]):
                if param.is_complex():
                    raise ValueError(
                        f"FAdam does not support complex parameters: {_param_name(group, i)} is "
                        f"{param.dtype}. Optimize torch.view_as_real(param) instead.")
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("skipped_steps", None)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("backend", None)
            group.setdefault("clip", 1.0)
            group.setdefault("p", 0.5)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict from any backend and device, keeping float32 state.

        torch.optim casts floating state to the parameter's dtype, which would round a bfloat16
        parameter's float32 FIM to bfloat16 (SPEC section 4). The saved tensors are re-read here
        at full precision onto each parameter's device. Checkpoints of the public FAdam
        implementations (keys ``momentum`` and ``fim``, an integer or per-group ``step``) load too.
        """
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        pairs = [(saved_group, group, i, saved_id, param)
                 for saved_group, group in zip(saved_groups, self.param_groups)
                 for i, (saved_id, param) in enumerate(zip(saved_group["params"], group["params"]))]
        # torch.optim checks only the group sizes; a checkpoint of another model (or another
        # parameter order) must fail here, by name, before anything is loaded.
        for _, group, i, saved_id, param in pairs:
            for key in ("momentum", "fim"):
                saved = saved_state.get(saved_id, {}).get(key)
                if isinstance(saved, Tensor) and saved.shape != param.shape:
                    raise ValueError(
                        f"Cannot load this FAdam state_dict: the saved {key!r} of "
                        f"{_param_name(group, i)} has shape {tuple(saved.shape)}, but the "
                        f"parameter has shape {tuple(param.shape)}. Was it saved for another "
                        "model, or with the parameters in another order?")
        # The backend is where this process runs the step, not a training hyperparameter: the
        # optimizer's own request stays (a backend="cuda" checkpoint loads on a CPU machine).
        requested = [group["backend"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, backend in zip(self.param_groups, requested):
            group["backend"] = backend
        for saved_group, _, _, saved_id, param in pairs:
            saved = saved_state.get(saved_id)
            if not saved:
                continue
            state = self.state[param]
            for key in ("momentum", "fim"):
                if key in saved:
                    # float32 and the parameter's own layout (a checkpoint of a contiguous
                    # state loads into a channels_last parameter's optimizer).
                    state[key] = sharded.state_like(param, saved[key])
            step = saved.get("step", saved_group.get("step", 0))
            state["step"] = torch.as_tensor(step, dtype=torch.float32).to(param.device).reshape(())

    def _init_group(self, group, params, grads, momentums, fims, steps) -> None:
        """Collects the group's tensors that have gradients, creating missing state lazily."""
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["momentum"] = torch.zeros_like(param, dtype=torch.float32,
                                                     memory_format=torch.preserve_format)
                state["fim"] = torch.ones_like(param, dtype=torch.float32,
                                               memory_format=torch.preserve_format)
            params.append(param)
            grads.append(param.grad)
            momentums.append(state["momentum"])
            fims.append(state["fim"])
            steps.append(state["step"])

    def _check_grads(self) -> None:
        """Every error a step can raise, raised before anything is modified (state included).

        Runs on every step over every parameter, so the common case is a few attribute compares
        per parameter (16384 parameters: ~15 ms); messages are built only when raising.
        """
        resolved = set()
        for group in self.param_groups:
            backend = group["backend"]
            for i, param in enumerate(group["params"]):
                grad = param.grad
                if grad is None:
                    continue
                if (grad.is_sparse or grad.shape != param.shape or grad.dtype != param.dtype
                        or grad.device != param.device):
                    raise RuntimeError(_grad_mismatch(_param_name(group, i), param, grad))
                why = sharded.check(_param_name(group, i), param, grad)
                if why is not None:
                    raise RuntimeError(why)
                if (backend, param.device) not in resolved:
                    backends.resolve(backend, param.device)  # raises if it cannot run there
                    resolved.add((backend, param.device))
                if backend not in (None, "reference"):
                    why = backends.unfusable_reason(sharded.local(param))
                    if why is not None:
                        raise RuntimeError(
                            f"FAdam backend={backend!r} cannot update {_param_name(group, i)}: it "
                            f"{why}. Use backend=None or 'reference' (backend=None runs such "
                            "parameters on the reference backend and the others fused).")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        runner = _StepRunner(grad_scale=getattr(self, "grad_scale", None),
                             found_inf=getattr(self, "found_inf", None))
        for group in self.param_groups:
            params, grads, momentums, fims, steps = [], [], [], [], []
            self._init_group(group, params, grads, momentums, fims, steps)
            beta1, beta2 = group["betas"]
            runner.add(params, grads, momentums, fims, steps, lr=group["lr"], beta1=beta1,
                       beta2=beta2, eps=group["eps"], clip=group["clip"],
                       weight_decay=group["weight_decay"], p=group["p"],
                       maximize=group["maximize"], backend=group["backend"])
        skips = runner.run()
        if skips:
            if self.skipped_steps is None:
                first = next(iter(skips.values()))
                self.skipped_steps = torch.zeros((), dtype=torch.float32, device=first.device)
            # The flags of all devices are equal (_combine_devices); take the one already on
            # the counter's device when this step has one there.
            flag = skips.get(self.skipped_steps.device)
            if flag is None:
                flag = _StepRunner._on(next(iter(skips.values())), self.skipped_steps.device)
            self.skipped_steps.add_(flag)
        return loss


def _grad_mismatch(name: str, param: Tensor, grad: Tensor) -> str:
    """Why `grad` cannot be the gradient of `param` (the caller knows that it cannot)."""
    if grad.is_sparse:
        return (f"FAdam does not support sparse gradients: {name} has a {grad.layout} gradient. "
                "Use a dense gradient (e.g. nn.Embedding(sparse=False)).")
    if grad.shape != param.shape:
        return (f"The gradient of {name} has shape {tuple(grad.shape)} but the parameter has "
                f"shape {tuple(param.shape)}.")
    if grad.dtype != param.dtype:
        return (f"The gradient of {name} is {grad.dtype} but the parameter is {param.dtype}; "
                "cast the gradient to the parameter's dtype.")
    return (f"The gradient of {name} is on {grad.device} but the parameter is on "
            f"{param.device}; move it to the parameter's device.")


def _param_name(group: dict[str, Any], index: int) -> str:
    names = group.get("param_names")
    if names is not None:
        return f"parameter {names[index]!r}"
    return f"parameter {index} of its param group (shape {tuple(group['params'][index].shape)})"


def _buckets(tensorlists: list[list[Tensor]]) -> list[list[list[Tensor]]]:
    """Splits parallel tensor lists by the (device, dtype) of the first list (the params)."""
    grouped = Optimizer._group_tensors_by_device_and_dtype(tensorlists)
    return [lists for lists, _ in grouped.values()]


class _StepRunner:
    """One optimizer step over any number of tensor lists: all phase A, then all phase B.

    The skip flag is one float32 0-dim tensor per device; phase A of every bucket raises it, and
    flags of several devices are combined before any phase B, so a NaN on one device also skips
    the others. Steps are incremented before phase A and decremented by the flag afterwards, as
    torch's fused Adam does with found_inf, so a skipped step leaves them bit-identical.
    """

    def __init__(self, grad_scale: Tensor | None = None, found_inf: Tensor | None = None):
        self.grad_scale = grad_scale
        self.found_inf = found_inf
        self.skip: dict[torch.device, Tensor] = {}
        self.buckets: list[tuple[str, dict[str, Any], list[list[Tensor]],
                                 sharded.Shards | None]] = []

    @staticmethod
    def _on(value: Tensor | None, device: torch.device) -> Tensor | None:
        """`value` on `device`. Asynchronous towards an accelerator; towards the CPU it waits,
        since a CPU kernel reads the value on the host right away (non_blocking=True there
        returned a pinned tensor still being filled, and a CUDA NaN flag read as 0)."""
        if value is None or value.device == device:
            return value
        return value.to(device, non_blocking=device.type != "cpu")

    def _skip_flag(self, device: torch.device) -> Tensor:
        if device not in self.skip:
            if self.found_inf is None:
                self.skip[device] = torch.zeros((), dtype=torch.float32, device=device)
            else:
                found = self._on(self.found_inf, device).reshape(())
                self.skip[device] = (found != 0).to(torch.float32)
        return self.skip[device]

    def add(self, params, grads, momentums, fims, steps, *, lr, beta1, beta2, eps, clip,
            weight_decay, p, maximize, backend) -> None:
        if not params:
            return
        hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, clip=clip,
                     weight_decay=weight_decay, p=p, maximize=maximize)
        # DTensor parameters come as their local shards, with `shards` saying how they are
        # sharded ([note: sharded parameters] in sharded.py); plain ones with shards None.
        for lists, shards in sharded.buckets([params, grads, momentums, fims, steps],
                                             bool(clip), _buckets):
            # device and dtype from a tensor: under torch.compile the grouping's keys are not
            # torch.device objects.
            name = backends.resolve(backend, lists[0][0].device)
            if name == "reference":
                self.buckets.append((name, hyper, lists, shards))
                continue
            # float64 parameters and strided views run on the oracle (backend=None only: the
            # optimizer has refused them, by name, for an explicit fused backend).
            fusable = [backends.unfusable_reason(p) is None for p in lists[0]]
            if not all(fusable):
                if backend is not None:
                    i = fusable.index(False)
                    raise RuntimeError(f"FAdam backend={backend!r} cannot update params[{i}]: it "
                                       f"{backends.unfusable_reason(lists[0][i])}; use "
                                       "backend=None or 'reference'.")
                rest = [not ok for ok in fusable]
                self.buckets.append(("reference", hyper,
                                     [[t for t, r in zip(lst, rest) if r] for lst in lists],
                                     shards and shards.select(rest)))
                lists = [[t for t, ok in zip(lst, fusable) if ok] for lst in lists]
                shards = shards and shards.select(fusable)
                if not lists[0]:
                    continue
            # The kernels walk a parameter, its gradient and its state in one memory order. The
            # state is created (and loaded) in the parameter's layout; a gradient in another
            # layout (p.grad = g.t().contiguous().t(), or a channels_last parameter with a
            # contiguous gradient) is copied into it: a step's worth of extra traffic, no sync.
            lists[1] = [g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
                        for p, g in zip(lists[0], lists[1])]
            self.buckets.append((name, hyper, lists, shards))

    def run(self) -> dict[torch.device, Tensor]:
        """Runs the step; returns the skip flag of every device (all equal; empty if nothing
        ran)."""
        if not self.buckets:
            return {}
        phase_b = []
        for name, hyper, lists, shards in self.buckets:
            params, grads, momentums, fims, steps = lists
            device = params[0].device
            skip = self._skip_flag(device)
            grad_scale = self._on(self.grad_scale, device)
            torch._foreach_add_(steps, 1)
            if name == "reference":
                skip.copy_(torch.maximum(skip, reference.nonfinite_flag(grads)))
                if shards is not None:
                    shards.reference_phase_a(lists, hyper, grad_scale)
                phase_b.append((name, hyper, lists, shards, skip, grad_scale, None, None))
                continue
            impl = backends.fused(name)
            n_slots = sum(max(1, math.ceil(t.numel() / impl.chunk_size)) for t in params)
            # A shard's sums leave phase A whatever its size (fuse_one_chunk=False); zeros, as an
            # empty shard's slot is never written.
            alloc = torch.empty if shards is None else torch.zeros
            partials = alloc((n_slots, 2), dtype=torch.float64, device=device)
            impl.phase_a(params, grads, fims, steps, partials, skip, grad_scale,
                         beta2=hyper["beta2"], eps=hyper["eps"], p=hyper["p"],
                         maximize=hyper["maximize"], chunk_size=impl.chunk_size,
                         fuse_one_chunk=shards is None)
            if shards is not None:
                shards.partials, shards.chunk_size = partials, impl.chunk_size
            phase_b.append((name, hyper, lists, shards, skip, grad_scale, impl, partials))

        self._combine_devices()
        # Sharded tensors: their sums and the skip flag, all-reduced over their meshes.
        sharded.all_reduce([b[3] for b in self.buckets if b[3] is not None], self.skip)

        for name, hyper, lists, shards, skip, grad_scale, impl, partials in phase_b:
            params, grads, momentums, fims, steps = lists
            lr = hyper["lr"]
            if impl is None:
                for i, (param, grad, m, f, step) in enumerate(
                        zip(params, grads, momentums, fims, steps)):
                    whole = shards.reference_args(i) if shards is not None else {}
                    reference.update_tensor(param, grad, m, f, step, skip, grad_scale=grad_scale,
                                            **hyper, **whole)
            else:
                lr_tensor = None
                on_host = isinstance(lr, Tensor) and lr.device.type == "cpu"
                if on_host and params[0].device.type != "cpu":
                    # A CPU lr with accelerator parameters (e.g. a checkpoint loaded with
                    # map_location="cpu"): read on the host, as torch's fused Adam does; no device
                    # sync, and no pageable host-to-device copy in every step.
                    lr = float(lr)  # sync-ok: a CPU tensor
                elif isinstance(lr, Tensor):
                    # The kernels read float32 or float64 (an lr in bfloat16 is converted on its
                    # own device, then moved like every other step input).
                    if lr.dtype not in (torch.float32, torch.float64):
                        lr = lr.float()
                    lr_tensor = self._on(lr, params[0].device)
                impl.phase_b(params, grads, fims, momentums, steps, partials, skip, grad_scale,
                             lr_tensor, lr=0.0 if lr_tensor is not None else float(lr),
                             beta1=hyper["beta1"], beta2=hyper["beta2"], eps=hyper["eps"],
                             p=hyper["p"], clip=float(hyper["clip"] or 0.0),
                             weight_decay=hyper["weight_decay"], maximize=hyper["maximize"],
                             chunk_size=impl.chunk_size, fuse_one_chunk=shards is None)
            # Undo the increment of a skipped step. A CPU flag is read on the host with no device
            # to wait for, and a step that ran (nearly all of them) then saves a foreach over
            # every step tensor: 1.6 us per tensor on CPU, 0.2 ms for the 128 of the LLM list.
            # Traced (torch.compile) and on accelerators the subtraction always runs.
            if (skip.device.type != "cpu" or torch.compiler.is_compiling()
                    or bool(skip)):  # sync-ok: a CPU tensor
                torch._foreach_add_(steps, skip, alpha=-1)
        return self.skip

    def _combine_devices(self) -> None:
        """One NaN anywhere skips the step everywhere. Combined on an accelerator when there is
        one; a CPU bucket next to a GPU one must wait for the GPU's flag (its kernel reads it on
        the host), the only sync of a step, and only in that mix."""
        if len(self.skip) < 2:
            return
        devices = sorted(self.skip, key=lambda d: d.type == "cpu")
        total = torch.stack([self._on(self.skip[d], devices[0]) for d in devices]).amax()
        for d in devices:
            self.skip[d].copy_(self._on(total, d))


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
    float32. Returns the skip flag (a 0-dim float32 tensor, 1 if the step was skipped because a
    gradient was not finite), or None for empty lists.
    """
    runner = _StepRunner(grad_scale=grad_scale, found_inf=found_inf)
    runner.add(params, grads, momentums, fims, state_steps, lr=lr, beta1=beta1, beta2=beta2,
               eps=eps, clip=clip, weight_decay=weight_decay, p=p, maximize=maximize,
               backend=backend)
    skips = runner.run()
    return next(iter(skips.values())) if skips else None
