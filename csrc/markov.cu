// Markov-chain drafting on the GPU (docs/kernels.md): all γ steps from one host call, no host sync.
//
// Per step k:
//   1. bias = W1[x_{k-1}] · W2ᵀ           cuBLAS GEMM (bf16/fp16/fp32 in, fp32 out; W2 read once
//                                          for all R requests), written to an fp32 scratch [R, V]
//   2. split-V pass: x = (U_k + bias) / T, online max / sum-exp, exponential race key x - log E_v
//      (Philox noise, four vocab ids per call) or x (greedy), one partial per (request, slice)
//   3. per-request reduction of the partials: token, q_k(x_k), row max and log-sum-exp, and the
//      W1 gather of the new token for step k+1 (prev_emb)
//   4. (return_q only) q_k rows = exp(x - max) / sum
// Three fused variants measured slower than this on the H200 (bench/RESULTS.md): a tensor-core step
// keeping the bias tile in shared memory, one W2 tile per CTA (branch wip/tensor-core-markov-step)
// or pipelined through persistent CTAs (wip/pipelined-tc-markov-step), and a GEMV step for R <= 4
// (wip/gemv-markov-step).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

// Step 2: grid (splits, R), the slice [start, end) of request r's row.
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

// Step 3: one block per request merges its partials: token, q_k(x_k), row stats, W1[x_k] for k+1.
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

// Step 4: q rows, grid (splits, R).
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

template <typename T>
using device_t = std::conditional_t<std::is_same_v<T, at::BFloat16>, __nv_bfloat16,
                                    std::conditional_t<std::is_same_v<T, at::Half>, __half, T>>;

int choose_splits(int R, int V) {
  // About 4 blocks per SM, slices of at least 1024 vocab entries (measured on the H200: 16 per SM,
  // or finishing each request in its last block instead of a reduce launch, were both slower).
  const int want = (4 * 132 + R - 1) / R;
  const int most = (V + 1023) / 1024;
  return std::max(1, std::min(want, most));
}

}  // namespace

// bias[R, V] = H[R, r] · W2[V, r]ᵀ, H rows strided by ldh elements (prev_emb[:, k]); also used by
// rejection.cu to rebuild a q row with the very GEMM the chain sampled from.
void bias_gemm(const at::Tensor& w2, const void* h, int64_t ldh, int R, at::Tensor& bias) {
  const int V = w2.size(0), rank = w2.size(1);
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
  auto bias = at::empty({R, V}, f32);
  const int splits = choose_splits(R, V);
  const int slice = ((V + splits - 1) / splits + 7) / 8 * 8;  // a multiple of 8 for the vector path
  auto partials = at::empty({static_cast<int64_t>(R) * splits * static_cast<int64_t>(sizeof(Partial))},
                            U.options().dtype(at::kByte));
  auto row_stats = at::empty({R, 2}, f32);
  auto* parts = reinterpret_cast<Partial*>(partials.data_ptr<uint8_t>());
  const int64_t ld_emb = static_cast<int64_t>(gamma) * rank;
  const dim3 grid(splits, R);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w1.scalar_type(), "dspark_markov_w", [&] {
    using WT = device_t<scalar_t>;
    const WT* w1p = reinterpret_cast<const WT*>(w1.data_ptr());
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
      for (int k = 0; k < gamma; ++k) {
        bias_gemm(w2, embp + static_cast<int64_t>(k) * rank, ld_emb, R, bias);
        auto pass = V % 8 == 0 ? split_pass_kernel<UT, true> : split_pass_kernel<UT, false>;
        pass<<<grid, kThreads, 0, stream>>>(up, bias.data_ptr<float>(), tp, seeds.data_ptr<int64_t>(), parts, k, gamma,
                                            V, slice);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        reduce_kernel<WT><<<R, kThreads, 0, stream>>>(parts, splits, tp, w1p, rank, tokens.data_ptr<int64_t>(),
                                                      q_token.data_ptr<float>(), row_stats.data_ptr<float>(), embp, k,
                                                      gamma);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (return_q) {
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
