"""The implementations the benchmark compares, one "row" each.

Every row builds an optimizer over a parameter list with the same hyperparameters where they exist
(lr 1e-3, betas (0.9, 0.999), eps 1e-8; FAdam and FAdafactor rows weight_decay 1e-3 and clip 1.0,
the paper's and our defaults; `--clip` changes the clip of the fadam_fused rows, FAdafactor's
included). A row that cannot run here says why (`unavailable`) instead of disappearing.

The `fadafactor-*` rows step fadam_fused.FAdafactor: parameters of 2+ dims (the matrices of the
LLM-shaped workloads) take its factored path, 1-D ones (norm weights, and every tensor of the
count and small workloads) FAdam's.

The `adafisher-*` rows step fadam_fused.AdaFisher, whose factors belong to layers ([note:
AdaFisher factors] in fadam_fused/adafisher.py), so each row builds the layers the engine would
see over the list: each 2-D tensor the weight of an nn.Linear(bias=False), each 1-D tensor the
weight of an nn.LayerNorm(bias=False) (the LLM-shaped lists' norm weights; every tensor of the
count and small workloads), a tensor of another rank a bare parameter (F = 1). Building the row
runs one forward of every layer on ADAFISHER_ROWS seeded random input rows and one backward
(torch.autograd.grad to the inputs: the shared p.grad stay untouched), so the hooks measure real
H and S; the first warmup step folds them into the running factors. With an update interval of
2^30 no later step measures or folds anything: every timed step is step() alone (the non-finite
check and the update with F = S H^T + damping from the two factor vectors), the part the kernels
fuse; forward, backward and the factor update are not timed. A row whose backend has no
AdaFisher kernels in this build is not run and says so (fadam_fused.backends.adafisher_available).

The `-noclip` rows step with clip=None whatever `--clip` says. They are not in the default set:
ask for them next to their clip-on twin (`--rows fadam-cpu,fadam-cpu-noclip`) and the run reports
clip off against clip on from the same rounds.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch

from . import traffic

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8
FADAM_WEIGHT_DECAY, FADAM_CLIP = 1e-3, 1.0

NOCLIP = "-noclip"
FUSED_BACKENDS = ("cpu", "triton", "cuda")
BACKENDS = ("cpu", "reference", "triton", "cuda")
# Every row, in the order tables list them, each -noclip row right after its twin.
ALL_ROW_NAMES = (
    *(n for b in BACKENDS for n in ((f"fadam-{b}", f"fadam-{b}{NOCLIP}") if b in FUSED_BACKENDS
                                    else (f"fadam-{b}",))),
    *(f"fadafactor-{b}" for b in BACKENDS),
    *(f"adafisher-{b}" for b in BACKENDS),
    "torch-adam-fused", "torch-adam-foreach", "torch-adam-forloop", "pytorch_optimizer-fadam",
)
# The default set: every row but the -noclip ones, fadafactor-reference and adafisher-reference,
# which are unfused: fadafactor-reference took 1.7 s per step on the 64M default on 2 cores
# (fadam-reference 1.3 s, measured side by side), a slow row that takes at least 3 timed steps
# plus warmup on each of the 10 workloads of `make bench`; adafisher-reference is the same kind of
# per-tensor PyTorch step (not timed on the 64M default yet: bench/NOTES.md, "AdaFisher").
# fadafactor-triton and -cuda, adafisher-triton and -cuda are GPU-only: on a CPU run they only say
# so, and `make gpu-check` times them next to FAdam's.
OPT_IN = ("fadafactor-reference", "adafisher-reference")
ROW_NAMES = tuple(n for n in ALL_ROW_NAMES if not n.endswith(NOCLIP) and n not in OPT_IN)
BASELINE = "torch-adam-fused"


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    family: str  # traffic model: "adam", "fadam", "fadafactor" or "adafisher" (bench/traffic.py)
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    unavailable: Callable[[torch.device], str | None]
    backend: str | None = None  # the fadam_fused backend behind the row, if any
    clip: float | None = None   # FAdam(-afactor) rows: the clip they step with (None: off)
    twin: str | None = None     # a -noclip row: the row that differs from it only by clip
    # A fadafactor row: the FAdam row of its backend, which differs from it only by the factored
    # FIM (the run pairs them per round, as it pairs every row with torch-adam-fused).
    fadam: str | None = None

    @property
    def clipping(self) -> bool:
        return self.family in ("fadam", "fadafactor") and bool(self.clip)

    def chunk_size(self) -> int:
        """Chunk size of the fused backend behind a fadam or fadafactor row (its one-chunk
        threshold)."""
        if self.backend not in FUSED_BACKENDS:
            return traffic.DEFAULT_CHUNK_SIZE
        from fadam_fused import op_contract

        return op_contract.CHUNK_SIZE[self.backend]

    def bytes_per_param(self, shapes: list[traffic.Shape], dtype: torch.dtype,
                        reads_only: bool = False) -> float:
        """The traffic model for this row (its family, chunk size and clip) over tensors of
        `shapes` (FAdafactor's depends on their dims), params and grads in `dtype`."""
        return traffic.bytes_per_param(self.family, shapes, dtype, dtype, self.chunk_size(),
                                       reads_only=reads_only, clipping=self.clipping)


def _fadam_import_error() -> str | None:
    try:
        import fadam_fused  # noqa: F401
        from fadam_fused import FAdam, backends  # noqa: F401
    except Exception as exc:  # ImportError, or a half-written package raising anything else
        return (f"fadam_fused is not importable ({type(exc).__name__}: {exc}); build it with "
                "`pip install --no-build-isolation -e .` or `make`")
    return None


def _backend_unavailable(backend: str, device: torch.device) -> str | None:
    """Why a fadam_fused row on `backend` cannot run on `device` (None if it can). FAdam and
    FAdafactor have kernels on the same backends, so one answer serves both families
    (AdaFisher's rows add their own check, _adafisher_unavailable)."""
    reason = _fadam_import_error()
    if reason is not None:
        return reason
    if backend == "cpu" and device.type != "cpu":
        return f"CPU-only row; this run is on {device.type}"
    from fadam_fused import backends
    reason = backends.unavailable_reason(backend, device)
    if backend in ("triton", "cuda") and device.type != "cuda":
        # GPU-only rows. Triton on CPU tensors exists only as its interpreter
        # (TRITON_INTERPRET=1), which runs ~1000x slower than compiled code: not a benchmark.
        also = f" (and: {reason})" if reason and "CUDA tensors" not in reason else ""
        return f"GPU-only row; this run is on {device.type}{also}"
    return reason


def _fadam_row(name: str, backend: str, clip: float | None, twin: str | None = None) -> Row:
    def make(params):
        from fadam_fused import FAdam
        return FAdam(params, lr=LR, betas=BETAS, eps=EPS, clip=clip,
                     weight_decay=FADAM_WEIGHT_DECAY, backend=backend)

    return Row(name, "fadam", make, lambda device: _backend_unavailable(backend, device),
               backend=backend, clip=clip, twin=twin)


def _fadafactor_row(name: str, backend: str, clip: float | None) -> Row:
    def make(params):
        from fadam_fused import FAdafactor
        return FAdafactor(params, lr=LR, betas=BETAS, eps=EPS, clip=clip,
                          weight_decay=FADAM_WEIGHT_DECAY, backend=backend)

    return Row(name, "fadafactor", make,
               lambda device: _backend_unavailable(backend, device),
               backend=backend, clip=clip, fadam=f"fadam-{backend}")


# Input rows of the one forward that measures the AdaFisher rows' factors: H and S are means over
# rows, so a few give factors of the right kind; 8 rows of the 64M default's 2048-wide layers are
# ~3 MFLOP each, nothing next to the step.
ADAFISHER_ROWS = 8
ADAFISHER_UPDATE_INTERVAL = 1 << 30  # the first step's factor update is the only one


def adafisher_layers(params: list[torch.Tensor]) -> torch.nn.ModuleList:
    """The layers an AdaFisher row measures: each 2-D parameter the weight of an
    nn.Linear(bias=False), each 1-D one the weight of an nn.LayerNorm(bias=False); parameters of
    other ranks are in no layer (F = 1). Built on the meta device, then given the parameters."""
    from torch import nn
    layers = nn.ModuleList()
    for p in params:
        if p.dim() == 2:
            layer = nn.Linear(p.shape[1], p.shape[0], bias=False, device="meta")
        elif p.dim() == 1:
            layer = nn.LayerNorm(p.shape[0], bias=False, device="meta")
        else:
            continue
        layer.weight = p
        layers.append(layer)
    return layers


def measure_factors(layers: torch.nn.ModuleList, seed: int = 0) -> None:
    """One forward of every layer on ADAFISHER_ROWS seeded random rows and one backward of a
    seeded random projection of the outputs to the inputs only: the optimizer's hooks see each
    layer's input and output gradient, and no p.grad is written."""
    gen = torch.Generator().manual_seed(seed)
    inputs, loss = [], 0.0
    with torch.enable_grad():
        for layer in layers:
            w = layer.weight
            x = torch.randn(ADAFISHER_ROWS, w.shape[-1], generator=gen).to(w.device, w.dtype)
            x.requires_grad_(True)
            out = layer(x)
            proj = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
            loss = loss + (out * proj).sum()
            inputs.append(x)
        if inputs:
            torch.autograd.grad(loss, inputs)


def _adafisher_unavailable(backend: str, device: torch.device) -> str | None:
    reason = _backend_unavailable(backend, device)
    if reason is not None:
        return reason
    from fadam_fused import backends
    if not backends.adafisher_available(backend):
        return (f"this build has no AdaFisher kernels for {backend!r} "
                "(fadam_fused.backends.adafisher_available)")
    return None


def _adafisher_row(name: str, backend: str) -> Row:
    def make(params):
        from fadam_fused import AdaFisher
        layers = adafisher_layers(params)
        opt = AdaFisher(layers, params, lr=LR, beta=BETAS[0], weight_decay=FADAM_WEIGHT_DECAY,
                        update_interval=ADAFISHER_UPDATE_INTERVAL, backend=backend)
        measure_factors(layers)
        return opt

    return Row(name, "adafisher", make, lambda device: _adafisher_unavailable(backend, device),
               backend=backend)


def _adam_row(name: str, **kwargs) -> Row:
    def make(params):
        return torch.optim.Adam(params, lr=LR, betas=BETAS, eps=EPS, **kwargs)

    return Row(name, "adam", make, lambda device: None)


def _pytorch_optimizer_row() -> Row:
    def make(params):
        import pytorch_optimizer
        # weight_decay 1e-3 to match ours (their default is 0.1; the cost is the same). Left at its
        # defaults otherwise: foreach=None takes their foreach path for dense real grads on CPU
        # and GPU, and eps_2 = 0.01 adds their RMS(g)-scaled epsilon (one more reduction). Always
        # clip 1.0: their FAdam refuses clip <= 0 and has no way to turn clipping off.
        return pytorch_optimizer.FAdam(params, lr=LR, betas=BETAS, eps=EPS, clip=FADAM_CLIP,
                                       weight_decay=FADAM_WEIGHT_DECAY, p=0.5)

    def unavailable(device):
        try:
            import pytorch_optimizer  # noqa: F401
        except ImportError as exc:
            return (f"pytorch_optimizer is not installed ({exc}); "
                    "`pip install -r requirements-bench.txt`")
        return None

    return Row("pytorch_optimizer-fadam", "fadam", make, unavailable, clip=FADAM_CLIP)


def all_rows(clip: float | None = FADAM_CLIP) -> list[Row]:
    """Every row in ALL_ROW_NAMES order; `clip` is the fadam_fused rows' (None or 0: off)."""
    clip = clip or None
    rows = []
    for backend in BACKENDS:
        name = f"fadam-{backend}"
        rows.append(_fadam_row(name, backend, clip))
        if backend in FUSED_BACKENDS:
            rows.append(_fadam_row(name + NOCLIP, backend, None, twin=name))
    rows += [_fadafactor_row(f"fadafactor-{backend}", backend, clip) for backend in BACKENDS]
    rows += [_adafisher_row(f"adafisher-{backend}", backend) for backend in BACKENDS]
    rows += [
        _adam_row("torch-adam-fused", fused=True),
        _adam_row("torch-adam-foreach", foreach=True, fused=False),
        _adam_row("torch-adam-forloop", foreach=False, fused=False),
        _pytorch_optimizer_row(),
    ]
    assert tuple(r.name for r in rows) == ALL_ROW_NAMES
    return rows


def select(names: Iterable[str] | None, clip: float | None = FADAM_CLIP) -> list[Row]:
    """The named rows (the default set ROW_NAMES when none are named), in ALL_ROW_NAMES order."""
    names = list(names or ROW_NAMES)
    unknown = [n for n in names if n not in ALL_ROW_NAMES]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; choose from {', '.join(ALL_ROW_NAMES)}")
    return [r for r in all_rows(clip) if r.name in names]
