"""The FAdafactor Triton kernels: the three phases of [note: the FAdafactor op contract]
(fadam_fused/op_contract.py), built on FAdam's helpers in _kernels.py.

[note: FAdafactor math] (csrc/fadam_math.h) has three pieces, mirrored here function for function:
`_factor_update` = factor_update, `_row_norm` = row_norm, `_factored_fim` = factored_fim. The rest
of the element math (d, ghat, w, m, theta, the clip scales, the storage rounding) is FAdam's own
helpers (_kernels._fisher_denom, _fadam_update, _clip_inv_scale, _to_storage). Phases A and B get
ghat and w from the same `_natural_tile`, so the f (and ghat, w) phase A reduces is the one phase
B applies, instruction for instruction.

Kernels and their programs (one launch each, any number of tensors):

- `_tiles_kernel` (phase S, first launch): one program per tile of tile_rows x tile_cols
  (op_contract.factor_tile) of every matrix. It walks its tile in blocks of whole tile rows
  ([S_ROWS, TILE_C]), writes each row's float64 sum of g^2 over the tile, keeps each column's in
  registers and writes them at the end, and stores 1 into skip where g * g is not finite in
  float32 ([note: the gradient overflow rule] in _kernels.py).
- `_combine_kernel` (phase S, second launch): one program per matrix. It adds each row's (column's)
  tile partials in tile order, writes the new R and C (factor_update in float64) and, after sum R
  (block sums in a fixed tree, blocks in row order), R / sum R. It stores 1 into skip when a new
  R_i or C_j is not finite in float32: the row sums of a (6, 9) gradient of 1e19 are 9e38 though
  each square (1e38) fits, the column sums of (2000, 2) at 5e17 are 5e38. The combine needs every
  tile of its matrix, so it cannot run in the tile launch without a grid-wide barrier; a second
  launch costs one launch latency per group, against a "last program does the combine" ticket,
  which would need an atomic counter zeroed before every step (a memset launch, or a persistent
  buffer that two streams could share) (docs/design.md, section 8).
- `_phase_a_kernel` / `_phase_b_kernel`: FAdam's (tensor, chunk) programs and slots; an element k
  of a chunk is row q = k // cols, column j = k % cols of the tensor's stacked matrices, and
  f = (R_q / sum R) C_j is gathered from `factors` (n + m floats per matrix, from L1/L2). Phase B
  also copies each tensor's new R and C into fim_rows / fim_cols, a slice per program.

Tables: every kernel takes one int64 metadata tensor (launch.py) with the rows ROW_* per
tensor, then the block maps, each entry (tensor << 32) | index; `blocks` is where this kernel's
block map starts. Without a table (TABLE=False, the traced path) the *_in arguments are one
tensor's operands and the program id is the index.

Precision as FAdam's (_kernels.py): elements in float32, the sums of squares in float64 (g^2 of a
finite float32 g cannot overflow there, nor w^2 with eps = 1e-30); the new R and C are float32,
where the overflow rule keeps them finite.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _kernels as K

# Per-tensor rows of the metadata tensor (row r, tensor t at meta[r * n_tensors + t]); operands a
# phase does not take are 0 (never dereferenced). _fadafactor_ops._Call.table writes this order.
(ROW_P, ROW_G, ROW_M, ROW_RS, ROW_CS, ROW_STEP, ROW_NUMEL, ROW_BATCH, ROW_ROWS, ROW_COLS,
 ROW_TILE_R, ROW_TILE_C, ROW_SLOT, ROW_FPART, ROW_FAC) = (tl.constexpr(i) for i in range(15))
N_ROWS = 15


# ---------------------------------------------------------------------------------------------
# The FAdafactor per-element math: mirrors [note: FAdafactor math] in csrc/fadam_math.h.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _factor_update(old, sum_sq, b2hat):
    """New R_i (or C_j): b2hat old + (1 - b2hat) sum_j g_ij^2, in float64, rounded once."""
    return (b2hat * old.to(tl.float64) + (1.0 - b2hat) * sum_sq).to(tl.float32)


@triton.jit
def _row_norm(row, total):
    """R_i / sum R, or 0 when sum R is 0 (an all-zero gradient at step 1: f = 0, no 0 / 0)."""
    safe = tl.where(total > 0.0, total, 1.0)
    return tl.where(total > 0.0, row.to(tl.float64) / safe, 0.0).to(tl.float32)


@triton.jit
def _factored_fim(row_norm_i, col_j):
    """f_ij = (R_i / sum R) C_j (R_i / sum R <= 1 first: R_i C_j alone overflows for |g| ~ 1e9
    on a 1000 x 1000 matrix)."""
    return row_norm_i * col_j


# ---------------------------------------------------------------------------------------------
# The program prologue, shared by the four kernels.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _operands(meta, n_tensors, blocks, p_in, g_in, m_in, rs_in, cs_in, step_in, numel_in,
              batch_in, rows_in, cols_in, tile_r_in, tile_c_in, slot_in, fpart_in, fac_in,
              DTYPE: tl.constexpr, TABLE: tl.constexpr, MDTYPE: tl.constexpr = tl.float32):
    """This program's index (tile, matrix or chunk, by kernel) and its tensor's operands and
    sizes: (idx, p, g, m, rs, cs, step, numel, batch, rows, cols, tile_r, tile_c, slot, fpart,
    fac).
    Sizes are int64; fpart and fac are the tensor's first elements of factor_partials and
    factors."""
    t, idx = K._block(meta, blocks, TABLE)
    p_ptr = K._operand(meta, ROW_P, n_tensors, t, p_in, DTYPE, False, TABLE)
    g_ptr = K._operand(meta, ROW_G, n_tensors, t, g_in, DTYPE, False, TABLE)
    m_ptr = K._operand(meta, ROW_M, n_tensors, t, m_in, MDTYPE, False, TABLE)
    rs_ptr = K._operand(meta, ROW_RS, n_tensors, t, rs_in, tl.float32, False, TABLE)
    cs_ptr = K._operand(meta, ROW_CS, n_tensors, t, cs_in, tl.float32, False, TABLE)
    step_ptr = K._operand(meta, ROW_STEP, n_tensors, t, step_in, tl.float32, False, TABLE)
    numel = K._size(meta, ROW_NUMEL, n_tensors, t, numel_in, TABLE)
    batch = K._size(meta, ROW_BATCH, n_tensors, t, batch_in, TABLE)
    rows = K._size(meta, ROW_ROWS, n_tensors, t, rows_in, TABLE)
    cols = K._size(meta, ROW_COLS, n_tensors, t, cols_in, TABLE)
    tile_r = K._size(meta, ROW_TILE_R, n_tensors, t, tile_r_in, TABLE)
    tile_c = K._size(meta, ROW_TILE_C, n_tensors, t, tile_c_in, TABLE)
    slot = K._size(meta, ROW_SLOT, n_tensors, t, slot_in, TABLE)
    fpart = K._size(meta, ROW_FPART, n_tensors, t, fpart_in, TABLE)
    fac = K._size(meta, ROW_FAC, n_tensors, t, fac_in, TABLE)
    return (idx, p_ptr, g_ptr, m_ptr, rs_ptr, cs_ptr, step_ptr, numel, batch, rows, cols, tile_r,
            tile_c, slot, fpart, fac)


# ---------------------------------------------------------------------------------------------
# Phase S.
# ---------------------------------------------------------------------------------------------

# n_tensors, blocks and the *_in sizes are not specialised (one variant for every list); they
# only index tables and bound loops.
_NO_SPEC = ["n_tensors", "blocks", "numel_in", "batch_in", "rows_in", "cols_in", "tile_r_in",
            "tile_c_in", "slot_in", "fpart_in", "fac_in"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _tiles_kernel(
    meta, n_tensors, blocks,
    p_in, g_in, m_in, rs_in, cs_in, step_in, numel_in, batch_in, rows_in, cols_in, tile_r_in,
    tile_c_in, slot_in, fpart_in, fac_in,
    factor_partials, skip, gscale, sign,
    DTYPE: tl.constexpr, HAS_GSCALE: tl.constexpr, TABLE: tl.constexpr,
    TILE_C: tl.constexpr, S_ROWS: tl.constexpr,
):
    (idx, _p, g_ptr, _m, _rs, _cs, _st, _numel, _batch, rows, cols, tile_r, tile_c, _slot, fpart,
     _fac) = _operands(meta, n_tensors, blocks, p_in, g_in, m_in, rs_in, cs_in,
        step_in, numel_in, batch_in, rows_in, cols_in, tile_r_in, tile_c_in, slot_in, fpart_in,
        fac_in, DTYPE, TABLE)
    row_tiles = (rows + tile_r - 1) // tile_r
    col_tiles = (cols + tile_c - 1) // tile_c
    # idx = (b * row_tiles + tr) * col_tiles + tc
    tc = idx % col_tiles
    tr = (idx // col_tiles) % row_tiles
    b = idx // (col_tiles * row_tiles)
    r0 = tr * tile_r
    r1 = tl.minimum(rows, r0 + tile_r)
    c0 = tc * tile_c
    c1 = tl.minimum(cols, c0 + tile_c)
    gmul = K._grad_mul(gscale, sign, HAS_GSCALE)
    g_mat = g_ptr + b * rows * cols
    # Per matrix: [col_tiles, rows] row partials, then [row_tiles, cols] column partials.
    row_out = factor_partials + fpart + b * (col_tiles * rows + row_tiles * cols) + tc * rows
    col_out = row_out - tc * rows + col_tiles * rows + tr * cols
    ri = tl.arange(0, S_ROWS)
    cj = tl.arange(0, TILE_C)
    col_mask = (c0 + cj) < c1
    col_acc = tl.zeros([TILE_C], tl.float64)
    bad = tl.zeros([S_ROWS, TILE_C], tl.int32)
    for r in range(r0, r1, S_ROWS):
        rr = r + ri
        row_mask = rr < r1
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rr[:, None] * cols + (c0 + cj)[None, :]
        x = tl.load(g_mat + offs, mask=mask, other=0.0).to(tl.float32) * gmul
        bad = tl.maximum(bad, K._square_overflows(x))
        x64 = x.to(tl.float64)
        sq = x64 * x64
        # tl.sum is a fixed tree over lanes and warps: the same order every run.
        tl.store(row_out + rr, tl.sum(sq, axis=1), mask=row_mask)
        col_acc += tl.sum(sq, axis=0)
    tl.store(col_out + c0 + cj, col_acc, mask=col_mask)
    # Only ever 1.0, from any number of programs: a benign race, no atomics needed.
    if tl.max(tl.max(bad, axis=1), axis=0) != 0:
        tl.store(skip, 1.0)


@triton.jit
def _combine_block(part, n_tiles, stride, old, new_ptr, o, count, b2hat, bad,
                   C_BLOCK: tl.constexpr):
    """One block of a matrix's new R (or C), lanes o < count: the tile partials (n_tiles of them,
    `stride` apart) added in tile order, factor_update with the old value, stored at new_ptr.
    Returns the new values (masked lanes 0) and `bad` with their non-finite lanes added."""
    mask = o < count
    s = tl.zeros([C_BLOCK], tl.float64)
    for k in range(0, n_tiles):
        s += tl.load(part + k * stride + o, mask=mask, other=0.0)
    new = _factor_update(tl.load(old + o, mask=mask, other=0.0), s, b2hat)
    bad = tl.maximum(bad, K._nonfinite(new))
    tl.store(new_ptr + o, new, mask=mask)
    return new, bad


@triton.jit(do_not_specialize=_NO_SPEC)
def _combine_kernel(
    meta, n_tensors, blocks,
    p_in, g_in, m_in, rs_in, cs_in, step_in, numel_in, batch_in, rows_in, cols_in, tile_r_in,
    tile_c_in, slot_in, fpart_in, fac_in,
    factor_partials, factors, skip, beta2: tl.float64,
    DTYPE: tl.constexpr, TABLE: tl.constexpr, INTERPRET: tl.constexpr, C_BLOCK: tl.constexpr,
):
    (b, _p, _g, _m, rs_ptr, cs_ptr, step_ptr, _numel, _batch, rows, cols, tile_r, tile_c, _slot,
     fpart, fac) = _operands(meta, n_tensors, blocks, p_in, g_in, m_in, rs_in, cs_in,
        step_in, numel_in, batch_in, rows_in, cols_in, tile_r_in, tile_c_in, slot_in, fpart_in,
        fac_in, DTYPE, TABLE)
    row_tiles = (rows + tile_r - 1) // tile_r
    col_tiles = (cols + tile_c - 1) // tile_c
    b2hat = K._b2hat(step_ptr, beta2, INTERPRET)
    row_part = factor_partials + fpart + b * (col_tiles * rows + row_tiles * cols)
    col_part = row_part + col_tiles * rows
    new_r = factors + fac + b * (2 * rows + cols)
    new_c = new_r + rows
    norm = new_c + cols
    offs = tl.arange(0, C_BLOCK)
    total = tl.zeros([], tl.float64)
    # A new R_i or C_j that is not finite in float32 skips the step ([note: the gradient overflow
    # rule] in _kernels.py); masked lanes hold 0.
    bad = tl.zeros([C_BLOCK], tl.int32)
    # Columns first, so that the row loop leads straight into R / sum R below and the row loop's
    # bounds and pointers are not held across the column loop: rows first, Triton 3.6 (ptxas
    # 12.8) compiled this for sm_90 in 48 registers with 12 bytes of spill stores and 20 of loads;
    # columns first, 56 registers and no spills (Triton 3.8: 56 either way). The same bits: the
    # two loops store disjoint values and `bad` is a maximum.
    for c in range(0, cols, C_BLOCK):
        _new, bad = _combine_block(col_part, row_tiles, cols, cs_ptr + b * cols, new_c, c + offs,
                                   cols, b2hat, bad, C_BLOCK)
    for r in range(0, rows, C_BLOCK):
        o = r + offs
        new, bad = _combine_block(row_part, col_tiles, rows, rs_ptr + b * rows, new_r, o, rows,
                                  b2hat, bad, C_BLOCK)
        # sum R of the rounded new R, as the CPU kernel: blocks in row order, a fixed tree in each.
        total += tl.sum(tl.where(o < rows, new.to(tl.float64), 0.0), axis=0)
    # Only ever 1.0, from any number of programs: a benign race, no atomics needed.
    if tl.max(bad, axis=0) != 0:
        tl.store(skip, 1.0)
    # Each thread reads back the R it stored (same block shape, same layout); the barrier also
    # covers a compiler that would lay the two loops out differently.
    tl.debug_barrier()
    for r in range(0, rows, C_BLOCK):
        o = r + offs
        mask = o < rows
        tl.store(norm + o, _row_norm(tl.load(new_r + o, mask=mask, other=0.0), total), mask=mask)


# ---------------------------------------------------------------------------------------------
# Phases A and B. Pointers arrive offset to the chunk's first element; `o` (int32) are offsets
# inside the chunk, n its element count; (q0, j0) the row and column of its first element, with
# i0 its row inside its matrix b0, whose factors fac_ptr points at.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _natural_tile(p_ptr, g_ptr, fac_ptr, o, n, j0, i0, rows, cols, p, eps_p, gmul,
                  SQRT: tl.constexpr, INTERPRET: tl.constexpr, MASKED: tl.constexpr):
    """One tile of a factored tensor: theta, and ghat = g / d and w = theta / d with
    d = f^p + eps^(2p), f = (R_i / sum R) C_j gathered from factors (float32). fac_ptr is
    the chunk's first matrix's factors (b0 applied by the caller)."""
    # int32 index arithmetic: j0 + o < cols + chunk_size, i0 + o / cols < rows + chunk_size, and
    # the matrices a chunk spans (db <= chunk_size / (rows cols) + 1) keep db (2 rows + cols)
    # within 3 chunk_size + 2 rows + cols: 32-bit offsets on a 64-bit base, half the registers.
    e = j0 + o
    dq = e // cols
    j = e - dq * cols
    i = i0 + dq
    db = i // rows
    i = i - db * rows
    mat = db * (2 * rows + cols) + rows
    g = K._load(g_ptr, o, n, 0.0, MASKED).to(tl.float32)
    th = K._load(p_ptr, o, n, 0.0, MASKED).to(tl.float32)
    if MASKED:
        mask = o < n
        rn = tl.load(fac_ptr + (mat + cols + i), mask=mask, other=0.0)
        cj = tl.load(fac_ptr + (mat + j), mask=mask, other=0.0)
    else:
        rn = tl.load(fac_ptr + (mat + cols + i))
        cj = tl.load(fac_ptr + (mat + j))
    g = g * gmul
    d = K._fisher_denom(_factored_fim(rn, cj), p, eps_p, SQRT, INTERPRET)
    return th, tl.div_rn(g, d), tl.div_rn(th, d)


@triton.jit
def _reduce_chunk(p_ptr, g_ptr, fac_ptr, n, j0, i0, rows, cols, p, eps_p, gmul,
                  SQRT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
    """(sum ghat^2, sum w^2) in float64 over one chunk: full tiles unmasked, then a masked one."""
    offs = tl.arange(0, BLOCK)
    acc_g = tl.zeros([BLOCK], tl.float64)
    acc_w = tl.zeros([BLOCK], tl.float64)
    n_full = (n // BLOCK) * BLOCK
    for k in range(0, n_full, BLOCK):
        _th, ghat, w = _natural_tile(p_ptr, g_ptr, fac_ptr, k + offs, n, j0, i0, rows, cols,
                                     p, eps_p, gmul, SQRT, INTERPRET, False)
        acc_g += ghat.to(tl.float64) * ghat.to(tl.float64)
        acc_w += w.to(tl.float64) * w.to(tl.float64)
    if n_full < n:
        o = n_full + offs
        _th, ghat, w = _natural_tile(p_ptr, g_ptr, fac_ptr, o, n, j0, i0, rows, cols, p,
                                     eps_p, gmul, SQRT, INTERPRET, True)
        acc_g += tl.where(o < n, ghat.to(tl.float64) * ghat.to(tl.float64), 0.0)
        acc_w += tl.where(o < n, w.to(tl.float64) * w.to(tl.float64), 0.0)
    return tl.sum(acc_g, axis=0), tl.sum(acc_w, axis=0)


@triton.jit
def _update_tile(p_ptr, g_ptr, m_ptr, fac_ptr, o, n, j0, i0, rows, cols, p, eps_p, gmul,
                 beta1, omb1, inv_s1, inv_s2, lr, wd, sr,
                 SQRT: tl.constexpr, INTERPRET: tl.constexpr, MASKED: tl.constexpr,
                 SR_P: tl.constexpr, SR_M: tl.constexpr):
    th, ghat, w = _natural_tile(p_ptr, g_ptr, fac_ptr, o, n, j0, i0, rows, cols, p, eps_p,
                                gmul, SQRT, INTERPRET, MASKED)
    m = K._load(m_ptr, o, n, 0.0, MASKED).to(tl.float32)
    th, m = K._fadam_update(th, m, ghat, w, beta1, omb1, inv_s1, inv_s2, lr, wd)
    th, m = K._store_update(p_ptr, m_ptr, o, th, m, sr, SR_P, SR_M, INTERPRET)
    K._store(m_ptr, o, n, m, MASKED)
    K._store(p_ptr, o, n, th, MASKED)


@triton.jit
def _chunk_start(idx, numel, rows, cols, chunk_size, p_ptr, g_ptr, m_ptr, fac_ptr,
                 ALIGNED: tl.constexpr):
    """The chunk's element count n, its first element's column j0 and row i0 in its matrix b0
    (int32), the element pointers offset to it and fac_ptr to matrix b0's factors."""
    start = idx * chunk_size  # 64-bit: a tensor may hold more than 2^31 elements
    n = tl.minimum(numel - start, chunk_size).to(tl.int32)
    q0 = start // cols
    # start - q0 cols < cols already: the minimum changes no value but keeps j0 one int32. Without
    # it LLVM splits the truncation into the low words of start and q0 cols, both kept to the
    # tile loops, and Triton 3.6 compiled phase B's pow path (p != 0.5, with the lr tensor
    # loaded after the fused reduction) for sm_90 in 64 registers with 4 bytes of spill stores
    # and 8 of loads; with it 64 and no spills (Triton 3.8: 64 and no spills either way).
    j0 = tl.minimum(start - q0 * cols, cols - 1).to(tl.int32)
    b0 = q0 // rows
    i0 = (q0 - b0 * rows).to(tl.int32)
    p_ptr = K._offset(p_ptr, start, ALIGNED)
    g_ptr = K._offset(g_ptr, start, ALIGNED)
    m_ptr = K._offset(m_ptr, start, ALIGNED)
    fac_ptr += b0 * (2 * rows + cols)
    return n, j0, i0, p_ptr, g_ptr, m_ptr, fac_ptr


@triton.jit(do_not_specialize=_NO_SPEC)
def _phase_a_kernel(
    meta, n_tensors, blocks,
    p_in, g_in, m_in, rs_in, cs_in, step_in, numel_in, batch_in, rows_in, cols_in, tile_r_in,
    tile_c_in, slot_in, fpart_in, fac_in,
    factors, partials, gscale, p, eps_p, sign, chunk_size,
    DTYPE: tl.constexpr, HAS_GSCALE: tl.constexpr, SQRT: tl.constexpr, ALIGNED: tl.constexpr,
    TABLE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr,
):
    (c, p_ptr, g_ptr, m_ptr, _rs, _cs, _st, numel, _batch, rows, cols, _tr, _tc, slot, _fpart,
     fac) = _operands(meta, n_tensors, blocks, p_in, g_in, m_in, rs_in, cs_in,
        step_in, numel_in, batch_in, rows_in, cols_in, tile_r_in, tile_c_in, slot_in, fpart_in,
        fac_in, DTYPE, TABLE)
    n, j0, i0, p_ptr, g_ptr, m_ptr, fac_ptr = _chunk_start(c, numel, rows, cols, chunk_size,
                                                           p_ptr, g_ptr, m_ptr, factors + fac,
                                                           ALIGNED)
    gmul = K._grad_mul(gscale, sign, HAS_GSCALE)
    sum_g, sum_w = _reduce_chunk(p_ptr, g_ptr, fac_ptr, n, j0, i0,
                                 rows.to(tl.int32), cols.to(tl.int32), p, eps_p, gmul, SQRT,
                                 INTERPRET, BLOCK)
    row = (slot + c) * 2
    tl.store(partials + row, sum_g)
    tl.store(partials + row + 1, sum_w)


@triton.jit
def _copy_factors(src, dst, stride_src, per_src, begin, end, BLOCK: tl.constexpr):
    """dst[k] = src[(k // per_src) * stride_src + k % per_src] for k in [begin, end): one
    program's slice of a tensor's new R (or C), from the per-matrix layout of factors. Indices
    are int32 from the slice's first matrix (a slice is at most one chunk's rows or columns)."""
    b_begin = begin // tl.maximum(per_src, 1)
    src += b_begin * stride_src
    dst += begin
    r0 = (begin - b_begin * per_src).to(tl.int32)
    per = per_src.to(tl.int32)
    stride = stride_src.to(tl.int32)
    count = (end - begin).to(tl.int32)
    offs = tl.arange(0, BLOCK)
    for k in range(0, count, BLOCK):
        o = k + offs
        mask = o < count
        r = r0 + o
        b = r // per
        tl.store(dst + o, tl.load(src + (b * stride + (r - b * per)), mask=mask), mask=mask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _phase_b_kernel(
    meta, n_tensors, blocks,
    p_in, g_in, m_in, rs_in, cs_in, step_in, numel_in, batch_in, rows_in, cols_in, tile_r_in,
    tile_c_in, slot_in, fpart_in, fac_in, rnd_in,
    factors, partials, skip, gscale, lr_ptr, rnd,
    lr, beta1, omb1, eps_p, p, clip: tl.float64, wd, sign, chunk_size, fuse_one_chunk,
    DTYPE: tl.constexpr, HAS_GSCALE: tl.constexpr, HAS_LR: tl.constexpr, SQRT: tl.constexpr,
    ALIGNED: tl.constexpr, TABLE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr, SLOT_BLOCK: tl.constexpr,
    MDTYPE: tl.constexpr, SR: tl.constexpr, SR_P: tl.constexpr, SR_M: tl.constexpr,
):
    # A non-finite gradient anywhere in the step (or GradScaler's found_inf): change nothing.
    if tl.load(skip) == 0.0:
        (c, p_ptr, g_ptr, m_ptr, rs_ptr, cs_ptr, step_ptr, numel, batch, rows, cols, _tr, _tc,
         slot, _fpart, fac) = _operands(meta, n_tensors, blocks, p_in, g_in, m_in, rs_in, cs_in,
            step_in, numel_in, batch_in, rows_in, cols_in, tile_r_in, tile_c_in, slot_in, fpart_in,
            fac_in, DTYPE, TABLE, MDTYPE)
        t, _c = K._block(meta, blocks, TABLE)
        sr = K._sr_row(rnd, rnd_in, t, step_ptr, c, chunk_size, SR, TABLE)
        # The new R and C become the state: program c of the tensor's nch copies its slice
        # (a tensor without elements, e.g. (0, 4), still has R or C and gets one program).
        nch = tl.maximum((numel + chunk_size - 1) // chunk_size, 1)
        src = factors + fac
        n_r = batch * rows
        per = (n_r + nch - 1) // nch
        _copy_factors(src, rs_ptr, 2 * rows + cols, rows, c * per,
                      tl.minimum(n_r, (c + 1) * per), BLOCK)
        n_c = batch * cols
        per = (n_c + nch - 1) // nch
        _copy_factors(src + rows, cs_ptr, 2 * rows + cols, cols, c * per,
                      tl.minimum(n_c, (c + 1) * per), BLOCK)
        if numel > 0:
            n, j0, i0, p_ptr, g_ptr, m_ptr, fac_ptr = _chunk_start(
                c, numel, rows, cols, chunk_size, p_ptr, g_ptr, m_ptr, factors + fac, ALIGNED)
            gmul = K._grad_mul(gscale, sign, HAS_GSCALE)
            rows32 = rows.to(tl.int32)
            cols32 = cols.to(tl.int32)
            inv_s1 = tl.full([], 1.0, tl.float64)
            inv_s2 = tl.full([], 1.0, tl.float64)
            if clip > 0.0:
                if (numel <= chunk_size) & fuse_one_chunk:
                    # One-chunk tensor done in this one program: phase A's reduction first, then
                    # the update re-reads the chunk (from L2 while the group's working set fits).
                    sum_g, sum_w = _reduce_chunk(p_ptr, g_ptr, fac_ptr, n, j0, i0, rows32,
                                                 cols32, p, eps_p, gmul, SQRT, INTERPRET, BLOCK)
                else:
                    sum_g, sum_w = K._sum_slots(partials, slot, nch, SLOT_BLOCK)
                inv_s1 = K._clip_inv_scale(sum_g, numel, clip)
                inv_s2 = K._clip_inv_scale(sum_w, numel, clip)
            inv_s1 = inv_s1.to(tl.float32)
            inv_s2 = inv_s2.to(tl.float32)
            # The lr tensor read only now, after the fused reduction: read before it, its float64
            # was held across the reduction, and Triton 3.6 compiled the pow path for sm_90 in 64
            # registers with 8 bytes spilled (Triton 3.8: 64, none); see also j0 in _chunk_start.
            if HAS_LR:
                lr_v = tl.load(lr_ptr).to(tl.float32)
            else:
                lr_v = lr
            offs = tl.arange(0, BLOCK)
            n_full = (n // BLOCK) * BLOCK
            for k in range(0, n_full, BLOCK):
                _update_tile(p_ptr, g_ptr, m_ptr, fac_ptr, k + offs, n, j0, i0, rows32,
                             cols32, p, eps_p, gmul, beta1, omb1, inv_s1, inv_s2, lr_v, wd, sr,
                             SQRT, INTERPRET, False, SR_P, SR_M)
            if n_full < n:
                _update_tile(p_ptr, g_ptr, m_ptr, fac_ptr, n_full + offs, n, j0, i0, rows32,
                             cols32, p, eps_p, gmul, beta1, omb1, inv_s1, inv_s2, lr_v, wd, sr,
                             SQRT, INTERPRET, True, SR_P, SR_M)
