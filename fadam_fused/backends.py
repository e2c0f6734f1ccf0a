"""The backends, the one helper that chooses among them, and their op sets.

Every backend implements the ops of [note: the two-phase op contract], [note: the FAdafactor
op contract] and [note: the AdaFisher op contract] (fadam_fused/op_contract.py): "cpu" and "cuda"
are the C++ kernels behind torch.ops.fadam_fused.fadam_phase_{a,b}, fadafactor_phase_{s,a,b},
nonfinite_check and adafisher_update (one schema, two dispatch keys); "triton" is
torch.ops.fadam_fused.triton_phase_{a,b}, triton_fadafactor_phase_{s,a,b},
triton_nonfinite_check and triton_adafisher_update,
registered with torch.library.triton_op in fadam_fused.triton_kernels; "reference" is the oracle
of fadam_fused.reference behind the same contract, one tensor at a time. Under
FADAM_CUDA_EMULATE=1 (tests), "cuda" is torch.ops.fadam_fused.cuda_emulated_phase_{a,b} (and
cuda_emulated_fadafactor_phase_{s,a,b}, cuda_emulated_nonfinite_check and
cuda_emulated_adafisher_update): the CUDA kernels compiled for the CPU, on CPU tensors
([note: one CUDA source, two compilers] in csrc/cuda/launch.h).
"""

from __future__ import annotations

import torch

from . import _ext, op_contract, reference

BACKENDS = ("cuda", "triton", "cpu", "reference")

# Parameter dtypes of the fused kernels; float64 (and anything else) runs on the reference backend.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


is_dense = op_contract.is_dense


def unfusable_reason(param: torch.Tensor) -> str | None:
    """None if the fused kernels can update `param`; otherwise what stands in the way."""
    if param.dtype not in FUSED_DTYPES:
        return f"is {param.dtype} (the fused kernels take float32, bfloat16 and float16)"
    if not is_dense(param):
        return (f"is a strided view (shape {tuple(param.shape)}, strides {tuple(param.stride())}), "
                "not dense")
    return None


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
        module, reason = _ext.triton_kernels()
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


def resolve(requested: str | None, device: torch.device, who: str = "FAdam") -> str:
    """The backend that runs a step on `device`: `requested`, or the fastest available one.

    An explicit request that cannot run raises a RuntimeError saying why and how to fix it.
    """
    if requested is not None:
        reason = unavailable_reason(requested, device)
        if reason is not None:
            raise RuntimeError(f"{who} backend={requested!r} cannot run: {reason}")
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
    """FAdam's two ops on backend `name` (resolve() has checked that it can run)."""
    return _ops(_FUSED, name, reference.FADAM_OPS, op_contract.phase_ops,
                emulated=op_contract.EMULATED_CUDA_OPS, native=("fadam_phase_a", "fadam_phase_b"),
                triton=("triton_phase_a", "triton_phase_b"))


def _ops(cache: dict, name: str, reference_ops, make, emulated: tuple, native: tuple,
         triton: tuple):
    """One op family on backend `name`, built once into `cache`: reference_ops for
    "reference", else make(name, *names) with the op names of the emulated CUDA build, the C++
    kernels (CPU and CUDA) or Triton (whose import registers its ops)."""
    if name not in cache:
        if name == "reference":
            cache[name] = reference_ops
        elif name == "cuda" and _ext.CUDA_EMULATE:
            cache[name] = make(name, *emulated)
        elif name in ("cpu", "cuda"):
            cache[name] = make(name, *native)
        elif name == "triton":
            _require_triton()
            cache[name] = make(name, *triton)
        else:
            raise ValueError(f"{name!r} is not a backend")
    return cache[name]


_FACTORED: dict[str, op_contract.FactoredOps] = {}  # a plain dict, as _FUSED


def factored(name: str) -> op_contract.FactoredOps:
    """FAdafactor's three ops on backend `name` (resolve() has checked that it can run): the
    C++ kernels register "fadafactor" for CPU and CUDA, Triton its own prefix."""
    return _ops(_FACTORED, name, reference.FADAFACTOR_OPS, op_contract.factored_ops,
                emulated=(op_contract.EMULATED_CUDA_FADAFACTOR,), native=("fadafactor",),
                triton=("triton_fadafactor",))


def _require_triton() -> None:
    module, reason = _ext.triton_kernels()
    if module is None:
        raise RuntimeError(reason)


_ADAFISHER: dict[str, op_contract.AdaFisherOps] = {}  # a plain dict, as _FUSED


def adafisher_available(name: str) -> bool:
    """Whether backend `name` has the AdaFisher kernels ([note: the AdaFisher op contract]);
    asked for every parameter on every step, so answered once per backend (and emulation)."""
    key = (name, _ext.CUDA_EMULATE)
    found = _AVAILABLE.get(key)
    if found is None:
        found = _AVAILABLE[key] = _adafisher_available(name)
    return found


_AVAILABLE: dict[tuple[str, bool], bool] = {}


def _adafisher_available(name: str) -> bool:
    if name == "reference":
        return True
    if name == "triton":
        module, _ = _ext.triton_kernels()
        return module is not None and hasattr(module, "triton_adafisher_update")
    op = ("cuda_emulated_" if name == "cuda" and _ext.CUDA_EMULATE else "") + "adafisher_update"
    key = "CUDA" if name == "cuda" and not _ext.CUDA_EMULATE else "CPU"
    return (_ext.LOAD_ERROR is None and hasattr(getattr(torch.ops, op_contract.NAMESPACE), op)
            and torch._C._dispatch_has_kernel_for_dispatch_key(
                f"{op_contract.NAMESPACE}::{op}", key))


def adafisher(name: str) -> op_contract.AdaFisherOps:
    """AdaFisher's two ops on backend `name`."""
    return _ops(_ADAFISHER, name, reference.ADAFISHER_OPS, op_contract.adafisher_ops,
                emulated=(op_contract.EMULATED_CUDA_ADAFISHER,), native=("",),
                triton=("triton_",))
