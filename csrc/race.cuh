// The split pass's per-entry work, shared by the chain's kernels (markov.cu, fused_step.cu): a
// partial (online max / sum-exp and the best race key) and how entries enter and partials merge.
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
__device__ __forceinline__ Partial shfl_xor_partial(const Partial& p, int off) {
  return {__shfl_xor_sync(0xffffffffu, p.max, off), __shfl_xor_sync(0xffffffffu, p.sum, off),
          __shfl_xor_sync(0xffffffffu, p.key, off), __shfl_xor_sync(0xffffffffu, p.x, off),
          __shfl_xor_sync(0xffffffffu, p.idx, off)};
}

// Combines the partials of lanes that differ in lane bits >= log2(lowest); lane 0 gets the result
// (and every lane with lowest == 1).
__device__ __forceinline__ Partial warp_combine(Partial p, int lowest = 1) {
#pragma unroll
  for (int off = 16; off >= lowest; off >>= 1) p = combine(p, shfl_xor_partial(p, off));
  return p;
}

__device__ __forceinline__ Partial empty_partial() { return {-INFINITY, 0.f, -INFINITY, -INFINITY, 0x7fffffff}; }

// One vocab entry of one request's step: online max / sum-exp and the race key. `word` is the
// entry's Philox output (unused for greedy rows).
__device__ __forceinline__ void visit_entry(Partial& p, float x, int v, bool greedy, uint32_t word) {
  if (x > p.max) {
    p.sum = p.sum * __expf(p.max - x) + 1.f;
    p.max = x;
  } else {
    p.sum += __expf(x - p.max);
  }
  // argmax_v q_v / E_v == argmax_v x_v - log E_v (softmax is monotone in x); u < 1 always, so E > 0.
  const float key = greedy ? x : x - logf(-logf(word_uniform(word)));
  if (better(key, v, p.key, p.idx)) {
    p.key = key;
    p.x = x;
    p.idx = v;
  }
}

// Eight consecutive vocab entries v .. v+7 at once: independent exps, logs and noise (short
// dependency chains), then one merge into the running partial. The outer log of the race key is
// __logf (3 ulp; the key is compared, never exponentiated); -log u keeps logf's accuracy near u = 1.
// Sampled rows skip an entry's logarithms when it cannot beat `reached`, a key already reached in
// the row: it can only if E_i < exp(x_i - reached) = e_i·exp(m - reached), and E_i >= 1 - u_i =
// (2 - 2^-24) - f_i (word_one_plus), so only if f_i + e_i·t > 2 - 2^-24, with t = exp(m - reached)
// ·1.001 (loosened far beyond the approximate exps' error). An entry with fl(f_i + e_i·t) < 2
// fails that, since below 2 the fma rounds by at most 2^-24, and is dropped. Entries that cannot
// win the row are all it drops, each on its own (logs run only where a lane's entry passes).
template <bool kSampled>
__device__ __forceinline__ void visit8(Partial& p, const float x[8], int v, const uint4 words[2], float reached) {
  float m = x[0];
#pragma unroll
  for (int i = 1; i < 8; ++i) m = fmaxf(m, x[i]);
  float e[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = exp_ftz(x[i] - m);
  Partial c{m, ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7])), -INFINITY, -INFINITY, 0x7fffffff};
  if constexpr (kSampled) {
    const float t = exp_ftz(m - reached) * 1.001f;  // inf while reached = -inf: every entry passes
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t w = word_at(words[i / 4], i % 4);
      if (!(fmaf(e[i], t, word_one_plus(w)) < 2.f)) {  // NaN passes
        const float key = x[i] - __logf(-logf(word_uniform(w)));
        if (key > c.key) {  // ascending i: strict > keeps the lowest index on ties
          c.key = key;
          c.x = x[i];
          c.idx = v + i;
        }
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (x[i] > c.key) {
        c.key = x[i];
        c.x = x[i];
        c.idx = v + i;
      }
    }
  }
  p = combine(p, c);
}

// The race key of the largest x of eight (the lowest index on ties), as a partial with no sum: a key
// really reached in the row, so that a slice's first round has one to screen against and runs
// one logarithm per lane instead of eight. visit8 recomputes it bit for bit if the entry passes.
__device__ __forceinline__ Partial pilot8(const float x[8], int v, const uint4 words[2]) {
  int j = 0;
  float xj = x[0];
  uint32_t wj = words[0].x;
#pragma unroll
  for (int i = 1; i < 8; ++i)
    if (x[i] > xj) j = i, xj = x[i], wj = word_at(words[i / 4], i % 4);
  return {-INFINITY, 0.f, xj - __logf(-logf(word_uniform(wj))), xj, v + j};
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
