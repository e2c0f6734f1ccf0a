// The fadam_fused op library: one schema per op, implemented per dispatch key in csrc/cpu/ and
// csrc/cuda/, with Python fake kernels in fadam_fused/ops.py. The contract of each argument is
// [note: the two-phase op contract] in fadam_ops.h.
#include <Python.h>
#include <torch/library.h>

#include "fadam_ops.h"

// `import fadam_fused._C` loads this library, whose static initialisers register the ops. The
// module itself is empty (the pattern of pytorch/extension-cpp): everything is reached through
// torch.ops.fadam_fused.
// PyMODINIT_FUNC is extern "C" with default visibility (the library builds with -fvisibility=hidden).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fadam_fused, m) {
  // Phase A (read-only on params, grads, fims, steps): per-chunk float64 sums of ghat^2 and w^2
  // into `partials` (none with clip <= 0), and 1 into `skip` if a gradient is not finite.
  m.def("fadam_phase_a" FADAM_PHASE_A_SCHEMA);
  // Phase B: unless skip != 0, apply the two clip scales and write fims, momentums and params.
  m.def("fadam_phase_b" FADAM_PHASE_B_SCHEMA);
}
