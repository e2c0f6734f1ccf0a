"""bfloat16 stochastic rounding on the CPU: the step's cost, paired with round to nearest in one
process, and the bytes per parameter of weights and optimizer state per option.

    .venv/bin/python bench/sr_bench.py            # ~1 min on 2 cores
    .venv/bin/python bench/sr_bench.py --params 16 --rounds 30

Speed: two optimizers on two identical bfloat16 parameter lists (same gradients), one rounding to
nearest and one stochastically, stepped alternately (A B B A ...) so that both see the same
machine state; the figure is the median of the per-round time ratios, with the median times. Run
for a float32 and a bfloat16 momentum, for FAdam, FAdafactor and AdaFisher (its parameters the
weights of Linear layers, so F = S H^T + damping is read from the factors). Memory: the state
column is bench/step_bench.py's measured_state_bytes (every tensor of opt.state, each storage
once; AdaFisher's layer factors added); weights are the parameters' bytes, plus a float32 master
copy for the AMP-style row (bfloat16 model, float32 weights in the optimizer).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.step_bench import measured_state_bytes  # noqa: E402
from fadam_fused import AdaFisher, FAdafactor, FAdam  # noqa: E402

OPTIMIZERS = (FAdam, FAdafactor, AdaFisher)


def _params(n_tensors: int, rows: int, cols: int, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(rows, cols, generator=gen).to(dtype))
            for _ in range(n_tensors)]


def _make(cls, params, **kw):
    """`cls` over `params`; AdaFisher's with each matrix the weight of a Linear layer (and a
    vector its bias), so that its update reads F from the layer's factors."""
    if cls is not AdaFisher:
        return cls(params, **kw)
    layers = torch.nn.ModuleList()
    for p in params:
        if p.dim() == 2:
            layer = torch.nn.Linear(p.shape[1], p.shape[0], bias=False)
            layer.weight = p
            layers.append(layer)
        else:
            layers[-1].bias = p
    return AdaFisher(layers, params, **kw)


def _step_time(opt) -> float:
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def paired(cls, n_tensors, rows, cols, rounds, momentum_dtype) -> dict:
    params = {r: _params(n_tensors, rows, cols, torch.bfloat16) for r in ("nearest", "stochastic")}
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(rows, cols, generator=gen).bfloat16() * 1e-2 for _ in range(n_tensors)]
    opts = {}
    for rounding, ps in params.items():
        for p, g in zip(ps, grads):
            p.grad = g
        opts[rounding] = _make(cls, ps, lr=1e-4, backend="cpu", bf16_rounding=rounding,
                               rounding_seed=0, momentum_dtype=momentum_dtype)
        for _ in range(3):  # state, first-call warm-up
            opts[rounding].step()
    times = {r: [] for r in opts}
    ratios = []
    for k in range(rounds):
        order = ("nearest", "stochastic") if k % 2 == 0 else ("stochastic", "nearest")
        got = {r: _step_time(opts[r]) for r in order}
        for r, t in got.items():
            times[r].append(t)
        ratios.append(got["stochastic"] / got["nearest"])
    return {"nearest_ms": 1e3 * statistics.median(times["nearest"]),
            "stochastic_ms": 1e3 * statistics.median(times["stochastic"]),
            "ratio": statistics.median(ratios),
            "ratio_q1_q3": statistics.quantiles(ratios, n=4)[::2]}


def memory_table(rows: int, cols: int) -> list[tuple[str, str, float, float]]:
    """(optimizer, option, weight B/param, state B/param) for one (rows, cols) matrix and its
    bias-like vector of `cols` elements."""
    out = []
    shapes = [(rows, cols), (cols,)]
    n = sum(r * c for r, c in [(rows, cols)]) + cols
    for cls in OPTIMIZERS:
        for option, dtype, kw, master in (
                ("float32 weights", torch.float32, {}, 0),
                ("bf16 model + fp32 master (AMP)", torch.float32, {}, 2),
                ("pure bf16 + stochastic rounding", torch.bfloat16,
                 dict(bf16_rounding="stochastic", rounding_seed=0), 0),
                ("pure bf16 + SR + bf16 momentum", torch.bfloat16,
                 dict(bf16_rounding="stochastic", rounding_seed=0,
                      momentum_dtype=torch.bfloat16), 0)):
            ps = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
            opt = _make(cls, ps, backend="cpu", **kw)
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
            weights = sum(p.nbytes for p in ps) / n + master  # AMP: the bf16 model besides
            state = measured_state_bytes(opt)
            if cls is AdaFisher:  # the layers' factors H and S (float32), kept beside opt.state
                state += sum(layer.fisher_in.nbytes + layer.fisher_out.nbytes
                             for layer in opt._factors.layers.values())
            out.append((cls.__name__, option, weights, state / n))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=8, help="bfloat16 parameters, millions")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args(argv)
    rows = cols = 1024
    n_tensors = max(1, args.params)
    print(f"threads {torch.get_num_threads()}; {n_tensors} bfloat16 tensors of {rows} x {cols}")
    print("optimizer   momentum   nearest ms  stochastic ms  ratio (median, q1..q3)")
    for cls in OPTIMIZERS:
        for mdt in (torch.float32, torch.bfloat16):
            r = paired(cls, n_tensors, rows, cols, args.rounds, mdt)
            q1, q3 = r["ratio_q1_q3"]
            print(f"{cls.__name__:<11} {str(mdt).removeprefix('torch.'):<10} "
                  f"{r['nearest_ms']:>10.1f}  {r['stochastic_ms']:>13.1f}  {r['ratio']:.3f} "
                  f"({q1:.3f}..{q3:.3f})", flush=True)
    print("\nbytes per parameter (a 1024 x 1024 matrix and a 1024 vector):")
    print(f"{'optimizer':<11} {'option':<33} weights  state  total")
    for name, option, weights, state in memory_table(rows, cols):
        print(f"{name:<11} {option:<33} {weights:>7.2f} {state:>6.2f} {weights + state:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
