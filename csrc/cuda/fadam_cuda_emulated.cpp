// The emulated CUDA build (test only): csrc/cuda/fadam_cuda.cu, fadafactor_cuda.cu and
// adafisher_cuda.cu compiled by
// g++ with HIP-CPU, as the Python module fadam_fused._C_cuda_emulated ([note: one CUDA source, two compilers] in
// cuda/launch.h). setup.py builds it when FADAM_HIP_CPU names the HIP-CPU folder.
#include <Python.h>

#define FADAM_CUDA_EMULATED 1
#include "cuda/fadam_cuda.cu"
#include "cuda/fadafactor_cuda.cu"
#include "cuda/adafisher_cuda.cu"

// Importing the module runs the static initialisers that register the cuda_emulated_* ops.
PyMODINIT_FUNC PyInit__C_cuda_emulated(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda_emulated", nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
