"""Shared test helpers: deterministic problems, trajectories of every backend, and the tolerances.

A trajectory runs N optimizer steps on fixed initial parameters and a fixed gradient sequence and
records, after every step, each parameter and its whole state. Backends are compared against the
float64 oracle (fadam_fused.reference with upcast=True, float64 parameters and state):

- float32: |fast - ref64| <= atol + rtol |ref64| with atol 1e-6, rtol 1e-5 (the
  tolerances of bitsandbytes' and optimi's optimizer tests).
- bfloat16 / float16: flash-attention's rule |fast - ref64| <= 2 |ref_same - ref64| + atol, where
  ref_same is the oracle at the same storage precision (backend="reference"), atol 1e-3 (bf16) or
  1e-4 (fp16); float32 state is held to the float32 tolerance on top of that rule.
"""

from __future__ import annotations

import dataclasses

import torch

from fadam_fused import FAdam, reference

ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}

DEFAULT_SHAPES = [(0,), (1,), (4097,), (5, 123, 123), (3, 7)]


@dataclasses.dataclass
class Problem:
    """Initial parameters and per-step gradients (None = this parameter has no grad that step)."""

    init: list[torch.Tensor]
    grads: list[list[torch.Tensor | None]]
    dtype: torch.dtype

    @property
    def steps(self) -> int:
        return len(self.grads)


def make_problem(shapes=DEFAULT_SHAPES, steps=10, dtype=torch.float32, seed=0, no_grad=(),
                 zero_grad=(), grad_scale_by_step=None) -> Problem:
    """Random problem; gradients alternate in scale (x3, x0.01) so clipping switches on and off."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = []
    for k in range(steps):
        scale = grad_scale_by_step(k) if grad_scale_by_step else (3.0 if k % 2 == 0 else 0.01)
        row = []
        for i, s in enumerate(shapes):
            if i in no_grad:
                row.append(None)
            elif i in zero_grad:
                row.append(torch.zeros(s, dtype=dtype))
            else:
                row.append((torch.randn(s, generator=gen) * scale).to(dtype))
        grads.append(row)
    return Problem(init, grads, dtype)


@dataclasses.dataclass
class Snapshot:
    params: list[torch.Tensor]
    momentum: list[torch.Tensor | None]
    fim: list[torch.Tensor | None]
    step: list[float | None]


def _snapshot(params, state) -> Snapshot:
    def get(p, key):
        return state[p][key].detach().clone() if key in state.get(p, {}) else None

    steps = [float(state[p]["step"]) if "step" in state.get(p, {}) else None for p in params]
    return Snapshot([p.detach().clone() for p in params], [get(p, "momentum") for p in params],
                    [get(p, "fim") for p in params], steps)


def make_optimizer(params, backend: str, groups=None, **hyper) -> FAdam:
    """FAdam(backend=...) over `params`; `groups` is a list of (indices, overrides) pairs."""
    if groups is None:
        return FAdam(params, backend=backend, **hyper)
    return FAdam([{"params": [params[i] for i in idx], **over} for idx, over in groups],
                 backend=backend, **hyper)


def op_inputs(dtype, shapes, seed=0, device="cpu"):
    """Random params, grads, fims, momentums and steps (t = 3) for direct op calls."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    fims = [(torch.rand(s, generator=gen) + 0.5).to(device) for s in shapes]
    moms = [(torch.randn(s, generator=gen) * 0.1).to(device) for s in shapes]
    steps = [torch.tensor(3.0, device=device) for _ in shapes]
    return params, grads, fims, moms, steps


def run_optimizer(problem: Problem, backend: str, groups=None, lr_schedule=None, **hyper):
    """Trajectory of FAdam(backend=...). `groups` is a list of (indices, overrides) pairs."""
    params = [torch.nn.Parameter(t.clone()) for t in problem.init]
    opt = make_optimizer(params, backend, groups, **hyper)
    snaps = []
    for k, row in enumerate(problem.grads):
        if lr_schedule is not None:
            for group in opt.param_groups:
                group["lr"] = lr_schedule(k)
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()
        snaps.append(_snapshot(params, opt.state))
    return snaps, params, opt


def run_oracle64(problem: Problem, groups=None, lr_schedule=None, lr=1e-3, betas=(0.9, 0.999),
                 eps=1e-8, clip=1.0, weight_decay=1e-3, p=0.5, maximize=False):
    """Trajectory of the float64 oracle: float64 parameters and state, math in float64."""
    n = len(problem.init)
    params = [t.to(torch.float64) for t in problem.init]
    moms = [torch.zeros_like(t) for t in params]
    fims = [torch.ones_like(t) for t in params]
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    started = [False] * n
    if groups is None:
        groups = [(list(range(n)), {})]
    base = dict(lr=lr, betas=betas, eps=eps, clip=clip, weight_decay=weight_decay, p=p,
                maximize=maximize)
    snaps = []
    for k, row in enumerate(problem.grads):
        skip = reference.nonfinite_flag([g.to(torch.float64) for g in row if g is not None])
        for idx, over in groups:
            h = {**base, **over}
            if lr_schedule is not None:
                h["lr"] = lr_schedule(k)
            live = [i for i in idx if row[i] is not None]
            for i in live:
                started[i] = True
                t = steps[i] + 1
                reference.update_tensor(params[i], row[i].to(torch.float64), moms[i], fims[i], t,
                                        skip, lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1],
                                        eps=h["eps"], clip=h["clip"],
                                        weight_decay=h["weight_decay"], p=h["p"],
                                        maximize=h["maximize"], upcast=True)
                steps[i].copy_(torch.where(skip != 0, steps[i], t))
        snaps.append(Snapshot([t.clone() for t in params],
                              [m.clone() if s else None for m, s in zip(moms, started)],
                              [f.clone() if s else None for f, s in zip(fims, started)],
                              [float(st) if s else None for st, s in zip(steps, started)]))
    return snaps


def _close(name, fast, ref64, same, dtype, state: bool):
    """Asserts the tolerance of the module docstring; returns the largest absolute error."""
    fast64, ref64 = fast.to(torch.float64), ref64.to(torch.float64)
    err = (fast64 - ref64).abs()
    if dtype == torch.float32:
        bound = ATOL[dtype] + RTOL[dtype] * ref64.abs()
    else:
        assert same is not None, "low precision needs the same-precision oracle"
        slack = 2 * (same.to(torch.float64) - ref64).abs()
        if state:  # float32 storage: the float32 tolerance on top of the flash-attention rule
            bound = slack + ATOL[torch.float32] + RTOL[torch.float32] * ref64.abs()
        else:
            bound = slack + ATOL[dtype]
    bad = ~(err <= bound)
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.numel()} elements out of tolerance; first at "
            f"{i}: fast={fast64.flatten()[i].item()!r} ref64={ref64.flatten()[i].item()!r} "
            f"bound={bound.flatten()[i].item():.3g}; max err {err.max().item():.3g}")
    return err.max().item() if err.numel() else 0.0


def assert_trajectories_close(fast, ref64, same=None, dtype=torch.float32) -> float:
    """Every parameter and state tensor at every step; returns the largest parameter error."""
    worst = 0.0
    for k, (a, r) in enumerate(zip(fast, ref64, strict=True)):
        s = same[k] if same is not None else None
        for i in range(len(a.params)):
            tag = f"step {k + 1}, tensor {i}"
            worst = max(worst, _close(f"{tag} param", a.params[i], r.params[i],
                                      s.params[i] if s else None, dtype, state=False))
            assert a.step[i] == r.step[i], f"{tag} step {a.step[i]} != {r.step[i]}"
            for key in ("momentum", "fim"):
                av, rv = getattr(a, key)[i], getattr(r, key)[i]
                assert (av is None) == (rv is None), f"{tag} {key} presence differs"
                if av is not None:
                    assert av.dtype == torch.float32, f"{tag} {key} is {av.dtype}, not float32"
                    sv = getattr(s, key)[i] if s else None
                    _close(f"{tag} {key}", av, rv, sv, dtype, state=True)
    return worst


# The overflow rule (docs/design.md section 6): a step is skipped when a scaled gradient
# g = grad / grad_scale (negated with maximize) has a float32 square that is not finite: NaN, inf,
# or |g| >= 2^64 = 1.845e19 (g * g rounds past 3.40e38, float32's max, to inf).
# (id, the gradient element, grad_scale).
SQUARE_OVERFLOWS = [
    ("1e20", 1e20, None),
    ("-1e20", -1e20, None),
    ("1.85e19", 1.85e19, None),  # 3.42e38: just over
    ("1e10-scale-1e-10", 1e10, 1e-10),  # g = 1e20, finite in float32; g * g is not
    ("1e10-scale-1e-30", 1e10, 1e-30),  # g = 1e40: inf in float32 already
]
# Finite squares: 1e38, and 3.24e38 just under the limit. Not skipped.
SQUARE_FITS = [1e19, 1.8e19]


# Two param groups with their own clip, p and weight decay; then an lr changed before every step.
TWO_GROUPS = [([0, 2, 4], {"lr": 3e-2, "clip": 2.0}), ([1, 3], {"weight_decay": 0.0, "p": 0.75})]


def assert_groups_and_lr_schedule_match_oracle(problem: Problem, run) -> None:
    """The two-groups run and the lr-schedule run of `run(problem, groups=..., lr_schedule=...)`
    (run_optimizer with a backend bound, or a device variant) against the float64 oracle."""
    fast, _, _ = run(problem, groups=TWO_GROUPS)
    assert_trajectories_close(fast, run_oracle64(problem, groups=TWO_GROUPS))
    schedule = lambda k: 1e-2 / (1 + k)  # noqa: E731
    fast, _, _ = run(problem, lr_schedule=schedule)
    assert_trajectories_close(fast, run_oracle64(problem, lr_schedule=schedule))
