"""Loads the compiled extension fadam_fused._C once, and remembers why it could not be loaded.

A missing or broken build is reported once, at import, with the original ImportError and how to
fix it, and the package keeps working on the reference backend.
The results are plain module constants so that torch.compile reads them instead of tracing the
import and the dispatcher queries.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path

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
        here = os.path.dirname(os.path.abspath(__file__))
        if not any(os.path.exists(os.path.join(here, "_C" + suffix))
                   for suffix in importlib.machinery.EXTENSION_SUFFIXES):
            # Python's own message for a missing submodule of a package that is still importing
            # blames "a circular import", which sends people looking for the wrong thing.
            return (f"fadam_fused._C could not be imported: it is not built (no "
                    f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]} in {here}). {_BUILD_HINT}")
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


# FADAM_CUDA_EMULATE=1 (tests only): backend="cuda" runs the CUDA kernels compiled for the CPU
# with HIP-CPU (fadam_fused._C_cuda_emulated, [note: one CUDA source, two compilers] in
# csrc/cuda/launch.h) on CPU tensors, as backend="triton" runs Triton's interpreter under
# TRITON_INTERPRET=1. Read once, at import, like TRITON_INTERPRET.
CUDA_EMULATE: bool = os.environ.get("FADAM_CUDA_EMULATE", "0").lower() in ("1", "true", "yes", "on")

_EMULATED_HINT = (
    "Build it with `FADAM_HIP_CPU=../shared/third_party/hip-cpu python setup.py build_ext "
    "--inplace` (FADAM_HIP_CPU names the HIP-CPU folder; `make test` sets it when the folder "
    "exists), or unset FADAM_CUDA_EMULATE."
)


def _load_emulated() -> str | None:
    if LOAD_ERROR is not None:
        return LOAD_ERROR
    op_contract.define_phase_ops(*op_contract.EMULATED_CUDA_OPS)  # the build registers kernels only
    op_contract.define_fadafactor_ops(op_contract.EMULATED_CUDA_FADAFACTOR)
    op_contract.define_adafisher_ops(op_contract.EMULATED_CUDA_ADAFISHER)
    try:
        from . import _C_cuda_emulated  # noqa: F401  (kernels of torch.ops.fadam_fused.cuda_emulated_*)
    except ImportError as exc:
        return (f"FADAM_CUDA_EMULATE=1 but fadam_fused._C_cuda_emulated could not be imported "
                f"({exc}). {_EMULATED_HINT}")
    return None


# None when the emulated CUDA kernels are loaded; else why not (always set without
# FADAM_CUDA_EMULATE=1: the module is then never imported).
EMULATED_LOAD_ERROR: str | None = (_load_emulated() if CUDA_EMULATE
                                   else "FADAM_CUDA_EMULATE is not set")


@functools.lru_cache(maxsize=None)
def triton_kernels():
    """(fadam_fused.triton_kernels, None), or (None, why it cannot be imported)."""
    try:
        try:
            # import_module, not `from . import`: that turns a missing submodule into a plain
            # ImportError ("cannot import name"), and the source-tree fallback never ran.
            module = importlib.import_module(f"{__package__}.triton_kernels")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.triton_kernels":
                raise
            module = _source_tree_triton_kernels()
    except ImportError as exc:
        return None, f"Triton is not usable here ({exc}); install it with `pip install triton`"
    return module, None


def _source_tree_triton_kernels():
    """Imports ../triton_kernels as fadam_fused.triton_kernels.

    An installed package has it in place (setup.py's package_dir). In a source checkout whose
    fadam_fused/ comes first on sys.path (pytest from the repo root, `setup.py build_ext
    --inplace`), the subpackage is not inside fadam_fused/, so load it from beside it.
    """
    root = Path(__file__).resolve().parent.parent / "triton_kernels"
    name = f"{__package__}.triton_kernels"
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    if spec is None or not (root / "__init__.py").exists():
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
