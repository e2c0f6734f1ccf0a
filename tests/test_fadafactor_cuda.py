"""FAdafactor on backend="cuda" (csrc/cuda/fadafactor_cuda.cu) on a GPU: parity with the float64
oracle over the full state, with the Triton kernels and the CPU, the non-finite skip, CUDA graphs.
Skipped without a GPU (tests/test_fadafactor_cuda_emulated.py runs the same kernels on the CPU);
`make gpu-check` runs it where there is one.
"""

from __future__ import annotations

import pytest
import torch

from fadam_fused import FAdafactor, backends
from fadam_testing import make_problem
from fadafactor_testing import (assert_grad_scaler_inputs_work,
                                assert_nonfinite_gradient_skips_the_step, assert_state_dict_moves,
                                assert_trajectories_close, run_fadafactor, run_oracle64)
from test_fadafactor_reference import CASES, edge_problem, embedding_problem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

DEV = torch.device("cuda") if torch.cuda.is_available() else None
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 7), (2, 5, 6), (5, 123, 123), (9, 1), (1, 9), (0, 4), (5, 0), (13,), (1,)]


def _check(problem, dtype=torch.float32, **hyper):
    fast, _, _ = run_fadafactor(problem, "cuda", device=DEV, **hyper)
    same = (None if dtype == torch.float32
            else run_fadafactor(problem, "reference", device=DEV, **hyper)[0])
    assert_trajectories_close(fast, run_oracle64(problem, **hyper), same, dtype)
    return fast


def test_factored_parameters_run_on_the_cuda_kernels():
    assert backends.resolve(None, DEV) == "cuda"
    p = torch.nn.Parameter(torch.randn(64, 48, device=DEV))
    p.grad = torch.randn_like(p)
    opt = FAdafactor([p])
    with torch.profiler.profile() as prof:
        opt.step()
    names = {e.name for e in prof.events()}
    assert "fadam_fused::fadafactor_phase_s" in names, sorted(n for n in names if "fadam" in n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_oracle(case, dtype):
    _check(make_problem(shapes=SHAPES, steps=5, dtype=dtype, no_grad=(3,)), dtype, **case[1])


@pytest.mark.parametrize("eps", [1e-8, 1e-30])
def test_edge_cases_and_embedding_match_oracle(eps):
    _check(edge_problem(steps=4), lr=1e-2, eps=eps)
    _check(embedding_problem(rows=5000, dim=256, steps=4), lr=1e-2, eps=eps)


def test_large_matrices_split_over_launches():
    """A 4096 x 1024 matrix (64 chunks, 256 tiles) and 200 small ones (the tables hold 128)."""
    shapes = [(4096, 1024)] + [(17 + i % 5, 33 + i % 3) for i in range(200)]
    _check(make_problem(shapes=shapes, steps=2), lr=1e-2, clip=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_triton_and_cpu(dtype):
    if backends.unavailable_reason("triton", DEV) is not None:
        pytest.skip(backends.unavailable_reason("triton", DEV))
    problem = make_problem(shapes=SHAPES, steps=4, dtype=dtype)
    cuda, _, _ = run_fadafactor(problem, "cuda", device=DEV, lr=1e-2)
    triton, _, _ = run_fadafactor(problem, "triton", device=DEV, lr=1e-2)
    cpu, _, _ = run_fadafactor(problem, "cpu", lr=1e-2)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for a, b, c in zip(cuda, triton, cpu):
        for x, y, z in zip(a["params"], b["params"], c["params"]):
            torch.testing.assert_close(x, y, **tol)
            torch.testing.assert_close(x, z, **tol)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_the_whole_step(bad):
    assert_nonfinite_gradient_skips_the_step("cuda", bad, [(40, 60), (2, 130, 170), (3,)],
                                             (1, 1, 129, 169), device=DEV)


def test_grad_scale_and_found_inf_as_gradscaler_sets_them():
    assert_grad_scaler_inputs_work("cuda", device=DEV)


@pytest.mark.parametrize("first,second", [("cuda", "triton"), ("triton", "cuda"),
                                          ("cuda", "reference")])
def test_state_dict_moves_across_backends(first, second):
    if "triton" in (first, second) and backends.unavailable_reason("triton", DEV) is not None:
        pytest.skip(backends.unavailable_reason("triton", DEV))
    assert_state_dict_moves(first, second, device=DEV)


def test_cuda_graph_capture_and_replay():
    """lr as a device tensor (changed between replays), steps on the device: replays match eager
    steps bit for bit (the pattern of test_cuda.py's graph test)."""
    problem = make_problem(shapes=[(64, 48), (3, 400, 300), (7,)], steps=6)
    lrs = [1e-2 / (1 + k) for k in range(problem.steps)]

    def make():
        params = [torch.nn.Parameter(t.to(DEV, copy=True)) for t in problem.init]
        lr = torch.tensor(lrs[0], device=DEV)
        for p in params:
            p.grad = torch.zeros_like(p)
        return params, lr, FAdafactor(params, lr=lr, backend="cuda", clip=0.5)

    def set_step_inputs(params, lr, k):
        lr.fill_(lrs[k])
        for p, g in zip(params, problem.grads[k]):
            p.grad.copy_(g.to(DEV))

    def snapshot(params, opt):
        return [p.detach().cpu() for p in params] + [
            v.detach().cpu() for p in params for k, v in opt.state[p].items() if k != "step"]

    params_e, lr_e, opt_e = make()
    eager = []
    for k in range(problem.steps):
        set_step_inputs(params_e, lr_e, k)
        opt_e.step()
        eager.append(snapshot(params_e, opt_e))

    params_g, lr_g, opt_g = make()
    graphed = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps create the state outside the graph
        for k in range(2):
            set_step_inputs(params_g, lr_g, k)
            opt_g.step()
            graphed.append(snapshot(params_g, opt_g))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for k in range(2, problem.steps):
        set_step_inputs(params_g, lr_g, k)
        graph.replay()
        graphed.append(snapshot(params_g, opt_g))
    for a, b in zip(eager, graphed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
