"""backend="cpu" (the fused C++ kernel) against the float64 oracle, every step, the full state."""

import pytest
import torch

from fadam_fused import FAdam
from fadam_fused.op_contract import smallest_safe_eps
from fadam_testing import (assert_groups_and_lr_schedule_match_oracle, assert_trajectories_close,
                           make_problem, run_optimizer, run_oracle64)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (id, problem kwargs, hyperparameters, optimizer extras)
CASES = [
    ("default", {}, {}, {}),
    ("lr1e-2", {}, {"lr": 1e-2}, {}),
    ("maximize", {}, {"lr": 1e-2, "maximize": True}, {}),
    ("clip-none", {}, {"lr": 1e-2, "clip": None}, {}),
    ("clip-2", {}, {"lr": 1e-2, "clip": 2.0}, {}),
    ("p0.75", {}, {"lr": 1e-2, "p": 0.75}, {}),
    ("wd0.1-betas", {}, {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)}, {}),
    ("no-grad", {"no_grad": (1, 3)}, {"lr": 1e-2}, {}),
    # At t = 1 (b2hat = 0) the zero-padded lanes of a ragged vector tail get f = 0, so
    # d = eps^(2p): 1e-30 here, and 1.2e-38 (1 / d = 8.5e37, near float32's max) with p = 1 and
    # the smallest eps the optimizer accepts. Padding must not reach the RMS sums.
    ("eps1e-30", {}, {"lr": 1e-2, "eps": 1e-30}, {}),
    ("p1-eps-smallest", {}, {"lr": 1e-2, "p": 1.0, "eps": smallest_safe_eps(1.0)}, {}),
    # Larger than one chunk (shrunk to 4096 below): phase-A slots and the multi-chunk sums.
    ("multi-chunk", {"shapes": [(3, 4096 + 17), (8192,), (4096,), (7,)]}, {"lr": 1e-2},
     {"chunk": 4096}),
    ("multi-chunk-clip-none", {"shapes": [(3, 4096 + 17), (7,)]}, {"lr": 1e-2, "clip": None},
     {"chunk": 4096}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cpu_matches_oracle(case, dtype, cpu_chunk):
    _, problem_kw, hyper, extra = case
    if "chunk" in extra:
        cpu_chunk(extra["chunk"])
    problem = make_problem(dtype=dtype, steps=10, **problem_kw)
    fast, _, _ = run_optimizer(problem, "cpu", **hyper)
    ref64 = run_oracle64(problem, **hyper)
    same = None if dtype == torch.float32 else run_optimizer(problem, "reference", **hyper)[0]
    assert_trajectories_close(fast, ref64, same, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_small_tensors(dtype):
    shapes = [(1 + (i * 7) % 61,) for i in range(1000)]
    problem = make_problem(shapes=shapes, dtype=dtype, steps=7)
    fast, _, _ = run_optimizer(problem, "cpu", lr=1e-2)
    ref64 = run_oracle64(problem, lr=1e-2)
    same = None if dtype == torch.float32 else run_optimizer(problem, "reference", lr=1e-2)[0]
    assert_trajectories_close(fast, ref64, same, dtype)


def test_two_param_groups_and_lr_schedule():
    assert_groups_and_lr_schedule_match_oracle(
        make_problem(steps=12), lambda problem, **kw: run_optimizer(problem, "cpu", **kw))


def test_tensor_lr_matches_float_lr():
    problem = make_problem(steps=5)
    a, _, _ = run_optimizer(problem, "cpu", lr=torch.tensor(0.02))
    b, _, _ = run_optimizer(problem, "cpu", lr=0.02)
    for sa, sb in zip(a, b):
        for x, y in zip(sa.params, sb.params):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("eps", [1e-20, 1e-30])
def test_tiny_eps_with_zero_gradient_stays_finite(backend, eps):
    # w = theta / eps is ~1e30: its square overflows float32, so the RMS sums must be float64.
    problem = make_problem(steps=10, zero_grad=(2, 4))
    fast, params, opt = run_optimizer(problem, backend, lr=1e-2, eps=eps)
    ref64 = run_oracle64(problem, lr=1e-2, eps=eps)
    for snap in fast:
        for t in snap.params + [m for m in snap.momentum if m is not None] + \
                [f for f in snap.fim if f is not None]:
            assert torch.isfinite(t).all()
    assert_trajectories_close(fast, ref64)
    # With clipping the decay step of a zero-gradient tensor is lr * wd * w / RMS(w): bounded.
    assert not torch.equal(params[2].detach(), problem.init[2])


def test_deterministic_bitwise(cpu_chunk):
    cpu_chunk(65536)
    problem = make_problem(shapes=[(200_000,), (4097,), (3, 70_000)], steps=4)
    a, _, _ = run_optimizer(problem, "cpu", lr=1e-2)
    b, _, _ = run_optimizer(problem, "cpu", lr=1e-2)
    for sa, sb in zip(a, b):
        for x, y in zip(sa.params + sa.fim + sa.momentum, sb.params + sb.fim + sb.momentum):
            assert torch.equal(x, y)


def test_thread_count_does_not_change_bits(cpu_chunk):
    cpu_chunk(65536)
    problem = make_problem(shapes=[(300_000,), (65536 * 2 + 5,), (9,)], steps=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, _, _ = run_optimizer(problem, "cpu", lr=1e-2)
        torch.set_num_threads(max(2, threads))
        b, _, _ = run_optimizer(problem, "cpu", lr=1e-2)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(a[-1].params + a[-1].fim, b[-1].params + b[-1].fim):
        assert torch.equal(x, y)


def test_auto_backend_is_cpu_and_state_is_float32():
    param = torch.nn.Parameter(torch.randn(10, dtype=torch.bfloat16))
    opt = FAdam([param])
    param.grad = torch.randn_like(param)
    opt.step()
    from fadam_fused import backends
    assert backends.resolve(None, param.device) == "cpu"
    assert opt.param_groups[0]["backend"] is None  # the request is stored, not the resolution
    state = opt.state[param]
    assert state["momentum"].dtype == state["fim"].dtype == torch.float32
    assert state["step"].dtype == torch.float32 and state["step"].dim() == 0
    assert float(state["step"]) == 1.0


def test_float64_params_use_the_oracle_with_auto_backend():
    problem = make_problem(shapes=[(33,), (5, 5)], steps=4)
    problem.init = [t.double() for t in problem.init]
    problem.grads = [[g.double() for g in row] for row in problem.grads]
    fast, _, _ = run_optimizer(problem, None, lr=1e-2)
    ref64 = run_oracle64(problem, lr=1e-2)
    for sa, sr in zip(fast, ref64):
        for x, y in zip(sa.params, sr.params):
            # float64 math, but float32 state by contract (docs/design.md, section 5): float32 tolerance.
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
