// Device helpers shared by the Markov-chain kernels (markov.cu, markov_tc.cu): the per-slice
// partial (online max / sum-exp and the exponential-race winner), its merges, and the visits that
// fold vocab entries into it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "philox.cuh"

namespace dspark {
namespace {

constexpr int kThreads = 256;  // block size of the split, reduce and q-row kernels
constexpr float kGreedyBelow = 1e-5f;  // sampling.GREEDY_BELOW
constexpr int kStreamDraft = 0;        // rng.STREAM_DRAFT

struct Partial {
  float max;   // running max of x over the slice
  float sum;   // sum of exp(x - max)
  float key;   // best race key
  float x;     // x at the best key
  int idx;     // vocab id of the best key
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

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

__device__ __forceinline__ Partial warp_combine(Partial p) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Partial o;
    o.max = __shfl_xor_sync(0xffffffffu, p.max, off);
    o.sum = __shfl_xor_sync(0xffffffffu, p.sum, off);
    o.key = __shfl_xor_sync(0xffffffffu, p.key, off);
    o.x = __shfl_xor_sync(0xffffffffu, p.x, off);
    o.idx = __shfl_xor_sync(0xffffffffu, p.idx, off);
    p = combine(p, o);
  }
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
__device__ __forceinline__ void visit8(Partial& p, const float x[8], int v, bool greedy, const uint4 words[2]) {
  float m = x[0];
#pragma unroll
  for (int i = 1; i < 8; ++i) m = fmaxf(m, x[i]);
  float e[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = __expf(x[i] - m);
  Partial c{m, ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7])), -INFINITY, -INFINITY, 0x7fffffff};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float key = greedy ? x[i] : x[i] - __logf(-logf(word_uniform(word_at(words[i / 4], i % 4))));
    if (key > c.key) {  // ascending i: strict > keeps the lowest index on ties
      c.key = key;
      c.x = x[i];
      c.idx = v + i;
    }
  }
  p = combine(p, c);
}

// Block-wide combine; thread 0 gets the result.
__device__ __forceinline__ Partial block_combine(Partial p) {
  __shared__ Partial warp_partials[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  p = warp_combine(p);
  __syncthreads();  // warp_partials may still be read by an earlier call
  if (lane == 0) warp_partials[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < blockDim.x / 32 ? warp_partials[lane] : empty_partial();
    p = warp_combine(p);
  }
  return p;
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, float out[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(h[i]);
}

__device__ __forceinline__ void load8(const float* p, float out[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

}  // namespace
}  // namespace dspark
