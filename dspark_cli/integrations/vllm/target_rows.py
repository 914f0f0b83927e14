"""The target side of a lazy V1 verification (lazy_drafts.BlockVerify) from V1's processed logits,
without vLLM, so the GPU benchmark (bench/bench_v1_round.py) times what the engine runs."""

import torch

from dspark_cli.runtime.target_probs import LogitRows, logit_rows, softmax_rows


def target_rows(logits: torch.Tensor, any_greedy: bool) -> tuple[torch.Tensor | LogitRows, torch.Tensor | None]:
    """(target rows [N + 1, V], greedy tokens [N + 1] int64 or None) from logits [N, V] fp32.
    Row N is a spare row: the last request's bonus row, drawn from, then replaced by V1's bonus
    token. On a GPU the rows are LogitRows (no [N, V] probabilities written: the verification
    computes the entries it reads; the spare row reads as row N − 1); on the CPU probabilities.
    The greedy tokens are V1's, the argmax of the logits (an fp32 softmax can round logits a
    few ulps apart to one probability, whose argmax is the lower id): the runtime's target_argmax,
    given when any request is greedy, after which greedy requests' rows are not read (a step with
    no sampled request does not come here: V1's greedy path verifies it)."""
    N, V = logits.shape
    best = torch.zeros(N + 1, dtype=torch.int64, device=logits.device) if any_greedy else None
    if logits.is_cuda:
        return logit_rows(logits, best, spare_rows=1), best
    probs = torch.empty(N + 1, V, dtype=torch.float32, device=logits.device)
    softmax_rows(logits, probs, best)
    probs[N].fill_(1.0 / V)
    # rows without a distribution (logits all -inf, e.g. allowed_token_ids = [a stop token
    # min_tokens masks], or NaN): their softmax is NaN throughout, which the runtime's value
    # checks refuse on the CPU, stopping the engine; V1 emits their argmax. (On a GPU the runtime
    # checks nothing, and finding them would sync.)
    no_distribution = probs[:N, 0].isnan()
    if bool(no_distribution.any()):
        _one_hot_rows(probs[:N], logits.argmax(dim=-1) if best is None else best[:N], no_distribution.unsqueeze(1))
    return probs, best


def _one_hot_rows(probs: torch.Tensor, argmax: torch.Tensor, rows: torch.Tensor) -> None:
    """The `rows` [N, 1] (bool) of `probs` [N, V] made the one-hot at `argmax` [N], the argmax of
    their logits, V1's token there. In place, without a device sync."""
    best = argmax.unsqueeze(1)
    kept = probs.gather(1, best)  # before the fill: the other rows' own values go back
    probs.masked_fill_(rows, 0.0).scatter_(1, best, torch.where(rows, 1.0, kept))
