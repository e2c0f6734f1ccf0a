"""Train a small CNN with BatchNorm on scikit-learn's digits with AdaFisher, AdamW or FAdam.

The data are the 1797 8 x 8 grey images of handwritten digits that ship with scikit-learn
(`sklearn.datasets.load_digits`: nothing is downloaded). A fixed 20% (360 images, seed 0,
stratified by class) is the test set, the same for every run; the model (two 3 x 3 convolutions
with BatchNorm and ReLU, a 2 x 2 max-pool, one linear layer: 10,026 parameters) trains for a fixed
number of steps on the rest, and the run reports the test accuracy. Each seed gives the initial
weights and the batch order, so runs of different optimizers with one seed differ only by the
optimizer.

    .venv/bin/python examples/train_digits_cnn.py                      # adafisher and adamw
    .venv/bin/python examples/train_digits_cnn.py --optimizer adafisher --lr 3e-4 --seeds 0
    # the learning-rate sweep behind LRS: each lr trained on 80% of the training set and scored
    # on the other 20% (never on the test set), the best mean over the seeds then trained on the
    # whole training set and tested
    .venv/bin/python examples/train_digits_cnn.py --sweep 3e-4,1e-3,3e-3,1e-2,3e-2

AdaFisher takes the model (its hooks measure the Conv2d, BatchNorm2d and Linear layers' Fisher
factors every `--update-interval` steps); the others take its parameters. Its learning rate is
far below AdamW's because it divides the momentum by F = S H^T + damping, which settles near
the damping (1e-3): the running factors tend to 0.008 / 0.92 x a min-max normalised value, so
S H^T <= 7.6e-5, and lr 1e-4 moves a parameter by up to ~0.1 x its momentum per step (lr 1e-2,
10x: diverges).

The run prints each optimizer's test accuracy (mean over the seeds, and each seed's) and writes a
figure of the training loss (mean over the seeds) with the accuracies in its legend, and the
figures as JSON next to it: examples/out/digits_cnn_<optimizers>.png and .json (`--plot`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from fadam_fused import AdaFisher, AdaFisherW, FAdam, backends
except ImportError:  # running from a checkout without `pip install -e .`: use the checkout's package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fadam_fused import AdaFisher, AdaFisherW, FAdam, backends

OPTIMIZERS = ("adafisher", "adafisherw", "adamw", "fadam")
# The learning rates the sweep chose (bench/NOTES.md, "AdaFisher"): the best mean validation
# accuracy over seeds 0-2 among 1e-4, 3e-4, 1e-3, 3e-3, 1e-2 and 3e-2, 300 steps of 64 images
# (`--optimizers adafisher,adamw --sweep ...`). AdaFisher 1e-4 (98.15%; 3e-4 98.03%, 1e-3
# 97.80%, 3e-3 95.37%, 1e-2 and up diverge to 10%), AdamW 3e-3 (98.50%). AdaFisherW takes
# AdaFisher's and FAdam AdamW's: neither was swept.
LRS = {"adafisher": 1e-4, "adafisherw": 1e-4, "adamw": 3e-3, "fadam": 3e-3}
TEST_FRACTION = 0.2


def load(validation: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, held-out images, held-out labels): images (N, 1, 8, 8) in
    [0, 1]. The held-out set is the test set, or with `validation` 20% of the training set (the
    test set then left out entirely). Splits are stratified by class, with seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=0, stratify=y)
    if validation:
        x_train, x_test, y_train, y_test = train_test_split(
            x_train, y_train, test_size=TEST_FRACTION, random_state=0, stratify=y_train)
    return x_train, y_train, x_test, y_test


def make_model() -> nn.Sequential:
    """conv 3x3 (1 -> 16) + BN + ReLU, conv 3x3 (16 -> 32) + BN + ReLU, max-pool 2x2 (8x8 ->
    4x4), linear (512 -> 10): 10,026 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def make_optimizer(name: str, model: nn.Module, lr: float, update_interval: int,
                   backend: str | None = None) -> torch.optim.Optimizer:
    """Each optimizer with its own defaults but the learning rate: AdamW weight_decay 0.01
    (torch's), FAdam 1e-3 (the paper's, applied as a natural gradient), AdaFisher 0 and
    AdaFisherW 0.01 (the published configs'); AdaFisher's damping 1e-3 and gammas
    (0.92, 0.008), the published ones."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if name == "fadam":
        return FAdam(model.parameters(), lr=lr, backend=backend)
    cls = AdaFisherW if name == "adafisherw" else AdaFisher
    extra = dict(weight_decay=0.01) if name == "adafisherw" else {}
    return cls(model, lr=lr, update_interval=update_interval, backend=backend, **extra)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        right = (model(x).argmax(1) == y).sum().item()
    model.train()
    return 100.0 * right / len(y)


def train(name: str, lr: float, seed: int, data, *, steps: int, batch: int,
          update_interval: int, backend: str | None = None, log_every: int = 0) -> dict:
    """One run: `steps` steps of `batch` images (reshuffled every epoch) with a cosine decay of
    the lr to 0; returns the held-out accuracy (%), the losses and the training time (s)."""
    x_train, y_train, x_held, y_held = data
    torch.manual_seed(seed)  # the same initial weights for every optimizer
    model = make_model()
    opt = make_optimizer(name, model, lr, update_interval, backend)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed + 1)
    order, at = torch.randperm(len(y_train), generator=gen), 0
    losses = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if at + batch > len(order):  # a new epoch: drop the remainder, reshuffle
            order, at = torch.randperm(len(y_train), generator=gen), 0
        idx = order[at:at + batch]
        at += batch
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps):
            print(f"  {name} lr {lr:g} seed {seed} step {step:>4}  loss {loss.item():.4f}  "
                  f"held-out {accuracy(model, x_held, y_held):.2f}%", flush=True)
    seconds = time.perf_counter() - start
    return {"accuracy": accuracy(model, x_held, y_held), "losses": losses, "seconds": seconds}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizers", "--optimizer", dest="optimizers", default="adafisher,adamw",
                    help=f"comma list of {', '.join(OPTIMIZERS)} (default adafisher,adamw)")
    ap.add_argument("--lr", type=float, default=None,
                    help="one learning rate for every optimizer (default: each its swept one, "
                         + ", ".join(f"{k} {v:g}" for k, v in LRS.items()) + ")")
    ap.add_argument("--sweep", type=_floats, default=None, metavar="LR,LR,...",
                    help="choose each optimizer's lr among these on a validation split first")
    ap.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma list (default 0,1,2)")
    ap.add_argument("--update-interval", type=int, default=10,
                    help="AdaFisher's factor update interval in steps (default 10: 30 updates "
                         "in 300 steps; the published default, 100, suits longer runs)")
    ap.add_argument("--backend", default=None, help="fadam_fused backend (default: the fastest)")
    ap.add_argument("--log-every", type=int, default=0, help="print loss and accuracy every N steps")
    ap.add_argument("--plot", default=None,
                    help="PNG path, the JSON next to it ('' for none; default "
                         "examples/out/digits_cnn_<optimizers>.png)")
    args = ap.parse_args(argv)
    names = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for name in names:
        if name not in OPTIMIZERS:
            raise SystemExit(f"unknown optimizer {name!r}; use {', '.join(OPTIMIZERS)}")
    if args.steps < 1 or args.batch < 1 or not args.seeds or args.update_interval < 1:
        raise SystemExit("--steps, --batch and --update-interval must be >= 1, --seeds not empty")
    for name in list(names):
        why = unavailable(name, args.backend)
        if why:
            print(f"skipped {name}: {why}")
            names.remove(name)
    if args.plot is None:
        args.plot = f"examples/out/digits_cnn_{'_'.join(names)}.png"
    torch.set_num_threads(1)  # a 15K-parameter model: more threads only add synchronisation
    run = dict(steps=args.steps, batch=args.batch, update_interval=args.update_interval,
               backend=args.backend)

    lrs = {name: args.lr if args.lr is not None else LRS[name] for name in names}
    if args.sweep:
        val = load(validation=True)
        print(f"lr sweep: {len(val[1])} training images, {len(val[3])} validation images, "
              f"{args.steps} steps of {args.batch}, seeds {args.seeds}")
        for name in names:
            scores = {}
            for lr in args.sweep:
                accs = [train(name, lr, seed, val, **run)["accuracy"] for seed in args.seeds]
                scores[lr] = statistics.mean(accs)
                print(f"  {name:<10} lr {lr:<8g} validation {scores[lr]:6.2f}%  "
                      f"({' '.join(f'{a:.2f}' for a in accs)})", flush=True)
            lrs[name] = max(scores, key=scores.get)  # ties: the first, the smallest lr
            print(f"  {name:<10} chose lr {lrs[name]:g}", flush=True)

    data = load()
    print(f"digits: {len(data[1])} training images, {len(data[3])} test images; {args.steps} "
          f"steps of {args.batch}; seeds {args.seeds}")
    results, histories = {}, {}
    for name in names:
        runs = [train(name, lrs[name], seed, data, log_every=args.log_every, **run)
                for seed in args.seeds]
        accs = [r["accuracy"] for r in runs]
        results[name] = accs
        histories[name] = runs
        spread = f" +- {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        print(f"  {name:<10} lr {lrs[name]:<8g} test accuracy {statistics.mean(accs):6.2f}%"
              f"{spread}  ({' '.join(f'{a:.2f}' for a in accs)}; final loss "
              f"{statistics.mean(r['losses'][-1] for r in runs):.4f}; "
              f"{statistics.mean(r['seconds'] for r in runs):.1f} s per run)", flush=True)
    if "adamw" in results:
        base = statistics.mean(results["adamw"])
        for name, accs in results.items():
            if name != "adamw":
                print(f"  {name} - adamw: {statistics.mean(accs) - base:+.2f} points")
    if args.plot and histories:
        write_figure(args.plot, histories, lrs, args)
    return 0


def unavailable(name: str, backend: str | None) -> str | None:
    """Why optimizer `name` cannot run on `backend` in this build (None if it can)."""
    if backend is None or backend == "reference" or not name.startswith("adafisher"):
        return None
    if not backends.adafisher_available(backend):
        return f"this build has no AdaFisher kernels for backend {backend!r}"
    return None


def write_figure(path: str, histories: dict[str, list[dict]], lrs: dict[str, float],
                 args) -> None:
    """The figures as JSON next to `path`; the training loss of each optimizer (mean over the
    seeds, a 10-step running mean) with its test accuracy in the legend, where matplotlib is
    installed (requirements-bench.txt)."""
    doc = dict(steps=args.steps, batch=args.batch, seeds=args.seeds,
               update_interval=args.update_interval, optimizers={})
    curves = {}
    for name, runs in histories.items():
        mean = [statistics.mean(vals) for vals in zip(*(r["losses"] for r in runs))]
        curves[name] = [statistics.mean(mean[max(0, i - 9):i + 1]) for i in range(len(mean))]
        accs = [r["accuracy"] for r in runs]
        doc["optimizers"][name] = dict(lr=lrs[name], test_accuracy=accs,
                                       mean_test_accuracy=statistics.mean(accs),
                                       seconds=[r["seconds"] for r in runs],
                                       final_loss=[r["losses"][-1] for r in runs])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    json_path = os.path.splitext(path)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    try:
        import matplotlib
    except ImportError:
        print(f"wrote {json_path}; no figure: matplotlib is not installed "
              "(pip install -r requirements-bench.txt)")
        return
    matplotlib.use("Agg")  # writes a file; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        r = doc["optimizers"][name]
        ax.plot(range(1, len(curve) + 1), curve,
                label=f"{name} lr {r['lr']:g}: test {r['mean_test_accuracy']:.2f}%")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"BatchNorm CNN on scikit-learn digits, {args.steps} steps of {args.batch}, "
                 f"{len(args.seeds)} seed(s)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path} and {json_path}")


if __name__ == "__main__":
    raise SystemExit(main())
