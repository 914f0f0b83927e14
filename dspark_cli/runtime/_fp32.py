"""Products the runtime defines in fp32 (the Markov bias in q, the confidence logits z), kept fp32
inside a caller's autocast region: there torch ran them in bf16, q moved by up to ~1e-2, and a lazy
draft's q rebuilt outside the region was not the q its tokens were sampled from (a lossy ratio test)."""

import torch


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of fp32 operands, in fp32 whatever autocast says (checked first: entering a region costs
    microseconds a chain step would pay every position)."""
    kind = a.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        with torch.autocast(kind, enabled=False):
            return a @ b
    return a @ b
