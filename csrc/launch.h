// Host-side helpers shared by the chain's launchers (markov.cu, fused_step.cu): forced paths,
// alignment, dispatch on a float tensor's type, programmatic dependent launch and the dynamic
// shared-memory limit.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>
#include <utility>

namespace dspark {

// DSPARK_MARKOV_PATH=gemm | step: a path forced for comparisons and diagnostics (docs/kernels.md).
inline bool markov_path_forced(const char* path) {
  const char* forced = std::getenv("DSPARK_MARKOV_PATH");
  return forced && std::string(forced) == path;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// f(T{}) with T the device type of an fp32, bf16 or fp16 tensor; `what` is the error otherwise.
template <typename F>
void with_float_type(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kHalf: f(__half{}); break;
    default: TORCH_CHECK(false, what);
  }
}

// A kernel launched this way may start while the previous kernel drains (programmatic dependent
// launch, sm_90+): it waits (wait_previous_kernel) before reading the previous kernel's output.
// DSPARK_PDL=0 turns it off (plain stream order).
template <typename... Params, typename... Args>
void launch_programmatic(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                         Args... args) {
  const char* off = std::getenv("DSPARK_PDL");
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = at::cuda::getCurrentDeviceProperties()->major >= 9 && !(off && std::string(off) == "0") ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...));
}

// Raises a kernel's dynamic shared-memory limit to `bytes` on the current device. The attribute is
// per device and per kernel, so it is set once for each pair (not on every launch: host time).
template <typename... Params>
void allow_dynamic_smem(void (*kernel)(Params...), int bytes) {
  static std::mutex mutex;
  static std::set<std::pair<int, const void*>> done;
  const std::pair<int, const void*> key{at::cuda::current_device(), reinterpret_cast<const void*>(kernel)};
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count(key)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.insert(key);
}

}  // namespace dspark
