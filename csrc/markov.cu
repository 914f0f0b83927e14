// Markov-chain drafting on the GPU (docs/kernels.md): all γ steps from one host call, no host sync.
//
// Tensor-core path (W1/W2 bf16 or fp16, rank 256 — the released DSpark head — and R >= 64), per step k:
//   1. fused_step_kernel, one CTA per 128-row tile of W2 (read from HBM once per step, whatever R):
//      for each tile of 64 requests, bias = W1[x_{k-1}] · W2ᵀ on the tensor cores (WMMA, fp32
//      accumulate) into shared memory, then x = (U_k + bias) / T, online max / sum-exp and the
//      exponential race key x - log E_v (Philox noise, four vocab ids per call) or x (greedy);
//      one partial per (request, tile). The fp32 bias never goes through HBM.
//   2. reduce_kernel, one block per request: token, q_k(x_k), row max / sum-exp, W1[x_k] for k+1.
//   3. (return_q only) q rows = exp(x - max) / sum over the logits step 1 stored.
// Other dtypes and ranks: step 1 is a cuBLAS GEMM into an fp32 [R, V] scratch plus a split-V pass.
// Which path runs: tensor_core_path() below (R >= 64 by default; DSPARK_MARKOV_GEMM overrides).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "philox.cuh"

namespace dspark {
namespace {

constexpr int kThreads = 256;
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

// ---------------------------------------------------------------------------------------------
// cuBLAS path, step 1b: grid (splits, R), the slice [start, end) of request r's row.
template <typename UT, bool kVec>
__global__ void split_pass_kernel(const UT* __restrict__ U, const float* __restrict__ bias,
                                  const float* __restrict__ temperature, const int64_t* __restrict__ seeds,
                                  Partial* __restrict__ partials, int k, int gamma, int V, int slice) {
  const int r = blockIdx.y;
  const int start = blockIdx.x * slice;
  const int end = min(V, start + slice);
  const float T = temperature[r];
  const bool greedy = T < kGreedyBelow;
  const float scale = greedy ? 1.f : T;
  const int64_t seed = seeds[r];
  const UT* u_row = U + (static_cast<int64_t>(r) * gamma + k) * V;
  const float* b_row = bias + static_cast<int64_t>(r) * V;

  Partial p = empty_partial();
  if (kVec) {  // 8 entries per thread: 16-byte loads, two Philox calls (start, end, V % 8 == 0)
    for (int v = start + 8 * threadIdx.x; v < end; v += 8 * blockDim.x) {
      float u[8], b[8];
      load8(u_row + v, u);
      load8(b_row + v, b);
      uint4 w[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
      if (!greedy) {
        w[0] = counter_words(seed, kStreamDraft, k, v >> 2);
        w[1] = counter_words(seed, kStreamDraft, k, (v >> 2) + 1);
      }
      float x[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] = (u[i] + b[i]) / scale;
      visit8(p, x, v, greedy, w);
    }
  } else {
    for (int v = start + threadIdx.x; v < end; v += blockDim.x) {
      const uint32_t word = greedy ? 0u : word_at(counter_words(seed, kStreamDraft, k, v >> 2), v & 3);
      visit_entry(p, (to_float(u_row[v]) + b_row[v]) / scale, v, greedy, word);
    }
  }
  p = block_combine(p);
  if (threadIdx.x == 0) partials[static_cast<int64_t>(r) * gridDim.x + blockIdx.x] = p;
}

// cuBLAS path, step 3: q rows, grid (splits, R).
template <typename UT>
__global__ void q_rows_kernel(const UT* __restrict__ U, const float* __restrict__ bias,
                              const float* __restrict__ temperature, const float* __restrict__ row_stats,
                              const int64_t* __restrict__ tokens, float* __restrict__ q, int k, int gamma, int V,
                              int slice) {
  const int r = blockIdx.y;
  const int start = blockIdx.x * slice;
  const int end = min(V, start + slice);
  const float T = temperature[r];
  const bool greedy = T < kGreedyBelow;
  const float m = row_stats[2 * r], s = row_stats[2 * r + 1];
  const int64_t tok = tokens[static_cast<int64_t>(r) * gamma + k];
  const UT* u_row = U + (static_cast<int64_t>(r) * gamma + k) * V;
  const float* b_row = bias + static_cast<int64_t>(r) * V;
  float* q_row = q + (static_cast<int64_t>(r) * gamma + k) * V;
  for (int v = start + threadIdx.x; v < end; v += blockDim.x) {
    q_row[v] = greedy ? (v == tok ? 1.f : 0.f) : expf((to_float(u_row[v]) + b_row[v]) / T - m) / s;
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core path.
constexpr int kTileV = 128;                        // W2 rows per CTA: 8 warps × 16 columns of the bias tile
constexpr int kTileR = 64;                         // requests per pass over the W2 tile (4 WMMA row fragments)
constexpr int kTcRank = 256;                       // the Markov rank this path is specialised to
constexpr int kLdW = kTcRank + 8;                  // shared row pitch in elements (bank spread; WMMA needs % 8)
constexpr int kLdC = kTileV + 4;                   // fp32 bias tile pitch
constexpr int kChunks = kTcRank / 8;               // 16-byte chunks per row
constexpr int kWTileBytes = kTileV * kLdW * 2;
constexpr int kHTileBytes = kTileR * kLdW * 2;     // H = W1[x] rows, later reused for the fp32 bias tile
constexpr int kTcSmem = kWTileBytes + kHTileBytes;  // 99 KB: two CTAs per SM
static_assert(kTileR * kLdC * 4 <= kHTileBytes, "the bias tile must fit where the H tile was");
static_assert(kTileR * 4 == kThreads && kTileV == 4 * 32, "epilogue: four threads per row, 32 columns each");

// 16-byte global -> shared copies that bypass registers (sm_80+; a plain copy before that).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#endif
}

// W2 rows v0 .. v0+127 into shared memory (zeros past V), asynchronously: wait with cp_async_wait_all.
template <typename WT>
__device__ __forceinline__ void load_w2_tile(WT* w_tile, const WT* __restrict__ w2, int v0, int V) {
  for (int i = threadIdx.x; i < kTileV * kChunks; i += kThreads) {
    const int row = i / kChunks, chunk = i % kChunks;
    WT* dst = w_tile + row * kLdW + chunk * 8;
    if (v0 + row < V) cp_async16(dst, w2 + static_cast<int64_t>(v0 + row) * kTcRank + chunk * 8);
    else *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }
}

// H rows r0 .. r0+rows-1 (rows ld_h elements apart), zeros up to the next multiple of 16.
template <typename WT>
__device__ __forceinline__ void load_h_tile(WT* h_tile, const WT* __restrict__ h, int64_t ld_h, int r0, int rows) {
  const int padded = (rows + 15) / 16 * 16;
  for (int i = threadIdx.x; i < padded * kChunks; i += kThreads) {
    const int row = i / kChunks, chunk = i % kChunks;
    WT* dst = h_tile + row * kLdW + chunk * 8;
    if (row < rows) cp_async16(dst, h + static_cast<int64_t>(r0 + row) * ld_h + chunk * 8);
    else *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }
}

// c_tile[rr][col] = Σ_j H[rr][j] · W2[v0 + col][j] for rr < rows, fp32 accumulation in a fixed
// order. c_tile aliases h_tile. Both the chain and the rejection kernel's rebuilt q row use this,
// so a rebuilt row is bit-identical to the one the chain sampled from.
template <typename WT>
__device__ __forceinline__ void tile_bias(const WT* w_tile, const WT* h_tile, float* c_tile, int rows) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32;
  const int frags = (rows + 15) / 16;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTileR / 16];
#pragma unroll
  for (int i = 0; i < kTileR / 16; ++i) wmma::fill_fragment(acc[i], 0.f);
#pragma unroll 4
  for (int kk = 0; kk < kTcRank / 16; ++kk) {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> b;  // B[j][v] = W2[v][j]
    wmma::load_matrix_sync(b, w_tile + warp * 16 * kLdW + kk * 16, kLdW);
#pragma unroll
    for (int i = 0; i < kTileR / 16; ++i) {
      if (i < frags) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> a;
        wmma::load_matrix_sync(a, h_tile + i * 16 * kLdW + kk * 16, kLdW);
        wmma::mma_sync(acc[i], a, b, acc[i]);
      }
    }
  }
  __syncthreads();  // every warp is done with h_tile before the bias tile overwrites it
#pragma unroll
  for (int i = 0; i < kTileR / 16; ++i) {
    if (i < frags) wmma::store_matrix_sync(c_tile + i * 16 * kLdC + warp * 16, acc[i], kLdC, wmma::mem_row_major);
  }
  __syncthreads();
}

// Step 1, grid (V tiles). Partials [R, V tiles]; logits_out (return_q) gets x for step 3.
template <typename WT, typename UT, bool kVec>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(
    const WT* __restrict__ w2, const WT* __restrict__ emb, int64_t ld_emb, const UT* __restrict__ U,
    const float* __restrict__ temperature, const int64_t* __restrict__ seeds, float* __restrict__ logits_out,
    Partial* __restrict__ partials, int R, int k, int gamma, int V) {
  extern __shared__ __align__(128) unsigned char smem[];
  WT* w_tile = reinterpret_cast<WT*>(smem);
  WT* h_tile = reinterpret_cast<WT*>(smem + kWTileBytes);
  float* c_tile = reinterpret_cast<float*>(smem + kWTileBytes);
  const int v0 = blockIdx.x * kTileV;
  load_w2_tile(w_tile, w2, v0, V);
  for (int r0 = 0; r0 < R; r0 += kTileR) {
    const int rows = min(kTileR, R - r0);
    load_h_tile(h_tile, emb, ld_emb, r0, rows);
    cp_async_wait_all();
    __syncthreads();
    tile_bias(w_tile, h_tile, c_tile, rows);

    // Epilogue: four threads per request row; thread t takes vocab columns 8·(t % 4) + 32·g + 0..7
    // for g = 0..3 (bank-conflict-free float4 reads of the bias tile, 16-byte U loads, two Philox
    // calls per group), then the four threads (adjacent lanes) combine their partials.
    const int rr = threadIdx.x / 4;
    Partial p = empty_partial();
    if (rr < rows) {
      const int r = r0 + rr;
      const float T = temperature[r];
      const bool greedy = T < kGreedyBelow;
      const float scale = greedy ? 1.f : T;
      const int64_t seed = seeds[r];
      const int64_t row_off = (static_cast<int64_t>(r) * gamma + k) * V;
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        const int col = 8 * (threadIdx.x % 4) + 32 * g, v = v0 + col;
        const float* c = c_tile + rr * kLdC + col;
        if (kVec && v < V) {  // V % 8 == 0: all eight in range
          float u[8], x[8];
          load8(U + row_off + v, u);
          const float4 c0 = *reinterpret_cast<const float4*>(c), c1 = *reinterpret_cast<const float4*>(c + 4);
          const float b[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
#pragma unroll
          for (int i = 0; i < 8; ++i) x[i] = (u[i] + b[i]) / scale;
          if (logits_out != nullptr) {
            reinterpret_cast<float4*>(logits_out + row_off + v)[0] = make_float4(x[0], x[1], x[2], x[3]);
            reinterpret_cast<float4*>(logits_out + row_off + v)[1] = make_float4(x[4], x[5], x[6], x[7]);
          }
          uint4 w[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
          if (!greedy) {
            w[0] = counter_words(seed, kStreamDraft, k, v >> 2);
            w[1] = counter_words(seed, kStreamDraft, k, (v >> 2) + 1);
          }
          visit8(p, x, v, greedy, w);
        } else {
          for (int i = 0; i < 8 && v + i < V; ++i) {
            const float x = (to_float(U[row_off + v + i]) + c[i]) / scale;
            if (logits_out != nullptr) logits_out[row_off + v + i] = x;
            const uint32_t word = greedy ? 0u : word_at(counter_words(seed, kStreamDraft, k, (v + i) >> 2), (v + i) & 3);
            visit_entry(p, x, v + i, greedy, word);
          }
        }
      }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {  // every lane takes part; idle rows carry empty partials
      Partial o;
      o.max = __shfl_xor_sync(0xffffffffu, p.max, off);
      o.sum = __shfl_xor_sync(0xffffffffu, p.sum, off);
      o.key = __shfl_xor_sync(0xffffffffu, p.key, off);
      o.x = __shfl_xor_sync(0xffffffffu, p.x, off);
      o.idx = __shfl_xor_sync(0xffffffffu, p.idx, off);
      p = combine(p, o);
    }
    if (rr < rows && threadIdx.x % 4 == 0) partials[static_cast<int64_t>(r0 + rr) * gridDim.x + blockIdx.x] = p;
    __syncthreads();  // the bias tile is read before the next request tile's H overwrites it
  }
}

// bias[R, V] = H · W2ᵀ through tile_bias (what the rejection kernel rebuilds a q row with).
template <typename WT>
__global__ void __launch_bounds__(kThreads) tile_bias_kernel(const WT* __restrict__ w2, const WT* __restrict__ h,
                                                             int64_t ld_h, int R, int V, float* __restrict__ bias) {
  extern __shared__ __align__(128) unsigned char smem[];
  WT* w_tile = reinterpret_cast<WT*>(smem);
  WT* h_tile = reinterpret_cast<WT*>(smem + kWTileBytes);
  float* c_tile = reinterpret_cast<float*>(smem + kWTileBytes);
  const int v0 = blockIdx.x * kTileV;
  load_w2_tile(w_tile, w2, v0, V);
  for (int r0 = 0; r0 < R; r0 += kTileR) {
    const int rows = min(kTileR, R - r0);
    load_h_tile(h_tile, h, ld_h, r0, rows);
    cp_async_wait_all();
    __syncthreads();
    tile_bias(w_tile, h_tile, c_tile, rows);
    for (int i = threadIdx.x; i < rows * kTileV; i += kThreads) {
      const int rr = i / kTileV, col = i % kTileV;
      if (v0 + col < V) bias[static_cast<int64_t>(r0 + rr) * V + v0 + col] = c_tile[rr * kLdC + col];
    }
    __syncthreads();
  }
}

// Tensor-core step 3: q = exp(x - max) / sum in place over the logits step 1 stored.
__global__ void q_normalize_kernel(float* __restrict__ q, const float* __restrict__ temperature,
                                   const float* __restrict__ row_stats, const int64_t* __restrict__ tokens, int k,
                                   int gamma, int V, int slice) {
  const int r = blockIdx.y;
  const int start = blockIdx.x * slice, end = min(V, start + slice);
  const bool greedy = temperature[r] < kGreedyBelow;
  const float m = row_stats[2 * r], s = row_stats[2 * r + 1];
  const int64_t tok = tokens[static_cast<int64_t>(r) * gamma + k];
  float* q_row = q + (static_cast<int64_t>(r) * gamma + k) * V;
  for (int v = start + threadIdx.x; v < end; v += blockDim.x) {
    q_row[v] = greedy ? (v == tok ? 1.f : 0.f) : expf(q_row[v] - m) / s;
  }
}

// ---------------------------------------------------------------------------------------------
// Step 2 (both paths): one block per request over its `splits` partials.
template <typename WT>
__global__ void reduce_kernel(const Partial* __restrict__ partials, int splits, const float* __restrict__ temperature,
                              const WT* __restrict__ w1, int rank, int64_t* __restrict__ tokens,
                              float* __restrict__ q_token, float* __restrict__ row_stats, WT* __restrict__ prev_emb,
                              int k, int gamma) {
  const int r = blockIdx.x;
  __shared__ int token_s;
  Partial p = empty_partial();
  for (int i = threadIdx.x; i < splits; i += blockDim.x) p = combine(p, partials[static_cast<int64_t>(r) * splits + i]);
  p = block_combine(p);
  if (threadIdx.x == 0) {
    const bool greedy = temperature[r] < kGreedyBelow;
    tokens[static_cast<int64_t>(r) * gamma + k] = p.idx;
    q_token[static_cast<int64_t>(r) * gamma + k] = greedy ? 1.f : expf(p.x - p.max) / p.sum;
    row_stats[2 * r] = p.max;
    row_stats[2 * r + 1] = p.sum;
    token_s = p.idx;
  }
  __syncthreads();
  if (k + 1 < gamma) {  // W1[x_k] feeds step k+1's bias and the confidence head
    const WT* src = w1 + static_cast<int64_t>(token_s) * rank;
    WT* dst = prev_emb + (static_cast<int64_t>(r) * gamma + k + 1) * rank;
    for (int j = threadIdx.x; j < rank; j += blockDim.x) dst[j] = src[j];
  }
}

template <typename WT, typename IT>
__global__ void gather_anchor_kernel(const WT* __restrict__ w1, const IT* __restrict__ anchors, int rank, int gamma,
                                     WT* __restrict__ prev_emb) {
  const int r = blockIdx.x;
  const WT* src = w1 + static_cast<int64_t>(anchors[r]) * rank;
  WT* dst = prev_emb + static_cast<int64_t>(r) * gamma * rank;
  for (int j = threadIdx.x; j < rank; j += blockDim.x) dst[j] = src[j];
}

cudaDataType_t cublas_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The tensor-core path: bf16/fp16 weights of rank 256 on 16-byte boundaries, and enough requests
// that the cuBLAS path's fp32 bias round trip (R·V·4 bytes written and read per step) outweighs
// cuBLAS's better W2 streaming (GEMV-like below that; bench/RESULTS.md has both paths).
// DSPARK_MARKOV_GEMM=cublas / tensor-cores overrides the request-count rule (never the others).
constexpr int kTcMinRequests = 64;

bool tensor_core_path(const at::Tensor& w2, const void* h, int64_t ldh, int R) {
  const bool eligible = (w2.scalar_type() == at::kBFloat16 || w2.scalar_type() == at::kHalf) &&
                        w2.size(1) == kTcRank && aligned16(w2.data_ptr()) && aligned16(h) && ldh % 8 == 0;
  const char* env = std::getenv("DSPARK_MARKOV_GEMM");
  if (env != nullptr && std::strcmp(env, "cublas") == 0) return false;
  if (env != nullptr && std::strcmp(env, "tensor-cores") == 0) return eligible;
  return eligible && R >= kTcMinRequests;
}

// cudaFuncSetAttribute once per kernel and device (a host call, kept out of CUDA-graph capture
// by the eager first call every engine makes).
template <auto Kernel>
void allow_tc_smem() {
  static std::atomic<uint64_t> done_devices{0};
  const uint64_t bit = uint64_t{1} << (c10::cuda::current_device() % 64);
  if (done_devices.load() & bit) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kTcSmem));
  done_devices.fetch_or(bit);
}

template <typename T>
using device_t = std::conditional_t<std::is_same_v<T, at::BFloat16>, __nv_bfloat16,
                                    std::conditional_t<std::is_same_v<T, at::Half>, __half, T>>;

int choose_splits(int R, int V) {
  // Enough blocks to fill 132 SMs several times over, slices of at least 1024 vocab entries.
  const int want = (4 * 132 + R - 1) / R;
  const int most = (V + 1023) / 1024;
  return std::max(1, std::min(want, most));
}

}  // namespace

// bias[R, V] = H[R, r] · W2[V, r]ᵀ, H rows ldh elements apart (prev_emb[:, k]): the GEMM the
// chain samples with (tensor-core tiles or cuBLAS, by the same rule), also used by rejection.cu
// to rebuild a q row bit-identical to the chain's.
void bias_gemm(const at::Tensor& w2, const void* h, int64_t ldh, int R, at::Tensor& bias) {
  const int V = w2.size(0), rank = w2.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (tensor_core_path(w2, h, ldh, R)) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(w2.scalar_type(), "dspark_tile_bias", [&] {
      using WT = device_t<scalar_t>;
      allow_tc_smem<tile_bias_kernel<WT>>();
      tile_bias_kernel<WT><<<(V + kTileV - 1) / kTileV, kThreads, kTcSmem, stream>>>(
          reinterpret_cast<const WT*>(w2.data_ptr()), reinterpret_cast<const WT*>(h), ldh, R, V,
          bias.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
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
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> markov_chain_cuda(
    const at::Tensor& U, const at::Tensor& anchors, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& temperature, const at::Tensor& seeds, bool return_q) {
  TORCH_CHECK(U.is_cuda() && U.dim() == 3 && U.is_contiguous(), "dspark::markov_chain: U must be contiguous CUDA [R, γ, V]");
  TORCH_CHECK(w1.scalar_type() == w2.scalar_type() && w1.is_contiguous() && w2.is_contiguous(),
              "dspark::markov_chain: w1 and w2 must be contiguous with one dtype");
  TORCH_CHECK(temperature.scalar_type() == at::kFloat && seeds.scalar_type() == at::kLong,
              "dspark::markov_chain: temperature must be fp32 and seeds int64");
  const c10::cuda::CUDAGuard guard(U.device());
  const int R = U.size(0), gamma = U.size(1), V = U.size(2), rank = w1.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto f32 = U.options().dtype(at::kFloat);

  auto tokens = at::empty({R, gamma}, U.options().dtype(at::kLong));
  auto q_token = at::empty({R, gamma}, f32);
  auto q = return_q ? at::empty({R, gamma, V}, f32) : at::empty({0}, f32);
  auto prev_emb = at::empty({R, gamma, rank}, w1.options());
  const int splits = choose_splits(R, V);
  const int slice = ((V + splits - 1) / splits + 7) / 8 * 8;  // a multiple of 8 for the vector path
  auto row_stats = at::empty({R, 2}, f32);
  const int64_t ld_emb = static_cast<int64_t>(gamma) * rank;
  const bool tensor_cores = tensor_core_path(w2, prev_emb.data_ptr(), ld_emb, R);
  const int parts_per_row = tensor_cores ? (V + kTileV - 1) / kTileV : splits;
  auto partials = at::empty({static_cast<int64_t>(R) * parts_per_row * static_cast<int64_t>(sizeof(Partial))},
                            U.options().dtype(at::kByte));
  auto* parts = reinterpret_cast<Partial*>(partials.data_ptr<uint8_t>());
  const dim3 grid(splits, R);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w1.scalar_type(), "dspark_markov_w", [&] {
    using WT = device_t<scalar_t>;
    const WT* w1p = reinterpret_cast<const WT*>(w1.data_ptr());
    const WT* w2p = reinterpret_cast<const WT*>(w2.data_ptr());
    WT* embp = reinterpret_cast<WT*>(prev_emb.data_ptr());
    if (anchors.scalar_type() == at::kLong)
      gather_anchor_kernel<<<R, 256, 0, stream>>>(w1p, anchors.data_ptr<int64_t>(), rank, gamma, embp);
    else
      gather_anchor_kernel<<<R, 256, 0, stream>>>(w1p, anchors.data_ptr<int32_t>(), rank, gamma, embp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, U.scalar_type(), "dspark_markov_u", [&] {
      using UT = device_t<scalar_t>;
      const UT* up = reinterpret_cast<const UT*>(U.data_ptr());
      const float* tp = temperature.data_ptr<float>();
      const int64_t* sp = seeds.data_ptr<int64_t>();
      auto bias = tensor_cores ? at::empty({0}, f32) : at::empty({R, V}, f32);
      for (int k = 0; k < gamma; ++k) {
        const WT* emb_k = embp + static_cast<int64_t>(k) * rank;
        if (tensor_cores) {
          if constexpr (std::is_same_v<WT, __nv_bfloat16> || std::is_same_v<WT, __half>) {
            const bool vec = V % 8 == 0 && aligned16(up);
            if (vec) allow_tc_smem<fused_step_kernel<WT, UT, true>>();
            else allow_tc_smem<fused_step_kernel<WT, UT, false>>();
            auto kernel = vec ? fused_step_kernel<WT, UT, true> : fused_step_kernel<WT, UT, false>;
            kernel<<<parts_per_row, kThreads, kTcSmem, stream>>>(w2p, emb_k, ld_emb, up, tp, sp,
                                                                 return_q ? q.data_ptr<float>() : nullptr, parts, R,
                                                                 k, gamma, V);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        } else {
          bias_gemm(w2, emb_k, ld_emb, R, bias);
          if (V % 8 == 0)
            split_pass_kernel<UT, true><<<grid, kThreads, 0, stream>>>(up, bias.data_ptr<float>(), tp, sp, parts, k,
                                                                      gamma, V, slice);
          else
            split_pass_kernel<UT, false><<<grid, kThreads, 0, stream>>>(up, bias.data_ptr<float>(), tp, sp, parts, k,
                                                                       gamma, V, slice);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        reduce_kernel<WT><<<R, kThreads, 0, stream>>>(parts, parts_per_row, tp, w1p, rank, tokens.data_ptr<int64_t>(),
                                                      q_token.data_ptr<float>(), row_stats.data_ptr<float>(), embp, k,
                                                      gamma);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (return_q && tensor_cores) {
          q_normalize_kernel<<<grid, kThreads, 0, stream>>>(q.data_ptr<float>(), tp, row_stats.data_ptr<float>(),
                                                            tokens.data_ptr<int64_t>(), k, gamma, V, slice);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else if (return_q) {
          q_rows_kernel<UT><<<grid, kThreads, 0, stream>>>(up, bias.data_ptr<float>(), tp, row_stats.data_ptr<float>(),
                                                           tokens.data_ptr<int64_t>(), q.data_ptr<float>(), k, gamma,
                                                           V, slice);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  });
  return {tokens, q_token, q, prev_emb};
}

}  // namespace dspark
