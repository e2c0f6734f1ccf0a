"""Bytes moved per parameter per optimizer step: the SPEC section 3 traffic model.

The model counts the memory traffic a fused kernel *must* have, so effective GB/s = model bytes /
step time is comparable across rows of one family. Unfused rows (foreach, forloop, the reference,
pytorch_optimizer) really move several times more bytes (every elementwise op is its own pass); the
model still counts only the fused minimum for them, which is why their GB/s is low.

Per element, with P = parameter bytes, G = gradient bytes, S = bytes of one state element:

  Adam (torch.optim.Adam, any implementation)
      read g, m, v, theta; write m, v, theta              = G + 2P + 4S   (fp32: 4 + 8 + 16 = 28 B)
      torch's Adam keeps m and v in the parameter dtype, so S = P (bf16: 2 + 4 + 8 = 14 B).

  FAdam, tensor of more than one chunk (phase A and B are separate passes over memory)
      phase A: read g, f, theta                           = G + S + P
      phase B: read g, f, m, theta; write f, m, theta     = G + 4S + 2P
      total                                               = 2G + 5S + 3P  (fp32: 40 B)
      FAdam's state is float32 whatever the parameter dtype (SPEC section 4), so S = 4
      (bf16 params and grads: 4 + 20 + 6 = 30 B).

  FAdam, one-chunk tensor (numel <= the backend chunk size: 2^20 on CPU, 65536 on GPUs): both
  phases run in one task (one block) and phase B re-reads from cache, so the SPEC's minimum is Adam's G + 4S + 2P = 28 B. Our kernels read
  g once more in phase A for the non-finite check (SPEC section 5) before the fused pass, so we
  count                                                   = 2G + 4S + 2P  (fp32: 32 B)

Reads alone (`reads_only=True`): Adam G + P + 2S (fp32 16 B); FAdam multi-chunk 2G + 3S + 2P
(28 B), one-chunk 2G + 2S + P (20 B: the check's g, then g, f, theta and m once). On a machine
whose reads saturate while writes mostly ride along (the 2-core CI VM: about 31 GB/s of reads,
while fused Adam adds 23 GB/s of writes on top), FAdam's time over Adam's follows the ratio of
read bytes (22/16 = 1.375 on the default CPU list) more than that of total bytes (34/28 = 1.21).
It is not a hard floor: with 2^18-element CPU chunks the same list's read-bytes ratio is
26.2/16 = 1.64, and `make bench` measured 1.55-1.63x paired (FAdam's read-only phase A streams reads
faster than a pass that also writes).

A workload's bytes/param is the numel-weighted mean over its tensors, so an LLM-shaped list (nearly
all parameters in big matrices) sits near 40 B and a list of many small tensors near 32 B.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

# Elements per chunk when the backend cannot be asked (not importable, or a row that is not a
# fused backend but is modelled like one): the GPU kernels' 65536. The CPU backend reports its
# own 2^20 (fadam_fused.backends._CHUNK_SIZE).
DEFAULT_CHUNK_SIZE = 65536

FADAM_STATE_DTYPE = torch.float32  # SPEC section 4: momentum and fim are float32 for every dtype


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def adam_bytes_per_element(param_dtype: torch.dtype, grad_dtype: torch.dtype | None = None,
                           reads_only: bool = False) -> int:
    """G + 2P + 4S with S = P (torch's Adam stores exp_avg / exp_avg_sq in the param dtype);
    reads alone G + P + 2S."""
    p = _size(param_dtype)
    g = _size(grad_dtype or param_dtype)
    s = p
    if reads_only:
        return g + p + 2 * s
    return g + 2 * p + 4 * s


def fadam_bytes_per_element(numel: int, param_dtype: torch.dtype, grad_dtype: torch.dtype | None = None,
                            chunk_size: int = DEFAULT_CHUNK_SIZE, reads_only: bool = False) -> int:
    """2G + 5S + 3P for multi-chunk tensors, 2G + 4S + 2P for one-chunk ones, S = 4 (float32);
    reads alone 2G + 3S + 2P and 2G + 2S + P."""
    p = _size(param_dtype)
    g = _size(grad_dtype or param_dtype)
    s = _size(FADAM_STATE_DTYPE)
    one_chunk = numel <= chunk_size
    if reads_only:
        return 2 * g + 2 * s + p if one_chunk else 2 * g + 3 * s + 2 * p
    return 2 * g + 4 * s + 2 * p if one_chunk else 2 * g + 5 * s + 3 * p


def model_bytes(family: str, numels: Iterable[int], param_dtype: torch.dtype,
                grad_dtype: torch.dtype | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                reads_only: bool = False) -> int:
    """Total bytes one step moves (or reads) for a list of tensor sizes; family is "adam" or
    "fadam"."""
    total = 0
    for n in numels:
        if n == 0:
            continue  # an empty tensor moves nothing
        if family == "adam":
            total += n * adam_bytes_per_element(param_dtype, grad_dtype, reads_only)
        elif family == "fadam":
            total += n * fadam_bytes_per_element(n, param_dtype, grad_dtype, chunk_size, reads_only)
        else:
            raise ValueError(f"unknown traffic family {family!r}; expected 'adam' or 'fadam'")
    return total


def bytes_per_param(family: str, numels: Sequence[int], param_dtype: torch.dtype,
                    grad_dtype: torch.dtype | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    reads_only: bool = False) -> float:
    """The numel-weighted mean of the model over a workload (nan for an empty workload)."""
    n = sum(numels)
    if n == 0:
        return math.nan
    return model_bytes(family, numels, param_dtype, grad_dtype, chunk_size, reads_only) / n
