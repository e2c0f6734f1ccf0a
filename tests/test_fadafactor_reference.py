"""FAdafactor's own rules on backend="reference": the factoring's properties (zero rows, the
rank-1 identity, a hand-computed FIM), its state and its memory per parameter, and a FAdam
checkpoint refused. tests/test_scenarios.py runs the scenarios it shares with FAdam (parity with
the float64 oracle, skips, checkpoints across backends, errors) on every backend."""

import math

import pytest
import torch

from fadam_fused import FAdafactor, FAdam, reference
from fadam_testing import FADAFACTOR, edge_problem


def test_zero_row_and_zero_gradient_give_zero_fim():
    problem = edge_problem(steps=1)
    _, params, opt = FADAFACTOR.run(problem, "reference", lr=1e-2)
    state = opt.state[params[0]]
    assert state["fim_row"][2] == 0  # R_i = 0: its row of f is 0, d = eps^(2p)
    assert (state["fim_row"][torch.arange(6) != 2] > 0).all()
    zero = opt.state[params[1]]  # sum R = 0 at step 1 (b2hat = 0): f = 0, not 0 / 0
    assert torch.equal(zero["fim_row"], torch.zeros(4)) and torch.equal(zero["fim_col"],
                                                                         torch.zeros(5))
    assert torch.equal(zero["momentum"], torch.zeros(4, 5))
    # Only the (clipped) natural weight decay moved it: theta - lr wd w / s2, w = theta / eps.
    w = problem.init[1].double() / 1e-8
    s2 = max(1.0, float(w.square().mean().sqrt()))
    expect = problem.init[1].double() - 1e-2 * 1e-3 * w / s2
    torch.testing.assert_close(params[1].detach().double(), expect, atol=1e-6, rtol=1e-5)


def test_rank_one_square_gradient_equals_fadam():
    # When g^2 is rank-1 (g_ij^2 = a_i b_j), R_i C_j / sum R = g_ij^2: FAdafactor's first step
    # is FAdam's, an identity the oracle's code does not use.
    gen = torch.Generator().manual_seed(3)
    a, b = torch.rand(7, 1, generator=gen) + 0.1, torch.rand(1, 5, generator=gen) + 0.1
    sign = torch.randint(0, 2, (7, 5), generator=gen) * 2 - 1
    grad = (a * b).sqrt() * sign
    init = torch.randn(7, 5, generator=gen)
    out = []
    for cls in (FAdafactor, FAdam):
        param = torch.nn.Parameter(init.clone())
        opt = cls([param], lr=1e-2, backend="reference")
        param.grad = grad.clone()
        opt.step()
        out.append(param.detach())
    torch.testing.assert_close(out[0], out[1], atol=1e-7, rtol=1e-6)


def test_factored_fim_by_hand():
    # One step (b2hat = 0) of a 2 x 3 gradient: R = (1 + 4 + 0, 9 + 0 + 1) = (5, 10),
    # C = (10, 4, 1), f = R C / 15.
    g = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]], dtype=torch.float64)
    _, _, _, rows, cols, f = reference.factored_fim(
        torch.zeros(2, 3), g, torch.ones(2), torch.ones(3), torch.tensor(1.0), beta2=0.999,
        maximize=False, upcast=True)
    assert rows.tolist() == [5.0, 10.0] and cols.tolist() == [10.0, 4.0, 1.0]
    torch.testing.assert_close(f, torch.outer(rows, cols) / 15.0)


def test_state_keys_shapes_and_float32_for_bf16():
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.bfloat16))
              for s in [(4, 6), (2, 3, 5), (7,)]]
    opt = FAdafactor(params, backend="reference")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    s0, s1, s2 = (opt.state[p] for p in params)
    assert sorted(s0) == ["fim_col", "fim_row", "momentum", "step"]
    assert s0["fim_row"].shape == (4,) and s0["fim_col"].shape == (6,)
    assert s1["fim_row"].shape == (2, 3) and s1["fim_col"].shape == (2, 5)
    assert sorted(s2) == ["fim", "momentum", "step"]
    for st in (s0, s1, s2):
        assert all(v.dtype == torch.float32 for v in st.values())


def test_fadam_checkpoint_is_refused_by_name():
    # A FAdam checkpoint (a full 'fim') is not a FAdafactor one.
    fadam = FAdam([torch.nn.Parameter(torch.randn(4, 5))])
    fadam.param_groups[0]["params"][0].grad = torch.randn(4, 5)
    fadam.step()
    fresh = FAdafactor([torch.nn.Parameter(torch.randn(4, 5))])
    with pytest.raises(ValueError, match="has no 'fim_row' or 'fim_col'"):
        fresh.load_state_dict(fadam.state_dict())
    assert not fresh.state


def llm_state_bytes_per_param(optimizer_cls, d_model=256, n_layers=2, vocab=1024):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.workloads import llm_shapes
    params = [torch.nn.Parameter(torch.zeros(s)) for s in llm_shapes(d_model, n_layers, vocab)]
    opt = optimizer_cls(params, backend="reference")
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    state = sum(v.numel() * v.element_size() for st in opt.state.values()
                for k, v in st.items() if k != "step")
    return state / sum(p.numel() for p in params)


def test_state_memory_per_parameter_on_an_llm_list():
    fadafactor = llm_state_bytes_per_param(FAdafactor)
    assert fadafactor <= 4.2, fadafactor
    assert math.isclose(llm_state_bytes_per_param(FAdam), 8.0)
