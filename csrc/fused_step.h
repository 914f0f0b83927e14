// The fused Markov step (fused_step.cu): the bias GEMM and the split pass in one Hopper kernel.
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "race.cuh"
#include "residual.cuh"
#include "verdicts.cuh"

namespace dspark {

// What a bias kernel needs to take, as it makes the bias, each row's largest order key
// (warp_rule.cuh) of x = (U[r, step] + bias) / T, the max top-p's rounds start from.
struct RowMaxKeys {
  const void* U = nullptr;  // [R, γ, V] of u_type
  at::ScalarType u_type = at::kFloat;
  int gamma = 0;
  const float* temperature = nullptr;
  unsigned* keys = nullptr;  // [R], zero before (atomicMax)
};

// Whether the fused step serves R requests with these weights on the current device: sm_90,
// bf16/fp16 W2 [V, 256] with V % 64 == 0, 16-byte aligned W2 and H rows (ldh elements apart),
// R <= 128, and the cuBLAS path not forced.
bool fused_step_supported(const at::Tensor& w2, const void* h, int64_t ldh, int R);

// Partials the fused step writes per request (one per CTA).
int fused_step_blocks(int V);

// One step for R requests: partials [R, fused_step_blocks(V)] for reduce_kernel when U is given
// (U [R, γ, V] of u_type, row k). rows_out when not null: with U, x = (U + bias) / T into its row k
// of [R, γ, V] (the chain's q before markov.cu normalizes it); without, the fp32 bias [R, V], and
// with max_keys (its U 16-byte aligned) each row's max key of step k's x as well.
void fused_step(const at::Tensor& w2, const void* h, int64_t ldh, int R, const void* U, at::ScalarType u_type,
                const float* temperature, const int64_t* seeds, Partial* partials, float* rows_out, int k, int gamma,
                cudaStream_t stream, const RowMaxKeys* max_keys = nullptr);

// Rejection's rows for the races where the bias is made (rejection.cu): per request its verdict
// (verdicts.cuh: accept_kernel's state {n, rejected}, or the ratio tests run in the kernel when
// tests.ell is set), its target row target.row(row_start[r] + n), the chain's row stats [R, γ, 2] and
// drafted tokens [R, γ] (q at position min(n, γ - 1) is rebuilt with them), which requests verify
// greedily (skipped: their token is already out); a block counter (zero; the last block leaves it
// zero: race.cuh's count_block_is_last) and the output tokens [R, γ + 1] the last block writes the
// recovered token into (null: a finish kernel does).
struct ResidualRows {
  TargetRows target;
  RowStarts row_start;
  int* state = nullptr;
  const float* row_stats = nullptr;
  const int64_t* tokens = nullptr;
  const bool* greedy = nullptr;
  unsigned* done = nullptr;
  int64_t* out_tokens = nullptr;
  RatioTests tests;
};

// Rejection's settings for a request where its races run (fused_step.cu's residual epilogue,
// markov.cu's small_residual_kernel): nothing for a greedy one (accept_kernel emitted its token);
// else its target row row_start + n, raced over as it is (the bonus row) or, when it was rejected
// at draft position n (its verdict), as the residual against the q row the chain sampled there: U
// row min(n, γ - 1), the chain's max and sum-exp of it, its token for a one-hot row.
template <typename UT>
struct ResidualRequest {
  bool active = false, rejected = false, one_hot = false;
  float scale = 1.f, max = 0.f, inv_sum = 1.f;
  int token = -1;
  int64_t seed = 0;
  const UT* u_row = nullptr;
  TargetRow p_row;

  template <int capacity>
  __device__ ResidualRequest(int r, int R, const UT* __restrict__ U, const float* __restrict__ temperature,
                             const int64_t* __restrict__ seeds, int gamma, int V, const ResidualRows& rows,
                             const Verdicts<capacity>& verdicts) {
    if (r >= R || (rows.greedy != nullptr && rows.greedy[r])) return;
    active = true;
    const int n = verdicts.n[r];
    seed = seeds[r];
    p_row = rows.target.row(rows.row_start[r] + n, V);
    rejected = verdicts.rejected[r];
    if (!rejected) return;
    const int64_t at = static_cast<int64_t>(r) * gamma + min(n, gamma - 1);
    const float T = temperature[r];
    one_hot = T < kGreedyBelow;
    scale = one_hot ? 1.f : T;
    max = rows.row_stats[2 * at];
    inv_sum = 1.f / rows.row_stats[2 * at + 1];
    token = static_cast<int>(rows.tokens[at]);
    if (!one_hot) u_row = U + at * V;
  }
};

// Rejection's recovered-token races for R requests in one pass over W2 (H = W1[x_{n-1}] rows, or
// gathered in the kernel with rows.tests) into races [R, fused_step_blocks(V)], and the tokens when
// rows.out_tokens is set. Bias bits as the chain's fused step.
constexpr int kFusedFinishMaxRequests = 16;  // rows.out_tokens only up to here (fused_step.cu)
void fused_residual(const at::Tensor& w2, const void* h, int64_t ldh, int R, const void* U, at::ScalarType u_type,
                    const float* temperature, const int64_t* seeds, const ResidualRows& rows, Race* races, int gamma,
                    cudaStream_t stream);

}  // namespace dspark
