"""dspark_cli.integrations.vllm.v2_fused: the `sample_sequential` hook for vLLM's V2 runner
(v0.33.0, v0.34.0).

vLLM's V2 runner needs a GPU and Triton, so the engine itself cannot run here. These tests drive
the hook through the exact attributes vLLM v0.33.0's DSparkSpeculator and Qwen3DSparkForCausalLM
expose to it (read from the 0.33.0 release: dspark/speculator.py, qwen3_dspark.py), built from
real torch modules with the same shapes, and check the results against the DSpark math directly.
v0.34.0 wraps the draft logits cache (`DraftLogitsCache.values`, with a `row_mapping` when sharded
across TP ranks) and gets the hook per instance (`attach`, only while our path is on);
tests/test_vllm034_series.py runs the hook on the real class of the 0.34.0 release, with these
stand-ins (tests/v2_hook_standins.py).
"""

from types import SimpleNamespace

import pytest
import torch

from dspark_cli.integrations.vllm import v2_fused
from tests.chi2 import chi2_pvalue_of_counts
from tests.v2_hook_standins import D, GAMMA, MAX_REQS, V, make_model, make_spec, v034_cache


def corrected(model, U, prev):
    w1 = model.model.markov_head.markov_w1.weight
    w2 = model.model.markov_head.markov_w2.weight[:V]
    return U.float() + w1[prev].float() @ w2.float().t()


@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    monkeypatch.setenv(v2_fused.ENV_SWITCH, "1")
    with torch.inference_mode():  # as vLLM runs the draft step
        yield


def test_greedy_drafts_follow_the_markov_chain():
    model, num_reqs = make_model(), 3
    spec = make_spec(num_reqs, [2, 0, 5], probabilistic=False)
    hidden = torch.randn(MAX_REQS * GAMMA, D)
    assert v2_fused.sample_sequential(model, spec, num_reqs, hidden) is True
    U = model.compute_draft_logits(hidden[: num_reqs * GAMMA]).view(num_reqs, GAMMA, V)
    prev = spec.input_buffers.input_ids[spec._anchor_idx[:num_reqs]]
    for k in range(GAMMA):
        prev = corrected(model, U[:, k], prev).argmax(dim=-1)
        assert torch.equal(spec.draft_tokens[:num_reqs, k], prev)


def test_probabilistic_caches_the_logits_it_sampled_from_and_spares_padded_rows():
    model, num_reqs = make_model(), 4
    spec = make_spec(num_reqs, [3, 1, -1, -1])  # two real requests, two CUDA-graph padding rows
    hidden = torch.randn(MAX_REQS * GAMMA, D)
    before = spec.draft_logits.clone()
    assert v2_fused.sample_sequential(model, spec, num_reqs, hidden)
    U = model.compute_draft_logits(hidden[: num_reqs * GAMMA]).view(num_reqs, GAMMA, V)
    anchors = spec.input_buffers.input_ids[spec._anchor_idx[:num_reqs]]
    for row, state in ((0, 3), (1, 1)):
        prev = torch.cat([anchors[row:row + 1], spec.draft_tokens[row, : GAMMA - 1]])
        expected = torch.stack([corrected(model, U[row, k:k + 1], prev[k:k + 1])[0] for k in range(GAMMA)])
        torch.testing.assert_close(spec.draft_logits[state], expected, rtol=1e-6, atol=1e-5)
    for untouched in (0, 2, 4, 5):  # slot 0 is what the padding rows' clamped index points at
        assert torch.equal(spec.draft_logits[untouched], before[untouched])


def test_padding_rows_before_a_real_row_never_overwrite_its_slot():
    """A padded row (state −1) clamps to slot 0; where a real row owns slot 0 and a padded row
    comes first, every write into slot 0 must still carry the real row's values."""
    cache = torch.full((4, GAMMA + 1, 3), -5.0)
    state = torch.tensor([-1, 0, -1])
    rows = torch.arange(3 * GAMMA * 3, dtype=torch.float32).view(3, GAMMA, 3)
    v2_fused.store_by_request_state(cache, state, state >= 0, rows)
    assert torch.equal(cache[0, :GAMMA], rows[1])
    assert bool((cache[1:] == -5.0).all()) and bool((cache[0, GAMMA:] == -5.0).all())


def test_v034_cache_object_gets_the_same_drafts_and_logits_as_v033s_tensor():
    model, num_reqs = make_model(), 3
    hidden = torch.randn(MAX_REQS * GAMMA, D)
    v033 = make_spec(num_reqs, [4, -1, 2])
    v034 = v034_cache(make_spec(num_reqs, [4, -1, 2]))
    assert v2_fused.sample_sequential(model, v033, num_reqs, hidden)
    assert v2_fused.sample_sequential(model, v034, num_reqs, hidden)
    assert torch.equal(v034.draft_tokens, v033.draft_tokens)
    assert torch.equal(v034.draft_logits.values, v033.draft_logits)
    assert not torch.equal(v033.draft_logits[4], make_spec(1, [4]).draft_logits[4])  # written, not the fill


def test_attach_gives_the_hook_only_while_our_path_is_on(monkeypatch):
    model, hidden = make_model(), torch.randn(MAX_REQS * GAMMA, D)
    v2_fused.attach(model)
    spec, direct = make_spec(2, [1, 3]), make_spec(2, [1, 3])
    assert model.sample_sequential(spec, 2, hidden) and v2_fused.sample_sequential(model, direct, 2, hidden)
    assert torch.equal(spec.draft_tokens, direct.draft_tokens)
    monkeypatch.setenv(v2_fused.ENV_SWITCH, "0")
    off = make_model()
    v2_fused.attach(off)
    assert not hasattr(off, "sample_sequential")


def test_attach_leaves_vllms_sharded_sampling_where_every_call_would_decline(monkeypatch):
    """Sampled drafts under the default head_dtype (bf16) cache their logits in bf16, which the hook
    declines on every call; attached anyway, it made vLLM 0.34.0 keep the whole cache and sample on
    every tensor-parallel rank for nothing. vLLM's config accessor is stood in for (no vLLM here)."""
    import sys
    from types import ModuleType

    config = SimpleNamespace(speculative_config=SimpleNamespace(draft_sample_method="probabilistic"),
                             model_config=SimpleNamespace(head_dtype=torch.bfloat16))
    vllm_config = ModuleType("vllm.config")
    vllm_config.get_current_vllm_config = lambda: config
    monkeypatch.setitem(sys.modules, "vllm", ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.config", vllm_config)
    monkeypatch.setenv(v2_fused.ENV_SWITCH, "1")
    declined = make_model()
    v2_fused.attach(declined)
    assert not hasattr(declined, "sample_sequential")
    for method, dtype in (("probabilistic", torch.float32), ("greedy", torch.bfloat16)):
        config.speculative_config.draft_sample_method, config.model_config.head_dtype = method, dtype
        served = make_model()
        v2_fused.attach(served)
        assert hasattr(served, "sample_sequential"), (method, dtype)


def test_a_config_without_draft_vocab_size_reads_vocab_size():
    """vLLM fills draft_vocab_size in Qwen3's __init__ only; a subclass (Gemma4's) leaves it unset:
    reading it raised AttributeError inside the first draft step."""
    model = make_model()
    del model.config.draft_vocab_size
    assert v2_fused.decline_reason(model, make_spec(2, [0, 1])) is None
    assert "draft_vocab_size" in v2_fused.decline_reason(make_model(vocab_size=V + 2), make_spec(2, [0, 1]))


def test_all_rows_padded_changes_nothing():
    model = make_model()
    spec = make_spec(3, [-1, -1, -1])
    before = spec.draft_logits.clone()
    assert v2_fused.sample_sequential(model, spec, 3, torch.randn(MAX_REQS * GAMMA, D))
    assert torch.equal(spec.draft_logits, before)


def test_confidence_is_the_head_on_hidden_and_previous_token_embedding():
    model, num_reqs = make_model(), 2
    spec = make_spec(num_reqs, [0, 4], temperature=0.7)
    hidden = torch.randn(MAX_REQS * GAMMA, D)
    assert v2_fused.sample_sequential(model, spec, num_reqs, hidden)
    w1 = model.model.markov_head.markov_w1.weight
    proj = model.model.confidence_head.proj
    anchors = spec.input_buffers.input_ids[spec._anchor_idx[:num_reqs]]
    prev = torch.cat([anchors[:, None], spec.draft_tokens[:num_reqs, : GAMMA - 1]], dim=1)
    x = torch.cat([hidden[: num_reqs * GAMMA].view(num_reqs, GAMMA, D), w1[prev]], dim=-1)
    expected = torch.sigmoid(proj(x).squeeze(-1))
    torch.testing.assert_close(spec.draft_token_confidence_probs[:num_reqs], expected.detach())


def test_draws_match_q_across_rounds_and_repeat_for_the_same_seed_and_position():
    """Position 0's q depends only on the anchor, so rounds (new positions) must draw afresh from it."""
    model, rounds = make_model(seed=1), 2000
    hidden = torch.randn(MAX_REQS * GAMMA, D)
    counts = torch.zeros(V)
    q0 = None
    for r in range(rounds):
        spec = make_spec(1, [2], temperature=1.3, first_pos=10 + r * GAMMA)
        v2_fused.sample_sequential(model, spec, 1, hidden)
        counts[spec.draft_tokens[0, 0]] += 1
        q0 = torch.softmax(spec.draft_logits[2, 0] / 1.3, dim=-1)
    assert chi2_pvalue_of_counts(counts, q0) > 1e-3

    again = [make_spec(1, [2], temperature=1.3, first_pos=10) for _ in range(2)]
    for spec in again:
        v2_fused.sample_sequential(model, spec, 1, hidden)
    assert torch.equal(again[0].draft_tokens, again[1].draft_tokens)


def test_declines_what_it_cannot_reproduce_exactly(monkeypatch):
    hidden = torch.randn(MAX_REQS * GAMMA, D)
    bf16 = make_spec(2, [0, 1], cache_dtype=torch.bfloat16)
    assert "float32" in v2_fused.decline_reason(make_model(), bf16)
    assert v2_fused.sample_sequential(make_model(), bf16, 2, hidden) is False
    assert torch.all(bf16.draft_tokens == 0)

    estimator = make_spec(2, [0, 1], use_confidence_head=False)
    estimator.use_acceptance_estimator = True
    assert v2_fused.sample_sequential(make_model(), estimator, 2, hidden) is False

    # A draft with draft_vocab_size >= the target's needs no d2t, but W1 may have other rows than
    # W2/U: was taken, and markov_chain's shape check raised inside the draft step.
    for rows in (V - 2, V + 2):
        spec = make_spec(2, [0, 1])
        assert "draft_vocab_size" in v2_fused.decline_reason(make_model(vocab_size=rows), spec)
        assert v2_fused.sample_sequential(make_model(vocab_size=rows), spec, 2, hidden) is False

    # v0.34.0: a cache sharded across TP ranks (rows by batch position, not request state), a
    # Markov head whose state is recurrent rather than W1 of the previous token.
    sharded = v034_cache(make_spec(2, [0, 1]), row_mapping=torch.zeros(MAX_REQS, dtype=torch.int32))
    assert "sharded" in v2_fused.decline_reason(make_model(), sharded)
    assert v2_fused.sample_sequential(make_model(), sharded, 2, hidden) is False
    bf16_v034 = v034_cache(make_spec(2, [0, 1], cache_dtype=torch.bfloat16))
    assert "float32" in v2_fused.decline_reason(make_model(), bf16_v034)
    recurrent = make_model()
    recurrent.has_recurrent_markov_head = True
    assert "recurrent" in v2_fused.decline_reason(recurrent, make_spec(2, [0, 1]))

    # an fp8 W2 beside a bf16 W1 (a ModelOpt FP8 draft) is floating point too: it was taken, and the
    # reference the op declines to refused fp8 in the profile run (the engine did not start); a
    # GPTQ/AWQ head has qweight and no weight (an AttributeError)
    fp8 = make_model()
    fp8.model.markov_head.markov_w2.weight.data = fp8.model.markov_head.markov_w2.weight.data.to(torch.float8_e4m3fn)
    packed = make_model()
    del packed.model.markov_head.markov_w2.weight
    for quantized in (fp8, packed):
        assert v2_fused.decline_reason(quantized, make_spec(2, [0, 1])) == "quantized Markov weights"

    monkeypatch.setenv(v2_fused.ENV_SWITCH, "0")
    assert v2_fused.sample_sequential(make_model(), make_spec(2, [0, 1]), 2, hidden) is False



def test_a_markov_head_with_nan_is_refused_at_the_first_call():
    """The first call is vLLM's eager profile run, at start: NaN in W2 would make every q row NaN."""
    model = make_model()
    with torch.no_grad():
        model.model.markov_head.markov_w2.weight[5, 2] = float("nan")
    with pytest.raises(ValueError, match="the Markov head's W2 contains NaN or infinite values"):
        v2_fused.sample_sequential(model, make_spec(2, [0, 1]), 2, torch.randn(MAX_REQS * GAMMA, D))

def test_switch_defaults_to_whether_the_extension_is_loaded(monkeypatch):
    monkeypatch.delenv(v2_fused.ENV_SWITCH)
    from dspark_cli.runtime import cuda_ops

    assert v2_fused.enabled() == bool(cuda_ops.available())


def _to(obj, device):
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            setattr(obj, name, value.to(device))
        elif isinstance(value, SimpleNamespace):
            _to(value, device)
    return obj


def _cloned(obj):
    return SimpleNamespace(**{k: v.clone() if isinstance(v, torch.Tensor) else _cloned(v) if isinstance(v, SimpleNamespace)
                              else v for k, v in vars(obj).items()})


def _cache(spec):
    return spec.draft_logits if isinstance(spec.draft_logits, torch.Tensor) else spec.draft_logits.values


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: vLLM captures the draft step in a CUDA graph")
@pytest.mark.parametrize("release", ["v0.33.0", "v0.34.0"])
def test_hook_is_capturable_in_a_cuda_graph_and_replays_like_eager(release):
    """vLLM runs sample_sequential inside the draft step's FULL CUDA graph: capture it, change the
    inputs in place (new hidden states, seeds, positions, temperatures), replay, compare with eager;
    with the draft logits cache as each release holds it."""
    model, num_reqs = make_model(), 4
    for module in (model.lm_head, model.model.markov_head, model.model.confidence_head.proj):
        module.to("cuda")
    spec = make_spec(num_reqs, [3, 1, 0, -1])
    spec = _to(v034_cache(spec) if release == "v0.34.0" else spec, "cuda")
    hidden = torch.randn(MAX_REQS * GAMMA, D, device="cuda")
    assert v2_fused.sample_sequential(model, spec, num_reqs, hidden)  # eager first call, as vLLM's profile run
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        v2_fused.sample_sequential(model, spec, num_reqs, hidden)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        v2_fused.sample_sequential(model, spec, num_reqs, hidden)

    for trial in range(3):
        hidden.copy_(torch.randn_like(hidden))
        spec.seeds.copy_(torch.randint(0, 2**62, (MAX_REQS,), device="cuda"))
        spec.sample_pos.add_(GAMMA)
        spec.temperature.copy_(torch.rand(MAX_REQS, device="cuda") + 0.5 * trial)
        eager = _cloned(spec)
        graph.replay()
        assert v2_fused.sample_sequential(model, eager, num_reqs, hidden.clone())
        torch.cuda.synchronize()
        assert torch.equal(spec.draft_tokens, eager.draft_tokens)
        torch.testing.assert_close(_cache(spec), _cache(eager))
        torch.testing.assert_close(spec.draft_token_confidence_probs, eager.draft_token_confidence_probs)


def _hidden(seed=0):
    return torch.randn(MAX_REQS * GAMMA, D, generator=torch.Generator().manual_seed(seed))


def _greedy_chain(model, spec, num_reqs, hidden, rows):
    U = model.compute_draft_logits(hidden[: num_reqs * GAMMA]).view(num_reqs, GAMMA, V)
    prev = spec.input_buffers.input_ids[spec._anchor_idx[:num_reqs]]
    out = []
    for k in range(GAMMA):
        prev = corrected(model, U[:, k], prev).argmax(-1)
        out.append(prev)
    return torch.stack(out, 1)[rows]


def _own_processor(model):
    model.logits_processor = type(model.logits_processor)()  # instance attrs, class untouched
    return model.logits_processor


def _markov_weights_as(model, dtype):
    head = model.model.markov_head
    head.markov_w1.weight.data = head.markov_w1.weight.data.to(dtype)
    head.markov_w2.weight.data = head.markov_w2.weight.data.to(dtype)


# Declined, vLLM's own loop then runs: vLLM applies the logits processor (scale, soft cap) to the
# Markov bias too and runs the output transform / watermarker in its loop (served, the drafts would
# differ); W1 and W2 of one dtype our chain does not take, and under adaptive verification a
# confidence head that does not read W1[x] (vLLM's default confidence_head_with_markov=False),
# would raise inside the draft step or at the profile run.
@pytest.mark.parametrize("change, reason", [
    (lambda m, s: setattr(_own_processor(m), "scale", 0.5), None),
    (lambda m, s: setattr(_own_processor(m), "soft_cap", 30.0), None),
    (lambda m, s: setattr(m, "apply_output_logit_transform", lambda x: x), None),
    (lambda m, s: setattr(s, "draft_watermarker", object()), None),
    (lambda m, s: _markov_weights_as(m, torch.float8_e4m3fn), "quantized Markov weights"),
    (lambda m, s: _markov_weights_as(m, torch.float64), "quantized Markov weights"),
    (lambda m, s: setattr(m.model.confidence_head, "with_markov", False), "confidence head without the Markov input"),
])
def test_declines_what_vllm_computes_otherwise(change, reason):
    model, spec = make_model(), make_spec(2, [0, 1])
    change(model, spec)
    declined = v2_fused.decline_reason(model, spec)
    assert declined is not None if reason is None else declined == reason
    assert v2_fused.sample_sequential(model, spec, 2, _hidden()) is False
    assert torch.all(spec.draft_tokens == 0)


# Without adaptive verification the confidence head is not read at all (a with_markov=False
# head must not stop the engine; nothing is written to the confidence buffer).
def test_confidence_head_is_ignored_without_adaptive_verification():
    model = make_model()
    model.model.confidence_head.with_markov = False
    spec = make_spec(2, [0, 1], use_confidence_head=False)
    spec.draft_token_confidence_probs.fill_(-1.0)
    assert v2_fused.sample_sequential(model, spec, 2, _hidden()) is True
    assert torch.all(spec.draft_token_confidence_probs == -1.0)


# Greedy drafting with adaptive verification still writes the confidences.
def test_greedy_drafts_get_confidences_too():
    model, num_reqs = make_model(), 2
    spec = make_spec(num_reqs, [0, 4], probabilistic=False)
    hidden = _hidden()
    assert v2_fused.sample_sequential(model, spec, num_reqs, hidden)
    w1 = model.model.markov_head.markov_w1.weight
    anchors = spec.input_buffers.input_ids[spec._anchor_idx[:num_reqs]]
    prev = torch.cat([anchors[:, None], spec.draft_tokens[:num_reqs, : GAMMA - 1]], dim=1)
    x = torch.cat([hidden[: num_reqs * GAMMA].view(num_reqs, GAMMA, D), w1[prev]], dim=-1)
    expected = torch.sigmoid(model.model.confidence_head.proj(x).squeeze(-1))
    torch.testing.assert_close(spec.draft_token_confidence_probs[:num_reqs], expected)


# Temperatures are read by request state (not batch row); a temperature-0 request in a
# probabilistic engine drafts vLLM's argmax exactly, even at a near-tie.
def test_temperature_is_per_request_state_and_zero_is_exact_argmax():
    model, num_reqs = make_model(), 2
    hidden = _hidden()
    for r in range(30):
        spec = make_spec(num_reqs, [3, 4], temperature=5.0, first_pos=100 + r * GAMMA)
        spec.temperature[3] = 0.0  # row 0's request is greedy; rows' own indices 0, 1 are hot
        assert v2_fused.sample_sequential(model, spec, num_reqs, hidden)
        assert torch.equal(spec.draft_tokens[0], _greedy_chain(model, spec, num_reqs, hidden, 0)), r


def test_greedy_request_at_a_near_tie_takes_the_argmax():
    model, hidden = make_model(), _hidden()
    w1 = model.model.markov_head.markov_w1.weight
    w2 = model.model.markov_head.markov_w2.weight[:V]
    anchors = make_spec(1, [2]).input_buffers.input_ids[0]
    bias = (w1[anchors].float() @ w2.float().t())
    design = torch.zeros(V)
    design[7], design[11] = 10.0, 10.0 - 2e-3  # corrected logits: 7 wins by 2e-3
    U = torch.zeros(1, GAMMA, V)
    U[0, 0] = design - bias
    model.compute_draft_logits = lambda h: U.reshape(GAMMA, V).clone()
    for r in range(40):
        spec = make_spec(1, [2], temperature=1.0, first_pos=10 + r * GAMMA)
        spec.temperature[2] = 0.0
        assert v2_fused.sample_sequential(model, spec, 1, hidden)
        assert int(spec.draft_tokens[0, 0]) == 7, r


# Each request draws with its own seed (vLLM's seeds[idx_map]): a request's draft does not
# depend on another request's seed, and does depend on its own.
def test_seeds_are_per_request_state():
    model, hidden = make_model(), _hidden()
    base = make_spec(2, [3, 4], temperature=3.0)
    base.seeds[3], base.seeds[4] = 111, 222
    assert v2_fused.sample_sequential(model, base, 2, hidden)
    changed = 0
    for s in range(1, 9):
        other = make_spec(2, [3, 4], temperature=3.0)
        other.seeds[3], other.seeds[4] = 111, 222 + s
        other.seeds[0], other.seeds[1] = 5 * s, 7 * s  # rows' own indices: must not matter
        assert v2_fused.sample_sequential(model, other, 2, hidden)
        assert torch.equal(other.draft_tokens[0], base.draft_tokens[0])
        changed += not torch.equal(other.draft_tokens[1], base.draft_tokens[1])
    assert changed >= 4


# The plan (weight value check, a host sync under a CUDA graph; the decision) is resolved once.
def test_plan_is_resolved_once_per_model(monkeypatch):
    calls = []
    monkeypatch.setattr(v2_fused, "check_markov_weight_values", lambda *a: calls.append(1))
    model, hidden = make_model(), _hidden()
    for _ in range(3):
        assert v2_fused.sample_sequential(model, make_spec(2, [0, 1]), 2, hidden)
    assert len(calls) == 1
