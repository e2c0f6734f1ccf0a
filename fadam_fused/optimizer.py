"""The torch.optim shell that every optimizer of the family shares.

``FisherOptimizer`` is a ``torch.optim.Optimizer``: param groups with their own hyperparameters,
``add_param_group``, LR schedulers, closures, hooks, ``state_dict`` / ``load_state_dict``,
``torch.amp.GradScaler`` and ``torch.compile(opt.step)``. Its ``step`` is the engine's
(engine.py, [note: the step engine]): validate and plan (plan.py), then run. An optimizer joins
the family by subclassing it and declaring, in ``kinds`` and ``kind_of``, which kind
(engine.Kind: its state, its buckets and their phases) steps each of its parameters; FAdam
(fadam.py) and FAdafactor (fadafactor.py) are such subclasses and nothing else.
"""

from __future__ import annotations

import types
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import backends, checks, checkpoint, engine, hyper, plan, sharded
from .engine import Kind

__all__ = ["FisherOptimizer"]


class FisherOptimizer(Optimizer):
    """The shared shell of FAdam, FAdafactor and their kin; see those classes for the math.

    Subclasses declare ``kinds`` (every Kind they use) and ``kind_of(param)``, and take these
    arguments (the defaults are the FAdam paper's; the subclasses' docstrings explain them).
    """

    # GradScaler.step sets `grad_scale` and `found_inf` on the optimizer instead of unscaling
    # the gradients itself, as it does for torch's fused Adam.
    _step_supports_amp_scaling = True

    kinds: ClassVar[tuple[Kind, ...]] = ()

    @staticmethod
    def kind_of(param: Tensor) -> Kind:
        """The kind that steps `param` (one of ``kinds``)."""
        raise NotImplementedError

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
        bf16_rounding: str = "nearest",
        rounding_seed: int | None = None,
        momentum_dtype: torch.dtype = torch.float32,
    ) -> None:
        self._init_optimizer(params, dict(lr=lr, betas=betas, eps=eps, clip=clip,
                                          weight_decay=weight_decay, p=p, maximize=maximize,
                                          backend=backend, bf16_rounding=bf16_rounding,
                                          rounding_seed=rounding_seed,
                                          momentum_dtype=momentum_dtype))

    def _init_optimizer(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                        defaults: dict[str, Any]) -> None:
        """torch.optim's constructor, after the defaults passed the member's checks."""
        self._check_group(defaults, read_lr=True)
        self._normalize(defaults)
        self._checked: dict[int, tuple] = {}
        self._sharded = False
        super().__init__(params, defaults)
        # Made here, not in the first step: a compiled first step must find it (an attribute
        # created inside a torch.compile'd step is not set on the eager object).
        self.skipped_steps: Tensor = torch.zeros((), dtype=torch.float32,
                                                 device=engine.first_device(self.param_groups))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            # A member that inherits its __init__ gets it under its own name, so that Python's
            # own errors name it ("FAdafactor.__init__() got an unexpected keyword argument"),
            # not the class it inherits from.
            base = cls.__init__
            init = types.FunctionType(base.__code__, base.__globals__, "__init__",
                                      base.__defaults__, base.__closure__)
            init.__kwdefaults__ = base.__kwdefaults__
            init.__qualname__ = f"{cls.__qualname__}.__init__"
            init.__doc__ = base.__doc__
            cls.__init__ = init

    @property
    def who(self) -> str:
        """The optimizer's name in error messages."""
        return type(self).__name__

    def _check_group(self, group: dict[str, Any], *, read_lr: bool) -> Any:
        """A group's hyperparameters as the member's kinds take them (hyper.Hyper for FAdam and
        FAdafactor), or the ValueError of the first bad value; the backend request too."""
        check_backend(group.get("backend"))
        return hyper.check(group, read_lr=read_lr)

    def _normalize(self, group: dict[str, Any]) -> None:
        """The numbers of a checked group as Python floats (hyper.normalize)."""
        hyper.normalize(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:  # validated after torch has filled in the defaults, and undone if invalid
            self._check_group(group, read_lr=True)
            for i, param in enumerate(group["params"]):
                name = checks.param_name(group, i)
                why = checks.param_refusal(self.who, sharded.local(param), name)
                if why is None:
                    why = self.kind_of(param).param_refusal(self.who, param, name)
                if why is not None:
                    raise ValueError(why)
            why = checks.shared_memory(self.who, self.param_groups)
            if why is not None:
                raise ValueError(why)
        except ValueError:
            self.param_groups.pop()
            raise
        self._normalize(group)
        self._sharded = self._sharded or any(sharded.is_dtensor(p) for p in group["params"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("backend", None)
            group.setdefault("clip", 1.0)
            group.setdefault("p", 0.5)
            for key, default in hyper.STORAGE_DEFAULTS.items():
                group.setdefault(key, default)
        if getattr(self, "skipped_steps", None) is None:
            self.skipped_steps = torch.zeros((), dtype=torch.float32,
                                             device=engine.first_device(self.param_groups))
        self.__dict__.setdefault("_checked", {})
        self.__dict__.setdefault("_sharded", any(
            sharded.is_dtensor(p) for g in self.param_groups for p in g["params"]))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict from any backend and device, keeping float32 state.

        A checkpoint is input: its hyperparameters pass the constructor's rules and its state
        the checks of checkpoint.check (every key the parameter's kind needs, in its shape,
        finite, a FIM >= 0, a whole step count >= 0) before anything is loaded, so a refused
        checkpoint leaves the optimizer exactly as it was. torch.optim would cast floating state
        to the parameter's dtype, rounding a bfloat16 parameter's float32 FIM to bfloat16
        (docs/design.md, section 5): the saved tensors are re-read at full precision onto each
        parameter's device, in its layout. Checkpoints of the public FAdam implementations (keys
        ``momentum`` and ``fim``, an integer or per-group ``step``) load too.
        """
        pairs = checkpoint.check(self, state_dict)
        # The backend is where this process runs the step, not a training hyperparameter: the
        # optimizer's own request stays (a backend="cuda" checkpoint loads on a CPU machine).
        requested = [group["backend"] for group in self.param_groups]
        with torch.inference_mode(False):
            super().load_state_dict(state_dict)
            for group, backend in zip(self.param_groups, requested):
                group["backend"] = backend
                self._normalize(group)
            checkpoint.restore(self, state_dict, pairs)
        self._checked.clear()

    def _init_group(self, params: list[Tensor], grads: list[Tensor], states: list[Tensor],
                    layout: list[plan.BucketSpec], refusals: list[tuple[str, str]]) -> None:
        """Checks every group's tensors, creates missing state, and lists the tensors that have
        a gradient, bucket by bucket (``layout``: one BucketSpec per bucket).

        The name is torch.optim's: torch.compile runs this method as Python while it traces a
        step (torch/_dynamo/variables/optimizer.py), so the state it reads and creates enters
        the graph as the optimizer's own tensors, and gradients as the parameters' ``.grad``.
        Unlike torch's, it covers all groups at once, so that a refused tensor in any group
        comes before the state of any new parameter is made. ``refusals``: on a sharded run,
        the errors this rank found (plan.Planner), as (exception name, message).
        """
        planner = plan.Planner(self.who, self.state, self.kind_of, checked=self._checked,
                               collect=self._sharded)
        position = 0  # a parameter's place in the optimizer: it seeds its stochastic rounding
        for index, group in enumerate(self.param_groups):
            planner.group(index, group["params"], [p.grad for p in group["params"]],
                          backend=group["backend"], lr=group["lr"], name=_namer(group),
                          momentum_dtype=group.get("momentum_dtype", torch.float32),
                          first_position=position)
            position += len(group["params"])
        if not planner.refusals:
            planner.commit()
            # Every check has passed: the state of new parameters joins the optimizer.
            self.state.update(planner.new_state)
        planner.emit(params, grads, states, layout)
        refusals.extend((r.error.__name__, str(r)) for r in planner.refusals)

    def _buckets(self, hypers: list[Any], params: list[Tensor], grads: list[Tensor],
                 states: list[Tensor], layout: list[plan.BucketSpec]) -> list[engine.Bucket]:
        """The step's buckets (plan.make_buckets). A member whose step has work beyond its
        parameters' buckets (AdaFisher's factor update) adds buckets here."""
        return plan.make_buckets(hypers, {k.name: k for k in self.kinds}, params, grads, states,
                                 layout)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Performs a single optimization step ([note: the step engine] in engine.py).

        Args:
            closure (Callable, optional): reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hypers = [self._check_group(group, read_lr=False) for group in self.param_groups]
        for index, h in enumerate(hypers):
            if getattr(h, "bf16_rounding", "nearest") == "stochastic" and h.rounding_seed is None:
                raise ValueError(
                    f"{self.who}: param group {index} has bf16_rounding='stochastic' but "
                    "rounding_seed None; set group['rounding_seed'] to an integer (the "
                    "constructor, add_param_group and load_state_dict draw one)")
        params, grads, states, layout, refusals = [], [], [], [], []
        self._init_group(params, grads, states, layout, refusals)
        buckets = self._buckets(hypers, params, grads, states, layout)
        skip, refused_elsewhere = engine.run_step(
            buckets, grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None), refused=bool(refusals))
        if refusals:
            error, message = refusals[0]
            raise (ValueError if error == "ValueError" else RuntimeError)(message)
        if (refused_elsewhere is not None and refused_elsewhere.device.type == "cpu"
                and bool(refused_elsewhere)):  # sync-ok: a CPU tensor (gloo)
            raise RuntimeError(
                f"{self.who}.step() was refused on another rank (its error names the "
                "parameter); nothing changed on any rank.")
        if skip is not None:
            self.skipped_steps.add_(engine.on(skip, self.skipped_steps.device))
        return loss


def check_backend(backend: Any) -> None:
    if backend is not None and backend not in backends.BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; expected None or one of "
                         f"{backends.BACKENDS}")


def _namer(group: dict[str, Any]) -> Callable[[int], str]:
    return lambda i: checks.param_name(group, i)
