"""Fixtures shared by the test files."""

import pytest

from fadam_fused import backends


@pytest.fixture
def cpu_chunk(monkeypatch):
    """Sets the CPU backend's chunk size (2^20 by default) for one test."""
    def set_chunk(chunk):
        monkeypatch.setitem(backends._CHUNK_SIZE, "cpu", chunk)
        monkeypatch.setattr(backends, "_FUSED", {})
    return set_chunk
