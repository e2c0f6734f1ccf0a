"""Python face of the C++ ops torch.ops.fadam_fused.fadam_phase_{a,b}: fake kernels and wrappers.

The schemas live in csrc/fadam_ops.h (FADAM_PHASE_A_SCHEMA) and the argument contract in the same
file ([note: the two-phase op contract]). Both ops only mutate their `(a!)` arguments and return
nothing, so their fake kernels have nothing to compute: shapes never change. The emulated CUDA
build (FADAM_CUDA_EMULATE=1) defines the same two ops as cuda_emulated_phase_{a,b}.
"""

from __future__ import annotations

import torch

from . import _ext


_FAKES: set[str] = set()


def register_fakes(name_a: str, name_b: str) -> None:
    """Registers the fake kernels of one pair of ops with the two schemas (once)."""
    if name_a in _FAKES:
        return
    _FAKES.add(name_a)

    @torch.library.register_fake(f"fadam_fused::{name_a}")
    def _phase_a_fake(params, grads, fims, steps, partials, skip, grad_scale, *, beta2, eps, p,
                      clip, maximize, chunk_size, fuse_one_chunk) -> None:
        return None

    @torch.library.register_fake(f"fadam_fused::{name_b}")
    def _phase_b_fake(params, grads, fims, momentums, steps, partials, skip, grad_scale, lr_tensor,
                      *, lr, beta1, beta2, eps, p, clip, weight_decay, maximize, chunk_size,
                      fuse_one_chunk) -> None:
        return None


EMULATED_OPS = ("cuda_emulated_phase_a", "cuda_emulated_phase_b")

if _ext.LOAD_ERROR is None:  # fadam_fused._C is loaded and has defined the ops
    register_fakes("fadam_phase_a", "fadam_phase_b")
if _ext.EMULATED_LOAD_ERROR is None:
    register_fakes(*EMULATED_OPS)


def _wrappers(name_a: str, name_b: str):
    def phase_a(params, grads, fims, steps, partials, skip, grad_scale, *, beta2, eps, p, clip,
                maximize, chunk_size, fuse_one_chunk):
        getattr(torch.ops.fadam_fused, name_a)(
            params, grads, fims, steps, partials, skip, grad_scale, beta2=beta2, eps=eps, p=p,
            clip=clip, maximize=maximize, chunk_size=chunk_size, fuse_one_chunk=fuse_one_chunk)

    def phase_b(params, grads, fims, momentums, steps, partials, skip, grad_scale, lr_tensor, *,
                lr, beta1, beta2, eps, p, clip, weight_decay, maximize, chunk_size,
                fuse_one_chunk):
        getattr(torch.ops.fadam_fused, name_b)(
            params, grads, fims, momentums, steps, partials, skip, grad_scale, lr_tensor, lr=lr,
            beta1=beta1, beta2=beta2, eps=eps, p=p, clip=clip, weight_decay=weight_decay,
            maximize=maximize, chunk_size=chunk_size, fuse_one_chunk=fuse_one_chunk)

    return phase_a, phase_b


phase_a, phase_b = _wrappers("fadam_phase_a", "fadam_phase_b")
# The CUDA kernels compiled for the CPU (backend="cuda" under FADAM_CUDA_EMULATE=1).
emulated_cuda_phase_a, emulated_cuda_phase_b = _wrappers(*EMULATED_OPS)
