// The top-k / top-p rule both selections share (warp.cu's radix rounds over whole rows, top_k.cu's
// candidate lists): which rows warp, the order-preserving keys thresholds are found on, and the
// fixed-point masses top-p sums, so that either selection keeps the very same entries of a row.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace dspark {

// Keys ordered as the floats are (-0 just below +0).
__device__ __forceinline__ unsigned order_key(float x) {
  const unsigned b = __float_as_uint(x);
  return b & 0x80000000u ? ~b : b | 0x80000000u;
}
__device__ __forceinline__ float key_value(unsigned key) {
  return __uint_as_float(key & 0x80000000u ? key & 0x7fffffffu : ~key);
}

// exp(x - max) in 2^-31 fixed point: integer sums do not depend on the order they add in.
__device__ __forceinline__ unsigned fixed_mass(float below_max) {
  return __float2uint_rn(expf(below_max) * 2147483648.f);  // 2^31: the max's own 1 fits
}

// Greedy rows never warp (their argmax is always kept).
__device__ __forceinline__ bool top_k_on(const int64_t* top_k, int r, int V, float T) {
  return top_k && T >= kGreedyBelow && top_k[r] > 0 && top_k[r] < V;
}
__device__ __forceinline__ bool top_p_on(const float* top_p, int r, float T) {
  return top_p && T >= kGreedyBelow && top_p[r] < 1.f;  // NaN: off, as the reference's comparison
}

}  // namespace dspark
