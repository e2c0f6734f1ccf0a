"""Triton kernels of fadam_fused (backend="triton"), installed as fadam_fused.triton_kernels.

Exports the two ops of the two-phase fused step, with exactly the semantics and schemas of the C++
ops ([note: the two-phase op contract] in fadam_fused/op_contract.py; docs/design.md, section 3):

    phase_a(params, grads, fims, steps, partials, skip, grad_scale, *,
            beta2, eps, p, clip, maximize, chunk_size, fuse_one_chunk)
    phase_b(params, grads, fims, momentums, steps, partials, skip, grad_scale, lr_tensor, *,
            lr, beta1, beta2, eps, p, clip, weight_decay, maximize, chunk_size, fuse_one_chunk)

The chunk size to pass is op_contract.CHUNK_SIZE["triton"]. Each call is one kernel launch per
phase for the whole tensor list, registered as torch.ops.fadam_fused.triton_phase_{a,b} with
torch.library.triton_op, so torch.compile traces it.

On CUDA tensors the kernels are compiled by Triton; CPU tensors run only in Triton's interpreter
(TRITON_INTERPRET=1 set before Triton is first imported), which is how the tests run without a GPU.
INTERPRET says which of the two this process has. Both optimizers' ops launch through `launch`
(checks, metadata tables, the launch helper, tuning constants).

Of fadam_fused this package imports op_contract only.
"""

from . import launch
from ._ops import triton_phase_a, triton_phase_b
from .launch import BLOCK, INTERPRET, NUM_WARPS, SLOT_BLOCK
# FAdafactor's three ops ([note: the FAdafactor op contract] in fadam_fused/op_contract.py),
# registered as torch.ops.fadam_fused.triton_fadafactor_phase_{s,a,b}.
from ._fadafactor_ops import (triton_fadafactor_phase_a, triton_fadafactor_phase_b,
                              triton_fadafactor_phase_s)

# AdaFisher's two ops ([note: the AdaFisher op contract] in fadam_fused/op_contract.py),
# registered as torch.ops.fadam_fused.triton_nonfinite_check / triton_adafisher_update; their
# presence here is what backends.adafisher_available("triton") looks for.
from ._adafisher_ops import triton_adafisher_update, triton_nonfinite_check

# The two ops under the names of the contract's wrappers (tests call them directly).
phase_a, phase_b = triton_phase_a, triton_phase_b

__all__ = ["phase_a", "phase_b", "triton_phase_a", "triton_phase_b", "BLOCK", "NUM_WARPS",
           "SLOT_BLOCK", "INTERPRET", "launch", "triton_fadafactor_phase_s",
           "triton_fadafactor_phase_a", "triton_fadafactor_phase_b", "triton_nonfinite_check",
           "triton_adafisher_update"]
