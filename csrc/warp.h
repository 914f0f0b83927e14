// Top-k / top-p thresholds of the Markov chain's warped rows (warp.cu), called by markov.cu.
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dspark {

// Scratch the selection keeps across a chain's steps: per-request state, one round's histograms and
// round 1's key list. Zeroed once per chain (make, one fill); each step leaves it zeroed for the next.
struct WarpScratch {
  at::Tensor rows;    // [R] WarpRow, as bytes
  at::Tensor max_keys;  // [R] uint32 (as int32): each row's largest order key (warp_rule.cuh) this step
  at::Tensor counts;  // [R, 2048] uint32 (as int32)
  at::Tensor masses;  // [R, 2048] uint64 (as int64), only with top-p
  at::Tensor cand_keys;   // [R, 1024] uint32 (as int32): round 1's keys, when round 0's bin has that few
  at::Tensor cand_count;  // [R] uint32: how many round 1 listed
  static WarpScratch make(const at::Tensor& like, int R, bool top_p);
};

// threshold[r·γ + k] = the smallest x = (U_k + bias)/T request r keeps at step k (rows without a
// warp, and greedy rows, keep their -inf). bias [R, V] fp32 is step k's; top_k [R] int64 (0 or >= V:
// off) and top_p [R] fp32 (>= 1: off) may be null, not both. Rows with picked[r] set (top_k.cu's;
// null: none) are skipped. splits: blocks per request at least (more where a block would take over
// 65536 entries). max_taken: the kernel that made the bias also took scratch.max_keys (bias_gemm),
// so top-p alone skips its pass for the max. Launches on `stream`.
void warp_thresholds(const at::Tensor& U, const at::Tensor& bias, const float* temperature, const int64_t* top_k,
                     const float* top_p, WarpScratch& scratch, const unsigned* picked, float* threshold, int k,
                     int splits, bool max_taken, cudaStream_t stream);

}  // namespace dspark
