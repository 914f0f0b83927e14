"""Shared helpers for the runtime's statistical tests (χ² goodness of fit on small vocabularies)."""

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
