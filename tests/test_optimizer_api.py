"""The drop-in optimizer contract (docs/design.md, sections 2 and 6) where it is FAdam's own or
torch.optim's: public checkpoint layouts, memory layouts, closures, hooks, schedulers, the
functional form. tests/test_scenarios.py runs what FAdam and FAdafactor share on every backend
(non-finite skips, GradScaler, checkpoints across backends, every refused input)."""

import pytest
import torch

from fadam_fused import FAdam, backends, fadam
from fadam_testing import make_problem, run_optimizer

BACKENDS = ["cpu", "reference"]


# --- state_dict ---------------------------------------------------------------------------------


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


# --- memory layouts and devices -------------------------------------------------------------------


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a gradient on another device needs a GPU")
def test_gradient_on_another_device_raises_and_changes_nothing():
    p = torch.nn.Parameter(torch.randn(4, device="cuda"))
    opt = FAdam([("w", p)])
    p.grad = torch.zeros_like(p)
    p.grad.data = torch.zeros(4)
    with pytest.raises(RuntimeError, match="'w'.*is on cpu but the parameter is on cuda"):
        opt.step()
    assert len(opt.state) == 0


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
    for x, y in zip(params, snaps[-1]["params"]):
        assert torch.equal(x, y)


def test_unavailable_reasons_are_actionable():
    assert backends.unavailable_reason("cpu", torch.device("cpu")) is None
    assert "CUDA tensors" in backends.unavailable_reason("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="Invalid backend"):
        backends.unavailable_reason("nope", torch.device("cpu"))


def test_skipped_steps_counts_a_compiled_first_step():
    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.ones(4))
    opt = FAdam([p], lr=torch.tensor(1e-2), backend="cpu")
    p.grad = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    torch.compile(opt.step, fullgraph=True)()
    assert float(opt.skipped_steps) == 1.0
    assert torch.equal(p.detach(), torch.ones(4))
