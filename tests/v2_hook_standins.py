"""The draft model and speculator state vLLM's V2 runner hands `v2_fused.sample_sequential`, as
vLLM v0.33.0/v0.34.0's Qwen3DSparkForCausalLM and DSparkSpeculator expose them, built from real
torch modules with small shapes (torch only: the v0.34.0 import probe uses them in vLLM's venv)."""

from types import SimpleNamespace

import torch

V, R_MARKOV, D, GAMMA, MAX_REQS = 50, 8, 16, 4, 6


class _Processor:
    scale, soft_cap = 1.0, None

    def __call__(self, head, hidden):
        return hidden @ head.weight[:V].t()


def make_model(seed=0, confidence=True, vocab_size=V):
    """vocab_size: config.vocab_size, W1's rows; draft_vocab_size (W2's and U's) is V."""
    torch.manual_seed(seed)
    markov = torch.nn.Module()
    markov.markov_w1 = torch.nn.Embedding(vocab_size, R_MARKOV)
    markov.markov_w2 = torch.nn.Linear(R_MARKOV, V + 14, bias=False)  # padded rows like ParallelLMHead
    with torch.no_grad():
        markov.markov_w2.weight.mul_(8.0)  # a strong Markov bias, so a wrong prev token shows
    inner = torch.nn.Module()
    inner.markov_head = markov
    inner.confidence_head = None
    if confidence:
        inner.confidence_head = SimpleNamespace(with_markov=True, proj=torch.nn.Linear(D + R_MARKOV, 1))
    lm_head = torch.nn.Linear(D, V, bias=False)
    processor = _Processor()
    return SimpleNamespace(model=inner, lm_head=lm_head, logits_processor=processor, draft_id_to_target_id=None,
                           config=SimpleNamespace(vocab_size=vocab_size, draft_vocab_size=V),
                           compute_draft_logits=lambda h: processor(lm_head, h))


def make_spec(num_reqs, states, *, probabilistic=True, temperature=1.0, seed=7, first_pos=100,
              use_confidence_head=True, cache_dtype=torch.float32):
    """DSparkSpeculator's buffers after its prepare-inputs kernel (anchor-as-first layout)."""
    sample_idx_mapping = torch.full((MAX_REQS * GAMMA,), -1, dtype=torch.int64)
    sample_pos = torch.zeros(MAX_REQS * GAMMA, dtype=torch.int64)
    for b, s in enumerate(states):
        sample_idx_mapping[b * GAMMA:(b + 1) * GAMMA] = s
        sample_pos[b * GAMMA:(b + 1) * GAMMA] = first_pos + torch.arange(GAMMA)
    input_ids = torch.randint(0, V, (MAX_REQS * GAMMA,), generator=torch.Generator().manual_seed(3))
    return SimpleNamespace(
        num_speculative_steps=GAMMA,
        sample_indices=torch.arange(MAX_REQS * GAMMA),
        sample_idx_mapping=sample_idx_mapping,
        sample_pos=sample_pos,
        input_buffers=SimpleNamespace(input_ids=input_ids),
        _anchor_idx=torch.arange(MAX_REQS) * GAMMA,
        temperature=torch.full((MAX_REQS,), temperature),
        seeds=torch.full((MAX_REQS,), seed, dtype=torch.int64),
        draft_tokens=torch.zeros(MAX_REQS, GAMMA, dtype=torch.int64),
        draft_logits=torch.full((MAX_REQS, GAMMA, V), -123.0, dtype=cache_dtype) if probabilistic else None,
        draft_token_confidence_probs=torch.zeros(MAX_REQS, GAMMA),
        draft_watermarker=None,
        use_acceptance_estimator=False,
        use_confidence_head=use_confidence_head,
    )


def v034_cache(spec, row_mapping=None):
    """spec with its draft logits cache as vLLM v0.34.0 holds it: an object whose `.values` is the
    tensor (`row_mapping` set only when sharded across TP ranks)."""
    spec.draft_logits = SimpleNamespace(values=spec.draft_logits, row_mapping=row_mapping)
    return spec
