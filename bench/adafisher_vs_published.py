"""A training step (forward, backward, optimizer step) with fadam_fused.AdaFisher against the same
step with the published AdaFisher algorithm, on the BatchNorm CNN of examples/train_digits_cnn.py,
with the factors measured on every step (update_interval 1), side by side in one process.

    .venv/bin/python bench/adafisher_vs_published.py               # ~1-2 min on 2 idle cores
    .venv/bin/python bench/adafisher_vs_published.py --rounds 40 --batch 256 --json out.json

`PublishedAdaFisher` below re-implements the published implementation's step structure
(AtlasAnalyticsLab/AdaFisher, optimizers/AdaFisher.py; written here from the paper's algorithm and
that structure, not copied): a forward pre-hook on each Linear, Conv2d, BatchNorm2d and LayerNorm
that, on update steps, computes the layer's H from its input (a conv's through an im2col copy,
torch.nn.functional.unfold), min-max normalises it and folds it into the running H, all inside the
forward; a full backward hook doing the same for S from the output gradient; then step() walks the
layers in Python and, one parameter at a time, builds F as the full Kronecker product of the
layer's S and H (torch.kron: out x (in + 1) floats per layer) and updates the parameter. Before any
timing the script checks, in float64 over CHECK_STEPS steps, that it computes what
fadam_fused.reference.AdaFisherReference computes (the oracle of fadam_fused.AdaFisher; the factor
formulas and their rules are [note: AdaFisher factors] in fadam_fused/adafisher.py), and that
fadam_fused.AdaFisher does too.

fadam_fused.AdaFisher steps with backend=None: the fused kernels of the parameters' device where
this build has them (fadam_fused.backends.adafisher_available), else the reference backend; the
output says which.

Timing: torch.utils.benchmark.Timer, `--steps` training steps per sample, both optimizers once per
round in alternating order, `--rounds` rounds; median, p20 and p80 of each, and the per-round
ratio (ours / published; drift falls on both sides of it). The load of the machine (the 1-minute
load average and other runnable threads) is printed at the start and the end.
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

HYPER = dict(lr=1e-3, beta=0.9, weight_decay=1e-3, damping=1e-3, gammas=(0.92, 0.008))
CHECK_STEPS = 4
LAYERS = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm)


# ---- the published algorithm, re-implemented ----------------------------------------------------


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """+inf -> 1 and -inf -> 0, then (x - min) / (max - min + 1e-6) over the whole vector."""
    x = torch.where(x == math.inf, 1.0, torch.where(x == -math.inf, 0.0, x))
    return (x - x.min()) / (x.max() - x.min() + 1e-6)


def _input_factor(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """H of one call: the mean square of each input column (the bias column of ones included)."""
    if isinstance(module, nn.Conv2d):
        x = F.pad(x, module._reversed_padding_repeated_twice,
                  mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
        patches = F.unfold(x, module.kernel_size, module.dilation, 0, module.stride)  # im2col
        b, _, positions = patches.shape
        patches = patches.view(b, module.groups, -1, positions).permute(0, 1, 3, 2)
        x = patches.reshape(b * module.groups * positions, -1)
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        x = x.reshape(-1, x.shape[-1])
        if module.bias is not None:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        return (x * x).sum(0) / x.shape[0]
    # BatchNorm2d and LayerNorm: [sum over all but dim 1, 1] per channel, squared, over batch^2.
    dims = [d for d in range(x.dim()) if d != 1]
    norm = math.prod(x.shape[d] for d in dims[1:])
    sums = x.sum(dims)[:, None] / norm ** 2
    h_bar = torch.cat([sums, torch.ones_like(sums)], 1)
    return (h_bar * h_bar).sum(0) / x.shape[0] ** 2


def _output_factor(module: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """S of one call, from the gradient of the layer's output."""
    if isinstance(module, nn.Conv2d):
        s = s.permute(0, 2, 3, 1).reshape(-1, s.shape[1])
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        s = s.reshape(-1, s.shape[-1])
        return (s * s).sum(0) / s.shape[0]
    summed = s.sum((0, 2, 3)) if isinstance(module, nn.BatchNorm2d) else \
        s.sum(tuple(range(s.dim() - 1)))
    return summed * summed / s.shape[0]


class PublishedAdaFisher(torch.optim.Optimizer):
    """AdaFisher with the published implementation's step structure (module docstring): factors
    measured and folded per call inside the hooks, F as a full Kronecker product per layer, a
    Python loop over the parameters. Parameters of no supported layer get F = 1."""

    def __init__(self, model: nn.Module, lr: float, beta: float, weight_decay: float,
                 damping: float, gammas: tuple[float, float], update_interval: int = 1) -> None:
        super().__init__(model.parameters(), dict(lr=lr, beta=beta, weight_decay=weight_decay))
        self.damping, self.gammas, self.update_interval = damping, gammas, update_interval
        self.steps = 0
        self.H: dict[nn.Module, torch.Tensor] = {}
        self.S: dict[nn.Module, torch.Tensor] = {}
        self.layer_of: dict[int, tuple[nn.Module, str]] = {}
        for module in model.modules():
            if isinstance(module, LAYERS) and module.weight is not None:
                for role in ("weight", "bias"):
                    param = getattr(module, role)
                    if param is not None:
                        self.layer_of.setdefault(id(param), (module, role))
                module.register_forward_pre_hook(self._save_input)
                module.register_full_backward_hook(self._save_grad_output)
        # The first layer's input (the images) needs no gradient; torch then warns that the full
        # backward hook fires with the output's gradient only, which is all S needs.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients "
                                "are computed with respect to module outputs")

    def _fold(self, table: dict, module: nn.Module, new: torch.Tensor) -> None:
        g1, g2 = self.gammas
        running = table.get(module, torch.ones_like(new))  # the running factors start at 1
        table[module] = (1 - g1) * running + g2 * _minmax(new)

    def _save_input(self, module, args) -> None:
        if torch.is_grad_enabled() and self.steps % self.update_interval == 0:
            self._fold(self.H, module, _input_factor(module, args[0].detach()))

    def _save_grad_output(self, module, grad_input, grad_output) -> None:
        if self.steps % self.update_interval == 0:
            self._fold(self.S, module, _output_factor(module, grad_output[0].detach()))

    def _fisher(self, param: torch.Tensor) -> torch.Tensor | float:
        owned = self.layer_of.get(id(param))
        if owned is None or owned[0] not in self.H:
            return 1.0
        module, role = owned
        s, h = self.S[module], self.H[module]
        full = torch.kron(s, h).view(s.numel(), h.numel()) + self.damping  # (out, in [+ 1])
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            return full[:, 0] if role == "weight" else full[:, 1]
        if role == "bias":
            return full[:, -1]
        return full[:, :param[0].numel()].reshape(param.shape)

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["beta"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["momentum"] = torch.zeros_like(param)
                state["step"] += 1
                m = state["momentum"]
                m.mul_(beta).add_(param.grad + wd * param, alpha=1 - beta)
                param.add_(m / self._fisher(param), alpha=-lr / (1 - beta ** state["step"]))
        self.steps += 1


# ---- the check and the timing -------------------------------------------------------------------


def training_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                  y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def check_same_math(batch: int, steps: int = CHECK_STEPS) -> dict[str, float]:
    """In float64, from one set of weights and batches, `steps` steps of PublishedAdaFisher, of
    AdaFisherReference and of fadam_fused.AdaFisher (update_interval 1); asserts that the
    parameters agree, and returns the largest relative differences to the reference."""
    x_train, y_train, _, _ = train_digits_cnn.load()
    torch.manual_seed(0)
    base = train_digits_cnn.make_model().double()
    models = {name: copy.deepcopy(base) for name in ("published", "reference", "ours")}
    opts = {"published": PublishedAdaFisher(models["published"], update_interval=1, **HYPER),
            "reference": AdaFisherReference(models["reference"], update_interval=1, **HYPER),
            "ours": AdaFisher(models["ours"], update_interval=1, **HYPER)}
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(y_train), (batch,), generator=gen)
        x, y = x_train[idx].double(), y_train[idx]
        for name, model in models.items():
            opt = opts[name]
            loss = F.cross_entropy(model(x), y)
            for p in model.parameters():
                p.grad = None
            loss.backward()
            opt.step()
    diffs = {}
    ref = dict(models["reference"].named_parameters())
    # The published re-implementation is float64 throughout, one op order away from the
    # reference: 1e-9 is far above its rounding (~1e-16 per op, times 1 / F <= 1 / damping =
    # 1e3) and far below any difference of formula. fadam_fused.AdaFisher keeps its momentum in
    # float32 whatever the parameter dtype: 1e-8 relative after 2 steps here, so 1e-5 / 1e-8
    # (the float32 tolerances of its own tests are 1e-5 / 1e-6).
    tolerances = {"published": dict(rtol=1e-9, atol=1e-12), "ours": dict(rtol=1e-5, atol=1e-8)}
    for name in ("published", "ours"):
        worst = 0.0
        for pname, p in models[name].named_parameters():
            r = ref[pname].detach()
            torch.testing.assert_close(p.detach(), r, **tolerances[name],
                                       msg=lambda m: f"{name} {pname} differs: {m}")
            worst = max(worst, float((p.detach() - r).abs().max() / r.abs().max()))
        diffs[name] = worst
        moved = max(float((p.detach() - q.detach()).abs().max()) for p, q in
                    zip(models[name].parameters(), base.parameters()))
        assert moved > 1e-4, f"{name}: the parameters did not move ({moved})"
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
    for name, make in (("published", lambda m: PublishedAdaFisher(m, update_interval=1, **HYPER)),
                       ("ours", lambda m: AdaFisher(m, update_interval=1, **HYPER))):
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
    print(f"AdaFisher training step, BatchNorm CNN of examples/train_digits_cnn.py (10,026 "
          f"parameters), batch {args.batch}, update_interval 1, cpu ({step_bench.cpu_model()}), "
          f"{args.threads} thread(s), torch {torch.__version__}; at the start: {start}")
    print(f"fadam_fused.AdaFisher steps on backend {backend!r}"
          + ("" if backend == "cpu" else " (this build has no AdaFisher CPU kernels yet)"))
    diffs = check_same_math(min(args.batch, 64))
    print(f"same math, float64, {CHECK_STEPS} steps: largest difference to "
          f"AdaFisherReference, relative to the parameter's scale: published "
          f"{diffs['published']:.1e}, fadam_fused.AdaFisher {diffs['ours']:.1e}")
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
