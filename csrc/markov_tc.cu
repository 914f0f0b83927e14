// Tensor-core Markov step (docs/kernels.md) for bf16/fp16 heads of rank 256. One persistent CTA per
// SM walks 64-row tiles of W2 through a two-stage cp.async ring: while tile i+1 streams in, the
// tensor cores multiply tile i with the W1[x_{k-1}] rows of up to 128 requests (resident in shared
// memory, fp32 accumulate) and the epilogue runs the split pass on that bias tile in shared
// memory. W2 is read once per step, the fp32 bias never goes through HBM, and the W2 stream
// overlaps the math (the reason a one-tile-per-CTA version of this was slower than cuBLAS).
// markov.cu calls it per step, then its per-request reduce; rejection.cu rebuilds q rows with
// tc_bias, which runs the same tile_mma, so a rebuilt row is bit-identical to the chain's.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <mma.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "markov_common.cuh"

namespace dspark {
namespace {

constexpr int kTcThreads = 512;                      // 16 warps: 4 column groups × 4 row groups
constexpr int kTileV = 64;                           // W2 rows per tile
constexpr int kMaxRequests = 128;                    // requests per launch (more: one launch per 128)
constexpr int kRank = 256;
constexpr int kLdW = kRank + 8;                      // shared row pitch in elements (WMMA needs % 8)
constexpr int kLdC = kTileV + 4;                     // bias tile pitch: conflict-free float4 epilogue reads
constexpr int kChunks = kRank / 8;                   // 16-byte chunks per row
constexpr int kWTileBytes = kTileV * kLdW * 2;
constexpr int kHBytes = kMaxRequests * kLdW * 2;
constexpr int kCBytes = kMaxRequests * kLdC * 4;
constexpr int kSmem = 2 * kWTileBytes + kHBytes + kCBytes;  // 166 KB: one CTA per SM
static_assert(kMaxRequests * 4 == kTcThreads && kTileV == 2 * 32, "epilogue: 4 threads per row, 2 groups of 8");

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// W2 rows v0 .. v0+63 (zeros past V).
template <typename WT>
__device__ __forceinline__ void load_w2_tile(WT* w_s, const WT* __restrict__ w2, int v0, int V) {
  for (int i = threadIdx.x; i < kTileV * kChunks; i += kTcThreads) {
    const int row = i / kChunks, chunk = i % kChunks;
    WT* dst = w_s + row * kLdW + chunk * 8;
    if (v0 + row < V) cp_async16(dst, w2 + static_cast<int64_t>(v0 + row) * kRank + chunk * 8);
    else *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }
}

// H rows 0 .. R-1 (ld_h elements apart), zeros up to the next multiple of 16.
template <typename WT>
__device__ __forceinline__ void load_h(WT* h_s, const WT* __restrict__ h, int64_t ld_h, int R) {
  const int padded = (R + 15) / 16 * 16;
  for (int i = threadIdx.x; i < padded * kChunks; i += kTcThreads) {
    const int row = i / kChunks, chunk = i % kChunks;
    WT* dst = h_s + row * kLdW + chunk * 8;
    if (row < R) cp_async16(dst, h + static_cast<int64_t>(row) * ld_h + chunk * 8);
    else *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }
}

// c[rr][col] = Σ_j H[rr][j] · W2tile[col][j] for rr < R: warp w computes columns 16·(w % 4) .. +15
// of rows 32·(w / 4) .. +31 (two 16-row fragments, skipped past R), k in a fixed order.
template <typename WT>
__device__ __forceinline__ void tile_mma(const WT* w_s, const WT* h_s, float* c_s, int R) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32, col0 = 16 * (warp % 4), row0 = 32 * (warp / 4);
  if (row0 >= R) return;
  const bool second = row0 + 16 < R;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);
#pragma unroll 4
  for (int kk = 0; kk < kRank / 16; ++kk) {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> b;  // B[j][v] = W2[v][j]
    wmma::load_matrix_sync(b, w_s + col0 * kLdW + kk * 16, kLdW);
    wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> a;
    wmma::load_matrix_sync(a, h_s + row0 * kLdW + kk * 16, kLdW);
    wmma::mma_sync(acc[0], a, b, acc[0]);
    if (second) {
      wmma::load_matrix_sync(a, h_s + (row0 + 16) * kLdW + kk * 16, kLdW);
      wmma::mma_sync(acc[1], a, b, acc[1]);
    }
  }
  wmma::store_matrix_sync(c_s + row0 * kLdC + col0, acc[0], kLdC, wmma::mem_row_major);
  if (second) wmma::store_matrix_sync(c_s + (row0 + 16) * kLdC + col0, acc[1], kLdC, wmma::mem_row_major);
}

struct Smem {
  unsigned char* base;
  template <typename WT>
  __device__ WT* w(int stage) const { return reinterpret_cast<WT*>(base + stage * kWTileBytes); }
  template <typename WT>
  __device__ WT* h() const { return reinterpret_cast<WT*>(base + 2 * kWTileBytes); }
  __device__ float* c() const { return reinterpret_cast<float*>(base + 2 * kWTileBytes + kHBytes); }
};

// One step for requests 0 .. R-1 (R <= 128; pointers already offset to the chunk). Partials
// [R, ntiles]; logits_out (return_q) gets x for the q rows.
template <typename WT, typename UT, bool kVec>
__global__ void __launch_bounds__(kTcThreads, 1) tc_step_kernel(
    const WT* __restrict__ w2, const WT* __restrict__ emb, int64_t ld_emb, const UT* __restrict__ U,
    const float* __restrict__ temperature, const int64_t* __restrict__ seeds, float* __restrict__ logits_out,
    Partial* __restrict__ partials, int R, int k, int gamma, int V, int ntiles) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const Smem sm{smem_raw};
  int tile = blockIdx.x;
  load_h(sm.h<WT>(), emb, ld_emb, R);
  if (tile < ntiles) load_w2_tile(sm.w<WT>(0), w2, tile * kTileV, V);
  cp_async_commit();

  // Epilogue role: four threads per request row, columns 8·q4 + 32·g + 0..7 for g = 0, 1.
  const int rr = threadIdx.x / 4, q4 = threadIdx.x % 4;
  const bool active = rr < R;
  const float T = active ? temperature[rr] : 1.f;
  const bool greedy = T < kGreedyBelow;
  const float scale = greedy ? 1.f : T;
  const int64_t seed = active ? seeds[rr] : 0;
  const int64_t row_off = (static_cast<int64_t>(rr) * gamma + k) * V;

  for (int i = 0; tile < ntiles; ++i, tile += gridDim.x) {
    const int next = tile + gridDim.x;
    if (next < ntiles) load_w2_tile(sm.w<WT>((i + 1) & 1), w2, next * kTileV, V);
    cp_async_commit();
    cp_async_wait<1>();  // everything but the newest group: this tile (and H) has landed
    __syncthreads();
    tile_mma(sm.w<WT>(i & 1), sm.h<WT>(), sm.c(), R);
    __syncthreads();  // the bias tile is complete, and every warp is done with this W2 stage

    const int v0 = tile * kTileV;
    Partial p = empty_partial();
    if (active) {
#pragma unroll
      for (int g = 0; g < 2; ++g) {
        const int col = 8 * q4 + 32 * g, v = v0 + col;
        const float* c = sm.c() + rr * kLdC + col;
        if (kVec && v < V) {  // V % 8 == 0: all eight in range
          float u[8], x[8];
          load8(U + row_off + v, u);
          const float4 c0 = *reinterpret_cast<const float4*>(c), c1 = *reinterpret_cast<const float4*>(c + 4);
          const float b[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
#pragma unroll
          for (int j = 0; j < 8; ++j) x[j] = (u[j] + b[j]) / scale;
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
          for (int j = 0; j < 8 && v + j < V; ++j) {
            const float x = (to_float(U[row_off + v + j]) + c[j]) / scale;
            if (logits_out != nullptr) logits_out[row_off + v + j] = x;
            const uint32_t word = greedy ? 0u : word_at(counter_words(seed, kStreamDraft, k, (v + j) >> 2), (v + j) & 3);
            visit_entry(p, x, v + j, greedy, word);
          }
        }
      }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {  // the row's four threads are adjacent lanes; all lanes take part
      Partial o;
      o.max = __shfl_xor_sync(0xffffffffu, p.max, off);
      o.sum = __shfl_xor_sync(0xffffffffu, p.sum, off);
      o.key = __shfl_xor_sync(0xffffffffu, p.key, off);
      o.x = __shfl_xor_sync(0xffffffffu, p.x, off);
      o.idx = __shfl_xor_sync(0xffffffffu, p.idx, off);
      p = combine(p, o);
    }
    if (active && q4 == 0) partials[static_cast<int64_t>(rr) * ntiles + tile] = p;
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the CTA exits
}

// bias[R, V] (fp32) through tile_mma, for R <= 128 (pointers offset to the chunk).
template <typename WT>
__global__ void __launch_bounds__(kTcThreads, 1) tc_bias_kernel(const WT* __restrict__ w2, const WT* __restrict__ h,
                                                                 int64_t ld_h, int R, int V, int ntiles,
                                                                 float* __restrict__ bias) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const Smem sm{smem_raw};
  load_h(sm.h<WT>(), h, ld_h, R);
  for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    load_w2_tile(sm.w<WT>(0), w2, tile * kTileV, V);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    tile_mma(sm.w<WT>(0), sm.h<WT>(), sm.c(), R);
    __syncthreads();
    for (int i = threadIdx.x; i < R * kTileV; i += kTcThreads) {
      const int rr = i / kTileV, col = i % kTileV, v = tile * kTileV + col;
      if (v < V) bias[static_cast<int64_t>(rr) * V + v] = sm.c()[rr * kLdC + col];
    }
    __syncthreads();  // the next tile's loads overwrite what this one read
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <auto Kernel>
void allow_smem() {  // once per kernel and device, outside CUDA-graph capture (engines call eagerly first)
  static std::atomic<uint64_t> done{0};
  const uint64_t bit = uint64_t{1} << (c10::cuda::current_device() % 64);
  if (done.load() & bit) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  done.fetch_or(bit);
}

int persistent_grid(int ntiles) {
  return std::min(ntiles, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

template <typename T>
using device_t = std::conditional_t<std::is_same_v<T, at::BFloat16>, __nv_bfloat16,
                                    std::conditional_t<std::is_same_v<T, at::Half>, __half, T>>;

}  // namespace

// The tensor-core path: bf16/fp16 W2 of rank 256 on 16-byte boundaries, H rows likewise, a GPU
// with the shared memory for it (sm_80+). DSPARK_MARKOV_GEMM=cublas turns it off.
bool use_tensor_cores(const at::Tensor& w2, const void* h, int64_t ldh, int R) {
  const char* env = std::getenv("DSPARK_MARKOV_GEMM");
  if (env != nullptr && std::strcmp(env, "cublas") == 0) return false;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  return (w2.scalar_type() == at::kBFloat16 || w2.scalar_type() == at::kHalf) && w2.size(1) == kRank &&
         aligned16(w2.data_ptr()) && aligned16(h) && ldh % 8 == 0 && prop->major >= 8 &&
         static_cast<int>(prop->sharedMemPerBlockOptin) >= kSmem && R >= 1;
}

int tc_partials_per_request(int V) { return (V + kTileV - 1) / kTileV; }

// Step k for all requests: partials [R, tc_partials_per_request(V)], logits (return_q) [R, γ, V].
void tc_step(const at::Tensor& U, const at::Tensor& w2, const at::Tensor& prev_emb, const at::Tensor& temperature,
             const at::Tensor& seeds, float* logits_out, void* partials, int k) {
  const int R = U.size(0), gamma = U.size(1), V = U.size(2);
  const int ntiles = tc_partials_per_request(V);
  const int64_t ld_emb = static_cast<int64_t>(gamma) * kRank;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(w2.scalar_type(), "dspark_tc_step_w", [&] {
    using WT = device_t<scalar_t>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, U.scalar_type(), "dspark_tc_step_u", [&] {
      using UT = device_t<scalar_t>;
      const bool vec = V % 8 == 0 && aligned16(U.data_ptr());
      auto kernel = vec ? tc_step_kernel<WT, UT, true> : tc_step_kernel<WT, UT, false>;
      if (vec) allow_smem<tc_step_kernel<WT, UT, true>>();
      else allow_smem<tc_step_kernel<WT, UT, false>>();
      for (int r0 = 0; r0 < R; r0 += kMaxRequests) {
        const int rows = std::min(kMaxRequests, R - r0);
        kernel<<<persistent_grid(ntiles), kTcThreads, kSmem, stream>>>(
            reinterpret_cast<const WT*>(w2.data_ptr()),
            reinterpret_cast<const WT*>(prev_emb.data_ptr()) + r0 * ld_emb + static_cast<int64_t>(k) * kRank, ld_emb,
            reinterpret_cast<const UT*>(U.data_ptr()) + static_cast<int64_t>(r0) * gamma * V,
            temperature.data_ptr<float>() + r0, seeds.data_ptr<int64_t>() + r0,
            logits_out != nullptr ? logits_out + static_cast<int64_t>(r0) * gamma * V : nullptr,
            reinterpret_cast<Partial*>(partials) + static_cast<int64_t>(r0) * ntiles, rows, k, gamma, V, ntiles);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

// bias[R, V] = H · W2ᵀ with the chain's tile_mma (rejection.cu's rebuilt q rows).
void tc_bias(const at::Tensor& w2, const void* h, int64_t ldh, int R, at::Tensor& bias) {
  const int V = w2.size(0);
  const int ntiles = tc_partials_per_request(V);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(w2.scalar_type(), "dspark_tc_bias", [&] {
    using WT = device_t<scalar_t>;
    allow_smem<tc_bias_kernel<WT>>();
    for (int r0 = 0; r0 < R; r0 += kMaxRequests) {
      tc_bias_kernel<WT><<<persistent_grid(ntiles), kTcThreads, kSmem, stream>>>(
          reinterpret_cast<const WT*>(w2.data_ptr()), reinterpret_cast<const WT*>(h) + r0 * ldh, ldh,
          std::min(kMaxRequests, R - r0), V, ntiles, bias.data_ptr<float>() + static_cast<int64_t>(r0) * V);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace dspark
