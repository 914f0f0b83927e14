"""The χ² helper of the losslessness tests (tests/chi2.py): its power and its zero-probability rule."""

import pytest
import torch

from tests.chi2 import chi2_pvalue, chi2_two_sample_pvalue


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


def test_two_sample_chi2_tells_one_distribution_from_a_shifted_one():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0.4, 0.3, 0.2, 0.05, 0.03, 0.02])
    a, b = (torch.multinomial(p, 2000, replacement=True, generator=g) for _ in range(2))
    assert chi2_two_sample_pvalue(a, b) > 0.01
    shifted = torch.multinomial(torch.tensor([0.3, 0.4, 0.2, 0.05, 0.03, 0.02]), 2000, replacement=True, generator=g)
    assert chi2_two_sample_pvalue(a, shifted) < 1e-6
