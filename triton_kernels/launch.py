"""The one launch path of the Triton ops, for both optimizers: FAdam's
fadam_fused::triton_phase_{a,b} (_ops.py) and FAdafactor's triton_fadafactor_phase_{s,a,b}
(_fadafactor_ops.py).

An op validates and describes its call once, as a `Launch` (the call-wide checks when it is made;
the per-tensor checks, the offsets and the table layout from its methods), packs its kernels'
arguments (host scalars from op_contract.host_scalars) into `Kernel`s, and hands both to `run`.
Validate, then plan, then launch: every error a call can raise is raised before its first launch.

Eager path (real tensors): ONE launch per kernel per call, whatever the number of tensors. The
program-to-(tensor, index) map and the per-tensor addresses and sizes live in one int64 tensor on
the device ([note: Triton metadata tables] below). A steady-state step, where the same tensors come
back, finds it built: no host-to-device copy, no allocation, no sync.

Traced path (torch.compile: FakeTensor / FunctionalTensor arguments, no addresses): the same kernels
with TABLE=False, one launch per tensor per kernel, taking the tensors as arguments so Inductor sees
which of them each kernel writes. A compiled step is meant to be captured in a CUDA graph
(mode="reduce-overhead"), where the launch count costs nothing at replay.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import weakref
from typing import Any, Callable, Iterable, NoReturn, Optional, Sequence

import torch
from torch import Tensor

from . import _kernels

# [note: Triton tuning constants]
# The chunk is op_contract.CHUNK_SIZE["triton"] (65536, as the CUDA kernels). Every phase-B program
# of a multi-chunk tensor re-sums all of that tensor's slots (16 B each) from L2: for a
# 100M-element float32 tensor 1526 slots = 24 KiB per program against its own 64K x 28 B = 1.8 MB
# of element traffic (1.3%), a ratio that grows 4x with every halving of the chunk. It must be a
# multiple of 8 elements (16 bytes of a 2-byte dtype) for the ALIGNED path; 65536 is.
# BLOCK = 512 elements per tile with 4 warps (128 threads): 4 contiguous elements per thread per
# operand, one 128-bit load per float32 operand per thread per tile. ptxas -v: 1024 needs 90-128
# registers and spills on sm_80, at most 4 CTAs = 16 warps per SM; 512 needs at most 72, 7-8 CTAs
# per SM, twice the loads in flight for a bandwidth-bound kernel.
# POW_BLOCK = 256 for p != 0.5: libdevice's accurate powf is a real call whose saved registers
# spilled 8-16 bytes in 3 specializations at 512; 256 is 2 floats (a 64-bit load) per thread and
# spills nothing. tests/_triton_compile.py checks every specialization for spills.
# FAdafactor's element kernels (phases A and B) use the same BLOCK / POW_BLOCK and NUM_WARPS.
BLOCK = 512
POW_BLOCK = 256
NUM_WARPS = 4
# Slots summed per iteration of phase B's slot reduction: 2 float64 per thread with 128 threads; a
# 100M-element tensor (1526 slots at 64K) takes 6 iterations.
SLOT_BLOCK = 256
# Tables no CUDA graph captured, kept per process, the least recently used dropped first: 2 per
# (param group, dtype) bucket, so 256 hold 128 buckets (e.g. layer-wise lr decay over 48 layers x
# decay / no decay) without rebuilding every table in every step.
CACHE_ENTRIES = 256

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def block_for(p: float) -> int:
    """Elements per tile for the FIM exponent p: BLOCK on the sqrt path, POW_BLOCK otherwise."""
    return BLOCK if p == 0.5 else POW_BLOCK


def _interpreting() -> bool:
    """Whether the kernels are Triton interpreter functions (TRITON_INTERPRET=1 when they were
    defined; every kernel module is imported with this one, so they all decided alike)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernels._phase_a_kernel, InterpretedFunction)


INTERPRET = _interpreting()
_TL_DTYPE = None  # filled lazily: {torch dtype: tl dtype}


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a parameter dtype (one of FUSED_DTYPES)."""
    global _TL_DTYPE
    if _TL_DTYPE is None:
        import triton.language as tl

        _TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                     torch.float16: tl.float16}
    return _TL_DTYPE[dtype]


# ---------------------------------------------------------------------------------------------
# Checks (the kernels assume what these establish; the optimizer has already named the parameter).
# ---------------------------------------------------------------------------------------------


def fail(op: str, msg: str) -> NoReturn:
    raise ValueError(f"{op}: {msg}")


def _one_element(t: Tensor, device: torch.device, dtypes) -> bool:
    return t.device == device and t.dtype in dtypes and t.numel() == 1


def check_call(op: str, params: Sequence[Tensor], buffer: Tensor, chunk_size: int, *,
               skip=None, grad_scale=None, lr_tensor=None,
               lengths: Optional[dict] = None) -> torch.device:
    """The per-call checks, cheap whatever the number of tensors: the list lengths, the chunk, the
    one-element tensors, the parameters' dtype (that of params[0]: the per-tensor checks hold the
    others to it) and that CPU tensors run only interpreted. Returns the device of the call:
    params[0]'s, or `buffer`'s (one of the call's buffers) when there are no params."""
    n = len(params)
    for name, lst in (lengths or {}).items():
        if len(lst) != n:
            fail(op, f"params and {name} must have the same length, got {n} and {len(lst)}")
    if chunk_size <= 0:
        fail(op, f"chunk_size must be positive, got {chunk_size}")
    device = params[0].device if n else buffer.device
    if n and params[0].dtype not in FUSED_DTYPES:
        fail(op, f"params must be float32, bfloat16 or float16, got {params[0].dtype}")
    if skip is not None and not _one_element(skip, device, (torch.float32,)):
        fail(op, f"skip must be a one-element float32 tensor on {device}")
    if grad_scale is not None and not _one_element(grad_scale, device, (torch.float32,)):
        fail(op, f"grad_scale must be a one-element float32 tensor on {device}")
    if lr_tensor is not None and not _one_element(lr_tensor, device,
                                                  (torch.float32, torch.float64)):
        fail(op, f"lr_tensor must be a one-element float32 or float64 tensor on {device}")
    if device.type == "cpu" and not INTERPRET:
        raise RuntimeError(f"{op}: CPU tensors run only in Triton's interpreter; set "
                           "TRITON_INTERPRET=1 before Triton is imported, or use backend='cpu'")
    return device


def check_partials(op: str, partials: Tensor, device: torch.device,
                   n_slots: Optional[int] = None, chunk_size: Optional[int] = None) -> None:
    """partials: contiguous float64 [n_slots, 2] (its row count when n_slots is given)."""
    if (partials.device != device or partials.dtype != torch.float64 or partials.dim() != 2
            or partials.size(1) != 2 or not partials.is_contiguous()):
        fail(op, f"partials must be a contiguous float64 [n_slots, 2] tensor on {device}")
    if n_slots is not None and partials.size(0) != n_slots:
        fail(op, f"partials must have {n_slots} rows for chunk_size {chunk_size}, got "
                 f"{partials.size(0)}")


def check_buffer(op: str, name: str, t: Tensor, device: torch.device, dtype: torch.dtype,
                 numel: int) -> None:
    """A flat scratch buffer of the call: contiguous, 1-dim, `numel` elements."""
    if (t.device != device or t.dtype != dtype or not t.is_contiguous() or t.numel() != numel
            or t.dim() != 1):
        fail(op, f"{name} must be a contiguous 1-dim {dtype} tensor of {numel} elements on "
                 f"{device}")


def check_params(op: str, params: Sequence[Tensor], layout: Callable[[Tensor], bool],
                 layout_name: str) -> None:
    """Every parameter on params[0]'s device, with its dtype, and `layout(p)` true."""
    dtype, device = params[0].dtype, params[0].device
    for i, p in enumerate(params):
        if p.device != device or p.dtype != dtype:
            fail(op, f"params[{i}] must share the device and dtype of params[0] ({device}, "
                     f"{dtype})")
        if not layout(p):
            fail(op, f"params[{i}] must be {layout_name}")


def check_operand(op: str, name: str, i: int, t: Tensor, device: torch.device,
                  dtype: torch.dtype, shape, strides=None) -> None:
    """Operand `name`[i]: `dtype` on `device`, of `shape`, and either with `strides` (those of
    params[i]: the kernels walk every operand in the parameter's storage order) or contiguous."""
    if t.device != device or t.dtype != dtype or t.shape != shape:
        ok = False
    else:
        ok = t.stride() == strides if strides is not None else t.is_contiguous()
    if ok:
        return
    if strides is not None:
        fail(op, f"{name}[{i}] must be a {dtype} tensor on {device} with the sizes and strides "
                 f"of params[{i}]")
    fail(op, f"{name}[{i}] must be a contiguous {dtype} tensor of shape {tuple(shape)} on "
             f"{device}")


def check_steps(op: str, steps: Sequence[Tensor], device: torch.device) -> None:
    for i, s in enumerate(steps):
        if not _one_element(s, device, (torch.float32,)):
            fail(op, f"steps[{i}] must be a one-element float32 tensor on {device}")


# ---------------------------------------------------------------------------------------------
# Metadata tables.
# ---------------------------------------------------------------------------------------------

# [note: Triton metadata tables]
# One int64 device tensor per (op, tensor list): per-tensor rows (addresses, then sizes and first
# slots / offsets, in the kernels' ROW_* order: _kernels.py, _fadafactor_kernels.py), then one block
# map per launch of the op, an int64 per program: (tensor index << 32) | chunk, tile or matrix. It
# is built on the host, copied once from pinned memory with non_blocking=True (the launch is queued
# behind the copy on the stream), and found again by everything it encodes: the op, the addresses
# and sizes of every operand, the dtype, chunk size and the flags that shape the block maps.
#
# Lifetime. A kernel reads its table when it runs, and a CUDA graph that captured a launch reads
# the same device table (and replays the copy from the same pinned buffer) at every replay. So a
# table used while the current stream is capturing is never evicted: it lives exactly as long as
# the tensors that own it (weakref finalizers: the step tensors, or the momentums or params where a
# phase reads no step), i.e. the optimizer state, and is released when the optimizer lets them go;
# a graph replaying it after that would write into freed state anyway. Other tables (nothing
# captured them) sit in an LRU of CACHE_ENTRIES, where eviction is safe (the caching allocators
# order any reuse of their memory after the launches already queued), and are also released when
# their owners die. Gradients are not owners: the default zero_grad() frees them every step and
# backward brings them back, usually at the same addresses, where the table is found again.
# Capture after a warm-up step (as torch asks of any captured code): a table first built during
# capture allocates pinned memory there. The CUDA kernels (csrc/cuda/fadam_cuda.cu) have no such
# table: they pass theirs by value in the kernel parameters (__grid_constant__ Args), which a graph
# copies into its kernel node at capture, so nothing of a launch has to outlive it.


class Table:
    __slots__ = ("meta", "host", "programs", "offsets", "sizes", "aligned", "finalizers",
                 "__weakref__")

    def __init__(self, meta, host, programs, offsets, sizes, aligned):
        self.meta = meta          # int64 tensor on the device
        self.host = host          # its (pinned) source, which a captured copy reads at replay
        self.programs = programs  # programs per launch (per block map)
        self.offsets = offsets    # where each block map starts in meta
        self.sizes = sizes        # the buffer sizes a call with this table must pass
        self.aligned = aligned
        self.finalizers: list[weakref.finalize] = []


class TableCache:
    """The tables of this process: an LRU of uncaptured ones and the captured ones, each released
    when its owner tensors die ([note: Triton metadata tables])."""

    def __init__(self, entries: int):
        self.entries = entries
        self.lru: "collections.OrderedDict[tuple, Table]" = collections.OrderedDict()
        self.captured: dict[tuple, Table] = {}
        self.builds = 0  # tables built so far (one host-to-device copy each); tests read it
        # Re-entrant: a finalizer may run (an owner collected) while this thread holds it.
        self._lock = threading.RLock()

    def get(self, key: tuple, owners: Sequence[Tensor], build: Callable[[], Table],
            capturing: bool) -> Table:
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
        table.finalizers = [weakref.finalize(t, self._release, key) for t in owners]
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
    def _forget(table: Table) -> None:
        for fin in table.finalizers:  # the other owners' finalizers would only find nothing
            fin.detach()


TABLES = TableCache(CACHE_ENTRIES)


def capturing(device: torch.device) -> bool:
    """Whether the current stream of `device` is capturing a CUDA graph (tests patch this: the
    interpreter has no graphs)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def aligned(chunk_size: int, itemsize: int, addresses: Iterable[Sequence[int]]) -> bool:
    """Whether the element kernels may take the ALIGNED path: every address of the element
    operands (parameter dtype and float32 state) 16-byte aligned, and chunks that keep them so."""
    return ((chunk_size * itemsize) % 16 == 0 and (chunk_size * 4) % 16 == 0
            and all(a % 16 == 0 for row in addresses for a in row))


@dataclasses.dataclass(frozen=True)
class Rows:
    """A call's part of its table, from Launch.table()."""

    rows: list[list[int]]      # every per-tensor row, addresses included, in the kernels' ROW_*
    sizes: tuple[int, ...]     # the buffer sizes a call with this table passes (Launch.sizes)
    aligned: bool              # ALIGNED for the element kernels


def _build_table(device: torch.device, rows: Rows, maps: list[list[int]]) -> Table:
    flat = [v for row in rows.rows for v in row]
    offsets = []
    for m in maps:
        offsets.append(len(flat))
        flat.extend(m)
    host = torch.tensor(flat, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
        meta = host.to(device, non_blocking=True)
    else:
        meta = host
    return Table(meta, host, tuple(len(m) for m in maps), tuple(offsets), rows.sizes,
                 rows.aligned)


def on_device(device: torch.device):
    """Triton launches on the current CUDA device and stream: make it the parameters' device,
    as the C++ launchers do with a CUDAGuard (a model on cuda:1 without set_device(1) would
    otherwise run on cuda:0, unordered with cuda:1's backward and the metadata copy)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def is_traced(tensors: Iterable[Tensor]) -> bool:
    """True under torch.compile / make_fx tracing: the tensors have no storage to point at."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return any(isinstance(t, FunctionalTensor) or is_fake(t) for t in tensors)


class Rounding:
    """An update op's stochastic rounding ([note: stochastic rounding] in
    fadam_fused/op_contract.py), checked and described once per call: whether a bfloat16
    parameter (SR_P) and a bfloat16 momentum (SR_M) are rounded stochastically, the momentum's
    dtype, and the rounding list as an int64 device tensor (`rnd`), cached per (device, list) so
    that a steady-state step copies nothing to the device (and a captured graph reads the same
    tensor at replay)."""

    _cache: "collections.OrderedDict[tuple, Tensor]" = collections.OrderedDict()

    def __init__(self, op: str, params: Sequence[Tensor],
                 momentums: Optional[Sequence[Tensor]], rounding: Sequence[int],
                 device: torch.device):
        # None is an empty list: torch 2.11's triton_op infers its schema from the Python
        # signature and takes no list default (2.14 uses op_contract's `int[] rounding=[]`).
        rounding = [int(x) for x in rounding or ()]
        n = len(params)
        self.mdtype = momentums[0].dtype if momentums else torch.float32
        if self.mdtype not in (torch.float32, torch.bfloat16):
            fail(op, f"momentums must be float32 or bfloat16, got {self.mdtype}")
        if rounding and len(rounding) != 4 * n:
            fail(op, f"rounding must be empty or hold 4 int64 per tensor ([seed, base, "
                     f"inner_local, inner_global]), got {len(rounding)} for {n} tensors")
        for i in range(n if rounding else 0):
            base, inner_local, inner_global = rounding[4 * i + 1:4 * i + 4]
            if not (base >= 0 and 0 < inner_local <= inner_global):
                fail(op, f"rounding[{4 * i}:{4 * i + 4}] of params[{i}] must have base >= 0 and "
                         f"0 < inner_local <= inner_global, got {rounding[4 * i:4 * i + 4]}")
        self.sr_p = bool(rounding) and n > 0 and params[0].dtype == torch.bfloat16
        self.sr_m = bool(rounding) and self.mdtype == torch.bfloat16
        self.rnd = None
        if self.sr_p or self.sr_m:
            self.rnd = self._tensor(tuple(rounding), device, is_traced(params))

    @classmethod
    def _tensor(cls, rounding: tuple, device: torch.device, traced: bool) -> Tensor:
        if traced:  # a constant of the traced graph
            return torch.tensor(rounding, dtype=torch.int64, device=device)
        key = (device, rounding)
        t = cls._cache.get(key)
        if t is None:
            t = torch.tensor(rounding, dtype=torch.int64)
            if device.type == "cuda":
                t = t.pin_memory().to(device, non_blocking=True)
            cls._cache[key] = t
            while len(cls._cache) > CACHE_ENTRIES:
                cls._cache.popitem(last=False)
        else:
            cls._cache.move_to_end(key)
        return t

    def row(self, i: int) -> Optional[Tensor]:
        """Tensor i's row (the traced path's rnd_in)."""
        return None if self.rnd is None else self.rnd[4 * i:4 * i + 4]

    def kernel_args(self) -> dict:
        return dict(rnd=self.rnd, MDTYPE=tl_dtype(self.mdtype), SR=self.sr_p or self.sr_m,
                    SR_P=self.sr_p, SR_M=self.sr_m)


# Tests set this to exercise the per-tensor (TABLE=False) path in the interpreter.
FORCE_PER_TENSOR = False


# ---------------------------------------------------------------------------------------------
# The launch.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel launch of an op: the kernel and its arguments after the operands (buffers,
    host scalars, constexprs, num_warps)."""

    fn: Any
    args: dict
    blocks: bool = False   # takes `blocks`, where its block map starts (an op of several kernels)
    aligned: bool = True   # takes ALIGNED (the element kernels)

    def __call__(self, programs: int, operands: dict, *, table: bool, at: int, aligned: bool):
        extra = {}
        if self.blocks:
            extra["blocks"] = at
        if self.aligned:
            extra["ALIGNED"] = aligned
        # Interpreted kernels are launched as they are: torch 2.11's wrap_triton refuses an
        # InterpretedFunction (2.14 passes it through), and an interpreted triton_op runs eagerly.
        args = dict(self.args, TABLE=table, **extra)
        if INTERPRET:
            # triton 3.6's interpreter cannot take a Python bool as a runtime (int1) argument
            # ("numpy data itemsize (32 bits) exceeds ... int1"); 0 / 1 mean the same to a kernel.
            args = {k: int(v) if isinstance(v, bool) else v for k, v in args.items()}
        fn = self.fn if INTERPRET else torch.library.wrap_triton(self.fn)
        fn[(programs,)](**operands, **args)


class Launch:
    """One validated call of an op, described once. An op module's subclass is made after the
    per-call checks (check_call) and holds the call's tensor lists and the offsets derived from
    them (computed once); its methods give the per-tensor checks, the programs, the operands of
    the traced launches and the table's rows.

    operands: the tensor lists whose addresses the table holds, in the kernels' row order (None:
    a row of zeros, never dereferenced). owners: the tensors whose life bounds the table. key:
    what else (beyond the op, device, dtype and addresses) shapes the table. sizes: the sizes of
    the call's buffers, which a table found again must have been built for (else check() names
    the right ones). no_operands: the *_in arguments of a table launch (None or 0)."""

    op: str
    params: Sequence[Tensor]
    operands: Sequence[Optional[Sequence[Tensor]]]
    owners: Sequence[Tensor]
    key: tuple
    sizes: tuple[int, ...]
    no_operands: dict

    def check(self) -> None:
        """The per-tensor checks: when a table is built, and once per trace."""
        raise NotImplementedError

    def programs(self) -> Sequence[Sequence[int]]:
        """Per tensor, its programs in each kernel of the launch (0: none)."""
        raise NotImplementedError

    def tensor_operands(self, i: int) -> dict:
        """Tensor i's *_in arguments (the traced path)."""
        raise NotImplementedError

    def table(self, addresses: list[list[int]]) -> Rows:
        """The table's rows, given the operands' addresses (a row per entry of `operands`)."""
        raise NotImplementedError


def run(call: Launch, kernels: Sequence[Kernel]) -> None:
    """Launches `kernels` over the programs of `call`: one launch each through its table, or,
    while traced (no addresses), one per tensor with its tensors as arguments. Program j of
    tensor i in kernel k is entry (i << 32) | j of kernel k's block map."""
    params = call.params
    if FORCE_PER_TENSOR or is_traced(params):
        # Traced tensors have no addresses (so no table), but their dtypes, shapes and strides
        # are known: they get the table path's checks, once per trace. (Traced launches are
        # emitted and device-guarded by Inductor.)
        call.check()
        for i, counts in enumerate(call.programs()):
            operands = dict(meta=None, n_tensors=0, **call.tensor_operands(i))
            for kernel, count in zip(kernels, counts, strict=True):
                if count:
                    kernel(count, operands, table=False, at=0, aligned=False)
        return
    device = params[0].device
    with on_device(device):
        n = len(params)
        addresses = [[0] * n if lst is None else [t.data_ptr() for t in lst]
                     for lst in call.operands]
        key = (call.op, device, params[0].dtype, *call.key, *map(tuple, addresses))

        def build() -> Table:
            call.check()
            programs = call.programs()
            maps = [[(i << 32) | j for i, counts in enumerate(programs) for j in range(counts[k])]
                    for k in range(len(kernels))]
            return _build_table(device, call.table(addresses), maps)

        table = TABLES.get(key, call.owners, build, capturing(device))
        if call.sizes != table.sizes:  # (a table found again: build() checked its own call)
            call.check()  # raises, naming the expected sizes
        operands = dict(meta=table.meta, n_tensors=n, **call.no_operands)
        for kernel, count, at in zip(kernels, table.programs, table.offsets, strict=True):
            if count:
                kernel(count, operands, table=True, at=at, aligned=table.aligned)
