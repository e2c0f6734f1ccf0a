"""The checks of parameters, gradients and state, each with a message that names the parameter.

Every function here returns ``None`` when all is well, or the message of the error the caller
raises (so a caller can decide what to raise, and a step can first collect the errors of every
rank of a sharded run). Nothing here writes anything. The optimizer name (``who``) is the class
the user constructed, so FAdafactor's errors say FAdafactor.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from . import sharded


def param_name(group: dict[str, Any], index: int) -> str:
    """How errors name parameter `index` of `group`: by its name when the optimizer was given
    ``named_parameters()``, else by its index and shape."""
    names = group.get("param_names")
    if names is not None:
        return f"parameter {names[index]!r}"
    return f"parameter {index} of its param group (shape {tuple(group['params'][index].shape)})"


def param_refusal(who: str, param: Tensor, name: str) -> str | None:
    """Why no backend of optimizer `who` can optimize `param` (None: it can)."""
    if param.is_complex():
        return (f"{who} does not support complex parameters: {name} is {param.dtype}. Optimize "
                "torch.view_as_real(param) instead.")
    if not param.is_floating_point():
        return (f"{who} optimizes floating-point parameters only: {name} is {param.dtype} "
                "(torch.optim.Adam refuses it too).")
    if param.is_inference():
        return (f"{who} cannot optimize {name}: it is an inference tensor (made under "
                "torch.inference_mode()), which cannot be updated in place outside it. Create the "
                "parameter outside inference mode, or pass param.clone() made outside it.")
    if torch._debug_has_internal_overlap(param) == 1:  # MemOverlap::Yes, e.g. stride 0
        return (f"{who} cannot optimize {name}: its elements share memory (shape "
                f"{tuple(param.shape)}, strides {tuple(param.stride())}, e.g. from expand()). "
                "Give it memory of its own (.contiguous()).")
    return None


def _span(t: Tensor) -> tuple[int, int]:
    """[first, last + 1) element offsets of `t` in its storage (t has no internal overlap)."""
    lo = hi = t.storage_offset()
    for size, stride in zip(t.shape, t.stride()):
        if size > 1:
            if stride > 0:
                hi += (size - 1) * stride
            else:
                lo += (size - 1) * stride
    return lo, hi + 1


def shared_memory(who: str, groups: Sequence[dict[str, Any]]) -> str | None:
    """Why two parameters cannot be optimized together because they share elements (None: no
    two do). Each would be updated from a stale read of the other, and the fused kernels would
    race on the shared elements. Views of one tensor that share no element (``w[:, :3]`` and
    ``w[:, 3:]``, ``w[::2]`` and ``w[1::2]``) are fine, as for torch.optim.Adam."""
    by_storage: dict[Any, list[tuple[int, int, Tensor, str]]] = {}
    seen: dict[int, str] = {}
    for group in groups:
        for i, param in enumerate(group["params"]):
            name = param_name(group, i)
            if id(param) in seen:
                return (f"{who} was given the same parameter twice ({seen[id(param)]} and "
                        f"{name}); pass each parameter once (torch.optim warns of this, and "
                        "would update it twice per step).")
            seen[id(param)] = name
            local = sharded.local(param)
            if local.numel() == 0 or local.device.type == "meta":
                continue
            key = (local.device, local.untyped_storage().data_ptr())
            by_storage.setdefault(key, []).append((*_span(local), local, name))
    for items in by_storage.values():
        if len(items) < 2:
            continue
        items.sort(key=lambda item: item[0])
        # Spans that do not intersect share no element; only intersecting ones (interleaved
        # views, or real overlap) are compared element by element, on a one-byte mask of the
        # storage span they cover (construction time only).
        for a, b in zip(items, items[1:]):
            if b[0] >= a[1]:
                continue
            lo, hi = min(a[0], b[0]), max(a[1], b[1])
            mask = torch.zeros(hi - lo, dtype=torch.bool)
            for _, _, t, _ in (a, b):
                view = mask.as_strided(t.shape, t.stride(), t.storage_offset() - lo)
                if view.any():
                    return (f"{who} cannot optimize {a[3]} and {b[3]}: their storage overlaps "
                            "(views of one tensor that share elements). Give each parameter its "
                            "own memory, e.g. with .clone()")
                view.fill_(True)
    return None


def grad_mismatch(who: str, name: str, param: Tensor, grad: Tensor) -> str | None:
    """Why `grad` cannot be the gradient of `param` (None: it can)."""
    if grad.is_sparse:
        return (f"{who} does not support sparse gradients: {name} has a {grad.layout} gradient. "
                "Use a dense gradient (e.g. nn.Embedding(sparse=False)).")
    if grad.shape != param.shape:
        return (f"The gradient of {name} has shape {tuple(grad.shape)} but the parameter has "
                f"shape {tuple(param.shape)}.")
    if grad.dtype != param.dtype:
        return (f"The gradient of {name} is {grad.dtype} but the parameter is {param.dtype}; "
                "cast the gradient to the parameter's dtype.")
    if grad.device != param.device:
        return (f"The gradient of {name} is on {grad.device} but the parameter is on "
                f"{param.device}; move it to the parameter's device.")
    return None


def state_problem(who: str, name: str, param: Tensor, state: dict[str, Any],
                  shapes: dict[str, torch.Size],
                  dtypes: dict[str, Any] | None = None) -> str | None:
    """Why the state of `param` cannot be stepped (None: it can): a missing key, or a tensor of
    another shape, dtype or device than the kernels need. `shapes` are the state tensors of the
    parameter's kind besides ``step`` (one float32 element), float32 unless `dtypes` names
    another dtype for a key (the momentum of a momentum_dtype=torch.bfloat16 group; a tuple: any
    of them)."""
    fix = "load it with load_state_dict, which converts it"
    afresh = "clear this parameter's state (opt.state.pop(param)) to start it afresh"
    for key, shape in (("step", None), *shapes.items()):
        value = state.get(key)
        if not isinstance(value, Tensor):
            return (f"The {who} state of {name} has no {key!r} tensor (it has {sorted(state)}); "
                    f"load a complete state_dict, or {afresh}.")
        if shape is None and value.numel() != 1:
            return (f"The {who} state 'step' of {name} has shape {tuple(value.shape)}, not one "
                    f"element; {fix}.")
        if shape is not None and value.shape != shape:
            need = "" if shape == param.shape else f" (which needs {tuple(shape)})"
            return (f"The {who} state {key!r} of {name} has shape {tuple(value.shape)} but the "
                    f"parameter now has shape {tuple(param.shape)}{need} (was param.data "
                    f"replaced?); {afresh}.")
        want = (dtypes or {}).get(key, torch.float32)
        wanted = want if isinstance(want, tuple) else (want,)
        if value.dtype not in wanted or value.device != param.device:
            names = " or ".join(str(w).removeprefix("torch.") for w in wanted)
            hint = fix
            if key == "momentum" and value.dtype in (torch.float32, torch.bfloat16):
                hint = ("its group's momentum_dtype says otherwise: load a state_dict (which "
                        f"converts it), or {afresh}")
            return (f"The {who} state {key!r} of {name} must be {names} on {param.device}, got "
                    f"{value.dtype} on {value.device}; {hint}.")
        if value.is_inference() and not torch.is_inference_mode_enabled():
            return (f"The {who} state {key!r} of {name} is an inference tensor (made under "
                    "torch.inference_mode()) and cannot be updated outside it; step inside "
                    f"inference mode, or {afresh}.")
    return None


# ---- checkpoints --------------------------------------------------------------------------------


def _bad_values(t: Tensor, *, nonnegative: bool) -> str | None:
    """Why a loaded state tensor's values cannot be trained from (a host read: load only)."""
    local = sharded.local(t)
    if not local.is_floating_point():
        return f"is {local.dtype}, not a floating-point tensor"
    if local.numel() == 0:
        return None
    values = local.detach()
    if not bool(torch.isfinite(values).all()):  # sync-ok: load_state_dict only
        return "holds NaN or inf values"
    if nonnegative and bool((values < 0).any()):  # sync-ok: load_state_dict only
        return "holds negative values (a Fisher information is a mean of squares, >= 0)"
    return None


def saved_step_problem(step: Any) -> str | None:
    """Why a checkpoint's step count cannot be loaded (None: it can): it must be a finite whole
    number >= 0 (a Python or numpy number, or a one-element tensor)."""
    if isinstance(step, Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            return f"is a tensor of shape {tuple(step.shape)} ({step.dtype}), not one number"
        value = float(sharded.local(step).reshape(()))  # sync-ok: load_state_dict only
    elif isinstance(step, (int, float)) or type(step).__module__ == "numpy":
        try:
            value = float(step)
        except (TypeError, ValueError):
            return f"is {step!r}, not a number"
    else:
        return f"is {step!r} ({type(step).__name__}), not a number"
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        return f"is {value}, not a whole number >= 0"
    return None


def saved_state_problem(key: str, value: Any, shape: torch.Size) -> str | None:
    """Why a checkpoint's state tensor `key` cannot be loaded for a parameter whose kind needs
    `shape` (None: it can)."""
    if not isinstance(value, Tensor):
        return f"is {type(value).__name__}, not a tensor"
    if value.shape != shape:
        return f"has shape {tuple(value.shape)}, but the parameter needs {tuple(shape)}"
    return _bad_values(value, nonnegative=key != "momentum")


def first(messages: Iterable[str | None]) -> str | None:
    return next((m for m in messages if m is not None), None)
