import torch

from dspark_cli.runtime import rng
from tests.test_runtime_chi2 import chi2_pvalue


def _t(*values):
    return [torch.tensor([v], dtype=torch.int64) for v in values]


def test_philox_known_answers():
    # Random123 known-answer vectors for Philox-4x32-10: (key0, key1), (ctr0..ctr3) -> 4 words.
    cases = [
        ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for key, ctr, expected in cases:
        words = rng.philox4x32(*_t(*key), *_t(*ctr))
        assert tuple(int(w) for w in words) == expected


def test_uniform_and_exponential_agree_on_every_word():
    """exponential() takes four vocab ids per Philox call; uniform() picks word index & 3."""
    seeds = torch.tensor([7, 2**40 + 1])
    index = torch.arange(4 * 9 + 3).unsqueeze(0)
    assert torch.equal(rng.exponential(seeds, rng.STREAM_RECOVER, 5, 39),
                       -torch.log(rng.uniform(seeds, rng.STREAM_RECOVER, 5, index)))
    assert torch.equal(rng.uniform(seeds, rng.STREAM_ACCEPT, 2, 0), rng.uniform(seeds, rng.STREAM_ACCEPT, 2, index[:, :1]))


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
