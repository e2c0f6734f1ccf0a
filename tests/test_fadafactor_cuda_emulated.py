"""FAdafactor's CUDA kernels (csrc/cuda/fadafactor_cuda.cu) run on the CPU under HIP-CPU: the
switch, the launch splitting, the tile limit. tests/test_scenarios.py runs the scenarios every
backend shares on them (its "cuda-emulated" backend: parity with the float64 oracle over the full
state, skips, checkpoints, GradScaler, errors).

The emulated build and its switch are those of test_cuda_emulated.py (which also says what
emulation cannot check). Shrinking the chunk to 64 elements makes 8 x 8 tiles, so small matrices
have several row and column tiles (their partials combined in phase S), chunks that end mid-row,
multi-chunk phase-A slots, and enough blocks to fill more than one launch.
"""

from __future__ import annotations

import pytest
import torch

from fadam_fused import op_contract
from conftest import backend_ops
from fadam_testing import FADAFACTOR, make_problem

pytestmark = pytest.mark.usefixtures("cuda_emulated")


def test_backend_cuda_runs_the_emulated_fadafactor_ops():
    ops = backend_ops("cuda", factored=True)
    assert ops.phase_s is torch.ops.fadam_fused.cuda_emulated_fadafactor_phase_s.default
    assert ops.phase_b is torch.ops.fadam_fused.cuda_emulated_fadafactor_phase_b.default
    assert ops.chunk_size == op_contract.CHUNK_SIZE["cuda"] == 65536


def test_more_tensors_and_blocks_than_one_launch_holds(cuda_chunk):
    """140 factored tensors (the tables hold 128) and a (300, 240) matrix of 1125 chunks and
    1140 tiles at chunk 64 (a launch holds 1024 blocks): every kernel splits over launches, and
    the big tensor's phase-B blocks update 2 chunks each."""
    cuda_chunk(64)
    shapes = [(3 + i % 4, 5 + i % 7) for i in range(140)] + [(300, 240), (7,)]
    FADAFACTOR.check(make_problem(shapes=shapes, steps=2), "cuda", lr=1e-2, clip=0.5)


def test_chunks_wider_than_the_tile_limit_are_refused_by_the_op():
    """The phase-S kernel keeps 8 column sums per lane: tiles of at most 256 columns, so chunks
    below 257^2. The op says so instead of reading past its registers."""
    p, g = torch.randn(4, 300), torch.randn(4, 300)
    rows, cols = torch.ones(4), torch.ones(300)
    chunk = 1 << 17  # isqrt = 362 columns per tile
    partials, factors = op_contract.new_factor_buffers([p], chunk)
    with pytest.raises(RuntimeError, match="at most 256"):
        torch.ops.fadam_fused.cuda_emulated_fadafactor_phase_s(
            [p], [g], [rows], [cols], [torch.ones(())], partials, factors, torch.zeros(()), None,
            beta2=0.999, maximize=False, chunk_size=chunk)


