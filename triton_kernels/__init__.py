"""Triton kernels of fadam_fused (backend="triton"), installed as fadam_fused.triton_kernels.

Exports the two ops of the two-phase fused step, with exactly the semantics of the C++ ops
([note: the two-phase op contract] in csrc/fadam_ops.h; SPEC.md section 3):

    phase_a(params, grads, fims, steps, partials, skip, grad_scale, *,
            beta2, eps, p, maximize, chunk_size, fuse_one_chunk)
    phase_b(params, grads, fims, momentums, steps, partials, skip, grad_scale, lr_tensor, *,
            lr, beta1, beta2, eps, p, clip, weight_decay, maximize, chunk_size, fuse_one_chunk)

and CHUNK_SIZE, the elements per chunk (the partial-sum slot unit) the optimizer should pass back
as `chunk_size`. Each call is one kernel launch per phase for the whole tensor list, registered as
torch.ops.fadam_fused.triton_phase_{a,b} with torch.library.triton_op, so torch.compile traces it.

On CUDA tensors the kernels are compiled by Triton; CPU tensors run only in Triton's interpreter
(TRITON_INTERPRET=1 set before Triton is first imported), which is how the tests run without a GPU.
"""

from ._ops import BLOCK, CHUNK_SIZE, NUM_WARPS, SLOT_BLOCK, nchunks_of, triton_phase_a, triton_phase_b

# The two ops under the names of the contract's wrappers (tests call them directly).
phase_a, phase_b = triton_phase_a, triton_phase_b

__all__ = ["CHUNK_SIZE", "phase_a", "phase_b", "triton_phase_a", "triton_phase_b", "nchunks_of", "BLOCK", "NUM_WARPS", "SLOT_BLOCK"]
