"""Index helpers the engine integrations share."""

import torch


def concat_ranges(starts: list[int], counts: list[int], device=None) -> torch.Tensor:
    """int64 [Σ counts]: starts[i] .. starts[i] + counts[i] − 1 for every i, concatenated, built
    with tensor ops on the host (one copy to `device`), not a Python loop over the elements."""
    n = torch.tensor(counts, dtype=torch.int64)
    first = torch.repeat_interleave(torch.tensor(starts, dtype=torch.int64), n)
    offsets = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    return (first + offsets).to(device)
