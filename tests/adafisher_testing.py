"""Shared AdaFisher test helpers: a model with every supported layer kind (and what is not), runs of
fadam_fused.AdaFisher next to the float64 oracle (reference.AdaFisherReference), and the
comparison of parameters, momentum and factors at every step.

Tolerances as tests/fadam_testing.py: float32 |fast - ref64| <= 1e-6 + 1e-5 |ref64|; bfloat16 and
float16 parameters by flash-attention's rule against the same-precision run of the reference
backend, plus one ulp of the value (float32 state and factors held to the float32 tolerance on
top).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from fadam_fused import AdaFisher, AdaFisherW
from fadam_fused.reference import AdaFisherReference
from fadam_testing import ATOL, RTOL


class Net(nn.Module):
    """Every supported layer kind with odd shapes: a strided conv without bias, a grouped dilated
    conv with asymmetric kernel and padding, BatchNorm2d, Linear, LayerNorm; a parameter outside
    any supported layer (`extra`, F = 1) and a layer that never gets a gradient (`unused`)."""

    OUT = 7

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, stride=2, bias=False)
        self.c2 = nn.Conv2d(6, 4, (2, 3), padding=(1, 0), dilation=(1, 2), groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(20, self.OUT)
        self.ln = nn.LayerNorm(self.OUT)
        self.extra = nn.Parameter(torch.randn(self.OUT) * 0.1)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.relu(self.bn(self.c2(h))).flatten(1)
        return self.ln(self.fc(h)) + self.extra


def batch(k: int, dtype=torch.float32, rows: int = 5):
    gen = torch.Generator().manual_seed(100 + k)
    x = torch.randn(rows, 3, 8, 9, generator=gen)
    target = torch.randn(rows, Net.OUT, generator=gen)
    return x.to(dtype), target.to(dtype)


def loss_of(model, x, target):
    return (model(x) - target).square().mean()


def make_model(dtype=torch.float32, seed=0, cls=Net):
    torch.manual_seed(seed)
    return cls().to(dtype)


HYPER = dict(lr=2e-4, weight_decay=1e-2)


def snapshot(model, opt=None, oracle=None):
    """{name: tensor} of every parameter, its momentum, and every layer's factors (float64)."""
    out = {n: p.detach().to(torch.float64).clone() for n, p in model.named_parameters()}
    if opt is not None:
        for n, p in model.named_parameters():
            if p in opt.state:
                out[f"{n}.momentum"] = opt.state[p]["momentum"].to(torch.float64).clone()
        for name, layer in opt._factors.layers.items():
            out[f"{name}.H"] = layer.fisher_in.to(torch.float64).clone()
            out[f"{name}.S"] = layer.fisher_out.to(torch.float64).clone()
    if oracle is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for p, m in oracle.momentum.items():
            if oracle.steps[p]:
                out[f"{names[id(p)]}.momentum"] = m.clone()
        modules = {m: n for n, m in model.named_modules()}
        for module in oracle.H:
            out[f"{modules[module]}.H"] = oracle.H[module].clone()
            out[f"{modules[module]}.S"] = oracle.S[module].clone()
    return out


def run(steps, dtype=torch.float32, backend="reference", decoupled=False, micro=1, **kw):
    """Snapshots after every step of fadam_fused.AdaFisher(W) on Net in `dtype`."""
    model = make_model(dtype)
    cls = AdaFisherW if decoupled else AdaFisher
    opt = cls(model, backend=backend, **{**HYPER, **kw})
    snaps = []
    for k in range(steps):
        opt.zero_grad()
        for j in range(micro):
            x, t = batch(k * micro + j, dtype)
            (loss_of(model, x, t) / micro).backward()
        opt.step()
        snaps.append(snapshot(model, opt))
    return snaps, model, opt


def run_oracle(steps, decoupled=False, micro=1, update_interval=100, dtype=torch.float64, **kw):
    """Snapshots of the oracle (float64, or `dtype`: the same algorithm run at that precision)
    on the same model, data and hyperparameters."""
    model = make_model(dtype)
    h = {**HYPER, **kw}
    oracle = AdaFisherReference(model, decoupled=decoupled, update_interval=update_interval,
                                **h)
    snaps = []
    for k in range(steps):
        for p in model.parameters():
            p.grad = None
        for j in range(micro):
            x, t = batch(k * micro + j, dtype)
            (loss_of(model, x, t) / micro).backward()
        oracle.step()
        snaps.append(snapshot(model, oracle=oracle))
    return snaps


def assert_close(fast, ref64, same=None, dtype=torch.float32):
    """Every entry of every step's snapshot within the module doc's tolerance."""
    for k, (a, r) in enumerate(zip(fast, ref64, strict=True)):
        assert a.keys() == r.keys(), (k, sorted(set(a) ^ set(r)))
        for key in a:
            err = (a[key] - r[key]).abs()
            if dtype == torch.float32 or same is None:
                bound = ATOL[torch.float32] + RTOL[torch.float32] * r[key].abs()
            else:
                # flash-attention's rule, per tensor: the largest error at most twice the
                # largest error of the oracle run at the same precision, plus the dtype's atol
                # (the momentum and the factors come from low-precision gradients too), plus
                # one ulp of the value (eps |ref|): the two runs round their stored values
                # independently. Without it the bound could fall below an ulp. With one thread
                # the float16 oracle's torch ops round differently, and its bn.weight ended step
                # 6 0.43e-3 from float64: a bound of 0.95e-3, under float16's ulp at 1.0
                # (0.98e-3). The fast run was 1.18e-3 away, as the 2-thread oracle is.
                bound = (2 * (same[k][key] - r[key]).abs().max() + ATOL[dtype]
                         + torch.finfo(dtype).eps * r[key].abs())
            bad = ~(err <= bound)
            assert not bad.any(), (f"step {k + 1} {key}: {int(bad.sum())} of {err.numel()} out; "
                                   f"max err {err.max().item():.3g}")


def twin(model):
    return copy.deepcopy(model)
