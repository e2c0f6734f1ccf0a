"""The backends and the one helper that chooses among them.

Every fused backend implements the two ops of [note: the two-phase op contract]
(fadam_fused/op_contract.py): "cpu" and "cuda" are the C++ kernels behind
torch.ops.fadam_fused.fadam_phase_{a,b} (one schema, two dispatch keys); "triton" is
torch.ops.fadam_fused.triton_phase_{a,b}, registered with torch.library.triton_op in
fadam_fused.triton_kernels. "reference" is not a fused backend: it is the oracle of
fadam_fused.reference, one tensor at a time. Under FADAM_CUDA_EMULATE=1 (tests), "cuda" is
torch.ops.fadam_fused.cuda_emulated_phase_{a,b} (and cuda_emulated_fadafactor_phase_{s,a,b}): the
CUDA kernels compiled for the CPU, on CPU tensors ([note: one CUDA source, two compilers] in
csrc/cuda/launch.h).
"""

from __future__ import annotations

import functools
import importlib

import torch

from . import _ext, op_contract

BACKENDS = ("cuda", "triton", "cpu", "reference")

# Parameter dtypes of the fused kernels; float64 (and anything else) runs on the reference backend.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous, so a fused kernel can
    walk the storage as numel consecutive elements (its operands then share strides). False for
    strided views such as ``w[:, ::2]``."""
    if t.is_contiguous():  # the common case, decided in C++: ~0.1 us against ~3 us below
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def unfusable_reason(param: torch.Tensor) -> str | None:
    """None if the fused kernels can update `param`; otherwise what stands in the way."""
    if param.dtype not in FUSED_DTYPES:
        return f"is {param.dtype} (the fused kernels take float32, bfloat16 and float16)"
    if not is_dense(param):
        return (f"is a strided view (shape {tuple(param.shape)}, strides {tuple(param.stride())}), "
                "not dense")
    return None


@functools.lru_cache(maxsize=None)
def _triton_module():
    """fadam_fused.triton_kernels, or the reason it cannot be imported."""
    try:
        try:
            # import_module, not `from . import`: that turns a missing submodule into a plain
            # ImportError ("cannot import name"), and the source-tree fallback never ran.
            triton_kernels = importlib.import_module(f"{__package__}.triton_kernels")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.triton_kernels":
                raise
            triton_kernels = _load_source_tree_triton_kernels()
    except ImportError as exc:
        return None, f"Triton is not usable here ({exc}); install it with `pip install triton`"
    return triton_kernels, None


def _load_source_tree_triton_kernels():
    """Imports ../triton_kernels as fadam_fused.triton_kernels.

    An installed package has it in place (setup.py's package_dir). In a source checkout whose
    fadam_fused/ comes first on sys.path (pytest from the repo root, `setup.py build_ext
    --inplace`), the subpackage is not inside fadam_fused/, so load it from beside it.
    """
    import importlib.util
    import sys
    from pathlib import Path

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


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on `device`; otherwise why not and how to fix it."""
    if name == "reference":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"backend='cpu' runs on CPU tensors, but this parameter is on {device}"
        return None if "CPU" in _ext.KERNELS else _ext.LOAD_ERROR
    if name == "cuda":
        if _ext.CUDA_EMULATE:  # the CUDA kernels compiled for the CPU (tests)
            if device.type != "cpu":
                return (f"backend='cuda' runs the emulated CUDA kernels on CPU tensors in this "
                        f"process (FADAM_CUDA_EMULATE=1), but this parameter is on {device}")
            return _ext.EMULATED_LOAD_ERROR
        if device.type != "cuda":
            return f"backend='cuda' runs on CUDA tensors, but this parameter is on {device}"
        if _ext.LOAD_ERROR is not None:
            return _ext.LOAD_ERROR
        if "CUDA" not in _ext.KERNELS:
            return ("fadam_fused._C was built without CUDA kernels (no CUDA toolkit at build time, "
                    "or FADAM_SKIP_CUDA=1). Rebuild with CUDA_HOME set (or FORCE_CUDA=1): "
                    "`pip install --no-build-isolation -e .`")
        return None
    if name == "triton":
        module, reason = _triton_module()
        if module is None:
            return reason
        # Triton decided when the kernels were defined whether they are compiled or interpreted
        # (TRITON_INTERPRET=1 at import): compiled kernels take CUDA tensors, interpreted ones
        # CPU tensors (the interpreter would copy CUDA tensors to the host, but the metadata
        # table holds device addresses).
        interpreted = module._ops._INTERPRET
        if device.type == ("cpu" if interpreted else "cuda"):
            return None
        if device.type == "cuda":
            return ("backend='triton' runs in Triton's interpreter in this process "
                    "(TRITON_INTERPRET=1 was set when Triton was imported), which takes CPU "
                    "tensors only; unset it to run the compiled kernels on CUDA tensors")
        return (f"backend='triton' needs CUDA tensors (this parameter is on {device}); CPU tensors "
                "run only in Triton's interpreter, with TRITON_INTERPRET=1 set before Triton is "
                "imported")
    raise ValueError(f"Invalid backend: {name!r}; expected None or one of {BACKENDS}")


def resolve(requested: str | None, device: torch.device) -> str:
    """The backend that runs a step on `device`: `requested`, or the fastest available one.

    An explicit request that cannot run raises a RuntimeError saying why and how to fix it.
    """
    if requested is not None:
        reason = unavailable_reason(requested, device)
        if reason is not None:
            raise RuntimeError(f"FAdam backend={requested!r} cannot run: {reason}")
        return requested
    if device.type == "cuda":
        order = ("cuda", "triton", "reference")
    elif device.type == "cpu":
        order = ("cpu", "reference")
    else:
        order = ("reference",)
    return next(name for name in order if unavailable_reason(name, device) is None)


_FUSED: dict[str, op_contract.PhaseOps] = {}  # a plain dict: torch.compile reads it as a constant


def fused(name: str) -> op_contract.PhaseOps:
    """The two ops of fused backend `name` (resolve() has checked that it can run)."""
    if name not in _FUSED:
        if name == "cuda" and _ext.CUDA_EMULATE:
            _FUSED[name] = op_contract.phase_ops(name, *op_contract.EMULATED_CUDA_OPS)
        elif name in ("cpu", "cuda"):
            _FUSED[name] = op_contract.phase_ops(name, "fadam_phase_a", "fadam_phase_b")
        elif name == "triton":
            module, reason = _triton_module()
            if module is None:
                raise RuntimeError(reason)
            _FUSED[name] = op_contract.phase_ops(name, "triton_phase_a", "triton_phase_b")
        else:
            raise ValueError(f"{name!r} is not a fused backend")
    return _FUSED[name]


# The prefix of each fused backend's FAdafactor ops ([note: the FAdafactor op contract] in
# op_contract.py): the C++ kernels register "fadafactor" for CPU and CUDA, Triton its own.
FACTORED_KERNELS = {"cpu": "fadafactor", "cuda": "fadafactor", "triton": "triton_fadafactor"}
_FACTORED: dict[str, op_contract.FactoredOps] = {}  # a plain dict, as _FUSED


def factored(name: str) -> op_contract.FactoredOps:
    """The three FAdafactor ops of fused backend `name` (one of FACTORED_KERNELS)."""
    if name not in _FACTORED:
        if name == "triton":  # importing the Triton kernels registers their ops
            module, reason = _triton_module()
            if module is None:
                raise RuntimeError(reason)
        prefix = FACTORED_KERNELS[name]
        if name == "cuda" and _ext.CUDA_EMULATE:
            prefix = op_contract.EMULATED_CUDA_FADAFACTOR
        _FACTORED[name] = op_contract.factored_ops(name, prefix)
    return _FACTORED[name]
