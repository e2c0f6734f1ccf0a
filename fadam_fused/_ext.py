"""Loads the compiled extension fadam_fused._C once, and remembers why it could not be loaded.

A missing or broken build is reported once, with the original ImportError and how to fix it, and
the package keeps working on the reference backend (SPEC section 6, build hygiene).
"""

from __future__ import annotations

import functools
import warnings

import torch

_BUILD_HINT = (
    "Build it with `pip install --no-build-isolation -e .` in the fadam_fused checkout (set "
    "FORCE_CUDA=1 to include the CUDA kernels without a visible GPU), or run `make test`."
)


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when fadam_fused._C is loaded, else the reason it is not (warned about once)."""
    try:
        from . import _C  # noqa: F401  (registers torch.ops.fadam_fused.*)
    except ImportError as exc:
        reason = f"fadam_fused._C could not be imported ({exc}). {_BUILD_HINT}"
        warnings.warn(f"{reason} Falling back to backend='reference'.", RuntimeWarning, stacklevel=3)
        return reason
    return None


def has_kernel(dispatch_key: str) -> bool:
    """Whether the extension has kernels for a dispatch key ("CPU" or "CUDA")."""
    if load_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fadam_fused::fadam_phase_a", dispatch_key)
