// Small top-k (k <= 64) for the Markov chain's warped steps from candidate lists (top_k.cu), called
// by markov.cu (from R = 64 on, 32 with top-p) before warp.cu's radix selection, which then skips
// the rows this finished.
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "race.cuh"

namespace dspark {

// Scratch of a chain's steps: each slice's candidates (order keys and vocab ids), their count and
// the slice's k-th key, and per request whether a slice's list overflowed and whether the step was
// finished here. Made once per chain; each step leaves `overflow` zeroed for the next.
struct TopKScratch {
  at::Tensor keys, ids;  // [R, slices, 128] uint32 (as int32), int32
  at::Tensor count;      // [R, slices] int32
  at::Tensor kth_key;    // [R, slices] uint32: the slice's k-th largest key, 0 with fewer entries
  at::Tensor overflow;   // [R] uint32
  at::Tensor picked;     // [R] uint32: 1 where this step's thresholds, token and partials are written
  static TopKScratch make(const at::Tensor& like, int R, int V);
};

constexpr int kSmallTopKMax = 64;  // the largest top-k the candidate lists take

// Step k of the sampled rows with 0 < top_k < V, top_k <= 64 (and top-p on top, if given): from x =
// (U_k + bias) / T, the rule of warp_rule.cuh, threshold[r·γ + k] and the race (race.cuh's groups,
// the split pass's noise) into partials[r·parts .. +parts) (the first the winner, the rest empty),
// so reduce_kernel merges them as the split pass's. Rows it cannot take (a list full of ties) are
// left to the split pass, picked[r] = 0, with their thresholds from warp_thresholds, or, given
// whole_rows (warp_thresholds not run), from one block reading the row; whole_rows also covers
// the other warped rows (top-k > 64, top-p alone). Launches on `stream`.
void top_k_candidates(const at::Tensor& U, const at::Tensor& bias, const float* temperature, const int64_t* top_k,
                      const float* top_p, const int64_t* seeds, TopKScratch& scratch, float* threshold,
                      Partial* partials, int parts, int k, bool whole_rows, cudaStream_t stream);

}  // namespace dspark
