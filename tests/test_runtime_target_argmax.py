"""Greedy tokens given by the engine (`target_argmax`): vLLM V1 and TGI take a greedy request's
token as the argmax of their logits, which an fp32 softmax can tie; given those ids, the
verification matches drafts against them, emits them, and reads none of the greedy requests'
probability rows (so an engine need not compute them). Sampled requests verify as without it."""

import pytest
import torch

from dspark_cli.runtime import gather_drafts, markov_chain, rejection_sample, rejection_sample_flat, rejection_sample_rows

GAMMA, V, RANK = 3, 24, 4


def _lazy_draft(g, R, T):
    U = torch.randn(R, GAMMA, V, generator=g)
    w1, w2 = torch.randn(V, RANK, generator=g), torch.randn(V, RANK, generator=g)
    return markov_chain(U, torch.randint(0, V, (R,), generator=g), w1, w2, T, seeds=torch.arange(R) + 3,
                        return_q=False)


def _batch(seed=0):
    """Six requests (every other one greedy), their target rows near the drafts' q, and greedy
    tokens that are the drafts' own tokens at some positions and other ids elsewhere."""
    g = torch.Generator().manual_seed(seed)
    T = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0, 1.3])
    R = T.numel()
    draft = _lazy_draft(g, R, T)
    q = torch.stack([draft.q_rows(torch.full((R,), k)) for k in range(GAMMA)], 1)
    target = torch.softmax(2 * torch.randn(R, GAMMA + 1, V, generator=g), -1)
    target[:, :GAMMA] = 0.6 * q + 0.4 * target[:, :GAMMA]
    agree = torch.rand(R, GAMMA, generator=g) < 0.7
    argmax = torch.randint(0, V, (R, GAMMA + 1), generator=g)
    argmax[:, :GAMMA] = torch.where(agree, draft.tokens, (draft.tokens + 1) % V)
    return draft, target, argmax, T < 1e-5, torch.tensor([3, 2, 3, 3, 1, 0])


def _greedy_by_hand(tokens, argmax, ell):
    """A greedy request's output: drafts while they equal the given argmax, then the argmax."""
    out = []
    for j in range(int(ell)):
        if int(tokens[j]) != int(argmax[j]):
            break
        out.append(int(tokens[j]))
    return out + [int(argmax[len(out)])]


def _check(res, plain, draft, argmax, greedy, ell):
    for r in range(draft.tokens.shape[0]):
        n = int(res.num_accepted[r])
        if greedy[r]:
            assert res.output_tokens[r, :n + 1].tolist() == _greedy_by_hand(draft.tokens[r], argmax[r], ell[r]), r
            assert (res.output_tokens[r, n + 1:] == -1).all()
        else:  # as verified without the argmax, over rows it now has unpoisoned
            assert torch.equal(res.output_tokens[r], plain.output_tokens[r]), r


def test_greedy_requests_take_the_given_argmax_and_leave_their_rows_unread():
    draft, target, argmax, greedy, ell = _batch()
    seeds = torch.arange(6) + 40
    plain = rejection_sample(target, draft, ell, greedy=greedy, seeds=seeds)
    unread = target.masked_fill(greedy.view(-1, 1, 1), float("nan"))  # the value checks would refuse NaN rows
    res = rejection_sample(unread, draft, ell, greedy=greedy, seeds=seeds, target_argmax=argmax)
    _check(res, plain, draft, argmax, greedy, ell)
    assert 0 < int(res.num_accepted[greedy].sum()) < int(ell[greedy].sum())  # matches and mismatches

    # the flat and the named-rows layouts: one id per row of theirs
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(ell + 1, 0)])
    rows = torch.cat([unread[r, :int(ell[r]) + 1] for r in range(6)])
    flat_argmax = torch.cat([argmax[r, :int(ell[r]) + 1] for r in range(6)]).to(torch.int32)
    for entry in (lambda **kw: rejection_sample_flat(rows, cu, draft, **kw),
                  lambda **kw: rejection_sample_rows(rows, cu[:-1], ell, draft, **kw)):
        same = entry(greedy=greedy, seeds=seeds, target_argmax=flat_argmax)
        assert torch.equal(same.output_tokens, res.output_tokens) and torch.equal(same.num_accepted, res.num_accepted)


def test_a_regrouped_draft_verifies_each_part_against_the_given_argmax():
    draft, target, argmax, greedy, ell = _batch(seed=1)
    g = torch.Generator().manual_seed(2)
    other = _lazy_draft(g, 2, torch.tensor([0.0, 1.0]))
    order = [(draft, 4), (other, 1), (draft, 1), (other, 0), (draft, 0), (draft, 5)]
    batch = gather_drafts([(draft, [4]), (other, [1]), (draft, [1]), (other, [0]), (draft, [0, 5])])
    R = len(order)
    greedy_b = torch.tensor([bool(d.source.temperature[row] < 1e-5) for d, row in order])
    target_b = target[:R].clone()
    argmax_b = argmax[:R].clone()
    argmax_b[:, :GAMMA] = torch.where(torch.rand(R, GAMMA, generator=g) < 0.7, batch.tokens, (batch.tokens + 2) % V)
    seeds = torch.arange(R) * 5 + 1
    ell_b = ell[:R]
    plain = rejection_sample(target_b, batch, ell_b, greedy=greedy_b, seeds=seeds)
    res = rejection_sample(target_b.masked_fill(greedy_b.view(-1, 1, 1), float("nan")), batch, ell_b,
                           greedy=greedy_b, seeds=seeds, target_argmax=argmax_b)
    _check(res, plain, batch, argmax_b, greedy_b, ell_b)


def test_an_all_greedy_batch_reads_no_probability():
    draft, target, argmax, _, ell = _batch(seed=3)
    greedy = torch.ones(6, dtype=torch.bool)
    res = rejection_sample(torch.full_like(target, float("nan")), draft, ell, greedy=greedy, seeds=torch.arange(6),
                           target_argmax=argmax)
    _check(res, None, draft, argmax, greedy, ell)


def test_a_softmax_tie_follows_the_logits_argmax():
    """Logits one ulp apart at ids 2 and 7: their fp32 softmax rounds both to one probability, whose
    argmax is id 2; the engine's greedy token (the logits' argmax) is 7, and so is ours."""
    logits = torch.zeros(1, 2, 10)
    logits[..., 2] = 0.1
    logits[..., 7] = torch.nextafter(torch.tensor(0.1), torch.tensor(1.0))
    probs = torch.softmax(logits, -1)
    assert probs[0, 0, 2] == probs[0, 0, 7] and int(probs[0, 0].argmax()) == 2
    best = logits.argmax(-1)
    assert int(best[0, 0]) == 7
    q = torch.full((1, 1, 10), 0.1)
    for tokens, want in ((torch.tensor([[7]]), [7, 7]), (torch.tensor([[2]]), [7, -1])):
        res = rejection_sample(probs, (tokens, torch.full((1, 1), 0.1), q), torch.tensor([1]),
                               greedy=torch.tensor([True]), seeds=torch.tensor([0]), target_argmax=best)
        assert res.output_tokens[0].tolist() == want


@pytest.mark.parametrize("argmax, message", [
    (torch.zeros(6, 3, dtype=torch.int64), r"target_argmax .*one token id per target row"),
    (torch.zeros(6, 4), r"target_argmax must have dtype int64, int32"),
    (torch.full((6, 4), V, dtype=torch.int64), rf"target_argmax must be token ids in \[0, V={V}\)"),
    (torch.full((6, 4), -1, dtype=torch.int64), rf"target_argmax must be token ids in \[0, V={V}\)"),
])
def test_a_bad_target_argmax_is_one_clear_error(argmax, message):
    draft, target, _, greedy, ell = _batch()
    with pytest.raises(ValueError, match=message):
        rejection_sample(target, draft, ell, greedy=greedy, seeds=torch.arange(6), target_argmax=argmax)
