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

// DSPARK_MARKOV_PATH=gemm | step | radix | small-top-k: a path forced for comparisons and diagnostics
// (docs/kernels.md).
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

// Whether the library holds code for an arch from `lowest` up to the current GPU's (nvcc's numbers:
// 900 = sm_90; dspark build makes every 9.0 a 9.0a). A library built only for older archs still runs
// on Hopper through their PTX, JIT-compiled as that arch: its sm_90a kernels are a trap there and its
// griddepcontrol instructions are compiled out.
inline bool built_from(int lowest) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int device = props->major * 100 + props->minor * 10;
  constexpr int archs[] = {__CUDA_ARCH_LIST__};  // nvcc's -gencode archs, e.g. 860,900
  for (int arch : archs)
    if (arch >= lowest && arch <= device) return true;
  return false;
}

// Requests per launch of the kernels that put them on the grid's y axis (cuda_ops.MAX_REQUESTS).
constexpr int64_t kMaxGridY = 65535;

// A kernel launched this way may start while the previous kernel drains (programmatic dependent
// launch, sm_90+): it waits (wait_previous_kernel) before reading the previous kernel's output.
// `programmatic` false, DSPARK_PDL=0, or a library without sm_90+ code for this GPU (whose kernels
// could not wait, built_from) launch it in plain stream order instead.
template <typename... Params, typename... Args>
void launch_in_order(bool programmatic, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                     cudaStream_t stream, Args... args) {
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
  config.numAttrs = programmatic && at::cuda::getCurrentDeviceProperties()->major >= 9 && built_from(900) &&
                    !(off && std::string(off) == "0") ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...));
}
template <typename... Params, typename... Args>
void launch_programmatic(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                         Args... args) {
  launch_in_order(true, kernel, grid, block, smem, stream, args...);
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
