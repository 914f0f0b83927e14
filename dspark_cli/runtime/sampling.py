"""Temperature and top-k/top-p warping, applied identically to the draft q and the target p
(DSPARK.md §4.1: if the engine warps the target, q must be warped the same way or the ratio test
is no longer lossless). Order, as vLLM's sampler: divide by T, then top-k, then top-p."""

import torch

GREEDY_BELOW = 1e-5  # temperature below this means greedy (argmax) for that request


def is_greedy(temperature: torch.Tensor) -> torch.Tensor:
    return temperature < GREEDY_BELOW


def warp_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k=None, top_p=None) -> torch.Tensor:
    """fp32 logits [R, V] -> warped fp32 logits (masked entries = -inf).

    top_k [R] int64: keep the entries ≥ the k-th largest (0 or ≥ V: off).
    top_p [R] fp32: keep the smallest high-probability set whose mass reaches p (1.0: off): x stays
    iff the mass of the entries above it is < p, summed in fp64 (the fp32 cumsum of 151936 entries
    is off by ~1e-5, several tokens at the boundary); the most likely token always stays, and ties of
    the smallest kept value stay with it, as top-k's do. Greedy rows are only masked, not scaled."""
    scale = torch.where(is_greedy(temperature), torch.ones_like(temperature), temperature)
    logits = logits.float() / scale.unsqueeze(1)
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        top_k = top_k.to(torch.int64)
        k = torch.where((top_k <= 0) | (top_k >= vocab), torch.full_like(top_k, vocab), top_k)
        kth = sorted_logits.gather(1, (vocab - k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.double().softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1.0 - top_p.double()).unsqueeze(1)
        drop[:, -1] = False
        smallest_kept = sorted_logits.gather(1, drop.sum(dim=1, keepdim=True))  # drop is a prefix
        sorted_logits = sorted_logits.masked_fill(sorted_logits < smallest_kept, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def probs_from_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k=None, top_p=None) -> torch.Tensor:
    """The exact fp32 distribution a request samples from: softmax of the warped logits, or the
    one-hot argmax for greedy requests."""
    probs = warp_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    greedy = is_greedy(temperature)
    one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy.unsqueeze(1), one_hot, probs)
