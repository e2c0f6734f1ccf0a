"""The implementations the benchmark compares, one "row" each, under the names issue 5 fixes.

Every row builds an optimizer over a parameter list with the same hyperparameters where they exist
(lr 1e-3, betas (0.9, 0.999), eps 1e-8; FAdam rows weight_decay 1e-3 and clip 1.0, the paper's and
our defaults). A row that cannot run here says why (`unavailable`) instead of disappearing.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from . import traffic

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8
FADAM_WEIGHT_DECAY, FADAM_CLIP = 1e-3, 1.0

ROW_NAMES = (
    "fadam-cpu", "fadam-reference", "fadam-triton", "fadam-cuda",
    "torch-adam-fused", "torch-adam-foreach", "torch-adam-forloop", "pytorch_optimizer-fadam",
)
BASELINE = "torch-adam-fused"


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    family: str  # traffic model: "adam" or "fadam" (bench/traffic.py)
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    unavailable: Callable[[torch.device], str | None]

    def chunk_size(self) -> int:
        """Chunk size of the fused backend behind a fadam row (its one-chunk threshold)."""
        backend = {"fadam-cpu": "cpu", "fadam-triton": "triton", "fadam-cuda": "cuda"}.get(self.name)
        if backend is None:
            return traffic.DEFAULT_CHUNK_SIZE
        try:
            from fadam_fused import backends
            return backends.fused(backend).chunk_size
        except Exception:  # not importable: the row is unavailable anyway
            return traffic.DEFAULT_CHUNK_SIZE


def _fadam_import_error() -> str | None:
    try:
        import fadam_fused  # noqa: F401
        from fadam_fused import FAdam, backends  # noqa: F401
    except Exception as exc:  # ImportError, or a half-written package raising anything else
        return (f"fadam_fused is not importable ({type(exc).__name__}: {exc}); build it with "
                "`pip install --no-build-isolation -e .` or `make`")
    return None


def _fadam_row(name: str, backend: str) -> Row:
    def make(params):
        from fadam_fused import FAdam
        return FAdam(params, lr=LR, betas=BETAS, eps=EPS, clip=FADAM_CLIP,
                     weight_decay=FADAM_WEIGHT_DECAY, backend=backend)

    def unavailable(device):
        reason = _fadam_import_error()
        if reason is not None:
            return reason
        from fadam_fused import backends
        reason = backends.unavailable_reason(backend, device)
        if backend in ("triton", "cuda") and device.type != "cuda":
            # GPU-only rows. Triton on CPU tensors exists only as its interpreter
            # (TRITON_INTERPRET=1), which runs ~1000x slower than compiled code: not a benchmark.
            also = f" (and: {reason})" if reason and "CUDA tensors" not in reason else ""
            return f"GPU-only row; this run is on {device.type}{also}"
        return reason

    return Row(name, "fadam", make, unavailable)


def _adam_row(name: str, **kwargs) -> Row:
    def make(params):
        return torch.optim.Adam(params, lr=LR, betas=BETAS, eps=EPS, **kwargs)

    return Row(name, "adam", make, lambda device: None)


def _pytorch_optimizer_row() -> Row:
    def make(params):
        import pytorch_optimizer
        # weight_decay 1e-3 to match ours (their default is 0.1; the cost is the same). Left at its
        # defaults otherwise: foreach=None takes their foreach path for dense real grads on CPU
        # and GPU, and eps_2 = 0.01 adds their RMS(g)-scaled epsilon (one more reduction).
        return pytorch_optimizer.FAdam(params, lr=LR, betas=BETAS, eps=EPS, clip=FADAM_CLIP,
                                       weight_decay=FADAM_WEIGHT_DECAY, p=0.5)

    def unavailable(device):
        try:
            import pytorch_optimizer  # noqa: F401
        except ImportError as exc:
            return (f"pytorch_optimizer is not installed ({exc}); "
                    "`pip install -r requirements-bench.txt`")
        return None

    return Row("pytorch_optimizer-fadam", "fadam", make, unavailable)


def all_rows() -> list[Row]:
    rows = [
        _fadam_row("fadam-cpu", "cpu"),
        _fadam_row("fadam-reference", "reference"),
        _fadam_row("fadam-triton", "triton"),
        _fadam_row("fadam-cuda", "cuda"),
        _adam_row("torch-adam-fused", fused=True),
        _adam_row("torch-adam-foreach", foreach=True, fused=False),
        _adam_row("torch-adam-forloop", foreach=False, fused=False),
        _pytorch_optimizer_row(),
    ]
    assert tuple(r.name for r in rows) == ROW_NAMES
    return rows


def select(names: list[str] | None) -> list[Row]:
    rows = all_rows()
    if not names:
        return rows
    unknown = [n for n in names if n not in ROW_NAMES]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; choose from {', '.join(ROW_NAMES)}")
    return [r for r in rows if r.name in names]
