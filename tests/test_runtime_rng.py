import torch

from dspark_cli.runtime import rng
from tests.test_runtime_chi2 import chi2_pvalue


def _t(*values):
    return [torch.tensor([v], dtype=torch.int64) for v in values]


def test_threefry_known_answers():
    # Random123 known-answer vectors for Threefry-2x32-20 (key0, key1, ctr0, ctr1) -> (x0, x1).
    cases = [
        ((0, 0, 0, 0), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF,) * 4, (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344, 0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ]
    for (k0, k1, c0, c1), expected in cases:
        x0, x1 = rng.threefry2x32(*_t(k0, k1, c0, c1))
        assert (int(x0), int(x1)) == expected


def test_uniform_is_deterministic_in_open_interval_and_uniform():
    seeds = torch.tensor([0, 1, -5, 2**40 + 3])
    u = rng.uniform(seeds, rng.STREAM_DRAFT, 3, torch.arange(50_000).unsqueeze(0))
    assert torch.equal(u, rng.uniform(seeds, rng.STREAM_DRAFT, 3, torch.arange(50_000).unsqueeze(0)))
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert chi2_pvalue((u * 20).long(), torch.full((20,), 0.05)) > 0.01
    # streams, positions and seeds give different numbers
    assert not torch.equal(u, rng.uniform(seeds, rng.STREAM_ACCEPT, 3, torch.arange(50_000).unsqueeze(0)))
    assert not torch.equal(u[0], u[1])


def test_race_sample_follows_weights():
    w = torch.tensor([0.1, 0.0, 0.6, 0.3]) * 7.0  # unnormalized on purpose
    seeds = torch.arange(100_000)
    draws = rng.race_sample(w.expand(100_000, 4), rng.exponential(seeds, rng.STREAM_RECOVER, 0, 4))
    assert chi2_pvalue(draws, w / w.sum()) > 0.01
