// Each fp32 logits row's softmax statistics, (max, 1 / Σ exp(x − max)), and its argmax: the target
// side of a verification from an engine's logits (dspark_cli/runtime/target_probs.py logit_rows).
// No probabilities are written: a verification computes the entries it reads as
// exp(x − max) · (1 / Σ) (target_rows.cuh), so the logits are read once in all, where torch's
// softmax reads a row three times and writes it once and its argmax reads it again.
//   1. stats_kernel, grid (splits, N): each block's slice of a row gives its max, Σ exp(x − max)
//      and argmax (one read); at one split a row that is the row's, written as its stats;
//   2. else finish_stats_kernel: a warp a row merges its splits' parts.
// Splits give small batches (N = γ rows at R = 1) enough blocks; large ones take one per row.
// Semantics are torch's softmax and argmax: a row with a NaN gives NaN probabilities, one of −inf
// only too; the argmax is the first of equal maxima, NaN ranking above every number.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <climits>
#include <cmath>

#include "common.cuh"

namespace dspark {
namespace {

constexpr int kThreads = 512;
constexpr int kMaxSplits = 64;
constexpr int kMinPerThread = 8;  // entries per thread at least, or a split is not worth its block
constexpr int kInFlight = 4;      // stats_kernel's float4 loads in flight per thread
// The largest V whose int indices stay below 2^31: a slice's end (a few entries past V) and the
// loads' v + (kInFlight − 1)·4·kThreads. Nearer 2^31 they wrapped: a slice, or all, read nothing.
constexpr int64_t kMaxV = INT_MAX - kInFlight * 4 * kThreads;

struct RowPart {
  float max;  // of the entries seen (−inf: none above −inf yet)
  float sum;  // Σ exp(x − max); NaN once a NaN (or a second +inf) is seen
  float best;
  int best_idx;
};

__device__ __forceinline__ RowPart empty_part() { return {-INFINITY, 0.f, -INFINITY, INT_MAX}; }

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

// Blocks per row: as many as one wave holds (four blocks of kThreads a SM), each with kMinPerThread
// entries per thread at least. Rounding up instead left a few blocks to a second wave (R = 8 and
// 16 on an H100: 560 blocks where 528 fit): 1.05–1.19× slower at R = 4 to 32.
int choose_splits(int64_t N, int64_t V, int64_t sms) {
  const int64_t by_size = std::max<int64_t>(1, V / (kThreads * kMinPerThread));
  return static_cast<int>(std::clamp<int64_t>(4 * sms / N, 1, std::min<int64_t>(kMaxSplits, by_size)));
}

}  // namespace

void softmax_stats_cuda(const at::Tensor& logits, const at::Tensor& stats, const std::optional<at::Tensor>& best) {
  TORCH_CHECK(logits.is_cuda() && logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous(),
              "dspark::softmax_stats: logits must be contiguous fp32 [N, V] on a GPU");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0 && V <= kMaxV, "dspark::softmax_stats: V must be in 1 .. ", kMaxV);
  TORCH_CHECK(N <= 65535, "dspark::softmax_stats: at most 65535 rows per call (the grid's y axis)");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 2 && stats.is_contiguous() && stats.size(0) >= N &&
                  stats.size(1) == 2 && stats.device() == logits.device() &&
                  reinterpret_cast<uintptr_t>(stats.data_ptr()) % 8 == 0,
              "dspark::softmax_stats: stats must be contiguous fp32 [≥ N, 2] (8-byte aligned) on the logits' device");
  const bool has_best = best.has_value() && best->defined();
  TORCH_CHECK(!has_best || (best->scalar_type() == at::kLong && best->dim() == 1 && best->is_contiguous() &&
                            best->size(0) >= N && best->device() == logits.device()),
              "dspark::softmax_stats: best must be contiguous int64 [≥ N] on the logits' device");
  if (N == 0) return;
  const at::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int splits = choose_splits(N, V, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  auto* stats_p = reinterpret_cast<float2*>(stats.data_ptr<float>());
  int64_t* best_p = has_best ? best->data_ptr<int64_t>() : nullptr;
  auto parts_bytes = at::empty({splits > 1 ? N * splits * static_cast<int64_t>(sizeof(RowPart)) : 0},
                               logits.options().dtype(at::kByte));
  auto* parts = reinterpret_cast<RowPart*>(parts_bytes.data_ptr<uint8_t>());
  const bool vec = V % 4 == 0 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;
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
