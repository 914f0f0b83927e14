"""χ² goodness of fit on small vocabularies, shared by the runtime's statistical tests, and a check of its power."""

import numpy as np
import torch
from scipy import stats


def chi2_pvalue(samples: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """χ² goodness of fit of integer samples in [0, K) against `expected_probs` [K]; cells with
    expected count < 5 are pooled into one so the test is valid."""
    k = expected_probs.numel()
    observed = torch.bincount(samples.flatten(), minlength=k).double().numpy()
    probs = expected_probs.double().numpy()
    expected = probs / probs.sum() * samples.numel()
    small = expected < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
        if expected[-1] == 0:
            assert observed[-1] == 0, "samples landed on a zero-probability outcome"
            observed, expected = observed[:-1], expected[:-1]
    return float(stats.chisquare(observed, expected).pvalue)


def test_chi2_helper_has_power_to_catch_a_small_bias():
    """The losslessness tests rely on this helper: with 1e5 draws it must flag a 2-point bias
    (e.g. the 0.85 vs 0.7 of Appendix A is far larger) and accept the true distribution."""
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([0.5, 0.3, 0.2])
    draws = torch.multinomial(true, 100_000, replacement=True, generator=g)
    assert chi2_pvalue(draws, true) > 0.01
    assert chi2_pvalue(draws, torch.tensor([0.52, 0.28, 0.2])) < 1e-6
