// Host-side planning of the multi-tensor CUDA launches: which block handles which tensor and
// chunk, and where the launches split when the metadata tables fill. Plain C++ (no CUDA), so the
// same code that feeds the kernels is unit-tested on machines without a GPU through the op
// fadam_fused::cuda_plan (fadam_cuda.cu, tests/test_cuda_build.py).
//
// [note: CUDA multi-tensor plan]
// A launch carries its tables by value in the kernel's parameter space (as PyTorch's
// MultiTensorApply.cuh does): up to kMaxTensors tensors and kMaxBlocks blocks. A block entry is
// (local tensor index, first chunk). What a block does follows from its tensor:
//
//   phase A, tensor of nchunks > 1 (or fuse_one_chunk off): one block per chunk, reduces that chunk
//     into its slot partials[slot0 + chunk]. Every slot gets exactly one writer, even an empty
//     tensor's (it writes zeros), so phase B never reads an unwritten slot. With clipping off the
//     same blocks only check the gradient and write no slot (phase B then reads none).
//   phase A, fused one-chunk tensor (fuse_one_chunk, nchunks == 1): one block that only checks the
//     gradient ([note: the overflow rule] in fadam_math.h); its slot is left alone. Empty: no
//     block (nothing to check).
//   phase B, fused one-chunk tensor: one block, reduce + update (both phases, data re-read from
//     L1/L2). Empty: no block.
//   phase B, other tensors: a block updates `per_block` consecutive chunks after summing all the
//     tensor's slots. per_block = ceil(nchunks / kMaxPhaseBBlocksPerTensor), so a tensor with
//     thousands of chunks is not summed by thousands of blocks (see kMaxPhaseBBlocksPerTensor).
//     Empty: no block (its slot is read by nobody).
//
// A tensor whose blocks do not all fit in the current launch continues in the next one, where it
// gets a new local index (PyTorch splits tensors over launches the same way). Slots and chunks are
// global, so a split tensor's blocks write and read the same slots whichever launch they are in.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "fadam_ops.h"  // nchunks_of

namespace fadam::cuda {

// Table capacities. CUDA 12.1+ allows 32764 bytes of kernel parameters on Volta and newer (it was
// 4 KB, the budget of PyTorch's MultiTensorApply tables before CUDA 13: 36 tensors and 320 blocks at
// depth 4; with CUDA 13 PyTorch fills ~32 KB: 252 tensors, 2240 blocks). sm_80 / sm_90 with CUDA 13
// have it. A tensor record is 65 bytes (5 pointers, numel, slot0, nchunks, per_block, flags) and a
// block entry 6 bytes, so 128 tensors and 1024 blocks make a 14552-byte argument (sizeof(Args)):
// a model of 1000 tensors needs 8 launches per phase instead of ~28 with 4 KB tables, while every
// launch copies half of what a full 32 KB table would cost (the whole struct is copied into the
// command buffer per launch, filled or not, and most groups have a few dozen tensors; the
// stochastic-rounding kernels' tables add a 32-byte rounding row per tensor, 4096 bytes, that
// the other launches do not copy: WithRounding in kernel_common.cuh). 1024 blocks
// of 512 threads are ~4 waves on a 132-SM H100 at 2 resident blocks per SM (the kernels' launch
// bounds).
constexpr int kMaxTensors = 128;
constexpr int kMaxBlocks = 1024;

// Phase B blocks per tensor, at most. Every phase-B block of a tensor sums all its nchunks slots
// (16 bytes each, from L2), so one block per chunk would read nchunks^2 * 16 bytes: 16 GiB of L2
// traffic for a 2^31-element tensor (32768 chunks) next to ~47 GB of HBM traffic for the update
// itself. Capping the blocks at 1024 bounds the slot traffic at 1024 * 16 B per chunk-sized unit
// of work: 1024 * 16 / (65536 elements * 22 B per element, bf16 params and fp32 state) = 1.1% of
// the update's traffic, whatever the tensor size, and 1024 blocks still fill an H100 (132 SMs x 2
// resident blocks) almost 4 times. Tensors of <= 1024 chunks (64M elements) keep one block per chunk.
constexpr int64_t kMaxPhaseBBlocksPerTensor = 1024;

enum class Phase { A, B };

// What a block does (derivable from its tensor in the kernel; spelled out for the plan test).
enum class BlockKind : int64_t {
  kReduce = 0,     // phase A: reduce one chunk into its slot, check the gradient
  kCheckOnly = 1,  // phase A: fused one-chunk tensor, check the gradient only
  kUpdate = 2,     // phase B: sum the tensor's slots, update per_block chunks
  kFused = 3,      // phase B: fused one-chunk tensor, reduce and update in one block
};

struct PlanTensor {
  int64_t tensor;     // index in the op's tensor lists
  int64_t nchunks;    // chunks (= slots) of the tensor
  int64_t slot0;      // first slot of the tensor in partials
  int64_t per_block;  // chunks per block (phase B; 1 in phase A)
  bool fused;         // fuse_one_chunk && nchunks == 1
};

struct PlanBlock {
  int32_t local;  // index into Launch::tensors
  int32_t chunk;  // first chunk handled by the block
};

struct Launch {
  std::vector<PlanTensor> tensors;
  std::vector<PlanBlock> blocks;
};

inline void check_capacities(int64_t max_tensors, int64_t max_blocks) {
  TORCH_CHECK(max_tensors >= 1 && max_tensors <= kMaxTensors && max_blocks >= 1 &&
                  max_blocks <= kMaxBlocks,
              "fadam_fused (CUDA): table capacities must be in [1, ", kMaxTensors, "] and [1, ",
              kMaxBlocks, "], got ", max_tensors, " and ", max_blocks);
}

// Appends `nblocks` blocks of tensor `t` to the plan, block b starting at chunk (or index)
// b * t.per_block; a block that does not fit opens the next launch, where `t` is listed again.
// Every planner of the CUDA kernels (FAdam's two phases below, FAdafactor's four kernels in
// fadafactor_cuda.cu) packs its blocks with this one function.
inline void append_blocks(std::vector<Launch>& launches, const PlanTensor& t, int64_t nblocks,
                          int64_t max_tensors = kMaxTensors, int64_t max_blocks = kMaxBlocks) {
  TORCH_CHECK(nblocks == 0 || (nblocks - 1) * t.per_block <= INT32_MAX,
              "fadam_fused (CUDA): tensor ", t.tensor, " needs more than 2^31 blocks");
  if (launches.empty()) {
    launches.emplace_back();
  }
  bool listed = false;  // whether t is in the current launch's tensor table
  for (int64_t b = 0; b < nblocks; ++b) {
    Launch* cur = &launches.back();
    if (static_cast<int64_t>(cur->blocks.size()) == max_blocks ||
        (!listed && static_cast<int64_t>(cur->tensors.size()) == max_tensors)) {
      launches.emplace_back();
      cur = &launches.back();
      listed = false;
    }
    if (!listed) {
      cur->tensors.push_back(t);
      listed = true;
    }
    cur->blocks.push_back({static_cast<int32_t>(cur->tensors.size() - 1),
                           static_cast<int32_t>(b * t.per_block)});
  }
}

// Drops a trailing launch without blocks (no tensors, or only tensors that need none).
inline std::vector<Launch> trim_plan(std::vector<Launch> launches) {
  if (!launches.empty() && launches.back().blocks.empty()) {
    launches.pop_back();
  }
  return launches;
}

inline void check_chunk_size(int64_t chunk_size) {
  TORCH_CHECK(chunk_size > 0 && chunk_size <= (int64_t{1} << 30),
              "fadam_fused (CUDA): chunk_size must be in [1, 2^30] (in-chunk indices are 32-bit), "
              "got ", chunk_size);
}

// The chunks of a tensor of `numel` elements, checked to fit the int32 block entries.
inline int64_t checked_nchunks(int64_t tensor, int64_t numel, int64_t chunk_size) {
  const int64_t nchunks = nchunks_of(numel, chunk_size);
  TORCH_CHECK(nchunks <= INT32_MAX, "fadam_fused (CUDA): tensor ", tensor, " has ", numel,
              " elements: more than 2^31 chunks of ", chunk_size);
  return nchunks;
}

// Phase B blocks of a tensor of `nchunks` chunks: sets t.per_block, returns the block count.
inline int64_t phase_b_blocks(PlanTensor& t, int64_t numel) {
  if (t.fused) {
    return numel == 0 ? 0 : 1;
  }
  t.per_block = (t.nchunks + kMaxPhaseBBlocksPerTensor - 1) / kMaxPhaseBBlocksPerTensor;
  return numel == 0 ? 0 : (t.nchunks + t.per_block - 1) / t.per_block;
}

inline std::vector<Launch> make_plan(const std::vector<int64_t>& numels, int64_t chunk_size,
                                     bool fuse_one_chunk, Phase phase,
                                     int64_t max_tensors = kMaxTensors,
                                     int64_t max_blocks = kMaxBlocks) {
  check_chunk_size(chunk_size);
  check_capacities(max_tensors, max_blocks);
  std::vector<Launch> launches;
  int64_t slot0 = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t numel = numels[i];
    const int64_t nchunks = checked_nchunks(static_cast<int64_t>(i), numel, chunk_size);
    const bool fused = fuse_one_chunk && nchunks == 1;
    PlanTensor t{static_cast<int64_t>(i), nchunks, slot0, 1, fused};
    slot0 += nchunks;
    int64_t nblocks = nchunks;  // phase A, not fused: one block per chunk, even when empty
    if (phase == Phase::B) {
      nblocks = phase_b_blocks(t, numel);
    } else if (fused) {
      nblocks = numel == 0 ? 0 : 1;  // the overflow check only
    }
    append_blocks(launches, t, nblocks, max_tensors, max_blocks);
  }
  return trim_plan(std::move(launches));
}

}  // namespace fadam::cuda
