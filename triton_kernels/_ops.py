"""Host side of the Triton backend: input checks, the cached device metadata, the launches, and the
torch.library registration of fadam_fused::triton_phase_a / triton_phase_b.

The argument contract is [note: the two-phase op contract] in csrc/fadam_ops.h; these ops implement
it exactly, like the C++ fadam_phase_a / fadam_phase_b.

Eager path (real tensors): ONE launch per phase per call, whatever the number of tensors. The
program-to-(tensor, chunk) map and the per-tensor addresses / numels / first slots live in one int64
tensor on the device, built on the host and cached by everything it encodes (the addresses and
numels of every operand, the chunk size, the fuse flag). A steady-state step, where the same
tensors come back, finds it in the cache: no host-to-device copy, no allocation, no sync. When the
list changes (new parameters, grads re-allocated at other addresses) the table is rebuilt, copied
once from pinned memory with non_blocking=True, and the launch is queued behind that copy on the
stream.

Traced path (torch.compile: FakeTensor / FunctionalTensor arguments, no addresses): the same kernels
with TABLE=False, one launch per tensor per phase, taking the tensors as arguments so Inductor sees
which of them each kernel writes. A compiled step is meant to be captured in a CUDA graph
(mode="reduce-overhead"), where the launch count costs nothing at replay.
"""

from __future__ import annotations

import collections
import contextlib
import struct
import threading
from typing import Optional

import torch
from torch import Tensor

from . import _kernels as K
from .. import op_contract
from ..backends import is_dense

# [note: Triton tuning constants]
# CHUNK_SIZE = 65536 elements per program, as the C++ kernels (csrc/fadam_math.h
# kDefaultChunkSize, PyTorch's MultiTensorApply chunk). Why not smaller: every phase-B program of a
# multi-chunk tensor re-sums all of that tensor's slots (16 B each) from L2. For a 100M-element
# float32 tensor that is 1526 slots = 24 KiB per program against the program's own 64K x 28 B =
# 1.8 MB of element traffic (1.3%); the ratio grows 4x with every halving of the chunk (twice the
# slots, half the elements). Why not larger: a one-chunk tensor is fused (both phases in one
# program) and its second pass re-reads 64K x 12 B = 768 KiB, which must still be in L2 (40-50 MB
# on A100/H100), and fewer, longer programs balance worse over 108-132 SMs. It must be a multiple
# of 8 elements (16 bytes of a 2-byte dtype) for the ALIGNED path; 65536 is.
CHUNK_SIZE = 65536
# BLOCK = 512 elements per tile with 4 warps (128 threads): 4 contiguous elements per thread per
# operand, one 128-bit load per float32 operand per thread per tile, 2 KiB per float32 operand per
# tile. From the ptxas register counts (README.md), since no GPU was available to sweep: BLOCK =
# 1024 needed 90-128 registers (phase A's two float64 accumulator vectors are 8 lanes x 2 registers
# each per thread) and spilled 8 bytes in phase B's bf16 pow variant on sm_80, i.e. at most 4 CTAs
# = 16 warps per SM; BLOCK = 512 needs 54-72 registers, 8 CTAs = 32 warps per SM, twice the loads
# in flight for a bandwidth-bound kernel. The p != 0.5 path calls libdevice's accurate powf, a
# real function call: the registers it saves spilled 8-16 bytes in 3 of the 144 specializations
# per arch at 512 (tests/_triton_compile.py --all), and 2 warps x 256 spilled too (the same 4
# floats per thread). POW_BLOCK = 256 on 4 warps: 2 floats (a 64-bit load) per thread, no spill;
# p = 0.5, the default, keeps 512 and its 128-bit loads.
BLOCK = 512
POW_BLOCK = 256
NUM_WARPS = 4
# Slots summed per iteration of phase B's slot reduction: 2 float64 per thread with 128 threads; a
# 100M-element tensor (1526 slots at 64K) takes 6 iterations.
SLOT_BLOCK = 256
# Metadata tables kept per process (keyed by every address they hold), the oldest dropped first:
# 2 per (param group, dtype) bucket and step, so 256 holds 128 buckets (e.g. layer-wise lr decay
# over 48 layers x decay / no decay) without rebuilding every table in every step. A CUDA graph
# that captured a Triton step reads its tables at replay: keep the number of buckets of all
# live optimizers under 128 there (the "cuda" backend passes its tables by value instead).
_CACHE_ENTRIES = 256


def block_for(p: float) -> int:
    """Elements per tile for the FIM exponent p: BLOCK on the sqrt path, POW_BLOCK otherwise."""
    return BLOCK if p == 0.5 else POW_BLOCK


def _interpreting() -> bool:
    """Whether the kernels are Triton interpreter functions (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(K._phase_a_kernel, InterpretedFunction)


_INTERPRET = _interpreting()
_TL_DTYPE = None  # filled lazily: {torch dtype: tl dtype}


def _tl_dtype(dtype: torch.dtype):
    global _TL_DTYPE
    if _TL_DTYPE is None:
        import triton.language as tl

        _TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                     torch.float16: tl.float16}
    return _TL_DTYPE[dtype]


def nchunks_of(numel: int, chunk_size: int) -> int:
    """Slots owned by a tensor of `numel` elements: max(1, ceil(numel / chunk_size))."""
    return 1 if numel <= chunk_size else (numel + chunk_size - 1) // chunk_size


def _f32(x: float) -> float:
    """x rounded to float32, as the kernel receives it (and as the C++ static_cast<float>).
    Pure host arithmetic on a Python float: no tensor, no sync."""
    return struct.unpack("f", struct.pack("f", x))[0]


# ---------------------------------------------------------------------------------------------
# Checks (kernels assume what these establish; the optimizer has already named the parameter).
# ---------------------------------------------------------------------------------------------


def _check_common(op, params, grads, fims, moms, steps, partials, skip, grad_scale, chunk_size,
                  lr_tensor=None):
    n = len(params)
    if not (len(grads) == n and len(fims) == n and len(steps) == n):
        raise ValueError(f"{op}: params, grads, fims and steps must have the same length, got "
                         f"{n}, {len(grads)}, {len(fims)}, {len(steps)}")
    if moms is not None and len(moms) != n:
        raise ValueError(f"{op}: momentums must have one tensor per param")
    if chunk_size <= 0:
        raise ValueError(f"{op}: chunk_size must be positive, got {chunk_size}")
    device = params[0].device if n else skip.device
    if skip.device != device or skip.dtype != torch.float32 or skip.numel() != 1:
        raise ValueError(f"{op}: skip must be a one-element float32 tensor on {device}")
    if grad_scale is not None and (grad_scale.device != device or grad_scale.dtype != torch.float32
                                   or grad_scale.numel() != 1):
        raise ValueError(f"{op}: grad_scale must be a one-element float32 tensor on {device}")
    if lr_tensor is not None and (lr_tensor.device != device or lr_tensor.numel() != 1 or
                                  lr_tensor.dtype not in (torch.float32, torch.float64)):
        raise ValueError(f"{op}: lr_tensor must be a one-element float32 or float64 tensor on "
                         f"{device}")
    if (partials.device != device or partials.dtype != torch.float64 or partials.dim() != 2
            or partials.size(1) != 2 or not partials.is_contiguous()):
        raise ValueError(f"{op}: partials must be a contiguous float64 [n_slots, 2] tensor on "
                         f"{device}")
    if device.type == "cpu" and not _INTERPRET:
        raise RuntimeError(f"{op}: CPU tensors run only in Triton's interpreter; set "
                           "TRITON_INTERPRET=1 before Triton is imported, or use backend='cpu'")


def _check_tensors(op, params, grads, fims, moms, steps, chunk_size):
    """Per-tensor checks, run when a metadata table is built (a cache hit has the same addresses
    and numels, so only the dtypes/strides of re-allocated tensors could differ, and those come
    through the optimizer's own checks)."""
    dtype, device = params[0].dtype, params[0].device
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: params must be float32, bfloat16 or float16, got {dtype}")
    n_slots = 0
    for i, p in enumerate(params):
        if p.device != device or p.dtype != dtype:
            raise ValueError(f"{op}: params[{i}] must share the device and dtype of params[0] "
                             f"({device}, {dtype})")
        if not is_dense(p):
            raise ValueError(f"{op}: params[{i}] must be dense and non-overlapping")
        for name, lst, want in (("grads", grads, dtype), ("fims", fims, torch.float32),
                                ("momentums", moms, torch.float32)):
            if lst is None:
                continue
            t = lst[i]
            if (t.device != device or t.dtype != want or t.shape != p.shape
                    or t.stride() != p.stride()):
                raise ValueError(f"{op}: {name}[{i}] must be a {want} tensor on {device} with the "
                                 f"sizes and strides of params[{i}]")
        s = steps[i]
        if s.device != device or s.dtype != torch.float32 or s.numel() != 1:
            raise ValueError(f"{op}: steps[{i}] must be a one-element float32 tensor on {device}")
        n_slots += nchunks_of(p.numel(), chunk_size)
    return n_slots


def _check_slots(op, partials, n_slots, chunk_size):
    if partials.size(0) != n_slots:
        raise ValueError(f"{op}: partials must have {n_slots} rows for chunk_size "
                         f"{chunk_size}, got {partials.size(0)}")


# ---------------------------------------------------------------------------------------------
# Metadata tables.
# ---------------------------------------------------------------------------------------------


class _Table:
    __slots__ = ("meta", "host", "n_programs", "n_slots", "aligned")

    def __init__(self, meta, host, n_programs, n_slots, aligned):
        self.meta = meta          # int64 tensor on the device
        self.host = host          # its (pinned) source, kept alive until the copy has run
        self.n_programs = n_programs
        self.n_slots = n_slots
        self.aligned = aligned


_cache: "collections.OrderedDict[tuple, _Table]" = collections.OrderedDict()
# Tables built so far (each build is one host-to-device copy); the tests read it.
stats = {"table_builds": 0}
_cache_lock = threading.Lock()


def _table(phase, lists, numels, device, dtype, chunk_size, fuse, check):
    """The cached metadata of one call. `lists` holds the operand lists in row order (steps
    last); `numels` the params' numels."""
    ptrs = [[t.data_ptr() for t in lst] for lst in lists]
    key = (phase, device, dtype, chunk_size, fuse, tuple(numels), *map(tuple, ptrs))
    with _cache_lock:
        entry = _cache.get(key)
        if entry is not None:
            _cache.move_to_end(key)
            return entry
    n_slots = check()
    stats["table_builds"] += 1
    n = len(numels)
    slot, blocks = 0, []
    slots = []
    for i, numel in enumerate(numels):
        nch = nchunks_of(numel, chunk_size)
        slots.append(slot)
        slot += nch
        # Phase A of an empty tensor still writes its (zero) slot unless phase B owns the tensor;
        # phase B has nothing to do on an empty tensor. A fused one-chunk tensor gets one program
        # in phase A too (its non-finite check).
        if numel == 0 and (phase == "B" or fuse):
            continue
        blocks.extend((i << 32) | c for c in range(nch))
    # Element operands (not the step counters, read as scalars) decide the vectorised path.
    itemsize = dtype.itemsize
    aligned = (chunk_size * itemsize) % 16 == 0 and (chunk_size * 4) % 16 == 0 and all(
        a % 16 == 0 for lst in ptrs[:-1] for a in lst)
    flat = [a for lst in ptrs for a in lst] + list(numels) + slots + blocks
    assert len(flat) == (len(lists) + 2) * n + len(blocks)
    host = torch.tensor(flat, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
        meta = host.to(device, non_blocking=True)
    else:
        meta = host
    entry = _Table(meta, host, len(blocks), n_slots, aligned)
    with _cache_lock:
        _cache[key] = entry
        while len(_cache) > _CACHE_ENTRIES:
            _cache.popitem(last=False)
    return entry


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device and stream: make it the parameters' device,
    as the C++ launchers do with a CUDAGuard (a model on cuda:1 without set_device(1) would
    otherwise run on cuda:0, unordered with cuda:1's backward and the metadata copy)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _is_traced(tensors) -> bool:
    """True under torch.compile / make_fx tracing: the tensors have no storage to point at."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return any(isinstance(t, FunctionalTensor) or is_fake(t) for t in tensors)


# Tests set this to exercise the per-tensor (TABLE=False) path in the interpreter.
_FORCE_PER_TENSOR = False


# ---------------------------------------------------------------------------------------------
# The ops.
# ---------------------------------------------------------------------------------------------


@torch.library.triton_op("fadam_fused::triton_phase_a", mutates_args={"partials", "skip"},
                         schema=op_contract.PHASE_A_SCHEMA)
def triton_phase_a(
    params: list[Tensor], grads: list[Tensor], fims: list[Tensor], steps: list[Tensor],
    partials: Tensor, skip: Tensor, grad_scale: Optional[Tensor], *, beta2: float, eps: float,
    p: float, clip: float, maximize: bool, chunk_size: int, fuse_one_chunk: bool,
) -> None:
    """Phase A: per-chunk float64 (sum ghat^2, sum w^2) into `partials`; 1.0 into `skip` when a
    gradient is not finite. Reads params, grads, fims, steps; writes nothing else."""
    from torch.library import wrap_triton

    op = "fadam_fused::triton_phase_a"
    _check_common(op, params, grads, fims, None, steps, partials, skip, grad_scale, chunk_size)
    if not params:
        return
    dtype = params[0].dtype
    scalars = dict(beta2=float(beta2), p=_f32(p), eps_p=_f32(eps ** (2.0 * p)),
                   sign=-1.0 if maximize else 1.0, chunk_size=chunk_size,
                   fuse_one_chunk=bool(fuse_one_chunk))
    consts = dict(DTYPE=_tl_dtype(dtype), HAS_GSCALE=grad_scale is not None, SQRT=(p == 0.5),
                  TABLE=True, INTERPRET=_INTERPRET, BLOCK=block_for(p), num_warps=NUM_WARPS)
    kernel = wrap_triton(K._phase_a_kernel)
    if _FORCE_PER_TENSOR or _is_traced(params):
        # Traced tensors have no addresses (so no table), but their dtypes, shapes and strides
        # are known: they get the table path's checks, once per trace.
        _check_slots(op, partials,
                     _check_tensors(op, params, grads, fims, None, steps, chunk_size), chunk_size)
        slot = 0
        for i in range(len(params)):
            numel = params[i].numel()
            nch = nchunks_of(numel, chunk_size)
            if not (numel == 0 and fuse_one_chunk):
                kernel[(nch,)](None, 0, params[i], grads[i], fims[i], steps[i], numel, slot,
                               partials, skip, grad_scale, **scalars,
                               **{**consts, "TABLE": False, "ALIGNED": False})
            slot += nch
        return
    with _on_device(params[0].device):  # (traced launches are emitted and guarded by Inductor)
        numels = [t.numel() for t in params]
        table = _table("A", (params, grads, fims, steps), numels, params[0].device, dtype,
                       chunk_size, bool(fuse_one_chunk),
                       lambda: _check_tensors(op, params, grads, fims, None, steps, chunk_size))
        _check_slots(op, partials, table.n_slots, chunk_size)
        if table.n_programs == 0:
            return
        kernel[(table.n_programs,)](table.meta, len(params), None, None, None, None, 0, 0,
                                    partials, skip, grad_scale, **scalars, ALIGNED=table.aligned,
                                    **consts)


@torch.library.triton_op("fadam_fused::triton_phase_b",
                         mutates_args={"params", "fims", "momentums"}, schema=op_contract.PHASE_B_SCHEMA)
def triton_phase_b(
    params: list[Tensor], grads: list[Tensor], fims: list[Tensor], momentums: list[Tensor],
    steps: list[Tensor], partials: Tensor, skip: Tensor, grad_scale: Optional[Tensor],
    lr_tensor: Optional[Tensor], *, lr: float, beta1: float, beta2: float, eps: float, p: float,
    clip: float, weight_decay: float, maximize: bool, chunk_size: int, fuse_one_chunk: bool,
) -> None:
    """Phase B: unless skip != 0, the FAdam update of fims, momentums and params."""
    from torch.library import wrap_triton

    op = "fadam_fused::triton_phase_b"
    _check_common(op, params, grads, fims, momentums, steps, partials, skip, grad_scale,
                  chunk_size, lr_tensor)
    if not params:
        return
    dtype = params[0].dtype
    beta1_f = _f32(beta1)
    scalars = dict(lr=_f32(lr), beta1=beta1_f, omb1=_f32(1.0 - beta1_f), beta2=float(beta2),
                   eps_p=_f32(eps ** (2.0 * p)), p=_f32(p),
                   clip=float(clip) if clip and clip > 0 else 0.0, wd=_f32(weight_decay),
                   sign=-1.0 if maximize else 1.0, chunk_size=chunk_size,
                   fuse_one_chunk=bool(fuse_one_chunk))
    consts = dict(DTYPE=_tl_dtype(dtype), HAS_GSCALE=grad_scale is not None,
                  HAS_LR=lr_tensor is not None, SQRT=(p == 0.5), TABLE=True,
                  INTERPRET=_INTERPRET, BLOCK=block_for(p), SLOT_BLOCK=SLOT_BLOCK,
                  num_warps=NUM_WARPS)
    kernel = wrap_triton(K._phase_b_kernel)
    if _FORCE_PER_TENSOR or _is_traced(params):
        _check_slots(op, partials, _check_tensors(op, params, grads, fims, momentums, steps,
                                                  chunk_size), chunk_size)
        slot = 0
        for i in range(len(params)):
            numel = params[i].numel()
            nch = nchunks_of(numel, chunk_size)
            if numel != 0:
                kernel[(nch,)](None, 0, params[i], grads[i], fims[i], momentums[i], steps[i],
                               numel, slot, partials, skip, grad_scale, lr_tensor, **scalars,
                               **{**consts, "TABLE": False, "ALIGNED": False})
            slot += nch
        return
    with _on_device(params[0].device):  # (traced launches are emitted and guarded by Inductor)
        numels = [t.numel() for t in params]
        table = _table("B", (params, grads, fims, momentums, steps), numels, params[0].device,
                       dtype, chunk_size, bool(fuse_one_chunk),
                       lambda: _check_tensors(op, params, grads, fims, momentums, steps,
                                              chunk_size))
        _check_slots(op, partials, table.n_slots, chunk_size)
        if table.n_programs == 0:
            return
        kernel[(table.n_programs,)](table.meta, len(params), None, None, None, None, None, 0, 0,
                                    partials, skip, grad_scale, lr_tensor, **scalars,
                                    ALIGNED=table.aligned, **consts)
