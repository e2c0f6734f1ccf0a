"""FAdafactor on backend="triton" (triton_kernels/_fadafactor_kernels.py) where it is Triton's
own: the per-tensor launches torch.compile traces, the launches per phase, the inputs the ops
refuse, and the kernels compiled for sm_80 / sm_90 without spills. tests/test_scenarios.py runs
the scenarios every backend shares on it (in Triton's interpreter on CPU tensors without a GPU,
as tests/conftest.py sets up).

Sizes stay tiny: the interpreter runs every program in Python. Shrinking the chunk to 64 elements
makes tiles of 8 x 8, so small matrices have several row and column tiles (their partials combined
in phase S), chunks that end mid-row, and multi-chunk phase-A slots.
"""

import pytest
import torch

from fadam_fused import FAdafactor, backends, op_contract
from fadam_testing import FADAFACTOR, assert_same_bits, assert_trajectories_close, make_problem
from conftest import triton_kernels
from _triton_compile import ScriptJobs, assert_compiles_without_spills

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(backends.unavailable_reason("triton", DEVICE) is not None,
                                reason=str(backends.unavailable_reason("triton", DEVICE)))


def test_per_tensor_path_matches_oracle_and_the_table_path_bitwise(monkeypatch, triton_chunk):
    """The traced path (torch.compile has no addresses: one launch per tensor, TABLE=False) runs
    the same programs as the table path: the same bits."""
    from fadam_fused.triton_kernels import launch

    triton_chunk(64)
    problem = make_problem(shapes=[(2, 5, 17), (3, 7), (0, 4), (4,)], steps=2)
    table, _, _ = FADAFACTOR.run(problem, "triton", device=DEVICE, lr=1e-2)
    monkeypatch.setattr(launch, "FORCE_PER_TENSOR", True)
    per_tensor, _, _ = FADAFACTOR.run(problem, "triton", device=DEVICE, lr=1e-2)
    assert_trajectories_close(per_tensor, FADAFACTOR.oracle(problem, lr=1e-2))
    assert_same_bits(table, per_tensor)


def test_one_launch_per_kernel_however_many_tensors(monkeypatch):
    """40 factored tensors: phase S is two launches (tiles, combine), A one, B one; the 1-D
    tensors' FAdam phases one each. Counted at the kernels' `run`, which compiled launches (through
    wrap_triton) and interpreted ones (launched as they are) both reach."""
    tk, _ = triton_kernels()
    launches = []
    for kernel in (tk._fadafactor_kernels._tiles_kernel, tk._fadafactor_kernels._combine_kernel,
                   tk._fadafactor_kernels._phase_a_kernel, tk._fadafactor_kernels._phase_b_kernel,
                   tk._kernels._phase_a_kernel, tk._kernels._phase_b_kernel):
        name = kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__

        def run(*args, _name=name, _real=kernel.run, **kwargs):
            launches.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", run)
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

# The compilations and the trace run in subprocesses started when collection ends, and these tests
# run last (tests/conftest.py: slow subprocesses in the background).
_JOBS = ScriptJobs("_fadafactor_triton_compile.py", [])
start_in_background, stop_in_background = _JOBS.start, _JOBS.stop


@pytest.mark.background
def test_kernels_compile_for_sm80_sm90_without_spills():
    """The four kernels in 29 specializations (every dtype; aligned, unaligned, pow, grad_scale,
    lr tensor, per-tensor) compile for sm_80 and sm_90 and ptxas reports no spills, under Triton
    3.8 and 3.6 alike. Registers (ptxas -v, Triton 3.8 / 3.6): tiles 48-80 / 64-80, combine
    40-56 / 32-64, phase A 50-64 / 53-64, phase B 56-64 (94-96 with stochastic rounding) / 56-64
    (96); the bound of 96 leaves 5 CTAs of 128 threads per SM. The aligned float32 p = 0.5 phases A and B use
    128-bit loads. About a minute."""
    assert_compiles_without_spills(
        _JOBS.compile_reports(), count=30, max_registers=96,
        wants_v4_loads=lambda row: row["dtype"] == "float32" and row["aligned"])


@pytest.mark.background
def test_torch_compile_trace_decomposes_into_per_tensor_kernels():
    """What torch.compile sees (AOTAutograd on FakeTensors of a fake CUDA device, no GPU needed):
    each op decomposes into Triton kernel calls on the tensors themselves, per tensor, gridded by
    tiles (phase S), matrices (the combine) and chunks (A and B). (80, 1000) has 4 tiles of
    80 x 256 and 2 chunks; (2, 3, 5) two matrices of one tile, fused into phase B; (0, 4) has no
    tile but a C to decay and copy. Runs in a subprocess without TRITON_INTERPRET."""
    kernels = _JOBS.result("trace")
    assert [(k["kernel"], k["grid"][0][0], k["numel"], k["table"]) for k in kernels] == [
        ("_tiles_kernel", 2, 30, False), ("_combine_kernel", 2, 30, False),
        ("_tiles_kernel", 4, 80000, False), ("_combine_kernel", 1, 80000, False),
        ("_combine_kernel", 1, 0, False),
        ("_phase_a_kernel", 2, 80000, False),
        ("_phase_b_kernel", 1, 30, False), ("_phase_b_kernel", 2, 80000, False),
        ("_phase_b_kernel", 1, 0, False)]
