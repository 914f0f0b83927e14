"""χ² goodness of fit on small vocabularies, shared by the runtime's statistical tests, and a check of its power."""

import numpy as np
import pytest
import torch
from scipy import stats


def chi2_pvalue(samples: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """χ² goodness of fit of integer samples in [0, K) against `expected_probs` [K]; cells with
    expected count < 5 are pooled into one so the test is valid. A sample on a zero-probability
    outcome fails outright: pooled with small cells it would only nudge their count."""
    k = expected_probs.numel()
    observed = torch.bincount(samples.flatten(), minlength=k).double().numpy()
    probs = expected_probs.double().numpy()
    expected = probs / probs.sum() * samples.numel()
    assert not observed[expected == 0].any(), "samples landed on a zero-probability outcome"
    small = (expected < 5) & (expected > 0)
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    return float(stats.chisquare(observed[keep], expected[keep]).pvalue)


def test_chi2_helper_has_power_to_catch_a_small_bias():
    """The losslessness tests rely on this helper: with 1e5 draws it must flag a 2-point bias
    (e.g. the 0.85 vs 0.7 of Appendix A is far larger) and accept the true distribution."""
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([0.5, 0.3, 0.2])
    draws = torch.multinomial(true, 100_000, replacement=True, generator=g)
    assert chi2_pvalue(draws, true) > 0.01
    assert chi2_pvalue(draws, torch.tensor([0.52, 0.28, 0.2])) < 1e-6


def test_chi2_helper_fails_on_a_draw_with_zero_probability():
    """One draw on the p = 0 outcome, pooled with a 1e-4 cell, passed with a p-value of 0.9999999999991."""
    expected = torch.tensor([0.5, 0.4999, 1e-4, 0.0])
    draws = torch.cat([torch.zeros(5000, dtype=torch.long), torch.ones(4999, dtype=torch.long), torch.tensor([3])])
    with pytest.raises(AssertionError, match="zero-probability outcome"):
        chi2_pvalue(draws, expected)
    assert chi2_pvalue(draws[:-1], expected) > 0.01  # without it the sample fits
