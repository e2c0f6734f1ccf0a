"""Python face of the C++ ops torch.ops.fadam_fused.fadam_phase_{a,b}: fake kernels and wrappers.

The schemas live in csrc/fadam_ops.cpp and the argument contract in csrc/fadam_ops.h ([note: the
two-phase op contract]). Both ops only mutate their `(a!)` arguments and return nothing, so their
fake kernels have nothing to compute: shapes never change.
"""

from __future__ import annotations

import torch

from . import _ext

if _ext.LOAD_ERROR is None:  # fadam_fused._C is loaded and has defined the ops

    @torch.library.register_fake("fadam_fused::fadam_phase_a")
    def _phase_a_fake(params, grads, fims, steps, partials, skip, grad_scale, *, beta2, eps, p,
                      maximize, chunk_size, fuse_one_chunk) -> None:
        return None

    @torch.library.register_fake("fadam_fused::fadam_phase_b")
    def _phase_b_fake(params, grads, fims, momentums, steps, partials, skip, grad_scale, lr_tensor,
                      *, lr, beta1, beta2, eps, p, clip, weight_decay, maximize, chunk_size,
                      fuse_one_chunk) -> None:
        return None


def phase_a(params, grads, fims, steps, partials, skip, grad_scale, *, beta2, eps, p, maximize,
            chunk_size, fuse_one_chunk):
    torch.ops.fadam_fused.fadam_phase_a(
        params, grads, fims, steps, partials, skip, grad_scale, beta2=beta2, eps=eps, p=p,
        maximize=maximize, chunk_size=chunk_size, fuse_one_chunk=fuse_one_chunk)


def phase_b(params, grads, fims, momentums, steps, partials, skip, grad_scale, lr_tensor, *, lr,
            beta1, beta2, eps, p, clip, weight_decay, maximize, chunk_size, fuse_one_chunk):
    torch.ops.fadam_fused.fadam_phase_b(
        params, grads, fims, momentums, steps, partials, skip, grad_scale, lr_tensor, lr=lr,
        beta1=beta1, beta2=beta2, eps=eps, p=p, clip=clip, weight_decay=weight_decay,
        maximize=maximize, chunk_size=chunk_size, fuse_one_chunk=fuse_one_chunk)
