"""The drop-in optimizer contract (docs/design.md, sections 2 and 6) on the CPU backends."""

import io
import math

import pytest
import torch

from fadam_fused import FAdam, backends, fadam
from fadam_testing import make_problem, run_optimizer

BACKENDS = ["cpu", "reference"]


def _model_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))
            for s in [(4097,), (5, 123, 123), (1,), (70_000,)]]


def _set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _full_state(opt, params):
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [v.clone() for v in opt.state[p].values()]
    return out


# --- non-finite gradients: nothing is lost -----------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk", [1 << 20, 4096], ids=["one-chunk", "multi-chunk"])
def test_nonfinite_gradient_skips_whole_step_bit_identical(backend, bad, dtype, chunk, cpu_chunk):
    cpu_chunk(chunk)  # the NaN sits in a tensor done in phase B alone, or in phase-A slots
    params = _model_params(dtype)
    opt = FAdam([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}], backend=backend)
    for k in range(3):
        _set_grads(params, k)
        opt.step()
    before = _full_state(opt, params)
    _set_grads(params, 10)
    params[3].grad[1234] = bad  # one element of one tensor in the second group
    opt.step()
    after = _full_state(opt, params)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert float(opt.skipped_steps) == 1.0
    _set_grads(params, 11)
    opt.step()  # a finite step afterwards proceeds, and counts from the old step
    assert float(opt.state[params[0]]["step"]) == 4.0
    assert float(opt.skipped_steps) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_and_grad_scale_as_gradscaler_sets_them(backend):
    problem = make_problem(shapes=[(4097,), (3, 5)], steps=1)
    a, pa, _ = run_optimizer(problem, backend, lr=1e-2)
    params = [torch.nn.Parameter(t.clone()) for t in problem.init]
    opt = FAdam(params, lr=1e-2, backend=backend)
    for p, g in zip(params, problem.grads[0]):
        p.grad = g * 1024.0
    opt.grad_scale = torch.tensor([1024.0])
    opt.found_inf = torch.tensor([0.0])
    opt.step()
    for x, y in zip(params, pa):
        torch.testing.assert_close(x.detach(), y.detach(), atol=0, rtol=0)
    assert torch.equal(params[0].grad, problem.grads[0][0] * 1024.0)  # grads are never unscaled in place
    before = _full_state(opt, params)
    opt.found_inf = torch.tensor([1.0])
    opt.step()
    assert all(torch.equal(x, y) for x, y in zip(before, _full_state(opt, params)))


def test_gradscaler_end_to_end_skips_on_inf():
    model = torch.nn.Linear(8, 4)
    opt = FAdam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(16, 8)
    scaler.scale(model(x).square().mean()).backward()
    w0 = model.weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model.weight, w0)
    opt.zero_grad()
    scaler.scale(model(x * float("inf")).sum()).backward()
    w1 = model.weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.weight, w1)
    assert scaler.get_scale() == 2.0**9


# --- state_dict ---------------------------------------------------------------------------------

@pytest.mark.parametrize("first,second", [("cpu", "reference"), ("reference", "cpu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trip_across_backends(first, second, dtype):
    problem = make_problem(shapes=[(4097,), (5, 7), (1,)], steps=8, dtype=dtype)
    full, _, _ = run_optimizer(problem, first, lr=1e-2)

    params = [torch.nn.Parameter(t.clone()) for t in problem.init]
    opt = FAdam(params, lr=1e-2, backend=first)
    for row in problem.grads[:4]:
        for p, g in zip(params, row):
            p.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu")

    params2 = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt2 = FAdam(params2, lr=1e-2, backend=second)
    opt2.load_state_dict(ckpt["opt"])
    # The loading optimizer's own backend stays: where a step runs belongs to the machine.
    assert opt2.param_groups[0]["backend"] == second
    for p in params2:
        assert opt2.state[p]["fim"].dtype == torch.float32  # not rounded to the param dtype
        assert opt2.state[p]["step"].dtype == torch.float32 and opt2.state[p]["step"].dim() == 0
    for row in problem.grads[4:]:
        for p, g in zip(params2, row):
            p.grad = g.clone()
        opt2.step()
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    for x, y in zip(params2, full[-1].params):
        torch.testing.assert_close(x.detach(), y, atol=atol, rtol=1e-5)
    for p, m, f in zip(params2, full[-1].momentum, full[-1].fim):
        torch.testing.assert_close(opt2.state[p]["momentum"], m, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(opt2.state[p]["fim"], f, atol=1e-6, rtol=1e-4)


def test_loads_public_fadam_checkpoint_layout():
    # lessw2020/FAdam_PyTorch and pytorch_optimizer store `momentum` and `fim`; pytorch_optimizer
    # counts steps per group. Such a state dict loads, with step taken from the group.
    p = torch.nn.Parameter(torch.randn(6))
    opt = FAdam([p])
    sd = {"state": {0: {"momentum": torch.full((6,), 0.5), "fim": torch.full((6,), 2.0)}},
          "param_groups": [{**opt.param_groups[0], "params": [0], "step": 7}]}
    opt.load_state_dict(sd)
    assert float(opt.state[p]["step"]) == 7.0
    assert torch.equal(opt.state[p]["fim"], torch.full((6,), 2.0))


# --- errors: clear, naming the parameter, and nothing modified -------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "Invalid learning rate"),
    ({"eps": -1e-8}, "Invalid epsilon value"),
    ({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0"),
    ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1"),
    ({"p": 0.0}, "Invalid p value"),
    ({"clip": -1.0}, "Invalid clip value"),
    ({"weight_decay": -0.1}, "Invalid weight_decay value"),
    ({"backend": "tpu"}, "Invalid backend"),
])
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FAdam([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_tensor_lr_must_be_floating_point():
    with pytest.raises(ValueError, match="Tensor lr must be a floating-point tensor, got torch.int64"):
        FAdam([torch.nn.Parameter(torch.ones(2))], lr=torch.tensor(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_tensor_lr_is_read_as_float32(backend):
    # The kernels read a float32 or float64 lr; a bfloat16 one is converted on the device.
    problem = make_problem(shapes=[(4097,), (3, 5)], steps=3)
    lr = torch.tensor(2.0**-6, dtype=torch.bfloat16)  # exact in bfloat16
    a, _, _ = run_optimizer(problem, backend, lr=lr)
    b, _, _ = run_optimizer(problem, backend, lr=2.0**-6)
    for x, y in zip(a[-1].params + a[-1].momentum, b[-1].params + b[-1].momentum):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_element_lr_with_a_scalar_parameter(backend):
    # torch.optim takes lr of shape (1,); it must not broadcast a 0-dim parameter to (1,).
    a, b = torch.nn.Parameter(torch.tensor(0.5)), torch.nn.Parameter(torch.tensor(0.5))
    oa = FAdam([a], lr=torch.tensor([0.25]), backend=backend)
    ob = FAdam([b], lr=0.25, backend=backend)
    for _ in range(3):
        a.grad, b.grad = torch.tensor(0.3), torch.tensor(0.3)
        oa.step()
        ob.step()
    assert a.shape == () and torch.equal(a, b)


def test_invalid_group_hyperparameters_in_add_param_group():
    opt = FAdam([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "betas": (0.9, 1.0)})
    assert len(opt.param_groups) == 1


def test_complex_parameter_is_rejected_by_name():
    model = torch.nn.Linear(2, 2)
    weird = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"complex.*'weird'.*view_as_real"):
        FAdam([("weight", model.weight), ("weird", weird)])


def _bad_grad_cases():
    # torch's `.grad` setter refuses a misfit gradient, but `.grad.data = ...` (or swapping
    # `param.data` after backward) gets one through; FAdam must catch it before any update.
    def via_data(t):
        def make(p):
            p.grad = torch.zeros_like(p)
            p.grad.data = t
        return make

    def sparse(p):
        p.grad = torch.zeros(p.shape).to_sparse()

    yield "sparse", sparse, "sparse gradients"
    yield "shape", via_data(torch.zeros(3)), r"has shape \(3,\) but the parameter has shape \(4, 4\)"
    yield "dtype", via_data(torch.zeros(4, 4, dtype=torch.float64)), "is torch.float64 but the parameter is torch.float32"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_bad_grad_cases()), ids=lambda c: c[0])
def test_bad_gradient_raises_and_changes_nothing(backend, case):
    _, make_grad, match = case
    good = torch.nn.Parameter(torch.randn(5))
    bad = torch.nn.Parameter(torch.randn(4, 4))
    opt = FAdam([("encoder.weight", good), ("decoder.weight", bad)], backend=backend)
    good.grad, bad.grad = torch.randn(5), torch.randn(4, 4)
    opt.step()
    before = _full_state(opt, [good, bad])
    good.grad = torch.randn(5)
    make_grad(bad)
    with pytest.raises(RuntimeError, match=match) as info:
        opt.step()
    assert "decoder.weight" in str(info.value)
    assert all(torch.equal(x, y) for x, y in zip(before, _full_state(opt, [good, bad])))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_in_another_layout_gives_the_same_step(backend):
    # torch's .grad setter accepts a gradient whose strides differ from the parameter's; the
    # fused kernels get a copy in the parameter's layout. The step counter must not move on an
    # error either (it used to be incremented before the kernel refused the strides).
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(40, 33, generator=gen)
    grads = [torch.randn(40, 33, generator=gen) for _ in range(3)]
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    oa, ob = FAdam([a], lr=1e-2, backend=backend), FAdam([b], lr=1e-2, backend=backend)
    for g in grads:
        a.grad = g.clone()
        b.grad = g.t().contiguous().t()  # same values, column-major strides
        assert b.grad.stride() != b.stride()
        oa.step()
        ob.step()
    assert torch.equal(a, b)
    for key in ("momentum", "fim", "step"):
        assert torch.equal(oa.state[a][key], ob.state[b][key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_parameter_and_state(backend):
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(2, 3, 5, 7, generator=gen)
    grads = [torch.randn(2, 3, 5, 7, generator=gen) for _ in range(3)]
    a = torch.nn.Parameter(init.clone())
    b = torch.nn.Parameter(init.clone().to(memory_format=torch.channels_last))
    oa, ob = FAdam([a], lr=1e-2, backend=backend), FAdam([b], lr=1e-2, backend=backend)
    for g in grads:
        a.grad = g.clone()
        b.grad = g.clone()  # contiguous gradient of a channels_last parameter
        oa.step()
        ob.step()
    assert ob.state[b]["fim"].stride() == b.stride()
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # A contiguous saved state loads into the channels_last layout.
    sd = ob.state_dict()
    sd["state"][0] = {k: v.contiguous() for k, v in sd["state"][0].items()}
    oc = FAdam([b], lr=1e-2, backend=backend)
    oc.load_state_dict(sd)
    assert oc.state[b]["momentum"].stride() == b.stride()
    torch.testing.assert_close(oc.state[b]["momentum"], ob.state[b]["momentum"], atol=0, rtol=0)


def test_strided_view_parameter_runs_on_the_oracle_or_is_refused_by_name():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, 16, generator=gen)
    view = torch.nn.Parameter(base[:, ::2])  # strides (16, 2): not dense
    dense = torch.nn.Parameter(base[:, ::2].contiguous())
    g = torch.randn(16, 8, generator=gen)
    view.grad, dense.grad = g.clone(), g.clone()
    FAdam([view], lr=1e-2).step()  # backend=None: the reference backend takes it
    FAdam([dense], lr=1e-2, backend="reference").step()
    assert torch.equal(view, dense)
    explicit = FAdam([("enc.weight", view)], lr=1e-2, backend="cpu")
    before = view.detach().clone()
    with pytest.raises(RuntimeError, match=r"backend='cpu' cannot update parameter 'enc.weight'.*"
                                           r"strided view"):
        explicit.step()
    assert torch.equal(view, before) and len(explicit.state) == 0


def test_load_state_dict_of_another_model_is_refused_by_name_and_loads_nothing():
    src = FAdam([torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))])
    for p in src.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    src.step()
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(5))
    dst = FAdam([("enc.weight", a), ("dec.weight", b)], lr=0.5)
    with pytest.raises(ValueError, match=r"'momentum' of parameter 'dec.weight' has shape \(3,\), "
                                         r"but the parameter has shape \(5,\)"):
        dst.load_state_dict(src.state_dict())
    assert len(dst.state) == 0 and dst.param_groups[0]["lr"] == 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a gradient on another device needs a GPU")
def test_gradient_on_another_device_raises_and_changes_nothing():
    p = torch.nn.Parameter(torch.randn(4, device="cuda"))
    opt = FAdam([("w", p)])
    p.grad = torch.zeros_like(p)
    p.grad.data = torch.zeros(4)
    with pytest.raises(RuntimeError, match="'w'.*is on cpu but the parameter is on cuda"):
        opt.step()
    assert len(opt.state) == 0


def test_unnamed_parameter_error_gives_index_and_shape():
    p = torch.nn.Parameter(torch.randn(2, 3))
    opt = FAdam([torch.nn.Parameter(torch.randn(1)), p])
    p.grad = torch.zeros_like(p)
    p.grad.data = torch.zeros(6)
    with pytest.raises(RuntimeError, match=r"parameter 1 of its param group \(shape \(2, 3\)\)"):
        opt.step()


def test_explicit_backend_that_cannot_run_says_why_and_how():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    opt = FAdam([p], backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run.*CUDA tensors"):
        opt.step()
    assert float(torch.count_nonzero(p.grad)) == 3 and len(opt.state) == 0


def test_explicit_fused_backend_rejects_float64_params():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    p.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64.*backend=None or 'reference'"):
        FAdam([p], backend="cpu").step()


# --- torch.optim conventions ------------------------------------------------------------------------

def test_closure_zero_grad_hooks_and_no_grad_params():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    frozen = torch.nn.Parameter(torch.randn(3))
    opt = FAdam([{"params": model.parameters()}, {"params": [frozen]}], lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    x, y = torch.randn(32, 4), torch.randn(32, 1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(30)]
    assert losses[-1] < losses[0]
    assert calls[:2] == ["pre", "post"]
    assert frozen not in opt.state  # never had a gradient: no state, untouched
    assert all(p.grad is not None for p in model.parameters())


def test_lr_scheduler_drives_group_lr():
    p = torch.nn.Parameter(torch.randn(10))
    opt = FAdam([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        p.grad = torch.randn(10)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_functional_fadam_matches_optimizer():
    problem = make_problem(shapes=[(100,), (7, 3)], steps=3)
    snaps, _, _ = run_optimizer(problem, "cpu", lr=1e-2)
    params = [t.clone() for t in problem.init]
    moms = [torch.zeros_like(t) for t in params]
    fims = [torch.ones_like(t) for t in params]
    steps = [torch.zeros(()) for _ in params]
    for row in problem.grads:
        fadam(params, row, moms, fims, steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, clip=1.0,
              weight_decay=1e-3, p=0.5, maximize=False, backend="cpu")
    for x, y in zip(params, snaps[-1].params):
        assert torch.equal(x, y)


def test_defaults_match_the_paper():
    opt = FAdam([torch.nn.Parameter(torch.ones(1))])
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["clip"], g["weight_decay"], g["p"]) == \
        (1e-3, (0.9, 0.999), 1e-8, 1.0, 1e-3, 0.5)
    assert g["maximize"] is False and g["backend"] is None


def test_unavailable_reasons_are_actionable():
    assert backends.unavailable_reason("cpu", torch.device("cpu")) is None
    assert "CUDA tensors" in backends.unavailable_reason("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="Invalid backend"):
        backends.unavailable_reason("nope", torch.device("cpu"))


def test_step_counter_is_per_parameter():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = FAdam([a, b])
    for k in range(4):
        a.grad = torch.randn(3)
        b.grad = torch.randn(3) if k % 2 else None
        opt.step()
    assert float(opt.state[a]["step"]) == 4.0 and float(opt.state[b]["step"]) == 2.0
    assert math.isclose(float(opt.state[b]["step"]), 2.0)


# --- validate, then plan, then mutate: a refused step changes nothing --------------------------


def _two_group_optimizer(backend="cpu"):
    gen = torch.Generator().manual_seed(3)
    first = torch.nn.Parameter(torch.randn(6, generator=gen))
    second = torch.nn.Parameter(torch.randn(4, 4, generator=gen))
    opt = FAdam([{"params": [first]}, {"params": [second], "lr": 0.1}], backend=backend)
    for p in (first, second):
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    for p in (first, second):
        p.grad = torch.randn(p.shape, generator=gen)
    return opt, [first, second]


def _spoil_lr_meta(opt, params):
    opt.param_groups[1]["lr"] = torch.tensor(0.1, device="meta")
    return ValueError, "meta device"


def _spoil_lr_shape(opt, params):
    opt.param_groups[1]["lr"] = torch.tensor([0.1, 0.2])
    return ValueError, r"1-element, got shape \(2,\)"


def _spoil_maximize(opt, params):
    opt.param_groups[1]["maximize"] = "yes"
    return ValueError, "Invalid maximize value: 'yes'"


def _spoil_expanded(opt, params):
    params[1].data = torch.zeros(4, 1).expand(4, 4)
    params[1].grad = torch.ones(4, 4)
    return RuntimeError, r"parameter 0 of its param group \(shape \(4, 4\)\).*share memory"


def _spoil_reshaped(opt, params):
    params[1].data = torch.zeros(8, 2)
    params[1].grad = torch.ones(8, 2)
    return RuntimeError, r"'momentum' of parameter 0 .* has shape \(4, 4\) but the parameter now"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spoil", [_spoil_lr_meta, _spoil_lr_shape, _spoil_maximize,
                                   _spoil_expanded, _spoil_reshaped],
                         ids=lambda f: f.__name__[len("_spoil_"):])
def test_error_in_a_later_group_changes_nothing_in_any_group(backend, spoil):
    # The error belongs to the second group: the first group, the step counters and the state
    # of both are untouched (validation runs over every group before the first write).
    opt, params = _two_group_optimizer(backend)
    before = [t.clone() for t in [params[0].detach()] + list(opt.state[params[0]].values())]
    steps = [opt.state[p]["step"].clone() for p in params]
    error, match = spoil(opt, params)
    with pytest.raises(error, match=match):
        opt.step()
    after = [params[0].detach()] + list(opt.state[params[0]].values())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(opt.state[p]["step"], s) for p, s in zip(params, steps))
    assert float(opt.skipped_steps) == 0.0


def test_skipped_steps_counts_a_compiled_first_step():
    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.ones(4))
    opt = FAdam([p], lr=torch.tensor(1e-2), backend="cpu")
    p.grad = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    torch.compile(opt.step, fullgraph=True)()
    assert float(opt.skipped_steps) == 1.0
    assert torch.equal(p.detach(), torch.ones(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_parameter_stays_in_its_element_on_cpu_and_reference(dtype, bad):
    # A NaN in a parameter is not a reason to skip the step; its tensor's RMS(w) counts as
    # infinite, so the clipped weight decay is 0 for the step and the NaN stays in its element.
    results = {}
    for backend in ("cpu", "reference"):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4097, generator=gen).to(dtype))
        q = torch.nn.Parameter(torch.randn(33, generator=gen).to(dtype))
        with torch.no_grad():
            p[100] = bad
        opt = FAdam([p, q], lr=1e-2, weight_decay=0.5, backend=backend)
        p.grad = torch.randn(4097, generator=gen).to(dtype)
        q.grad = torch.randn(33, generator=gen).to(dtype)
        opt.step()
        results[backend] = (p.detach().clone(), q.detach().clone(), opt.state[p]["momentum"])
        assert float(opt.skipped_steps) == 0.0
    p_cpu, q_cpu, m_cpu = results["cpu"]
    p_ref, q_ref, m_ref = results["reference"]
    assert torch.isnan(p_cpu[100]) and torch.isnan(p_ref[100])
    finite = torch.ones(4097, dtype=torch.bool)
    finite[100] = False
    assert torch.isfinite(p_cpu[finite]).all()
    # No weight decay on the spoiled tensor: the same step as with weight_decay = 0.
    gen = torch.Generator().manual_seed(0)
    p0 = torch.nn.Parameter(torch.randn(4097, generator=gen).to(dtype))
    torch.randn(33, generator=gen)
    opt0 = FAdam([p0], lr=1e-2, weight_decay=0.0, backend="reference")
    p0.grad = torch.randn(4097, generator=gen).to(dtype)
    opt0.step()
    assert torch.equal(p_ref[finite], p0.detach()[finite])
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(p_cpu[finite], p_ref[finite], **tol)
    torch.testing.assert_close(m_cpu, m_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(q_cpu, q_ref, **tol)


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": math.inf}, "Invalid learning rate: inf"),
    ({"lr": torch.tensor(-1.0)}, "Invalid learning rate: -1.0"),
    ({"lr": torch.tensor(math.nan)}, "Invalid learning rate: nan"),
    ({"weight_decay": math.inf}, "Invalid weight_decay value: inf"),
    ({"eps": math.inf}, "Invalid epsilon value: inf"),
    ({"p": math.inf}, "Invalid p value: inf"),
    ({"clip": math.nan}, "Invalid clip value: nan"),
    ({"betas": (0.9, math.nan)}, "Invalid beta parameter at index 1: nan"),
    ({"maximize": "yes"}, "Invalid maximize value: 'yes'"),
    ({"eps": 0.0}, "Invalid epsilon value: 0.0"),
    ({"eps": 1e-30, "p": 1.0}, r"Invalid epsilon value: 1e-30 with p=1.0.*smallest safe eps for p=1.0 is 1.1e-19"),
])
def test_invalid_hyperparameters_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FAdam([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_smallest_safe_eps_is_accepted_and_zero_gradients_stay_finite():
    from fadam_fused.op_contract import smallest_safe_eps

    for p_exp in (0.5, 1.0, 0.75):
        eps = smallest_safe_eps(p_exp)
        for backend in BACKENDS:
            w = torch.nn.Parameter(torch.full((70,), 0.5))
            opt = FAdam([w], eps=eps, p=p_exp, backend=backend)
            for _ in range(3):
                w.grad = torch.zeros(70)
                opt.step()
            assert torch.isfinite(w).all() and torch.isfinite(opt.state[w]["momentum"]).all()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_parameters_are_refused_by_name(dtype):
    with pytest.raises(ValueError, match=f"floating-point parameters only: parameter 'steps' "
                                         f"is {dtype}"):
        FAdam([("w", torch.nn.Parameter(torch.ones(2))), ("steps", torch.ones(3, dtype=dtype))])


def test_parameters_sharing_storage_are_refused_by_name():
    base = torch.zeros(10)
    a, b = base[:6], base[4:]
    with pytest.raises(ValueError, match=r"parameter 'a' and parameter 'b': their storage overlaps"):
        FAdam([("a", a), ("b", b)])
    ok = FAdam([("a", base[:5]), ("b", base[5:])])  # disjoint views of one storage are fine
    with pytest.raises(ValueError, match="storage overlaps"):
        ok.add_param_group({"params": [("c", base[2:3])]})
    assert len(ok.param_groups) == 1
    with pytest.raises(ValueError, match="share memory"):
        FAdam([torch.zeros(1).expand(8)])


def test_checkpoint_with_incomplete_state_is_refused_by_name_and_loads_nothing():
    src_p = torch.nn.Parameter(torch.randn(4))
    src = FAdam([src_p])
    src_p.grad = torch.ones(4)
    src.step()
    sd = src.state_dict()
    del sd["state"][0]["momentum"]
    p = torch.nn.Parameter(torch.randn(4))
    dst = FAdam([("enc.weight", p)], lr=0.5)
    with pytest.raises(ValueError, match=r"state of parameter 'enc.weight' has no 'momentum'"):
        dst.load_state_dict(sd)
    assert len(dst.state) == 0 and dst.param_groups[0]["lr"] == 0.5
