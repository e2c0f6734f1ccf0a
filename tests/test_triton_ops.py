"""Op-level tests of the Triton backend (triton_kernels/, installed as fadam_fused.triton_kernels):
the two ops called directly, next to the oracle. tests/test_triton_optimizer.py drives them through
FAdam(backend="triton").

Where the kernels run: Triton decides when the kernels are defined whether they are compiled or
interpreted (TRITON_INTERPRET=1). Without a GPU tests/conftest.py sets TRITON_INTERPRET=1 (unless
the environment already decides), so the parity tests run in Triton's interpreter on CPU tensors;
on a GPU machine without the variable they run compiled, on CUDA tensors, and the GPU-only tests
(torch.compile) run too. The variable only takes effect if Triton has not been imported yet in this
process; `make test` exports it for the whole run.

Oracle: fadam_fused.reference (float64 with upcast=True, and the same storage precision with
upcast=False for the flash-attention rule on bf16 / fp16). Tolerances as tests/fadam_testing.py
(docs/design.md, section 9).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

pytest.importorskip("triton")

from fadam_fused import op_contract  # noqa: E402
from fadam_fused.reference import fadam_reference  # noqa: E402
from conftest import triton_kernels  # noqa: E402
from _triton_compile import ScriptJobs, assert_compiles_without_spills  # noqa: E402
from fadam_testing import SQUARE_FITS, SQUARE_OVERFLOWS  # noqa: E402

TK, _reason = triton_kernels()
if TK is None:
    pytest.skip(_reason, allow_module_level=True)
CHUNK = op_contract.CHUNK_SIZE["triton"]
nchunks_of = op_contract.nchunks_of
INTERPRET = TK.INTERPRET
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels are compiled (TRITON_INTERPRET was not 1 when Triton was first "
                "imported) but there is no GPU: run with TRITON_INTERPRET=1", allow_module_level=True)

# A small chunk exercises multi-chunk tensors (several partial-sum slots each) at sizes the
# interpreter runs quickly: 4097 elements is 5 chunks, 1400 is 2, smaller tensors are fused.
SMALL_CHUNK = 1024

ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, clip=1.0, weight_decay=1e-2, p=0.5,
             maximize=False)

# numpy warns about the inf / NaN the non-finite tests feed in and about log2(0) on the
# interpreter's pow path; both are intended.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ---------------------------------------------------------------------------------------------
# A multi-step driver of the two ops next to the oracle.
# ---------------------------------------------------------------------------------------------


class Run:
    """Parameters and state of one trajectory, stepped by the Triton ops or by the oracle."""

    def __init__(self, init, dtype, state_dtype=torch.float32, device="cpu"):
        self.params = [t.to(device=device, dtype=dtype).clone() for t in init]
        self.fims = [torch.ones(t.shape, dtype=state_dtype, device=device) for t in init]
        self.moms = [torch.zeros(t.shape, dtype=state_dtype, device=device) for t in init]
        self.steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in init]
        self.device = device

    def _active(self, grads):
        idx = [i for i, g in enumerate(grads) if g is not None]
        pick = lambda lst: [lst[i] for i in idx]  # noqa: E731
        return idx, pick

    def step_triton(self, grads, *, chunk_size, fuse_one_chunk=True, grad_scale=None,
                    lr_tensor=None, found_inf=None, **hyper):
        """One step the way the optimizer drives the backend: increment the steps, zero (or seed)
        skip, phase A, phase B, then undo the increment if the step was skipped. Partials start
        as NaN, so a slot read before it is written shows. Returns skip."""
        h = {**HYPER, **hyper}
        idx, pick = self._active(grads)
        params, fims, moms, steps = pick(self.params), pick(self.fims), pick(self.moms), pick(
            self.steps)
        gs = [grads[i].to(self.device) for i in idx]
        for s in steps:
            s.add_(1)
        partials = op_contract.new_partials(params, chunk_size).fill_(float("nan"))
        skip = torch.zeros(1, dtype=torch.float32, device=self.device)
        if found_inf is not None:
            skip.copy_(found_inf.reshape(1))
        TK.phase_a(params, gs, fims, steps, partials, skip, grad_scale, beta2=h["beta2"],
                   eps=h["eps"], p=h["p"], clip=h["clip"] or 0.0, maximize=h["maximize"],
                   chunk_size=chunk_size, fuse_one_chunk=fuse_one_chunk)
        TK.phase_b(params, gs, fims, moms, steps, partials, skip, grad_scale, lr_tensor,
                   lr=h["lr"], beta1=h["beta1"], beta2=h["beta2"], eps=h["eps"], p=h["p"],
                   clip=h["clip"] or 0.0, weight_decay=h["weight_decay"], maximize=h["maximize"],
                   chunk_size=chunk_size, fuse_one_chunk=fuse_one_chunk)
        for s in steps:
            s.sub_(skip.reshape(()))
        return skip

    def step_reference(self, grads, *, upcast, grad_scale=None, lr_tensor=None, found_inf=None,
                       **hyper):
        h = {**HYPER, **hyper}
        if lr_tensor is not None:
            h["lr"] = lr_tensor.reshape(())
        idx, pick = self._active(grads)
        gs = [grads[i].to(device=self.device) for i in idx]
        if upcast:
            gs = [g.to(self.params[i].dtype) for g, i in zip(gs, idx)]
        return fadam_reference(pick(self.params), gs, pick(self.moms), pick(self.fims),
                               pick(self.steps), grad_scale=grad_scale, found_inf=found_inf,
                               upcast=upcast, **h)


def trajectories(init, grads_by_step, dtype, *, chunk_size, fuse_one_chunk=True, per_step=None,
                 device="cpu", **hyper):
    """Runs the Triton ops (storage `dtype`, on `device`), the oracle at the same precision and
    the float64 oracle (both on CPU) over the same gradients. `per_step(k)` may return extra
    keyword arguments of step k (grad_scale, lr_tensor, found_inf) on `device`. Returns the three
    Run objects."""
    fast = Run(init, dtype, device=device)
    same = Run(init, dtype)
    ref64 = Run(init, torch.float64, state_dtype=torch.float64)
    for k, grads in enumerate(grads_by_step):
        extra = per_step(k) if per_step else {}
        fast.step_triton(grads, chunk_size=chunk_size, fuse_one_chunk=fuse_one_chunk, **extra,
                         **hyper)
        extra = {k: v.cpu() for k, v in extra.items()}
        same.step_reference(grads, upcast=False, **extra, **hyper)
        ref64.step_reference(grads, upcast=True, **extra, **hyper)
    return fast, same, ref64


def make_grads(shapes, steps, dtype, seed=0, no_grad=(), zero=()):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        scale = 3.0 if k % 2 == 0 else 0.01  # clipping switches on and off
        out.append([None if i in no_grad else
                    torch.zeros(s, dtype=dtype) if i in zero else
                    (torch.randn(s, generator=gen) * scale).to(dtype)
                    for i, s in enumerate(shapes)])
    return out


def make_init(shapes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def assert_close_to_oracle(fast, same, ref64, dtype, nan_params=False):
    """fp32: |fast - ref64| <= atol + rtol |ref64|. bf16 / fp16 params (flash-attention rule):
    |fast - ref64| <= 2 |same - ref64| + atol; their float32 state may in addition carry the
    float32 tolerance (the same-precision oracle is float32 math too). With `nan_params`, a
    parameter may hold NaN exactly where the float64 oracle's does; the rest is compared."""
    for name in ("params", "fims", "moms", "steps"):
        for i, (a, s, r) in enumerate(zip(getattr(fast, name), getattr(same, name),
                                           getattr(ref64, name))):
            a, s, r = a.double().cpu(), s.double().cpu(), r.cpu()
            if nan_params and name == "params":
                assert torch.equal(a.isnan(), r.isnan()), f"{name}[{i}]: NaN elsewhere"
                keep = ~r.isnan()
                a, s, r = a[keep], s[keep], r[keep]
            assert torch.isfinite(a).all(), f"{name}[{i}] not finite"
            if dtype == torch.float32 or name == "steps":
                bound = ATOL[torch.float32] + RTOL[torch.float32] * r.abs()
            else:
                bound = 2 * (s - r).abs() + ATOL[dtype]
                if name != "params":
                    bound = bound + ATOL[torch.float32] + RTOL[torch.float32] * r.abs()
            err = (a - r).abs()
            assert (err <= bound).all(), (
                f"{name}[{i}] ({dtype}): max error {err.max().item():.3g}, worst excess "
                f"{(err - bound).max().item():.3g}")


def same_bits(a, b):
    """Bitwise equality (NaN == NaN, -0.0 != 0.0), unlike torch.equal on floats."""
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def bitwise_equal(x, y):
    return all(same_bits(a, b)
               for la, lb in ((x.params, y.params), (x.fims, y.fims), (x.moms, y.moms),
                              (x.steps, y.steps))
               for a, b in zip(la, lb))


# ---------------------------------------------------------------------------------------------
# Parity against the oracle.
# ---------------------------------------------------------------------------------------------

SHAPES = [(0,), (1,), (4097,), (3, 7), (2, 700), (33,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_parity_10_steps(dtype):
    # Param 5 has no gradient on any step: it must stay untouched (it is not passed to the ops).
    init = make_init(SHAPES)
    grads = make_grads(SHAPES, 10, dtype, no_grad=(5,))
    fast, same, ref64 = trajectories(init, grads, dtype, chunk_size=SMALL_CHUNK, device=DEVICE)
    assert_close_to_oracle(fast, same, ref64, dtype)
    assert torch.equal(fast.params[5].cpu(), init[5].to(dtype))
    assert float(fast.steps[5]) == 0.0 and float(fast.steps[2]) == 10.0


def test_parity_default_chunk_large_tensors():
    """(5, 123, 123) = 75645 elements: two 64K chunks (slot sums); 60000 elements: one fused
    program over many tiles; at the production CHUNK_SIZE."""
    shapes = [(5, 123, 123), (200, 300), (5,)]
    init = make_init(shapes)
    grads = make_grads(shapes, 2, torch.float32)
    fast, same, ref64 = trajectories(init, grads, torch.float32, chunk_size=CHUNK,
                                     device=DEVICE)
    assert_close_to_oracle(fast, same, ref64, torch.float32)


def test_many_small_tensors():
    gen = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(1, 300, (60,), generator=gen)]
    init = make_init(shapes)
    grads = make_grads(shapes, 3, torch.float32)
    fast, same, ref64 = trajectories(init, grads, torch.float32, chunk_size=SMALL_CHUNK,
                                     device=DEVICE)
    assert_close_to_oracle(fast, same, ref64, torch.float32)


OPTION_CASES = {
    "maximize": dict(hyper=dict(maximize=True)),
    "clip_none": dict(hyper=dict(clip=None)),
    "clip_0_unfused": dict(hyper=dict(clip=0.0), fuse=False),
    "clip_2": dict(hyper=dict(clip=2.0)),
    "p_0.75": dict(hyper=dict(p=0.75)),
    "no_weight_decay_beta2_0": dict(hyper=dict(weight_decay=0.0, beta2=0.0)),
    "unfused_one_chunk": dict(fuse=False),
    "grad_scale": dict(extra=lambda k: dict(grad_scale=torch.tensor([2.0 ** (k % 3 + 4)]))),
    "lr_tensor_f32": dict(extra=lambda k: dict(lr_tensor=torch.tensor([1e-2 / (k + 1)]))),
    "lr_tensor_f64": dict(extra=lambda k: dict(
        lr_tensor=torch.tensor([3e-3 * (k + 1)], dtype=torch.float64))),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_options(case, dtype):
    cfg = OPTION_CASES[case]
    hyper = cfg.get("hyper", {})
    shapes = [(4097,), (3, 7), (2, 700), (1,)]
    init = make_init(shapes)
    grads = make_grads(shapes, 7, dtype)
    extra = cfg.get("extra")
    per_step = (lambda k: {n: t.to(DEVICE) for n, t in extra(k).items()}) if extra else None
    fast, same, ref64 = trajectories(init, grads, dtype, chunk_size=SMALL_CHUNK,
                                     fuse_one_chunk=cfg.get("fuse", True), per_step=per_step,
                                     device=DEVICE, **hyper)
    assert_close_to_oracle(fast, same, ref64, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_tensor_path_matches_table_path_bitwise(dtype, monkeypatch):
    """The launches torch.compile traces (one per tensor, tensors as arguments) compute the same
    bits as the eager multi-tensor launch."""
    shapes = [(4097,), (3, 7), (0,), (2, 700)]
    init = make_init(shapes)
    grads = make_grads(shapes, 4, dtype)
    table = Run(init, dtype, device=DEVICE)
    traced = Run(init, dtype, device=DEVICE)
    for g in grads:
        table.step_triton(g, chunk_size=SMALL_CHUNK)
        monkeypatch.setattr(TK.launch, "FORCE_PER_TENSOR", True)
        traced.step_triton(g, chunk_size=SMALL_CHUNK)
        monkeypatch.setattr(TK.launch, "FORCE_PER_TENSOR", False)
    assert bitwise_equal(table, traced)


@pytest.mark.parametrize("eps", [1e-20, 1e-30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_gradients_tiny_eps_stay_finite(eps, dtype):
    """eps = 1e-30 and an always-zero gradient: w = theta / 1e-30 ~ 1e30, w^2 ~ 1e60 overflows
    float32; the float64 sums keep the clip scale finite and the update matches the oracle."""
    shapes = [(4097,), (3, 7), (1,)]
    init = make_init(shapes)
    grads = make_grads(shapes, 10, dtype, zero=(0, 1, 2))
    fast, same, ref64 = trajectories(init, grads, dtype, chunk_size=SMALL_CHUNK, eps=eps,
                                     device=DEVICE)
    for t in fast.params + fast.fims + fast.moms:
        assert torch.isfinite(t).all()
    assert_close_to_oracle(fast, same, ref64, dtype)


# ---------------------------------------------------------------------------------------------
# Skip, determinism, partial sums.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["multi_chunk", "fused_one_chunk", "last_element"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_skips_whole_step(where, bad):
    shapes = [(4097,), (3, 7), (2, 700)]
    init = make_init(shapes)
    run = Run(init, torch.bfloat16, device=DEVICE)
    warm = make_grads(shapes, 2, torch.bfloat16)
    for g in warm:
        run.step_triton(g, chunk_size=SMALL_CHUNK)
    before = [t.clone() for t in run.params + run.fims + run.moms + run.steps]
    grads = make_grads(shapes, 1, torch.bfloat16, seed=7)[0]
    i, j = {"multi_chunk": (0, 2050), "fused_one_chunk": (1, 4), "last_element": (2, 1399)}[where]
    grads[i].view(-1)[j] = bad
    kept = [g.clone() for g in grads]
    skip = run.step_triton(grads, chunk_size=SMALL_CHUNK)
    assert float(skip) == 1.0
    after = run.params + run.fims + run.moms + run.steps
    assert all(same_bits(a, b) for a, b in zip(before, after))
    assert all(same_bits(a, b) for a, b in zip(kept, grads))  # grads are never written


# [note: the gradient overflow rule] (triton_kernels/_kernels.py): a finite gradient whose float32
# square is not finite skips the step. The cases are every backend's (fadam_testing).
@pytest.mark.parametrize("where", [(0, 2050, 1.0), (1, 4, 1.0), (0, 4000, 0.0)],
                         ids=["multi-chunk", "one-chunk-fused", "multi-chunk-clip-off"])
@pytest.mark.parametrize("case", SQUARE_OVERFLOWS, ids=[c[0] for c in SQUARE_OVERFLOWS])
def test_gradient_whose_square_overflows_skips_whole_step(case, where):
    """Phase A raises the skip flag from its reduction (a multi-chunk tensor) or from the
    gradient-only check (a fused one-chunk tensor, or any tensor with clipping off); nothing is
    written, as for a NaN."""
    _, value, scale = case
    i, j, clip = where
    shapes = [(4097,), (3, 7), (2, 700)]
    run = Run(make_init(shapes), torch.float32, device=DEVICE)
    for g in make_grads(shapes, 2, torch.float32):
        assert float(run.step_triton(g, chunk_size=SMALL_CHUNK, clip=clip)) == 0.0
    before = [t.clone() for t in run.params + run.fims + run.moms + run.steps]
    grads = make_grads(shapes, 1, torch.float32, seed=7)[0]
    grad_scale = None
    if scale is not None:  # the gradients as GradScaler leaves them: scaled by `scale`
        grads = [g * scale for g in grads]
        grad_scale = torch.tensor([scale], device=DEVICE)
    grads[i].view(-1)[j] = value
    skip = run.step_triton(grads, chunk_size=SMALL_CHUNK, clip=clip, grad_scale=grad_scale)
    assert float(skip) == 1.0
    after = run.params + run.fims + run.moms + run.steps
    assert all(same_bits(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("g", SQUARE_FITS)
def test_gradient_with_a_finite_square_is_not_skipped_and_matches_the_oracle(g):
    """g * g = 1e38 or 3.24e38 fits float32: the steps run, in a multi-chunk and a fused
    one-chunk tensor, and follow the oracle."""
    shapes = [(4097,), (3, 7), (2, 700)]
    grads = make_grads(shapes, 4, torch.float32)
    grads[1][0][3000] = g
    grads[1][1][1, 2] = -g
    fast, same, ref64 = trajectories(make_init(shapes), grads, torch.float32,
                                     chunk_size=SMALL_CHUNK, device=DEVICE)
    assert [float(s) for s in fast.steps] == [4.0, 4.0, 4.0]  # no step was skipped
    assert_close_to_oracle(fast, same, ref64, torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_parameter_stays_in_its_element(dtype, bad, monkeypatch):
    """A NaN or inf in a parameter (not its gradient) does not skip the step: its tensor's
    RMS(w) counts as infinite, so that tensor's clipped weight decay is 0 for the step and the
    NaN stays in its own element, as the oracle does (docs/design.md, section 6). In a
    multi-chunk tensor (sums from phase-A slots) and a fused one-chunk tensor, on the table and
    the per-tensor launches; the other tensors step as usual."""
    shapes = [(2500,), (33,), (3, 7)]
    init = make_init(shapes)
    init[0][2049] = bad  # the third chunk's slot
    init[1][4] = bad
    grads = make_grads(shapes, 3, dtype)
    for per_tensor in (False, True):
        monkeypatch.setattr(TK.launch, "FORCE_PER_TENSOR", per_tensor)
        fast, same, ref64 = trajectories(init, grads, dtype, chunk_size=SMALL_CHUNK,
                                         weight_decay=0.5, device=DEVICE)
        assert_close_to_oracle(fast, same, ref64, dtype, nan_params=True)
        assert fast.params[0].isnan().sum() == 1 and fast.params[1].isnan().sum() == 1
        assert float(fast.steps[0]) == 3.0  # no step was skipped


def test_phase_a_with_clipping_off_only_checks_gradients():
    """clip <= 0: phase A writes no slot (an unfused empty tensor's included) and only looks at
    the gradients: a NaN parameter or fim changes nothing there, a NaN gradient still sets
    skip. Phase B then reads no slot (the parity cases with clip None run on NaN partials)."""
    shapes = [(2500,), (10,), (0,)]
    params = [t.to(DEVICE) for t in make_init(shapes)]
    params[0][7] = float("nan")
    grads = [g.to(DEVICE) for g in make_grads(shapes, 1, torch.float32)[0]]
    fims = [torch.full_like(p, float("nan")) for p in params]
    steps = [torch.full((), 3.0, device=DEVICE) for _ in params]
    for clip, fuse in ((0.0, False), (0.0, True), (-1.0, False)):
        partials = op_contract.new_partials(params, SMALL_CHUNK).fill_(float("nan"))
        skip = torch.zeros(1, device=DEVICE)
        kw = dict(beta2=0.999, eps=1e-8, p=0.5, clip=clip, maximize=False,
                  chunk_size=SMALL_CHUNK, fuse_one_chunk=fuse)
        TK.phase_a(params, grads, fims, steps, partials, skip, None, **kw)
        assert float(skip) == 0.0 and torch.isnan(partials).all()
        bad = [g.clone() for g in grads]
        bad[0][2400] = float("inf")
        TK.phase_a(params, bad, fims, steps, partials, skip, None, **kw)
        assert float(skip) == 1.0 and torch.isnan(partials).all()


def test_found_inf_seed_skips_and_finite_step_does_not_store_zero():
    shapes = [(4097,), (3, 7)]
    run = Run(make_init(shapes), torch.float32, device=DEVICE)
    before = [t.clone() for t in run.params]
    g = make_grads(shapes, 1, torch.float32)[0]
    skip = run.step_triton(g, chunk_size=SMALL_CHUNK, found_inf=torch.ones(1, device=DEVICE))
    assert float(skip) == 1.0  # phase A never stores 0 over a seeded flag
    assert all(torch.equal(a, b) for a, b in zip(before, run.params))
    skip = run.step_triton(g, chunk_size=SMALL_CHUNK)
    assert float(skip) == 0.0
    assert not torch.equal(before[0], run.params[0])


def test_deterministic_bitwise():
    shapes = [(4097,), (3, 7), (2, 700)]
    init = make_init(shapes)
    grads = make_grads(shapes, 4, torch.float32)
    a, b = Run(init, torch.float32, device=DEVICE), Run(init, torch.float32, device=DEVICE)
    for g in grads:
        a.step_triton(g, chunk_size=SMALL_CHUNK)
        b.step_triton(g, chunk_size=SMALL_CHUNK)
    assert bitwise_equal(a, b)


def test_phase_a_partials_slot_layout():
    """Slot (i, c) holds the float64 (sum ghat^2, sum w^2) of chunk c of tensor i; fused one-chunk
    tensors leave theirs unwritten (NaN here); unfused empty tensors write zeros."""
    shapes = [(2500,), (10,), (0,), (1024,)]
    params = [t.to(DEVICE) for t in make_init(shapes)]
    grads = [g.to(DEVICE) for g in make_grads(shapes, 1, torch.float32)[0]]
    fims = [torch.full_like(p, 0.5) for p in params]
    steps = [torch.full((), 3.0, device=DEVICE) for _ in params]
    beta2, eps = 0.999, 1e-8
    for fuse in (False, True):
        partials = torch.full((6, 2), float("nan"), dtype=torch.float64, device=DEVICE)
        skip = torch.zeros(1, device=DEVICE)
        TK.phase_a(params, grads, fims, steps, partials, skip, None, beta2=beta2, eps=eps, p=0.5,
                   clip=1.0, maximize=False, chunk_size=SMALL_CHUNK, fuse_one_chunk=fuse)
        b = beta2 * (1 - beta2 ** 2) / (1 - beta2 ** 3)
        rows, slot = [], 0
        for p, g, f in zip(params, grads, fims):
            f64 = b * f.double() + (1 - b) * g.double() ** 2
            d = f64.sqrt() + eps
            for c in range(nchunks_of(p.numel(), SMALL_CHUNK)):
                sl = slice(c * SMALL_CHUNK, (c + 1) * SMALL_CHUNK)
                want = torch.stack([((g.double() / d)[sl] ** 2).sum(),
                                    ((p.double() / d)[sl] ** 2).sum()])
                got = partials[slot]
                if fuse and p.numel() <= SMALL_CHUNK:
                    assert torch.isnan(got).all()
                else:
                    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-9)
                slot += 1
        assert float(skip) == 0.0


@pytest.mark.parametrize("per_tensor", [False, True], ids=["table", "per-tensor"])
def test_bad_inputs_raise_clear_errors(per_tensor, monkeypatch):
    # per-tensor: the launches torch.compile traces, which build no table but check the same.
    monkeypatch.setattr(TK.launch, "FORCE_PER_TENSOR", per_tensor)
    shapes = [(10,), (5,)]
    run = Run(make_init(shapes), torch.float32, device=DEVICE)
    g = [t.to(DEVICE) for t in make_grads(shapes, 1, torch.float32)[0]]
    skip = torch.zeros(1, device=DEVICE)
    kw = dict(beta2=0.999, eps=1e-8, p=0.5, clip=1.0, maximize=False, chunk_size=SMALL_CHUNK,
              fuse_one_chunk=True)
    with pytest.raises(ValueError, match="partials must have 2 rows"):
        TK.phase_a(run.params, g, run.fims, run.steps,
                   torch.zeros(3, 2, dtype=torch.float64, device=DEVICE), skip, None, **kw)
    with pytest.raises(ValueError, match="same length"):
        TK.phase_a(run.params, g[:1], run.fims, run.steps,
                   torch.zeros(2, 2, dtype=torch.float64, device=DEVICE), skip, None, **kw)
    with pytest.raises(ValueError, match=r"grads\[1\] must be a torch.float32"):
        TK.phase_a(run.params, [g[0], g[1].half()], run.fims, run.steps,
                   torch.zeros(2, 2, dtype=torch.float64, device=DEVICE), skip, None, **kw)
    before = [t.clone() for t in run.params + run.fims + run.moms]
    kwb = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, p=0.5, clip=1.0, weight_decay=0.0,
               maximize=False, chunk_size=SMALL_CHUNK, fuse_one_chunk=True)
    with pytest.raises(ValueError, match="partials must have 2 rows"):
        TK.phase_b(run.params, g, run.fims, run.moms, run.steps,
                   torch.zeros(3, 2, dtype=torch.float64, device=DEVICE), skip, None, None, **kwb)
    with pytest.raises(ValueError,
                       match=r"momentums must be float32 or bfloat16, got torch.float64"):
        TK.phase_b(run.params, g, run.fims, [run.moms[0].double(), run.moms[1]], run.steps,
                   torch.zeros(2, 2, dtype=torch.float64, device=DEVICE), skip, None, None, **kwb)
    assert all(torch.equal(a, b) for a, b in zip(before, run.params + run.fims + run.moms))


def test_op_schemas_declare_mutations_and_empty_group_is_a_no_op():
    def written(op):  # the arguments the schema declares mutated (alias set names vary: (a!), (a4!))
        return {a.name for a in op.default._schema.arguments
                if a.alias_info is not None and a.alias_info.is_write}

    assert written(torch.ops.fadam_fused.triton_phase_a) == {"partials", "skip"}
    assert written(torch.ops.fadam_fused.triton_phase_b) == {"params", "fims", "momentums"}
    skip = torch.zeros(1, device=DEVICE)
    partials = torch.zeros(0, 2, dtype=torch.float64, device=DEVICE)
    TK.phase_a([], [], [], [], partials, skip, None, beta2=0.999, eps=1e-8, p=0.5,
               clip=1.0, maximize=False, chunk_size=CHUNK, fuse_one_chunk=True)
    TK.phase_b([], [], [], [], [], partials, skip, None, None, lr=1e-3, beta1=0.9, beta2=0.999,
               eps=1e-8, p=0.5, clip=1.0, weight_decay=0.0, maximize=False,
               chunk_size=CHUNK, fuse_one_chunk=True)
    assert float(skip) == 0.0


# ---------------------------------------------------------------------------------------------
# Launch count and metadata tables.
# ---------------------------------------------------------------------------------------------


def _count_launches(monkeypatch):
    """Counts the kernel launches the host code makes. The launches are not executed: the count
    is decided on the host, and 300 tensors take the interpreter ~10 s to run."""
    counts = {"A": 0, "B": 0}
    for phase, kernel in (("A", TK._kernels._phase_a_kernel), ("B", TK._kernels._phase_b_kernel)):

        def run(*args, _phase=phase, grid, **kwargs):
            counts[_phase] += 1
            counts[_phase + "_programs"] = counts.get(_phase + "_programs", 0) + grid[0]

        monkeypatch.setattr(kernel, "run", run)
    return counts


def test_launch_count_independent_of_tensor_count(monkeypatch):
    """One launch per phase for 3 tensors and for 300; the second step reuses the cached device
    metadata (no rebuild, hence no host-to-device copy)."""
    counts = _count_launches(monkeypatch)
    cache = TK.launch.TABLES
    seen = {}
    for n in (3, 300):
        shapes = [(1 + i % 7,) for i in range(n - 1)] + [(2 * SMALL_CHUNK + 5,)]
        run = Run(make_init(shapes), torch.float32, device=DEVICE)
        grads = make_grads(shapes, 1, torch.float32)[0]
        counts.clear()
        counts.update(A=0, B=0)
        start = cache.builds
        run.step_triton(grads, chunk_size=SMALL_CHUNK)
        assert cache.builds - start == 2  # one table per phase
        # Steady state: the same tensors again (a training loop's grads are reused, or come back
        # from the caching allocator at the same addresses).
        run.step_triton(grads, chunk_size=SMALL_CHUNK)
        assert cache.builds - start == 2, "steady-state step rebuilt the metadata"
        seen[n] = {k: counts[k] for k in "AB"}
        # Programs: one per (tensor, chunk): n - 1 fused one-chunk tensors + 3 chunks, per step.
        assert counts["B_programs"] == 2 * (n - 1 + 3)
    assert seen[3] == seen[300] == {"A": 2, "B": 2}  # 2 steps x 1 launch per phase


def test_captured_tables_outlive_the_lru_and_go_with_their_steps(monkeypatch):
    """[note: Triton metadata tables] in triton_kernels/launch.py: a table used while a CUDA graph
    is captured is read again at every replay. It stays (the same object and device memory)
    however many other tables pass through the LRU, as long as the step tensors it serves live,
    and is released with them. The interpreter has no graphs: capture is simulated."""
    _count_launches(monkeypatch)  # the launches are not executed: this is about the host side
    cache = TK.launch.TABLES
    monkeypatch.setattr(cache, "entries", 4)
    capturing = [True]
    monkeypatch.setattr(TK.launch, "capturing", lambda device: capturing[0])
    shapes = [(3,), (2 * SMALL_CHUNK + 5,)]
    grads = make_grads(shapes, 1, torch.float32)[0]
    run = Run(make_init(shapes), torch.float32, device=DEVICE)
    before = set(cache.captured)
    run.step_triton(grads, chunk_size=SMALL_CHUNK)
    keys = set(cache.captured) - before
    assert len(keys) == 2  # phase A's and phase B's
    tables = {k: cache.captured[k] for k in keys}
    memory = {k: (t.meta.data_ptr(), t.meta.clone()) for k, t in tables.items()}
    capturing[0] = False
    others = [Run(make_init(shapes, seed=2), torch.float32, device=DEVICE) for _ in range(5)]
    for other in others:  # 10 tables through an LRU of 4
        other.step_triton(grads, chunk_size=SMALL_CHUNK)
    assert len(cache.lru) == 4
    builds = cache.builds
    run.step_triton(grads, chunk_size=SMALL_CHUNK)  # what a replay reads: the same tables
    assert cache.builds == builds
    for k, t in tables.items():
        assert cache.captured[k] is t
        assert t.meta.data_ptr() == memory[k][0] and torch.equal(t.meta, memory[k][1])
    alive = [weakref.ref(t) for t in tables.values()]
    del run, tables, t
    gc.collect()
    assert not keys & set(cache.captured)
    assert all(ref() is None for ref in alive)


def test_uncaptured_tables_go_with_their_steps(monkeypatch):
    """A table nobody captured also goes when its step tensors do, not only when the LRU drops
    it; the gradients are not owners (the default zero_grad frees them every step)."""
    _count_launches(monkeypatch)
    cache = TK.launch.TABLES
    shapes = [(3,), (5,)]
    run = Run(make_init(shapes), torch.float32, device=DEVICE)
    before = set(cache.lru)
    run.step_triton(make_grads(shapes, 1, torch.float32)[0], chunk_size=SMALL_CHUNK)
    keys = set(cache.lru) - before
    assert len(keys) == 2
    gc.collect()  # the gradients of that step are gone: the tables stay
    assert keys <= set(cache.lru)
    del run
    gc.collect()
    assert not keys & set(cache.lru)


# ---------------------------------------------------------------------------------------------
# Compilation for sm_80 / sm_90 without a GPU.
# ---------------------------------------------------------------------------------------------

# The compilations and the trace run in subprocesses started when collection ends, and these tests
# run last (tests/conftest.py: slow subprocesses in the background).
_JOBS = ScriptJobs("_triton_compile.py", ["--all"])
start_in_background, stop_in_background = _JOBS.start, _JOBS.stop


@pytest.mark.background
def test_kernels_compile_for_sm80_sm90_without_spills():
    """Every specialization the optimizer can launch (the whole product, and stochastic rounding:
    145 per arch) compiles for sm_80 and sm_90 (Triton's compiler, no GPU), and the bundled
    `ptxas -v` reports no spill stores; the aligned float32 path of p = 0.5 (the default) uses 128-bit loads. The tile sizes
    that keep it so: [note: Triton tuning constants] in triton_kernels/launch.py. Compilation runs
    in subprocesses (the kernels here are interpreter functions), one per arch in parallel:
    about 2 minutes."""
    assert_compiles_without_spills(
        _JOBS.compile_reports(), count=145, max_registers=128,
        wants_v4_loads=lambda row: (row["dtype"] == "float32" and row["aligned"]
                                    and "pow" not in row["kernel"]))


@pytest.mark.background
def test_torch_compile_trace_decomposes_into_per_tensor_kernels():
    """What torch.compile sees (AOTAutograd on FakeTensors of a fake CUDA device, no GPU needed):
    each op decomposes into Triton kernel calls on the tensors themselves, one per non-empty
    tensor and phase, gridded by chunks (an empty tensor has no work: no slot to write with
    fuse_one_chunk). Runs in a subprocess without TRITON_INTERPRET (wrap_triton needs the
    compiled-kernel objects)."""
    kernels = _JOBS.result("trace")
    assert [(k["grid"][0][0], k["numel"], k["table"]) for k in kernels] == [
        (2, CHUNK + 4464, False), (1, 10, False),  # phase A
        (2, CHUNK + 4464, False), (1, 10, False)]  # phase B


# ---------------------------------------------------------------------------------------------
# GPU only.
# ---------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                         reason="needs a CUDA GPU and compiled Triton kernels (TRITON_INTERPRET "
                                "unset); torch.compile cannot trace interpreted kernels")


@pytest.mark.gpu
@gpu
def test_cuda_torch_compile_fullgraph_step():
    shapes = [(4097,), (3, 7), (2, 700), (70000,)]
    init = make_init(shapes)
    grads_cpu = make_grads(shapes, 3, torch.float32)
    eager = Run(init, torch.float32, device="cuda")
    compiled = Run(init, torch.float32, device="cuda")
    chunk = CHUNK
    n_slots = sum(nchunks_of(p.numel(), chunk) for p in compiled.params)

    def step(params, grads, fims, moms, steps, partials, skip, lr_tensor):
        torch._foreach_add_(steps, 1)
        skip.zero_()
        TK.phase_a(params, grads, fims, steps, partials, skip, None, beta2=HYPER["beta2"],
                   eps=HYPER["eps"], p=HYPER["p"], clip=1.0, maximize=False, chunk_size=chunk,
                   fuse_one_chunk=True)
        TK.phase_b(params, grads, fims, moms, steps, partials, skip, None, lr_tensor,
                   lr=HYPER["lr"], beta1=HYPER["beta1"], beta2=HYPER["beta2"], eps=HYPER["eps"],
                   p=HYPER["p"], clip=HYPER["clip"], weight_decay=HYPER["weight_decay"],
                   maximize=False, chunk_size=chunk, fuse_one_chunk=True)

    cstep = torch.compile(step, fullgraph=True)
    lr_tensor = torch.tensor([HYPER["lr"]], device="cuda")
    for g in grads_cpu:
        gs = [t.cuda() for t in g]
        eager.step_triton(gs, chunk_size=chunk, lr_tensor=lr_tensor)
        partials = torch.empty(n_slots, 2, dtype=torch.float64, device="cuda")
        skip = torch.zeros(1, device="cuda")
        cstep(compiled.params, gs, compiled.fims, compiled.moms, compiled.steps, partials, skip,
              lr_tensor)
    for a, b in zip(eager.params + eager.fims + eager.moms, compiled.params + compiled.fims +
                    compiled.moms):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
