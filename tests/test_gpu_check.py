"""`make gpu-check` (Makefile, bench/gpu_check.sh) without a GPU: its dry run and its refusals.

FADAM_GPU_CHECK_DRY_RUN=1 fakes the GPU, prints the build instead of running it, runs a few CPU
tests instead of the GPU ones and the benchmark on the CPU's tiny workload; the rest (choosing the
interpreter, the junit report, the benchmark JSON, the summary, the missing-package skip, the exit
status, the output folder) runs for real. Each run takes ~15 s on an idle VM (two Python starts
with torch), several minutes at a load average of 15.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


@pytest.fixture
def sandbox(tmp_path):
    """PATH and PYTHONPATH that report any pip call and hide pytorch_optimizer, as on the GPU
    runners (where it is not installed), and a fake nvidia-smi that finds no GPU."""
    bin_dir, py_dir, calls = tmp_path / "bin", tmp_path / "py", tmp_path / "pip-calls"
    bin_dir.mkdir()
    (py_dir / "pip").mkdir(parents=True)
    for name in ("pip", "pip3"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "$0 $*" >> {calls}\nexit 1\n')
    (py_dir / "pip" / "__init__.py").write_text("")
    (py_dir / "pip" / "__main__.py").write_text(
        f"import sys\nopen({str(calls)!r}, 'a').write(' '.join(sys.argv) + '\\n')\nsys.exit(1)\n")
    (py_dir / "pytorch_optimizer.py").write_text(
        "raise ImportError(\"No module named 'pytorch_optimizer' (hidden by the test)\")\n")
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found' >&2\nexit 6\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("FADAM_GPU_CHECK_DRY_RUN", "GPU_OUT", "PYTHON", "MAKEFLAGS", "MFLAGS",
                        "TORCH_CUDA_ARCH_LIST")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHONPATH=str(py_dir), PIP_NO_INDEX="1")
    return env, calls


def gpu_check(env, *args, timeout=900):  # ~15 s idle; minutes on a loaded 2-core VM
    out = subprocess.run(["make", "--no-print-directory", "gpu-check", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stdout + out.stderr


def test_dry_run_writes_summary_report_and_benchmark_in_one_folder(sandbox, tmp_path):
    env, calls = sandbox
    out_dir = tmp_path / "out"
    rc, out = gpu_check(env, "FADAM_GPU_CHECK_DRY_RUN=1", f"PYTHON={sys.executable}",
                        f"GPU_OUT={out_dir}")
    assert rc == 0, out
    assert not calls.exists(), calls.read_text()  # installs nothing
    assert "dry run: not building; the build would be: env FORCE_CUDA=1" in out
    assert "TORCH_CUDA_ARCH_LIST=8.0;9.0 " in out  # the faked 9.0 GPU, plus 8.0
    assert f"gpu-check: {sys.executable} (python" in out

    summary = (out_dir / "summary.txt").read_text()
    assert summary in out and summary.startswith("== gpu-check summary ==")
    passed = re.search(r"^tests: (\d+) passed, 0 failed, 0 skipped$", summary, re.M)
    assert passed and int(passed.group(1)) >= 2, summary
    # The missing package: one line in the benchmark's output, one in the summary, no table row.
    skip = "pytorch_optimizer-fadam: pytorch_optimizer is not installed"
    assert out.count(f"not run here: {skip}") == 1, out
    assert f"  skipped {skip}" in summary
    assert not re.search(r"^pytorch_optimizer-fadam +not run", out, re.M), out
    assert re.search(r"^  fadam-cuda +not run: GPU-only row; this run is on cpu$", summary, re.M)

    bench = json.loads((out_dir / "bench.json").read_text())
    assert bench["meta"]["device"] == "cpu" and bench["meta"]["quick"]
    rows = {r["row"]: r for r in bench["results"]}
    assert rows["torch-adam-fused"]["status"] == "ok" and rows["fadam-cpu"]["status"] == "ok"
    assert rows["pytorch_optimizer-fadam"]["status"] == "unavailable"
    assert 'tests="' in (out_dir / "tests.xml").read_text()
    log = (out_dir / "log.txt").read_text()
    assert "== gpu-check summary ==" in log and "step benchmark: cpu" in log


def test_dry_run_fails_when_a_test_fails(sandbox, tmp_path):
    env, calls = sandbox
    failing = tmp_path / "t" / "test_fails.py"
    failing.parent.mkdir()
    failing.write_text("def test_ok():\n    pass\n\ndef test_fails():\n    assert 1 == 2\n")
    out_dir = tmp_path / "out"
    rc, out = gpu_check(env, "FADAM_GPU_CHECK_DRY_RUN=1", f"PYTHON={sys.executable}",
                        f"GPU_OUT={out_dir}", f"GPU_DRY_RUN_TESTS={failing}")
    assert rc != 0, out
    assert "tests: 1 passed, 1 failed, 0 skipped" in (out_dir / "summary.txt").read_text()
    assert (out_dir / "bench.json").exists()  # the benchmark still ran, and is collected
    assert not calls.exists()


def test_without_a_gpu_it_stops_before_building_and_installs_nothing(sandbox, tmp_path):
    env, calls = sandbox
    rc, out = gpu_check(env, f"PYTHON={sys.executable}", f"GPU_OUT={tmp_path / 'out'}", timeout=60)
    assert rc != 0
    assert "gpu-check: no NVIDIA GPU visible" in out, out
    assert "building" not in out and not calls.exists()


def test_a_python_without_torch_is_refused(sandbox, tmp_path):
    env, calls = sandbox
    bare = tmp_path / "bare-python"
    bare.write_text("#!/bin/sh\nexec /nonexistent-python \"$@\"\n")
    bare.chmod(0o755)
    rc, out = gpu_check(env, "FADAM_GPU_CHECK_DRY_RUN=1", f"PYTHON={bare}",
                        f"GPU_OUT={tmp_path / 'out'}", timeout=60)
    assert rc != 0 and f"PYTHON={bare} has no" in out, out
    assert not calls.exists()


def _make_variable(name: str) -> list[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(rf"^{name}\s*:?=(.*)$", text, re.M)
    assert match, name
    return match.group(1).split()


def test_gpu_tests_list_every_file_with_gpu_tests():
    listed = _make_variable("GPU_TESTS")
    assert all((ROOT / path).is_file() for path in listed), listed
    marks = re.compile(r"torch\.cuda\.is_available\(\)|pytest\.mark\.gpu|nccl", re.I)
    with_gpu = sorted(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
                      if marks.search(p.read_text()) and p.name != Path(__file__).name)
    assert set(with_gpu) <= set(listed), sorted(set(with_gpu) - set(listed))
    assert "tests/test_sharded.py" in listed and "tests/test_cuda_build.py" in listed
