// Small top-k (k <= 64) for the Markov chain's warped steps (docs/kernels.md). warp.cu's radix
// selection reads a warped row two or three times per criterion before the split pass reads it again
// to sample; for a small k one read suffices, as only the few entries that can be among the k largest
// matter, and those can be listed on the way:
//   slice pass, grid (slices, R), 4096 entries a block: keys of x = (U_k + bias) / T (the split
//     pass's arithmetic) in registers; a bound θ <= the slice's k-th largest from the threads'
//     maxima; of the entries >= θ (a few k) the list keeps those with fewer than k entries of the
//     list strictly above them: the slice's top-k with its ties, and its k-th key.
//   pick, a block per request: the listed entries at or above the largest of the slices' k-th keys
//     (a bound on the row's k-th) hold every entry the row keeps (an entry at or above the row's
//     k-th has fewer than k above it in its own slice, so its slice listed it); the row's k-th key
//     by radix selection among them in shared memory. Top-p among the kept by warp_rule.cuh's
//     fixed-point masses, as warp.cu; then every race group holding a kept entry, as visit8 sees it
//     in the split pass (the rest of the group -inf) with the split pass's noise: the same group
//     keys, the same token, and partials that reduce_kernel merges as the split pass's.
// A list that overflows (many ties: a constant row) leaves its row to warp.cu and the split pass;
// when the caller skips warp.cu (its host-side bound puts every row's top-k at most 64), the pick
// finds that row's threshold over the whole row itself, as it does for any other warped row the
// lists cannot take, and the split pass samples it.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "launch.h"
#include "philox.cuh"
#include "top_k.h"
#include "warp_rule.cuh"

namespace dspark {
namespace {

constexpr int kThreads = 256;
constexpr int kSlice = 4096;     // entries per slice-pass block, 16 per thread
constexpr int kListCap = 1024;   // a slice's entries >= θ
constexpr int kKeep = 128;       // a slice's top-k with ties, as stored
constexpr int kPickCap = 4096;   // listed entries at or above the slices' largest k-th key
constexpr int kKeptCap = 256;    // the row's top-k with its ties
constexpr unsigned kNegInfKey = 0x007fffffu;  // order_key(-inf): entries at or below it weigh nothing

__device__ __forceinline__ bool small_top_k(const int64_t* top_k, int r, int V, float T) {
  return top_k_on(top_k, r, V, T) && top_k[r] <= kSmallTopKMax;
}

template <typename UT, bool kVec>
__global__ void __launch_bounds__(kThreads) slice_kernel(
    const UT* __restrict__ U, const float* __restrict__ bias, const float* __restrict__ temperature,
    const int64_t* __restrict__ top_k, unsigned* __restrict__ keys, int* __restrict__ ids, int* __restrict__ count,
    unsigned* __restrict__ kth_key, unsigned* __restrict__ overflow, int k, int gamma, int V) {
  wait_previous_kernel();  // launched programmatically after the bias GEMM
  allow_next_kernel();
  const int r = blockIdx.y;
  const float T = temperature[r];
  if (!small_top_k(top_k, r, V, T)) return;
  const int K = static_cast<int>(top_k[r]);
  __shared__ unsigned s_list_key[kListCap];
  __shared__ uint16_t s_list[kListCap];
  __shared__ unsigned s_theta, s_listed, s_kept, s_kth;
  if (threadIdx.x == 0) s_theta = s_kth = 0xffffffffu, s_listed = s_kept = 0;
  const int start = blockIdx.x * kSlice, n = min(kSlice, V - start);
  const UT* u_row = U + (static_cast<int64_t>(r) * gamma + k) * V + start;
  const float* b_row = bias + static_cast<int64_t>(r) * V + start;
  unsigned key[2][8], my_max = 0;  // kSlice = 2 · 8 · kThreads: two groups of 8 per thread, 0 past n
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int j = 8 * threadIdx.x + h * 8 * kThreads;
    float x[8];
    if (kVec && j < n) {  // n % 8 == 0 here (V % 8 == 0)
      float u[8], b[8];
      load_vec<8>(u_row + j, u);
      load_vec<8>(b_row + j, b);
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] = draft_logit(u[i], b[i], T);
    } else if (!kVec) {
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] = j + i < n ? draft_logit(to_float(u_row[j + i]), b_row[j + i], T) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      key[h][i] = j + i < n ? order_key(x[i]) : 0u;
      my_max = max(my_max, key[h][i]);
    }
  }
  // θ: each warp's c-th largest thread maximum, c = ceil(K / 8), the least of the 8 warps': each
  // warp has c maxima >= θ, so 8·c >= K entries are. (The exact K-th of the 256 maxima, ranked by
  // every thread, cost more than the pass's loads.) Not in a row's last slice when it is partial:
  // there threads past n hold no entry, their maxima 0, so a warp of them made θ 0 and every
  // finite entry was listed, more than kListCap from 1025 entries: every row's lists overflowed at
  // V = 128256 or 50257. That one block per row ranks the 256 maxima instead (θ their K-th largest:
  // K threads, K entries at or above it), unless fewer than K threads hold entries (V = 151936's
  // 376): the K-th largest is then a 0, θ too, without the rank.
  const bool partial = n < kSlice;  // the block's
  const bool ranked = partial && min(kThreads, (n + 7) / 8) >= K;
  const int c = (K + kThreads / 32 - 1) / (kThreads / 32), lane = threadIdx.x % 32;
  __shared__ unsigned s_thread_max[kThreads];
  unsigned mine = my_max, cth = 0;
  if (ranked) s_thread_max[threadIdx.x] = my_max;
  for (int i = 0; !partial && i < c; ++i) {
    cth = mine;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) cth = max(cth, __shfl_xor_sync(0xffffffffu, cth, off));
    const unsigned holders = __ballot_sync(0xffffffffu, mine == cth);
    if (lane == __ffs(holders) - 1) mine = 0;  // one holder of the i-th largest steps out
  }
  __syncthreads();  // the counters' zeroing (and a partial slice's maxima) is seen
  if (ranked) {
    int greater = 0;
#pragma unroll 8
    for (int t = 0; t < kThreads; ++t) greater += s_thread_max[t] > my_max;
    if (greater < K) atomicMin(&s_theta, my_max);  // the least such maximum: the K-th largest
  } else if (partial) {
    if (threadIdx.x == 0) s_theta = 0;
  } else if (lane == 0) {
    atomicMin(&s_theta, cth);
  }
  __syncthreads();
  const unsigned theta = max(s_theta, kNegInfKey + 1);  // no -inf entry is listed
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (key[h][i] >= theta) {
        const unsigned at = atomicAdd(&s_listed, 1u);
        if (at < kListCap) {
          s_list[at] = static_cast<uint16_t>(8 * threadIdx.x + h * 8 * kThreads + i);
          s_list_key[at] = key[h][i];
        }
      }
    }
  }
  __syncthreads();
  const unsigned listed = s_listed;
  const int64_t slot = static_cast<int64_t>(r) * gridDim.x + blockIdx.x;
  if (listed > kListCap) {
    if (threadIdx.x == 0) overflow[r] = 1u;
    return;
  }
  for (unsigned i = threadIdx.x; i < listed; i += kThreads) {
    const unsigned listed_key = s_list_key[i];
    int greater = 0;
    for (unsigned j = 0; j < listed; ++j) greater += s_list_key[j] > listed_key;
    if (greater >= K) continue;
    const unsigned at = atomicAdd(&s_kept, 1u);
    if (at < kKeep) keys[slot * kKeep + at] = listed_key, ids[slot * kKeep + at] = start + s_list[i];
    atomicMin(&s_kth, listed_key);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (s_kept > kKeep) overflow[r] = 1u;
    count[slot] = min(s_kept, static_cast<unsigned>(kKeep));
    kth_key[slot] = listed >= static_cast<unsigned>(K) ? s_kth : 0u;  // fewer: no bound from this slice
  }
}

// Step k's x = (U_k + bias) / T of one row, computed as the split pass computes it, as order keys.
template <typename UT>
struct RowKeys {
  const UT* u;
  const float* b;
  float T;
  int V;
  __device__ __forceinline__ unsigned operator[](int v) const { return order_key(draft_logit(to_float(u[v]), b[v], T)); }
};

struct ListedKeys {  // keys the pick gathered in shared memory
  const unsigned* keys;
  __device__ __forceinline__ unsigned operator[](int i) const { return keys[i]; }
};

template <typename UT>
__device__ unsigned row_max_key(const RowKeys<UT>& row) {
  __shared__ unsigned s_max;
  if (threadIdx.x == 0) s_max = 0;
  __syncthreads();
  unsigned mine = 0;
  for (int v = threadIdx.x; v < row.V; v += kThreads) mine = max(mine, row[v]);
  atomicMax(&s_max, mine);
  __syncthreads();
  return s_max;
}

constexpr int kFlushEntries = 65536;  // 65536 · (2^16 - 1) < 2^32: the 16-bit halves' sums fit

// The largest of keys[0 .. n) (keys below `floor` left out) whose weight at and above it reaches
// the target: with counts (kMass false) and target K the K-th largest key, ties kept; with masses
// exp(x - m) in warp_rule.cuh's fixed point and target ceil(p·Z) (Z: the mass at and above floor;
// p <= 0: 0, the largest key) top-p's threshold: the key warp.cu's rounds find. Four rounds of 8
// key bits in this one block, each reading the keys (a row: RowKeys, or the pick's list:
// ListedKeys); thread t holds digit 255 - t. Masses add in shared memory as 16-bit halves on
// 32-bit counters, taken into 64 bits every kFlushEntries keys (warp.cu's scheme: a 64-bit shared
// atomic add is a compare-and-swap loop). kNegInfKey (keep everything) if no key reaches the
// target, which the targets do not allow.
template <bool kMass, typename Keys>
__device__ unsigned select_from_top(const Keys& keys, int n, unsigned floor, float m, float p, int K) {
  __shared__ unsigned s_count[kThreads], s_lo[kThreads], s_hi[kThreads];
  __shared__ unsigned long long s_warp[kThreads / 32], s_above;
  __shared__ int s_digit;
  const int digit = kThreads - 1 - static_cast<int>(threadIdx.x);
  unsigned prefix = 0;
  unsigned long long above = 0, target = static_cast<unsigned long long>(K);
  for (int shift = 24; shift >= 0; shift -= 8) {
    unsigned count = 0;
    unsigned long long weight = 0;
    for (int base = 0; base < n; base += kFlushEntries) {
      s_count[threadIdx.x] = s_lo[threadIdx.x] = s_hi[threadIdx.x] = 0;
      if (threadIdx.x == 0) s_digit = -1;
      __syncthreads();
      const int end = min(n, base + kFlushEntries);
      for (int i = base + static_cast<int>(threadIdx.x); i < end; i += kThreads) {
        const unsigned key = keys[i];
        if (key < floor || (shift < 24 && key >> (shift + 8) != prefix >> (shift + 8))) continue;
        const unsigned d = key >> shift & 255u;
        atomicAdd(&s_count[d], 1u);
        if constexpr (kMass) {
          const unsigned mass = fixed_mass(key_value(key) - m);
          atomicAdd(&s_lo[d], mass & 0xffffu);
          atomicAdd(&s_hi[d], mass >> 16);
        }
      }
      __syncthreads();
      count += s_count[digit];
      weight += kMass ? (static_cast<unsigned long long>(s_hi[digit]) << 16) + s_lo[digit] : s_count[digit];
      __syncthreads();  // the bins read before the next chunk zeroes them
    }
    unsigned long long total;
    const unsigned long long before = above + warps_exclusive_scan<kThreads / 32>(  // the digits above mine
        weight, static_cast<int>(threadIdx.x) / 32, s_warp, [] { __syncthreads(); }, &total);
    if (kMass && shift == 24)
      target = p <= 0.f ? 0ull : static_cast<unsigned long long>(ceil(static_cast<double>(p) * static_cast<double>(total)));
    if (count > 0 && before + weight >= target) atomicMax(&s_digit, digit);  // the first from the top
    __syncthreads();
    const int chosen = s_digit;
    if (chosen < 0) return kNegInfKey;
    if (digit == chosen) s_above = before;
    __syncthreads();
    prefix |= static_cast<unsigned>(chosen) << shift;
    above = s_above;
    __syncthreads();  // s_digit and s_above read before the next round writes them
  }
  return prefix;
}

// Threshold of a warped row the candidate lists do not take, over the whole row: top-k's key, then
// top-p's at and above it (warp.cu's rule, one block instead of its rounds; see select_from_top).
template <typename UT>
__device__ void whole_row_threshold(const RowKeys<UT>& row, const int64_t* top_k, const float* top_p, int r,
                                    float* threshold) {
  unsigned key = 0;  // no floor
  if (top_k_on(top_k, r, row.V, row.T))
    key = select_from_top<false>(row, row.V, 0u, 0.f, 0.f, static_cast<int>(top_k[r]));
  if (top_p_on(top_p, r, row.T))
    key = select_from_top<true>(row, row.V, key, key_value(row_max_key(row)), top_p[r], 0);
  if (threadIdx.x == 0) *threshold = key_value(key);
}

template <typename UT>
__global__ void __launch_bounds__(kThreads) pick_kernel(
    const UT* __restrict__ U, const float* __restrict__ bias, const float* __restrict__ temperature,
    const int64_t* __restrict__ top_k, const float* __restrict__ top_p, const int64_t* __restrict__ seeds,
    const unsigned* __restrict__ keys, const int* __restrict__ ids, const int* __restrict__ count,
    const unsigned* __restrict__ kth_key, unsigned* __restrict__ overflow, unsigned* __restrict__ picked,
    float* __restrict__ threshold, Partial* __restrict__ partials, int parts, int k, int gamma, int V, int slices,
    bool whole_rows) {
  wait_previous_kernel();  // launched programmatically after the slice pass
  const int r = blockIdx.x;
  const float T = temperature[r];
  const RowKeys<UT> row{U + (static_cast<int64_t>(r) * gamma + k) * V, bias + static_cast<int64_t>(r) * V, T, V};
  float* row_threshold = threshold + static_cast<int64_t>(r) * gamma + k;
  // A row the lists do not take (picked[r] 0: the split pass samples it): its threshold from the
  // whole row when warp.cu's rounds do not run.
  const auto leave = [&] {
    if (threadIdx.x == 0) picked[r] = 0;
    if (whole_rows) whole_row_threshold(row, top_k, top_p, r, row_threshold);
  };
  if (!small_top_k(top_k, r, V, T)) {
    if (whole_rows && (top_k_on(top_k, r, V, T) || top_p_on(top_p, r, T))) leave();  // k > 64, or top-p alone
    return;
  }
  const int K = static_cast<int>(top_k[r]);
  __shared__ unsigned s_key[kPickCap];
  __shared__ int s_id[kPickCap];
  __shared__ unsigned s_kept_key[kKeptCap], s_mass[kKeptCap], s_kept_id[kKeptCap];
  __shared__ Partial s_groups[kKeptCap];
  __shared__ unsigned s_floor, s_n, s_kept, s_max, s_final;
  __shared__ unsigned long long warp_sums[kThreads / 32];
  const bool overflowed = overflow[r] != 0;
  if (threadIdx.x == 0) s_floor = s_n = s_kept = s_max = s_final = 0;
  __syncthreads();  // overflow read by every thread
  if (overflowed) {
    if (threadIdx.x == 0) overflow[r] = 0;
    leave();
    return;
  }
  // The listed entries at or above the largest of the slices' k-th keys (a bound on the row's).
  const int64_t first = static_cast<int64_t>(r) * slices;
  for (int s = threadIdx.x; s < slices; s += kThreads) atomicMax(&s_floor, kth_key[first + s]);
  __syncthreads();
  const unsigned floor = s_floor;
  for (int e = threadIdx.x; e < slices * kKeep; e += kThreads) {
    const int s = e / kKeep, i = e % kKeep;
    if (i >= count[first + s]) continue;
    const unsigned key = keys[(first + s) * kKeep + i];
    if (key < floor) continue;
    const unsigned at = atomicAdd(&s_n, 1u);
    if (at < kPickCap) s_key[at] = key, s_id[at] = ids[(first + s) * kKeep + i];
  }
  __syncthreads();
  const unsigned n = s_n;
  if (n == 0 || n > kPickCap) {  // a row all -inf (bad input), or too many ties
    leave();
    return;
  }
  // Top-k: the K-th largest key, ties kept; everything (-inf too) when fewer than K are above -inf.
  const unsigned top_k_key =
      n < static_cast<unsigned>(K) ? kNegInfKey : select_from_top<false>(ListedKeys{s_key}, static_cast<int>(n), 0u, 0.f, 0.f, K);
  for (unsigned i = threadIdx.x; i < n; i += kThreads) {
    if (s_key[i] < top_k_key) continue;
    const unsigned at = atomicAdd(&s_kept, 1u);
    if (at < kKeptCap) s_kept_key[at] = s_key[i], s_kept_id[at] = s_id[i];
    atomicMax(&s_max, s_key[i]);
  }
  __syncthreads();
  const unsigned kept = s_kept;
  if (kept > kKeptCap) {  // ties at the threshold
    leave();
    return;
  }
  unsigned final_key = top_k_key;
  if (top_p_on(top_p, r, T)) {  // the largest kept key whose mass at and above it reaches ceil(p·Z)
    const float m = key_value(s_max);
    unsigned long long mine = 0;
    for (unsigned i = threadIdx.x; i < kept; i += kThreads) {
      s_mass[i] = fixed_mass(key_value(s_kept_key[i]) - m);
      mine += s_mass[i];
    }
    unsigned long long total;
    warps_exclusive_scan<kThreads / 32>(mine, static_cast<int>(threadIdx.x) / 32, warp_sums,
                                        [] { __syncthreads(); }, &total);  // its barrier: s_mass written
    const unsigned long long target = top_p[r] <= 0.f ? 0ull : static_cast<unsigned long long>(
        ceil(static_cast<double>(top_p[r]) * static_cast<double>(total)));
    for (unsigned i = threadIdx.x; i < kept; i += kThreads) {
      unsigned long long at_or_above = 0;
      for (unsigned j = 0; j < kept; ++j) at_or_above += s_kept_key[j] >= s_kept_key[i] ? s_mass[j] : 0u;
      if (at_or_above >= target) atomicMax(&s_final, s_kept_key[i]);
    }
    __syncthreads();
    final_key = s_final;
  }
  // The race: each group with a kept entry, at its lowest kept id, as the split pass's visit8. A
  // group's partial goes to the slot counting the kept entries of lower groups, and the slots merge
  // in a fixed order: the same sums on every call.
  for (unsigned i = threadIdx.x; i < kept; i += kThreads) s_groups[i] = empty_partial();
  __syncthreads();
  const PhiloxKey philox = philox_key(seeds[r]);
  for (unsigned i = threadIdx.x; i < kept; i += kThreads) {
    if (s_kept_key[i] < final_key) continue;
    const int id = static_cast<int>(s_kept_id[i]), group = id >> 3;
    bool lowest = true;
    unsigned slot = 0;
    float x[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = -INFINITY;
    for (unsigned j = 0; j < kept; ++j) {
      if (s_kept_key[j] < final_key) continue;
      const int other = static_cast<int>(s_kept_id[j]);
      slot += other >> 3 < group;
      if (other >> 3 != group) continue;
      lowest &= other >= id;
      x[other & 7] = key_value(s_kept_key[j]);
    }
    if (!lowest) continue;
    const GroupNoise noise = group_noise(counter_words(philox, kStreamDraft, k, static_cast<uint32_t>(group) >> 1), group);
    visit8<true>(s_groups[slot], x, group << 3, noise);
  }
  __syncthreads();
  Partial p = empty_partial();
  for (unsigned i = threadIdx.x; i < kept; i += kThreads) p = combine(p, s_groups[i]);
  p = block_combine<kThreads>(p);
  for (int i = threadIdx.x; i < parts; i += kThreads)
    partials[static_cast<int64_t>(r) * parts + i] = i == 0 ? p : empty_partial();  // thread 0 holds p
  if (threadIdx.x == 0) {
    *row_threshold = key_value(final_key);
    picked[r] = 1u;
  }
}

}  // namespace

TopKScratch TopKScratch::make(const at::Tensor& like, int R, int V) {
  const int slices = (V + kSlice - 1) / kSlice;
  auto ints = like.options().dtype(at::kInt);
  return {at::empty({R, slices, kKeep}, ints), at::empty({R, slices, kKeep}, ints), at::empty({R, slices}, ints),
          at::empty({R, slices}, ints), at::zeros({R}, ints), at::zeros({R}, ints)};
}

void top_k_candidates(const at::Tensor& U, const at::Tensor& bias, const float* temperature, const int64_t* top_k,
                      const float* top_p, const int64_t* seeds, TopKScratch& scratch, float* threshold,
                      Partial* partials, int parts, int k, bool whole_rows, cudaStream_t stream) {
  const int R = U.size(0), gamma = U.size(1), V = U.size(2), slices = scratch.count.size(1);
  auto* keys = reinterpret_cast<unsigned*>(scratch.keys.data_ptr<int>());
  auto* kth_key = reinterpret_cast<unsigned*>(scratch.kth_key.data_ptr<int>());
  auto* overflow = reinterpret_cast<unsigned*>(scratch.overflow.data_ptr<int>());
  auto* picked = reinterpret_cast<unsigned*>(scratch.picked.data_ptr<int>());
  DSPARK_DISPATCH_FLOATS(U.scalar_type(), "dspark_top_k_candidates", [&] {
    using UT = device_t<scalar_t>;
    const UT* up = reinterpret_cast<const UT*>(U.data_ptr());
    auto slice = V % 8 == 0 && aligned16(up) ? slice_kernel<UT, true> : slice_kernel<UT, false>;
    launch_programmatic(slice, dim3(slices, R), dim3(kThreads), 0, stream, up, bias.data_ptr<float>(), temperature,
                        top_k, keys, scratch.ids.data_ptr<int>(), scratch.count.data_ptr<int>(), kth_key, overflow,
                        k, gamma, V);
    launch_programmatic(pick_kernel<UT>, dim3(R), dim3(kThreads), 0, stream, up, bias.data_ptr<float>(), temperature,
                        top_k, top_p, seeds, keys, scratch.ids.data_ptr<int>(), scratch.count.data_ptr<int>(), kth_key,
                        overflow, picked, threshold, partials, parts, k, gamma, V, slices, whole_rows);
  });
}

}  // namespace dspark
