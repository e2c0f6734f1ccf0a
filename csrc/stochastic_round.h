// bfloat16 stochastic rounding, written once for every C++ backend (the CPU kernels, the CUDA
// kernels and their emulated build): the counter-based bits and the rounding of a float32 to
// bfloat16 ([note: stochastic rounding] in fadam_fused/op_contract.py; the oracle is
// fadam_fused/reference.py's rounding_bits / round_bf16_stochastic, the Triton twin
// triton_kernels/_rounding.py).
//
//   h = fmix32(seed ^ t); h = fmix32(h ^ lo32(index)); h = fmix32(h ^ hi32(index) ^ stream * C)
//   r = h >> 16;  bf16 = upper 16 bits of (bits(x) + r) mod 2^32  (finite x; else x to nearest)
//
// The first fmix32 depends on (seed, t) only: a kernel computes it once per tensor
// (tensor_key) and each element pays two fmix32 (4 multiplies) per stream. No state, no host
// read: a step draws the same bits on every backend and is CUDA-graph capturable.
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

// 16 random bits (in the low half) for logical element `index` of stream `stream`.
C10_HOST_DEVICE inline uint32_t rounding_bits(uint32_t key, uint64_t index, uint32_t stream) {
  uint32_t h = fmix32(key ^ static_cast<uint32_t>(index));
  h = fmix32(h ^ static_cast<uint32_t>(index >> 32) ^ (stream * kStreamMul));
  return h >> 16;
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
