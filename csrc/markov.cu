// Markov-chain drafting on the GPU (docs/kernels.md): all γ steps from one host call, no host sync.
//
// Per step k:
//   1. bias = W1[x_{k-1}] · W2ᵀ           cuBLAS GEMM (bf16/fp16/fp32 in, fp32 out; W2 read once
//                                          for all R requests), written to an fp32 scratch [R, V]
//   2. split-V pass: x = (U_k + bias) / T, online max / sum-exp, the grouped race (race.cuh: groups
//      of eight vocab ids, one Philox call per two groups) or the argmax (greedy), one partial per
//      (request, slice)
//   3. per-request reduction of the partials: token, q_k(x_k), row max and sum-exp (returned as
//      row_stats [R, γ, 2]: rejection rebuilds a q row with them), and the W1 gather of the new
//      token for step k+1 (prev_emb)
//   4. (return_q only) the fused and small-batch steps leave x_k = (U_k + bias) / T in q's row k (the
//      arithmetic the race used); after the last step one pass over all R·γ rows turns them into
//      q = exp(x - max) / sum in place (no fp32 bias round trip, no second read of U, one launch
//      instead of γ); the cuBLAS path above writes its q rows per step from U and the bias scratch
// Warped steps (top-k / top-p) write the bias out (bias_gemm; where our kernels make it, odd steps walk
// W2 backwards as the unwarped ones below do: 1.06-1.12x at R <= 2, H100; with top-p alone at R <= 2
// it also takes the rows' max, sparing warp.cu a pass): warp.cu finds each row's threshold
// and step 2 masks below it; from R = 64 on (32 with top-p), rows with top-k <= 64 are thresholded
// and sampled by top_k.cu from one pass over the row instead, which writes their partials for step 3
// (warp.cu and step 2 skip them); given the caller's bound top_k_max <= 64, warp.cu is not launched
// and top_k.cu also thresholds the warped rows it cannot sample (step 2 samples them).
// On sm_90 steps 2 and 3 are launched as programmatic dependents: each may start as its
// predecessor drains, and waits for it before reading its output.
// Small batches (R <= 2, bf16/fp16 W1/W2 of rank 256) take one kernel per step instead: warps
// stream W2 rows (at R = 1 two batches of 8 in flight per warp), sum their dot products with a
// transposed warp reduction, run step 2 on the fresh bias, and the last block to finish does step 3
// (no GEMM launch, no fp32 bias round trip, no reduce launch). On sm_90 each step is launched as a
// programmatic dependent of the previous one, so its first W2 loads overlap the previous step's
// last block.
// A small batch runs all γ steps in one cooperative launch instead (DSPARK_MARKOV_PATH=step: one
// launch per step): one block per SM keeps its first W2 batches in shared memory from step 0 on,
// so later steps stream about 61 % of W2 (Qwen3-4B on the H200), odd steps in reverse order so that
// each starts on rows still in L2 (R = 1: 0.156 -> 0.149 ms), and the blocks meet at a grid barrier
// between steps (measured: L2 prefetches and evict_last hints for the streamed rows, and L2
// prefetches of each block's winner's W1 row, gained nothing; what mattered was the merge after the
// barrier taking one round trip). The fused step below walks its tiles the same way.
// On Hopper, 3 <= R <= 128 (bf16/fp16 rank-256 heads, V % 64 == 0) run steps 1 and 2
// as one kernel instead: fused_step.cu (TMA-fed wgmma tiles, the split pass on the accumulators).
// Earlier fused variants measured slower on the H200 (bench/RESULTS.md): a tensor-core step keeping
// the bias tile in shared memory, one W2 tile per CTA (branch wip/tensor-core-markov-step) or pipelined
// through persistent CTAs (wip/pipelined-tc-markov-step) or one-kernel steps at 3 <= R <= 16 on
// per-lane cp.async rings (wip/mma-mid-batch-step) or, for 3 <= R <= 128, a producer warp feeding
// an mbarrier ring and eight mma warps running the split pass on their accumulators
// (wip/fused-mma-step); an earlier GEMV step for R <= 4 with a 40-shuffle reduction and a reduce
// launch (wip/gemv-markov-step); the small-batch step at R = 3, 4.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "common.cuh"
#include "fused_step.h"
#include "launch.h"
#include "markov.h"
#include "philox.cuh"
#include "race.cuh"
#include "residual.cuh"
#include "top_k.h"
#include "warp.h"
#include "warp_rule.cuh"

namespace dspark {
namespace {

constexpr int kThreads = 256;
// Requests from which top-k <= 64 takes top_k.cu (below); with a top-p tensor too, which spares
// warp.cu's mass rounds, from fewer; given the caller's bound top_k_max <= 64, which spares
// warp.cu's launches altogether, from fewer still.
constexpr int kSmallTopKFrom = 64, kSmallTopKWithTopPFrom = 32;
constexpr int kBoundedSmallTopKFrom = 48, kBoundedSmallTopKWithTopPFrom = 8;

// Step 2: grid (splits, R), the slice [start, end) of request r's row. kMasked: top-k/top-p rows,
// entries below threshold[r·γ + k] (warp.cu) out, rows with picked[r] (top_k.cu) skipped.
template <typename UT, bool kVec, bool kMasked>
__global__ void __launch_bounds__(kThreads, 4) split_pass_kernel(const UT* __restrict__ U, const float* __restrict__ bias,
                                  const float* __restrict__ temperature, const int64_t* __restrict__ seeds,
                                  const float* __restrict__ threshold, const unsigned* __restrict__ picked,
                                  Partial* __restrict__ partials, int k, int gamma, int V, int slice) {
  wait_previous_kernel();  // launched programmatically after the bias GEMM
  allow_next_kernel();
  const int r = blockIdx.y;
  if (kMasked && picked && picked[r]) return;  // top_k.cu sampled this row's step and wrote its partials
  const int start = blockIdx.x * slice;
  const int end = min(V, start + slice);
  const float T = temperature[r];
  const bool greedy = T < kGreedyBelow;
  const float scale = greedy ? 1.f : T;
  const PhiloxKey key = philox_key(seeds[r]);
  const UT* u_row = U + (static_cast<int64_t>(r) * gamma + k) * V;
  const float* b_row = bias + static_cast<int64_t>(r) * V;
  const float t = kMasked ? threshold[static_cast<int64_t>(r) * gamma + k] : -INFINITY;

  // One race group of 8 entries per thread and round (slices start at multiples of 8). kVec: 16-byte
  // loads (V % 8 == 0, aligned rows); else scalar loads, entries past `end` -inf (no weight).
  Partial p = empty_partial();
  const auto rounds = [&](auto sampled, auto unit_scale) {
    for (int v = start + 8 * threadIdx.x; v < end; v += 8 * blockDim.x) {
      float x[8];
      if constexpr (kVec) {
        float u[8], b[8];
        load_vec<8>(u_row + v, u);
        load_vec<8>(b_row + v, b);
#pragma unroll
        for (int i = 0; i < 8; ++i) x[i] = decltype(unit_scale)::value ? u[i] + b[i] : (u[i] + b[i]) / scale;
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float s = v + i < end ? to_float(u_row[v + i]) + b_row[v + i] : -INFINITY;
          x[i] = decltype(unit_scale)::value ? s : s / scale;
        }
      }
      if constexpr (kMasked) {
#pragma unroll
        for (int i = 0; i < 8; ++i) x[i] = x[i] < t ? -INFINITY : x[i];
      }
      GroupNoise noise{};
      if constexpr (decltype(sampled)::value)
        noise = group_noise(counter_words(key, kStreamDraft, k, static_cast<uint32_t>(v) >> 4), v >> 3);
      visit8<decltype(sampled)::value>(p, x, v, noise);
    }
  };
  if (greedy) rounds(std::false_type{}, std::true_type{});  // x / 1 == x
  else if (scale == 1.f) rounds(std::true_type{}, std::true_type{});
  else rounds(std::true_type{}, std::false_type{});
  p = block_combine<kThreads>(p);
  if (threadIdx.x == 0) partials[static_cast<int64_t>(r) * gridDim.x + blockIdx.x] = p;
}

// Step 3's outputs for request r from its merged partial: token, q_k(x_k), row max and sum-exp.
// A row without a winner (NaN or -inf everywhere: bad input, unchecked on the GPU) still yields an
// id < V, so the W1 gathers that follow stay in bounds.
__device__ __forceinline__ int write_step(const Partial& p, int r, int k, int gamma, int V,
                                          const float* __restrict__ temperature, int64_t* __restrict__ tokens,
                                          float* __restrict__ q_token, float* __restrict__ row_stats) {
  const bool greedy = temperature[r] < kGreedyBelow;
  const int token = min(p.idx, V - 1);
  tokens[static_cast<int64_t>(r) * gamma + k] = token;
  q_token[static_cast<int64_t>(r) * gamma + k] = greedy ? 1.f : expf(p.x - p.max) / p.sum;
  row_stats[2 * (static_cast<int64_t>(r) * gamma + k)] = p.max;
  row_stats[2 * (static_cast<int64_t>(r) * gamma + k) + 1] = p.sum;
  return token;
}

// Step 3: one block per request merges its partials: token, q_k(x_k), row stats, W1[x_k] for k+1.
template <typename WT>
__global__ void reduce_kernel(const Partial* __restrict__ partials, int splits, const float* __restrict__ temperature,
                              const WT* __restrict__ w1, int rank, int64_t* __restrict__ tokens,
                              float* __restrict__ q_token, float* __restrict__ row_stats, WT* __restrict__ prev_emb,
                              int k, int gamma, int V) {
  // The next step's fused kernel may launch now: its producer streams W2 (no input of ours) while
  // this merge runs; its consumers wait for us. H200: chain R = 16 / 128 4-5 % faster.
  allow_next_kernel();
  wait_previous_kernel();  // launched programmatically after the split pass (or the fused step)
  const int r = blockIdx.x;
  __shared__ int token_s;
  Partial p = empty_partial();
  for (int i = threadIdx.x; i < splits; i += blockDim.x) p = combine(p, partials[static_cast<int64_t>(r) * splits + i]);
  p = block_combine<kThreads>(p);
  if (threadIdx.x == 0) token_s = write_step(p, r, k, gamma, V, temperature, tokens, q_token, row_stats);
  __syncthreads();
  if (k + 1 < gamma) {  // W1[x_k] feeds step k+1's bias and the confidence head
    const WT* src = w1 + static_cast<int64_t>(token_s) * rank;
    WT* dst = prev_emb + (static_cast<int64_t>(r) * gamma + k + 1) * rank;
    for (int j = threadIdx.x; j < rank; j += blockDim.x) dst[j] = src[j];
  }
}

// Step 4 (return_q): q = exp(x - max) / sum with the row's stats, 0 below a top-k/top-p row's
// threshold (null: none), one-hot for a greedy row (nothing read), where x = (U + bias) / T is the
// race's arithmetic. Either per step from the cuBLAS path's bias scratch (bias [R, V]: grid (R,
// splits), rows k), or once after the last step in place over all R·γ rows (bias null: grid (R·γ,
// splits)), the fused and small-batch steps having left x in q. kVec: four entries per thread and
// round (V % 4 == 0, 16-byte aligned U rows; slices start at multiples of 8).
template <typename UT, bool kVec>
__global__ void q_rows_kernel(const UT* __restrict__ U, const float* __restrict__ bias,
                              const float* __restrict__ temperature, const float* __restrict__ row_stats,
                              const int64_t* __restrict__ tokens, const float* __restrict__ threshold,
                              float* __restrict__ q, int k, int gamma, int V, int slice) {
  wait_previous_kernel();  // launched programmatically after the step's reduce
  const bool from_bias = bias != nullptr;
  const int64_t row = from_bias ? static_cast<int64_t>(blockIdx.x) * gamma + k : blockIdx.x;
  const int start = blockIdx.y * slice;
  const int end = min(V, start + slice);
  const float T = temperature[row / gamma];
  const bool greedy = T < kGreedyBelow;
  const float m = row_stats[2 * row], s = row_stats[2 * row + 1];
  const int64_t tok = tokens[row];
  const float t = threshold ? threshold[row] : -INFINITY;
  const UT* u_row = U + row * V;
  const float* b_row = bias + static_cast<int64_t>(blockIdx.x) * V;
  float* q_row = q + row * V;
  const auto q_of = [&](float x, int v) { return greedy ? (v == tok ? 1.f : 0.f) : x < t ? 0.f : expf(x - m) / s; };
  if constexpr (kVec) {
#pragma unroll 2
    for (int v = start + 4 * threadIdx.x; v < end; v += 4 * blockDim.x) {
      float x[4] = {};
      if (greedy) {
      } else if (from_bias) {
        float u[4], b[4];
        load_vec<4>(u_row + v, u);
        load_vec<4>(b_row + v, b);
#pragma unroll
        for (int i = 0; i < 4; ++i) x[i] = draft_logit(u[i], b[i], T);
      } else {
        load_vec<4>(q_row + v, x);
      }
      *reinterpret_cast<float4*>(q_row + v) = make_float4(q_of(x[0], v), q_of(x[1], v + 1), q_of(x[2], v + 2),
                                                          q_of(x[3], v + 3));
    }
  } else {
    for (int v = start + threadIdx.x; v < end; v += blockDim.x) {
      const float x = greedy ? 0.f : from_bias ? draft_logit(to_float(u_row[v]), b_row[v], T) : q_row[v];
      q_row[v] = q_of(x, v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Small batches: one kernel per step.
constexpr int kSmallMaxRequests = 2;  // measured: at 4 the cuBLAS path is faster (H200)
constexpr int kSmallRank = 256;          // 32 lanes × 8 elements: one 16-byte load per lane per W2 row
constexpr int kSmallRows = 8;            // W2 rows per warp batch (8 loads in flight per lane)
// Batches of W2 rows in flight per warp: with one request two (the next batch's loads fly during
// this one's dot products too; 115 registers, so two blocks per SM: R = 1 measured 3-5 % faster
// than one batch at four blocks per SM); two requests need those registers for the second one.
constexpr int small_depth(int capacity) { return capacity == 1 ? 2 : 1; }
constexpr int kSmallStepBlocksPerSm = 2;
// The bias-only kernel keeps one batch in flight: 64 registers a thread for one request, 128 for two.
constexpr int small_bias_blocks_per_sm(int capacity) { return capacity == 1 ? 4 : 2; }

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float out[8]) {
  const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(h[i]);
}

// Sums s[i] (row i of the batch) over the warp, transposed: halving exchanges on lane bits 4, 3, 2
// leave each lane one row's partial (row (lane >> 2) & 7), then bits 1 and 0 finish it. 9 shuffles
// instead of 40; every row's order of additions is fixed, and the four lanes that end with a row
// hold the same bits (a + b == b + a).
__device__ __forceinline__ float transposed_warp_sum8(const float s[8]) {
  const int lane = threadIdx.x % 32;
  float t[4], u[2];
  const bool b4 = lane & 16, b3 = lane & 8, b2 = lane & 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) t[i] = (b4 ? s[i + 4] : s[i]) + __shfl_xor_sync(0xffffffffu, b4 ? s[i] : s[i + 4], 16);
#pragma unroll
  for (int i = 0; i < 2; ++i) u[i] = (b3 ? t[i + 2] : t[i]) + __shfl_xor_sync(0xffffffffu, b3 ? t[i] : t[i + 2], 8);
  float w = (b2 ? u[1] : u[0]) + __shfl_xor_sync(0xffffffffu, b2 ? u[0] : u[1], 4);
  w += __shfl_xor_sync(0xffffffffu, w, 2);
  w += __shfl_xor_sync(0xffffffffu, w, 1);
  return w;
}

// This lane's 16-byte slices of W2 rows v0 .. v0+7 (zeros past V): eight loads in flight at once.
template <typename WT>
__device__ __forceinline__ void load_rows(const WT* __restrict__ w2, int v0, int V, uint4 raw[kSmallRows]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kSmallRows; ++i)
    raw[i] = v0 + i < V ? __ldg(reinterpret_cast<const uint4*>(w2 + static_cast<int64_t>(v0 + i) * kSmallRank) + lane)
                        : make_uint4(0, 0, 0, 0);
}

// bias of the eight rows in raw for request (lane & 3) (request 0 in every lane when NR == 1), at
// row ((lane >> 2) & 7) of the eight; all lanes of the warp calling. h: W1[x] of each request.
// Shared by the chain and by rejection's rebuilt q row, so the two see identical bias bits.
template <typename WT, int NR>
__device__ __forceinline__ float rows_bias(const uint4 raw[kSmallRows], const uint4 h[NR]) {
  const int lane = threadIdx.x % 32;
  float mine = 0.f;
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    float hv[8], s[8];
    unpack8<WT>(h[r], hv);
#pragma unroll
    for (int i = 0; i < kSmallRows; ++i) {
      float w[8];
      unpack8<WT>(raw[i], w);
      float d = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) d = fmaf(w[j], hv[j], d);
      s[i] = d;
    }
    const float sum = transposed_warp_sum8(s);
    if (NR == 1 || (lane & 3) == r) mine = sum;
  }
  return mine;
}

template <typename WT, int NR>
__device__ __forceinline__ void load_h(const WT* __restrict__ h, int64_t ldh, int R, uint4 out[NR]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < NR; ++r)
    out[r] = r < R ? *(reinterpret_cast<const uint4*>(h + r * ldh) + lane) : make_uint4(0, 0, 0, 0);
}

__device__ __forceinline__ Partial load_partial_cg(const Partial* p) {  // another block's write: skip L1
  const float* f = reinterpret_cast<const float*>(p);
  return {__ldcg(f), __ldcg(f + 1), __ldcg(f + 2), __ldcg(f + 3), __ldcg(reinterpret_cast<const int*>(p) + 4)};
}

// The request a lane serves in a small-batch epilogue (lane & 3; request 0 when NR == 1), its
// sampling settings, and step 2 for one (vocab row, bias) entry of it at step k.
struct LaneRequest {
  int r;
  bool active, greedy;
  float scale;
  int64_t seed;

  __device__ LaneRequest(int NR, int R, const float* __restrict__ temperature, const int64_t* __restrict__ seeds)
      : r(NR == 1 ? 0 : (threadIdx.x % 32) & 3), active(r < R) {
    const float T = active ? temperature[r] : 1.f;
    greedy = T < kGreedyBelow;
    scale = greedy ? 1.f : T;
    seed = active ? seeds[r] : 0;
  }
  // Row k of this lane's request in q [R, γ, V] (null without q, and for a greedy row: one-hot).
  __device__ __forceinline__ float* x_row(float* q, int k, int gamma, int V) const {
    return q == nullptr || !active || greedy ? nullptr : q + (static_cast<int64_t>(r) * gamma + k) * V;
  }
  // Step 2 for the race group this lane's entry (u, bias) of vocab row v belongs to: the group's
  // eight entries are on the lanes sharing lane & 3 (visit_lane_group); every lane calls, `valid`
  // false where the lane holds no entry. x_row (return_q): the request's q row k, gets x.
  __device__ __forceinline__ void visit(Partial& p, float u, float bias, int v, int k, bool valid,
                                        float* __restrict__ x_row) const {
    const float x = valid ? over_temperature(u + bias, scale) : -INFINITY;
    if (x_row != nullptr && valid) x_row[v] = x;
    const uint32_t group = static_cast<uint32_t>(v) >> 3;
    const GroupNoise noise = greedy ? GroupNoise{} : group_noise(counter_words(seed, kStreamDraft, k, group >> 1), group);
    visit_lane_group(p, x, v, !greedy, noise);
  }
};

// Where a small-batch kernel's entry of vocab row v (two floats: the chain's U and bias, rejection's
// p and q) goes to its epilogue. A batch of 8 W2 rows is one race group, row (lane >> 2) & 7 on the
// lanes sharing lane & 3. With one request all four lanes holding a row agree, so lane
// (lane & 3) == j keeps batch j of every four the warp streams: then the lanes hold four groups and
// visit them at once, and the epilogue runs once per 32 rows, not per 8. With more, lane & 3 is the
// request and every batch is visited.
template <int NR>
struct EntryRouter {
  int held = 0, v;
  float a = 0.f, b = 0.f;

  __device__ explicit EntryRouter(int V) : v(V) {}
  // last: no batch follows in this pass, so the kept entries are visited now. Every lane calls.
  template <typename Visit>
  __device__ __forceinline__ void offer(bool active, float a_, float b_, int v_, int V, bool last, Visit&& visit) {
    if constexpr (NR == 1) {
      if ((threadIdx.x & 3) == held) a = a_, b = b_, v = v_;
      if (++held == 4 || last) {
        visit(a, b, v, v < V);
        held = 0;
        v = V;
      }
    } else {
      visit(a_, b_, v_, active && v_ < V);
    }
  }
};

// The block's result per request into results [R, gridDim.x] (a Partial, or residual.cuh's Race):
// this lane's request's lanes (lanes r, r+4, ..; every lane with one request), then the block's
// warps in order. Every thread calls.
template <int NR, typename State>
__device__ __forceinline__ void store_block_result(State mine, int R, State* __restrict__ results) {
  __shared__ State warp_parts[kThreads / 32][kSmallMaxRequests];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  mine = warp_combine(mine, NR == 1 ? 1 : 4);
  if (lane < NR) warp_parts[warp][lane] = mine;
  __syncthreads();
  if (threadIdx.x < R) {
    State all = warp_parts[0][threadIdx.x];
    for (int w = 1; w < kThreads / 32; ++w) all = combine(all, warp_parts[w][threadIdx.x]);
    results[static_cast<int64_t>(threadIdx.x) * gridDim.x + blockIdx.x] = all;
  }
}

// Steps 1-3 of step k for R <= NR requests. Grid: a few blocks per SM, warps striding over batches
// of 8 W2 rows; partials [R, gridDim.x]; done[k] counts finished blocks (zeroed by gather_anchor_kernel);
// q [R, γ, V] (null: not returned) gets row k's x.
template <typename WT, typename UT, int NR>
__global__ void __launch_bounds__(kThreads, kSmallStepBlocksPerSm)
small_step_kernel(const WT* __restrict__ w2, const WT* __restrict__ w1, WT* __restrict__ prev_emb,
                  const UT* __restrict__ U, const float* __restrict__ temperature,
                  const int64_t* __restrict__ seeds, float* __restrict__ q, Partial* __restrict__ partials,
                  unsigned* __restrict__ done, int64_t* __restrict__ tokens, float* __restrict__ q_token,
                  float* __restrict__ row_stats, int R, int k, int gamma, int V) {
  allow_next_kernel();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const LaneRequest req(NR, R, temperature, seeds);
  const UT* u_row = U + (static_cast<int64_t>(req.active ? req.r : 0) * gamma + k) * V;
  const int64_t ld_emb = static_cast<int64_t>(gamma) * kSmallRank;

  // W2 does not depend on the previous step: the first rows are requested before waiting for it.
  const int batches = (V + kSmallRows - 1) / kSmallRows, stride = gridDim.x * (kThreads / 32);
  const int row_in_batch = (lane >> 2) & 7;
  int b = blockIdx.x * (kThreads / 32) + warp;
  constexpr int kSmallDepth = small_depth(NR);
  uint4 raw[kSmallDepth][kSmallRows];
  float u_next[kSmallDepth] = {};  // U at this lane's row of the batch in raw[d]
  const auto request = [&](int batch, int d) {
    load_rows(w2, batch * kSmallRows, V, raw[d]);
    const int v = batch * kSmallRows + row_in_batch;
    u_next[d] = req.active && v < V ? to_float(u_row[v]) : 0.f;
  };
#pragma unroll
  for (int d = 0; d < kSmallDepth; ++d)
    if (b + d * stride < batches) request(b + d * stride, d);
  wait_previous_kernel();  // prev_emb[:, k] is the previous step's output
  uint4 h[NR];
  load_h<WT, NR>(prev_emb + static_cast<int64_t>(k) * kSmallRank, ld_emb, R, h);
  Partial p = empty_partial();
  float* x_row = req.x_row(q, k, gamma, V);
  const auto epilogue = [&](float u, float bias, int v, bool valid) { req.visit(p, u, bias, v, k, valid, x_row); };
  EntryRouter<NR> route(V);
  for (; b < batches; b += kSmallDepth * stride) {
#pragma unroll
    for (int d = 0; d < kSmallDepth; ++d) {
      const int bd = b + d * stride;
      if (bd >= batches) break;
      const int v = bd * kSmallRows + row_in_batch;
      const float bias = rows_bias<WT, NR>(raw[d], h);
      const float u = u_next[d];
      if (bd + kSmallDepth * stride < batches) request(bd + kSmallDepth * stride, d);  // in flight meanwhile
      route.offer(req.active, u, bias, v, V, bd + stride >= batches, epilogue);
    }
  }

  store_block_result<NR>(p, R, partials);

  // The last block to finish merges every block's partials (step 3).
  if (!last_block_to_finish(done + k)) return;
  __shared__ int token_s[kSmallMaxRequests];
  for (int rr = 0; rr < R; ++rr) {
    Partial q = empty_partial();
    for (int i = threadIdx.x; i < gridDim.x; i += blockDim.x)
      q = combine(q, load_partial_cg(partials + static_cast<int64_t>(rr) * gridDim.x + i));
    q = block_combine<kThreads>(q);
    if (threadIdx.x == 0) token_s[rr] = write_step(q, rr, k, gamma, V, temperature, tokens, q_token, row_stats);
  }
  __syncthreads();
  if (k + 1 < gamma) {  // W1[x_k] feeds step k+1 and the confidence head
    for (int i = threadIdx.x; i < R * kSmallRank; i += blockDim.x) {
      const int rr = i / kSmallRank, j = i % kSmallRank;
      prev_emb[(static_cast<int64_t>(rr) * gamma + k + 1) * kSmallRank + j] =
          w1[static_cast<int64_t>(token_s[rr]) * kSmallRank + j];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Small batches, all γ steps in one cooperative launch. One block per SM owns a contiguous
// range of W2 row batches and keeps the first `resident` of them in shared memory from step 0 on
// (about 39 % of W2 at Qwen3-4B sizes on the H200), so steps 1 .. γ-1 stream only the rest from
// HBM. Between steps the blocks meet at a grid barrier; every block merges the step's partials
// itself (the token is the same in all of them: the key order is total) and reads W1[x_k] for the
// next step, while its first W2 loads of that step are already in flight. Bias, noise, keys and
// tokens are computed exactly as in small_step_kernel (the same rows_bias batches and epilogue).
constexpr int kChainThreads = 512;
constexpr int kChainWarps = kChainThreads / 32;
constexpr int kBatchBytes = kSmallRows * kSmallRank * 2;  // one batch of 16-bit W2 rows: 4 KB

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// The grid barrier of step k: every block's writes before it are visible to every block after it.
// `arrived` is zeroed per launch and only grows, so step k waits for (k + 1) · gridDim.x arrivals.
__device__ __forceinline__ void grid_barrier(unsigned* arrived, int k) {
  __syncthreads();
  if (threadIdx.x == 0) {  // release: the block's writes (ordered by the CTA barrier) go with the arrival
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(arrived) : "memory");
    const unsigned target = static_cast<unsigned>(k + 1) * gridDim.x;
    while (load_acquire(arrived) < target) __nanosleep(20);
  }
  __syncthreads();
}

// Grid: one block per SM (all co-resident: cooperative launch), block b owning batches
// [b·per_block, (b+1)·per_block) of ceil(V / 8); partials [γ][R][gridDim.x]; `arrived` zeroed.
template <typename WT, typename UT, int NR>
__global__ void __launch_bounds__(kChainThreads, 1)
small_chain_kernel(const WT* __restrict__ w2, const WT* __restrict__ w1, WT* __restrict__ prev_emb,
                   const UT* __restrict__ U, const float* __restrict__ temperature,
                   const int64_t* __restrict__ seeds, Partial* __restrict__ partials, unsigned* __restrict__ arrived,
                   int64_t* __restrict__ tokens, float* __restrict__ q_token, float* __restrict__ row_stats,
                   float* __restrict__ q, int R, int gamma, int V, int per_block, int resident) {
  extern __shared__ uint4 resident_rows[];  // [resident batch][row of 8][lane]
  __shared__ Partial warp_parts[kChainWarps][kSmallMaxRequests];
  __shared__ Partial merge_parts[kChainWarps];
  __shared__ int token_s[kSmallMaxRequests];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const LaneRequest req(NR, R, temperature, seeds);
  const int row_in_batch = (lane >> 2) & 7;

  // This warp's batches (local index j ≡ warp mod kChainWarps): the streamed ones (j >= resident)
  // first, so the loads issued before a barrier are the slow ones, then the resident ones.
  const int first = blockIdx.x * per_block;
  const int count = max(0, min(per_block, (V + kSmallRows - 1) / kSmallRows - first));
  const int res = min(resident, count);
  const int s0 = res + ((warp - res) % kChainWarps + kChainWarps) % kChainWarps;
  const int n_streamed = s0 < count ? (count - s0 + kChainWarps - 1) / kChainWarps : 0;
  const int n_total = n_streamed + (warp < res ? (res - warp + kChainWarps - 1) / kChainWarps : 0);
  // Odd steps walk the streamed batches backwards: a step starts on the rows the previous one read
  // last, which are still in L2 (the streamed part is about L2's size, so in one direction every
  // step would evict the rows it is about to need).
  const auto local = [&](int n, int k) {
    if (n >= n_streamed) return warp + (n - n_streamed) * kChainWarps;
    return s0 + ((k & 1) ? n_streamed - 1 - n : n) * kChainWarps;
  };

  constexpr int kDepth = small_depth(NR);
  uint4 raw[kDepth][kSmallRows];
  float u_next[kDepth] = {};
  const auto request = [&](int n, int d, int k) {  // batch n of this warp's list, step k, into slot d
    const int j = local(n, k);
    if (k > 0 && j < res) {
#pragma unroll
      for (int i = 0; i < kSmallRows; ++i) raw[d][i] = resident_rows[(j * kSmallRows + i) * 32 + lane];
    } else {
      load_rows(w2, (first + j) * kSmallRows, V, raw[d]);
    }
    const int v = (first + j) * kSmallRows + row_in_batch;
    u_next[d] = req.active && v < V ? to_float(U[(static_cast<int64_t>(req.r) * gamma + k) * V + v]) : 0.f;
  };
#pragma unroll
  for (int d = 0; d < kDepth; ++d)
    if (d < n_total) request(d, d, 0);
  uint4 h[NR];
  load_h<WT, NR>(prev_emb, static_cast<int64_t>(gamma) * kSmallRank, R, h);  // W1[anchor]

  for (int k = 0; k < gamma; ++k) {
    Partial p = empty_partial();
    EntryRouter<NR> route(V);
    float* x_row = req.x_row(q, k, gamma, V);
    const auto visit = [&](float u, float bias, int v, bool valid) { req.visit(p, u, bias, v, k, valid, x_row); };
    for (int n = 0; n < n_total; n += kDepth) {
#pragma unroll
      for (int d = 0; d < kDepth; ++d) {
        const int nd = n + d;
        if (nd >= n_total) break;
        const int j = local(nd, k);
        const int v = (first + j) * kSmallRows + row_in_batch;
        const float bias = rows_bias<WT, NR>(raw[d], h);
        if (k == 0 && j < res) {
#pragma unroll
          for (int i = 0; i < kSmallRows; ++i) resident_rows[(j * kSmallRows + i) * 32 + lane] = raw[d][i];
        }
        const float u = u_next[d];
        // The next batch of this step into the slot, or (past the end) this warp's first batch of
        // step k+1, so it is in flight across the barrier.
        const int next = nd + kDepth;
        if (next < n_total) request(next, d, k);
        else if (k + 1 < gamma) request(d, d, k + 1);  // batch d: processed already (d <= nd)
        route.offer(req.active, u, bias, v, V, nd + 1 == n_total, visit);
      }
    }

    p = warp_combine(p, NR == 1 ? 1 : 4);
    if (lane < NR) warp_parts[warp][lane] = p;
    __syncthreads();
    Partial* step_parts = partials + static_cast<int64_t>(k) * R * gridDim.x;
    if (warp < R) {  // warp w < R merges the block's warps for request w
      Partial q = lane < kChainWarps ? warp_parts[lane][warp] : empty_partial();
      q = warp_combine(q);
      if (lane == 0) step_parts[static_cast<int64_t>(warp) * gridDim.x + blockIdx.x] = q;
    }
    grid_barrier(arrived, k);
    if (k + 1 == gamma && blockIdx.x != 0) return;  // block 0 writes the last token

    // Every block merges the step (same order everywhere), one partial per lane so that all loads
    // are one round trip: warps [rr·per_request, (rr+1)·per_request) take request rr's partials.
    // Block 0 writes the step's outputs.
    const int per_request = (gridDim.x + 31) / 32;
    const int mr = warp / per_request, part = (warp % per_request) * 32 + lane;
    if (mr < R) {
      Partial q = empty_partial();
      if (part < gridDim.x) q = load_partial_cg(step_parts + static_cast<int64_t>(mr) * gridDim.x + part);
      q = warp_combine(q);
      if (lane == 0) merge_parts[warp] = q;
    }
    __syncthreads();
    if (threadIdx.x < R) {
      Partial q = empty_partial();
      for (int w = 0; w < per_request; ++w) q = combine(q, merge_parts[threadIdx.x * per_request + w]);
      token_s[threadIdx.x] = min(q.idx, V - 1);  // as write_step
      if (blockIdx.x == 0) write_step(q, threadIdx.x, k, gamma, V, temperature, tokens, q_token, row_stats);
    }
    __syncthreads();
    if (k + 1 < gamma) {  // W1[x_k]: step k+1's bias here, and prev_emb for the confidence head
#pragma unroll
      for (int rr = 0; rr < NR; ++rr)
        h[rr] = rr < R ? *(reinterpret_cast<const uint4*>(w1 + static_cast<int64_t>(token_s[rr]) * kSmallRank) + lane)
                       : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int rr = 0; rr < NR; ++rr)
        if (blockIdx.x == 0 && warp == rr && rr < R)
          *(reinterpret_cast<uint4*>(prev_emb + (static_cast<int64_t>(rr) * gamma + k + 1) * kSmallRank) + lane) =
              h[rr];
    }
  }
}

// bias[R, V] with rows_bias at R <= 2: the warped chain's steps and rejection's rebuilt q rows,
// bit-identical to the chain's. Odd steps walk the batches backwards (as the chain kernels do).
// kMaxKey: also each row's largest order key of x = (U_step + bias) / T into row_max.keys (warp.cu's
// max pass, computed as it computes x).
template <typename WT, typename UT, int NR, bool kMaxKey>
__global__ void __launch_bounds__(kThreads, small_bias_blocks_per_sm(NR))
small_bias_kernel(const WT* __restrict__ w2, const WT* __restrict__ h, int64_t ldh, int R, int V, int step,
                  float* __restrict__ bias_out, RowMaxKeys row_max) {
  const int lane = threadIdx.x % 32, r = lane & 3;
  uint4 hr[NR];
  load_h<WT, NR>(h, ldh, R, hr);
  const UT* u_row = kMaxKey && r < R
                        ? static_cast<const UT*>(row_max.U) + (static_cast<int64_t>(r) * row_max.gamma + step) * V
                        : nullptr;
  const float T = kMaxKey && r < R ? row_max.temperature[r] : 1.f;
  unsigned max_key = 0;
  const int batches = (V + kSmallRows - 1) / kSmallRows;
  for (int n = blockIdx.x * (kThreads / 32) + threadIdx.x / 32; n < batches; n += gridDim.x * (kThreads / 32)) {
    const int b = (step & 1) ? batches - 1 - n : n;
    uint4 raw[kSmallRows];
    load_rows(w2, b * kSmallRows, V, raw);
    const float bias = rows_bias<WT, NR>(raw, hr);
    const int v = b * kSmallRows + ((lane >> 2) & 7);
    if (r < R && v < V) {
      bias_out[static_cast<int64_t>(r) * V + v] = bias;
      if constexpr (kMaxKey) max_key = max(max_key, order_key(draft_logit(to_float(u_row[v]), bias, T)));
    }
  }
  if constexpr (kMaxKey) {
    __shared__ unsigned block_max[4];
    if (threadIdx.x < 4) block_max[threadIdx.x] = 0;
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) max_key = max(max_key, __shfl_xor_sync(0xffffffffu, max_key, off));
    __syncthreads();
    if (lane < R) atomicMax(&block_max[lane], max_key);
    __syncthreads();
    if (threadIdx.x < R) atomicMax(&row_max.keys[threadIdx.x], block_max[threadIdx.x]);
  }
}

// Rejection's recovered tokens at R <= NR requests in one pass over W2, with rows_bias (the chain's
// small-batch bias bits): each batch of 8 W2 rows is one race group of the residual, or of p for a
// request that accepted every draft (visit_lane_residual), the q entries rebuilt with the chain's row stats; with one request the
// lanes' four copies of a row serve four batches (EntryRouter), so a group is visited once, not four
// times. The verdicts and H = W1[x_{n-1}] come from accept_kernel (this kernel is its programmatic
// dependent) or from the ratio tests run here (rows.tests); either way the first W2 rows are
// requested before. The last block to finish (counted on rows.done) merges the partials
// [R, gridDim.x] and writes the token. One batch of W2 rows in flight per warp; one request at
// three blocks per SM (80 registers; at four the kernel spilled and took 30.9 µs against 26.5 on the
// H200, two batches in flight at two blocks per SM 27.2).
constexpr int residual_blocks_per_sm(int capacity) { return capacity == 1 ? 3 : 2; }

template <typename WT, typename UT, int NR>
__global__ void __launch_bounds__(kThreads, residual_blocks_per_sm(NR))
small_residual_kernel(const WT* __restrict__ w2, const WT* __restrict__ h, int R, int V, const UT* __restrict__ U,
                      const float* __restrict__ temperature, const int64_t* __restrict__ seeds,
                      const ResidualRows rows, Race* __restrict__ partials, int gamma) {
  allow_next_kernel();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int batches = (V + kSmallRows - 1) / kSmallRows, stride = gridDim.x * (kThreads / 32);
  int b = blockIdx.x * (kThreads / 32) + warp;
  uint4 raw[kSmallRows];
  if (b < batches) load_rows(w2, b * kSmallRows, V, raw);
  wait_previous_kernel();
  __shared__ Verdicts<kSmallMaxRequests> verdicts;
  find_verdicts<1>(verdicts, rows.tests, rows.state, rows.target, rows.row_start, rows.tokens, seeds, R, gamma, V,
                threadIdx.x, kThreads, [] { __syncthreads(); });

  // This lane's request: lane & 3 (0 when NR == 1).
  const ResidualRequest<UT> req(NR == 1 ? 0 : lane & 3, R, U, temperature, seeds, gamma, V, rows, verdicts);
  uint4 hr[NR];
  if (rows.tests.ell == nullptr) {
    load_h<WT, NR>(h, kSmallRank, R, hr);
  } else {
#pragma unroll
    for (int rr = 0; rr < NR; ++rr) {
      const WT* w1_row = static_cast<const WT*>(rows.tests.w1) + static_cast<int64_t>(verdicts.before[rr]) * kSmallRank;
      hr[rr] = rr < R ? *(reinterpret_cast<const uint4*>(w1_row) + lane) : make_uint4(0, 0, 0, 0);
    }
  }

  // p and U at this lane's row of a batch, requested with the batch's W2 rows (in flight meanwhile).
  const int row_in_batch = (lane >> 2) & 7;
  float p_next = 0.f, u_next = 0.f;
  const auto request_row = [&](int batch) {
    const int v = batch * kSmallRows + row_in_batch;
    p_next = req.active && v < V ? req.p_row.x[v] : 0.f;  // raw: made a probability where used
    u_next = req.u_row != nullptr && v < V ? to_float(req.u_row[v]) : 0.f;
  };
  if (b < batches) request_row(b);
  Race acc = empty_race();
  const auto visit = [&](float p, float q, int v, bool valid) {  // p = q = 0: no weight
    visit_lane_residual(acc, valid ? p : 0.f, valid ? q : 0.f, req.rejected, v, recover_noise(req.seed, v));
  };
  EntryRouter<NR> route(V);
  for (; b < batches; b += stride) {  // warp-uniform: every lane reaches the shuffles
    const float bias = rows_bias<WT, NR>(raw, hr);
    const int v = b * kSmallRows + row_in_batch;
    const float p = req.p_row.prob(p_next), u = u_next;
    if (b + stride < batches) load_rows(w2, (b + stride) * kSmallRows, V, raw), request_row(b + stride);
    float q = 0.f;
    if (req.rejected && v < V)
      q = req.one_hot ? (v == req.token ? 1.f : 0.f) : rebuilt_q(over_temperature(u + bias, req.scale), req.max, req.inv_sum);
    route.offer(req.active, p, q, v, V, b + stride >= batches, visit);
  }
  store_block_result<NR>(acc, R, partials);

  // The last block merges every block's races with all its warps (warps [rr·w, (rr+1)·w) take
  // request rr's, w = 8 / NR): each thread's loads in one round trip.
  if (!last_block_to_finish(rows.done)) return;
  constexpr int kWarpsPerRequest = (kThreads / 32) / NR;
  __shared__ Race merged[kThreads / 32];
  const int rr = warp / kWarpsPerRequest;
  Race all = empty_race();
  if (rr < R)
    all = gather_races<3>(partials + static_cast<int64_t>(rr) * gridDim.x, (warp % kWarpsPerRequest) * 32 + lane,
                          gridDim.x, kWarpsPerRequest * 32);
  all = warp_combine(all);
  if (lane == 0) merged[warp] = all;
  __syncthreads();
  // Warp rr writes request rr's token (recovered_token wants a warp).
  // A greedy request's token is written already (accept_kernel or find_verdicts).
  if (warp >= R || (rows.greedy != nullptr && rows.greedy[warp])) return;
  all = merged[warp * kWarpsPerRequest];
  for (int w = 1; w < kWarpsPerRequest; ++w) all = combine(all, merged[warp * kWarpsPerRequest + w]);
  write_recovered_token(all, warp, verdicts.n[warp], verdicts.rejected[warp], rows.target, rows.row_start, V,
                        seeds[warp], rows.out_tokens, gamma);
}

// W1[anchor] into prev_emb[:, 0]. Also zeroes the chain's n block counters: the launch
// that runs first anyway does it, where a fill would be a launch of its own.
template <typename WT, typename IT>
__global__ void gather_anchor_kernel(const WT* __restrict__ w1, const IT* __restrict__ anchors, int rank, int gamma,
                                     WT* __restrict__ prev_emb, int* __restrict__ counters, int n) {
  const int r = blockIdx.x;
  if (r == 0)
    for (int i = threadIdx.x; i < n; i += blockDim.x) counters[i] = 0;
  const WT* src = w1 + static_cast<int64_t>(anchors[r]) * rank;
  WT* dst = prev_emb + static_cast<int64_t>(r) * gamma * rank;
  for (int j = threadIdx.x; j < rank; j += blockDim.x) dst[j] = src[j];
}

// This thread's share of x·w over n entries (x fp32/bf16/fp16, w fp32), threads tid of nthreads:
// four at a time when vec (n % 4 == 0, 16-byte aligned bases), kPass of them loaded before the
// first is used (one memory round trip per pass: a d = 2560 row is one pass of 128 threads).
template <typename T>
__device__ __forceinline__ float thread_dot(const T* __restrict__ x, const float* __restrict__ w, int n, int tid,
                                            int nthreads, bool vec) {
  constexpr int kPass = 8;
  float acc = 0.f;
  if (!vec) {
    for (int j = tid; j < n; j += nthreads) acc += to_float(x[j]) * w[j];
    return acc;
  }
  for (int base = 4 * tid; base < n; base += 4 * nthreads * kPass) {
    float xv[kPass][4];
    float4 wv[kPass];
#pragma unroll
    for (int c = 0; c < kPass; ++c) {
      const int j = base + 4 * nthreads * c;
      if (j < n) {
        load_vec<4>(x + j, xv[c]);
        wv[c] = *reinterpret_cast<const float4*>(w + j);
      } else {
        xv[c][0] = xv[c][1] = xv[c][2] = xv[c][3] = 0.f;
        wv[c] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
#pragma unroll
    for (int c = 0; c < kPass; ++c) acc += xv[c][0] * wv[c].x + xv[c][1] * wv[c].y + xv[c][2] * wv[c].z + xv[c][3] * wv[c].w;
  }
  return acc;
}

// The confidence head's logits (confidence.py): z[i] = w[:d]·h[i] + w[d:]·prev_emb[i] + b for the
// R·γ rows i, a block each (kConfidenceThreads). A programmatic dependent of the chain's last
// kernel: h and w are inputs of the op (ready before it began), so their dots run while that
// kernel drains; prev_emb after it.
constexpr int kConfidenceThreads = 128;

template <typename HT, typename ET>
__global__ void __launch_bounds__(kConfidenceThreads)
confidence_kernel(const HT* __restrict__ h, const ET* __restrict__ prev_emb, const float* __restrict__ weight,
                  const float* __restrict__ bias, int d, int rank, bool vec, float* __restrict__ z) {
  const int i = blockIdx.x;
  float acc = thread_dot(h + static_cast<int64_t>(i) * d, weight, d, threadIdx.x, kConfidenceThreads, vec);
  wait_previous_kernel();  // prev_emb is the chain's
  acc += thread_dot(prev_emb + static_cast<int64_t>(i) * rank, weight + d, rank, threadIdx.x, kConfidenceThreads, vec);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  __shared__ float warp_sums[kConfidenceThreads / 32];
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = bias != nullptr ? bias[0] : 0.f;  // a head without bias
    for (int w = 0; w < kConfidenceThreads / 32; ++w) sum += warp_sums[w];
    z[i] = sum;
  }
}

cudaDataType_t cublas_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}


int choose_splits(int R, int V) {
  // About 4 blocks per SM, slices of at least 1024 vocab entries (measured on the H200: 16 per SM,
  // or finishing each request in its last block instead of a reduce launch, were both slower).
  const int want = 4 * 132 / R;  // one wave: four resident blocks per SM (launch bounds)
  const int most = (V + 1023) / 1024;
  return std::max(1, std::min(want, most));
}

// The small-batch path: R <= 2 requests, bf16/fp16 W2 of rank 256, 16-byte aligned rows of W2 and H.
// DSPARK_MARKOV_PATH=gemm forces the cuBLAS path (comparisons; the chain and rejection read it alike).
bool small_batch_path(const at::Tensor& w2, const void* h, int64_t ldh, int R) {
  return !markov_path_forced("gemm") && R <= kSmallMaxRequests &&
         (w2.scalar_type() == at::kBFloat16 || w2.scalar_type() == at::kHalf) && w2.size(1) == kSmallRank &&
         aligned16(w2.data_ptr()) && aligned16(h) && ldh % 8 == 0;
}

int small_batch_blocks(int V, int blocks_per_sm) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int warps_needed = (V + kSmallRows - 1) / kSmallRows;
  return std::max(1, std::min(sms * blocks_per_sm, (warps_needed + kThreads / 32 - 1) / (kThreads / 32)));
}

// Calls f with R (1 or 2) as a compile-time constant: the kernels' request capacity.
template <typename F>
void with_small_capacity(int R, F&& f) {
  if (R == 1) f(std::integral_constant<int, 1>{});
  else f(std::integral_constant<int, 2>{});
}

// How many W2 batches one small_chain_kernel block can keep in shared memory on the current device
// (-1 when one block per SM cannot run at all): the kernel's attributes and occupancy, queried
// and its shared-memory limit raised once per device, not on every call.
template <typename WT, typename UT, int NR>
int chain_batch_capacity() {
  static std::mutex mutex;
  static std::unordered_map<int, int> per_device;
  const int device = at::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = per_device.find(device);
  if (found != per_device.end()) return found->second;
  auto* kernel = small_chain_kernel<WT, UT, NR>;
  cudaFuncAttributes attrs{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attrs, kernel));
  const int optin = static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const int fit = std::max(0, (optin - static_cast<int>(attrs.sharedSizeBytes)) / kBatchBytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, fit * kBatchBytes));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kChainThreads,
                                                               static_cast<size_t>(fit) * kBatchBytes));
  return per_device[device] = per_sm < 1 ? -1 : fit;
}

// Launches small_chain_kernel (all γ steps at R <= 2) with one block per SM and as many W2
// batches resident in shared memory as fit; false (nothing launched) when a block cannot be
// resident, and the per-step kernels run instead. partials: γ·R·(SM count) Partials; arrived: zeroed.
template <typename WT, typename UT, int NR>
bool launch_small_chain(const WT* w2, const WT* w1, WT* prev_emb, const UT* U, const float* temperature,
                        const int64_t* seeds, Partial* partials, unsigned* arrived, int64_t* tokens, float* q_token,
                        float* row_stats, float* q, int R, int gamma, int V, cudaStream_t stream) {
  const int fit = chain_batch_capacity<WT, UT, NR>();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int total = (V + kSmallRows - 1) / kSmallRows;
  const int per_block = (total + sms - 1) / sms;
  const int grid = (total + per_block - 1) / per_block;
  if (fit < 0 || grid > 32 * (kChainWarps / NR)) return false;  // the merge takes one partial per lane
  const int resident = std::min(per_block, fit);
  const size_t smem = static_cast<size_t>(resident) * kBatchBytes;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeCooperative;  // every block resident at once: the grid barrier needs it
  attr.val.cooperative = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(kChainThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, small_chain_kernel<WT, UT, NR>, w2, w1, prev_emb, U, temperature, seeds,
                                    partials, arrived, tokens, q_token, row_stats, q, R, gamma, V, per_block, resident));
  return true;
}

}  // namespace

// The one decision of where the chain's bias is made: markov_chain takes it, and rejection.cu races a
// rebuilt row in the same kernel. The small-batch and fused kernels (and rejection's ratio tests on
// their paths) load W1 rows 16 bytes at a time, the fused step U rows too; a W1 or U starting off a
// 16-byte boundary (a view) takes the cuBLAS path.
BiasPath chain_bias_path(const at::Tensor& U, const at::Tensor& w1, const at::Tensor& w2, const void* h, int64_t ldh,
                         int R, bool warped) {
  if (warped || !aligned16(w1.data_ptr())) return BiasPath::kGemm;
  if (small_batch_path(w2, h, ldh, R)) return BiasPath::kSmall;
  if (aligned16(U.data_ptr()) && fused_step_supported(w2, h, ldh, R)) return BiasPath::kFused;
  return BiasPath::kGemm;
}

constexpr int kFusedMaxKeysFrom = 32;  // requests from which the fused step takes top-p's max (bias_gemm)

// bias[R, V] = H[R, r] · W2[V, r]ᵀ, H rows strided by ldh elements (prev_emb[:, k]); also used by
// rejection.cu to rebuild a q row with the very GEMM the chain sampled from.
bool bias_gemm(const at::Tensor& w2, const void* h, int64_t ldh, int R, at::Tensor& bias, int step,
               const RowMaxKeys* max_keys) {
  const int V = w2.size(0), rank = w2.size(1);
  if (small_batch_path(w2, h, ldh, R)) {  // the chain drafted with rows_bias: rebuild with it too
    AT_DISPATCH_REDUCED_FLOATING_TYPES(w2.scalar_type(), "dspark_small_bias", [&] {
      using WT = device_t<scalar_t>;
      with_small_capacity(R, [&](auto capacity) {
        constexpr int NR = decltype(capacity)::value;
        const dim3 grid(small_batch_blocks(V, small_bias_blocks_per_sm(NR)));
        const auto run = [&](auto kernel, const RowMaxKeys& row_max) {
          kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              reinterpret_cast<const WT*>(w2.data_ptr()), reinterpret_cast<const WT*>(h), ldh, R, V, step,
              bias.data_ptr<float>(), row_max);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (max_keys == nullptr) return run(small_bias_kernel<WT, float, NR, false>, RowMaxKeys{});
        DSPARK_DISPATCH_FLOATS(max_keys->u_type, "dspark_small_bias_max", [&] {
          run(small_bias_kernel<WT, device_t<scalar_t>, NR, true>, *max_keys);
        });
      });
    });
    return max_keys != nullptr;
  }
  if (fused_step_supported(w2, h, ldh, R)) {  // the chain sampled from the fused step's bias: rebuild with it
    // Its max keys load U four entries at a time (8 or 16 bytes; V % 64 == 0 here). Against warp.cu's
    // pass (H100, top-p 0.9 alone, lazy, sessions 63-64): 0.98x at R = 16, 1.00x at 24, 1.03x at 32,
    // 1.04-1.08x at 40-56, 1.10x at 64, 1.12x at 128; below 32 the pass takes the max.
    const RowMaxKeys* taking = max_keys != nullptr && R >= kFusedMaxKeysFrom && aligned16(max_keys->U) ? max_keys
                                                                                                   : nullptr;
    fused_step(w2, h, ldh, R, nullptr, taking ? taking->u_type : at::kBFloat16, nullptr, nullptr, nullptr,
               bias.data_ptr<float>(), step, step + 1, at::cuda::getCurrentCUDAStream(), taking);
    return taking != nullptr;
  }
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const float alpha = 1.f, beta = 0.f;
  const cudaDataType_t t = cublas_type(w2.scalar_type());
  // torch leaves reduced-precision (bf16/fp16) split-K reductions allowed on its handle; the
  // reference's bias is an fp32 GEMM, so keep every partial sum in fp32 here.
  cublasMath_t mode;
  TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle, &mode));
  TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle, static_cast<cublasMath_t>(
      CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  // Column-major view: biasᵀ [V, R] = W2 (stored [r, V] col-major, transposed) · Hᵀ ([r, R] col-major).
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, V, R, rank, &alpha, w2.data_ptr(), t, rank, h,
                                    t, static_cast<int>(ldh), &beta, bias.data_ptr<float>(), CUDA_R_32F, V,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle, mode));
  return false;
}

// Rejection's recovered tokens where the chain drafted with its small-batch kernels
// (BiasPath::kSmall): small_residual_kernel. partials: [R, small_batch_blocks] Races.
void small_residual(const at::Tensor& w2, const void* h, int R, const at::Tensor& U, const float* temperature,
                    const int64_t* seeds, const ResidualRows& rows, at::Tensor& partials, int gamma) {
  const int V = w2.size(0);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(w2.scalar_type(), "dspark_small_residual_w", [&] {
    using WT = device_t<scalar_t>;
    DSPARK_DISPATCH_FLOATS(U.scalar_type(), "dspark_small_residual_u", [&] {
      using UT = device_t<scalar_t>;
      with_small_capacity(R, [&](auto capacity) {
        constexpr int NR = decltype(capacity)::value;
        const int blocks = small_batch_blocks(V, residual_blocks_per_sm(NR));
        partials = at::empty({static_cast<int64_t>(R) * blocks * static_cast<int64_t>(sizeof(Race))},
                             U.options().dtype(at::kByte));
        launch_programmatic(small_residual_kernel<WT, UT, NR>, dim3(blocks), dim3(kThreads), 0, stream,
                            reinterpret_cast<const WT*>(w2.data_ptr()), reinterpret_cast<const WT*>(h), R, V,
                            reinterpret_cast<const UT*>(U.data_ptr()), temperature, seeds, rows,
                            reinterpret_cast<Race*>(partials.data_ptr<uint8_t>()), gamma);
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> markov_chain_cuda(
    const at::Tensor& U, const at::Tensor& anchors, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& temperature, const at::Tensor& seeds, bool return_q, const std::optional<at::Tensor>& conf_h,
    const std::optional<at::Tensor>& conf_weight, const std::optional<at::Tensor>& conf_bias,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, int64_t top_k_max) {
  TORCH_CHECK(U.is_cuda() && U.dim() == 3 && U.is_contiguous(), "dspark::markov_chain: U must be contiguous CUDA [R, γ, V]");
  // γ = 0 made prev_emb [R, 0, r], whose null data the anchors' gather wrote through
  TORCH_CHECK(U.size(0) >= 1 && U.size(1) >= 1 && U.size(2) >= 1, "dspark::markov_chain: U needs R, γ, V >= 1");
  TORCH_CHECK(U.size(0) <= kMaxGridY, "dspark::markov_chain: at most 65535 requests per call (the grid's y axis)");
  TORCH_CHECK(is_kernel_float(U) && is_kernel_float(w1), "dspark::markov_chain: U, w1 and w2 must be fp32, bf16 or fp16");
  // W2's rows are the vocabulary the bias GEMM writes: more rows than U's V wrote past its [R, V] scratch.
  TORCH_CHECK(w1.scalar_type() == w2.scalar_type() && w1.is_contiguous() && w2.is_contiguous() && w1.dim() == 2 &&
                  w1.size(0) == U.size(2) && w2.sizes() == w1.sizes() && w1.device() == U.device() &&
                  w2.device() == U.device(),
              "dspark::markov_chain: w1 and w2 must be contiguous [V, r] of one dtype on U's device (V = U's last dim)");
  TORCH_CHECK(is_request_vector(temperature, U.size(0), at::kFloat, U.device()) &&
                  is_request_vector(seeds, U.size(0), at::kLong, U.device()) &&
                  (is_request_vector(anchors, U.size(0), at::kLong, U.device()) ||
                   is_request_vector(anchors, U.size(0), at::kInt, U.device())),
              "dspark::markov_chain: temperature (fp32), seeds (int64) and anchors (int64 or int32) must be contiguous "
              "[R] on U's device");
  const c10::cuda::CUDAGuard guard(U.device());
  const int R = U.size(0), gamma = U.size(1), V = U.size(2), rank = w1.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto f32 = U.options().dtype(at::kFloat);
  const bool confidence = conf_h.has_value() && conf_h->defined();
  const int d = confidence ? conf_h->size(-1) : 0;
  const bool has_bias = conf_bias.has_value() && conf_bias->defined();
  // conf_h's dtype here too, not at the last launch: a refusal after the chain's launches broke a capture
  TORCH_CHECK(!confidence || (conf_h->dim() == 3 && conf_h->size(0) == R && conf_h->size(1) == gamma &&
                              conf_h->is_contiguous() && is_kernel_float(*conf_h) && conf_h->device() == U.device() &&
                              conf_weight &&
                              conf_weight->scalar_type() == at::kFloat && conf_weight->is_contiguous() &&
                              conf_weight->numel() == d + rank && conf_weight->device() == U.device() &&
                              (!has_bias || (conf_bias->scalar_type() == at::kFloat && conf_bias->numel() == 1 &&
                                             conf_bias->device() == U.device()))),
              "dspark::markov_chain: the confidence head needs contiguous conf_h [R, γ, d] (fp32, bf16 or fp16), fp32 conf_weight "
              "[d + r] and fp32 conf_bias [1] (or none) on U's device");
  const bool has_top_k = top_k.has_value() && top_k->defined(), has_top_p = top_p.has_value() && top_p->defined();
  const bool warped = has_top_k || has_top_p;
  TORCH_CHECK(!has_top_k || (top_k->scalar_type() == at::kLong && top_k->numel() == R && top_k->is_contiguous() &&
                             top_k->device() == U.device()),
              "dspark::markov_chain: top_k must be a contiguous int64 [R] on U's device");
  TORCH_CHECK(!has_top_p || (top_p->scalar_type() == at::kFloat && top_p->numel() == R && top_p->is_contiguous() &&
                             top_p->device() == U.device()),
              "dspark::markov_chain: top_p must be a contiguous fp32 [R] on U's device");
  // Warped rows need the whole row before sampling (warp.cu's thresholds), so they take the
  // materialized bias (bias_gemm, as rejection rebuilds them) and return their thresholds.

  auto tokens = at::empty({R, gamma}, U.options().dtype(at::kLong));
  auto q_token = at::empty({R, gamma}, f32);
  auto q = return_q ? at::empty({R, gamma, V}, f32) : at::empty({0}, f32);
  auto prev_emb = at::empty({R, gamma, rank}, w1.options());
  const int splits = choose_splits(R, V);
  const int slice = ((V + splits - 1) / splits + 7) / 8 * 8;  // a multiple of 8 for the vector path
  const int64_t ld_emb = static_cast<int64_t>(gamma) * rank;
  const dim3 grid(splits, R);
  const BiasPath path = chain_bias_path(U, w1, w2, prev_emb.data_ptr(), ld_emb, R, warped);
  const bool small = path == BiasPath::kSmall, fused = path == BiasPath::kFused;
  const int parts_per_request = fused ? fused_step_blocks(V) : splits;  // what the reduce merges
  // The fp32 bias scratch of the cuBLAS path's split pass.
  auto bias = at::empty({!small && !fused ? R : 0, V}, f32);
  // The fused and small-batch steps leave x in q's rows, made q after the last step.
  float* x_out = return_q && (small || fused) ? q.data_ptr<float>() : nullptr;
  auto partials = at::empty({static_cast<int64_t>(R) * parts_per_request * static_cast<int64_t>(sizeof(Partial))},
                            U.options().dtype(at::kByte));
  auto row_stats = at::empty({R, gamma, 2}, f32);
  auto* parts = reinterpret_cast<Partial*>(partials.data_ptr<uint8_t>());
  const int small_blocks = small ? small_batch_blocks(V, kSmallStepBlocksPerSm) : 0;
  auto small_parts = at::empty({small ? static_cast<int64_t>(R) * small_blocks * static_cast<int64_t>(sizeof(Partial)) : 0},
                               U.options().dtype(at::kByte));
  // Block counters, zeroed by gather_anchor_kernel: finished blocks per small-batch step, and the last
  // one for rejection_sample's one-launch path (its last block leaves it zero again).
  auto counters = at::empty({gamma + 1}, U.options().dtype(at::kInt));
  auto* done = reinterpret_cast<unsigned*>(counters.data_ptr<int>());
  // All steps in one cooperative launch at R <= 2 (DSPARK_MARKOV_PATH=step: one launch per step);
  // its partials are per step, so no step overwrites one still being read.
  bool chain = small && !markov_path_forced("step");
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto thresholds = at::full({warped ? R : 0, gamma}, -INFINITY, f32);  // -inf: the row keeps everything
  // Rows with top-k <= 64 take top_k.cu's one pass where it measured faster than warp.cu's rounds
  // (H100, lazy: top-k 50 1.08x at R = 64, 1.25x at 128; with top-p 1.04-1.09x at 32, 1.5-1.9x from
  // 64); below, up to 1.4x slower (its pick, one block per request, gathers about 1 % of the row).
  // The caller's host-side bound on the sampled rows' top-k (a row without one counting as V), at
  // most 64: the lists take every row, so warp.cu's rounds, idle then, are not launched (12 a step
  // with top-p); a row the lists cannot take after all (ties overflow them, or the bound was wrong)
  // gets its threshold from top_k.cu's pick over the whole row, one block. Then faster from fewer
  // requests (H100, lazy, session 60: top-k 50 1.10x at R = 48, 1.05x at 128; with top-p 1.10-1.14x
  // at 8, 1.14-1.27x at 16-48, 1.10x at 128; 0.96-1.03x at R = 1 and 2).
  // DSPARK_MARKOV_PATH=small-top-k takes it at any R, =radix never.
  const bool bounded = top_k_max > 0 && top_k_max <= kSmallTopKMax;
  const int small_top_k_from = bounded ? (has_top_p ? kBoundedSmallTopKWithTopPFrom : kBoundedSmallTopKFrom)
                                       : (has_top_p ? kSmallTopKWithTopPFrom : kSmallTopKFrom);
  const bool small_top_k = has_top_k && !markov_path_forced("radix") &&
                           (R >= small_top_k_from || markov_path_forced("small-top-k"));
  const bool lists_take_all = small_top_k && bounded;
  WarpScratch warp_scratch = warped && !lists_take_all ? WarpScratch::make(U, R, has_top_p) : WarpScratch{};
  TopKScratch top_k_scratch = small_top_k ? TopKScratch::make(U, R, V) : TopKScratch{};
  // Top-p alone: the max its rounds start from, taken where the bias is made when it can be (bias_gemm).
  const RowMaxKeys top_p_max{U.data_ptr(), U.scalar_type(), gamma, temperature.data_ptr<float>(),
                             has_top_p && !has_top_k ? reinterpret_cast<unsigned*>(warp_scratch.max_keys.data_ptr<int>())
                                                     : nullptr};
  const unsigned* picked = small_top_k ? reinterpret_cast<const unsigned*>(top_k_scratch.picked.data_ptr<int>()) : nullptr;
  auto chain_parts = at::empty({chain ? static_cast<int64_t>(gamma) * R * sms * static_cast<int64_t>(sizeof(Partial)) : 0},
                               U.options().dtype(at::kByte));

  DSPARK_DISPATCH_FLOATS(w1.scalar_type(), "dspark_markov_w", [&] {
    using WT = device_t<scalar_t>;
    const WT* w1p = reinterpret_cast<const WT*>(w1.data_ptr());
    WT* embp = reinterpret_cast<WT*>(prev_emb.data_ptr());
    if (anchors.scalar_type() == at::kLong)
      gather_anchor_kernel<<<R, 256, 0, stream>>>(w1p, anchors.data_ptr<int64_t>(), rank, gamma, embp,
                                                  counters.data_ptr<int>(), gamma + 1);
    else
      gather_anchor_kernel<<<R, 256, 0, stream>>>(w1p, anchors.data_ptr<int32_t>(), rank, gamma, embp,
                                                  counters.data_ptr<int>(), gamma + 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    DSPARK_DISPATCH_FLOATS(U.scalar_type(), "dspark_markov_u", [&] {
      using UT = device_t<scalar_t>;
      const UT* up = reinterpret_cast<const UT*>(U.data_ptr());
      const float* tp = temperature.data_ptr<float>();
      const bool vec = V % 8 == 0 && reinterpret_cast<uintptr_t>(up) % 16 == 0;  // 16-byte loads of U rows
      if constexpr (std::is_same_v<WT, __nv_bfloat16> || std::is_same_v<WT, __half>) {
        if (chain) {
          with_small_capacity(R, [&](auto capacity) {
            chain = launch_small_chain<WT, UT, decltype(capacity)::value>(
                reinterpret_cast<const WT*>(w2.data_ptr()), w1p, embp, up, tp, seeds.data_ptr<int64_t>(),
                reinterpret_cast<Partial*>(chain_parts.data_ptr<uint8_t>()),
                done, tokens.data_ptr<int64_t>(),
                q_token.data_ptr<float>(), row_stats.data_ptr<float>(), x_out, R, gamma, V, stream);
          });
        }
      }
      for (int k = 0; !chain && k < gamma; ++k) {  // one launch per step unless the chain ran
        if constexpr (std::is_same_v<WT, __nv_bfloat16> || std::is_same_v<WT, __half>) {
          if (small) {
            with_small_capacity(R, [&](auto capacity) {
              launch_programmatic(small_step_kernel<WT, UT, decltype(capacity)::value>, dim3(small_blocks),
                          dim3(kThreads), 0, stream, reinterpret_cast<const WT*>(w2.data_ptr()), w1p, embp, up, tp,
                          seeds.data_ptr<int64_t>(), x_out,
                          reinterpret_cast<Partial*>(small_parts.data_ptr<uint8_t>()),
                          done, tokens.data_ptr<int64_t>(),
                          q_token.data_ptr<float>(), row_stats.data_ptr<float>(), R, k, gamma, V);
            });
          }
        }
        if (fused) {
          fused_step(w2, embp + static_cast<int64_t>(k) * rank, ld_emb, R, up, U.scalar_type(), tp,
                     seeds.data_ptr<int64_t>(), parts, x_out, k, gamma, stream);
        } else if (!small) {
          const bool max_taken = bias_gemm(w2, embp + static_cast<int64_t>(k) * rank, ld_emb, R, bias, k,
                                           top_p_max.keys ? &top_p_max : nullptr);
          const int64_t* kp = has_top_k ? top_k->data_ptr<int64_t>() : nullptr;
          const float* pp = has_top_p ? top_p->data_ptr<float>() : nullptr;
          if (small_top_k) {
            top_k_candidates(U, bias, tp, kp, pp, seeds.data_ptr<int64_t>(), top_k_scratch,
                             thresholds.data_ptr<float>(), parts, splits, k, lists_take_all, stream);
          }
          if (warped && !lists_take_all) warp_thresholds(U, bias, tp, kp, pp, warp_scratch, picked, thresholds.data_ptr<float>(), k, splits, max_taken, stream);
          auto pass = warped ? (vec ? split_pass_kernel<UT, true, true> : split_pass_kernel<UT, false, true>)
                             : (vec ? split_pass_kernel<UT, true, false> : split_pass_kernel<UT, false, false>);
          launch_programmatic(pass, grid, dim3(kThreads), 0, stream, up, bias.data_ptr<float>(), tp,
                              seeds.data_ptr<int64_t>(), warped ? thresholds.data_ptr<float>() : nullptr, picked,
                              parts, k, gamma, V, slice);
        }
        if (!small) {
          launch_programmatic(reduce_kernel<WT>, dim3(R), dim3(kThreads), 0, stream, parts, parts_per_request, tp,
                              w1p, rank, tokens.data_ptr<int64_t>(), q_token.data_ptr<float>(),
                              row_stats.data_ptr<float>(), embp, k, gamma, V);
        }
        if (return_q && !small && !fused) {  // the bias scratch is step k's only now
          auto q_rows = vec ? q_rows_kernel<UT, true> : q_rows_kernel<UT, false>;
          launch_programmatic(q_rows, dim3(R, splits), dim3(kThreads), 0, stream, up, bias.data_ptr<float>(), tp,
                              row_stats.data_ptr<float>(), tokens.data_ptr<int64_t>(),
                              warped ? thresholds.data_ptr<float>() : nullptr, q.data_ptr<float>(), k, gamma, V, slice);
        }
      }
      if (x_out != nullptr) {  // all R·γ rows at once. A pure stream: slices of at most about 8192
        // entries, so several waves of small blocks (choose_splits' one wave alone left R = 16's 112
        // rows at 2.1x their floor: 68.6 -> 45.5 us on the H200; at R = 1 its wave is the wider one)
        const int q_splits = std::max(choose_splits(R * gamma, V), (V + 8191) / 8192);
        const int q_slice = ((V + q_splits - 1) / q_splits + 7) / 8 * 8;
        auto q_rows = vec ? q_rows_kernel<UT, true> : q_rows_kernel<UT, false>;
        launch_programmatic(q_rows, dim3(R * gamma, q_splits), dim3(kThreads), 0, stream, up, nullptr, tp,
                            row_stats.data_ptr<float>(), tokens.data_ptr<int64_t>(), nullptr, x_out, 0, gamma, V,
                            q_slice);
      }
    });
  });
  auto conf_logits = at::empty({confidence ? R : 0, gamma}, f32);
  if (confidence) {
    const bool vec = d % 4 == 0 && rank % 4 == 0 && aligned16(conf_h->data_ptr()) && aligned16(prev_emb.data_ptr()) &&
                     aligned16(conf_weight->data_ptr());
    const int rows = R * gamma;
    constexpr const char* kTypes = "dspark::markov_chain: conf_h and w1 must be fp32, bf16 or fp16 for the confidence head";
    with_float_type(conf_h->scalar_type(), kTypes, [&](auto h_tag) {
      with_float_type(w1.scalar_type(), kTypes, [&](auto e_tag) {
        using HT = decltype(h_tag);
        using ET = decltype(e_tag);
        launch_programmatic(confidence_kernel<HT, ET>, dim3(rows), dim3(kConfidenceThreads), 0, stream,
                            reinterpret_cast<const HT*>(conf_h->data_ptr()),
                            reinterpret_cast<const ET*>(prev_emb.data_ptr()), conf_weight->data_ptr<float>(),
                            has_bias ? conf_bias->data_ptr<float>() : nullptr, d, rank, vec,
                            conf_logits.data_ptr<float>());
      });
    });
  }
  return {tokens, q_token, q, prev_emb, row_stats, counters.narrow(0, gamma, 1), conf_logits, thresholds};
}

}  // namespace dspark
