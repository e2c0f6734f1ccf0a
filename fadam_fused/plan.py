"""Validate and plan: one pass over a step's tensors, nothing written until every check passed.

[note: a step is validate, plan, mutate]
Every error a step can raise is raised before anything changes (docs/design.md, section 2).
``Planner.group`` checks one param group's parameters, gradients and state against what the
kernels need (dtypes, devices, shapes, layouts, sharding) and sorts the tensors into buckets, one
per (param group, backend, device, dtype, sharded, kind); whether a parameter can be fused is
decided here, once. Nothing is written: the state of new parameters waits in ``new_state`` and
state in a layout the kernels cannot walk (``param.data`` re-laid out mid-training) waits in
``relayouts``, both applied by ``commit`` once every group has passed. ``emit`` then lists the
tensors with one ``BucketSpec`` per bucket, and ``make_buckets`` turns them into the kinds'
buckets (gradient copies into the parameter's layout, a DTensor's local shards), where
torch.compile traces them.

On a sharded run a rank must not raise alone: the others would wait for it in the step's
all-reduce. There the planner collects per-parameter errors instead (``refusals``), steps the
refused parameters on placeholders (a zero gradient, fresh state, never stored), and the engine
runs the step with the skip flag set, so every rank takes part in the same collectives, nothing
changes anywhere, and every rank raises (sharded.all_reduce carries the count of refusing ranks).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from . import backends, checks, op_contract, sharded
from .engine import Bucket, Kind

# Tensor types of the common path (anything else, e.g. a DTensor, is checked in full).
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})
_F32 = torch.float32


class BucketSpec(NamedTuple):
    """One bucket of a planned step: its slice of the emitted lists, and how to build it."""

    group: int          # index of its param group
    backend: str        # the resolved backend: a fused one's name, or "reference"
    kind: str           # Kind.name
    first: int          # params[first:end], grads[first:end]
    end: int
    first_state: int    # states[first_state:first_state + len(kind.state_keys) * (end - first)]
    sharded: bool       # DTensor parameters: the bucket takes their local shards
    copies: tuple[int, ...]  # bucket indices whose gradient is copied into the param's layout
    positions: tuple[int, ...] = ()  # each parameter's place in the optimizer (rounding seeds)


class Refusal(Exception):
    """A per-parameter error, raised by the planner unless it collects them (sharded runs)."""

    def __init__(self, error: type[Exception], message: str) -> None:
        super().__init__(message)
        self.error = error


class Planner:
    """Validates one step's tensors and sorts them into buckets, in one pass over each group.

    Runs on every step over every parameter, so the common case (a plain, contiguous parameter
    of a fused dtype whose state the planner has seen in the right layout) is a few attribute
    compares and one state lookup per parameter; messages are built only when refusing.
    """

    def __init__(self, who: str, state: dict[Tensor, Any], kind_of: Callable[[Tensor], Kind], *,
                 checked: dict[int, tuple] | None = None, owns_state: bool = True,
                 collect: bool = False) -> None:
        self.who = who
        self.state = state
        self.kind_of = kind_of
        # The optimizer's own state may be re-laid out; the functional form's lists are the
        # caller's, updated in place, and must come in the layout the kernels walk.
        self.owns_state = owns_state
        self.collect = collect
        # id(parameter) -> (ids of its state tensors, shape, dtype, device, fused, the tensors,
        # momentum dtype): the state this planner's owner checked in full last time (see
        # _state_tensors). Keyed by id: Tensor.__hash__ is a Python function (~0.4 us); an id
        # reused by a new parameter finds other state tensors (the entry keeps its own alive).
        self.checked = {} if checked is None else checked
        self.refusals: list[Refusal] = []
        self.new_state: dict[Tensor, dict[str, Tensor]] = {}
        self.relayouts: list[tuple[dict[str, Any], str, Tensor | None]] = []
        self.relaid: set[int] = set()  # ids of the state dicts commit() re-laid out
        # (group index, backend, device, dtype, sharded, kind name) -> [(param, grad, state, its
        # state tensors in the kind's state_keys order)]
        self.buckets: dict[tuple, list[tuple[Tensor, Tensor, dict[str, Any], tuple]]] = {}
        self.kinds: dict[str, Kind] = {}
        self.momentum_dtype: torch.dtype | None = _F32  # the current group's (see group)

    # ---- one group --------------------------------------------------------------------------

    def group(self, index: int, params: Sequence[Tensor], grads: Sequence[Tensor | None], *,
              backend: str | None, lr: float | Tensor, name: Callable[[int], str],
              momentum_dtype: torch.dtype | None = torch.float32,
              first_position: int = 0) -> None:
        """Checks the tensors of param group `index` (or of the functional form's lists):
        `grads` parallel to `params`, `backend` the group's request, `name(i)` how errors name
        parameter i, `momentum_dtype` the group's (None: float32 or bfloat16, the functional
        form's lists as given), `first_position` the optimizer's index of params[0]."""
        self.momentum_dtype = momentum_dtype
        fused_only = backend not in (None, "reference")
        lr_device = lr.device if isinstance(lr, Tensor) else None
        resolved: dict[torch.device, str] = {}
        kind_of, kinds, state_get = self.kind_of, self.kinds, self.state.get
        fused_dtypes = backends.FUSED_DTYPES
        # Runs for every parameter on every step: with 4096 tensors of 256 elements each
        # microsecond per parameter is 4 ms of a ~35 ms step, so the common case reads each
        # tensor attribute once (an attribute read builds a Python object: ~0.1 us).
        for i, (param, grad) in enumerate(zip(params, grads)):
            if grad is None:
                continue
            chosen = "reference"
            try:
                plain = type(param) in _PLAIN
                dtype = param.dtype
                if plain and dtype in fused_dtypes and param.is_contiguous():
                    fusable = common = True
                else:
                    fusable, common = self._unusual(name(i), param, backend, fused_only), False
                device = param.device
                kind = kind_of(param)
                if kind.name not in kinds:
                    kinds[kind.name] = kind
                chosen = resolved.get(device)
                if chosen is None:
                    chosen = resolved[device] = self._backend(backend, device)
                    if lr_device is not None and lr_device.type != "cpu" and lr_device != device:
                        raise Refusal(ValueError,
                                      f"Tensor lr is on {lr_device} but {name(i)} is on "
                                      f"{device}; put lr on the CPU or on the parameters' device")
                if not fusable or (chosen != "reference"
                                   and kind.unfused_reason(param) is not None):
                    chosen = "reference"
                elif chosen != "reference" and not kind.has_kernels(chosen):
                    if fused_only:
                        raise Refusal(RuntimeError,
                                      f"{self.who} backend={backend!r} has no kernels for "
                                      f"{name(i)} in this build; use backend=None or "
                                      "'reference'")
                    chosen = "reference"
                if (not plain or type(grad) not in _PLAIN or grad.is_sparse
                        or grad.dtype != dtype or grad.shape != param.shape
                        or grad.device != device):
                    self._check_pair(name(i), param, grad)
                state = state_get(param)
                if state:
                    tensors = self._state_tensors(name, i, param, kind, state, device,
                                                  fused=chosen != "reference", common=common)
                else:
                    state = self.new_state[param] = kind.new_state(param)
                    if momentum_dtype not in (None, _F32) and "momentum" in state:
                        with torch.inference_mode(False):
                            state["momentum"] = state["momentum"].to(momentum_dtype)
                    tensors = kind.state_of(state)
            except Refusal as refusal:
                if not self.collect:
                    raise refusal.error(str(refusal)) from None
                # A sharded run: this rank steps the parameter on placeholders (a zero gradient,
                # fresh state) on the reference backend, with the step skipped, so that its
                # all-reduce has as many rows as the other ranks' (their order may differ: the
                # sums of a skipped step are never used).
                self.refusals.append(refusal)
                kind, device, chosen, dtype = kind_of(param), param.device, "reference", param.dtype
                kinds.setdefault(kind.name, kind)
                grad, state = torch.zeros_like(param), kind.new_state(param)
                tensors = kind.state_of(state)
            key = (index, chosen, device, dtype, type(param) not in _PLAIN, kind.name)
            entries = self.buckets.get(key)
            if entries is None:
                entries = self.buckets[key] = []
            entries.append((param, grad, state, tensors, first_position + i))

    def _backend(self, requested: str | None, device: torch.device) -> str:
        try:
            return backends.resolve(requested, device, who=self.who)
        except RuntimeError as exc:
            raise Refusal(RuntimeError, str(exc)) from None

    def _refuse(self, error: type[Exception], message: str) -> None:
        raise Refusal(error, message)

    def _check_pair(self, name: str, param: Tensor, grad: Tensor) -> None:
        why = checks.grad_mismatch(self.who, name, param, grad)
        if why is None:
            why = sharded.check(name, param, grad)
        if why is not None:
            self._refuse(RuntimeError, why)

    def _unusual(self, name: str, param: Tensor, backend: str | None, fused_only: bool) -> bool:
        """Checks a parameter off the common path (sharded, not contiguous, or not of a fused
        dtype); returns whether a fused backend can update it."""
        param = sharded.local(param)
        why = checks.param_refusal(self.who, param, name)
        if why is not None:
            self._refuse(RuntimeError, why)
        why = backends.unfusable_reason(param)
        if why is not None and fused_only:
            self._refuse(RuntimeError,
                         f"{self.who} backend={backend!r} cannot update {name}: it {why}. "
                         "Use backend=None or 'reference' (backend=None runs such parameters on "
                         "the reference backend and the others fused).")
        return why is None

    def _state_tensors(self, name: Callable[[int], str], i: int, param: Tensor, kind: Kind,
                       state: dict[str, Any], device: torch.device, fused: bool,
                       common: bool) -> tuple[Tensor, ...]:
        """The state tensors of `param` in its kind's ``state_keys`` order, once checked.

        On the common path (`common`: a plain contiguous parameter of a fused dtype) they are
        checked in full (``_check_state``) only when they are not the tensors this optimizer
        checked last time for a contiguous parameter of the same shape, dtype and device: the
        state changes only through load_state_dict, a user's assignment or ``param.data`` being
        replaced, and a full check costs ~5 us per parameter, 20 ms per step for 4096 tensors.
        The parameter's name (`name(i)`, ~1.5 us: it formats the shape) is made only for a full
        check.
        """
        try:
            tensors = kind.state_of(state)
        except KeyError:
            tensors = None
            self._check_state(name(i), param, kind, state, fused)  # raises, naming the key
        ids = tuple(map(id, tensors))
        seen = self.checked.get(id(param)) if common else None
        if (seen is not None and seen[0] == ids and seen[1] == param.shape
                and seen[2] is param.dtype and seen[3] == device and seen[4] >= fused
                and seen[6] is self.momentum_dtype):
            return tensors
        if self._check_state(name(i), param, kind, state, fused) and common:
            # Clean, and the entry keeps the tensors alive, so their ids cannot be reused.
            self.checked[id(param)] = (ids, param.shape, param.dtype, device, fused, tensors,
                                       self.momentum_dtype)
        return tensors

    def _check_state(self, name: str, param: Tensor, kind: Kind, state: dict[str, Any],
                     fused: bool) -> bool:
        """The state of parameter i: every key of its kind, float32 on its device, in the shape
        the kind needs; for the fused kernels also in the layout they walk (the parameter's for
        tensors shaped like it, contiguous for the others). State in another layout is
        re-laid out at commit (returns False then)."""
        shapes = kind.state_shapes(param)
        want = self.momentum_dtype
        dtypes = {"momentum": (_F32, torch.bfloat16) if want is None else want}
        why = checks.state_problem(self.who, name, param, state, shapes, dtypes)
        if why is not None:
            self._refuse(RuntimeError, why)
        clean = True
        local_param = sharded.local(param)
        for key, shape in shapes.items():
            local = sharded.local(state[key])
            like_param = shape == param.shape
            if fused and (local.stride() != local_param.stride() if like_param
                          else not local.is_contiguous()):
                if not self.owns_state:
                    self._refuse(RuntimeError,
                                 f"The {key!r} of {name} has strides "
                                 f"{tuple(local.stride())}; the fused kernels need those of the "
                                 "parameter (contiguous for a factor): pass it in that layout.")
                self.relayouts.append((state, key, param if like_param else None))
                clean = False
        return clean

    # ---- after every group ------------------------------------------------------------------

    def commit(self) -> None:
        """Every check has passed: state in another layout is re-laid out (the same values), and
        the caller adds ``new_state`` to the optimizer."""
        for state, key, param in self.relayouts:
            self.relaid.add(id(state))
            value = state[key]
            with torch.inference_mode(False):
                if param is None:
                    state[key] = value.contiguous()
                else:
                    state[key] = sharded.state_like(param, value)

    def emit(self, params: list[Tensor], grads: list[Tensor], states: list[Tensor],
             layout: list[BucketSpec]) -> None:
        """Appends the checked tensors bucket by bucket (``states``: each parameter's state
        tensors in its kind's ``state_keys`` order), and one BucketSpec per bucket."""
        relaid = self.relaid
        for (index, name, _, _, is_sharded, kind_name), entries in self.buckets.items():
            first, first_state = len(params), len(states)
            copies = []
            kind = self.kinds[kind_name]
            # The kernels walk a parameter, its gradient and its state in one memory order.
            # The state is created (and loaded) in the parameter's layout; a gradient in
            # another layout (p.grad = g.t().contiguous().t(), or a channels_last parameter
            # with a contiguous gradient) is copied into it: a step's worth of extra traffic,
            # no sync. (A shard's layout is compared after to_local().) Two contiguous tensors
            # of one shape are walked alike, and is_contiguous() builds no tuple as stride() does.
            check_layout = name != "reference" and not is_sharded
            for j, (param, grad, state, tensors, _) in enumerate(entries):
                if relaid and id(state) in relaid:
                    tensors = kind.state_of(state)
                if check_layout and not (grad.is_contiguous() and param.is_contiguous()) \
                        and grad.stride() != param.stride():
                    copies.append(j)
                params.append(param)
                grads.append(grad)
                states.extend(tensors)
            positions = [entry[4] for entry in entries]
            layout.append(BucketSpec(index, name, kind_name, first, len(params), first_state,
                                     is_sharded, tuple(copies), tuple(positions)))


def make_buckets(hypers: Sequence[Any], kinds: dict[str, Kind], params: list[Tensor],
                 grads: list[Tensor], states: list[Tensor],
                 layout: Sequence[BucketSpec]) -> list[Bucket]:
    """The buckets of checked tensor lists and their layout (Planner.emit).

    Tensor operations a step needs before its kernels (gradient copies into the parameter's
    layout, a DTensor's local shards) happen here, where torch.compile traces them.
    """
    buckets = []
    for spec in layout:
        kind = kinds[spec.kind]
        bucket_params = params[spec.first:spec.end]
        originals = list(bucket_params)
        bucket_grads = grads[spec.first:spec.end]
        count = len(kind.state_keys) * (spec.end - spec.first)
        bucket_states = states[spec.first_state:spec.first_state + count]
        for j in spec.copies:
            bucket_grads[j] = torch.empty_like(bucket_params[j]).copy_(bucket_grads[j])
        shards = None
        if spec.sharded:
            shards = sharded.Layout(sharded.local(bucket_params[0]).device)
            for j, (param, grad) in enumerate(zip(bucket_params, bucket_grads)):
                local_param, local_grad = sharded.localize(param, grad)
                shards.add(param, local_param)
                if spec.backend != "reference" and local_grad.stride() != local_param.stride():
                    local_grad = torch.empty_like(local_param).copy_(local_grad)
                bucket_params[j], bucket_grads[j] = local_param, local_grad
            bucket_states = [sharded.local(t) for t in bucket_states]
        hyper = _with_rounding(hypers[spec.group], spec, kind, bucket_params, bucket_states,
                               shards)
        buckets.append(kind.bucket(spec.backend, hyper, bucket_params,
                                   bucket_grads, bucket_states, shards, originals))
    return buckets


def _with_rounding(hyper: Any, spec: BucketSpec, kind: Kind, params: list[Tensor],
                   states: list[Tensor], shards: sharded.Layout | None) -> Any:
    """`hyper` with its bucket's ``rounding`` list ([note: stochastic rounding] in
    op_contract.py) when the group rounds stochastically and the bucket holds a bfloat16
    parameter or momentum; else `hyper` as it is (an empty list: round to nearest)."""
    if getattr(hyper, "bf16_rounding", "nearest") != "stochastic" or not params:
        return hyper
    momentums = (states[kind.state_keys.index("momentum")::len(kind.state_keys)]
                 if "momentum" in kind.state_keys else [])
    if params[0].dtype != torch.bfloat16 and not any(
            m.dtype == torch.bfloat16 for m in momentums):
        return hyper
    rounding: list[int] = []
    for j, param in enumerate(params):
        seed = op_contract.tensor_seed(hyper.rounding_seed, spec.positions[j])
        if shards is None:
            rounding += [seed, 0, max(1, param.numel()), max(1, param.numel())]
        else:
            rounding += shards.rounding_row(j, seed)
    return dataclasses.replace(hyper, rounding=tuple(rounding))
