// The target rows a verification reads (rejection.cu and the racing kernels it calls): probabilities
// [N, V], or an engine's logits [N, V] with each row's softmax statistics [N, 2] (max,
// 1 / Σ exp(x − max): softmax_stats), when an entry's probability is exp(x − max) · (1 / Σ),
// computed where it is read. Then no [N, V] probabilities are written and read back: a verification
// reads one row per request and one entry per ratio test. A row index past the last row reads the
// last (an engine's spare rows, whose draws it replaces: vLLM V1's bonus row after its last request).
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace dspark {

struct TargetRow {
  const float* x = nullptr;
  float max = 0.f, inv_sum = 1.f;
  bool logits = false;

  __device__ __forceinline__ float prob(float raw) const { return logits ? expf(raw - max) * inv_sum : raw; }
  __device__ __forceinline__ float operator[](int64_t v) const { return prob(x[v]); }
  // Raw entries loaded as they are, made probabilities in place; entries from `valid` on stay (padding).
  template <int N>
  __device__ __forceinline__ void to_probs(float (&e)[N], int valid = N) const {
    if (!logits) return;
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = i < valid ? prob(e[i]) : e[i];
  }
};

struct TargetRows {
  const float* x = nullptr;     // [rows, V]
  const float2* stats = nullptr;  // [rows]: null when x holds probabilities
  int64_t last = 0;             // rows − 1

  __device__ __forceinline__ int64_t clamped(int64_t i) const { return i < last ? i : last; }
  __device__ __forceinline__ TargetRow row(int64_t i, int V) const {
    i = clamped(i);
    if (stats == nullptr) return {x + i * V, 0.f, 1.f, false};
    const float2 s = stats[i];
    return {x + i * V, s.x, s.y, true};
  }
};

}  // namespace dspark
