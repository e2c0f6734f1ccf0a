"""backend="cuda"'s kernels (csrc/cuda/) run on the CPU under HIP-CPU: the switch, and what the
emulated kernels have of their own (launch splitting, op-level slots, fuse_one_chunk, clipping
off, the lr_tensor rule).

fadam_fused._C_cuda_emulated is csrc/cuda/fadam_cuda.cu compiled by g++ with HIP-CPU
([note: one CUDA source, two compilers] in csrc/cuda/launch.h): the kernels, the multi-tensor plan,
the tables and the step scalars of the GPU build, on CPU tensors. setup.py builds it when
FADAM_HIP_CPU names the HIP-CPU folder (`make test` does when ../shared/third_party/hip-cpu exists);
without it these tests skip. Users switch it on with FADAM_CUDA_EMULATE=1; here tests/conftest.py's
cuda_emulated fixture sets the same switch for each test, so the rest of the suite keeps the
normal backend="cuda". tests/test_scenarios.py runs the scenarios every backend shares on it
(its "cuda-emulated" backend).

The emulator runs a block's 512 threads as fibers, ~1 ms per block, so multi-chunk and
multi-launch paths are reached by shrinking the chunk (the cuda_chunk fixture), not by big
tensors. Tolerances: tests/fadam_testing.py. What emulation cannot check (races, memory
ordering, speed, registers): csrc/cuda/launch.h.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from fadam_fused import FAdam, _ext, backends, reference
from conftest import backend_ops
from fadam_testing import FADAM, SQUARE_OVERFLOWS, make_problem, op_inputs

pytestmark = pytest.mark.usefixtures("cuda_emulated")

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CHUNK = 65536  # the CUDA chunk of op_contract.CHUNK_SIZE


# ---- the switch ---------------------------------------------------------------------------------


def test_backend_cuda_runs_the_emulated_ops():
    assert backends.resolve("cuda", CPU) == "cuda"
    assert backend_ops("cuda").phase_a is torch.ops.fadam_fused.cuda_emulated_phase_a.default
    # Registered as ops of their own: the CPU kernels of fadam_phase_a/b are still csrc/cpu/.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fadam_fused::cuda_emulated_phase_a", "CPU")
    assert "cuda" in backends.unavailable_reason("cuda", torch.device("meta"))


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)),
                          timeout=300)


def test_environment_switch():
    code = ("import sys; sys.path.insert(0, 'tests')\n"
            "import torch; from fadam_fused import FAdam; from conftest import backend_ops\n"
            "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
            "FAdam([p], backend='cuda', lr=0.1).step()\n"
            "print(backend_ops('cuda').phase_a is "
            "torch.ops.fadam_fused.cuda_emulated_phase_a.default, p.detach().tolist())\n")
    out = _python(code, FADAM_CUDA_EMULATE="1")
    assert out.returncode == 0, out.stderr
    # The emulated op ran: at t = 1, f = g^2 = 1, ghat = w = 1 (to 1e-8), m = 0.1, and
    # theta = 1 - lr (m + weight_decay w) = 1 - 0.1 (0.1 + 1e-3).
    emulated, values = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert emulated == "True", out.stdout
    assert abs(eval(values)[0] - (1.0 - 0.1 * (0.1 + 1e-3))) < 1e-6, out.stdout


def test_missing_build_says_how_to_build_it(monkeypatch):
    import fadam_fused

    monkeypatch.setitem(sys.modules, "fadam_fused._C_cuda_emulated", None)  # import fails
    monkeypatch.delattr(fadam_fused, "_C_cuda_emulated")
    reason = _ext._load_emulated()
    assert "FADAM_HIP_CPU=" in reason and "FADAM_CUDA_EMULATE" in reason, reason
    monkeypatch.setattr(_ext, "EMULATED_LOAD_ERROR", reason)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = FAdam([p], backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run.*FADAM_HIP_CPU="):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and len(opt.state) == 0


# ---- launches ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_more_tensors_than_one_launch_holds(dtype, cuda_chunk):
    # 140 tensors of 3 chunks of 256 plus small ones: > 128 tensors per table, so launches split
    # on the tensor table and a tensor's blocks may straddle two launches.
    cuda_chunk(256)
    shapes = [(2 * 256 + 1 + i,) for i in range(140)] + [(5,), (0,), (1,)]
    assert len(torch.ops.fadam_fused.cuda_emulated_plan([s[0] for s in shapes], 256, True, "a",
                                                        -1, -1)[:, 0].unique()) == 2
    FADAM.check(make_problem(shapes=shapes, dtype=dtype, steps=3), "cuda", dtype, lr=1e-2,
                clip=0.5)


@pytest.mark.parametrize("chunk", [64, 62], ids=["chunk64", "chunk62-scalar-path"])
def test_more_blocks_than_one_launch_holds(chunk, cuda_chunk):
    # 70001 elements in chunks of 64: 1094 chunks. Phase A needs more blocks than the 1024 of one
    # launch, so the tensor straddles two launches; phase B caps a tensor at 1024 blocks, so each
    # block updates 2 chunks after summing all 1094 slots. 62 is not a multiple of a 128-bit
    # fragment (4 floats): the scalar path.
    cuda_chunk(chunk)
    numel = 70_001
    rows_a = torch.ops.fadam_fused.cuda_emulated_plan([numel], chunk, True, "a", -1, -1)
    rows_b = torch.ops.fadam_fused.cuda_emulated_plan([numel], chunk, True, "b", -1, -1)
    assert set(rows_a[:, 0].tolist()) == {0, 1} and (rows_b[:, 4] - rows_b[:, 3]).max() == 2
    FADAM.check(make_problem(shapes=[(numel,), (5, 7)], steps=1), "cuda", lr=1e-2, clip=0.5)


# ---- the ops called directly --------------------------------------------------------------------


def _kw(chunk, clip):
    a = dict(beta2=0.999, eps=1e-8, p=0.5, clip=clip, maximize=False, chunk_size=chunk)
    b = dict(a, lr=1e-2, beta1=0.9, weight_decay=1e-2)
    return a, b


def _direct_step(group, fuse, chunk=CHUNK, clip=0.5):
    params, grads, fims, moms, steps = group
    a_kw, b_kw = _kw(chunk, clip)
    n_slots = sum(max(1, math.ceil(p.numel() / chunk)) for p in params)
    partials = torch.full((n_slots, 2), float("nan"), dtype=torch.float64)
    skip = torch.zeros(())
    torch.ops.fadam_fused.cuda_emulated_phase_a(params, grads, fims, steps, partials, skip, None,
                                                fuse_one_chunk=fuse, **a_kw)
    torch.ops.fadam_fused.cuda_emulated_phase_b(params, grads, fims, moms, steps, partials, skip,
                                                None, None, fuse_one_chunk=fuse, **b_kw)
    return partials, skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fuse_one_chunk_does_not_change_bits(dtype):
    shapes = [(4096,), (4097,), (1,), (0,), (9000,)]
    a = op_inputs(dtype, shapes)
    b = [[t.clone() for t in lst] for lst in a]
    _, skip_a = _direct_step(a, fuse=True, chunk=4096)
    _, skip_b = _direct_step(b, fuse=False, chunk=4096)
    assert float(skip_a) == float(skip_b) == 0.0
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            assert torch.equal(x, y)


def test_phase_a_slots_match_the_oracle_and_fused_slots_are_untouched():
    chunk = 1024
    group = op_inputs(torch.float32, [(3000,), (10,)])
    params, grads, fims, _, steps = group
    partials = torch.full((3 + 1, 2), float("nan"), dtype=torch.float64)
    skip = torch.zeros(())
    a_kw, _ = _kw(chunk, 0.5)
    torch.ops.fadam_fused.cuda_emulated_phase_a(params, grads, fims, steps, partials, skip, None,
                                                fuse_one_chunk=True, **a_kw)
    assert float(skip) == 0.0
    assert torch.isnan(partials[3]).all(), "phase A must leave a fused tensor's slot alone"
    bhat = float(reference.b2hat(0.999, steps[0]))
    g, th, f = grads[0].double(), params[0].double(), fims[0].double()
    d = (bhat * f + (1 - bhat) * g * g).sqrt() + 1e-8
    for c in range(3):
        sl = slice(c * chunk, (c + 1) * chunk)
        expect = torch.stack([((g / d)[sl] ** 2).sum(), ((th / d)[sl] ** 2).sum()])
        torch.testing.assert_close(partials[c], expect, rtol=1e-5, atol=0)


# ---- clipping off -------------------------------------------------------------------------------


@pytest.mark.parametrize("fuse", [True, False])
def test_clip_off_phase_a_writes_no_slot_and_still_checks_gradients(fuse):
    group = op_inputs(torch.float32, [(3000,), (10,), (0,)])
    before = [t.clone() for t in group[0]]
    partials, skip = _direct_step(group, fuse=fuse, chunk=1024, clip=0.0)
    assert torch.isnan(partials).all() and float(skip) == 0.0
    assert not torch.equal(group[0][0], before[0])
    group[1][0][2999] = float("nan")  # the last element of the last (ragged) chunk
    frozen = [[t.clone() for t in lst] for lst in group]
    _, skip = _direct_step(group, fuse=fuse, chunk=1024, clip=0.0)
    assert float(skip) == 1.0
    for la, lb in zip(group, frozen):
        for x, y in zip(la, lb):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


# ---- the overflow rule -------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.5, 0.0], ids=["clip", "clip-off"])
@pytest.mark.parametrize("where", [(0, 2047), (1, 9)], ids=["multi-chunk", "one-chunk-fused"])
@pytest.mark.parametrize("case", SQUARE_OVERFLOWS, ids=[c[0] for c in SQUARE_OVERFLOWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_whose_square_overflows_skips_the_step(dtype, case, where, clip):
    # A finite g whose g * g is inf would make f inf and freeze the element: phase A raises the
    # skip flag from reduce_frags (a chunk of the 3-chunk tensor, clip on) or check_frags (the
    # fused one-chunk tensor, or clipping off), and phase B writes nothing.
    _, g, scale = case
    chunk = 1024
    group = op_inputs(dtype, [(3000,), (10,)])
    params, grads, fims, moms, steps = group
    grad_scale = None
    if scale is not None:  # the gradients as GradScaler leaves them: scaled by `scale`
        grads[:] = [x * scale for x in grads]
        grad_scale = torch.tensor(scale)
    grads[where[0]][where[1]] = g
    frozen = [t.clone() for t in params + fims + moms]
    a_kw, b_kw = _kw(chunk, clip)
    partials = torch.zeros((4, 2), dtype=torch.float64)
    skip = torch.zeros(())
    torch.ops.fadam_fused.cuda_emulated_phase_a(params, grads, fims, steps, partials, skip,
                                                grad_scale, fuse_one_chunk=True, **a_kw)
    assert float(skip) == 1.0
    torch.ops.fadam_fused.cuda_emulated_phase_b(params, grads, fims, moms, steps, partials, skip,
                                                grad_scale, None, fuse_one_chunk=True, **b_kw)
    assert all(torch.equal(x, y) for x, y in zip(frozen, params + fims + moms))


# ---- the lr_tensor rule, the same on both C++ backends ------------------------------------------


@pytest.mark.parametrize("lr_tensor", [torch.tensor(1, dtype=torch.int64), torch.tensor(0.1).half(),
                                       torch.tensor([0.1, 0.2])],
                         ids=["int64", "float16", "two-elements"])
@pytest.mark.parametrize("op", ["fadam_phase_b", "cuda_emulated_phase_b"])
def test_lr_tensor_rule(op, lr_tensor):
    group = op_inputs(torch.float32, [(10,)])
    params, grads, fims, moms, steps = group
    frozen = [[t.clone() for t in lst] for lst in group]
    partials = torch.zeros((1, 2), dtype=torch.float64)
    _, b_kw = _kw(CHUNK, 0.5)
    with pytest.raises(RuntimeError, match="lr_tensor must be a one-element float32 or float64"):
        getattr(torch.ops.fadam_fused, op)(params, grads, fims, moms, steps, partials,
                                           torch.zeros(()), None, lr_tensor, fuse_one_chunk=True,
                                           **b_kw)
    for la, lb in zip(group, frozen):
        for x, y in zip(la, lb):
            assert torch.equal(x, y)
