"""bfloat16 stochastic rounding in Triton: the one @triton.jit twin of csrc/stochastic_round.h
([note: stochastic rounding] in fadam_fused/op_contract.py; the oracle is fadam_fused/reference.py's
rounding_bits / round_bf16_stochastic). Every Triton update kernel (FAdam's and FAdafactor's phase
B, AdaFisher's update) stores a bfloat16 parameter or momentum through `store_value`.

The hash is uint32 arithmetic (multiplies wrap mod 2^32, shifts are logical), the same in the
interpreter (numpy uint32) and on the GPU. The per-tensor part, fmix32(seed ^ t), is computed once
per program (`tensor_key`); each element then pays two fmix32 per stream (the stream's key and
its pair's hash: memory-bound kernels, so no lane shares them).
"""

from __future__ import annotations

import triton
import triton.language as tl

# The rounding row of a tensor in a kernel's `rnd` argument: int64 [seed, base, inner_local,
# inner_global], the op's `rounding` list.
ROUND_FIELDS = 4


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finaliser on uint32 values."""
    h = h ^ (h >> 16)
    h = h * tl.full([], 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full([], 0xC2B2AE35, tl.uint32)
    h = h ^ (h >> 16)
    return h


@triton.jit
def tensor_key(seed, step_ptr):
    """fmix32(lo32(seed) ^ t), t = the tensor's step (after the increment) as an integer."""
    t = tl.load(step_ptr).to(tl.int64).to(tl.uint32)
    s = (seed & 0xFFFFFFFF).to(tl.uint32)
    return _fmix32(s ^ t)


@triton.jit
def logical_index(e, base, inner_local, inner_global):
    """The logical index (int64) of local elements `e` (int64, memory order)."""
    q = e // inner_local
    return base + q * inner_global + (e - q * inner_local)


@triton.jit
def round_bf16(x, key, index, STREAM: tl.constexpr):
    """float32 `x` to bfloat16 by stochastic rounding with the bits of (key, index, STREAM):
    the upper 16 bits of bits(x) + r for finite x; inf and NaN to nearest (NaN -> 0x7FC0, as
    torch's cast)."""
    pair = index >> 1
    lo = (pair & 0xFFFFFFFF).to(tl.uint32)
    hi = (pair >> 32).to(tl.uint32)
    if STREAM == 0:
        k = _fmix32(key ^ hi)
    else:
        k = _fmix32(key ^ hi ^ tl.full([], 0x9E3779B9, tl.uint32))
    h = _fmix32(k ^ lo)
    r = tl.where((index & 1) == 0, h & 0xFFFF, h >> 16)
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + r) >> 16
    special = (u & 0x7F800000) == 0x7F800000
    nearest = tl.where((u & 0x007FFFFF) != 0, tl.full([], 0x7FC0, tl.uint32), u >> 16)
    bits = tl.where(special, nearest, rounded)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def row(rnd, rnd_in, t, step_ptr, TABLE: tl.constexpr):
    """(key, base, inner_local, inner_global) of this program's tensor: its row of the rounding
    list, from `rnd` (int64 [4 n], the whole list) at tensor t, or (the traced path) `rnd_in`
    (its own row)."""
    if TABLE:
        ptr = rnd + 4 * t
    else:
        ptr = rnd_in
    key = tensor_key(tl.load(ptr), step_ptr)
    return key, tl.load(ptr + 1), tl.load(ptr + 2), tl.load(ptr + 3)


@triton.jit
def rounded(x, o, key, e0, base, inner_local, inner_global, STREAM: tl.constexpr):
    """float32 `x` at chunk offsets `o` (local elements e0 + o) rounded stochastically."""
    index = logical_index(e0 + o.to(tl.int64), base, inner_local, inner_global)
    return round_bf16(x, key, index, STREAM)
