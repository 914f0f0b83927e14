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
"""

import torch

STREAM_DRAFT = 0  # Markov chain sampling: position k, index v
STREAM_ACCEPT = 1  # acceptance uniforms: position j, index 0
STREAM_RECOVER = 2  # residual / bonus sample: position 0, index v

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


def exponential(seeds: torch.Tensor, stream: int, position: int, width: int) -> torch.Tensor:
    """Exp(1) variates -log(u) [R, width] over index 0..width-1, never 0 (u < 1)."""
    key0, key1 = _keys(seeds)
    blocks = torch.arange((width + 3) // 4, device=seeds.device, dtype=torch.int64).unsqueeze(0)
    words = torch.stack(philox4x32(key0, key1, blocks, (stream << 16) | (position & 0xFFFF)), dim=-1)
    return -torch.log(_to_uniform(words.flatten(-2)[..., :width]))


def exponential_like(rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Exp(1) variates shaped like `rows` from a torch.Generator (or the global RNG)."""
    e = torch.empty(rows.shape, dtype=torch.float32, device=rows.device).exponential_(generator=generator)
    return e.clamp_min_(torch.finfo(torch.float32).tiny)  # 0 would make q/E = inf or nan


def race_sample(weights: torch.Tensor, exp_noise: torch.Tensor) -> torch.Tensor:
    """Exponential race: argmax_v w_v / E_v is distributed ∝ w_v (w ≥ 0, any scale), i.e.
    Gumbel-max without logs of w. Ties (measure zero) resolve to the lowest index."""
    return torch.argmax(weights / exp_noise, dim=-1)
