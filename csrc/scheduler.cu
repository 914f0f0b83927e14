// Production verify-length scheduler (dspark_cli/runtime/scheduler.py, schedule_production): on
// Hopper a cluster of two blocks (one sorts the stale survival, one the current), else one block.
// K = argmax_n Θ_n over the stale survival for the n the current batch can admit (n <= R·γ;
// Θ_n = (R + Σ_{i<=n} a_i)·SPS(R + n), earliest n on ties), then the top-K current candidates are
// admitted; ℓ_r = admitted candidates of request r.
// Candidates are ranked by a descending, then by the j-major flat index j·R + r ascending — the
// reference's stable sort — with a bitonic sort of 64-bit keys (registers, shuffles, shared memory).
// No host sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>

#include <cstdlib>
#include <cstring>

namespace dspark {
namespace {

namespace cg = cooperative_groups;

constexpr int kMaxCandidates = 2048;
constexpr int kThreads = 1024;

// Ascending order of these keys = a descending, then flat index ascending (a >= 0: its bits are monotone).
__device__ __forceinline__ uint64_t rank_key(float a, int flat) {
  const uint32_t bits = __float_as_uint(a + 0.f);  // -0.0 -> +0.0
  return (static_cast<uint64_t>(~bits) << 32) | static_cast<uint32_t>(flat);
}

__device__ __forceinline__ float key_value(uint64_t key) { return __uint_as_float(~static_cast<uint32_t>(key >> 32)); }

// Compare-exchange element i (holding `mine`) with its partner i ^ stride (holding `theirs`) in
// bitonic stage `size`: the lower index keeps the min when the run is ascending.
__device__ __forceinline__ uint64_t exchange(uint64_t mine, uint64_t theirs, int i, int stride, int size) {
  const bool ascending = (i & size) == 0, lower = (i & stride) == 0;
  return (lower == ascending) ? min(mine, theirs) : max(mine, theirs);
}

// Strides <= 32 of one bitonic stage: thread t holds elements 2t and 2t+1, so stride 1 is inside
// the thread and strides 2..32 are inside the warp (shuffles, no barrier).
__device__ __forceinline__ void small_strides(uint64_t& k0, uint64_t& k1, int size, int top) {
  const int i0 = 2 * threadIdx.x;
  for (int stride = top; stride >= 2; stride >>= 1) {
    const uint64_t t0 = __shfl_xor_sync(0xffffffffu, k0, stride / 2);
    const uint64_t t1 = __shfl_xor_sync(0xffffffffu, k1, stride / 2);
    k0 = exchange(k0, t0, i0, stride, size);
    k1 = exchange(k1, t1, i0 + 1, stride, size);
  }
  const uint64_t lo = exchange(k0, k1, i0, 1, size), hi = exchange(k1, k0, i0 + 1, 1, size);
  k0 = lo;
  k1 = hi;
}

// Load a [R, γ] survival matrix j-major (flat index j·R + r) and sort its keys, padded with
// all-ones keys to n_pad = max(64, 2^⌈log2 R·γ⌉). Barriers only for strides >= 64 (21 at n_pad = 2048).
__device__ void load_sorted(const float* a, int R, int gamma, uint64_t* keys) {
  const int n = R * gamma;
  int n_pad = 64;
  while (n_pad < n) n_pad <<= 1;
  const int i0 = 2 * threadIdx.x;
  // Only the first n_pad / 2 threads (whole warps: n_pad >= 64) hold keys; the rest just keep the barriers.
  const bool holds = i0 < n_pad;
  uint64_t k0 = i0 < n ? rank_key(a[(i0 % R) * gamma + i0 / R], i0) : ~0ull;
  uint64_t k1 = i0 + 1 < n ? rank_key(a[((i0 + 1) % R) * gamma + (i0 + 1) / R], i0 + 1) : ~0ull;
  if (holds) {
    for (int size = 2; size <= 64; size <<= 1) small_strides(k0, k1, size, min(size / 2, 32));
    keys[i0] = k0;
    keys[i0 + 1] = k1;
  }
  __syncthreads();
  for (int size = 128; size <= n_pad; size <<= 1) {
    for (int stride = size / 2; stride >= 64; stride >>= 1) {
      for (int i = threadIdx.x; i < n_pad; i += blockDim.x) {
        const int partner = i ^ stride;
        if (partner > i) {
          const uint64_t x = keys[i], y = keys[partner];
          keys[i] = exchange(x, y, i, stride, size);
          keys[partner] = exchange(y, x, partner, stride, size);
        }
      }
      __syncthreads();
    }
    if (holds) {
      k0 = keys[i0];
      k1 = keys[i0 + 1];
      small_strides(k0, k1, size, 32);
      keys[i0] = k0;
      keys[i0 + 1] = k1;
    }
    __syncthreads();
  }
}

// One block's shared state.
struct Smem {
  uint64_t keys[kMaxCandidates];
  float prefix[kMaxCandidates];
  float warp_total[kThreads / 32];
  float best_theta[kThreads / 32];
  int best_n[kThreads / 32];
  int ell_s[kMaxCandidates];
  int budget;
};

// Argmax of (theta, arg) over the warp, the earliest arg on ties; every lane gets it.
__device__ __forceinline__ void warp_argmax(float& theta, int& arg) {
  for (int off = 16; off > 0; off >>= 1) {
    const float t = __shfl_xor_sync(0xffffffffu, theta, off);
    const int n = __shfl_xor_sync(0xffffffffu, arg, off);
    if (t > theta || (t == theta && n < arg)) {
      theta = t;
      arg = n;
    }
  }
}

// 1. The verify budget K from the stale survival (into sm.budget, valid after the final barrier):
// sort, inclusive prefix sums (thread t owns 2t, 2t+1), then the first argmax of Θ_n.
__device__ void verify_budget_block(const float* __restrict__ a_stale, int R_stale, int R, int gamma,
                                    const float* __restrict__ sps_dense, int sps_limit, Smem& sm) {
  load_sorted(a_stale, R_stale, gamma, sm.keys);
  const int n_stale = R_stale * gamma;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  {
    const int i0 = 2 * threadIdx.x;
    const float v0 = i0 < n_stale ? key_value(sm.keys[i0]) : 0.f;
    const float v1 = i0 + 1 < n_stale ? key_value(sm.keys[i0 + 1]) : 0.f;
    float run = v0 + v1;
    for (int off = 1; off < 32; off <<= 1) {
      const float up = __shfl_up_sync(0xffffffffu, run, off);
      if (lane >= off) run += up;
    }
    if (lane == 31) sm.warp_total[warp] = run;
    __syncthreads();
    if (warp == 0) {
      float t = sm.warp_total[lane];
      for (int off = 1; off < 32; off <<= 1) {
        const float up = __shfl_up_sync(0xffffffffu, t, off);
        if (lane >= off) t += up;
      }
      sm.warp_total[lane] = t;  // inclusive over warps
    }
    __syncthreads();
    float exclusive = __shfl_up_sync(0xffffffffu, run, 1);
    if (lane == 0) exclusive = 0.f;
    const float before = (warp > 0 ? sm.warp_total[warp - 1] : 0.f) + exclusive;
    sm.prefix[i0] = before + v0;
    sm.prefix[i0 + 1] = before + v0 + v1;
  }
  __syncthreads();
  float theta = -INFINITY;
  int arg = 0x7fffffff;
  const int most = min(n_stale, R * gamma);  // a larger stale batch's best n may not be admissible now
  for (int n = threadIdx.x; n <= most; n += blockDim.x) {
    const int tokens = R + n;
    const float sps = tokens > sps_limit ? sps_dense[sps_limit] * static_cast<float>(sps_limit) / static_cast<float>(tokens)
                                         : sps_dense[max(tokens, 1)];
    const float t = (static_cast<float>(R) + (n > 0 ? sm.prefix[n - 1] : 0.f)) * sps;
    if (t > theta) {  // n ascending per thread: strict > keeps the earliest
      theta = t;
      arg = n;
    }
  }
  warp_argmax(theta, arg);
  if (lane == 0) {
    sm.best_theta[warp] = theta;
    sm.best_n[warp] = arg;
  }
  __syncthreads();
  if (warp == 0) {  // argmax over the warps' bests, earliest n on ties
    theta = sm.best_theta[lane];
    arg = sm.best_n[lane];
    warp_argmax(theta, arg);
    if (lane == 0) sm.budget = arg;
  }
  __syncthreads();
}

// 2. Admit the top-`budget` current candidates, from keys already sorted by load_sorted(a_now).
__device__ void admit_block(int R, int budget, Smem& sm, int64_t* __restrict__ ell) {
  for (int r = threadIdx.x; r < R; r += blockDim.x) sm.ell_s[r] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < budget; i += blockDim.x) atomicAdd(&sm.ell_s[static_cast<uint32_t>(sm.keys[i]) % R], 1);
  __syncthreads();
  for (int r = threadIdx.x; r < R; r += blockDim.x) ell[r] = sm.ell_s[r];
}

// One block does both sorts in turn (GPUs before Hopper).
__global__ void __launch_bounds__(kThreads) schedule_production_kernel(
    const float* __restrict__ a_stale, int R_stale, const float* __restrict__ a_now, int R, int gamma,
    const float* __restrict__ sps_dense, int sps_limit, int64_t* __restrict__ ell) {
  __shared__ Smem sm;
  verify_budget_block(a_stale, R_stale, R, gamma, sps_dense, sps_limit, sm);
  const int budget = sm.budget;
  __syncthreads();  // everyone has read the budget before load_sorted reuses the keys
  load_sorted(a_now, R, gamma, sm.keys);
  admit_block(R, budget, sm, ell);
}

// Hopper: a cluster of two blocks sorts the stale and the current survival at the same time; block 1
// reads the budget from block 0's shared memory (distributed shared memory), then admits.
__global__ void __launch_bounds__(kThreads) schedule_production_cluster_kernel(
    const float* __restrict__ a_stale, int R_stale, const float* __restrict__ a_now, int R, int gamma,
    const float* __restrict__ sps_dense, int sps_limit, int64_t* __restrict__ ell) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ Smem sm;
  cg::cluster_group cluster = cg::this_cluster();
  if (cluster.block_rank() == 0) verify_budget_block(a_stale, R_stale, R, gamma, sps_dense, sps_limit, sm);
  else load_sorted(a_now, R, gamma, sm.keys);
  cluster.sync();  // block 0's budget is final and visible to block 1
  int budget = 0;
  if (cluster.block_rank() == 1) budget = *cluster.map_shared_rank(&sm.budget, 0);
  cluster.sync();  // block 0 keeps its shared memory until block 1 has read it
  if (cluster.block_rank() == 1) admit_block(R, budget, sm, ell);
#endif
}

}  // namespace

at::Tensor schedule_production_cuda(const at::Tensor& a_stale, const at::Tensor& a_now, const at::Tensor& sps_dense,
                                    int64_t sps_limit) {
  TORCH_CHECK(a_stale.is_cuda() && a_now.is_cuda() && sps_dense.is_cuda(), "dspark::schedule_production: CUDA tensors");
  TORCH_CHECK(a_stale.scalar_type() == at::kFloat && a_now.scalar_type() == at::kFloat &&
                  sps_dense.scalar_type() == at::kFloat, "dspark::schedule_production: fp32 inputs");
  TORCH_CHECK(a_stale.dim() == 2 && a_now.dim() == 2 && a_stale.size(1) == a_now.size(1),
              "dspark::schedule_production: a_stale [R', γ] and a_now [R, γ]");
  TORCH_CHECK(a_stale.numel() <= kMaxCandidates && a_now.numel() <= kMaxCandidates,
              "dspark::schedule_production: at most 2048 candidates");
  TORCH_CHECK(sps_dense.numel() == sps_limit + 1, "dspark::schedule_production: sps_dense has sps_limit + 1 entries");
  const c10::cuda::CUDAGuard guard(a_now.device());
  const int R = a_now.size(0), gamma = a_now.size(1), R_stale = a_stale.size(0);
  auto ell = at::empty({R}, a_now.options().dtype(at::kLong));
  auto stale = a_stale.contiguous(), now = a_now.contiguous();
  const float* stale_p = stale.data_ptr<float>();
  const float* now_p = now.data_ptr<float>();
  const float* sps_p = sps_dense.data_ptr<float>();
  const int limit = static_cast<int>(sps_limit);
  int64_t* ell_p = ell.data_ptr<int64_t>();
  // DSPARK_SCHEDULE_ONE_BLOCK=1 takes the pre-Hopper kernel on Hopper too (tests cover both).
  const char* one_block = std::getenv("DSPARK_SCHEDULE_ONE_BLOCK");
  const bool force_one_block = one_block != nullptr && std::strcmp(one_block, "1") == 0;
  if (at::cuda::getCurrentDeviceProperties()->major >= 9 && !force_one_block) {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(2);
    config.blockDim = dim3(kThreads);
    config.stream = at::cuda::getCurrentCUDAStream();
    cudaLaunchAttribute cluster;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 2;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, schedule_production_cluster_kernel, stale_p, R_stale, now_p, R, gamma,
                                      sps_p, limit, ell_p));
  } else {
    schedule_production_kernel<<<1, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(stale_p, R_stale, now_p, R, gamma,
                                                                                      sps_p, limit, ell_p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ell;
}

}  // namespace dspark
