"""The target side of a lazy V1 verification (lazy_drafts.BlockVerify) from V1's processed logits,
without vLLM, so the GPU benchmark (bench/bench_v1_round.py) times what the engine runs."""

import torch

from dspark_cli.runtime.target_probs import softmax_rows


def target_rows(logits: torch.Tensor, any_greedy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probabilities [N + 1, V] fp32, greedy tokens [N + 1] int64 or None) from logits [N, V].
    Row N is a spare row: the last request's bonus row, drawn from, then replaced by V1's bonus
    token. The greedy tokens are V1's, the argmax of the logits (an fp32 softmax can round logits a
    few ulps apart to one probability, whose argmax is the lower id): the runtime's target_argmax,
    given when any request is greedy, after which greedy requests' rows are not read (a step with
    no sampled request does not come here: V1's greedy path verifies it)."""
    N, V = logits.shape
    best = torch.zeros(N + 1, dtype=torch.int64, device=logits.device) if any_greedy else None
    probs = torch.empty(N + 1, V, dtype=torch.float32, device=logits.device)
    softmax_rows(logits, probs, best)  # one op on CUDA, where torch's softmax + argmax read the logits four times
    probs[N].fill_(1.0 / V)
    if logits.device.type == "cpu":
        # rows without a distribution (logits all -inf, e.g. allowed_token_ids = [a stop token
        # min_tokens masks], or NaN): their softmax is NaN throughout, which the runtime's value
        # checks refuse on the CPU, stopping the engine; V1 emits their argmax. Found here without a
        # sync; on a GPU, where the runtime checks nothing, finding them would sync.
        no_distribution = probs[:N, 0].isnan()
        if bool(no_distribution.any()):
            _one_hot_rows(probs[:N], logits, no_distribution.unsqueeze(1))
    return probs, best


def _one_hot_rows(probs: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> None:
    """The `rows` [N, 1] (bool) of `probs` [N, V] (the softmax of `logits`) made the one-hot at the
    argmax of their logits, V1's token there. In place, without a device sync."""
    best = logits.argmax(dim=-1, keepdim=True)
    kept = probs.gather(1, best)  # before the fill: the other rows' own values go back
    probs.masked_fill_(rows, 0.0).scatter_(1, best, torch.where(rows, 1.0, kept))
