"""Counter-based random numbers (Philox-4x32-10, Salmon et al. 2011, Random123; the generator
curand and torch's CUDA RNG use) so every tensor-parallel rank, and our CUDA kernels, draw
bit-identical numbers from (seed, counter) with no generator state. Philox's 32x32->64-bit
multiply is done in 16-bit halves, so int64 torch tensors compute it exactly on any device.

Counter layout (documented in docs/runtime-api.md, the kernels reproduce it):
  key     = (seed & 0xffffffff, (seed >> 32) & 0xffffffff)      one seed per request
  counter = (index >> 2, (stream << 16) | position, 0, 0)        index = vocab id or 0
  word    = output word (index & 3): four consecutive vocab ids share one Philox call
u = ((word >> 9) + 0.5) * 2**-23, uniform in (0, 1) and exact in fp32
(with 24 bits, (2**24 - 0.5) * 2**-24 rounds to 1.0: E = -log(u) = -0 would make a token undrawable).
The grouped race (grouped_race_sample: draft and residual/bonus streams) reads per group g of 8 ids instead:
  counter = (g >> 1, (stream << 16) | position, 0, 0)
  words   = 2 * (g & 1) (race uniform) and 2 * (g & 1) + 1 (pick uniform): one call per 16 vocab ids
"""

from itertools import accumulate

import torch
import torch.nn.functional as F

STREAM_DRAFT = 0  # Markov chain grouped race: position k, group g
STREAM_ACCEPT = 1  # acceptance uniforms: position j, index 0
STREAM_RECOVER = 2  # residual / bonus grouped race (seeded): position 0, group g
GROUP = 8  # vocab ids per group of grouped_race_sample
_ROUND_SEED_COUNTER = 0xFFFF0000  # round_seeds' counter word: disjoint from (stream << 16) | position

_MASK32 = 0xFFFFFFFF
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_BUMPS = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a·b, with every intermediate below 2**49."""
    low_part = b * (a & 0xFFFF)
    high_part = b * (a >> 16)
    t = low_part + ((high_part & 0xFFFF) << 16)
    return (high_part >> 16) + (t >> 32), t & _MASK32


def philox4x32(key0, key1, ctr0, ctr1, ctr2=0, ctr3=0) -> tuple[torch.Tensor, ...]:
    """Philox-4x32 with 10 rounds on int64 tensors (or ints) holding uint32 values (broadcasting)."""
    c = [ctr0, ctr1, ctr2, ctr3]
    k0, k1 = key0, key1
    for i in range(10):
        if i:
            k0 = (k0 + _KEY_BUMPS[0]) & _MASK32
            k1 = (k1 + _KEY_BUMPS[1]) & _MASK32
        hi0, lo0 = _mulhilo(_MULTIPLIERS[0], c[0])
        hi1, lo1 = _mulhilo(_MULTIPLIERS[1], c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return tuple(c)


def seed_tensor(seeds: list[int], device=None) -> torch.Tensor:
    """Engines' request seeds (Python ints up to 2**64 - 1) as int64, the u64 ones wrapped: the
    kernels and Philox read the seed's two 32-bit words, which wrapping keeps."""
    return torch.tensor([s - (1 << 64) if s >= 1 << 63 else s for s in seeds], dtype=torch.int64, device=device)


def round_seeds(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A fresh 63-bit seed per (request seed, absolute position): any position that grows every
    round (the V1 proposer passes its block's anchor, the V2 hook its first sample, TGI its last input row).

    The streams' counters hold only the position inside a block, so an engine that passed a
    request's own seed every round would reuse that round's noise: drafts would depend on earlier
    rounds' noise, and the ratio test needs them independent. Philox keyed by the request seed is a
    PRF of the position, so a seeded request's noise does not depend on the rest of the batch."""
    seeds = seeds.to(torch.int64)
    positions = positions.to(torch.int64)
    w0, w1, _, _ = philox4x32(seeds & _MASK32, (seeds >> 32) & _MASK32, positions & _MASK32, _ROUND_SEED_COUNTER)
    return w0 | ((w1 & 0x7FFFFFFF) << 32)


def _to_uniform(word: torch.Tensor) -> torch.Tensor:
    return ((word >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def _keys(seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seeds = seeds.to(torch.int64)
    return (seeds & _MASK32).unsqueeze(1), ((seeds >> 32) & _MASK32).unsqueeze(1)


def uniform(seeds: torch.Tensor, stream: int, position, index) -> torch.Tensor:
    """u in (0, 1) fp32 for (index, stream, position) under each request's seed.

    seeds [R] int64; position and index are ints or int64 tensors broadcastable to [R, N]."""
    key0, key1 = _keys(seeds)
    # Python ints stay ints: a host->device copy here would break CUDA-graph capture.
    if not isinstance(index, int):
        index = torch.as_tensor(index, device=seeds.device, dtype=torch.int64)
    if not isinstance(position, int):
        position = torch.as_tensor(position, device=seeds.device, dtype=torch.int64)
    words = philox4x32(key0, key1, (index & _MASK32) >> 2, (stream << 16) | (position & 0xFFFF))
    lane = index & 3
    if isinstance(lane, int):
        return _to_uniform(words[lane])
    picked = torch.where(lane == 0, words[0], torch.where(lane == 1, words[1], torch.where(lane == 2, words[2], words[3])))
    return _to_uniform(picked)


NOISE_FLOOR = torch.finfo(torch.float32).tiny  # race_sample's smallest Exp(1) entry: 0/0 is NaN


def exponential_like(rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Exp(1) variates shaped like `rows` from a torch.Generator (or the global RNG). An entry may
    be 0; race_sample raises it to NOISE_FLOOR (one clamp, not one here and one there)."""
    return torch.empty(rows.shape, dtype=torch.float32, device=rows.device).exponential_(generator=generator)


def race_sample(weights: torch.Tensor, exp_noise: torch.Tensor) -> torch.Tensor:
    """Exponential race: argmax_v w_v / E_v is distributed ∝ w_v (w ≥ 0, any scale), i.e.
    Gumbel-max without logs of w. Ties (measure zero) resolve to the lowest index.

    exp_noise (any float dtype, ≥ 0) counts as max(E, NOISE_FLOOR): an engine's E = 0 made a
    zero weight's key 0/0 = NaN, which argmax picks (a token of probability 0), and w > 0 over
    E = 0 an inf that ties with another. The clamp writes a new fp32 buffer the division then
    writes over (one elementwise pass added, no second [R, V] buffer); the floor changes no key of
    an E ≥ NOISE_FLOOR, so the race is the same for every such noise."""
    noise = exp_noise.float()  # fp16 cannot hold the floor (it would clamp to 0)
    keys = noise.clamp_min(NOISE_FLOOR) if noise is exp_noise else noise.clamp_min_(NOISE_FLOOR)
    # weights detached: autograd refuses out= for an input that tracks gradients (a drafter's
    # nn.Parameter weights, logits made outside no_grad), and a draw takes no gradient
    keys = torch.div(weights.detach(), keys, out=keys)  # (every caller's noise is shaped like its weights)
    return torch.argmax(keys, dim=-1)


def grouped_race_sample(weights: torch.Tensor, seeds: torch.Tensor, stream: int,
                        position: int | torch.Tensor) -> torch.Tensor:
    """One id per row ∝ weights [R, V] fp32 ≥ 0 (any scale) -> [R] int64, from the counter-based
    stream: an exponential race between groups of 8 consecutive ids (key W_g / E_g with W_g the
    group's sum; max-stability makes P(g) ∝ W_g), then inverse-CDF sampling inside the winner (the
    first id whose running sum exceeds v·W_g). It needs one Philox call per 16 ids and one log per
    8, where race_sample needs one log per id. position: int or int64 tensor broadcastable to [R, 1].
    The spec (docs/runtime-api.md) is what the CUDA kernels reproduce."""
    sums, keys, pick_u = grouped_race_keys(weights, seeds, stream, position)
    totals = sums[..., -1]
    winner = torch.argmax(keys, dim=-1, keepdim=True)  # ties: lowest group
    threshold = pick_u.gather(1, winner) * totals.gather(1, winner)
    winner_sums = sums.gather(1, winner.unsqueeze(-1).expand(-1, -1, GROUP)).squeeze(1)
    # 8 (no running sum above v·W_g) only for an all-zero row: then group 0's last id, or the row's
    # last one when V < 8 (the padded ids past V are no tokens)
    offset = (winner_sums <= threshold).sum(dim=-1).clamp_max(GROUP - 1)
    return (GROUP * winner.squeeze(1) + offset).clamp_max(weights.shape[1] - 1)


def grouped_race_keys(weights: torch.Tensor, seeds: torch.Tensor, stream: int, position):
    """The grouped race's state: (running sums [R, groups, 8], group keys W_g / E_g [R, groups],
    pick uniforms [R, groups]); grouped_race_sample draws from it, the self-test measures ties on it."""
    sums = _group_running_sums(weights)
    race_u, pick_u = _group_uniforms(seeds, stream, position, sums.shape[1])
    return sums, sums[..., -1] / -torch.log(race_u), pick_u


def _group_running_sums(weights: torch.Tensor) -> torch.Tensor:
    """[R, V] -> [R, ceil(V/8), 8] fp32 running sums within each group, ids past V weighing 0.
    Added left to right in fp32 so the reference rounds alike on every device (torch.cumsum
    accumulates fp32 in fp64 on the CPU, and its order on CUDA is its own). The CUDA kernels sum
    exp(x - group max) instead, so their sums differ in the last bits: near-ties only."""
    R, V = weights.shape
    groups = F.pad(weights, (0, -V % GROUP)).reshape(R, -1, GROUP)
    return torch.stack(list(accumulate(groups.unbind(-1))), dim=-1)


def _group_uniforms(seeds: torch.Tensor, stream: int, position, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(race u, pick v) [R, groups]: group g takes words 2(g & 1) and 2(g & 1) + 1 of call g >> 1."""
    key0, key1 = _keys(seeds)
    # Python ints stay ints: a host->device copy here would break CUDA-graph capture.
    if not isinstance(position, int):
        position = torch.as_tensor(position, device=seeds.device, dtype=torch.int64)
    calls = torch.arange((groups + 1) // 2, device=seeds.device, dtype=torch.int64).unsqueeze(0)
    w0, w1, w2, w3 = philox4x32(key0, key1, calls, (stream << 16) | (position & 0xFFFF))
    race = torch.stack((w0, w2), dim=-1).flatten(-2)[..., :groups]
    pick = torch.stack((w1, w3), dim=-1).flatten(-2)[..., :groups]
    return _to_uniform(race), _to_uniform(pick)
