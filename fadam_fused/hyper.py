"""Hyperparameters: torch.optim's rules and messages, plus the family's clip, p and eps rules.

One param group's hyperparameters are checked here whenever they can have changed: by the
constructor and ``add_param_group``, by ``load_state_dict`` (a checkpoint is input), and at
the start of every step (a user may assign ``group["eps"] = 0`` between steps). Only the
constructor, ``add_param_group`` and ``load_state_dict`` read a tensor lr's value: in a step
the lr may live on an accelerator, and reading it would sync.

Numbers are accepted as torch.optim accepts them: Python and numpy scalars, and one-element CPU
tensors for everything but lr (which may be a tensor on any device, for LR schedulers and
``torch.compile``). ``normalize`` turns the numbers of a group into Python floats once, so a
step reads plain floats.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import torch
from torch import Tensor

from . import op_contract

# The group keys of every optimizer of the family (the optimizer adds "backend").
KEYS = ("lr", "betas", "eps", "clip", "weight_decay", "p", "maximize")

# bfloat16 storage ([note: stochastic rounding] in op_contract.py): how a bfloat16 parameter (and
# a bfloat16 momentum) is written, and the momentum's dtype. Groups saved before these keys
# existed load with the defaults: today's round to nearest and a float32 momentum.
ROUNDINGS = ("nearest", "stochastic")
MOMENTUM_DTYPES = (torch.float32, torch.bfloat16)
STORAGE_DEFAULTS = {"bf16_rounding": "nearest", "rounding_seed": None,
                    "momentum_dtype": torch.float32}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Storage:
    """How a param group stores bfloat16 (STORAGE_DEFAULTS, checked by check_storage): the fields
    every member's hyperparameters share (Hyper, adafisher.AdaHyper)."""

    bf16_rounding: str = "nearest"
    rounding_seed: int | None = None
    momentum_dtype: torch.dtype = torch.float32
    # One bucket's ``int[] rounding`` argument (4 int64 per tensor), filled in by
    # plan.make_buckets for a stochastic bucket of bfloat16 tensors; empty: round to nearest.
    rounding: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Hyper(Storage):
    """One param group's hyperparameters as the kernels take them (clip 0 = off)."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    clip: float
    weight_decay: float
    p: float
    maximize: bool


def check_storage(group: dict[str, Any]) -> tuple[str, int | None, torch.dtype]:
    """(bf16_rounding, rounding_seed, momentum_dtype) of `group`, or a ValueError. A stochastic
    group's seed is drawn by ``normalize`` when it is None; a step refuses a stochastic group
    whose seed is still None (one assigned between steps), rather than draw it mid-training."""
    rounding = group.get("bf16_rounding", "nearest")
    if rounding not in ROUNDINGS:
        raise ValueError(f"Invalid bf16_rounding value: {rounding!r}; expected 'nearest' (round "
                         "to nearest even, as torch) or 'stochastic' (unbiased: bfloat16 "
                         "training without a float32 master copy)")
    seed = group.get("rounding_seed")
    if seed is not None:
        if isinstance(seed, Tensor) and seed.numel() == 1 and not seed.is_floating_point():
            seed = int(seed)  # sync-ok: a CPU tensor, checked at construction and load
        if (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                or not 0 <= int(seed) < 1 << 63):
            raise ValueError(f"Invalid rounding_seed value: {seed!r}; expected None (drawn from "
                             "torch's default generator) or an integer in [0, 2^63)")
        seed = int(seed)
    dtype = group.get("momentum_dtype", torch.float32)
    if dtype not in MOMENTUM_DTYPES:
        raise ValueError(f"Invalid momentum_dtype value: {dtype!r}; expected torch.float32 or "
                         "torch.bfloat16 (the FIM and its factors stay float32)")
    return rounding, seed, dtype


def draw_seed() -> int:
    """A rounding seed from torch's default CPU generator (torch.manual_seed makes it
    reproducible)."""
    return int(torch.randint(0, 1 << 62, (), dtype=torch.int64))  # sync-ok: a CPU tensor


def number(name: str, x: Any) -> float:
    """`x` as a float: a real number (not a bool) or a one-element CPU tensor; else ValueError."""
    if isinstance(x, Tensor):
        if x.numel() != 1 or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"Invalid {name} value: a tensor {name} must be one real element, "
                             f"got shape {tuple(x.shape)} of {x.dtype}")
        if x.device.type != "cpu":
            raise ValueError(f"Invalid {name} value: a tensor {name} must be on the CPU (the "
                             f"kernels take it as a launch constant), got {x.device}; pass a float")
        return float(x)  # sync-ok: a CPU tensor
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    raise ValueError(f"Invalid {name} value: {x!r}; expected a real number")


def is_bool(x: Any) -> bool:
    """A bool, or numpy's (np.True_ is not a subclass of bool; its type is numpy.bool)."""
    return isinstance(x, bool) or (type(x).__module__ == "numpy"
                                   and type(x).__name__ in ("bool", "bool_"))


def check_lr(lr: Any, *, read_value: bool) -> None:
    """lr: a finite number >= 0, or a one-element floating tensor (its value read only when
    ``read_value``: never in a step)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise ValueError(f"Tensor lr must be a floating-point tensor, got {lr.dtype}")
        if lr.device.type == "meta":
            raise ValueError("Tensor lr is on the meta device; put it on the CPU or on the "
                             "parameters' device")
        if read_value:
            value = float(lr)  # sync-ok: construction, add_param_group and load_state_dict only
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"Invalid learning rate: {value}")
        return
    if not (isinstance(lr, numbers.Real) and not isinstance(lr, bool)
            and math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr}")


def check(group: dict[str, Any], *, read_lr: bool) -> Hyper:
    """The Hyper of `group`, or a ValueError with torch.optim's message for the first bad value."""
    lr = group["lr"]
    check_lr(lr, read_value=read_lr)
    eps = number("epsilon", group["eps"])
    if not (math.isfinite(eps) and eps > 0.0):
        raise ValueError(f"Invalid epsilon value: {eps}; eps must be a finite number > 0")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
    beta1, beta2 = (number(f"beta parameter at index {i}", b) for i, b in enumerate(betas))
    for i, beta in enumerate((beta1, beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    clip = group["clip"]
    if clip is not None:
        clip = number("clip", clip)
        if not (math.isfinite(clip) and clip >= 0.0):
            raise ValueError(f"Invalid clip value: {clip}; use a finite number >= 0, or None or "
                             "0 to turn clipping off")
    weight_decay = number("weight_decay", group["weight_decay"])
    if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    p = number("p", group["p"])
    if not (math.isfinite(p) and p > 0.0):
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
    maximize = group["maximize"]
    if not is_bool(maximize):
        raise ValueError(f"Invalid maximize value: {maximize!r}; expected True or False")
    rounding, seed, momentum_dtype = check_storage(group)
    return Hyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps, clip=clip or 0.0,
                 weight_decay=weight_decay, p=p, maximize=bool(maximize),
                 bf16_rounding=rounding, rounding_seed=seed, momentum_dtype=momentum_dtype)


def normalize(group: dict[str, Any]) -> None:
    """Replaces the numbers of a checked group by Python floats (numpy scalars, CPU tensors), so
    every step reads plain floats; a tensor lr stays the tensor an LR scheduler updates."""
    if not isinstance(group["lr"], Tensor):
        group["lr"] = float(group["lr"])
    group["betas"] = tuple(number("beta", b) for b in group["betas"])
    for key in ("eps", "weight_decay", "p"):
        group[key] = number(key, group[key])
    if group["clip"] is not None:
        group["clip"] = number("clip", group["clip"])
    group["maximize"] = bool(group["maximize"])
    normalize_storage(group)


def normalize_storage(group: dict[str, Any]) -> None:
    """The storage keys of a checked group (check_storage): the defaults filled in, the seed an
    int, drawn (draw_seed) for a stochastic group that has none. Every member's normalize."""
    for key, default in STORAGE_DEFAULTS.items():
        group.setdefault(key, default)
    _, seed, _ = check_storage(group)
    if group["bf16_rounding"] == "stochastic" and seed is None:
        seed = draw_seed()
    group["rounding_seed"] = seed
