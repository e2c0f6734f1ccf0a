# make bench : set up .venv, build the extension, run the step microbenchmark on the default device
# make test  : set up .venv, build the extension, run the test suite
# make gpu-check : on a machine with an NVIDIA GPU: build for it, run every GPU test and the quick
#              benchmark on cuda, print a summary (tests, step times, ratios, bytes/param)
#
# Set-up is idempotent: the venv is made once from requirements-dev.txt, and the extension is
# rebuilt only when csrc/, setup.py or the requirements change. The build includes the CUDA
# kernels when a CUDA toolkit is found (setup.py reads its root from `nvcc -v`, since the nvcc on
# PATH may be a wrapper script), for TORCH_CUDA_ARCH_LIST (default "8.0;9.0").

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-stamp
BENCH_DEPS := $(VENV)/.bench-deps-stamp
BUILT  := $(VENV)/.build-stamp
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (tests/test_triton_ops.py).
export TRITON_INTERPRET ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 0 || echo 1)
# HIP-CPU beside the repository (CI clones shared/ next to it): the build then adds the emulated
# CUDA kernels, fadam_fused._C_cuda_emulated, that tests/test_cuda_emulated.py runs on CPU tensors
# (skipped, with the reason, without it). About a minute more of build on 2 cores.
HIP_CPU_DIR := $(abspath $(CURDIR)/../shared/third_party/hip-cpu)
export FADAM_HIP_CPU ?= $(if $(wildcard $(HIP_CPU_DIR)/include/hip/hip_runtime.h),$(HIP_CPU_DIR),)

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml

.PHONY: test bench bench-quick build clean gpu-check

# The bench requirements too: tests/test_bench_smoke.py runs the benchmark and the example.
test: $(BUILT) $(BENCH_DEPS)
	$(PY) -m pytest -q -rs tests

bench: $(BUILT) $(BENCH_DEPS)
	$(PY) bench/step_bench.py --csv bench/results/step_bench.csv --json bench/results/step_bench.json --plot bench/results/step_bench.png

bench-quick: $(BUILT) $(BENCH_DEPS)
	$(PY) bench/step_bench.py --quick --plot bench/results/step_bench_quick.png

build: $(BUILT)

$(DEPS): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(BENCH_DEPS): $(DEPS) requirements-bench.txt
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The local GPU's compute capability (e.g. 9.0), plus 8.0 and 9.0 that tests/test_cuda_build.py
# checks; no emulated build (FADAM_HIP_CPU empty). The tests and the benchmark may fail: the summary
# still prints, and its exit status fails the target then. The build stamp is removed so that the
# next `make test` or `make bench` rebuilds for TORCH_CUDA_ARCH_LIST as usual.
GPU_CC = $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
GPU_ARCHS = $(shell printf '8.0\n9.0\n$(GPU_CC)\n' | grep . | sort -u | paste -sd ';' -)
GPU_TESTS := tests/test_cuda.py tests/test_cuda_build.py tests/test_triton_ops.py \
             tests/test_triton_optimizer.py tests/test_optimizer_api.py tests/test_sharded.py \
             tests/test_fadafactor_cuda.py tests/test_fadafactor_triton.py
GPU_OUT := bench/results

gpu-check: $(BENCH_DEPS)
	@test -n "$(GPU_CC)" || { echo "gpu-check: no NVIDIA GPU visible (nvidia-smi)"; exit 1; }
	rm -f $(BUILT) $(GPU_OUT)/gpu_check_tests.xml $(GPU_OUT)/gpu_check_bench.json
	mkdir -p $(GPU_OUT)
	FORCE_CUDA=1 FADAM_HIP_CPU= TORCH_CUDA_ARCH_LIST="$(GPU_ARCHS)" \
	    $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	-TRITON_INTERPRET=0 $(PY) -m pytest -q -rs $(GPU_TESTS) --junitxml=$(GPU_OUT)/gpu_check_tests.xml
	-TRITON_INTERPRET=0 $(PY) bench/step_bench.py --quick --device cuda --no-progress \
	    --json $(GPU_OUT)/gpu_check_bench.json
	$(PY) bench/gpu_check_summary.py $(GPU_OUT)/gpu_check_tests.xml $(GPU_OUT)/gpu_check_bench.json

clean:
	rm -rf build *.egg-info fadam_fused/_C*.so $(BUILT)
