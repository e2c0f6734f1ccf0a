"""Builds fadam_fused._C: the CPU kernels always, the CUDA kernels when a CUDA toolkit is found.

Environment (the conventions of flash-attention, xformers and torchao):
  FADAM_SKIP_CUDA=1      build the CPU kernels only, even with a toolkit present.
  FORCE_CUDA=1           build the CUDA kernels even without a visible GPU (fails if no toolkit).
  CUDA_HOME              the toolkit root. When unset it is taken from `nvcc -v` (see _cuda_home()).
  TORCH_CUDA_ARCH_LIST   CUDA archs to build; "8.0;9.0" (A100, H100) when unset.
  MAX_JOBS               parallel compile jobs (honoured by torch's ninja builder).
  FADAM_CPU_VEC          "avx512", "avx2" or "none": the CPU vector ISA. Default: the widest this
                         machine has (avx512: AVX-512 F/BW/VL/DQ; avx2: AVX2 and FMA). The
                         extension is then built for this machine's CPU family, as a source build
                         is; set "avx2" or "none" (SSE2) to build a binary for older CPUs.
  FADAM_HIP_CPU          test builds only: the HIP-CPU folder (e.g. ../shared/third_party/hip-cpu).
                         Also builds fadam_fused._C_cuda_emulated, the CUDA kernels compiled for
                         the CPU, which backend="cuda" runs on CPU tensors when
                         FADAM_CUDA_EMULATE=1 (csrc/cuda/launch.h). Users' builds leave it unset.
"""

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

# The extension is compiled against the torch it will run with, which must be installed first
# (and the build not isolated from it: `pip install --no-build-isolation -e .`).
try:
    import torch  # noqa: F401
except ImportError as exc:
    sys.exit(f"fadam_fused: building needs torch installed first ({exc}). Install torch 2.11 or "
             f"newer for your platform (`pip install torch`; see pytorch.org for CUDA builds), "
             f"then `pip install --no-build-isolation -e .` in this folder.")


def _truthy(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_home():
    """The CUDA toolkit root, or None.

    torch.utils.cpp_extension guesses CUDA_HOME as the parent of the directory holding the first
    `nvcc` on PATH. Where that `nvcc` is a wrapper script (e.g. /usr/local/bin/nvcc exec'ing
    /usr/local/cuda-13.0/bin/nvcc) the guess is /usr/local and linking fails, so ask nvcc itself:
    `nvcc -v` prints `_HERE_=<toolkit>/bin`.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    try:
        out = subprocess.run(
            ["nvcc", "-v", "-x", "cu", "/dev/null", "-E", "-o", "/dev/null"],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    return str(Path(match.group(1)).parent) if match else None


def _cpu_vec_default():
    """The widest at::vec ISA this machine runs: "avx512", "avx2" or "none"."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "none"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "none"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "none"


# Compiler flags per FADAM_CPU_VEC: they select at::vec's Vectorized<float> (16 lanes with AVX-512,
# 8 with AVX2) instead of its generic fallback. The AVX-512 flags are those of torch's own AVX512
# CPU capability build. AVX-512 takes ~0.8x the time of AVX2 per element, in cache
# (bench/NOTES.md); torch's fused Adam, the benchmark baseline, runs its own AVX-512 kernel.
_CPU_VEC_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "none": [],
}


def _emulated_cuda_extension(CppExtension, include_dirs):
    """fadam_fused._C_cuda_emulated when FADAM_HIP_CPU names the HIP-CPU folder, else None.

    csrc/cuda/fadam_cuda.cu compiled by the C++ compiler with HIP-CPU's headers: the CUDA kernels
    and their host code, run on CPU tensors under FADAM_CUDA_EMULATE=1 (a test build).
    """
    hip = os.environ.get("FADAM_HIP_CPU")
    if not hip:
        return None
    hip_include = Path(hip).resolve() / "include"
    if not (hip_include / "hip" / "hip_runtime.h").exists():
        raise RuntimeError(f"FADAM_HIP_CPU={hip!r} is not a HIP-CPU folder (no include/hip/hip_runtime.h)")
    print(f"fadam_fused: building the emulated CUDA kernels with HIP-CPU ({hip_include.parent})")
    # -O1: -O2 builds take longer for no test-time gain worth it (the build must stay short in CI);
    # -ffp-contract=off as the real builds (no FMA contraction, setup.py's CPU and nvcc flags);
    # -w: HIP-CPU's headers warn a lot.
    return CppExtension(
        "fadam_fused._C_cuda_emulated", ["csrc/cuda/fadam_cuda_emulated.cpp"],
        include_dirs=include_dirs + [str(hip_include)],
        extra_compile_args={"cxx": ["-std=c++20", "-O1", "-ffp-contract=off", "-w"]},
        extra_link_args=["-pthread"])


def _extensions():
    if _truthy("FADAM_SKIP_CUDA") and _truthy("FORCE_CUDA"):
        raise RuntimeError("FORCE_CUDA=1 and FADAM_SKIP_CUDA=1 ask for opposite builds: unset one")
    cuda_home = None if _truthy("FADAM_SKIP_CUDA") else _cuda_home()
    if _truthy("FORCE_CUDA") and cuda_home is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
    with_cuda = cuda_home is not None
    if with_cuda:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    # -ffp-contract=off: the vector body and the zero-padded tail of the CPU kernel must round the
    # same way, and phase A must recompute phase B's f bit for bit (csrc/fadam_math.h).
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel` (ATen/ParallelOpenMP.h) that
    # compiles into this library; without the flag it runs on one thread. The libgomp.so.1 it
    # links resolves to the one torch has already loaded.
    # -std=c++20: the sources use C++20 (template lambdas in the dispatch). torch 2.14 compiles
    # extensions as C++20 anyway; torch 2.11 would pass -std=c++17 unless a -std is given, and
    # nvcc then warns "explicit lambda template parameters are a C++20 feature" on every one.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden",
           "-Wno-unknown-pragmas"]  # at::vec headers carry CUDA-only `#pragma unroll`
    vec = os.environ.get("FADAM_CPU_VEC") or _cpu_vec_default()
    if vec not in _CPU_VEC_FLAGS:
        raise RuntimeError(f"FADAM_CPU_VEC must be one of {sorted(_CPU_VEC_FLAGS)}, got {vec!r}")
    cxx += _CPU_VEC_FLAGS[vec]

    sources = ["csrc/fadam_ops.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cpu").glob("*.cpp"))
    include_dirs = [str(ROOT / "csrc")]
    emulated = _emulated_cuda_extension(CppExtension, include_dirs)
    extras = [] if emulated is None else [emulated]
    if not with_cuda:
        print("fadam_fused: building the CPU kernels only (no CUDA toolkit, or FADAM_SKIP_CUDA=1)")
        return [CppExtension("fadam_fused._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])] + extras
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cuda").glob("*.cu"))
    # nvcc's defaults keep IEEE division and sqrt (-prec-div=true -prec-sqrt=true): no fast math.
    # --fmad=false: no FMA contraction, as the CPU build's -ffp-contract=off, so phase A and phase B
    # round fim_update() identically whatever the call site (csrc/cuda/fadam_cuda.cu header).
    nvcc = ["-O3", "-std=c++20", "-lineinfo", "--fmad=false", "-DFADAM_WITH_CUDA"]
    print(f"fadam_fused: building CPU and CUDA kernels (CUDA_HOME={cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    return [CUDAExtension("fadam_fused._C", sources, include_dirs=include_dirs,
                          extra_compile_args={"cxx": cxx + ["-DFADAM_WITH_CUDA"], "nvcc": nvcc},
                          extra_link_args=["-fopenmp"])] + extras


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    packages=find_packages(include=["fadam_fused", "fadam_fused.*"]) + ["fadam_fused.triton_kernels"],
    # The Triton kernels live in ./triton_kernels and install as fadam_fused.triton_kernels (a
    # top-level `triton_kernels` would clash with Triton's own).
    package_dir={"fadam_fused.triton_kernels": "triton_kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
