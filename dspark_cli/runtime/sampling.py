"""Temperature and top-k/top-p warping, applied identically to the draft q and the target p
(DSPARK.md §4.1: if the engine warps the target, q must be warped the same way or the ratio test
is no longer lossless). Order, as vLLM's sampler: divide by T, then top-k, then top-p."""

import torch

from dspark_cli.runtime import _checks

GREEDY_BELOW = 1e-5  # temperature below this means greedy (argmax) for that request


def is_greedy(temperature: torch.Tensor) -> torch.Tensor:
    return temperature < GREEDY_BELOW


def check_warps(temperature, top_k, top_p, R: int) -> None:
    """Shapes always; values where the other value checks run (on CPU by default: no device sync):
    a NaN/inf temperature or a top_p outside (0, 1] drafted silently. A negative temperature is
    greedy (vLLM marks greedy rows -1) and any top_k is valid (≤ 0 or ≥ V: off; vLLM's off is -1)."""
    _checks.request_vector("temperature", temperature, R, _checks.FLOAT_DTYPES)
    if _checks.want_value_checks(None, temperature):
        _checks.finite("temperature", temperature)
    if top_k is not None:
        _checks.request_vector("top_k", top_k, R, _checks.INT_DTYPES)
    if top_p is not None:
        _checks.request_vector("top_p", top_p, R, _checks.FLOAT_DTYPES)
        if _checks.want_value_checks(None, top_p) and not bool(((top_p > 0) & (top_p <= 1)).all()):
            raise ValueError(f"top_p must lie in (0, 1] (1: off), got {top_p.tolist()}")


def _check_logits(logits, temperature, top_k, top_p) -> None:
    _checks.tensor("logits", logits, 2, _checks.FLOAT_DTYPES)
    _checks.nonempty_vocabulary("logits", logits)  # metadata: checked on every device
    check_warps(temperature, top_k, top_p, logits.shape[0])
    _checks.same_device(logits=logits, temperature=temperature, top_k=top_k, top_p=top_p)
    if _checks.want_value_checks(None, logits):
        _checks.logits("logits", logits)


def warp_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k=None, top_p=None) -> torch.Tensor:
    """logits [R, V] (fp32, bf16 or fp16) -> warped fp32 logits (masked entries = -inf);
    temperature [R] of any of those dtypes.

    top_k [R] int64 or int32: keep the entries ≥ the k-th largest (≤ 0 or ≥ V: off).
    top_p [R] fp32, bf16 or fp16: keep the smallest high-probability set whose mass reaches p (1.0:
    off): x stays iff the mass of the entries above it is < p, summed in fp64 (the fp32 cumsum of
    151936 entries is off by ~1e-5, several tokens at the boundary); the most likely token always
    stays, and ties of the smallest kept value stay with it, as top-k's do. Greedy rows are only
    masked, not scaled."""
    _check_logits(logits, temperature, top_k, top_p)
    return _warp(logits, temperature, top_k, top_p)


def _warp(logits, temperature, top_k, top_p) -> torch.Tensor:
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
    _check_logits(logits, temperature, top_k, top_p)
    return sample_probs(logits, temperature, top_k, top_p)


def sample_probs(logits, temperature, top_k=None, top_p=None) -> torch.Tensor:
    """probs_from_logits without its checks, for callers that checked their inputs once (the
    Markov chain calls it γ times per draft)."""
    probs = _warp(logits, temperature, top_k, top_p).softmax(dim=-1)
    greedy = is_greedy(temperature)
    one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy.unsqueeze(1), one_hot, probs)
