"""The C++ CPU ops (csrc/cpu/): opcheck, direct calls against the contract, and torch.compile."""

import math

import pytest
import torch

from fadam_fused import FAdam, reference
from fadam_testing import (SQUARE_FITS, SQUARE_OVERFLOWS, assert_trajectories_close, make_problem,
                           op_inputs, run_optimizer, run_oracle64)

CHUNK = 64  # a tiny chunk so a few hundred elements span several slots


def _group(dtype=torch.float32, shapes=((300,), (5, 7), (64,), (0,)), seed=0):
    params, grads, fims, moms, steps = op_inputs(dtype, shapes, seed)
    n_slots = sum(max(1, math.ceil(math.prod(s) / CHUNK)) for s in shapes)
    partials = torch.zeros(n_slots, 2, dtype=torch.float64)
    return params, grads, fims, moms, steps, partials


def _a_kwargs(fuse=True):
    return dict(beta2=0.999, eps=1e-8, p=0.5, clip=1.0, maximize=False, chunk_size=CHUNK,
                fuse_one_chunk=fuse)


def _b_kwargs(fuse=True):
    return dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, p=0.5, clip=1.0, weight_decay=1e-3,
                maximize=False, chunk_size=CHUNK, fuse_one_chunk=fuse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_opcheck_phase_a(dtype):
    params, grads, fims, _, steps, partials = _group(dtype)
    skip = torch.zeros(())
    torch.library.opcheck(torch.ops.fadam_fused.fadam_phase_a.default,
                          (params, grads, fims, steps, partials, skip, None), _a_kwargs(fuse=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_phase_b(dtype):
    params, grads, fims, moms, steps, partials = _group(dtype)
    skip = torch.zeros(())
    torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials, skip, None, **_a_kwargs())
    torch.library.opcheck(torch.ops.fadam_fused.fadam_phase_b.default,
                          (params, grads, fims, moms, steps, partials, skip, None, torch.tensor(1e-2)),
                          _b_kwargs())


def test_phase_a_partials_are_per_chunk_sums_of_the_oracle():
    params, grads, fims, _, steps, partials = _group(shapes=((300,), (5, 7)))
    skip = torch.zeros(())
    torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials, skip, None,
                                        **_a_kwargs(fuse=False))
    assert float(skip) == 0.0
    slot = 0
    for p, g, f, t in zip(params, grads, fims, steps):
        bhat = float(reference.b2hat(0.999, t))
        f_new = bhat * f.double() + (1 - bhat) * g.double() ** 2
        d = f_new.sqrt() + 1e-8
        ghat, w = (g.double() / d).flatten(), (p.double() / d).flatten()
        for c in range(max(1, math.ceil(p.numel() / CHUNK))):
            sl = slice(c * CHUNK, (c + 1) * CHUNK)
            torch.testing.assert_close(partials[slot], torch.stack([ghat[sl].square().sum(),
                                                                    w[sl].square().sum()]),
                                       rtol=1e-6, atol=0)
            slot += 1
    assert slot == partials.shape[0]


def _overflowing_group(fuse):
    # eps = 1e-30, f = 0 and g = 0 give d = 1e-30 and w = theta / d ~ 1e30: w^2 overflows float32.
    # Only a few elements do, in two of the 8 blocks of 128 elements (one AVX-512 block is 8
    # vectors of 16): the CPU kernel sums squares in float32 by blocks and sums a block whose
    # partial overflowed again in float64 (SumSq in csrc/cpu/fadam_cpu.cpp).
    params, grads, fims, moms, steps, _ = _group(shapes=((1000,), (7,)))
    for i in (130, 131, 700):
        grads[0][i], fims[0][i] = 0.0, 0.0
    partials = torch.zeros(3, 2, dtype=torch.float64)  # chunk 1000: one slot each, plus slack
    a = {**_a_kwargs(fuse), "eps": 1e-30, "chunk_size": 1000}
    b = {**_b_kwargs(fuse), "eps": 1e-30, "chunk_size": 1000}
    return (params, grads, fims, moms, steps, partials), a, b


def test_phase_a_sums_fall_back_to_float64_where_float32_overflows():
    (params, grads, fims, _, steps, partials), a, _ = _overflowing_group(fuse=False)
    skip = torch.zeros(())
    torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials[:2], skip, None, **a)
    assert float(skip) == 0.0
    for slot, (p, g, f, t) in enumerate(zip(params, grads, fims, steps)):
        bhat = float(reference.b2hat(0.999, t))
        d = (bhat * f.double() + (1 - bhat) * g.double() ** 2).sqrt() + 1e-30
        ghat, w = g.double() / d, p.double() / d
        expected = torch.stack([ghat.square().sum(), w.square().sum()])
        assert torch.isfinite(partials[slot]).all()
        torch.testing.assert_close(partials[slot], expected, rtol=1e-6, atol=0)
    assert partials[0, 1] > 1e58  # the overflowing squares are in


def test_fused_tensor_with_overflowing_squares_matches_unfused_bits():
    runs = []
    for fuse in (True, False):
        (params, grads, fims, moms, steps, partials), a, b = _overflowing_group(fuse)
        skip = torch.zeros(())
        torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials[:2], skip, None, **a)
        torch.ops.fadam_fused.fadam_phase_b(params, grads, fims, moms, steps, partials[:2], skip,
                                            None, None, **b)
        assert float(skip) == 0.0
        runs.append(params + fims + moms)
    for x, y in zip(*runs):
        assert torch.isfinite(x).all()
        assert torch.equal(x, y)


def test_one_chunk_tensors_leave_their_slot_to_phase_b():
    params, grads, fims, _, steps, partials = _group(shapes=((300,), (5, 7)))
    partials.fill_(-1.0)
    torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials, torch.zeros(()), None,
                                        **_a_kwargs(fuse=True))
    assert (partials[:5] >= 0).all()  # 300 elements: 5 chunk slots, written
    assert torch.equal(partials[5], torch.tensor([-1.0, -1.0], dtype=torch.float64))  # (5, 7): fused


@pytest.mark.parametrize("fuse", [True, False])
def test_clip_off_phase_a_writes_no_slot_and_still_checks_gradients(fuse):
    params, grads, fims, moms, steps, partials = _group()
    partials.fill_(-1.0)
    a, b = dict(_a_kwargs(fuse), clip=0.0), dict(_b_kwargs(fuse), clip=0.0)
    skip = torch.zeros(())
    torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials, skip, None, **a)
    assert float(skip) == 0.0 and (partials == -1.0).all()  # no slot read or written
    before = [t.clone() for t in params]
    torch.ops.fadam_fused.fadam_phase_b(params, grads, fims, moms, steps, partials, skip, None,
                                        None, **b)
    assert not torch.equal(params[0], before[0])
    grads[0][299] = float("nan")  # the last element of the last (ragged) chunk
    torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials, skip, None, **a)
    assert float(skip) == 1.0 and (partials == -1.0).all()


@pytest.mark.parametrize("lr_tensor", [torch.tensor(1, dtype=torch.int64), torch.tensor(0.1).half(),
                                       torch.tensor([0.1, 0.2])],
                         ids=["int64", "float16", "two-elements"])
def test_lr_tensor_must_be_one_float32_or_float64_element(lr_tensor):
    # The rule of the CUDA and Triton launchers too (describe() in csrc/op_boundary.h); the
    # optimizer converts other float dtypes before the call. A refused call changes nothing.
    params, grads, fims, moms, steps, partials = _group()
    before = [t.clone() for t in params + fims + moms]
    with pytest.raises(RuntimeError, match="lr_tensor must be a one-element float32 or float64"):
        torch.ops.fadam_fused.fadam_phase_b(params, grads, fims, moms, steps, partials,
                                            torch.zeros(()), None, lr_tensor, **_b_kwargs())
    for x, y in zip(before, params + fims + moms):
        assert torch.equal(x, y)


def test_phase_b_is_a_no_op_when_skip_is_set():
    params, grads, fims, moms, steps, partials = _group()
    before = [t.clone() for t in params + fims + moms]
    torch.ops.fadam_fused.fadam_phase_b(params, grads, fims, moms, steps, partials, torch.ones(()),
                                        None, None, **_b_kwargs())
    assert all(torch.equal(a, b) for a, b in zip(before, params + fims + moms))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p", [0.5, 0.75])
def test_fuse_one_chunk_does_not_change_bits(dtype, p):
    # A fused one-chunk tensor is reduced and updated in one task, with r = 1/d kept from the
    # reduction ([note: CPU fused one-chunk tensors]); unfused, phase A writes its slot and phase
    # B recomputes r. Same sums, same r, same products: the same bits. 64 = CHUNK exactly, 17 and
    # 33 leave ragged vector tails (8 or 16 float lanes).
    shapes = ((300,), (64,), (17,), (33,), (1,), (0,))
    runs = []
    for fuse in (True, False):
        params, grads, fims, moms, steps, partials = _group(dtype, shapes=shapes)
        skip = torch.zeros(())
        a = {**_a_kwargs(fuse), "p": p}
        b = {**_b_kwargs(fuse), "p": p}
        torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials, skip, None, **a)
        torch.ops.fadam_fused.fadam_phase_b(params, grads, fims, moms, steps, partials, skip, None,
                                            None, **b)
        assert float(skip) == 0.0
        runs.append(params + fims + moms)
    for x, y in zip(*runs):
        assert torch.equal(x.view(torch.uint8) if x.numel() else x,
                           y.view(torch.uint8) if y.numel() else y)


def test_phase_a_raises_skip_on_nonfinite_in_a_fused_one_chunk_tensor():
    params, grads, fims, _, steps, partials = _group(shapes=((300,), (5, 7)))
    grads[1][2, 3] = float("inf")
    skip = torch.zeros(())
    torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials, skip, None, **_a_kwargs())
    assert float(skip) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_phase_a_fused_check_finds_a_nonfinite_gradient_at_every_position(dtype):
    # The CPU kernel reads a one-chunk gradient as four quarters walked side by side plus a tail
    # of fewer than 4 vectors (check_chunk): a bad value in any quarter, on a quarter boundary or
    # in the tail must raise the flag, and a finite gradient must not.
    numels = (1, 17, 64, 100, 300, 1000)
    params, grads, fims, _, steps, _ = _group(dtype, shapes=tuple((n,) for n in numels))
    partials = torch.zeros(len(numels), 2, dtype=torch.float64)
    kwargs = {**_a_kwargs(), "chunk_size": 4096}  # every tensor is one fused chunk

    def flag():
        skip = torch.zeros(())
        torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials, skip, None, **kwargs)
        return float(skip)

    assert flag() == 0.0
    bads = (float("nan"), float("inf"), -float("inf"))
    for t, n in enumerate(numels):
        for i in range(n):
            saved = grads[t][i].clone()
            grads[t][i] = bads[i % 3]
            assert flag() == 1.0, f"numel {n}, element {i}"
            grads[t][i] = saved
    assert flag() == 0.0


@pytest.mark.parametrize("clip", [1.0, 0.0], ids=["clip", "clip-off"])
@pytest.mark.parametrize("where", [(0, 257), (1, (4, 6))], ids=["multi-chunk", "one-chunk-fused"])
@pytest.mark.parametrize("case", SQUARE_OVERFLOWS, ids=[c[0] for c in SQUARE_OVERFLOWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_whose_square_overflows_skips_the_step(dtype, case, where, clip):
    # A finite g whose g * g is inf would make f inf and freeze the element (d = inf, ghat = 0
    # forever): phase A raises the skip flag, from the reduction (multi-chunk tensor, clip on)
    # or the gradient-only check (a fused one-chunk tensor, or clipping off), and phase B writes
    # nothing. 300 elements are 5 chunks of 64 (the last ragged); (5, 7) is one fused chunk.
    _, g, scale = case
    params, grads, fims, moms, steps, partials = _group(dtype, shapes=((300,), (5, 7)))
    grad_scale = None
    if scale is not None:  # the gradients as GradScaler leaves them: scaled by `scale`
        grads = [x * scale for x in grads]
        grad_scale = torch.tensor(scale)
    grads[where[0]][where[1]] = g
    before = [t.clone() for t in params + fims + moms]
    skip = torch.zeros(())
    a, b = dict(_a_kwargs(), clip=clip), dict(_b_kwargs(), clip=clip)
    torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials, skip, grad_scale, **a)
    assert float(skip) == 1.0
    torch.ops.fadam_fused.fadam_phase_b(params, grads, fims, moms, steps, partials, skip,
                                        grad_scale, None, **b)
    assert all(torch.equal(x, y) for x, y in zip(before, params + fims + moms))


@pytest.mark.parametrize("g", SQUARE_FITS)
def test_gradient_with_a_finite_square_is_not_skipped_and_matches_the_oracle(g, cpu_chunk):
    # g * g = 1e38 or 3.24e38 fits float32: the step runs, in a multi-chunk tensor (300 elements,
    # chunk 64) and a fused one-chunk tensor, and follows the float64 oracle.
    cpu_chunk(CHUNK)
    problem = make_problem(shapes=[(300,), (5, 7)], steps=4)
    problem.grads[1][0][123] = g
    problem.grads[1][1][2, 3] = -g
    fast, _, opt = run_optimizer(problem, "cpu", lr=1e-2)
    assert float(opt.skipped_steps) == 0.0
    assert_trajectories_close(fast, run_oracle64(problem, lr=1e-2))


def test_op_checks_name_the_bad_argument():
    params, grads, fims, moms, steps, partials = _group()
    with pytest.raises(RuntimeError, match=r"partials must have 8 rows"):
        torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials[:3], torch.zeros(()),
                                            None, **_a_kwargs())
    fims[1] = fims[1].double()
    with pytest.raises(RuntimeError, match=r"fims\[1\] must be a Float tensor"):
        torch.ops.fadam_fused.fadam_phase_a(params, grads, fims, steps, partials, torch.zeros(()),
                                            None, **_a_kwargs())


def _train_step_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    return model, x, y


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph_training_step(backend):
    # Dynamo cannot put loss.backward() and an optimizer step in one graph for any optimizer
    # ("pending mutation on parameter"), so a training step compiles as torch's tutorial does
    # it: the forward + loss as one fullgraph region, opt.step() as another.
    torch._dynamo.reset()
    eager_model, x, y = _train_step_problem()
    compiled_model, _, _ = _train_step_problem()
    eager_opt = FAdam(eager_model.parameters(), lr=1e-2, backend=backend)
    compiled_opt = FAdam(compiled_model.parameters(), lr=1e-2, backend=backend)
    loss_fn = lambda model: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
    compiled_loss = torch.compile(loss_fn, fullgraph=True)
    compiled_step = torch.compile(compiled_opt.step, fullgraph=True)
    for _ in range(4):
        compiled_opt.zero_grad()
        compiled_loss(compiled_model).backward()
        # The compiled backward rounds gradients differently from the eager one (seen: 3e-8),
        # and FAdam's first steps amplify that where g is near 0 (ghat = g / (|g| + eps)): both
        # optimizers get the compiled gradients, so the comparison is of the steps alone.
        for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
            p.grad = q.grad.clone()
        eager_opt.step()
        compiled_step()
    # The fused op is opaque to Inductor: the same bits. Inductor fuses and reorders the
    # reference's float32 math (seen: 2e-6 after 4 steps): a looser tolerance there.
    tol = dict(atol=0, rtol=0) if backend == "cpu" else dict(atol=1e-5, rtol=1e-4)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p, q, **tol)
        for key in ("momentum", "fim", "step"):
            torch.testing.assert_close(eager_opt.state[p][key], compiled_opt.state[q][key], **tol)


def test_compiled_step_with_a_tensor_lr_compiles_once_across_lr_values():
    # A float lr is a constant of the compiled graph (every new value recompiles, and dynamo
    # gives up after 8); a 0-dim tensor lr, changed in place as schedulers do, is an input.
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.randn(64))
    opt = FAdam([p], lr=torch.tensor(1e-2), backend="cpu")
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    reference_p = p.detach().clone()
    ref_opt_p = torch.nn.Parameter(reference_p)
    ref_opt = FAdam([ref_opt_p], lr=1e-2, backend="cpu")
    for k in range(12):
        lr = 1e-2 / (k + 1)
        opt.param_groups[0]["lr"].fill_(lr)
        ref_opt.param_groups[0]["lr"] = lr
        p.grad = torch.full((64,), 0.1 * (k + 1))
        ref_opt_p.grad = p.grad.clone()
        step()
        ref_opt.step()
    assert counter.frame_count == 1
    assert torch.equal(p.detach(), ref_opt_p.detach())
