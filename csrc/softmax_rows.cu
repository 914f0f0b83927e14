// Softmax of fp32 logit rows and each row's argmax, the target side of a verification from an
// engine's logits (dspark_cli/runtime/target_probs.py). torch's softmax reads a [N, V] row three
// times and writes it once, its argmax reads it again. Here, on Hopper with enough rows, one
// kernel reads each row once and writes it once: a cluster of kClusterBlocks blocks per row, each
// keeping its slice in shared memory while the cluster merges the slices' max, Σ exp(x − max) and
// argmax through distributed shared memory. Otherwise (few rows: too few clusters to fill the GPU;
// older GPUs; rows too long for shared memory or V % 4 != 0) two kernels:
//   1. stats_kernel, grid (splits, N): each block's slice of a row gives its max, Σ exp(x − max)
//      and argmax (one read);
//   2. write_kernel, the same grid: each block merges its row's `splits` partials and writes
//      exp(x − max) / Σ over its slice (a read and a write), split 0 the argmax.
// Splits give small batches (N = γ rows at R = 1) enough blocks; large ones take one per row.
// softmax_stats writes no probabilities: stats_kernel's merged parts give each row's max and
// 1 / Σ exp(x − max) (and argmax), from which a verification computes the entries it reads
// (target_rows.cuh); one read of the logits in all.
// Semantics are torch's: a row with a NaN softmaxes to NaN, one of −inf only too; the argmax is
// the first of equal maxima, NaN ranking above every number.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "launch.h"

namespace dspark {
namespace {

constexpr int kThreads = 512;
constexpr int kMaxSplits = 64;
constexpr int kMinPerThread = 8;  // entries per thread at least, or a split is not worth its block
constexpr int kInFlight = 4;      // stats_kernel's float4 loads in flight per thread
constexpr int kClusterBlocks = 8;  // a row's blocks in the one-pass kernel (the portable cluster size)
constexpr int kClusterSmemLimit = 200 * 1024;  // a block's slice of a row in shared memory, at most
constexpr int kStaticSmemMargin = 4 * 1024;    // beside it, cluster_kernel's static shared memory (< 1 KB)

struct RowPart {
  float max;  // of the entries seen (−inf: none above −inf yet)
  float sum;  // Σ exp(x − max); NaN once a NaN (or a second +inf) is seen
  float best;
  int best_idx;
};

__device__ __forceinline__ RowPart empty_part() { return {-INFINITY, 0.f, -INFINITY, INT_MAX}; }

// torch.argmax's order: NaN above every number, then the value, then the lower index.
__device__ __forceinline__ bool ranks_above(float a, int ia, float b, int ib) {
  const bool na = isnan(a), nb = isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

__device__ __forceinline__ void add(RowPart& p, float x, int idx) {
  if (ranks_above(x, idx, p.best, p.best_idx)) p.best = x, p.best_idx = idx;
  if (x > p.max) {
    // p.max = −inf: 0 · 0 + 1; x = +inf: its own term exp(inf − inf) is NaN, as torch's
    p.sum = p.sum * expf(p.max - x) + (x == INFINITY ? NAN : 1.f);
    p.max = x;
  } else if (x != -INFINITY) {  // −inf adds 0 (and exp(−inf − (−inf)) would be NaN); NaN makes the sum NaN
    p.sum += expf(x - p.max);
  }
}

__device__ __forceinline__ RowPart merge(const RowPart& a, const RowPart& b) {
  RowPart r = empty_part();
  r.max = fmaxf(a.max, b.max);
  // a part with no entry above −inf adds nothing (its sum 0); NaN sums stay NaN
  const float sa = a.sum == 0.f ? 0.f : a.sum * expf(a.max - r.max);
  const float sb = b.sum == 0.f ? 0.f : b.sum * expf(b.max - r.max);
  r.sum = sa + sb;
  const bool a_first = ranks_above(a.best, a.best_idx, b.best, b.best_idx);
  r.best = a_first ? a.best : b.best;
  r.best_idx = a_first ? a.best_idx : b.best_idx;
  return r;
}

__device__ __forceinline__ RowPart shuffle(const RowPart& p, int offset) {
  RowPart o = empty_part();
  o.max = __shfl_xor_sync(0xffffffffu, p.max, offset);
  o.sum = __shfl_xor_sync(0xffffffffu, p.sum, offset);
  o.best = __shfl_xor_sync(0xffffffffu, p.best, offset);
  o.best_idx = __shfl_xor_sync(0xffffffffu, p.best_idx, offset);
  return o;
}

// The warp's merge of its lanes' parts (every lane gets it).
__device__ __forceinline__ RowPart warp_merge(RowPart p) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) p = merge(p, shuffle(p, offset));
  return p;
}

// The block's merge of every thread's part (all threads get it).
__device__ RowPart block_merge(RowPart p) {
  __shared__ RowPart warps[kThreads / 32];
  p = warp_merge(p);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = p;
  __syncthreads();
  p = warps[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) p = merge(p, warps[w]);
  return p;
}

// The slice [begin, end) of a row that block `split` of `splits` takes: whole groups of 4.
__device__ __forceinline__ void slice_of(int split, int splits, int V, int& begin, int& end) {
  const int per = ((V + splits - 1) / splits + 3) / 4 * 4;
  begin = min(split * per, V);
  end = min(begin + per, V);
}

// softmax_stats' row: (max, 1 / Σ exp(x − max)) and the argmax.
__device__ __forceinline__ void write_stats(const RowPart& p, int row, float2* __restrict__ stats,
                                            int64_t* __restrict__ best) {
  stats[row] = make_float2(p.max, 1.f / p.sum);
  if (best != nullptr) best[row] = p.best_idx;
}

// Each split's part of its row into parts, or, given stats (one split a row: the part is the
// row's), softmax_stats' outputs.
template <bool kVec>
__global__ void __launch_bounds__(kThreads) stats_kernel(const float* __restrict__ logits, int V,
                                                         RowPart* __restrict__ parts, float2* __restrict__ stats,
                                                         int64_t* __restrict__ best) {
  const int split = blockIdx.x, splits = gridDim.x, row = blockIdx.y;
  const float* x = logits + static_cast<int64_t>(row) * V;
  int begin, end;
  slice_of(split, splits, V, begin, end);
  RowPart p = empty_part();
  if (kVec) {  // V % 4 == 0: every slice starts 16-byte aligned
    // kInFlight loads issued before the first is used (the adds are a serial chain per thread:
    // one load at a time waited a round trip per four entries), in the same order as one by one.
    constexpr int kStride = 4 * kThreads;
    int v = begin + 4 * threadIdx.x;
    for (; v + (kInFlight - 1) * kStride < end; v += kInFlight * kStride) {
      float4 f[kInFlight];
#pragma unroll
      for (int i = 0; i < kInFlight; ++i) f[i] = *reinterpret_cast<const float4*>(x + v + i * kStride);
#pragma unroll
      for (int i = 0; i < kInFlight; ++i) {
        const int w = v + i * kStride;
        add(p, f[i].x, w), add(p, f[i].y, w + 1), add(p, f[i].z, w + 2), add(p, f[i].w, w + 3);
      }
    }
    for (; v < end; v += kStride) {
      const float4 f = *reinterpret_cast<const float4*>(x + v);
      add(p, f.x, v), add(p, f.y, v + 1), add(p, f.z, v + 2), add(p, f.w, v + 3);
    }
  } else {
    for (int v = begin + threadIdx.x; v < end; v += kThreads) add(p, x[v], v);
  }
  p = block_merge(p);
  if (threadIdx.x != 0) return;
  if (stats != nullptr)
    write_stats(p, row, stats, best);
  else
    parts[static_cast<int64_t>(row) * splits + split] = p;
}

// softmax_stats over several splits a row: one warp a row merges its parts.
__global__ void finish_stats_kernel(const RowPart* __restrict__ parts, int splits, int N, float2* __restrict__ stats,
                                    int64_t* __restrict__ best) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  RowPart p = empty_part();
  for (int s = lane; s < splits; s += 32) p = merge(p, parts[static_cast<int64_t>(row) * splits + s]);
  p = warp_merge(p);
  if (lane == 0) write_stats(p, row, stats, best);
}

template <bool kVec>
__global__ void __launch_bounds__(kThreads) write_kernel(const float* __restrict__ logits, int V,
                                                         const RowPart* __restrict__ parts, float* __restrict__ probs,
                                                         int64_t* __restrict__ best) {
  const int split = blockIdx.x, splits = gridDim.x, row = blockIdx.y;
  __shared__ RowPart whole;
  if (threadIdx.x < 32) {
    RowPart p = empty_part();
    for (int s = threadIdx.x; s < splits; s += 32) p = merge(p, parts[static_cast<int64_t>(row) * splits + s]);
    p = warp_merge(p);
    if (threadIdx.x == 0) whole = p;
  }
  __syncthreads();
  const float m = whole.max, sum = whole.sum;
  if (split == 0 && threadIdx.x == 0 && best != nullptr) best[row] = whole.best_idx;
  const float* x = logits + static_cast<int64_t>(row) * V;
  float* out = probs + static_cast<int64_t>(row) * V;
  int begin, end;
  slice_of(split, splits, V, begin, end);
  if (kVec) {
    for (int v = begin + 4 * threadIdx.x; v < end; v += 4 * kThreads) {
      const float4 f = *reinterpret_cast<const float4*>(x + v);
      *reinterpret_cast<float4*>(out + v) =
          make_float4(expf(f.x - m) / sum, expf(f.y - m) / sum, expf(f.z - m) / sum, expf(f.w - m) / sum);
    }
  } else {
    for (int v = begin + threadIdx.x; v < end; v += kThreads) out[v] = expf(x[v] - m) / sum;
  }
}

// One row per cluster: its slice loaded into shared memory once (stats as it arrives), the
// cluster's parts merged by warp 0 of every block from the others' shared memory, the slice
// written from shared memory. Two cluster barriers: the parts are complete, then no block leaves
// (its shared memory) while another still reads its part.
__global__ void __launch_bounds__(kThreads) cluster_kernel(const float* __restrict__ logits, int V,
                                                           float* __restrict__ probs, int64_t* __restrict__ best) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  extern __shared__ float4 slice[];
  __shared__ RowPart own, whole;
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank()), row = blockIdx.y;
  const float* x = logits + static_cast<int64_t>(row) * V;
  int begin, end;
  slice_of(rank, kClusterBlocks, V, begin, end);
  RowPart p = empty_part();
  for (int v = begin + 4 * threadIdx.x; v < end; v += 4 * kThreads) {
    const float4 f = *reinterpret_cast<const float4*>(x + v);
    slice[(v - begin) / 4] = f;
    add(p, f.x, v), add(p, f.y, v + 1), add(p, f.z, v + 2), add(p, f.w, v + 3);
  }
  p = block_merge(p);
  if (threadIdx.x == 0) own = p;
  cluster.sync();
  if (threadIdx.x < 32) {
    RowPart q = threadIdx.x < kClusterBlocks ? *cluster.map_shared_rank(&own, threadIdx.x) : empty_part();
    q = warp_merge(q);
    if (threadIdx.x == 0) whole = q;
  }
  cluster.sync();
  const float m = whole.max, sum = whole.sum;
  if (rank == 0 && threadIdx.x == 0 && best != nullptr) best[row] = whole.best_idx;
  float* out = probs + static_cast<int64_t>(row) * V;
  for (int v = begin + 4 * threadIdx.x; v < end; v += 4 * kThreads) {
    const float4 f = slice[(v - begin) / 4];
    *reinterpret_cast<float4*>(out + v) =
        make_float4(expf(f.x - m) / sum, expf(f.y - m) / sum, expf(f.z - m) / sum, expf(f.w - m) / sum);
  }
#endif
}

// Bytes of a cluster block's slice (slice_of's length for kClusterBlocks splits).
int64_t cluster_slice_bytes(int64_t V) { return ((V + kClusterBlocks - 1) / kClusterBlocks + 3) / 4 * 4 * 4; }

// The logits [N, V] and best [≥ N] checks both ops make; N ≥ 1 after them (0: nothing to do).
void check_logits(const char* op, const at::Tensor& logits, const std::optional<at::Tensor>& best) {
  TORCH_CHECK(logits.is_cuda() && logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous(),
              "dspark::", op, ": logits must be contiguous fp32 [N, V] on a GPU");
  TORCH_CHECK(logits.size(1) > 0 && logits.size(1) < INT_MAX, "dspark::", op, ": V must be in 1 .. 2^31 − 2");
  TORCH_CHECK(logits.size(0) <= 65535, "dspark::", op, ": at most 65535 rows per call (the grid's y axis)");
  TORCH_CHECK(!best.has_value() || !best->defined() ||
                  (best->scalar_type() == at::kLong && best->dim() == 1 && best->is_contiguous() &&
                   best->size(0) >= logits.size(0) && best->device() == logits.device()),
              "dspark::", op, ": best must be contiguous int64 [≥ N] on the logits' device");
}

int64_t* best_ptr(const std::optional<at::Tensor>& best) {
  return best.has_value() && best->defined() ? best->data_ptr<int64_t>() : nullptr;
}

// Blocks per row of the two-kernel passes: about four blocks per SM in all, each with
// kMinPerThread entries per thread at least.
int choose_splits(int64_t N, int64_t V, int64_t sms) {
  const int64_t by_size = std::max<int64_t>(1, V / (kThreads * kMinPerThread));
  return static_cast<int>(std::clamp<int64_t>((4 * sms + N - 1) / N, 1, std::min<int64_t>(kMaxSplits, by_size)));
}

bool vector_loads(const at::Tensor& logits, const at::Tensor& out) {
  return logits.size(1) % 4 == 0 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
}

}  // namespace

void softmax_rows_cuda(const at::Tensor& logits, const at::Tensor& probs, const std::optional<at::Tensor>& best) {
  check_logits("softmax_rows", logits, best);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(probs.scalar_type() == at::kFloat && probs.dim() == 2 && probs.is_contiguous() && probs.size(0) >= N &&
                  probs.size(1) == V && probs.device() == logits.device(),
              "dspark::softmax_rows: probs must be contiguous fp32 [≥ N, V] on the logits' device");
  if (N == 0) return;
  const at::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int64_t sms = props->multiProcessorCount;
  const bool vec = vector_loads(logits, probs);
  int64_t* best_p = best_ptr(best);
  // One pass where the clusters fill the GPU (two per SM at least) and a slice fits shared memory.
  // The kernel's limit is set once per device (allow_dynamic_smem), so to the most any V takes:
  // a GPU with less shared memory than that (sm_120's 99 KB) takes two kernels.
  const int64_t slice_bytes = cluster_slice_bytes(V);
  if (vec && props->major >= 9 && built_from(900) && N * kClusterBlocks >= 2 * sms &&
      slice_bytes <= kClusterSmemLimit &&
      static_cast<int64_t>(props->sharedMemPerBlockOptin) >= kClusterSmemLimit + kStaticSmemMargin) {
    allow_dynamic_smem(cluster_kernel, kClusterSmemLimit);
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = kClusterBlocks, attr.val.clusterDim.y = 1, attr.val.clusterDim.z = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(kClusterBlocks, static_cast<unsigned>(N));
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = static_cast<size_t>(slice_bytes);
    config.stream = stream;
    config.attrs = &attr;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, cluster_kernel, logits.data_ptr<float>(), static_cast<int>(V),
                                      probs.data_ptr<float>(), best_p));
    return;
  }
  const int splits = choose_splits(N, V, sms);
  auto parts_bytes = at::empty({N * splits * static_cast<int64_t>(sizeof(RowPart))}, logits.options().dtype(at::kByte));
  auto* parts = reinterpret_cast<RowPart*>(parts_bytes.data_ptr<uint8_t>());
  const dim3 grid(splits, static_cast<unsigned>(N));
  (vec ? stats_kernel<true> : stats_kernel<false>)<<<grid, kThreads, 0, stream>>>(
      logits.data_ptr<float>(), static_cast<int>(V), parts, nullptr, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  (vec ? write_kernel<true> : write_kernel<false>)<<<grid, kThreads, 0, stream>>>(
      logits.data_ptr<float>(), static_cast<int>(V), parts, probs.data_ptr<float>(), best_p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void softmax_stats_cuda(const at::Tensor& logits, const at::Tensor& stats, const std::optional<at::Tensor>& best) {
  check_logits("softmax_stats", logits, best);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 2 && stats.is_contiguous() && stats.size(0) >= N &&
                  stats.size(1) == 2 && stats.device() == logits.device() &&
                  reinterpret_cast<uintptr_t>(stats.data_ptr()) % 8 == 0,
              "dspark::softmax_stats: stats must be contiguous fp32 [≥ N, 2] (8-byte aligned) on the logits' device");
  if (N == 0) return;
  const at::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int splits = choose_splits(N, V, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  auto* stats_p = reinterpret_cast<float2*>(stats.data_ptr<float>());
  int64_t* best_p = best_ptr(best);
  auto parts_bytes = at::empty({splits > 1 ? N * splits * static_cast<int64_t>(sizeof(RowPart)) : 0},
                               logits.options().dtype(at::kByte));
  auto* parts = reinterpret_cast<RowPart*>(parts_bytes.data_ptr<uint8_t>());
  const bool vec = vector_loads(logits, logits);
  (vec ? stats_kernel<true> : stats_kernel<false>)<<<dim3(splits, static_cast<unsigned>(N)), kThreads, 0, stream>>>(
      logits.data_ptr<float>(), static_cast<int>(V), parts, splits > 1 ? nullptr : stats_p, best_p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    constexpr int kRowsPerBlock = 8;  // a warp a row
    finish_stats_kernel<<<static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock), 32 * kRowsPerBlock, 0,
                          stream>>>(parts, splits, static_cast<int>(N), stats_p, best_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace dspark
