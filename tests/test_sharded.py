"""Sharded parameters (fadam_fused/sharded.py): FSDP2, HSDP, tensor parallel, DDP and ZeRO.

Each launch runs several scenarios of tests/sharded_worker.py under torchrun (gloo, CPU tensors),
since starting processes that import torch costs seconds: one launch of 2 ranks and one of 4 (the
2-D meshes of HSDP and of FSDP2 over tensor parallel). Every scenario compares 8 steps of a sharded FAdam (clip=0.5, checked to bind,
weight_decay=0.1) with a one-process run, parameters and whole state, to 1e-5 relative. The GPU
class runs the same scenarios on NCCL with one GPU per rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sharded_worker as worker

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
WORKER = str(Path(__file__).with_name("sharded_worker.py"))
ROOT = str(Path(__file__).resolve().parent.parent)

needs_dist = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _emulated_cuda_built() -> bool:
    try:
        from fadam_fused import _C_cuda_emulated  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = ("cpu", "reference")
OPTIMIZERS = ("fadam", "fadafactor")
# FAdafactor's scenarios add FSDP2 on a batch-sharded 3-D parameter; the CUDA kernels run
# emulated on CPU tensors (FADAM_CUDA_EMULATE=1) where that build exists.
TWO_RANKS = ([f"{s}:{b}" for s in ("fsdp_shard0", "fsdp_shard1", "tp", "ddp", "zero", "nonfinite",
                                    "errors", "bad_grad_one_rank", "checkpoint")
              for b in BACKENDS]
             + [f"{s}:{b}:fadafactor" for s in ("fsdp_shard0", "fsdp_shard1", "fsdp_batched", "tp",
                                                "zero", "nonfinite", "bad_grad_one_rank",
                                                "checkpoint")
                for b in BACKENDS]
             + [f"{s}:reference:adafisher" for s in ("ddp", "fsdp_shard0", "nonfinite")]
             + ["stochastic:cpu", "stochastic:reference", "stochastic:cpu:adafisher",
                "stochastic:reference:adafisher"]
             + ["fsdp_chunks:cpu", "fsdp_chunks:cpu:fadafactor", "fsdp_mixed_dtypes",
                "fsdp_mixed_dtypes::fadafactor"]
             + (["triton_fsdp", "triton_fsdp::fadafactor"] if _triton_importable() else [])
             + ([f"{s}:cuda:{o}" for s in ("fsdp_shard0", "tp") for o in OPTIMIZERS]
                + ["stochastic:cuda", "stochastic:cuda:adafisher"] if _emulated_cuda_built() else []))
FOUR_RANKS = [f"{s}:{b}:{o}" for s in ("hsdp", "fsdp_tp") for b in BACKENDS for o in OPTIMIZERS]


def launch(nproc: int, scenarios: list[str], env: dict[str, str] | None = None,
           timeout: float = 600) -> str:
    """Runs the worker on `nproc` ranks; returns its output (stdout and stderr)."""
    run_env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([*TORCHRUN, f"--nproc_per_node={nproc}", WORKER, *scenarios],
                          cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=timeout)
    return proc.stdout + proc.stderr


def assert_passed(output: str, scenario: str) -> None:
    if f"PASS {scenario}\n" not in output:
        fail = output.find("FAIL ")
        pytest.fail(f"{scenario} did not pass:\n" + (output[fail:fail + 6000] if fail >= 0
                                                      else output[-6000:]))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_ckpt")
    for backend in BACKENDS:  # the one-process checkpoints the 2-rank run loads
        for optimizer in OPTIMIZERS:
            worker.save_one_process(str(root), backend, optimizer)
    env = {"CKPT_DIR": str(root), "TRITON_INTERPRET": "1",
           "FADAM_CUDA_EMULATE": "1" if _emulated_cuda_built() else "0"}
    return launch(2, TWO_RANKS, env), str(root)


@pytest.fixture(scope="module")
def four_ranks():
    return launch(4, FOUR_RANKS)


@needs_dist
@pytest.mark.parametrize("scenario", TWO_RANKS)
def test_two_ranks(two_ranks, scenario):
    assert_passed(two_ranks[0], scenario)


@needs_dist
@pytest.mark.parametrize("scenario", FOUR_RANKS)
def test_four_ranks(four_ranks, scenario):
    assert_passed(four_ranks, scenario)


@needs_dist
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_rank_checkpoint_loads_on_one_process(two_ranks, backend, optimizer):
    """A DCP checkpoint of a 2-rank FSDP2 optimizer resumes in one process without sharding."""
    output, root = two_ranks
    assert_passed(output, f"checkpoint:{backend}" + ("" if optimizer == "fadam" else
                                                     f":{optimizer}"))
    got, want = worker.load_two_rank_checkpoint(root, backend, optimizer)
    worker.assert_match(got, want, f"2 ranks -> 1 process {backend} {optimizer}")


@needs_dist
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_train_fsdp_example_follows_the_one_process_run(optimizer):
    """examples/train_fsdp.py, 2 ranks, a few tiny steps, with the unsharded twin on rank 0."""
    script = str(Path(ROOT) / "examples" / "train_fsdp.py")
    proc = subprocess.run([*TORCHRUN, "--nproc_per_node=2", script, "--steps", "4",
                           "--eval-every", "4", "--batch", "4", "--context", "16",
                           "--optimizer", optimizer, "--compare"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "steps skipped for non-finite gradients: 0" in output, \
        output[-4000:]
    assert "returned a view tensor" not in output
    line = next(x for x in output.splitlines() if x.startswith("largest |sharded"))
    # float32 sums in another order: the losses agree to rounding (seen: ~1e-7 of ~4.5).
    assert float(line.rsplit(" ", 1)[1]) < 1e-5, line


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


needs_nccl = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_nccl_available(),
                                reason="NCCL is not available")


@pytest.mark.gpu
@needs_nccl
@pytest.mark.skipif(_gpus() < 2, reason=f"needs 2 or more CUDA GPUs for NCCL (found {_gpus()})")
def test_nccl_two_gpus(tmp_path):
    """The 2-rank scenarios on one GPU per rank over NCCL, cuda and reference backends."""
    scenarios = [f"{s}:{b}:{o}" for s in ("fsdp_shard0", "fsdp_shard1", "tp", "ddp", "zero",
                                          "nonfinite", "errors", "bad_grad_one_rank")
                 for b in ("cuda", "reference") for o in OPTIMIZERS
                 if not (s in ("ddp", "errors") and o == "fadafactor")]
    scenarios += ["fsdp_batched:cuda:fadafactor", "fsdp_chunks:cuda",
                  "fsdp_chunks:cuda:fadafactor"]
    scenarios += ["triton_fsdp", "triton_fsdp::fadafactor"] if _triton_importable() else []
    output = launch(2, scenarios, {"FADAM_SHARDED_DEVICE": "cuda", "TRITON_INTERPRET": "0",
                                   "CKPT_DIR": str(tmp_path)})
    for scenario in scenarios:
        assert_passed(output, scenario)


@pytest.mark.gpu
@needs_nccl
@pytest.mark.skipif(_gpus() < 4, reason=f"needs 4 or more CUDA GPUs for NCCL (found {_gpus()})")
def test_nccl_four_gpus():
    """The 2-D meshes (HSDP, FSDP2 over tensor parallel) on 4 GPUs over NCCL."""
    scenarios = [f"{s}:{b}:{o}" for s in ("hsdp", "fsdp_tp") for b in ("cuda", "reference")
                 for o in OPTIMIZERS]
    output = launch(4, scenarios, {"FADAM_SHARDED_DEVICE": "cuda"})
    for scenario in scenarios:
        assert_passed(output, scenario)
