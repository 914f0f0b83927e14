"""TGI startup checks (maybe_attach, HiddenCapture) refuse a drafter that does not fit the target
with one clear error, and hooks.choose / DSparkSpeculation.verify hold only the [B·S, V] tensors
they read — real tensors, tiny Qwen3 target and drafter on the CPU."""

import json
import shutil
import weakref
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from dspark_cli import runtime, tiny_models
from dspark_cli.integrations.tgi import hooks
from dspark_cli.integrations.tgi.draft import DSparkDraft
from dspark_cli.integrations.tgi.speculation import DSparkSpeculation, HiddenCapture
from dspark_cli.runtime import rng


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    target = tiny_models.build_target(root / "target", "successor")
    return {"target": target, "draft": tiny_models.build_draft(root / "draft", gamma=3, kind="partial", target=target)}


def test_a_drafter_of_another_hidden_size_is_refused_at_attach(checkpoints, monkeypatch):
    """The drafter's fc reads 2 layers × 128; a target of hidden size 192 (same vocabulary) is
    refused at startup with both widths, for a flash model's config and the transformers
    backend's, before any hook (it used to attach and fail at the first step's fc)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = {k: v for k, v in tiny_models.target_config().items()
              if k not in ("architectures", "model_type", "dtype", "torch_dtype")}
    target = Qwen3ForCausalLM(Qwen3Config(**dict(config, hidden_size=192, intermediate_size=384))).eval()
    monkeypatch.setenv("DSPARK_DRAFT", str(checkpoints["draft"]))
    message = (rf"^DSpark \(DSPARK_DRAFT={checkpoints['draft']}\): the drafter's fc reads 256 features, the target "
               r"gives 2 layers × hidden size 192 = 384; a DSpark drafter serves the target it was trained for$")
    for flash_model in (SimpleNamespace(world_size=1, speculate=3, config=target.config, model=target),
                        SimpleNamespace(world_size=1, speculate=3, model=target)):
        with pytest.raises(RuntimeError, match=message):
            hooks.maybe_attach(flash_model)
    assert all(not layer._forward_hooks for layer in target.model.layers)


class Stack(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(n))


def _attach(checkpoints, monkeypatch, draft=None, **env):
    monkeypatch.setenv("DSPARK_DRAFT", str(draft or checkpoints["draft"]))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    target = tiny_models.load_transformers(checkpoints["target"])
    return hooks.maybe_attach(SimpleNamespace(world_size=1, speculate=3, config=target.config, model=target))


def test_an_sts_file_is_checked_against_the_drafter_at_attach(checkpoints, monkeypatch, tmp_path):
    """DSPARK_STS was first read at warmup's first draft, with an error naming neither it nor the
    file, and a file of a longer block was refused there (vLLM's integration serves γ with its first
    γ temperatures); for a drafter without a confidence head it was ignored."""
    longer, shorter = tmp_path / "sts5.json", tmp_path / "sts2.json"
    runtime.STSCalibration([1.0, 1.5, 2.0, 2.5, 3.0]).save(longer)
    runtime.STSCalibration([1.0, 1.5]).save(shorter)
    assert _attach(checkpoints, monkeypatch, DSPARK_STS=str(longer)).draft.sts.temperatures == [1.0, 1.5, 2.0]
    with pytest.raises(RuntimeError, match=rf"^DSpark: DSPARK_STS={shorter} holds 2 temperature\(s\) for a drafter of "
                                           r"block size 3; calibrate at least 3 positions$"):
        _attach(checkpoints, monkeypatch, DSPARK_STS=str(shorter))
    headless = tmp_path / "headless"
    shutil.copytree(checkpoints["draft"], headless)
    weights = tiny_models.read_weights(headless)
    tiny_models.write_weights(headless, {k: v for k, v in weights.items() if not k.startswith("confidence_head.")})
    with pytest.raises(RuntimeError, match=rf"DSPARK_STS={longer} calibrates a confidence head, and this drafter has none"):
        _attach(checkpoints, monkeypatch, headless, DSPARK_STS=str(longer))


def test_an_empty_scheduler_variable_is_the_default(checkpoints, monkeypatch):
    """Was "DSPARK_SCHEDULER must be exact or off for TGI, got ''"; every other variable reads empty as unset."""
    assert _attach(checkpoints, monkeypatch, DSPARK_SCHEDULER="").scheduler == "exact"


@pytest.mark.parametrize("change, message", [
    (None, "cannot read the DSpark drafter's config"),
    ({"block_size": 0}, "'block_size' must be a whole number ≥ 1, got 0"),
    ({"block_size": "3"}, "'block_size' must be a whole number ≥ 1, got '3'"),
    ({"mask_token_id": None}, "'mask_token_id' must be a whole number ≥ 0, got None"),
    ({"target_layer_ids": []}, "'target_layer_ids' must be a non-empty list of layer numbers ≥ 0, got \\[\\]"),
    ({"target_layer_ids": ["1", "2"]}, "'target_layer_ids' must be a non-empty list of layer numbers ≥ 0, got \\['1', '2'\\]"),
    ({"rms_norm_eps": "1e-6x"}, "'rms_norm_eps' must be a number > 0, got '1e-6x'"),
    # settings the drafter does not compute were read past (drafting with the wrong math, silently)
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}},
     "rope_parameters.rope_type = 'yarn'; the TGI drafter runs the released drafters' default RoPE"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling = 'linear'"),
    ({"attention_bias": True}, "attention_bias = True"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
], ids=["missing", "block-0", "block-str", "no-mask", "no-layers", "layer-str", "eps-str", "yarn", "linear", "bias",
        "gelu"])
def test_a_drafter_config_tgi_cannot_use_is_one_error_naming_dspark_draft(checkpoints, monkeypatch, tmp_path, change,
                                                                         message):
    """TGI's get_model reads γ first: these were a FileNotFoundError, a KeyError, a TypeError at the
    first draft, and block_size 0 turned DSpark off saying --speculate was 0."""
    from dspark_cli.integrations.tgi.speculation import draft_block_size

    draft = tmp_path / "draft"
    if change is not None:
        shutil.copytree(checkpoints["draft"], draft)
        config = json.loads((draft / "config.json").read_text())
        (draft / "config.json").write_text(json.dumps({**config, **change}))
    monkeypatch.setenv("DSPARK_DRAFT", str(draft))
    with pytest.raises(ValueError, match=rf"^DSPARK_DRAFT={draft}: .*{message}"):
        draft_block_size()


def test_a_checkpoint_with_layer_biases_is_refused_at_load(checkpoints, tmp_path):
    """A q_proj bias (attention_bias checkpoints carry them) was loaded and never applied."""
    biased = tmp_path / "biased"
    shutil.copytree(checkpoints["draft"], biased)
    weights = tiny_models.read_weights(biased)
    weights["layers.0.self_attn.q_proj.bias"] = torch.zeros(weights["layers.0.self_attn.q_proj.weight"].shape[0])
    tiny_models.write_weights(biased, weights)
    with pytest.raises(ValueError, match=r"bias tensors the drafter would not apply: layers\.0\.self_attn\.q_proj\.bias$"):
        DSparkDraft.load(biased)


def test_a_config_with_more_layers_than_the_weights_is_refused_at_load(checkpoints, tmp_path):
    """Was a KeyError 'layers.2.self_attn.q_proj.weight' from the layer fusion, naming neither file nor variable."""
    draft = tmp_path / "draft"
    shutil.copytree(checkpoints["draft"], draft)
    config = json.loads((draft / "config.json").read_text())
    layers = config["num_hidden_layers"]
    (draft / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers + 1}))
    with pytest.raises(ValueError, match=rf"^{draft}: checkpoint lacks layers\.{layers}\.self_attn\.q_proj\.weight, "):
        DSparkDraft.load(draft)


def test_a_mask_token_outside_the_vocabulary_is_refused_at_load(checkpoints, tmp_path):
    draft = tmp_path / "draft"
    shutil.copytree(checkpoints["draft"], draft)
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "mask_token_id": tiny_models.VOCAB}))
    with pytest.raises(ValueError, match=rf"mask_token_id {tiny_models.VOCAB} is outside the drafter's vocabulary "
                                         rf"\({tiny_models.VOCAB} tokens\)"):
        DSparkDraft.load(draft)


@pytest.mark.parametrize("ids, reason", [([0, 4], "the target has only 4 decoder layers"),
                                         ([0, 9], "the target has only 4 decoder layers"),
                                         ([-1, 1], r"negative ids are not supported \(-1 would be the embedding"),
                                         ([0, 3], r"the last layer \(3\) is normed")])
def test_target_layer_ids_outside_the_hookable_layers_are_refused_with_the_reason(ids, reason):
    target = Stack(4)
    with pytest.raises(ValueError, match=rf"^target_layer_ids \[{ids[0]}, {ids[1]}\]: {reason}"):
        HiddenCapture(target, ids)
    assert all(not layer._forward_hooks for layer in target.layers)


# ---------------------------------------------------------------- what the verification holds


def _speculation(checkpoints, device: str = "cpu") -> DSparkSpeculation:
    target = tiny_models.load_transformers(checkpoints["target"]).to(device)
    return DSparkSpeculation.for_target(target, DSparkDraft.load(checkpoints["draft"], device), scheduler="off")


class Batch(SimpleNamespace):
    def __len__(self):
        return len(self.requests)


def _batch(B: int, S: int, prefill: bool, device: str = "cpu", first_id: int = 10, do_sample=None,
           top_k: int = 0, top_p: float = 1.0) -> Batch:
    """The FlashCausalLMBatch fields hooks.choose reads (tests/test_tgi_chooser.py: against TGI's own
    chooser), requests without processors (greedy unless do_sample says); prefill: one 4-token
    prompt per request. TGI keeps these tensors on the model's device."""
    chooser = SimpleNamespace(do_sample=do_sample or [False] * B, watermark_processor=None, repetition_processor=None,
                              frequency_processor=None, grammar_processor=None, warpers=[],
                              fsm_grammar_states=[0] * B)
    params = SimpleNamespace(seed=7, temperature=1.0, top_k=top_k, top_p=top_p)
    history = torch.randint(0, tiny_models.VOCAB - 2, (B, 8), device=device)
    n = 4 if prefill else 1
    return Batch(
        requests=[SimpleNamespace(id=first_id + i, parameters=params) for i in range(B)], next_token_chooser=chooser,
        input_ids=history[:, :n].reshape(-1),
        position_ids=torch.arange(n, device=device).repeat(B) if prefill else torch.full((B,), 5, device=device),
        all_input_ids_tensor=history, max_current_length=6, cache_lengths=[0] * B,
        cu_seqlen_prefill=torch.arange(B + 1, device=device) * n if prefill else None,
        speculative_ids=None if prefill else torch.randint(0, tiny_models.VOCAB - 2, (B, S - 1), device=device))


def _choose(spec, B, S, prefill, logits_dtype=torch.float32, device="cpu", **batch_options):
    batch = _batch(B, S, prefill, device, **batch_options)
    rows = B * 4 if prefill else B * S
    width = len(tiny_models.TARGET_LAYER_IDS) * tiny_models.HIDDEN
    spec.capture.buffer = torch.randn(rows, width, device=device)  # the target forward's captured rows
    logits = torch.randn(B if prefill else B * S, tiny_models.VOCAB, device=device).to(logits_dtype)
    return hooks.choose(spec, batch, logits, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("warp", [{}, {"top_k": 5, "top_p": 0.9}], ids=["plain", "top-k-top-p"])
def test_choose_drafts_on_the_gpu_with_the_requests_seeds(checkpoints, warp):
    """The step's counter-based keys (step_seeds) are made on the host: drafting passed them to the
    chain as they were, "all inputs must be on one device: ... seeds on cpu" at TGI's warmup, so the
    shard could not start on a GPU. Warped: the per-request top-k/top-p, host-made too."""
    spec = _speculation(checkpoints, "cuda")
    B, S = 2, 4
    first = _choose(spec, B, S, prefill=True, device="cuda", do_sample=[False, True], **warp)
    assert first[4].device.type == "cuda" and first[4].shape == (B, 3)
    second = _choose(spec, B, S, prefill=False, device="cuda", do_sample=[False, True], **warp)
    assert second[3].device.type == "cuda" and second[3].shape == (B,)


def test_requests_of_batches_that_stopped_are_forgotten(checkpoints):
    """A run of prefills whose requests all stop at once (max_new_tokens = 1): no decode or
    FilterBatch names them again, so each kept its pending draft and its context in the pool
    until patch 0003 had DSpark forget them where generate_token returns no batch."""
    spec = _speculation(checkpoints)
    for wave in range(10):
        ids = [100 + 4 * wave + i for i in range(4)]
        _choose(spec, 4, 4, prefill=True, first_id=ids[0])
        assert set(ids) <= set(spec.pending) and set(ids) <= set(spec.draft.context_kv)
        spec.forget(ids)  # what the patched generate_token does when every request stopped
        assert not spec.pending and not list(spec.draft.context_kv)


def test_choose_drops_the_warped_scores_before_the_verification(checkpoints, monkeypatch):
    """During the verification choose holds the fp32 log-probabilities TGI gets back, not also the
    warped scores or their fp32 copy (each a [B·S, V] tensor besides them); the emitted tokens'
    log-probabilities are read from them directly."""
    spec = _speculation(checkpoints)
    B, S = 3, 4
    _choose(spec, B, S, prefill=True)
    made = []
    warped = hooks._warped_logits
    monkeypatch.setattr(hooks, "_warped_logits", lambda *a: made.append(weakref.ref(w := warped(*a))) or w)
    verify = spec.verify

    def checked_verify(request_ids, logprobs, *rest, **options):
        assert logprobs.shape == (B, S, tiny_models.VOCAB)
        assert made and all(ref() is None for ref in made), "the warped scores are alive during the verification"
        return verify(request_ids, logprobs, *rest, **options)

    spec.verify = checked_verify
    next_ids, next_logprobs, alllogprobs, accepted, _ = _choose(spec, B, S, prefill=False, logits_dtype=torch.bfloat16)
    assert alllogprobs.dtype == torch.float32 and alllogprobs.shape == (B * S, tiny_models.VOCAB)
    rows = [i * S + j for i, n in enumerate(accepted.tolist()) for j in range(n)]
    assert torch.equal(next_logprobs, alllogprobs[rows].gather(1, next_ids.view(-1, 1)).view(-1))


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def test_verify_copies_no_probabilities(checkpoints, monkeypatch):
    """A plain step (no pending drafts) reads row 0 of each request: its exp is B rows, not all
    B·S. A verification takes the log-probabilities themselves as LogitRows (max 0, sum 1: each
    entry's probability its exp, computed where read): no copy of them at all."""
    spec = _speculation(checkpoints)
    B, S, V = 3, 4, tiny_models.VOCAB
    seen = {}
    race, reject = rng.grouped_race_sample, runtime.rejection_sample_rows
    monkeypatch.setattr(rng, "grouped_race_sample", lambda p, *a: seen.update(race=_storage_bytes(p)) or race(p, *a))
    monkeypatch.setattr(runtime, "rejection_sample_rows", lambda p, *a, **k: seen.update(reject=p) or reject(p, *a, **k))
    logprobs = torch.log_softmax(torch.randn(B, S, V), -1)
    greedy = torch.zeros(B, dtype=torch.bool)
    seeds = torch.arange(B, dtype=torch.int64)
    ids = [1, 2, 3]
    spec.verify(ids, logprobs, greedy, seeds)  # nothing pending: a plain step from row 0
    assert seen["race"] == B * V * 4
    spec.draft.extend_contexts(ids, torch.randn(B, 2 * tiny_models.HIDDEN), torch.zeros(B, dtype=torch.int64), [1] * B)
    spec.propose(ids, torch.tensor([5, 6, 7]), [1, 1, 1], torch.ones(B), seeds=seeds)
    for r in ids:
        spec.pending[r].ell = 1  # verified 1 draft each, inside a batch padded to S − 1 = 3
    tokens, n_acc = spec.verify(ids, logprobs, greedy, seeds)
    target = seen["reject"]
    assert isinstance(target, runtime.LogitRows) and target.logits.data_ptr() == logprobs.data_ptr()
    assert torch.equal(target.probs(), logprobs.view(B * S, V).exp())
    assert all(len(t) == n + 1 and n <= 1 for t, n in zip(tokens, n_acc))


def test_startup_warns_of_float16_for_a_bfloat16_drafter_and_of_prefix_caching(checkpoints, monkeypatch, tmp_path):
    """TGI serves Qwen3 through its transformers backend, float16 unless --dtype says otherwise, and the
    launcher turns prefix caching on with flashdecoding: both served DSpark without a word at startup
    (prefix caching got one when the first cached prompt came)."""
    bf16 = tmp_path / "bf16"
    shutil.copytree(checkpoints["draft"], bf16)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tiny_models.read_weights(bf16).items()},
              str(bf16 / tiny_models.WEIGHTS))
    monkeypatch.setenv("PREFIX_CACHING", "0")
    monkeypatch.setenv("CUDA_GRAPHS", "1,2,4")  # the launcher's default; on the CPU there are none to warn of
    assert hooks.startup_warnings(DSparkDraft.load(bf16, dtype=torch.bfloat16)) == []
    assert hooks.startup_warnings(DSparkDraft.load(checkpoints["draft"], dtype=torch.float16)) == []  # saved in fp32
    monkeypatch.setenv("PREFIX_CACHING", "true")
    said = hooks.startup_warnings(DSparkDraft.load(bf16, dtype=torch.float16))
    assert said == ["the target runs in float16 and the drafter, saved in bfloat16, runs in it too (its captured "
                    "features may overflow there: fewer drafts accepted, output still exact); serve with "
                    "--dtype bfloat16",
                    "PREFIX_CACHING is on: prompt rows served from the prefix cache are not in the drafter's context "
                    "(fewer drafts accepted, output still exact); set PREFIX_CACHING=0"]


def test_choose_commits_the_anchor_and_accepted_rows_and_drafts_after_them(checkpoints, monkeypatch):
    """A decode step commits, per request, the target rows of its anchor and its accepted drafts only
    (not the rejected ones), at their positions, and drafts the next block at position p + n + 1 with
    the request's own warp (temperature 0 for greedy, its top-k/top-p)."""
    spec = _speculation(checkpoints)
    B, S, V = 3, 4, tiny_models.VOCAB
    prefill = []
    original = spec.draft.extend_contexts
    monkeypatch.setattr(spec.draft, "extend_contexts",
                        lambda ids, f, pos, counts: prefill.append((ids, pos.tolist(), counts)) or original(ids, f, pos, counts))
    _choose(spec, B, S, prefill=True, do_sample=[False, True, True], top_k=5, top_p=0.9)
    assert prefill == [([10, 11, 12], [0, 1, 2, 3] * 3, [4, 4, 4])]  # every prompt row
    pending = torch.stack([spec.pending[10 + i].tokens for i in range(B)])  # [B, γ]
    batch = _batch(B, S, False, do_sample=[False, True, True], top_k=5, top_p=0.9)
    batch.speculative_ids = pending.clone()
    width = len(tiny_models.TARGET_LAYER_IDS) * tiny_models.HIDDEN
    spec.capture.buffer = torch.arange(B * S, dtype=torch.float32)[:, None].expand(B * S, width).contiguous()
    logits = torch.zeros(B * S, V)
    logits[0:3, pending[0]] = torch.eye(3) * 60           # request 10 (greedy): every draft is the argmax
    logits[4, pending[1, 0]] = 60                        # request 11: draft 1 certain, draft 2 impossible
    logits[5, (pending[1, 1] + 1) % V] = 60
    logits[8, (pending[2, 0] + 1) % V] = 60               # request 12: draft 1 impossible
    commits, proposals = [], []
    propose = spec.propose
    monkeypatch.setattr(spec.draft, "extend_contexts",
                        lambda ids, f, pos, counts: commits.append((ids, f[:, 0].tolist(), pos.tolist(), counts))
                        or original(ids, f, pos, counts))
    monkeypatch.setattr(spec, "propose", lambda *a: proposals.append(a) or propose(*a))
    _, _, _, accepted, _ = hooks.choose(spec, batch, logits, 3)
    assert accepted.tolist() == [4, 2, 1]
    assert commits == [([10, 11, 12], [0, 1, 2, 3, 4, 5, 8], [5, 6, 7, 8, 5, 6, 5], [4, 2, 1])]
    ids, anchors, anchor_positions, temperature, top_k, top_p, _ = proposals[0]
    assert anchor_positions == [9, 7, 6] and temperature.tolist() == [0.0, 1.0, 1.0]
    assert top_k.tolist() == [5, 5, 5] and torch.allclose(top_p, torch.tensor([0.9] * 3))


def test_a_decode_batch_drops_the_contexts_of_requests_filtered_out(checkpoints):
    spec = _speculation(checkpoints)
    _choose(spec, 3, 4, prefill=True)
    assert {10, 11, 12} <= set(spec.draft.context_kv)
    _choose(spec, 1, 4, prefill=False)  # FilterBatch kept request 10 only
    assert set(spec.pending) == {10} and list(spec.draft.context_kv) == [10]


def test_clear_cache_forgets_the_requests_of_the_batches_it_drops(checkpoints):
    """TGI's ClearCache(id) (the router's, when every request of a batch was cancelled, and after a
    failed Prefill or Decode, whose batch had already left the shard's cache) and ClearCache() (all
    batches): no decode names those requests again. Patch 0005 calls cache_cleared before the cache
    drops them; until then their contexts and pending drafts stayed until the next decode."""
    spec = _speculation(checkpoints)
    for first in (10, 20, 30):  # three prefilled batches of two requests each
        _choose(spec, 2, 4, prefill=True, first_id=first)
    cached = {1: Batch(requests=[SimpleNamespace(id=10), SimpleNamespace(id=11)]),
              2: Batch(requests=[SimpleNamespace(id=20), SimpleNamespace(id=21)])}  # 30, 31: their Decode failed
    assert set(spec.pending) == set(spec.draft.context_kv) == {10, 11, 20, 21, 30, 31}
    spec.cache_cleared(cached, 1)
    assert set(spec.pending) == set(spec.draft.context_kv) == {20, 21}
    free = len(spec.draft.context_kv.free)
    spec.cache_cleared({2: cached[2]}, None)
    assert not spec.pending and not list(spec.draft.context_kv) and len(spec.draft.context_kv.free) > free


def test_a_greedy_request_without_drafts_takes_the_argmax(checkpoints):
    """A plain step (prefill, or nothing pending) of a greedy request is TGI's argmax, seeded or not,
    even where the target is far from one-hot."""
    spec = _speculation(checkpoints)
    B, V = 64, tiny_models.VOCAB
    logprobs = torch.log_softmax(0.1 * torch.randn(B, 1, V, generator=torch.Generator().manual_seed(2)), -1)
    for seeds in (torch.arange(B, dtype=torch.int64), None):
        tokens, n_acc = spec.verify(list(range(B)), logprobs, torch.ones(B, dtype=torch.bool), seeds)
        assert [t[0] for t in tokens] == logprobs[:, 0].argmax(-1).tolist() and n_acc == [0] * B


def test_a_config_head_dim_other_than_hidden_over_heads_is_kept(tmp_path):
    """Qwen3-0.6B/4B-shaped drafters declare head_dim 128 where hidden_size / heads is 64 or 80."""
    from dspark_cli.integrations.tgi.draft import DraftConfig

    cfg = {"architectures": ["Qwen3DSparkModel"], "hidden_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 1, "block_size": 4, "mask_token_id": 3,
           "target_layer_ids": [1]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert DraftConfig.load(tmp_path).head_dim == 32


def test_choose_hands_tgi_drafts_of_the_scheduled_width_within_speculate(checkpoints):
    """TGI runs 1 + (the width of the drafts choose returns) rows per request: that width is the
    scheduler's (here 0: no draft pays) and never more than --speculate."""
    spec = _speculation(checkpoints)
    spec.scheduler, spec.sps = "exact", runtime.SPSTable([3, 6, 9, 12], [100.0, 1.0, 1.0, 1.0])
    assert _choose(spec, 3, 4, prefill=True)[4].shape == (3, 0) and spec.pending[10].ell == 0
    spec.scheduler = "off"
    batch = _batch(3, 4, True)
    spec.capture.buffer = torch.randn(12, len(tiny_models.TARGET_LAYER_IDS) * tiny_models.HIDDEN)
    out = hooks.choose(spec, batch, torch.randn(3, tiny_models.VOCAB), 2)  # --speculate 2 under a γ = 3 drafter
    assert out[4].shape == (3, 2)


def _near_tie(rows: int, low: int, high: int) -> torch.Tensor:
    """fp32 logits [rows, V] whose two largest, at `low` < `high`, are adjacent floats, the larger at
    `high`: TGI's Greedy (argmax of the warped scores) picks `high`, while exp(log_softmax) rounds
    both to one probability (a tie that argmax breaks towards `low`)."""
    logits = -1 + 0.01 * torch.randn(rows, tiny_models.VOCAB, generator=torch.Generator().manual_seed(3))
    logits[:, low] = 1e-3
    logits[:, high] = torch.nextafter(torch.tensor(1e-3), torch.tensor(1.0))
    assert bool((torch.log_softmax(logits, -1).exp()[:, low] == torch.log_softmax(logits, -1).exp()[:, high]).all())
    return logits


def test_a_greedy_request_takes_tgis_argmax_of_the_scores_where_probabilities_round_to_a_tie(checkpoints):
    """Greedy TGI takes the argmax of the warped scores; choose verified against the argmax of
    exp(log_softmax(scores)), which can round two distinct maxima to one value and then took the
    lower token id: another token than TGI's without speculation (prefill), and a draft of TGI's
    token rejected (decode)."""
    spec = _speculation(checkpoints)
    B, S, low, high = 2, 4, 4, 5
    batch = _batch(B, S, prefill=True)
    spec.capture.buffer = torch.randn(B * 4, len(tiny_models.TARGET_LAYER_IDS) * tiny_models.HIDDEN)
    next_ids, _, _, _, drafts = hooks.choose(spec, batch, _near_tie(B, low, high), 3)
    assert next_ids.tolist() == [high] * B
    spec.pending[10].draft.tokens[:, 0] = high  # the drafter proposes TGI's greedy token first
    batch = _batch(B, S, prefill=False)
    batch.speculative_ids = spec.pending[10].draft.tokens.clone()  # what TGI verifies: choose's drafts
    spec.capture.buffer = torch.randn(B * S, len(tiny_models.TARGET_LAYER_IDS) * tiny_models.HIDDEN)
    next_ids, _, _, accepted, _ = hooks.choose(spec, batch, _near_tie(B * S, low, high), 3)
    assert accepted.tolist() == [2] * B and next_ids.tolist() == [high, high] * B
