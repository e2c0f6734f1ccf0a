"""Scenarios written once and run for every (optimizer, backend) pair of tests/conftest.py: FAdam
and FAdafactor, each on cpu, reference, the Triton kernels (interpreted on CPU tensors, compiled
on a GPU) and the CUDA kernels (emulated on CPU tensors, or on a GPU: those pairs are marked
pytest.mark.gpu, so `make gpu-check` runs this file).

Each scenario takes its problem from the optimizer's sizes in tests/fadam_testing.py at the
backend's size class, and compares against the optimizer's float64 oracle with the tolerances of
tests/fadam_testing.py (float32: 1e-6 + 1e-5 |ref|; bfloat16 / float16: flash-attention's rule
against the same-precision reference backend). What one backend alone has (op-level calls,
launch counts, compilation, emulation details, table lifetimes, thread counts) stays in its own
file.
"""

from __future__ import annotations

import collections
import copy
import io
import math

import pytest
import torch

from fadam_fused import backends
from fadam_fused.op_contract import smallest_safe_eps
from conftest import CPU, backend_ops
from fadam_testing import (SQUARE_FITS, SQUARE_OVERFLOWS, _close, assert_same_bits,
                           assert_trajectories_close, make_problem, overflow_problem, snapshot)

# numpy, inside Triton's interpreter, warns about the NaN / inf fed in on purpose and about
# log2(0) on the pow path.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# ---- expected trajectories, shared by the backends of one size class ---------------------------

_CACHE: collections.OrderedDict = collections.OrderedDict()


def _cached(key, make):
    """make(), kept for the next few tests: the backends of one size class run the same problem
    one after the other (conftest's parametrization varies the backend fastest), so the float64
    oracle and the same-precision reference are computed once for them."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = _CACHE[key] = make()
    while len(_CACHE) > 8:
        _CACHE.popitem(last=False)
    return value


def expected(optimizer, backend, key, problem, dtype=torch.float32, **kw):
    """The float64 oracle trajectory of `problem` and, below float32, the same-precision
    reference one (on the CPU). `key` names the problem and `kw` among the optimizer's problems
    at the backend's size class."""
    key = (optimizer.id, backend.size, str(dtype), key)
    ref64 = _cached(key + ("oracle",), lambda: optimizer.oracle(problem, **kw))
    same = None
    if dtype != torch.float32:
        same = _cached(key + ("same",), lambda: optimizer.run(problem, "reference", **kw)[0])
    return ref64, same


def run(optimizer, backend, problem, **kw):
    return optimizer.run(problem, backend.name, device=backend.device, **kw)


def check(optimizer, backend, key, problem, dtype=torch.float32, **kw):
    """`problem` on the pair against the oracle, every step, the full state."""
    fast, params, opt = run(optimizer, backend, problem, **kw)
    ref64, same = expected(optimizer, backend, key, problem, dtype, **kw)
    assert_trajectories_close(fast, ref64, same, dtype)
    return fast, params, opt


def skip_low_precision_on_reference(backend, dtype):
    if backend.name == "reference" and dtype != torch.float32:
        pytest.skip("below float32 the rule compares against the reference backend itself")


def sizes_of(optimizer, backend):
    return optimizer.sizes[backend.size]


def _same_bits(a, b) -> bool:
    """Bitwise equality, NaN included (torch.equal says NaN != NaN)."""
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _halves(n):
    """Two param groups: the even and the odd tensors."""
    return list(range(0, n, 2)), list(range(1, n, 2))


# ---- parity with the float64 oracle ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_oracle(optimizer, optimizer_case, backend, dtype):
    """The optimizer's cases (tests/fadam_testing.py: hyperparameters, tensors without a
    gradient, several chunks) against the oracle over many steps, the full state."""
    skip_low_precision_on_reference(backend, dtype)
    name, hyper, kind = optimizer_case
    sizes = sizes_of(optimizer, backend)
    shapes = sizes.shapes
    if kind == "multi":
        chunk = backend.use_multi_chunk()
        if chunk is not None:
            assert backend_ops(backend.name, optimizer.factored).chunk_size == chunk
        shapes = sizes.multi
    problem = make_problem(shapes=shapes, steps=sizes.steps, dtype=dtype,
                           no_grad=sizes.no_grad if kind == "no-grad" else ())
    check(optimizer, backend, name, problem, dtype, **hyper)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_gradients_with_tiny_eps_stay_finite_and_match_oracle(optimizer, backend, dtype):
    """Zero gradients with eps = 1e-20 or 1e-30 (FAdafactor: 1e-8 and 1e-30, with a gradient row
    of zeros, R_i = 0, an all-zero gradient, sum R = 0, and an embedding whose rows mostly get no
    gradient): w = theta / eps^(2p) ~ 1e30, w^2 overflows float32, so the RMS sums are float64;
    f = 0 gives no NaN. At the multi-chunk size: the sums come from several slots."""
    skip_low_precision_on_reference(backend, dtype)
    backend.use_multi_chunk()
    for index, problem in enumerate(sizes_of(optimizer, backend).edges(dtype)):
        for eps in optimizer.tiny_eps:
            fast, params, _ = check(optimizer, backend, f"edges-{index}-{eps}", problem, dtype,
                                    lr=1e-2, eps=eps)
            ref64, _ = expected(optimizer, backend, f"edges-{index}-{eps}", problem, dtype,
                                lr=1e-2, eps=eps)
            for snap in fast + ref64:
                for t in snap["params"] + [v for st in snap["state"] for k, v in st.items()
                                           if k != "step"]:
                    assert torch.isfinite(t).all()
            if dtype != torch.float32:
                continue  # a 1e-5 relative decay per step is below a bf16 / fp16 ulp
            # With clipping the decay step of a zero-gradient tensor is lr wd w / RMS(w): bounded
            # and not 0.
            for i, init in enumerate(problem.init):
                if init.numel() and all(not row[i].any() for row in problem.grads):
                    assert not torch.equal(params[i].detach().cpu(), init), f"tensor {i}"


def _lr_decay(k, lr):
    return lr / (1 + k)


def test_two_param_groups_and_lr_schedule(optimizer, backend):
    """Two groups with their own lr, clip, p and weight decay; then the same groups with each
    lr changed before every step."""
    sizes = sizes_of(optimizer, backend)
    problem = make_problem(shapes=sizes.shapes, steps=sizes.steps)
    even, odd = _halves(len(sizes.shapes))
    groups = [(even, {"lr": 3e-2, "clip": 2.0}), (odd, {"weight_decay": 0.0, "p": 0.75})]
    check(optimizer, backend, "groups", problem, groups=groups)
    check(optimizer, backend, "groups-schedule", problem, groups=groups, lr_schedule=_lr_decay,
          lr=1e-2)


# ---- non-finite values -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nonfinite_gradient_skips_the_whole_step(optimizer, backend, dtype):
    """A NaN, inf or -inf in the last element (the ragged tail) of one gradient, in a tensor done
    in phase-A slots, one done in phase B alone, or a tiny one, in either of two groups: the whole
    step is skipped, parameters and every state tensor stay bit-identical, the skip is counted
    and the gradients are not written; the next finite step counts from the old step. A skipped
    step changes nothing, so the nine spoiled steps follow each other on one optimizer."""
    backend.use_multi_chunk()
    sizes = sizes_of(optimizer, backend)
    problem = make_problem(shapes=sizes.multi, steps=3, dtype=dtype)
    even, odd = _halves(len(sizes.multi))
    groups = [(odd, {"lr": 0.1}), (even, {})]
    _, params, opt = run(optimizer, backend, problem, groups=groups, steps=2, lr=1e-2)
    before = snapshot(params, opt.state)
    gen = torch.Generator().manual_seed(5)
    skips = 0
    for where in ("multi-chunk", "one-chunk", "tiny"):
        for bad in (float("nan"), float("inf"), -float("inf")):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
            params[sizes.where[where]].grad.view(-1)[-1] = bad
            grads = [p.grad.clone() for p in params]
            opt.step()
            skips += 1
            assert_same_bits(before, snapshot(params, opt.state))
            assert float(opt.skipped_steps) == skips, (where, bad)
            assert all(_same_bits(g, p.grad) for g, p in zip(grads, params)), (where, bad)
    for p, g in zip(params, problem.grads[2]):
        p.grad = g.to(p.device, copy=True)
    opt.step()
    after = snapshot(params, opt.state)
    assert not torch.equal(after["params"][0], before["params"][0])
    assert [st["step"] for st in after["state"]] == [st["step"] + 1 for st in before["state"]]
    assert float(opt.skipped_steps) == skips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_parameter_stays_in_its_element(optimizer, backend, bad, dtype):
    """A NaN or inf in a parameter (not its gradient) does not skip the step: its tensor's RMS(w)
    counts as infinite, so that tensor's clipped weight decay is 0 (every step it holds the NaN:
    its steps are those without weight decay) and the NaN stays in its own element, as the
    oracle does (docs/design.md, section 6). In a multi-chunk tensor (in its last chunk's slot)
    and a one-chunk one; the other tensors step as usual."""
    skip_low_precision_on_reference(backend, dtype)
    backend.use_multi_chunk()
    sizes = sizes_of(optimizer, backend)
    problem = make_problem(shapes=sizes.multi, steps=3, dtype=dtype)
    spoiled = {sizes.where["multi-chunk"]: -5, sizes.where["one-chunk"]: 7}
    for i, at in spoiled.items():
        problem.init[i].view(-1)[at] = bad
    hyper = dict(lr=1e-2, clip=0.5, weight_decay=0.5)
    fast, _, opt = run(optimizer, backend, problem, **hyper)
    assert float(opt.skipped_steps) == 0.0
    ref64 = optimizer.oracle(problem, **hyper)
    no_decay = optimizer.oracle(problem, **{**hyper, "weight_decay": 0.0})
    same = None if dtype == torch.float32 else optimizer.run(problem, "reference", **hyper)[0]
    for k, (a, r, z) in enumerate(zip(fast, ref64, no_decay)):
        for i in spoiled:
            nan = a["params"][i].isnan()
            assert torch.equal(nan, r["params"][i].isnan()), f"step {k + 1}: NaN elsewhere"
            assert int(nan.sum()) == 1, f"step {k + 1}: {int(nan.sum())} NaN in tensor {i}"
            _close(f"step {k + 1} tensor {i} (as without weight decay)", a["params"][i][~nan],
                   z["params"][i][~nan], same[k]["params"][i][~nan] if same else None, dtype,
                   state=False)
            for snaps in (a, r) + ((same[k],) if same else ()):
                snaps["params"][i] = snaps["params"][i].nan_to_num(0.0)
    assert_trajectories_close(fast, ref64, same, dtype)


# ---- the overflow rule (docs/design.md, section 6) ----------------------------------------------


def _first_step(optimizer, backend, init, grads, grad_scale):
    params = [torch.nn.Parameter(t.to(backend.device, copy=True)) for t in init]
    opt = optimizer.cls(params, lr=1e-2, backend=backend.name)
    for p, g in zip(params, grads):
        p.grad = g.to(backend.device, copy=True)
    if grad_scale is not None:  # as GradScaler.step sets them
        opt.grad_scale = torch.tensor(grad_scale, device=backend.device)
        opt.found_inf = torch.tensor(0.0, device=backend.device)
    opt.step()
    return params, opt


def assert_first_step_skipped_like_nan(optimizer, backend, problem, grad_scale=None):
    """The first step of `problem` (finite gradients that overflow float32) is skipped exactly as
    one with a NaN gradient: parameters unchanged, every state tensor bit-identical to that
    run's, the skip counted; the next step runs and leaves everything finite."""
    params, opt = _first_step(optimizer, backend, problem.init, problem.grads[0], grad_scale)
    nan_grads = [g.clone() for g in problem.grads[0]]
    nan_grads[-1].view(-1)[0] = float("nan")
    nan_params, nan_opt = _first_step(optimizer, backend, problem.init, nan_grads, grad_scale)
    assert float(opt.skipped_steps) == 1.0
    assert_same_bits(snapshot(nan_params, nan_opt.state), snapshot(params, opt.state))
    assert all(torch.equal(p.detach().cpu(), t) for p, t in zip(params, problem.init))
    if grad_scale is not None:
        del opt.grad_scale, opt.found_inf
    for p, g in zip(params, problem.grads[1]):
        p.grad = g.to(backend.device, copy=True)
    opt.step()
    assert float(opt.skipped_steps) == 1.0
    for p in params:
        assert float(opt.state[p]["step"]) == 1.0
        assert torch.isfinite(p.detach()).all()
        assert all(torch.isfinite(v).all() for v in opt.state[p].values())


@pytest.mark.parametrize("where", ["multi-chunk", "one-chunk"])
@pytest.mark.parametrize("case", SQUARE_OVERFLOWS, ids=[c[0] for c in SQUARE_OVERFLOWS])
def test_gradient_whose_square_overflows_skips_the_step_like_nan(optimizer, backend, case,
                                                                  where):
    """A finite gradient g (divided by GradScaler's scale) whose float32 g * g is inf would make
    f inf and freeze its element (FAdafactor: R and C, then every element of the matrix, NaN):
    the step is skipped as for a NaN, whether g sits in a tensor done in phase-A slots or in a
    fused one-chunk one."""
    backend.use_multi_chunk()
    sizes = sizes_of(optimizer, backend)
    _, g, scale = case
    problem = make_problem(shapes=sizes.multi, steps=2)
    if scale is not None:  # the gradients as GradScaler leaves them: scaled by `scale`
        problem.grads[0] = [x * scale for x in problem.grads[0]]
    spoiled = problem.grads[0][sizes.where[where]].view(-1)
    spoiled[len(spoiled) // 2] = g
    assert_first_step_skipped_like_nan(optimizer, backend, problem, grad_scale=scale)


def test_overflowing_row_or_column_sums_skip_the_step_like_nan(optimizer, backend,
                                                               optimizer_overflow):
    """Finite gradients whose g^2, row sums R or column sums C overflow float32 would turn every
    parameter, momentum, R and C into NaN: phase S skips the step as for a NaN. At the chunk of
    64 (interpreter, emulator) (6, 9) is 2 tiles and (200, 2) 7, whose partial sums all fit: only
    the combined sums overflow."""
    backend.use_multi_chunk()
    _, shape, value, one_element = optimizer_overflow
    assert_first_step_skipped_like_nan(optimizer, backend,
                                       overflow_problem(shape, value, one_element))


def test_a_square_that_overflows_skips_a_later_step_whose_sums_stay_finite(optimizer, backend):
    """One element of 2e19 (square 4e38: inf in float32) at step 3, where FAdafactor's
    (1 - b2hat) = 0.33 keeps its new row sum (about 1.3e38) finite: the element rule alone skips
    the step, leaving parameters and every state tensor bit-identical."""
    problem = make_problem(shapes=[(6, 9), (4,)], steps=2)
    _, params, opt = run(optimizer, backend, problem, lr=1e-2)
    before = snapshot(params, opt.state)
    gen = torch.Generator().manual_seed(3)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)
    params[0].grad[2, 5] = 2e19
    opt.step()
    assert_same_bits(before, snapshot(params, opt.state))
    assert float(opt.skipped_steps) == 1.0


@pytest.mark.parametrize("g", SQUARE_FITS)
def test_gradient_with_a_finite_square_is_not_skipped_and_matches_the_oracle(optimizer, backend,
                                                                             g):
    """g * g = 1e38 or 3.24e38 fits float32: the step runs, with g in a tensor done in phase-A
    slots and -g in a fused one-chunk one, and follows the float64 oracle."""
    backend.use_multi_chunk()
    sizes = sizes_of(optimizer, backend)
    problem = make_problem(shapes=sizes.multi, steps=4)
    multi = problem.grads[1][sizes.where["multi-chunk"]].view(-1)
    multi[len(multi) // 2] = g
    problem.grads[1][sizes.where["one-chunk"]].view(-1)[-1] = -g
    fast, _, opt = run(optimizer, backend, problem, lr=1e-2)
    assert float(opt.skipped_steps) == 0.0
    assert_trajectories_close(fast, optimizer.oracle(problem, lr=1e-2))


def test_row_and_column_sums_just_under_the_overflow_are_not_skipped(optimizer, backend,
                                                                     optimizer_fit):
    backend.use_multi_chunk()  # as the overflowing cases
    _, shape, value, one_element = optimizer_fit
    problem = overflow_problem(shape, value, one_element)
    fast, _, opt = run(optimizer, backend, problem, lr=1e-2)
    assert float(opt.skipped_steps) == 0.0
    assert_trajectories_close(fast, optimizer.oracle(problem, lr=1e-2))


# ---- GradScaler --------------------------------------------------------------------------------


def test_grad_scale_and_found_inf_as_gradscaler_sets_them(optimizer, backend):
    """GradScaler.step sets `grad_scale` and `found_inf` instead of unscaling the gradients: the
    scale is divided out in registers, so scaled steps are the unscaled ones bit for bit and
    the gradients keep their scale. With weight decay and clipping off, a scale that were not
    divided out would shrink the decay 4096x. found_inf skips the whole step and counts it."""
    sizes = sizes_of(optimizer, backend)
    problem = make_problem(shapes=sizes.shapes, steps=3)
    hyper = dict(lr=1e-2, weight_decay=0.1, clip=None)
    plain = check(optimizer, backend, "gradscaler", problem, **hyper)[0]
    params = [torch.nn.Parameter(t.to(backend.device, copy=True)) for t in problem.init]
    opt = optimizer.cls(params, backend=backend.name, **hyper)
    scaled = []
    for row in problem.grads:
        for p, g in zip(params, row):
            p.grad = g.to(backend.device) * 4096.0
        opt.grad_scale = torch.tensor(4096.0, device=backend.device)
        opt.found_inf = torch.tensor(0.0, device=backend.device)
        opt.step()
        scaled.append(snapshot(params, opt.state))
        assert all(torch.equal(p.grad.cpu(), g * 4096.0) for p, g in zip(params, row))
    assert_same_bits(plain, scaled)
    assert float(opt.skipped_steps) == 0.0
    opt.found_inf = torch.tensor([1.0], device=backend.device)
    opt.step()
    assert_same_bits(scaled[-1], snapshot(params, opt.state))
    assert float(opt.skipped_steps) == 1.0


def test_grad_scaler_end_to_end(optimizer, backend):
    """torch.amp.GradScaler drives the optimizer: its steps match an unscaled optimizer given the
    same gradients divided by the scale, and an inf loss skips the step and halves the scale."""
    torch.manual_seed(0)
    device = backend.device
    model = torch.nn.Sequential(torch.nn.Linear(16, 40), torch.nn.ReLU(),
                                torch.nn.Linear(40, 5)).to(device)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    x, y = torch.randn(32, 16, device=device), torch.randn(32, 5, device=device)
    hyper = dict(lr=1e-2, weight_decay=0.1, clip=None, backend=backend.name)
    opt = optimizer.cls(model.parameters(), **hyper)
    ref_opt = optimizer.cls(ref_params, **hyper)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    for _ in range(5):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        for rp, p in zip(ref_params, model.parameters()):
            rp.grad = p.grad.detach() / scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        ref_opt.step()
    for p, rp in zip(model.parameters(), ref_params):
        torch.testing.assert_close(p.detach(), rp.detach(), atol=1e-6, rtol=1e-5)
    opt.zero_grad()
    scaler.scale(model(x * float("inf")).sum()).backward()
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert scaler.get_scale() == scale / 2
    assert float(opt.skipped_steps) == 1.0


# ---- checkpoints -------------------------------------------------------------------------------


def _partners(backend):
    """The (backend, device) pairs a checkpoint of `backend` moves to and from: the reference on
    the same device, the CPU kernels, and on a GPU the other GPU backend."""
    out = [("reference", backend.device), ("cpu", CPU)]
    if backend.gpu:
        other = "triton" if backend.name == "cuda" else "cuda"
        if backends.unavailable_reason(other, backend.device) is None:
            out.append((other, backend.device))
    return [(n, d) for n, d in out if (n, d) != (backend.name, backend.device)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("direction", ["to", "from"])
def test_state_dict_moves_between_backends(optimizer, backend, direction, dtype):
    """Half a run on one backend, its parameters and state_dict through torch.save / torch.load
    (onto the other backend's device), the other half on a fresh optimizer of the other backend:
    the whole trajectory matches the oracle. The loading optimizer keeps its own backend, and
    the state stays float32 (not rounded to a bfloat16 parameter's dtype) on the parameter's
    device."""
    sizes = sizes_of(optimizer, backend)
    problem = make_problem(shapes=sizes.shapes, steps=sizes.steps, dtype=dtype,
                           no_grad=sizes.no_grad[:1])
    ref64, same = expected(optimizer, backend, "moves", problem, dtype, lr=1e-2)
    half = problem.steps // 2
    for other in _partners(backend):
        first, second = ((backend.name, backend.device), other)
        if direction == "from":
            first, second = second, first
        snaps1, params1, opt1 = optimizer.run(problem, first[0], device=first[1], steps=half,
                                              lr=1e-2)
        buf = io.BytesIO()
        torch.save({"params": [p.detach() for p in params1], "opt": opt1.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, map_location=second[1])
        params2 = [torch.nn.Parameter(t) for t in saved["params"]]
        opt2 = optimizer.cls(params2, lr=1e-2, backend=second[0])
        opt2.load_state_dict(saved["opt"])
        assert opt2.param_groups[0]["backend"] == second[0]
        for p in params2:
            for key, value in opt2.state.get(p, {}).items():
                assert value.dtype == torch.float32 and value.device == p.device, key
                assert key != "step" or value.dim() == 0
        snaps2, _, _ = optimizer.run(problem, second[0], device=second[1], params=params2,
                                     opt=opt2, start=half, steps=problem.steps - half)
        assert_trajectories_close(snaps1 + snaps2, ref64, same, dtype)


# ---- bitwise properties ------------------------------------------------------------------------


def test_tensor_lr_matches_float_lr_bitwise(optimizer, backend):
    """lr as a tensor (0-dim, or of shape (1,) as torch.optim takes it; float32 or float64) steps
    as the float lr, bit for bit: the kernels read a float32 or float64 lr and round it as they
    round a float one; a bfloat16 lr (2^-6, exact) is converted on the device. A 0-dim parameter
    is not broadcast to the lr's shape (1,)."""
    sizes = sizes_of(optimizer, backend)
    problem = make_problem(shapes=sizes.shapes + [()], steps=3)
    for lr, dtypes in ((0.02, (torch.float32, torch.float64)), (2.0**-6, (torch.bfloat16,))):
        plain, _, _ = run(optimizer, backend, problem, lr=lr)
        for dtype in dtypes:
            for shape in ((), (1,)):
                tensor_lr = torch.full(shape, lr, dtype=dtype, device=backend.device)
                snaps, params, _ = run(optimizer, backend, problem, lr=tensor_lr)
                assert params[-1].shape == ()
                assert_same_bits(plain, snaps)


def test_deterministic_bitwise(optimizer, backend):
    """The same inputs give the same bits (fixed reduction trees, slots summed in slot order,
    no atomics), at the multi-chunk size."""
    backend.use_multi_chunk()
    problem = make_problem(shapes=sizes_of(optimizer, backend).multi, steps=3)
    assert_same_bits(run(optimizer, backend, problem, lr=1e-2)[0],
                     run(optimizer, backend, problem, lr=1e-2)[0])


def test_gradient_in_another_layout_gives_the_same_step(optimizer, backend):
    """torch's .grad setter accepts a gradient whose strides differ from the parameter's; the
    fused kernels get a copy in the parameter's layout: the same bits. The step counter must not
    move on an error either (it used to be incremented before the kernel refused the strides)."""
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(40, 33, generator=gen).to(backend.device)
    grads = [torch.randn(40, 33, generator=gen).to(backend.device) for _ in range(3)]
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    oa = optimizer.cls([a], lr=1e-2, backend=backend.name)
    ob = optimizer.cls([b], lr=1e-2, backend=backend.name)
    for g in grads:
        a.grad = g.clone()
        b.grad = g.t().contiguous().t()  # same values, column-major strides
        assert b.grad.stride() != b.stride()
        oa.step()
        ob.step()
    assert_same_bits(snapshot([a], oa.state), snapshot([b], ob.state))


# ---- errors: raised before anything changes ----------------------------------------------------


def _full_state(opt, params):
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [v.clone() for v in opt.state[p].values()]
    return out


def _bad_grad_cases():
    # torch's `.grad` setter refuses a misfit gradient, but `.grad.data = ...` (or swapping
    # `param.data` after backward) gets one through; the optimizer must catch it before any
    # update.
    def via_data(make):
        def spoil(p):
            p.grad = torch.zeros_like(p)
            p.grad.data = make(p)
        return spoil

    def sparse(p):
        p.grad = torch.zeros(p.shape, device=p.device).to_sparse()

    yield "sparse", sparse, "sparse gradients"
    yield ("shape", via_data(lambda p: torch.zeros(3, device=p.device)),
           r"has shape \(3,\) but the parameter has shape \(4, 4\)")
    yield ("dtype", via_data(lambda p: torch.zeros(4, 4, dtype=torch.float64, device=p.device)),
           "is torch.float64 but the parameter is torch.float32")


@pytest.mark.parametrize("case", list(_bad_grad_cases()), ids=lambda c: c[0])
def test_bad_gradient_raises_by_name_and_changes_nothing(optimizer, backend, case):
    _, spoil, match = case
    gen = torch.Generator().manual_seed(1)
    good = torch.nn.Parameter(torch.randn(5, generator=gen).to(backend.device))
    bad = torch.nn.Parameter(torch.randn(4, 4, generator=gen).to(backend.device))
    opt = optimizer.cls([("encoder.weight", good), ("decoder.weight", bad)], backend=backend.name)
    good.grad, bad.grad = torch.randn_like(good), torch.randn_like(bad)
    opt.step()
    before = _full_state(opt, [good, bad])
    good.grad = torch.randn_like(good)
    spoil(bad)
    with pytest.raises(RuntimeError, match=match) as info:
        opt.step()
    assert "decoder.weight" in str(info.value)
    assert all(torch.equal(x, y) for x, y in zip(before, _full_state(opt, [good, bad])))


def _spoil_lr_meta(opt, params):
    opt.param_groups[1]["lr"] = torch.tensor(0.1, device="meta")
    return ValueError, "meta device"


def _spoil_lr_shape(opt, params):
    opt.param_groups[1]["lr"] = torch.tensor([0.1, 0.2], device=params[1].device)
    return ValueError, r"1-element, got shape \(2,\)"


def _spoil_maximize(opt, params):
    opt.param_groups[1]["maximize"] = "yes"
    return ValueError, "Invalid maximize value: 'yes'"


def _spoil_expanded(opt, params):
    params[1].data = torch.zeros(4, 1, device=params[1].device).expand(4, 4)
    params[1].grad = torch.ones(4, 4, device=params[1].device)
    return RuntimeError, r"parameter 0 of its param group \(shape \(4, 4\)\).*share memory"


def _spoil_reshaped(opt, params):
    params[1].data = torch.zeros(8, 2, device=params[1].device)
    params[1].grad = torch.ones(8, 2, device=params[1].device)
    return RuntimeError, r"'momentum' of parameter 0 .* has shape \(4, 4\) but the parameter now"


@pytest.mark.parametrize("spoil", [_spoil_lr_meta, _spoil_lr_shape, _spoil_maximize,
                                   _spoil_expanded, _spoil_reshaped],
                         ids=lambda f: f.__name__[len("_spoil_"):])
def test_error_in_a_later_group_changes_nothing_in_any_group(optimizer, backend, spoil):
    """The error belongs to the second group: the first group, the step counters and the state
    of both are untouched (validation runs over every group before the first write)."""
    gen = torch.Generator().manual_seed(3)
    first = torch.nn.Parameter(torch.randn(6, generator=gen).to(backend.device))
    second = torch.nn.Parameter(torch.randn(4, 4, generator=gen).to(backend.device))
    params = [first, second]
    opt = optimizer.cls([{"params": [first]}, {"params": [second], "lr": 0.1}],
                        backend=backend.name)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(backend.device)
    opt.step()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(backend.device)
    before = [t.clone() for t in [first.detach()] + list(opt.state[first].values())]
    steps = [opt.state[p]["step"].clone() for p in params]
    error, match = spoil(opt, params)
    with pytest.raises(error, match=match):
        opt.step()
    after = [first.detach()] + list(opt.state[first].values())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(opt.state[p]["step"], s) for p, s in zip(params, steps))
    assert float(opt.skipped_steps) == 0.0


def test_smallest_safe_eps_is_accepted_and_zero_gradients_stay_finite(optimizer, backend):
    """eps = op_contract.smallest_safe_eps(p) keeps eps^(2p) a normal float32, so d > 0 and 1 / d
    is finite: all-zero gradients give no NaN or inf, whatever p."""
    for p_exp in (0.5, 1.0, 0.75):
        eps = smallest_safe_eps(p_exp)
        params = [torch.nn.Parameter(torch.full(s, 0.5, device=backend.device))
                  for s in ((70,), (7, 10))]
        opt = optimizer.cls(params, eps=eps, p=p_exp, backend=backend.name)
        for _ in range(3):
            for w in params:
                w.grad = torch.zeros_like(w)
            opt.step()
        for w in params:
            assert torch.isfinite(w).all() and torch.isfinite(opt.state[w]["momentum"]).all()


@pytest.mark.backends("cpu", "reference", "cuda-gpu", "triton-gpu")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_small_tensors(optimizer, backend, dtype):
    """1000 one-chunk tensors (fused: reduced and updated in phase B alone), 8 launches per phase
    on a GPU (128 tensors per launch); FAdafactor's mostly small matrices. The emulator and the
    interpreter split launches at their own sizes in their own files (a thousand programs take
    the interpreter minutes)."""
    skip_low_precision_on_reference(backend, dtype)
    if optimizer.factored:
        shapes = [(1 + i % 5, 1 + (i * 7) % 13) if i % 4 else (1 + (i * 7) % 61,)
                  for i in range(1000)]
    else:
        shapes = [(1 + (i * 7) % 61,) for i in range(1000)]
    check(optimizer, backend, "many", make_problem(shapes=shapes, dtype=dtype, steps=7), dtype,
          lr=1e-2)


# ---- refused at construction or on load, whatever the backend ----------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "Invalid learning rate"),
    ({"lr": math.inf}, "Invalid learning rate: inf"),
    ({"lr": torch.tensor(-1.0)}, "Invalid learning rate: -1.0"),
    ({"lr": torch.tensor(math.nan)}, "Invalid learning rate: nan"),
    ({"lr": torch.tensor(1)}, "Tensor lr must be a floating-point tensor, got torch.int64"),
    ({"eps": -1e-8}, "Invalid epsilon value"),
    ({"eps": math.inf}, "Invalid epsilon value: inf"),
    ({"eps": 0.0}, "Invalid epsilon value: 0.0"),
    ({"eps": 1e-30, "p": 1.0},
     r"Invalid epsilon value: 1e-30 with p=1.0.*smallest safe eps for p=1.0 is 1.1e-19"),
    ({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0"),
    ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1"),
    ({"betas": (0.9, math.nan)}, "Invalid beta parameter at index 1: nan"),
    ({"p": 0.0}, "Invalid p value"),
    ({"p": math.inf}, "Invalid p value: inf"),
    ({"clip": -1.0}, "Invalid clip value"),
    ({"clip": math.nan}, "Invalid clip value: nan"),
    ({"weight_decay": -0.1}, "Invalid weight_decay value"),
    ({"weight_decay": math.inf}, "Invalid weight_decay value: inf"),
    ({"maximize": "yes"}, "Invalid maximize value: 'yes'"),
    ({"backend": "tpu"}, "Invalid backend"),
], ids=lambda x: None if isinstance(x, str) else "-".join(f"{k}={v!r}" for k, v in x.items()))
def test_invalid_hyperparameters_are_refused_at_construction(optimizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimizer.cls([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_invalid_group_hyperparameters_in_add_param_group(optimizer):
    opt = optimizer.cls([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "betas": (0.9, 1.0)})
    assert len(opt.param_groups) == 1


def test_defaults_match_the_paper(optimizer):
    opt = optimizer.cls([torch.nn.Parameter(torch.ones(1))])
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["clip"], g["weight_decay"], g["p"]) == \
        (1e-3, (0.9, 0.999), 1e-8, 1.0, 1e-3, 0.5)
    assert g["maximize"] is False and g["backend"] is None


def test_complex_parameter_is_refused_by_name(optimizer):
    model = torch.nn.Linear(2, 2)
    weird = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"complex.*'weird'.*view_as_real"):
        optimizer.cls([("weight", model.weight), ("weird", weird)])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8], ids=str)
def test_integer_parameters_are_refused_by_name(optimizer, dtype):
    with pytest.raises(ValueError, match=f"floating-point parameters only: parameter 'steps' "
                                         f"is {dtype}"):
        optimizer.cls([("w", torch.nn.Parameter(torch.ones(2))),
                       ("steps", torch.ones(3, dtype=dtype))])


def test_parameters_sharing_storage_are_refused_by_name(optimizer):
    base = torch.zeros(10)
    a, b = base[:6], base[4:]
    with pytest.raises(ValueError, match=r"parameter 'a' and parameter 'b': their storage overlaps"):
        optimizer.cls([("a", a), ("b", b)])
    ok = optimizer.cls([("a", base[:5]), ("b", base[5:])])  # disjoint views of one storage
    with pytest.raises(ValueError, match="storage overlaps"):
        ok.add_param_group({"params": [("c", base[2:3])]})
    assert len(ok.param_groups) == 1
    with pytest.raises(ValueError, match="share memory"):
        optimizer.cls([torch.zeros(1).expand(8)])


def test_explicit_backend_that_cannot_run_says_why_and_how(optimizer):
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    opt = optimizer.cls([p], backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run.*CUDA tensors"):
        opt.step()
    assert float(torch.count_nonzero(p.grad)) == 3 and len(opt.state) == 0


def test_explicit_fused_backend_refuses_float64_params(optimizer):
    for shape in ((3,), (3, 4)):
        p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
        p.grad = torch.randn(shape, dtype=torch.float64)
        with pytest.raises(RuntimeError, match="float64.*backend=None or 'reference'"):
            optimizer.cls([p], backend="cpu").step()


def test_unnamed_parameter_error_gives_index_and_shape(optimizer):
    p = torch.nn.Parameter(torch.randn(2, 3))
    opt = optimizer.cls([torch.nn.Parameter(torch.randn(1)), p])
    p.grad = torch.zeros_like(p)
    p.grad.data = torch.zeros(6)
    with pytest.raises(RuntimeError, match=r"parameter 1 of its param group \(shape \(2, 3\)\)"):
        opt.step()


def test_step_counter_is_per_parameter(optimizer):
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, 2))
    opt = optimizer.cls([a, b])
    for k in range(4):
        a.grad = torch.randn(3)
        b.grad = torch.randn(3, 2) if k % 2 else None
        opt.step()
    assert float(opt.state[a]["step"]) == 4.0 and float(opt.state[b]["step"]) == 2.0


def test_load_state_dict_of_another_model_is_refused_by_name_and_loads_nothing(optimizer):
    src = optimizer.cls([torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))])
    for p in src.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    src.step()
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(5))
    dst = optimizer.cls([("enc.weight", a), ("dec.weight", b)], lr=0.5)
    with pytest.raises(ValueError, match=r"'momentum' of parameter 'dec.weight' has shape \(3,\), "
                                         r"but the parameter has shape \(5,\)"):
        dst.load_state_dict(src.state_dict())
    assert len(dst.state) == 0 and dst.param_groups[0]["lr"] == 0.5


def test_checkpoint_with_incomplete_state_is_refused_by_name_and_loads_nothing(optimizer):
    src_p = torch.nn.Parameter(torch.randn(4, 5))
    src = optimizer.cls([src_p])
    src_p.grad = torch.ones(4, 5)
    src.step()
    keys = [k for k in src.state[src_p] if k != "step"]
    assert len(keys) == 3 if optimizer.factored else len(keys) == 2  # fim_row, fim_col / fim
    for key in keys:
        sd = copy.deepcopy(src.state_dict())  # torch's state_dict shares the state's dicts
        del sd["state"][0][key]
        dst = optimizer.cls([("enc.weight", torch.nn.Parameter(torch.randn(4, 5)))], lr=0.5)
        with pytest.raises(ValueError, match=rf"{optimizer.cls.__name__} state_dict: the state of "
                                             rf"parameter 'enc.weight' has no '{key}'"):
            dst.load_state_dict(sd)
        assert len(dst.state) == 0 and dst.param_groups[0]["lr"] == 0.5


# ---- on the GPU backends and the CUDA kernels ----------------------------------------------------


@pytest.mark.backends("cuda-emulated", "cuda-gpu")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_storage_gives_the_same_bits(optimizer, backend, dtype):
    """Parameters and gradients one element into a buffer are not 16-byte aligned: the CUDA
    kernels' scalar path, which visits the same elements in the same order per thread as the
    128-bit path, so the float64 sums and every output are bitwise those of aligned storage."""
    backend.use_multi_chunk()
    problem = make_problem(shapes=sizes_of(optimizer, backend).multi, steps=3, dtype=dtype)
    aligned, _, _ = run(optimizer, backend, problem, lr=1e-2)

    def offset(t):
        buf = torch.zeros(t.numel() + 1, dtype=t.dtype, device=backend.device)
        return buf[1:].view(t.shape).copy_(t)

    params = [torch.nn.Parameter(offset(t)) for t in problem.init]
    assert all(p.data_ptr() % 16 != 0 for p in params)
    opt = optimizer.cls(params, backend=backend.name, lr=1e-2)
    snaps = []
    for row in problem.grads:
        for p, g in zip(params, row):
            p.grad = offset(g)
        opt.step()
        snaps.append(snapshot(params, opt.state))
    assert_same_bits(aligned, snaps)


@pytest.mark.backends("cuda-gpu")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_triton_and_cpu_kernels_agree(optimizer, backend, dtype):
    """The CUDA kernels, the compiled Triton kernels and the CPU kernels on one problem: each
    within the oracle tolerance, and close to each other (different reduction orders: not
    bitwise)."""
    reason = backends.unavailable_reason("triton", backend.device)
    if reason is not None:
        pytest.skip(reason)
    sizes = sizes_of(optimizer, backend)
    problem = make_problem(shapes=sizes.shapes, steps=sizes.steps, dtype=dtype)
    ref64, same = expected(optimizer, backend, "lr1e-2", problem, dtype, lr=1e-2)
    runs = [optimizer.run(problem, name, device=device, lr=1e-2)[0]
            for name, device in (("cuda", backend.device), ("triton", backend.device),
                                 ("cpu", CPU))]
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for snaps in runs:
        assert_trajectories_close(snaps, ref64, same, dtype)
        for a, b in zip(runs[0], snaps):
            for x, y in zip(a["params"], b["params"]):
                torch.testing.assert_close(x.double(), y.double(), **tol)


@pytest.mark.backends("cuda-gpu", "triton-gpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_capture_and_replay(optimizer, backend, dtype):
    """lr as a device tensor (changed between replays), steps on the device: the captured step
    reads them at replay time, and replays match eager steps bit for bit."""
    sizes = sizes_of(optimizer, backend)
    shapes = [s for s in sizes.shapes + sizes.multi if math.prod(s)]
    problem = make_problem(shapes=shapes, dtype=dtype, steps=8)
    lrs = [1e-2 / (1 + k) for k in range(problem.steps)]
    device = backend.device

    def make():
        params = [torch.nn.Parameter(t.to(device, copy=True)) for t in problem.init]
        lr = torch.tensor(lrs[0], device=device)
        for p in params:
            p.grad = torch.zeros_like(p)
        return params, lr, optimizer.cls(params, lr=lr, backend=backend.name, clip=0.5)

    def set_step_inputs(params, lr, k):
        lr.fill_(lrs[k])
        for p, g in zip(params, problem.grads[k]):
            p.grad.copy_(g.to(device))

    params_e, lr_e, opt_e = make()
    eager = []
    for k in range(problem.steps):
        set_step_inputs(params_e, lr_e, k)
        opt_e.step()
        eager.append(snapshot(params_e, opt_e.state))

    # Warm up 3 steps on a side stream (state is created lazily), capture, replay the rest.
    params_g, lr_g, opt_g = make()
    graphed = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(3):
            set_step_inputs(params_g, lr_g, k)
            opt_g.step()
            graphed.append(snapshot(params_g, opt_g.state))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for k in range(3, problem.steps):
        set_step_inputs(params_g, lr_g, k)
        graph.replay()
        graphed.append(snapshot(params_g, opt_g.state))
    assert_same_bits(eager, graphed)
