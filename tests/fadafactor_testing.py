"""FAdafactor test helpers: trajectories of every backend and of the float64 oracle over the full
state (momentum, fim_row, fim_col, fim), compared with the tolerances of fadam_testing.py."""

from __future__ import annotations

import torch

from fadam_fused import FAdafactor, reference
from fadam_testing import Problem, _close

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
