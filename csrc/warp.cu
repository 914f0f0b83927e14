// Top-k / top-p for the Markov chain's warped rows (docs/kernels.md). A warped row keeps exactly the
// entries x >= t, one threshold t per request and step, found by radix selection over x's
// order-preserving 32-bit keys: three rounds (11, 11, 10 key bits) per criterion, each a histogram
// pass over the row and a pick per request. When round 0's bin holds at most 1024 entries, round 1's
// pass also lists their keys and round 2 histograms the list in its pick instead of a pass.
//   top-k: t = the k-th largest x (ties kept, as the reference's `sorted < kth` mask);
//   top-p: among the entries >= top-k's t, the smallest x whose mass strictly above it is < p·Z
//          (Z: the mass of those entries), the reference's cumulative rule with ties kept.
// Masses are exp(x - max) in 2^-31 fixed point summed with integer atomics: the histograms, and so
// the thresholds, do not depend on the order blocks add in, so every run keeps the same entries. In
// shared memory each mass goes in as two 16-bit halves on 32-bit counters (a 64-bit shared atomic
// add compiles to a compare-and-swap loop, which the few bins of round 0 made the pass's cost), so a
// block takes at most 65536 entries: the halves' sums fit.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "common.cuh"
#include "launch.h"
#include "warp.h"
#include "warp_rule.cuh"

namespace dspark {
namespace {

constexpr int kWarpThreads = 256;
constexpr int kBins = 2048;  // the widest round's digit: 11 bits
constexpr int kMaxBlockEntries = 65536;  // 65536 · (2^16 - 1) < 2^32: a block's low halves fit
constexpr int kCandidates = 1024;        // round 1's list of keys, per request (4 KB: the passes keep 8 blocks per SM)

__host__ __device__ constexpr int round_bits(int round) { return round == 2 ? 10 : 11; }
__host__ __device__ constexpr int round_shift(int round) { return round == 0 ? 21 : round == 1 ? 10 : 0; }

struct WarpRow {
  unsigned prefix;            // the key bits the rounds so far fixed
  unsigned floor_key;         // top-p's rounds skip keys below it: top-k's threshold (0: none)
  unsigned listed;            // round 0's bin holds <= kCandidates entries: round 1 lists them
  unsigned long long above;   // weight of the entries above the key range still searched
  unsigned long long target;  // top-p: the weight the kept set must reach, ceil(p·Z)
};

// One round's histogram of request r's step-k row, grid (splits, R). kMass: a top-p round (weights
// exp(x - max), entries below floor_key out); else a top-k round (counts), whose round 0 also takes
// the row's max key (max_keys[r]) for every warped row (with top_k null it does only that). x is
// computed as the split pass computes it, so the thresholds are values of the very entries the chain
// samples from.
template <typename UT, bool kMass, bool kVec, bool kList>
__global__ void __launch_bounds__(kWarpThreads) histogram_kernel(
    const UT* __restrict__ U, const float* __restrict__ bias, const float* __restrict__ temperature,
    const int64_t* __restrict__ top_k, const float* __restrict__ top_p, WarpRow* __restrict__ rows,
    unsigned* __restrict__ max_keys, unsigned* __restrict__ counts, unsigned long long* __restrict__ masses,
    unsigned* __restrict__ cand_keys, unsigned* __restrict__ cand_count, const unsigned* __restrict__ picked, int k,
    int gamma, int V, int slice, int round) {
  wait_previous_kernel();  // launched programmatically (with top-k) after the previous round's pick or top_k.cu's
  allow_next_kernel();
  __shared__ unsigned s_count[kBins];
  __shared__ unsigned s_cand[kList ? kCandidates : 1], s_cand_n, s_cand_base;  // kList (round 1): keys counted
  __shared__ unsigned s_mass_lo[kMass ? kBins : 1], s_mass_hi[kMass ? kBins : 1];  // 16-bit halves' sums
  __shared__ unsigned s_max;
  const int r = blockIdx.y;
  if (picked && picked[r]) return;  // top_k.cu finished this row's step
  const float T = temperature[r];
  const bool p_on = top_p_on(top_p, r, T);
  const bool counting = kMass ? p_on : top_k_on(top_k, r, V, T);
  const bool maxing = !kMass && round == 0 && (counting || p_on);
  if (!counting && !maxing) return;
  if (round == 2 && rows[r].listed) return;  // the pick histograms round 1's list
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
    s_count[i] = 0;
    if constexpr (kMass) s_mass_lo[i] = s_mass_hi[i] = 0;
  }
  if (threadIdx.x == 0) s_max = s_cand_n = 0;
  __syncthreads();
  const WarpRow row = rows[r];
  const int shift = round_shift(round), above_bits = shift + round_bits(round);
  const unsigned digit_mask = (1u << round_bits(round)) - 1;
  const float m = kMass ? key_value(max_keys[r]) : 0.f;
  const int start = blockIdx.x * slice, end = min(V, start + slice);
  const UT* u_row = U + (static_cast<int64_t>(r) * gamma + k) * V;
  const float* b_row = bias + static_cast<int64_t>(r) * V;
  unsigned local_max = 0;
  const auto visit = [&](float x) {
    const unsigned key = order_key(x);
    local_max = max(local_max, key);
    if (!counting || (above_bits < 32 && (key >> above_bits) != (row.prefix >> above_bits))) return;
    if (kMass && key < row.floor_key) return;
    const unsigned digit = (key >> shift) & digit_mask;
    atomicAdd(&s_count[digit], 1u);
    if constexpr (kMass) {
      const unsigned mass = fixed_mass(x - m);
      atomicAdd(&s_mass_lo[digit], mass & 0xffffu);
      atomicAdd(&s_mass_hi[digit], mass >> 16);
    }
    if (kList && row.listed) s_cand[atomicAdd(&s_cand_n, 1u)] = key;  // at most kCandidates in all
  };
  for (int v = start + 8 * threadIdx.x; v < end; v += 8 * blockDim.x) {
    if constexpr (kVec) {
      float u[8], b[8];
      load_vec<8>(u_row + v, u);
      load_vec<8>(b_row + v, b);
#pragma unroll
      for (int i = 0; i < 8; ++i) visit(draft_logit(u[i], b[i], T));
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (v + i < end) visit(draft_logit(to_float(u_row[v + i]), b_row[v + i], T));
    }
  }
  if (maxing) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) local_max = max(local_max, __shfl_xor_sync(0xffffffffu, local_max, off));
    if (threadIdx.x % 32 == 0) atomicMax(&s_max, local_max);
  }
  __syncthreads();
  if (maxing && threadIdx.x == 0) atomicMax(&max_keys[r], s_max);
  if (!counting) return;
  if (kList && row.listed) {
    if (threadIdx.x == 0) s_cand_base = atomicAdd(&cand_count[r], s_cand_n);
    __syncthreads();
    for (unsigned i = threadIdx.x; i < s_cand_n; i += blockDim.x)
      cand_keys[static_cast<int64_t>(r) * kCandidates + s_cand_base + i] = s_cand[i];
  }
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
    if (!s_count[i]) continue;
    atomicAdd(&counts[static_cast<int64_t>(r) * kBins + i], s_count[i]);
    if constexpr (kMass) {
      atomicAdd(&masses[static_cast<int64_t>(r) * kBins + i],
                (static_cast<unsigned long long>(s_mass_hi[i]) << 16) + s_mass_lo[i]);
    }
  }
}

// One round's pick for request r (a block each): scanning the bins from the top, the first non-empty
// bin where the weight so far reaches the target (top-k: k entries; top-p: ceil(p·Z) of mass) fixes
// the round's digit; the histogram is zeroed behind the scan for the next round. Round 2 histograms
// round 1's list of keys itself when the list is whole (its pass skipped) and empties it. After
// round 2 the key is whole: top-k's becomes top-p's floor and the threshold, top-p's the threshold.
template <bool kMass>
__global__ void __launch_bounds__(kWarpThreads) pick_kernel(
    const float* __restrict__ temperature, const int64_t* __restrict__ top_k, const float* __restrict__ top_p,
    WarpRow* __restrict__ rows, unsigned* __restrict__ max_keys, unsigned* __restrict__ counts,
    unsigned long long* __restrict__ masses, const unsigned* __restrict__ cand_keys, unsigned* __restrict__ cand_count,
    const unsigned* __restrict__ picked, float* __restrict__ threshold, int V, int k, int gamma, int round,
    bool last_of_step) {
  wait_previous_kernel();  // launched programmatically (with top-k) after its round's histogram pass
  allow_next_kernel();
  const int r = blockIdx.x;
  if (picked && picked[r]) return;  // its row state stays zero
  const float T = temperature[r];
  const bool on = kMass ? top_p_on(top_p, r, T) : top_k_on(top_k, r, V, T);
  const auto reset_row = [&] {  // the next step starts from zero
    rows[r] = WarpRow{};
    max_keys[r] = 0;
  };
  if (!on) {
    if (last_of_step && threadIdx.x == 0) reset_row();
    return;
  }
  __shared__ int s_first;
  const WarpRow row = rows[r];
  const int bins = 1 << round_bits(round);
  unsigned* g_count = counts + static_cast<int64_t>(r) * kBins;
  unsigned long long* g_mass = kMass ? masses + static_cast<int64_t>(r) * kBins : nullptr;
  constexpr int kLastBins = 1 << round_bits(2);
  __shared__ unsigned l_count[kLastBins], l_lo[kMass ? kLastBins : 1], l_hi[kMass ? kLastBins : 1];
  const bool from_list = round == 2 && row.listed;
  const unsigned listed = from_list ? cand_count[r] : 0u;
  if (from_list) {  // the keys of round 1's bin that match round 1's digit too
    for (int i = threadIdx.x; i < kLastBins; i += blockDim.x) {
      l_count[i] = 0;
      if constexpr (kMass) l_lo[i] = l_hi[i] = 0;
    }
    __syncthreads();
    const float m = key_value(max_keys[r]);
    for (unsigned i = threadIdx.x; i < listed; i += blockDim.x) {
      const unsigned key = cand_keys[static_cast<int64_t>(r) * kCandidates + i];
      if ((key >> round_bits(2)) != (row.prefix >> round_bits(2)) || (kMass && key < row.floor_key)) continue;
      const unsigned digit = key & (kLastBins - 1);
      atomicAdd(&l_count[digit], 1u);
      if constexpr (kMass) {
        const unsigned mass = fixed_mass(key_value(key) - m);  // bit for bit the pass's
        atomicAdd(&l_lo[digit], mass & 0xffffu);
        atomicAdd(&l_hi[digit], mass >> 16);
      }
    }
    __syncthreads();
  }
  unsigned c[8];
  unsigned long long w[8], local = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {  // thread t: bins bins-1-8t down to bins-8-8t
    const int b = bins - 1 - (8 * static_cast<int>(threadIdx.x) + j);
    if (from_list) {
      c[j] = b >= 0 ? l_count[b] : 0u;
      w[j] = kMass ? (b >= 0 ? (static_cast<unsigned long long>(l_hi[b]) << 16) + l_lo[b] : 0ull) : c[j];
    } else {
      c[j] = b >= 0 ? g_count[b] : 0u;
      w[j] = kMass ? (b >= 0 ? g_mass[b] : 0ull) : c[j];
    }
    local += w[j];
  }
  if (threadIdx.x == 0) s_first = INT_MAX;
  __shared__ unsigned long long warp_sums[kWarpThreads / 32];
  unsigned long long total;
  unsigned long long cum = row.above + warps_exclusive_scan<kWarpThreads / 32>(  // weight above my first bin
                                           local, static_cast<int>(threadIdx.x) / 32, warp_sums, [] { __syncthreads(); },
                                           &total);
  unsigned long long target;
  if constexpr (!kMass) target = static_cast<unsigned long long>(top_k[r]);
  else if (round == 0) target = top_p[r] <= 0.f ? 0ull : static_cast<unsigned long long>(
                                    ceil(static_cast<double>(top_p[r]) * static_cast<double>(total)));
  else target = row.target;
  int mine = -1;
  unsigned long long above_mine = 0;
  unsigned count_mine = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (mine < 0 && c[j] > 0 && cum + w[j] >= target) mine = 8 * threadIdx.x + j, above_mine = cum, count_mine = c[j];
    cum += w[j];
  }
  __syncthreads();  // s_first set; every bin read
  if (mine >= 0) atomicMin(&s_first, mine);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int b = bins - 1 - (8 * static_cast<int>(threadIdx.x) + j);
    if (c[j] && !from_list) {
      g_count[b] = 0;
      if constexpr (kMass) g_mass[b] = 0;
    }
  }
  __syncthreads();
  if (from_list && threadIdx.x == 0) cand_count[r] = 0;  // every thread has read it
  if (s_first == INT_MAX) {  // no bin reaches the target (cannot happen: keep the whole row)
    if (last_of_step && threadIdx.x == 0) reset_row();
    return;
  }
  if (mine != s_first) return;
  const unsigned key = row.prefix | (static_cast<unsigned>(bins - 1 - mine) << round_shift(round));
  WarpRow next = row;
  if (round < 2) {
    next.prefix = key;
    next.above = above_mine;
    if (round == 0) next.listed = count_mine <= kCandidates;
    if (kMass && round == 0) next.target = target;
  } else {
    threshold[static_cast<int64_t>(r) * gamma + k] = key_value(key);
    next.floor_key = key;  // top-p's rounds, if any, search at and above top-k's threshold
    next.prefix = 0;
    next.above = 0;
    if (last_of_step) {
      reset_row();
      return;
    }
  }
  rows[r] = next;
}

}  // namespace

WarpScratch WarpScratch::make(const at::Tensor& like, int R, bool top_p) {
  // Every zeroed part in one buffer, one fill (each fill is a launch of its own): masses first, so
  // every part starts 8-byte aligned.
  const int64_t rows = R, mass_bytes = top_p ? rows * kBins * 8 : 0, count_bytes = rows * kBins * 4,
                row_bytes = rows * static_cast<int64_t>(sizeof(WarpRow));
  auto zeroed = at::zeros({mass_bytes + count_bytes + row_bytes + 2 * rows * 4}, like.options().dtype(at::kByte));
  int64_t offset = 0;
  const auto part = [&](int64_t bytes, at::ScalarType type) {
    auto view = zeroed.narrow(0, offset, bytes).view(type);
    offset += bytes;
    return view;
  };
  WarpScratch s;
  s.masses = part(mass_bytes, at::kLong).view({top_p ? rows : 0, kBins});
  s.counts = part(count_bytes, at::kInt).view({rows, kBins});
  s.rows = part(row_bytes, at::kByte);
  s.max_keys = part(rows * 4, at::kInt);
  s.cand_count = part(rows * 4, at::kInt);
  s.cand_keys = at::empty({rows, kCandidates}, like.options().dtype(at::kInt));
  return s;
}

void warp_thresholds(const at::Tensor& U, const at::Tensor& bias, const float* temperature, const int64_t* top_k,
                     const float* top_p, WarpScratch& scratch, const unsigned* picked, float* threshold, int k,
                     int splits, bool max_taken, cudaStream_t stream) {
  const int R = U.size(0), gamma = U.size(1), V = U.size(2);
  splits = std::max(splits, (V + kMaxBlockEntries - 1) / kMaxBlockEntries);
  const int slice = ((V + splits - 1) / splits + 7) / 8 * 8;  // a multiple of 8, at most kMaxBlockEntries
  auto* rows = reinterpret_cast<WarpRow*>(scratch.rows.data_ptr<uint8_t>());
  auto* max_keys = reinterpret_cast<unsigned*>(scratch.max_keys.data_ptr<int>());
  auto* counts = reinterpret_cast<unsigned*>(scratch.counts.data_ptr<int>());
  auto* masses = top_p ? reinterpret_cast<unsigned long long*>(scratch.masses.data_ptr<int64_t>()) : nullptr;
  auto* cand_keys = reinterpret_cast<unsigned*>(scratch.cand_keys.data_ptr<int>());
  auto* cand_count = reinterpret_cast<unsigned*>(scratch.cand_count.data_ptr<int>());
  DSPARK_DISPATCH_FLOATS(U.scalar_type(), "dspark_warp_thresholds", [&] {
    using UT = device_t<scalar_t>;
    const UT* up = reinterpret_cast<const UT*>(U.data_ptr());
    const bool vec = V % 8 == 0 && aligned16(up);
    // With a top-k tensor the rounds launch programmatically (H100, session 58: 1.10x at R = 1 and
    // 1.02-1.06x above, top-k 50 alone 0.97x at R = 32); with top-p alone that measured 0.86-0.92x
    // from R = 16 (cause not found), so those keep plain stream order.
    const auto launch = [&](auto kernel, dim3 grid, auto... args) {
      launch_in_order(top_k != nullptr, kernel, grid, dim3(kWarpThreads), 0, stream, args...);
    };
    const auto pass = [&](auto mass, int round) {
      constexpr bool kMass = decltype(mass)::value;
      auto kernel = round == 1 ? (vec ? histogram_kernel<UT, kMass, true, true> : histogram_kernel<UT, kMass, false, true>)
                               : (vec ? histogram_kernel<UT, kMass, true, false> : histogram_kernel<UT, kMass, false, false>);
      launch(kernel, dim3(splits, R), up, bias.data_ptr<float>(), temperature, top_k, top_p, rows, max_keys, counts,
             masses, cand_keys, cand_count, picked, k, gamma, V, slice, round);
    };
    const auto pick = [&](auto mass, int round, bool last_of_step) {
      launch(pick_kernel<decltype(mass)::value>, dim3(R), temperature, top_k, top_p, rows, max_keys, counts, masses,
             cand_keys, cand_count, picked, threshold, V, k, gamma, round, last_of_step);
    };
    if (!top_k && !max_taken) pass(std::false_type{}, 0);  // the row max only
    for (int round = 0; top_k && round < 3; ++round) {
      pass(std::false_type{}, round);
      pick(std::false_type{}, round, round == 2 && !top_p);
    }
    for (int round = 0; top_p && round < 3; ++round) {
      pass(std::true_type{}, round);
      pick(std::true_type{}, round, round == 2);
    }
  });
}

}  // namespace dspark
