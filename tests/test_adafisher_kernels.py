"""AdaFisher's fused kernels ([note: the AdaFisher op contract] in fadam_fused/op_contract.py) on
every backend that runs here, against the reference op set (reference.ADAFISHER_OPS) and the
float64 oracle (reference.AdaFisherReference):

- "cpu": csrc/cpu/adafisher_cpu.cpp;
- "cuda_emulated": csrc/cuda/adafisher_cuda.cu compiled for the CPU with HIP-CPU (the emulated
  build, [note: one CUDA source, two compilers] in csrc/cuda/launch.h), on CPU tensors;
- "triton": triton_kernels/_adafisher_kernels.py, in Triton's interpreter on CPU tensors without a
  GPU, compiled on CUDA tensors with one;
- "cuda": the nvcc build on a GPU (skipped, with the reason, without one).

Tolerances as tests/fadam_testing.py: float32 |fast - ref64| <= 1e-6 + 1e-5 |ref64|; bfloat16 and
float16 parameters within twice the same-precision reference's own error plus one ATOL[dtype],
their float32 momentum within that slack plus the float32 tolerance. Sizes stay small: the
interpreter and the emulation run every program on the host.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported

import pytest  # noqa: E402

from adafisher_testing import assert_close, run, run_oracle  # noqa: E402
from fadam_fused import _ext, backends, op_contract, reference  # noqa: E402
from fadam_testing import ATOL, RTOL  # noqa: E402

GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _emulated_reason() -> str | None:
    op_contract.define_adafisher_ops(op_contract.EMULATED_CUDA_ADAFISHER)  # as _ext does
    op_contract.define_phase_ops(*op_contract.EMULATED_CUDA_OPS)
    op_contract.define_fadafactor_ops(op_contract.EMULATED_CUDA_FADAFACTOR)
    try:
        from fadam_fused import _C_cuda_emulated  # noqa: F401
    except ImportError as exc:
        return (f"the emulated CUDA build is missing ({exc}): build with FADAM_HIP_CPU="
                "../shared/third_party/hip-cpu (make test does when that folder exists)")
    return None


TRITON_DEVICE = torch.device("cuda" if GPU else "cpu")
REASONS = {
    "cpu": None if "CPU" in _ext.KERNELS else str(_ext.LOAD_ERROR),
    "cuda_emulated": _emulated_reason(),
    "triton": backends.unavailable_reason("triton", TRITON_DEVICE),
    "cuda": (None if GPU and "CUDA" in _ext.KERNELS else
             "needs a GPU and fadam_fused._C built with the CUDA kernels"),
}
DEVICES = {"cpu": torch.device("cpu"), "cuda_emulated": torch.device("cpu"),
           "triton": TRITON_DEVICE, "cuda": torch.device("cuda")}
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(REASONS[name] is not None,
                                                        reason=str(REASONS[name])))
            for name in ("cpu", "cuda_emulated", "triton", "cuda")]


# The update tests' chunk: chunks start mid-row and the 1500-element tensor is 24 chunks (6 for
# Triton, whose interpreter runs each program in Python: 22 programs a call instead of 71).
CHUNK = {"cpu": 64, "cuda_emulated": 64, "triton": 256, "cuda": 64}


def _ops(name: str) -> op_contract.AdaFisherOps:
    if name == "cuda_emulated":
        return op_contract.adafisher_ops("cuda", op_contract.EMULATED_CUDA_ADAFISHER)
    if name == "triton":
        _ext.triton_kernels()  # importing the Triton kernels registers their ops
        return op_contract.adafisher_ops("triton", "triton_")
    return op_contract.adafisher_ops(name, "")


# ---- the update op ------------------------------------------------------------------------------

# (shape, cols, channels_last): a one-element bias, F = 1 tensors (cols == 0), odd matrices, a
# 1500-element one-column tensor (S along the elements), a conv weight (27 columns), a
# channels_last conv weight (its 60 columns in memory order), an empty tensor and a wide one.
SHAPES = [((1,), 1, False), ((3,), 0, False), ((7, 13), 13, False), ((37, 29), 29, False),
          ((1500,), 1, False), ((5, 3, 3, 3), 27, False), ((6, 4, 3, 5), 60, True),
          ((0, 5), 5, False), ((2, 2), 0, False), ((4, 250), 250, False)]

# (id, hyperparameters and the op's optional tensors)
CASES = [
    ("adafisher", dict(decoupled=False, weight_decay=0.0)),
    ("adafisher-wd-maximize-scaled", dict(decoupled=False, weight_decay=1e-2, maximize=True,
                                          grad_scale=0.25)),
    ("adafisherw-wd-lr64", dict(decoupled=True, weight_decay=1e-2, lr_tensor=torch.float64)),
    ("adafisherw-lr32-maximize-scaled", dict(decoupled=True, weight_decay=0.1, maximize=True,
                                             grad_scale=1024.0, lr_tensor=torch.float32)),
]


def _problem(dtype, device, seed=0):
    """Params, grads, momentums (channels_last where asked), steps, factors and layout."""
    gen = torch.Generator().manual_seed(seed)

    def randn(shape, scale, cl):
        t = torch.randn(shape, generator=gen) * scale
        return t.to(memory_format=torch.channels_last) if cl else t

    params, grads, moms, steps, pieces, layout = [], [], [], [], [], []
    offset = 3  # a gap before the first piece: offsets are not 0
    for k, (shape, cols, cl) in enumerate(SHAPES):
        params.append(randn(shape, 0.5, cl).to(dtype))
        grads.append(randn(shape, 0.1, cl).to(dtype))
        moms.append(randn(shape, 0.01, cl))
        steps.append(torch.tensor(float(1 + 3 * k % 7)))
        numel = params[-1].numel()
        if cols == 0:
            layout += [0, 0, 0]
            continue
        rows = numel // cols
        # Min-max normalised factors lie in [0, 1]; running ones stay near that.
        s, h = torch.rand(rows, generator=gen), torch.rand(cols, generator=gen)
        layout += [offset, offset + rows, cols]
        pieces += [s, h]
        offset += rows + cols
    factors = torch.cat([torch.rand(3, generator=gen)] + pieces)
    to = lambda ts: [t.to(device) for t in ts]  # noqa: E731  (.to keeps channels_last)
    return (to(params), to(grads), to(moms), to(steps), factors.to(device), layout)


def _update(ops, state, *, chunk_size, lr=1e-2, beta=0.9, damping=1e-3, skip=0.0,
            grad_scale=None, lr_tensor=None, rounding=(), **hyper):
    params, grads, moms, steps, factors, layout = state
    device = factors.device
    skip_t = torch.tensor([skip], device=device)
    scale = None if grad_scale is None else torch.tensor([grad_scale], device=device)
    lr_t = None if lr_tensor is None else torch.tensor([lr], dtype=lr_tensor, device=device)
    ops.update(params, grads, moms, steps, factors, layout, skip_t, scale, lr_t, lr=lr,
               beta=beta, damping=damping, chunk_size=chunk_size, rounding=list(rounding),
               **{"maximize": False, "weight_decay": 0.0, "decoupled": False, **hyper})


def _copy(state, dtype=None, device=None):
    params, grads, moms, steps, factors, layout = state
    cast = lambda ts, d=None: [t.to(device=device, dtype=d).clone(  # noqa: E731
        memory_format=torch.preserve_format) for t in ts]
    return (cast(params, dtype), cast(grads, dtype), cast(moms, dtype), cast(steps),
            factors.to(device=device, dtype=dtype or factors.dtype).clone(), list(layout))


def _assert_state_close(fast, ref64, same, dtype):
    """Params and momentums of `fast` (the kernel) against the float64 oracle's, with the
    module doc's tolerance (`same`: the reference op in the kernel's dtype)."""
    for what, k in (("params", 0), ("momentums", 2)):
        for i, (a, r) in enumerate(zip(fast[k], ref64[k], strict=True)):
            a, r = a.cpu().double(), r.cpu().double()
            if dtype == torch.float32:
                bound = ATOL[dtype] + RTOL[dtype] * r.abs()
            else:
                slack = 2 * (same[k][i].cpu().double() - r).abs()
                tol = ATOL[dtype] if k == 0 else ATOL[torch.float32] + RTOL[torch.float32] * r.abs()
                bound = slack + tol
            err = (a - r).abs()
            bad = ~(err <= bound)
            assert not bad.any(), (f"{what}[{i}] {tuple(a.shape)}: {int(bad.sum())} of "
                                   f"{a.numel()} out, max err {err.max().item():.3g}")
    for i, (a, r) in enumerate(zip(fast[0], ref64[0])):
        assert a.stride() == r.stride(), f"params[{i}] changed its layout"


# Backends that round every operation as the reference op's float32 run does ([note: AdaFisher
# math]: -ffp-contract=off on the CPU, the interpreter's numpy), so they give its exact bits. Not
# the GPU ones: Triton contracts multiply-adds into FMAs.
BITWISE = ("cpu", "cuda_emulated") + (("triton",) if not GPU else ())

# Every case in float32; two each in bfloat16 and float16 (the interpreter's time is the limit).
UPDATES = ([(torch.float32, n, c) for n, c in CASES] +
           [(torch.bfloat16, *CASES[k]) for k in (1, 3)] +
           [(torch.float16, *CASES[k]) for k in (0, 2)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,name,case", UPDATES, ids=[f"{d}-{n}" for d, n, _ in UPDATES])
def test_update_matches_the_reference_op(backend, dtype, name, case):
    """One call on every shape against the float64 reference op (and, for 2-byte dtypes, the
    reference op in that dtype), with a small chunk (CHUNK)."""
    device, chunk = DEVICES[backend], CHUNK[backend]
    state = _problem(dtype, device)
    ref64 = _copy(state, torch.float64, "cpu")
    same = _copy(state, device="cpu")
    _update(_ops(backend), state, chunk_size=chunk, **case)
    _update(reference.ADAFISHER_OPS, ref64, chunk_size=chunk, **case)
    _update(reference.ADAFISHER_OPS, same, chunk_size=chunk, **case)
    _assert_state_close(state, ref64, same, dtype)
    if backend in BITWISE:
        for a, b in zip(state[0] + state[2], same[0] + same[2]):
            assert torch.equal(a.cpu(), b), "not the reference op's float32 bits"
    # Something moved: every non-empty momentum, and the parameters (a bfloat16 one may keep
    # its value when lr m / F is below half its ulp).
    before = _problem(dtype, device)
    for t, b in zip(state[2], before[2]):
        assert t.numel() == 0 or not torch.equal(t, b)
    moved = [not torch.equal(t, b) for t, b in zip(state[0], before[0]) if t.numel()]
    assert all(moved) if dtype == torch.float32 else sum(moved) >= len(moved) // 2, moved


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_with_the_default_chunk_and_several_steps(backend):
    """Three calls at steps 1, 2, 3 with the backend's own chunk size, float32."""
    device = DEVICES[backend]
    ops = _ops(backend)
    state, ref64 = _problem(torch.float32, device, seed=1), None
    ref64 = _copy(state, torch.float64, "cpu")
    for t in range(1, 4):
        for s, r in zip(state[3], ref64[3]):
            s.fill_(t)
            r.fill_(t)
        _update(ops, state, chunk_size=ops.chunk_size, weight_decay=1e-2)
        _update(reference.ADAFISHER_OPS, ref64, chunk_size=ops.chunk_size, weight_decay=1e-2)
        _assert_state_close(state, ref64, None, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_is_a_no_op_when_skip_is_set(backend, dtype):
    device = DEVICES[backend]
    state = _problem(dtype, device)
    before = _copy(state)
    _update(_ops(backend), state, chunk_size=CHUNK[backend], skip=1.0, weight_decay=1e-2)
    for a, b in zip(state[0] + state[2], before[0] + before[2]):
        assert torch.equal(a, b) and a.stride() == b.stride()


@pytest.mark.skipif(REASONS["triton"] is not None, reason=str(REASONS["triton"]))
def test_triton_per_tensor_launches_match_the_table_launch(monkeypatch):
    """The traced path's launches (one per tensor, no table: what torch.compile emits) give the
    table launch's bits."""
    from fadam_fused.triton_kernels import launch

    ops, device = _ops("triton"), DEVICES["triton"]
    case = dict(decoupled=True, weight_decay=1e-2, maximize=True, grad_scale=0.5)
    table = _problem(torch.bfloat16, device)
    _update(ops, table, chunk_size=CHUNK["triton"], **case)
    monkeypatch.setattr(launch, "FORCE_PER_TENSOR", True)
    per_tensor = _problem(torch.bfloat16, device)
    _update(ops, per_tensor, chunk_size=CHUNK["triton"], **case)
    skip = torch.zeros(1, device=device)
    grads = per_tensor[1]
    grads[4][7] = float("nan")
    ops.nonfinite_check(grads, skip, None)
    assert float(skip) == 1.0
    for a, b in zip(table[0] + table[2], per_tensor[0] + per_tensor[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_refuses_a_bad_rounding_list_and_a_layout_past_factors(backend):
    device = DEVICES[backend]
    ops = _ops(backend)
    state = _problem(torch.float32, device)
    params, grads, moms, steps, factors, layout = state
    skip = torch.zeros(1, device=device)
    kw = dict(lr=1e-2, beta=0.9, weight_decay=0.0, damping=1e-3, decoupled=False,
              maximize=False, chunk_size=64)
    with pytest.raises((RuntimeError, ValueError), match="rounding must be empty or hold 4"):
        ops.update(params, grads, moms, steps, factors, layout, skip, None, None,
                   rounding=[1, 0, 1, 1] * len(params) + [1], **kw)
    bad = [1, 0, 1, 1] * len(params)
    bad[4 * 2 + 2:4 * 2 + 4] = [13, 7]  # inner_local > inner_global
    with pytest.raises((RuntimeError, ValueError), match="0 < inner_local <= inner_global"):
        ops.update(params, grads, moms, steps, factors, layout, skip, None, None, rounding=bad,
                   **kw)
    bad = list(layout)
    bad[3 * 3] = factors.numel() - 1  # S of the (37, 29) tensor past the end
    with pytest.raises((RuntimeError, ValueError), match="reaches past factors"):
        ops.update(params, grads, moms, steps, factors, bad, skip, None, None, rounding=[], **kw)
    bad = list(layout)
    bad[3 * 2 + 2] = 12  # 91 elements are not rows of 12 columns
    with pytest.raises((RuntimeError, ValueError), match="whole number of rows"):
        ops.update(params, grads, moms, steps, factors, bad, skip, None, None, rounding=[], **kw)
    assert all(torch.equal(a, b) for a, b in zip(params, _problem(torch.float32, device)[0]))


# ---- stochastic rounding ([note: stochastic rounding] in op_contract.py) ------------------------


def _rounding_rows(params, seed=77):
    """A rounding list for _problem's tensors: one seed per tensor; the (37, 29) tensor as columns
    11 to 39 of a (37, 40) one (inner_local 29 != inner_global 40), the (4, 250) one as rows 2 to
    5 of a (6, 250) one (base 500), the others whole."""
    rows = []
    for i, p in enumerate(params):
        seed_i = op_contract.tensor_seed(seed, i)
        if tuple(p.shape) == (37, 29):
            rows += [seed_i, 11, 29, 40]
        elif tuple(p.shape) == (4, 250):
            rows += [seed_i, 500, 1000, 1000]
        else:
            rows += [seed_i, 0, max(1, p.numel()), max(1, p.numel())]
    return rows


def _assert_same_bits(fast, want, bitwise):
    """Bit for bit where the backend rounds every operation as the reference op; elsewhere (the
    GPU's FMAs) a bfloat16 value within one ulp (a float32 difference can flip a stochastic
    rounding), a float32 one within the float32 tolerance."""
    for a, b in zip(fast, want, strict=True):
        a = a.cpu()
        assert a.dtype == b.dtype and a.stride() == b.stride()
        if bitwise:
            assert torch.equal(a, b)
        elif a.dtype == torch.bfloat16:
            ulp = torch.maximum(a.abs(), b.abs()).float() * 2.0 ** -7
            assert ((a.float() - b.float()).abs() <= ulp).all()
        else:
            assert ((a - b).abs() <= ATOL[a.dtype] + RTOL[a.dtype] * b.abs()).all()


# (param dtype, momentum dtype): theta rounded stochastically, theta and m, m alone.
SR_DTYPES = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
             (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,mdtype", SR_DTYPES, ids=lambda d: str(d)[6:])
def test_stochastic_rounding_gives_the_reference_op_bits(backend, dtype, mdtype):
    """Three calls (steps 1, 2, 3) on every shape with a rounding list (_rounding_rows: whole
    tensors, a block of a wider tensor, a base past 0) and a small chunk (CHUNK: chunks start
    mid-tensor): the reference op's bits. Round to nearest gives other bits; a call with skip
    set then writes nothing."""
    device, chunk = DEVICES[backend], CHUNK[backend]
    state = _problem(dtype, device)
    state[2][:] = [m.to(mdtype) for m in state[2]]
    rounding = _rounding_rows(state[0])
    want, near = _copy(state, device="cpu"), _copy(state, device="cpu")
    case = dict(decoupled=False, weight_decay=1e-2, maximize=True, grad_scale=0.5)
    for t in range(1, 4):
        for run in (state, want, near):
            for s in run[3]:
                s.fill_(t)
        _update(_ops(backend), state, chunk_size=chunk, rounding=rounding, **case)
        _update(reference.ADAFISHER_OPS, want, chunk_size=chunk, rounding=rounding, **case)
        _update(reference.ADAFISHER_OPS, near, chunk_size=chunk, **case)
    _assert_same_bits(state[0] + state[2], want[0] + want[2], backend in BITWISE)
    rounded = [k for k, dt in ((0, dtype), (2, mdtype)) if dt == torch.bfloat16]
    for k in rounded:  # stochastic is not nearest: most bfloat16 tensors of 20+ elements differ
        big = [(a, b) for a, b in zip(want[k], near[k]) if a.numel() >= 20]
        assert sum(not torch.equal(a, b) for a, b in big) >= len(big) - 1
    before = _copy(state)
    _update(_ops(backend), state, chunk_size=chunk, rounding=rounding, skip=1.0, **case)
    for a, b in zip(state[0] + state[2], before[0] + before[2]):
        assert torch.equal(a, b)


# ---- the gradient check -------------------------------------------------------------------------

BIG = 1500  # the bad element sits near the end of a tensor after several small ones

# (id, dtype, value put at the end of the big gradient, grad_scale, skipped)
CHECKS = [
    ("finite", torch.float32, 1.0, None, False),
    ("nan", torch.float32, float("nan"), None, True),
    ("-inf", torch.float32, -float("inf"), None, True),
    ("square-overflows", torch.float32, 2e19, None, True),
    ("square-fits", torch.float32, 1e19, None, False),
    ("scaled-into-overflow", torch.float32, 1e19, 0.25, True),
    ("scaled-out-of-overflow", torch.float32, 1e20, 1e3, False),
    ("bf16-nan", torch.bfloat16, float("nan"), None, True),
    ("bf16-square-overflows", torch.bfloat16, -3e19, None, True),
    ("bf16-square-fits", torch.bfloat16, 1e19, None, False),
    ("fp16-inf", torch.float16, float("inf"), None, True),
    ("fp16-scaled-into-overflow", torch.float16, 60000.0, 1e-16, True),
    ("fp16-scaled-fits", torch.float16, 300.0, 1e-16, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,value,scale,skipped", [c[1:] for c in CHECKS],
                         ids=[c[0] for c in CHECKS])
def test_nonfinite_check_follows_the_rule(backend, dtype, value, scale, skipped):
    device = DEVICES[backend]
    gen = torch.Generator().manual_seed(3)
    grads = [(torch.randn(shape, generator=gen) * 0.1).to(dtype).to(device)
             for shape in [(1,), (3, 7), (0,), (BIG,)]]
    grads.append((torch.randn(2, 3, 4, 5, generator=gen) * 0.1).to(dtype).to(device).to(
        memory_format=torch.channels_last))
    grads[3][-2] = value
    grad_scale = None if scale is None else torch.tensor([scale], device=device)
    ops = _ops(backend)
    skip = torch.zeros(1, device=device)
    ops.nonfinite_check(grads, skip, grad_scale)
    want = reference.nonfinite_flag([g.cpu() for g in grads], grad_scale=(
        None if grad_scale is None else grad_scale.cpu()))
    assert float(skip) == float(want) == float(skipped)
    # Never stores 0: a flag set by GradScaler (or another bucket) stays set.
    skip.fill_(1.0)
    grads[3][-2] = 0.0
    ops.nonfinite_check(grads, skip, grad_scale)
    ops.nonfinite_check([], skip, grad_scale)
    assert float(skip) == 1.0


# ---- the optimizer end to end -------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _oracle(steps, decoupled=False, interval=1):
    """run_oracle's snapshots, once per argument set (every backend compares with them)."""
    return run_oracle(steps, decoupled=decoupled, update_interval=interval)


@functools.lru_cache(maxsize=None)
def _same_bf16(steps, interval):
    """The reference backend's bfloat16 run, once."""
    return run(steps, torch.bfloat16, update_interval=interval)[0]


@pytest.fixture
def optimizer_backend(monkeypatch):
    """The optimizer's backend name for a test backend ("cuda_emulated": backend="cuda" runs the
    emulated kernels on CPU tensors, as under FADAM_CUDA_EMULATE=1)."""
    def use(name):
        if name == "cuda_emulated":
            monkeypatch.setattr(_ext, "CUDA_EMULATE", True)
            monkeypatch.setattr(_ext, "EMULATED_LOAD_ERROR", None)
            name = "cuda"
        for cache in ("_FUSED", "_FACTORED", "_ADAFISHER", "_AVAILABLE"):
            monkeypatch.setattr(backends, cache, {})
        assert backends.adafisher_available(name), name
        return name
    return use


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decoupled,interval", [(False, 1), (True, 3)],
                         ids=["AdaFisher-interval1", "AdaFisherW-interval3"])
def test_optimizer_matches_the_float64_oracle_every_step(backend, decoupled, interval,
                                                         optimizer_backend, monkeypatch):
    """adafisher_testing.Net (Linear, grouped dilated Conv2d, BatchNorm2d, LayerNorm, a
    parameter of no layer, a layer without gradients) for 4 steps: parameters, momentums and
    factors at every step. The kernels, not the reference, step every parameter: the reference
    op set is made to fail."""
    name = optimizer_backend(backend)
    if DEVICES[backend].type == "cuda":
        pytest.skip("adafisher_testing's model runs on the CPU; the GPU run is the op tests'")
    calls = []
    fused = backends.adafisher(name)
    monkeypatch.setitem(backends._ADAFISHER, name, op_contract.AdaFisherOps(
        fused.name, fused.nonfinite_check,
        lambda *a, **k: (calls.append(len(a[0])), fused.update(*a, **k)), fused.chunk_size))
    fast, _, _ = run(4, backend=name, decoupled=decoupled, update_interval=interval)
    assert_close(fast, _oracle(4, decoupled, interval))
    assert len(calls) == 4 and calls[0] >= 10, calls  # one call per step, every fused parameter


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_with_bfloat16_parameters(backend, optimizer_backend):
    name = optimizer_backend(backend)
    if DEVICES[backend].type == "cuda":
        pytest.skip("adafisher_testing's model runs on the CPU; the GPU run is the op tests'")
    fast, _, _ = run(3, torch.bfloat16, backend=name, update_interval=2)
    assert_close(fast, _oracle(3, False, 2), _same_bf16(3, 2), torch.bfloat16)


# ---- the Triton kernels compiled for the GPU ----------------------------------------------------


def _compile_report(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable,
                          str(Path(__file__).with_name("_adafisher_triton_compile.py")),
                          "--json", f"--arch={arch}"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(REASONS["triton"] is not None, reason=str(REASONS["triton"]))
def test_triton_kernels_compile_for_sm80_sm90_without_spills():
    """The check and the update in 20 specializations (every dtype; aligned, unaligned,
    decoupled with grad_scale and a float64 lr, per-tensor; bfloat16 with stochastic rounding of
    theta and a bfloat16 momentum, table and per-tensor) compile for sm_80 and sm_90 without a
    GPU, and ptxas reports no spills. Registers (ptxas -v, Triton 3.8): check 29-32, update
    34-40 on sm_80, 44-48 on sm_90, with stochastic rounding 64 and 70 (the two hashes per
    stream). The aligned update uses 128-bit loads. About 12 s of CPU per arch."""
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(_compile_report, (80, 90)))
    for report in reports:
        assert len(report) == 20, f"{len(report)} specializations compiled, expected 20"
        for row in report:
            assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
            assert row["registers"] <= 96, row
            # The stochastic rows keep a bfloat16 momentum: a thread's 4 elements of every
            # element operand are then 8 bytes (64-bit loads, as the bfloat16 parameter's in
            # the other rows, whose 128-bit load is the float32 momentum's).
            if (row["kernel"].startswith("update") and row["aligned"]
                    and "stochastic" not in row["kernel"]):
                assert row["v4_loads"], f"no 128-bit loads in the aligned update: {row}"
