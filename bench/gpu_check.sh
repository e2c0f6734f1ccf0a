#!/usr/bin/env bash
# `make gpu-check`: on a machine with an NVIDIA GPU, build the extension for that GPU, run every
# GPU test, then the quick benchmark on cuda, and print a summary.
#
# It installs nothing and needs no network: it runs on a Python that already has a CUDA build of
# torch (GPU_PYTHON, else the first `python3` on PATH whose torch has CUDA, else .venv/bin/python),
# with pytest (and, for all of the tests and the plot, triton and matplotlib), and builds
# fadam_fused._C in place against that torch. Everything it writes lands in GPU_OUT:
#   summary.txt  the summary printed at the end
#   tests.xml    pytest's junit report of the GPU tests
#   bench.json   bench/step_bench.py's results (bench.csv, bench.png beside it)
#   log.txt      everything the run printed: the build, pytest -rs, the benchmark tables
# Exits non-zero when the build fails, a test fails or errors, or the benchmark wrote nothing.
#
# Environment (the Makefile passes its variables): GPU_OUT, GPU_PYTHON, GPU_TESTS, MAX_JOBS,
# GPU_BUILD_STAMP (removed when it builds), TORCH_CUDA_ARCH_LIST (default: the local GPU's compute capability plus 8.0 and 9.0, which
# tests/test_cuda_build.py checks).
# FADAM_GPU_CHECK_DRY_RUN=1 (tests/test_gpu_check.py, on machines without a GPU): the GPU is
# faked, the build is only printed, GPU_DRY_RUN_TESTS (a few CPU tests) replace GPU_TESTS and
# the benchmark runs on the CPU's tiny workload, so the rest runs for real.

set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${GPU_OUT:-bench/results/gpu-check}
DRY=${FADAM_GPU_CHECK_DRY_RUN:-0}
[ "$DRY" = 0 ] && DRY=
mkdir -p "$OUT" || exit 1
rm -f "$OUT"/summary.txt "$OUT"/tests.xml "$OUT"/bench.json "$OUT"/bench.csv "$OUT"/bench.png
exec > >(tee "$OUT/log.txt") 2>&1
tee_pid=$!
finish() {  # exit with $1 once tee has written the whole log
    exec >&- 2>&-
    wait "$tee_pid"
    exit "$1"
}
say() { echo "gpu-check: $*"; }

# 1. The GPU.
if [ -n "$DRY" ]; then
    cc=9.0
    say "dry run: GPU detection faked (compute capability $cc); CPU tests and a CPU benchmark"
else
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
    if [ -z "$cc" ]; then
        say "no NVIDIA GPU visible (nvidia-smi --query-gpu=compute_cap found none); nothing was run"
        finish 1
    fi
fi

# 2. The Python: one that already has torch (with CUDA, unless this is a dry run). Never pip.
needs_cuda='import sys, torch; sys.exit(0 if torch.version.cuda else 3)'
[ -n "$DRY" ] && needs_cuda='import torch'
py=
if [ -n "${GPU_PYTHON:-}" ]; then
    if ! "$GPU_PYTHON" -c "$needs_cuda" 2>/dev/null; then
        say "PYTHON=$GPU_PYTHON has no CUDA build of torch (import torch; torch.version.cuda)"
        finish 1
    fi
    py=$GPU_PYTHON
else
    for candidate in $(which -a python3 2>/dev/null) .venv/bin/python; do
        if [ -x "$candidate" ] && "$candidate" -c "$needs_cuda" 2>/dev/null; then
            py=$candidate
            break
        fi
    done
    if [ -z "$py" ]; then
        say "no python3 on PATH (nor .venv/bin/python) has a CUDA build of torch; pass one with" \
            "PYTHON=/path/to/python (gpu-check installs nothing)"
        finish 1
    fi
fi
if ! "$py" -c 'import pytest' 2>/dev/null; then
    say "$py has no pytest; gpu-check installs nothing: install pytest there, or pass another PYTHON="
    finish 1
fi
"$py" - "$cc" <<'EOF'
import sys, torch
def version(name):
    try:
        return __import__(name).__version__
    except Exception:
        return "not installed"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible to torch"
print(f"gpu-check: {sys.executable} (python {sys.version.split()[0]}), torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), triton {version('triton')}, "
      f"pytorch_optimizer {version('pytorch_optimizer')}; {gpu}, compute capability {sys.argv[1]}",
      flush=True)
EOF

# 3. The build, in place, for the local GPU, 8.0 and 9.0 (tests/test_cuda_build.py inspects both)
# and any TORCH_CUDA_ARCH_LIST given. --force: an extension built for another torch (e.g. .venv's)
# would otherwise count as up to date; ninja still recompiles only what changed. No emulated CUDA
# build (FADAM_HIP_CPU empty).
archs=$(printf '8.0\n9.0\n%s\n%s\n' "$cc" "${TORCH_CUDA_ARCH_LIST:-}" | tr ' ;' '\n\n' | grep . |
        sort -u | paste -sd ';' -)
jobs=${MAX_JOBS:-$(nproc)}
build=(env FORCE_CUDA=1 FADAM_SKIP_CUDA= FADAM_HIP_CPU= TORCH_CUDA_ARCH_LIST="$archs"
       MAX_JOBS="$jobs" "$py" setup.py build_ext --inplace --force)
start=$SECONDS
if [ -n "$DRY" ]; then
    say "dry run: not building; the build would be: ${build[*]}"
else
    say "building for TORCH_CUDA_ARCH_LIST=$archs with $jobs jobs"
    # The in-place build replaces .venv's: make test / make bench must rebuild theirs.
    [ -n "${GPU_BUILD_STAMP:-}" ] && rm -f "$GPU_BUILD_STAMP"
    if ! "${build[@]}"; then
        echo "== gpu-check summary ==" > "$OUT/summary.txt"
        echo "build: FAILED, nothing was run ($OUT/log.txt has the compiler output)" >> "$OUT/summary.txt"
        cat "$OUT/summary.txt"
        finish 1
    fi
    say "built in $((SECONDS - start)) s"
fi

# 4. Every GPU test (those files also hold CPU tests, which run too).
if [ -n "$DRY" ]; then
    tests=${GPU_DRY_RUN_TESTS:-tests/test_gpu_check_summary.py}
    interpret=1
else
    tests=${GPU_TESTS:?GPU_TESTS is empty: run me through make gpu-check}
    interpret=0
fi
start=$SECONDS
# shellcheck disable=SC2086  # the test list is a list
TRITON_INTERPRET=$interpret "$py" -m pytest -q -rs -p no:cacheprovider $tests \
    --junitxml="$OUT/tests.xml"
tests_rc=$?
say "tests took $((SECONDS - start)) s (pytest exit status $tests_rc)"

# 5. The quick benchmark. Its budget: 25 s of timing on the default list (the largest LLM-shaped
# list that fits, ~1B parameters at most), 6 s per sweep point (5 points), plus warm-up: about 2
# minutes on an H100.
if [ -n "$DRY" ]; then
    bench=(--device cpu --quick --workloads tiny --budget-scale 0.02
           --rows fadam-cpu,fadam-cuda,fadafactor-cuda,torch-adam-fused,pytorch_optimizer-fadam)
    interpret=1
else
    bench=(--device cuda --quick)
fi
plot=()
"$py" -c 'import matplotlib' 2>/dev/null && plot=(--plot "$OUT/bench.png")
start=$SECONDS
TRITON_INTERPRET=$interpret "$py" bench/step_bench.py "${bench[@]}" --no-progress \
    --json "$OUT/bench.json" --csv "$OUT/bench.csv" "${plot[@]}"
bench_rc=$?
say "benchmark took $((SECONDS - start)) s (exit status $bench_rc)"

# 6. The summary; its exit status is the target's, failed also when pytest did not finish.
"$py" bench/gpu_check_summary.py "$OUT/tests.xml" "$OUT/bench.json" > "$OUT/summary.txt"
summary_rc=$?
cat "$OUT/summary.txt"
say "files in $OUT: summary.txt tests.xml bench.json bench.csv${plot:+ bench.png} log.txt"
if [ "$summary_rc" != 0 ] || [ "$tests_rc" != 0 ]; then
    finish 1
fi
finish 0
