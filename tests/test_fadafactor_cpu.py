"""FAdafactor on backend="cpu" (the fused C++ kernels, csrc/cpu/fadafactor_cpu.cpp) against the
float64 oracle, every step, the full state; determinism, op counts, checkpoints across backends."""

import pytest
import torch

from fadam_fused import FAdafactor, backends
from fadam_fused.op_contract import smallest_safe_eps
from fadam_testing import make_problem
from fadafactor_testing import (FACTOR_FITS, FACTOR_OVERFLOWS, assert_grad_scaler_inputs_work,
                                assert_overflow_skips_like_nan, assert_state_dict_moves,
                                assert_trajectories_close, overflow_problem, run_fadafactor,
                                run_oracle64)
from test_fadafactor_reference import SHAPES, edge_problem, embedding_problem

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (id, problem kwargs, hyperparameters, cpu chunk or None)
CASES = [
    ("default", {}, {}, None),
    ("lr1e-2", {}, {"lr": 1e-2}, None),
    ("maximize", {}, {"lr": 1e-2, "maximize": True}, None),
    ("clip-none", {}, {"lr": 1e-2, "clip": None}, None),
    ("clip-2", {}, {"lr": 1e-2, "clip": 2.0}, None),
    ("p0.75", {}, {"lr": 1e-2, "p": 0.75}, None),
    ("paper-llm", {}, {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-12, "weight_decay": 0.1},
     None),
    ("no-grad", {"no_grad": (3, 5)}, {"lr": 1e-2}, None),
    # Padded lanes of ragged rows get f = 0, d = eps^(2p): 1e-30, or 1.2e-38 with p = 1.
    ("eps1e-30", {}, {"lr": 1e-2, "eps": 1e-30}, None),
    ("p1-eps-smallest", {}, {"lr": 1e-2, "p": 1.0, "eps": smallest_safe_eps(1.0)}, None),
    # Chunk 4096: tiles of 64 x 64, several row and column tiles per matrix (their partials
    # combined), chunks that end mid-row, and multi-chunk phase-A slots.
    ("multi-chunk", {"shapes": [(3, 150, 70), (130, 200), (64, 64), (4097,), (2, 5)]},
     {"lr": 1e-2}, 4096),
    ("multi-chunk-clip-none", {"shapes": [(130, 200), (7,)]}, {"lr": 1e-2, "clip": None}, 4096),
]


def _check(problem, dtype, **hyper):
    fast, _, _ = run_fadafactor(problem, "cpu", **hyper)
    ref64 = run_oracle64(problem, **hyper)
    same = None if dtype == torch.float32 else run_fadafactor(problem, "reference", **hyper)[0]
    assert_trajectories_close(fast, ref64, same, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cpu_matches_oracle(case, dtype, cpu_chunk):
    _, problem_kw, hyper, chunk = case
    if chunk is not None:
        cpu_chunk(chunk)
        assert backends.factored("cpu").chunk_size == chunk
    problem_kw = {"shapes": SHAPES, **problem_kw}
    _check(make_problem(dtype=dtype, steps=9, **problem_kw), dtype, **hyper)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [1e-8, 1e-30])
@pytest.mark.parametrize("kind", ["edges", "embedding"])
def test_edge_cases_match_oracle(kind, eps, dtype, cpu_chunk):
    cpu_chunk(4096)  # the embedding (200 x 48) spans 3 chunks
    problem = edge_problem(dtype) if kind == "edges" else embedding_problem(dtype=dtype)
    _check(problem, dtype, lr=1e-2, eps=eps)


def test_lr_schedule_and_tensor_lr():
    problem = make_problem(shapes=[(20, 30), (5,)], steps=6)
    schedule = lambda k: 1e-2 / (1 + k)  # noqa: E731
    fast, _, _ = run_fadafactor(problem, "cpu", lr_schedule=schedule)
    assert_trajectories_close(fast, run_oracle64(problem, lr_schedule=schedule))
    a, _, _ = run_fadafactor(problem, "cpu", lr=torch.tensor(0.02))
    b, _, _ = run_fadafactor(problem, "cpu", lr=0.02)
    assert all(torch.equal(x, y) for sa, sb in zip(a, b) for x, y in zip(sa["params"], sb["params"]))


def test_grad_scale_and_found_inf_as_gradscaler_sets_them():
    assert_grad_scaler_inputs_work("cpu")


def test_deterministic_and_thread_count_independent(cpu_chunk):
    cpu_chunk(65536)  # tiles of 256 x 256: 4 x 3 tiles per matrix
    problem = make_problem(shapes=[(1000, 700), (2, 300, 257), (9,)], steps=3)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, max(2, threads), max(2, threads)):
            torch.set_num_threads(n)
            runs.append(run_fadafactor(problem, "cpu", lr=1e-2)[0][-1])
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for x, y in zip(runs[0]["params"], other["params"]):
            assert torch.equal(x, y)
        for sx, sy in zip(runs[0]["state"], other["state"]):
            assert all(torch.equal(sx[k], sy[k]) for k in sx if k != "step")


def test_three_op_calls_per_group_however_many_tensors(monkeypatch):
    calls = []
    ops = backends.factored("cpu")
    counted = type(ops)(ops.name, *[
        (lambda f, n: lambda *a, **k: (calls.append(n), f(*a, **k)))(getattr(ops, n), n)
        for n in ("phase_s", "phase_a", "phase_b")], ops.chunk_size)
    monkeypatch.setitem(backends._FACTORED, "cpu", counted)
    params = [torch.nn.Parameter(torch.randn(3 + i % 5, 4 + i % 7)) for i in range(60)]
    opt = FAdafactor(params, backend="cpu")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert calls == ["phase_s", "phase_a", "phase_b"]


@pytest.mark.parametrize("first,second", [("cpu", "reference"), ("reference", "cpu")])
def test_state_dict_moves_across_backends(first, second, tmp_path):
    assert_state_dict_moves(first, second, via_file=tmp_path / "ckpt.pt", steps=8, switch_at=4)


def test_opcheck():
    params = [torch.randn(5, 7), torch.randn(2, 3, 4)]
    grads = [torch.randn_like(p) for p in params]
    rows = [torch.ones(p.shape[:-1]) for p in params]
    cols = [torch.ones(p.shape[:-2] + p.shape[-1:]) for p in params]
    steps = [torch.ones(()) for _ in params]
    from fadam_fused import op_contract
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


@pytest.mark.parametrize("case", FACTOR_OVERFLOWS, ids=[c[0] for c in FACTOR_OVERFLOWS])
def test_gradient_overflowing_squares_or_factors_skips_the_step(case):
    """Finite gradients whose g^2, row sums R or column sums C overflow float32 would turn every
    parameter, momentum, R and C into NaN (or freeze f at inf): phase S raises the skip flag."""
    _, shape, value, one_element = case
    assert_overflow_skips_like_nan("cpu", overflow_problem(shape, value, one_element))


@pytest.mark.parametrize("case", FACTOR_FITS, ids=[c[0] for c in FACTOR_FITS])
def test_factors_just_under_the_overflow_are_not_skipped_and_match_oracle(case):
    _, shape, value, one_element = case
    problem = overflow_problem(shape, value, one_element)
    fast, _, opt = run_fadafactor(problem, "cpu", lr=1e-2)
    assert float(opt.skipped_steps) == 0.0
    assert_trajectories_close(fast, run_oracle64(problem, lr=1e-2))


@pytest.mark.parametrize("lr_tensor", [torch.tensor(1, dtype=torch.int64), torch.tensor(0.1).half(),
                                       torch.tensor([0.1, 0.2])],
                         ids=["int64", "float16", "two-elements"])
def test_lr_tensor_must_be_one_float32_or_float64_element(lr_tensor):
    # The rule of every backend's ops (describe() in csrc/op_boundary.h), FAdam's and
    # FAdafactor's alike. A refused call changes nothing.
    from fadam_fused import op_contract
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
