"""The constructed `fork` checkpoints behave as dspark_cli.tiny_models says: the target through
transformers, the draft's Markov head and confidence head through dspark_cli.runtime."""

import pytest
import torch

from dspark_cli import tiny_models
from dspark_cli.runtime import markov_chain

V = tiny_models.VOCAB


def test_fork_target_puts_its_mass_on_the_next_two_tokens(tmp_path):
    model = tiny_models.load_transformers(tiny_models.build_target(tmp_path / "fork", "fork"))
    ids = torch.tensor([[5, 17, 42, 43, 100, 200, 253, 254]])
    with torch.no_grad():
        probs = model(ids).logits.softmax(-1)[0]
    for row, x in zip(probs, ids[0].tolist()):
        fork = row[(x + 1) % V], row[(x + 2) % V]
        assert fork[0] + fork[1] > 0.95 and min(fork) > 0.1, (x, fork)  # both branches sampled often


def _drafted_steps(tmp_path, kind: str, R: int):
    """One γ = 3 block from R anchors through the draft's Markov and confidence heads: (the block,
    each drafted token's predecessor, its step from it mod V)."""
    weights = tiny_models.read_weights(tiny_models.build_draft(tmp_path / kind, 3, kind))
    anchors = torch.arange(R) % V
    draft = markov_chain(torch.zeros(R, 3, V), anchors, weights["markov_head.markov_w1.weight"],
                         weights["markov_head.markov_w2.weight"], torch.ones(R), seeds=torch.arange(R),
                         confidence=(torch.zeros(R, 3, tiny_models.HIDDEN), weights["confidence_head.proj.weight"],
                                     weights["confidence_head.proj.bias"]))
    prev = torch.cat([anchors[:, None], draft.tokens[:, :-1]], dim=1)
    return draft, prev, (draft.tokens - prev) % V


def test_fork_draft_steps_one_or_two_and_is_confident_after_even_tokens(tmp_path):
    draft, prev, step = _drafted_steps(tmp_path, "fork", 2000)
    assert ((step == 1) | (step == 2)).float().mean() > 0.995  # the other 254 share e^-12 of the weight
    assert 0.45 < (step == 1).float().mean() < 0.55
    assert torch.equal(draft.confidence_logits, torch.where(prev % 2 == 0, 4.0, -4.0))


def test_skew_draft_steps_one_nine_times_in_ten(tmp_path):
    draft, _, step = _drafted_steps(tmp_path, "skew", 4000)
    assert ((step == 1) | (step == 2)).float().mean() > 0.995
    assert 0.88 < (step == 1).float().mean() < 0.92
    assert torch.equal(draft.confidence_logits, torch.full_like(draft.confidence_logits, 6.0))


def test_fitted_draft_greedily_drafts_the_most_frequent_follower(tmp_path):
    follows = tiny_models.fitted_map([[7, 9, 7, 9, 7, 3], [9, 4, 9, 4]])
    assert follows[7] == 9 and follows[9] == 4 and follows[3] == 4 and follows[100] == 101  # 9: 4 twice, 7 twice: lower id
    weights = tiny_models.read_weights(tiny_models.build_draft(tmp_path / "fitted", 3, "fitted", follows=follows))
    draft = markov_chain(torch.zeros(1, 3, V), torch.tensor([7]), weights["markov_head.markov_w1.weight"],
                         weights["markov_head.markov_w2.weight"], torch.zeros(1))
    assert draft.tokens.tolist() == [[9, 4, 9]]
    with pytest.raises(ValueError, match="needs `follows`"):
        tiny_models.build_draft(tmp_path / "unfitted", 3, "fitted")


def test_oracle_markov_head_puts_all_its_mass_on_the_successor(tmp_path):
    """Engines draft by sampling q (vLLM's probabilistic draft_sample_method): a one-hot q, not only
    its argmax, makes the oracle accept whole blocks."""
    w = tiny_models.read_weights(tiny_models.build_draft(tmp_path / "oracle", 3, "oracle"))
    q = (w["markov_head.markov_w1.weight"] @ w["markov_head.markov_w2.weight"].T).softmax(-1)  # row x: q(· | x)
    x = torch.arange(tiny_models.VOCAB)
    assert torch.all(q[x, (x + 1) % tiny_models.VOCAB] > 0.999)
