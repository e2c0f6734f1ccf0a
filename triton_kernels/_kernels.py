"""The FAdam Triton kernels: one @triton.jit helper per piece of the per-element math, and the two
multi-tensor kernels of the two-phase step (docs/design.md, section 3).

[note: FAdam math lives here] (csrc/fadam_math.h) is the C++ twin of the helpers below; they mirror
it function for function (`_fim_update` = fim_update, `_fisher_denom` = fisher_denom,
`_fadam_update` = fadam_update, `_fim_coeffs` = fim_coeffs, `_clip_inv_scale` = clip_inv_scale).
Both phases call the same helpers on the same inputs, so the f (and ghat, w) that phase A reduces is
the f that phase B stores, instruction for instruction.

Precision (docs/design.md, section 5): every element is loaded from its storage dtype (float32 /
bfloat16 / float16 parameters and gradients, float32 fim and momentum) and converted to float32 on
load; all element math is float32 ("opmath"). Division and sqrt are the IEEE round-to-nearest forms
(tl.div_rn, tl.sqrt_rn): Triton's `/` and tl.sqrt on float32 lower to the approximate PTX
div.full.f32 / sqrt.approx.f32, which would differ from the C++ kernels by ulps. Step scalars
(b2hat, the clip scales) are float64, rounded to float32 once per program. Sums of squares
accumulate in float64: with eps = 1e-30 and an always-zero gradient w is about 1e29 and w^2 = 1e58
overflows float32 (max 3.4e38).

Work decomposition. A group's tensors are cut into chunks of `chunk_size` elements; one program
(CTA) owns one (tensor, chunk) pair, found by `_program_operands`, the one prologue of both kernels.
In the eager path (TABLE=True) the program reads its tensor's addresses, numel and first
partial-sum slot from one int64 metadata tensor ([note: Triton metadata tables] in launch.py), so one
launch covers any number of tensors. Under torch.compile tracing there are no addresses
(FakeTensors), so the host calls the same kernel per tensor with the tensors themselves as
arguments (TABLE=False, program id = chunk).

Inside a program the chunk is walked in tiles of BLOCK elements: full tiles unmasked, then one
masked tail tile. The split matters on the GPU: a masked load is only vectorised when the mask is
known constant over 4 lanes, which a runtime numel never is, so an all-masked loop would issue
32-bit loads. With ALIGNED (every address 16-byte aligned and chunk_size * itemsize a multiple of
16, checked on the host) the full tiles compile to 128-bit ld.global.v4 loads.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import _rounding as R

# Largest finite float32; |x| <= this is false exactly for inf, -inf and NaN (every comparison with
# NaN is false). A comparison is not folded away by the compiler the way `x * 0` could be under
# fast-math flags, and it costs one FSETP per element.
_FLT_MAX = tl.constexpr(3.4028234663852886e38)

# Row layout of the metadata tensor, the same in both kernels: row r, tensor t is
# meta[r * n_tensors + t]; phase B has one more row (momentums) after the six common ones; the
# block map follows the rows, one int64 per program: (tensor index << 32) | chunk index.
# _ops._Call.table writes the rows in this order.
ROW_P, ROW_G, ROW_F, ROW_STEP, ROW_NUMEL, ROW_SLOT, ROW_M = (tl.constexpr(i) for i in range(7))


# ---------------------------------------------------------------------------------------------
# The per-element math: mirrors csrc/fadam_math.h.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pow64(x, y, INTERPRET: tl.constexpr):
    """x ** y in float64 (x >= 0). On the GPU, libdevice's __nv_pow (as ::pow in fadam_math.h);
    Triton's interpreter has no libdevice, so there exp2(y log2 x) in numpy float64 (pow(x, 0) = 1
    kept explicitly: 0 * log2(0) would be NaN)."""
    if INTERPRET:
        r = tl.where(y == 0.0, 1.0, tl.exp2(y * tl.log2(x)))
    else:
        r = libdevice.pow(x, y)
    return r


@triton.jit
def _b2hat(step_ptr, beta2, INTERPRET: tl.constexpr):
    """b2hat_of() in float64: beta2 (1 - beta2^(t-1)) / (1 - beta2^t) for this tensor's step
    t >= 1 (already incremented), read from the device: 0 at t = 1, tending to beta2. FAdafactor's
    row and column sums use it unrounded (factor_update is float64)."""
    t = tl.load(step_ptr).to(tl.float64)
    b = tl.full([], beta2, tl.float64)
    num = 1.0 - _pow64(b, t - 1.0, INTERPRET)
    den = 1.0 - _pow64(b, t, INTERPRET)
    return b * num / den


@triton.jit
def _fim_coeffs(step_ptr, beta2, INTERPRET: tl.constexpr):
    """(b2hat, 1 - b2hat) as float32, both rounded from the float64 _b2hat."""
    bh = _b2hat(step_ptr, beta2, INTERPRET)
    return bh.to(tl.float32), (1.0 - bh).to(tl.float32)


@triton.jit
def _fim_update(f, g, b2hat, omb2):
    """f = b2hat f + (1 - b2hat) g^2"""
    return b2hat * f + omb2 * (g * g)


@triton.jit
def _fisher_denom(f, p, eps_p, SQRT: tl.constexpr, INTERPRET: tl.constexpr):
    """d = f^p + eps^(2p); SQRT is the p = 0.5 path (IEEE sqrt, far cheaper than powf)."""
    if SQRT:
        fp = tl.sqrt_rn(f)
    elif INTERPRET:
        fp = tl.exp2(p * tl.log2(f.to(tl.float64))).to(tl.float32)
    else:
        fp = libdevice.pow(f, p)
    return fp + eps_p


@triton.jit
def _fadam_update(theta, m, ghat, w, beta1, omb1, inv_s1, inv_s2, lr, wd):
    """m = beta1 m + (1 - beta1) ghat / s1;  theta = theta - lr (m + wd w / s2)"""
    m = beta1 * m + omb1 * (ghat * inv_s1)
    theta = theta - lr * (m + wd * (w * inv_s2))
    return theta, m


@triton.jit
def _clip_inv_scale(sumsq, numel, clip):
    """1 / max(1, sqrt(sumsq / numel) / clip) in float64. The caller only asks when clip > 0 and
    numel > 0 (otherwise the scale is 1). A non-finite sum (a NaN or inf in the parameter behind
    w) means s = inf: 1 / s = 0, so that tensor's clipped weight decay is 0 for the step and the
    NaN stays in its own element (docs/design.md, section 6). An inf s takes the first branch
    (1 / inf = 0); a NaN s fails both comparisons."""
    s = tl.sqrt(sumsq / numel.to(tl.float64)) / clip
    return tl.where(s > 1.0, 1.0 / s, tl.where(s <= 1.0, 1.0, 0.0))


@triton.jit
def _nonfinite(x):
    """1 (int32) where x is inf, -inf or NaN, else 0."""
    return (~(tl.abs(x) <= _FLT_MAX)).to(tl.int32)


# [note: the gradient overflow rule]
# A step is skipped (skip = 1, exactly as for a NaN gradient) when, for any gradient element,
# g = grad * multiplier (the float32 scaled, sign-applied gradient: _grad_mul) has a float32
# square g * g that is not finite. g^2 is what the FIM takes in (FAdam's f, FAdafactor's row and
# column sums): an inf there would make f inf for good (d = inf, ghat = 0: the tensor never moves
# again), or NaN. The rule covers NaN and inf gradients (their squares are NaN and inf) and finite
# |g| >= 2^64 = 1.8446744e19, whose square rounds past FLT_MAX = 3.4028235e38 (g = 1e19, square
# 1e38, passes; 1e20 does not). It holds in every FAdam phase-A program, the one-chunk tensors'
# that only read g included, and in FAdafactor's phase S, which also skips when a new row or
# column sum, rounded to float32, is not finite (_fadafactor_kernels._combine_kernel). The CPU
# and CUDA kernels apply the same rule.
@triton.jit
def _square_overflows(g):
    """[note: the gradient overflow rule]: 1 (int32) where g * g (float32) is not finite."""
    return _nonfinite(g * g)


@triton.jit
def _grad_mul(gscale_ptr, sign, HAS_GSCALE: tl.constexpr):
    """The factor every gradient element is multiplied by: (maximize ? -1 : 1) / grad_scale,
    formed in float64 and rounded once to float32, as the CPU kernel's make_consts does."""
    mul = tl.full([], sign, tl.float64)
    if HAS_GSCALE:
        mul = mul / tl.load(gscale_ptr).to(tl.float64)
    return mul.to(tl.float32)


# ---------------------------------------------------------------------------------------------
# Tiles and chunks. Pointers arrive already offset to the chunk's first element; `n` (int32) is
# the chunk's element count; offsets inside a chunk fit int32 (chunk_size < 2^31).
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load(ptr, o, n, other, MASKED: tl.constexpr):
    """ptr[o] of one tile: masked to o < n (`other` past the end) in the tail tile, unmasked in a
    full one, so that an aligned full tile can load 128 bits at a time (module docstring)."""
    if MASKED:
        x = tl.load(ptr + o, mask=o < n, other=other)
    else:
        x = tl.load(ptr + o)
    return x


@triton.jit
def _store(ptr, o, n, x, MASKED: tl.constexpr):
    """ptr[o] = x for one tile, masked as _load."""
    if MASKED:
        tl.store(ptr + o, x, mask=o < n)
    else:
        tl.store(ptr + o, x)


@triton.jit
def _reduce_tile(p_ptr, g_ptr, f_ptr, o, n, b2hat, omb2, p, eps_p, gmul,
                 SQRT: tl.constexpr, INTERPRET: tl.constexpr, MASKED: tl.constexpr):
    """Phase A on one tile: float64 ghat^2 and w^2 and the overflow flag per lane ([note: the
    gradient overflow rule])."""
    g = _load(g_ptr, o, n, 0.0, MASKED).to(tl.float32)
    f = _load(f_ptr, o, n, 1.0, MASKED)
    th = _load(p_ptr, o, n, 0.0, MASKED).to(tl.float32)
    g = g * gmul
    f = _fim_update(f, g, b2hat, omb2)
    d = _fisher_denom(f, p, eps_p, SQRT, INTERPRET)
    ghat = tl.div_rn(g, d).to(tl.float64)
    w = tl.div_rn(th, d).to(tl.float64)
    g2 = ghat * ghat
    w2 = w * w
    bad = _square_overflows(g)
    if MASKED:
        # Lanes past the end hold g = 0, f = 1, theta = 0: harmless, but zero them explicitly so
        # no choice of eps (eps^(2p) may round to 0 in float32) can leak a NaN into the sums.
        g2 = tl.where(o < n, g2, 0.0)
        w2 = tl.where(o < n, w2, 0.0)
    return g2, w2, bad


@triton.jit
def _reduce_chunk(p_ptr, g_ptr, f_ptr, n, b2hat, omb2, p, eps_p, gmul,
                  SQRT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
    """(sum ghat^2, sum w^2) in float64 and the overflow flag of one chunk."""
    offs = tl.arange(0, BLOCK)
    acc_g = tl.zeros([BLOCK], tl.float64)
    acc_w = tl.zeros([BLOCK], tl.float64)
    bad = tl.zeros([BLOCK], tl.int32)
    n_full = (n // BLOCK) * BLOCK
    for k in range(0, n_full, BLOCK):
        g2, w2, b = _reduce_tile(p_ptr, g_ptr, f_ptr, k + offs, n, b2hat, omb2, p, eps_p, gmul,
                                 SQRT, INTERPRET, False)
        acc_g += g2
        acc_w += w2
        bad = tl.maximum(bad, b)
    if n_full < n:
        g2, w2, b = _reduce_tile(p_ptr, g_ptr, f_ptr, n_full + offs, n, b2hat, omb2, p, eps_p,
                                 gmul, SQRT, INTERPRET, True)
        acc_g += g2
        acc_w += w2
        bad = tl.maximum(bad, b)
    # tl.sum is a fixed tree over lanes and warps: the same order every run (deterministic).
    return tl.sum(acc_g, axis=0), tl.sum(acc_w, axis=0), tl.max(bad, axis=0)


@triton.jit
def _check_chunk(g_ptr, n, gmul, BLOCK: tl.constexpr):
    """The overflow flag of one chunk's gradient, reading g alone: phase A of a tensor that
    phase B does alone, or of any tensor with clipping off."""
    offs = tl.arange(0, BLOCK)
    bad = tl.zeros([BLOCK], tl.int32)
    n_full = (n // BLOCK) * BLOCK
    for k in range(0, n_full, BLOCK):
        g = tl.load(g_ptr + k + offs).to(tl.float32) * gmul
        bad = tl.maximum(bad, _square_overflows(g))
    if n_full < n:
        o = n_full + offs
        g = tl.load(g_ptr + o, mask=o < n, other=0.0).to(tl.float32) * gmul
        bad = tl.maximum(bad, _square_overflows(g))
    return tl.max(bad, axis=0)


@triton.jit
def _to_storage(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 -> the parameter's storage dtype, rounding to nearest even as torch's .to() does.
    On the GPU that is the plain cast (cvt.rn.bf16.f32 / cvt.rn.f16.f32). Triton 3.8's interpreter
    truncates float32 -> bfloat16 instead (its create_fp_trunc passes no rounding mode), so there
    the rounding is done by hand on the bits: add 0x7FFF plus the lowest kept bit, keep the top 16.
    A NaN (a NaN parameter stays NaN, docs/design.md section 6) takes the plain cast: the carry
    could turn its payload into an infinity."""
    if INTERPRET and DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        y = (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        y = tl.where(x == x, y, x.to(DTYPE))
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def _store_update(p_ptr, m_ptr, o, th, m, sr, SR_P: tl.constexpr, SR_M: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """theta and m in their storage dtypes: a bfloat16 one stochastically rounded when SR_P /
    SR_M ([note: stochastic rounding]; `sr` = (key, e0, base, inner_local, inner_global)), else
    to nearest. Shared by FAdam's and FAdafactor's phase B."""
    key, e0, base, inner_local, inner_global = sr
    if SR_P:
        th = R.rounded(th, o, key, e0, base, inner_local, inner_global, 0)
    else:
        th = _to_storage(th, p_ptr.dtype.element_ty, INTERPRET)
    if SR_M:
        m = R.rounded(m, o, key, e0, base, inner_local, inner_global, 1)
    else:
        m = _to_storage(m, m_ptr.dtype.element_ty, INTERPRET)
    return th, m


@triton.jit
def _sr_row(rnd, rnd_in, t, step_ptr, c, chunk_size, SR: tl.constexpr, TABLE: tl.constexpr):
    """(key, e0, base, inner_local, inner_global) of this program's chunk c: its tensor's
    stochastic-rounding row and the chunk's first element; zeros without SR."""
    e0 = c * chunk_size
    if SR:
        key, base, inner_local, inner_global = R.row(rnd, rnd_in, t, step_ptr, TABLE)
    else:
        key = tl.full([], 0, tl.uint32)
        base = e0 * 0
        inner_local = e0 * 0 + 1
        inner_global = e0 * 0 + 1
    return key, e0, base, inner_local, inner_global


@triton.jit
def _update_tile(p_ptr, g_ptr, f_ptr, m_ptr, o, n, b2hat, omb2, p, eps_p, gmul,
                 beta1, omb1, inv_s1, inv_s2, lr, wd, sr,
                 SQRT: tl.constexpr, INTERPRET: tl.constexpr, MASKED: tl.constexpr,
                 SR_P: tl.constexpr, SR_M: tl.constexpr):
    """Phase B on one tile: the new f, m and theta, stored in their storage dtypes."""
    g = _load(g_ptr, o, n, 0.0, MASKED).to(tl.float32)
    f = _load(f_ptr, o, n, 1.0, MASKED)
    m = _load(m_ptr, o, n, 0.0, MASKED).to(tl.float32)
    th = _load(p_ptr, o, n, 0.0, MASKED).to(tl.float32)
    g = g * gmul
    f = _fim_update(f, g, b2hat, omb2)
    d = _fisher_denom(f, p, eps_p, SQRT, INTERPRET)
    ghat = tl.div_rn(g, d)
    w = tl.div_rn(th, d)
    th, m = _fadam_update(th, m, ghat, w, beta1, omb1, inv_s1, inv_s2, lr, wd)
    th, m = _store_update(p_ptr, m_ptr, o, th, m, sr, SR_P, SR_M, INTERPRET)
    _store(f_ptr, o, n, f, MASKED)
    _store(m_ptr, o, n, m, MASKED)
    _store(p_ptr, o, n, th, MASKED)


@triton.jit
def _update_chunk(p_ptr, g_ptr, f_ptr, m_ptr, n, b2hat, omb2, p, eps_p, gmul,
                  beta1, omb1, inv_s1, inv_s2, lr, wd, sr,
                  SQRT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr,
                  SR_P: tl.constexpr, SR_M: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    n_full = (n // BLOCK) * BLOCK
    for k in range(0, n_full, BLOCK):
        _update_tile(p_ptr, g_ptr, f_ptr, m_ptr, k + offs, n, b2hat, omb2, p, eps_p, gmul,
                     beta1, omb1, inv_s1, inv_s2, lr, wd, sr, SQRT, INTERPRET, False, SR_P, SR_M)
    if n_full < n:
        _update_tile(p_ptr, g_ptr, f_ptr, m_ptr, n_full + offs, n, b2hat, omb2, p, eps_p, gmul,
                     beta1, omb1, inv_s1, inv_s2, lr, wd, sr, SQRT, INTERPRET, True, SR_P, SR_M)


@triton.jit
def _sum_slots(partials, first, nslots, SLOT_BLOCK: tl.constexpr):
    """This tensor's (sum ghat^2, sum w^2): its `nslots` slots from row `first` of partials.
    Lane j adds slots j, j + SLOT_BLOCK, ... in order, then a fixed tree: deterministic, and every
    program of the tensor gets the same bits."""
    offs = tl.arange(0, SLOT_BLOCK)
    acc_g = tl.zeros([SLOT_BLOCK], tl.float64)
    acc_w = tl.zeros([SLOT_BLOCK], tl.float64)
    for k in range(0, nslots, SLOT_BLOCK):
        o = k + offs
        mask = o < nslots
        row = (first + o) * 2
        acc_g += tl.load(partials + row, mask=mask, other=0.0)
        acc_w += tl.load(partials + row + 1, mask=mask, other=0.0)
    return tl.sum(acc_g, axis=0), tl.sum(acc_w, axis=0)


# ---------------------------------------------------------------------------------------------
# The two kernels. Argument conventions (the same leading operands in both, so one host launch
# helper serves both: launch.run):
#   TABLE=True:  meta (int64 [ROWS * n_tensors + n_programs]) holds addresses, numels, slots and
#                the block map; the *_in arguments are None.
#   TABLE=False: meta is None; the *_in arguments are this one tensor's operands, numel and first
#                slot; the program id is the chunk index.
#   m_in is None in phase A (HAS_M=False: it reads no momentum).
# Scalars: beta2 and clip are float64 (b2hat and the clip scales are float64 step scalars; a float32
# 0.999 is 0.99900001287 and would shift b2hat); the element-math scalars are float32.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pointer(meta, row, n_tensors, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(meta + row * n_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _block(meta, blocks, TABLE: tl.constexpr):
    """This program's (tensor, index): with a table its entry of the block map at meta + blocks,
    (tensor << 32) | index; on the traced path (one tensor) (0, program id). Both int64."""
    pid = tl.program_id(0)
    if TABLE:
        blk = tl.load(meta + blocks + pid)
        t = blk >> 32
        idx = blk & 0xFFFFFFFF
    else:
        idx = pid.to(tl.int64)
        t = idx * 0
    return t, idx


@triton.jit
def _operand(meta, row, n_tensors, t, ptr_in, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
             TABLE: tl.constexpr):
    """Tensor t's operand: with a table the address in `row` as a DTYPE pointer, on the traced
    path the tensor argument ptr_in."""
    if TABLE:
        ptr = _pointer(meta, row, n_tensors, t, DTYPE, ALIGNED)
    else:
        ptr = ptr_in
    return ptr


@triton.jit
def _size(meta, row, n_tensors, t, size_in, TABLE: tl.constexpr):
    """Tensor t's size (numel, a slot, an offset, ...) as int64: with a table the value in `row`,
    on the traced path the argument size_in, an int32 below 2^31 (not specialised), widened
    before any product (numel + chunk_size - 1 would wrap in int32)."""
    if TABLE:
        v = tl.load(meta + row * n_tensors + t)
    else:
        v = size_in.to(tl.int64)
    return v


@triton.jit
def _offset(ptr, start, ALIGNED: tl.constexpr):
    """ptr + start, 16-byte aligned with ALIGNED (the host checked every address and
    chunk_size * itemsize)."""
    ptr += start
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _program_operands(meta, n_tensors, p_in, g_in, f_in, step_in, m_in, numel_in, slot_in,
                      chunk_size, DTYPE: tl.constexpr, HAS_M: tl.constexpr,
                      ALIGNED: tl.constexpr, TABLE: tl.constexpr,
                      MDTYPE: tl.constexpr = tl.float32):
    """The prologue of both kernels: this program's chunk c of its tensor, the operands offset to
    the chunk's first element, the tensor's numel and first slot, and the chunk's element count n
    (int32), and the tensor's index t (0 on the traced path). Without HAS_M the momentum pointer
    is the fim's (never dereferenced); MDTYPE is the momentum's dtype (momentum_dtype)."""
    if HAS_M:
        blocks = (ROW_M + 1) * n_tensors
    else:
        blocks = ROW_M * n_tensors
    t, c = _block(meta, blocks, TABLE)
    p_ptr = _operand(meta, ROW_P, n_tensors, t, p_in, DTYPE, ALIGNED, TABLE)
    g_ptr = _operand(meta, ROW_G, n_tensors, t, g_in, DTYPE, ALIGNED, TABLE)
    f_ptr = _operand(meta, ROW_F, n_tensors, t, f_in, tl.float32, ALIGNED, TABLE)
    if HAS_M:
        m_ptr = _operand(meta, ROW_M, n_tensors, t, m_in, MDTYPE, ALIGNED, TABLE)
    else:
        m_ptr = f_ptr
    step_ptr = _operand(meta, ROW_STEP, n_tensors, t, step_in, tl.float32, False, TABLE)
    numel = _size(meta, ROW_NUMEL, n_tensors, t, numel_in, TABLE)
    slot = _size(meta, ROW_SLOT, n_tensors, t, slot_in, TABLE)
    # 64-bit chunk start: a tensor may hold more than 2^31 elements.
    start = c * chunk_size
    n = tl.minimum(numel - start, chunk_size).to(tl.int32)
    p_ptr = _offset(p_ptr, start, ALIGNED)
    g_ptr = _offset(g_ptr, start, ALIGNED)
    f_ptr = _offset(f_ptr, start, ALIGNED)
    m_ptr = _offset(m_ptr, start, ALIGNED)
    return p_ptr, g_ptr, f_ptr, m_ptr, step_ptr, numel, slot, c, n, t


# n_tensors, numel_in and slot_in are not specialised (Triton would otherwise compile separate
# variants for the value 1 and for multiples of 16 of each): they only index tables and bound loops.
@triton.jit(do_not_specialize=["n_tensors", "numel_in", "slot_in"])
def _phase_a_kernel(
    meta, n_tensors,
    p_in, g_in, f_in, step_in, m_in, numel_in, slot_in,
    partials, skip, gscale,
    beta2: tl.float64, p, eps_p, clip: tl.float64, sign, chunk_size, fuse_one_chunk,
    DTYPE: tl.constexpr, HAS_GSCALE: tl.constexpr, SQRT: tl.constexpr, ALIGNED: tl.constexpr,
    TABLE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr,
):
    p_ptr, g_ptr, f_ptr, _m_ptr, step_ptr, numel, slot, c, n, _t = _program_operands(
        meta, n_tensors, p_in, g_in, f_in, step_in, m_in, numel_in, slot_in, chunk_size,
        DTYPE, False, ALIGNED, TABLE)
    gmul = _grad_mul(gscale, sign, HAS_GSCALE)
    if (clip <= 0.0) | ((numel <= chunk_size) & fuse_one_chunk):
        # Clipping off (no sums at all), or phase B does this one-chunk tensor alone: phase A
        # only applies the overflow rule, reading g alone, and writes no slot.
        bad = _check_chunk(g_ptr, n, gmul, BLOCK)
    else:
        b2hat, omb2 = _fim_coeffs(step_ptr, beta2, INTERPRET)
        sum_g, sum_w, bad = _reduce_chunk(p_ptr, g_ptr, f_ptr, n, b2hat, omb2, p, eps_p, gmul,
                                          SQRT, INTERPRET, BLOCK)
        row = (slot + c) * 2
        tl.store(partials + row, sum_g)
        tl.store(partials + row + 1, sum_w)
    # Only ever 1.0, from any number of programs: a benign race, no atomics needed.
    if bad != 0:
        tl.store(skip, 1.0)


@triton.jit(do_not_specialize=["n_tensors", "numel_in", "slot_in"])
def _phase_b_kernel(
    meta, n_tensors,
    p_in, g_in, f_in, step_in, m_in, numel_in, slot_in, rnd_in,
    partials, skip, gscale, lr_ptr, rnd,
    lr, beta1, omb1, beta2: tl.float64, eps_p, p, clip: tl.float64, wd, sign,
    chunk_size, fuse_one_chunk,
    DTYPE: tl.constexpr, HAS_GSCALE: tl.constexpr, HAS_LR: tl.constexpr, SQRT: tl.constexpr,
    ALIGNED: tl.constexpr, TABLE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr, SLOT_BLOCK: tl.constexpr,
    MDTYPE: tl.constexpr, SR: tl.constexpr, SR_P: tl.constexpr, SR_M: tl.constexpr,
):
    # A gradient anywhere in the step whose square is not finite ([note: the gradient overflow
    # rule]), or GradScaler's found_inf: change nothing.
    if tl.load(skip) == 0.0:
        p_ptr, g_ptr, f_ptr, m_ptr, step_ptr, numel, slot, c, n, t = _program_operands(
            meta, n_tensors, p_in, g_in, f_in, step_in, m_in, numel_in, slot_in, chunk_size,
            DTYPE, True, ALIGNED, TABLE, MDTYPE)
        sr = _sr_row(rnd, rnd_in, t, step_ptr, c, chunk_size, SR, TABLE)
        gmul = _grad_mul(gscale, sign, HAS_GSCALE)
        b2hat, omb2 = _fim_coeffs(step_ptr, beta2, INTERPRET)
        if HAS_LR:
            lr_v = tl.load(lr_ptr).to(tl.float32)
        else:
            lr_v = lr
        inv_s1 = tl.full([], 1.0, tl.float64)
        inv_s2 = tl.full([], 1.0, tl.float64)
        # Clipping off: no slot is read and a one-chunk tensor takes a single pass (s1 = s2 = 1).
        if clip > 0.0:
            if (numel <= chunk_size) & fuse_one_chunk:
                # One-chunk tensor done in this one program: phase A's reduction first, then the
                # update re-reads the same chunk (at most chunk_size elements, so from L2 while
                # the group's working set fits it).
                sum_g, sum_w, _bad = _reduce_chunk(p_ptr, g_ptr, f_ptr, n, b2hat, omb2, p, eps_p,
                                                   gmul, SQRT, INTERPRET, BLOCK)
            else:
                nslots = tl.maximum((numel + chunk_size - 1) // chunk_size, 1)
                sum_g, sum_w = _sum_slots(partials, slot, nslots, SLOT_BLOCK)
            inv_s1 = _clip_inv_scale(sum_g, numel, clip)
            inv_s2 = _clip_inv_scale(sum_w, numel, clip)
        _update_chunk(p_ptr, g_ptr, f_ptr, m_ptr, n, b2hat, omb2, p, eps_p, gmul,
                      beta1, omb1, inv_s1.to(tl.float32), inv_s2.to(tl.float32), lr_v, wd, sr,
                      SQRT, INTERPRET, BLOCK, SR_P, SR_M)
