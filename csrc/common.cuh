// Device helpers shared by the kernels: the runtime's constants, 16-bit to fp32 conversion, vector
// loads of N consecutive entries, torch.argmax's order, and an exclusive scan over a group of warps.
#pragma once
#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace dspark {

constexpr float kGreedyBelow = 1e-5f;                                 // sampling.GREEDY_BELOW
constexpr int kStreamDraft = 0, kStreamAccept = 1, kStreamRecover = 2;  // rng.STREAM_*

// torch.argmax's order: NaN above every number, then the value, then the lower index (an engine's
// greedy token is its logits' torch.argmax).
__device__ __forceinline__ bool ranks_above(float a, int ia, float b, int ib) {
  const bool na = isnan(a), nb = isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// exp(x) as __expf computes it (ex2.approx of x·log2 e), but results below 2^-126 flush to zero
// instead of taking __expf's denormal path: for terms of a sum that already holds a 1 (the max's
// own term) the sum's bits are the same, in fewer instructions.
__device__ __forceinline__ float exp_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}

// x = s / T as the reference computes it, without the division at T = 1 (where it is s).
__device__ __forceinline__ float over_temperature(float s, float scale) { return scale == 1.f ? s : s / scale; }

// x = (U + bias) / T, a draft logit as every pass over a step's row computes it (the split pass's
// over_temperature skips the division at T = 1, where it is exact): thresholds, max keys and races
// then see the same bits.
__device__ __forceinline__ float draft_logit(float u, float bias, float T) { return (u + bias) / T; }

// A request's verify length ℓ within 0..γ: the reference checks it on the host; in a kernel a
// larger one read drafts and q of the next request and wrote past the request's tokens.
__device__ __forceinline__ int clamp_ell(int64_t ell, int gamma) {
  return ell < 0 ? 0 : ell > gamma ? gamma : static_cast<int>(ell);
}

// The element types the kernels are built for: fp32, bf16, fp16 (not fp64: the vector loads and the
// cuBLAS type mapping assume at most 4 bytes, and an fp64 U or W would be read as garbage).
#define DSPARK_DISPATCH_FLOATS(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

inline bool is_kernel_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// A per-request vector: `numel` entries of `type` on `device` (the op indexes it by request).
inline bool is_request_vector(const at::Tensor& t, int64_t numel, at::ScalarType type, const at::Device& device) {
  return t.numel() == numel && t.scalar_type() == type && t.device() == device && t.is_contiguous();
}

// The CUDA type of a torch scalar type (at::BFloat16 -> __nv_bfloat16, at::Half -> __half).
template <typename T>
using device_t = std::conditional_t<std::is_same_v<T, at::BFloat16>, __nv_bfloat16,
                                    std::conditional_t<std::is_same_v<T, at::Half>, __half, T>>;

// Entries p[0 .. N-1] as fp32, N = 4 or 8, in 16-byte (or, for four 16-bit entries, 8-byte) loads;
// the caller guarantees the alignment.
template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, float out[N]) {
  static_assert(N == 4 || N == 8, "four or eight entries");
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const float4 a = reinterpret_cast<const float4*>(p)[i];
      out[4 * i] = a.x, out[4 * i + 1] = a.y, out[4 * i + 2] = a.z, out[4 * i + 3] = a.w;
    }
  } else {
    using Raw = std::conditional_t<N == 8, uint4, uint2>;
    const Raw raw = *reinterpret_cast<const Raw*>(p);
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(h[i]);
  }
}

// Exclusive prefix sum of v in thread order over kWarps consecutive warps (`warp`: this one's index
// among them), whose totals go through warp_sums [kWarps] in shared memory; sync() is the barrier
// those warps share (__syncthreads for a whole block). The warps before this one are added in
// order, so a float scan rounds the same way on every call. *total, when given, gets the sum.
template <int kWarps, typename T, typename Sync>
__device__ __forceinline__ T warps_exclusive_scan(T v, int warp, T* warp_sums, Sync sync, T* total = nullptr) {
  const int lane = threadIdx.x % 32;
  T inclusive = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T below = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) inclusive += below;
  }
  T before = __shfl_up_sync(0xffffffffu, inclusive, 1);
  if (lane == 0) before = T(0);
  if (lane == 31) warp_sums[warp] = inclusive;
  sync();
  T prior = T(0), all = T(0);
#pragma unroll
  for (int i = 0; i < kWarps; ++i) {
    if (i < warp) prior += warp_sums[i];
    all += warp_sums[i];
  }
  if (total != nullptr) *total = all;
  return prior + before;
}

// Programmatic dependent launch (sm_90): let the next kernel's blocks start as ours exit, and wait
// for the previous kernel's results (and memory) before reading them.
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

}  // namespace dspark
