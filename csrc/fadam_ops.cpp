// The fadam_fused extension module. The op schemas are defined once, in Python
// (fadam_fused/op_contract.py, [note: the two-phase op contract]); this library only registers
// kernels for them, per dispatch key, in csrc/cpu/ and csrc/cuda/.
#include <Python.h>
#include <torch/library.h>

// `import fadam_fused._C` loads this library, whose static initialisers register the ops. The
// module itself is empty (the pattern of pytorch/extension-cpp): everything is reached through
// torch.ops.fadam_fused.
// PyMODINIT_FUNC is extern "C" with default visibility (the library builds with -fvisibility=hidden).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
