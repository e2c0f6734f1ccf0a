"""FAdafactor test helpers: trajectories of every backend and of the float64 oracle over the full
state (momentum, fim_row, fim_col, fim), compared with the tolerances of fadam_testing.py."""

from __future__ import annotations

import torch

from fadam_fused import FAdafactor, reference
from fadam_testing import Problem, _close, make_problem

STATE_KEYS = ("momentum", "fim_row", "fim_col", "fim")


def _snapshot(params, state):
    """Parameters and state after a step, as CPU copies (whatever the device)."""
    return {"params": [p.detach().to("cpu", copy=True) for p in params],
            "state": [{k: (v.detach().to("cpu", copy=True) if k != "step" else float(v))
                       for k, v in state.get(p, {}).items()} for p in params]}


def run_fadafactor(problem: Problem, backend, lr_schedule=None, device="cpu", **hyper):
    """Trajectory of FAdafactor(backend=...) on `device`: a CPU snapshot after every step."""
    params = [torch.nn.Parameter(t.to(device, copy=True)) for t in problem.init]
    opt = FAdafactor(params, backend=backend, **hyper)
    snaps = []
    for k, row in enumerate(problem.grads):
        if lr_schedule is not None:
            opt.param_groups[0]["lr"] = lr_schedule(k)
        for p, g in zip(params, row):
            p.grad = None if g is None else g.to(device, copy=True)
        opt.step()
        snaps.append(_snapshot(params, opt.state))
    return snaps, params, opt


def oracle_state(t: torch.Tensor) -> dict:
    """The initial float64 oracle state of a float64 parameter `t`."""
    state = {"step": torch.zeros((), dtype=torch.float32), "momentum": torch.zeros_like(t)}
    if reference.is_factored(t):
        state["fim_row"] = torch.ones(t.shape[:-1], dtype=torch.float64)
        state["fim_col"] = torch.ones(t.shape[:-2] + t.shape[-1:], dtype=torch.float64)
    else:
        state["fim"] = torch.ones_like(t)
    return state


def run_oracle64(problem: Problem, lr_schedule=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 clip=1.0, weight_decay=1e-3, p=0.5, maximize=False):
    """Trajectory of the float64 oracle: float64 parameters and state, math in float64."""
    params = [t.to(torch.float64) for t in problem.init]
    states = [oracle_state(t) for t in params]
    started = [False] * len(params)
    snaps = []
    for k, row in enumerate(problem.grads):
        skip = reference.nonfinite_flag([g.to(torch.float64) for g in row if g is not None])
        h = dict(lr=lr if lr_schedule is None else lr_schedule(k), beta1=betas[0],
                 beta2=betas[1], eps=eps, clip=clip, weight_decay=weight_decay, p=p,
                 maximize=maximize, upcast=True)
        for i, (param, grad, st) in enumerate(zip(params, row, states)):
            if grad is None:
                continue
            started[i] = True
            t = st["step"] + 1
            grad = grad.to(torch.float64)
            if "fim" in st:
                reference.update_tensor(param, grad, st["momentum"], st["fim"], t, skip, **h)
            else:
                reference.fadafactor_update_tensor(param, grad, st["momentum"], st["fim_row"],
                                                   st["fim_col"], t, skip, **h)
            st["step"] = torch.where(skip != 0, st["step"], t)
        snaps.append({"params": [t.clone() for t in params],
                      "state": [({k: (v.clone() if k != "step" else float(v))
                                  for k, v in st.items()} if s else {})
                                for st, s in zip(states, started)]})
    return snaps


def assert_trajectories_close(fast, ref64, same=None, dtype=torch.float32) -> float:
    """Every parameter and state tensor at every step (fadam_testing's tolerances); returns the
    largest parameter error."""
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
            for key in STATE_KEYS:
                if key in sa:
                    assert sa[key].dtype == torch.float32, f"{tag} {key} is {sa[key].dtype}"
                    assert sa[key].shape == sr[key].shape, f"{tag} {key} shape"
                    _close(f"{tag} {key}", sa[key], sr[key], s["state"][i][key] if s else None,
                           dtype, state=True)
    return worst


# ---- scenarios every FAdafactor backend passes (their test files call these) ---------------------


def assert_state_dict_moves(first: str, second: str, device="cpu", via_file=None, steps=6,
                            switch_at=3) -> None:
    """A run on `first` whose state_dict (through torch.save / load when `via_file` is a path)
    continues on a fresh optimizer on `second` matches a whole run on `second`."""
    problem = make_problem(shapes=[(12, 17), (2, 5, 6), (8,)], steps=steps)
    whole, _, _ = run_fadafactor(problem, second, device=device, lr=1e-2)
    params = [torch.nn.Parameter(t.to(device, copy=True)) for t in problem.init]
    opt = FAdafactor(params, lr=1e-2, backend=first)
    for k, row in enumerate(problem.grads):
        if k == switch_at:  # hand the state to a fresh optimizer on the other backend
            saved = {"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}
            if via_file is not None:
                torch.save(saved, via_file)
                saved = torch.load(via_file, map_location=device)
            params = [torch.nn.Parameter(t) for t in saved["params"]]
            opt = FAdafactor(params, lr=1e-2, backend=second)
            opt.load_state_dict(saved["opt"])
            assert opt.param_groups[0]["backend"] == second
        for p, g in zip(params, row):
            p.grad = g.to(device, copy=True)
        opt.step()
    for x, y in zip(whole[-1]["params"], params):
        torch.testing.assert_close(x, y.detach().cpu(), atol=1e-6, rtol=1e-5)
    for sx, p in zip(whole[-1]["state"], params):
        for key in sx:
            if key != "step":
                torch.testing.assert_close(sx[key], opt.state[p][key].cpu(), atol=1e-6, rtol=1e-5)


def assert_grad_scaler_inputs_work(backend: str, device="cpu") -> None:
    """GradScaler's grad_scale divides the gradients in registers (same step as unscaled ones);
    its found_inf skips the whole step and counts it."""
    problem = make_problem(shapes=[(6, 9), (4,)], steps=1)
    plain, _, _ = run_fadafactor(problem, backend, device=device, lr=1e-2)
    scaled = [torch.nn.Parameter(t.to(device, copy=True)) for t in problem.init]
    opt = FAdafactor(scaled, lr=1e-2, backend=backend)
    for p, g in zip(scaled, problem.grads[0]):
        p.grad = g.to(device) * 1024
    opt.grad_scale = torch.tensor([1024.0], device=device)
    opt.found_inf = torch.tensor([0.0], device=device)
    opt.step()
    for x, y in zip(plain[0]["params"], scaled):
        torch.testing.assert_close(x, y.detach().cpu(), atol=1e-7, rtol=1e-6)
    before = [p.detach().clone() for p in scaled]
    opt.found_inf = torch.tensor([1.0], device=device)
    opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, scaled))
    assert float(opt.skipped_steps) == 1.0


def assert_nonfinite_gradient_skips_the_step(backend: str, bad: float, shapes, where,
                                             device="cpu") -> None:
    """Two good steps, then a step whose gradient of tensor where[0] holds `bad` at index
    where[1:]: parameters and every state tensor stay bit-identical, and the skip is counted."""
    problem = make_problem(shapes=shapes, steps=2)
    _, params, opt = run_fadafactor(problem, backend, device=device, lr=1e-2)
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    params[where[0]].grad[where[1:]] = bad
    opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))
    for st, p in zip(state, params):
        assert all(torch.equal(v, opt.state[p][k]) for k, v in st.items())
    assert float(opt.skipped_steps) == 1.0


# ---- the overflow rule (docs/design.md section 6) -------------------------------------------------
#
# Phase S skips the step when a scaled gradient's float32 square is not finite, or when a new R_i or
# C_j is not finite in float32. At step 1 (b2hat = 0) R and C are this step's sums of g^2 (at step
# 2 half of them: b2hat ~ 0.5), so the cases are first steps. (id, shape, value, one_element): the
# factored parameter's first gradient is `value` everywhere, or randn with `value` at one element.
FACTOR_OVERFLOWS = [
    ("rows-6x9-1e19", (6, 9), 1e19, False),        # g^2 = 1e38 fits; R_i = 9e38 does not
    ("cols-2000x2-5e17", (2000, 2), 5e17, False),  # R_i = 5e35 fits; C_j = 2000 x 2.5e35 = 5e38
    ("square-1e20", (4, 6), 1e20, True),           # g^2 = 1e40 (its float64 row sum would fit)
]
# Just under: R_i = 9 x 3.72e37 = 3.35e38, C_j = 2000 x 1.6e35 = 3.2e38 (float32 max 3.40e38).
FACTOR_FITS = [
    ("rows-6x9-6.1e18", (6, 9), 6.1e18, False),
    ("cols-2000x2-4e17", (2000, 2), 4e17, False),
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


def assert_overflow_skips_like_nan(backend: str, problem: Problem, device="cpu") -> None:
    """The first step of `problem` (finite gradients that overflow float32) is skipped exactly as
    one with a NaN gradient: parameters unchanged, every state tensor bit-identical to that run's,
    the skip counted; the next step runs and leaves everything finite."""
    first = Problem(problem.init, problem.grads[:1], problem.dtype)
    nan_first = Problem(problem.init, [[g.clone() for g in problem.grads[0]]], problem.dtype)
    nan_first.grads[0][1][0] = float("nan")  # the 1-D parameter's gradient
    _, params, opt = run_fadafactor(first, backend, device=device, lr=1e-2)
    _, nan_params, nan_opt = run_fadafactor(nan_first, backend, device=device, lr=1e-2)
    assert float(opt.skipped_steps) == 1.0
    for p, q, t in zip(params, nan_params, problem.init):
        assert torch.equal(p.detach().cpu(), t)
        mine, skipped = opt.state[p], nan_opt.state[q]
        assert sorted(mine) == sorted(skipped)
        assert all(torch.equal(mine[k], skipped[k]) for k in mine)
    for p, g in zip(params, problem.grads[1]):
        p.grad = g.to(device, copy=True)
    opt.step()
    assert float(opt.skipped_steps) == 1.0
    for p in params:
        assert float(opt.state[p]["step"]) == 1.0
        assert torch.isfinite(p.detach()).all()
        assert all(torch.isfinite(v).all() for v in opt.state[p].values())
