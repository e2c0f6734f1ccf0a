"""FAdafactor on backend="cpu" (the fused C++ kernels, csrc/cpu/fadafactor_cpu.cpp) on its own:
the thread count, the op calls per step, opcheck, the ops' lr_tensor rule. tests/test_scenarios.py
runs the scenarios every backend shares (parity with the float64 oracle, skips, overflows,
checkpoints, GradScaler, errors)."""

import pytest
import torch

from fadam_fused import FAdafactor, op_contract
from conftest import backend_ops, replace_backend_ops
from fadam_testing import FADAFACTOR, make_problem


def test_thread_count_does_not_change_bits(cpu_chunk):
    cpu_chunk(65536)  # tiles of 256 x 256: 4 x 3 tiles per matrix
    problem = make_problem(shapes=[(1000, 700), (2, 300, 257), (9,)], steps=3)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            runs.append(FADAFACTOR.run(problem, "cpu", lr=1e-2)[0][-1])
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(runs[0]["params"], runs[1]["params"]):
        assert torch.equal(x, y)
    for sx, sy in zip(runs[0]["state"], runs[1]["state"]):
        assert all(torch.equal(sx[k], sy[k]) for k in sx if k != "step")


def test_three_op_calls_per_group_however_many_tensors(monkeypatch):
    calls = []
    ops = backend_ops("cpu", factored=True)
    counted = type(ops)(ops.name, *[
        (lambda f, n: lambda *a, **k: (calls.append(n), f(*a, **k)))(getattr(ops, n), n)
        for n in ("phase_s", "phase_a", "phase_b")], ops.chunk_size)
    replace_backend_ops(monkeypatch, "cpu", counted, factored=True)
    params = [torch.nn.Parameter(torch.randn(3 + i % 5, 4 + i % 7)) for i in range(60)]
    opt = FAdafactor(params, backend="cpu")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert calls == ["phase_s", "phase_a", "phase_b"]


def test_opcheck():
    params = [torch.randn(5, 7), torch.randn(2, 3, 4)]
    grads = [torch.randn_like(p) for p in params]
    rows = [torch.ones(p.shape[:-1]) for p in params]
    cols = [torch.ones(p.shape[:-2] + p.shape[-1:]) for p in params]
    steps = [torch.ones(()) for _ in params]
    chunk = op_contract.CHUNK_SIZE["cpu"]
    fp, factors = op_contract.new_factor_buffers(params, chunk)
    partials = op_contract.new_partials(params, chunk)
    skip = torch.zeros(())
    ops = torch.ops.fadam_fused
    torch.library.opcheck(ops.fadafactor_phase_s.default,
                          (params, grads, rows, cols, steps, fp, factors, skip, None),
                          dict(beta2=0.999, maximize=False, chunk_size=chunk))
    torch.library.opcheck(ops.fadafactor_phase_a.default, (params, grads, factors, partials, None),
                          dict(eps=1e-8, p=0.5, clip=1.0, maximize=False, chunk_size=chunk,
                               fuse_one_chunk=False))
    moms = [torch.zeros_like(p) for p in params]
    torch.library.opcheck(ops.fadafactor_phase_b.default,
                          (params, grads, rows, cols, moms, steps, factors, partials, skip, None,
                           None),
                          dict(lr=1e-3, beta1=0.9, eps=1e-8, p=0.5, clip=1.0, weight_decay=1e-3,
                               maximize=False, chunk_size=chunk, fuse_one_chunk=False))


@pytest.mark.parametrize("lr_tensor", [torch.tensor(1, dtype=torch.int64), torch.tensor(0.1).half(),
                                       torch.tensor([0.1, 0.2])],
                         ids=["int64", "float16", "two-elements"])
def test_lr_tensor_must_be_one_float32_or_float64_element(lr_tensor):
    # The rule of every backend's ops (describe() in csrc/op_boundary.h), FAdam's and
    # FAdafactor's alike. A refused call changes nothing.
    params = [torch.randn(5, 7), torch.randn(2, 3, 4)]
    grads = [torch.randn_like(p) for p in params]
    rows = [torch.ones(p.shape[:-1]) for p in params]
    cols = [torch.ones(p.shape[:-2] + p.shape[-1:]) for p in params]
    moms = [torch.zeros_like(p) for p in params]
    chunk = op_contract.CHUNK_SIZE["cpu"]
    _, factors = op_contract.new_factor_buffers(params, chunk)
    factors.fill_(1.0)
    partials = op_contract.new_partials(params, chunk).zero_()
    before = [t.clone() for t in params + rows + cols + moms]
    with pytest.raises(RuntimeError, match="lr_tensor must be a one-element float32 or float64"):
        torch.ops.fadam_fused.fadafactor_phase_b(
            params, grads, rows, cols, moms, [torch.ones(()) for _ in params], factors, partials,
            torch.zeros(()), None, lr_tensor,
            lr=1e-3, beta1=0.9, eps=1e-8, p=0.5, clip=1.0, weight_decay=1e-3, maximize=False,
            chunk_size=chunk, fuse_one_chunk=True)
    assert all(torch.equal(x, y) for x, y in zip(before, params + rows + cols + moms))
