import torch

from dspark_cli.runtime import rng
from tests.chi2 import chi2_pvalue


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


def test_uniform_takes_four_ids_per_philox_call():
    """uniform() picks word index & 3 of the call for index >> 2."""
    seeds = torch.tensor([7, 2**40 + 1])
    index = torch.arange(4 * 9 + 3).unsqueeze(0)
    key0, key1 = rng._keys(seeds)
    words = torch.stack(rng.philox4x32(key0, key1, index >> 2, (rng.STREAM_RECOVER << 16) | 5), dim=-1)
    assert torch.equal(rng.uniform(seeds, rng.STREAM_RECOVER, 5, index),
                       rng._to_uniform(words.gather(-1, (index & 3).expand(2, -1).unsqueeze(-1)).squeeze(-1)))
    assert torch.equal(rng.uniform(seeds, rng.STREAM_ACCEPT, 2, 0), rng.uniform(seeds, rng.STREAM_ACCEPT, 2, index[:, :1]))


def test_round_seeds_are_philox_of_the_position_under_the_request_seed():
    seeds = rng.seed_tensor([1, 1, 2, 2**64 - 5])  # a u64 seed is held wrapped: -5
    assert seeds.tolist() == [1, 1, 2, -5]
    pos = torch.tensor([5, 9, 5, 5], dtype=torch.int64)
    out = rng.round_seeds(seeds, pos)
    assert len(set(out.tolist())) == 4 and bool((out >= 0).all())
    w0, w1, _, _ = rng.philox4x32(*_t(0xFFFFFFFB, 0xFFFFFFFF), *_t(5, 0xFFFF0000))
    assert int(out[3]) == int(w0) | (int(w1) & 0x7FFFFFFF) << 32
    assert torch.equal(rng.round_seeds(seeds[1:2], pos[1:2]), out[1:2])  # the batch does not matter
    # the position's whole low word counts: contexts past 2^16 tokens do not reuse earlier noise
    far = rng.round_seeds(torch.full((3,), 7), torch.tensor([5, 5 + 2**16, 5 + 2**31]))
    assert len(set(far.tolist())) == 3


def test_uniform_is_deterministic_in_open_interval_and_uniform():
    seeds = torch.tensor([0, 1, -5, 2**40 + 3])
    u = rng.uniform(seeds, rng.STREAM_DRAFT, 3, torch.arange(50_000).unsqueeze(0))
    assert torch.equal(u, rng.uniform(seeds, rng.STREAM_DRAFT, 3, torch.arange(50_000).unsqueeze(0)))
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert chi2_pvalue((u * 20).long(), torch.full((20,), 0.05)) > 0.01
    # streams, positions and seeds give different numbers
    assert not torch.equal(u, rng.uniform(seeds, rng.STREAM_ACCEPT, 3, torch.arange(50_000).unsqueeze(0)))
    assert not torch.equal(u[0], u[1])
    # the extreme words map inside (0, 1): a 0 would accept a draft of target probability 0
    assert rng._to_uniform(torch.tensor([0, 0xFFFFFFFF])).tolist() == [2.0**-24, 1 - 2.0**-24]


def test_race_sample_follows_weights():
    w = torch.tensor([0.1, 0.0, 0.6, 0.3]) * 7.0  # unnormalized on purpose
    rows = w.expand(100_000, 4)
    draws = rng.race_sample(rows, rng.exponential_like(rows, torch.Generator().manual_seed(0)))
    assert chi2_pvalue(draws, w / w.sum()) > 0.01


def grouped_race_by_hand(weights: torch.Tensor, seed: int, stream: int, position: int) -> int:
    """The grouped race of docs/runtime-api.md for one row [V], one group at a time."""
    key = _t(seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    best_key, best_group, best_sums, best_pick = None, None, None, None
    for g in range((weights.numel() + 7) // 8):
        words = rng.philox4x32(*key, *_t(g >> 1, (stream << 16) | (position & 0xFFFF)))
        race_u, pick_u = rng._to_uniform(words[2 * (g & 1)]), rng._to_uniform(words[2 * (g & 1) + 1])
        sums, total = [], torch.zeros(1)
        for w in weights[8 * g : 8 * g + 8]:
            total = total + w  # fp32, left to right
            sums.append(total)
        group_key = total / -torch.log(race_u)
        if best_key is None or group_key > best_key:
            best_key, best_group, best_sums, best_pick = group_key, g, sums, pick_u
    threshold = best_pick * best_sums[-1]
    return 8 * best_group + sum(int(s <= threshold) for s in best_sums)


def test_grouped_race_matches_the_spec_group_by_group():
    g = torch.Generator().manual_seed(1)
    V = 37  # a partial last group of 5
    w = torch.rand(6, V, generator=g) ** 4 * torch.logspace(-6, 2, 6).unsqueeze(1)
    w[2, 8:16] = 0.0  # a group that can never win
    seeds = torch.tensor([0, 1, -3, 2**40 + 5, 2**63 - 1, 12345])
    for stream, position in [(rng.STREAM_DRAFT, 0), (rng.STREAM_DRAFT, 5), (rng.STREAM_RECOVER, 70_000)]:
        draws = rng.grouped_race_sample(w, seeds, stream, position)
        assert draws.tolist() == [grouped_race_by_hand(w[r], int(seeds[r]), stream, position) for r in range(6)]
    positions = torch.arange(6).unsqueeze(1)  # a tensor position: one per request
    assert rng.grouped_race_sample(w, seeds, rng.STREAM_DRAFT, positions).tolist() == [
        grouped_race_by_hand(w[r], int(seeds[r]), rng.STREAM_DRAFT, r) for r in range(6)]


def test_grouped_race_follows_weights_chi2():
    # V = 29: groups 0..7, 8..15, 16..23 (all zero), 24..28 (partial); zeros also first in a group;
    # weights over six decades, scaled small on purpose (the race needs no normalization).
    w = torch.tensor([0.0, 3.0, 0.5, 1e-2, 7.0, 0.0, 2.0, 0.05,
                      1.0, 4.0, 0.0, 0.3, 1e-3, 6.0, 0.8, 1e-5,
                      0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                      2.5, 0.1, 0.0, 1.5, 5.0]) * 1e-4
    n = 200_000
    draws = rng.grouped_race_sample(w.expand(n, -1), torch.arange(n), rng.STREAM_DRAFT, 3)
    assert torch.all(torch.bincount(draws, minlength=w.numel())[w == 0] == 0)
    assert chi2_pvalue(draws, w / w.sum()) > 0.01


def test_grouped_race_of_one_hot_rows_is_their_argmax():
    V = 21
    hot = torch.tensor([0, 7, 8, 13, 16, 20])
    rows = torch.nn.functional.one_hot(hot, V).float()
    for position in range(4):
        assert torch.equal(rng.grouped_race_sample(rows, torch.arange(6) * 977, rng.STREAM_DRAFT, position), hot)


def test_grouped_race_never_returns_an_id_past_the_vocabulary():
    """An all-zero row (no running sum above v·W_g) took group 0's last slot, id 7 for V = 5."""
    for V in (1, 5, 8, 13):
        draws = rng.grouped_race_sample(torch.zeros(4, V), torch.arange(4), rng.STREAM_RECOVER, 0)
        assert draws.tolist() == [min(7, V - 1)] * 4


def test_grouped_race_draws_depend_only_on_own_seed_and_row():
    g = torch.Generator().manual_seed(2)
    w, seeds = torch.rand(64, 50, generator=g), torch.randint(-2**62, 2**62, (64,), generator=g)
    perm = torch.randperm(64, generator=g)
    draws = rng.grouped_race_sample(w, seeds, rng.STREAM_DRAFT, 1)
    assert torch.equal(rng.grouped_race_sample(w[perm], seeds[perm], rng.STREAM_DRAFT, 1), draws[perm])
    assert torch.equal(rng.grouped_race_sample(w[:1], seeds[:1], rng.STREAM_DRAFT, 1), draws[:1])
