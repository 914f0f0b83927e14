"""The target's probabilities from an engine's logits, as a verification reads them: the softmax
over the vocabulary and, for greedy requests, each row's argmax of the logits (the engine's greedy
token, the runtime's target_argmax). On CUDA with our extension one op does both
(csrc/softmax_rows.cu: on Hopper from 33 rows the logits read once and the probabilities written
once, else two reads and a write, where torch's softmax reads three times and writes once and its
argmax reads again); elsewhere torch."""

import torch

from dspark_cli.runtime import _checks
from dspark_cli.runtime._dispatch import try_cuda


def softmax_rows(logits: torch.Tensor, probs: torch.Tensor, best: torch.Tensor | None = None) -> None:
    """probs[:N] = softmax(logits) over V for logits [N, V] fp32; best[:N] = the argmax of each
    logits row, when given (torch.argmax's: the first of equal maxima, NaN above every number).
    probs fp32 [≥ N, V] and best int64 [≥ N]: an engine's buffers with spare rows after N. Rows as
    torch gives them: a row with a NaN, or of −inf only, softmaxes to NaN."""
    _checks.tensor("logits", logits, 2, (torch.float32,))
    _checks.tensor("probs", probs, 2, (torch.float32,))
    N, V = logits.shape
    if probs.shape[0] < N or probs.shape[1] != V:
        raise ValueError(f"probs has shape {tuple(probs.shape)}: at least the logits' {N} rows of {V} expected")
    if best is not None:
        _checks.tensor("best", best, 1, (torch.int64,))
        if best.shape[0] < N:
            raise ValueError(f"best has {best.shape[0]} entries: at least the logits' {N} rows expected")
    _checks.same_device(logits=logits, probs=probs, best=best)
    if try_cuda("softmax_rows", [logits], logits, probs, best) is not NotImplemented:
        return
    torch.softmax(logits, dim=-1, out=probs[:N])
    if best is not None:
        torch.argmax(logits, dim=-1, out=best[:N])
