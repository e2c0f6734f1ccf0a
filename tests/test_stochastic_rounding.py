"""bfloat16 stochastic rounding ([note: stochastic rounding] in fadam_fused/op_contract.py) and
bfloat16 momentums, on every backend that runs here: the CPU kernels, the reference, Triton's
kernels in the interpreter and the CUDA kernels compiled for the CPU ("cuda-emulated",
tests/test_cuda_emulated.py); "cuda" runs the same tests on a GPU (compiled Triton and graph
capture: tests/test_triton_optimizer.py).

The bit-exact cases use an update every backend computes with the same float32 operations: a zero
gradient and no weight decay give m' = beta1 m and theta' = theta - a m' (FAdam and FAdafactor:
ghat = 0, the weight decay term 0 * w, a = lr; AdaFisher: F = 1 for parameters of no layer,
a = float32(lr / (1 - beta^t))), so the stored bfloat16 bits differ only by the rounding, which
the oracle (reference.rounding_bits / round_bf16_stochastic) predicts element by element.
"""

from __future__ import annotations

import copy
import math
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported

import pytest  # noqa: E402
from conftest import use_emulated_cuda  # noqa: E402

from fadam_fused import AdaFisher, FAdafactor, FAdam, backends, op_contract, reference  # noqa: E402

CPU = torch.device("cpu")
EMULATED = "cuda-emulated"  # backend="cuda" on CPU tensors: the CUDA kernels under HIP-CPU
# "cuda": backend="cuda" on a GPU; it and EMULATED skip where they cannot run (_backend).
BACKENDS = ([b for b in ("cpu", "reference", "triton") if backends.unavailable_reason(b, CPU) is None]
            + [EMULATED, "cuda"])
# Several chunks per tensor on the fused backends, so a chunk's first element (e0) counts.
CHUNKS = {"cpu": 500, "triton": 512, "cuda": 512}
SHAPES = [(37,), (5, 300), (3,), (2, 3, 41)]
OPTIMIZERS = {"fadam": FAdam, "fadafactor": FAdafactor, "adafisher": AdaFisher}
BETA1, LR = 0.9, 1e-3
M32, M16 = torch.float32, torch.bfloat16
# (backend, optimizer, momentum dtype). Triton's interpreter takes ~15-30 s per FAdafactor case:
# it runs the cases that cover its kernels' paths (SR of theta alone, of theta and m).
BIT_CASES = ([(b, name, m) for b in BACKENDS if b != "triton" for name in OPTIMIZERS
              for m in (M32, M16)]
             + ([("triton", "fadam", M32), ("triton", "fadafactor", M16),
                 ("triton", "adafisher", M16)] if "triton" in BACKENDS else []))


@pytest.fixture
def small_chunks(monkeypatch):
    for backend, chunk in CHUNKS.items():
        monkeypatch.setitem(op_contract.CHUNK_SIZE, backend, chunk)
    for cache in ("_FUSED", "_FACTORED", "_ADAFISHER", "_AVAILABLE"):
        monkeypatch.setattr(backends, cache, {})


def _backend(name, monkeypatch):
    """(backend=, device) of parametrized backend `name`: EMULATED switches the emulated CUDA
    kernels on for this test (skipping without that build), "cuda" needs a GPU."""
    if name == EMULATED:
        use_emulated_cuda(monkeypatch)
        return "cuda", CPU
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        return "cuda", torch.device("cuda")
    return name, CPU


def _make(name, params, *, betas=(BETA1, 0.999), **kw):
    """Optimizer `name` over `params`, with FAdam's argument names (AdaFisher takes betas[0] as
    its beta, and a model without layers: F = 1 for every parameter)."""
    if name == "adafisher":
        return AdaFisher(torch.nn.Module(), params, beta=betas[0], **kw)
    return OPTIMIZERS[name](params, betas=betas, **kw)


def _coef(name, lr, t):
    """a of the module doc, as a float32 value: the multiplier of m' in theta' = theta - a m'."""
    if name != "adafisher":
        return op_contract.f32(lr)
    bc = 1 - BETA1 ** torch.tensor(float(t), dtype=torch.float64)  # as the kernels, in float64
    return (lr / bc).float().item()


def _preset(opt, params, momentums, step):
    """Gives every parameter the state of step `step` with the given momentums."""
    for p, m in zip(params, momentums):
        state = opt.kind_of(p).new_state(p)
        state["momentum"] = m.clone()
        state["step"] = torch.tensor(float(step), device=p.device)
        opt.state[p] = state


def _exact_step(name, backend, rounding, momentum_dtype, *, shapes=SHAPES, step=3, seed=1234,
                lr=LR, theta=None, momentum=None, device=CPU, steps=1):
    """`steps` steps of the exact update (module doc) from step `step`; returns (params before,
    momentums before, params after, momentums after), as CPU tensors."""
    gen = torch.Generator().manual_seed(0)
    params = [(torch.randn(s, generator=gen) if theta is None else torch.full(s, theta))
              .bfloat16().to(device).requires_grad_() for s in shapes]
    moms = [(torch.randn(s, generator=gen) * 0.3 if momentum is None else torch.full(s, momentum))
            .to(device, momentum_dtype) for s in shapes]
    opt = _make(name, params, lr=lr, weight_decay=0.0, backend=backend, bf16_rounding=rounding,
                rounding_seed=seed, momentum_dtype=momentum_dtype)
    _preset(opt, params, moms, step)

    def host(tensors):
        return [x.detach().to(CPU, copy=True) for x in tensors]

    before = host(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    return before, host(moms), host(params), host(opt.state[p]["momentum"] for p in params)


def _oracle(before, moms, *, name="fadam", step=3, seed=1234, lr=LR, stochastic=True):
    """The oracle's params and momentums after the exact step of optimizer `name`."""
    f32 = op_contract.f32
    params, momentums = [], []
    t = torch.tensor(float(step + 1))
    a = _coef(name, lr, step + 1)
    for position, (theta, m) in enumerate(zip(before, moms)):
        m_new = f32(BETA1) * m.float()
        x = theta.float() - a * m_new
        if not stochastic:
            params.append(x.bfloat16())
            momentums.append(m_new.to(m.dtype))
            continue
        index = torch.arange(x.numel())
        key = op_contract.tensor_seed(seed, position)
        params.append(reference.round_bf16_stochastic(
            x.reshape(-1), reference.rounding_bits(key, t, index, 0)).view(x.shape))
        if m.dtype == torch.bfloat16:
            m_new = reference.round_bf16_stochastic(
                m_new.reshape(-1), reference.rounding_bits(key, t, index, 1)).view(x.shape)
        momentums.append(m_new.to(m.dtype))
    return params, momentums


@pytest.mark.parametrize("backend,name,momentum_dtype", BIT_CASES,
                         ids=[f"{b}-{n}-{str(m)[-8:]}" for b, n, m in BIT_CASES])
def test_same_bits_as_the_oracle_on_every_backend(small_chunks, monkeypatch, backend, name,
                                                  momentum_dtype):
    backend, device = _backend(backend, monkeypatch)
    before, moms, params, momentums = _exact_step(name, backend, "stochastic", momentum_dtype,
                                                  device=device)
    want_p, want_m = _oracle(before, moms, name=name)
    for got, want in zip(params + momentums, want_p + want_m):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)
    # Nearest gives the oracle's nearest bits, and differs from stochastic somewhere.
    _, _, near_p, near_m = _exact_step(name, backend, "nearest", momentum_dtype, device=device)
    near_want_p, near_want_m = _oracle(before, moms, name=name, stochastic=False)
    for got, want in zip(near_p + near_m, near_want_p + near_want_m):
        assert torch.equal(got, want)
    assert any(not torch.equal(a, b) for a, b in zip(params, near_p))


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_several_steps_give_the_oracles_bits(small_chunks, monkeypatch, backend, name):
    """Three steps in a row (t = 4, 5, 6: each its own key), bfloat16 momentums rounded and read
    back: every step's bits are the oracle's."""
    backend, device = _backend(backend, monkeypatch)
    before, moms, params, momentums = _exact_step(name, backend, "stochastic", torch.bfloat16,
                                                  device=device, steps=3)
    want_p, want_m = before, moms
    for step in (3, 4, 5):
        want_p, want_m = _oracle(want_p, want_m, name=name, step=step)
    for got, want in zip(params + momentums, want_p + want_m):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend,name", [(b, n) for n in ("fadam", "adafisher") for b in BACKENDS])
def test_stochastic_rounding_is_unbiased_where_nearest_stalls(monkeypatch, backend, name):
    """theta = 1.5 (bfloat16 ulp 2^-7), an update of 0.01 ulp: round to nearest leaves every
    element at 1.5; stochastic rounding moves 1% of them down one ulp, so the mean over N
    elements is the float32 result within its standard error ulp sqrt(q (1 - q) / N)."""
    # 2^14 elements: 5 standard errors are 0.004 ulp; 2^12 in Triton's (slow) interpreter: 0.008.
    n, ulp = 1 << (12 if backend == "triton" else 14), 2.0 ** -7
    backend, device = _backend(backend, monkeypatch)
    f32 = op_contract.f32
    lr = 0.01 * ulp / f32(BETA1) / _coef(name, 1.0, 4)  # m' = beta1 * 1; step 3 + 1
    shapes = [(n,)]
    before, moms, sr, sr_m = _exact_step(name, backend, "stochastic", torch.bfloat16,
                                         shapes=shapes, lr=lr, theta=1.5, momentum=1.0,
                                         device=device)
    _, _, near, _ = _exact_step(name, backend, "nearest", torch.bfloat16, shapes=shapes, lr=lr,
                                theta=1.5, momentum=1.0, device=device)
    # The float32 result: 1.5 - a m' in float32 operations.
    x = (torch.tensor(1.5) - torch.tensor(_coef(name, lr, 4)) * torch.tensor(f32(BETA1))).item()
    assert 0.005 < (1.5 - x) / ulp < 0.02
    assert torch.equal(near[0], before[0])  # nearest: stalled
    q = (1.5 - x) / ulp
    sigma = ulp * math.sqrt(q * (1 - q) / n)
    mean = sr[0].double().mean().item()
    assert abs(mean - x) <= 5 * sigma, (mean, x, sigma)
    assert set(sr[0].double().unique().tolist()) == {1.5, 1.5 - ulp}
    # The bfloat16 momentum: 0.9 lies between grid points 2^-8 apart; its mean is 0.9.
    m_x = op_contract.f32(BETA1)
    m_ulp = 2.0 ** -8
    q_m = (m_x - math.floor(m_x / m_ulp) * m_ulp) / m_ulp
    sigma_m = m_ulp * math.sqrt(q_m * (1 - q_m) / n)
    assert abs(sr_m[0].double().mean().item() - m_x) <= 5 * sigma_m


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("momentum_dtype", [M32, M16], ids=str)
def test_gpu_adafisher_draws_the_oracle_bits(backend, momentum_dtype):
    """AdaFisher's CUDA update and compiled Triton kernel on CUDA tensors, a tensor of two GPU
    chunks (70000 elements) among them: the oracle's bits but where the GPU's contracted
    multiply-add (theta - a m' in one rounding) moves the float32 value, which can flip a
    stochastic rounding by one bfloat16 ulp (about 2^-16 of the elements)."""
    if backends.unavailable_reason(backend, torch.device("cuda")) is not None:
        pytest.skip(backends.unavailable_reason(backend, torch.device("cuda")))
    shapes = SHAPES + [(70000,)]
    before, moms, params, momentums = _exact_step("adafisher", backend, "stochastic",
                                                  momentum_dtype, shapes=shapes, device="cuda")
    want_p, want_m = _oracle([b.cpu() for b in before], [m.cpu() for m in moms],
                             name="adafisher")
    same = total = 0
    for got, want in zip(params + momentums, want_p + want_m):
        got = got.cpu()
        assert got.dtype == want.dtype
        ulp = torch.maximum(got.abs(), want.abs()).float() * 2.0 ** -7
        assert ((got.float() - want.float()).abs() <= ulp).all()
        same += (got == want).sum().item()
        total += got.numel()
    assert same >= total - max(8, total >> 12), (same, total)


def _random_run(name, backend, steps, *, opt=None, params=None, grads, momentum_dtype,
                seed=None):
    if opt is None:
        opt = _make(name, params, lr=1e-2, backend=backend, bf16_rounding="stochastic",
                    rounding_seed=seed, momentum_dtype=momentum_dtype)
    for k in range(steps):
        for p, g in zip(opt.param_groups[0]["params"], grads[k]):
            p.grad = g.to(p.device, copy=True)
        opt.step()
    return opt


def _grads(shapes, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen).bfloat16() for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("backend,name", [(b, n) for b in ("cpu", "reference", EMULATED)
                                          for n in OPTIMIZERS])
def test_resume_from_a_state_dict_continues_the_same_bits(monkeypatch, backend, name):
    backend, _ = _backend(backend, monkeypatch)
    grads = _grads(SHAPES, 6)
    torch.manual_seed(7)  # the seed is drawn from torch's default generator
    params = [torch.randn(s).bfloat16().requires_grad_() for s in SHAPES]
    opt = _random_run(name, backend, 3, params=params, grads=grads, momentum_dtype=torch.bfloat16)
    seed = opt.param_groups[0]["rounding_seed"]
    assert isinstance(seed, int)
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    _random_run(name, backend, 3, opt=opt, grads=grads[3:], momentum_dtype=torch.bfloat16)

    torch.manual_seed(99)  # another default seed: the checkpoint's must win
    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = _make(name, resumed, lr=1e-2, backend=backend, bf16_rounding="stochastic",
                 momentum_dtype=torch.bfloat16)
    assert opt2.param_groups[0]["rounding_seed"] != seed
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["rounding_seed"] == seed
    assert all(opt2.state[p]["momentum"].dtype == torch.bfloat16 for p in resumed)
    _random_run(name, backend, 3, opt=opt2, grads=grads[3:], momentum_dtype=torch.bfloat16)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key]), key


def test_the_default_seed_is_reproducible_and_saved():
    def seed_of():
        torch.manual_seed(3)
        p = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
        return FAdam([p], bf16_rounding="stochastic").param_groups[0]["rounding_seed"]

    assert seed_of() == seed_of()
    torch.manual_seed(3)
    p = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    opt = FAdam([p])  # nearest: draws nothing, saves None
    assert opt.param_groups[0]["rounding_seed"] is None
    assert opt.state_dict()["param_groups"][0]["bf16_rounding"] == "nearest"


@pytest.mark.parametrize("backend,name", [(b, n) for b in BACKENDS for n in OPTIMIZERS
                                          if b != "triton" or n != "fadafactor"])
def test_a_nonfinite_gradient_skips_the_step_bit_identically(small_chunks, monkeypatch, backend,
                                                             name):
    backend, device = _backend(backend, monkeypatch)
    params = [torch.randn(s).bfloat16().to(device).requires_grad_() for s in SHAPES]
    opt = _random_run(name, backend, 2, params=params, grads=_grads(SHAPES, 2), seed=5,
                      momentum_dtype=torch.bfloat16)
    before = [p.detach().clone() for p in params]
    state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    grads = _grads(SHAPES, 1, seed=2)
    grads[0][1][2, 3] = float("nan")
    _random_run(name, backend, 1, opt=opt, grads=grads, momentum_dtype=torch.bfloat16)
    assert opt.skipped_steps.item() == 1
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        for key, value in opt.state[p].items():
            assert torch.equal(value, state[p][key]), key


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bfloat16_momentum_follows_the_oracle(name):
    """Random gradients over 8 steps, the CPU kernels against the reference ops: the float32
    math agrees to ulps, which can flip a stochastic rounding of theta or m one bfloat16 ulp
    (both backends draw the same bits, so nearly every element is identical)."""
    grads = _grads(SHAPES, 8)
    runs = {}
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)
        params = [torch.randn(s).bfloat16().requires_grad_() for s in SHAPES]
        opt = _random_run(name, backend, 8, params=params, grads=grads, seed=11,
                          momentum_dtype=torch.bfloat16)
        runs[backend] = (params, [opt.state[p]["momentum"] for p in params], opt)
    (cp, cm, copt), (rp, rm, _) = runs["cpu"], runs["reference"]
    same = total = 0
    for a, b in zip(cp + cm, rp + rm):
        assert a.dtype == b.dtype == torch.bfloat16
        ulp = torch.maximum(a.abs(), b.abs()).float() * 2.0 ** -7
        assert ((a.float() - b.float()).abs() <= ulp).all()
        same += (a == b).sum().item()
        total += a.numel()
    assert same >= 0.99 * total, (same, total)
    # The state is 6 B per parameter for FAdam: a bfloat16 momentum and a float32 FIM.
    if name == "fadam":
        numel = sum(p.numel() for p in cp)
        state_bytes = sum(copt.state[p][k].nbytes for p in cp for k in ("momentum", "fim"))
        assert state_bytes == 6 * numel


def test_stochastic_rounding_leaves_float32_parameters_as_nearest():
    grads = [[g.float() for g in step] for step in _grads(SHAPES, 3)]
    out = []
    for rounding in ("nearest", "stochastic"):
        torch.manual_seed(0)
        params = [torch.randn(s).requires_grad_() for s in SHAPES]
        opt = FAdam(params, backend="cpu", bf16_rounding=rounding, rounding_seed=1)
        for k in range(3):
            for p, g in zip(params, grads[k]):
                p.grad = g
            opt.step()
        out.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_refused_options_name_the_problem(name):
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid bf16_rounding value: 'up'"):
        _make(name, [p], bf16_rounding="up")
    with pytest.raises(ValueError, match="Invalid momentum_dtype value"):
        _make(name, [p], momentum_dtype=torch.float16)
    with pytest.raises(ValueError, match="Invalid rounding_seed value"):
        _make(name, [p], rounding_seed=-1)
    with pytest.raises(ValueError, match="Invalid rounding_seed value"):
        _make(name, [p], rounding_seed=1.5)
    # A group switched to stochastic between steps with no seed is refused before any write.
    opt = _make(name, [p])
    opt.param_groups[0]["bf16_rounding"] = "stochastic"
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="rounding_seed None"):
        opt.step()
    assert torch.equal(p, torch.zeros_like(p)) and not opt.state


def test_a_momentum_of_another_dtype_than_the_group_says_is_refused_by_name():
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    opt = FAdam([("w", p)], momentum_dtype=torch.bfloat16, backend="cpu")
    p.grad = torch.ones_like(p)
    opt.step()
    opt.param_groups[0]["momentum_dtype"] = torch.float32
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="state 'momentum' of parameter 'w' must be float32"):
        opt.step()
    assert torch.equal(p, before)


def test_a_float32_momentum_checkpoint_loads_into_a_bfloat16_group_and_back():
    params = [torch.randn(s).bfloat16().requires_grad_() for s in SHAPES]
    opt = _random_run("fadam", "cpu", 2, params=params, grads=_grads(SHAPES, 2), seed=1,
                      momentum_dtype=torch.float32)
    saved = opt.state_dict()
    saved["param_groups"][0]["momentum_dtype"] = torch.bfloat16
    opt.load_state_dict(saved)
    for i, p in enumerate(params):
        assert opt.state[p]["momentum"].dtype == torch.bfloat16
        assert torch.equal(opt.state[p]["momentum"], saved["state"][i]["momentum"].bfloat16())
    bad = copy.deepcopy(saved)
    bad["state"][0]["momentum"][0] = float("nan")
    with pytest.raises(ValueError, match="saved 'momentum' of parameter 0 .* NaN"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["momentum_dtype"] = torch.float16
    with pytest.raises(ValueError, match="param group 0 .* Invalid momentum_dtype"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["momentum_dtype"] == torch.bfloat16


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_ops_refuse_a_rounding_list_of_the_wrong_length(backend):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not available here")
    ops = backends.fused(backend)
    params = [torch.zeros(4, dtype=torch.bfloat16)]
    fims, moms = [torch.ones(4)], [torch.zeros(4)]
    partials = op_contract.new_partials(params, ops.chunk_size)
    with pytest.raises((RuntimeError, ValueError), match="rounding must be empty or hold 4"):
        ops.phase_b(params, [torch.zeros(4, dtype=torch.bfloat16)], fims, moms,
                    [torch.ones(())], partials, torch.zeros(()), None, None, lr=1e-3, beta1=0.9,
                    beta2=0.999, eps=1e-8, p=0.5, clip=1.0, weight_decay=0.0, maximize=False,
                    chunk_size=ops.chunk_size, fuse_one_chunk=True, rounding=[1, 0, 4])
    assert torch.equal(params[0], torch.zeros(4, dtype=torch.bfloat16))


# A sharded-style row per tensor at op level: local block (7, 13) at column 5 of a logical
# (7, 40) tensor, a whole (37,) run at element 100 of a logical flat tensor, and (3, 5, 9) at
# column 11 of a logical (3, 5, 20): local element e is logical base + (e // il) * ig + e % il.
OP_SHARDS = [((7, 13), 5, 40), ((37,), 100, 37), ((3, 5, 9), 11, 20)]


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", ["cpu", EMULATED, "cuda"])
def test_op_level_sharded_rows_draw_the_logical_bits(monkeypatch, backend, param_dtype):
    """FAdam's ops with a rounding row of inner_local != inner_global per tensor, bfloat16
    momentums, the exact update (g = 0), chunks of 64 (tails, and chunks that start mid-run): the
    parameter (when bfloat16) and the momentum are the oracle's bits for the logical indices. A
    float32 parameter is stored as is, only its bfloat16 momentum rounds."""
    if backend != "cpu":
        monkeypatch.setitem(op_contract.CHUNK_SIZE, "cuda", 64)
    backend, device = _backend(backend, monkeypatch)
    monkeypatch.setitem(op_contract.CHUNK_SIZE, "cpu", 64)
    monkeypatch.setattr(backends, "_FUSED", {})
    ops = backends.fused(backend)
    gen = torch.Generator().manual_seed(3)
    shapes = [shape for shape, _, _ in OP_SHARDS]
    params = [torch.randn(s, generator=gen).to(param_dtype) for s in shapes]
    moms = [(torch.randn(s, generator=gen) * 0.3).bfloat16() for s in shapes]
    seeds = [op_contract.tensor_seed(77, k) for k in range(len(shapes))]
    rows = [[seed, base, shape[-1], inner_global]
            for seed, (shape, base, inner_global) in zip(seeds, OP_SHARDS)]
    t = 9.0
    on = {"device": device}
    dev_params = [p.to(**on, copy=True) for p in params]
    dev_moms = [m.to(**on, copy=True) for m in moms]
    grads = [torch.zeros_like(p) for p in dev_params]
    fims = [torch.rand(s, generator=gen).add(0.5).to(**on) for s in shapes]
    steps = [torch.tensor(t, **on) for _ in shapes]
    skip = torch.zeros((), **on)
    partials = op_contract.new_partials(dev_params, ops.chunk_size)
    ops.phase_a(dev_params, grads, fims, steps, partials, skip, None, beta2=0.999, eps=1e-8,
                p=0.5, clip=1.0, maximize=False, chunk_size=ops.chunk_size, fuse_one_chunk=False)
    ops.phase_b(dev_params, grads, fims, dev_moms, steps, partials, skip, None, None, lr=LR,
                beta1=BETA1, beta2=0.999, eps=1e-8, p=0.5, clip=1.0, weight_decay=0.0,
                maximize=False, chunk_size=ops.chunk_size, fuse_one_chunk=False,
                rounding=[x for row in rows for x in row])
    f32, step = op_contract.f32, torch.tensor(t)
    for k, (theta, m, row) in enumerate(zip(params, moms, rows)):
        seed, base, inner_local, inner_global = row
        index = reference.logical_index(theta.numel(), base, inner_local, inner_global, CPU)
        m_new = f32(BETA1) * m.float().reshape(-1)
        x = theta.float().reshape(-1) - f32(LR) * m_new
        want_m = reference.round_bf16_stochastic(m_new, reference.rounding_bits(seed, step, index,
                                                                                1))
        want_p = (reference.round_bf16_stochastic(x, reference.rounding_bits(seed, step, index, 0))
                  if param_dtype == torch.bfloat16 else x)
        assert torch.equal(dev_moms[k].cpu().reshape(-1), want_m), k
        assert torch.equal(dev_params[k].cpu().reshape(-1), want_p), k
