"""backend="cuda"'s kernels (csrc/cuda/) run on the CPU under HIP-CPU, against the float64 oracle.

fadam_fused._C_cuda_emulated is csrc/cuda/fadam_cuda.cu compiled by g++ with HIP-CPU
([note: one CUDA source, two compilers] in csrc/cuda/launch.h): the kernels, the multi-tensor plan,
the tables and the step scalars of the GPU build, on CPU tensors. setup.py builds it when
FADAM_HIP_CPU names the HIP-CPU folder (`make test` does when ../shared/third_party/hip-cpu exists);
without it these tests skip. Users switch it on with FADAM_CUDA_EMULATE=1; here a fixture sets the
same switch for each test, so the rest of the suite keeps the normal backend="cuda".

The scenarios are test_cuda.py's (the GPU suite), at sizes the emulator runs in seconds: it runs a
block's 512 threads as fibers, ~1 ms per block, so multi-chunk and multi-launch paths are reached by
shrinking the chunk (the cuda_chunk fixture), not by big tensors. Tolerances: tests/fadam_testing.py.
What emulation cannot check (races, memory ordering, speed, registers): csrc/cuda/launch.h.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys

import pytest
import torch

from fadam_fused import FAdam, _ext, backends, op_contract, reference
from fadam_testing import (SQUARE_FITS, SQUARE_OVERFLOWS,
                           assert_groups_and_lr_schedule_match_oracle, assert_trajectories_close,
                           make_problem, op_inputs, run_optimizer, run_oracle64)
from test_cpu_parity import CASES
from test_cuda import _snapshot_cpu, assert_snaps_equal, run_on

op_contract.define_phase_ops(*op_contract.EMULATED_CUDA_OPS)  # as _ext does under the switch
try:
    from fadam_fused import _C_cuda_emulated  # noqa: F401
    _MISSING = None
except ImportError as exc:
    _MISSING = (f"the emulated CUDA build is missing ({exc}): build with FADAM_HIP_CPU="
                "../shared/third_party/hip-cpu (make test does when that folder exists)")

pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CHUNK = 65536  # the CUDA chunk of backends._CHUNK_SIZE
# test_cpu_parity's default shapes scaled to a 4096 chunk: empty, one-element, one-chunk (fused)
# and a two-chunk tensor with a ragged tail (4715 = 4096 + 619).
SHAPES = [(0,), (1,), (1000,), (5, 23, 41), (3, 7)]


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    """backend="cuda" runs the emulated kernels on CPU tensors, as under FADAM_CUDA_EMULATE=1."""
    monkeypatch.setattr(_ext, "CUDA_EMULATE", True)
    monkeypatch.setattr(_ext, "EMULATED_LOAD_ERROR", None)
    monkeypatch.setattr(backends, "_FUSED", {})


def run(problem, **kw):
    return run_on(problem, "cuda", device=CPU, **kw)


def check(problem, dtype=torch.float32, **hyper):
    fast, _, _ = run(problem, **hyper)
    same = None if dtype == torch.float32 else run_optimizer(problem, "reference", **hyper)[0]
    return assert_trajectories_close(fast, run_oracle64(problem, **hyper), same, dtype)


# ---- the switch ---------------------------------------------------------------------------------


def test_backend_cuda_runs_the_emulated_ops():
    assert backends.resolve("cuda", CPU) == "cuda"
    assert backends.fused("cuda").phase_a is torch.ops.fadam_fused.cuda_emulated_phase_a.default
    # Registered as ops of their own: the CPU kernels of fadam_phase_a/b are still csrc/cpu/.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fadam_fused::cuda_emulated_phase_a", "CPU")
    assert "cuda" in backends.unavailable_reason("cuda", torch.device("meta"))


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)),
                          timeout=300)


def test_environment_switch():
    code = ("import torch; from fadam_fused import FAdam, backends\n"
            "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
            "FAdam([p], backend='cuda', lr=0.1).step()\n"
            "print(backends.fused('cuda').phase_a is "
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


# ---- parity with the oracle: the CPU test matrix ------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_oracle(case, dtype, cuda_chunk):
    _, problem_kw, hyper, extra = case
    cuda_chunk(extra.get("chunk", 4096))
    problem_kw = {"shapes": SHAPES, **problem_kw}
    check(make_problem(dtype=dtype, steps=7, **problem_kw), dtype, **hyper)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_more_tensors_than_one_launch_holds(dtype, cuda_chunk):
    # 140 tensors of 3 chunks of 256 plus small ones: > 128 tensors per table, so launches split
    # on the tensor table and a tensor's blocks may straddle two launches.
    cuda_chunk(256)
    shapes = [(2 * 256 + 1 + i,) for i in range(140)] + [(5,), (0,), (1,)]
    assert len(torch.ops.fadam_fused.cuda_emulated_plan([s[0] for s in shapes], 256, True, "a",
                                                        -1, -1)[:, 0].unique()) == 2
    check(make_problem(shapes=shapes, dtype=dtype, steps=3), dtype, lr=1e-2, clip=0.5)


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
    check(make_problem(shapes=[(numel,), (5, 7)], steps=1), lr=1e-2, clip=0.5)


def test_two_param_groups_and_lr_schedule(cuda_chunk):
    cuda_chunk(4096)
    assert_groups_and_lr_schedule_match_oracle(make_problem(shapes=SHAPES, steps=6), run)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
def test_tensor_lr_matches_float_lr(lr_dtype):
    problem = make_problem(steps=3)
    a, _, _ = run(problem, lr=torch.tensor(0.02, dtype=lr_dtype))
    b, _, _ = run(problem, lr=0.02)
    assert_snaps_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiny_eps_with_zero_gradient_stays_finite(dtype, cuda_chunk):
    # w = theta / eps^(2p) ~ 1e30: w^2 overflows float32; the RMS sums are float64.
    cuda_chunk(4096)
    problem = make_problem(shapes=SHAPES, steps=5, zero_grad=(2, 3), dtype=dtype)
    fast, params, _ = run(problem, lr=1e-2, eps=1e-30)
    for snap in fast:
        for t in snap.params + [x for x in snap.momentum + snap.fim if x is not None]:
            assert torch.isfinite(t).all()
    same = None if dtype == torch.float32 else run_optimizer(problem, "reference", lr=1e-2,
                                                             eps=1e-30)[0]
    assert_trajectories_close(fast, run_oracle64(problem, lr=1e-2, eps=1e-30), same, dtype)
    if dtype == torch.float32:  # a 1e-5 relative decay per step is below a bf16 / fp16 ulp
        assert not torch.equal(params[2].detach(), problem.init[2])


# ---- bitwise properties -------------------------------------------------------------------------


def test_deterministic_bitwise(cuda_chunk):
    cuda_chunk(1024)
    problem = make_problem(shapes=[(5000,), (1025,), (3, 700), (1024,)], steps=3)
    assert_snaps_equal(run(problem, lr=1e-2)[0], run(problem, lr=1e-2)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_storage_gives_the_same_bits(dtype, cuda_chunk):
    # Params and grads one element into a buffer are not 16-byte aligned: the scalar path. It
    # visits the same elements in the same order per thread as the 128-bit path.
    cuda_chunk(2048)
    problem = make_problem(shapes=[(5003,), (1025,), (1,)], steps=3, dtype=dtype)
    aligned, _, _ = run(problem, lr=1e-2)

    def offset(t):
        return torch.zeros(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape).copy_(t)

    params = [torch.nn.Parameter(offset(t)) for t in problem.init]
    assert all(p.data_ptr() % 16 != 0 for p in params)
    opt = FAdam(params, backend="cuda", lr=1e-2)
    snaps = []
    for row in problem.grads:
        for p, g in zip(params, row):
            p.grad = offset(g)
        opt.step()
        snaps.append(_snapshot_cpu(params, opt.state))
    assert_snaps_equal(aligned, snaps)


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_off_multi_chunk_matches_oracle(dtype, cuda_chunk):
    cuda_chunk(512)
    check(make_problem(shapes=[(3, 517), (512,), (7,), (0,)], dtype=dtype, steps=5), dtype,
          lr=1e-2, clip=None, weight_decay=0.1)


# ---- non-finite values --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [0, 1, 2], ids=["multi-chunk", "one-chunk", "tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nonfinite_gradient_skips_the_step_bit_identically(bad, where, dtype, cuda_chunk):
    # 5003 = 4 * 1024 + 907: the last chunk ends in a ragged fragment (907 % 8 = 3).
    cuda_chunk(1024)
    problem = make_problem(shapes=[(5003,), (1000,), (3,)], dtype=dtype, steps=2)
    _, params, opt = run(problem, lr=1e-2)
    before = _snapshot_cpu(params, opt.state)
    for p in params:
        p.grad = torch.randn_like(p)
    params[where].grad.view(-1)[-1] = bad
    opt.step()
    assert_snaps_equal([before], [_snapshot_cpu(params, opt.state)])
    assert float(opt.skipped_steps) == 1.0
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(params[0].detach(), before.params[0])
    assert float(opt.state[params[0]]["step"]) == before.step[0] + 1


@pytest.mark.parametrize("shape", [(3000,), (100,)], ids=["multi-chunk", "one-chunk"])
def test_nan_parameter_same_on_cpu_emulated_cuda_and_reference(shape, cuda_chunk, cpu_chunk):
    # A NaN parameter (not gradient) does not skip the step: its tensor's RMS(w) counts as
    # infinite, so the clipped weight decay is 0 for that tensor and the NaN stays in its element.
    cuda_chunk(1024)
    cpu_chunk(1024)
    problem = make_problem(shapes=[shape, (50,)], steps=3)
    problem.init[0].view(-1)[7] = float("nan")
    hyper = dict(lr=1e-2, clip=0.5, weight_decay=0.1)
    runs = {b: run_optimizer(problem, b, **hyper)[0] for b in ("cuda", "cpu", "reference")}
    for snap in runs["cuda"]:
        nan = torch.isnan(snap.params[0])
        assert nan.sum() == 1 and nan.view(-1)[7]
    for other in ("cpu", "reference"):
        for a, b in zip(runs["cuda"], runs[other]):
            for x, y in zip(a.params + a.momentum + a.fim, b.params + b.momentum + b.fim):
                torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, equal_nan=True)


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


@pytest.mark.parametrize("g", SQUARE_FITS)
def test_gradient_with_a_finite_square_is_not_skipped_and_matches_the_oracle(g, cuda_chunk):
    # g * g = 1e38 or 3.24e38 fits float32: the step runs, in a multi-chunk tensor (3 chunks of
    # 1024) and a fused one-chunk tensor, and follows the float64 oracle.
    cuda_chunk(1024)
    problem = make_problem(shapes=[(3000,), (5, 7)], steps=4)
    problem.grads[1][0][2047] = g
    problem.grads[1][1][2, 3] = -g
    fast, _, opt = run(problem, lr=1e-2)
    assert float(opt.skipped_steps) == 0.0
    assert_trajectories_close(fast, run_oracle64(problem, lr=1e-2))


def test_grad_scale_matches_unscaled():
    # GradScaler's inputs as GradScaler.step sets them. With weight_decay and clipping off, a
    # scale that were not divided out would shrink the decay 4096x.
    problem = make_problem(steps=4)
    hyper = dict(lr=1e-2, weight_decay=0.1, clip=None)
    params = [torch.nn.Parameter(t.clone()) for t in problem.init]
    opt = FAdam(params, backend="cuda", **hyper)
    scaled = []
    for row in problem.grads:
        for p, g in zip(params, row):
            p.grad = g * 4096.0
        opt.grad_scale = torch.tensor(4096.0)
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        scaled.append(_snapshot_cpu(params, opt.state))
    del opt.grad_scale, opt.found_inf
    assert_trajectories_close(scaled, run_oracle64(problem, **hyper))


def test_grad_scaler_found_inf_skips():
    param = torch.nn.Parameter(torch.randn(1000))
    opt = FAdam([param], lr=1e-2, backend="cuda")
    param.grad = torch.randn_like(param)
    opt.step()
    before = param.detach().clone()
    state = {k: v.clone() for k, v in opt.state[param].items()}
    param.grad = torch.randn_like(param)
    opt.grad_scale = torch.tensor(1.0)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert float(opt.skipped_steps) == 1.0
    assert torch.equal(param.detach(), before)
    for k, v in state.items():
        assert torch.equal(opt.state[param][k], v)


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


# ---- state_dict moves ---------------------------------------------------------------------------


MOVES = [("cuda", "cpu"), ("cpu", "cuda"), ("cuda", "reference"), ("reference", "cuda")]


@pytest.mark.parametrize("first, second", MOVES, ids=[f"{a}-to-{b}" for a, b in MOVES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trip(first, second, dtype):
    problem = make_problem(shapes=[(4097,), (5, 17, 13), (3,)], dtype=dtype, steps=6, no_grad=(2,))
    hyper = dict(lr=1e-2, clip=1.0)
    snaps1, params1, opt1 = run_on(problem, first, device=CPU, steps=3, **hyper)
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params1]
    opt2 = FAdam(params2, backend=second, **hyper)
    opt2.load_state_dict(torch.load(buf, map_location="cpu"))
    assert opt2.param_groups[0]["backend"] == second
    snaps2, _, _ = run_on(problem, second, device=CPU, params=params2, opt=opt2, start=3, steps=3)
    same = None if dtype == torch.float32 else run_optimizer(problem, "reference", **hyper)[0]
    assert_trajectories_close(snaps1 + snaps2, run_oracle64(problem, **hyper), same, dtype)
