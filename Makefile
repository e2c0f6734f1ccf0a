# make bench : set up .venv, build the extension, run the step microbenchmark on the default device
# make test  : set up .venv, build the extension, run the test suite
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
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (tests/test_triton.py).
export TRITON_INTERPRET ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 0 || echo 1)

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml

.PHONY: test bench bench-quick build clean

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

clean:
	rm -rf build *.egg-info fadam_fused/_C*.so $(BUILT)
