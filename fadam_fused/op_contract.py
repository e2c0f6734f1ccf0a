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
import math
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
    "bool maximize, int chunk_size, bool fuse_one_chunk, int[] rounding=[]) -> ()")
PHASE_A_MUTATES = ("partials", "skip")
PHASE_B_MUTATES = ("params", "fims", "momentums")

# ---- FAdafactor: one more read-only phase ------------------------------------------------------

# [note: the FAdafactor op contract]
# FAdafactor (docs/design.md, section 8) factors the FIM of a parameter of shape (..., n, m) into
# row sums R (..., n) and column sums C (..., m) of g^2. f needs the new R and C, and sum(R), before
# any element of f exists, so its fused step is three ops per (device, dtype) group of factored
# tensors (parameters of fewer than 2 dims take FAdam's two ops):
#
# - phase S (read-only but for scratch): reads g (and R, C, steps), writes per-tile float64 partial
#   row and column sums of g^2 into ``factor_partials``, combines each tensor's partials in tile
#   order (deterministic) into the new R and C, and R_i / sum(R) (0 where sum(R) = 0), as float32
#   into ``factors``; stores 1 into ``skip`` when a gradient is not finite. State is not written:
#   the skip is not decided yet (another device or GradScaler may still set it).
# - phase A: FAdam's phase A with f = (R_i / sum R) * C_j from ``factors`` (fadam::factored_fim in
#   csrc/fadam_math.h): reads g and theta, writes the partials (sum ghat^2, sum w^2) per chunk,
#   with FAdam's chunks, slots and fuse_one_chunk rule. Not called when clipping is off.
# - phase B: FAdam's phase B with f from ``factors``: reads g, m, theta, writes m and theta, and
#   copies the new R and C from ``factors`` into ``fim_rows`` / ``fim_cols``; a no-op on a skip.
#   It takes the steps only for the hash of stochastic rounding ([note: stochastic rounding]).
#
# Layout. Tensor i is seen as B = prod(shape[:-2]) matrices of n rows and m columns, cut into
# tiles of tile_rows x tile_cols (factor_tile()); per matrix, factor_partials holds
# [n_col_tiles, n] row partials then [n_row_tiles, m] column partials, and factors holds R (n),
# C (m) and R / sum R (n). Tensor i's regions start at the offsets factor_offsets() gives.
#
# Bytes per parameter, float32, tensors larger than a chunk: phase S reads g (4), phase A reads g
# and theta (8), phase B reads g, m, theta and writes m, theta (20): 32 B, against FAdam's 40 (its
# f is read twice and written once) and Adam's 28. The partials add 2 x 8 x (1/tile_rows +
# 1/tile_cols) B (written, then read): 0.03 B at the CPU's 1024 x 1024 tiles, 0.125 B at the GPU's
# 256 x 256; R, C and factors are O(n + m). One-chunk tensors (phase A fused into B) and clipping
# off: 24 B. State: m (4 B) plus 4 (n + m) / (n m) B, against FAdam's 8.
FADAFACTOR_PHASE_S_SCHEMA = (
    "(Tensor[] params, Tensor[] grads, Tensor[] fim_rows, Tensor[] fim_cols, Tensor[] steps, "
    "Tensor(a!) factor_partials, Tensor(b!) factors, Tensor(c!) skip, Tensor? grad_scale, *, "
    "float beta2, bool maximize, int chunk_size) -> ()")
FADAFACTOR_PHASE_A_SCHEMA = (
    "(Tensor[] params, Tensor[] grads, Tensor factors, Tensor(a!) partials, Tensor? grad_scale, "
    "*, float eps, float p, float clip, bool maximize, int chunk_size, bool fuse_one_chunk) -> ()")
FADAFACTOR_PHASE_B_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] fim_rows, Tensor(c!)[] fim_cols, "
    "Tensor(d!)[] momentums, Tensor[] steps, Tensor factors, Tensor partials, Tensor skip, "
    "Tensor? grad_scale, Tensor? lr_tensor, *, float lr, float beta1, float eps, float p, "
    "float clip, float weight_decay, bool maximize, int chunk_size, bool fuse_one_chunk, "
    "int[] rounding=[]) -> ()")


# ---- bfloat16 stochastic rounding ---------------------------------------------------------------

# [note: stochastic rounding]
# With ``bf16_rounding="stochastic"`` every update op (fadam_phase_b, fadafactor_phase_b,
# adafisher_update) writes a bfloat16 parameter, and a bfloat16 momentum, from its float32 value
# x by stochastic rounding: r = 16 random bits, result = the upper 16 bits of (bits(x) + r) mod
# 2^32 for finite x (x unchanged to nearest when NaN or inf). The result rounds away from the
# truncation with probability equal to the fraction of a bfloat16 ulp that x lies above it, so
# E[result] = x. The bits come from a counter-based hash, so a step is the same on every backend,
# needs no host sync and no generator state, and is CUDA-graph capturable:
#     k = fmix32(seed ^ t); k = fmix32(k ^ hi32(index >> 1) ^ stream * 0x9E3779B9)
#     h = fmix32(k ^ lo32(index >> 1));  r = index even ? h & 0xFFFF : h >> 16
# where fmix32 is MurmurHash3's 32-bit finaliser (all arithmetic mod 2^32), t the tensor's step
# after the increment (steps[i] as an integer), stream 0 for the parameter and 1 for the
# momentum, and index the element's index in the LOGICAL tensor, so that sharding does not change
# the bits: for local element e (memory order) of a block, index = base + (e / inner_local) *
# inner_global + e % inner_local (a whole tensor: base 0, inner_local = inner_global = numel).
# k is fixed per tensor and stream (hi32(index >> 1) changes every 2^33 elements), so a kernel
# hashes it once; each fmix32 of an element pair gives both elements' 16 bits (its two halves).
# Per element and stream that is half an fmix32 (one 32-bit multiply) where whole vectors of
# pairs are hashed: the CPU's 8-lane hash of a bfloat16 parameter and its bfloat16 momentum is
# one 8-lane fmix32 per 8 elements (an index-per-element hash took 3).
# The ops take ``int[] rounding``: empty for round-to-nearest (today's behaviour), else 4 int64
# per tensor, [seed, base, inner_local, inner_global]; seed is the group's ``rounding_seed`` mixed
# with the parameter's position in the optimizer (so two tensors of one shape draw different
# bits). Tensors that are not bfloat16 ignore it. reference.rounding_bits / round_bf16_stochastic
# are the oracle.
#
# The per-tensor seed (tensor_seed): fmix32 of the group seed's two 32-bit halves xor-ed with
# (position + 1) * 0x9E3779B9, the parameter's index in the optimizer (over all groups, in group
# order), so two tensors of a group, or the same tensor of two groups with one seed, differ. A
# sharded bucket's rows come from sharded.Layout.rounding_row: the local block's place in the
# logical tensor, so one process and N ranks draw the same bits.
#
# Where it runs: csrc/stochastic_round.h (host+device: the CPU kernels, FAdam's and FAdafactor's
# CUDA phase-B kernels, [note: stochastic rounding on CUDA] in csrc/cuda/kernel_common.cuh, and
# AdaFisher's CUDA update), triton_kernels/_rounding.py (Triton's phase B and AdaFisher update
# kernels) and the reference.

_MASK32 = 0xFFFFFFFF


def fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser on a Python int (csrc/stochastic_round.h's fmix32)."""
    h &= _MASK32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def tensor_seed(group_seed: int, position: int) -> int:
    """The seed of the parameter at `position` in the optimizer, from its group's rounding_seed
    (a 32-bit value: the hash reads the low 32 bits of a seed)."""
    mixed = (group_seed ^ (group_seed >> 32) ^ ((position + 1) * 0x9E3779B9)) & _MASK32
    return fmix32(mixed)

# ---- AdaFisher: one update phase, and the gradient check every member can use ------------------

# [note: the AdaFisher op contract]
# AdaFisher (docs/design.md, section 10) preconditions with a Fisher that is a Kronecker product
# of two diagonals per layer, F = S H^T + damping, so its step needs no reduction: one update op
# per (device, dtype) group, which reads g, m, theta and writes m, theta (20 B/param in float32),
# and computes F per element from two vectors, never materialised:
#
# - nonfinite_check (read-only): stores 1 into ``skip`` when any scaled gradient g (grad times
#   (maximize ? -1 : 1) / grad_scale, in float32) has a square g * g that is not finite: the
#   family's non-finite rule (docs/design.md, section 6). Reads g only (4 B/param). The engine
#   calls it before any update, unless a GradScaler's found_inf already decided (its own pass
#   over the gradients checked them).
# - adafisher_update: unless ``skip != 0``, for tensor i with (s_offset, h_offset, cols) =
#   factor_layout[3i:3i+3] and every element e in the tensor's memory order:
#       F = cols == 0 ? 1 : S[e / cols] * H[e % cols] + damping,
#           with S = factors[s_offset:], H = factors[h_offset:] (float32)
#       bc = 1 - beta^t (float64, t = steps[i] after the increment)
#       AdaFisher (decoupled false):  m = beta m + (1 - beta) (g + weight_decay theta)
#                                     theta = theta - (lr / bc) (m / F)
#       AdaFisherW (decoupled true):  m = beta m + (1 - beta) g
#                                     theta = theta - lr (m / bc / F + weight_decay theta)
#   with g scaled as above. The caller lays H out in the parameter's memory order (a
#   channels_last conv weight's columns permuted), so e / cols is always the output channel.
NONFINITE_CHECK_SCHEMA = "(Tensor[] grads, Tensor(a!) skip, Tensor? grad_scale) -> ()"
ADAFISHER_UPDATE_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentums, Tensor[] steps, "
    "Tensor factors, int[] factor_layout, Tensor skip, Tensor? grad_scale, Tensor? lr_tensor, "
    "*, float lr, float beta, float weight_decay, float damping, bool decoupled, bool maximize, "
    "int chunk_size, int[] rounding) -> ()")
ADAFISHER_UPDATE_MUTATES = ("params", "momentums")

# Elements per chunk: the partial-sum slot unit and one block's (GPU) or task's (CPU) work.
# GPUs: 65536, PyTorch's MultiTensorApply chunk; a one-chunk tensor's second pass re-reads
# 64K x 12 B = 768 KiB, which stays in L2. CPU: 2^20; a one-chunk tensor's g, f, theta (12 MiB in
# float32) are re-read from L3 instead of DRAM. bench/NOTES.md has the measurements.
CHUNK_SIZE = {"cpu": 1 << 20, "cuda": 65536, "triton": 65536}

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_DEFINED: set[str] = set()


def _define(name: str, schema: str) -> None:
    if name in _DEFINED:
        return
    _LIB.define(name + schema)
    torch.library.register_fake(f"{NAMESPACE}::{name}", _fake, lib=_LIB)
    _DEFINED.add(name)


def define_phase_ops(name_a: str, name_b: str) -> None:
    """Defines fadam_fused::<name_a> / <name_b> with the two schemas and no-op fake kernels.

    The C++ kernels (and the emulated CUDA build) register implementations for these names; the
    Triton ops pass the same schemas to ``torch.library.triton_op`` instead. Both ops only mutate
    their (a!) arguments, so a fake kernel has nothing to compute.
    """
    for name, schema in ((name_a, PHASE_A_SCHEMA), (name_b, PHASE_B_SCHEMA)):
        _define(name, schema)


def define_fadafactor_ops(prefix: str) -> None:
    """Defines fadam_fused::<prefix>_phase_s / _a / _b with the FAdafactor schemas
    ([note: the FAdafactor op contract]); the CPU and CUDA kernels register "fadafactor"."""
    for phase, schema in (("s", FADAFACTOR_PHASE_S_SCHEMA), ("a", FADAFACTOR_PHASE_A_SCHEMA),
                          ("b", FADAFACTOR_PHASE_B_SCHEMA)):
        _define(f"{prefix}_phase_{phase}", schema)


def _fake(*args, **kwargs) -> None:
    return None


define_phase_ops("fadam_phase_a", "fadam_phase_b")
# The step counters: adds 1 to every (one-element float32) tensor of `steps`. Its CPU kernel
# (csrc/cpu/step_counters.cpp) replaces torch._foreach_add_, which costs ~2.2 us per CPU tensor
# (engine.advance_steps says when it is used).
ADVANCE_STEPS_SCHEMA = "(Tensor(a!)[] steps) -> ()"
_define("advance_steps", ADVANCE_STEPS_SCHEMA)
# The ops of the emulated CUDA build (csrc/cuda/launch.h), defined by fadam_fused._ext before it
# loads that build: only under FADAM_CUDA_EMULATE=1 or in its tests.
EMULATED_CUDA_OPS = ("cuda_emulated_phase_a", "cuda_emulated_phase_b")
EMULATED_CUDA_FADAFACTOR = "cuda_emulated_fadafactor"  # the prefix of its FAdafactor ops
define_fadafactor_ops("fadafactor")


def define_adafisher_ops(prefix: str) -> None:
    """Defines fadam_fused::<prefix>nonfinite_check and <prefix>adafisher_update ([note: the
    AdaFisher op contract]); the CPU and CUDA kernels register them with an empty prefix."""
    _define(f"{prefix}nonfinite_check", NONFINITE_CHECK_SCHEMA)
    _define(f"{prefix}adafisher_update", ADAFISHER_UPDATE_SCHEMA)


define_adafisher_ops("")
# The prefix of the emulated CUDA build's AdaFisher ops (defined by fadam_fused._ext before it
# loads that build; csrc/cuda/adafisher_cuda.cu registers them).
EMULATED_CUDA_ADAFISHER = "cuda_emulated_"


# ---- chunks and slots ---------------------------------------------------------------------------


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous, so a fused kernel can
    walk the storage as numel consecutive elements (its operands then share strides). False for
    strided views such as ``w[:, ::2]``."""
    if t.is_contiguous():  # the common case, decided in C++: ~0.1 us against ~3 us below
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True



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
    # nchunks_of summed: 1 + (numel - 1) // chunk_size slots for a tensor of more than one
    # chunk, 1 for the others (4096 small tensors: 0.3 ms instead of 1 ms per step).
    n_slots = len(params) + sum((n - 1) // chunk_size
                                for n in [t.numel() for t in params] if n > chunk_size)
    return torch.empty((n_slots, 2), dtype=torch.float64, device=params[0].device)


@dataclasses.dataclass(frozen=True)
class FactorTile:
    """How phase S cuts a factored tensor ([note: the FAdafactor op contract])."""

    batch: int       # B = prod(shape[:-2])
    rows: int        # n
    cols: int        # m
    tile_rows: int
    tile_cols: int

    @property
    def row_tiles(self) -> int:
        return -(-self.rows // self.tile_rows)

    @property
    def col_tiles(self) -> int:
        return -(-self.cols // self.tile_cols)

    @property
    def n_partials(self) -> int:  # float64 elements of factor_partials
        return self.batch * (self.col_tiles * self.rows + self.row_tiles * self.cols)

    @property
    def n_factors(self) -> int:   # float32 elements of factors: R, C, R / sum R
        return self.batch * (2 * self.rows + self.cols)


def factor_tile(shape: Sequence[int], chunk_size: int) -> FactorTile:
    """The tiles of a tensor of `shape` (2+ dims): about chunk_size elements, square where the
    matrix allows (isqrt(chunk_size) columns: 1024 on the CPU, 256 on GPUs), so the partial sums
    cost 8 (1 / tile_rows + 1 / tile_cols) B per element both ways."""
    batch = 1
    for size in shape[:-2]:
        batch *= size
    rows, cols = shape[-2], shape[-1]
    tile_cols = max(1, min(cols, math.isqrt(chunk_size)))
    tile_rows = max(1, min(rows, chunk_size // tile_cols))
    return FactorTile(batch, rows, cols, tile_rows, tile_cols)


def factor_offsets(params: Sequence[Tensor],
                   chunk_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(partial offsets, factor offsets): tensor i's first element of factor_partials and of
    factors; the last entries are the sizes."""
    shapes = tuple(t.shape for t in params)
    if torch.compiler.is_compiling():  # traced once per graph: no cache to guard on
        return _factor_offsets(shapes, chunk_size)
    # Every FAdafactor step asks, for the same shapes: 0.6 ms for the default list's 99
    # matrices, against 0.04 ms for the key.
    key = (chunk_size, shapes)
    offsets = _FACTOR_OFFSETS.get(key)
    if offsets is None:
        if len(_FACTOR_OFFSETS) >= 64:
            _FACTOR_OFFSETS.clear()
        offsets = _FACTOR_OFFSETS[key] = _factor_offsets(shapes, chunk_size)
    return offsets


_FACTOR_OFFSETS: dict[tuple, tuple[tuple[int, ...], tuple[int, ...]]] = {}


def _factor_offsets(shapes: Sequence[Sequence[int]],
                    chunk_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    partials, factors = [0], [0]
    for shape in shapes:
        tile = factor_tile(shape, chunk_size)
        partials.append(partials[-1] + tile.n_partials)
        factors.append(factors[-1] + tile.n_factors)
    return tuple(partials), tuple(factors)


def factor_sums(factor_partials: Tensor, params: Sequence[Tensor],
                chunk_size: int) -> list[tuple[Tensor, Tensor]]:
    """Per tensor of shape (..., n, m): its float64 row sums [B, n] and column sums [B, m] of
    g^2, phase S's tile partials added up in tile order (a sharded wrapper all-reduces these)."""
    offsets = factor_offsets(params, chunk_size)[0]
    out = []
    for i, t in enumerate(params):
        tile = factor_tile(t.shape, chunk_size)
        b, n, m = tile.batch, tile.rows, tile.cols
        if t.numel() == 0:
            zeros = factor_partials.new_zeros
            out.append((zeros((b, n)), zeros((b, m))))
            continue
        region = factor_partials[offsets[i]:offsets[i + 1]].view(b, -1)
        rows = region[:, :tile.col_tiles * n].view(b, tile.col_tiles, n).sum(1)
        cols = region[:, tile.col_tiles * n:].view(b, tile.row_tiles, m).sum(1)
        out.append((rows, cols))
    return out


def factor_regions(factors: Tensor, offset: int, shape) -> tuple[Tensor, Tensor, Tensor]:
    """Views of R, C and R / sum R of a tensor of `shape` in the factors scratch, whose region
    starts at `offset` ([note: the FAdafactor op contract]: per matrix R (n), C (m), R / sum R)."""
    n, m = shape[-2], shape[-1]
    batch = shape[:-2]
    count = 1
    for size in batch:
        count *= size
    region = factors[offset:offset + count * (2 * n + m)].view(count, 2 * n + m)
    return (region[:, :n].view(*batch, n), region[:, n:n + m].view(*batch, m),
            region[:, n + m:].view(*batch, n))


def new_factor_buffers(params: Sequence[Tensor], chunk_size: int,
                       dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Uninitialised (factor_partials float64, factors of `dtype`: float32 for every fused
    backend) for `params` (phase S fills them)."""
    partials, factors = factor_offsets(params, chunk_size)
    device = params[0].device
    return (torch.empty(partials[-1], dtype=torch.float64, device=device),
            torch.empty(factors[-1], dtype=dtype, device=device))


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


@dataclasses.dataclass(frozen=True)
class FactoredOps:
    """One fused backend's FAdafactor ops ([note: the FAdafactor op contract]), called alike on
    every backend, and the chunk size to pass them."""

    name: str
    phase_s: Callable[..., None]
    phase_a: Callable[..., None]
    phase_b: Callable[..., None]
    chunk_size: int


@dataclasses.dataclass(frozen=True)
class AdaFisherOps:
    """One backend's AdaFisher ops ([note: the AdaFisher op contract]) and its chunk size."""

    name: str
    nonfinite_check: Callable[..., None]
    update: Callable[..., None]
    chunk_size: int


def adafisher_ops(backend: str, prefix: str) -> AdaFisherOps:
    """The backend whose ops are torch.ops.fadam_fused.<prefix>nonfinite_check and
    <prefix>adafisher_update."""
    namespace = getattr(torch.ops, NAMESPACE)
    return AdaFisherOps(backend, getattr(namespace, f"{prefix}nonfinite_check").default,
                        getattr(namespace, f"{prefix}adafisher_update").default,
                        CHUNK_SIZE[backend])


def factored_ops(backend: str, prefix: str) -> FactoredOps:
    """The backend whose ops are torch.ops.fadam_fused.<prefix>_phase_{s,a,b}."""
    namespace = getattr(torch.ops, NAMESPACE)
    s, a, b = (getattr(namespace, f"{prefix}_phase_{x}").default for x in "sab")
    return FactoredOps(backend, s, a, b, CHUNK_SIZE[backend])
