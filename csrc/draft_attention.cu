// The DSpark drafter's block attention read straight from its paged context K/V (TGI's drafter:
// dspark_cli/integrations/tgi/draft.py, kv_pool.py). Request r's γ block queries attend, without a
// causal mask, to its committed context — lengths[r] rows of the pool, page by page through its
// page table (row i in page pages[r][i / page_rows] at i % page_rows) — followed by its own
// block's γ keys. The torch path gathers every request's context into a padded batch first (at
// R = 128 and ~560 rows, ~290 MB of K/V copied per layer, then read again); here each CTA streams
// its keys from where they live.
//
// One CTA of 8 warps per (request, KV head, key split): the g query heads of a KV head and the γ
// positions make M = g·γ query rows (row m = t·g + i: position t, head i of the group), padded to
// 16 for the tensor cores (wmma, bf16/fp16 in, fp32 accumulate). Keys go by tiles of 64 through a
// ring of two cp.async buffers; per tile the scores go to shared memory, 8 lanes per row turn them
// into probabilities, and each warp adds P·V into the accumulator tiles it keeps in registers
// for the whole loop. A row's softmax reference max moves only when a tile's scores exceed it by
// 2^8 (kRescaleMargin), so the accumulators, whose fragment layout wmma does not expose, go
// through shared memory to be rescaled only on those tiles (mostly none after the first). When
// there are too few (request, head) pairs to fill the GPU, the keys are split and a second kernel
// merges the splits by their log-sum-exp (flash-decoding).
//
// Measured on an H200 at Qwen3-4B drafter sizes (bench/RESULTS.md, session 19): this layout against
// 32-key tiles with 2–4 buffers and 64-key tiles with 3 (fewer CTAs per SM: slower at every R), a
// warp per row in the softmax (20 % slower), and two mma chains per score tile with V fragments
// shared across a warp's accumulators (6 % slower); session 29: each thread's page ids read a tile
// ahead into registers (3–9 % slower: the copies were not waiting on the page table).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>

#include "launch.h"

namespace dspark {
namespace {

constexpr int kTileKeys = 64;
constexpr int kStages = 2;  // K/V tiles in flight or in use: a ring of buffers filled by cp.async
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRows = 128;  // g·γ padded: query rows of one CTA
// A row's reference max moves only when a tile's scores exceed it by more than this (log2 units):
// probabilities stay below 2^8 (fine in bf16/fp16 and fp32 sums), and the accumulator, which lives
// in wmma fragments, is rescaled (through shared memory) only on those rare tiles.
constexpr float kRescaleMargin = 8.f;

// Shared-memory row strides, padded by 16 bytes: rows of 2^k bytes would put every row of a 16×16
// fragment load in the same banks.
template <typename T, int HD>
struct Layout {
  static constexpr int q = HD + 16 / sizeof(T), kv = q;  // elements
  static constexpr int scores = kTileKeys + 4;           // floats
  static constexpr int probs = kTileKeys + 16 / sizeof(T);
  static constexpr int out = HD + 4;                     // floats (after the loop, over the K/V buffers)
  static constexpr int scratch = 16 * 20;                // floats: one 16×16 tile per warp, stride 20
  static constexpr int acc_tiles = kMaxRows / 16 * (HD / 16) / kWarps;  // accumulator tiles per warp, at most

  // the K/V ring; after the loop the output [rows_padded][out] fp32 takes its place
  static constexpr size_t ring(int rows_padded) {
    const size_t tiles = 2ull * kStages * kTileKeys * kv * sizeof(T), output = 4ull * rows_padded * out;
    return tiles > output ? tiles : output;
  }
  static constexpr size_t bytes(int rows_padded) {
    return static_cast<size_t>(rows_padded) * q * sizeof(T)       // queries
           + ring(rows_padded)                                      // K and V tiles
           + static_cast<size_t>(rows_padded) * scores * 4          // scores
           + static_cast<size_t>(rows_padded) * probs * sizeof(T)   // probabilities
           + static_cast<size_t>(kWarps) * scratch * 4              // rescale scratch
           + 3ull * rows_padded * 4;                                 // reference max, sum, rescale
  }
};

struct AttentionParams {
  const void* q;        // [R, γ, H, hd]
  const void* k_block;  // [R, γ, kv, hd]
  const void* v_block;
  const void* k_pool;   // [pool rows, kv, hd]
  const void* v_pool;
  const int* pages;     // [R, page_columns] each request's pool pages, in the order of its rows
  const int* lengths;   // [R] its committed rows
  void* out;            // [R, γ, H, hd]
  float* split_out;     // [splits, R, kv, M, hd] each split's normalized output (splits > 1)
  float* split_lse;     // [splits, R, kv, M] its log-sum-exp (natural log)
  int R, gamma, heads, kv_heads, group, rows, rows_padded, splits, split_keys, page_rows, page_columns;
  float scale_log2;     // 1/√hd · log2(e): scores in log2 units
};

__device__ __forceinline__ void copy16_async(void* smem, const void* gmem, bool valid) {
  // src-size 0 fills the 16 bytes with zeros (keys past the split's end)
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float(float x) { return __float2half(x); }

using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// acc += A · B for one 16×16 output tile from shared memory: A's rows 16 × 16·kSteps (row-major,
// stride lda), B's k-th 16×16 block at b + k·b_step (layout BLayout, stride ldb).
template <int kSteps, typename BLayout, typename T>
__device__ __forceinline__ void mma_tile(Acc& acc, const T* a, int lda, const T* b, int b_step, int ldb) {
  using namespace nvcuda;
#pragma unroll
  for (int k = 0; k < kSteps; ++k) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b_frag;
    wmma::load_matrix_sync(a_frag, a + k * 16, lda);
    wmma::load_matrix_sync(b_frag, b + k * b_step, ldb);
    wmma::mma_sync(acc, a_frag, b_frag, acc);
  }
}

template <typename T, int HD>
__global__ void __launch_bounds__(kThreads) draft_attention_kernel(AttentionParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using L = Layout<T, HD>;
  constexpr int kPiece = 16 / static_cast<int>(sizeof(T));  // elements in 16 bytes
  constexpr int kChunks = HD / kPiece;                       // 16-byte pieces of one row
  const int r = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int length = p.lengths[r];
  const int* pages = p.pages + static_cast<size_t>(r) * p.page_columns;
  const int n_keys = length + p.gamma;
  const int key_begin = split * p.split_keys;
  // the last split takes every key left, whatever the host's max_length said
  const int key_end = split == p.splits - 1 ? n_keys : min(n_keys, key_begin + p.split_keys);
  const int M = p.rows, MP = p.rows_padded;

  if (key_begin >= n_keys) {  // a split past this request's keys: weight zero in the merge
    const size_t slot = ((static_cast<size_t>(split) * p.R + r) * p.kv_heads + kvh) * M;
    for (int i = threadIdx.x; i < M * HD; i += kThreads) {
      p.split_out[slot * HD + i] = 0.f;
      if (i % HD == 0) p.split_lse[slot + i / HD] = -INFINITY;
    }
    return;
  }

  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);                                   // [MP][L::q]
  T* ks = qs + MP * L::q;                                               // [kStages][kTileKeys][L::kv]
  T* vs = ks + kStages * kTileKeys * L::kv;                             // [kStages][kTileKeys][L::kv]
  float* ss = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(ks) + L::ring(MP));  // [MP][L::scores]
  T* ps = reinterpret_cast<T*>(ss + MP * L::scores);                    // [MP][L::probs]
  float* scratch = reinterpret_cast<float*>(ps + MP * L::probs);        // [kWarps][L::scratch]
  float* row_max = scratch + kWarps * L::scratch;  // reference max (log2 units)
  float* row_sum = row_max + MP;
  float* row_rescale = row_sum + MP;
  float* os = reinterpret_cast<float*>(ks);  // [MP][L::out]: the output, over the K/V buffers after the loop

  const size_t row_elems = static_cast<size_t>(p.kv_heads) * HD;  // one pool / block row: all KV heads
  const T* k_pool = static_cast<const T*>(p.k_pool) + kvh * HD;
  const T* v_pool = static_cast<const T*>(p.v_pool) + kvh * HD;
  const T* k_block = static_cast<const T*>(p.k_block) + (static_cast<size_t>(r) * p.gamma * p.kv_heads + kvh) * HD;
  const T* v_block = static_cast<const T*>(p.v_block) + (static_cast<size_t>(r) * p.gamma * p.kv_heads + kvh) * HD;

  // Tile `tile` into its ring slot; one commit group per call, empty past the last tile (so that
  // waiting for all groups but the newest kStages − 2 always means: this iteration's tile is in).
  auto load_tile = [&](int tile) {
    const int first = key_begin + tile * kTileKeys;
    T* kd = ks + (tile % kStages) * kTileKeys * L::kv;
    T* vd = vs + (tile % kStages) * kTileKeys * L::kv;
    for (int i = threadIdx.x; first < key_end && i < kTileKeys * kChunks; i += kThreads) {
      const int row = i / kChunks, piece = i % kChunks, key = first + row;
      const bool valid = key < key_end;
      const bool context = key < length;
      const size_t offset = (context ? static_cast<size_t>(pages[key / p.page_rows]) * p.page_rows + key % p.page_rows
                                     : static_cast<size_t>(max(key - length, 0))) * row_elems;
      const T* ksrc = valid ? (context ? k_pool : k_block) + offset : k_block;
      const T* vsrc = valid ? (context ? v_pool : v_block) + offset : v_block;
      copy16_async(kd + row * L::kv + piece * kPiece, ksrc + piece * kPiece, valid);
      copy16_async(vd + row * L::kv + piece * kPiece, vsrc + piece * kPiece, valid);
    }
    async_commit();
  };

  const int n_tiles = (key_end - key_begin + kTileKeys - 1) / kTileKeys;
  for (int tile = 0; tile < kStages - 1; ++tile) load_tile(tile);

  // queries: row m = t·g + i is head kvh·g + i at position t (g consecutive heads: one contiguous run)
  const T* q = static_cast<const T*>(p.q);
  for (int i = threadIdx.x; i < MP * kChunks; i += kThreads) {
    const int m = i / kChunks, piece = i % kChunks;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (m < M) {
      const int t = m / p.group, head = kvh * p.group + m % p.group;
      value = *reinterpret_cast<const uint4*>(q + ((static_cast<size_t>(r) * p.gamma + t) * p.heads + head) * HD +
                                               piece * kPiece);
    }
    *reinterpret_cast<uint4*>(qs + m * L::q + piece * kPiece) = value;
  }
  for (int i = threadIdx.x; i < MP; i += kThreads) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m_tiles = MP / 16;
  // This warp's accumulator tiles of O [MP, HD]: jobs warp, warp + kWarps, … of m_tiles·HD/16.
  const int acc_jobs = m_tiles * (HD / 16);
  Acc acc[L::acc_tiles];
#pragma unroll
  for (int j = 0; j < L::acc_tiles; ++j) wmma::fill_fragment(acc[j], 0.f);

  for (int tile = 0; tile < n_tiles; ++tile) {
    async_wait<kStages - 2>();
    __syncthreads();  // tile's K/V in; every warp done with the previous tile's slot and probabilities
    load_tile(tile + kStages - 1);  // into the slot the previous tile used
    const T* kt = ks + (tile % kStages) * kTileKeys * L::kv;
    const T* vt = vs + (tile % kStages) * kTileKeys * L::kv;

    // scores S = Q Kᵀ [MP, 64]: K's rows [key][d] read as a column-major Kᵀ
    for (int job = warp; job < m_tiles * (kTileKeys / 16); job += kWarps) {
      const int mi = job / (kTileKeys / 16), ni = job % (kTileKeys / 16);
      Acc s;
      wmma::fill_fragment(s, 0.f);
      mma_tile<HD / 16, wmma::col_major>(s, qs + mi * 16 * L::q, L::q, kt + ni * 16 * L::kv, 16, L::kv);
      wmma::store_matrix_sync(ss + mi * 16 * L::scores + ni * 16, s, L::scores, wmma::mem_row_major);
    }
    __syncthreads();

    // probabilities against each row's reference max: kRowLanes lanes per row (all rows at once,
    // short shuffle reductions), kTileKeys / kRowLanes keys per lane; the tile holds at least one
    // key of the split
    constexpr int kRowLanes = 8, kLaneKeys = kTileKeys / kRowLanes;
    static_assert(kLaneKeys * sizeof(T) == 16, "a lane's probabilities are one 16-byte store");
    const int first = key_begin + tile * kTileKeys, k0 = (threadIdx.x % kRowLanes) * kLaneKeys;
    bool moved = false;
    for (int m = threadIdx.x / kRowLanes; m < MP; m += kThreads / kRowLanes) {  // whole warps stop together
      float x[kLaneKeys], top = -INFINITY;
#pragma unroll
      for (int j = 0; j < kLaneKeys; j += 4) {
        const float4 four = *reinterpret_cast<const float4*>(ss + m * L::scores + k0 + j);
        x[j] = four.x, x[j + 1] = four.y, x[j + 2] = four.z, x[j + 3] = four.w;
      }
#pragma unroll
      for (int j = 0; j < kLaneKeys; ++j) {
        x[j] = first + k0 + j < key_end ? x[j] * p.scale_log2 : -INFINITY;
        top = fmaxf(top, x[j]);
      }
#pragma unroll
      for (int o = kRowLanes / 2; o; o >>= 1) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, o));
      const float old_max = row_max[m];
      const bool move = top > old_max + kRescaleMargin;  // always on the first tile (old max −inf)
      const float ref = move ? top : old_max;
      float sum = 0.f;
      alignas(16) T probs[kLaneKeys];
#pragma unroll
      for (int j = 0; j < kLaneKeys; ++j) {
        const float prob = exp2f(x[j] - ref);
        probs[j] = from_float<T>(prob);
        sum += prob;
      }
      *reinterpret_cast<uint4*>(ps + m * L::probs + k0) = *reinterpret_cast<const uint4*>(probs);
#pragma unroll
      for (int o = kRowLanes / 2; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if (k0 == 0) {
        const float rescale = move ? exp2f(old_max - ref) : 1.f;  // 0 when the old max was −inf
        row_rescale[m] = rescale;
        row_sum[m] = row_sum[m] * rescale + sum;
        row_max[m] = ref;
      }
      moved |= move;
    }
    // a barrier for the probabilities, and whether any row's reference moved on this tile
    if (__syncthreads_or(moved) && tile > 0) {
#pragma unroll
      for (int j = 0; j < L::acc_tiles; ++j) {
        const int job = warp + j * kWarps;
        if (job >= acc_jobs) break;
        const int mi = job / (HD / 16);
        float* tmp = scratch + warp * L::scratch;
        wmma::store_matrix_sync(tmp, acc[j], 20, wmma::mem_row_major);
        __syncwarp();
        for (int i = lane; i < 256; i += 32) tmp[(i / 16) * 20 + i % 16] *= row_rescale[mi * 16 + i / 16];
        __syncwarp();
        wmma::load_matrix_sync(acc[j], tmp, 20, wmma::mem_row_major);
        __syncwarp();
      }
    }

    // O += P V
#pragma unroll
    for (int j = 0; j < L::acc_tiles; ++j) {
      const int job = warp + j * kWarps;
      if (job >= acc_jobs) break;
      const int mi = job / (HD / 16), ni = job % (HD / 16);
      mma_tile<kTileKeys / 16, wmma::row_major>(acc[j], ps + mi * 16 * L::probs, L::probs, vt + ni * 16,
                                                16 * L::kv, L::kv);
    }
  }

  __syncthreads();  // the K/V buffers become the output's
#pragma unroll
  for (int j = 0; j < L::acc_tiles; ++j) {
    const int job = warp + j * kWarps;
    if (job >= acc_jobs) break;
    const int mi = job / (HD / 16), ni = job % (HD / 16);
    wmma::store_matrix_sync(os + mi * 16 * L::out + ni * 16, acc[j], L::out, wmma::mem_row_major);
  }
  __syncthreads();
  if (p.splits == 1) {
    T* out = static_cast<T*>(p.out);
    for (int i = threadIdx.x; i < M * HD; i += kThreads) {
      const int m = i / HD, d = i % HD, t = m / p.group, head = kvh * p.group + m % p.group;
      out[((static_cast<size_t>(r) * p.gamma + t) * p.heads + head) * HD + d] =
          from_float<T>(os[m * L::out + d] / row_sum[m]);
    }
  } else {
    const size_t slot = ((static_cast<size_t>(split) * p.R + r) * p.kv_heads + kvh) * M;
    for (int i = threadIdx.x; i < M * HD; i += kThreads) {
      const int m = i / HD, d = i % HD;
      p.split_out[slot * HD + i] = os[m * L::out + d] / row_sum[m];
      if (d == 0) p.split_lse[slot + m] = (row_max[m] + __log2f(row_sum[m])) * 0.69314718f;
    }
  }
#endif
}

// out = Σ_s e^{lse_s} O_s / Σ_s e^{lse_s} over the splits, per (request, head, position, dim).
template <typename T, int HD>
__global__ void merge_splits_kernel(AttentionParams p) {
  const int r = blockIdx.x, kvh = blockIdx.y, M = p.rows;
  const size_t per_split = static_cast<size_t>(p.R) * p.kv_heads * M;
  const size_t slot = (static_cast<size_t>(r) * p.kv_heads + kvh) * M;
  T* out = static_cast<T*>(p.out);
  for (int i = threadIdx.x; i < M * HD; i += blockDim.x) {
    const int m = i / HD, d = i % HD;
    float top = -INFINITY;
    for (int s = 0; s < p.splits; ++s) top = fmaxf(top, p.split_lse[s * per_split + slot + m]);
    float num = 0.f, den = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      const float w = __expf(p.split_lse[s * per_split + slot + m] - top);
      num += w * p.split_out[(s * per_split + slot + m) * HD + d];
      den += w;
    }
    const int t = m / p.group, head = kvh * p.group + m % p.group;
    out[((static_cast<size_t>(r) * p.gamma + t) * p.heads + head) * HD + d] = from_float<T>(num / den);
  }
}

// Splits the keys (`keys`: max_length + γ) when the (request, KV head) pairs fill less than one wave
// of CTAs (`slots`: as many as the GPU holds at once): as many splits as that wave holds, whole
// tiles each. Rounding up instead put the last few CTAs in a second wave (R = 4 to 32 at Qwen3-4B
// sizes, two CTAs a SM: e.g. R = 16 384 CTAs where 264 fit).
void split_keys(AttentionParams& p, int64_t keys, int64_t slots) {
  const int64_t tiles = (keys + kTileKeys - 1) / kTileKeys, pairs = static_cast<int64_t>(p.R) * p.kv_heads;
  const int64_t splits = std::max<int64_t>(1, std::min(tiles, slots / pairs));
  const int64_t per_split = (tiles + splits - 1) / splits * kTileKeys;
  p.split_keys = static_cast<int>(per_split);
  p.splits = static_cast<int>((keys + per_split - 1) / per_split);
}

template <typename T, int HD>
void launch(AttentionParams& p, int64_t keys, const at::Tensor& like, cudaStream_t stream) {
  const size_t smem = Layout<T, HD>::bytes(p.rows_padded);
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(smem <= optin, "draft_attention: ", p.rows_padded, " query rows at head_dim ", HD, " need ", smem,
              " bytes of shared memory per block; this GPU allows ", optin);
  allow_dynamic_smem(draft_attention_kernel<T, HD>, static_cast<int>(std::min(Layout<T, HD>::bytes(kMaxRows), optin)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, draft_attention_kernel<T, HD>, kThreads, smem));
  split_keys(p, keys, static_cast<int64_t>(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  at::Tensor split_out, split_lse;
  if (p.splits > 1) {
    split_out = at::empty({p.splits, p.R, p.kv_heads, p.rows, HD}, like.options().dtype(at::kFloat));
    split_lse = at::empty({p.splits, p.R, p.kv_heads, p.rows}, like.options().dtype(at::kFloat));
    p.split_out = split_out.data_ptr<float>();
    p.split_lse = split_lse.data_ptr<float>();
  }
  draft_attention_kernel<T, HD><<<dim3(p.R, p.kv_heads, p.splits), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.splits > 1) {
    merge_splits_kernel<T, HD><<<dim3(p.R, p.kv_heads), 256, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

int64_t draft_attention_smem(int64_t query_rows, int64_t head_dim) {
  const int64_t rows_padded = (query_rows + 15) / 16 * 16;
  if (query_rows < 1 || rows_padded > kMaxRows) return 0;
  const int rows = static_cast<int>(rows_padded);  // bf16 and fp16 lay out alike
  if (head_dim == 64) return static_cast<int64_t>(Layout<__half, 64>::bytes(rows));
  if (head_dim == 128) return static_cast<int64_t>(Layout<__half, 128>::bytes(rows));
  return 0;
}

void draft_attention_cuda(const at::Tensor& q, const at::Tensor& k_block, const at::Tensor& v_block,
                          const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& pages,
                          int64_t page_rows, const at::Tensor& lengths, int64_t max_length, const at::Tensor& out) {
  TORCH_CHECK(q.dim() == 4 && k_block.dim() == 4 && k_pool.dim() == 3,
              "draft_attention: q [R, γ, H, hd], k_block [R, γ, kv, hd], k_pool [rows, kv, hd]");
  const int64_t R = q.size(0), gamma = q.size(1), heads = q.size(2), hd = q.size(3), kv = k_block.size(2);
  TORCH_CHECK(k_block.sizes() == v_block.sizes() && k_block.size(0) == R && k_block.size(1) == gamma &&
                  k_block.size(3) == hd && kv > 0 && heads % kv == 0,
              "draft_attention: k_block/v_block must be [R, γ, kv, hd] with kv dividing H");
  TORCH_CHECK(k_pool.sizes() == v_pool.sizes() && k_pool.size(1) == kv && k_pool.size(2) == hd,
              "draft_attention: k_pool/v_pool must be [rows, kv, hd]");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "draft_attention: out must be like q");
  for (const at::Tensor* t : {&q, &k_block, &v_block, &k_pool, &v_pool, &out}) {
    TORCH_CHECK(t->is_cuda() && t->device() == q.device() && t->is_contiguous() && t->scalar_type() == q.scalar_type(),
                "draft_attention: q, k/v block, k/v pool and out must be contiguous tensors of one dtype on q's GPU");
    TORCH_CHECK(aligned16(t->data_ptr()), "draft_attention: tensors must start 16-byte aligned (cp.async, uint4 loads)");
  }
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, "draft_attention: bf16 or fp16");
  TORCH_CHECK(hd == 64 || hd == 128, "draft_attention: head_dim 64 or 128");
  TORCH_CHECK(pages.scalar_type() == at::kInt && lengths.scalar_type() == at::kInt && pages.dim() == 2 &&
                  pages.size(0) == R && lengths.numel() == R && pages.is_contiguous() && lengths.is_contiguous() &&
                  pages.device() == q.device() && lengths.device() == q.device(),
              "draft_attention: pages contiguous int32 [R, columns] and lengths int32 [R] on q's GPU");
  TORCH_CHECK(page_rows >= 1 && k_pool.size(0) % page_rows == 0,
              "draft_attention: page_rows must be ≥ 1 and divide the pool's rows");
  // The key split below divides by the tiles max_length makes: a negative one made none (SIGFPE).
  TORCH_CHECK(max_length >= 0, "draft_attention: max_length must be ≥ 0");
  // key counts and splits are ints in the kernel: 2^40 made a negative split (pages[negative] read)
  TORCH_CHECK(max_length + gamma < (int64_t{1} << 31) - kTileKeys, "draft_attention: max_length must be < 2^31");
  const int group = static_cast<int>(heads / kv), rows = group * static_cast<int>(gamma);
  const int rows_padded = (rows + 15) / 16 * 16;
  TORCH_CHECK(rows_padded <= kMaxRows, "draft_attention: (H / kv)·γ query rows per KV head exceed ", kMaxRows);
  if (R == 0 || gamma == 0) return;  // no queries: out is empty
  const c10::cuda::CUDAGuard guard(q.device());
  // the kernel body needs sm_80+ (bf16 tensor cores, cp.async); below it would be compiled empty
  TORCH_CHECK(at::cuda::getCurrentDeviceProperties()->major >= 8, "draft_attention: needs compute capability 8.0+");

  AttentionParams p{};
  p.q = q.data_ptr();
  p.k_block = k_block.data_ptr();
  p.v_block = v_block.data_ptr();
  p.k_pool = k_pool.data_ptr();
  p.v_pool = v_pool.data_ptr();
  p.pages = pages.data_ptr<int>();
  p.page_rows = static_cast<int>(page_rows);
  p.page_columns = static_cast<int>(pages.size(1));
  p.lengths = lengths.data_ptr<int>();
  p.out = out.data_ptr();
  p.R = static_cast<int>(R);
  p.gamma = static_cast<int>(gamma);
  p.heads = static_cast<int>(heads);
  p.kv_heads = static_cast<int>(kv);
  p.group = group;
  p.rows = rows;
  p.rows_padded = rows_padded;
  p.scale_log2 = 1.4426950408889634f / std::sqrt(static_cast<float>(hd));
  const int64_t keys = max_length + gamma;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kBFloat16) {
    hd == 64 ? launch<__nv_bfloat16, 64>(p, keys, q, stream) : launch<__nv_bfloat16, 128>(p, keys, q, stream);
  } else {
    hd == 64 ? launch<__half, 64>(p, keys, q, stream) : launch<__half, 128>(p, keys, q, stream);
  }
}

}  // namespace dspark
