"""AdaFisher (fadam_fused/adafisher.py) against its float64 oracle (reference.AdaFisherReference),
and the optimizer contract: accumulation, checkpointing, shared layers, GradScaler, the skip,
checkpoints, hooks, pairing by ownership, validation, torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from adafisher_testing import (HYPER, Net, assert_close, batch, loss_of, make_model, run,
                               run_oracle, snapshot)
from fadam_fused import AdaFisher, AdaFisherW
from fadam_fused.adafisher import layer_factors
from fadam_fused.reference import AdaFisherReference


# ---- the factors of one call --------------------------------------------------------------------

CONVS = [
    dict(in_channels=3, out_channels=5, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=(2, 3), stride=(2, 1), padding=(1, 2)),
    dict(in_channels=6, out_channels=4, kernel_size=3, dilation=2, groups=2, padding=2),
    dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, bias=False),
    dict(in_channels=3, out_channels=2, kernel_size=3, padding="same", dilation=(2, 1)),
    dict(in_channels=3, out_channels=2, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=2, out_channels=3, kernel_size=5, stride=3),  # 7 x 6: one output row
]


@pytest.mark.parametrize("conv", CONVS, ids=str)
def test_conv_factors_without_im2col_equal_the_im2col_ones(conv):
    """Sums of shifted windows of x^2 give the H that the im2col copy gives."""
    torch.manual_seed(0)
    module = nn.Conv2d(**conv).double()
    x = torch.randn(3, conv["in_channels"], 7, 6, dtype=torch.float64)
    s = torch.randn_like(module(x))
    h, g = layer_factors(module, x, s)
    h_ref, g_ref = AdaFisherReference.factors(module, x, s)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("module,shape", [
    (nn.Linear(6, 4), (5, 6)), (nn.Linear(6, 4, bias=False), (2, 3, 6)),
    (nn.BatchNorm2d(3), (4, 3, 5, 2)), (nn.LayerNorm(6), (4, 6)), (nn.LayerNorm(6), (2, 5, 6)),
], ids=["linear", "linear-3d-nobias", "batchnorm", "layernorm-2d", "layernorm-3d"])
def test_layer_factors_equal_the_published_forms(module, shape):
    module = module.double()
    x = torch.randn(shape, dtype=torch.float64)
    s = torch.randn_like(module(x))
    for a, b in zip(layer_factors(module, x, s), AdaFisherReference.factors(module, x, s)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


# ---- the whole optimizer against the float64 oracle ---------------------------------------------

@pytest.mark.parametrize("decoupled", [False, True], ids=["AdaFisher", "AdaFisherW"])
@pytest.mark.parametrize("interval", [1, 3])
def test_matches_the_float64_oracle_every_step(decoupled, interval):
    fast, _, _ = run(8, decoupled=decoupled, update_interval=interval)
    assert_close(fast, run_oracle(8, decoupled=decoupled, update_interval=interval))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_parameters_follow_the_oracle(dtype):
    fast, _, _ = run(6, dtype, update_interval=2)
    same = run_oracle(6, update_interval=2, dtype=dtype)  # the oracle at the same precision
    ref = run_oracle(6, update_interval=2)
    assert_close(fast, ref, same, dtype)


def test_micro_batches_of_one_step_give_one_factor_update():
    """Two micro-batches: one fold of their mean (the oracle's rule), not two folds."""
    fast, _, _ = run(4, micro=2, update_interval=1)
    assert_close(fast, run_oracle(4, micro=2, update_interval=1))
    one = run(1, micro=2, update_interval=1)[2]
    layer = one._factors.layers["fc"]
    # One fold from 1: 0.08 + 0.008 minmax(new) <= 0.088; two folds would give <= 0.0152.
    assert float(layer.fisher_in.min()) >= 0.08 - 1e-7


def test_activation_checkpointing_does_not_count_a_recomputed_forward():
    class Checkpointed(Net):
        def forward(self, x):
            h = checkpoint(lambda t: torch.tanh(self.c1(t)), x, use_reentrant=False)
            h = checkpoint(lambda t: torch.relu(self.bn(self.c2(t))), h, use_reentrant=True)
            return self.ln(self.fc(h.flatten(1))) + self.extra

    results = []
    for cls in (Net, Checkpointed):
        model = make_model(cls=cls)
        opt = AdaFisher(model, update_interval=1, **HYPER)
        for k in range(3):
            opt.zero_grad()
            x, t = batch(k)
            loss_of(model, x.requires_grad_(), t).backward()
            opt.step()
        results.append(snapshot(model, opt))
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-7)


def test_a_layer_called_twice_counts_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    torch.manual_seed(0)
    model = Twice().double()
    oracle_model = copy.deepcopy(model)
    opt = AdaFisher(model, update_interval=1, backend="reference", **HYPER)
    oracle = AdaFisherReference(oracle_model, update_interval=1, **HYPER)
    x = torch.randn(6, 4, dtype=torch.float64)
    for m, o in ((model, opt), (oracle_model, oracle)):
        m(x).square().sum().backward()
        o.step()
    assert len(oracle.seen[oracle_model.fc]) == 0  # consumed: both calls were folded
    torch.testing.assert_close(opt._factors.layers["fc"].fisher_in,
                               oracle.H[oracle_model.fc], rtol=1e-12, atol=1e-15)


# ---- the skip, GradScaler, checkpoints, hooks ---------------------------------------------------

def _trained(steps, update_interval):
    """make_model() and its AdaFisher after `steps` steps on batches 0, 1, ..."""
    model = make_model()
    opt = AdaFisher(model, update_interval=update_interval, **HYPER)
    for k in range(steps):
        opt.zero_grad()
        loss_of(model, *batch(k)).backward()
        opt.step()
    return model, opt


def test_a_nonfinite_gradient_skips_the_step_and_changes_no_factor():
    model, opt = _trained(2, update_interval=1)
    before = snapshot(model, opt)
    opt.zero_grad()
    loss_of(model, *batch(2)).backward()
    model.fc.weight.grad[0, 0] = float("nan")
    opt.step()
    after = snapshot(model, opt)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert float(opt.skipped_steps) == 1.0
    assert float(opt.state[model.fc.weight]["step"]) == 2.0


def test_gradscaler_scale_is_divided_out_of_the_gradient_factor():
    results = []
    for scaled in (False, True):
        model = make_model()
        opt = AdaFisher(model, update_interval=1, **HYPER)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=scaled)
        for k in range(3):
            opt.zero_grad()
            scaler.scale(loss_of(model, *batch(k))).backward()
            scaler.step(opt)
            scaler.update()
        results.append(snapshot(model, opt))
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-7)


def test_state_dict_resume_is_exact_and_another_model_is_refused_by_name():
    full, _, _ = run(6, update_interval=2)
    model, opt = _trained(3, update_interval=2)
    saved = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    opt.remove_hooks()
    model2 = make_model(seed=5)
    model2.load_state_dict(weights)
    opt2 = AdaFisher(model2, update_interval=2, **HYPER)
    opt2.load_state_dict(saved)
    for k in range(3, 6):
        opt2.zero_grad()
        loss_of(model2, *batch(k)).backward()
        opt2.step()
    got = snapshot(model2, opt2)
    assert all(torch.equal(got[key], full[-1][key]) for key in got), "resume is not exact"

    class Renamed(Net):
        pass
    other = make_model(cls=Renamed)
    other.fc2 = other.fc  # another name first for the same layer
    del other.fc
    opt3 = AdaFisher(other, update_interval=2, **HYPER)
    with pytest.raises(ValueError, match="factors of layer 'fc'"):
        opt3.load_state_dict(saved)


def test_remove_hooks_stops_measuring():
    model = make_model()
    opt = AdaFisher(model, update_interval=1, **HYPER)
    opt.remove_hooks()
    loss_of(model, *batch(0)).backward()
    opt.step()
    assert all(torch.equal(layer.fisher_in, torch.ones_like(layer.fisher_in))
               for layer in opt._factors.layers.values())
    assert not any(m._forward_hooks for m in model.modules())


def test_pairing_is_by_ownership_not_by_position():
    """Parameters in another order, in two groups (no weight decay on biases and norms), one
    without a gradient: each still gets its own layer's F."""
    a, b = make_model(), make_model()
    decay = [p for n, p in b.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in b.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    oa = AdaFisher(a, update_interval=1, **HYPER)
    ob = AdaFisher(b, [{"params": rest[::-1]}, {"params": decay[::-1]}], update_interval=1,
                   **HYPER)
    for k in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            loss_of(m, *batch(k)).backward()
            o.step()
    sa, sb = snapshot(a, oa), snapshot(b, ob)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "learning rate"), ({"beta": 1.0}, "beta"), ({"damping": 0.0}, "damping"),
    ({"weight_decay": -1.0}, "weight_decay"), ({"gammas": (1.5, 0.1)}, "gammas"),
    ({"update_interval": 0}, "update_interval"), ({"backend": "tpu"}, "backend"),
])
def test_invalid_arguments_are_refused(kwargs, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        AdaFisher(model, **kwargs)
    assert not any(m._forward_hooks for m in model.modules()), "hooks left on a refused model"


def test_compiled_step_matches_eager():
    """Dynamo captures the step (the factor update included); the "eager" backend runs the
    captured graphs op by op, so the result is the eager one to the bit."""
    torch._dynamo.reset()
    models = [make_model(), make_model()]
    opts = [AdaFisher(m, update_interval=2, lr=torch.tensor(HYPER["lr"]),
                      weight_decay=HYPER["weight_decay"]) for m in models]
    steps = [opts[0].step, torch.compile(opts[1].step, backend="eager")]
    for k in range(4):
        for model, opt, step in zip(models, opts, steps):
            opt.zero_grad()
            loss_of(model, *batch(k)).backward()
            step()
        want, got = snapshot(models[0], opts[0]), snapshot(models[1], opts[1])
        assert all(torch.equal(got[key], want[key]) for key in got), k


def test_adafisherw_is_the_decoupled_variant():
    assert AdaFisherW.decoupled and not AdaFisher.decoupled
    with pytest.raises(TypeError, match="AdaFisherW.__init__"):
        AdaFisherW(make_model(), betas=(0.9, 0.99))
