"""Fixtures shared by the test files."""

import pytest

from fadam_fused import backends, op_contract


def _chunk_setter(monkeypatch, backend):
    def set_chunk(chunk):
        monkeypatch.setitem(op_contract.CHUNK_SIZE, backend, chunk)
        monkeypatch.setattr(backends, "_FUSED", {})
        monkeypatch.setattr(backends, "_FACTORED", {})
    return set_chunk


@pytest.fixture
def cpu_chunk(monkeypatch):
    """Sets the CPU backend's chunk size (2^20 by default) for one test."""
    return _chunk_setter(monkeypatch, "cpu")


@pytest.fixture
def cuda_chunk(monkeypatch):
    """Sets the CUDA backend's chunk size (65536 by default) for one test."""
    return _chunk_setter(monkeypatch, "cuda")
