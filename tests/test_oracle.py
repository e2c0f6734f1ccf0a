"""The oracle against values derived by hand from the algorithm (docs/design.md, section 1), in plain Python floats."""

import math

import pytest
import torch

from fadam_fused import reference


def _step(params, grads, moms, fims, steps, **hyper):
    return reference.fadam_reference(params, grads, moms, fims, steps, upcast=True, **hyper)


HYPER = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, clip=1.0, weight_decay=0.1, p=0.5,
             maximize=False)


def _hand_step(theta, m, f, g, t, lr, beta1, beta2, eps, clip, weight_decay, p):
    """The algorithm for one small tensor, element by element."""
    b2hat = beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t)
    f = [b2hat * fi + (1 - b2hat) * gi * gi for fi, gi in zip(f, g)]
    d = [fi**p + eps ** (2 * p) for fi in f]
    ghat = [gi / di for gi, di in zip(g, d)]
    rms = lambda xs: math.sqrt(sum(x * x for x in xs) / len(xs))  # noqa: E731
    s1 = max(1.0, rms(ghat) / clip) if clip else 1.0
    m = [beta1 * mi + (1 - beta1) * gh / s1 for mi, gh in zip(m, ghat)]
    w = [th / di for th, di in zip(theta, d)]
    s2 = max(1.0, rms(w) / clip) if clip else 1.0
    theta = [th - lr * (mi + weight_decay * wi / s2) for th, mi, wi in zip(theta, m, w)]
    return theta, m, f, s1, s2


def test_first_step_fim_is_g_squared_and_ghat_is_g_over_abs_g_plus_eps():
    g = torch.tensor([0.5, -2.0, 1e-3, 0.0], dtype=torch.float64)
    theta = torch.zeros(4, dtype=torch.float64)
    m, f = torch.zeros_like(g), torch.ones_like(g)
    step = torch.zeros(())
    _step([theta], [g], [m], [f], [step], **{**HYPER, "clip": None, "weight_decay": 0.0})
    assert float(step) == 1.0
    assert torch.equal(f, g * g)  # b2hat = 0 at t = 1
    ghat = g / (g.abs() + 1e-8)
    torch.testing.assert_close(m, 0.1 * ghat, atol=0, rtol=1e-15)
    torch.testing.assert_close(theta, -0.1 * m, atol=0, rtol=1e-15)


@pytest.mark.parametrize("clip", [1.0, None], ids=["clip-on", "clip-off"])
def test_three_elements_two_steps_by_hand(clip):
    theta0, g1, g2 = [1.0, -2.0, 0.5], [0.1, -0.2, 0.0], [0.3, 0.1, -0.05]
    hyper = {**HYPER, "clip": clip}
    theta = torch.tensor(theta0, dtype=torch.float64)
    m, f = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    step = torch.zeros(())

    args = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, clip=clip, weight_decay=0.1, p=0.5)
    h_theta, h_m, h_f, s1, s2 = _hand_step(theta0, [0.0] * 3, [1.0] * 3, g1, 1, **args)
    _step([theta], [torch.tensor(g1, dtype=torch.float64)], [m], [f], [step], **hyper)
    for got, want in ((theta, h_theta), (m, h_m), (f, h_f)):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-15, rtol=1e-12)
    # Step 1: the third element has g = 0, so d = eps and w = 0.5 / 1e-8 = 5e7 dominates RMS(w):
    # the weight decay is clipped (s2 = RMS(w) ~ 2.9e7) exactly when clipping is on.
    assert s1 == 1.0  # RMS(ghat) = sqrt(2/3) < 1
    if clip:
        assert s2 == pytest.approx(math.sqrt((10.0**2 + 10.0**2 + 5e7**2) / 3), rel=1e-6)
    else:
        assert s2 == 1.0

    h_theta, h_m, h_f, s1, s2 = _hand_step(h_theta, h_m, h_f, g2, 2, **args)
    _step([theta], [torch.tensor(g2, dtype=torch.float64)], [m], [f], [step], **hyper)
    for got, want in ((theta, h_theta), (m, h_m), (f, h_f)):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-15, rtol=1e-12)
    assert float(step) == 2.0
    # Step 2: b2hat = 0.999 (1 - 0.999) / (1 - 0.999^2) = 0.999 / 1.999.
    b2hat = 0.999 / 1.999
    assert h_f[0] == pytest.approx(b2hat * 0.01 + (1 - b2hat) * 0.09, rel=1e-14)


def test_clipping_active_scales_the_natural_gradient():
    # ghat = g / (|g| + eps) ~ sign(g) at step 1, so RMS(ghat) ~ 1: with clip 0.5, s1 ~ 2.
    g = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    theta = torch.zeros(4, dtype=torch.float64)
    m, f, step = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), torch.zeros(())
    _step([theta], [g], [m], [f], [step], **{**HYPER, "clip": 0.5, "weight_decay": 0.0})
    torch.testing.assert_close(m, 0.1 * (g / (1 + 1e-8)) / (1 / (1 + 1e-8) / 0.5), atol=0, rtol=1e-14)


def test_zero_gradient_gives_no_nan():
    theta = torch.randn(5, dtype=torch.float64)
    g = torch.zeros(5, dtype=torch.float64)
    m, f, step = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64), torch.zeros(())
    for _ in range(3):
        _step([theta], [g], [m], [f], [step], **{**HYPER, "eps": 1e-30})
    assert torch.isfinite(theta).all() and torch.isfinite(m).all() and torch.isfinite(f).all()


def test_nonfinite_gradient_skips_everything():
    theta = torch.randn(3, dtype=torch.float64)
    before = theta.clone()
    m, f, step = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.zeros(())
    skip = _step([theta], [torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64)], [m], [f],
                 [step], **HYPER)
    assert float(skip) == 1.0 and float(step) == 0.0
    assert torch.equal(theta, before) and torch.equal(m, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(f, torch.ones(3, dtype=torch.float64))
