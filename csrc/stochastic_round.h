// bfloat16 stochastic rounding, written once for every C++ backend (the CPU kernels, the CUDA
// kernels and their emulated build): the counter-based bits and the rounding of a float32 to
// bfloat16 ([note: stochastic rounding] in fadam_fused/op_contract.py; the oracle is
// fadam_fused/reference.py's rounding_bits / round_bf16_stochastic, the Triton twin
// triton_kernels/_rounding.py).
//
//   k = fmix32(seed ^ t);  k = fmix32(k ^ hi32(index >> 1) ^ stream * C)     (stream_key)
//   h = fmix32(k ^ lo32(index >> 1));  r = index even ? h & 0xFFFF : h >> 16  (rounding_bits)
//   bf16 = upper 16 bits of (bits(x) + r) mod 2^32  (finite x; else x to nearest)
//
// The first fmix32 depends on (seed, t) only and the second also on the stream (and on index >>
// 33): a kernel computes them once per tensor and stream. Each fmix32 of an element pair gives
// both elements' 16 bits, so a vector of whole pairs pays half an fmix32 (one 32-bit multiply)
// per element and stream. No state, no host read: a step draws the same bits on every backend
// and is CUDA-graph capturable.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>

namespace fadam {

constexpr uint32_t kStreamParam = 0;     // the parameter's bits
constexpr uint32_t kStreamMomentum = 1;  // the momentum's
constexpr uint32_t kStreamMul = 0x9E3779B9u;

// MurmurHash3's 32-bit finaliser: a bijection of uint32 whose output bits each depend on every
// input bit (avalanche), so consecutive indices give independent-looking bits.
C10_HOST_DEVICE inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The per-tensor part of the hash: fmix32(lo32(seed) ^ lo32(t)).
C10_HOST_DEVICE inline uint32_t tensor_key(int64_t seed, uint32_t t) {
  return fmix32(static_cast<uint32_t>(seed) ^ t);
}

// The key of stream `stream` of a tensor (key: tensor_key) for the element pairs whose index
// >> 1 has the high half `pair_hi` (every pair of a tensor below 2^33 elements: 0).
C10_HOST_DEVICE inline uint32_t stream_key(uint32_t key, uint32_t pair_hi, uint32_t stream) {
  return fmix32(key ^ pair_hi ^ (stream * kStreamMul));
}

// The 16 random bits of the two elements of pair `pair_lo` (lo32(index >> 1)): the even
// element's in the low half, the odd one's in the high half.
C10_HOST_DEVICE inline uint32_t pair_bits(uint32_t skey, uint32_t pair_lo) {
  return fmix32(skey ^ pair_lo);
}

// Element `index`'s 16 bits of its pair's hash h (pair_bits): the low half for an even index,
// the high half for an odd one.
C10_HOST_DEVICE inline uint32_t pair_half(uint32_t h, uint64_t index) {
  return (h >> (16 * static_cast<uint32_t>(index & 1))) & 0xFFFFu;
}

// 16 random bits (in the low half) for logical element `index` of stream `stream`.
C10_HOST_DEVICE inline uint32_t rounding_bits(uint32_t key, uint64_t index, uint32_t stream) {
  const uint64_t pair = index >> 1;
  return pair_half(pair_bits(stream_key(key, static_cast<uint32_t>(pair >> 32), stream),
                             static_cast<uint32_t>(pair)),
                   index);
}

// The bfloat16 bits of float32 `x` rounded stochastically with the 16 random bits `r`: the
// magnitude rounds up with probability (x's low 16 bits) / 2^16, so E[result] = x. NaN and inf
// take round-to-nearest as torch's .to(bfloat16): inf has no low bits, a NaN becomes 0x7FC0.
C10_HOST_DEVICE inline uint16_t bf16_bits_stochastic(float x, uint32_t r) {
  uint32_t u;
  ::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7F800000u) == 0x7F800000u) {
    return (u & 0x007FFFFFu) ? uint16_t{0x7FC0} : static_cast<uint16_t>(u >> 16);
  }
  return static_cast<uint16_t>((u + r) >> 16);
}

// Where a tensor's (or a shard's) elements sit in the logical tensor, and its seed: one
// [seed, base, inner_local, inner_global] row of the ops' `rounding` list. Local element e (memory
// order) is logical element base + (e / inner_local) * inner_global + e % inner_local.
struct RoundingArgs {
  int64_t seed = 0, base = 0, inner_local = 1, inner_global = 1;

  C10_HOST_DEVICE bool whole() const {  // one contiguous run: index = base + e
    return inner_local == inner_global;
  }
  C10_HOST_DEVICE uint64_t index(int64_t e) const {
    if (whole()) {
      return static_cast<uint64_t>(base + e);
    }
    const int64_t q = e / inner_local;
    return static_cast<uint64_t>(base + q * inner_global + (e - q * inner_local));
  }
};

}  // namespace fadam
