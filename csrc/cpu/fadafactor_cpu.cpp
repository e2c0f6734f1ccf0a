// CPU kernels of the three FAdafactor ops (TORCH_LIBRARY_IMPL(fadam_fused, CPU)); the contract is
// [note: the FAdafactor op contract] in fadam_fused/op_contract.py, the math
// [note: FAdafactor math] in csrc/fadam_math.h. Each launcher reads its inputs from the op's
// LaunchDesc ([note: the op boundary] in csrc/op_boundary.h), as fadam_cpu.cpp's do.
//
// Phase S walks each tensor as tiles of rows x columns (FactorTile); phases A and B walk FAdam's
// (tensor, chunk) items (make_items, for_each_item in cpu_vec.h), a chunk as row segments:
// f_ij = factored_fim(R_i / sum R, C_j) with C_j loaded as a vector next to g and theta. Element
// math is float32 on at::vec::Vectorized<float> with zero-padded ragged tails, as in
// fadam_cpu.cpp, so phase A and phase B compute bitwise the same f, ghat and w.
//
// Determinism: every sum has one fixed order. A tile sums each row's squares over its columns
// into 8 float64 lanes in column order, and each column's over its rows in row order; the
// combine adds a row's (column's) tile partials in tile order; sum R is added in row order; a
// chunk's sums of ghat^2 and w^2 add float32 blocks of 8 vectors of a row segment into float64
// lanes in element order (SumSq in cpu_vec.h), and a tensor's chunks in slot order. No result depends on the
// thread count.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/cpu_vec.h"
#include "fadam_math.h"
#include "fadam_ops.h"

namespace fadam {
namespace {

template <typename scalar_t>
inline void store_padded(scalar_t* ptr, fVec v, int64_t count) {
  if (count == kLanes) {
    store_float(ptr, v);
    return;
  }
  alignas(64) scalar_t buf[kLanes];
  store_float(buf, v);
  std::memcpy(ptr, buf, count * sizeof(scalar_t));
}

// ---- phase S ------------------------------------------------------------------------------------

// The order of every sum in a tile (identical in both versions below): row r's squares go into
// kAcc float64 lanes, lane l taking columns c0 + l, c0 + l + 8, ... in column order; the columns
// left after the last whole 8 (c1 - c0 not a multiple of 8) are added first, then lanes 0..7 in
// order. Column c's squares are added in row order, from 0. Squares are float64, exact (24-bit
// mantissas), so float32's g * g is the square rounded to float32 and fma(x, x, acc) is acc + x * x
// to the bit.
constexpr int64_t kAcc = 8;

// Row r's total from its lanes, after adding its leftover columns [cv, c1) (to the total and to
// their column sums). Returns false when a scaled gradient of the row is not finite ([note: the
// overflow rule] in fadam_math.h): the row total is at least each of its squares (sums of
// non-negative terms round monotonically), so only a row whose total is not finite in float32
// (NaN, or >= 3.4e38: rare) can hold one, and only such a row is read again element by element.
template <typename scalar_t>
inline bool finish_row(const scalar_t* row, int64_t c0, int64_t cv, int64_t c1, float mul,
                       const double* lanes, double* col_out, double* row_out) {
  double total = 0.0;
  for (int64_t c = cv; c < c1; ++c) {
    const double x = static_cast<double>(static_cast<float>(row[c]) * mul);
    total += x * x;
    col_out[c - c0] += x * x;
  }
  for (int64_t l = 0; l < kAcc; ++l) {
    total += lanes[l];
  }
  *row_out = total;
  bool finite = true;
  if (!factor_ok(static_cast<float>(total))) {
    for (int64_t c = c0; c < c1; ++c) {
      finite = finite && !overflows(static_cast<float>(row[c]) * mul);
    }
  }
  return finite;
}

// One tile's partial sums of g^2: row r's over the tile's columns into row_out[r], column c's over
// the tile's rows into col_out[c]. Returns false when a scaled gradient is not finite. The
// portable version (FADAM_CPU_VEC=none); the vector one below gives the same bits.
template <typename scalar_t>
bool tile_sums_scalar(const scalar_t* g, int64_t cols, int64_t r0, int64_t r1, int64_t c0,
                      int64_t c1, float mul, double* row_out, double* col_out) {
  std::fill(col_out, col_out + (c1 - c0), 0.0);
  const int64_t cv = c0 + (c1 - c0) / kAcc * kAcc;
  bool finite = true;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = g + r * cols;
    std::array<double, kAcc> acc{};
    for (int64_t c = c0; c < cv; c += kAcc) {
      for (int64_t l = 0; l < kAcc; ++l) {
        const double x = static_cast<double>(static_cast<float>(row[c + l]) * mul);
        acc[l] += x * x;
        col_out[c + l - c0] += x * x;
      }
    }
    finite &= finish_row(row, c0, cv, c1, mul, acc.data(), col_out, row_out + r);
  }
  return finite;
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// (The intrinsics come with at::vec's headers for these builds, as widen()'s in cpu_vec.h.)

// 4 elements of the storage dtype at p, converted to float32, times mul (in float32, as the
// portable version), widened to float64. 256-bit vectors in the AVX-512 build too (AVX-512
// implies AVX2): 8 float64 lanes per row are two of them, and Zen 4 splits a 512-bit FMA into two
// 256-bit halves anyway. Converting straight from memory (vcvtps2pd ymm, m128) needs no shuffle.
template <typename scalar_t>
inline __m256d load4_wide(const scalar_t* p, __m128 mul, bool unit) {
  __m128 x;
  if constexpr (std::is_same_v<scalar_t, float>) {
    x = _mm_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // bfloat16 is the upper half of a float32.
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    x = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>);
    x = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  return _mm256_cvtps_pd(unit ? x : _mm_mul_ps(x, mul));
}

// The portable version's sums with explicit vectors: per 8 columns of a row, two float64 lane
// vectors (lanes 0-3 and 4-7) and two column vectors in L1. One row at a time, in memory order:
// walking 2 or 4 rows side by side (their lane chains then overlap: 0.11 ns per element in L2
// against 0.15) read the default list 1.1-1.2x slower from DRAM on this VM (bench/NOTES.md).
//
// Each cache line of the row kPrefetchRows rows below is prefetched as the walk reaches its
// column: from DRAM this loop's conversions and FMAs do not overlap the hardware prefetcher's
// misses (one thread: 0.45 ns per element against 0.36 for a float32 sum and 0.15-0.2 in cache),
// and the prefetch took phase S on the default list from 18.6 to 15.9 ms (2 threads, paired,
// 0.84x; 1 to 4 rows ahead gave 0.82-0.86x, bench/NOTES.md). A tile's last rows prefetch their
// own lines again (in cache: no traffic).
constexpr int64_t kPrefetchRows = 2;

template <typename scalar_t>
bool tile_sums(const scalar_t* g, int64_t cols, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
               float mul, double* row_out, double* col_out) {
  std::fill(col_out, col_out + (c1 - c0), 0.0);
  const int64_t cv = c0 + (c1 - c0) / kAcc * kAcc;
  const __m128 vmul = _mm_set1_ps(mul);
  const bool unit = mul == 1.0f;
  double* col = col_out - c0;  // col[c]: column c's sum
  bool finite = true;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = g + r * cols;
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    const scalar_t* ahead = r + kPrefetchRows < r1 ? row + kPrefetchRows * cols : row;
    for (int64_t c = c0; c < cv; c += kAcc) {
      if ((c - c0) % (64 / sizeof(scalar_t)) == 0) {  // once per 64-byte line
        __builtin_prefetch(ahead + c);
      }
      const __m256d x = load4_wide(row + c, vmul, unit);
      const __m256d y = load4_wide(row + c + 4, vmul, unit);
      lo = _mm256_fmadd_pd(x, x, lo);
      hi = _mm256_fmadd_pd(y, y, hi);
      _mm256_storeu_pd(col + c, _mm256_fmadd_pd(x, x, _mm256_loadu_pd(col + c)));
      _mm256_storeu_pd(col + c + 4, _mm256_fmadd_pd(y, y, _mm256_loadu_pd(col + c + 4)));
    }
    alignas(32) double lanes[kAcc];
    _mm256_store_pd(lanes, lo);
    _mm256_store_pd(lanes + 4, hi);
    finite &= finish_row(row, c0, cv, c1, mul, lanes, col_out, row_out + r);
  }
  return finite;
}
#else
template <typename scalar_t>
bool tile_sums(const scalar_t* g, int64_t cols, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
               float mul, double* row_out, double* col_out) {
  return tile_sums_scalar(g, cols, r0, r1, c0, c1, mul, row_out, col_out);
}
#endif

void phase_s(const LaunchDesc& d) {
  if (d.empty()) {
    return;
  }
  const auto& tiles = d.tiles;
  const FactorOffsets& off = d.factor_off;
  const float mul = Consts(d.s).grad_mul;
  double* partials = d.factor_partials;
  float* out = d.factors;

  // Tiles: item.chunk is (b * row_tiles + tr) * col_tiles + tc; the cost is the bytes of g read.
  const int64_t esize = d.params[0].element_size();
  std::vector<Item> items;
  for (const auto i : c10::irange(d.params.size())) {
    const FactorTile& t = tiles[i];
    const int64_t n = t.batch * t.row_tiles() * t.col_tiles();
    for (int64_t k = 0; k < n; ++k) {
      items.push_back({static_cast<int32_t>(i), k, t.tile_rows * t.tile_cols * esize});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  std::atomic<bool> overflow{false};
  dispatch(d.dtype, d.p, [&]<typename scalar_t, bool>() {
    for_each_item(items, [&](const Item& it) {
      const FactorTile& t = tiles[it.tensor];
      const int64_t tc = it.chunk % t.col_tiles();
      const int64_t tr = it.chunk / t.col_tiles() % t.row_tiles();
      const int64_t b = it.chunk / (t.col_tiles() * t.row_tiles());
      const int64_t r0 = tr * t.tile_rows, r1 = std::min(t.rows, r0 + t.tile_rows);
      const int64_t c0 = tc * t.tile_cols, c1 = std::min(t.cols, c0 + t.tile_cols);
      double* base = partials + off.partials[it.tensor] + b * t.partials_per_matrix();
      const auto* g = static_cast<const scalar_t*>(d.grads[it.tensor].const_data_ptr()) +
                      b * t.rows * t.cols;
      if (!tile_sums(g, t.cols, r0, r1, c0, c1, mul, base + tc * t.rows,
                     base + t.col_tiles() * t.rows + tr * t.cols + c0)) {
        overflow.store(true, std::memory_order_relaxed);
      }
    });
  });

  // The combine, one matrix at a time, its partials added in tile order, on the calling thread:
  // it is O(n + m) per matrix (on the default list ~1.4 MB of partials and 111k row norms), and
  // as a second parallel region (one item per matrix) it made phase S 1.15-1.20x as long, paired
  // per step at load 3.3-3.8 on the 2 vCPUs (37.6 against 34.1 ms, bench/NOTES.md).
  const auto combine = [&](int32_t tensor, int64_t b) {
    const FactorTile& t = tiles[tensor];
    const double b2hat =
        b2hat_of(d.s.beta2, static_cast<double>(*d.steps[tensor].const_data_ptr<float>()));
    const double* rows_p = partials + off.partials[tensor] + b * t.partials_per_matrix();
    const double* cols_p = rows_p + t.col_tiles() * t.rows;
    const float* old_r = d.fim_rows[tensor].const_data_ptr<float>() + b * t.rows;
    const float* old_c = d.fim_cols[tensor].const_data_ptr<float>() + b * t.cols;
    float* new_r = out + off.factors[tensor] + b * t.factors_per_matrix();
    float* new_c = new_r + t.rows;
    float* norm = new_c + t.cols;
    const bool rows_ok =
        combine_factors<int64_t>(rows_p, t.rows, t.col_tiles(), old_r, new_r, b2hat, 0, 1);
    const bool cols_ok =
        combine_factors<int64_t>(cols_p, t.cols, t.row_tiles(), old_c, new_c, b2hat, 0, 1);
    if (!(rows_ok && cols_ok)) {
      overflow.store(true, std::memory_order_relaxed);
    }
    double total = 0.0;  // sum R, in row order
    for (int64_t r = 0; r < t.rows; ++r) {
      total += static_cast<double>(new_r[r]);
    }
    for (int64_t r = 0; r < t.rows; ++r) {
      norm[r] = row_norm(new_r[r], total);
    }
  };
  for (const auto i : c10::irange(d.params.size())) {
    for (int64_t b = 0; b < tiles[i].batch; ++b) {
      combine(static_cast<int32_t>(i), b);
    }
  }
  if (overflow.load()) {
    *d.skip = 1.0f;
  }
}

// ---- phases A and B -----------------------------------------------------------------------------

// Runs seg(k, j0, j1, rnorm, col) over the row segments of the elements [begin, end) of a
// factored tensor: element k is column j0 of its row, the segment ends before column j1, rnorm is
// the row's R / sum R and col its matrix's C.
template <typename Seg>
inline void for_each_row_segment(const FactorTile& t, const float* factors, int64_t begin,
                                 int64_t end, Seg seg) {
  if (begin >= end) {
    return;
  }
  // Two 64-bit integer divisions for the first segment only, then row by row (the next matrix
  // after a last row): a pair of them per row costs some 80 cycles per 512-element row.
  int64_t q = begin / t.cols;  // row index over all matrices
  int64_t b = q / t.rows;
  int64_t i = q - b * t.rows;  // row within matrix b
  int64_t j0 = begin - q * t.cols;
  const float* mat = factors + b * t.factors_per_matrix();
  for (int64_t k = begin; k < end;) {
    const int64_t j1 = std::min(t.cols, j0 + (end - k));
    const fVec rnorm(mat[t.rows + t.cols + i]);  // R / sum R after R and C
    seg(k, j0, j1, rnorm, mat + t.rows);
    k += j1 - j0;
    j0 = 0;
    if (++i == t.rows) {
      i = 0;
      mat += t.factors_per_matrix();
    }
  }
}

// Runs body(row_ptr_offset k, count, rnorm, col ptr) over the elements [begin, end) of a factored
// tensor, by row segments and vectors of kLanes (the last one of a segment partial). The whole
// vectors get count = kLanes as a constant (for_each_vector), so their loads and stores have no
// ragged-tail branch or memcpy path.
template <typename Body>
inline void for_each_row_vector(const FactorTile& t, const float* factors, int64_t begin,
                                int64_t end, Body body) {
  for_each_row_segment(t, factors, begin, end,
                       [&](int64_t k, int64_t j0, int64_t j1, fVec rnorm, const float* cols) {
    for_each_vector(j0, j1, [&](int64_t j, int64_t count) {
      body(k + (j - j0), count, rnorm, cols + j);
    });
  });
}

// (sum ghat^2, sum w^2) over [begin, end) of tensor `i`, each row segment by blocks of
// kBlockVectors vectors in element order (sum_blocks and SumSq, cpu_vec.h, as FAdam's
// reduce_chunk): float32 squares within a block, the block partials added in float64. Widening
// every square (two conversions and two float64 FMAs per vector and sum) took phase A 2.0x its
// read floor on the default list against FAdam's 1.0x (bench/NOTES.md). A block whose partial is
// not finite (w^2 overflows float32 for eps = 1e-30 and theta ~ 1) is summed again in float64
// from the same ghat and w. With kKeep (phase B of a fused tensor, begin = 0) it also stores
// r = 1/d of element k into rbuf[k], for update_kept.
template <typename scalar_t, bool kSqrt, bool kKeep = false>
void reduce_range(const scalar_t* g, const scalar_t* theta, const FactorTile& t,
                  const float* factors, int64_t begin, int64_t end, const Consts& c,
                  double* sums, float* rbuf = nullptr) {
  SumSq s_ghat, s_w;
  const fVec zero(0.f);
  for_each_row_segment(t, factors, begin, end,
                       [&](int64_t k, int64_t j0, int64_t j1, fVec rnorm, const float* col) {
    // ghat and w of the vector at column j (count lanes; the padded ones 0: g = theta = 0 there,
    // so ghat = w = 0 * r with r = 1 / eps^(2p) finite, the optimizer keeps eps^(2p) a normal
    // float32, and the masks keep them out anyway).
    const scalar_t* gr = g + (k - j0);
    const scalar_t* pr = theta + (k - j0);
    const auto terms = [&](int64_t j, int64_t count, fVec& ghat, fVec& w) {
      prefetch_ahead(gr, j);
      prefetch_ahead(pr, j);
      const fVec gv = c.scale_grad(load_padded(gr + j, count));
      const fVec th = load_padded(pr + j, count);
      const fVec r = fisher_inv_denom<kSqrt>(factored_fim(rnorm, load_padded(col + j, count)),
                                             c.p, c.eps_p);
      if constexpr (kKeep) {
        // `count` lanes: a row's ragged end must not run past the buffer's last vector.
        r.store(rbuf + (k - j0 - begin) + j, count);
      }
      ghat = gv * r;
      w = th * r;
      if (count < kLanes) {
        ghat = fVec::set(zero, ghat, count);
        w = fVec::set(zero, w, count);
      }
    };
    sum_blocks(
        j0, j1, s_ghat, s_w,
        [&](int64_t j, int64_t count) {
          fVec ghat, w;
          terms(j, count, ghat, w);
          s_ghat.add(ghat);
          s_w.add(w);
        },
        [&](int64_t j, int64_t count) {
          fVec ghat, w;
          terms(j, count, ghat, w);
          s_ghat.add_wide(ghat);
          s_w.add_wide(w);
        });
  });
  sums[0] = s_ghat.total();
  sums[1] = s_w.total();
}

// Phase B's update of a fused one-chunk tensor after reduce_range<..., kKeep = true> over the
// whole tensor: r = 1/d is read back from rbuf (from cache) instead of recomputing f, its square
// root and the division, as FAdam's update_kept_chunk. r is elementwise, so walking the tensor by
// flat vectors instead of row segments gives every element the same bits.
template <typename scalar_t, bool kMomBf16>
inline void update_kept(scalar_t* theta, const scalar_t* g, void* m, int64_t numel,
                        const float* rbuf, const Consts& c, const UpdateConsts& u,
                        const Rounder& round) {
  for_each_vector(0, numel, [&](int64_t k, int64_t count) {
    prefetch_ahead(static_cast<const Mom<kMomBf16>*>(m), k);  // g and theta: in cache
    const fVec gv = c.scale_grad(load_padded(g + k, count));
    fVec th = load_padded(theta + k, count);
    fVec mv = load_mom(m, kMomBf16, k, count);
    const fVec r = fVec::loadu(rbuf + k);  // whole vectors: lanes past numel are not stored
    fadam_update(th, mv, gv * r, th * r, u.beta1, u.one_minus_beta1, u.inv_s1, u.inv_s2, u.lr,
                 u.weight_decay);
    store_param_mom(theta, th, m, kMomBf16, mv, k, count, round);
  });
}

void phase_a(const LaunchDesc& d) {
  if (d.empty() || !d.s.clipping) {
    return;  // without clipping no RMS is needed; phase S has checked the gradients
  }
  const Consts c(d.s);
  const int64_t esize = d.params[0].element_size();
  // A one-chunk tensor is reduced in phase B (fuse_one_chunk): nothing to do here.
  const auto items =
      make_items(d, [&](int64_t len, bool fused) { return fused ? 0 : len * 2 * esize; });
  dispatch(d.dtype, d.p, [&]<typename scalar_t, bool kSqrt>() {
    for_each_item(items, [&](const Item& it) {
      if (d.fused(it.tensor)) {
        return;
      }
      const auto numel = d.params[it.tensor].numel();
      const int64_t begin = it.chunk * d.chunk_size;
      reduce_range<scalar_t, kSqrt>(
          static_cast<const scalar_t*>(d.grads[it.tensor].const_data_ptr()),
          static_cast<const scalar_t*>(d.params[it.tensor].const_data_ptr()), d.tiles[it.tensor],
          d.factors + d.factor_off.factors[it.tensor], begin,
          std::min(numel, begin + d.chunk_size), c,
          d.partials + 2 * (d.slots[it.tensor] + it.chunk));
    });
  });
}

void phase_b(const LaunchDesc& d) {
  if (d.empty() || *d.skip != 0.0f) {
    return;  // phase S or A found an overflow anywhere: the whole step is skipped
  }
  const Consts c(d.s);
  const float lr = lr_of(d.s.lr_ptr, d.s.lr_is_double, d.s.lr);
  const bool clipping = d.s.clipping;
  const int64_t esize = d.params[0].element_size();
  // Bytes per element: g, theta, m read and theta, m written (2 G + 2 P + 8); a fused tensor
  // is first reduced (another G + P, from cache).
  const auto items = make_items(d, [&](int64_t len, bool f) {
    return len * (4 * esize + 8 + (f && clipping ? 2 * esize : 0));
  });
  dispatch(d.dtype, d.p, [&]<typename scalar_t, bool kSqrt>() {
    // The momentum's dtype is a constant of each loop (kMomBf16): a runtime flag left both
    // momentum paths, the bfloat16 one with its rounding hash, inline in every float32 loop.
    const auto item = [&]<bool kMomBf16>(const Item& it) {
      const FactorTile& t = d.tiles[it.tensor];
      const float* tfac = d.factors + d.factor_off.factors[it.tensor];
      auto* theta = static_cast<scalar_t*>(d.params[it.tensor].data_ptr());
      const auto* g = static_cast<const scalar_t*>(d.grads[it.tensor].const_data_ptr());
      void* m = d.moms[it.tensor].data_ptr();
      const int64_t numel = d.params[it.tensor].numel();
      const Rounder round(d, it.tensor,
                          static_cast<double>(*d.steps[it.tensor].const_data_ptr<float>()));
      double sums[2] = {0.0, 0.0};
      const auto update_consts = [&] {
        return UpdateConsts(d.s, lr, static_cast<float>(clip_inv_scale(sums[0], numel, d.s.clip)),
                            static_cast<float>(clip_inv_scale(sums[1], numel, d.s.clip)));
      };
      if (clipping) {
        if (d.fused(it.tensor)) {
          // Both phases in this task, the second pass from cache, with r = 1/d kept from the
          // first: the update recomputing f, its square root and the division took phase B
          // FAdam's time per element although it reads 0.75x the bytes (bench/NOTES.md).
          float* rbuf = kept_buffer(numel);
          reduce_range<scalar_t, kSqrt, /*kKeep=*/true>(g, theta, t, tfac, 0, numel, c, sums,
                                                         rbuf);
          update_kept<scalar_t, kMomBf16>(theta, g, m, numel, rbuf, c, update_consts(), round);
          return;
        } else {
          for (int64_t s = d.slots[it.tensor]; s < d.slots[it.tensor + 1]; ++s) {
            sums[0] += d.partials[2 * s];
            sums[1] += d.partials[2 * s + 1];
          }
        }
      }
      const UpdateConsts u = update_consts();
      const int64_t begin = it.chunk * d.chunk_size;
      for_each_row_vector(t, tfac, begin, std::min(numel, begin + d.chunk_size),
                          [&](int64_t k, int64_t count, fVec rnorm, const float* col) {
        prefetch_ahead(g, k);
        prefetch_ahead(static_cast<const scalar_t*>(theta), k);
        prefetch_ahead(static_cast<const Mom<kMomBf16>*>(m), k);
        const fVec gv = c.scale_grad(load_padded(g + k, count));
        fVec th = load_padded(theta + k, count);
        fVec mv = load_mom(m, kMomBf16, k, count);
        const fVec f = factored_fim(rnorm, load_padded(col, count));
        const fVec r = fisher_inv_denom<kSqrt>(f, c.p, c.eps_p);
        fadam_update(th, mv, gv * r, th * r, u.beta1, u.one_minus_beta1, u.inv_s1, u.inv_s2, u.lr,
                     u.weight_decay);
        store_param_mom(theta, th, m, kMomBf16, mv, k, count, round);
      });
    };
    for_each_item(items, [&](const Item& it) {
      if (d.mom_bf16) {
        item.template operator()<true>(it);
      } else {
        item.template operator()<false>(it);
      }
    });
  });
  // The new R and C become the state (O(n + m) per matrix).
  for (const auto i : c10::irange(d.params.size())) {
    const FactorTile& t = d.tiles[i];
    const float* src = d.factors + d.factor_off.factors[i];
    float* rows = d.fim_rows[i].data_ptr<float>();
    float* cols = d.fim_cols[i].data_ptr<float>();
    for (int64_t b = 0; b < t.batch; ++b) {
      const float* mat = src + b * t.factors_per_matrix();
      std::memcpy(rows + b * t.rows, mat, t.rows * sizeof(float));
      std::memcpy(cols + b * t.cols, mat + t.rows, t.cols * sizeof(float));
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fadam_fused, CPU, m) {
  m.impl("fadafactor_phase_s", &fadafactor_phase_s_op<kCpuLimits, &phase_s>);
  m.impl("fadafactor_phase_a", &fadafactor_phase_a_op<kCpuLimits, &phase_a>);
  m.impl("fadafactor_phase_b", &fadafactor_phase_b_op<kCpuLimits, &phase_b>);
}

}  // namespace fadam
