"""Bytes moved per parameter per optimizer step: the traffic model of docs/design.md section 4.

The model counts the memory traffic a fused kernel *must* have, so effective GB/s = model bytes /
step time is comparable across rows of one family. Unfused rows (foreach, forloop, the reference,
pytorch_optimizer) really move several times more bytes (every elementwise op is its own pass); the
model still counts only the fused minimum for them, which is why their GB/s is low.

Per element, with P = parameter bytes, G = gradient bytes, S = bytes of one state element:

  Adam (torch.optim.Adam, any implementation)
      read g, m, v, theta; write m, v, theta              = G + 2P + 4S   (fp32: 4 + 8 + 16 = 28 B)
      torch's Adam keeps m and v in the parameter dtype, so S = P (bf16: 2 + 4 + 8 = 14 B).

  FAdam with clipping, tensor of more than one chunk (phases A and B are separate passes)
      phase A: read g, f, theta                           = G + S + P
      phase B: read g, f, m, theta; write f, m, theta     = G + 4S + 2P
      total                                               = 2G + 5S + 3P  (fp32: 40 B)
      FAdam's state is float32 whatever the parameter dtype (docs/design.md section 5), so S = 4
      (bf16 params and grads: 4 + 20 + 6 = 30 B).

  FAdam with clipping, one-chunk tensor (numel <= the backend chunk size: 2^20 on CPU, 65536 on
  GPUs): both phases run in one task (one block) and phase B re-reads from cache, so the minimum
  is Adam's G + 4S + 2P = 28 B. Phase A reads g once more for the non-finite check (docs/design.md
  section 6) before the fused pass, so we count                = 2G + 4S + 2P  (fp32: 32 B)

  FAdam with clipping off (clip=None or 0), every tensor: no RMS, so phase A only reads g for the
  non-finite check and phase B reads g, f, m, theta and writes f, m, theta
                                                          = 2G + 4S + 2P  (fp32: 32 B)

Reads alone (`reads_only=True`): Adam G + P + 2S (fp32 16 B); FAdam multi-chunk with clipping
2G + 3S + 2P (28 B); one-chunk or clipping off 2G + 2S + P (20 B). Where a machine's reads
saturate and its writes ride along, FAdam's time over Adam's follows the ratio of read bytes more
than that of total bytes (bench/NOTES.md has the measurements), so the run reports both.

A workload's bytes/param is the numel-weighted mean over its tensors, so an LLM-shaped list (nearly
all parameters in big matrices) sits near 40 B and a list of many small tensors near 32 B.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

# Elements per chunk when the backend cannot be asked (not importable, or a row that is not a
# fused backend but is modelled like one): the GPU kernels' 65536. The CPU backend reports its
# own 2^20.
DEFAULT_CHUNK_SIZE = 65536

FADAM_STATE_DTYPE = torch.float32  # docs/design.md section 5: momentum and fim are float32


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
                            chunk_size: int = DEFAULT_CHUNK_SIZE, reads_only: bool = False,
                            clipping: bool = True) -> int:
    """With clipping, 2G + 5S + 3P for multi-chunk tensors and 2G + 4S + 2P for one-chunk ones;
    without, 2G + 4S + 2P for every tensor. S = 4 (float32). Reads alone: 2G + 3S + 2P for the
    two-pass case, 2G + 2S + P otherwise."""
    p = _size(param_dtype)
    g = _size(grad_dtype or param_dtype)
    s = _size(FADAM_STATE_DTYPE)
    two_pass = clipping and numel > chunk_size  # only these re-read f and theta in phase A
    if reads_only:
        return 2 * g + 3 * s + 2 * p if two_pass else 2 * g + 2 * s + p
    return 2 * g + 5 * s + 3 * p if two_pass else 2 * g + 4 * s + 2 * p


def model_bytes(family: str, numels: Iterable[int], param_dtype: torch.dtype,
                grad_dtype: torch.dtype | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                reads_only: bool = False, clipping: bool = True) -> int:
    """Total bytes one step moves (or reads) for a list of tensor sizes; family is "adam" or
    "fadam" (`clipping` is FAdam's: clip > 0)."""
    total = 0
    for n in numels:
        if n == 0:
            continue  # an empty tensor moves nothing
        if family == "adam":
            total += n * adam_bytes_per_element(param_dtype, grad_dtype, reads_only)
        elif family == "fadam":
            total += n * fadam_bytes_per_element(n, param_dtype, grad_dtype, chunk_size, reads_only,
                                                 clipping)
        else:
            raise ValueError(f"unknown traffic family {family!r}; expected 'adam' or 'fadam'")
    return total


def bytes_per_param(family: str, numels: Sequence[int], param_dtype: torch.dtype,
                    grad_dtype: torch.dtype | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    reads_only: bool = False, clipping: bool = True) -> float:
    """The numel-weighted mean of the model over a workload (nan for an empty workload)."""
    n = sum(numels)
    if n == 0:
        return math.nan
    return model_bytes(family, numels, param_dtype, grad_dtype, chunk_size, reads_only,
                       clipping) / n
