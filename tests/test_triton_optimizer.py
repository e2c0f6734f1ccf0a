"""FAdam(backend="triton") through the optimizer, where it is Triton's own: the lifetime of the
launch tables a captured step replays, and which tensors the interpreted kernels take.

tests/test_triton_ops.py drives the Triton ops directly; tests/test_scenarios.py runs the
scenarios every backend shares on it (in Triton's interpreter on CPU tensors without a GPU, as
tests/conftest.py sets up).
"""

import gc
import weakref

import pytest
import torch

from fadam_fused import FAdam, backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(backends.unavailable_reason("triton", DEVICE) is not None,
                                reason=str(backends.unavailable_reason("triton", DEVICE)))


def _tables_of(opt, cache):
    """The keys of the launch tables that serve `opt`'s step tensors (a key holds the addresses
    of every operand, as tuples)."""
    steps = {s["step"].data_ptr() for s in opt.state.values()}
    return {key for key in (*cache.lru, *cache.captured)
            if any(steps & set(part) for part in key if isinstance(part, tuple))}


def test_captured_tables_live_as_long_as_the_optimizer(monkeypatch):
    """A CUDA graph that captured a step replays its launch tables ([note: Triton metadata
    tables] in triton_kernels/launch.py). With more buckets than the LRU holds, the captured tables
    stay (same objects, same memory) through eager steps with fresh gradients, and go when the
    optimizer does, while the parameters live on. Capture is simulated: the interpreter has none."""
    from fadam_fused.triton_kernels import launch

    cache = launch.TABLES
    monkeypatch.setattr(cache, "entries", 4)
    capturing = [True]
    monkeypatch.setattr(launch, "capturing", lambda device: capturing[0])
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, generator=gen)) for _ in range(5)]
    groups = [{"params": [p], "lr": 1e-2 * (i + 1)} for i, p in enumerate(params)]
    opt = FAdam(groups, backend="triton")  # 5 buckets: 10 tables against an LRU of 4
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = FAdam([{**g, "params": [q]} for g, q in zip(groups, ref_params)], backend="reference")
    for k in range(3):
        grads = [torch.randn(5, generator=gen) for _ in params]
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        if k == 0:
            capturing[0] = False
            captured = {key: cache.captured[key] for key in _tables_of(opt, cache)}
            assert len(captured) == 10
            memory = {key: t.meta.data_ptr() for key, t in captured.items()}
    for key, table in captured.items():
        assert cache.captured[key] is table and table.meta.data_ptr() == memory[key]
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)
    alive = [weakref.ref(t) for t in captured.values()]
    del opt, captured, table
    gc.collect()
    assert all(ref() is None for ref in alive)
    assert not set(memory) & set(cache.captured)


def test_interpreted_kernels_refuse_cuda_tensors():
    # The metadata table holds device addresses, which the interpreter (it copies tensor
    # arguments to the host) cannot follow: interpreted kernels take CPU tensors only.
    from fadam_fused import triton_kernels

    cuda_reason = backends.unavailable_reason("triton", torch.device("cuda"))
    cpu_reason = backends.unavailable_reason("triton", torch.device("cpu"))
    if triton_kernels.INTERPRET:
        assert cpu_reason is None
        assert "interpreter" in cuda_reason and "TRITON_INTERPRET" in cuda_reason
    else:
        assert cuda_reason is None and "CUDA tensors" in cpu_reason
