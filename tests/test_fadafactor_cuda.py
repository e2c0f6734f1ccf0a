"""FAdafactor on backend="cuda" (csrc/cuda/fadafactor_cuda.cu) on a GPU, where it is its own: the
kernels chosen, and sizes only a GPU runs (launches split over tables, an embedding of 20 chunks).
Skipped without a GPU (tests/test_fadafactor_cuda_emulated.py runs the same kernels on the CPU);
tests/test_scenarios.py runs the scenarios every backend shares on it (its "cuda-gpu" backend:
parity with the float64 oracle over the full state, CUDA graphs, the non-finite skip, checkpoints,
GradScaler). `make gpu-check` runs it where there is a GPU.
"""

from __future__ import annotations

import pytest
import torch

from fadam_fused import FAdafactor, backends
from fadam_testing import FADAFACTOR, embedding_problem, make_problem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

DEV = torch.device("cuda") if torch.cuda.is_available() else None


def test_factored_parameters_run_on_the_cuda_kernels():
    assert backends.resolve(None, DEV) == "cuda"
    p = torch.nn.Parameter(torch.randn(64, 48, device=DEV))
    p.grad = torch.randn_like(p)
    opt = FAdafactor([p])
    with torch.profiler.profile() as prof:
        opt.step()
    names = {e.name for e in prof.events()}
    assert "fadam_fused::fadafactor_phase_s" in names, sorted(n for n in names if "fadam" in n)


def test_large_matrices_split_over_launches():
    """A 4096 x 1024 matrix (64 chunks, 256 tiles) and 200 small ones (the tables hold 128)."""
    shapes = [(4096, 1024)] + [(17 + i % 5, 33 + i % 3) for i in range(200)]
    FADAFACTOR.check(make_problem(shapes=shapes, steps=2), "cuda", device=DEV, lr=1e-2, clip=0.5)


@pytest.mark.parametrize("eps", [1e-8, 1e-30])
def test_large_embedding_matches_oracle(eps):
    """5000 x 256 (20 chunks and tiles) with a tenth of its rows touched per step."""
    FADAFACTOR.check(embedding_problem(rows=5000, dim=256, steps=4), "cuda", device=DEV, lr=1e-2,
                     eps=eps)


