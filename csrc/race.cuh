// The split pass's per-entry work, shared by the chain's kernels (markov.cu, fused_step.cu): a
// partial (online max / sum-exp and the best race key) and how entries enter and partials merge
// (across lanes for any result with combine and shfl_xor, and across blocks).
#pragma once
#include <cuda_runtime.h>

#include "common.cuh"
#include "philox.cuh"

namespace dspark {

struct Partial {
  float max;   // running max of x over the slice
  float sum;   // sum of exp(x - max)
  float key;   // best race key
  float x;     // x at the best key
  int idx;     // vocab id of the best key
};

__device__ __forceinline__ bool better(float key, int idx, float best_key, int best_idx) {
  return key > best_key || (key == best_key && idx < best_idx);  // ties: lowest index, as argmax
}

__device__ __forceinline__ Partial combine(Partial a, Partial b) {
  Partial out;
  out.max = fmaxf(a.max, b.max);
  out.sum = (a.sum == 0.f ? 0.f : a.sum * __expf(a.max - out.max)) +
            (b.sum == 0.f ? 0.f : b.sum * __expf(b.max - out.max));
  const bool take_b = better(b.key, b.idx, a.key, a.idx);
  out.key = take_b ? b.key : a.key;
  out.x = take_b ? b.x : a.x;
  out.idx = take_b ? b.idx : a.idx;
  return out;
}

// The partial of lane (lane ^ off), every lane calling.
__device__ __forceinline__ Partial shfl_xor(const Partial& p, int off) {
  return {__shfl_xor_sync(0xffffffffu, p.max, off), __shfl_xor_sync(0xffffffffu, p.sum, off),
          __shfl_xor_sync(0xffffffffu, p.key, off), __shfl_xor_sync(0xffffffffu, p.x, off),
          __shfl_xor_sync(0xffffffffu, p.idx, off)};
}

// Combines the results (a Partial, or residual.cuh's Race: each with combine and shfl_xor) of
// lanes that differ in lane bits >= log2(lowest); every lane gets its lanes' result.
template <typename T>
__device__ __forceinline__ T warp_combine(T p, int lowest = 1) {
#pragma unroll
  for (int off = 16; off >= lowest; off >>= 1) p = combine(p, shfl_xor(p, off));
  return p;
}

// The same for each group of W consecutive lanes (W = 4: a quad; 8).
template <int W, typename T>
__device__ __forceinline__ T group_combine(T p) {
#pragma unroll
  for (int off = 1; off < W; off <<= 1) p = combine(p, shfl_xor(p, off));
  return p;
}

// Counts this block on counter (one thread of it calling): whether it is the grid's last. counter is
// zero before the launch, and the last block puts it back to zero (every other block has counted by
// then), so a counter zeroed once serves each later launch that uses it in turn.
__device__ __forceinline__ bool count_block_is_last(unsigned* counter) {
  const bool last = atomicAdd(counter, 1u) == gridDim.x - 1;
  if (last) *counter = 0;
  return last;
}

// Whether this block is the last of the grid to get here (every thread calling): its writes before
// and every other block's are visible to it after.
__device__ __forceinline__ bool last_block_to_finish(unsigned* counter) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = count_block_is_last(counter);
  __syncthreads();
  if (last) __threadfence();
  return last;
}

__device__ __forceinline__ Partial empty_partial() { return {-INFINITY, 0.f, -INFINITY, -INFINITY, 0x7fffffff}; }

// Block-wide combine of a block of kBlockThreads threads, every thread calling; thread 0 gets the result.
template <int kBlockThreads>
__device__ __forceinline__ Partial block_combine(Partial p) {
  __shared__ Partial warp_partials[kBlockThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  p = warp_combine(p);
  __syncthreads();  // warp_partials may still be read by an earlier call
  if (lane == 0) warp_partials[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < kBlockThreads / 32 ? warp_partials[lane] : empty_partial();
    p = warp_combine(p);
  }
  return p;
}

// The draft's grouped race (docs/runtime-api.md, "Random numbers"): vocab ids 8g .. 8g+7 form group
// g. Its race key is log(W_g / E_g), W_g = Σ exp(x) over the group, E_g = -log u_g, so the winning
// group is drawn ∝ W_g; inside it the first entry whose prefix sum exceeds v_g·W_g is taken (inverse
// CDF), so each token is drawn ∝ exp(x), the softmax. The noise is per group, not per entry: Philox
// block g >> 1 of (seed, kStreamDraft, step) serves groups 2b and 2b+1 with words (x, y) and (z, w),
// the race uniform u_g and the pick uniform v_g. (A race per entry spent most of the sampled
// epilogue on one Philox word and, where the entry could win, two logarithms per vocab entry.)
struct GroupNoise {
  uint32_t race, pick;
};

__device__ __forceinline__ GroupNoise group_noise(const uint4& block_words, int group) {
  return group & 1 ? GroupNoise{block_words.z, block_words.w} : GroupNoise{block_words.x, block_words.y};
}

// The group's race key from its max m and sum-exp s (relative to m). The outer logs are __logf (a
// few ulp: keys are only compared); -log u keeps logf's accuracy near u = 1.
__device__ __forceinline__ float group_key(float m, float s, uint32_t race_word) {
  return m + (__logf(s) - __logf(-logf(word_uniform(race_word))));
}

// Group v .. v+7 (v % 8 == 0) of one request's step into p: online max / sum-exp, then the group's
// race (sampled) or its argmax, lowest index on ties (greedy). A group all -inf (masked by top-k/
// top-p, or an engine's mask in U) adds nothing: exp(-inf - -inf) would make the row's sum NaN.
template <bool kSampled>
__device__ __forceinline__ void visit8(Partial& p, const float x[8], int v, GroupNoise noise) {
  float m = x[0];
#pragma unroll
  for (int i = 1; i < 8; ++i) m = fmaxf(m, x[i]);
  if (m == -INFINITY) return;
  float e[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = exp_ftz(x[i] - m);
  // Prefix sums, c[7] summed as a tree (the row sum-exp's bits on every path of the chain).
  const float e01 = e[0] + e[1], e23 = e[2] + e[3], e45 = e[4] + e[5], e67 = e[6] + e[7];
  const float c[8] = {e[0], e01, e01 + e[2], e01 + e23, (e01 + e23) + e[4], (e01 + e23) + e45,
                      ((e01 + e23) + e45) + e[6], (e01 + e23) + (e45 + e67)};
  Partial g{m, c[7], -INFINITY, -INFINITY, 0x7fffffff};
  if constexpr (kSampled) {
    g.key = group_key(m, c[7], noise.race);
    const float t = word_uniform(noise.pick) * c[7];  // < c[7]: u < 1 rounds below it
    int j = 7;
    float xj = x[7];
#pragma unroll
    for (int i = 6; i >= 0; --i)  // c is non-decreasing: the last i passing is the first above t
      if (c[i] > t) j = i, xj = x[i];
    g.x = xj;
    g.idx = v + j;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (x[i] > g.key) {  // ascending i: strict > keeps the lowest index on ties
        g.key = x[i];
        g.x = x[i];
        g.idx = v + i;
      }
    }
  }
  p = combine(p, g);
}

// The same for a group spread over eight lanes of a warp: the lanes sharing lane & 3, entry
// j = (lane >> 2) & 7 of group v >> 3 (v = this lane's vocab id; x = -inf where there is no entry).
// Every lane of the warp calls (lanes may differ in `sampled`: their requests do); the group's
// result goes into the partial of its j = 0 lane. The scan's c[7] adds in visit8's pairs.
__device__ __forceinline__ void visit_lane_group(Partial& p, float x, int v, bool sampled, GroupNoise noise) {
  const int lane = threadIdx.x % 32, j = (lane >> 2) & 7;
  float m = x;
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  float c = x == -INFINITY ? 0.f : exp_ftz(x - m);
#pragma unroll
  for (int d = 1; d < 8; d <<= 1) {
    const float below = __shfl_up_sync(0xffffffffu, c, 4 * d);
    if (j >= d) c += below;
  }
  const float s = __shfl_sync(0xffffffffu, c, (lane & 3) | 28);
  // Sampled: the first entry whose prefix sum passes v_g·s; greedy: the first at the max.
  const bool taken = sampled ? c > word_uniform(noise.pick) * s : x == m;
  const unsigned group_taken = __ballot_sync(0xffffffffu, taken) & (0x11111111u << (lane & 3));
  const int first = group_taken ? __ffs(group_taken) - 1 : lane;
  const float x_first = __shfl_sync(0xffffffffu, x, first);
  Partial g{m, s, -INFINITY, -INFINITY, 0x7fffffff};
  if (group_taken && s > 0.f) {  // s == 0: a group without entries
    g.key = sampled ? group_key(m, s, noise.race) : m;
    g.x = x_first;
    g.idx = (v & ~7) + ((first >> 2) & 7);
  }
  if (j == 0) p = combine(p, g);
}

}  // namespace dspark
