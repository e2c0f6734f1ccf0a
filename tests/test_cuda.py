"""backend="cuda" (csrc/cuda/) on a GPU: parity with the oracle, Triton and CPU, CUDA graphs, huge
tensors, the non-finite skip, state_dict round trips. Skipped without a GPU
(tests/test_cuda_emulated.py runs the same kernels on the CPU).

Run them on any machine with an NVIDIA GPU and a CUDA toolkit with `make gpu-check`.

Tolerances are those of tests/fadam_testing.py. Comparisons that must be bitwise
(determinism, fuse_one_chunk on/off, aligned vs unaligned storage, graph replay vs eager, skipped
steps) use torch.equal.
"""

from __future__ import annotations

import io
import math

import pytest
import torch


from fadam_fused import FAdam, _ext, backends, reference
from fadam_testing import (Problem, Snapshot, assert_groups_and_lr_schedule_match_oracle,
                           assert_trajectories_close, make_optimizer, make_problem, op_inputs,
                           run_optimizer, run_oracle64)
from test_cpu_parity import CASES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

DEV = torch.device("cuda") if torch.cuda.is_available() else None
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _triton_ok() -> bool:
    return DEV is not None and backends.unavailable_reason("triton", DEV) is None


needs_triton = pytest.mark.skipif(not _triton_ok(), reason="Triton backend unavailable")


# ---- helpers ------------------------------------------------------------------------------------


def _cpu(t):
    return None if t is None else t.detach().to("cpu", copy=True)


def _snapshot_cpu(params, state) -> Snapshot:
    def get(p, key):
        return _cpu(state[p][key]) if key in state.get(p, {}) else None

    steps = [float(state[p]["step"]) if "step" in state.get(p, {}) else None for p in params]
    return Snapshot([_cpu(p) for p in params], [get(p, "momentum") for p in params],
                    [get(p, "fim") for p in params], steps)


def run_on(problem: Problem, backend: str | None, device=DEV, groups=None, lr_schedule=None,
           steps=None, params=None, opt=None, start=0, **hyper):
    """run_optimizer of fadam_testing on `device`; snapshots are CPU copies.

    With `params` and `opt` given, continues that run from step `start`.
    """
    if params is None:
        params = [torch.nn.Parameter(t.clone().to(device)) for t in problem.init]
    if opt is None:
        opt = make_optimizer(params, backend, groups, **hyper)
    snaps = []
    end = problem.steps if steps is None else start + steps
    for k in range(start, end):
        if lr_schedule is not None:
            for group in opt.param_groups:
                group["lr"] = lr_schedule(k)
        grads = [None if g is None else g.to(device) for g in problem.grads[k]]
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        for p, g in zip(params, grads):  # p.grad is never changed (maximize, grad_scale)
            assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))
        snaps.append(_snapshot_cpu(params, opt.state))
    return snaps, params, opt


def assert_snaps_equal(a, b):
    for k, (sa, sb) in enumerate(zip(a, b, strict=True)):
        for name in ("params", "momentum", "fim"):
            for i, (x, y) in enumerate(zip(getattr(sa, name), getattr(sb, name), strict=True)):
                assert (x is None) == (y is None)
                assert x is None or torch.equal(x, y), f"step {k + 1} {name}[{i}] differs"
        assert sa.step == sb.step


# ---- the build is there -------------------------------------------------------------------------


def test_cuda_kernels_are_built_and_chosen():
    # On a GPU machine a CPU-only build is a failure, not a skip: the GPU suite would test nothing.
    assert "CUDA" in _ext.KERNELS, backends.unavailable_reason("cuda", DEV)
    assert backends.resolve(None, DEV) == "cuda"


# ---- parity with the oracle: the CPU test matrix ------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_matches_oracle(case, dtype):
    _, problem_kw, hyper, _ = case
    problem = make_problem(dtype=dtype, steps=10, **problem_kw)
    fast, _, _ = run_on(problem, "cuda", **hyper)
    ref64 = run_oracle64(problem, **hyper)
    same = None if dtype == torch.float32 else run_optimizer(problem, "reference", **hyper)[0]
    assert_trajectories_close(fast, ref64, same, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_small_tensors(dtype):
    # 1000 tensors: 8 launches per phase (128 tensors per launch), all one-chunk (fused) tensors.
    shapes = [(1 + (i * 7) % 61,) for i in range(1000)]
    problem = make_problem(shapes=shapes, dtype=dtype, steps=7)
    fast, _, _ = run_on(problem, "cuda", lr=1e-2)
    ref64 = run_oracle64(problem, lr=1e-2)
    same = None if dtype == torch.float32 else run_optimizer(problem, "reference", lr=1e-2)[0]
    assert_trajectories_close(fast, ref64, same, dtype)


def test_many_multi_chunk_tensors_split_over_launches():
    # 150 tensors of 3 chunks (450 phase-A blocks, > 128 tensors): launches split on the tensor
    # table, and a tensor's blocks may straddle two launches.
    shapes = [(65536 * 2 + 1 + i,) for i in range(150)] + [(5,), (0,)]
    problem = make_problem(shapes=shapes, steps=3)
    fast, _, _ = run_on(problem, "cuda", lr=1e-2)
    assert_trajectories_close(fast, run_oracle64(problem, lr=1e-2))


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
    fast, _, _ = run_on(problem, "cuda", lr=1e-2, clip=0.5)
    ref64 = run_oracle64(problem, lr=1e-2, clip=0.5)
    same = None if dtype == torch.float32 else run_optimizer(problem, "reference", lr=1e-2,
                                                             clip=0.5)[0]
    assert_trajectories_close(fast, ref64, same, dtype)


def test_two_param_groups_and_lr_schedule():
    assert_groups_and_lr_schedule_match_oracle(
        make_problem(steps=12), lambda problem, **kw: run_on(problem, "cuda", **kw))


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
def test_device_tensor_lr_matches_float_lr(lr_dtype):
    problem = make_problem(steps=5)
    a, _, _ = run_on(problem, "cuda", lr=torch.tensor(0.02, dtype=lr_dtype, device=DEV))
    b, _, _ = run_on(problem, "cuda", lr=0.02)
    assert_snaps_equal(a, b)


@pytest.mark.parametrize("eps", [1e-20, 1e-30])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiny_eps_with_zero_gradient_stays_finite(eps, dtype):
    # w = theta / eps^(2p) ~ 1e20..1e30: w^2 overflows float32; the RMS sums are float64.
    problem = make_problem(steps=10, zero_grad=(2, 4), dtype=dtype)
    fast, params, _ = run_on(problem, "cuda", lr=1e-2, eps=eps)
    for snap in fast:
        for t in snap.params + [x for x in snap.momentum + snap.fim if x is not None]:
            assert torch.isfinite(t).all()
    same = None if dtype == torch.float32 else run_optimizer(problem, "reference", lr=1e-2, eps=eps)[0]
    assert_trajectories_close(fast, run_oracle64(problem, lr=1e-2, eps=eps), same, dtype)
    if dtype == torch.float32:  # a 1e-5 relative decay per step is below a bf16 / fp16 ulp
        assert not torch.equal(params[2].detach().cpu(), problem.init[2])


# ---- determinism --------------------------------------------------------------------------------


def test_deterministic_bitwise():
    problem = make_problem(shapes=[(200_000,), (4097,), (3, 70_000), (65536,)], steps=4)
    a, _, _ = run_on(problem, "cuda", lr=1e-2)
    b, _, _ = run_on(problem, "cuda", lr=1e-2)
    assert_snaps_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_storage_gives_the_same_bits(dtype):
    # Params and grads one element into a buffer are not 16-byte aligned: the scalar path runs. It
    # visits the same elements in the same order per thread as the 128-bit path, so the float64
    # sums and every output are bitwise those of aligned storage.
    problem = make_problem(shapes=[(200_003,), (4097,), (1,)], steps=3, dtype=dtype)
    aligned, _, _ = run_on(problem, "cuda", lr=1e-2)

    def offset_param(t):
        buf = torch.zeros(t.numel() + 1, dtype=t.dtype, device=DEV)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return torch.nn.Parameter(view)

    params = [offset_param(t) for t in problem.init]
    assert all(p.data_ptr() % 16 != 0 for p in params)
    opt = FAdam(params, backend="cuda", lr=1e-2)
    snaps = []
    for row in problem.grads:
        for p, g in zip(params, row):
            buf = torch.zeros(g.numel() + 1, dtype=g.dtype, device=DEV)
            p.grad = buf[1:].view(g.shape).copy_(g)
        opt.step()
        snaps.append(_snapshot_cpu(params, opt.state))
    assert_snaps_equal(aligned, snaps)


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


# ---- parity with Triton and state_dict round trips ----------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_triton(dtype):
    problem = make_problem(shapes=[(0,), (1,), (4097,), (5, 123, 123), (200_000,)], dtype=dtype,
                           steps=8, no_grad=(1,))
    a, _, _ = run_on(problem, "cuda", lr=1e-2, clip=0.5)
    b, _, _ = run_on(problem, "triton", lr=1e-2, clip=0.5)
    ref64 = run_oracle64(problem, lr=1e-2, clip=0.5)
    # Both within the oracle tolerance, and close to each other (different reduction orders:
    # not bitwise).
    same = None if dtype == torch.float32 else run_optimizer(problem, "reference", lr=1e-2, clip=0.5)[0]
    assert_trajectories_close(a, ref64, same, dtype)
    assert_trajectories_close(b, ref64, same, dtype)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for sa, sb in zip(a, b):
        for x, y in zip(sa.params, sb.params):
            torch.testing.assert_close(x.double(), y.double(), **tol)


ROUND_TRIPS = [("cuda", "cpu"), ("cpu", "cuda"), ("cuda", "triton"), ("triton", "cuda"),
               ("cuda", "reference")]


@pytest.mark.parametrize("first, second", ROUND_TRIPS, ids=[f"{a}-to-{b}" for a, b in ROUND_TRIPS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trip(first, second, dtype):
    if "triton" in (first, second) and not _triton_ok():
        pytest.skip("Triton backend unavailable")
    problem = make_problem(shapes=[(4097,), (5, 123, 123), (70_000,), (3,)], dtype=dtype, steps=8,
                           no_grad=(3,))
    hyper = dict(lr=1e-2, clip=1.0)
    dev_of = lambda b: torch.device("cpu") if b == "cpu" else DEV  # noqa: E731
    snaps1, params1, opt1 = run_on(problem, first, device=dev_of(first), steps=4, **hyper)
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    dev2 = dev_of(second)
    saved = torch.load(buf, map_location="cpu" if dev2.type == "cpu" else None)
    params2 = [torch.nn.Parameter(p.detach().to(dev2, copy=True)) for p in params1]
    opt2 = FAdam(params2, backend=second, **hyper)
    opt2.load_state_dict(saved)
    for p in params2:
        if p in opt2.state:
            st = opt2.state[p]
            assert st["fim"].dtype == st["momentum"].dtype == torch.float32
            assert st["fim"].device == p.device and st["step"].device == p.device
    assert opt2.param_groups[0]["backend"] == second
    snaps2, _, _ = run_on(problem, second, device=dev2, params=params2, opt=opt2, start=4, steps=4)
    ref64 = run_oracle64(problem, **hyper)
    same = None if dtype == torch.float32 else run_optimizer(problem, "reference", **hyper)[0]
    assert_trajectories_close(snaps1 + snaps2, ref64, same, dtype)


# ---- CUDA graphs --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_capture_and_replay(dtype):
    # lr as a device tensor (changed between replays), steps on the device: the captured step
    # reads them at replay time. Replays must match eager steps bit for bit.
    problem = make_problem(shapes=[(4097,), (5, 123, 123), (200_000,), (1,)], dtype=dtype, steps=9)
    lrs = [1e-2 / (1 + k) for k in range(problem.steps)]

    def make():
        params = [torch.nn.Parameter(t.clone().to(DEV)) for t in problem.init]
        lr = torch.tensor(lrs[0], device=DEV)
        for p in params:
            p.grad = torch.zeros_like(p)
        return params, lr, FAdam(params, lr=lr, backend="cuda", clip=0.5)

    def set_step_inputs(params, lr, k):
        lr.fill_(lrs[k])
        for p, g in zip(params, problem.grads[k]):
            p.grad.copy_(g.to(DEV))

    # Eager reference.
    params_e, lr_e, opt_e = make()
    eager = []
    for k in range(problem.steps):
        set_step_inputs(params_e, lr_e, k)
        opt_e.step()
        eager.append(_snapshot_cpu(params_e, opt_e.state))

    # Warm up 3 steps on a side stream (state is created lazily), capture, replay the rest.
    params_g, lr_g, opt_g = make()
    graphed = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(3):
            set_step_inputs(params_g, lr_g, k)
            opt_g.step()
            graphed.append(_snapshot_cpu(params_g, opt_g.state))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for k in range(3, problem.steps):
        set_step_inputs(params_g, lr_g, k)
        graph.replay()
        graphed.append(_snapshot_cpu(params_g, opt_g.state))
    assert_snaps_equal(eager, graphed)


# ---- non-finite gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [0, 1, 2], ids=["multi-chunk", "one-chunk", "tiny"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_gradient_skips_the_step_bit_identically(bad, where, dtype):
    # 200003 = 3 * 65536 + 3395: the last chunk ends in a ragged fragment (3395 % 8 = 3).
    problem = make_problem(shapes=[(200_003,), (4097,), (3,)], dtype=dtype, steps=3)
    _, params, opt = run_on(problem, "cuda", lr=1e-2)
    before = _snapshot_cpu(params, opt.state)
    skipped_before = float(opt.skipped_steps)
    for i, p in enumerate(params):
        p.grad = torch.randn_like(p)
    params[where].grad.view(-1)[-1] = bad  # the last element: also the ragged tail path
    opt.step()
    assert_snaps_equal([before], [_snapshot_cpu(params, opt.state)])
    assert float(opt.skipped_steps) == skipped_before + 1
    # The next finite step proceeds normally.
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(params[0].detach().cpu(), before.params[0])
    assert float(opt.state[params[0]]["step"]) == before.step[0] + 1


def test_grad_scaler_matches_unscaled():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 5)).to(DEV)
    ref = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(32, 64, device=DEV), torch.randn(32, 5, device=DEV)
    # FAdam's ghat barely sees a gradient scale (g / (|g| + eps)), but w = theta / d does: with
    # weight_decay 0.1 and clipping off, a scale that were not divided out would shrink the
    # decay 4096x and move the parameters far beyond the tolerance.
    hyper = dict(lr=1e-2, weight_decay=0.1, clip=None, backend="cuda")
    opt = FAdam(model.parameters(), **hyper)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    ref_params = [torch.nn.Parameter(t.clone()) for t in ref]
    ref_opt = FAdam(ref_params, **hyper)
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        # The unscaled reference sees the same gradients, divided out in float32 beforehand.
        grads = [p.grad.detach() / scaler.get_scale() for p in model.parameters()]
        for rp, g in zip(ref_params, grads):
            rp.grad = g.clone()
        scaler.step(opt)
        scaler.update()
        ref_opt.step()
    for p, rp in zip(model.parameters(), ref_params):
        torch.testing.assert_close(p.detach(), rp.detach(), atol=1e-6, rtol=1e-5)


def test_grad_scaler_found_inf_skips():
    param = torch.nn.Parameter(torch.randn(1000, device=DEV))
    opt = FAdam([param], lr=1e-2, backend="cuda")
    param.grad = torch.randn_like(param)
    opt.step()
    before = param.detach().clone()
    state = {k: v.clone() for k, v in opt.state[param].items()}
    param.grad = torch.randn_like(param)
    opt.grad_scale = torch.tensor(1.0, device=DEV)  # what GradScaler.step sets
    opt.found_inf = torch.tensor(1.0, device=DEV)
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert float(opt.skipped_steps) == 1.0
    assert torch.equal(param.detach(), before)
    for k, v in state.items():
        assert torch.equal(opt.state[param][k], v)


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
