"""load_state_dict: a checkpoint is input, checked in full before anything is loaded.

``check`` applies the constructor's rules to every saved group's hyperparameters (a tensor lr's
value included: a load may read it, a step may not) and checks every saved state: the keys the
parameter's kind needs, tensors of the shapes it needs, values that can be trained from (finite;
a FIM and its factors >= 0) and a step count that is a finite whole number >= 0. Any failure
raises a ValueError naming the parameter while the optimizer is untouched. ``restore`` runs after
torch.optim's own load: it re-reads the saved state at full precision (float32, not the
parameter's dtype; the momentum in its group's momentum_dtype), on each parameter's device, in
its layout (contiguous for a factor), placed like a DTensor parameter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import checks, sharded

if TYPE_CHECKING:
    from .optimizer import FisherOptimizer

# One saved parameter: (saved group, group, index in the group, saved id, parameter).
Pair = tuple[dict[str, Any], dict[str, Any], int, Any, torch.Tensor]


def check(opt: "FisherOptimizer", state_dict: dict[str, Any]) -> list[Pair]:
    """Every check of the module doc; returns the saved parameters paired with the optimizer's."""
    who = opt.who
    if not (isinstance(state_dict, dict) and isinstance(state_dict.get("param_groups"), list)
            and isinstance(state_dict.get("state"), dict)):
        raise ValueError(f"Cannot load this {who} state_dict: it needs 'state' (a dict) and "
                         "'param_groups' (a list), as Optimizer.state_dict() returns.")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    for saved_group, group in zip(saved_groups, opt.param_groups):
        if len(saved_group["params"]) != len(group["params"]):
            raise ValueError("loaded state dict contains a parameter group that doesn't match "
                             "the size of optimizer's group")
        merged = {**group, **{k: v for k, v in saved_group.items()
                              if k != "params" and k in group}}
        try:
            opt._check_group(merged, read_lr=True)
        except ValueError as exc:
            raise ValueError(f"Cannot load this {who} state_dict: its param group "
                             f"{saved_groups.index(saved_group)} has a value the constructor "
                             f"refuses: {exc}") from None
    pairs = [(saved_group, group, i, saved_id, param)
             for saved_group, group in zip(saved_groups, opt.param_groups)
             for i, (saved_id, param) in enumerate(zip(saved_group["params"], group["params"]))]
    for saved_group, group, i, saved_id, param in pairs:
        saved = saved_state.get(saved_id)
        if not saved:
            continue
        name = checks.param_name(group, i)
        if not isinstance(saved, dict):
            raise ValueError(f"Cannot load this {who} state_dict: the state of {name} is "
                             f"{type(saved).__name__}, not a dict.")
        shapes = opt.kind_of(param).state_shapes(param)
        missing = [key for key in shapes if not isinstance(saved.get(key), torch.Tensor)]
        if "step" not in saved and "step" not in saved_group:
            missing.append("step")
        if missing:
            raise ValueError(
                f"Cannot load this {who} state_dict: the state of {name} has no "
                f"{' or '.join(repr(k) for k in missing)} (it has {sorted(saved)}). Save it "
                f"from {who}, or drop the parameter's state.")
        step = saved["step"] if "step" in saved else saved_group["step"]
        why = checks.saved_step_problem(step)
        if why is not None:
            raise ValueError(f"Cannot load this {who} state_dict: the 'step' of {name} {why}.")
        for key, shape in shapes.items():
            value = saved[key]
            if value.shape != shape:
                need = ("" if shape == param.shape else
                        f" (which needs {key!r} of shape {tuple(shape)})")
                raise ValueError(
                    f"Cannot load this {who} state_dict: the saved {key!r} of {name} has shape "
                    f"{tuple(value.shape)}, but the parameter has shape {tuple(param.shape)}"
                    f"{need}. Was it saved for another model, or with the parameters in another "
                    "order?")
            why = checks.saved_state_problem(key, value, shape)
            if why is not None:
                raise ValueError(f"Cannot load this {who} state_dict: the saved {key!r} of "
                                 f"{name} {why}.")
    return pairs


def restore(opt: "FisherOptimizer", state_dict: dict[str, Any], pairs: list[Pair]) -> None:
    """After torch.optim's load: every parameter's state from the saved tensors (module doc)."""
    saved_state = state_dict["state"]
    for saved_group, _, _, saved_id, param in pairs:
        saved = saved_state.get(saved_id)
        if not saved:
            continue
        kind = opt.kind_of(param)
        state = opt.state[param]
        # The kind's fresh state says where each tensor lives: the parameter's layout (or a
        # factor's contiguous one), device, and a DTensor parameter's placements; the momentum
        # takes the group's momentum_dtype (a bfloat16 momentum loads into a float32 one and
        # back: the group, restored from the checkpoint, decides).
        template = kind.new_state(param)
        momentum_dtype = saved_group.get("momentum_dtype", torch.float32)  # the loaded group's
        for key in kind.state_shapes(param):
            like = template[key]
            if key == "momentum" and momentum_dtype != like.dtype:
                with torch.inference_mode(False):
                    like = like.to(momentum_dtype)
            state[key] = sharded.placed_like(like, saved[key])
        step = saved["step"] if "step" in saved else saved_group["step"]
        if isinstance(step, torch.Tensor):
            step = sharded.local(step)
        state["step"] = torch.as_tensor(step, dtype=torch.float32).to(param.device).reshape(())
