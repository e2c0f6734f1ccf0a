"""AdaFisher's Triton ops: fadam_fused::triton_nonfinite_check and triton_adafisher_update with
the schemas of [note: the AdaFisher op contract] (fadam_fused/op_contract.py), registered with
torch.library.triton_op and launched through launch.py, as FAdam's and FAdafactor's.

One launch per op per call, whatever the number of tensors: one program per (tensor, chunk) of
op_contract.CHUNK_SIZE["triton"] elements (the check takes no chunk_size and uses it too); an
empty tensor has none. The update's table ([note: Triton metadata tables] in launch.py) holds
each tensor's addresses, numel and (s_offset, h_offset, cols), so a steady-state step finds it
built; it is rebuilt when the factor layout changes (a fold does not change it: the factors
tensor is read through its address argument).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import op_contract
from . import _adafisher_kernels as AK
from . import launch

# Columns and rows index in int32 inside a chunk (_adafisher_kernels.py).
MAX_COLS = 1 << 30


class _Check(launch.Launch):
    """One call of triton_nonfinite_check: programs over the gradients' chunks."""

    no_operands = dict(g_in=None, numel_in=0)

    def __init__(self, op: str, grads: Sequence[Tensor], skip: Tensor,
                 grad_scale: Optional[Tensor]):
        self.chunk_size = op_contract.CHUNK_SIZE["triton"]
        self.device = launch.check_call(op, grads, skip, self.chunk_size, skip=skip,
                                        grad_scale=grad_scale)
        self.op, self.params = op, grads
        self.operands = (grads,)
        # Gradients own no table ([note: Triton metadata tables]): the LRU keeps it, and a step
        # whose gradients come back at the same addresses finds it again.
        self.owners = ()
        self.numels = [t.numel() for t in grads]
        self.key = (self.chunk_size, tuple(self.numels))
        self.sizes = ()

    def check(self) -> None:
        launch.check_params(self.op, self.params, op_contract.is_dense,
                            "dense and non-overlapping")

    def programs(self) -> list[tuple[int]]:
        return [(op_contract.nchunks_of(n, self.chunk_size) if n else 0,) for n in self.numels]

    def tensor_operands(self, i: int) -> dict:
        return dict(g_in=self.params[i], numel_in=self.numels[i])

    def table(self, addresses: list[list[int]]) -> launch.Rows:
        rows = addresses + [self.numels]
        assert len(rows) == AK.N_CHECK_ROWS
        return launch.Rows(rows, (), launch.aligned(self.chunk_size, self.params[0].dtype.itemsize,
                                                    addresses))


class _Update(launch.Launch):
    """One call of triton_adafisher_update, checked per call."""

    no_operands = dict(p_in=None, g_in=None, m_in=None, step_in=None, numel_in=0, s_in=0,
                       h_in=0, cols_in=0, rnd_in=None)

    def __init__(self, op: str, params: Sequence[Tensor], grads: Sequence[Tensor],
                 momentums: Sequence[Tensor], steps: Sequence[Tensor], factors: Tensor,
                 factor_layout: Sequence[int], skip: Tensor, grad_scale: Optional[Tensor],
                 lr_tensor: Optional[Tensor], chunk_size: int, rounding: Sequence[int]):
        lists = dict(grads=grads, momentums=momentums, steps=steps)
        self.device = launch.check_call(op, params, factors, chunk_size, skip=skip,
                                        grad_scale=grad_scale, lr_tensor=lr_tensor,
                                        lengths=lists)
        # A bfloat16 theta or momentum stochastically rounded ([note: stochastic rounding]).
        self.sr = launch.Rounding(op, params, momentums, rounding, self.device)
        if len(factor_layout) != 3 * len(params):
            launch.fail(op, f"factor_layout must hold 3 integers per param ({3 * len(params)}), "
                            f"got {len(factor_layout)}")
        self.op, self.params, self.lists, self.factors = op, params, lists, factors
        self.chunk_size = chunk_size
        self.layout = [tuple(int(x) for x in factor_layout[3 * i:3 * i + 3])
                       for i in range(len(params))]
        self.operands = (params, grads, momentums, steps)
        self.owners = steps
        self.numels = [t.numel() for t in params]
        self.key = (chunk_size, tuple(self.numels), tuple(self.layout))
        self.sizes = (factors.numel(),)

    def check(self) -> None:
        op, device, params = self.op, self.device, self.params
        launch.check_params(op, params, op_contract.is_dense, "dense and non-overlapping")
        wants = dict(grads=params[0].dtype, momentums=self.sr.mdtype)
        for i, p in enumerate(params):
            for name, want in wants.items():
                launch.check_operand(op, name, i, self.lists[name][i], device, want, p.shape,
                                     p.stride())
        launch.check_steps(op, self.lists["steps"], device)
        f = self.factors
        if f.device != device or f.dtype != torch.float32 or f.dim() != 1 or not f.is_contiguous():
            launch.fail(op, f"factors must be a contiguous 1-dim float32 tensor on {device}")
        size = f.numel()
        for i, ((s_off, h_off, cols), numel) in enumerate(zip(self.layout, self.numels)):
            if cols < 0 or cols >= MAX_COLS:
                launch.fail(op, f"factor_layout gives params[{i}] {cols} columns (0 to "
                                f"{MAX_COLS - 1})")
            if cols == 0:
                continue
            if numel % cols:
                launch.fail(op, f"params[{i}] has {numel} elements, not a whole number of rows "
                                f"of {cols} columns")
            rows = numel // cols
            if s_off < 0 or h_off < 0 or s_off + rows > size or h_off + cols > size:
                launch.fail(op, f"factor_layout of params[{i}] (S at {s_off}, {rows} rows; H at "
                                f"{h_off}, {cols} columns) reaches past factors ({size} "
                                "elements)")

    def programs(self) -> list[tuple[int]]:
        return [(op_contract.nchunks_of(n, self.chunk_size) if n else 0,) for n in self.numels]

    def tensor_operands(self, i: int) -> dict:
        s_off, h_off, cols = self.layout[i]
        return dict(p_in=self.params[i], g_in=self.lists["grads"][i],
                    m_in=self.lists["momentums"][i], step_in=self.lists["steps"][i],
                    numel_in=self.numels[i], s_in=s_off, h_in=h_off, cols_in=cols,
                    rnd_in=self.sr.row(i))

    def table(self, addresses: list[list[int]]) -> launch.Rows:
        rows = addresses + [self.numels] + [[lay[k] for lay in self.layout] for k in range(3)]
        assert len(rows) == AK.N_ROWS
        # The element operands (params, grads, momentums; not the steps, read as scalars).
        return launch.Rows(rows, self.sizes,
                           launch.aligned(self.chunk_size, self.params[0].dtype.itemsize,
                                          addresses[:3]))


@torch.library.triton_op("fadam_fused::triton_nonfinite_check", mutates_args=("skip",),
                         schema=op_contract.NONFINITE_CHECK_SCHEMA)
def triton_nonfinite_check(grads: list[Tensor], skip: Tensor,
                           grad_scale: Optional[Tensor]) -> None:
    """1.0 into ``skip`` when a scaled gradient's float32 square is not finite; reads grads."""
    call = _Check("fadam_fused::triton_nonfinite_check", grads, skip, grad_scale)
    if not grads:
        return
    launch.run(call, [launch.Kernel(AK._check_kernel, dict(
        skip=skip, gscale=grad_scale, chunk_size=call.chunk_size,
        DTYPE=launch.tl_dtype(grads[0].dtype), HAS_GSCALE=grad_scale is not None,
        BLOCK=launch.BLOCK, num_warps=launch.NUM_WARPS), blocks=True)])


@torch.library.triton_op("fadam_fused::triton_adafisher_update",
                         mutates_args=op_contract.ADAFISHER_UPDATE_MUTATES,
                         schema=op_contract.ADAFISHER_UPDATE_SCHEMA)
def triton_adafisher_update(
    params: list[Tensor], grads: list[Tensor], momentums: list[Tensor], steps: list[Tensor],
    factors: Tensor, factor_layout: list[int], skip: Tensor, grad_scale: Optional[Tensor],
    lr_tensor: Optional[Tensor], *, lr: float, beta: float, weight_decay: float, damping: float,
    decoupled: bool, maximize: bool, chunk_size: int, rounding: list[int],
) -> None:
    """Unless skip != 0, AdaFisher's (decoupled: AdaFisherW's) update of momentums and params,
    F from ``factors`` through ``factor_layout``; a bfloat16 param or momentum stochastically
    rounded with a `rounding` list ([note: stochastic rounding])."""
    call = _Update("fadam_fused::triton_adafisher_update", params, grads, momentums, steps,
                   factors, factor_layout, skip, grad_scale, lr_tensor, chunk_size, rounding)
    if not params:
        return
    f32 = op_contract.f32
    # The float64 oracle's float32 run rounds each Python scalar to float32 ([note: AdaFisher
    # math] in csrc/fadam_math.h); lr and beta stay float64 for lr / bc and bc.
    launch.run(call, [launch.Kernel(AK._update_kernel, dict(
        factors=factors, skip=skip, gscale=grad_scale, lr_ptr=lr_tensor, lr64=float(lr),
        beta64=float(beta), beta=f32(beta), omb=f32(1.0 - beta), wd=f32(weight_decay),
        damping=f32(damping), sign=-1.0 if maximize else 1.0, chunk_size=chunk_size,
        DTYPE=launch.tl_dtype(params[0].dtype), HAS_GSCALE=grad_scale is not None,
        HAS_LR=lr_tensor is not None, DECOUPLED=bool(decoupled), INTERPRET=launch.INTERPRET,
        BLOCK=launch.BLOCK, num_warps=launch.NUM_WARPS, **call.sr.kernel_args()), blocks=True)])
