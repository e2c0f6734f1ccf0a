"""Fixtures shared by the test files: the (optimizer, backend) pairs that tests/test_scenarios.py
runs every scenario on, and every switch between backends.

[note: backend switches in tests]
This file is the one place where tests reach the engine's internals to switch backends: Triton's
interpreter (TRITON_INTERPRET), the emulated CUDA kernels (fadam_fused._ext.CUDA_EMULATE), the
chunk size that reaches multi-chunk paths at small sizes (op_contract.CHUNK_SIZE, and the op
caches of fadam_fused.backends built from it), and the ops a backend runs. Test files use the
fixtures and functions below (set_chunk, use_emulated_cuda, backend_ops, replace_backend_ops,
triton_kernels), never those names, so a change of the internals is a change here.

Backends, as `backend` gives them to a test (ids in brackets):

- [cpu] the fused C++ kernels; [reference] the plain-PyTorch oracle at the parameters' precision;
- [triton-interpreted] the Triton kernels in Triton's interpreter, on CPU tensors (without a GPU);
- [cuda-emulated] the CUDA kernels compiled for the CPU with HIP-CPU, on CPU tensors (a build
  with FADAM_HIP_CPU set);
- [cuda-gpu], [triton-gpu] the CUDA and compiled Triton kernels on CUDA tensors (marked `gpu`).

A backend that cannot run here skips, saying why. Sizes: the interpreter runs a Python call per
program (~50 ms on the 2-core VM, about a second per 65536-element chunk) and the emulator ~1 ms
per 512-thread block, so they run the "small" problems of tests/fadam_testing.py, with chunk 64
where several chunks, tiles and launches are to be reached with a few hundred elements (always
on the emulator; on the interpreter in the scenarios that ask for several chunks). cpu, reference
and the GPU backends run the "large" ones at their own chunk, and 4096 where a scenario asks for
several chunks.
"""

from __future__ import annotations

import os

import torch

# Triton decides when its kernels are defined whether they are compiled or interpreted: without
# a GPU (and unless the environment decides) they run in its interpreter, on CPU tensors. Set
# before anything imports Triton.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import dataclasses  # noqa: E402
import functools  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

from fadam_fused import _ext, backends, op_contract  # noqa: E402
from fadam_testing import OPTIMIZERS  # noqa: E402

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


# ---- the switches --------------------------------------------------------------------------------


def _forget_ops(monkeypatch) -> None:
    """The op caches of fadam_fused.backends hold each backend's chunk size and kernels (and
    whether it has AdaFisher's): built anew after a switch (and restored with `monkeypatch`)."""
    monkeypatch.setattr(backends, "_FUSED", {})
    monkeypatch.setattr(backends, "_FACTORED", {})
    monkeypatch.setattr(backends, "_ADAFISHER", {})
    monkeypatch.setattr(backends, "_AVAILABLE", {})


def set_chunk(monkeypatch, backend: str, chunk: int) -> None:
    """Backend `backend`'s chunk size (elements per partial-sum slot) for one test."""
    monkeypatch.setitem(op_contract.CHUNK_SIZE, backend, chunk)
    _forget_ops(monkeypatch)


@functools.cache
def emulated_cuda_missing() -> str | None:
    """None when the emulated CUDA build loads, else why not and how to build it."""
    if _ext.CUDA_EMULATE:
        return _ext.EMULATED_LOAD_ERROR
    reason = _ext._load_emulated()  # defines the emulated ops, then imports the build
    if reason is None:
        return None
    return (f"the emulated CUDA build is missing ({reason}): build with FADAM_HIP_CPU="
            "../shared/third_party/hip-cpu (make test does when that folder exists)")


def use_emulated_cuda(monkeypatch) -> None:
    """backend="cuda" runs the emulated kernels on CPU tensors for one test, as under
    FADAM_CUDA_EMULATE=1 (which the rest of the suite does not set). Skips without the build."""
    missing = emulated_cuda_missing()
    if missing is not None:
        pytest.skip(missing)
    monkeypatch.setattr(_ext, "CUDA_EMULATE", True)
    monkeypatch.setattr(_ext, "EMULATED_LOAD_ERROR", None)
    _forget_ops(monkeypatch)


def backend_ops(name: str, factored: bool = False):
    """The ops fused backend `name` runs now: FAdam's two phases, or FAdafactor's three."""
    return backends.factored(name) if factored else backends.fused(name)


def replace_backend_ops(monkeypatch, name: str, ops, factored: bool = False) -> None:
    """Backend `name` runs `ops` (as backend_ops returns them, e.g. wrapped) for one test."""
    backend_ops(name, factored)  # the cache exists
    monkeypatch.setitem(backends._FACTORED if factored else backends._FUSED, name, ops)


def triton_kernels():
    """(fadam_fused.triton_kernels, None), or (None, why it cannot be imported)."""
    return _ext.triton_kernels()


@pytest.fixture
def cpu_chunk(monkeypatch):
    """Sets the CPU backend's chunk size (2^20 by default) for one test."""
    return functools.partial(set_chunk, monkeypatch, "cpu")


@pytest.fixture
def cuda_chunk(monkeypatch):
    """Sets the CUDA backend's chunk size (65536 by default) for one test."""
    return functools.partial(set_chunk, monkeypatch, "cuda")


@pytest.fixture
def triton_chunk(monkeypatch):
    """Sets the Triton backend's chunk size (65536 by default) for one test."""
    return functools.partial(set_chunk, monkeypatch, "triton")


@pytest.fixture
def cuda_emulated(monkeypatch):
    """backend="cuda" is the emulated CUDA kernels on CPU tensors for one test."""
    use_emulated_cuda(monkeypatch)


# ---- the (optimizer, backend) pairs -----------------------------------------------------------


def _no_gpu() -> str | None:
    if torch.cuda.is_available():
        return None
    return "needs a CUDA GPU (torch.cuda.is_available() is False)"


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend as this machine runs it."""

    id: str
    name: str                 # the optimizer's backend=
    device: torch.device
    size: str                 # the problems of tests/fadam_testing.py it runs: "large", "small"
    chunk: int | None         # the chunk it runs every scenario at (None: the library's)
    multi_chunk: int | None   # the chunk of scenarios that ask for several chunks
    gpu: bool = False
    emulated: bool = False
    monkeypatch: pytest.MonkeyPatch | None = None

    def unavailable(self) -> str | None:
        if self.gpu and _no_gpu():
            return _no_gpu()
        if self.emulated:
            return emulated_cuda_missing()
        return backends.unavailable_reason(self.name, self.device)

    def use_chunk(self, chunk: int | None) -> None:
        """Runs this test at `chunk` (None: leaves the chunk as it is)."""
        if chunk is not None and self.name != "reference":
            set_chunk(self.monkeypatch, self.name, chunk)

    def use_multi_chunk(self) -> int | None:
        """Several chunks (and tiles) for the "multi" shapes of this backend's size class."""
        self.use_chunk(self.multi_chunk)
        return self.multi_chunk


BACKENDS = [
    Backend("cpu", "cpu", CPU, "large", None, 4096),
    Backend("reference", "reference", CPU, "large", None, None),
    # The interpreter's cost is per program: the library's chunk (a program per tensor) but for
    # the scenarios that ask for several chunks.
    Backend("triton-interpreted", "triton", CPU, "small", None, 64),
    Backend("cuda-emulated", "cuda", CPU, "small", 64, 64, emulated=True),
    Backend("cuda-gpu", "cuda", CUDA, "large", None, 4096, gpu=True),
    Backend("triton-gpu", "triton", CUDA, "large", None, 4096, gpu=True),
]


# ---- slow subprocesses in the background -------------------------------------------------------
#
# Subprocesses of minutes (tests/test_cpu_isa_variants.py's two builds of the extension, the sm_80 /
# sm_90 compilations and torch.compile traces of the Triton kernels) start as soon as collection
# has selected their tests, at nice 19, and the tests that wait for them (marked `background`) run
# last: the rest of the suite is mostly one Python thread, and the jobs take the core it leaves
# idle instead of minutes of their own. A module with such tests defines start_in_background(),
# which starts its jobs (once), and stop_in_background(), which ends what is left when the session
# ends (after a failure with -x, say).


class BackgroundJob:
    """A command run at nice 19 in its own process group, its stdout and stderr in temporary
    files. A test waiting for it raises the group back to nice 0 (where allowed): it is the
    critical path then."""

    def __init__(self, argv, cwd=None, env=None):
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._out, stderr=self._err,
                                     text=True, start_new_session=True,
                                     preexec_fn=lambda: os.nice(19))

    def wait(self, timeout: float = 900) -> tuple[int, str, str]:
        """(exit status, stdout, stderr), waiting `timeout` seconds more at most."""
        if self.proc.poll() is None:
            try:
                os.setpriority(os.PRIO_PGRP, self.proc.pid, 0)
            except OSError:  # not allowed to raise a priority: it finishes at nice 19
                pass
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        self._out.seek(0)
        self._err.seek(0)
        return code, self._out.read(), self._err.read()

    def stop(self) -> None:
        """Kills the command and what it started (a build's compilers)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def _waits_in_background(item) -> bool:
    return item.get_closest_marker("background") is not None


def pytest_collection_modifyitems(session, config, items):
    late = [item for item in items if _waits_in_background(item)]
    if late:
        items[:] = [item for item in items if not _waits_in_background(item)] + late


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    for module in dict.fromkeys(item.module for item in session.items
                                if _waits_in_background(item)):
        session.config.add_cleanup(module.stop_in_background)
        module.start_in_background()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "backends(*ids): run this test on these backends of tests/conftest.py only")
    config.addinivalue_line(
        "markers", "background: waits for its module's start_in_background() jobs; runs last")


def _wants(metafunc, name: str) -> bool:
    """Whether the test takes `name` from these fixtures (not from its own parametrize)."""
    own = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        own.update(n.strip() for n in (names.split(",") if isinstance(names, str) else names))
    return name in metafunc.fixturenames and name not in own


# A test argument that takes one of each optimizer's own lists of cases, with the optimizer.
_OWN_CASES = {"optimizer_case": "cases", "optimizer_overflow": "overflows", "optimizer_fit": "fits"}


@pytest.hookimpl(trylast=True)
def pytest_generate_tests(metafunc):
    # After the test's own parametrize marks, so that the backend varies fastest: consecutive
    # tests of one case then share the oracle trajectories tests/test_scenarios.py caches.
    if not _wants(metafunc, "backend") and not _wants(metafunc, "optimizer"):
        return
    joint = [name for name in _OWN_CASES if name in metafunc.fixturenames]
    if joint:
        # Each optimizer's own cases (fadam_testing.Optimizer.cases, .overflows, .fits).
        pairs = [(o, case) for o in OPTIMIZERS for case in getattr(o, _OWN_CASES[joint[0]])]
        metafunc.parametrize(("optimizer", joint[0]), pairs, indirect=["optimizer"],
                             ids=[f"{o.id}-{case[0]}" for o, case in pairs])
    elif _wants(metafunc, "optimizer"):
        metafunc.parametrize("optimizer", OPTIMIZERS, ids=[o.id for o in OPTIMIZERS],
                             indirect=True)
    if _wants(metafunc, "backend"):
        # The backends this machine runs; those it cannot run are named once, with the reason, in
        # the report header (pytest_report_header), not skipped in every test. A test only for
        # backends none of which runs here is generated for them, and skips saying why.
        mark = metafunc.definition.get_closest_marker("backends")
        chosen = [b for b in BACKENDS if mark is None or b.id in mark.args]
        chosen = [b for b in chosen if _unavailable(b) is None] or chosen
        metafunc.parametrize("backend", [pytest.param(b, id=b.id, marks=[pytest.mark.gpu] * b.gpu)
                                         for b in chosen], indirect=True)


@functools.cache
def _unavailable(spec: Backend) -> str | None:
    return spec.unavailable()


def pytest_report_header(config):
    missing = [f"{b.id} ({_unavailable(b)})" for b in BACKENDS if _unavailable(b) is not None]
    ran = ", ".join(b.id for b in BACKENDS if _unavailable(b) is None)
    lines = [f"scenario backends: {ran}"]
    if missing:
        lines.append("scenario backends not run here: " + "; ".join(missing))
    return lines


@pytest.fixture
def optimizer(request):
    """The optimizer of the pair, with its float64 oracle and its problems (fadam_testing)."""
    return request.param


@pytest.fixture
def backend(request, monkeypatch):
    """The backend of the pair, switched on for this test and at its chunk."""
    spec = request.param
    reason = _unavailable(spec)
    if reason is not None:
        pytest.skip(f"{spec.id}: {reason}")
    if spec.emulated:
        use_emulated_cuda(monkeypatch)
    spec = dataclasses.replace(spec, monkeypatch=monkeypatch)
    spec.use_chunk(spec.chunk)
    return spec
