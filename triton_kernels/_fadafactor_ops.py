"""Host side of the FAdafactor Triton kernels: input checks, the metadata tables, the launches and
the torch.library registration of fadam_fused::triton_fadafactor_phase_{s,a,b} with the schemas of
[note: the FAdafactor op contract] (fadam_fused/op_contract.py).

Launches per call, whatever the number of tensors: phase S two (the tiles' partial sums, then one
combine program per matrix: _fadafactor_kernels.py says why), phase A one (none when clipping is
off), phase B one. Tables follow [note: Triton metadata tables] in _ops.py and live in the same
cache: one int64 tensor per (phase, tensor list) with ROWS per-tensor rows and the block maps,
found again in a steady-state step (no copy, no allocation, no sync). Traced calls (torch.compile:
no addresses) launch the same kernels per tensor with TABLE=False.

Tuning: the element kernels use FAdam's BLOCK / POW_BLOCK and NUM_WARPS ([note: Triton tuning
constants] in _ops.py). Phase S reads [S_ROWS, TILE_C] blocks of whole tile rows: TILE_C is the
power of two above the widest tile (256 at the 65536 chunk: tiles are 256 x 256), S_ROWS makes it
S_BLOCK = 1024 elements, 8 per thread, whose float64 squares are 16 registers (ptxas figures in
tests/test_fadafactor_triton.py). The combine walks R and C in C_BLOCK = 256 float64 lanes.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _fadafactor_kernels as FK
from . import _ops
from .. import op_contract
from ._ops import NUM_WARPS, SLOT_BLOCK, block_for

S_BLOCK = 1024
C_BLOCK = 256

PHASE_S_MUTATES = ("factor_partials", "factors", "skip")
PHASE_A_MUTATES = ("partials",)
PHASE_B_MUTATES = ("params", "fim_rows", "fim_cols", "momentums")


def tile_cols_block(chunk_size: int) -> int:
    """TILE_C: the power of two >= the widest tile (op_contract.factor_tile: isqrt(chunk))."""
    return 1 << max(0, math.isqrt(chunk_size) - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# Checks (the kernels assume what these establish; the optimizer has already named the parameter).
# ---------------------------------------------------------------------------------------------


def _fail(op: str, msg: str):
    raise ValueError(f"{op}: {msg}")


def _check_scalars(op, device, skip, grad_scale, lr_tensor, chunk_size):
    if chunk_size <= 0:
        _fail(op, f"chunk_size must be positive, got {chunk_size}")
    if skip is not None and (skip.device != device or skip.dtype != torch.float32
                             or skip.numel() != 1):
        _fail(op, f"skip must be a one-element float32 tensor on {device}")
    if grad_scale is not None and (grad_scale.device != device or grad_scale.dtype != torch.float32
                                   or grad_scale.numel() != 1):
        _fail(op, f"grad_scale must be a one-element float32 tensor on {device}")
    if lr_tensor is not None and (lr_tensor.device != device or lr_tensor.numel() != 1 or
                                  lr_tensor.dtype not in (torch.float32, torch.float64)):
        _fail(op, f"lr_tensor must be a one-element float32 or float64 tensor on {device}")
    if device.type == "cpu" and not _ops._INTERPRET:
        raise RuntimeError(f"{op}: CPU tensors run only in Triton's interpreter; set "
                           "TRITON_INTERPRET=1 before Triton is imported, or use backend='cpu'")


def _check_buffer(op, name, t, device, dtype, numel, dim=1):
    if (t.device != device or t.dtype != dtype or not t.is_contiguous() or t.numel() != numel
            or t.dim() != dim):
        _fail(op, f"{name} must be a contiguous {dim}-dim {dtype} tensor of {numel} elements on "
                  f"{device}")


def _check_tensors(op, params, grads, fim_rows, fim_cols, momentums, steps, chunk_size):
    """Per-tensor checks, run when a table is built (and once per trace)."""
    n = len(params)
    for name, lst in (("grads", grads), ("fim_rows", fim_rows), ("fim_cols", fim_cols),
                      ("momentums", momentums), ("steps", steps)):
        if lst is not None and len(lst) != n:
            _fail(op, f"{name} must have one tensor per param ({n}), got {len(lst)}")
    dtype, device = params[0].dtype, params[0].device
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        _fail(op, f"params must be float32, bfloat16 or float16, got {dtype}")
    for i, p in enumerate(params):
        if p.device != device or p.dtype != dtype:
            _fail(op, f"params[{i}] must share the device and dtype of params[0] ({device}, "
                      f"{dtype})")
        # The kernels walk rows of the last dim: contiguous, not just dense.
        if p.dim() < 2 or not p.is_contiguous():
            _fail(op, f"params[{i}] must be a contiguous tensor of 2 or more dims")
        shapes = {"grads": (grads, p.shape, dtype),
                  "momentums": (momentums, p.shape, torch.float32),
                  "fim_rows": (fim_rows, p.shape[:-1], torch.float32),
                  "fim_cols": (fim_cols, p.shape[:-2] + p.shape[-1:], torch.float32)}
        for name, (lst, shape, want) in shapes.items():
            if lst is None:
                continue
            t = lst[i]
            if t.device != device or t.dtype != want or t.shape != shape or not t.is_contiguous():
                _fail(op, f"{name}[{i}] must be a contiguous {want} tensor of shape "
                          f"{tuple(shape)} on {device}")
        if steps is not None:
            s = steps[i]
            if s.device != device or s.dtype != torch.float32 or s.numel() != 1:
                _fail(op, f"steps[{i}] must be a one-element float32 tensor on {device}")


# ---------------------------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------------------------


def _sizes(params: Sequence[Tensor], chunk_size: int):
    """Per tensor: (numel, FactorTile, first slot, first partial, first factor)."""
    tiles = [op_contract.factor_tile(p.shape, chunk_size) for p in params]
    numels = [p.numel() for p in params]
    slots = op_contract.slot_offsets(numels, chunk_size)
    fparts, facs = op_contract.factor_offsets(params, chunk_size)
    return numels, tiles, slots, fparts, facs


def _block_maps(phase, numels, tiles, chunk_size, fuse) -> list[list[int]]:
    """The programs of each launch of `phase`, as (tensor << 32) | index."""
    if phase == "S":
        tile_map, matrix_map = [], []
        for i, t in enumerate(tiles):
            tile_map.extend((i << 32) | k for k in range(t.batch * t.row_tiles * t.col_tiles))
            matrix_map.extend((i << 32) | b for b in range(t.batch))
        return [tile_map, matrix_map]
    blocks = []
    for i, (numel, t) in enumerate(zip(numels, tiles)):
        nch = op_contract.nchunks_of(numel, chunk_size)
        if phase == "A":
            # A one-chunk tensor is reduced in phase B (fuse_one_chunk); an empty one has no sums.
            if numel == 0 or (fuse and nch == 1):
                continue
        elif numel == 0 and t.batch * (t.rows + t.cols) == 0:
            continue  # phase B of an empty tensor only copies its R and C, if it has any
        blocks.extend((i << 32) | c for c in range(nch))
    return [blocks]


def _table(op, phase, operands, owners, params, chunk_size, fuse, check):
    """The cached table of one call: (meta, [programs per launch], block map offsets,
    aligned)."""
    device, dtype = params[0].device, params[0].dtype
    ptrs = [[0 if t is None else t.data_ptr() for t in lst] if lst is not None else None
            for lst in operands]
    shapes = tuple(tuple(p.shape) for p in params)
    key = ("fadafactor", phase, device, dtype, chunk_size, fuse, shapes,
           *(tuple(r) for r in ptrs if r is not None))

    def build():
        check()
        n = len(params)
        numels, tiles, slots, fparts, facs = _sizes(params, chunk_size)
        maps = _block_maps(phase, numels, tiles, chunk_size, fuse)
        zeros = [0] * n
        rows = [r if r is not None else zeros for r in ptrs]
        rows += [numels, [t.batch for t in tiles], [t.rows for t in tiles],
                 [t.cols for t in tiles], [t.tile_rows for t in tiles],
                 [t.tile_cols for t in tiles], slots[:-1], fparts[:-1], facs[:-1]]
        assert len(rows) == FK.N_ROWS
        flat = [v for row in rows for v in row]
        offsets = []
        for m in maps:
            offsets.append(len(flat))
            flat.extend(m)
        # Element operands (params, grads, momentums) at 16-byte addresses, and chunks that keep
        # them there, give phase A / B's full tiles 128-bit loads, as FAdam's.
        aligned = (chunk_size * dtype.itemsize) % 16 == 0 and chunk_size % 4 == 0 and all(
            a % 16 == 0 for r in ptrs[:3] if r is not None for a in r)
        host = torch.tensor(flat, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
            meta = host.to(device, non_blocking=True)
        else:
            meta = host
        return _ops._Table(meta, host, (tuple(len(m) for m in maps), tuple(offsets)), slots[-1],
                           aligned)

    return _ops._TABLES.get(key, owners, build, _ops._capturing(device))


def _per_tensor_operands(i, params, grads, momentums, fim_rows, fim_cols, steps, filler,
                         chunk_size, takes_params=True):
    """Tensor i's *_in arguments (the traced path). Operands a phase does not take are `filler`
    (a float32 buffer of the call, never dereferenced) or the gradient."""
    numels, tiles, slots, fparts, facs = _sizes(params, chunk_size)
    t = tiles[i]
    pick = lambda lst: filler if lst is None else lst[i]  # noqa: E731
    return dict(p_in=params[i] if takes_params else grads[i], g_in=grads[i],
                m_in=pick(momentums), rs_in=pick(fim_rows), cs_in=pick(fim_cols),
                step_in=pick(steps), numel_in=numels[i], batch_in=t.batch, rows_in=t.rows,
                cols_in=t.cols, tile_r_in=t.tile_rows, tile_c_in=t.tile_cols, slot_in=slots[i],
                fpart_in=fparts[i], fac_in=facs[i])


_NO_OPERANDS = dict(p_in=None, g_in=None, m_in=None, rs_in=None, cs_in=None, step_in=None,
                    numel_in=0, batch_in=0, rows_in=0, cols_in=0, tile_r_in=0, tile_c_in=0,
                    slot_in=0, fpart_in=0, fac_in=0)


def _launch(op, phase, kernels, params, operand_lists, owners, per_tensor, args, consts, *,
            chunk_size, fuse, check):
    """Launches `kernels` (one per launch of the phase) over the programs of their block maps:
    one launch each through the table, or, traced, one per tensor with its operands.
    `per_tensor(i)` gives tensor i's *_in arguments and program counts per kernel."""
    from torch.library import wrap_triton

    if _ops._FORCE_PER_TENSOR or _ops._is_traced(params):
        check()
        for i in range(len(params)):
            operands, counts = per_tensor(i)
            for kernel, count, a, c in zip(kernels, counts, args, consts):
                if count:
                    wrap_triton(kernel)[(count,)](meta=None, n_tensors=0, blocks=0, **operands,
                                                 **a, **c, TABLE=False, **_aligned(kernel, False))
        return
    device = params[0].device
    with _ops._on_device(device):
        table = _table(op, phase, operand_lists, owners, params, chunk_size, fuse, check)
        counts, offsets = table.n_programs
        for kernel, count, at, a, c in zip(kernels, counts, offsets, args, consts):
            if count:
                wrap_triton(kernel)[(count,)](meta=table.meta, n_tensors=len(params), blocks=at,
                                              **_NO_OPERANDS, **a, **c, TABLE=True,
                                              **_aligned(kernel, table.aligned))


def _aligned(kernel, aligned):
    """ALIGNED for the element kernels (phases A and B); phase S's kernels have no such flag."""
    return {"ALIGNED": aligned} if kernel in (FK._phase_a_kernel, FK._phase_b_kernel) else {}


# ---------------------------------------------------------------------------------------------
# The ops.
# ---------------------------------------------------------------------------------------------


@torch.library.triton_op("fadam_fused::triton_fadafactor_phase_s", mutates_args=PHASE_S_MUTATES,
                         schema=op_contract.FADAFACTOR_PHASE_S_SCHEMA)
def triton_fadafactor_phase_s(
    params: list[Tensor], grads: list[Tensor], fim_rows: list[Tensor], fim_cols: list[Tensor],
    steps: list[Tensor], factor_partials: Tensor, factors: Tensor, skip: Tensor,
    grad_scale: Optional[Tensor], *, beta2: float, maximize: bool, chunk_size: int,
) -> None:
    """Phase S: per-tile float64 partial row and column sums of g^2, combined per matrix in tile
    order into the new R, C and R / sum R (``factors``); 1.0 into ``skip`` on a non-finite
    gradient. Reads grads, fim_rows, fim_cols, steps; writes no state."""
    op = "fadam_fused::triton_fadafactor_phase_s"
    device = params[0].device if params else skip.device
    _check_scalars(op, device, skip, grad_scale, None, chunk_size)
    if not params:
        return
    fp_n, fac_n = op_contract.factor_offsets(params, chunk_size)

    def check():
        _check_tensors(op, params, grads, fim_rows, fim_cols, None, steps, chunk_size)
        _check_buffer(op, "factor_partials", factor_partials, device, torch.float64, fp_n[-1])
        _check_buffer(op, "factors", factors, device, torch.float32, fac_n[-1])

    if factor_partials.numel() != fp_n[-1] or factors.numel() != fac_n[-1]:
        check()  # raises, naming the expected sizes
    tile_c = tile_cols_block(chunk_size)
    s_args = dict(factor_partials=factor_partials, skip=skip, gscale=grad_scale,
                  sign=-1.0 if maximize else 1.0)
    s_consts = dict(DTYPE=_ops._tl_dtype(params[0].dtype), HAS_GSCALE=grad_scale is not None,
                    TILE_C=tile_c, S_ROWS=max(1, S_BLOCK // tile_c), num_warps=NUM_WARPS)
    c_args = dict(factor_partials=factor_partials, factors=factors, beta2=float(beta2))
    c_consts = dict(DTYPE=s_consts["DTYPE"], INTERPRET=_ops._INTERPRET, C_BLOCK=C_BLOCK,
                    num_warps=NUM_WARPS)

    def per_tensor(i):
        t = op_contract.factor_tile(params[i].shape, chunk_size)
        # Filler: the step (read-only here), not factors, which the combine writes.
        operands = _per_tensor_operands(i, params, grads, None, fim_rows, fim_cols, steps,
                                        steps[i], chunk_size, takes_params=False)
        return operands, (t.batch * t.row_tiles * t.col_tiles, t.batch)

    _launch(op, "S", (FK._tiles_kernel, FK._combine_kernel), params,
            (None, grads, None, fim_rows, fim_cols, steps), steps, per_tensor,
            (s_args, c_args), (s_consts, c_consts), chunk_size=chunk_size, fuse=False,
            check=check)


@torch.library.triton_op("fadam_fused::triton_fadafactor_phase_a", mutates_args=PHASE_A_MUTATES,
                         schema=op_contract.FADAFACTOR_PHASE_A_SCHEMA)
def triton_fadafactor_phase_a(
    params: list[Tensor], grads: list[Tensor], factors: Tensor, partials: Tensor,
    grad_scale: Optional[Tensor], *, eps: float, p: float, clip: float, maximize: bool,
    chunk_size: int, fuse_one_chunk: bool,
) -> None:
    """Phase A: per-chunk float64 (sum ghat^2, sum w^2) into ``partials`` with f from
    ``factors``; nothing without clipping (phase S has checked the gradients)."""
    op = "fadam_fused::triton_fadafactor_phase_a"
    device = params[0].device if params else partials.device
    _check_scalars(op, device, None, grad_scale, None, chunk_size)
    if not params or not clip > 0:
        return
    h = op_contract.host_scalars(beta2=0.0, eps=eps, p=p, clip=clip, maximize=maximize)

    def check():
        _check_tensors(op, params, grads, None, None, None, None, chunk_size)
        _check_factored_buffers(op, params, factors, partials, chunk_size)

    _check_partial_rows(op, params, partials, chunk_size, check)
    args = dict(factors=factors, partials=partials, gscale=grad_scale, p=h.p, eps_p=h.eps_p,
                sign=h.sign, chunk_size=chunk_size)
    consts = dict(DTYPE=_ops._tl_dtype(params[0].dtype), HAS_GSCALE=grad_scale is not None,
                  SQRT=(p == 0.5), INTERPRET=_ops._INTERPRET, BLOCK=block_for(p),
                  num_warps=NUM_WARPS)

    def per_tensor(i):
        numel = params[i].numel()
        nch = op_contract.nchunks_of(numel, chunk_size)
        count = 0 if numel == 0 or (fuse_one_chunk and nch == 1) else nch
        return _per_tensor_operands(i, params, grads, None, None, None, None, factors,
                                    chunk_size), (count,)

    _launch(op, "A", (FK._phase_a_kernel,), params, (params, grads, None, None, None, None),
            params, per_tensor, (args,), (consts,), chunk_size=chunk_size,
            fuse=bool(fuse_one_chunk), check=check)


def _check_factored_buffers(op, params, factors, partials, chunk_size):
    device = params[0].device
    _check_buffer(op, "factors", factors, device, torch.float32,
                  op_contract.factor_offsets(params, chunk_size)[1][-1])
    n_slots = op_contract.slot_offsets([p.numel() for p in params], chunk_size)[-1]
    if (partials.device != device or partials.dtype != torch.float64 or partials.dim() != 2
            or partials.size(1) != 2 or not partials.is_contiguous()
            or partials.size(0) != n_slots):
        _fail(op, f"partials must be a contiguous float64 [{n_slots}, 2] tensor on {device}")


def _check_partial_rows(op, params, partials, chunk_size, check):
    """The cheap per-call size checks (a table found again has been checked in full)."""
    n_slots = op_contract.slot_offsets([p.numel() for p in params], chunk_size)[-1]
    if partials.dim() != 2 or partials.size(0) != n_slots:
        check()  # raises, naming the expected rows


@torch.library.triton_op("fadam_fused::triton_fadafactor_phase_b", mutates_args=PHASE_B_MUTATES,
                         schema=op_contract.FADAFACTOR_PHASE_B_SCHEMA)
def triton_fadafactor_phase_b(
    params: list[Tensor], grads: list[Tensor], fim_rows: list[Tensor], fim_cols: list[Tensor],
    momentums: list[Tensor], factors: Tensor, partials: Tensor, skip: Tensor,
    grad_scale: Optional[Tensor], lr_tensor: Optional[Tensor], *, lr: float, beta1: float,
    eps: float, p: float, clip: float, weight_decay: float, maximize: bool, chunk_size: int,
    fuse_one_chunk: bool,
) -> None:
    """Phase B: unless skip != 0, the FAdam update of momentums and params with f from
    ``factors``, and the new R and C copied into fim_rows / fim_cols."""
    op = "fadam_fused::triton_fadafactor_phase_b"
    device = params[0].device if params else skip.device
    _check_scalars(op, device, skip, grad_scale, lr_tensor, chunk_size)
    if not params:
        return
    h = op_contract.host_scalars(beta2=0.0, eps=eps, p=p, clip=clip, maximize=maximize, lr=lr,
                                 beta1=beta1, weight_decay=weight_decay)

    def check():
        _check_tensors(op, params, grads, fim_rows, fim_cols, momentums, None, chunk_size)
        _check_factored_buffers(op, params, factors, partials, chunk_size)

    _check_partial_rows(op, params, partials, chunk_size, check)
    args = dict(factors=factors, partials=partials, skip=skip, gscale=grad_scale,
                lr_ptr=lr_tensor, lr=h.lr, beta1=h.beta1, omb1=h.one_minus_beta1, eps_p=h.eps_p,
                p=h.p, clip=h.clip, wd=h.weight_decay, sign=h.sign, chunk_size=chunk_size,
                fuse_one_chunk=bool(fuse_one_chunk))
    consts = dict(DTYPE=_ops._tl_dtype(params[0].dtype), HAS_GSCALE=grad_scale is not None,
                  HAS_LR=lr_tensor is not None, SQRT=(p == 0.5), INTERPRET=_ops._INTERPRET,
                  BLOCK=block_for(p), SLOT_BLOCK=SLOT_BLOCK, num_warps=NUM_WARPS)

    def per_tensor(i):
        t = op_contract.factor_tile(params[i].shape, chunk_size)
        numel = params[i].numel()
        count = 0 if numel == 0 and t.batch * (t.rows + t.cols) == 0 else \
            op_contract.nchunks_of(numel, chunk_size)
        return _per_tensor_operands(i, params, grads, momentums, fim_rows, fim_cols, None,
                                    factors, chunk_size), (count,)

    _launch(op, "B", (FK._phase_b_kernel,), params,
            (params, grads, momentums, fim_rows, fim_cols, None), momentums, per_tensor, (args,),
            (consts,), chunk_size=chunk_size, fuse=bool(fuse_one_chunk), check=check)
