"""FAdafactor's Triton ops: fadam_fused::triton_fadafactor_phase_{s,a,b} with the schemas of
[note: the FAdafactor op contract] (fadam_fused/op_contract.py), registered with
torch.library.triton_op and launched through launch.py, as FAdam's.

Launches per call, whatever the number of tensors: phase S two (the tiles' partial sums, then one
combine program per matrix: _fadafactor_kernels.py says why), phase A one (none when clipping is
off), phase B one. Each phase's table ([note: Triton metadata tables] in launch.py) has the N_ROWS
per-tensor rows of _fadafactor_kernels.py, then one block map per kernel.

Tuning: the element kernels use FAdam's BLOCK / POW_BLOCK and NUM_WARPS ([note: Triton tuning
constants] in launch.py). Phase S reads [S_ROWS, TILE_C] blocks of whole tile rows: TILE_C is the
power of two above the widest tile (256 at the 65536 chunk: tiles are 256 x 256), S_ROWS makes it
S_BLOCK = 1024 elements, 8 per thread, whose float64 squares are 16 registers (ptxas figures in
tests/test_fadafactor_triton.py). The combine walks R and C in C_BLOCK = 256 float64 lanes.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import op_contract
from . import _fadafactor_kernels as FK
from . import launch

S_BLOCK = 1024
C_BLOCK = 256

PHASE_S_MUTATES = ("factor_partials", "factors", "skip")
PHASE_A_MUTATES = ("partials",)
PHASE_B_MUTATES = ("params", "fim_rows", "fim_cols", "momentums")


def tile_cols_block(chunk_size: int) -> int:
    """TILE_C: the power of two >= the widest tile (op_contract.factor_tile: isqrt(chunk))."""
    return 1 << max(0, math.isqrt(chunk_size) - 1).bit_length()


def _contiguous_matrices(p: Tensor) -> bool:
    # The kernels walk rows of the last dim: contiguous, not just dense.
    return p.dim() >= 2 and p.is_contiguous()


class _Call(launch.Launch):
    """One call of a FAdafactor op, checked per call. `lists` holds the tensor lists the phase
    takes (grads, fim_rows, fim_cols, momentums, steps); `buffers` its flat buffers
    (factor_partials and factors in phase S, factors and partials in A and B)."""

    no_operands = dict(p_in=None, g_in=None, m_in=None, rs_in=None, cs_in=None, step_in=None,
                       numel_in=0, batch_in=0, rows_in=0, cols_in=0, tile_r_in=0, tile_c_in=0,
                       slot_in=0, fpart_in=0, fac_in=0)

    def __init__(self, op: str, phase: str, params: Sequence[Tensor], lists: dict,
                 buffers: dict, skip: Optional[Tensor], grad_scale: Optional[Tensor],
                 lr_tensor: Optional[Tensor], scalars: op_contract.HostScalars, *,
                 p: float = 0.5, chunk_size: int, fuse: bool = False,
                 rounding: Optional[Sequence[int]] = None):
        self.device = launch.check_call(op, params, next(iter(buffers.values())), chunk_size,
                                        skip=skip, grad_scale=grad_scale, lr_tensor=lr_tensor,
                                        lengths=lists)
        if "partials" in buffers:
            launch.check_partials(op, buffers["partials"], self.device)
        self.op, self.phase, self.params, self.lists, self.buffers = (op, phase, params, lists,
                                                                      buffers)
        self.skip, self.grad_scale = skip, grad_scale
        self.scalars, self.p, self.chunk_size, self.fuse = scalars, p, chunk_size, fuse
        # Address rows in the kernels' order: P, G, M, RS, CS, STEP; phase S reads no parameter.
        self.operands = [None if phase == "S" else params] + [
            lists.get(name) for name in ("grads", "momentums", "fim_rows", "fim_cols", "steps")]
        # The state each phase reads, whose life bounds its table.
        self.owners = {"S": lists.get("steps"), "A": params, "B": lists.get("momentums")}[phase]
        self.key = (chunk_size, fuse, tuple(tuple(p.shape) for p in params))
        self.sizes = tuple(b.numel() for b in buffers.values())
        self.sr = launch.Rounding(op, params, lists.get("momentums"), rounding, self.device)
        if phase == "B":  # its kernel takes the rounding rows
            self.no_operands = dict(self.no_operands, rnd_in=None)

    @functools.cached_property
    def offsets(self):
        """(numels, tiles, first slots, first partials, first factors) of the tensors."""
        params, chunk = self.params, self.chunk_size
        numels = [p.numel() for p in params]
        fparts, facs = op_contract.factor_offsets(params, chunk)
        return (numels, [op_contract.factor_tile(p.shape, chunk) for p in params],
                op_contract.slot_offsets(numels, chunk), fparts, facs)

    def _expected_sizes(self) -> tuple[int, ...]:
        """The elements each buffer must have: partials holds 2 float64 per slot."""
        _, _, slots, fparts, facs = self.offsets
        return (fparts[-1], facs[-1]) if self.phase == "S" else (facs[-1], 2 * slots[-1])

    def check(self) -> None:
        op, device, params = self.op, self.device, self.params
        launch.check_params(op, params, _contiguous_matrices,
                            "a contiguous tensor of 2 or more dims")
        for i, p in enumerate(params):
            shapes = {"grads": (p.shape, p.dtype), "momentums": (p.shape, self.sr.mdtype),
                      "fim_rows": (p.shape[:-1], torch.float32),
                      "fim_cols": (p.shape[:-2] + p.shape[-1:], torch.float32)}
            for name, (shape, want) in shapes.items():
                if name in self.lists:
                    launch.check_operand(op, name, i, self.lists[name][i], device, want, shape)
        if "steps" in self.lists:
            launch.check_steps(op, self.lists["steps"], device)
        for (name, buf), size in zip(self.buffers.items(), self._expected_sizes()):
            if name == "partials":
                launch.check_partials(op, buf, device, size // 2, self.chunk_size)
            else:
                launch.check_buffer(op, name, buf, device,
                                    torch.float64 if name == "factor_partials" else torch.float32,
                                    size)

    def programs(self) -> list[tuple[int, ...]]:
        numels, tiles, _, _, _ = self.offsets
        out = []
        for numel, t in zip(numels, tiles):
            nch = op_contract.nchunks_of(numel, self.chunk_size)
            if self.phase == "S":  # one program per tile, then one per matrix
                out.append((t.batch * t.row_tiles * t.col_tiles, t.batch))
            elif self.phase == "A":
                # A one-chunk tensor is reduced in phase B (fuse_one_chunk); an empty one has no
                # sums.
                out.append((0 if numel == 0 or (self.fuse and nch == 1) else nch,))
            else:
                # Phase B of an empty tensor only copies its R and C, if it has any.
                out.append((0 if numel == 0 and t.batch * (t.rows + t.cols) == 0 else nch,))
        return out

    def tensor_operands(self, i: int) -> dict:
        numels, tiles, slots, fparts, facs = self.offsets
        t = tiles[i]
        # Operands a phase does not take are a buffer it only reads, never dereferenced: the
        # step in phase S (not factors, which its combine writes), else factors.
        filler = self.lists["steps"][i] if self.phase == "S" else self.buffers["factors"]
        pick = lambda name: self.lists[name][i] if name in self.lists else filler  # noqa: E731
        grad = self.lists["grads"][i]
        out = dict(p_in=grad if self.phase == "S" else self.params[i], g_in=grad,
                   m_in=pick("momentums"), rs_in=pick("fim_rows"), cs_in=pick("fim_cols"),
                   step_in=pick("steps"), numel_in=numels[i], batch_in=t.batch,
                   rows_in=t.rows, cols_in=t.cols, tile_r_in=t.tile_rows,
                   tile_c_in=t.tile_cols, slot_in=slots[i], fpart_in=fparts[i],
                   fac_in=facs[i])
        if self.phase == "B":
            out["rnd_in"] = self.sr.row(i)
        return out

    def table(self, addresses: list[list[int]]) -> launch.Rows:
        numels, tiles, slots, fparts, facs = self.offsets
        rows = addresses + [numels, [t.batch for t in tiles], [t.rows for t in tiles],
                            [t.cols for t in tiles], [t.tile_rows for t in tiles],
                            [t.tile_cols for t in tiles], slots[:-1], fparts[:-1], facs[:-1]]
        assert len(rows) == FK.N_ROWS
        # Element operands (params, grads, momentums) at 16-byte addresses, and chunks that keep
        # them there, give phase A / B's full tiles 128-bit loads, as FAdam's.
        return launch.Rows(rows, self._expected_sizes(),
                           launch.aligned(self.chunk_size, self.params[0].dtype.itemsize,
                                          addresses[:3]))

    def element_kernel(self, fn, **args) -> launch.Kernel:
        """Phase A's or B's kernel `fn` with `args` and what both pass: the buffers, the host
        scalars of d and of the gradient, and the constexprs of the dtype and the p path."""
        h = self.scalars
        return launch.Kernel(fn, dict(
            factors=self.buffers["factors"], partials=self.buffers["partials"],
            gscale=self.grad_scale, p=h.p, eps_p=h.eps_p, sign=h.sign,
            chunk_size=self.chunk_size, **args, DTYPE=launch.tl_dtype(self.params[0].dtype),
            HAS_GSCALE=self.grad_scale is not None, SQRT=(self.p == 0.5),
            INTERPRET=launch.INTERPRET, BLOCK=launch.block_for(self.p),
            num_warps=launch.NUM_WARPS), blocks=True)


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
    order into the new R, C and R / sum R (``factors``); 1.0 into ``skip`` where a gradient's
    square or a new R or C is not finite in float32. Reads grads, fim_rows, fim_cols, steps;
    writes no state."""
    # (Phase S has no eps, p or clip: host_scalars gets neutral ones for its beta2 and sign.)
    call = _Call("fadam_fused::triton_fadafactor_phase_s", "S", params,
                 dict(grads=grads, fim_rows=fim_rows, fim_cols=fim_cols, steps=steps),
                 dict(factor_partials=factor_partials, factors=factors), skip, grad_scale, None,
                 op_contract.host_scalars(beta2=beta2, eps=0.0, p=0.5, clip=0.0,
                                          maximize=maximize), chunk_size=chunk_size)
    if not params:
        return
    h = call.scalars
    dtype = launch.tl_dtype(params[0].dtype)
    tile_c = tile_cols_block(chunk_size)
    launch.run(call, [
        launch.Kernel(FK._tiles_kernel, dict(
            factor_partials=factor_partials, skip=skip, gscale=grad_scale, sign=h.sign,
            DTYPE=dtype, HAS_GSCALE=grad_scale is not None, TILE_C=tile_c,
            S_ROWS=max(1, S_BLOCK // tile_c), num_warps=launch.NUM_WARPS),
            blocks=True, aligned=False),
        launch.Kernel(FK._combine_kernel, dict(
            factor_partials=factor_partials, factors=factors, skip=skip, beta2=h.beta2,
            DTYPE=dtype,
            INTERPRET=launch.INTERPRET, C_BLOCK=C_BLOCK, num_warps=launch.NUM_WARPS),
            blocks=True, aligned=False)])


@torch.library.triton_op("fadam_fused::triton_fadafactor_phase_a", mutates_args=PHASE_A_MUTATES,
                         schema=op_contract.FADAFACTOR_PHASE_A_SCHEMA)
def triton_fadafactor_phase_a(
    params: list[Tensor], grads: list[Tensor], factors: Tensor, partials: Tensor,
    grad_scale: Optional[Tensor], *, eps: float, p: float, clip: float, maximize: bool,
    chunk_size: int, fuse_one_chunk: bool,
) -> None:
    """Phase A: per-chunk float64 (sum ghat^2, sum w^2) into ``partials`` with f from
    ``factors``; nothing without clipping (phase S has checked the gradients)."""
    # (No FIM decay here: host_scalars gets a neutral beta2.)
    call = _Call("fadam_fused::triton_fadafactor_phase_a", "A", params, dict(grads=grads),
                 dict(factors=factors, partials=partials), None, grad_scale, None,
                 op_contract.host_scalars(beta2=0.0, eps=eps, p=p, clip=clip, maximize=maximize),
                 p=p, chunk_size=chunk_size, fuse=bool(fuse_one_chunk))
    if params and call.scalars.clip > 0:
        launch.run(call, [call.element_kernel(FK._phase_a_kernel)])


@torch.library.triton_op("fadam_fused::triton_fadafactor_phase_b", mutates_args=PHASE_B_MUTATES,
                         schema=op_contract.FADAFACTOR_PHASE_B_SCHEMA)
def triton_fadafactor_phase_b(
    params: list[Tensor], grads: list[Tensor], fim_rows: list[Tensor], fim_cols: list[Tensor],
    momentums: list[Tensor], steps: list[Tensor], factors: Tensor, partials: Tensor,
    skip: Tensor, grad_scale: Optional[Tensor], lr_tensor: Optional[Tensor], *, lr: float,
    beta1: float, eps: float, p: float, clip: float, weight_decay: float, maximize: bool,
    chunk_size: int, fuse_one_chunk: bool, rounding: Optional[Sequence[int]] = None,
) -> None:
    """Phase B: unless skip != 0, the FAdam update of momentums and params with f from
    ``factors`` (a bfloat16 one stochastically rounded with a `rounding` list), and the new R
    and C copied into fim_rows / fim_cols."""
    call = _Call("fadam_fused::triton_fadafactor_phase_b", "B", params,
                 dict(grads=grads, fim_rows=fim_rows, fim_cols=fim_cols, momentums=momentums,
                      steps=steps),
                 dict(factors=factors, partials=partials), skip, grad_scale, lr_tensor,
                 op_contract.host_scalars(beta2=0.0, eps=eps, p=p, clip=clip, maximize=maximize,
                                          lr=lr, beta1=beta1, weight_decay=weight_decay),
                 p=p, chunk_size=chunk_size, fuse=bool(fuse_one_chunk), rounding=rounding)
    if not params:
        return
    h = call.scalars
    launch.run(call, [call.element_kernel(
        FK._phase_b_kernel, skip=skip, lr_ptr=lr_tensor, lr=h.lr, beta1=h.beta1,
        omb1=h.one_minus_beta1, clip=h.clip, wd=h.weight_decay,
        fuse_one_chunk=bool(fuse_one_chunk), HAS_LR=lr_tensor is not None,
        SLOT_BLOCK=launch.SLOT_BLOCK, **call.sr.kernel_args())])
