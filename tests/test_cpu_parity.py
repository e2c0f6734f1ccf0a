"""backend="cpu" (the fused C++ kernel) on its own: the thread count, the automatic choice of
backend, float64 parameters. tests/test_scenarios.py runs the scenarios every backend shares
(parity with the float64 oracle, skips, checkpoints, GradScaler, errors) on it."""

import torch

from fadam_fused import FAdam, backends
from fadam_testing import make_problem, run_optimizer, run_oracle64


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
    for x, y in zip(a[-1]["params"], b[-1]["params"]):
        assert torch.equal(x, y)
    for sx, sy in zip(a[-1]["state"], b[-1]["state"]):
        assert torch.equal(sx["fim"], sy["fim"])


def test_auto_backend_is_cpu_and_state_is_float32():
    param = torch.nn.Parameter(torch.randn(10, dtype=torch.bfloat16))
    opt = FAdam([param])
    param.grad = torch.randn_like(param)
    opt.step()
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
        for x, y in zip(sa["params"], sr["params"]):
            # float64 math, but float32 state by contract (docs/design.md, section 5): float32 tolerance.
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
