"""The step engine's promises (fadam_fused/engine.py, plan.py, checks.py, checkpoint.py): every
error is raised before anything changes and names the parameter, a checkpoint is input, an
overflow is a non-finite event, and what torch.optim accepts is accepted.

Each test runs for both optimizers of the family on the CPU backends (the fused C++ one and the
reference); tests/test_scenarios.py runs the shared scenarios on every backend.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fadam_fused import FAdafactor, FAdam, fadam

OPTIMIZERS = [FAdam, FAdafactor]
BACKENDS = ["cpu", "reference"]


def _params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))
            for s in [(6, 9), (33,), (4, 5, 3)]]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _everything(opt, params):
    """Parameters, every state tensor, and the groups' hyperparameters."""
    out = [p.detach().clone() for p in params]
    for p in params:
        for key in sorted(opt.state[p]):
            out.append(opt.state[p][key].clone())
    groups = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in g.items()
               if k != "params"} for g in opt.param_groups]
    return out, groups


def _assert_same(a, b):
    (ta, ga), (tb, gb) = a, b
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    for x, y in zip(ga, gb):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def _trained(cls, backend, steps=3, **hyper):
    params = _params()
    opt = cls(params, lr=1e-2, backend=backend, **hyper)
    for k in range(steps):
        _grads(params, k)
        opt.step()
    return params, opt


# ---- a checkpoint is input ----------------------------------------------------------------------

def _spoil_state(key, value):
    def spoil(sd, fim_key):
        sd["state"][0][fim_key if key == "fim" else key] = value(sd["state"][0][
            fim_key if key == "fim" else key])
        return sd
    return spoil


CHECKPOINT_SPOILERS = {
    "lr tensor NaN": (lambda sd, _: sd["param_groups"][0].update(lr=torch.tensor(float("nan")))
                      or sd, "learning rate"),
    "lr tensor -1": (lambda sd, _: sd["param_groups"][0].update(lr=torch.tensor(-1.0)) or sd,
                     "learning rate"),
    "lr float NaN": (lambda sd, _: sd["param_groups"][0].update(lr=float("nan")) or sd,
                     "learning rate"),
    "eps 0": (lambda sd, _: sd["param_groups"][0].update(eps=0.0) or sd, "epsilon"),
    "betas (1.5, 0.9)": (lambda sd, _: sd["param_groups"][0].update(betas=(1.5, 0.9)) or sd,
                         "beta parameter at index 0"),
    "maximize 'yes'": (lambda sd, _: sd["param_groups"][0].update(maximize="yes") or sd,
                       "maximize"),
    "step -3": (_spoil_state("step", lambda s: torch.tensor(-3.0)), "whole number >= 0"),
    "step 2.5": (_spoil_state("step", lambda s: torch.tensor(2.5)), "whole number >= 0"),
    "step inf": (_spoil_state("step", lambda s: torch.tensor(float("inf"))), "whole number >= 0"),
    "step '3'": (_spoil_state("step", lambda s: "3"), "not a number"),
    "step None": (_spoil_state("step", lambda s: None), "not a number"),
    "step shape (2,)": (_spoil_state("step", lambda s: torch.tensor([3.0, 3.0])), "not one number"),
    "negative fim": (_spoil_state("fim", lambda f: -f), "negative"),
    "NaN in one fim element": (_spoil_state("fim", lambda f: f.index_fill(-1, torch.tensor(0),
                                                                          float("nan"))),
                               "NaN or inf"),
    "NaN momentum": (_spoil_state("momentum", lambda m: m.index_fill(-1, torch.tensor(0),
                                                                     float("nan"))), "NaN or inf"),
}


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spoiler", list(CHECKPOINT_SPOILERS))
def test_a_refused_checkpoint_leaves_the_optimizer_exactly_as_it_was(cls, spoiler):
    """Every value the constructor or the kernels would refuse is refused by load_state_dict,
    naming it, before anything is loaded (a lr, another parameter's momentum: nothing)."""
    params, opt = _trained(cls, "cpu")
    sd = copy.deepcopy(opt.state_dict())
    # The spoiled entry is the first parameter's state; the others are valid and differ from
    # the optimizer's (so a partial load would show).
    for i in sd["state"]:
        sd["state"][i]["momentum"] = sd["state"][i]["momentum"] + 1.0
    sd["param_groups"][0]["lr"] = 0.5
    fim_key = "fim_row" if cls is FAdafactor else "fim"
    spoil, match = CHECKPOINT_SPOILERS[spoiler]
    sd = spoil(sd, fim_key)
    before = _everything(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _assert_same(before, _everything(opt, params))
    _grads(params, 10)
    opt.step()  # and it still trains


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_checkpoint_refusal_names_the_parameter(cls):
    model = torch.nn.Linear(3, 2)
    opt = cls(model.named_parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    sd["state"][1]["step"] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match="parameter 'bias'"):
        opt.load_state_dict(sd)


def test_fadafactor_loads_column_major_factors_and_steps():
    params, opt = _trained(FAdafactor, "cpu")
    sd = copy.deepcopy(opt.state_dict())
    rows = sd["state"][2]["fim_row"]  # (4, 5): a transposed copy, column-major
    sd["state"][2]["fim_row"] = rows.t().contiguous().t()
    assert not sd["state"][2]["fim_row"].is_contiguous()
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = FAdafactor(params2, lr=1e-2, backend="cpu")
    opt2.load_state_dict(sd)
    assert opt2.state[params2[2]]["fim_row"].is_contiguous()
    assert torch.equal(opt2.state[params2[2]]["fim_row"], rows)
    _grads(params, 5)
    _grads(params2, 5)
    opt.step()
    opt2.step()
    for a, b in zip(params, params2):
        assert torch.equal(a, b)


# ---- overflow is a non-finite event -------------------------------------------------------------

OVERFLOWS = {
    # |g| = 1e20: finite, but g^2 = 1e40 is not a float32: the FIM would be inf forever.
    "FAdam g=1e20": (FAdam, (40,), lambda g: g.index_fill(0, torch.tensor(7), 1e20)),
    # Each g^2 = 1e38 fits float32; at step 1 (R = sum g^2) a row of 9 sums to 9e38, which
    # does not.
    "FAdafactor full((6,9), 1e19)": (FAdafactor, (6, 9), lambda g: torch.full_like(g, 1e19)),
    # g^2 = 2.5e35; at step 1 a column of 2000 sums to 5e38.
    "FAdafactor (2000,2) at 5e17": (FAdafactor, (2000, 2), lambda g: torch.full_like(g, 5e17)),
    # Later steps: (1 - b2hat) = 1/3 at step 3, so a row of 9 squares of 1.6e19 (2.3e39 / 3).
    "FAdafactor step 3 full((6,9), 1.6e19)": (FAdafactor, (6, 9),
                                              lambda g: torch.full_like(g, 1.6e19)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(OVERFLOWS))
def test_an_overflow_skips_the_step_like_a_nan(backend, case):
    cls, shape, make = OVERFLOWS[case]
    p = torch.nn.Parameter(torch.randn(shape))
    q = torch.nn.Parameter(torch.randn(5))
    opt = cls([p, q], lr=1e-2, backend=backend)
    warm = 2 if "step 3" in case or cls is FAdam else 0
    for k in range(warm):
        p.grad, q.grad = torch.randn(shape), torch.randn(5)
        opt.step()
    fresh = cls([torch.nn.Parameter(p.detach().clone()), torch.nn.Parameter(q.detach().clone())])
    before = _everything(opt, [p, q]) if warm else None
    p.grad, q.grad = make(torch.randn(shape)), torch.randn(5)
    opt.step()
    assert float(opt.skipped_steps) == 1.0
    if warm:
        _assert_same(before, _everything(opt, [p, q]))
    else:  # nothing moved from the first state
        for param, twin in zip([p, q], fresh.param_groups[0]["params"]):
            assert torch.equal(param, twin)
            state, new = opt.state[param], fresh.kind_of(twin).new_state(twin)
            assert state.keys() == new.keys()
            assert all(torch.equal(state[k], new[k]) for k in state)
    p.grad, q.grad = torch.randn(shape), torch.randn(5)
    opt.step()  # and the next step runs
    assert float(opt.state[p]["step"]) == warm + 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_large_finite_gradients_below_overflow_still_step(cls, backend):
    """1e19^2 = 1e38 fits float32 (and FAdafactor's sums of 2 such squares do too)."""
    p = torch.nn.Parameter(torch.randn(2, 1))
    opt = cls([p], lr=1e-2, backend=backend)
    p.grad = torch.full((2, 1), 1e19)
    before = p.detach().clone()
    opt.step()
    assert float(opt.skipped_steps) == 0.0
    assert torch.isfinite(p).all() and not torch.equal(p, before)
    assert all(torch.isfinite(v).all() for v in opt.state[p].values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_the_grad_scale_counts_in_the_overflow_rule(cls, backend):
    """grad / grad_scale is the gradient: 1e10 / 1e-30 = 1e40 is not a float32."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = cls([p], backend=backend)
    p.grad = torch.full((4, 3), 1e10)
    opt.grad_scale = torch.tensor(1e-30)
    opt.found_inf = torch.tensor(0.0)
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p, before) and float(opt.skipped_steps) == 1.0
    assert not opt.state[p] or float(opt.state[p]["step"]) == 0.0


# ---- every check before the first write ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("layout", ["column-major", "channels_last"])
def test_param_data_relaid_out_mid_training_keeps_training(cls, backend, layout):
    """param.data in another memory layout (same values): the state follows it, and the step is
    the step of the untouched twin."""
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(2, 3, 4, 5, generator=gen)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    oa, ob = cls([a], lr=1e-2, backend=backend), cls([b], lr=1e-2, backend=backend)
    for k in range(4):
        g = torch.randn(init.shape, generator=gen)
        if k == 2:
            if layout == "channels_last":
                b.data = b.data.to(memory_format=torch.channels_last)
            else:
                b.data = b.data.transpose(-1, -2).contiguous().transpose(-1, -2)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)
    assert float(ob.state[b]["step"]) == 4.0


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_state_missing_step_is_refused_by_name_and_makes_no_new_state(cls):
    params, opt = _trained(cls, "cpu")
    new = torch.nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [new]})
    del opt.state[params[1]]["step"]
    new.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match=r"parameter 1 of its param group .* no 'step'"):
        opt.step()
    assert new not in opt.state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_state_made_under_inference_mode_trains_outside_it(cls, backend):
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = cls([p], lr=1e-2, backend=backend)
    p.grad = torch.randn(4, 6)
    with torch.inference_mode():
        opt.step()
    assert not any(v.is_inference() for v in opt.state[p].values())
    p.grad = torch.randn(4, 6)
    opt.step()
    assert float(opt.state[p]["step"]) == 2.0


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_an_inference_tensor_parameter_is_refused_at_construction(cls):
    with torch.inference_mode():
        w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="inference tensor"):
        cls([torch.nn.Parameter(torch.randn(2)), w])


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_errors_name_the_optimizer_the_user_made(cls):
    with pytest.raises(ValueError, match=f"{cls.__name__} does not support complex"):
        cls([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match=f"{cls.__name__}.__init__"):
        cls([torch.nn.Parameter(torch.randn(3))], foo=1)


# ---- the functional form validates like the optimizer -------------------------------------------

def _functional_lists(n=3):
    params = [torch.randn(5, 4) for _ in range(n)]
    grads = [torch.randn(5, 4) for _ in range(n)]
    moms = [torch.zeros(5, 4) for _ in range(n)]
    fims = [torch.ones(5, 4) for _ in range(n)]
    steps = [torch.tensor(0.0) for _ in range(n)]
    return params, grads, moms, fims, steps


HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, clip=1.0, weight_decay=1e-3, p=0.5,
             maximize=False)


@pytest.mark.parametrize("backend", BACKENDS + [None])
@pytest.mark.parametrize("spoil,match", [
    (lambda L: L[4].__setitem__(1, torch.tensor(0, dtype=torch.int64)), r"'step' of params\[1\]"),
    (lambda L: L[4].__setitem__(1, torch.tensor(0.0, dtype=torch.float64)),
     r"'step' of params\[1\]"),
    (lambda L: L[3].__setitem__(2, torch.ones(5, 4, dtype=torch.float16)), r"'fim' of params\[2\]"),
    (lambda L: L[3].__setitem__(0, torch.ones(5, 4, device="meta")), r"'fim' of params\[0\]"),
    (lambda L: L[2].__setitem__(1, torch.zeros(4, 5)), r"'momentum' of params\[1\]"),
], ids=["int64 step", "float64 step", "float16 fim", "meta fim", "momentum shape"])
def test_functional_fadam_checks_its_lists_before_writing(backend, spoil, match):
    lists = _functional_lists()
    spoil(lists)
    before = [[t.clone() if t.device.type != "meta" else t for t in lst] for lst in lists]
    with pytest.raises(RuntimeError, match=match):
        fadam(*lists, backend=backend, **HYPER)
    for lst, old in zip(lists, before):
        for t, o in zip(lst, old):
            if t.device.type != "meta":
                assert torch.equal(t, o)


def test_functional_fadam_matches_the_optimizer_and_counts_steps():
    lists = _functional_lists()
    params = [torch.nn.Parameter(p.clone()) for p in lists[0]]
    opt = FAdam(params, lr=1e-2, backend="cpu")
    for p, g in zip(params, lists[1]):
        p.grad = g.clone()
    opt.step()
    skip = fadam(*lists, backend="cpu", **HYPER)
    assert float(skip) == 0.0
    for p, q, s in zip(params, lists[0], lists[4]):
        assert torch.equal(p.detach(), q) and float(s) == 1.0


# ---- what torch.optim accepts -------------------------------------------------------------------

@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_numpy_scalars_and_cpu_tensor_hyperparameters_are_accepted(cls):
    a = torch.nn.Parameter(torch.ones(3, 2))
    b = torch.nn.Parameter(torch.ones(3, 2))
    oa = cls([a], lr=np.float32(1e-3), eps=np.float64(1e-8), weight_decay=np.float32(0.0),
             betas=(torch.tensor(0.9), np.float32(0.999)), clip=np.int64(1))
    ob = cls([b], lr=float(np.float32(1e-3)), eps=1e-8, weight_decay=0.0,
             betas=(0.9, float(np.float32(0.999))), clip=1.0)
    group = oa.param_groups[0]
    assert type(group["lr"]) is float and all(type(x) is float for x in group["betas"])
    for _ in range(2):
        a.grad = b.grad = torch.full((3, 2), 0.5)
        oa.step()
        ob.step()
    assert torch.equal(a, b)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_an_empty_first_group_is_accepted(cls):
    p = torch.nn.Parameter(torch.randn(3, 3))
    opt = cls([{"params": []}, {"params": [p]}])
    p.grad = torch.randn(3, 3)
    opt.step()
    assert float(opt.state[p]["step"]) == 1.0


@pytest.mark.parametrize("backend", [None, "reference"])  # strided views are not dense: not fused
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("views", ["columns", "interleaved rows"])
def test_disjoint_views_of_one_tensor_are_parameters_like_any(cls, backend, views):
    """w[:, :3] and w[:, 3:], or w[::2] and w[1::2], share no element: accepted (as by
    torch.optim.Adam), and stepped exactly like two separate tensors with the same values."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 8, generator=gen)
    cut = ((lambda t: t[:, :3]), (lambda t: t[:, 3:])) if views == "columns" else \
        ((lambda t: t[::2]), (lambda t: t[1::2]))
    views_ = [torch.nn.Parameter(f(w)) for f in cut]
    # nn.Parameter of a view keeps its storage: check it is shared.
    assert views_[0].untyped_storage().data_ptr() == views_[1].untyped_storage().data_ptr()
    copies = [torch.nn.Parameter(f(w).clone()) for f in cut]
    ov, oc = cls(views_, lr=1e-2, backend=backend), cls(copies, lr=1e-2, backend=backend)
    for _ in range(3):
        for v, c in zip(views_, copies):
            v.grad = torch.randn(v.shape, generator=gen)
            c.grad = v.grad.clone()
        ov.step()
        oc.step()
    for v, c in zip(views_, copies):
        torch.testing.assert_close(v.detach(), c.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_views_that_share_elements_are_refused(cls):
    w = torch.zeros(10, 4)
    with pytest.raises(ValueError, match="storage overlaps"):
        cls([torch.nn.Parameter(w[::2]), torch.nn.Parameter(w[::3])])  # rows 0 and 6 shared
    with pytest.raises(ValueError, match="same parameter twice"):
        p = torch.nn.Parameter(torch.zeros(3))
        with pytest.warns(UserWarning, match="duplicate parameters"):
            cls([p, p])


# ---- torch.compile ------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend,dtype", [("reference", torch.float32),
                                           (None, torch.float64)], ids=["reference", "float64"])
def test_compiled_step_with_a_tensor_lr_on_the_reference(cls, backend, dtype):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 5, generator=gen).to(dtype), torch.randn(7, generator=gen).to(dtype)]
    grads = [[torch.randn(t.shape, generator=gen).to(dtype) for t in init] for _ in range(3)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    oa = cls(a, lr=torch.tensor(1e-2), backend=backend)
    ob = cls(b, lr=torch.tensor(1e-2), backend=backend)
    step = torch.compile(oa.step, fullgraph=True)
    for row in grads:
        for p, q, g in zip(a, b, row):
            p.grad, q.grad = g.clone(), g.clone()
        step()
        ob.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert math.isclose(float(oa.state[a[0]]["step"]), 3.0)


def test_advance_steps_op_counts_like_foreach_add_and_refuses_before_writing():
    """The CPU step counters' op (csrc/cpu/step_counters.cpp) gives _foreach_add_'s bits, on
    counters at any value (2^24 - 1 steps: the last whole float32 before the spacing is 2) and
    on views; a list with one bad counter changes none of them."""
    from fadam_fused import _ext
    if "CPU" not in _ext.KERNELS:
        pytest.skip(f"the C++ CPU kernels are not built: {_ext.LOAD_ERROR}")
    base = torch.tensor([0.0, 1.0, 41.0, 2.0**24 - 1, 2.0**24, 7.0])
    ours = [base[i].clone() for i in range(4)] + [base.clone()[4], base.clone()[5:]]
    theirs = [t.clone() for t in ours]
    torch.ops.fadam_fused.advance_steps(ours)
    torch._foreach_add_(theirs, 1)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert torch.equal(a, b), (a, b)
    assert ours[3].item() == 2.0**24 and ours[4].item() == 2.0**24  # 2^24 + 1 rounds to 2^24

    steps = [torch.tensor(3.0), torch.tensor(5.0), torch.tensor(1, dtype=torch.int64)]
    with pytest.raises(RuntimeError, match=r"steps\[2\] must be a one-element float32"):
        torch.ops.fadam_fused.advance_steps(steps)
    assert steps[0].item() == 3.0 and steps[1].item() == 5.0


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_steps_count_through_the_cpu_op_and_a_skip_undoes_them(cls):
    """The engine advances CPU counters through the op and subtracts a skipped step."""
    params = _params()
    opt = cls(params, lr=1e-2, backend="cpu")
    for seed in range(3):
        _grads(params, seed)
        opt.step()
    params[1].grad[4] = float("nan")
    opt.step()
    assert [opt.state[p]["step"].item() for p in params] == [3.0, 3.0, 3.0]
    assert opt.skipped_steps.item() == 1
