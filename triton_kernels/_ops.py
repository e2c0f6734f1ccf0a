"""Host side of the Triton backend: input checks, the device metadata tables, the one launch helper,
and the torch.library registration of fadam_fused::triton_phase_a / triton_phase_b.

The ops implement [note: the two-phase op contract] (fadam_fused/op_contract.py) exactly, like the
C++ fadam_phase_a / fadam_phase_b: the same schemas, chunk and slot arithmetic, and host step
scalars (op_contract.host_scalars, the Python twin of the C++ helper, so every backend rounds
alike).

Eager path (real tensors): ONE launch per phase per call, whatever the number of tensors. The
program-to-(tensor, chunk) map and the per-tensor addresses / numels / first slots live in one int64
tensor on the device ([note: Triton metadata tables] below). A steady-state step, where the same
tensors come back, finds it built: no host-to-device copy, no allocation, no sync.

Traced path (torch.compile: FakeTensor / FunctionalTensor arguments, no addresses): the same kernels
with TABLE=False, one launch per tensor per phase, taking the tensors as arguments so Inductor sees
which of them each kernel writes. A compiled step is meant to be captured in a CUDA graph
(mode="reduce-overhead"), where the launch count costs nothing at replay.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import weakref
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _kernels as K
from .. import op_contract
from ..backends import is_dense

# [note: Triton tuning constants]
# The chunk is op_contract.CHUNK_SIZE["triton"] (65536, as the CUDA kernels). Every phase-B program
# of a multi-chunk tensor re-sums all of that tensor's slots (16 B each) from L2: for a
# 100M-element float32 tensor 1526 slots = 24 KiB per program against its own 64K x 28 B = 1.8 MB
# of element traffic (1.3%), a ratio that grows 4x with every halving of the chunk. It must be a
# multiple of 8 elements (16 bytes of a 2-byte dtype) for the ALIGNED path; 65536 is.
# BLOCK = 512 elements per tile with 4 warps (128 threads): 4 contiguous elements per thread per
# operand, one 128-bit load per float32 operand per thread per tile. ptxas -v (no GPU here to
# sweep): 1024 needs 90-128 registers and spills on sm_80, at most 4 CTAs = 16 warps per SM; 512
# needs at most 72, 7-8 CTAs per SM, twice the loads in flight for a bandwidth-bound kernel.
# POW_BLOCK = 256 for p != 0.5: libdevice's accurate powf is a real call whose saved registers
# spilled 8-16 bytes in 3 specializations at 512; 256 is 2 floats (a 64-bit load) per thread and
# spills nothing. tests/_triton_compile.py checks every specialization for spills.
BLOCK = 512
POW_BLOCK = 256
NUM_WARPS = 4
# Slots summed per iteration of phase B's slot reduction: 2 float64 per thread with 128 threads; a
# 100M-element tensor (1526 slots at 64K) takes 6 iterations.
SLOT_BLOCK = 256
# Tables no CUDA graph captured, kept per process, the least recently used dropped first: 2 per
# (param group, dtype) bucket, so 256 hold 128 buckets (e.g. layer-wise lr decay over 48 layers x
# decay / no decay) without rebuilding every table in every step.
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


@dataclasses.dataclass(frozen=True)
class _Operands:
    """The tensor lists of one call, in the kernels' row order. momentums is None in phase A."""

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    fims: Sequence[Tensor]
    steps: Sequence[Tensor]
    momentums: Optional[Sequence[Tensor]]

    def lists(self) -> tuple[Sequence[Tensor], ...]:
        """The pointer rows of the table (ROW_P, ROW_G, ROW_F, ROW_STEP, then ROW_M)."""
        rows = (self.params, self.grads, self.fims, self.steps)
        return rows if self.momentums is None else (*rows, self.momentums)

    def of(self, i: int) -> dict[str, Optional[Tensor]]:
        """Tensor i's operands as the kernels' *_in arguments (the per-tensor launch)."""
        return dict(p_in=self.params[i], g_in=self.grads[i], f_in=self.fims[i],
                    step_in=self.steps[i],
                    m_in=None if self.momentums is None else self.momentums[i])


_NO_OPERANDS = dict(p_in=None, g_in=None, f_in=None, step_in=None, m_in=None, numel_in=0,
                    slot_in=0)


def _has_program(phase: str, numel: int, chunk_size: int, fuse: bool, clipping: bool) -> bool:
    """Whether a tensor of `numel` elements gets programs. Phase B has nothing to do on an empty
    tensor. Phase A gives an empty tensor one program only to write its (zero) slot, which it
    does when it reduces: clipping on, and the tensor not left to phase B (fuse_one_chunk)."""
    if numel > 0:
        return True
    return phase == "A" and clipping and not fuse


# ---------------------------------------------------------------------------------------------
# Checks (kernels assume what these establish; the optimizer has already named the parameter).
# ---------------------------------------------------------------------------------------------


def _check_common(op, ops: _Operands, partials, skip, grad_scale, chunk_size, lr_tensor=None):
    params = ops.params
    n = len(params)
    if not (len(ops.grads) == n and len(ops.fims) == n and len(ops.steps) == n):
        raise ValueError(f"{op}: params, grads, fims and steps must have the same length, got "
                         f"{n}, {len(ops.grads)}, {len(ops.fims)}, {len(ops.steps)}")
    if ops.momentums is not None and len(ops.momentums) != n:
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


def _check_tensors(op, ops: _Operands, partials, chunk_size) -> None:
    """Per-tensor checks, run when a metadata table is built (a table found again has the same
    addresses and numels, so only the dtypes/strides of re-allocated tensors could differ, and
    those come through the optimizer's own checks) and once per trace on the traced path."""
    params = ops.params
    dtype, device = params[0].dtype, params[0].device
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: params must be float32, bfloat16 or float16, got {dtype}")
    for i, p in enumerate(params):
        if p.device != device or p.dtype != dtype:
            raise ValueError(f"{op}: params[{i}] must share the device and dtype of params[0] "
                             f"({device}, {dtype})")
        if not is_dense(p):
            raise ValueError(f"{op}: params[{i}] must be dense and non-overlapping")
        for name, lst, want in (("grads", ops.grads, dtype), ("fims", ops.fims, torch.float32),
                                ("momentums", ops.momentums, torch.float32)):
            if lst is None:
                continue
            t = lst[i]
            if (t.device != device or t.dtype != want or t.shape != p.shape
                    or t.stride() != p.stride()):
                raise ValueError(f"{op}: {name}[{i}] must be a {want} tensor on {device} with the "
                                 f"sizes and strides of params[{i}]")
        s = ops.steps[i]
        if s.device != device or s.dtype != torch.float32 or s.numel() != 1:
            raise ValueError(f"{op}: steps[{i}] must be a one-element float32 tensor on {device}")
    n_slots = op_contract.slot_offsets([p.numel() for p in params], chunk_size)[-1]
    if partials.size(0) != n_slots:
        raise ValueError(f"{op}: partials must have {n_slots} rows for chunk_size "
                         f"{chunk_size}, got {partials.size(0)}")


# ---------------------------------------------------------------------------------------------
# Metadata tables.
# ---------------------------------------------------------------------------------------------

# [note: Triton metadata tables]
# One int64 device tensor per (phase, tensor list): rows of addresses (params, grads, fims, steps,
# [momentums]), numels and first slots, then the block map (_kernels.py, ROW_*). It is built on the
# host, copied once from pinned memory with non_blocking=True (the launch is queued behind the copy
# on the stream), and found again by everything it encodes: the addresses and numels of every
# operand, the phase, dtype, chunk size and the two flags that shape the block map.
#
# Lifetime. A kernel reads its table when it runs, and a CUDA graph that captured a launch reads
# the same device table (and replays the copy from the same pinned buffer) at every replay. So a
# table used while the current stream is capturing is never evicted: it lives exactly as long as
# the step tensors it serves (weakref finalizers), i.e. the optimizer state, and is released when
# the optimizer (or whoever owns the steps) lets them go; a graph replaying it after that would
# write into freed state anyway. Other tables (nothing captured them) sit in an LRU of
# _CACHE_ENTRIES, where eviction is safe (the caching allocators order any reuse of their memory
# after the launches already queued), and are also released when their steps die. Gradients are
# not owners: the default zero_grad() frees them every step and backward brings them back, usually
# at the same addresses, where the table is found again.


class _Table:
    __slots__ = ("meta", "host", "n_programs", "n_slots", "aligned", "finalizers", "__weakref__")

    def __init__(self, meta, host, n_programs, n_slots, aligned):
        self.meta = meta          # int64 tensor on the device
        self.host = host          # its (pinned) source, which a captured copy reads at replay
        self.n_programs = n_programs
        self.n_slots = n_slots    # rows of partials the call must pass
        self.aligned = aligned
        self.finalizers: list[weakref.finalize] = []


class _TableCache:
    """The tables of this process: an LRU of uncaptured ones and the captured ones, each released
    when its step tensors die ([note: Triton metadata tables])."""

    def __init__(self, entries: int):
        self.entries = entries
        self.lru: "collections.OrderedDict[tuple, _Table]" = collections.OrderedDict()
        self.captured: dict[tuple, _Table] = {}
        self.builds = 0  # tables built so far (one host-to-device copy each); tests read it
        # Re-entrant: a finalizer may run (a step tensor collected) while this thread holds it.
        self._lock = threading.RLock()

    def get(self, key: tuple, steps: Sequence[Tensor], build: Callable[[], _Table],
            capturing: bool) -> _Table:
        with self._lock:
            table = self.captured.get(key)
            if table is None:
                table = self.lru.get(key)
                if table is not None:
                    if capturing:
                        self.captured[key] = self.lru.pop(key)
                    else:
                        self.lru.move_to_end(key)
            if table is not None:
                return table
        table = build()
        self.builds += 1
        table.finalizers = [weakref.finalize(s, self._release, key) for s in steps]
        with self._lock:
            if capturing:
                self.captured[key] = table
            else:
                self.lru[key] = table
                while len(self.lru) > self.entries:
                    self._forget(self.lru.popitem(last=False)[1])
        return table

    def _release(self, key: tuple) -> None:
        with self._lock:
            table = self.captured.pop(key, None) or self.lru.pop(key, None)
        if table is not None:
            self._forget(table)

    @staticmethod
    def _forget(table: _Table) -> None:
        for fin in table.finalizers:  # the other steps' finalizers would only find nothing
            fin.detach()


_TABLES = _TableCache(_CACHE_ENTRIES)


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of `device` is capturing a CUDA graph (tests patch this: the
    interpreter has no graphs)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _build_table(phase: str, ops: _Operands, ptrs: list[list[int]], numels: list[int],
                 chunk_size: int, fuse: bool, clipping: bool) -> _Table:
    slots = op_contract.slot_offsets(numels, chunk_size)
    blocks = []
    for i, numel in enumerate(numels):
        if _has_program(phase, numel, chunk_size, fuse, clipping):
            blocks.extend((i << 32) | c for c in range(slots[i + 1] - slots[i]))
    # Rows in the kernels' order: P, G, F, STEP, NUMEL, SLOT, then M (phase B).
    rows = ptrs[:4] + [numels, slots[:-1]] + ptrs[4:]
    flat = [v for row in rows for v in row] + blocks
    # Element operands (not the step counters, read as scalars) decide the vectorised path.
    itemsize = ops.params[0].dtype.itemsize
    aligned = (chunk_size * itemsize) % 16 == 0 and (chunk_size * 4) % 16 == 0 and all(
        a % 16 == 0 for i, row in enumerate(ptrs) if i != 3 for a in row)
    host = torch.tensor(flat, dtype=torch.int64)
    device = ops.params[0].device
    if device.type == "cuda":
        host = host.pin_memory()
        meta = host.to(device, non_blocking=True)
    else:
        meta = host
    return _Table(meta, host, len(blocks), slots[-1], aligned)


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


def _launch(op: str, phase: str, kernel, ops: _Operands, partials: Tensor, args: dict,
            consts: dict, *, chunk_size: int, fuse: bool, clipping: bool) -> None:
    """Launches `kernel` over every (tensor, chunk) of `ops`: one launch through the metadata
    table, or, while traced (no addresses), one launch per tensor with its tensors as
    arguments. `args` and `consts` are the kernel's remaining arguments (after the operands)."""
    from torch.library import wrap_triton

    params = ops.params
    kernel = wrap_triton(kernel)
    if _FORCE_PER_TENSOR or _is_traced(params):
        # Traced tensors have no addresses (so no table), but their dtypes, shapes and strides
        # are known: they get the table path's checks, once per trace. (Traced launches are
        # emitted and device-guarded by Inductor.)
        _check_tensors(op, ops, partials, chunk_size)
        slot = 0
        for i, p in enumerate(params):
            numel = p.numel()
            if _has_program(phase, numel, chunk_size, fuse, clipping):
                kernel[(op_contract.nchunks_of(numel, chunk_size),)](
                    meta=None, n_tensors=0, **ops.of(i), numel_in=numel, slot_in=slot,
                    partials=partials, **args, **consts, TABLE=False, ALIGNED=False)
            slot += op_contract.nchunks_of(numel, chunk_size)
        return
    device = params[0].device
    with _on_device(device):
        lists = ops.lists()
        ptrs = [[t.data_ptr() for t in lst] for lst in lists]
        numels = [t.numel() for t in params]
        key = (phase, device, params[0].dtype, chunk_size, fuse, clipping, tuple(numels),
               *map(tuple, ptrs))

        def build() -> _Table:
            _check_tensors(op, ops, partials, chunk_size)
            return _build_table(phase, ops, ptrs, numels, chunk_size, fuse, clipping)

        table = _TABLES.get(key, ops.steps, build, _capturing(device))
        if partials.size(0) != table.n_slots:  # (a table found again: build() checked it)
            _check_tensors(op, ops, partials, chunk_size)  # raises, naming the expected rows
        if table.n_programs == 0:
            return
        kernel[(table.n_programs,)](meta=table.meta, n_tensors=len(params), **_NO_OPERANDS,
                                    partials=partials, **args, **consts, TABLE=True,
                                    ALIGNED=table.aligned)


# ---------------------------------------------------------------------------------------------
# The ops.
# ---------------------------------------------------------------------------------------------


@torch.library.triton_op("fadam_fused::triton_phase_a", mutates_args=op_contract.PHASE_A_MUTATES,
                         schema=op_contract.PHASE_A_SCHEMA)
def triton_phase_a(
    params: list[Tensor], grads: list[Tensor], fims: list[Tensor], steps: list[Tensor],
    partials: Tensor, skip: Tensor, grad_scale: Optional[Tensor], *, beta2: float, eps: float,
    p: float, clip: float, maximize: bool, chunk_size: int, fuse_one_chunk: bool,
) -> None:
    """Phase A: per-chunk float64 (sum ghat^2, sum w^2) into `partials` (clip > 0); 1.0 into
    `skip` when a gradient is not finite. Reads params, grads, fims, steps (grads only with
    clip <= 0); writes nothing else."""
    op = "fadam_fused::triton_phase_a"
    ops = _Operands(params, grads, fims, steps, None)
    _check_common(op, ops, partials, skip, grad_scale, chunk_size)
    if not params:
        return
    h = op_contract.host_scalars(beta2=beta2, eps=eps, p=p, clip=clip, maximize=maximize)
    args = dict(skip=skip, gscale=grad_scale, beta2=h.beta2, p=h.p, eps_p=h.eps_p, clip=h.clip,
                sign=h.sign, chunk_size=chunk_size, fuse_one_chunk=bool(fuse_one_chunk))
    consts = dict(DTYPE=_tl_dtype(params[0].dtype), HAS_GSCALE=grad_scale is not None,
                  SQRT=(p == 0.5), INTERPRET=_INTERPRET, BLOCK=block_for(p),
                  num_warps=NUM_WARPS)
    _launch(op, "A", K._phase_a_kernel, ops, partials, args, consts, chunk_size=chunk_size,
            fuse=bool(fuse_one_chunk), clipping=h.clip > 0)


@torch.library.triton_op("fadam_fused::triton_phase_b", mutates_args=op_contract.PHASE_B_MUTATES,
                         schema=op_contract.PHASE_B_SCHEMA)
def triton_phase_b(
    params: list[Tensor], grads: list[Tensor], fims: list[Tensor], momentums: list[Tensor],
    steps: list[Tensor], partials: Tensor, skip: Tensor, grad_scale: Optional[Tensor],
    lr_tensor: Optional[Tensor], *, lr: float, beta1: float, beta2: float, eps: float, p: float,
    clip: float, weight_decay: float, maximize: bool, chunk_size: int, fuse_one_chunk: bool,
) -> None:
    """Phase B: unless skip != 0, the FAdam update of fims, momentums and params."""
    op = "fadam_fused::triton_phase_b"
    ops = _Operands(params, grads, fims, steps, momentums)
    _check_common(op, ops, partials, skip, grad_scale, chunk_size, lr_tensor)
    if not params:
        return
    h = op_contract.host_scalars(beta2=beta2, eps=eps, p=p, clip=clip, maximize=maximize, lr=lr,
                                 beta1=beta1, weight_decay=weight_decay)
    args = dict(skip=skip, gscale=grad_scale, lr_ptr=lr_tensor, lr=h.lr, beta1=h.beta1,
                omb1=h.one_minus_beta1, beta2=h.beta2, eps_p=h.eps_p, p=h.p, clip=h.clip,
                wd=h.weight_decay, sign=h.sign, chunk_size=chunk_size,
                fuse_one_chunk=bool(fuse_one_chunk))
    consts = dict(DTYPE=_tl_dtype(params[0].dtype), HAS_GSCALE=grad_scale is not None,
                  HAS_LR=lr_tensor is not None, SQRT=(p == 0.5), INTERPRET=_INTERPRET,
                  BLOCK=block_for(p), SLOT_BLOCK=SLOT_BLOCK, num_warps=NUM_WARPS)
    _launch(op, "B", K._phase_b_kernel, ops, partials, args, consts, chunk_size=chunk_size,
            fuse=bool(fuse_one_chunk), clipping=h.clip > 0)
