// fadam_fused::advance_steps on the CPU: every optimizer of the family counts steps in one
// float32 0-dim tensor per parameter (torch.optim's layout, kept in state_dict), and the engine
// adds 1 to all of them before a step's phases ([note: the step engine] in engine.py).
//
// Why an op: torch._foreach_add_ on CPU tensors dispatches one add_ per tensor, ~2.2 us each,
// so 4096 parameters spend 9 ms per step in it (measured: a quarter of such a step, more than
// the FAdam kernels' own ~8 ms). Here a counter is a load and a store: ~0.1 ms for 4096. The
// result is the same float32 addition, so the bits are those of _foreach_add_(steps, 1).
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>
#include <torch/library.h>

namespace fadam {
namespace {

void advance_steps(at::TensorList steps) {
  // Every counter is checked before the first is written: a refused list changes nothing.
  for (const auto i : c10::irange(steps.size())) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1,
                "advance_steps: steps[", i, "] must be a one-element float32 CPU tensor, got ",
                s.scalar_type(), " of shape ", s.sizes(), " on ", s.device());
  }
  for (const at::Tensor& s : steps) {
    *s.data_ptr<float>() += 1.0f;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fadam_fused, CPU, m) {
  m.impl("advance_steps", &advance_steps);
}

}  // namespace fadam
