"""The two-phase op contract, written once for every backend.

[note: the two-phase op contract]
Each per-tensor RMS needs a whole-tensor reduction before any element can be updated, so a fused
FAdam step is two ops, each one launch per (device, dtype) group of tensors (docs/design.md,
section 3):

- phase A reads params, grads, fims and steps (read-only), writes per-chunk float64 partial sums
  of ghat^2 and w^2 into ``partials`` and stores 1 into ``skip`` when a gradient is not finite;
- phase B, unless ``skip != 0``, adds up each tensor's slots in slot order, applies the two clip
  scales and writes fims, momentums and params.

Arguments, for every backend (C++ CPU, CUDA, Triton):

- partials: float64 [n_slots, 2]. Tensor i owns ``nchunks_of(numel_i, chunk_size)`` consecutive
  slots in list order (``slot_offsets``); slot (i, c) holds (sum ghat^2, sum w^2) over chunk c.
  Phase B sums a tensor's slots in slot order, so the total is deterministic. A sharded wrapper
  may replace a tensor's slots between the phases (docs/design.md, section 7): phase B only adds
  them up and divides by the local numel.
- clip <= 0 turns clipping off: phase A then only checks every gradient (writes no slot) and
  phase B reads no slot (s1 = s2 = 1). With clipping on, a non-finite sum (a NaN or inf in a
  parameter) means s = inf: that tensor's clipped weight decay is 0 for the step.
- fuse_one_chunk: a tensor with one chunk is done entirely in phase B (both phases on data still
  in cache); phase A only checks its gradient and leaves its slot unwritten.
- skip: float32, one element. Phase A only ever stores 1 into it (the caller zeroes it, or seeds
  it with GradScaler's found_inf); phase B is a no-op when it is nonzero.
- steps: float32 0-dim tensors on the parameters' device, already incremented (t >= 1).
- grad_scale: optional float32 one-element tensor; gradients are divided by it in registers.
  maximize negates them in registers too; grads are never written.
- lr: the float ``lr``, unless ``lr_tensor`` (one element, float32 or float64, on the params'
  device) is given.

This module defines the schemas (the C++ library only registers kernels for them), the chunk and
slot arithmetic, the host step scalars (the Python twin of ``fadam::host_scalars`` in
csrc/fadam_ops.h, used by the Triton launcher) and the wrappers the optimizer calls.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Callable, Sequence

import torch
from torch import Tensor

NAMESPACE = "fadam_fused"

# The argument lists of the two ops. Mutated tensors carry (x!) annotations; nothing is returned.
PHASE_A_SCHEMA = (
    "(Tensor[] params, Tensor[] grads, Tensor[] fims, Tensor[] steps, Tensor(a!) partials, "
    "Tensor(b!) skip, Tensor? grad_scale, *, float beta2, float eps, float p, float clip, "
    "bool maximize, int chunk_size, bool fuse_one_chunk) -> ()")
PHASE_B_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] fims, Tensor(c!)[] momentums, "
    "Tensor[] steps, Tensor partials, Tensor skip, Tensor? grad_scale, Tensor? lr_tensor, *, "
    "float lr, float beta1, float beta2, float eps, float p, float clip, float weight_decay, "
    "bool maximize, int chunk_size, bool fuse_one_chunk) -> ()")
PHASE_A_MUTATES = ("partials", "skip")
PHASE_B_MUTATES = ("params", "fims", "momentums")

# Elements per chunk: the partial-sum slot unit and one block's (GPU) or task's (CPU) work.
# GPUs: 65536, PyTorch's MultiTensorApply chunk; a one-chunk tensor's second pass re-reads
# 64K x 12 B = 768 KiB, which stays in L2. CPU: 2^20; a one-chunk tensor's g, f, theta (12 MiB in
# float32) are re-read from L3 instead of DRAM. bench/NOTES.md has the measurements.
CHUNK_SIZE = {"cpu": 1 << 20, "cuda": 65536, "triton": 65536}

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_DEFINED: set[str] = set()


def define_phase_ops(name_a: str, name_b: str) -> None:
    """Defines fadam_fused::<name_a> / <name_b> with the two schemas and no-op fake kernels.

    The C++ kernels (and the emulated CUDA build) register implementations for these names; the
    Triton ops pass the same schemas to ``torch.library.triton_op`` instead. Both ops only mutate
    their (a!) arguments, so a fake kernel has nothing to compute.
    """
    for name, schema in ((name_a, PHASE_A_SCHEMA), (name_b, PHASE_B_SCHEMA)):
        if name in _DEFINED:
            continue
        _LIB.define(name + schema)
        torch.library.register_fake(f"{NAMESPACE}::{name}", _fake, lib=_LIB)
        _DEFINED.add(name)


def _fake(*args, **kwargs) -> None:
    return None


define_phase_ops("fadam_phase_a", "fadam_phase_b")
# The ops of the emulated CUDA build (csrc/cuda/launch.h), defined by fadam_fused._ext before it
# loads that build: only under FADAM_CUDA_EMULATE=1 or in its tests.
EMULATED_CUDA_OPS = ("cuda_emulated_phase_a", "cuda_emulated_phase_b")


# ---- chunks and slots ---------------------------------------------------------------------------


def nchunks_of(numel: int, chunk_size: int) -> int:
    """Slots owned by a tensor of `numel` elements: max(1, ceil(numel / chunk_size))."""
    return 1 if numel <= chunk_size else (numel + chunk_size - 1) // chunk_size


def slot_offsets(numels: Sequence[int], chunk_size: int) -> list[int]:
    """offsets[i] is the first slot of tensor i; offsets[-1] is the number of slots."""
    offsets = [0]
    for numel in numels:
        offsets.append(offsets[-1] + nchunks_of(numel, chunk_size))
    return offsets


def new_partials(params: Sequence[Tensor], chunk_size: int) -> Tensor:
    """An uninitialised float64 [n_slots, 2] partials tensor for `params` (phase A fills it)."""
    n_slots = sum(nchunks_of(t.numel(), chunk_size) for t in params)
    return torch.empty((n_slots, 2), dtype=torch.float64, device=params[0].device)


# ---- host step scalars --------------------------------------------------------------------------


def f32(x: float) -> float:
    """x rounded to float32 (round to nearest even), as C++'s static_cast<float>. Host only."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclasses.dataclass(frozen=True)
class HostScalars:
    """The launch-wide scalars every kernel receives, rounded the way all backends round them.

    float32 values are Python floats already rounded to float32; beta2 and clip stay float64
    (b2hat and the clip scales are computed in float64 per tensor).
    """

    p: float
    eps_p: float            # float32(eps ** (2p)), the power taken in float64
    beta1: float
    one_minus_beta1: float  # float32(1 - float64(float32(beta1)))
    weight_decay: float
    lr: float
    beta2: float
    clip: float             # 0 when clipping is off
    sign: float             # -1 with maximize


def host_scalars(*, beta2: float, eps: float, p: float, clip: float, maximize: bool,
                 lr: float = 0.0, beta1: float = 0.0, weight_decay: float = 0.0) -> HostScalars:
    beta1_f = f32(beta1)
    return HostScalars(p=f32(p), eps_p=f32(eps ** (2.0 * p)), beta1=beta1_f,
                       one_minus_beta1=f32(1.0 - beta1_f), weight_decay=f32(weight_decay),
                       lr=f32(lr), beta2=float(beta2), clip=float(clip) if clip > 0 else 0.0,
                       sign=-1.0 if maximize else 1.0)


def smallest_safe_eps(p: float) -> float:
    """The smallest eps (to 2 significant digits, rounded up) whose eps ** (2p) is a positive
    normal float32. Normal, not just positive: a denormal d makes 1/d overflow to inf."""
    tiny = torch.finfo(torch.float32).tiny  # 1.18e-38
    eps = tiny ** (1.0 / (2.0 * p))
    return float(f"{eps * 1.01:.2g}")


# ---- the backend interface ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PhaseOps:
    """One fused backend: two ops of the schemas above, and the chunk size to pass them.

    Every backend's ops take the same arguments, so the optimizer calls all of them alike:
    ``ops.phase_a(params, grads, fims, steps, partials, skip, grad_scale, beta2=..., eps=...,
    p=..., clip=..., maximize=..., chunk_size=ops.chunk_size, fuse_one_chunk=...)``.
    """

    name: str
    phase_a: Callable[..., None]
    phase_b: Callable[..., None]
    chunk_size: int


def phase_ops(backend: str, name_a: str, name_b: str) -> PhaseOps:
    """The backend whose ops are torch.ops.fadam_fused.<name_a> / <name_b>, with its chunk size."""
    namespace = getattr(torch.ops, NAMESPACE)
    return PhaseOps(backend, getattr(namespace, name_a).default, getattr(namespace, name_b).default,
                    CHUNK_SIZE[backend])
