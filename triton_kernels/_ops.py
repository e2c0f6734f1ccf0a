"""FAdam's Triton ops: fadam_fused::triton_phase_a / triton_phase_b, registered with
torch.library.triton_op and launched through launch.py (the checks, the metadata tables, the launch
helper and the tuning constants both optimizers share).

The ops implement [note: the two-phase op contract] (fadam_fused/op_contract.py) exactly, like the
C++ fadam_phase_a / fadam_phase_b: the same schemas, chunk and slot arithmetic, and host step
scalars (op_contract.host_scalars, the Python twin of the C++ helper, so every backend rounds
alike). FAdam's own part of a launch is here: its operands, table rows (ROW_* in _kernels.py) and
programs (`_Call`), and the kernels' argument lists.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import op_contract
from . import _kernels as K
from . import launch

# The interpreter flag under the name fadam_fused.backends reads (launch.INTERPRET is the flag).
_INTERPRET = launch.INTERPRET


def _has_program(phase: str, numel: int, fuse: bool, clipping: bool) -> bool:
    """Whether a tensor of `numel` elements gets programs. Phase B has nothing to do on an empty
    tensor. Phase A gives an empty tensor one program only to write its (zero) slot, which it
    does when it reduces: clipping on, and the tensor not left to phase B (fuse_one_chunk)."""
    if numel > 0:
        return True
    return phase == "A" and clipping and not fuse


class _Call(launch.Launch):
    """One call of triton_phase_a (momentums None) or triton_phase_b, checked per call; one
    program per (tensor, chunk), chunk c of tensor i writing or reading slot slots[i] + c."""

    no_operands = dict(p_in=None, g_in=None, f_in=None, step_in=None, m_in=None, numel_in=0,
                       slot_in=0)

    def __init__(self, op: str, phase: str, params: Sequence[Tensor], grads: Sequence[Tensor],
                 fims: Sequence[Tensor], steps: Sequence[Tensor],
                 momentums: Optional[Sequence[Tensor]], partials: Tensor, skip: Tensor,
                 grad_scale: Optional[Tensor], lr_tensor: Optional[Tensor],
                 scalars: op_contract.HostScalars, *, p: float, chunk_size: int, fuse: bool,
                 rounding: Optional[Sequence[int]] = None):
        lists = dict(grads=grads, fims=fims, steps=steps)
        if momentums is not None:
            lists["momentums"] = momentums
        self.device = launch.check_call(op, params, skip, chunk_size, skip=skip,
                                        grad_scale=grad_scale, lr_tensor=lr_tensor,
                                        lengths=lists)
        launch.check_partials(op, partials, self.device)
        self.op, self.phase, self.params, self.lists = op, phase, params, lists
        self.partials, self.skip, self.grad_scale = partials, skip, grad_scale
        self.scalars, self.p, self.chunk_size, self.fuse = scalars, p, chunk_size, fuse
        self.clipping = scalars.clip > 0
        # Address rows in the kernels' order: P, G, F, STEP, (NUMEL, SLOT,) M.
        self.operands = (params, grads, fims, steps) + (() if momentums is None else (momentums,))
        self.owners = steps
        self.numels = [t.numel() for t in params]
        self.key = (chunk_size, fuse, self.clipping, tuple(self.numels))
        self.sizes = (partials.size(0),)
        self.sr = launch.Rounding(op, params, momentums, rounding, self.device)
        if momentums is not None:  # phase B: its kernel takes the rounding rows
            self.no_operands = dict(self.no_operands, rnd_in=None)

    @functools.cached_property
    def slots(self) -> list[int]:
        return op_contract.slot_offsets(self.numels, self.chunk_size)

    def check(self) -> None:
        op, device, params = self.op, self.device, self.params
        launch.check_params(op, params, op_contract.is_dense, "dense and non-overlapping")
        wants = dict(grads=params[0].dtype, fims=torch.float32, momentums=self.sr.mdtype)
        for i, p in enumerate(params):
            for name, want in wants.items():
                if name in self.lists:
                    launch.check_operand(op, name, i, self.lists[name][i], device, want, p.shape,
                                         p.stride())
        launch.check_steps(op, self.lists["steps"], device)
        launch.check_partials(op, self.partials, device, self.slots[-1], self.chunk_size)

    def programs(self) -> list[tuple[int]]:
        return [(self.slots[i + 1] - self.slots[i]
                 if _has_program(self.phase, numel, self.fuse, self.clipping) else 0,)
                for i, numel in enumerate(self.numels)]

    def tensor_operands(self, i: int) -> dict:
        m = self.lists.get("momentums")
        out = dict(p_in=self.params[i], g_in=self.lists["grads"][i],
                   f_in=self.lists["fims"][i], step_in=self.lists["steps"][i],
                   m_in=None if m is None else m[i], numel_in=self.numels[i],
                   slot_in=self.slots[i])
        if m is not None:
            out["rnd_in"] = self.sr.row(i)
        return out

    def table(self, addresses: list[list[int]]) -> launch.Rows:
        # Element operands (not the step counters, read as scalars) decide the vectorised path.
        return launch.Rows(addresses[:4] + [self.numels, self.slots[:-1]] + addresses[4:],
                           (self.slots[-1],),
                           launch.aligned(self.chunk_size, self.params[0].dtype.itemsize,
                                          addresses[:3] + addresses[4:]))

    def kernel(self, fn, **args) -> launch.Kernel:
        """`fn` with `args` and what both phases pass: the buffers, the host scalars of the FIM
        and the clip, the fused-tensor rule and the constexprs of the dtype and the p path."""
        h = self.scalars
        return launch.Kernel(fn, dict(
            partials=self.partials, skip=self.skip, gscale=self.grad_scale, beta2=h.beta2,
            p=h.p, eps_p=h.eps_p, clip=h.clip, sign=h.sign, chunk_size=self.chunk_size,
            fuse_one_chunk=self.fuse, **args,
            DTYPE=launch.tl_dtype(self.params[0].dtype), HAS_GSCALE=self.grad_scale is not None,
            SQRT=(self.p == 0.5), INTERPRET=launch.INTERPRET, BLOCK=launch.block_for(self.p),
            num_warps=launch.NUM_WARPS))


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
    call = _Call("fadam_fused::triton_phase_a", "A", params, grads, fims, steps, None, partials,
                 skip, grad_scale, None,
                 op_contract.host_scalars(beta2=beta2, eps=eps, p=p, clip=clip, maximize=maximize),
                 p=p, chunk_size=chunk_size, fuse=bool(fuse_one_chunk))
    if params:
        launch.run(call, [call.kernel(K._phase_a_kernel)])


@torch.library.triton_op("fadam_fused::triton_phase_b", mutates_args=op_contract.PHASE_B_MUTATES,
                         schema=op_contract.PHASE_B_SCHEMA)
def triton_phase_b(
    params: list[Tensor], grads: list[Tensor], fims: list[Tensor], momentums: list[Tensor],
    steps: list[Tensor], partials: Tensor, skip: Tensor, grad_scale: Optional[Tensor],
    lr_tensor: Optional[Tensor], *, lr: float, beta1: float, beta2: float, eps: float, p: float,
    clip: float, weight_decay: float, maximize: bool, chunk_size: int, fuse_one_chunk: bool,
    rounding: Optional[Sequence[int]] = None,
) -> None:
    """Phase B: unless skip != 0, the FAdam update of fims, momentums and params; a bfloat16
    param or momentum stochastically rounded with a `rounding` list ([note: stochastic
    rounding])."""
    h = op_contract.host_scalars(beta2=beta2, eps=eps, p=p, clip=clip, maximize=maximize, lr=lr,
                                 beta1=beta1, weight_decay=weight_decay)
    call = _Call("fadam_fused::triton_phase_b", "B", params, grads, fims, steps, momentums,
                 partials, skip, grad_scale, lr_tensor, h, p=p, chunk_size=chunk_size,
                 fuse=bool(fuse_one_chunk), rounding=rounding)
    if params:
        launch.run(call, [call.kernel(
            K._phase_b_kernel, lr_ptr=lr_tensor, lr=h.lr, beta1=h.beta1, omb1=h.one_minus_beta1,
            wd=h.weight_decay, HAS_LR=lr_tensor is not None, SLOT_BLOCK=launch.SLOT_BLOCK,
            **call.sr.kernel_args())])
