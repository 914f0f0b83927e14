// Rejection's per-request verdicts {n accepted, rejected} where the racing kernels need them: read
// from accept_kernel's state, or, for a batch without greedy requests or with the engine's greedy
// tokens given (target_argmax), found by the racing kernel itself (every block runs the R·γ tests, a
// few gathers: one launch and one dependency fewer than with accept_kernel). Both run
// passes_ratio_test along the prefix; a greedy request's whole-row argmax needs accept_kernel.
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "common.cuh"
#include "philox.cuh"
#include "target_rows.cuh"

namespace dspark {

// Request r's first target row: starts[r], or r · stride for a dense [R, γ + 1, V] batch.
struct RowStarts {
  const int64_t* starts = nullptr;
  int64_t stride = 0;
  __host__ __device__ int64_t operator[](int r) const { return starts != nullptr ? starts[r] : r * stride; }
  // ℓ's clamp: a dense batch holds `stride` rows per request, so ℓ ≤ stride − 1 there (a larger one
  // read the next request's rows, the last request's past the tensor); given starts, γ alone.
  __host__ __device__ int max_len(int gamma) const {
    return starts != nullptr || stride - 1 >= gamma ? gamma : static_cast<int>(stride - 1);
  }
};

// What a racing kernel needs to run the ratio tests itself (ell set), or nothing (ell null: the
// verdicts come from accept_kernel's state). Block 0 writes the accepted prefix (−1 padded: the
// recovered token goes in later), num_accepted and the state a finish kernel reads.
struct RatioTests {
  const int64_t* ell = nullptr;
  const float* q_token = nullptr;  // [R, γ]
  const int64_t* anchors = nullptr;
  const void* w1 = nullptr;  // [V, rank], the W2 dtype: H = W1[x_{n-1}] is gathered by the racing kernel
  int64_t* out_tokens = nullptr;  // [R, γ + 1]
  int64_t* num_accepted = nullptr;
  const bool* greedy = nullptr;  // [R] (null: none); greedy requests then need target_argmax
  const int64_t* target_argmax = nullptr;  // [N]: a greedy request's token per target row
};

// The engine's greedy token at a target row (an id it got wrong still indexes inside the vocabulary).
__device__ __forceinline__ int engine_argmax(const int64_t* target_argmax, int64_t row, int V) {
  return static_cast<int>(min(max(target_argmax[row], int64_t{0}), int64_t{V - 1}));
}

// The ratio test of draft position j (rejection.py's): u_j·q_j(x_j) < p_j(x_j), u_j from the request's
// seed on the acceptance stream.
__device__ __forceinline__ bool passes_ratio_test(int64_t seed, int j, float q, float p) {
  return counter_uniform(seed, kStreamAccept, j, 0u) * q < p;
}

// Up to `capacity` requests' verdicts in shared memory.
template <int capacity>
struct Verdicts {
  int n[capacity];
  int rejected[capacity];
  int before[capacity];  // x_{n-1} at draft position min(n, γ - 1) (the anchor at 0): its W1 row is H
};

// Fills v for R requests, threads tid = 0 .. nthreads-1 of the block taking part (sync: their
// barrier), kPairs ratio tests per thread per round (more: fewer rounds, more registers). With
// tests.ell the ratio tests run here (a greedy request's: x_j == the engine's token, its row not
// read) and block 0 writes the outputs (a greedy request's next token too: the racing kernels skip
// it) and the state [R, 2] {n, rejected} (a finish kernel reads it); else accept_kernel's state is
// read (`before` is then not needed: H is accept_kernel's gather).
template <int kPairs, int capacity, typename Sync>
__device__ void find_verdicts(Verdicts<capacity>& v, const RatioTests& tests, int* state, const TargetRows& target,
                              RowStarts row_start, const int64_t* tokens, const int64_t* seeds, int R, int gamma,
                              int V, int tid, int nthreads, Sync sync) {
  if (tests.ell == nullptr) {
    for (int r = tid; r < R; r += nthreads) v.n[r] = state[2 * r], v.rejected[r] = state[2 * r + 1];
    sync();
    return;
  }
  // Two dependent memory round trips (every input at once, then the target gathers), and one more
  // for the H rows after: a failing position lowers n[r] from "none"; the anchor rides along in
  // `before`. kPairs (r, j) per thread per round, all loads issued before any is used.
  for (int r = tid; r < R; r += nthreads) v.n[r] = INT_MAX;
  sync();
  for (int base = tid; base < R * gamma; base += kPairs * nthreads) {
    int64_t token[kPairs], len[kPairs], seed[kPairs], start[kPairs];
    float q[kPairs], p[kPairs];
    bool greedy[kPairs];
    int best[kPairs];
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
      const int i = base + k * nthreads, r = i / gamma;
      if (i >= R * gamma) continue;
      token[k] = tokens[i], q[k] = tests.q_token[i], len[k] = clamp_ell(tests.ell[r], row_start.max_len(gamma));
      seed[k] = seeds[r];
      start[k] = row_start[r];
      greedy[k] = tests.greedy != nullptr && tests.greedy[r];
      if (i % gamma == 0) v.before[r] = static_cast<int>(tests.anchors[r]);
    }
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
      const int i = base + k * nthreads, j = i % gamma;
      if (i >= R * gamma || j >= len[k]) continue;
      if (greedy[k])
        best[k] = engine_argmax(tests.target_argmax, target.clamped(start[k] + j), V);
      else
        p[k] = target.row(start[k] + j, V)[token[k]];
    }
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
      const int i = base + k * nthreads, j = i % gamma;
      if (i >= R * gamma || j >= len[k]) continue;
      if (greedy[k] ? token[k] != best[k] : !passes_ratio_test(seed[k], j, q[k], p[k])) atomicMin(&v.n[i / gamma], j);
    }
  }
  sync();
  for (int r = tid; r < R; r += nthreads) {
    const int len = clamp_ell(tests.ell[r], row_start.max_len(gamma));
    const int n = min(v.n[r], len), pos = min(n, gamma - 1);
    v.n[r] = n;
    v.rejected[r] = n < len && (tests.greedy == nullptr || !tests.greedy[r]);  // greedy: no residual race
    if (pos > 0) v.before[r] = static_cast<int>(tokens[static_cast<int64_t>(r) * gamma + pos - 1]);
    if (blockIdx.x == 0) tests.num_accepted[r] = n, state[2 * r] = n, state[2 * r + 1] = v.rejected[r];
  }
  sync();
  if (blockIdx.x == 0) {
    for (int i = tid; i < R * (gamma + 1); i += nthreads) {
      const int r = i / (gamma + 1), j = i % (gamma + 1);
      const bool greedy_next = j == v.n[r] && tests.greedy != nullptr && tests.greedy[r];
      tests.out_tokens[i] = j < v.n[r]     ? tokens[static_cast<int64_t>(r) * gamma + j]
                            : greedy_next ? engine_argmax(tests.target_argmax, target.clamped(row_start[r] + j), V)
                                          : -1;
    }
  }
}

}  // namespace dspark
