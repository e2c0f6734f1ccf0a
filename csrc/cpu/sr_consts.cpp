// The vector constants of the CPU's stochastic rounding hash (SrConsts in cpu_vec.h), in their own
// translation unit so that the element loops read them from memory instead of rebuilding them.
#include "cpu/cpu_vec.h"

namespace fadam {

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
namespace {
constexpr SrConsts make_sr_consts() {
  SrConsts c{};
  for (int j = 0; j < 8; ++j) {
    c.fmix_mul1[j] = 0x85EBCA6Bu;  // fmix32 in csrc/stochastic_round.h
    c.fmix_mul2[j] = 0xC2B2AE35u;
    c.pair_step[j] = static_cast<uint32_t>(j % 4);
  }
  return c;
}
}  // namespace

const SrConsts kSrConsts = make_sr_consts();
#endif

}  // namespace fadam
