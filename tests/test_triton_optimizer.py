"""FAdam(backend="triton") through the optimizer, on CPU tensors in Triton's interpreter.

tests/test_triton.py drives the Triton ops directly; this file checks the optimizer wiring: the
backend choice, the step runner (steps, skip, GradScaler state) and checkpoints across backends.
Sizes stay small: the interpreter runs a 65536-element chunk in about a second.
"""

import io
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported

import pytest  # noqa: E402

from fadam_fused import FAdam, backends  # noqa: E402
from fadam_testing import (assert_groups_and_lr_schedule_match_oracle,  # noqa: E402
                           assert_trajectories_close, make_problem, run_optimizer, run_oracle64)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(backends.unavailable_reason("triton", DEVICE) is not None,
                                reason=str(backends.unavailable_reason("triton", DEVICE)))
SHAPES = [(0,), (1,), (4097,), (3, 7), (70_000,)]  # 70000 elements: two chunks, phase-A slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_optimizer_matches_oracle(dtype):
    problem = make_problem(shapes=SHAPES, steps=4, dtype=dtype, no_grad=(3,))
    fast, _, _ = run_optimizer(problem, "triton", lr=1e-2, clip=2.0, maximize=True)
    ref64 = run_oracle64(problem, lr=1e-2, clip=2.0, maximize=True)
    same = None if dtype == torch.float32 else run_optimizer(problem, "reference", lr=1e-2,
                                                             clip=2.0, maximize=True)[0]
    assert_trajectories_close(fast, ref64, same, dtype)


def test_triton_optimizer_skips_nonfinite_step_bit_identical():
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = FAdam(params, lr=1e-2, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [t.clone() for p in params for t in [p.detach(), *opt.state[p].values()]]
    params[2].grad[7] = float("nan")
    opt.step()
    after = [t.clone() for p in params for t in [p.detach(), *opt.state[p].values()]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert float(opt.skipped_steps) == 1.0


@pytest.mark.parametrize("first,second", [("triton", "cpu"), ("cpu", "triton")])
def test_state_dict_between_triton_and_cpu(first, second):
    problem = make_problem(shapes=[(4097,), (3, 7)], steps=6)
    full, _, _ = run_optimizer(problem, first, lr=1e-2)
    params = [torch.nn.Parameter(t.clone()) for t in problem.init]
    opt = FAdam(params, lr=1e-2, backend=first)
    for row in problem.grads[:3]:
        for p, g in zip(params, row):
            p.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = FAdam(params, lr=1e-2, backend=second)
    opt2.load_state_dict(torch.load(buf, map_location="cpu"))
    assert opt2.param_groups[0]["backend"] == second  # the loading optimizer's choice stays
    for row in problem.grads[3:]:
        for p, g in zip(params, row):
            p.grad = g.clone()
        opt2.step()
    for x, y in zip(params, full[-1].params):
        torch.testing.assert_close(x.detach(), y, atol=1e-6, rtol=1e-5)


def test_triton_two_param_groups_and_lr_schedule():
    # Per-group hyperparameters (clip, p, weight decay) and an lr changed before every step,
    # through the optimizer; 70000 elements make two 64K chunks (phase-A slots).
    assert_groups_and_lr_schedule_match_oracle(
        make_problem(shapes=SHAPES, steps=4),
        lambda problem, **kw: run_optimizer(problem, "triton", **kw))


def test_interpreted_kernels_refuse_cuda_tensors():
    # The metadata table holds device addresses, which the interpreter (it copies tensor
    # arguments to the host) cannot follow: interpreted kernels take CPU tensors only.
    from fadam_fused.triton_kernels import _ops

    cuda_reason = backends.unavailable_reason("triton", torch.device("cuda"))
    cpu_reason = backends.unavailable_reason("triton", torch.device("cpu"))
    if _ops._INTERPRET:
        assert cpu_reason is None
        assert "interpreter" in cuda_reason and "TRITON_INTERPRET" in cuda_reason
    else:
        assert cuda_reason is None and "CUDA tensors" in cpu_reason
