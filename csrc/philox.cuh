// Philox-4x32-10, bit-identical to dspark_cli/runtime/rng.py (see docs/runtime-api.md,
// "Random numbers"): key = (seed lo, seed hi), counter = (index >> 2, stream << 16 | position, 0, 0),
// output word index & 3, so four consecutive vocab ids share one call.
#pragma once
#include <cstdint>

namespace dspark {

// The ten round keys of a seed: kernels drawing many counters under one seed compute them once.
struct PhiloxKey {
  uint32_t k0[10], k1[10];
};

__device__ __forceinline__ PhiloxKey philox_key(int64_t seed) {
  PhiloxKey key;
  key.k0[0] = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffull);
  key.k1[0] = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
#pragma unroll
  for (int i = 1; i < 10; ++i) {
    key.k0[i] = key.k0[i - 1] + 0x9E3779B9u;
    key.k1[i] = key.k1[i - 1] + 0xBB67AE85u;
  }
  return key;
}

__device__ __forceinline__ uint4 philox4x32_10(const PhiloxKey& key, uint32_t c0, uint32_t c1) {
  uint32_t x0 = c0, x1 = c1, x2 = 0u, x3 = 0u;
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, x0), lo0 = 0xD2511F53u * x0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, x2), lo1 = 0xCD9E8D57u * x2;
    x0 = hi1 ^ x1 ^ key.k0[i];
    x1 = lo1;
    x2 = hi0 ^ x3 ^ key.k1[i];
    x3 = lo0;
  }
  return make_uint4(x0, x1, x2, x3);
}

// The four words for vocab ids 4·block .. 4·block + 3 of (seed, stream, position).
__device__ __forceinline__ uint4 counter_words(const PhiloxKey& key, int stream, int position, uint32_t block) {
  const uint32_t c1 = (static_cast<uint32_t>(stream) << 16) | (static_cast<uint32_t>(position) & 0xffffu);
  return philox4x32_10(key, block, c1);
}

__device__ __forceinline__ uint4 counter_words(int64_t seed, int stream, int position, uint32_t block) {
  return counter_words(philox_key(seed), stream, position, block);
}

__device__ __forceinline__ uint32_t word_at(const uint4& w, int i) {
  return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w;
}

// u in (0, 1): ((word >> 9) + 0.5) * 2^-23, exactly as the torch reference computes it in fp32 (never 1.0).
__device__ __forceinline__ float word_uniform(uint32_t word) {
  return (static_cast<float>(word >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

__device__ __forceinline__ float counter_uniform(int64_t seed, int stream, int position, uint32_t index) {
  return word_uniform(word_at(counter_words(seed, stream, position, index >> 2), index & 3));
}

}  // namespace dspark
