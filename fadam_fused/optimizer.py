"""FAdam: the drop-in torch.optim.Optimizer, its functional core, and the step runner.

The layout follows torch/optim/adam.py: ``__init__`` validates and builds ``defaults``, ``step``
hands the tensors to the functional core, which runs each (device, dtype) bucket on the backend
chosen by ``backends.resolve``.

[note: a step is validate, plan, mutate]
Every error a step can raise is raised before anything changes (docs/design.md, section 2):

1. validate: every group's hyperparameters (``step``), then every parameter, gradient and state
   tensor of every group (``FAdam._init_group`` with ``_Planner``, one pass over each group),
   which also sorts the tensors into buckets, one per (group, backend, device, dtype); whether a
   parameter can be fused is decided here, once. Nothing is written until every group has
   passed; then the state of new parameters joins the optimizer;
2. plan: ``make_buckets`` turns the lists into ``Bucket``s (gradient copies into the
   parameter's layout, a DTensor's local shards);
3. mutate (``run_step``): step counters, then phase A of *every* bucket, then the flags of all
   devices are combined, then phase B of every bucket. A step is two phases (docs/design.md,
   section 3) and the non-finite skip covers the whole step (section 6), so every bucket of every
   param group runs phase A before any bucket runs phase B.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import backends, op_contract, reference, sharded

__all__ = ["FAdam", "fadam"]


# ---- hyperparameters ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hyper:
    """One param group's hyperparameters, as the kernels take them (clip 0 = off)."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    clip: float
    weight_decay: float
    p: float
    maximize: bool


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_hyperparameters(lr, betas, eps, clip, weight_decay, p, maximize, backend, *,
                             read_lr: bool) -> None:
    """torch.optim's ValueError messages, plus FAdam's clip, p, eps and backend rules.

    ``read_lr``: also check a tensor lr's value (a host read: only at construction, never in a
    step, where lr may live on a device and reading it would sync).
    """
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise ValueError(f"Tensor lr must be a floating-point tensor, got {lr.dtype}")
        if lr.device.type == "meta":
            raise ValueError("Tensor lr is on the meta device; put it on the CPU or on the "
                             "parameters' device")
        if read_lr:
            value = float(lr)  # sync-ok: construction and add_param_group only
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"Invalid learning rate: {value}")
    elif not (_is_real(lr) and math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not (_is_real(eps) and math.isfinite(eps) and eps > 0.0):
        raise ValueError(f"Invalid epsilon value: {eps}; eps must be a finite number > 0")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        if not (_is_real(beta) and 0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if clip is not None and not (_is_real(clip) and math.isfinite(clip) and clip >= 0.0):
        raise ValueError(f"Invalid clip value: {clip}; use a finite number >= 0, or None or 0 "
                         "to turn clipping off")
    if not (_is_real(weight_decay) and math.isfinite(weight_decay) and weight_decay >= 0.0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not (_is_real(p) and math.isfinite(p) and p > 0.0):
        raise ValueError(f"Invalid p value: {p}; the FIM exponent p must be a finite number > 0 "
                         "(0.5 = square root)")
    # d = f^p + eps^(2p) >= eps^(2p) must stay a normal float32, or a zero gradient divides 0 by
    # 0 (eps^(2p) rounds to 0) or by a denormal whose inverse overflows.
    if op_contract.f32(eps ** (2.0 * p)) < torch.finfo(torch.float32).tiny:
        raise ValueError(
            f"Invalid epsilon value: {eps} with p={p}: eps**(2p) = {eps ** (2.0 * p):.3g} is below "
            f"float32's smallest normal number ({torch.finfo(torch.float32).tiny:.3g}), so an "
            f"all-zero gradient would give NaN; the smallest safe eps for p={p} is "
            f"{op_contract.smallest_safe_eps(p):.2g}")
    if not isinstance(maximize, bool):
        raise ValueError(f"Invalid maximize value: {maximize!r}; expected True or False")
    if backend is not None and backend not in backends.BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; expected None or one of {backends.BACKENDS}")


def _group_hyperparameters(group: dict[str, Any], *, read_lr: bool) -> Hyper:
    validate_hyperparameters(group["lr"], group["betas"], group["eps"], group["clip"],
                             group["weight_decay"], group["p"], group["maximize"],
                             group["backend"], read_lr=read_lr)
    beta1, beta2 = group["betas"]
    return Hyper(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                 clip=float(group["clip"] or 0.0), weight_decay=group["weight_decay"],
                 p=group["p"], maximize=group["maximize"])


# ---- the optimizer ------------------------------------------------------------------------------


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

    Non-finite values: if any gradient of a step holds a NaN or inf, the whole step is skipped on
    the device (parameters, state and step counts are left bit-identical) and
    :attr:`skipped_steps`, a float32 0-dim tensor on the first parameter's device, goes up by one.
    Reading it is the only sync; the step itself never syncs. It is not part of ``state_dict``.
    With a ``torch.amp.GradScaler``, its ``found_inf`` also skips the step and its scale is
    divided out in the kernel. A NaN or inf in a *parameter* does not skip the step: with
    clipping on, that tensor's RMS(w) counts as infinite, so its clipped weight decay is 0 for the
    step and the NaN stays in its own element.

    ``step()`` plans every param group as :func:`fadam` does, then runs all of them as one step
    (:func:`run_step`), so a non-finite gradient in any group skips every group.
    """

    # GradScaler.step sets `grad_scale` and `found_inf` on the optimizer instead of unscaling
    # the gradients itself, as it does for torch's fused Adam.
    _step_supports_amp_scaling = True

    # [note: optimizer extension point]
    # A variant of FAdam with other state (FAdafactor's factored FIM, fadafactor.py) subclasses
    # FAdam and overrides the two static methods and the two hooks below; validation and planning
    # (_Planner), the one-step run with its non-finite skip, load_state_dict, GradScaler and
    # skipped_steps are FAdam's. Its buckets may be PhaseRunners that run their own ops inside
    # run_step's two phases.

    # None, or fn(param, backend) -> why this optimizer cannot step `param` (None: it can),
    # called by _Planner for every parameter with a gradient.
    _param_check: Callable[[Tensor, str | None], str | None] | None = None
    # None (every parameter goes to a Bucket), or fn(param, backend_name) -> (backend_name,
    # bucket kind): the kind (a key of BUCKET_KINDS) of a plain parameter's bucket and the
    # backend that runs it, given the one resolved for it.
    _route: Callable[[Tensor, str], tuple[str, str]] | None = None

    @staticmethod
    def _state_shapes(param: Tensor) -> dict[str, torch.Size]:
        """The float32 state tensors of `param` besides `step`, by key, with their shapes."""
        return {"momentum": param.shape, "fim": param.shape}

    @staticmethod
    def _new_state(param: Tensor) -> dict[str, Any]:
        """The state of a parameter's first step."""
        return _new_state(param)

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
        validate_hyperparameters(lr, betas, eps, clip, weight_decay, p, maximize, backend,
                                 read_lr=True)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, clip=clip, weight_decay=weight_decay,
                        p=p, maximize=maximize, backend=backend)
        super().__init__(params, defaults)
        # Made here, not in the first step: a compiled first step must find it (an attribute
        # created inside a torch.compile'd step is not set on the eager object).
        first = self.param_groups[0]["params"][0]
        self.skipped_steps: Tensor = torch.zeros((), dtype=torch.float32, device=first.device)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:  # validated after torch has filled in the defaults, and undone if invalid
            _group_hyperparameters(group, read_lr=True)
            for i, param in enumerate(group["params"]):
                why = _refusal(sharded.local(param), _param_name(group, i))
                if why is not None:
                    raise ValueError(why)
            _check_no_shared_memory(self.param_groups)
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("backend", None)
            group.setdefault("clip", 1.0)
            group.setdefault("p", 0.5)
        if getattr(self, "skipped_steps", None) is None:
            first = self.param_groups[0]["params"][0]
            self.skipped_steps = torch.zeros((), dtype=torch.float32, device=first.device)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict from any backend and device, keeping float32 state.

        torch.optim casts floating state to the parameter's dtype, which would round a bfloat16
        parameter's float32 FIM to bfloat16 (docs/design.md, section 5). The saved tensors are
        re-read here at full precision onto each parameter's device. Checkpoints of the public
        FAdam implementations (keys ``momentum`` and ``fim``, an integer or per-group ``step``)
        load too. A checkpoint of another model, or with incomplete state, is refused by name
        before anything is loaded.
        """
        kind = type(self).__name__
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        pairs = [(saved_group, group, i, saved_id, param)
                 for saved_group, group in zip(saved_groups, self.param_groups)
                 for i, (saved_id, param) in enumerate(zip(saved_group["params"], group["params"]))]
        for saved_group, group, i, saved_id, param in pairs:
            saved = saved_state.get(saved_id)
            if not saved:
                continue
            shapes = self._state_shapes(param)
            missing = [key for key in shapes if not isinstance(saved.get(key), Tensor)]
            if "step" not in saved and "step" not in saved_group:
                missing.append("step")
            if missing:
                raise ValueError(
                    f"Cannot load this {kind} state_dict: the state of {_param_name(group, i)} "
                    f"has no {' or '.join(repr(k) for k in missing)} (it has "
                    f"{sorted(saved)}). Save it from {kind}, or drop the parameter's state.")
            for key, shape in shapes.items():
                if saved[key].shape != shape:
                    need = ("" if shape == param.shape else
                            f" (which needs {key!r} of shape {tuple(shape)})")
                    raise ValueError(
                        f"Cannot load this {kind} state_dict: the saved {key!r} of "
                        f"{_param_name(group, i)} has shape {tuple(saved[key].shape)}, but the "
                        f"parameter has shape {tuple(param.shape)}{need}. Was it saved for "
                        "another model, or with the parameters in another order?")
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
            for key, shape in self._state_shapes(param).items():
                # Shaped like the parameter: in its layout (and shard); a factored FIM's row or
                # column sums: contiguous.
                state[key] = (sharded.state_like(param, saved[key]) if shape == param.shape else
                              saved[key].to(device=param.device, dtype=torch.float32, copy=True))
            step = saved.get("step", saved_group.get("step", 0))
            state["step"] = torch.as_tensor(step, dtype=torch.float32).to(param.device).reshape(())

    def _init_group(self, params: list[Tensor], grads: list[Tensor], states: list[Tensor],
                    layout: list[tuple]) -> None:
        """Checks every group's tensors, creates missing state, and lists the tensors that have
        a gradient, bucket by bucket (``layout``: one tuple of constants per bucket, see
        make_buckets).

        The name is torch.optim's: torch.compile runs this method as Python while it traces a
        step (torch/_dynamo/variables/optimizer.py), so the state it reads and creates enters
        the graph as the optimizer's own tensors, and gradients as the parameters' ``.grad``.
        Unlike torch's, it covers all groups at once, so that a refused tensor in any group
        comes before the state of any new parameter is made.
        """
        planner = _Planner(self.state, type(self))
        for index, group in enumerate(self.param_groups):
            planner.group(index, group, [p.grad for p in group["params"]])
        # Every check has passed: the state of new parameters joins the optimizer.
        self.state.update(planner.new_state)
        planner.emit(params, grads, states, layout)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Performs a single optimization step (validate, plan, mutate: see the module doc).

        Args:
            closure (Callable, optional): reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hypers = [_group_hyperparameters(group, read_lr=False) for group in self.param_groups]
        params, grads, states, layout = [], [], [], []
        self._init_group(params, grads, states, layout)
        buckets = make_buckets(hypers, params, grads, states, layout)
        skip = run_step(buckets, grad_scale=getattr(self, "grad_scale", None),
                        found_inf=getattr(self, "found_inf", None))
        if skip is not None:
            self.skipped_steps.add_(_on(skip, self.skipped_steps.device))
        return loss


def _new_state(param: Tensor) -> dict[str, Any]:
    return dict(step=torch.zeros((), dtype=torch.float32, device=param.device),
                momentum=torch.zeros_like(param, dtype=torch.float32,
                                          memory_format=torch.preserve_format),
                fim=torch.ones_like(param, dtype=torch.float32,
                                    memory_format=torch.preserve_format))


# ---- validation ---------------------------------------------------------------------------------


def _param_name(group: dict[str, Any], index: int) -> str:
    names = group.get("param_names")
    if names is not None:
        return f"parameter {names[index]!r}"
    return f"parameter {index} of its param group (shape {tuple(group['params'][index].shape)})"


def _refusal(param: Tensor, name: str) -> str | None:
    """Why no backend can optimize `param` (None if it can be optimized)."""
    if param.is_complex():
        return (f"FAdam does not support complex parameters: {name} is {param.dtype}. Optimize "
                "torch.view_as_real(param) instead.")
    if not param.is_floating_point():
        return (f"FAdam optimizes floating-point parameters only: {name} is {param.dtype} "
                "(torch.optim.Adam refuses it too).")
    if torch._debug_has_internal_overlap(param) == 1:  # MemOverlap::Yes, e.g. stride 0
        return (f"FAdam cannot optimize {name}: its elements share memory (shape "
                f"{tuple(param.shape)}, strides {tuple(param.stride())}, e.g. from expand()). "
                "Give it memory of its own (.contiguous()).")
    return None


def _check_no_shared_memory(groups: Sequence[dict[str, Any]]) -> None:
    """Refuses two parameters whose storage overlaps: each would be updated from a stale read of
    the other, and the fused kernels would race on the shared elements."""
    spans: dict[Any, list[tuple[int, int, str]]] = {}
    for group in groups:
        for i, param in enumerate(group["params"]):
            param = sharded.local(param)
            if param.numel() == 0 or param.device.type == "meta":
                continue
            start = param.data_ptr()
            extent = sum((n - 1) * abs(s) for n, s in zip(param.shape, param.stride())) + 1
            key = (param.device, param.untyped_storage().data_ptr())
            spans.setdefault(key, []).append(
                (start, start + extent * param.element_size(), _param_name(group, i)))
    for items in spans.values():
        items.sort()
        for (_, end, name), (start, _, other) in zip(items, items[1:]):
            if start < end:
                raise ValueError(f"FAdam cannot optimize {name} and {other}: their storage "
                                 "overlaps (views of one tensor?). Give each parameter its own "
                                 "memory, e.g. with .clone()")


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


# Tensor types of the common path (anything else, e.g. a DTensor, is checked in full).
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})


class _Planner:
    """Validates one step's tensors and sorts them into buckets, in one pass over each group.

    Nothing is written: the state of parameters seen for the first time is made in
    ``new_state`` for the caller to add once every group has passed. Runs on every step over
    every parameter, so the common case (a plain, contiguous parameter of a fused dtype) is a
    few attribute compares and one state lookup per parameter; messages are built only when
    raising, and fusability is decided here, once.
    """

    def __init__(self, state: dict[Tensor, Any], optimizer: type[FAdam] | None = None) -> None:
        self.state = state
        # The optimizer class whose state and rules apply ([note: optimizer extension point]).
        self.optimizer = FAdam if optimizer is None else optimizer
        self.new_state: dict[Tensor, dict[str, Any]] = {}
        # (group index, backend, device, dtype, sharded, bucket kind) -> [(param, grad, state)]
        self.buckets: dict[tuple, list[tuple[Tensor, Tensor, dict[str, Any]]]] = {}

    def group(self, index: int, group: dict[str, Any], grads: Sequence[Tensor | None]) -> None:
        """Checks one param group's tensors; `grads` is parallel to group["params"]."""
        backend = group["backend"]
        fused_only = backend not in (None, "reference")
        lr = group["lr"]
        lr_device = lr.device if isinstance(lr, Tensor) else None
        resolved: dict[torch.device, str] = {}
        # Runs for every parameter on every step: 4096 small tensors spend ~1 us each here.
        plain_state = self.optimizer._state_shapes is FAdam._state_shapes
        for i, (param, grad) in enumerate(zip(group["params"], grads)):
            if grad is None:
                continue
            if (grad.is_sparse or grad.shape != param.shape or grad.dtype != param.dtype
                    or grad.device != param.device):
                raise RuntimeError(_grad_mismatch(_param_name(group, i), param, grad))
            if self.optimizer._param_check is not None:
                why = self.optimizer._param_check(param, backend)
                if why is not None:
                    raise RuntimeError(f"{self.optimizer.__name__} cannot update "
                                       f"{_param_name(group, i)}: {why}")
            is_sharded = type(param) not in _PLAIN or type(grad) not in _PLAIN
            if (not is_sharded and param.is_contiguous()
                    and param.dtype in backends.FUSED_DTYPES):
                fusable = True
            else:
                fusable = self._unusual(group, i, grad, fused_only)
                is_sharded = sharded.is_dtensor(param)
            device = param.device
            name = resolved.get(device)
            if name is None:
                name = resolved[device] = backends.resolve(backend, device)  # raises if it can't
                if lr_device is not None and lr_device.type != "cpu" and lr_device != device:
                    raise ValueError(f"Tensor lr is on {lr_device} but {_param_name(group, i)} is "
                                     f"on {device}; put lr on the CPU or on the parameters' device")
            state = self.state.get(param)
            if state:
                if plain_state:  # FAdam's own: two lookups and compares, no dict built
                    shape = param.shape
                    m, f = state.get("momentum"), state.get("fim")
                    if m is None or f is None or m.shape != shape or f.shape != shape:
                        self._refuse_state(group, i, state)
                else:
                    for key, shape in self.optimizer._state_shapes(param).items():
                        value = state.get(key)
                        if value is None or value.shape != shape:
                            self._refuse_state(group, i, state)
            else:
                state = self.new_state[param] = self.optimizer._new_state(param)
            if not fusable:
                name = "reference"
            kind = "fadam"
            if self.optimizer._route is not None:
                name, kind = self.optimizer._route(param, name)
            key = (index, name, device, param.dtype, is_sharded, kind)
            entries = self.buckets.get(key)
            if entries is None:
                entries = self.buckets[key] = []
            entries.append((param, grad, state))

    def _refuse_state(self, group: dict[str, Any], i: int, state: dict[str, Any]) -> None:
        param = group["params"][i]
        raise RuntimeError(_bad_state(_param_name(group, i), param, state,
                                      self.optimizer._state_shapes(param),
                                      self.optimizer.__name__))

    def emit(self, params: list[Tensor], grads: list[Tensor], states: list[Tensor],
             layout: list[tuple]) -> None:
        """Appends the checked tensors bucket by bucket (``states``: each parameter's state
        tensors in its bucket kind's STATE_KEYS order), and one layout tuple per bucket: (group
        index, backend, bucket kind, first, end, first state, sharded, indices whose gradient
        needs a copy)."""
        for (index, name, _, _, is_sharded, kind), entries in self.buckets.items():
            first, first_state = len(params), len(states)
            state_of = operator.itemgetter(*BUCKET_KINDS[kind].STATE_KEYS)
            copies = []
            for j, (param, grad, state) in enumerate(entries):
                # The kernels walk a parameter, its gradient and its state in one memory order.
                # The state is created (and loaded) in the parameter's layout; a gradient in
                # another layout (p.grad = g.t().contiguous().t(), or a channels_last parameter
                # with a contiguous gradient) is copied into it: a step's worth of extra
                # traffic, no sync. (A shard's layout is compared after to_local().)
                if name != "reference" and not is_sharded and grad.stride() != param.stride():
                    copies.append(j)
                params.append(param)
                grads.append(grad)
                states.extend(state_of(state))
            layout.append((index, name, kind, first, len(params), first_state, is_sharded,
                           tuple(copies)))

    def _unusual(self, group: dict[str, Any], i: int, grad: Tensor, fused_only: bool) -> bool:
        """Checks a parameter off the common path (sharded, not contiguous, or not of a fused
        dtype); returns whether a fused backend can update it."""
        param = group["params"][i]
        if type(param) not in _PLAIN or type(grad) not in _PLAIN:
            why = sharded.check(_param_name(group, i), param, grad)
            if why is not None:
                raise RuntimeError(why)
        param = sharded.local(param)
        why = _refusal(param, _param_name(group, i))
        if why is not None:
            raise RuntimeError(why)
        why = backends.unfusable_reason(param)
        if why is not None and fused_only:
            raise RuntimeError(
                f"FAdam backend={group['backend']!r} cannot update {_param_name(group, i)}: "
                f"it {why}. Use backend=None or 'reference' (backend=None runs such "
                "parameters on the reference backend and the others fused).")
        return why is None


def _bad_state(name: str, param: Tensor, saved: dict[str, Any], shapes: dict[str, torch.Size],
               kind: str) -> str:
    for key, shape in shapes.items():
        if saved.get(key) is None:
            return (f"The {kind} state of {name} has no {key!r} (it has {sorted(saved)}); "
                    "load a complete state_dict, or clear this parameter's state.")
        if saved[key].shape != shape:
            need = "" if shape == param.shape else f" (which needs {tuple(shape)})"
            return (f"The {kind} state {key!r} of {name} has shape {tuple(saved[key].shape)} but "
                    f"the parameter now has shape {tuple(param.shape)}{need} (was param.data "
                    "replaced?); clear this parameter's state (opt.state.pop(param)) to start it "
                    "afresh.")
    raise AssertionError("unreachable")


# ---- plan ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Bucket:
    """Tensors of one group, device and dtype that one backend steps together."""

    backend: str  # a fused backend's name, or "reference"
    hyper: Hyper
    params: list[Tensor] = dataclasses.field(default_factory=list)
    grads: list[Tensor] = dataclasses.field(default_factory=list)
    momentums: list[Tensor] = dataclasses.field(default_factory=list)
    fims: list[Tensor] = dataclasses.field(default_factory=list)
    steps: list[Tensor] = dataclasses.field(default_factory=list)
    # DTensor parameters' buckets hold their local shards and say how they are sharded.
    shards: sharded.Shards | None = None

    # The state tensors of a parameter, in the order _Planner.emit lists them.
    STATE_KEYS: ClassVar[tuple[str, ...]] = ("momentum", "fim", "step")

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def take_state(self, states: Sequence[Tensor]) -> None:
        """Fills the state lists from the parameters' state tensors in STATE_KEYS order."""
        self.momentums, self.fims, self.steps = (list(states[k::3]) for k in range(3))

    def localize(self) -> None:
        """A sharded bucket's tensors become their local shards ([note: sharded parameters] in
        sharded.py); a shard's gradient in another layout is copied into the shard's."""
        self.shards = sharded.Shards(self.params[0].device, clip=self.hyper.clip > 0)
        for j, (param, grad) in enumerate(zip(self.params, self.grads)):
            local_param, local_grad = sharded.localize(param, grad)
            self.shards.add(param, local_param.numel())
            if self.backend != "reference" and local_grad.stride() != local_param.stride():
                local_grad = torch.empty_like(local_param).copy_(local_grad)
            self.params[j], self.grads[j] = local_param, local_grad
            self.momentums[j] = sharded.local(self.momentums[j])
            self.fims[j] = sharded.local(self.fims[j])


class PhaseRunner:
    """A planned bucket that runs its own ops within run_step's step ([note: optimizer extension
    point]): ``phase_a`` runs with every bucket's phase A (read-only: it may only raise the skip
    flag and fill its own scratch), ``phase_b`` with every phase B (a no-op when the combined
    skip flag is set). run_step increments ``steps`` before phase A and undoes it on a skip."""

    steps: list[Tensor]
    device: torch.device
    shards = None  # no sharded tensors: run_step's all-reduce skips it

    def phase_a(self, skip: Tensor, grad_scale: Tensor | None) -> None:
        raise NotImplementedError

    def phase_b(self, skip: Tensor, grad_scale: Tensor | None) -> None:
        raise NotImplementedError


# Bucket classes by the kind name _Planner gives them (a name, so that the layout _init_group
# hands a compiled step holds constants only). FAdafactor adds its own.
BUCKET_KINDS: dict[str, type] = {"fadam": Bucket}


def make_buckets(hypers: Sequence[Hyper], params: list[Tensor], grads: list[Tensor],
                 states: list[Tensor], layout: Sequence[tuple]) -> list[Bucket | PhaseRunner]:
    """The buckets of checked tensor lists and their layout (_Planner.emit).

    Tensor operations a step needs before its kernels (gradient copies into the parameter's
    layout, a DTensor's local shards) happen here, where torch.compile traces them.
    """
    buckets = []
    for index, name, kind, first, end, first_state, is_sharded, copies in layout:
        cls = BUCKET_KINDS[kind]
        bucket = cls(name, hypers[index], params[first:end], grads[first:end])
        bucket.take_state(states[first_state:first_state + len(cls.STATE_KEYS) * (end - first)])
        for j in copies:
            bucket.grads[j] = torch.empty_like(bucket.params[j]).copy_(bucket.grads[j])
        if is_sharded:
            bucket.localize()
        buckets.append(bucket)
    return buckets


# ---- mutate -------------------------------------------------------------------------------------


def _on(value: Tensor | None, device: torch.device) -> Tensor | None:
    """`value` on `device`. Asynchronous towards an accelerator; towards the CPU it waits, since
    a CPU kernel reads the value on the host right away (non_blocking=True there returned a
    pinned tensor still being filled, and a CUDA NaN flag read as 0)."""
    if value is None or value.device == device:
        return value
    return value.to(device, non_blocking=device.type != "cpu")


def _lr_args(lr: float | Tensor, device: torch.device) -> tuple[Tensor | None, float]:
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
    return _on(lr, device), 0.0


def run_step(buckets: Sequence[Bucket | PhaseRunner], *, grad_scale: Tensor | None = None,
             found_inf: Tensor | None = None) -> Tensor | None:
    """Runs one step over planned buckets: all phase A, then all phase B.

    Returns the skip flag (a float32 0-dim tensor, 1 if a gradient anywhere was not finite or
    found_inf was set; equal on every device), or None when there is nothing to step. The flag
    is one tensor per device; flags of several devices are combined before any phase B, so a
    NaN on one device also skips the others. Steps are incremented before phase A and the flag
    is subtracted afterwards, as torch's fused Adam does with found_inf, so a skipped step leaves
    them bit-identical.
    """
    if not buckets:
        return None
    skips: dict[torch.device, Tensor] = {}
    for bucket in buckets:
        if bucket.device not in skips:
            if found_inf is None:
                skips[bucket.device] = torch.zeros((), dtype=torch.float32, device=bucket.device)
            else:
                found = _on(found_inf, bucket.device).reshape(())
                skips[bucket.device] = (found != 0).to(torch.float32)

    partials = []
    for bucket in buckets:
        skip, h = skips[bucket.device], bucket.hyper
        torch._foreach_add_(bucket.steps, 1)
        shards = bucket.shards
        if isinstance(bucket, PhaseRunner):
            bucket.phase_a(skip, _on(grad_scale, bucket.device))
            partials.append(None)
            continue
        if bucket.backend == "reference":
            skip.copy_(torch.maximum(skip, reference.nonfinite_flag(bucket.grads)))
            if shards is not None:
                shards.reference_phase_a(bucket.params, bucket.grads, bucket.fims, bucket.steps,
                                         beta2=h.beta2, eps=h.eps, p=h.p, maximize=h.maximize,
                                         grad_scale=_on(grad_scale, bucket.device))
            partials.append(None)
            continue
        ops = backends.fused(bucket.backend)
        sums = op_contract.new_partials(bucket.params, ops.chunk_size)
        if shards is not None:
            # A shard's sums leave phase A whatever its size (fuse_one_chunk=False); zeros, as
            # an empty shard's slot is never written.
            sums.zero_()
            shards.partials, shards.chunk_size = sums, ops.chunk_size
        ops.phase_a(bucket.params, bucket.grads, bucket.fims, bucket.steps, sums, skip,
                    _on(grad_scale, bucket.device), beta2=h.beta2, eps=h.eps, p=h.p, clip=h.clip,
                    maximize=h.maximize, chunk_size=ops.chunk_size,
                    fuse_one_chunk=shards is None)
        partials.append(sums)

    _combine_devices(skips)
    # Sharded tensors: their sums and the skip flag, all-reduced over their meshes.
    sharded.all_reduce([b.shards for b in buckets if b.shards is not None], skips)

    for bucket, sums in zip(buckets, partials):
        skip, h = skips[bucket.device], bucket.hyper
        scale = _on(grad_scale, bucket.device)
        if isinstance(bucket, PhaseRunner):
            bucket.phase_b(skip, scale)
        elif sums is None:
            for i, (param, grad, m, f, step) in enumerate(zip(
                    bucket.params, bucket.grads, bucket.momentums, bucket.fims, bucket.steps)):
                whole = {} if bucket.shards is None else bucket.shards.reference_args(i)
                # A shallow dict of the fields: dataclasses.asdict deep-copies them (a copy of a
                # tensor lr every step), and torch 2.11's dynamo cannot trace copy.deepcopy.
                hyper = {field.name: getattr(h, field.name) for field in dataclasses.fields(h)}
                reference.update_tensor(param, grad, m, f, step, skip, grad_scale=scale,
                                        **hyper, **whole)
        else:
            ops = backends.fused(bucket.backend)
            lr_tensor, lr = _lr_args(h.lr, bucket.device)
            ops.phase_b(bucket.params, bucket.grads, bucket.fims, bucket.momentums, bucket.steps,
                        sums, skip, scale, lr_tensor, lr=lr, beta1=h.beta1, beta2=h.beta2,
                        eps=h.eps, p=h.p, clip=h.clip, weight_decay=h.weight_decay,
                        maximize=h.maximize, chunk_size=ops.chunk_size,
                        fuse_one_chunk=bucket.shards is None)
        # Undo the increment of a skipped step. A CPU flag is read on the host with no device to
        # wait for, and a step that ran (nearly all of them) then saves a foreach over every step
        # tensor. Traced (torch.compile) and on accelerators the subtraction always runs.
        if (skip.device.type != "cpu" or torch.compiler.is_compiling()
                or bool(skip)):  # sync-ok: a CPU tensor
            torch._foreach_add_(bucket.steps, skip, alpha=-1)
    return next(iter(skips.values()))


def _combine_devices(skips: dict[torch.device, Tensor]) -> None:
    """One NaN anywhere skips the step everywhere. Combined on an accelerator when there is one;
    a CPU bucket next to a GPU one must wait for the GPU's flag (its kernel reads it on the
    host), the only sync of a step, and only in that mix."""
    if len(skips) < 2:
        return
    devices = sorted(skips, key=lambda d: d.type == "cpu")
    total = torch.stack([_on(skips[d], devices[0]) for d in devices]).amax()
    for d in devices:
        skips[d].copy_(_on(total, d))


# ---- functional ---------------------------------------------------------------------------------


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
    float32 tensors shaped like their parameters. The inputs are checked as the optimizer checks
    them, before anything is written. Returns the skip flag (a 0-dim float32 tensor, 1 if the
    step was skipped because a gradient was not finite), or None for empty lists.
    """
    n = len(params)
    if not (len(grads) == len(momentums) == len(fims) == len(state_steps) == n):
        raise ValueError(f"fadam: params, grads, momentums, fims and state_steps must have the "
                         f"same length, got {n}, {len(grads)}, {len(momentums)}, {len(fims)}, "
                         f"{len(state_steps)}")
    group = dict(params=list(params), lr=lr, betas=(beta1, beta2), eps=eps, clip=clip,
                 weight_decay=weight_decay, p=p, maximize=maximize, backend=backend)
    hyper = _group_hyperparameters(group, read_lr=False)
    states = [dict(momentum=m, fim=f, step=s) for m, f, s in zip(momentums, fims, state_steps)]
    planner = _Planner(dict(zip(params, states)))
    planner.group(0, group, grads)
    lists = [], [], [], []
    planner.emit(*lists)
    return run_step(make_buckets([hyper], *lists), grad_scale=grad_scale, found_inf=found_inf)
