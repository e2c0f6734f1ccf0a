// What differs between the two compilers of the CUDA kernels (csrc/cuda/fadam_cuda.cu and
// fadafactor_cuda.cu): the device guard, the launch spelling, the dispatch key and the op names.
// Everything else in those files (kernels, plan, tables, step scalars, dtype dispatch) is one
// source for both.
//
// [note: one CUDA source, two compilers]
// nvcc (setup.py's CUDA build, fadam_fused._C): kernels for the GPU, launched on the current
// stream under a device guard, registered as fadam_fused::fadam_phase_a/b and
// fadafactor_phase_s/a/b for DispatchKey::CUDA.
// g++ with HIP-CPU (setup.py's test build when FADAM_HIP_CPU names the HIP-CPU folder,
// fadam_fused._C_cuda_emulated, via cuda/fadam_cuda_emulated.cpp): the same kernels run on the
// CPU, each block's 512 threads as fibers, registered as fadam_fused::cuda_emulated_phase_a/b and
// cuda_emulated_fadafactor_phase_s/a/b (same schemas, defined in fadam_fused/op_contract.py) for
// DispatchKey::CPU, so they never shadow the CPU kernels of fadam_phase_a/b and fadafactor_*.
// backend="cuda" calls them for CPU tensors when FADAM_CUDA_EMULATE=1 (fadam_fused/backends.py).
// The shims below give HIP-CPU the CUDA spellings the kernels use; HIP-CPU's own limits (64-lane
// waves, fiber stacks) are in the README of the copy the build points at.
//
// What emulation cannot check: memory ordering and races (threads of a block interleave only at
// barriers and shuffles, blocks run one after another), speed, registers and spills (checked on
// the nvcc build by tests/test_cuda_build.py), and nvcc's code generation itself.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#if defined(FADAM_CUDA_EMULATED)

#include <algorithm>
#include <cmath>

// After torch's headers: hip_runtime.h defines __HIPCC__ and __HIP__, which make them look for
// thrust.
#include <hip/hip_runtime.h>
#undef __HIPCC__
#undef __HIP__

// HIP-CPU's wave is 64 lanes; the kernels' warps are 32.
#define __shfl_down_sync(mask, v, off) __shfl_down(v, off, 32)
#define __launch_bounds__(...)
#define __grid_constant__
using std::isfinite;
using std::min;

#define FADAM_CUDA_DISPATCH_KEY CPU
// An op name: the first for nvcc, the second for the emulated build.
#define FADAM_CUDA_OP(real, emulated) emulated

namespace fadam::cuda {

constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;

class LaunchScope {
 public:
  explicit LaunchScope(const at::Device&) {}

  // HIP-CPU runs a launch on its own thread: wait for it before the host or torch touches the
  // memory again, as the stream order does on a GPU.
  template <typename Kernel, typename Args>
  void launch(Kernel kernel, unsigned blocks, unsigned threads, const Args& args) const {
    hipLaunchKernelGGL(kernel, dim3(blocks), dim3(threads), 0, nullptr, args);
    const hipError_t err = hipDeviceSynchronize();
    TORCH_CHECK(err == hipSuccess, "fadam_fused (emulated CUDA): kernel failed: ",
                hipGetErrorString(err));
  }
};

}  // namespace fadam::cuda

#else  // nvcc

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define FADAM_CUDA_DISPATCH_KEY CUDA
#define FADAM_CUDA_OP(real, emulated) real

namespace fadam::cuda {

constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;

class LaunchScope {
 public:
  explicit LaunchScope(const at::Device& device)
      : guard_(device), stream_(c10::cuda::getCurrentCUDAStream(device.index()).stream()) {}

  template <typename Kernel, typename Args>
  void launch(Kernel kernel, unsigned blocks, unsigned threads, const Args& args) const {
    kernel<<<blocks, threads, 0, stream_>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
};

}  // namespace fadam::cuda

#endif
