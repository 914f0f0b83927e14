"""runtime.target_probs.softmax_rows on the CPU (torch's softmax and argmax into an engine's
buffers, spare rows untouched) and its argument checks; the CUDA op: tests/test_softmax_rows_gpu.py."""

import pytest
import torch

from dspark_cli.runtime.target_probs import softmax_rows


def test_writes_the_first_rows_as_torch_and_leaves_the_spare_ones():
    logits = torch.randn(5, 33, generator=torch.Generator().manual_seed(1))
    logits[2, [4, 9]] = 10.0  # a tie: the first
    probs = torch.full((6, 33), -1.0)
    best = torch.full((6,), -7, dtype=torch.int64)
    softmax_rows(logits, probs, best)
    assert torch.equal(probs[:5], torch.softmax(logits, -1)) and (probs[5] == -1.0).all()
    assert best.tolist() == logits.argmax(-1).tolist() + [-7] and best[2] == 4
    softmax_rows(logits, probs)  # no argmax asked: probabilities only
    assert torch.equal(probs[:5], torch.softmax(logits, -1))


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "logits": a["logits"].double()}, "logits must have dtype float32"),
    (lambda a: {**a, "logits": a["logits"][0]}, "logits must have 2 dimensions"),
    (lambda a: {**a, "probs": a["probs"][:3]}, "at least the logits' 4 rows of 10"),
    (lambda a: {**a, "probs": a["probs"][:, :9]}, "at least the logits' 4 rows of 10"),
    (lambda a: {**a, "best": a["best"].int()}, "best must have dtype int64"),
    (lambda a: {**a, "best": a["best"][:2]}, "best has 2 entries"),
])
def test_bad_arguments_are_one_clear_error(change, message):
    args = {"logits": torch.zeros(4, 10), "probs": torch.zeros(5, 10), "best": torch.zeros(5, dtype=torch.int64)}
    with pytest.raises(ValueError, match=message):
        softmax_rows(**change(args))
