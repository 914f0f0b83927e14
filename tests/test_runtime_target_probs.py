"""runtime.target_probs on the CPU: softmax_rows (torch's softmax and argmax into an engine's
buffers, spare rows untouched), logit_rows / LogitRows (the softmax statistics a verification
computes its entries from; rejection_sample_rows and _flat verify them as their probabilities,
spare rows included) and their argument checks; the CUDA op: tests/test_logit_rows_gpu.py."""

import pytest
import torch

from dspark_cli.runtime import LogitRows, logit_rows, markov_chain, rejection_sample_flat, rejection_sample_rows
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
    (lambda a: {**a, "logits": a["logits"][:, :0], "probs": a["probs"][:, :0]}, r"empty vocabulary \(V = 0\)"),
])
def test_bad_arguments_are_one_clear_error(change, message):
    args = {"logits": torch.zeros(4, 10), "probs": torch.zeros(5, 10), "best": torch.zeros(5, dtype=torch.int64)}
    with pytest.raises(ValueError, match=message):
        softmax_rows(**change(args))


def test_logit_rows_give_torch_softmax_and_argmax_and_spare_rows_read_as_the_last():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(2)).mul_(5)
    logits[1, [3, 30]] = 40.0  # a tie: the first
    best = torch.full((7,), -7, dtype=torch.int64)
    rows = logit_rows(logits, best, spare_rows=2)
    assert rows.shape == (7, 40) and rows.device == logits.device
    assert torch.equal(rows.stats[:, 0], logits.amax(-1))
    probs = rows.probs()
    torch.testing.assert_close(probs[:5], torch.softmax(logits, -1), rtol=1e-6, atol=1e-9)
    assert torch.equal(probs[5], probs[4]) and torch.equal(probs[6], probs[4])
    assert best.tolist() == logits.argmax(-1).tolist() + [-7, -7] and best[1] == 3
    index = torch.tensor([[6, 0], [2, 5]])  # rows read, spare ones among them
    torch.testing.assert_close(rows.rows(index), probs[index], rtol=1e-6, atol=0)
    ids = torch.tensor([[3, 39], [0, 7]])
    torch.testing.assert_close(rows.entries(index, ids), probs[index, ids], rtol=1e-6, atol=0)


def test_rows_without_a_distribution_give_nan_probabilities():
    logits = torch.randn(3, 16)
    logits[0] = float("-inf")
    logits[1, 5] = float("nan")
    probs = logit_rows(logits).probs()
    assert probs[:2].isnan().all() and not probs[2].isnan().any()


def _draft(R, gamma, V, seed):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(R, gamma, V, generator=g)
    w1, w2 = torch.randn(V, 8, generator=g) * 0.3, torch.randn(V, 8, generator=g) * 0.3
    temperature = torch.tensor([0.0, 0.8, 1.0, 1.3][:R])
    seeds = torch.arange(R, dtype=torch.int64) + 11
    draft = markov_chain(U, torch.randint(0, V, (R,), generator=g), w1, w2, temperature, seeds=seeds, return_q=False)
    return draft, temperature < 1e-5, seeds


@pytest.mark.parametrize("with_argmax", [False, True])
def test_rows_verify_as_their_probabilities(with_argmax):
    """V1's layout (no bonus rows, one spare row after the last request) from LogitRows, and the
    flat layout, give what the same rows as probabilities give: greedy requests take the argmax of
    the logits, or the given one."""
    R, gamma, V = 4, 3, 50
    draft, greedy, seeds = _draft(R, gamma, V, seed=3)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(R * gamma, V, generator=g).mul_(2)
    best = torch.full((R * gamma + 1,), V - 1, dtype=torch.int64)  # best[N]: neither written nor read
    rows = logit_rows(logits, best if with_argmax else None, spare_rows=1)
    starts = torch.arange(R) * gamma
    ell = torch.tensor([3, 0, 2, 3])
    args = dict(greedy=greedy, seeds=seeds)
    ours = rejection_sample_rows(rows, starts, ell, draft, **args, target_argmax=best if with_argmax else None)
    plain = rejection_sample_rows(rows.probs(), starts, ell, draft, **args,
                                  target_argmax=rows.argmax() if with_argmax else None)
    assert torch.equal(ours.output_tokens, plain.output_tokens) and torch.equal(ours.num_accepted, plain.num_accepted)
    flat_logits = torch.randn(int((ell + 1).sum()), V, generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), (ell + 1).cumsum(0)])
    flat = rejection_sample_flat(logit_rows(flat_logits), cu, draft, greedy=greedy, seeds=seeds)
    plain = rejection_sample_flat(torch.softmax(flat_logits, -1), cu, draft, greedy=greedy, seeds=seeds)
    assert torch.equal(flat.num_accepted, plain.num_accepted)


def test_a_spare_rows_greedy_token_is_the_last_rows_given_one():
    """The entry given for a spare row is not read: it takes row N − 1's, as its probabilities and
    the CUDA op do (V1 leaves best[N] as its buffer held it)."""
    V = 10
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    logits[2, 3] = logits[3, 5] = 9.0  # row 3 (N − 1), and so the spare row 4: argmax 5
    best = torch.zeros(5, dtype=torch.int64)
    rows = logit_rows(logits, best, spare_rows=1)
    # request 1 (greedy) drafts the argmax of rows 2 and 3; its bonus row is the spare row 4
    draft = (torch.tensor([[1, 2], [3, 5]]), torch.full((2, 2), 1.0 / V), torch.full((2, 2, V), 1.0 / V))
    args = dict(greedy=torch.tensor([False, True]), seeds=torch.tensor([1, 2]))
    start, ell = torch.tensor([0, 2]), torch.tensor([2, 2])
    given = rejection_sample_rows(rows, start, ell, draft, target_argmax=best, **args)
    assert given.output_tokens[1].tolist() == [3, 5, 5]
    assert torch.equal(given.output_tokens, rejection_sample_rows(rows, start, ell, draft, **args).output_tokens)


@pytest.mark.parametrize("make,message", [
    (lambda: LogitRows(torch.zeros(4, 10), torch.zeros(3, 2)), r"stats has shape \(3, 2\): \(4, 2\) expected"),
    (lambda: LogitRows(torch.zeros(4, 10), torch.zeros(4, 2).double()), "stats must have dtype float32"),
    (lambda: LogitRows(torch.zeros(4, 10).half(), torch.zeros(4, 2)), "logits must have dtype float32"),
    (lambda: LogitRows(torch.zeros(0, 10), torch.zeros(0, 2)), "logits is an empty batch"),
    (lambda: LogitRows(torch.zeros(4, 10), torch.zeros(4, 2), spare_rows=-1), "spare_rows must be an integer"),
    (lambda: LogitRows(torch.zeros(4, 0), torch.zeros(4, 2)), r"empty vocabulary \(V = 0\)"),
    (lambda: logit_rows(torch.zeros(4, 0)), r"empty vocabulary \(V = 0\)"),
    (lambda: logit_rows(torch.zeros(4, 10), torch.zeros(3, dtype=torch.int64)), "best has 3 entries"),
    (lambda: rejection_sample_rows(logit_rows(torch.zeros(6, 10)), torch.tensor([0, 3]), torch.tensor([2, 3]),
                                   _draft(2, 3, 10, seed=1)[0]), "must lie in the 6 rows of target_probs"),
])
def test_bad_logit_rows_are_one_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()
