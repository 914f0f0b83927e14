"""χ² goodness of fit for the losslessness tests: samples (or their histogram) against a distribution."""

import numpy as np
import torch
from scipy import stats


def chi2_pvalue(samples: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Integer samples in [0, K) against `expected_probs` [K] (normalised here)."""
    counts = torch.bincount(samples.flatten().cpu(), minlength=expected_probs.numel())
    return chi2_pvalue_of_counts(counts, expected_probs)


def chi2_pvalue_of_counts(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """A histogram [K] against `expected_probs` [K]. Cells expected fewer than 5 times are pooled into
    one so the test is valid. A count on a zero-probability outcome fails outright: pooled with small
    cells it would only nudge their count."""
    observed = counts.double().cpu().numpy()
    probs = expected_probs.double().cpu().numpy()
    expected = probs / probs.sum() * observed.sum()
    assert not observed[expected == 0].any(), "samples landed on a zero-probability outcome"
    small = (expected < 5) & (expected > 0)
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    return float(stats.chisquare(observed[keep], expected[keep]).pvalue)


def chi2_two_sample_pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    """Do integer samples `a` and `b` (independent draws) come from one distribution? χ² on their
    2 × K contingency table, outcomes expected fewer than 5 times in either sample pooled into one."""
    k = int(max(a.max(), b.max())) + 1
    table = torch.stack([torch.bincount(x.flatten().cpu(), minlength=k) for x in (a, b)]).double()
    table = table[:, table.sum(0) > 0]
    expected_min = table.sum(0) * table.sum(1).min() / table.sum()
    small = expected_min < 5
    if small.any():
        table = torch.cat([table[:, ~small], table[:, small].sum(1, keepdim=True)], 1)
    if table.shape[1] < 2:
        return 1.0  # one outcome only: nothing to tell apart
    return float(stats.chi2_contingency(table.numpy(), correction=False).pvalue)
