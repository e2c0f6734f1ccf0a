# make bench : set up .venv, build the extension, run the step microbenchmark on the default device
# make test  : set up .venv, build the extension, run the test suite
# make gpu-check : on a machine with an NVIDIA GPU, with the torch it has (installs nothing): build
#              for it, run every GPU test and the quick benchmark on cuda, print a summary
# make test-torch211 : build and test with torch 2.11.0, the oldest supported, in .venv-torch211
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

.PHONY: test bench bench-quick build clean gpu-check test-torch211

# The bench requirements too: tests/test_bench_smoke.py runs the benchmark and the example.
# --durations: the slowest tests, where CI's time goes (the suite is ~27 min of CI's ~33).
test: $(BUILT) $(BENCH_DEPS)
	$(PY) -m pytest -q -rs --durations=25 tests

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

# gpu-check runs bench/gpu_check.sh (its header says what it needs and writes). It installs
# nothing: no venv, no pip; it takes PYTHON when given (make gpu-check PYTHON=python3), else the
# first python3 whose torch has CUDA, builds the extension in place for the local GPU and writes
# summary.txt, tests.xml, bench.json and log.txt under GPU_OUT. Its build removes .venv's build
# stamp (GPU_BUILD_STAMP) so that the next `make test` or `make bench` rebuilds for .venv's torch.
# GPU_TESTS: every test file with GPU tests (tests/test_gpu_check.py checks that none is missing);
# the NCCL ones need 2 and 4 GPUs and say so when skipped.
GPU_TESTS := tests/test_cuda.py tests/test_cuda_build.py tests/test_triton_ops.py \
             tests/test_triton_optimizer.py tests/test_optimizer_api.py tests/test_sharded.py \
             tests/test_fadafactor_cuda.py tests/test_fadafactor_triton.py tests/test_scenarios.py \
             tests/test_adafisher_kernels.py tests/test_stochastic_rounding.py
GPU_OUT ?= bench/results/gpu-check
# FADAM_GPU_CHECK_DRY_RUN=1 (tests only): no GPU needed; these CPU tests stand in for GPU_TESTS.
GPU_DRY_RUN_TESTS ?= tests/test_gpu_check_summary.py
given = $(if $(filter command line environment environment override,$(origin $(1))),$($(1)))

gpu-check:
	@GPU_OUT="$(GPU_OUT)" GPU_TESTS="$(GPU_TESTS)" GPU_DRY_RUN_TESTS="$(GPU_DRY_RUN_TESTS)" \
	    GPU_BUILD_STAMP="$(BUILT)" \
	    GPU_PYTHON="$(call given,PYTHON)" MAX_JOBS="$(call given,MAX_JOBS)" \
	    TORCH_CUDA_ARCH_LIST="$(call given,TORCH_CUDA_ARCH_LIST)" bash bench/gpu_check.sh

# The oldest supported torch, 2.11.0 (the GPU runners' build), in a venv of its own: it builds
# and tests a copy of the sources under $(T211_VENV)/src, so that neither venv's build of
# fadam_fused/_C*.so overwrites the other's. The CPU, emulated CUDA (with HIP-CPU) and, when a
# toolkit is found, CUDA kernels, then the whole suite (CPU, Triton interpreted, CUDA emulated).
T211_VENV ?= .venv-torch211
T211_PY   := $(abspath $(T211_VENV))/bin/python
T211_SRC  := $(T211_VENV)/src
T211_DEPS := $(T211_VENV)/.deps-stamp
T211_TREE := csrc fadam_fused triton_kernels tests bench examples docs setup.py pyproject.toml \
             README.md Makefile requirements-dev.txt requirements-bench.txt

$(T211_DEPS): requirements-torch211.txt
	test -x $(T211_PY) || $(PYTHON) -m venv $(T211_VENV)
	$(T211_PY) -m pip install -q -r requirements-torch211.txt
	touch $@

test-torch211: $(T211_DEPS)
	mkdir -p $(T211_SRC)
	cd $(T211_SRC) && rm -rf $(T211_TREE)
	# tar keeps the files' times, so ninja rebuilds only what changed since the last run
	tar -c --exclude='*.so' --exclude=__pycache__ --exclude=bench/results $(T211_TREE) | tar -x -C $(T211_SRC)
	cd $(T211_SRC) && $(T211_PY) setup.py -q build_ext --inplace
	cd $(T211_SRC) && $(T211_PY) -m pytest -q -rs -p no:cacheprovider tests

clean:
	rm -rf build *.egg-info fadam_fused/_C*.so $(BUILT)
