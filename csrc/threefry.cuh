// Threefry-2x32-20, bit-identical to dspark_cli/runtime/rng.py (see docs/runtime-api.md,
// "Random numbers"): key = (seed lo, seed hi), counter = (index, stream << 16 | position).
#pragma once
#include <cstdint>

namespace dspark {

__device__ __forceinline__ uint32_t rotl32(uint32_t x, int n) { return __funnelshift_l(x, x, n); }

// Output word 0 of Threefry-2x32-20.
__device__ __forceinline__ uint32_t threefry2x32_x0(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1) {
  const uint32_t ks[3] = {k0, k1, k0 ^ k1 ^ 0x1BD11BDAu};
  const int rot[8] = {13, 15, 26, 6, 17, 29, 16, 24};
  uint32_t x0 = c0 + ks[0];
  uint32_t x1 = c1 + ks[1];
#pragma unroll
  for (int i = 0; i < 20; ++i) {
    x0 += x1;
    x1 = rotl32(x1, rot[i % 8]) ^ x0;
    if (i % 4 == 3) {
      const int s = (i + 1) / 4;
      x0 += ks[s % 3];
      x1 += ks[(s + 1) % 3] + static_cast<uint32_t>(s);
    }
  }
  return x0;
}

// u in (0, 1): ((x0 >> 9) + 0.5) * 2^-23, exactly as the torch reference computes it in fp32 (never 1.0).
__device__ __forceinline__ float counter_uniform(int64_t seed, int stream, int position, uint32_t index) {
  const uint32_t k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffull);
  const uint32_t k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  const uint32_t c1 = (static_cast<uint32_t>(stream) << 16) | (static_cast<uint32_t>(position) & 0xffffu);
  const uint32_t x0 = threefry2x32_x0(k0, k1, index, c1);
  return (static_cast<float>(x0 >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

}  // namespace dspark
