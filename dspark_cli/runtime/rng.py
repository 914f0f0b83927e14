"""Counter-based random numbers (Threefry-2x32-20, Salmon et al. 2011, the Random123 family that
Philox belongs to) so every tensor-parallel rank, and our CUDA kernels, draw bit-identical
numbers from (seed, counter) with no generator state. Threefry needs only 32-bit add/rotate/xor,
which int64 torch tensors do exactly on any device (Philox's 32x32->64 multiply would overflow).

Counter layout (documented in docs/runtime-api.md, the kernels reproduce it):
  key     = (seed & 0xffffffff, (seed >> 32) & 0xffffffff)      one seed per request
  counter = (index, (stream << 16) | position)                   index = vocab id or 0
Only output word 0 is used: u = ((x0 >> 9) + 0.5) * 2**-23, uniform in (0, 1) and exact in fp32
(with 24 bits, (2**24 - 0.5) * 2**-24 rounds to 1.0: E = -log(u) = -0 would make a token undrawable).
"""

import torch

STREAM_DRAFT = 0  # Markov chain sampling: position k, index v
STREAM_ACCEPT = 1  # acceptance uniforms: position j, index 0
STREAM_RECOVER = 2  # residual / bonus sample: position 0, index v

_MASK32 = 0xFFFFFFFF
_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
_PARITY = 0x1BD11BDA


def _rotl(x: torch.Tensor, n: int) -> torch.Tensor:
    return ((x << n) & _MASK32) | (x >> (32 - n))


def threefry2x32(key0: torch.Tensor, key1: torch.Tensor, ctr0: torch.Tensor, ctr1: torch.Tensor):
    """Threefry-2x32 with 20 rounds on int64 tensors holding uint32 values (broadcasting)."""
    ks = (key0, key1, key0 ^ key1 ^ _PARITY)
    x0 = (ctr0 + ks[0]) & _MASK32
    x1 = (ctr1 + ks[1]) & _MASK32
    for i in range(20):
        x0 = (x0 + x1) & _MASK32
        x1 = _rotl(x1, _ROTATIONS[i % 8]) ^ x0
        if i % 4 == 3:
            s = (i + 1) // 4
            x0 = (x0 + ks[s % 3]) & _MASK32
            x1 = (x1 + ks[(s + 1) % 3] + s) & _MASK32
    return x0, x1


def uniform(seeds: torch.Tensor, stream: int, position, index) -> torch.Tensor:
    """u in (0, 1) fp32 for counter (index, stream<<16 | position) under each request's seed.

    seeds [R] int64; position and index are ints or int64 tensors broadcastable to [R, N]."""
    seeds = seeds.to(torch.int64)
    key0 = (seeds & _MASK32).unsqueeze(1)
    key1 = ((seeds >> 32) & _MASK32).unsqueeze(1)
    # Python ints stay ints: a host->device copy here would break CUDA-graph capture.
    if not isinstance(index, int):
        index = torch.as_tensor(index, device=seeds.device, dtype=torch.int64)
    if not isinstance(position, int):
        position = torch.as_tensor(position, device=seeds.device, dtype=torch.int64)
    x0, _ = threefry2x32(key0, key1, index & _MASK32, (stream << 16) | (position & 0xFFFF))
    return ((x0 >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def exponential(seeds: torch.Tensor, stream: int, position: int, width: int) -> torch.Tensor:
    """Exp(1) variates -log(u) [R, width] over index 0..width-1, never 0 (u < 1)."""
    index = torch.arange(width, device=seeds.device, dtype=torch.int64).unsqueeze(0)
    return -torch.log(uniform(seeds, stream, position, index))


def exponential_like(rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Exp(1) variates shaped like `rows` from a torch.Generator (or the global RNG)."""
    e = torch.empty(rows.shape, dtype=torch.float32, device=rows.device).exponential_(generator=generator)
    return e.clamp_min_(torch.finfo(torch.float32).tiny)  # 0 would make q/E = inf or nan


def race_sample(weights: torch.Tensor, exp_noise: torch.Tensor) -> torch.Tensor:
    """Exponential race: argmax_v w_v / E_v is distributed ∝ w_v (w ≥ 0, any scale), i.e.
    Gumbel-max without logs of w. Ties (measure zero) resolve to the lowest index."""
    return torch.argmax(weights / exp_noise, dim=-1)
