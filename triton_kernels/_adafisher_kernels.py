"""AdaFisher's Triton kernels: the gradient check and the update of [note: the AdaFisher op
contract] (fadam_fused/op_contract.py), one program per (tensor, chunk), launched through
launch.py with _adafisher_ops.py's tables.

The element math mirrors [note: AdaFisher math] (csrc/fadam_math.h) step for step:
    F = S[e / cols] H[e % cols] + damping   (1 where cols == 0)
    AdaFisher:   m = beta m + (1 - beta) (g + wd theta);  theta = theta - float32(lr / bc) (m / F)
    AdaFisherW:  m = beta m + (1 - beta) g;               theta = theta - lr (m / bc / F + wd theta)
with bc = 1 - beta^t in float64, rounded to float32 once per program; divisions are IEEE
(tl.div_rn), as FAdam's kernels (_kernels.py says why). theta and m (float32 or bfloat16) are
stored as FAdam's phase B stores them: a bfloat16 one stochastically rounded with a rounding list
([note: stochastic rounding]; _rounding.py), else to nearest even.

F is never stored: a tile's rows and columns come from one int32 division of the element's
offset past the chunk's first row start (col0 + o < 2^31: cols < 2^30 and chunk_size <= 2^30,
checked on the host), and S and H are gathered (L1 / L2 hits: a program's chunk touches at most
chunk / cols + 1 values of S and cols of H).

Runtime arguments are ints and floats only (flags are constexprs): torch 2.11's interpreter path
with Triton 3.6 refuses Python bools as runtime kernel arguments.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _kernels as K

# Rows of the update's table (row r, tensor t at meta[r * n_tensors + t]); the check's table has
# CHECK_ROW_G and CHECK_ROW_NUMEL only. _adafisher_ops._Call.table writes them in this order.
ROW_P, ROW_G, ROW_M, ROW_STEP, ROW_NUMEL, ROW_S, ROW_H, ROW_COLS = (tl.constexpr(i)
                                                                    for i in range(8))
N_ROWS = 8
CHECK_ROW_G, CHECK_ROW_NUMEL = tl.constexpr(0), tl.constexpr(1)
N_CHECK_ROWS = 2


@triton.jit(do_not_specialize=["n_tensors", "numel_in"])
def _check_kernel(meta, n_tensors, g_in, numel_in, blocks, skip, gscale, chunk_size,
                  DTYPE: tl.constexpr, HAS_GSCALE: tl.constexpr, ALIGNED: tl.constexpr,
                  TABLE: tl.constexpr, BLOCK: tl.constexpr):
    """skip = 1 where a scaled g * g of this chunk is not finite ([note: the gradient overflow
    rule] in _kernels.py). Reads g alone."""
    t, c = K._block(meta, blocks, TABLE)
    g_ptr = K._operand(meta, CHECK_ROW_G, n_tensors, t, g_in, DTYPE, ALIGNED, TABLE)
    numel = K._size(meta, CHECK_ROW_NUMEL, n_tensors, t, numel_in, TABLE)
    start = c * chunk_size
    n = tl.minimum(numel - start, chunk_size).to(tl.int32)
    g_ptr = K._offset(g_ptr, start, ALIGNED)
    bad = K._check_chunk(g_ptr, n, K._grad_mul(gscale, 1.0, HAS_GSCALE), BLOCK)
    if bad != 0:
        tl.store(skip, 1.0)  # only ever 1, from any number of programs: no atomics needed


@triton.jit
def _store(p_ptr, m_ptr, o, n, theta, m, sr, MASKED: tl.constexpr, INTERPRET: tl.constexpr,
           SR_P: tl.constexpr, SR_M: tl.constexpr):
    """The one store of the update's results: theta and m (float32 or bfloat16) in their storage
    dtypes, a bfloat16 one stochastically rounded when SR_P / SR_M ([note: stochastic rounding];
    `sr` from _kernels._sr_row), else to nearest even: FAdam's _store_update."""
    th, m = K._store_update(p_ptr, m_ptr, o, theta, m, sr, SR_P, SR_M, INTERPRET)
    K._store(m_ptr, o, n, m, MASKED)
    K._store(p_ptr, o, n, th, MASKED)


@triton.jit
def _update_tile(p_ptr, g_ptr, m_ptr, s_ptr, h_ptr, o, n, nf, row0, col0, cols, gmul, a, bc,
                 beta, omb, wd, damping, sr, DECOUPLED: tl.constexpr, INTERPRET: tl.constexpr,
                 MASKED: tl.constexpr, SR_P: tl.constexpr, SR_M: tl.constexpr):
    g = K._load(g_ptr, o, n, 0.0, MASKED).to(tl.float32)
    m = K._load(m_ptr, o, n, 0.0, MASKED).to(tl.float32)
    th = K._load(p_ptr, o, n, 0.0, MASKED).to(tl.float32)
    g = g * gmul
    # F: nf is n, or 0 when cols == 0 (F = 1, S and H not read).
    q = col0 + o
    fmask = o < nf
    s = tl.load(s_ptr + (row0 + q // cols), mask=fmask, other=1.0)
    h = tl.load(h_ptr + q % cols, mask=fmask, other=1.0)
    fim = tl.where(fmask, s * h + damping, 1.0)
    if DECOUPLED:
        m = beta * m + omb * g
        th = th - a * (tl.div_rn(tl.div_rn(m, bc), fim) + wd * th)
    else:
        m = beta * m + omb * (g + wd * th)
        th = th - a * tl.div_rn(m, fim)
    _store(p_ptr, m_ptr, o, n, th, m, sr, MASKED, INTERPRET, SR_P, SR_M)


@triton.jit(do_not_specialize=["n_tensors", "numel_in", "s_in", "h_in", "cols_in"])
def _update_kernel(meta, n_tensors, p_in, g_in, m_in, step_in, numel_in, s_in, h_in, cols_in,
                   rnd_in, blocks, factors, skip, gscale, lr_ptr, rnd, lr64: tl.float64,
                   beta64: tl.float64, beta, omb, wd, damping, sign, chunk_size,
                   DTYPE: tl.constexpr, HAS_GSCALE: tl.constexpr, HAS_LR: tl.constexpr,
                   DECOUPLED: tl.constexpr, ALIGNED: tl.constexpr, TABLE: tl.constexpr,
                   INTERPRET: tl.constexpr, BLOCK: tl.constexpr, MDTYPE: tl.constexpr,
                   SR: tl.constexpr, SR_P: tl.constexpr, SR_M: tl.constexpr):
    # A gradient anywhere in the step whose square is not finite, or GradScaler's found_inf:
    # change nothing.
    if tl.load(skip) == 0.0:
        t, c = K._block(meta, blocks, TABLE)
        p_ptr = K._operand(meta, ROW_P, n_tensors, t, p_in, DTYPE, ALIGNED, TABLE)
        g_ptr = K._operand(meta, ROW_G, n_tensors, t, g_in, DTYPE, ALIGNED, TABLE)
        m_ptr = K._operand(meta, ROW_M, n_tensors, t, m_in, MDTYPE, ALIGNED, TABLE)
        step_ptr = K._operand(meta, ROW_STEP, n_tensors, t, step_in, tl.float32, False, TABLE)
        numel = K._size(meta, ROW_NUMEL, n_tensors, t, numel_in, TABLE)
        s_ptr = factors + K._size(meta, ROW_S, n_tensors, t, s_in, TABLE)
        h_ptr = factors + K._size(meta, ROW_H, n_tensors, t, h_in, TABLE)
        cols = K._size(meta, ROW_COLS, n_tensors, t, cols_in, TABLE)
        start = c * chunk_size  # int64: a tensor may hold more than 2^31 elements
        n = tl.minimum(numel - start, chunk_size).to(tl.int32)
        p_ptr = K._offset(p_ptr, start, ALIGNED)
        g_ptr = K._offset(g_ptr, start, ALIGNED)
        m_ptr = K._offset(m_ptr, start, ALIGNED)
        ncols = tl.maximum(cols, 1)
        row0 = start // ncols
        col0 = (start % ncols).to(tl.int32)
        cols32 = ncols.to(tl.int32)
        nf = tl.where(cols > 0, n, 0)
        gmul = K._grad_mul(gscale, sign, HAS_GSCALE)
        sr = K._sr_row(rnd, rnd_in, t, step_ptr, c, chunk_size, SR, TABLE)
        # bc and the step coefficient in float64, rounded once ([note: AdaFisher math]).
        if HAS_LR:
            lr_v = tl.load(lr_ptr).to(tl.float64)
        else:
            lr_v = tl.full([], lr64, tl.float64)
        tstep = tl.load(step_ptr).to(tl.float64)
        bc64 = 1.0 - K._pow64(tl.full([], beta64, tl.float64), tstep, INTERPRET)
        if DECOUPLED:
            a = lr_v.to(tl.float32)
        else:
            a = (lr_v / bc64).to(tl.float32)
        bc = bc64.to(tl.float32)
        offs = tl.arange(0, BLOCK)
        n_full = (n // BLOCK) * BLOCK
        for k in range(0, n_full, BLOCK):
            _update_tile(p_ptr, g_ptr, m_ptr, s_ptr, h_ptr, k + offs, n, nf, row0, col0, cols32,
                         gmul, a, bc, beta, omb, wd, damping, sr, DECOUPLED, INTERPRET, False,
                         SR_P, SR_M)
        if n_full < n:
            _update_tile(p_ptr, g_ptr, m_ptr, s_ptr, h_ptr, n_full + offs, n, nf, row0, col0,
                         cols32, gmul, a, bc, beta, omb, wd, damping, sr, DECOUPLED, INTERPRET,
                         True, SR_P, SR_M)
