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

    # A cache of its own: a table left by an earlier test may hold an address that a step tensor
    # of this one reuses, which _tables_of would count as this optimizer's.
    cache = launch.TableCache(4)
    monkeypatch.setattr(launch, "TABLES", cache)
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


# ---- bfloat16 stochastic rounding on the GPU: compiled kernels, torch.compile, graph capture ----

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sr_problem(device, seed=0):
    """bf16 parameters with a preset state of step 3 and a bf16 momentum, and zero gradients:
    the exact update of tests/test_stochastic_rounding.py (theta' = theta - lr beta1 m)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37,), (5, 300), (70000,)]  # the last: two GPU chunks
    params = [torch.randn(s, generator=gen).bfloat16().to(device).requires_grad_()
              for s in shapes]
    moms = [(torch.randn(s, generator=gen) * 0.3).bfloat16().to(device) for s in shapes]
    return params, moms


def _sr_opt(params, moms, backend):
    opt = FAdam(params, lr=1e-3, weight_decay=0.0, backend=backend, bf16_rounding="stochastic",
                rounding_seed=1234, momentum_dtype=torch.bfloat16)
    for p, m in zip(params, moms):
        state = FAdam.kind_of(p).new_state(p)
        state["momentum"], state["step"] = m.clone(), torch.tensor(3.0, device=p.device)
        opt.state[p] = state
        p.grad = torch.zeros_like(p)
    return opt


@needs_gpu
@pytest.mark.parametrize("backend", [None, "triton", "cuda"])
def test_gpu_stochastic_rounding_matches_the_oracle(backend):
    """The compiled Triton kernels and the CUDA kernels (backend=None picks them on a GPU) draw
    the oracle's bits."""
    from test_stochastic_rounding import _oracle
    params, moms = _sr_problem("cuda")
    before = [p.detach().cpu() for p in params]
    opt = _sr_opt(params, moms, backend)
    opt.step()
    want_p, want_m = _oracle(before, [m.cpu() for m in moms])
    for p, w in zip(params, want_p):
        assert torch.equal(p.detach().cpu(), w)
    for p, w in zip(params, want_m):
        assert torch.equal(opt.state[p]["momentum"].cpu(), w)


@needs_gpu
def test_gpu_stochastic_rounding_in_a_captured_graph_and_compiled():
    """A step captured in a CUDA graph, and one traced by torch.compile, give the eager bits."""
    ref_params, moms = _sr_problem("cuda")
    ref = _sr_opt(ref_params, moms, "triton")
    ref.step()
    params, _ = _sr_problem("cuda")
    opt = _sr_opt(params, moms, "triton")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        opt.step()  # warm-up: tables and the rounding rows reach the device before capture
    for p, m in zip(params, moms):  # back to the preset state, in place
        opt.state[p]["momentum"].copy_(m)
        opt.state[p]["step"].fill_(3.0)
        opt.state[p]["fim"].fill_(1.0)
    fresh, _ = _sr_problem("cuda")
    for p, q in zip(params, fresh):
        p.data.copy_(q.detach())
    with torch.cuda.graph(graph):
        opt.step()
    for p, q in zip(params, fresh):  # capture ran nothing: restore and replay once
        p.data.copy_(q.detach())
    for p, m in zip(params, moms):
        opt.state[p]["momentum"].copy_(m)
        opt.state[p]["step"].fill_(3.0)
        opt.state[p]["fim"].fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(params, ref_params):
        assert torch.equal(p.detach(), q.detach())
    compiled_params, _ = _sr_problem("cuda")
    compiled = _sr_opt(compiled_params, moms, "triton")
    torch.compile(compiled.step)()
    for p, q in zip(compiled_params, ref_params):
        assert torch.equal(p.detach(), q.detach())
