// What markov.cu gives rejection.cu: which kernel made the chain's bias for a step, that bias
// again, and the small-batch races (a rebuilt q row must come from the kernel the chain sampled
// from to have its bits).
#pragma once
#include <ATen/ATen.h>

#include "fused_step.h"

namespace dspark {

// Which kernel makes the bias W1[x_{k-1}]·W2ᵀ of the chain's steps: the small-batch kernels
// (R <= 2), the fused step (Hopper), or bias_gemm (cuBLAS). H rows are ldh elements apart; warped
// (top-k/top-p) steps need the whole row materialized, so they always take bias_gemm.
enum class BiasPath { kGemm, kSmall, kFused };
BiasPath chain_bias_path(const at::Tensor& U, const at::Tensor& w1, const at::Tensor& w2, const void* h, int64_t ldh,
                         int R, bool warped);

// bias[R, V] (fp32) = H[R, r] · W2[V, r]ᵀ, the bias of BiasPath::kGemm (warped steps). step: the
// chain's step; on odd steps the small-batch and fused kernels walk W2 backwards, starting on rows the
// previous step read last, still in L2. The bits do not depend on it. With max_keys the small-batch
// kernel (R <= 2) or the fused step (from markov.cu's kFusedMaxKeysFrom = 32 requests, U 16-byte
// aligned) also takes the rows' max keys; returns whether they were taken.
bool bias_gemm(const at::Tensor& w2, const void* h, int64_t ldh, int R, at::Tensor& bias, int step = 0,
               const RowMaxKeys* max_keys = nullptr);

// Rejection's recovered tokens where the chain took BiasPath::kSmall (small_residual_kernel),
// written to rows.out_tokens. partials: its scratch.
void small_residual(const at::Tensor& w2, const void* h, int R, const at::Tensor& U, const float* temperature,
                    const int64_t* seeds, const ResidualRows& rows, at::Tensor& partials, int gamma);

}  // namespace dspark
