"""backend="cuda" (csrc/cuda/) on a GPU, where it is its own: the build, launches split over
tensor tables and blocks, the ops called directly, a tensor of more than 2^31 elements. Skipped
without a GPU (tests/test_cuda_emulated.py runs the same kernels on the CPU); tests/test_scenarios.py
runs the scenarios every backend shares on it (its "cuda-gpu" backend: parity with the oracle,
CUDA graphs, the non-finite skip, state_dict moves, GradScaler).

Run them on any machine with an NVIDIA GPU and a CUDA toolkit with `make gpu-check`.

Tolerances are those of tests/fadam_testing.py. Comparisons that must be bitwise
(fuse_one_chunk on/off) use torch.equal.
"""

from __future__ import annotations

import math

import pytest
import torch

from fadam_fused import FAdam, _ext, backends, reference
from fadam_testing import FADAM, make_problem, op_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

DEV = torch.device("cuda") if torch.cuda.is_available() else None
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---- the build is there -------------------------------------------------------------------------


def test_cuda_kernels_are_built_and_chosen():
    # On a GPU machine a CPU-only build is a failure, not a skip: the GPU suite would test nothing.
    assert "CUDA" in _ext.KERNELS, backends.unavailable_reason("cuda", DEV)
    assert backends.resolve(None, DEV) == "cuda"


# ---- launches -----------------------------------------------------------------------------------


def test_many_multi_chunk_tensors_split_over_launches():
    # 150 tensors of 3 chunks (450 phase-A blocks, > 128 tensors): launches split on the tensor
    # table, and a tensor's blocks may straddle two launches.
    shapes = [(65536 * 2 + 1 + i,) for i in range(150)] + [(5,), (0,)]
    FADAM.check(make_problem(shapes=shapes, steps=3), "cuda", device=DEV, lr=1e-2)


@pytest.mark.parametrize("chunk", [256, 250], ids=["chunk256", "chunk250-scalar-path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tensor_straddling_launches_and_blocks_of_two_chunks(chunk, dtype, cuda_chunk):
    # 300001 elements in chunks of 256: 1172 chunks. Phase A needs a block per chunk, more than
    # the 1024 of one launch, so the tensor straddles two launches (new local index, same global
    # slots); phase B caps a tensor at 1024 blocks, so each block updates 2 chunks after summing
    # all 1172 slots (tests/test_cuda_build.py checks this plan on the host). 250 is not a
    # multiple of the 4 / 8 elements of a 128-bit fragment: every tensor takes the scalar path.
    cuda_chunk(chunk)
    rows = torch.ops.fadam_fused.cuda_plan([300_001], chunk, True, "a", -1, -1)
    assert set(rows[:, 0].tolist()) == {0, 1}
    rows = torch.ops.fadam_fused.cuda_plan([300_001], chunk, True, "b", -1, -1)
    assert (rows[:, 4] - rows[:, 3]).max() == 2
    problem = make_problem(shapes=[(300_001,), (5, 7), (3, 1000)], dtype=dtype, steps=4)
    FADAM.check(problem, "cuda", dtype, device=DEV, lr=1e-2, clip=0.5)


# ---- the ops called directly ---------------------------------------------------------------------


A_KW = dict(beta2=0.999, eps=1e-8, p=0.5, clip=0.5, maximize=False, chunk_size=65536)
B_KW = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, p=0.5, clip=0.5, weight_decay=1e-2,
            maximize=False, chunk_size=65536)


def _direct_step(group, fuse):
    params, grads, fims, moms, steps = group
    n_slots = sum(max(1, math.ceil(p.numel() / 65536)) for p in params)
    partials = torch.full((n_slots, 2), float("nan"), dtype=torch.float64, device=DEV)
    skip = torch.zeros((), device=DEV)
    torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials, skip, None,
                                        fuse_one_chunk=fuse, **A_KW)
    torch.ops.fadam_fused.fadam_phase_b(params, grads, fims, moms, steps, partials, skip, None,
                                        None, fuse_one_chunk=fuse, **B_KW)
    return partials, skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fuse_one_chunk_does_not_change_bits(dtype):
    # A one-chunk tensor's total is its single slot plus exact zeros either way.
    shapes = [(65536,), (4097,), (1,), (0,), (70_000,)]
    a = op_inputs(dtype, shapes, device=DEV)
    b = [[t.clone() for t in lst] for lst in a]
    _, skip_a = _direct_step(a, fuse=True)
    _, skip_b = _direct_step(b, fuse=False)
    assert float(skip_a) == float(skip_b) == 0.0
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            assert torch.equal(x, y)


def test_phase_a_slots_match_the_oracle_and_fused_slots_are_untouched():
    shapes = [(200_000,), (10,)]
    group = op_inputs(torch.float32, shapes, device=DEV)
    params, grads, fims, _, steps = group
    n_slots = 4 + 1
    partials = torch.full((n_slots, 2), float("nan"), dtype=torch.float64, device=DEV)
    skip = torch.zeros((), device=DEV)
    torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials, skip, None,
                                        fuse_one_chunk=True, **A_KW)
    assert float(skip) == 0.0
    assert torch.isnan(partials[4]).all(), "phase A must leave a fused tensor's slot alone"
    bhat = float(reference.b2hat(0.999, steps[0].cpu()))
    g, th, f = grads[0].double(), params[0].double(), fims[0].double()
    f = bhat * f + (1 - bhat) * g * g
    d = f.sqrt() + 1e-8
    for c in range(4):
        sl = slice(c * 65536, (c + 1) * 65536)
        expect = torch.stack([((g / d)[sl] ** 2).sum(), ((th / d)[sl] ** 2).sum()])
        torch.testing.assert_close(partials[c], expect, rtol=1e-5, atol=0)


# ---- more than 2^31 elements --------------------------------------------------------------------


def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.skipif(torch.cuda.is_available() and _free_bytes() < 40 * 2**30,
                    reason="needs a GPU with 40 GiB free (bf16 param, grad and a copy, fp32 state: 30 GiB)")
def test_tensor_larger_than_2_pow_31():
    # n > 2^31 with a ragged last chunk. bf16 param and grad (2 B each), fp32 fim and momentum
    # (4 B each), plus a bf16 copy of the initial param: 14 B x 2.15e9 = 30 GiB. One step, clip = 0.5 so both RMS scales are active; the
    # expected values are computed in float64 in slices, with the global RMS of the whole tensor,
    # at t = 1 (b2hat = 0: f = g^2, d = |g| + eps). A 32-bit index or slot bug beyond 2^31 would
    # change the RMS or the slices past the boundary.
    n = 2**31 + 65536 + 3
    gen = torch.Generator(device=DEV).manual_seed(0)
    param = torch.nn.Parameter(torch.randn(n, device=DEV, dtype=torch.bfloat16, generator=gen))
    param.grad = torch.randn(n, device=DEV, dtype=torch.bfloat16, generator=gen)
    theta0 = param.detach().clone()
    lr, b1, eps, clip, wd = 1e-2, 0.9, 1e-8, 0.5, 0.1
    opt = FAdam([param], lr=lr, betas=(b1, 0.999), eps=eps, clip=clip, weight_decay=wd,
                backend="cuda")
    opt.step()
    torch.cuda.synchronize()

    step = 2**26  # float64 temporaries of 0.5 GiB
    s1 = s2 = 0.0
    for lo in range(0, n, step):
        g = param.grad[lo:lo + step].double()
        th = theta0[lo:lo + step].double()
        d = g.abs() + eps
        s1 += float(((g / d) ** 2).sum())
        s2 += float(((th / d) ** 2).sum())
    scale1 = max(1.0, math.sqrt(s1 / n) / clip)
    scale2 = max(1.0, math.sqrt(s2 / n) / clip)
    assert scale1 > 1.0 and scale2 > 1.0  # both clips active, so the sums matter

    fim, mom = opt.state[param]["fim"], opt.state[param]["momentum"]
    for lo in [0, 2**31 - 1000, 2**31 - 65536 * 3, n - 5000]:
        sl = slice(lo, min(n, lo + 70_000))
        g = param.grad[sl].double()
        th = theta0[sl].double()
        d = g.abs() + eps
        m = (1 - b1) * (g / d) / scale1
        expect = th - lr * (m + wd * (th / d) / scale2)
        torch.testing.assert_close(fim[sl].double(), g * g, rtol=1e-6, atol=0)
        torch.testing.assert_close(mom[sl].double(), m, rtol=1e-5, atol=1e-7)
        # bf16 storage: within one bf16 rounding of the float64 result
        torch.testing.assert_close(param.detach()[sl].double(), expect, rtol=8e-3, atol=1e-5)
