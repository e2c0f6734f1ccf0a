"""Loads the compiled extension fadam_fused._C once, and remembers why it could not be loaded.

A missing or broken build is reported once, at import, with the original ImportError and how to
fix it, and the package keeps working on the reference backend.
The results are plain module constants so that torch.compile reads them instead of tracing the
import and the dispatcher queries.
"""

from __future__ import annotations

import warnings

import torch

from . import op_contract  # noqa: F401  (defines the ops whose kernels _C registers)

_BUILD_HINT = (
    "Build it with `pip install --no-build-isolation -e .` in the fadam_fused checkout (set "
    "FORCE_CUDA=1 to include the CUDA kernels without a visible GPU), or run `make test`."
)


def _load() -> str | None:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.fadam_fused.*)
    except ImportError as exc:
        return f"fadam_fused._C could not be imported ({exc}). {_BUILD_HINT}"
    return None


# None when fadam_fused._C is loaded, else the reason it is not.
LOAD_ERROR: str | None = _load()
if LOAD_ERROR is not None:
    warnings.warn(f"{LOAD_ERROR} Falling back to backend='reference'.", RuntimeWarning, stacklevel=2)

# The dispatch keys ("CPU", "CUDA") the extension has kernels for.
KERNELS: frozenset[str] = frozenset(
    key for key in ("CPU", "CUDA")
    if LOAD_ERROR is None
    and torch._C._dispatch_has_kernel_for_dispatch_key("fadam_fused::fadam_phase_a", key)
)

