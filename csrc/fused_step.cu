// The fused Markov step (docs/kernels.md), Hopper only: per step k, bias = W1[x_{k-1}]·W2ᵀ on the
// tensor cores and the split pass on the accumulators in one kernel, so the fp32 bias never goes
// through HBM (at R = 128 its round trip was 156 MB of the ~270 MB a cuBLAS step moved). markov.cu
// takes it at 3 <= R <= 128 (R <= 2 runs its small-batch kernels).
//
// One CTA per SM walks a contiguous range of 64-vocab W2 tiles:
//   - a producer warpgroup (one thread issues, the rest give their registers to the consumers with
//     setmaxnreg) loads each tile with TMA into a four-slot shared-memory ring (an mbarrier per slot
//     says full, another says freed). The tensor map permutes the tile's rows so that accumulator
//     column 8j + 2q + e holds vocab 16q + 2j + e: lane q of a quad then owns 16 consecutive vocab
//     ids (one 32-byte U load, two race groups of eight sharing one Philox call);
//   - four consumer warpgroups keep W1[x_{k-1}] of up to 128 requests in shared memory (64 requests
//     per wgmma, 128-byte swizzled as wgmma reads it), multiply a tile with wgmma m64n64k16 (fp32
//     accumulation in a fixed k order), free its slot and run the split pass's epilogue (visit8) on
//     the accumulators while other warpgroups multiply. At R <= 64 the four warpgroups take
//     alternate tiles; above, two pairs do, one warpgroup per 64 requests. At R <= 16 the one warp
//     of a warpgroup that holds rows stages them in shared memory and all four warps share them;
//   - each request's threads, then warps, merge into one partial per CTA for markov.cu's reduce.
// Rejection rebuilds a q row through this kernel too (bias written out, no U), so it reads the bias
// bits the chain sampled from; the rows leave through the consumed ring slot as whole 256-byte rows.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fused_step.h"
#include "launch.h"
#include "residual.cuh"
#include "warp_rule.cuh"

namespace dspark {
namespace {

constexpr int kRank = 256;
constexpr int kTileVocab = 64;                       // wgmma N
constexpr int kHalfRows = 64;                        // wgmma M: requests per warpgroup
constexpr int kBlockBytes = 64 * 128;                // 64 rows × one 128-byte swizzled K block (64 elements)
constexpr int kKBlocks = kRank / 64;
constexpr int kTileBytes = kKBlocks * kBlockBytes;   // one W2 tile: 32 KB
constexpr int kHalfBytes = kKBlocks * kBlockBytes;   // W1[x] of 64 requests: 32 KB
constexpr int kSlots = 4;
constexpr int kGroups = 4;                           // consumer warpgroups
constexpr int kConsumers = 128 * kGroups;
constexpr int kFusedThreads = kConsumers + 128;      // + the producer warpgroup (one thread issues TMA)
// Registers per thread: 96 at launch (640 threads); the producer gives its own back (setmaxnreg)
// so the consumers run with 112 (ptxas allocates them: without it the epilogue spills). 112 is the
// ceiling: setmaxnreg.inc only takes what the CTA's .dec released, 128·(96 − 24) = 9216 registers
// (120 would need 12288: the consumers waited forever, measured).
constexpr int kProducerRegs = 24, kConsumerRegs = 112;
constexpr int kMaxRequests = 2 * kHalfRows;
// At R <= 16 only one warp of each warpgroup holds request rows: it stages them in shared memory
// (two buffers) and the whole warpgroup runs the epilogue, eight threads per request.
constexpr int kStagedMaxRequests = 16;
constexpr int kStageStride = kTileVocab + 4;         // floats per staged row (padding spreads the banks)
constexpr int kStageBytes = 2 * kGroups * kStagedMaxRequests * kStageStride * 4;
// The ring, W1[x] of one half per 64 requests (staged: R <= 16, one half) and the staged rows.
constexpr int smem_bytes(bool staged) {
  return kSlots * kTileBytes + (staged ? kHalfBytes + kStageBytes : 2 * kHalfBytes) + 1024;  // + room to align to 1024
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  }
}

// K block kb of W2 tile `tile` (the 5-D map of w2_tile_map) into dst; the mbarrier counts its bytes.
__device__ __forceinline__ void tma_load_block(uint32_t dst, const CUtensorMap* map, uint64_t* bar, int kb, int tile) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, "
      "%6}], [%7];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(64 * kb), "r"(0), "r"(0), "r"(0), "r"(tile), "r"(smem_u32(bar))
      : "memory");
}

// wgmma shared-memory descriptor of a K-major operand in 128-byte swizzled 8-row atoms (1024 bytes
// apart), starting at addr.
__device__ __forceinline__ uint64_t swizzled_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (static_cast<uint64_t>(1024 >> 4) << 32) |
         (1ull << 62);
}

// Descriptors are built once per operand; a k16 slice (32 bytes) or K block (kBlockBytes) further
// on only adds to the low word's start address (16-byte units; shared memory, < 256 KB, never
// carries out of its field). Re-encoding the address per wgmma cost 14 instructions a wgmma,
// about 7 per vocab entry of the epilogue's budget.
__device__ __forceinline__ uint32_t desc_lo(uint64_t desc, uint32_t bytes) {
  return static_cast<uint32_t>(desc) + (bytes >> 4);
}
__device__ __forceinline__ uint32_t desc_hi(uint64_t desc) { return static_cast<uint32_t>(desc >> 32); }

// d (64 × 64 fp32, the warpgroup's fragment) = A·Bᵀ (+ d when accumulate), A and B K-major bf16/fp16,
// their descriptors as (low, high) words: desc_advance only changes the low one.
template <typename WT>
__device__ __forceinline__ void wgmma_64x64x16(float d[32], uint32_t a_lo, uint32_t a_hi, uint32_t b_lo,
                                               uint32_t b_hi, int accumulate) {
#define DSPARK_WGMMA(TYPE)                                                                                     \
  asm volatile(                                                                                                \
      "{\n .reg .pred p;\n .reg .b64 a, b;\n setp.ne.b32 p, %36, 0;\n mov.b64 a, {%32, %33};\n"                  \
      " mov.b64 b, {%34, %35};\n wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE                       \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "  \
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, a, b, p, 1, 1, 0, 0;\n}\n"                            \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),        \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),             \
        "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),             \
        "+f"(d[30]), "+f"(d[31])                                                                               \
      : "r"(a_lo), "r"(a_hi), "r"(b_lo), "r"(b_hi), "r"(accumulate))
  if constexpr (std::is_same_v<WT, __nv_bfloat16>) DSPARK_WGMMA("bf16");
  else DSPARK_WGMMA("f16");
#undef DSPARK_WGMMA
}

// The accumulators are written by the asynchronous wgmma until wgmma.wait_group: keep the compiler
// from moving their reads across it.
__device__ __forceinline__ void fence_fragment(float d[32]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// A thread's running result: the chain step's partial, or rejection's races (kResidual).
template <bool kResidual>
using EpilogueState = std::conditional_t<kResidual, Race, Partial>;

template <bool kResidual>
__device__ __forceinline__ EpilogueState<kResidual> empty_state() {
  if constexpr (kResidual) return empty_race();
  else return empty_partial();
}

// A request's settings for the epilogue: its U row at step k, temperature, greedy or sampled.
template <typename UT>
struct RowRequest {
  bool active = false, greedy = true;
  float scale = 1.f;
  int64_t seed = 0;
  const UT* u_row = nullptr;

  __device__ RowRequest(int r, int R, const UT* __restrict__ U, const float* __restrict__ temperature,
                        const int64_t* __restrict__ seeds, int k, int gamma, int V) {
    if (U == nullptr || r >= R) return;
    active = true;
    const float T = temperature[r];
    greedy = T < kGreedyBelow;
    scale = greedy ? 1.f : T;
    seed = seeds[r];
    u_row = U + (static_cast<int64_t>(r) * gamma + k) * V;
  }
};

// x = (U + x) / T for N entries, U packed in u. One branch on T for all N: per entry it was a
// branch each (the division's slow path keeps the compiler from predicating it).
template <int N, typename UT>
__device__ __forceinline__ void add_u_over_temperature(float x[N], const uint4* u, float scale) {
  const UT* ui = reinterpret_cast<const UT*>(u);
  if (scale == 1.f) {
#pragma unroll
    for (int e = 0; e < N; ++e) x[e] = to_float(ui[e]) + x[e];
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) x[e] = (to_float(ui[e]) + x[e]) / scale;
  }
}

// Entries v .. v+N-1 of one request (x = the bias on entry, (U + bias) / T after) into p: the split
// pass's visits, N = 8 or 16 (v % N == 0: one Philox call serves both groups of 16).
template <int N, typename UT>
__device__ __forceinline__ void visit_entries(Partial& p, float x[N], const uint4* u, const RowRequest<UT>& req, int v,
                                              int k) {
  add_u_over_temperature<N, UT>(x, u, req.scale);
  if (req.greedy) {
#pragma unroll
    for (int h = 0; h < N; h += 8) visit8<false>(p, x + h, v + h, {});
    return;
  }
  const uint4 w = counter_words(req.seed, kStreamDraft, k, v >> 4);
#pragma unroll
  for (int h = 0; h < N; h += 8) visit8<true>(p, x + h, v + h, group_noise(w, (v + h) >> 3));
}

// U entries v .. v+N-1 of a request's row (zeros for a request without one), issued before the
// multiply so they are in flight meanwhile.
template <int N, typename UT, typename Request>
__device__ __forceinline__ void load_u(const Request& req, int v, uint4 out[N * sizeof(UT) / 16]) {
#pragma unroll
  for (int c = 0; c < static_cast<int>(N * sizeof(UT) / 16); ++c)
    out[c] = req.u_row != nullptr ? reinterpret_cast<const uint4*>(req.u_row + v)[c] : make_uint4(0, 0, 0, 0);
}

// Entries v .. v+N-1 of a rejected or bonus row (x = the bias on entry) into acc: q rebuilt with the
// chain's row stats (rebuilt_q; one-hot at the token for a greedy draft row), p from the target row
// (p_early: its entries already loaded, else loaded here; made probabilities here when logits).
template <int N, typename UT>
__device__ __forceinline__ void visit_entries(Race& acc, float x[N], const uint4* u, const ResidualRequest<UT>& req,
                                              int v, int /*k*/, const float* p_early = nullptr) {
  if (req.rejected && !req.one_hot) add_u_over_temperature<N, UT>(x, u, req.scale);
  const uint4 w = counter_words(req.seed, kStreamRecover, 0, v >> 4);
#pragma unroll
  for (int h = 0; h < N; h += 8) {
    float p[8], q[8] = {};
    if (p_early != nullptr) {
#pragma unroll
      for (int i = 0; i < 8; ++i) p[i] = p_early[h + i];
    } else {
      load_vec<8>(req.p_row.x + v + h, p);
    }
    req.p_row.to_probs(p);
    if (req.rejected) {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        q[i] = req.one_hot ? (v + h + i == req.token ? 1.f : 0.f) : rebuilt_q(x[h + i], req.max, req.inv_sum);
    }
    visit_residual_group(acc, p, q, req.rejected, v + h, group_noise(w, (v + h) >> 3));
  }
}

// N consecutive entries (16-byte aligned) of a request's x row: a thread's entries are consecutive
// vocab ids (the permuted tile), so they leave as whole 16-byte stores.
template <int N>
__device__ __forceinline__ void store_entries(float* __restrict__ dst, const float x[N]) {
#pragma unroll
  for (int c = 0; c < N / 4; ++c)
    reinterpret_cast<float4*>(dst)[c] = make_float4(x[4 * c], x[4 * c + 1], x[4 * c + 2], x[4 * c + 3]);
}

// The row of its warp's half that write_bias_rows' store `it` (0..7) of this thread writes; its
// 16-byte chunk there is lane % 16.
__device__ __forceinline__ int bias_store_row(int it) {
  return 16 * (threadIdx.x / 32 % 4) + (32 * it + threadIdx.x % 32) / 16;
}

// Top-p alone's row max (RowMaxKeys), taken as write_bias_rows stores the bias rows: per tile the
// thread's four U entries of each of its eight rows, requested before the multiply, and its running
// max key of x = (U_k + bias) / T per row, computed as warp.cu's max pass computes it.
template <typename UT>
struct RowMaxTaker {
  using Chunk = std::conditional_t<sizeof(UT) == 4, uint4, uint2>;  // four U entries
  const UT* U;               // [R, γ, V]
  unsigned* out;             // [R]
  const float* temperature;  // shared, [kMaxRequests]
  int gamma, R, V, k, half;
  Chunk u[8];
  unsigned key[8] = {};

  // The thread's rows are r0, r0 + 2, ..., r0 + 14 (bias_store_row): one pointer and a stride
  // instead of eight row addresses (ptxas: no spills, against 12-56 bytes).
  __device__ int first_row() const { return half * kHalfRows + bias_store_row(0); }
  __device__ int64_t two_rows() const { return static_cast<int64_t>(2) * gamma * V * sizeof(UT) / sizeof(Chunk); }
  __device__ const Chunk* chunk_at(int v0) const {
    return reinterpret_cast<const Chunk*>(U + (static_cast<int64_t>(first_row()) * gamma + k) * V + v0) +
           threadIdx.x % 16;
  }
  __device__ void load(int v0) {
    const int r0 = first_row();
    const Chunk* row = chunk_at(v0);
    const int64_t stride = two_rows();
#pragma unroll
    for (int it = 0; it < 8; ++it) u[it] = r0 + 2 * it < R ? row[it * stride] : Chunk{};
  }
  // The warpgroup's next tile's rows into L2 while this one multiplies (measured only together
  // with the strided loads: the two made the fused max pay from R = 32 instead of 64, session 64).
  __device__ void prefetch(int v0) const {
    const int r0 = first_row();
    const Chunk* row = chunk_at(v0);
    const int64_t stride = two_rows();
#pragma unroll
    for (int it = 0; it < 8; ++it)
      if (r0 + 2 * it < R) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + it * stride));
  }
  __device__ void take(int it, int r, const float4& bias) {
    const UT* ui = reinterpret_cast<const UT*>(&u[it]);
    const float b[4] = {bias.x, bias.y, bias.z, bias.w}, T = temperature[r];
#pragma unroll
    for (int e = 0; e < 4; ++e) key[it] = max(key[it], order_key(draft_logit(to_float(ui[e]), b[e], T)));
  }
  // After the last tile, every consumer thread: the CTA's max per row into cta_max (shared, zero),
  // then into out.
  __device__ void finish(unsigned* cta_max) {
#pragma unroll
    for (int it = 0; it < 8; ++it) {
      unsigned m = key[it];
#pragma unroll
      for (int off = 1; off < 16; off <<= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
      const int r = half * kHalfRows + bias_store_row(it);
      if (threadIdx.x % 16 == 0 && r < R) atomicMax(&cta_max[r], m);
    }
    asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");
    if (threadIdx.x < R) atomicMax(&out[threadIdx.x], cta_max[threadIdx.x]);
  }
};

// bias_out rows of this warp's 16 requests for tile columns v0 .. v0+63. The fragment holds 16-byte
// pieces 64 bytes apart, so the rows go through the tile's ring slot (its W2 consumed once every
// warp multiplying it has waited for its wgmma) and leave as whole 256-byte rows. Row m of the
// half keeps 16-byte chunk c at chunk c ^ (m % 8), which spreads the banks. With a taker, the rows'
// max keys too.
template <typename Taker>
__device__ __forceinline__ void write_bias_rows(const float acc[32], unsigned char* slot, float* __restrict__ bias_out,
                                                int R, int V, int v0, int half, int halves, int group, Taker* taker) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane >> 2, quad = lane & 3;
  // Every warp of the warpgroup(s) multiplying this tile is done reading the slot.
  asm volatile("bar.sync %0, %1;" ::"r"(6 + group), "r"(128 * halves) : "memory");
  float* rows = reinterpret_cast<float*>(slot) + half * kHalfRows * kTileVocab;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int m = 16 * (warp % 4) + gid + 8 * i;
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // columns 16·quad + 2j, +1 (the permuted fragment: acc[4j + 2i + e])
      const int chunk = 4 * quad + j / 2;
      *reinterpret_cast<float2*>(rows + 64 * m + 4 * (chunk ^ (m & 7)) + 2 * (j & 1)) =
          make_float2(acc[4 * j + 2 * i], acc[4 * j + 2 * i + 1]);
    }
  }
  __syncwarp();
#pragma unroll
  for (int it = 0; it < 8; ++it) {  // two rows of 16 chunks per instruction
    const int m = bias_store_row(it), c = lane % 16;
    const int r = half * kHalfRows + m;
    const float4 val = *reinterpret_cast<const float4*>(rows + 64 * m + 4 * (c ^ (m & 7)));
    if (r < R) {
      reinterpret_cast<float4*>(bias_out + static_cast<int64_t>(r) * V + v0)[c] = val;
      if (taker != nullptr) taker->take(it, r, val);
    }
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // before TMA refills the slot
}

// Rejection, after each CTA wrote its races (consumer threads only): the last CTA to finish merges
// every CTA's races per request (a warp each) and writes the recovered token. The host asks for it
// at R <= 16 (one request per consumer warp); above, rounds of dependent merges in one CTA cost
// more than a finish launch (R = 128: 87 against 67 µs for the step).
template <int capacity>
__device__ __forceinline__ void finish_residual(const Race* races, const ResidualRows& rows,
                                                const Verdicts<capacity>& verdicts, const int64_t* seeds, int R,
                                                int gamma, int V) {
  // race.cuh's last_block_to_finish, on the consumers' named barrier (the producer warps have exited).
  __shared__ bool last;
  __threadfence();
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");
  if (threadIdx.x == 0) last = count_block_is_last(rows.done);
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");
  if (!last) return;
  __threadfence();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < R; r += kConsumers / 32) {
    if (rows.greedy != nullptr && rows.greedy[r]) continue;  // written (accept_kernel, find_verdicts)
    const Race all = warp_merge_races(races + static_cast<int64_t>(r) * gridDim.x, gridDim.x, lane);
    write_recovered_token(all, r, verdicts.n[r], verdicts.rejected[r], rows.target, rows.row_start, V, seeds[r],
                          rows.out_tokens, gamma);
  }
}

// Grid: one CTA per SM (at most one per tile), V % 64 == 0. results [R, gridDim.x] when U is
// given: the chain step's partials, or with kResidual rejection's races (ResidualRows). kRowsOut
// (its code, barrier and registers kept out of the production q-lazy kernel): without U the bias
// rows into rows_out [R, V] (rejection rebuilding q; a warped chain step, with row_max.keys for
// top-p alone); with U, x = (U + bias) / T into row k of rows_out [R, γ, V] (q returned: markov.cu
// makes the rows q after the last step). kMaxKey (with kRowsOut, U null; no epilogue compiled, so the
// taker's registers stay out of the q kernel): the bias rows and row_max.keys.
// kStaged: R <= 16 (see kStagedMaxRequests).
template <typename WT, typename UT, bool kStaged, bool kRowsOut, bool kResidual, bool kMaxKey>
__global__ void __launch_bounds__(kFusedThreads, 1)
fused_step_kernel(const __grid_constant__ CUtensorMap w2_tiles, const WT* __restrict__ h, int64_t ldh, int R, int V,
                  const UT* __restrict__ U, const float* __restrict__ temperature,
                  const int64_t* __restrict__ seeds, const ResidualRows residual_rows, void* __restrict__ results,
                  float* __restrict__ rows_out, int k, int gamma, const RowMaxKeys row_max) {
  using State = EpilogueState<kResidual>;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  // The 128-byte swizzle (TMA's and wgmma's) is a function of address bits 4-9: 1024-byte aligned.
  unsigned char* ring = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  unsigned char* w1x = ring + kSlots * kTileBytes;
  float* stage = reinterpret_cast<float*>(w1x + kHalfBytes);  // kStaged only (one half of W1[x])
  __shared__ __align__(8) uint64_t full[kSlots], freed[kSlots];
  __shared__ State merged[kConsumers / 32][16];
  __shared__ float max_temperature[kMaxKey ? kMaxRequests : 1];
  __shared__ unsigned cta_max[kMaxKey ? kMaxRequests : 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int halves = R > kHalfRows ? 2 : 1, groups = kGroups / halves;
  const int tiles = V / kTileVocab;
  const int first = static_cast<int>(static_cast<int64_t>(blockIdx.x) * tiles / gridDim.x);
  const int count = static_cast<int>(static_cast<int64_t>(blockIdx.x + 1) * tiles / gridDim.x) - first;
  // The CTA's t-th tile. Odd chain steps walk the range backwards, so a step starts on the W2 tiles
  // the previous step read last, which are still in L2 (W2 is a little larger than L2 on Hopper).
  const auto tile_at = [&](int t) { return first + ((k & 1) ? count - 1 - t : t); };
  if (threadIdx.x == 0) {
    for (int i = 0; i < kSlots; ++i) {
      mbar_init(&full[i], 1);               // the producer's expect_tx; TMA's bytes complete the phase
      mbar_init(&freed[i], 4 * halves);     // the warps of the warpgroup(s) that multiply the tile
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (kMaxKey && threadIdx.x < kMaxRequests) {
    cta_max[threadIdx.x] = 0;
    max_temperature[threadIdx.x] = threadIdx.x < R ? row_max.temperature[threadIdx.x] : 1.f;
  }
  __syncthreads();
  allow_next_kernel();

  if (warp >= kConsumers / 32) {  // producer: W2 does not depend on the previous kernel, so no wait
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegs));
    if (threadIdx.x == kConsumers) {
      for (int t = 0; t < count; ++t) {
        const int slot = t % kSlots;
        if (t >= kSlots) mbar_wait(&freed[slot], (t / kSlots - 1) & 1);
        mbar_expect_tx(&full[slot], kTileBytes);
        for (int kb = 0; kb < kKBlocks; ++kb)
          tma_load_block(smem_u32(ring + slot * kTileBytes + kb * kBlockBytes), &w2_tiles, &full[slot], kb, tile_at(t));
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegs));

  wait_previous_kernel();  // H (prev_emb[:, k]) is the previous step's reduce output (or accept_kernel's)
  // Rejection: each request's verdict, from accept_kernel or the ratio tests run here (then H is
  // gathered here too: W1 rows of the tokens before the first unaccepted positions).
  __shared__ Verdicts<kResidual ? kMaxRequests : 1> verdicts;
  const auto consumers_sync = [] { asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory"); };
  if constexpr (kResidual)  // two tests a thread: one round up to R·γ = 1024 (γ <= 8 at R = 128)
    find_verdicts<2>(verdicts, residual_rows.tests, residual_rows.state, residual_rows.target,
                     residual_rows.row_start, residual_rows.tokens, seeds, R, gamma, V, threadIdx.x, kConsumers,
                     consumers_sync);
  // This thread's requests (their settings load while the H rows below do).
  const int wg = warp / 4, half = wg % halves, group = wg / halves;
  const int gid = lane >> 2, quad = lane & 3;
  const int rows[2] = {half * kHalfRows + (warp % 4) * 16 + gid, half * kHalfRows + (warp % 4) * 16 + gid + 8};
  const bool epilogue = !kMaxKey && U != nullptr;
  // Staged: thread t of the warpgroup serves request t / 8, vocab 8·(t % 8) .. +7 of each tile.
  const int staged_row = (threadIdx.x % 128) / 8, staged_part = threadIdx.x % 8;
  const auto request = [&](int r) {
    if constexpr (kResidual) return ResidualRequest<UT>(r, R, U, temperature, seeds, gamma, V, residual_rows, verdicts);
    else return RowRequest<UT>(r, R, U, temperature, seeds, k, gamma, V);
  };
  const decltype(request(0)) req[2] = {request(kStaged ? staged_row : rows[0]), request(kStaged ? R : rows[1])};
  const bool gather = kResidual && residual_rows.tests.ell != nullptr;
  const WT* w1 = static_cast<const WT*>(residual_rows.tests.w1);
  // W1[x] rows into wgmma's layout: row m of a half, 16-byte chunk c of K block kb at
  // kb·8 KB + 128·m + 16·(c ^ (m % 8)); zeros past R. A thread's loads are all issued before its
  // stores (one memory round trip, not one per chunk).
  constexpr int kFill = kMaxRequests * (kRank / 8) / kConsumers;
  uint4 val[kFill];
#pragma unroll
  for (int f = 0; f < kFill; ++f) {
    const int i = threadIdx.x + f * kConsumers, row = i / (kRank / 8), chunk = i % (kRank / 8);
    val[f] = make_uint4(0, 0, 0, 0);
    if (row < R) {
      const WT* src = gather ? w1 + static_cast<int64_t>(verdicts.before[row]) * kRank : h + row * ldh;
      val[f] = *reinterpret_cast<const uint4*>(src + 8 * chunk);
    }
  }
#pragma unroll
  for (int f = 0; f < kFill; ++f) {
    const int i = threadIdx.x + f * kConsumers, row = i / (kRank / 8), chunk = i % (kRank / 8);
    const int m = row % kHalfRows, kb = chunk / 8, c = chunk % 8;
    if (row < halves * kHalfRows)
      *reinterpret_cast<uint4*>(w1x + (row / kHalfRows) * kHalfBytes + kb * kBlockBytes + 128 * m + 16 * (c ^ (m & 7))) =
          val[f];
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // wgmma reads through the async proxy
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");   // consumers only

  State p[2] = {empty_state<kResidual>(), empty_state<kResidual>()};
  RowMaxTaker<UT> taker{static_cast<const UT*>(row_max.U), row_max.keys, max_temperature, row_max.gamma, R, V, k, half};
  const uint64_t a_desc = swizzled_desc(smem_u32(w1x + half * kHalfBytes));
  float acc[32];

  for (int t = group, n = 0; t < count; t += groups, ++n) {
    const int slot = t % kSlots;
    const int v0 = tile_at(t) * kTileVocab;
    const int v = v0 + (kStaged ? 8 * staged_part : 16 * quad);  // this thread's first vocab id of the tile
    constexpr int kEntries = kStaged ? 8 : 16;
    uint4 u[2][kEntries * sizeof(UT) / 16];  // in flight during the multiply
    load_u<kEntries, UT>(req[0], v, u[0]);
    if (!kStaged) load_u<kEntries, UT>(req[1], v, u[1]);
    // Staged rejection rows: p too (unstaged, its 32 registers a thread would spill the epilogue).
    float p_early[kResidual && kStaged ? 8 : 1];
    if constexpr (kResidual && kStaged) {
      if (req[0].active) load_vec<8>(req[0].p_row.x + v, p_early);
    }
    if constexpr (kMaxKey) {
      taker.load(v0);
      if (t + groups < count) taker.prefetch(tile_at(t + groups) * kTileVocab);
    }
    mbar_wait(&full[slot], (t / kSlots) & 1);
    const uint64_t b_desc = swizzled_desc(smem_u32(ring + slot * kTileBytes));
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int kb = 0; kb < kKBlocks; ++kb) {
#pragma unroll
      for (int s = 0; s < 4; ++s)
        wgmma_64x64x16<WT>(acc, desc_lo(a_desc, kb * kBlockBytes + 32 * s), desc_hi(a_desc),
                           desc_lo(b_desc, kb * kBlockBytes + 32 * s), desc_hi(b_desc), kb | s);
    }
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    fence_fragment(acc);
    if constexpr (kRowsOut) {
      if (!epilogue)
        write_bias_rows(acc, ring + slot * kTileBytes, rows_out, R, V, v0, half, halves, group,
                        kMaxKey ? &taker : nullptr);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&freed[slot]);

    float* staged = stage + ((n & 1) * kGroups + wg) * kStagedMaxRequests * kStageStride;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float x[16];  // entry 2j + e (vocab v0 + 16·quad + 2j + e) is column 8j + 2·quad + e: acc[4j + 2i + e]
#pragma unroll
      for (int j = 0; j < 8; ++j) x[2 * j] = acc[4 * j + 2 * i], x[2 * j + 1] = acc[4 * j + 2 * i + 1];
      if (!epilogue) continue;
      if constexpr (kStaged) {
        if (warp % 4 == 0) {
          float4* dst = reinterpret_cast<float4*>(staged + (gid + 8 * i) * kStageStride + 16 * quad);
#pragma unroll
          for (int c = 0; c < 4; ++c) dst[c] = make_float4(x[4 * c], x[4 * c + 1], x[4 * c + 2], x[4 * c + 3]);
        }
      } else if (req[i].active) {
        visit_entries<16>(p[i], x, u[i], req[i], v, k);
        if constexpr (kRowsOut) {  // greedy rows: q is one-hot, x unused
          if (!req[i].greedy) store_entries<16>(rows_out + (req[i].u_row - U) + v, x);
        }
      }
    }
    if constexpr (kStaged) {
      if (!epilogue) continue;
      asm volatile("bar.sync %0, 128;" ::"r"(2 + wg) : "memory");  // this warpgroup's staged rows are written
      float x[8];
      const float4* src = reinterpret_cast<const float4*>(staged + staged_row * kStageStride + 8 * staged_part);
      const float4 a = src[0], b = src[1];
      x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
      if constexpr (kResidual) {
        if (req[0].active) visit_entries<8>(p[0], x, u[0], req[0], v, k, p_early);
      } else if (req[0].active) {
        visit_entries<8>(p[0], x, u[0], req[0], v, k);
        if constexpr (kRowsOut) {
          if (!req[0].greedy) store_entries<8>(rows_out + (req[0].u_row - U) + v, x);
        }
      }
    }
  }
  if (!epilogue) {
    if constexpr (kMaxKey) taker.finish(cta_max);
    return;
  }

  // Per request: its threads (a quad, or eight staged threads), then the groups' warps in order;
  // one result (r, CTA).
  if constexpr (kStaged) {
    const State mine = group_combine<8>(p[0]);
    if (lane % 8 == 0) merged[warp][lane / 8] = mine;
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const State mine = group_combine<4>(p[i]);
      if (quad == 0) merged[warp][gid + 8 * i] = mine;
    }
  }
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");
  for (int r = threadIdx.x; r < R; r += kConsumers) {
    State all = empty_state<kResidual>();
    for (int g = 0; g < groups; ++g) {
      all = combine(all, kStaged ? merged[4 * g + r / 4][r % 4]
                                 : merged[4 * (g * halves + r / kHalfRows) + (r % kHalfRows) / 16][r % 16]);
    }
    static_cast<State*>(results)[static_cast<int64_t>(r) * gridDim.x + blockIdx.x] = all;
  }
  if constexpr (kResidual) {
    if (residual_rows.out_tokens != nullptr)
      finish_residual(static_cast<const Race*>(results), residual_rows, verdicts, seeds, R, gamma, V);
  }
#else
  __trap();  // built without sm_90a: fused_step_supported keeps the host from launching this
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    TORCH_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
                "dspark: the CUDA driver lacks cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// W2 [V, 256] as 5-D tiles (k, e, q, j, tile) -> W2[64·tile + 16q + 2j + e, k]: a box {64, 2, 4, 8, 1}
// lands in shared memory as row 8j + 2q + e (the permutation in the header comment), 128-byte swizzled.
CUtensorMap w2_tile_map(const at::Tensor& w2) {
  const cuuint64_t row = kRank * w2.element_size();
  const cuuint64_t dims[5] = {kRank, 2, 4, 8, static_cast<cuuint64_t>(w2.size(0) / kTileVocab)};
  const cuuint64_t strides[4] = {row, 16 * row, 2 * row, 64 * row};
  const cuuint32_t box[5] = {64, 2, 4, 8, 1};
  const cuuint32_t unit[5] = {1, 1, 1, 1, 1};
  CUtensorMap map;
  const CUresult res = tensor_map_encoder()(
      &map, w2.scalar_type() == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 5,
      w2.data_ptr(), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(res == CUDA_SUCCESS, "dspark: cuTensorMapEncodeTiled failed for W2 (CUresult ", static_cast<int>(res),
              ")");
  return map;
}

// A programmatic dependent of the previous kernel (the previous step's reduce, or rejection's
// accept_kernel): the producer starts streaming W2 while it drains.
template <typename WT, typename UT, bool kStaged, bool kRowsOut, bool kResidual, bool kMaxKey = false>
void launch(const at::Tensor& w2, const WT* h, int64_t ldh, int R, const UT* U, const float* temperature,
            const int64_t* seeds, const ResidualRows& residual_rows, void* results, float* rows_out, int k, int gamma,
            const RowMaxKeys& row_max, cudaStream_t stream) {
  auto* kernel = fused_step_kernel<WT, UT, kStaged, kRowsOut, kResidual, kMaxKey>;
  allow_dynamic_smem(kernel, smem_bytes(kStaged));  // the ring and W1[x] exceed 48 KB
  launch_programmatic(kernel, dim3(fused_step_blocks(w2.size(0))), dim3(kFusedThreads), smem_bytes(kStaged), stream,
                      w2_tile_map(w2), h, ldh, R, static_cast<int>(w2.size(0)), U, temperature, seeds, residual_rows,
                      results, rows_out, k, gamma, row_max);
}

// The chain's launchers and rejection's for one (W, U) dtype pair and R.
template <typename WT, typename UT>
void dispatch(const at::Tensor& w2, const void* h, int64_t ldh, int R, const void* U, const float* temperature,
              const int64_t* seeds, const ResidualRows* residual_rows, void* results, float* rows_out, int k, int gamma,
              const RowMaxKeys& row_max, cudaStream_t stream) {
  const bool staged = R <= kStagedMaxRequests;
  const WT* hp = static_cast<const WT*>(h);
  const UT* up = static_cast<const UT*>(U);
  if (residual_rows != nullptr) {
    auto* run = staged ? launch<WT, UT, true, false, true> : launch<WT, UT, false, false, true>;
    run(w2, hp, ldh, R, up, temperature, seeds, *residual_rows, results, nullptr, 0, gamma, RowMaxKeys{}, stream);
    return;
  }
  auto* run = row_max.keys != nullptr ? launch<WT, UT, false, true, false, true>  // bias rows: nothing staged
               : rows_out == nullptr   ? (staged ? launch<WT, UT, true, false, false> : launch<WT, UT, false, false, false>)
                                       : (staged ? launch<WT, UT, true, true, false> : launch<WT, UT, false, true, false>);
  run(w2, hp, ldh, R, up, temperature, seeds, ResidualRows{}, results, rows_out, k, gamma, row_max, stream);
}

template <typename F>
void with_types(const at::Tensor& w2, at::ScalarType u_type, F&& f) {
  AT_DISPATCH_REDUCED_FLOATING_TYPES(w2.scalar_type(), "dspark_fused_step", [&] {
    using WT = device_t<scalar_t>;  // U without a row (bias only) comes as bf16
    with_float_type(u_type, "dspark: U must be bf16, fp16 or fp32", [&](auto u_tag) { f(WT{}, u_tag); });
  });
}

}  // namespace

bool fused_step_supported(const at::Tensor& w2, const void* h, int64_t ldh, int R) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  return !markov_path_forced("gemm") && props->major == 9 && built_from(900) && R <= kMaxRequests &&
         (w2.scalar_type() == at::kBFloat16 || w2.scalar_type() == at::kHalf) && w2.size(1) == kRank &&
         w2.size(0) % kTileVocab == 0 && aligned16(w2.data_ptr()) && aligned16(h) && ldh % 8 == 0 &&
         // + the static shared memory (mbarriers, merged partials: about 5 KB)
         static_cast<size_t>(std::max(smem_bytes(false), smem_bytes(true))) + 8192 <= props->sharedMemPerBlockOptin;
}

int fused_step_blocks(int V) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max(1, std::min(sms, V / kTileVocab));
}

void fused_step(const at::Tensor& w2, const void* h, int64_t ldh, int R, const void* U, at::ScalarType u_type,
                const float* temperature, const int64_t* seeds, Partial* partials, float* rows_out, int k, int gamma,
                cudaStream_t stream, const RowMaxKeys* max_keys) {
  TORCH_CHECK(max_keys == nullptr || (U == nullptr && rows_out != nullptr && max_keys->u_type == u_type),
              "dspark: the fused step takes row max keys only as it writes bias rows, with their U's type");
  with_types(w2, u_type, [&](auto w_tag, auto u_tag) {
    dispatch<decltype(w_tag), decltype(u_tag)>(w2, h, ldh, R, U, temperature, seeds, nullptr, partials, rows_out, k,
                                               gamma, max_keys ? *max_keys : RowMaxKeys{}, stream);
  });
}

void fused_residual(const at::Tensor& w2, const void* h, int64_t ldh, int R, const void* U, at::ScalarType u_type,
                    const float* temperature, const int64_t* seeds, const ResidualRows& rows, Race* races, int gamma,
                    cudaStream_t stream) {
  with_types(w2, u_type, [&](auto w_tag, auto u_tag) {
    dispatch<decltype(w_tag), decltype(u_tag)>(w2, h, ldh, R, U, temperature, seeds, &rows, races, nullptr, 0, gamma,
                                               RowMaxKeys{}, stream);
  });
}

}  // namespace dspark
