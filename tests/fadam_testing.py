"""Shared test helpers: deterministic problems, trajectories of FAdam and FAdafactor on every
backend and of their float64 oracle, the optimizers the scenarios run, and the tolerances.

A trajectory runs N optimizer steps on fixed initial parameters and a fixed gradient sequence and
records, after every step, each parameter and its whole state as CPU copies (a dict: "params",
and "state", one dict per parameter: its float32 tensors by key and "step" as a float; empty
before the parameter's first step). Backends are compared against the float64 oracle
(fadam_fused.reference with upcast=True, float64 parameters and state):

- float32: |fast - ref64| <= atol + rtol |ref64| with atol 1e-6, rtol 1e-5 (the
  tolerances of bitsandbytes' and optimi's optimizer tests).
- bfloat16 / float16: flash-attention's rule |fast - ref64| <= 2 |ref_same - ref64| + atol, where
  ref_same is the oracle at the same storage precision (backend="reference"), atol 1e-3 (bf16) or
  1e-4 (fp16); float32 state is held to the float32 tolerance on top of that rule.
"""

from __future__ import annotations

import dataclasses

import torch

from fadam_fused import FAdafactor, FAdam, reference
from fadam_fused.op_contract import smallest_safe_eps

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


def op_inputs(dtype, shapes, seed=0, device="cpu"):
    """Random params, grads, fims, momentums and steps (t = 3) for direct op calls."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    fims = [(torch.rand(s, generator=gen) + 0.5).to(device) for s in shapes]
    moms = [(torch.randn(s, generator=gen) * 0.1).to(device) for s in shapes]
    steps = [torch.tensor(3.0, device=device) for _ in shapes]
    return params, grads, fims, moms, steps


# ---- trajectories -------------------------------------------------------------------------------


def snapshot(params, state) -> dict:
    """Parameters and state after a step, as CPU copies (whatever the device)."""
    return {"params": [p.detach().to("cpu", copy=True) for p in params],
            "state": [{k: (v.detach().to("cpu", copy=True) if k != "step" else float(v))
                       for k, v in state.get(p, {}).items()} for p in params]}


def make_optimizer(params, backend, cls=FAdam, groups=None, **hyper):
    """cls(backend=...) over `params`; `groups` is a list of (indices, overrides) pairs."""
    if groups is None:
        return cls(params, backend=backend, **hyper)
    return cls([{"params": [params[i] for i in idx], **over} for idx, over in groups],
               backend=backend, **hyper)


def run_optimizer(problem: Problem, backend, cls=FAdam, device="cpu", groups=None,
                  lr_schedule=None, steps=None, params=None, opt=None, start=0, **hyper):
    """Trajectory of cls(backend=...) on `device`. `groups` is a list of (indices, overrides)
    pairs; `lr_schedule(k, lr)` gives step k's lr of a group whose lr was `lr` at construction.
    With `params` and `opt` given, continues that run from step `start` for `steps` steps."""
    if params is None:
        params = [torch.nn.Parameter(t.to(device, copy=True)) for t in problem.init]
    if opt is None:
        opt = make_optimizer(params, backend, cls, groups, **hyper)
    base_lrs = [group["lr"] for group in opt.param_groups]
    snaps = []
    end = problem.steps if steps is None else start + steps
    for k in range(start, end):
        if lr_schedule is not None:
            for group, lr in zip(opt.param_groups, base_lrs):
                group["lr"] = lr_schedule(k, lr)
        grads = [None if g is None else g.to(device, copy=True) for g in problem.grads[k]]
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        for p, g in zip(params, grads):  # p.grad is never changed (maximize, grad_scale)
            assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))
        snaps.append(snapshot(params, opt.state))
    return snaps, params, opt


def oracle_state(t: torch.Tensor, factored: bool) -> dict:
    """The initial float64 oracle state of a float64 parameter `t`: FAdafactor's row and column
    sums when `factored` and `t` has 2 or more dims, else FAdam's full FIM."""
    state = {"step": torch.zeros((), dtype=torch.float32), "momentum": torch.zeros_like(t)}
    if factored and reference.is_factored(t):
        state["fim_row"] = torch.ones(t.shape[:-1], dtype=torch.float64)
        state["fim_col"] = torch.ones(t.shape[:-2] + t.shape[-1:], dtype=torch.float64)
    else:
        state["fim"] = torch.ones_like(t)
    return state


def run_oracle64(problem: Problem, factored=False, groups=None, lr_schedule=None, lr=1e-3,
                 betas=(0.9, 0.999), eps=1e-8, clip=1.0, weight_decay=1e-3, p=0.5,
                 maximize=False):
    """Trajectory of the float64 oracle (FAdafactor's when `factored`, else FAdam's): float64
    parameters and state, math in float64. `groups` and `lr_schedule` as in run_optimizer."""
    n = len(problem.init)
    params = [t.to(torch.float64) for t in problem.init]
    states = [oracle_state(t, factored) for t in params]
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
            step_lr = h["lr"] if lr_schedule is None else lr_schedule(k, h["lr"])
            kw = dict(lr=step_lr, beta1=h["betas"][0], beta2=h["betas"][1], eps=h["eps"],
                      clip=h["clip"], weight_decay=h["weight_decay"], p=h["p"],
                      maximize=h["maximize"], upcast=True)
            for i in idx:
                if row[i] is None:
                    continue
                started[i] = True
                st = states[i]
                t = st["step"] + 1
                grad = row[i].to(torch.float64)
                if "fim" in st:
                    reference.update_tensor(params[i], grad, st["momentum"], st["fim"], t, skip,
                                            **kw)
                else:
                    reference.fadafactor_update_tensor(params[i], grad, st["momentum"],
                                                       st["fim_row"], st["fim_col"], t, skip, **kw)
                st["step"] = torch.where(skip != 0, st["step"], t)
        snaps.append({"params": [t.clone() for t in params],
                      "state": [({k: (v.clone() if k != "step" else float(v))
                                  for k, v in st.items()} if s else {})
                                for st, s in zip(states, started)]})
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
        for i in range(len(a["params"])):
            tag = f"step {k + 1}, tensor {i}"
            worst = max(worst, _close(f"{tag} param", a["params"][i], r["params"][i],
                                      s["params"][i] if s else None, dtype, state=False))
            sa, sr = a["state"][i], r["state"][i]
            assert sorted(sa) == sorted(sr), f"{tag}: state keys {sorted(sa)} != {sorted(sr)}"
            if not sa:
                continue
            assert sa["step"] == sr["step"], f"{tag} step {sa['step']} != {sr['step']}"
            for key in sa:
                if key == "step":
                    continue
                assert sa[key].dtype == torch.float32, f"{tag} {key} is {sa[key].dtype}"
                assert sa[key].shape == sr[key].shape, f"{tag} {key} shape"
                _close(f"{tag} {key}", sa[key], sr[key], s["state"][i][key] if s else None,
                       dtype, state=True)
    return worst


def assert_same_bits(a, b) -> None:
    """Two trajectories (or two snapshots) hold the same bits: every parameter, every state
    tensor, every step count."""
    a, b = (a, b) if isinstance(a, list) else ([a], [b])
    for k, (sa, sb) in enumerate(zip(a, b, strict=True)):
        for i, (x, y) in enumerate(zip(sa["params"], sb["params"], strict=True)):
            assert torch.equal(x, y), f"step {k + 1} param {i} differs"
        for i, (xa, xb) in enumerate(zip(sa["state"], sb["state"], strict=True)):
            assert sorted(xa) == sorted(xb), f"step {k + 1} tensor {i}: state keys differ"
            for key in xa:
                same = xa[key] == xb[key] if key == "step" else torch.equal(xa[key], xb[key])
                assert same, f"step {k + 1} tensor {i} {key} differs"


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

# FAdafactor's phase S also skips the step when a new R_i or C_j is not finite in float32. At step
# 1 (b2hat = 0) R and C are this step's sums of g^2 (at step 2 half of them: b2hat ~ 0.5), so the
# cases are first steps. (id, shape, value, one_element): the factored parameter's first gradient
# is `value` everywhere, or randn with `value` at one element.
FACTOR_OVERFLOWS = [
    ("rows-6x9-1e19", (6, 9), 1e19, False),        # g^2 = 1e38 fits; R_i = 9e38 does not
    ("cols-200x2-1.6e18", (200, 2), 1.6e18, False),  # R_i = 5.1e36; C_j = 200 x 2.56e36 = 5.1e38
    ("square-1e20", (4, 6), 1e20, True),           # g^2 = 1e40 (its float64 row sum would fit)
]
# Just under: R_i = 9 x 3.72e37 = 3.35e38, C_j = 200 x 1.59e36 = 3.18e38 (float32 max 3.40e38).
# 200 rows, not 2000: the same sums, for a tenth of the rows Triton's interpreter walks in Python;
# at the chunk of 64 they are still 7 tiles whose partial sums all fit.
FACTOR_FITS = [
    ("rows-6x9-6.1e18", (6, 9), 6.1e18, False),
    ("cols-200x2-1.26e18", (200, 2), 1.26e18, False),
]


def overflow_problem(shape, value, one_element, steps=3) -> Problem:
    """A factored parameter of `shape` and a 1-D one; the first step's factored gradient is the
    case's (make_problem's gradients after that)."""
    problem = make_problem(shapes=[shape, (5,)], steps=steps)
    if one_element:
        problem.grads[0][0][(1,) * len(shape)] = value
    else:
        problem.grads[0][0] = torch.full(shape, value)
    return problem



# ---- the optimizers the scenarios run (tests/conftest.py's `optimizer` fixture) ------------------


def embedding_problem(rows=200, dim=48, steps=8, touched=0.1, dtype=torch.float32, seed=0):
    """An embedding (rows x dim) and a vector; each step's gradient touches 10% of the rows."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(rows, dim, generator=gen).to(dtype),
            torch.randn(dim, generator=gen).to(dtype)]
    grads = []
    for _ in range(steps):
        g = torch.zeros(rows, dim)
        idx = torch.randperm(rows, generator=gen)[: int(rows * touched)]
        g[idx] = torch.randn(len(idx), dim, generator=gen)
        grads.append([g.to(dtype), torch.randn(dim, generator=gen).to(dtype)])
    return Problem(init, grads, dtype)


def edge_problem(dtype=torch.float32, steps=8):
    """A gradient row of zeros (R_i = 0), an all-zero gradient (sum R = 0), a 3-D parameter."""
    problem = make_problem(shapes=[(6, 10), (4, 5), (3, 6, 11)], steps=steps, dtype=dtype)
    for row in problem.grads:
        row[0][2] = 0  # row 2 of the first matrix never has a gradient
        row[1].zero_()
        row[2][1, 3] = 0
    return problem


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The problems of one optimizer at one size class of tests/conftest.py's backends."""

    shapes: list    # the parity problem: odd shapes, empty and one-element tensors
    no_grad: tuple  # tensors of `shapes` without a gradient in the "no-grad" case
    steps: int      # steps of the parity problem
    multi: list     # shapes of several chunks (and tiles) at the backend's multi-chunk size
    where: dict     # tensors of `multi` by kind: "multi-chunk", "one-chunk" (exactly), "tiny"
    edges: object   # fn(dtype) -> problems of zero gradients (FAdafactor: zero rows too)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optimizer class, its float64 oracle (FAdafactor's factored FIM or FAdam's) and its
    problems per size class."""

    id: str
    cls: type
    factored: bool
    sizes: dict      # size class ("large", "small") -> Sizes
    tiny_eps: tuple  # the eps values of the edge problems
    cases: list      # the parity cases: (id, hyperparameters, problem)
    overflows: list = dataclasses.field(default_factory=list)  # its own overflow rule's cases
    fits: list = dataclasses.field(default_factory=list)       # and those just under it

    def run(self, problem, backend, **kw):
        return run_optimizer(problem, backend, cls=self.cls, **kw)

    def oracle(self, problem, **kw):
        return run_oracle64(problem, factored=self.factored, **kw)

    def check(self, problem, backend, dtype=torch.float32, device="cpu", **hyper):
        """`problem` on `backend` (on `device`) against the oracle, every step, the full state;
        returns the trajectory."""
        fast, _, _ = self.run(problem, backend, device=device, **hyper)
        same = None if dtype == torch.float32 else self.run(problem, "reference", **hyper)[0]
        assert_trajectories_close(fast, self.oracle(problem, **hyper), same, dtype)
        return fast


# (id, hyperparameters, problem) of the parity scenario: "shapes" is the size class's parity
# problem, "no-grad" that problem with some tensors never given a gradient, "multi" its
# multi-chunk shapes at the backend's multi-chunk size (4096 on cpu and GPUs).
_CASES = [
    ("default", {}, "shapes"),
    ("lr1e-2", {"lr": 1e-2}, "shapes"),
    ("maximize", {"lr": 1e-2, "maximize": True}, "shapes"),
    ("clip-none", {"lr": 1e-2, "clip": None}, "shapes"),
    ("clip-2", {"lr": 1e-2, "clip": 2.0}, "shapes"),
    ("p0.75", {"lr": 1e-2, "p": 0.75}, "shapes"),
    ("no-grad", {"lr": 1e-2}, "no-grad"),
    # At t = 1 (b2hat = 0) the zero-padded lanes of a ragged vector tail get f = 0, so
    # d = eps^(2p): 1e-30 here, and 1.2e-38 (1 / d = 8.5e37, near float32's max) with p = 1 and
    # the smallest eps the optimizer accepts. Padding must not reach the RMS sums.
    ("eps1e-30", {"lr": 1e-2, "eps": 1e-30}, "shapes"),
    ("p1-eps-smallest", {"lr": 1e-2, "p": 1.0, "eps": smallest_safe_eps(1.0)}, "shapes"),
    # Phase-A slots and the multi-chunk sums (FAdafactor: several row and column tiles, chunks
    # that end mid-row); with clipping off phase A only checks the gradients.
    ("multi-chunk", {"lr": 1e-2}, "multi"),
    ("multi-chunk-clip-none", {"lr": 1e-2, "clip": None}, "multi"),
]


def _zero_grad(shapes, steps, zero):
    return lambda dtype: [make_problem(shapes=shapes, steps=steps, zero_grad=zero, dtype=dtype)]


# Small, for the emulated CUDA kernels (~1 ms per 512-thread block) and Triton's interpreter
# (~50 ms per program on the 2-core VM): a handful of tensors and steps. At chunk 64 (300,) is 5
# chunks with a ragged tail and (2, 9, 13) 4.
_FADAM_SMALL = [(0,), (1,), (300,), (3, 7), (2, 9, 13)]
FADAM = Optimizer("fadam", FAdam, factored=False, tiny_eps=(1e-20, 1e-30), cases=[
    *_CASES, ("wd0.1-betas", {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)}, "shapes"),
], sizes={
    # The multi-chunk shapes at chunk c: (3, c + 17) and 2c, ragged and even multi-chunk
    # tensors, and c, exactly one chunk (c = 4096 large, 64 small).
    "large": Sizes(DEFAULT_SHAPES, (1, 3), 10, [(3, 4096 + 17), (8192,), (4096,), (7,)],
                   {"multi-chunk": 0, "one-chunk": 2, "tiny": 3},
                   _zero_grad(DEFAULT_SHAPES, 10, (2, 4))),
    "small": Sizes(_FADAM_SMALL, (1, 3), 7, [(3, 64 + 17), (128,), (64,), (7,)],
                   {"multi-chunk": 0, "one-chunk": 2, "tiny": 3},
                   _zero_grad(_FADAM_SMALL, 5, (2, 4))),
})

FADAFACTOR = Optimizer("fadafactor", FAdafactor, factored=True, tiny_eps=(1e-8, 1e-30),
                       overflows=FACTOR_OVERFLOWS, fits=FACTOR_FITS, cases=[
    *_CASES, ("paper-llm", {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-12, "weight_decay": 0.1},
              "shapes"),
], sizes={
    # At chunk 4096: tiles of 64 x 64, several row and column tiles per matrix (their partials
    # combined), chunks that end mid-row, and multi-chunk phase-A slots; the embedding (200 x 48)
    # spans 3 chunks.
    "large": Sizes([(0,), (1,), (4097,), (5, 123, 123), (3, 7), (64, 33), (1, 9), (9, 1), (0, 4)],
                   (3, 5), 9, [(3, 150, 70), (130, 200), (64, 64), (4097,), (2, 5)],
                   {"multi-chunk": 1, "one-chunk": 2, "tiny": 4},
                   lambda dtype: [edge_problem(dtype), embedding_problem(dtype=dtype)]),
    # Odd shapes, a 3-D parameter, empty matrices that still have R or C ((0, 4), (5, 0)), a row
    # and a column vector, and 1-D tensors (FAdam's kernels). At chunk 64: tiles of 8 x 8; (17,
    # 13) is 4 chunks (ending mid-row) and 3 x 2 tiles, (2, 9, 11) 4 chunks across its 2 matrices.
    "small": Sizes([(3, 7), (2, 5, 6), (9, 1), (1, 9), (0, 4), (5, 0), (13,), (1,)],
                   (1, 3), 4, [(17, 13), (2, 9, 11), (8, 8), (5,)],
                   {"multi-chunk": 0, "one-chunk": 2, "tiny": 3},
                   lambda dtype: [edge_problem(dtype, steps=3),
                                  embedding_problem(rows=40, dim=12, steps=3, dtype=dtype)]),
})

OPTIMIZERS = [FADAM, FADAFACTOR]
