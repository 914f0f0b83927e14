"""DSpark inside the real TGI v3.3.7 shard (`text-generation-server serve`, our series applied),
driven over gRPC like TGI's router by dspark_cli.integrations.tgi.shard, on the CPU through TGI's
Intel path (torch 2.7.0 + ipex 2.7.0, bf16). Needs DSPARK_TGI_SHARD_PYTHON (the venv that
.ci/prepare.d/41-tgi-shard.sh builds); skips with the reason otherwise."""

import json
import math
import os
import re
import subprocess

import pytest
import torch

from dspark_cli import tiny_models
from dspark_cli.integrations.spec_runner import run_module
from dspark_cli.integrations.tgi import fixtures
from tests.chi2 import chi2_two_sample_pvalue

SHARD_PYTHON = os.environ.get("DSPARK_TGI_SHARD_PYTHON")
pytestmark = pytest.mark.skipif(not SHARD_PYTHON, reason="DSPARK_TGI_SHARD_PYTHON (a venv with the patched TGI "
                                                         "v3.3.7 server, built by .ci/prepare.d/41-tgi-shard.sh "
                                                         "from DSPARK_TGI_SRC) is not set")
GAMMA = 3
GRAMMAR_ID = 6


def shard(spec: dict) -> dict:
    return run_module(SHARD_PYTHON, "dspark_cli.integrations.tgi.shard", spec, 600, "TGI shard run")


def plain_and_dspark(target, draft, waves: list) -> tuple[dict, dict]:
    """The shard's results for the same waves without, then with DSpark."""
    spec = {"model": str(target), "waves": waves}
    return shard({**spec, "draft": None}), shard({**spec, "draft": str(draft)})


def waves() -> list:
    """Two arrivals: the second is prefilled while the first decodes, then both decode together."""
    first = [{"id": 1, "prompt": [3, 17, 99], "max_new_tokens": 13},
             {"id": 2, "prompt": [40, 41], "max_new_tokens": 9, "repetition_penalty": 1.3},
             {"id": 3, "prompt": [120], "max_new_tokens": 17}]
    second = [{"id": 4, "prompt": [7, 8, 9, 10], "max_new_tokens": 10},
              {"id": 5, "prompt": [200, 1], "max_new_tokens": 6},
              # A regex forcing t20 after t21 t22 t23: the oracle drafts 22 23 24 after the anchor 21,
              # so row 2 must be masked by the grammar state after t23 (only t20 allowed).
              {"id": GRAMMAR_ID, "prompt": [20], "max_new_tokens": 8, "regex": "t21t22t23t20(t2[0-9])*"}]
    return [[0, first], [2, second]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("tgi-llama")
    target = fixtures.build(root / "target", "llama", "successor")
    return {"target": target,
            "oracle": tiny_models.build_draft(root / "oracle", gamma=GAMMA, kind="oracle", target=target),
            "partial": tiny_models.build_draft(root / "partial", gamma=GAMMA, kind="partial", target=target)}


def test_llama_greedy_output_identical_to_plain_tgi_with_fewer_rounds(llama):
    plain = shard({"model": str(llama["target"]), "draft": None, "waves": waves()})
    oracle = shard({"model": str(llama["target"]), "draft": str(llama["oracle"]), "waves": waves()})
    partial = shard({"model": str(llama["target"]), "draft": str(llama["partial"]), "waves": waves()})
    assert plain["speculate"] == 0 and oracle["speculate"] == partial["speculate"] == GAMMA  # patch 0002
    assert oracle["tokens"] == plain["tokens"] == partial["tokens"]
    assert plain["tokens"][str(GRAMMAR_ID)][:5] == [21, 22, 23, 20, 21]
    for r in (p for _, wave in waves() for p in wave if p["id"] != GRAMMAR_ID):
        rid, n = str(r["id"]), r["max_new_tokens"]
        assert plain["tokens"][rid] == tiny_models.successor_tokens(r["prompt"], n)
        assert plain["finish"][rid] == oracle["finish"][rid] == "FINISH_REASON_LENGTH"
        # Oracle: prefill gives 1 token, every decode round γ + 1 (arrivals and concatenation lose none).
        assert oracle["rounds"][rid] == 1 + math.ceil((n - 1) / (GAMMA + 1))
        assert oracle["rounds"][rid] <= partial["rounds"][rid] < plain["rounds"][rid] == n
    # warmup sized the KV cache with the drafter's context in each token's cost, then reserved the pool
    reserved = re.findall(r"^DSpark: the drafter's context pool holds (\d+) tokens", oracle["log"], re.M)
    assert len(reserved) == 1 and int(reserved[0]) > 0 and "outgrew" not in oracle["log"]


def test_batches_that_finish_at_prefill_are_served_as_plain_tgi(llama):
    """Requests of max_new_tokens = 1 stop at their prefill: generate_token returns no batch and
    patch 0003 has DSpark forget them there (no FilterBatch follows). Three such waves, then one
    request that decodes: every output as plain TGI's."""
    finishing = [[0, [{"id": 100 + 4 * w + i, "prompt": [5 + w, 30 + i], "max_new_tokens": 1} for i in range(4)]]
                 for w in range(3)]
    waves = finishing + [[0, [{"id": 1, "prompt": [3, 17, 99], "max_new_tokens": 9}]]]
    plain, dspark = plain_and_dspark(llama["target"], llama["oracle"], waves)
    assert dspark["tokens"] == plain["tokens"] and len(dspark["tokens"]) == 13
    assert dspark["tokens"]["1"] == tiny_models.successor_tokens([3, 17, 99], 9)
    assert dspark["rounds"]["1"] == 1 + math.ceil(8 / (GAMMA + 1))  # the oracle drafts on after them


def test_qwen3_through_the_transformers_backend(tmp_path):
    """TGI has no flash Qwen3 model: Qwen3 targets run in TransformersFlashCausalLM (patch 0004)."""
    target = fixtures.build(tmp_path / "target", "qwen3", "successor")
    draft = tiny_models.build_draft(tmp_path / "draft", gamma=GAMMA, kind="partial", target=target)
    plain, dspark = plain_and_dspark(target, draft, waves()[:1])
    assert dspark["speculate"] == GAMMA and dspark["tokens"] == plain["tokens"]
    assert sum(dspark["rounds"].values()) < sum(plain["rounds"].values())


def test_qwen2_random_target_greedy_identical(tmp_path):
    target = fixtures.build(tmp_path / "target", "qwen2", "random", seed=3)
    draft = tiny_models.build_draft(tmp_path / "draft", gamma=GAMMA, kind="random", target=target, seed=4)
    plain, dspark = plain_and_dspark(target, draft, waves())
    assert dspark["speculate"] == GAMMA and dspark["tokens"] == plain["tokens"]
    assert all(len(dspark["tokens"][str(r["id"])]) == r["max_new_tokens"] for _, w in waves() for r in w)


def test_sampled_tokens_are_distributed_as_without_speculation(tmp_path):
    """N requests with one prompt emit t1 (prefill) and t2 (the first token of the first verify
    round), at T = 1 and with TGI's warpers (T = 0.7, top-k 4), from a random target spread over ~20
    likely tokens, once with DSpark and once without (other seeds: independent samples, and the same
    bf16 numerics, whose top-k cut can differ from an fp32 reference where logits nearly tie). The
    draft proposes the target's greedy choice f(t1) with q ≈ 0.6 and spreads the rest of q over every
    other token, so t2 comes from accepted drafts of both kinds and from residuals. The t1 and t2
    marginals and P(t2 = f(t1)) must agree. Each request asks for 3 tokens: it finishes in 2 rounds
    iff its first draft was accepted, so the test also sees that acceptance and rejection happened."""
    target = fixtures.build(tmp_path / "target", "llama", "random", seed=3)
    prompt, N, V = [3, 17, 99], 800, tiny_models.VOCAB
    hf = tiny_models.load_transformers(target)
    with torch.no_grad():  # f(t1): the target's greedy t2 after prompt + t1
        greedy_next = hf(torch.cat([torch.tensor(prompt).expand(V, -1), torch.arange(V)[:, None]], 1)).logits[:, -1].argmax(-1)
    draft = fixtures.build_map_draft(tmp_path / "draft", GAMMA, target, greedy_next, scale=6.0)
    groups = {"T=1": {"temperature": 1.0}, "T=0.7,top-k=4": {"temperature": 0.7, "top_k": 4}}
    requests = {name: [{"id": g * N + i + 1, "prompt": prompt, "max_new_tokens": 3, "do_sample": True,
                        "seed": 1000 + g * N + i, **params} for i in range(N)]
                for g, (name, params) in enumerate(groups.items())}
    waves = [[0, [r for rs in requests.values() for r in rs]]]
    dspark = shard({"model": str(target), "draft": str(draft), "waves": waves})
    plain = shard({"model": str(target), "draft": None,
                   "waves": [[0, [{**r, "seed": r["seed"] + 10**6} for r in waves[0][1]]]]})

    for name in groups:
        pairs = {run: torch.tensor([out["tokens"][str(r["id"])][:2] for r in requests[name]])  # [N, 2]
                 for run, out in (("dspark", dspark), ("plain", plain))}
        for k in range(2):
            assert chi2_two_sample_pvalue(pairs["dspark"][:, k], pairs["plain"][:, k]) > 1e-3, (name, f"t{k + 1}")
        hits = {run: (t[:, 1] == greedy_next[t[:, 0]]).long() for run, t in pairs.items()}
        assert chi2_two_sample_pvalue(hits["dspark"], hits["plain"]) > 1e-3, (name, "P(t2 = f(t1))")
        first_draft_accepted = sum(dspark["rounds"][str(r["id"])] == 2 for r in requests[name])
        assert 0.1 * N < first_draft_accepted < 0.9 * N, (name, first_draft_accepted)


def test_repetition_penalty_sees_the_drafts_before_each_verify_row(tmp_path):
    """Greedy with a repetition penalty on a target that revisits tokens (20 21 22 23 22 …): row j of
    a verify round must be penalized for drafts 1..j as plain TGI penalizes tokens once emitted."""
    target = fixtures.build(tmp_path / "target", "llama", "loop")
    draft = fixtures.build_map_draft(tmp_path / "draft", GAMMA, target, fixtures.loop_map())
    requests = [{"id": 1, "prompt": [20], "max_new_tokens": 12, "repetition_penalty": 10.0},
                {"id": 2, "prompt": [20], "max_new_tokens": 12}]
    plain, dspark = plain_and_dspark(target, draft, [[0, requests]])
    assert plain["tokens"]["2"] == [21, 22, 23] + [22, 23] * 4 + [22]  # the loop, unpenalized
    assert plain["tokens"]["1"][:3] == [21, 22, 23] and plain["tokens"]["1"][3] != 22  # 22 was emitted: penalized
    assert dspark["tokens"] == plain["tokens"]



def test_dspark_verify_tgi_serves_with_the_installed_shard(tmp_path):
    proc = subprocess.run([SHARD_PYTHON, "-m", "dspark_cli", "verify", "tgi", "--json"], capture_output=True,
                          text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    shard_row = result["tgi_shard"]
    assert result["ok"] and shard_row["ran"] and shard_row["identical"] and shard_row["speculate"] == 3
    assert shard_row["rounds"] < shard_row["rounds_no_spec"]


def test_a_seeded_request_samples_the_same_alone_or_in_a_batch(tmp_path):
    """As in plain TGI, a request's seed fixes its sampled output whatever else is batched with it,
    given the same verify widths (DSPARK_SCHEDULER=off: always γ; under the scheduler a batch's
    width changes which draws a request uses, docs/tgi.md)."""
    target = fixtures.build(tmp_path / "target", "llama", "successor", logit_scale=0.05)
    draft = tiny_models.build_draft(tmp_path / "draft", gamma=GAMMA, kind="oracle", target=target)
    probe = {"id": 1, "prompt": [3, 17, 99], "max_new_tokens": 12, "do_sample": True, "seed": 7}
    others = [{"id": 10 + i, "prompt": [i, 2 * i], "max_new_tokens": 6 + i, "do_sample": True, "seed": 100 + i}
              for i in range(4)]
    out = shard({"model": str(target), "draft": str(draft), "env": {"DSPARK_SCHEDULER": "off"}, "waves": [
        [0, [probe]], [1, [{**probe, "id": 2}] + others[:2]], [3, others[2:]]]})
    assert out["tokens"]["1"] == out["tokens"]["2"]
    assert len(set(tuple(v) for v in out["tokens"].values())) > 2  # sampling did vary across seeds


def test_steep_sps_table_narrows_the_verify_forward_output_identical(llama, tmp_path):
    """Six requests under an SPS table that halves steps/s past 12 rows: the scheduler hands TGI
    drafts of width 1 (12 rows, not 24), so the oracle's rounds emit 2 tokens instead of γ + 1. A
    request arriving later alone is drafted at full width and concatenated with the narrow batch
    (pad_drafts). Ids start at 0, as the router's do after its id-0 warmup."""
    from dspark_cli.runtime import SPSTable

    table = tmp_path / "sps.json"
    SPSTable([6, 12, 18, 24], [100.0, 60.0, 30.0, 20.0]).save(table)  # Θ: 600, 720, 540, 480 → width 1
    batch = [{"id": i, "prompt": [3 * i + 1, 3 * i + 2], "max_new_tokens": 12} for i in range(6)]
    late = [{"id": 6, "prompt": [50, 51], "max_new_tokens": 12}]
    spec = {"model": str(llama["target"]), "waves": [[0, batch], [1, late]]}
    plain = shard({**spec, "draft": None})
    wide = shard({**spec, "draft": str(llama["oracle"])})
    narrow = shard({**spec, "draft": str(llama["oracle"]), "env": {"DSPARK_SPS_TABLE": str(table)}})
    assert narrow["tokens"] == wide["tokens"] == plain["tokens"]
    assert all(plain["tokens"][str(r["id"])] == tiny_models.successor_tokens(r["prompt"], 12) for r in batch + late)
    # While all six decode, each round gives 2 tokens (width 1): 1 + ⌈11 / 2⌉ rounds, not 1 + ⌈11 / 4⌉.
    assert all(narrow["rounds"][str(r["id"])] == 7 and wide["rounds"][str(r["id"])] == 4 for r in batch)
    # A table where no draft pays (Θ: 600, 120, ...): width 0, TGI decodes one token a round.
    SPSTable([6, 12, 18, 24], [100.0, 10.0, 5.0, 1.0]).save(table)
    none = shard({**spec, "draft": str(llama["oracle"]), "env": {"DSPARK_SPS_TABLE": str(table)}})
    assert none["tokens"] == plain["tokens"] and all(none["rounds"][str(r["id"])] == 12 for r in batch)


def test_a_batch_narrow_when_concatenated_widens_later_output_identical(llama, tmp_path):
    """Request 1 decodes alone at width 0 (the table makes no draft pay for one request); request 2
    arrives at step 4 and the concatenated batch is drafted at width γ. The rows of
    all_input_ids_tensor must hold γ more tokens than prompt + max_new_tokens whatever width the
    batch had when concatenated (patch 0003): sized by its width 0 they overflowed once a round
    accepted γ + 1 tokens (CPU: "The expanded size of the tensor (2) must match the existing size
    (4)"; CUDA: written into the next request's row)."""
    from dspark_cli.runtime import SPSTable

    table = tmp_path / "sps.json"
    # One request: Θ(0) = 100 > Θ(3) = 4·10; two: Θ(0) = 2·10 < Θ(3) = 8·100.
    SPSTable([1, 2, 4, 8], [100.0, 10.0, 10.0, 100.0]).save(table)
    first = {"id": 1, "prompt": list(range(3, 13)), "max_new_tokens": 12}
    late = {"id": 2, "prompt": [60], "max_new_tokens": 12}
    spec = {"model": str(llama["target"]), "waves": [[0, [first]], [4, [late]]]}
    plain = shard({**spec, "draft": None})
    dspark = shard({**spec, "draft": str(llama["oracle"]), "env": {"DSPARK_SPS_TABLE": str(table)}})
    assert dspark["tokens"] == plain["tokens"]
    assert plain["tokens"]["1"] == tiny_models.successor_tokens(first["prompt"], 12)
    assert dspark["finish"] == plain["finish"] == {"1": "FINISH_REASON_LENGTH", "2": "FINISH_REASON_LENGTH"}
    # Request 1: prefill + 4 rounds alone at width 0, then γ + 1 tokens a round with request 2.
    assert dspark["rounds"]["1"] < plain["rounds"]["1"] == 12 and dspark["rounds"]["2"] < 12


def test_speculate_0_serves_as_plain_tgi_without_drafting(llama):
    """`--speculate 0` with DSPARK_DRAFT set: speculation is off, so DSpark is not attached (one
    warning line in the shard's log) and TGI serves as without DSpark: Info reports 0, the same
    tokens in the same rounds."""
    spec = {"model": str(llama["target"]), "waves": waves()}
    plain = shard({**spec, "draft": None})
    off = shard({**spec, "draft": str(llama["oracle"]), "speculate": 0})
    assert off["speculate"] == 0 and off["tokens"] == plain["tokens"] and off["rounds"] == plain["rounds"]
    assert off["log"].splitlines().count(
        f"DSpark: DSPARK_DRAFT={llama['oracle']} is ignored: --speculate is 0 (speculation off)") == 1


def test_a_drafter_of_another_vocabulary_stops_the_shard_at_startup(llama, tmp_path):
    """The flash Llama's config gives the target's vocabulary (256): a drafter of 300 tokens is
    refused when the shard loads the model, with one error naming both."""
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "config.json").write_text((llama["oracle"] / "config.json").read_text())
    w = tiny_models.read_weights(llama["oracle"])
    for n in ("embed_tokens.weight", "lm_head.weight", "markov_head.markov_w1.weight", "markov_head.markov_w2.weight"):
        w[n] = torch.cat([w[n], w[n][:44]])
    tiny_models.write_weights(wide, w)
    with pytest.raises(RuntimeError, match="TGI shard run failed") as failed:
        shard({"model": str(llama["target"]), "draft": str(wide), "waves": waves()})
    unwrapped = "".join(str(failed.value).split())  # TGI's rich traceback wraps lines at 80 columns
    assert "".join(f"RuntimeError: DSpark (DSPARK_DRAFT={wide}): the drafter's vocabulary has 300 tokens, "
                   "the target's 256".split()) in unwrapped
