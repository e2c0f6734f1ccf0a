"""Helpers of tests/test_triton.py: importing the Triton backend from a source checkout, and a
multi-step driver of the two ops next to the oracle (fadam_fused.reference).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # a source checkout run as a script: make `fadam_fused` importable
    sys.path.insert(0, str(ROOT))


def triton_kernels():
    """fadam_fused.triton_kernels, imported the way the optimizer imports it (installed, or from
    ./triton_kernels in a source checkout: fadam_fused.backends)."""
    from fadam_fused import backends

    module, reason = backends._triton_module()
    if module is None:
        raise ImportError(reason)
    return module


HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, clip=1.0, weight_decay=1e-2, p=0.5,
             maximize=False)


class Run:
    """Parameters and state of one trajectory, stepped by the Triton ops or by the oracle."""

    def __init__(self, init, dtype, state_dtype=torch.float32, device="cpu"):
        self.params = [t.to(device=device, dtype=dtype).clone() for t in init]
        self.fims = [torch.ones(t.shape, dtype=state_dtype, device=device) for t in init]
        self.moms = [torch.zeros(t.shape, dtype=state_dtype, device=device) for t in init]
        self.steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in init]
        self.device = device

    def _active(self, grads):
        idx = [i for i, g in enumerate(grads) if g is not None]
        pick = lambda lst: [lst[i] for i in idx]  # noqa: E731
        return idx, pick

    def step_triton(self, grads, *, chunk_size, fuse_one_chunk=True, grad_scale=None,
                    lr_tensor=None, found_inf=None, **hyper):
        """One step the way the optimizer drives the backend: increment the steps, zero (or seed)
        skip, phase A, phase B, then undo the increment if the step was skipped. Returns skip."""
        tk = triton_kernels()
        h = {**HYPER, **hyper}
        idx, pick = self._active(grads)
        params, fims, moms, steps = pick(self.params), pick(self.fims), pick(self.moms), pick(
            self.steps)
        gs = [grads[i].to(self.device) for i in idx]
        for s in steps:
            s.add_(1)
        n_slots = sum(tk.nchunks_of(p.numel(), chunk_size) for p in params)
        partials = torch.full((n_slots, 2), float("nan"), dtype=torch.float64, device=self.device)
        skip = torch.zeros(1, dtype=torch.float32, device=self.device)
        if found_inf is not None:
            skip.copy_(found_inf.reshape(1))
        tk.phase_a(params, gs, fims, steps, partials, skip, grad_scale, beta2=h["beta2"],
                   eps=h["eps"], p=h["p"], clip=h["clip"] or 0.0, maximize=h["maximize"],
                   chunk_size=chunk_size, fuse_one_chunk=fuse_one_chunk)
        tk.phase_b(params, gs, fims, moms, steps, partials, skip, grad_scale, lr_tensor,
                   lr=h["lr"], beta1=h["beta1"], beta2=h["beta2"], eps=h["eps"], p=h["p"],
                   clip=h["clip"] or 0.0, weight_decay=h["weight_decay"], maximize=h["maximize"],
                   chunk_size=chunk_size, fuse_one_chunk=fuse_one_chunk)
        for s in steps:
            s.sub_(skip.reshape(()))
        return skip

    def step_reference(self, grads, *, upcast, grad_scale=None, lr_tensor=None, found_inf=None,
                       **hyper):
        from fadam_fused.reference import fadam_reference

        h = {**HYPER, **hyper}
        if lr_tensor is not None:
            h["lr"] = lr_tensor.reshape(())
        idx, pick = self._active(grads)
        gs = [grads[i].to(device=self.device) for i in idx]
        if upcast:
            gs = [g.to(self.params[i].dtype) for g, i in zip(gs, idx)]
        return fadam_reference(pick(self.params), gs, pick(self.moms), pick(self.fims),
                               pick(self.steps), grad_scale=grad_scale, found_inf=found_inf,
                               upcast=upcast, **h)


def trajectories(init, grads_by_step, dtype, *, chunk_size, fuse_one_chunk=True, per_step=None,
                 device="cpu", **hyper):
    """Runs the Triton ops (storage `dtype`, on `device`), the oracle at the same precision and
    the float64 oracle (both on CPU) over the same gradients. `per_step(k)` may return extra
    keyword arguments of step k (grad_scale, lr_tensor, found_inf) on `device`. Returns the three
    Run objects."""
    fast = Run(init, dtype, device=device)
    same = Run(init, dtype)
    ref64 = Run(init, torch.float64, state_dtype=torch.float64)
    for k, grads in enumerate(grads_by_step):
        extra = per_step(k) if per_step else {}
        fast.step_triton(grads, chunk_size=chunk_size, fuse_one_chunk=fuse_one_chunk, **extra,
                         **hyper)
        extra = {k: v.cpu() for k, v in extra.items()}
        same.step_reference(grads, upcast=False, **extra, **hyper)
        ref64.step_reference(grads, upcast=True, **extra, **hyper)
    return fast, same, ref64
