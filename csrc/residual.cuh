// Rejection's recovered token (rejection.cu, and fused_step.cu's residual epilogue): the grouped
// race of dspark_cli/runtime/rng.py (groups of eight vocab ids; race.cuh's noise layout, here on
// stream kStreamRecover, position 0) over the residual max(p − q, 0) of a rejected request, over p
// for one that accepted all its drafts (the bonus row). Group sums are added left to right and keyed
// W_g / E_g as the reference does, so with the same p and q the winner is its winner. When the
// residual has no mass (p ≈ q) the reference races over p instead: the finish runs that race then
// (recovered_token), so the pass over V runs one race per group, not two.
#pragma once
#include <cuda_runtime.h>

#include "philox.cuh"
#include "race.cuh"
#include "verdicts.cuh"

namespace dspark {

struct Best {  // argmax with ties to the lowest index, as torch.argmax
  float key;
  int idx;
};

__device__ __forceinline__ Best pick(Best a, Best b) {
  return (b.key > a.key || (b.key == a.key && b.idx < a.idx)) ? b : a;
}

__device__ __forceinline__ Best warp_pick(Best b) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Best o{__shfl_xor_sync(0xffffffffu, b.key, off), __shfl_xor_sync(0xffffffffu, b.idx, off)};
    b = pick(b, o);
  }
  return b;
}

struct Race {  // over a part of a request's row: the winner of its race and the weight raced over
  Best best;
  float mass;  // the residual's mass for a rejected request
};

__device__ __forceinline__ Race empty_race() { return {{-INFINITY, 0x7fffffff}, 0.f}; }

__device__ __forceinline__ Race combine(Race a, Race b) { return {pick(a.best, b.best), a.mass + b.mass}; }

// The race of lane (lane ^ off), every lane calling (race.cuh's warp_combine / group_combine).
__device__ __forceinline__ Race shfl_xor(const Race& x, int off) {
  return {{__shfl_xor_sync(0xffffffffu, x.best.key, off), __shfl_xor_sync(0xffffffffu, x.best.idx, off)},
          __shfl_xor_sync(0xffffffffu, x.mass, off)};
}

// Another block's race (written before a grid-wide handshake): through L2, not a stale L1 line.
__device__ __forceinline__ Race load_race_cg(const Race* x) {
  return {{__ldcg(&x->best.key), __ldcg(&x->best.idx)}, __ldcg(&x->mass)};
}

// Group v .. v+7 (v % 8 == 0) with weights w into best; returns the group's weight. The pick is
// computed whether or not the group wins (selects, no branch: a branch per group and race cost
// more than the pick in the fused epilogue, where lanes rarely agree).
__device__ __forceinline__ float race_group(Best& best, const float w[8], float E, float pick_u, int v) {
  float c[8];
  c[0] = w[0];
#pragma unroll
  for (int i = 1; i < 8; ++i) c[i] = c[i - 1] + w[i];
  const float key = c[7] / E, t = pick_u * c[7];
  int j = 7;  // the first c above t (c[7] > t unless the group weighs 0: then 7, as the reference's clamp)
#pragma unroll
  for (int i = 6; i >= 0; --i) j = c[i] > t ? i : j;
  const bool wins = key > best.key || (key == best.key && v < best.idx);  // ties: the lower group, as argmax
  best.key = wins ? key : best.key;
  best.idx = wins ? v + j : best.idx;
  return c[7];
}

// This thread's share of a request's races, parts[first], parts[first + stride], .. below count,
// combined. The loads go out kBatch at a time, so a merge waits one round trip per kBatch · stride
// races (a plain loop, which the compiler unrolls by four, waited one per four loads a lane).
template <int kBatch>
__device__ __forceinline__ Race gather_races(const Race* parts, int first, int count, int stride) {
  Race acc = empty_race();
  for (int base = first; base < count; base += kBatch * stride) {
    Race got[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = base + j * stride;
      got[j] = i < count ? load_race_cg(parts + i) : empty_race();
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) acc = combine(acc, got[j]);
  }
  return acc;
}

// A request's n races merged by one warp (lane 0..31, every lane getting the merge): a plain
// strided loop, which measured faster than gather_races for the finishes' few partials. Through L2
// (load_race_cg): they may come from other blocks of this very grid.
__device__ __forceinline__ Race warp_merge_races(const Race* parts, int n, int lane) {
  Race acc = empty_race();
  for (int i = lane; i < n; i += 32) acc = combine(acc, load_race_cg(parts + i));
  return warp_combine(acc);
}

// One group of a request's row: the residual's race when the request was rejected (q: the draft's
// row there), else p's.
__device__ __forceinline__ void visit_residual_group(Race& acc, const float p[8], const float q[8], bool rejected,
                                                     int v, GroupNoise noise) {
  const float E = -logf(word_uniform(noise.race)), pick_u = word_uniform(noise.pick);
  float w[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) w[i] = rejected ? fmaxf(p[i] - q[i], 0.f) : p[i];
  acc.mass += race_group(acc.best, w, E, pick_u, v);
}

// A rebuilt q entry from the chain's row max and 1 / sum-exp: exp_ftz and a multiply (within a
// few ulp of q_token's expf and division; those cost most of the residual pass's instructions).
__device__ __forceinline__ float rebuilt_q(float x, float max, float inv_sum) { return exp_ftz(x - max) * inv_sum; }

// The same for a group spread over eight lanes (the lanes sharing lane & 3, entry (lane >> 2) & 7 of
// group v >> 3; p = q = 0 where a lane holds no entry), every lane of the warp calling; the
// result goes into the acc of the group's first lane. The sums are a lane scan, so their last bits
// are not the reference's left-to-right ones (near-ties only).
__device__ __forceinline__ void visit_lane_residual(Race& acc, float p, float q, bool rejected, int v,
                                                    GroupNoise noise) {
  const int lane = threadIdx.x % 32, j = (lane >> 2) & 7;
  float c = rejected ? fmaxf(p - q, 0.f) : p;
#pragma unroll
  for (int d = 1; d < 8; d <<= 1) {
    const float below = __shfl_up_sync(0xffffffffu, c, 4 * d);
    if (j >= d) c += below;
  }
  const float w = __shfl_sync(0xffffffffu, c, (lane & 3) | 28);
  const float E = -logf(word_uniform(noise.race)), pick_u = word_uniform(noise.pick);
  // The first lane above the threshold (lane 28 + (lane & 3), entry 7, when none: a weightless group).
  const unsigned above = __ballot_sync(0xffffffffu, c > pick_u * w) & (0x11111111u << (lane & 3));
  const int idx = (v & ~7) + (above ? ((__ffs(above) - 1) >> 2) & 7 : 7);
  if (j == 0) {
    acc.best = pick(acc.best, Best{w / E, idx});
    acc.mass += w;
  }
}

// The group noise of ids v .. v+7 on the recovery stream.
template <typename Key>  // PhiloxKey, or the int64 seed
__device__ __forceinline__ GroupNoise recover_noise(const Key& key, int v) {
  return group_noise(counter_words(key, kStreamRecover, 0, static_cast<uint32_t>(v) >> 4), v >> 3);
}

// The recovered token from a request's merged race, every lane of a warp calling with the same race
// (lane 0 writes it): the race's winner, unless the request was rejected and the residual had no
// mass, when the reference races over p (its row p_row, V ids) instead. That takes p ≈ q along the
// whole row, rare enough for one warp to run the race over V here (left-to-right group sums, the
// main pass's noise and keys: the winner p's race would have had there).
constexpr float kResidualMassFloor = 1e-8f;  // rejection.RESIDUAL_MASS_FLOOR

__device__ __forceinline__ int recovered_token(const Race& race, bool rejected, const TargetRow& p_row, int V,
                                               int64_t seed) {
  // min: a row without a winner (NaN, or no mass: bad input, unchecked here) still yields an id < V
  if (!rejected || race.mass > kResidualMassFloor) return min(race.best.idx, V - 1);
  Best best{-INFINITY, 0x7fffffff};
  for (int v = 8 * (threadIdx.x % 32); v < V; v += 8 * 32) {
    float p[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = v + i < V ? p_row[v + i] : 0.f;
    const GroupNoise noise = recover_noise(seed, v);
    race_group(best, p, -logf(word_uniform(noise.race)), word_uniform(noise.pick), v);
  }
  return min(warp_pick(best).idx, V - 1);
}

// Request r's recovered token from its merged race into out_tokens [R, γ + 1] at n, its first
// unaccepted position (target row row_start[r] + n is its p): every lane of a warp calling, lane 0
// writing.
__device__ __forceinline__ void write_recovered_token(const Race& race, int r, int n, bool rejected,
                                                      const TargetRows& target, RowStarts row_start, int V,
                                                      int64_t seed, int64_t* out_tokens, int gamma) {
  const int token = recovered_token(race, rejected, target.row(row_start[r] + n, V), V, seed);
  if (threadIdx.x % 32 == 0) out_tokens[static_cast<int64_t>(r) * (gamma + 1) + n] = token;
}

}  // namespace dspark
