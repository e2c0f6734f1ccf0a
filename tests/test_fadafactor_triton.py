"""FAdafactor on backend="triton" (triton_kernels/_fadafactor_kernels.py) against the float64 oracle,
every step, the full state, on CPU tensors in Triton's interpreter; the launches per phase; the
kernels compiled for sm_80 / sm_90 without spills.

Sizes stay tiny: the interpreter runs every program in Python. Shrinking the chunk to 64 elements
makes tiles of 8 x 8, so small matrices have several row and column tiles (their partials combined
in phase S), chunks that end mid-row, and multi-chunk phase-A slots.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported

import pytest  # noqa: E402

from fadam_fused import FAdafactor, backends, op_contract  # noqa: E402
from fadam_testing import make_problem  # noqa: E402
from fadafactor_testing import (FACTOR_FITS, FACTOR_OVERFLOWS,  # noqa: E402
                                assert_grad_scaler_inputs_work,
                                assert_nonfinite_gradient_skips_the_step,
                                assert_overflow_skips_like_nan, assert_state_dict_moves,
                                assert_trajectories_close, overflow_problem, run_fadafactor,
                                run_oracle64)
from test_fadafactor_reference import edge_problem, embedding_problem  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.skipif(backends.unavailable_reason("triton", DEVICE) is not None,
                                 reason=str(backends.unavailable_reason("triton", DEVICE)))]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd shapes, a 3-D parameter, empty matrices that still have R or C ((0, 4), (5, 0)), a row and a
# column vector, and 1-D tensors (FAdam's kernels).
SHAPES = [(3, 7), (2, 5, 6), (9, 1), (1, 9), (0, 4), (5, 0), (13,), (1,)]
MULTI = [(2, 13, 17), (30, 21), (3, 7), (5,)]  # with chunk 64: 10 chunks of (30, 21)


@pytest.fixture
def triton_chunk(monkeypatch):
    def set_chunk(chunk):
        monkeypatch.setitem(op_contract.CHUNK_SIZE, "triton", chunk)
        monkeypatch.setattr(backends, "_FUSED", {})
        monkeypatch.setattr(backends, "_FACTORED", {})
    return set_chunk


def _check(problem, dtype, **hyper):
    fast, params, _ = run_fadafactor(problem, "triton", **hyper)
    ref64 = run_oracle64(problem, **hyper)
    same = None if dtype == torch.float32 else run_fadafactor(problem, "reference", **hyper)[0]
    assert_trajectories_close(fast, ref64, same, dtype)
    return fast


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_oracle(dtype):
    problem = make_problem(shapes=SHAPES, steps=4, dtype=dtype, no_grad=(1,))
    _check(problem, dtype, lr=1e-2, maximize=True)


# (id, hyperparameters): clipping on, off, the pow path, the paper's LLM settings, eps = 1e-30.
MULTI_CASES = [
    ("clip", {"lr": 1e-2}),
    ("clip-none", {"lr": 1e-2, "clip": None}),
    ("p0.75-clip2", {"lr": 1e-2, "p": 0.75, "clip": 2.0}),
    ("paper-llm-eps1e-30", {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-30,
                            "weight_decay": 0.1}),
]


@pytest.mark.parametrize("case", MULTI_CASES, ids=[c[0] for c in MULTI_CASES])
def test_multi_tile_multi_chunk_matches_oracle(case, triton_chunk):
    triton_chunk(64)
    assert backends.factored("triton").chunk_size == 64
    _check(make_problem(shapes=MULTI, steps=3), torch.float32, **case[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_multi_chunk_low_precision_matches_oracle(dtype, triton_chunk):
    triton_chunk(64)
    _check(make_problem(shapes=MULTI[:2], steps=3, dtype=dtype), dtype, lr=1e-2)


@pytest.mark.parametrize("eps", [1e-8, 1e-30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_edge_cases_match_oracle_and_stay_finite(dtype, eps, triton_chunk):
    """A gradient row of zeros (R_i = 0), an all-zero gradient (sum R = 0: f = 0, no NaN), a 3-D
    parameter; chunk 64 cuts the (3, 6, 11) parameter mid-matrix."""
    triton_chunk(64)
    fast = _check(edge_problem(dtype, steps=3), dtype, lr=1e-2, eps=eps)
    for snap in fast:
        for t in snap["params"] + [v for st in snap["state"] for k, v in st.items() if k != "step"]:
            assert torch.isfinite(t).all()


def test_embedding_with_a_tenth_of_its_rows_touched_matches_oracle(triton_chunk):
    """36 of 40 rows have a zero gradient every step (their R decays; f stays positive through
    C); chunk 64 makes 8 chunks and 5 x 2 tiles."""
    triton_chunk(64)
    _check(embedding_problem(rows=40, dim=12, steps=3), torch.float32, lr=1e-2, eps=1e-30)


# The other backend on the same tensors: the CPU kernels under the interpreter, the reference on
# a GPU (compiled Triton takes CUDA tensors only).
OTHER = "cpu" if DEVICE.type == "cpu" else "reference"


@pytest.mark.parametrize("first,second", [("triton", OTHER), (OTHER, "triton")])
def test_state_dict_moves_across_backends(first, second):
    assert_state_dict_moves(first, second, device=DEVICE)


def test_per_tensor_path_matches_oracle_and_the_table_path_bitwise(monkeypatch, triton_chunk):
    """The traced path (torch.compile has no addresses: one launch per tensor, TABLE=False) runs
    the same programs as the table path: the same bits."""
    from fadam_fused.triton_kernels import launch

    triton_chunk(64)
    problem = make_problem(shapes=[(2, 5, 17), (3, 7), (0, 4), (4,)], steps=2)
    table, _, _ = run_fadafactor(problem, "triton", lr=1e-2)
    monkeypatch.setattr(launch, "FORCE_PER_TENSOR", True)
    per_tensor = _check(problem, torch.float32, lr=1e-2)
    for a, b in zip(table, per_tensor):
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
        for sa, sb in zip(a["state"], b["state"]):
            assert all(torch.equal(sa[k], sb[k]) for k in sa if k != "step")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_the_whole_step(bad):
    # the last element of a tile row of the second matrix
    assert_nonfinite_gradient_skips_the_step("triton", bad, [(4, 6), (2, 3, 5), (3,)], (1, 1, 2, 3),
                                             device=DEVICE)


# [note: the gradient overflow rule] (triton_kernels/_kernels.py): phase S skips the step when a
# gradient's float32 square, or a new row or column sum rounded to float32, is not finite. The
# cases are every backend's (fadafactor_testing); chunk 64 cuts (6, 9) into 2 tiles and
# (2000, 2) into 63, whose partial sums all fit: only the combined sums overflow.


@pytest.mark.parametrize("case", FACTOR_OVERFLOWS, ids=[c[0] for c in FACTOR_OVERFLOWS])
def test_gradient_overflowing_squares_or_factors_skips_the_step(case, triton_chunk):
    triton_chunk(64)
    _, shape, value, one_element = case
    assert_overflow_skips_like_nan("triton", overflow_problem(shape, value, one_element),
                                   device=DEVICE)


@pytest.mark.parametrize("case", FACTOR_FITS, ids=[c[0] for c in FACTOR_FITS])
def test_factors_just_under_the_overflow_are_not_skipped_and_match_oracle(case, triton_chunk):
    triton_chunk(64)
    _, shape, value, one_element = case
    problem = overflow_problem(shape, value, one_element)
    fast, _, opt = run_fadafactor(problem, "triton", device=DEVICE, lr=1e-2)
    assert float(opt.skipped_steps) == 0.0
    assert_trajectories_close(fast, run_oracle64(problem, lr=1e-2))


def test_gradient_whose_square_overflows_skips_in_phase_s_with_finite_sums():
    """One element of 2e19 (square 4e38: inf in float32) at step 3, where (1 - b2hat) = 0.33
    keeps its new row sum (about 1.3e38) finite: the element rule alone skips the step."""
    assert_nonfinite_gradient_skips_the_step("triton", 2e19, [(6, 9), (4,)], (0, 2, 5),
                                             device=DEVICE)


def test_grad_scale_and_found_inf_as_gradscaler_sets_them():
    assert_grad_scaler_inputs_work("triton", device=DEVICE)


def test_one_launch_per_kernel_however_many_tensors(monkeypatch):
    """40 factored tensors: phase S is two launches (tiles, combine), A one, B one; the 1-D
    tensors' FAdam phases one each."""
    launches = []
    real = torch.library.wrap_triton

    def counting(kernel):
        wrapped = real(kernel)

        class Grid:
            def __getitem__(self, grid):
                launches.append(kernel.__name__ if hasattr(kernel, "__name__")
                                else kernel.fn.__name__)
                return wrapped[grid]
        return Grid()

    monkeypatch.setattr(torch.library, "wrap_triton", counting)
    params = [torch.nn.Parameter(torch.randn(2 + i % 3, 3 + i % 4)) for i in range(40)]
    params += [torch.nn.Parameter(torch.randn(70_000)), torch.nn.Parameter(torch.randn(5))]
    params.append(torch.nn.Parameter(torch.randn(300, 240)))  # two chunks: phase A has work
    opt = FAdafactor(params, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(launches) == sorted(["_tiles_kernel", "_combine_kernel", "_phase_a_kernel",
                                       "_phase_b_kernel", "_phase_a_kernel", "_phase_b_kernel"])


def test_bad_inputs_are_refused_by_name():
    from fadam_fused.triton_kernels import _fadafactor_ops as fo

    params = [torch.randn(3, 4)]
    grads = [torch.randn(3, 4)]
    chunk = 64
    fp, factors = op_contract.new_factor_buffers(params, chunk)
    skip = torch.zeros(())
    with pytest.raises(ValueError, match=r"fim_cols\[0\] must be a contiguous torch.float32 "
                                         r"tensor of shape \(4,\)"):
        fo.triton_fadafactor_phase_s(params, grads, [torch.ones(3)], [torch.ones(3)],
                                     [torch.ones(())], fp, factors, skip, None, beta2=0.999,
                                     maximize=False, chunk_size=chunk)
    with pytest.raises(ValueError, match="factors must be a contiguous 1-dim torch.float32 "
                                         "tensor of 10 elements"):
        fo.triton_fadafactor_phase_s(params, grads, [torch.ones(3)], [torch.ones(4)],
                                     [torch.ones(())], fp, factors[:-1], skip, None, beta2=0.999,
                                     maximize=False, chunk_size=chunk)


# ---------------------------------------------------------------------------------------------
# Compilation for sm_80 / sm_90 without a GPU.
# ---------------------------------------------------------------------------------------------


def _compile_report(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable,
                          str(Path(__file__).with_name("_fadafactor_triton_compile.py")),
                          "--json", f"--arch={arch}"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernels_compile_for_sm80_sm90_without_spills():
    """The four kernels in 29 specializations (every dtype; aligned, unaligned, pow, grad_scale,
    lr tensor, per-tensor) compile for sm_80 and sm_90 and ptxas reports no spills. Registers
    (ptxas -v, Triton 3.8): tiles 48-80, combine 40-64, phase A 50-64, phase B 54-64; the bound
    of 96 leaves 5 CTAs of 128 threads per SM. The aligned float32 p = 0.5 phases A and B use
    128-bit loads. About a minute."""
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(_compile_report, (80, 90)))
    for report in reports:
        assert len(report) == 29, f"{len(report)} specializations compiled, expected 29"
        for row in report:
            assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
            assert row["registers"] <= 96, row
            if row["dtype"] == "float32" and row["aligned"]:
                assert row["v4_loads"], f"no 128-bit loads in the aligned float32 path: {row}"


def test_torch_compile_trace_decomposes_into_per_tensor_kernels():
    """What torch.compile sees (AOTAutograd on FakeTensors of a fake CUDA device, no GPU needed):
    each op decomposes into Triton kernel calls on the tensors themselves, per tensor, gridded by
    tiles (phase S), matrices (the combine) and chunks (A and B). (80, 1000) has 4 tiles of
    80 x 256 and 2 chunks; (2, 3, 5) two matrices of one tile, fused into phase B; (0, 4) has no
    tile but a C to decay and copy. Runs in a subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable,
                          str(Path(__file__).with_name("_fadafactor_triton_compile.py")),
                          "--trace"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    kernels = json.loads(out.stdout.strip().splitlines()[-1])
    assert [(k["kernel"], k["grid"][0][0], k["numel"], k["table"]) for k in kernels] == [
        ("_tiles_kernel", 2, 30, False), ("_combine_kernel", 2, 30, False),
        ("_tiles_kernel", 4, 80000, False), ("_combine_kernel", 1, 80000, False),
        ("_combine_kernel", 1, 0, False),
        ("_phase_a_kernel", 2, 80000, False),
        ("_phase_b_kernel", 1, 30, False), ("_phase_b_kernel", 2, 80000, False),
        ("_phase_b_kernel", 1, 0, False)]
