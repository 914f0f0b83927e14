// Variable-length rejection sampling on the GPU (docs/kernels.md), the math of
// dspark_cli/runtime/rejection.py, without storing q [R, γ, V]: the one q row a rejected request
// needs is rebuilt from U_k + W2·W1[x_{k-1}] (or read from q when the draft kept it). The target
// rows are probabilities, or an engine's logits with their softmax stats (target_stats:
// target_rows.cuh computes each entry read), so neither side needs a [rows, V] matrix written.
//
//   1. accept_kernel, one block per request: ratio tests u_j·q_j(x_j) < p_j(x_j) along the prefix
//      (greedy requests: x_j == argmax p_j, or the engine's argmax of the row's logits when given:
//      their p rows are then not read), n = accepted count; greedy requests also emit argmax of
//      the first unaccepted row here; the drafts are copied into the output, −1 padded.
//      For a rebuilt q row it gathers W1[x_{n-1}] (x_{-1} = anchor) into H [R, r].
//   2. (rebuilt q only) bias = H·W2ᵀ with the GEMM markov_chain sampled with (bias_gemm); the row's
//      max and sum-exp of (U_n + bias)/T are the chain's row_stats when given (the very ones it
//      sampled with), else a pass per split of V computes them (and the argmax, for a request at
//      temperature < 1e-5; with row_stats that argmax is the drafted token)
//   3. race_kernel per split of V: the grouped race (residual.cuh, stream 2) of the residual
//      max(p − q, 0) and its mass for a rejected request, of p for one that accepted every draft;
//      a top-k/top-p draft's rebuilt q is 0 below the chain's thresholds (this path, always)
//   4. finish_kernel: the race's winner, or, for a rejected request whose residual has no mass
//      (≤ 1e-8), p's race over its row (run there: p ≈ q along a whole row is rare).
// With the chain's row_stats, steps 2 and 3 are one kernel instead: on Hopper fused_step.cu's
// residual epilogue runs the races on the bias accumulators (the bias never goes through HBM), at
// R <= 2 markov.cu's small_residual_kernel; without greedy requests, or with their tokens given
// (target_argmax), that kernel runs step 1's tests itself too (verdicts.cuh), and up to 16
// requests its last block does step 4: the whole verification is then one launch (the chain's
// block counter given: without it a fill precedes).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "fused_step.h"
#include "launch.h"
#include "markov.h"
#include "philox.cuh"
#include "residual.cuh"

namespace dspark {

namespace {

constexpr int kThreads = 256;
constexpr int kAcceptThreads = 1024;

// torch.argmax's pick (NaN first): residual.cuh's pick, the races', never takes a NaN.
__device__ __forceinline__ Best pick_argmax(Best a, Best b) { return ranks_above(b.key, b.idx, a.key, a.idx) ? b : a; }

__device__ __forceinline__ Best warp_pick_argmax(Best b) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    b = pick_argmax(b, Best{__shfl_xor_sync(0xffffffffu, b.key, off), __shfl_xor_sync(0xffffffffu, b.idx, off)});
  return b;
}

// torch.argmax of one fp32 row over the whole block (every thread gets it).
__device__ int block_argmax(const float* __restrict__ row, int V) {
  __shared__ Best warp_best[kAcceptThreads / 32];
  __shared__ int result;
  Best b{-INFINITY, 0x7fffffff};
  for (int v = threadIdx.x; v < V; v += blockDim.x) b = pick_argmax(b, Best{row[v], v});
  b = warp_pick_argmax(b);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // warp_best / result may still be read from the previous call
  if (lane == 0) warp_best[warp] = b;
  __syncthreads();
  if (warp == 0) {
    b = lane < blockDim.x / 32 ? warp_best[lane] : Best{-INFINITY, 0x7fffffff};
    b = warp_pick_argmax(b);
    if (lane == 0) result = b.idx;
  }
  __syncthreads();
  return result;
}

// A greedy request's token at a target row: the engine's argmax when given (the row is not read),
// else the row's argmax (of its logits, when the rows are logits: the engine's greedy token).
__device__ int greedy_token(const TargetRows& target, const int64_t* __restrict__ target_argmax, int64_t row, int V) {
  if (target_argmax != nullptr) return engine_argmax(target_argmax, target.clamped(row), V);
  return block_argmax(target.row(row, V).x, V);
}

// Step 1. state[r] = {n, rejected}: what the later kernels need.
template <typename WT>
__global__ void accept_kernel(const TargetRows target, const int64_t* __restrict__ target_argmax, int V,
                              RowStarts row_start,
                              const int64_t* __restrict__ ell, const int64_t* __restrict__ tokens,
                              const float* __restrict__ q_token, const bool* __restrict__ greedy,
                              const int64_t* __restrict__ seeds, int gamma, const int64_t* __restrict__ anchors,
                              const WT* __restrict__ w1, int rank, WT* __restrict__ h, int64_t ldh,
                              int64_t* __restrict__ out_tokens, int64_t* __restrict__ num_accepted,
                              int* __restrict__ state) {
  const int r = blockIdx.x;
  const bool is_greedy = greedy != nullptr && greedy[r];
  const int64_t start = row_start[r], len = clamp_ell(ell[r], row_start.max_len(gamma));
  const int64_t* draft = tokens + static_cast<int64_t>(r) * gamma;
  int n = 0;
  int greedy_next = -1;  // argmax of row start + n, once known
  for (; n < len; ++n) {
    bool accept;
    if (is_greedy) {
      greedy_next = greedy_token(target, target_argmax, start + n, V);
      accept = draft[n] == greedy_next;
    } else {
      accept = passes_ratio_test(seeds[r], n, q_token[static_cast<int64_t>(r) * gamma + n],
                                 target.row(start + n, V)[draft[n]]);
    }
    if (!accept) break;
    greedy_next = -1;
  }
  if (is_greedy && greedy_next < 0) greedy_next = greedy_token(target, target_argmax, start + n, V);
  int64_t* out = out_tokens + static_cast<int64_t>(r) * (gamma + 1);
  for (int i = threadIdx.x; i <= gamma; i += blockDim.x) {
    out[i] = i < n ? draft[i] : (i == n && is_greedy ? greedy_next : -1);
  }
  if (threadIdx.x == 0) {
    num_accepted[r] = n;
    state[2 * r] = n;
    state[2 * r + 1] = (!is_greedy && n < len) ? 1 : 0;
  }
  if (h != nullptr) {  // W1 of the token before draft position n, for the rebuilt q row
    const int pos = min(n, gamma - 1);
    const int64_t prev = pos == 0 ? anchors[r] : draft[pos - 1];
    for (int j = threadIdx.x; j < rank; j += blockDim.x) h[static_cast<int64_t>(r) * ldh + j] = w1[prev * rank + j];
  }
}

struct Stats {  // of x = logits / T over a slice: max, sum exp(x - max), first argmax
  float max;
  float sum;
  int idx;
};

__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  Stats out;
  out.max = fmaxf(a.max, b.max);
  out.sum = (a.sum == 0.f ? 0.f : a.sum * __expf(a.max - out.max)) +
            (b.sum == 0.f ? 0.f : b.sum * __expf(b.max - out.max));
  out.idx = (b.max > a.max || (b.max == a.max && b.idx < a.idx)) ? b.idx : a.idx;
  return out;
}

__device__ __forceinline__ Stats warp_merge(Stats s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stats o{__shfl_xor_sync(0xffffffffu, s.max, off), __shfl_xor_sync(0xffffffffu, s.sum, off),
            __shfl_xor_sync(0xffffffffu, s.idx, off)};
    s = merge(s, o);
  }
  return s;
}

template <typename T, typename F>
__device__ __forceinline__ T block_reduce(T value, F op, T empty) {
  __shared__ T warp_values[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) warp_values[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < blockDim.x / 32 ? warp_values[lane] : empty;
    value = op(value);
  }
  return value;  // valid in thread 0
}

__device__ __forceinline__ float step_scale(float T) { return T < kGreedyBelow ? 1.f : T; }

// Entries v .. v+N-1 of a row (N = 4, or 8: a race group), vector loads when kVec, else one by one,
// 0 from `end` on.
template <int N, bool kVec, typename T>
__device__ __forceinline__ void load_entries(const T* row, int v, int end, float out[N]) {
  if (kVec) {
    load_vec<N>(row + v, out);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = v + i < end ? to_float(row[v + i]) : 0.f;
  }
}

__device__ __forceinline__ void add_to_stats(Stats& s, float x, int v) {  // the sum holds the max's 1: exp_ftz
  if (x == -INFINITY) return;  // masked: no weight (and exp(-inf - -inf) would be NaN)
  if (x > s.max) {
    s.sum = s.sum * exp_ftz(s.max - x) + 1.f;
    s.max = x;
    s.idx = v;
  } else {
    s.sum += exp_ftz(x - s.max);
  }
}

// Step 2b, grid (splits, R): stats of the rebuilt logits row, for rejected sampled requests only.
// Four entries per thread per iteration (kVec: V % 4 == 0 and aligned rows).
template <typename UT, bool kVec>
__global__ void row_stats_kernel(const UT* __restrict__ U, const float* __restrict__ bias,
                                 const float* __restrict__ temperature, const int* __restrict__ state,
                                 Stats* __restrict__ partials, int gamma, int V, int slice) {
  const int r = blockIdx.y;
  if (!state[2 * r + 1]) return;
  const int pos = min(state[2 * r], gamma - 1);
  const float scale = step_scale(temperature[r]);
  const UT* u_row = U + (static_cast<int64_t>(r) * gamma + pos) * V;
  const float* b_row = bias + static_cast<int64_t>(r) * V;
  const int start = blockIdx.x * slice, end = min(V, start + slice);
  Stats s{-INFINITY, 0.f, 0x7fffffff};
  for (int v4 = start + 4 * threadIdx.x; v4 < end; v4 += 4 * blockDim.x) {
    float u[4], b[4];
    load_entries<4, kVec>(u_row, v4, end, u);
    load_entries<4, kVec>(b_row, v4, end, b);
    if (kVec) {  // four at once: their max, independent exps, one merge (short dependency chains)
      float x[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) x[i] = over_temperature(u[i] + b[i], scale);
      const float m = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
      if (m == -INFINITY) continue;  // four masked entries: no weight (exp(-inf - -inf) would be NaN)
      const int first = x[0] == m ? 0 : x[1] == m ? 1 : x[2] == m ? 2 : 3;  // ties: lowest index
      s = merge(s, Stats{m, (exp_ftz(x[0] - m) + exp_ftz(x[1] - m)) + (exp_ftz(x[2] - m) + exp_ftz(x[3] - m)),
                         v4 + first});
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (v4 + i < end) add_to_stats(s, over_temperature(u[i] + b[i], scale), v4 + i);
      }
    }
  }
  s = block_reduce(warp_merge(s), [](Stats v) { return warp_merge(v); }, Stats{-INFINITY, 0.f, 0x7fffffff});
  if (threadIdx.x == 0) partials[static_cast<int64_t>(r) * gridDim.x + blockIdx.x] = s;
}

// Step 3, grid (splits, R). q comes from q_stored [R, γ, V] or, rebuilt, from U, bias and the row
// stats: the chain's (chain_stats [R, γ, 2] with the drafted tokens, the very max and sum-exp its
// q_token came from), or else the merged stats partials (stats_partials, stats_splits per request).
// threshold [R, γ] (null: none): a top-k/top-p row's entries below it are 0 in the rebuilt q.
template <typename UT, bool kVec>
__global__ void race_kernel(const TargetRows target, RowStarts row_start,
                            const bool* __restrict__ greedy, const int64_t* __restrict__ seeds,
                            const int* __restrict__ state, const float* __restrict__ q_stored,
                            const UT* __restrict__ U, const float* __restrict__ bias,
                            const float* __restrict__ temperature, const float* __restrict__ chain_stats,
                            const int64_t* __restrict__ tokens, const Stats* __restrict__ stats_partials,
                            int stats_splits, const float* __restrict__ threshold, Race* __restrict__ partials,
                            int gamma, int V, int slice) {
  const int r = blockIdx.y;
  if (greedy != nullptr && greedy[r]) return;
  const int n = state[2 * r];
  const bool rejected = state[2 * r + 1];
  const int pos = min(n, gamma - 1);
  const TargetRow p_row = target.row(row_start[r] + n, V);
  const PhiloxKey key = philox_key(seeds[r]);

  // Rebuilt q: exp(x_v - max) / sum (rebuilt_q), or one-hot at the argmax for a greedy temperature.
  __shared__ Stats row;
  const bool rebuilt = rejected && q_stored == nullptr;
  if (rebuilt && chain_stats != nullptr) {  // a one-hot (greedy) draft row's argmax is its token
    if (threadIdx.x == 0) {
      const int64_t at = static_cast<int64_t>(r) * gamma + pos;
      row = Stats{chain_stats[2 * at], chain_stats[2 * at + 1], static_cast<int>(tokens[at])};
    }
  } else if (rebuilt && threadIdx.x < 32) {
    Stats s{-INFINITY, 0.f, 0x7fffffff};
    for (int i = threadIdx.x; i < stats_splits; i += 32) s = merge(s, stats_partials[static_cast<int64_t>(r) * stats_splits + i]);
    s = warp_merge(s);
    if (threadIdx.x == 0) row = s;
  }
  __syncthreads();
  const float T = temperature != nullptr ? temperature[r] : 1.f;
  const bool one_hot = T < kGreedyBelow;
  const float scale = step_scale(T);
  const float* q_row = q_stored != nullptr ? q_stored + (static_cast<int64_t>(r) * gamma + pos) * V : nullptr;
  const UT* u_row = U != nullptr ? U + (static_cast<int64_t>(r) * gamma + pos) * V : nullptr;
  const float* b_row = bias != nullptr ? bias + static_cast<int64_t>(r) * V : nullptr;
  const float t = threshold != nullptr ? threshold[static_cast<int64_t>(r) * gamma + pos] : -INFINITY;

  const int start = blockIdx.x * slice, end = min(V, start + slice);
  Race acc = empty_race();
  for (int v = start + 8 * threadIdx.x; v < end; v += 8 * blockDim.x) {  // one race group per round
    float p[8], q[8] = {};
    load_entries<8, kVec>(p_row.x, v, end, p);
    p_row.to_probs(p, end - v);
    if (rejected && !rebuilt) load_entries<8, kVec>(q_row, v, end, q);
    if (rebuilt && !one_hot) {
      float u[8], b[8];
      load_entries<8, kVec>(u_row, v, end, u);
      load_entries<8, kVec>(b_row, v, end, b);
      const float inv_sum = 1.f / row.sum;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float x = over_temperature(u[i] + b[i], scale);
        q[i] = x < t ? 0.f : rebuilt_q(x, row.max, inv_sum);
      }
    }
    if (rebuilt && one_hot) {
#pragma unroll
      for (int i = 0; i < 8; ++i) q[i] = v + i == row.idx ? 1.f : 0.f;
    }
    visit_residual_group(acc, p, q, rejected, v, recover_noise(key, v));
  }
  acc = block_reduce(warp_combine(acc), [](Race v) { return warp_combine(v); }, empty_race());
  if (threadIdx.x == 0) partials[static_cast<int64_t>(r) * gridDim.x + blockIdx.x] = acc;
}

// Step 4, one warp per request.
__global__ void finish_kernel(const Race* __restrict__ partials, int splits, const bool* __restrict__ greedy,
                              const int* __restrict__ state, const TargetRows target, RowStarts row_start,
                              const int64_t* __restrict__ seeds, int gamma, int V, int64_t* __restrict__ out_tokens) {
  wait_previous_kernel();  // the races (its launch overlaps the racing kernel's tail)
  const int r = blockIdx.x;
  if (greedy != nullptr && greedy[r]) return;  // emitted by accept_kernel
  const Race acc = warp_merge_races(partials + static_cast<int64_t>(r) * splits, splits, threadIdx.x);
  write_recovered_token(acc, r, state[2 * r], state[2 * r + 1], target, row_start, V, seeds[r], out_tokens, gamma);
}

int choose_splits(int R, int V) {
  const int want = (16 * 132 + R - 1) / R;  // about 16 short blocks per SM: a small last-wave tail
  return std::max(1, std::min(want, (V + 1023) / 1024));
}


}  // namespace

std::tuple<at::Tensor, at::Tensor> rejection_sample_cuda(
    const at::Tensor& target_given, const std::optional<at::Tensor>& row_start, const at::Tensor& ell,
    const at::Tensor& tokens, const at::Tensor& q_token, const std::optional<at::Tensor>& q,
    const std::optional<at::Tensor>& U, const std::optional<at::Tensor>& anchors, const std::optional<at::Tensor>& w1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& greedy, const at::Tensor& seeds, const std::optional<at::Tensor>& row_stats,
    int64_t row_stride, const std::optional<at::Tensor>& block_counter, const std::optional<at::Tensor>& thresholds,
    const std::optional<at::Tensor>& target_argmax, const std::optional<at::Tensor>& target_stats) {
  TORCH_CHECK(target_given.is_cuda() && target_given.dim() == 2 && target_given.scalar_type() == at::kFloat &&
                  target_given.is_contiguous(),
              "dspark::rejection_sample: target must be contiguous fp32 CUDA [N, V]");
  // The fused step's races load target rows 16 bytes at a time; a rebuilt row must come from the
  // kernel the chain made it with (chain_bias_path), so a target starting off a 16-byte boundary (a
  // view) is raced as an aligned copy rather than on another path.
  const at::Tensor target = aligned16(target_given.data_ptr()) ? target_given : target_given.clone();
  // Logits with their softmax stats (softmax_stats): probabilities computed where read.
  const bool from_logits = target_stats.has_value() && target_stats->defined();
  TORCH_CHECK(!from_logits || (target_stats->scalar_type() == at::kFloat && target_stats->is_contiguous() &&
                               target_stats->dim() == 2 && target_stats->size(0) == target.size(0) &&
                               target_stats->size(1) == 2 && target_stats->device() == target.device() &&
                               reinterpret_cast<uintptr_t>(target_stats->data_ptr()) % 8 == 0),
              "dspark::rejection_sample: target_stats must be contiguous fp32 [N, 2] (8-byte aligned), the target "
              "logits' softmax stats");
  TORCH_CHECK(target.size(0) >= 1, "dspark::rejection_sample: target needs a row at least");
  const TargetRows rows_of_target{target.data_ptr<float>(),
                                  from_logits ? reinterpret_cast<const float2*>(target_stats->data_ptr<float>()) : nullptr,
                                  target.size(0) - 1};
  const bool starts_given = row_start.has_value() && row_start->defined();
  TORCH_CHECK(starts_given ? row_start->scalar_type() == at::kLong : row_stride > 0,
              "dspark::rejection_sample: pass int64 row_start, or row_stride > 0 for a dense [R, row_stride, V] batch");
  TORCH_CHECK(ell.scalar_type() == at::kLong && tokens.scalar_type() == at::kLong && seeds.scalar_type() == at::kLong &&
                  q_token.scalar_type() == at::kFloat,
              "dspark::rejection_sample: ell, tokens, seeds must be int64 and q_token fp32");
  const RowStarts starts{starts_given ? row_start->data_ptr<int64_t>() : nullptr, row_stride};
  const bool stored = q.has_value() && q->defined();
  TORCH_CHECK(stored || (U && anchors && w1 && w2 && temperature),
              "dspark::rejection_sample: pass q, or U, anchors, w1, w2 and temperature to rebuild it");
  const c10::cuda::CUDAGuard guard(target.device());
  TORCH_CHECK(tokens.size(0) <= kMaxGridY, "dspark::rejection_sample: at most 65535 requests per call (the grid's y axis)");
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) >= 1 && tokens.size(1) >= 1 && target.size(1) >= 1,
              "dspark::rejection_sample: tokens [R, γ] with R, γ >= 1 and target rows of V >= 1 entries");
  const int R = tokens.size(0), gamma = tokens.size(1), V = target.size(1);
  const auto device = target.device();
  TORCH_CHECK(starts_given || target.size(0) >= static_cast<int64_t>(R) * row_stride,
              "dspark::rejection_sample: a dense batch needs R · row_stride target rows");
  TORCH_CHECK(tokens.device() == device && tokens.is_contiguous() && q_token.sizes() == tokens.sizes() &&
                  q_token.device() == device && q_token.is_contiguous() && is_request_vector(ell, R, at::kLong, device) &&
                  is_request_vector(seeds, R, at::kLong, device) &&
                  (!starts_given || is_request_vector(*row_start, R, at::kLong, device)) &&
                  (!greedy || !greedy->defined() || is_request_vector(*greedy, R, at::kBool, device)),
              "dspark::rejection_sample: contiguous tokens and q_token [R, γ], ell, seeds, row_start (int64) and "
              "greedy (bool) [R], all on the target's device");
  TORCH_CHECK(stored ? q->dim() == 3 && q->size(0) == R && q->size(1) == gamma && q->device() == device
                     : U->dim() == 3 && U->size(0) == R && U->size(1) == gamma && U->device() == device &&
                           is_kernel_float(*U) && is_kernel_float(*w1) && w1->dim() == 2 && w1->size(0) == V &&
                           w2->sizes() == w1->sizes() && w1->device() == device && w2->device() == device &&
                           is_request_vector(*anchors, R, at::kLong, device) &&
                           is_request_vector(*temperature, R, at::kFloat, device),
              "dspark::rejection_sample: q [R, γ, V], or U [R, γ, V] and w1, w2 [V, r] (fp32, bf16 or fp16), anchors "
              "(int64) and temperature (fp32) [R] to rebuild it, on the target's device");
  auto stream = at::cuda::getCurrentCUDAStream();
  auto out_tokens = at::empty({R, gamma + 1}, tokens.options());
  auto num_accepted = at::empty({R}, tokens.options());
  auto state = at::empty({R, 2}, tokens.options().dtype(at::kInt));
  const bool* greedy_p = greedy && greedy->defined() ? greedy->data_ptr<bool>() : nullptr;
  const bool argmax_given = target_argmax.has_value() && target_argmax->defined();
  TORCH_CHECK(!argmax_given || (target_argmax->scalar_type() == at::kLong && target_argmax->is_contiguous() &&
                                target_argmax->dim() == 1 && target_argmax->size(0) == target.size(0) &&
                                target_argmax->device() == device),
              "dspark::rejection_sample: target_argmax must be contiguous int64 [N], one id per target row, on its device");
  const int64_t* argmax_p = argmax_given ? target_argmax->data_ptr<int64_t>() : nullptr;
  const int split_count = choose_splits(R, V);
  const int slice = ((V + split_count - 1) / split_count + 15) / 16 * 16;  // whole race groups and Philox calls
  // Vector loads need every row start aligned: V % 8 == 0 and 16-byte aligned bases.
  const bool vec = V % 8 == 0 && aligned16(target.data_ptr()) && (!stored || aligned16(q->data_ptr())) &&
                   (stored || aligned16(U->data_ptr()));
  // Rebuilt rows with the chain's row stats on Hopper: the races run on the fused step's
  // accumulators (no fp32 bias round trip, no separate race pass); their bias bits are the chain's.
  const bool chain_stats = !stored && row_stats.has_value() && row_stats->defined();
  // Top-k/top-p rows of our chain, rebuilt: the chain sampled them from bias_gemm's bias with its
  // thresholds, so they take the same GEMM and a race pass that masks below the thresholds.
  const bool masked = !stored && thresholds.has_value() && thresholds->defined();
  TORCH_CHECK(!masked || (chain_stats && thresholds->scalar_type() == at::kFloat && thresholds->is_contiguous() &&
                          thresholds->numel() == static_cast<int64_t>(R) * gamma && thresholds->device() == device),
              "dspark::rejection_sample: thresholds must be the chain's contiguous fp32 [R, γ], with its row_stats");
  const int rank = stored ? 0 : w1->size(1);
  // H rows γ·r apart, as the chain's prev_emb[:, k] rows are: the path decision below is then the
  // chain's call, and the cuBLAS GEMM (which may pick its kernel by the leading dimension) gets the
  // chain's arguments but the pointer, so a rebuilt bias has the bits the chain sampled from.
  const int64_t chain_ldh = static_cast<int64_t>(gamma) * rank;
  auto h = at::empty({stored ? 0 : R, chain_ldh}, stored ? target.options() : w1->options());
  // With the chain's row stats the races run in the kernel that made the chain's bias (the same
  // decision, chain_bias_path: warped rows took bias_gemm); without them bias_gemm + race pass + finish.
  const BiasPath path = chain_stats ? chain_bias_path(*U, *w1, *w2, h.data_ptr(), chain_ldh, R, masked) : BiasPath::kGemm;
  const bool small = path == BiasPath::kSmall, fused = path == BiasPath::kFused;
  const int64_t ldh = small ? rank : chain_ldh;  // the small-batch kernels read rows r apart
  // Where the racing kernel's last block writes the tokens (a block counter), and where it
  // runs the ratio tests itself (no greedy request, or the engine's greedy tokens given: whole-row
  // argmaxes need accept_kernel first).
  const bool finished_there = small || (fused && R <= kFusedFinishMaxRequests);
  const bool tests_there = (small || fused) && (greedy_p == nullptr || argmax_given);
  const int splits = fused ? fused_step_blocks(V) : split_count;  // race partials per request
  auto race_parts = at::empty({static_cast<int64_t>(R) * splits * static_cast<int64_t>(sizeof(Race))},
                              target.options().dtype(at::kByte));
  auto* races = reinterpret_cast<Race*>(race_parts.data_ptr<uint8_t>());

  if (stored) {
    TORCH_CHECK(q->scalar_type() == at::kFloat && q->is_contiguous() && q->size(2) == V,
                "dspark::rejection_sample: q must be contiguous fp32 [R, γ, V]");
    accept_kernel<float><<<R, kAcceptThreads, 0, stream>>>(
        rows_of_target, argmax_p, V, starts, ell.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(),
        q_token.data_ptr<float>(), greedy_p, seeds.data_ptr<int64_t>(), gamma, nullptr, nullptr, 0, nullptr, 0,
        out_tokens.data_ptr<int64_t>(), num_accepted.data_ptr<int64_t>(), state.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto race = vec ? race_kernel<float, true> : race_kernel<float, false>;
    race<<<dim3(splits, R), kThreads, 0, stream>>>(
        rows_of_target, starts, greedy_p, seeds.data_ptr<int64_t>(), state.data_ptr<int>(),
        q->data_ptr<float>(), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, nullptr, races,
        gamma, V, slice);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    TORCH_CHECK(w1->scalar_type() == w2->scalar_type() && w1->is_contiguous() && w2->is_contiguous() &&
                    U->is_contiguous() && U->size(2) == V && anchors->scalar_type() == at::kLong &&
                    temperature->scalar_type() == at::kFloat,
                "dspark::rejection_sample: U, w1, w2 contiguous (w1, w2 of one dtype), anchors int64, temperature fp32");
    // The chain's row stats, when given, replace the stats pass (and are the very ones it sampled with).
    TORCH_CHECK(!chain_stats || (row_stats->scalar_type() == at::kFloat && row_stats->is_contiguous() &&
                                 row_stats->dim() == 3 && row_stats->size(0) == R && row_stats->size(1) == gamma &&
                                 row_stats->size(2) == 2 && row_stats->device() == device),
                "dspark::rejection_sample: row_stats must be contiguous fp32 [R, γ, 2]");
    auto bias = at::empty({fused || small ? 0 : R, V}, target.options());
    // The chain's block counter (zero, and left zero) when given, else a zeroed one: a fill launch.
    const bool counter_given = block_counter.has_value() && block_counter->defined();
    TORCH_CHECK(!counter_given || (block_counter->scalar_type() == at::kInt && block_counter->numel() == 1 &&
                                   block_counter->device() == target.device()),
                "dspark::rejection_sample: block_counter must be one int32 on the target's device");
    auto done = counter_given ? *block_counter : at::zeros({finished_there ? 1 : 0}, target.options().dtype(at::kInt));
    unsigned* done_p = finished_there ? reinterpret_cast<unsigned*>(done.data_ptr<int>()) : nullptr;
    auto stats_parts = at::empty({chain_stats ? 0 : static_cast<int64_t>(R) * splits * static_cast<int64_t>(sizeof(Stats))},
                                 target.options().dtype(at::kByte));
    auto* stats = reinterpret_cast<Stats*>(stats_parts.data_ptr<uint8_t>());
    if (!tests_there) DSPARK_DISPATCH_FLOATS(w1->scalar_type(), "dspark_reject_w", [&] {
      using WT = device_t<scalar_t>;
      accept_kernel<WT><<<R, kAcceptThreads, 0, stream>>>(
          rows_of_target, argmax_p, V, starts, ell.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(),
          q_token.data_ptr<float>(), greedy_p, seeds.data_ptr<int64_t>(), gamma, anchors->data_ptr<int64_t>(),
          reinterpret_cast<const WT*>(w1->data_ptr()), rank, reinterpret_cast<WT*>(h.data_ptr()), ldh,
          out_tokens.data_ptr<int64_t>(), num_accepted.data_ptr<int64_t>(), state.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    RatioTests tests;
    if (tests_there)
      tests = {ell.data_ptr<int64_t>(), q_token.data_ptr<float>(), anchors->data_ptr<int64_t>(), w1->data_ptr(),
               out_tokens.data_ptr<int64_t>(), num_accepted.data_ptr<int64_t>(), greedy_p, argmax_p};
    const ResidualRows rows{rows_of_target, starts, state.data_ptr<int>(),
                            chain_stats ? row_stats->data_ptr<float>() : nullptr, tokens.data_ptr<int64_t>(), greedy_p,
                            done_p, finished_there ? out_tokens.data_ptr<int64_t>() : nullptr, tests};
    at::Tensor small_parts;
    // With the chain's row stats the races run where the bias is made: at R <= 2 the small-batch
    // kernel, on Hopper the fused step (its last block writes the tokens up to 16 requests, else
    // finish_kernel does); else bias + race pass + finish_kernel.
    if (small) {
      small_residual(*w2, h.data_ptr(), R, *U, temperature->data_ptr<float>(), seeds.data_ptr<int64_t>(), rows,
                     small_parts, gamma);
    } else if (fused) {
      fused_residual(*w2, h.data_ptr(), ldh, R, U->data_ptr(), U->scalar_type(), temperature->data_ptr<float>(),
                     seeds.data_ptr<int64_t>(), rows, races, gamma, stream);
    } else {
      bias_gemm(*w2, h.data_ptr(), ldh, R, bias);
    }
    if (!small && !fused) DSPARK_DISPATCH_FLOATS(U->scalar_type(), "dspark_reject_u", [&] {
      using UT = device_t<scalar_t>;
      const UT* up = reinterpret_cast<const UT*>(U->data_ptr());
      auto stats_pass = vec ? row_stats_kernel<UT, true> : row_stats_kernel<UT, false>;
      auto race = vec ? race_kernel<UT, true> : race_kernel<UT, false>;
      if (!chain_stats) {
        stats_pass<<<dim3(splits, R), kThreads, 0, stream>>>(
            up, bias.data_ptr<float>(), temperature->data_ptr<float>(), state.data_ptr<int>(), stats, gamma, V, slice);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      race<<<dim3(splits, R), kThreads, 0, stream>>>(
          rows_of_target, starts, greedy_p, seeds.data_ptr<int64_t>(), state.data_ptr<int>(), nullptr, up,
          bias.data_ptr<float>(), temperature->data_ptr<float>(),
          chain_stats ? row_stats->data_ptr<float>() : nullptr, tokens.data_ptr<int64_t>(), stats, splits,
          masked ? thresholds->data_ptr<float>() : nullptr, races, gamma, V, slice);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (!finished_there) {  // a programmatic dependent of the racing kernel: its launch overlaps that tail
    launch_programmatic(finish_kernel, dim3(R), dim3(32), 0, stream, races, splits, greedy_p, state.data_ptr<int>(),
                        rows_of_target, starts, seeds.data_ptr<int64_t>(), gamma, V,
                        out_tokens.data_ptr<int64_t>());
  }
  return {out_tokens, num_accepted};
}

}  // namespace dspark
