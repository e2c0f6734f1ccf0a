"""Bytes moved per parameter per optimizer step: the traffic model of docs/design.md section 4
(FAdafactor's: section 8).

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

  FAdafactor (docs/design.md section 8), tensor of 2+ dims: f is never stored; it is computed from
  the row and column sums R, C (O(n + m) floats per matrix, negligible), so FAdam's three accesses
  of f (S in phase A, 2S in phase B) go away, and a phase S before them reads g for R and C:
      phase S: read g (row / column sums of g^2, and the non-finite check)   = G
      phase A: read g, theta (the two RMS sums)                              = G + P
      phase B: read g, m, theta; write m, theta                              = G + 2S + 2P
      multi-chunk tensor with clipping: total            = 3G + 2S + 3P  (fp32: 4 + 8 + 20 = 32 B)
  Clipping off: phase A is not run                       = 2G + 2S + 2P  (fp32: 4 + 20 = 24 B)
  One-chunk tensor with clipping: phase A runs in the same task as phase B, which re-reads g and
  theta from cache, so as in FAdam's one-chunk case only the separate pass over g (here phase S)
  is counted besides the fused one                       = 2G + 2S + 2P  (fp32: 24 B)
  bf16 params and grads (S = 4): 20 B multi-chunk, 16 B otherwise. A tensor of fewer than 2 dims
  keeps FAdam's full f and costs FAdam's figure above. Not counted: phase S's float64 partial row
  and column sums, 2 x 8 x (1/tile_rows + 1/tile_cols) B written then read = 0.03 B at the CPU's
  1024 x 1024 tiles and 0.125 B at the GPU's 256 x 256 (fadam_fused/op_contract.py), under 0.4%
  of 32 B. Against Adam's 28 and FAdam's 40 (docs/design.md section 8: 32 B, 24 B with clipping
  off or one chunk).

  AdaFisher (fadam_fused.AdaFisher, AdaFisherW), every tensor: F = S H^T + damping is computed
  per element from the layer's two factor vectors (O(rows + cols) floats per tensor, read from
  cache, not counted), so the update reads g, m, theta and writes m, theta = G + 2S + 2P
  (fp32: 20 B). Before it the step checks every gradient for non-finite values, one more read of
  g, unless a GradScaler's found_inf already did (`checked=True`; the benchmark has no
  GradScaler, so its rows count the check)        = 2G + 2S + 2P  (fp32: 24 B; bf16: 16 B)
  S = 4: the momentum is float32 whatever the parameter dtype; 4 B of state per parameter, half
  of Adam's and FAdam's 8. The factor update (every `update_interval` steps: hooks, min-max, the
  running average) is not part of the step the kernels fuse and is not counted.

Reads alone (`reads_only=True`): Adam G + P + 2S (fp32 16 B); FAdam multi-chunk with clipping
2G + 3S + 2P (28 B); one-chunk or clipping off 2G + 2S + P (20 B); FAdafactor multi-chunk with
clipping 3G + S + 2P (24 B), one-chunk or clipping off 2G + S + P (16 B); AdaFisher 2G + S + P
(16 B; G + S + P = 12 B after a GradScaler's check). Where a machine's reads
saturate and its writes ride along, FAdam's time over Adam's follows the ratio of read bytes more
than that of total bytes (bench/NOTES.md has the measurements), so the run reports both.

A workload's bytes/param is the numel-weighted mean over its tensors, so an LLM-shaped list (nearly
all parameters in big matrices) sits near 40 B and a list of many small tensors near 32 B (FAdam;
FAdafactor near 32 B and 24 B on 2-D matrices, FAdam's figures on 1-D tensors; AdaFisher 24 B
on any list).

A workload is given as its tensors' shapes; a plain int is a 1-D tensor of that many elements
(only the "fadafactor" family looks at the number of dims).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence, Union

import torch

# Elements per chunk when the backend cannot be asked (not importable, or a row that is not a
# fused backend but is modelled like one): the GPU kernels' 65536. The CPU backend reports its
# own 2^20.
DEFAULT_CHUNK_SIZE = 65536

FADAM_STATE_DTYPE = torch.float32  # docs/design.md section 5: momentum and fim are float32

FAMILIES = ("adam", "fadam", "fadafactor", "adafisher")

Shape = Union[int, Sequence[int]]  # a tensor's shape, or the numel of a 1-D tensor


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


def fadafactor_bytes_per_element(numel: int, param_dtype: torch.dtype,
                                 grad_dtype: torch.dtype | None = None,
                                 chunk_size: int = DEFAULT_CHUNK_SIZE, reads_only: bool = False,
                                 clipping: bool = True) -> int:
    """A factored tensor (2+ dims): with clipping, 3G + 2S + 3P for multi-chunk tensors and
    2G + 2S + 2P for one-chunk ones; without, 2G + 2S + 2P for every tensor. S = 4 (the float32
    momentum). Reads alone: 3G + S + 2P for the three-pass case, 2G + S + P otherwise. A tensor
    of fewer dims costs fadam_bytes_per_element (model_bytes picks by shape)."""
    p = _size(param_dtype)
    g = _size(grad_dtype or param_dtype)
    s = _size(FADAM_STATE_DTYPE)
    three_pass = clipping and numel > chunk_size  # only these re-read g and theta in phase A
    if reads_only:
        return 3 * g + s + 2 * p if three_pass else 2 * g + s + p
    return 3 * g + 2 * s + 3 * p if three_pass else 2 * g + 2 * s + 2 * p


def adafisher_bytes_per_element(param_dtype: torch.dtype, grad_dtype: torch.dtype | None = None,
                                reads_only: bool = False, checked: bool = False) -> int:
    """2G + 2S + 2P (the non-finite check's read of g, then the update); G + 2S + 2P when a
    GradScaler's found_inf has checked the gradients already (`checked`). S = 4 (the float32
    momentum). Reads alone: 2G + S + P, or G + S + P."""
    p = _size(param_dtype)
    g = _size(grad_dtype or param_dtype)
    s = _size(FADAM_STATE_DTYPE)
    check = 0 if checked else g
    if reads_only:
        return check + g + s + p
    return check + g + 2 * s + 2 * p


def _shape(size: Shape) -> tuple[int, ...]:
    return (size,) if isinstance(size, int) else tuple(size)


def model_bytes(family: str, shapes: Iterable[Shape], param_dtype: torch.dtype,
                grad_dtype: torch.dtype | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                reads_only: bool = False, clipping: bool = True) -> int:
    """Total bytes one step moves (or reads) for a list of tensor shapes (an int: a 1-D tensor of
    that many elements); family is one of FAMILIES (`clipping` is FAdam's and FAdafactor's:
    clip > 0)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown traffic family {family!r}; expected one of {FAMILIES}")
    total = 0
    for size in shapes:
        shape = _shape(size)
        n = math.prod(shape)
        if n == 0:
            continue  # an empty tensor moves nothing
        if family == "adam":
            total += n * adam_bytes_per_element(param_dtype, grad_dtype, reads_only)
        elif family == "adafisher":  # every tensor alike: F comes from two small vectors
            total += n * adafisher_bytes_per_element(param_dtype, grad_dtype, reads_only)
        elif family == "fadafactor" and len(shape) >= 2:  # factored (reference.is_factored)
            total += n * fadafactor_bytes_per_element(n, param_dtype, grad_dtype, chunk_size,
                                                      reads_only, clipping)
        else:  # FAdam, and FAdafactor's tensors of fewer than 2 dims (full f)
            total += n * fadam_bytes_per_element(n, param_dtype, grad_dtype, chunk_size, reads_only,
                                                 clipping)
    return total


def bytes_per_param(family: str, shapes: Sequence[Shape], param_dtype: torch.dtype,
                    grad_dtype: torch.dtype | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    reads_only: bool = False, clipping: bool = True) -> float:
    """The numel-weighted mean of the model over a workload (nan for an empty workload)."""
    n = sum(math.prod(_shape(s)) for s in shapes)
    if n == 0:
        return math.nan
    return model_bytes(family, shapes, param_dtype, grad_dtype, chunk_size, reads_only,
                       clipping) / n
