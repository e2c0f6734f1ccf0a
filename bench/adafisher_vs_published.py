"""A training step (forward, backward, optimizer step) with fadam_fused.AdaFisher against the same
step with the published AdaFisher algorithm run as published, on the BatchNorm CNN of
examples/train_digits_cnn.py, with the factors measured on every step (update_interval 1), side
by side in one process.

    .venv/bin/python bench/adafisher_vs_published.py               # ~1-2 min on 2 idle cores
    .venv/bin/python bench/adafisher_vs_published.py --rounds 40 --batch 256 --json out.json

`PublishedAdaFisher` below is the published implementation's algorithm (AtlasAnalyticsLab/AdaFisher,
optimizers/AdaFisher.py, its newest version: `gamma`, min-max with the inf rule and 1e-6), written
for this benchmark with the same structure and the same tensor operations:
- a forward hook on every Linear, Conv2d, BatchNorm2d and LayerNorm computes the layer's H from
  its input on every call of an update step, a conv's through an im2col copy of the input
  (padded, unfolded into one row per output position and group, made contiguous), min-max
  normalises it and folds it into the running H (reset to ones on step 0); a full backward hook
  does the same for S from the output gradient (torch wraps every hooked module's forward for
  it);
- step() walks the parameter list and the list of hooked layers side by side in Python, pairing
  them by position and shape (the published index walk, with its check that a parameter has the
  shape of the current layer's weight or bias), materialises each layer's F as
  kron(H, S)^T + Lambda (out x (in + 1) floats), splits it into the weight's and the bias's part,
  and updates one parameter at a time (grad + wd theta, momentum, addcdiv by F).
One change, for the equality check only: a conv's H is divided by its number of rows (batch x
groups x positions, fadam_fused's mean) where the published code divides by batch x positions x
patch size. It is one constant per layer, which the min-max removes up to its absolute 1e-6, and
costs the same; with the published divisor the 1e-6 weighs 9x and 144x more on the two convs here,
and after 4 float64 steps their weights differ from the oracle's by up to 3e-4 relative per
element (6e-6 of the largest entry) instead of 1e-14.

Before any timing the script checks that both compute the same thing: in float64 over CHECK_STEPS
steps, against fadam_fused.reference.AdaFisherReference (the oracle of fadam_fused.AdaFisher; the
factor formulas and their rules are [note: AdaFisher factors] in fadam_fused/adafisher.py), and
in float32 the parameters of PublishedAdaFisher and fadam_fused.AdaFisher after CHECK_STEPS steps
from the same weights and batches.

fadam_fused.AdaFisher steps with backend=None: the fused kernels of the parameters' device where
this build has them (fadam_fused.backends.adafisher_available), else the reference backend; the
output says which.

Timing: torch.utils.benchmark.Timer, `--steps` training steps per sample, both optimizers once per
round in alternating order, `--rounds` rounds; median, p20 and p80 of each, and the per-round
ratio (ours / published; drift falls on both sides of it). What is timed is the whole training
step: forward (with the hooks), loss, zero_grad, backward (with the hooks), step(). The load of
the machine (the 1-minute load average and other runnable threads) is printed at the start and
the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.benchmark import Timer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as `python bench/adafisher_vs_published.py`
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import train_digits_cnn  # noqa: E402  (the model and the data)
from bench import step_bench  # noqa: E402  (busy_threads, cpu_model)
from fadam_fused import AdaFisher, backends  # noqa: E402
from fadam_fused.reference import AdaFisherReference  # noqa: E402

# The published defaults but the weight decay: lr 1e-3, beta 0.9, Lambda 1e-3, gamma 0.8 (the
# running average H <- 0.08 H + 0.008 minmax(H_new), fadam_fused's gammas (0.92, 0.008)).
LR, BETA, WEIGHT_DECAY, DAMPING, GAMMA = 1e-3, 0.9, 1e-3, 1e-3, 0.8
OURS = dict(lr=LR, beta=BETA, weight_decay=WEIGHT_DECAY, damping=DAMPING,
            gammas=(1 - GAMMA * 0.1, GAMMA * 0.01))
CHECK_STEPS = 4
N_PARAMS = sum(p.numel() for p in train_digits_cnn.make_model().parameters())  # 10,026


# ---- the published algorithm --------------------------------------------------------------------


def _minmax(x: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """+inf -> 1 and -inf -> 0 (on a copy), then (x - min) / (max - min + epsilon) in place."""
    x = x.clone()
    x[x == math.inf] = 1.0
    x[x == -math.inf] = 0.0
    low, high = x.min(), x.max()
    return x.add_(-low).div_(high - low + epsilon)


def _fold(new: torch.Tensor, running: torch.Tensor, gamma: float) -> None:
    running *= gamma * 1e-1
    running += (gamma * 1e-2) * new


def _im2col(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(batch, groups, positions, patch): a copy of every patch the conv reads."""
    ph, pw = conv.padding
    if ph + pw > 0:
        x = F.pad(x, (pw, pw, ph, ph))
    batch, channels, height, width = x.shape
    g = conv.groups
    x = x.view(batch, g, channels // g, height, width)
    x = x.unfold(3, conv.kernel_size[0], conv.stride[0]).unfold(4, conv.kernel_size[1],
                                                                conv.stride[1])
    x = x.permute(0, 1, 3, 4, 2, 5, 6).contiguous()  # the copy: (b, g, oh, ow, c, kh, kw)
    x = x.view(batch, g, -1, channels // g * conv.kernel_size[0] * conv.kernel_size[1])
    return x


def _with_ones(h: torch.Tensor) -> torch.Tensor:
    return torch.cat([h, h.new(h.size(0), 1).fill_(1)], 1)


def input_factor(h: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The published H of one call: the diagonal of the input's second moment."""
    if isinstance(layer, nn.Linear):
        h = h.reshape(-1, h.shape[-1]) if h.dim() > 2 else h
        rows = h.size(0)
        h = _with_ones(h) if layer.bias is not None else h
        return torch.einsum("ij,ij->j", h, h) / rows
    if isinstance(layer, nn.Conv2d):
        h = _im2col(h, layer)
        h = h.reshape(-1, h.size(-1))
        rows = h.size(0)  # the one change (module docstring): batch x groups x positions
        h = _with_ones(h) if layer.bias is not None else h
        return torch.einsum("ij,ij->j", h, h) / rows
    if isinstance(layer, nn.BatchNorm2d):
        batch, spatial = h.size(0), h.size(2) * h.size(3)
        sums = torch.sum(h, dim=(0, 2, 3)).unsqueeze(1) / spatial ** 2
        h_bar = _with_ones(sums)
        return torch.einsum("ij,ij->j", h_bar, h_bar) / batch ** 2
    dims = [d for d in range(h.ndim) if d != 1]  # LayerNorm
    norm = math.prod(h.shape[d] for d in dims if d != 0)
    sums = torch.sum(h, dim=dims).unsqueeze(1) / norm ** 2
    h_bar = _with_ones(sums)
    return torch.einsum("ij,ij->j", h_bar, h_bar) / h.shape[0] ** 2


def output_factor(s: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The published S of one call, from the gradient of the layer's output."""
    if isinstance(layer, nn.Conv2d):
        batch, spatial = s.shape[0], s.size(2) * s.size(3)
        s = s.transpose(1, 2).transpose(2, 3).reshape(-1, s.size(1))
        return torch.einsum("ij,ij->j", s, s) / (batch * spatial)
    if isinstance(layer, nn.Linear):
        s = s.reshape(-1, s.shape[-1]) if s.dim() > 2 else s
        return torch.einsum("ij,ij->j", s, s) / s.size(0)
    sums = torch.sum(s, dim=(0, 2, 3) if isinstance(layer, nn.BatchNorm2d)
                     else tuple(range(s.ndim - 1)))
    return torch.einsum("i,i->i", sums, sums) / s.size(0)


class PublishedAdaFisher(torch.optim.Optimizer):
    """AdaFisher as the published implementation runs it (module docstring)."""

    SUPPORTED = ("Linear", "Conv2d", "BatchNorm2d", "LayerNorm")

    def __init__(self, model: nn.Module, lr: float = 1e-3, beta: float = 0.9,
                 Lambda: float = 1e-3, gamma: float = 0.8, TCov: int = 100,
                 weight_decay: float = 0.0) -> None:
        self.gamma, self.Lambda, self.TCov, self.steps = gamma, Lambda, TCov, 0
        self.H_D: dict[nn.Module, torch.Tensor] = {}
        self.S_D: dict[nn.Module, torch.Tensor] = {}
        self.modules: list[nn.Module] = []
        for module in model.modules():
            if type(module).__name__ in self.SUPPORTED:
                self.modules.append(module)
                module.register_forward_hook(self._save_input)
                module.register_full_backward_hook(self._save_grad_output)
        # The first conv's input (the images) needs no gradient; torch then warns that the full
        # backward hook fires with the output's gradient only, which is all S needs.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients "
                                "are computed with respect to module outputs")
        super().__init__(model.parameters(), dict(lr=lr, beta=beta, weight_decay=weight_decay))

    def _save_input(self, module, inputs, output) -> None:
        if torch.is_grad_enabled() and self.steps % self.TCov == 0:
            new = input_factor(inputs[0].data, module)
            if self.steps == 0:
                self.H_D[module] = new.new(new.size(0)).fill_(1)
            _fold(_minmax(new), self.H_D[module], self.gamma)

    def _save_grad_output(self, module, grad_input, grad_output) -> None:
        if self.steps % self.TCov == 0:
            new = output_factor(grad_output[0].data, module)
            if self.steps == 0:
                self.S_D[module] = new.new(new.size(0)).fill_(1)
            _fold(_minmax(new), self.S_D[module], self.gamma)

    def _fisher(self, module: nn.Module) -> torch.Tensor | list[torch.Tensor]:
        full = torch.kron(self.H_D[module].unsqueeze(1), self.S_D[module].unsqueeze(0)).t() \
            + self.Lambda
        if module.bias is not None:
            return [full[:, :-1].view(*module.weight.grad.size()),
                    full[:, -1:].view(*module.bias.grad.size())]
        return full.reshape(module.weight.grad.size())

    def _matches(self, params: list[torch.Tensor], i_module: int, i_param: int) -> bool:
        module, size = self.modules[i_module], params[i_param].size()
        return size == module.weight.size() or (module.bias is not None
                                                and size == module.bias.size())

    @torch.no_grad()
    def _update(self, hyper: dict, param: torch.Tensor, fisher: torch.Tensor) -> None:
        grad, state = param.grad, self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        exp_avg, beta = state["exp_avg"], hyper["beta"]
        state["step"] += 1
        if hyper["weight_decay"] != 0:
            grad = grad.add(param, alpha=hyper["weight_decay"])
        exp_avg.mul_(beta).add_(grad, alpha=1 - beta)
        param.addcdiv_(exp_avg, fisher, value=-hyper["lr"] / (1 - beta ** state["step"]))

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        for group in self.param_groups:
            params = group["params"]
            hyper = dict(weight_decay=group["weight_decay"], beta=group["beta"], lr=group["lr"])
            i_param = i_module = vectors = 0
            for _ in range(len(self.modules)):
                if params[i_param].grad is None:  # the published walk past a frozen parameter
                    i_param += 1
                    if params[i_param].ndim > 1:
                        i_module += 1
                    else:
                        vectors += 1
                    if vectors == 2:
                        i_module, vectors = i_module + 1, 0
                    continue
                if self._matches(params, i_module, i_param):
                    fisher = self._fisher(self.modules[i_module])
                    i_module += 1
                else:
                    fisher = torch.ones_like(params[i_param])
                for part in fisher if isinstance(fisher, list) else [fisher]:
                    self._update(hyper, params[i_param], part)
                    i_param += 1
        self.steps += 1


def published(model: nn.Module, update_interval: int = 1) -> PublishedAdaFisher:
    return PublishedAdaFisher(model, lr=LR, beta=BETA, Lambda=DAMPING, gamma=GAMMA,
                              TCov=update_interval, weight_decay=WEIGHT_DECAY)


# ---- the check and the timing -------------------------------------------------------------------


def training_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                  y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    model.zero_grad(set_to_none=True)  # AdaFisherReference is no torch Optimizer
    loss.backward()
    opt.step()


def _train(makers: dict[str, Callable], dtype: torch.dtype, batch: int,
           steps: int) -> tuple[nn.Module, dict[str, nn.Module]]:
    """`steps` training steps of each optimizer from one set of weights and batches, update
    interval 1; the initial model and the trained ones."""
    x_train, y_train, _, _ = train_digits_cnn.load()
    torch.manual_seed(0)
    base = train_digits_cnn.make_model().to(dtype)
    models = {name: copy.deepcopy(base) for name in makers}
    opts = {name: make(models[name]) for name, make in makers.items()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(y_train), (batch,), generator=gen)
        for name, model in models.items():
            training_step(model, opts[name], x_train[idx].to(dtype), y_train[idx])
    return base, models


def _compare(name: str, model: nn.Module, want: nn.Module, base: nn.Module,
             tolerance: dict) -> float:
    """Asserts that `model`'s parameters are `want`'s within `tolerance` and have moved from
    `base`'s; returns the largest difference relative to the parameter's largest entry."""
    ref, worst = dict(want.named_parameters()), 0.0
    for pname, p in model.named_parameters():
        r = ref[pname].detach()
        torch.testing.assert_close(p.detach(), r, **tolerance,
                                   msg=lambda m: f"{name} {pname} differs: {m}")
        worst = max(worst, float((p.detach() - r).abs().max() / r.abs().max()))
    moved = max(float((p.detach() - q.detach()).abs().max())
                for p, q in zip(model.parameters(), base.parameters()))
    assert moved > 1e-4, f"{name}: the parameters did not move ({moved})"
    return worst


def check_same_math(batch: int, steps: int = CHECK_STEPS) -> dict[str, float]:
    """Asserts that PublishedAdaFisher and fadam_fused.AdaFisher compute the same parameters:
    in float64 each against AdaFisherReference, in float32 against each other, after `steps`
    steps; returns the largest relative differences."""
    base, got = _train({"published": published,
                        "reference": lambda m: AdaFisherReference(m, update_interval=1, **OURS),
                        "ours": lambda m: AdaFisher(m, update_interval=1, **OURS)},
                       torch.float64, batch, steps)
    # The published algorithm in float64 is one op order away from the reference: 1e-9 is far
    # above its rounding (~1e-16 per op, times 1 / F <= 1 / damping = 1e3) and far below any
    # difference of formula. fadam_fused.AdaFisher keeps its momentum in float32 whatever the
    # parameter dtype: 1e-8 relative after 4 steps here, so 1e-5 / 1e-8 (the float32 tolerances
    # of its own tests are 1e-5 / 1e-6).
    diffs = {"published_float64": _compare("published", got["published"], got["reference"], base,
                                           dict(rtol=1e-9, atol=1e-12)),
             "ours_float64": _compare("ours", got["ours"], got["reference"], base,
                                      dict(rtol=1e-5, atol=1e-8))}
    base, got = _train({"published": published,
                        "ours": lambda m: AdaFisher(m, update_interval=1, **OURS)},
                       torch.float32, batch, steps)
    # Both in float32, in different op orders: each step's rounding (~6e-8 relative) is fed
    # back through BatchNorm and the next step's factors; 1.4e-6 of the largest entry after 4
    # steps here, so float32's usual 1e-5 / 1e-6.
    diffs["ours_vs_published_float32"] = _compare("ours", got["ours"], got["published"], base,
                                                  dict(rtol=1e-5, atol=1e-6))
    return diffs


def time_both(batch: int, rounds: int, steps: int, threads: int,
              seed: int = 0) -> dict[str, object]:
    """Median, p20, p80 of the training-step time of both, `steps` steps per sample, one sample
    each per round in alternating order; the per-round ratio ours / published."""
    x_train, y_train, _, _ = train_digits_cnn.load()
    torch.manual_seed(seed)
    base = train_digits_cnn.make_model()
    gen = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, len(y_train), (batch,), generator=gen)
    x, y = x_train[idx], y_train[idx]
    runners = {}
    for name, make in (("published", published),
                       ("ours", lambda m: AdaFisher(m, update_interval=1, **OURS))):
        model = copy.deepcopy(base)
        opt = make(model)
        timer = Timer(stmt="for _ in range(n): step(model, opt, x, y)",
                      globals=dict(step=training_step, model=model, opt=opt, x=x, y=y, n=steps),
                      num_threads=threads)
        timer.timeit(2)  # warm-up: state allocation, the first factor fold, lazy inits
        runners[name] = timer
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            times[name].append(runners[name].timeit(1).median / steps)
    out: dict[str, object] = {}
    for name, t in times.items():
        p20, med, p80 = np.percentile(np.asarray(t) * 1e3, [20, 50, 80])
        out[name] = dict(median_ms=float(med), p20_ms=float(p20), p80_ms=float(p80), n=len(t))
    ratios = np.asarray(times["ours"]) / np.asarray(times["published"])
    out["ratio_of_medians"] = out["ours"]["median_ms"] / out["published"]["median_ms"]
    out["paired_ratio"] = [float(v) for v in np.percentile(ratios, [20, 50, 80])]
    return out


def load_line() -> str:
    busy = step_bench.busy_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"load average {load:.2f}, {busy:g} other threads running on {os.cpu_count()} cores"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    ap.add_argument("--rounds", type=int, default=20, help="samples per optimizer (default 20)")
    ap.add_argument("--steps", type=int, default=10, help="training steps per sample (default 10)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the model is small, and on a shared machine "
                         "a second thread mostly waits for a core)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = ap.parse_args(argv)
    if min(args.batch, args.rounds, args.steps, args.threads) < 1:
        raise SystemExit("--batch, --rounds, --steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)

    backend = "cpu" if backends.adafisher_available("cpu") else "reference"
    start = load_line()
    print(f"AdaFisher training step, BatchNorm CNN of examples/train_digits_cnn.py ({N_PARAMS:,} "
          f"parameters), batch {args.batch}, update_interval 1, cpu ({step_bench.cpu_model()}), "
          f"{args.threads} thread(s), torch {torch.__version__}; at the start: {start}")
    print(f"fadam_fused.AdaFisher steps on backend {backend!r}"
          + ("" if backend == "cpu" else " (this build has no AdaFisher CPU kernels yet)"))
    diffs = check_same_math(min(args.batch, 64))
    print(f"same math, {CHECK_STEPS} steps: float64, largest difference to AdaFisherReference "
          f"relative to the parameter's largest entry: published {diffs['published_float64']:.1e}, "
          f"fadam_fused.AdaFisher {diffs['ours_float64']:.1e}; float32, fadam_fused.AdaFisher to "
          f"published {diffs['ours_vs_published_float32']:.1e}")
    res = time_both(args.batch, args.rounds, args.steps, args.threads)
    end = load_line()
    print(f"{'':<28} {'median ms':>10} {'p20':>8} {'p80':>8} {'n':>4}")
    for name, label in (("published", "published algorithm"), ("ours", "fadam_fused.AdaFisher")):
        r = res[name]
        print(f"{label:<28} {r['median_ms']:>10.3f} {r['p20_ms']:>8.3f} {r['p80_ms']:>8.3f} "
              f"{r['n']:>4}")
    pr = res["paired_ratio"]
    print(f"ours / published: {res['ratio_of_medians']:.2f}x by medians, per-round paired "
          f"{pr[1]:.2f}x [p20 {pr[0]:.2f}, p80 {pr[2]:.2f}] (target: at most 0.50x)")
    print(f"at the end: {end}")
    if args.json:
        doc = dict(batch=args.batch, rounds=args.rounds, steps=args.steps, threads=args.threads,
                   backend=backend, torch=torch.__version__, python=platform.python_version(),
                   cpu=step_bench.cpu_model(), load_start=start, load_end=end, check=diffs, **res)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
