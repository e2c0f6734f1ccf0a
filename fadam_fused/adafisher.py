r"""AdaFisher (Gomes et al., ICLR 2025): Adam-style momentum preconditioned by a Kronecker-factored
diagonal Fisher, as a member of the family (engine.py, [note: the step engine]).

[note: AdaFisher factors]
For each supported layer (Linear, Conv2d, BatchNorm2d, LayerNorm) the Fisher of its weight
(out x in; a conv's flattened as out x in/groups*kh*kw) and bias is the Kronecker product of two
diagonals: H, over the input side (from the layer's input activations, plus one entry for the
bias column), and S, over the outputs (from the gradient of the layer's output). On update steps
(every ``update_interval`` step() calls, the published ``TCov``) hooks measure both per call of
the layer (``layer_factors``), the calls and micro-batches of one step are averaged into one new
value, which is min-max normalised and folded into a running value that starts at 1:

    H = (1 - gamma1) H + gamma2 minmax(H_new),   minmax(x) = (x - min) / (max - min + 1e-6),
                                                 +inf -> 1 and -inf -> 0 first

and likewise S. The update then divides by F = S H^T + damping per element (F = 1 for a parameter
of no supported layer), computed from the two vectors in the kernel ([note: the AdaFisher op
contract] in op_contract.py), never materialised.

What is reproduced from the published implementation (AtlasAnalyticsLab/AdaFisher,
``optimizers/AdaFisher.py``), and what is done otherwise (docs/design.md, section 10):
- the factor formulas of Linear, BatchNorm2d and LayerNorm, the min-max normalisation with its
  inf rule and absolute 1e-6, the running average and its start at 1, F, the update rules of
  AdaFisher and AdaFisherW and their order of operations;
- Conv2d's H is the mean over batch, groups and output positions of each patch element's square
  (the published code's divisor in its newest version also counts the patch size, and it ignores
  dilation); it is computed as sums of shifted windows of x^2, without the im2col copy;
- parameters are paired with layers by ownership (which module holds them), not by walking two
  lists in step, so parameters outside supported layers and parameters without gradients are
  simply what they are (F = 1, or not stepped);
- the calls and micro-batches of one step give one factor update (the published code updates
  per forward and backward call), counted when the layer's output gradient arrives, so a forward
  that is recomputed (activation checkpointing) or never back-propagated does not count, and a
  layer called twice per step counts both calls;
- under DDP / FSDP2 the new factors are averaged over the data-parallel ranks before the min-max,
  in one packed collective on update steps only (the published code all-reduces both factors of
  every layer on every step); with a GradScaler, S is divided by the scale squared.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
from torch import Tensor, nn

from . import backends, checks, engine, hyper, sharded
from .engine import Bucket, Kind
from .optimizer import FisherOptimizer, check_backend

__all__ = ["AdaFisher", "AdaFisherW", "layer_factors", "SUPPORTED_LAYERS"]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm)


# ---- the factors of one call of a layer ---------------------------------------------------------


def _conv_input_factor(module: nn.Conv2d, x: Tensor, acc: torch.dtype) -> Tensor:
    """H of a Conv2d call without im2col: for each patch element (c, y, x) of a group, the sum
    over batch, groups and output positions of the squared input it reads is the sum of a
    strided window of x^2 summed over the batch, one window per (y, x) kernel offset."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    batch = x.shape[0]
    x2 = x.to(acc).square().sum(0)  # (C, H, W): O(input) memory
    pad = module._reversed_padding_repeated_twice  # left, right, top, bottom (also "same")
    if module.padding_mode != "zeros":  # reflect / replicate / circular pad x, not x^2
        x2 = nn.functional.pad(x.to(acc), pad, mode=module.padding_mode).square().sum(0)
    elif any(pad):
        x2 = nn.functional.pad(x2, pad)
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    groups = module.groups
    channels, height, width = x2.shape
    oh = (height - dh * (kh - 1) - 1) // sh + 1
    ow = (width - dw * (kw - 1) - 1) // sw + 1
    h = x2.new_zeros(channels // groups, kh, kw)
    if oh > 0 and ow > 0:
        for y in range(kh):
            for z in range(kw):
                window = x2[:, y * dh:y * dh + (oh - 1) * sh + 1:sh,
                            z * dw:z * dw + (ow - 1) * sw + 1:sw]
                h[:, y, z] = window.sum((1, 2)).view(groups, -1).sum(0)
    rows = batch * groups * oh * ow
    return h.reshape(-1) / max(rows, 1)


def input_factor(module: nn.Module, x: Tensor) -> Tensor:
    """The raw H of one call of `module` on input `x`, in float32 (float64 for float64 input)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(module, nn.Linear):
        h = x.reshape(-1, x.shape[-1]).to(acc)
        factor = h.square().sum(0) / max(h.shape[0], 1)
    elif isinstance(module, nn.Conv2d):
        factor = _conv_input_factor(module, x, acc)
    elif isinstance(module, nn.BatchNorm2d):
        # The published form: sum_h = sum over batch and positions / spatial^2 per channel,
        # then [sum_c sum_h^2, C] / B^2 (a weight entry and a bias entry).
        batch, channels = x.shape[0], x.shape[1]
        spatial = x.shape[2] * x.shape[3]
        sum_h = x.to(acc).sum((0, 2, 3)) / spatial ** 2
        return torch.stack([sum_h.square().sum(), sum_h.new_tensor(float(channels))]) / batch ** 2
    else:  # LayerNorm, the published form: every dim but dim 1 reduced
        dims = [d for d in range(x.dim()) if d != 1]
        norm = math.prod(x.shape[d] for d in dims if d != 0)
        sum_h = x.to(acc).sum(dims) / norm ** 2
        return (torch.stack([sum_h.square().sum(), sum_h.new_tensor(float(x.shape[1]))])
                / x.shape[0] ** 2)
    if module.bias is not None:  # the bias column of 1s: its mean square is 1
        factor = torch.cat([factor, factor.new_ones(1)])
    return factor


def output_factor(module: nn.Module, s: Tensor) -> Tensor:
    """The raw S of one call of `module` from the gradient `s` of its output."""
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    s = s.to(acc)
    if isinstance(module, nn.Linear):
        rows = s.reshape(-1, s.shape[-1])
        return rows.square().sum(0) / max(rows.shape[0], 1)
    if isinstance(module, nn.Conv2d):
        if s.dim() == 3:
            s = s.unsqueeze(0)
        positions = s.shape[0] * s.shape[2] * s.shape[3]
        return s.square().sum((0, 2, 3)) / max(positions, 1)
    if isinstance(module, nn.BatchNorm2d):
        return s.sum((0, 2, 3)).square() / s.shape[0]
    return s.sum(tuple(range(s.dim() - 1))).square() / s.shape[0]  # LayerNorm


def layer_factors(module: nn.Module, x: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor]:
    """(H, S) of one call of a supported layer: its input and the gradient of its output."""
    return input_factor(module, x), output_factor(module, grad_output)


def supported(module: nn.Module) -> bool:
    """A layer whose parameters get factors: Linear, Conv2d (2-D kernels), BatchNorm2d with an
    affine weight and bias, LayerNorm over one trailing dim with an affine weight."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return True
    if isinstance(module, nn.BatchNorm2d):
        return module.weight is not None and module.bias is not None
    if isinstance(module, nn.LayerNorm):
        return module.weight is not None and len(module.normalized_shape) == 1
    return False


def factor_sizes(module: nn.Module) -> tuple[int, int]:
    """(len(H), len(S)) of a supported layer."""
    if isinstance(module, nn.Linear):
        return module.in_features + (module.bias is not None), module.out_features
    if isinstance(module, nn.Conv2d):
        cols = module.weight[0].numel()
        return cols + (module.bias is not None), module.out_channels
    return 2, module.weight.shape[0]  # BatchNorm2d, LayerNorm


def minmax(x: Tensor, epsilon: float = 1e-6) -> Tensor:
    """The published normalisation: +inf -> 1 and -inf -> 0, then (x - min) / (max - min + eps)
    over the whole vector (the bias entry included), with an absolute eps."""
    x = torch.where(x == math.inf, 1.0, torch.where(x == -math.inf, 0.0, x))
    low, high = x.min(), x.max()
    return (x - low) / (high - low + epsilon)


# ---- the layers and their running factors -------------------------------------------------------


class _Layer:
    """A supported layer of the model: its running factors and this step's measurements."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        weight = sharded.local(module.weight.detach())
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        h_len, s_len = factor_sizes(module)
        with torch.inference_mode(False):
            self.fisher_in = torch.ones(h_len, dtype=dtype, device=weight.device)    # H
            self.fisher_out = torch.ones(s_len, dtype=dtype, device=weight.device)   # S
        # Sums over the calls of this step whose output gradient arrived, and their count.
        self.h_sum: Tensor | None = None
        self.s_sum: Tensor | None = None
        self.calls = 0

    def arrive(self, h: Tensor, grad_output: Tensor) -> None:
        """One call's output gradient arrived (backward): its H (measured in forward) and S."""
        s = output_factor(self.module, grad_output)
        self.h_sum = h if self.h_sum is None else self.h_sum + h
        self.s_sum = s if self.s_sum is None else self.s_sum + s
        self.calls += 1

    def measured(self) -> tuple[Tensor, Tensor, Tensor]:
        """(sum of H, sum of S, number of calls) of this step, zeros when none arrived."""
        if self.h_sum is None:
            return (torch.zeros_like(self.fisher_in), torch.zeros_like(self.fisher_out),
                    torch.zeros((), dtype=self.fisher_in.dtype, device=self.fisher_in.device))
        return (self.h_sum, self.s_sum,
                torch.full((), float(self.calls), dtype=self.h_sum.dtype,
                           device=self.h_sum.device))

    def forget(self) -> None:
        self.h_sum = self.s_sum = None
        self.calls = 0


class _Factors:
    """The model's supported layers, the hooks that measure them, and which layer owns which
    parameter ([note: AdaFisher factors])."""

    def __init__(self, model: nn.Module, gammas: tuple[float, float]) -> None:
        self.gammas = gammas
        self.layers: dict[str, _Layer] = {}
        self.owner: dict[int, tuple[_Layer, str]] = {}  # id(param) -> (layer, "weight" | "bias")
        for name, module in model.named_modules():
            if not supported(module):
                continue
            layer = self.layers[name] = _Layer(name, module)
            for role in ("weight", "bias"):
                param = getattr(module, role, None)
                if param is not None and id(param) not in self.owner:
                    self.owner[id(param)] = (layer, role)
        self.collecting = True  # this step's forwards and backwards are measured
        self.version = 0        # bumped at every fold: cached factor tables are stale
        self.tables: dict[tuple, tuple[Tensor, list[int]]] = {}
        self.handles = [layer.module.register_forward_hook(self._forward_hook(layer))
                        for layer in self.layers.values()]

    def _forward_hook(self, layer: _Layer) -> Callable:
        def hook(module, args, output):
            if not (self.collecting and torch.is_grad_enabled() and isinstance(output, Tensor)
                    and output.requires_grad and args and isinstance(args[0], Tensor)):
                return
            h = input_factor(module, args[0].detach())
            # Counted when the output's gradient arrives: once per call that is
            # back-propagated, however often its forward ran (a checkpointed forward is
            # recomputed in backward, and its recomputed output gets no gradient).
            output.register_hook(lambda grad: layer.arrive(h, grad))
        return hook

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.collecting = False

    def fold(self, skip: Tensor, grad_scale: Tensor | None,
             measured: dict[str, tuple[Tensor, Tensor, Tensor]]) -> None:
        """The new factors of this step into the running ones, unless `skip`: the mean over the
        calls, S divided by the GradScaler's scale squared, min-max, then the running average."""
        g1, g2 = self.gammas
        for name, (h_sum, s_sum, calls) in measured.items():
            layer = self.layers[name]
            keep = (skip.to(calls.device).reshape(()) != 0) | (calls == 0)
            count = torch.clamp(calls, min=1)
            s_new = s_sum / count
            if grad_scale is not None:
                s_new = s_new / grad_scale.to(s_new.device, s_new.dtype).reshape(()).square()
            for running, new in ((layer.fisher_in, h_sum / count), (layer.fisher_out, s_new)):
                folded = (1 - g1) * running + g2 * minmax(new.to(running.dtype))
                running.copy_(torch.where(keep, running, folded))
            layer.forget()
        self.version += 1
        self.tables.clear()


class _FactorBucket(Bucket):
    """The step's factor update, ahead of every parameter bucket: measured values checked (a NaN
    skips the step), averaged over the data-parallel ranks, folded into the running factors."""

    stages = 1

    def __init__(self, factors: _Factors, device: torch.device, layers: list[_Layer],
                 group: Any) -> None:
        self.factors, self.device, self.layers, self.group = factors, device, layers, group
        self.steps: list[Tensor] = []
        self.measured = {layer.name: layer.measured() for layer in layers}

    def stage(self, k: int, skip: Tensor, grad_scale: Tensor | None) -> list[sharded.Reduction]:
        parts = [t.reshape(-1) for m in self.measured.values() for t in m]
        values = torch.cat(parts) if parts else skip.new_zeros(0)
        bad = (~torch.isfinite(torch.where(values.abs() == math.inf, 0.0, values))).any()
        skip.copy_(torch.maximum(skip, bad.to(skip.dtype)))
        if self.group is None:
            return []
        red = sharded.Reduction(values.to(torch.float64), [self.group])
        red.segment(0, values.numel(), (self.group,))
        sizes = [t.numel() for t in parts]

        # Each rank's output gradient is of its own mean loss, and the data-parallel gradient is
        # the mean of the ranks' (DDP, FSDP2): one process would see each gradient divided by
        # the world size, so S (a mean of squares) is divided by its square.
        world = torch.distributed.get_world_size(self.group)

        def done(total: Tensor) -> None:  # the sums over the ranks
            pieces = iter(total.split(sizes))
            for name, (h, s, c) in list(self.measured.items()):
                h, s, c = (next(pieces).to(t.dtype).view(t.shape) for t in (h, s, c))
                self.measured[name] = (h, s / world ** 2, c)
        red.done = done
        return [red]

    def update(self, skip: Tensor, grad_scale: Tensor | None) -> None:
        self.factors.fold(skip, grad_scale, self.measured)


# ---- the kind: a parameter's momentum, its layer's factors --------------------------------------


def _local_offset(param: Tensor) -> tuple[int, int]:
    """(first row, first column) of a DTensor parameter's local block in the whole tensor (rows
    along dim 0; columns along dim 1 counted in elements of the flattened trailing dims)."""
    if not sharded.is_dtensor(param):
        return 0, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                      param.placements)
    inner = math.prod(param.shape[2:]) if param.dim() > 2 else 1
    return (offset[0] if offset else 0), (offset[1] * inner if len(offset) > 1 else 0)


class AdaFisherBucket(Bucket):
    """Parameters of one group, device and dtype that one backend steps with AdaFisher: one
    stage (the gradient check, unless a GradScaler's found_inf decided) and the update."""

    stages = 1

    def __init__(self, kind: "AdaFisherKind", backend: str, hyper: "AdaHyper",
                 params: list[Tensor], grads: list[Tensor], states: Sequence[Tensor],
                 shards: sharded.Layout | None, originals: list[Tensor]) -> None:
        self.kind, self.ops = kind, backends.adafisher(backend)
        self.hyper, self.params, self.grads, self.shards = hyper, params, grads, shards
        self.momentums, self.steps = list(states[0::2]), list(states[1::2])
        self.originals = originals  # the optimizer's parameters (DTensors where sharded)
        self.device = params[0].device

    def stage(self, k: int, skip: Tensor, grad_scale: Tensor | None) -> list[sharded.Reduction]:
        if not self.kind.scaler_checked:  # a GradScaler's found_inf read every gradient already
            self.ops.nonfinite_check(self.grads, skip, grad_scale)
        return [] if self.shards is None else [sharded.flag_reduction(self.shards)]

    def update(self, skip: Tensor, grad_scale: Tensor | None) -> None:
        h, ops = self.hyper, self.ops
        factors, layout = self.kind.table(self.originals, self.params, self.device)
        lr_tensor, lr = engine.lr_args(h.lr, self.device)
        ops.update(self.params, self.grads, self.momentums, self.steps, factors, layout, skip,
                   grad_scale, lr_tensor, lr=lr, beta=h.beta, weight_decay=h.weight_decay,
                   damping=h.damping, decoupled=self.kind.decoupled, maximize=h.maximize,
                   chunk_size=ops.chunk_size, rounding=list(h.rounding))


class AdaFisherKind(Kind):
    """A parameter stepped by AdaFisher: ``step`` and ``momentum``; its F comes from the factors
    of the layer that owns it (one kind per optimizer: it knows that optimizer's layers)."""

    name = "adafisher"
    state_keys = ("momentum", "step")

    def __init__(self, factors: _Factors, decoupled: bool) -> None:
        super().__init__()
        self.factors, self.decoupled = factors, decoupled
        self.scaler_checked = False  # set per step by the optimizer

    def state_shapes(self, param: Tensor) -> dict[str, torch.Size]:
        return {"momentum": param.shape}

    def new_state(self, param: Tensor) -> dict[str, Tensor]:
        return {"step": engine.new_step(param), "momentum": engine.new_state_tensor(param, 0.0)}

    def param_refusal(self, who: str, param: Tensor, name: str) -> str | None:
        if sharded.is_dtensor(param) and id(param) in self.factors.owner:
            shards = [pl for pl in param.placements if not pl.is_replicate()]
            if any(type(pl).__name__ != "Shard" or pl.dim % param.dim() > 1 for pl in shards):
                return (f"{who} cannot optimize {name}: its placements {param.placements} do not "
                        "cut it into blocks of whole rows or columns (FSDP2 over tensor parallel "
                        "shards a dim twice); AdaFisher takes Shard(0) and Shard(1) placements")
        return None

    def unfused_reason(self, param: Tensor) -> str | None:
        # The kernels walk memory with the output channel outermost (the factor table permutes
        # H for a channels_last weight); other layouts run on the reference.
        if param.is_contiguous() or param.dim() < 2:
            return None
        return None if param.stride(0) == max(param.stride()) else "has dim 0 inside"

    def has_kernels(self, backend: str) -> bool:
        return backends.adafisher_available(backend)

    def bucket(self, backend, hyper, params, grads, states, shards, originals) -> Bucket:
        return AdaFisherBucket(self, backend, hyper, params, grads, states, shards, originals)

    def table(self, originals: list[Tensor], locals_: list[Tensor],
              device: torch.device) -> tuple[Tensor, list[int]]:
        """The factors of a bucket's parameters as the op takes them ([note: the AdaFisher op
        contract]): one float32 tensor of S and H pieces, and (s_offset, h_offset, cols) per
        parameter. Rebuilt after each fold, found again otherwise."""
        key = (device, tuple(map(id, originals)))
        found = self.factors.tables.get(key)
        if found is not None:
            return found
        pieces, layout, offset = [], [], 0
        for param, local in zip(originals, locals_):
            owned = self.factors.owner.get(id(param))
            if owned is None or local.numel() == 0:
                layout += [0, 0, 0]
                continue
            layer, role = owned
            row0, col0 = _local_offset(param)
            h, s = layer.fisher_in, layer.fisher_out
            if role == "bias":
                cols, h_piece = 1, h[-1:]
            elif isinstance(layer.module, (nn.BatchNorm2d, nn.LayerNorm)):
                cols, h_piece = 1, (h[:1] if role == "weight" else h[1:2])
            else:
                cols = local[0].numel() if local.dim() > 1 else 1
                h_piece = h[col0:col0 + cols]
                if local.dim() > 2 and not local.is_contiguous():
                    # A channels_last conv weight: its columns in the weight's memory order.
                    inner = sorted(range(1, local.dim()), key=lambda d: -local.stride(d))
                    h_piece = h_piece.view(local.shape[1:]).permute(
                        [d - 1 for d in inner]).reshape(-1)
            rows = local.numel() // cols
            s_piece = s[row0:row0 + rows]
            layout += [offset, offset + rows, cols]
            pieces += [s_piece, h_piece]
            offset += rows + cols
        dtype = torch.float64 if locals_[0].dtype == torch.float64 else torch.float32
        factors = (torch.cat([p.to(device, dtype) for p in pieces]) if pieces
                   else torch.zeros(0, dtype=dtype, device=device))
        self.factors.tables[key] = (factors, layout)
        return factors, layout


# ---- the optimizers -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdaHyper(hyper.Storage):
    """One param group's AdaFisher hyperparameters as the kernels take them (bfloat16 storage
    as FAdam's: hyper.Storage)."""

    lr: float | Tensor
    beta: float
    weight_decay: float
    damping: float
    maximize: bool


def _check_group(group: dict[str, Any], *, read_lr: bool) -> AdaHyper:
    hyper.check_lr(group["lr"], read_value=read_lr)
    beta = hyper.number("beta", group["beta"])
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"Invalid beta parameter: {beta}")
    weight_decay = hyper.number("weight_decay", group["weight_decay"])
    if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    damping = hyper.number("damping", group["damping"])
    if not (math.isfinite(damping) and damping > 0.0):
        raise ValueError(f"Invalid damping value: {damping}; F = S H^T + damping must stay > 0 "
                         "(the published Lambda, 1e-3)")
    maximize = group["maximize"]
    if not hyper.is_bool(maximize):
        raise ValueError(f"Invalid maximize value: {maximize!r}; expected True or False")
    rounding, seed, momentum_dtype = hyper.check_storage(group)
    return AdaHyper(lr=group["lr"], beta=beta, weight_decay=weight_decay, damping=damping,
                    maximize=bool(maximize), bf16_rounding=rounding, rounding_seed=seed,
                    momentum_dtype=momentum_dtype)


class AdaFisher(FisherOptimizer):
    r"""AdaFisher (Gomes et al., ICLR 2025): momentum preconditioned by a Kronecker-factored
    diagonal Fisher, with fused kernels.

    .. math::
        m &\leftarrow \beta m + (1 - \beta) (g + \lambda \theta), \qquad
        \theta \leftarrow \theta - \frac{\eta}{1 - \beta^t} \frac{m}{F}, \qquad
        F = S H^\top + \delta

    per element of a parameter of a supported layer (Linear, Conv2d, BatchNorm2d, LayerNorm),
    where H (input side) and S (output-gradient side) are the layer's running Fisher factors
    ([note: AdaFisher factors] in fadam_fused/adafisher.py, docs/design.md, section 10), and
    F = 1 for any other parameter. :class:`AdaFisherW` decouples the weight decay:
    :math:`m \leftarrow \beta m + (1 - \beta) g`, :math:`\theta \leftarrow \theta - \eta
    (m / (1 - \beta^t) / F + \lambda \theta)`.

    Args:
        model: the model (or an iterable of modules) whose supported layers the optimizer
            measures: it registers a forward hook on each (remove them with
            :meth:`remove_hooks`) and pairs each parameter with the layer that holds it.
        params: the parameters or param groups to optimize (default: ``model.parameters()``).
        lr (float or Tensor, default 1e-3): learning rate :math:`\eta`.
        beta (float, default 0.9): momentum coefficient :math:`\beta`.
        weight_decay (float, default 0): :math:`\lambda` (coupled, as L2, in AdaFisher;
            decoupled in AdaFisherW).
        damping (float, default 1e-3): :math:`\delta`, the published ``Lambda``.
        gammas (pair, default (0.92, 0.008)): the running factors' decay and weight of a new
            (min-max normalised) measurement: ``H = (1 - gammas[0]) H + gammas[1] minmax(H_new)``
            (the published ``gammas``; its newest code's ``gamma=0.8`` is the same pair).
        update_interval (int, default 100): factors are measured and updated every this many
            ``step()`` calls, the first one included (the published ``TCov``).
        maximize (bool, default False), backend (str or None, default None): as for FAdam.
        bf16_rounding (str, default "nearest"), rounding_seed (int or None, default None),
        momentum_dtype (torch.dtype, default torch.float32): as for FAdam: "stochastic" writes
            a bfloat16 parameter (and a bfloat16 momentum) by stochastic rounding, unbiased, on
            every backend with the same bits ([note: stochastic rounding] in op_contract.py);
            the seed is saved with the group; torch.bfloat16 keeps the momentum in 2 B per
            parameter (the factors stay float32).
        process_group: where the factors are averaged over data-parallel ranks (default: the
            default group when torch.distributed is initialized with more than one rank; False:
            nowhere, for a one-process model inside a distributed job). Each rank's output
            gradients are taken to be of its own mean loss, the ranks' gradients averaged (DDP
            and FSDP2's default), so S is divided by the group's size squared.

    Gradient accumulation: the micro-batches of one step give one factor update (the average of
    their measurements), not one per micro-batch as in the published code; a forward recomputed
    by activation checkpointing is not counted twice. Non-finite gradients skip the step as in
    :class:`FAdam` (a skipped step changes no factor either); ``skipped_steps``, GradScaler,
    ``state_dict`` (factors in the state of each layer's weight, with the layer's name, so a
    changed model is refused by name) and ``load_state_dict`` behave as FAdam's.
    """

    decoupled: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module | Iterable[nn.Module],
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        lr: float | Tensor = 1e-3,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        *,
        damping: float = 1e-3,
        gammas: tuple[float, float] = (0.92, 0.008),
        update_interval: int = 100,
        maximize: bool = False,
        backend: str | None = None,
        process_group: Any = None,
        bf16_rounding: str = "nearest",
        rounding_seed: int | None = None,
        momentum_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(model, nn.Module):
            model = nn.ModuleList(list(model))
        if not (isinstance(gammas, (tuple, list)) and len(gammas) == 2):
            raise ValueError(f"Invalid gammas: {gammas!r}; expected a pair (decay, weight)")
        g1, g2 = (hyper.number("gammas", g) for g in gammas)
        if not (0.0 <= g1 <= 1.0 and 0.0 <= g2 and math.isfinite(g2)):
            raise ValueError(f"Invalid gammas: {gammas!r}; expected 0 <= gammas[0] <= 1 and "
                             "gammas[1] >= 0")
        if (not isinstance(update_interval, numbers.Integral) or isinstance(update_interval, bool)
                or update_interval < 1):
            raise ValueError(f"Invalid update_interval: {update_interval!r}; expected an "
                             "integer >= 1 (the published TCov, 100)")
        self._factors = _Factors(model, (g1, g2))
        self._kind = AdaFisherKind(self._factors, self.decoupled)
        self.kinds = (self._kind,)
        self.update_interval = int(update_interval)
        self._process_group = process_group
        try:
            self._init_optimizer(model.parameters() if params is None else params,
                                 dict(lr=lr, beta=beta, weight_decay=weight_decay,
                                      damping=damping, maximize=maximize, backend=backend,
                                      bf16_rounding=bf16_rounding,
                                      rounding_seed=rounding_seed,
                                      momentum_dtype=momentum_dtype, factor_steps=0))
        except BaseException:
            self._factors.remove_hooks()
            raise

    def kind_of(self, param: Tensor) -> Kind:
        return self._kind

    def _check_group(self, group: dict[str, Any], *, read_lr: bool) -> AdaHyper:
        check_backend(group.get("backend"))
        return _check_group(group, read_lr=read_lr)

    def _normalize(self, group: dict[str, Any]) -> None:
        if not isinstance(group["lr"], Tensor):
            group["lr"] = float(group["lr"])
        for key in ("beta", "weight_decay", "damping"):
            group[key] = hyper.number(key, group[key])
        group["maximize"] = bool(group["maximize"])
        hyper.normalize_storage(group)

    def remove_hooks(self) -> None:
        """Removes the forward hooks on the model's layers: factors stop being measured."""
        self._factors.remove_hooks()

    def _buckets(self, hypers, params, grads, states, layout) -> list[Bucket]:
        buckets = super()._buckets(hypers, params, grads, states, layout)
        if not self._factors.collecting:
            return buckets
        group = self._process_group
        if group is False:
            group = None
        elif (group is None and torch.distributed.is_available()
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            group = torch.distributed.group.WORLD
        by_device: dict[torch.device, list[_Layer]] = {}
        for layer in self._factors.layers.values():
            by_device.setdefault(layer.fisher_in.device, []).append(layer)
        # Ahead of the parameters: their update reads the folded factors.
        return [_FactorBucket(self._factors, device, layers, group)
                for device, layers in by_device.items()] + buckets

    @property
    def _steps_done(self) -> int:
        return self.param_groups[0]["factor_steps"] if self.param_groups else 0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Performs a single optimization step (on update steps also the factor update)."""
        self._kind.scaler_checked = getattr(self, "found_inf", None) is not None
        loss = super().step(closure)
        done = self._steps_done + 1
        for group in self.param_groups:
            group["factor_steps"] = done
        self._factors.collecting = bool(self._factors.handles) and done % self.update_interval == 0
        return loss

    # ---- checkpoints: the factors in the state of each layer's weight ---------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, plus each layer's running factors in the state of its
        weight (``fisher_in`` = H, ``fisher_out`` = S, ``fisher_layer`` = the layer's name), so
        that torch.distributed.checkpoint saves them too."""
        state_dict = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for layer in self._factors.layers.values():
            i = index.get(id(layer.module.weight))
            if i is None:
                continue
            entry = state_dict["state"].setdefault(i, {})
            entry.update(fisher_in=layer.fisher_in, fisher_out=layer.fisher_out,
                         fisher_layer=layer.name)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads what state_dict() saved. The factors are checked like the rest (by layer name:
        a checkpoint of another model is refused naming the layers) before anything loads."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
            return super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict.get("param_groups", []) for i in g.get("params", [])]
        state, factors = {}, []
        for key, entry in state_dict["state"].items():
            entry = dict(entry) if isinstance(entry, dict) else entry
            if isinstance(entry, dict) and "fisher_in" in entry:
                factors.append((key, entry.pop("fisher_in", None), entry.pop("fisher_out", None),
                                entry.pop("fisher_layer", None)))
            if entry:
                state[key] = entry
        loads = []
        for key, h, s, name in factors:
            position = saved_ids.index(key) if key in saved_ids else None
            param = params[position] if position is not None and position < len(params) else None
            owned = None if param is None else self._factors.owner.get(id(param))
            if owned is None or owned[1] != "weight" or owned[0].name != name:
                mine = "no layer" if owned is None else f"layer {owned[0].name!r}"
                raise ValueError(f"Cannot load this {self.who} state_dict: it has the factors of "
                                 f"layer {name!r} where this optimizer's model has {mine}; was it "
                                 "saved for another model?")
            layer = owned[0]
            for what, saved, mine in (("fisher_in", h, layer.fisher_in),
                                      ("fisher_out", s, layer.fisher_out)):
                why = checks.saved_state_problem(what, saved, mine.shape)
                if why is not None:
                    raise ValueError(f"Cannot load this {self.who} state_dict: the {what} of "
                                     f"layer {name!r} {why}.")
            loads.append((layer, h, s))
        for group in state_dict.get("param_groups", []):
            steps = group.get("factor_steps", 0)
            if not (isinstance(steps, numbers.Integral) and not isinstance(steps, bool)
                    and steps >= 0):
                raise ValueError(f"Cannot load this {self.who} state_dict: factor_steps is "
                                 f"{steps!r}, not a whole number >= 0")
        super().load_state_dict({**state_dict, "state": state})
        with torch.no_grad():
            for layer, h, s in loads:
                layer.fisher_in.copy_(sharded.local(h))
                layer.fisher_out.copy_(sharded.local(s))
                layer.forget()
        for group in self.param_groups:
            group.setdefault("factor_steps", 0)
        self._factors.version += 1
        self._factors.tables.clear()
        self._factors.collecting = (bool(self._factors.handles)
                                    and self._steps_done % self.update_interval == 0)


class AdaFisherW(AdaFisher):
    r"""AdaFisherW: :class:`AdaFisher` with decoupled weight decay (AdamW-style):

    .. math::
        m \\leftarrow \\beta m + (1 - \\beta) g, \\qquad
        \\theta \\leftarrow \\theta - \\eta \\left(\\frac{m}{(1 - \\beta^t) F} + \\lambda \\theta
        \\right)

    Arguments as :class:`AdaFisher`'s (the published AdaFisherW's configs use
    ``weight_decay=0.01``)."""

    decoupled = True
