"""The CPU kernel as other machines build it: FADAM_CPU_VEC=avx2 and FADAM_CPU_VEC=none.

`make test` builds the kernel for the machine it runs on (AVX-512 on the Zen 4 CI machine), so
the AVX2 path (8 float lanes, its own float64 widening in WideLanes) and the portable SSE2 path
(the generic at::vec fallback) would otherwise never be compiled here, let alone checked. This file
builds both, CPU only, from a copy of the sources in a temporary directory (two builds in
parallel, about a minute on 2 idle cores), and runs a short trajectory of each against the float64
oracle in a subprocess that imports that copy.

The builds start when the session's collection ends, at nice 19, and this file's tests run last
(tests/conftest.py: slow subprocesses in the background).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import BackgroundJob

pytestmark = pytest.mark.background

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("avx2", "none")


def _cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


class _Build:
    """One variant's build, in a background job."""

    def __init__(self, variant: str, root: Path):
        self.variant, self.dest = variant, root / variant
        for name in ("csrc", "fadam_fused", "triton_kernels"):
            shutil.copytree(ROOT / name, self.dest / name,
                            ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        for name in ("setup.py", "pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, self.dest / name)
        # CPU only: .ci/run exports FORCE_CUDA=1 for the main build, and `make test` FADAM_HIP_CPU,
        # which this one must not inherit (the emulated CUDA build is not what this file checks,
        # and it made each variant's build twice as long: both timed out at a load average of 15).
        env = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "FADAM_HIP_CPU")}
        env.update(FADAM_SKIP_CUDA="1", FADAM_CPU_VEC=variant, MAX_JOBS="1")
        self.job = BackgroundJob([sys.executable, "setup.py", "build_ext", "--inplace"],
                                 cwd=self.dest, env=env)

    def wait(self) -> Path:
        """The variant's directory once its build is done (900 s more at most)."""
        code, out, err = self.job.wait()
        assert code == 0, f"FADAM_CPU_VEC={self.variant} build failed:\n{err[-4000:]}"
        assert list((self.dest / "fadam_fused").glob("_C*.so")), out[-2000:]
        return self.dest


_BUILDS: dict[str, _Build] = {}


def start_in_background() -> None:
    """Starts both builds (the builds fixture does if tests/conftest.py did not)."""
    if not _BUILDS:
        root = Path(tempfile.mkdtemp(prefix="fadam-isa-"))
        _BUILDS.update({v: _Build(v, root) for v in VARIANTS})


def stop_in_background() -> None:
    """Ends a build still running (the session stopped before this file's tests) and removes
    the copies."""
    for build in _BUILDS.values():
        build.job.stop()
    if _BUILDS:
        shutil.rmtree(next(iter(_BUILDS.values())).dest.parent, ignore_errors=True)
    _BUILDS.clear()


@pytest.fixture(scope="module")
def builds():
    start_in_background()
    return {v: b.wait() for v, b in _BUILDS.items()}


# Runs in the subprocess: the package of the variant's directory, the oracle comparison of
# tests/fadam_testing.py, a chunk of 4096 so that tensors take both the multi-chunk and the fused
# one-chunk paths, ragged sizes for the vector tails, and the fused/unfused bit equality.
_CHECK = textwrap.dedent("""
    import sys
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    import torch
    import fadam_fused
    from fadam_fused import _ext
    assert fadam_fused.__file__.startswith(sys.argv[1]), fadam_fused.__file__
    assert _ext.LOAD_ERROR is None and "CPU" in _ext.KERNELS, _ext.LOAD_ERROR
    import pytest
    from conftest import set_chunk
    from fadam_testing import (assert_trajectories_close, make_problem, run_optimizer,
                               run_oracle64)
    set_chunk(pytest.MonkeyPatch(), "cpu", 4096)
    shapes = [(3, 4096 + 17), (4096,), (33,), (7, 5), (1,), (0,)]
    for dtype in (torch.float32, torch.bfloat16):
        for hyper in ({"lr": 1e-2}, {"lr": 1e-2, "p": 0.75, "clip": 2.0, "maximize": True}):
            problem = make_problem(shapes=shapes, dtype=dtype, steps=8)
            fast, _, _ = run_optimizer(problem, "cpu", **hyper)
            same = None if dtype == torch.float32 else run_optimizer(problem, "reference",
                                                                     **hyper)[0]
            assert_trajectories_close(fast, run_oracle64(problem, **hyper), same, dtype)
    # eps = 1e-30 and zero gradients: w^2 ~ 1e60 overflows the float32 block sums, which fall
    # back to float64 (SumSq, and the portable WideLanes of the "none" build).
    problem = make_problem(shapes=shapes, steps=6, zero_grad=(1, 3))
    fast, _, _ = run_optimizer(problem, "cpu", lr=1e-2, eps=1e-30)
    assert_trajectories_close(fast, run_oracle64(problem, lr=1e-2, eps=1e-30))
    print("ok")
""")


@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_variant_matches_oracle(builds, variant):
    if variant == "avx2" and not {"avx2", "fma", "f16c"} <= _cpu_flags():
        pytest.skip("this CPU cannot run the AVX2 build (no avx2/fma/f16c in /proc/cpuinfo)")
    out = subprocess.run([sys.executable, "-c", _CHECK, str(builds[variant]),
                          str(ROOT / "tests")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().endswith("ok")
