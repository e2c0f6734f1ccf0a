"""Parameter lists to benchmark: an LLM-shaped default, a sweep over total size, a sweep over count,
and many small tensors.

Only shapes live here; bench/step_bench.py turns them into tensors. Shapes follow a LLaMA-style
decoder (no biases, RMSNorm weights, SwiGLU MLP with ffn = 8/3 d rounded up to a multiple of 256,
embedding tied with the output head), so the mix of tensor sizes (a few big matrices, many
d-sized norm vectors) is the one an optimizer sees in practice.
"""

from __future__ import annotations

import dataclasses
import math


# "default" (LLM-shaped), "size" (size sweep), "count" (tensor-count sweep), "small" (many small
# tensors).
KINDS = ("default", "size", "count", "small")


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str       # short id used in the table, CSV and JSON, e.g. "llm-64M"
    kind: str       # one of KINDS
    shapes: tuple[tuple[int, ...], ...]
    note: str = ""  # how it was built, for the table header

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def n_params(self) -> int:
        return sum(self.numels)

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)


def ffn_dim(d_model: int, multiple_of: int = 256) -> int:
    """LLaMA's SwiGLU hidden size: 8/3 d, rounded up to a multiple of 256 (d=512 -> 1536)."""
    return multiple_of * math.ceil(8 * d_model / 3 / multiple_of)


def llm_shapes(d_model: int, n_layers: int, vocab: int) -> list[tuple[int, ...]]:
    """Embedding, then per layer: 2 RMSNorm weights, q/k/v/o (d x d), gate/up (ffn x d), down (d x ffn);
    then the final norm. The output head is tied to the embedding (one tensor)."""
    f = ffn_dim(d_model)
    shapes: list[tuple[int, ...]] = [(vocab, d_model)]
    for _ in range(n_layers):
        shapes += [(d_model,), (d_model, d_model), (d_model, d_model), (d_model, d_model),
                   (d_model, d_model), (d_model,), (f, d_model), (f, d_model), (d_model, f)]
    shapes.append((d_model,))
    return shapes


def llm_params(d_model: int, n_layers: int, vocab: int) -> int:
    return sum(math.prod(s) for s in llm_shapes(d_model, n_layers, vocab))


def llm_workload(target_params: float, d_model: int, vocab: int = 32000, kind: str = "default") -> Workload:
    """The LLM-shaped list with `d_model` whose layer count brings it closest to target_params."""
    per_layer = llm_params(d_model, 1, vocab) - llm_params(d_model, 0, vocab)
    base = llm_params(d_model, 0, vocab)
    n_layers = max(1, round((target_params - base) / per_layer))
    shapes = llm_shapes(d_model, n_layers, vocab)
    n = sum(math.prod(s) for s in shapes)
    return Workload(name=f"llm-{_human(n)}", kind=kind, shapes=tuple(shapes),
                    note=f"LLM-shaped: vocab {vocab}, d_model {d_model}, {n_layers} layers, "
                         f"ffn {ffn_dim(d_model)}")


# CPU default: ~65M float32 parameters (d=512, 14 layers -> 64.1M), so p+g+m+v = 16 B/param is
# ~1.0 GB, twice the largest last-level cache we expect to meet (480 MiB): every step streams from
# DRAM, the case the 1.5x CPU target is about.
CPU_DEFAULT_PARAMS = 65e6
CPU_DEFAULT_D_MODEL = 512

# GPU default: ~1B parameters (d=2048: 51M per layer), scaled down to what fits next to one copy
# of params + state per row; see step_bench.gpu_default_workload.
GPU_DEFAULT_PARAMS = 1e9
GPU_DEFAULT_D_MODEL = 2048


def size_sweep(d_models: list[int], n_layers: int = 4) -> list[Workload]:
    """LLM-shaped lists of growing size: 4 layers, vocab 16 d, so params ~ 64 d^2
    (d = 64, 128, 256, 512, 1024 -> 0.33M, 1.3M, 4.5M, 18M, 68M parameters). The small end has only
    one-chunk tensors (d=64: the largest is the 1024 x 64 = 65536-element embedding) and its 5 MB
    of p+g+m+v fits in a 32 MiB L3; the large end (1.1 GB) streams from DRAM."""
    out = []
    for d in d_models:
        shapes = llm_shapes(d, n_layers, vocab=16 * d)
        n = sum(math.prod(s) for s in shapes)
        out.append(Workload(name=f"size-{_human(n)}", kind="size", shapes=tuple(shapes),
                            note=f"LLM-shaped: vocab {16 * d}, d_model {d}, {n_layers} layers"))
    return out


def equal_tensors(n: int, numel: int, kind: str, name: str) -> Workload:
    """`n` 1-D tensors of `numel` elements each."""
    return Workload(name=name, kind=kind, shapes=((numel,),) * n, note=f"{n} tensors of {numel} elements")


def count_sweep(counts: list[int], total: int = 1 << 22) -> list[Workload]:
    """`total` parameters (4.2M = 67 MB of p+g+m+v) split into N equal 1-D tensors: at N=16384 each
    tensor has 256 elements and per-tensor overhead (Python loops, launches) dominates."""
    return [equal_tensors(n, max(1, total // n), "count", f"count-{n}") for n in counts]


def small_workload(n: int = 4096, numel: int = 256) -> Workload:
    """4096 tensors of 256 elements (1M parameters, 16 MB of p+g+m+v): the step's per-tensor work
    (validation, planning, tables) against torch's fused Adam, with the data in cache."""
    return equal_tensors(n, numel, "small", f"small-{n}x{numel}")


def tiny_workload() -> Workload:
    """For the smoke test: one multi-chunk tensor (70000 > 65536) and a few one-chunk ones. The
    big one is a 280 x 250 matrix so that FAdafactor factors 99.6% of the parameters, as on an
    LLM-shaped list (FAdam and Adam only see its 70000 elements)."""
    shapes = ((280, 250), (64, 64), (300,), (7, 11, 13), (1,))
    return Workload(name="tiny", kind="default", shapes=shapes, note="smoke-test workload")


def _human(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}K"
    return str(n)
