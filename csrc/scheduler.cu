// Production verify-length scheduler (dspark_cli/runtime/scheduler.py, schedule_production) in one
// block whose two halves work at once, each sorting one survival matrix's values:
//   - warps 0-7 take the verify budget K = argmax_n Θ_n from the stale survival, over the n the
//     current batch can admit (n <= R·γ; Θ_n = (R + Σ_{i<=n} a_i)·SPS(R + n), earliest n on ties);
//   - warps 8-15 find the K-th largest current value v*. The reference admits the top K of a stable
//     sort by a descending over the j-major flat index j·R + r: every candidate above v*, and of
//     those equal to v* the first K − #(a > v*) in flat order (an exclusive scan of the ties).
//     ℓ_r = r's admitted candidates.
// No host sync.
//
// The sort is bitonic over up to 2048 32-bit keys, eight per thread in registers. Element
// i = 256w + 8l + e sits in slot e of lane l of warp w ("A" layout): strides 1-4 are inside a
// thread, 8-128 across lanes (shuffles). Strides 256-1024 cross warps: for them the keys are
// transposed through shared memory to the "B" layout i = 256e + 8l + w, where those strides are
// inside a thread, and back: two transposes per merge size from 512 up. It takes 10.1 µs at R = 256
// on the H200. Sorting 64-bit (value, index) keys took 18.4 µs, both with two keys per thread over
// 1024 threads and with this layout (bench/RESULTS.md, 2026-12-01).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "common.cuh"

namespace dspark {
namespace {

constexpr int kMaxCandidates = 2048;
constexpr int kItems = 8;                                  // keys per thread
constexpr int kHalfThreads = kMaxCandidates / kItems;      // 256: one half sorts one matrix
constexpr int kHalfWarps = kHalfThreads / 32;
constexpr int kThreads = 2 * kHalfThreads;
constexpr int kBudgetBarrier = 1, kAdmitBarrier = 2;      // named barriers of the halves (0: the block's)

__device__ __forceinline__ void half_barrier(int id) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(kHalfThreads) : "memory");
}

// Ascending key order = a descending (a >= 0: its bits are monotone; -0.0 taken as +0.0). The
// padding key (all ones) sorts last and reads back as value 0.
__device__ __forceinline__ uint32_t value_key(float a) { return ~__float_as_uint(a + 0.f); }
__device__ __forceinline__ float key_value(uint32_t key) { return __uint_as_float(~key); }

// Shared-memory slot of element i: the low three bits XORed with bits 5-7, so that the A layout's
// writes (fixed e, lanes l) and the B layout's reads (fixed w, lanes l) hit 32 distinct banks.
__device__ __forceinline__ int swizzled(int i) { return i ^ ((i >> 5) & 7); }

// Compare-exchange of slots e and e | s (element stride unit·s) for every e without bit s, ascending
// where the lower element i has (i & size) == 0. kSameDirection: every slot of the thread has the
// same direction (A layout from size 8 up), taken once.
template <int s, bool kSameDirection = false>
__device__ __forceinline__ void in_thread(uint32_t (&k)[kItems], int base, int unit, int size) {
  const bool thread_ascending = (base & size) == 0;
#pragma unroll
  for (int e = 0; e < kItems; ++e) {
    if (e & s) continue;
    const bool ascending = kSameDirection ? thread_ascending : ((base + unit * e) & size) == 0;
    const uint32_t lo = min(k[e], k[e | s]), hi = max(k[e], k[e | s]);
    k[e] = ascending ? lo : hi;
    k[e | s] = ascending ? hi : lo;
  }
}

// Compare-exchange with lane l ^ m (element stride 8m >= 8, so size >= 16: the direction is the
// thread's, not the slot's).
__device__ __forceinline__ void across_lanes(uint32_t (&k)[kItems], int a_base, int m, int size) {
  const bool keep_min = ((threadIdx.x & m) == 0) == ((a_base & size) == 0);
#pragma unroll
  for (int e = 0; e < kItems; ++e) {
    const uint32_t theirs = __shfl_xor_sync(0xffffffffu, k[e], m);
    k[e] = keep_min ? min(k[e], theirs) : max(k[e], theirs);
  }
}

// From the A layout to the B layout (to_b) or back, through buf.
__device__ __forceinline__ void transpose(uint32_t (&k)[kItems], uint32_t* buf, bool to_b, int w, int l, int barrier) {
  half_barrier(barrier);  // buf's last reads are done
#pragma unroll
  for (int e = 0; e < kItems; ++e) buf[swizzled(to_b ? 256 * w + 8 * l + e : 256 * e + 8 * l + w)] = k[e];
  half_barrier(barrier);
#pragma unroll
  for (int e = 0; e < kItems; ++e) k[e] = buf[swizzled(to_b ? 256 * e + 8 * l + w : 256 * w + 8 * l + e)];
}

// Sort a half's keys ascending over the first n_pad elements (a power of two; the rest are padding).
// The whole half calls with the same n_pad; afterwards thread t holds sorted positions 8t .. 8t + 7.
__device__ void bitonic_sort(uint32_t (&k)[kItems], uint32_t* buf, int n_pad, int barrier) {
  const int w = (threadIdx.x / 32) % kHalfWarps, l = threadIdx.x % 32;
  if (n_pad <= 256 && w > 0) return;  // warp 0 holds every element, and no stride crosses warps
  const int a_base = 256 * w + 8 * l, b_base = 8 * l + w;
  in_thread<1>(k, a_base, 1, 2);  // sizes 2 and 4: the direction differs between a thread's slots
  if (n_pad >= 4) {
    in_thread<2>(k, a_base, 1, 4);
    in_thread<1>(k, a_base, 1, 4);
  }
  for (int size = 8; size <= n_pad; size <<= 1) {
    if (size >= 512) {  // strides size/2 .. 256 in the B layout
      transpose(k, buf, true, w, l, barrier);
      if (size >= 2048) in_thread<4>(k, b_base, 256, size);
      if (size >= 1024) in_thread<2>(k, b_base, 256, size);
      in_thread<1>(k, b_base, 256, size);
      transpose(k, buf, false, w, l, barrier);
    }
    for (int m = min(size / 2, 128) / 8; m >= 1; m >>= 1) across_lanes(k, a_base, m, size);
    in_thread<4, true>(k, a_base, 1, size);
    in_thread<2, true>(k, a_base, 1, size);
    in_thread<1, true>(k, a_base, 1, size);
  }
}

// Thread t's keys for flat candidates 8t .. 8t + 7 of a [R, γ] survival matrix (flat index j·R + r),
// padding past R·γ (all of them for a stale batch of no rows, R = 0).
__device__ __forceinline__ void load_keys(const float* __restrict__ a, int R, int gamma, int t, uint32_t (&k)[kItems]) {
  const int n = R * gamma, f0 = kItems * t;
  int r = R > 0 ? f0 % R : 0, j = R > 0 ? f0 / R : 0;
#pragma unroll
  for (int e = 0; e < kItems; ++e) {
    k[e] = f0 + e < n ? value_key(a[r * gamma + j]) : ~0u;
    if (++r == R) r = 0, ++j;
  }
}

__device__ __forceinline__ int padded(int n) {
  int n_pad = 2;
  while (n_pad < n) n_pad <<= 1;
  return n_pad;
}

// Exclusive prefix over the half's threads (thread order); *total, when given, gets the half's sum.
template <typename T>
__device__ __forceinline__ T half_exclusive_scan(T x, T* warp_sums, int barrier, T* total = nullptr) {
  return warps_exclusive_scan<kHalfWarps>(x, static_cast<int>(threadIdx.x / 32) % kHalfWarps, warp_sums,
                                          [barrier] { half_barrier(barrier); }, total);
}

// Argmax of (theta, arg) over the warp, the earliest arg on ties; every lane gets it.
__device__ __forceinline__ void warp_argmax(float& theta, int& arg) {
  for (int off = 16; off > 0; off >>= 1) {
    const float t = __shfl_xor_sync(0xffffffffu, theta, off);
    const int n = __shfl_xor_sync(0xffffffffu, arg, off);
    if (t > theta || (t == theta && n < arg)) {
      theta = t;
      arg = n;
    }
  }
}

struct alignas(16) Smem {  // 16-byte aligned: admit_buf takes uint4 stores
  uint32_t budget_buf[kMaxCandidates];  // the budget half's transposes
  uint32_t admit_buf[kMaxCandidates];   // the admission half's, then its sorted keys
  uint8_t admitted[kMaxCandidates];     // per flat index
  float warp_sum[kHalfWarps];
  int warp_count[kHalfWarps];
  float warp_theta[kHalfWarps];
  int warp_n[kHalfWarps];
  int budget;
};

// The budget half (t = 0 .. 255): sort the stale values, inclusive prefix sums over the sorted
// positions (thread t's eight, then the half's), Θ at n = position + 1, the first argmax into
// sm.budget.
__device__ void verify_budget(const float* __restrict__ a_stale, int R_stale, int R, int gamma,
                              const float* __restrict__ sps_dense, int sps_limit, Smem& sm) {
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  // Every n the current batch can admit, and no more (a larger stale batch's best n may not be
  // admissible now): past a smaller stale batch's own candidates the sums add survival 0, which a
  // table whose steps/s rises with the tokens may still prefer.
  const int n_stale = R_stale * gamma, most = R * gamma;
  uint32_t k[kItems];
  load_keys(a_stale, R_stale, gamma, t, k);
  float sps[kItems];  // SPS(R + n) for n = 8t + e + 1, read while the sort runs
#pragma unroll
  for (int e = 0; e < kItems; ++e) sps[e] = sps_dense[min(R + kItems * t + e + 1, sps_limit)];
  const float sps_zero = sps_dense[min(R, sps_limit)];
  bitonic_sort(k, sm.budget_buf, padded(n_stale), kBudgetBarrier);

  float prefix[kItems];
  float run = 0.f;
#pragma unroll
  for (int e = 0; e < kItems; ++e) prefix[e] = run += key_value(k[e]);
  const float before = half_exclusive_scan(run, sm.warp_sum, kBudgetBarrier);

  float theta = -INFINITY;
  int arg = 0x7fffffff;
  const auto consider = [&](int n, float sum, float sps_n) {
    const int tokens = R + n;
    const float s = tokens > sps_limit ? sps_dense[sps_limit] * static_cast<float>(sps_limit) / static_cast<float>(tokens)
                                       : sps_n;
    const float th = (static_cast<float>(R) + sum) * s;
    if (th > theta) {  // n ascending per thread: strict > keeps the earliest
      theta = th;
      arg = n;
    }
  };
  if (t == 0) consider(0, 0.f, sps_zero);
#pragma unroll
  for (int e = 0; e < kItems; ++e)
    if (kItems * t + e + 1 <= most) consider(kItems * t + e + 1, before + prefix[e], sps[e]);
  warp_argmax(theta, arg);
  if (lane == 0) {
    sm.warp_theta[warp] = theta;
    sm.warp_n[warp] = arg;
  }
  half_barrier(kBudgetBarrier);
  if (warp == 0) {
    theta = lane < kHalfWarps ? sm.warp_theta[lane] : -INFINITY;
    arg = lane < kHalfWarps ? sm.warp_n[lane] : 0x7fffffff;
    warp_argmax(theta, arg);
    if (lane == 0) sm.budget = arg;
  }
}

// The admission half (t = 0 .. 255), once sm.budget is set and the current keys are sorted into
// sm.admit_buf: mark the admitted flat indices in sm.admitted. One scan over the thread's counts of
// keys below the K-th and equal to it, packed (each count <= 2048 < 2^12).
__device__ void admit(const uint32_t (&flat_keys)[kItems], int budget, int t, Smem& sm) {
  const uint32_t kth = sm.admit_buf[budget - 1];
  int counts = 0;
#pragma unroll
  for (int e = 0; e < kItems; ++e) counts += flat_keys[e] < kth ? 1 << 12 : flat_keys[e] == kth;
  int total;
  int tie_rank = half_exclusive_scan(counts, sm.warp_count, kAdmitBarrier, &total) & 0xfff;
  const int tie_seats = budget - (total >> 12);  // K − #(a > v*)
#pragma unroll
  for (int e = 0; e < kItems; ++e) {
    const bool tie = flat_keys[e] == kth;
    sm.admitted[kItems * t + e] = flat_keys[e] < kth || (tie && tie_rank < tie_seats);
    tie_rank += tie;
  }
}

__global__ void __launch_bounds__(kThreads, 1) schedule_production_kernel(
    const float* __restrict__ a_stale, int R_stale, const float* __restrict__ a_now, int R, int gamma,
    const float* __restrict__ sps_dense, int sps_limit, int64_t* __restrict__ ell) {
  __shared__ Smem sm;
  const bool admits = threadIdx.x >= kHalfThreads;
  const int t = threadIdx.x - kHalfThreads;
  uint32_t flat_keys[kItems];
  if (admits) {
    load_keys(a_now, R, gamma, t, flat_keys);
    uint32_t k[kItems];
#pragma unroll
    for (int e = 0; e < kItems; ++e) k[e] = flat_keys[e];
    bitonic_sort(k, sm.admit_buf, padded(R * gamma), kAdmitBarrier);
    half_barrier(kAdmitBarrier);  // the sort's last reads of admit_buf are done
    uint4* sorted = reinterpret_cast<uint4*>(sm.admit_buf + kItems * t);
    sorted[0] = make_uint4(k[0], k[1], k[2], k[3]);
    sorted[1] = make_uint4(k[4], k[5], k[6], k[7]);
  } else {
    verify_budget(a_stale, R_stale, R, gamma, sps_dense, sps_limit, sm);
  }
  __syncthreads();  // the budget and the sorted current keys
  const int budget = sm.budget;
  if (admits && budget > 0) admit(flat_keys, budget, t, sm);
  __syncthreads();
  for (int r = threadIdx.x; r < R; r += kThreads) {
    int admitted = 0;
    for (int j = 0; j < gamma && budget > 0; ++j) admitted += sm.admitted[j * R + r];
    ell[r] = admitted;
  }
}

}  // namespace

at::Tensor schedule_production_cuda(const at::Tensor& a_stale, const at::Tensor& a_now, const at::Tensor& sps_dense,
                                    int64_t sps_limit) {
  TORCH_CHECK(a_now.is_cuda() && a_stale.device() == a_now.device() && sps_dense.device() == a_now.device(),
              "dspark::schedule_production: CUDA tensors on one device");
  TORCH_CHECK(a_stale.scalar_type() == at::kFloat && a_now.scalar_type() == at::kFloat &&
                  sps_dense.scalar_type() == at::kFloat, "dspark::schedule_production: fp32 inputs");
  TORCH_CHECK(a_stale.dim() == 2 && a_now.dim() == 2 && a_stale.size(1) == a_now.size(1) && a_now.size(0) >= 1 &&
                  a_now.size(1) >= 1,
              "dspark::schedule_production: a_stale [R', γ] and a_now [R, γ], R and γ >= 1 (R' may be 0)");
  TORCH_CHECK(a_stale.numel() <= kMaxCandidates && a_now.numel() <= kMaxCandidates,
              "dspark::schedule_production: at most 2048 candidates");
  TORCH_CHECK(sps_dense.dim() == 1 && sps_dense.is_contiguous() && sps_dense.numel() == sps_limit + 1,
              "dspark::schedule_production: sps_dense is contiguous [sps_limit + 1]");
  const c10::cuda::CUDAGuard guard(a_now.device());
  const int R = a_now.size(0), gamma = a_now.size(1), R_stale = a_stale.size(0);
  auto ell = at::empty({R}, a_now.options().dtype(at::kLong));
  auto stale = a_stale.contiguous(), now = a_now.contiguous();
  const float* stale_p = stale.data_ptr<float>();
  const float* now_p = now.data_ptr<float>();
  const float* sps_p = sps_dense.data_ptr<float>();
  const int limit = static_cast<int>(sps_limit);
  int64_t* ell_p = ell.data_ptr<int64_t>();
  schedule_production_kernel<<<1, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(stale_p, R_stale, now_p, R, gamma,
                                                                                    sps_p, limit, ell_p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ell;
}

}  // namespace dspark
