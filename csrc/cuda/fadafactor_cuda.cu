// CUDA kernels of the three FAdafactor ops (TORCH_LIBRARY_IMPL(fadam_fused, CUDA)); the contract is
// [note: the FAdafactor op contract] in fadam_fused/op_contract.py, the math [note: FAdafactor
// math] in csrc/fadam_math.h. Like fadam_cuda.cu, this source also compiles with g++ and HIP-CPU
// into the emulated test build ([note: one CUDA source, two compilers] in cuda/launch.h), and its
// launchers read the op's LaunchDesc ([note: the op boundary] in csrc/op_boundary.h) and launch
// through launch_plan() (kernel_common.cuh).
//
// Four kernels, each one launch per group unless the tables fill ([note: CUDA multi-tensor plan]):
//
// - tiles_kernel (phase S): one block per tile of tile_rows x tile_cols (factor_tile(), 256 x 256
//   at the 65536 chunk) of every matrix. Warp w takes the tile rows w, w + 16, ...; lane l sums
//   its row's columns l, l + 32, ... (at most 8) in order, the warp adds its lanes in a fixed
//   tree and lane 0 stores the row's partial. Each lane also keeps its columns' sums over the
//   warp's rows in registers; the 16 warps' column sums are added in warp order through shared
//   memory. Reads g once, coalesced (a warp reads 32 consecutive elements of a row). Sets skip
//   when a g * g is not finite ([note: the overflow rule] in fadam_math.h).
// - combine_kernel (phase S): one block per matrix (also for empty ones, whose R or C still
//   decays). Adds each row's (column's) tile partials in tile order, stores the new R and C
//   (factor_update) and, after sum R (each thread's rows in order, then a fixed tree), R / sum R.
//   Sets skip when a new R_i or C_j is not finite in float32 (the overflow rule).
//   It needs every tile of its matrix, hence a second launch (docs/design.md, section 8).
// - phase_a_kernel / phase_b_kernel: FAdam's (tensor, chunk) blocks, slots and fused one-chunk
//   rule, through the per-chunk loops of kernel_common.cuh with f = (R_q / sum R) C_j
//   (FactoredFim). With clipping off phase A is not launched (phase S has checked g); a fused
//   one-chunk tensor has no phase-A block. Phase B's first block of a tensor also copies its new
//   R and C from `factors` into fim_rows / fim_cols (an empty tensor gets a block for this alone).
//
// Determinism: every sum has one fixed order, as in the CPU kernels (whose order differs: the
// backends agree to float64 rounding, each one with itself bit for bit).
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cuda/multi_tensor_plan.h"
#include "fadam_math.h"
#include "fadam_ops.h"
// Last: the emulated build includes HIP-CPU's runtime here, after every torch header.
#include "cuda/launch.h"
#include "cuda/kernel_common.cuh"

namespace fadam::cuda::factored {
namespace {

// Tile columns per lane (kMaxTileCols in kernel_common.cuh: the widest tile the op accepts).
constexpr int kColsPerLane = kMaxTileCols / 32;

// The tables of one launch (structure of arrays), after the columns of every kernel's tables
// (CommonTables: its `block_chunk` is a tile, a matrix or a first chunk, by kernel). Operands a
// kernel does not use are nullptr.
struct Tables : CommonTables {
  const void* grad[kMaxTensors];
  void* param[kMaxTensors];
  void* mom[kMaxTensors];        // float32, or bfloat16 (Scalars::mom_bf16)
  float* fim_row[kMaxTensors];   // old R (phase S), new R (phase B)
  float* fim_col[kMaxTensors];
  const float* step[kMaxTensors];
  float* factors[kMaxTensors];   // the tensor's region of `factors`
  double* fpart[kMaxTensors];    // the tensor's region of `factor_partials`
  int64_t slot0[kMaxTensors];
  int32_t batch[kMaxTensors];
  int32_t rows[kMaxTensors];
  int32_t cols[kMaxTensors];
  int32_t tile_rows[kMaxTensors];
  int32_t tile_cols[kMaxTensors];

  // Fills the tables of one launch of the plan (host side).
  void fill(const Launch& launch, const LaunchDesc& d) {
    fill_tables(*this, launch, d, [&](size_t k, size_t i, const PlanTensor& pt) {
      const FactorTile& ft = d.tiles[i];
      param[k] = d.params[i].data_ptr();
      grad[k] = d.grads[i].const_data_ptr();
      mom[k] = d.moms.empty() ? nullptr : d.moms[i].data_ptr();
      fim_row[k] = d.fim_rows.empty() ? nullptr : d.fim_rows[i].data_ptr<float>();
      fim_col[k] = d.fim_cols.empty() ? nullptr : d.fim_cols[i].data_ptr<float>();
      step[k] = d.steps.empty() ? nullptr : d.steps[i].const_data_ptr<float>();
      factors[k] = d.factors + d.factor_off.factors[i];
      fpart[k] = d.factor_partials == nullptr ? nullptr
                                              : d.factor_partials + d.factor_off.partials[i];
      slot0[k] = pt.slot0;
      batch[k] = static_cast<int32_t>(ft.batch);
      rows[k] = static_cast<int32_t>(ft.rows);
      cols[k] = static_cast<int32_t>(ft.cols);
      tile_rows[k] = static_cast<int32_t>(ft.tile_rows);
      tile_cols[k] = static_cast<int32_t>(ft.tile_cols);
      return vector_ok(d, param[k], grad[k], mom[k]);
    });
  }
};

// The kernels' argument: the rounding kernels' tables add the rounding rows (WithRounding).
template <bool kRound = false>
using FactoredArgs = Args<std::conditional_t<kRound, WithRounding<Tables>, Tables>>;

// A matrix's geometry, from the tables.
struct Matrix {
  int rows, cols;
  int64_t factors;   // floats of `factors` per matrix: R (rows), C (cols), R / sum R (rows)
  int64_t partials;  // doubles of `factor_partials` per matrix
  int row_tiles, col_tiles;
};

__device__ __forceinline__ Matrix matrix_of(const Tables& t, int tensor) {
  Matrix m;
  m.rows = t.rows[tensor];
  m.cols = t.cols[tensor];
  m.row_tiles = (m.rows + t.tile_rows[tensor] - 1) / t.tile_rows[tensor];
  m.col_tiles = (m.cols + t.tile_cols[tensor] - 1) / t.tile_cols[tensor];
  m.factors = 2 * static_cast<int64_t>(m.rows) + m.cols;
  m.partials = static_cast<int64_t>(m.col_tiles) * m.rows + static_cast<int64_t>(m.row_tiles) * m.cols;
  return m;
}

// ---- phase S ------------------------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks) tiles_kernel(const __grid_constant__ FactoredArgs<> args) {
  __shared__ float grad_mul;
  __shared__ double col_sums[kWarps][kMaxTileCols];  // 32 KB
  const Tables& t = args.t;
  const int tensor = t.block_tensor[blockIdx.x];
  const int64_t tile = t.block_chunk[blockIdx.x];
  if (threadIdx.x == 0) {
    grad_mul = grad_mul_of(args.s.maximize, args.s.grad_scale);
  }
  __syncthreads();
  const Matrix m = matrix_of(t, tensor);
  const int64_t tc = tile % m.col_tiles;
  const int64_t tr = tile / m.col_tiles % m.row_tiles;
  const int64_t b = tile / (static_cast<int64_t>(m.col_tiles) * m.row_tiles);
  const int r0 = static_cast<int>(tr) * t.tile_rows[tensor];
  const int r1 = min(m.rows, r0 + t.tile_rows[tensor]);
  const int c0 = static_cast<int>(tc) * t.tile_cols[tensor];
  const int c1 = min(m.cols, c0 + t.tile_cols[tensor]);
  const auto* g = static_cast<const scalar_t*>(t.grad[tensor]) +
                  b * static_cast<int64_t>(m.rows) * m.cols;
  double* row_out = t.fpart[tensor] + b * m.partials + tc * m.rows;
  double* col_out = t.fpart[tensor] + b * m.partials + static_cast<int64_t>(m.col_tiles) * m.rows +
                    tr * m.cols;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  double col_acc[kColsPerLane];
#pragma unroll
  for (int q = 0; q < kColsPerLane; ++q) {
    col_acc[q] = 0.0;
  }
  bool bad = false;
  for (int r = r0 + warp; r < r1; r += kWarps) {  // uniform over the warp: the shuffles are safe
    const scalar_t* row = g + static_cast<int64_t>(r) * m.cols;
    double sum = 0.0;
#pragma unroll
    for (int q = 0; q < kColsPerLane; ++q) {
      const int c = c0 + lane + 32 * q;
      if (c < c1) {
        // g^2 in float64 from the float32 scaled g, as the CPU kernel (exact, 24-bit mantissas);
        // the overflow rule is on the float32 g * g.
        const float gf = static_cast<float>(row[c]) * grad_mul;
        bad |= overflows(gf);
        const double x = static_cast<double>(gf);
        sum += x * x;
        col_acc[q] += x * x;
      }
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      row_out[r] = sum;
    }
  }
#pragma unroll
  for (int q = 0; q < kColsPerLane; ++q) {
    col_sums[warp][lane + 32 * q] = col_acc[q];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < c1 - c0; c += kThreads) {
    double sum = 0.0;
    for (int w = 0; w < kWarps; ++w) {
      sum += col_sums[w][c];
    }
    col_out[c0 + c] = sum;
  }
  if (bad) {
    *args.s.skip = 1.0f;  // every writer stores the same value; 0 is never stored
  }
}

__global__ void __launch_bounds__(kThreads, kMinBlocks) combine_kernel(const __grid_constant__ FactoredArgs<> args) {
  __shared__ double b2hat;
  __shared__ double total_rows;
  __shared__ double scratch[2 * kWarps];
  const Tables& t = args.t;
  const int tensor = t.block_tensor[blockIdx.x];
  const int64_t b = t.block_chunk[blockIdx.x];
  if (threadIdx.x == 0) {
    b2hat = b2hat_of(args.s.beta2, static_cast<double>(*t.step[tensor]));
  }
  __syncthreads();
  const Matrix m = matrix_of(t, tensor);
  const double* row_parts = t.fpart[tensor] + b * m.partials;
  const double* col_parts = row_parts + static_cast<int64_t>(m.col_tiles) * m.rows;
  const float* old_r = t.fim_row[tensor] + b * m.rows;
  const float* old_c = t.fim_col[tensor] + b * m.cols;
  float* new_r = t.factors[tensor] + b * m.factors;
  float* new_c = new_r + m.rows;
  float* norm = new_c + m.cols;
  const int first = static_cast<int>(threadIdx.x);
  const bool rows_ok =
      combine_factors(row_parts, m.rows, m.col_tiles, old_r, new_r, b2hat, first, kThreads);
  const bool cols_ok =
      combine_factors(col_parts, m.cols, m.row_tiles, old_c, new_c, b2hat, first, kThreads);
  if (!(rows_ok && cols_ok)) {
    *args.s.skip = 1.0f;  // every writer stores the same value; 0 is never stored
  }
  double total = 0.0, unused = 0.0;
  for (int r = first; r < m.rows; r += kThreads) {  // this thread's rows, in order
    total += static_cast<double>(new_r[r]);
  }
  block_sum2(total, unused, scratch);
  if (threadIdx.x == 0) {
    total_rows = total;
  }
  __syncthreads();
  for (int r = threadIdx.x; r < m.rows; r += kThreads) {  // the rows this thread stored above
    norm[r] = row_norm(new_r[r], total_rows);
  }
}

// ---- phases A and B -----------------------------------------------------------------------------

// FAdafactor's f: (R_q / sum R) C_j of each element, from `factors` (n + m floats per matrix,
// L1/L2 resident), nothing stored. Per matrix, `factors` holds R (rows), C (cols) and R / sum R
// (rows), so R_q / sum R is at C + cols + q: one pointer per fragment. Kept small because phase B
// runs at the 64-register cap (a second pointer and a 64-bit stride spilled 20 bytes in its bf16 /
// fp16 kernels on sm_90).
struct FactoredFim {
  const float* col;  // C of the chunk's first matrix
  uint32_t stride;   // floats of `factors` per matrix, 2 rows + cols < 2^32 (checked on the host)
  uint32_t rows, cols;
  uint32_t r0, j0;   // the chunk's first element: row r0 (of that matrix), column j0

  // The f of one fragment, element by element; the lanes past `count` get 1 (a finite d, kept
  // out of the sums) and read nothing.
  template <bool kFull, int V>
  struct Frag {
    const float* col;
    uint32_t stride, rows, cols, r, j;
    int count;

    __device__ __forceinline__ float at(int e, float) {
      if (!kFull && e >= count) {
        return 1.0f;
      }
      const float f = factored_fim(col[cols + r], col[j]);
      if (++j == cols) {  // the next element starts a row (and maybe a matrix)
        j = 0;
        if (++r == rows) {
          r = 0;
          col += stride;
        }
      }
      return f;
    }
    __device__ __forceinline__ void store() const {}
  };

  template <bool kFull, int V>
  __device__ __forceinline__ Frag<kFull, V> frag(int i, int count) const {
    // 32-bit: j0 < cols <= 2^30 and i < chunk_size <= 2^30, and r0 < rows < 2^30 (checked on
    // the host), so no sum below wraps.
    const uint32_t k = j0 + static_cast<uint32_t>(i);
    const uint32_t q = r0 + k / cols;
    return {col + static_cast<int64_t>(q / rows) * stride, stride, rows, cols, q % rows,
            k % cols, count};
  }
};

template <typename scalar_t>
struct Chunk {
  scalar_t* param;
  const scalar_t* grad;
  void* mom;
  int n;     // elements in the chunk
  bool vec;  // 128-bit path allowed
  FactoredFim factored;

  // A reference: phase B's fragment loop on a copy spilled 24 bytes in the bf16 / fp16 kernels
  // with p != 0.5 on sm_90.
  __device__ __forceinline__ const FactoredFim& fim(const BlockScalars&) const {
    return factored;
  }
};

// A chunk's operands; `mom_bf16`: the rounding kernels' bfloat16 momentums.
template <typename scalar_t, typename Tables>
__device__ __forceinline__ Chunk<scalar_t> chunk_of(const Tables& t, int tensor, int64_t chunk,
                                                    int64_t chunk_size, bool mom_bf16) {
  const int64_t begin = chunk * chunk_size;
  const int64_t left = t.numel[tensor] - begin;
  Chunk<scalar_t> c;
  c.param = static_cast<scalar_t*>(t.param[tensor]) + begin;
  c.grad = static_cast<const scalar_t*>(t.grad[tensor]) + begin;
  c.mom = t.mom[tensor] == nullptr ? nullptr : mom_at<true>(t.mom[tensor], begin, mom_bf16);
  c.n = static_cast<int>(left < chunk_size ? (left > 0 ? left : 0) : chunk_size);
  c.vec = (t.flags[tensor] & kFlagVector) != 0;
  const int64_t rows = t.rows[tensor], cols = t.cols[tensor];
  FactoredFim& f = c.factored;
  f.stride = static_cast<uint32_t>(2 * rows + cols);
  f.rows = static_cast<uint32_t>(rows);
  f.cols = static_cast<uint32_t>(cols);
  int64_t b0 = 0;
  f.r0 = f.j0 = 0;
  if (c.n > 0) {  // 64-bit divisions once per chunk; rows, cols > 0 when there are elements
    const int64_t q = begin / cols;
    b0 = q / rows;
    f.r0 = static_cast<uint32_t>(q - b0 * rows);
    f.j0 = static_cast<uint32_t>(begin - q * cols);
  }
  f.col = t.factors[tensor] + b0 * f.stride + rows;
  return c;
}

template <typename scalar_t, bool kSqrt>
__global__ void __launch_bounds__(kThreads, kMinBlocks) phase_a_kernel(const __grid_constant__ FactoredArgs<> args) {
  __shared__ BlockScalars bs;
  __shared__ double scratch[2 * kWarps];
  const int tensor = args.t.block_tensor[blockIdx.x];
  const int64_t chunk = args.t.block_chunk[blockIdx.x];
  if (threadIdx.x == 0) {
    bs = block_scalars(args.s, nullptr);
  }
  __syncthreads();
  const auto c = chunk_of<scalar_t>(args.t, tensor, chunk, args.s.chunk_size, false);
  double s1 = 0.0, s2 = 0.0;
  bool unused = false;  // phase S has checked the gradients (the overflow rule)
  reduce_frags<kSqrt>(c.grad, c.param, c.n, c.vec, c.factored, bs.grad_mul, args.s.p, args.s.eps_p, s1,
                      s2, unused);
  store_slot(s1, s2, args.s.partials + 2 * (args.t.slot0[tensor] + chunk), scratch);
}

// kRound: the rounding instantiation ([note: stochastic rounding on CUDA] in kernel_common.cuh).
template <typename scalar_t, bool kSqrt, bool kRound>
__global__ void __launch_bounds__(kThreads, kMinBlocks) phase_b_kernel(const __grid_constant__ FactoredArgs<kRound> args) {
  __shared__ BlockScalars bs;
  __shared__ double scratch[2 * kWarps];
  phase_b_block<kSqrt, kRound, /*kFimUpdate=*/false>(
      args, bs, scratch,
      [](const auto& t, const Scalars& s, int tensor, int64_t chunk) {
        return chunk_of<scalar_t>(t, tensor, chunk, s.chunk_size, kRound && s.mom_bf16);
      },
      [](const auto& t, int tensor) {  // the tensor's first block: the new R and C become the state
        // Matrix by matrix, without 64-bit divisions: a flat loop over batch * rows with k / rows
        // made its bf16 / fp16 kernels spill 20 bytes on sm_90.
        const int rows = t.rows[tensor], cols = t.cols[tensor];
        const int64_t stride = 2 * static_cast<int64_t>(rows) + cols;
        for (int64_t b = 0; b < t.batch[tensor]; ++b) {
          const float* src = t.factors[tensor] + b * stride;
          for (int r = threadIdx.x; r < rows; r += kThreads) {
            t.fim_row[tensor][b * rows + r] = src[r];
          }
          for (int c = threadIdx.x; c < cols; c += kThreads) {
            t.fim_col[tensor][b * cols + c] = src[rows + c];
          }
        }
      });
}

// ---- host side ----------------------------------------------------------------------------------

enum class Kernel { kTiles, kCombine, kPhaseA, kPhaseB };

// The launches of one kernel over the group. Tiles: one block per tile; combine: one per matrix
// with factors (rows + cols > 0); phase A: one per chunk of the tensors that are not fused;
// phase B: FAdam's phase-B blocks, plus one for an empty tensor whose R or C must be stored.
std::vector<Launch> plan(Kernel kernel, const LaunchDesc& d) {
  check_chunk_size(d.chunk_size);
  std::vector<Launch> launches;
  for (size_t i = 0; i < d.params.size(); ++i) {
    const FactorTile& ft = d.tiles[i];
    const int64_t numel = d.params[i].numel();
    const int64_t nchunks = checked_nchunks(static_cast<int64_t>(i), numel, d.chunk_size);
    PlanTensor t{static_cast<int64_t>(i), nchunks, d.slots[i], 1, d.fused(i)};
    const bool has_factors = ft.batch > 0 && ft.rows + ft.cols > 0;
    int64_t nblocks = 0;
    switch (kernel) {
      case Kernel::kTiles:
        nblocks = ft.batch * ft.row_tiles() * ft.col_tiles();
        break;
      case Kernel::kCombine:
        nblocks = has_factors ? ft.batch : 0;
        break;
      case Kernel::kPhaseA:
        nblocks = t.fused ? 0 : nchunks;  // an empty unfused tensor still writes its zero slot
        break;
      case Kernel::kPhaseB:
        nblocks = phase_b_blocks(t, numel);
        if (nblocks == 0 && has_factors) {
          nblocks = 1;
        }
        break;
    }
    append_blocks(launches, t, nblocks);
  }
  return trim_plan(std::move(launches));
}

void phase_s(const LaunchDesc& d) {
  launch_plan<Tables>(d, plan(Kernel::kTiles, d),
                      []<typename K>(K) { return &tiles_kernel<typename K::type>; });
  launch_plan<Tables>(d, plan(Kernel::kCombine, d), [](auto) { return &combine_kernel; });
}

void phase_a(const LaunchDesc& d) {
  if (!d.s.clipping) {
    return;  // without clipping no RMS is needed; phase S has checked the gradients
  }
  launch_plan<Tables>(d, plan(Kernel::kPhaseA, d),
                      []<typename K>(K) { return &phase_a_kernel<typename K::type, K::sqrt>; });
}

void phase_b(const LaunchDesc& d) {
  launch_phase_b<Tables>(d, plan(Kernel::kPhaseB, d), []<typename K, typename R>(K, R) {
    return &phase_b_kernel<typename K::type, K::sqrt, R::value>;
  });
}

}  // namespace
}  // namespace fadam::cuda::factored

// Under the emulated build, ops of their own (cuda_emulated_fadafactor_phase_*, defined with the
// same schemas by fadam_fused/op_contract.py), so they never shadow the CPU kernels.
TORCH_LIBRARY_IMPL(fadam_fused, FADAM_CUDA_DISPATCH_KEY, m) {
  using fadam::cuda::kCudaLimits;
  namespace f = fadam::cuda::factored;
  m.impl(FADAM_CUDA_OP("fadafactor_phase_s", "cuda_emulated_fadafactor_phase_s"),
         &fadam::fadafactor_phase_s_op<kCudaLimits, &f::phase_s>);
  m.impl(FADAM_CUDA_OP("fadafactor_phase_a", "cuda_emulated_fadafactor_phase_a"),
         &fadam::fadafactor_phase_a_op<kCudaLimits, &f::phase_a>);
  m.impl(FADAM_CUDA_OP("fadafactor_phase_b", "cuda_emulated_fadafactor_phase_b"),
         &fadam::fadafactor_phase_b_op<kCudaLimits, &f::phase_b>);
}
