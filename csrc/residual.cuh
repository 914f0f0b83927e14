// Rejection's recovered token (rejection.cu, and fused_step.cu's residual epilogue): the grouped
// race of dspark_cli/runtime/rng.py (groups of eight vocab ids; race.cuh's noise layout, here on
// stream kStreamRecover, position 0) over the residual max(p − q, 0) and, with the same noise, over
// p (the bonus row, and the fallback when the residual's mass is ~0). Group sums are added left to
// right and keyed W_g / E_g as the reference does, so with the same p and q the winner is its winner.
#pragma once
#include <cuda_runtime.h>

#include "philox.cuh"
#include "race.cuh"

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

struct Race {  // the residual's and p's winners and the residual's mass, over a part of the row
  Best res;
  Best p;
  float mass;
};

__device__ __forceinline__ Race empty_race() { return {{-INFINITY, 0x7fffffff}, {-INFINITY, 0x7fffffff}, 0.f}; }

__device__ __forceinline__ Race combine(Race a, Race b) { return {pick(a.res, b.res), pick(a.p, b.p), a.mass + b.mass}; }

// The race of lane (lane ^ off), every lane calling (race.cuh's warp_combine / group_combine).
__device__ __forceinline__ Race shfl_xor(const Race& x, int off) {
  return {{__shfl_xor_sync(0xffffffffu, x.res.key, off), __shfl_xor_sync(0xffffffffu, x.res.idx, off)},
          {__shfl_xor_sync(0xffffffffu, x.p.key, off), __shfl_xor_sync(0xffffffffu, x.p.idx, off)},
          __shfl_xor_sync(0xffffffffu, x.mass, off)};
}

// Another block's race (written before a grid-wide handshake): through L2, not a stale L1 line.
__device__ __forceinline__ Race load_race_cg(const Race* x) {
  return {{__ldcg(&x->res.key), __ldcg(&x->res.idx)}, {__ldcg(&x->p.key), __ldcg(&x->p.idx)}, __ldcg(&x->mass)};
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

// One group of a request's row: p's race always, the residual's when the request was rejected
// (q: the draft's row there, q = 0 elsewhere).
__device__ __forceinline__ void visit_residual_group(Race& acc, const float p[8], const float q[8], bool rejected,
                                                     int v, GroupNoise noise) {
  const float E = -logf(word_uniform(noise.race)), pick_u = word_uniform(noise.pick);
  race_group(acc.p, p, E, pick_u, v);
  if (rejected) {
    float res[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) res[i] = fmaxf(p[i] - q[i], 0.f);
    acc.mass += race_group(acc.res, res, E, pick_u, v);
  }
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
  float cp = p, cr = rejected ? fmaxf(p - q, 0.f) : 0.f;
#pragma unroll
  for (int d = 1; d < 8; d <<= 1) {
    const float below_p = __shfl_up_sync(0xffffffffu, cp, 4 * d), below_r = __shfl_up_sync(0xffffffffu, cr, 4 * d);
    if (j >= d) cp += below_p, cr += below_r;
  }
  const int last = (lane & 3) | 28;
  const float wp = __shfl_sync(0xffffffffu, cp, last), wr = __shfl_sync(0xffffffffu, cr, last);
  const float E = -logf(word_uniform(noise.race)), pick_u = word_uniform(noise.pick);
  const unsigned group_lanes = 0x11111111u << (lane & 3);
  // The first lane above the threshold (lane 28 + (lane & 3), entry 7, when none: a weightless group).
  const auto first_above = [&](float c, float w) {
    const unsigned above = __ballot_sync(0xffffffffu, c > pick_u * w) & group_lanes;
    return (v & ~7) + (above ? ((__ffs(above) - 1) >> 2) & 7 : 7);
  };
  const int idx_p = first_above(cp, wp), idx_r = first_above(cr, wr);
  if (j == 0) {
    acc.p = pick(acc.p, Best{wp / E, idx_p});
    acc.res = pick(acc.res, Best{wr / E, idx_r});
    acc.mass += wr;
  }
}

// The recovered token from a request's merged races: the residual's winner when it was rejected and
// the residual has mass, else p's (the bonus row, or p itself when p ≈ q left no residual).
constexpr float kResidualMassFloor = 1e-8f;  // rejection.RESIDUAL_MASS_FLOOR

__device__ __forceinline__ int recovered_token(const Race& race, bool rejected) {
  return rejected && race.mass > kResidualMassFloor ? race.res.idx : race.p.idx;
}

// The group noise of ids v .. v+7 on the recovery stream.
template <typename Key>  // PhiloxKey, or the int64 seed
__device__ __forceinline__ GroupNoise recover_noise(const Key& key, int v) {
  return group_noise(counter_words(key, kStreamRecover, 0, static_cast<uint32_t>(v) >> 4), v >> 3);
}

}  // namespace dspark
