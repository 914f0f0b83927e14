"""The self-test's own judgement (dspark verify ops, tests/test_kernels_gpu.py), on the CPU: a
kernel's token may differ from the reference's only where the reference's draw was a near-tie."""

from types import SimpleNamespace

import pytest
import torch

from dspark_cli.runtime import markov_chain, rng
from dspark_cli.selftest import NEAR_TIE, MarkovCase, _unexplained_chain_divergences, markov_inputs, race_margin
from tests.run_cli import run_dspark


def test_race_margin_is_small_only_for_a_near_tie():
    g = torch.Generator().manual_seed(0)
    weights, seed = torch.rand(64, generator=g), torch.tensor(12345)
    a = int(rng.grouped_race_sample(weights.unsqueeze(0), seed.view(1), rng.STREAM_DRAFT, 3)[0])
    keys = rng.grouped_race_keys(weights.unsqueeze(0), seed.view(1), rng.STREAM_DRAFT, 3)[1][0]
    loser = int(keys.argmin())
    b = loser * rng.GROUP
    assert race_margin(weights, seed, rng.STREAM_DRAFT, 3, a, b) > 1e-2
    # Scale the losing group up until its key sits a rounding step below the winner's: a tie.
    tied = weights.clone()
    tied[b: b + rng.GROUP] *= float(keys[a // rng.GROUP] / keys[loser]) * (1 - 1e-7)
    assert race_margin(tied, seed, rng.STREAM_DRAFT, 3, a, b) < NEAR_TIE


def test_a_chain_wrong_where_no_tie_was_is_unexplained():
    case = MarkovCase(3, 4, 512, 16, torch.float32, torch.float32, greedy_every=3, seed=1)
    inputs = markov_inputs(case, "cpu")
    U, anchors, w1, w2, temperature, seeds = inputs
    ref = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=True)
    assert _unexplained_chain_divergences(case, inputs, ref, ref) == 0
    for r in range(case.R):  # request 0 greedy, 1 and 2 sampled: each wrong from its second step
        tokens = ref.tokens.clone()
        tokens[r, 1:] = (tokens[r, 1:] + 1) % case.V
        assert _unexplained_chain_divergences(case, inputs, ref, SimpleNamespace(tokens=tokens)) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_verify_ops_without_a_gpu_or_a_build_names_both(tmp_path):
    """Was the GPU alone: the missing build came up only once a GPU was there."""
    result = run_dspark("verify", "ops", env={"DSPARK_CACHE": str(tmp_path / "cache"), "DSPARK_OPS_LIB": ""})
    assert result.returncode == 3
    assert result.stderr.startswith("error: no CUDA GPU visible to torch: the self-test runs the kernels on a GPU; "
                                    "and CUDA extension not loaded: no built extension")


def test_selftest_judges_a_sampled_divergence_at_its_own_position(monkeypatch):
    """A sampled row's divergence at step k is judged by the race at position k."""
    from dspark_cli import selftest

    case = selftest.MarkovCase(3, 4, 512, 16, torch.float32, torch.float32, greedy_every=3, seed=1)
    inputs = selftest.markov_inputs(case, "cpu")
    U, anchors, w1, w2, temperature, seeds = inputs
    ref = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=True)
    positions = []
    monkeypatch.setattr(selftest, "race_margin", lambda q, seed, stream, k, a, b: positions.append(k) or 1.0)
    tokens = ref.tokens.clone()
    tokens[1, 2:] = (tokens[1, 2:] + 1) % case.V  # request 1 (sampled) wrong from step 2
    assert selftest._unexplained_chain_divergences(case, inputs, ref, SimpleNamespace(tokens=tokens)) == 1
    assert positions == [2]
