"""TGI v3.3.7 series: applies to the real tree and byte-compiles (DSPARK_TGI_SRC), and our TGI-side
drafter/verifier run losslessly with real tensors on the CPU — through a small generation loop over
a real transformers Qwen3 target (the real patched TGI shard runs in tests/test_tgi_shard.py)."""

import ast
import json
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dspark_cli import tiny_models
from dspark_cli.integrations.tgi.draft import DSparkDraft, _top_k_bound
from dspark_cli.integrations.tgi.hooks import pad_drafts
from dspark_cli.integrations.tgi.speculation import DSparkSpeculation, layer_output, uniform_verify_length
from dspark_cli.runtime import SPSTable
from dspark_cli.integrations.tgi.verify import generate, greedy_reference
from tests.chi2 import chi2_pvalue
from tests.tgi_tree import TGI_SRC, needs_tree

REPO = Path(__file__).resolve().parent.parent
SERIES = REPO / "patches" / "tgi" / "v3.3.7"


@pytest.fixture(scope="module")
def applied_tree(tmp_path_factory):
    work = tmp_path_factory.mktemp("tgi") / "tgi"
    out = subprocess.run([sys.executable, "-m", "dspark_cli", "apply", "tgi", "--repo", TGI_SRC, "-C", str(work),
                          "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return work


@needs_tree
def test_series_applies_to_the_real_tree_and_compiles(applied_tree):
    work = applied_tree
    changed = subprocess.run(["git", "-C", str(work), "diff", "--name-only", "dfb3fbe78e0d1d69251bd33065591c61bafdfaa8",
                              "HEAD"], capture_output=True, text=True, check=True).stdout.split()
    assert {"server/text_generation_server/_dspark.py", "server/text_generation_server/models/__init__.py",
            "server/text_generation_server/models/flash_causal_lm.py",
            "server/text_generation_server/models/transformers_flash_causal_lm.py",
            "server/text_generation_server/server.py"} == set(changed)
    for f in changed:
        py_compile.compile(str(work / f), doraise=True)
    marker = {}
    exec((work / "server/text_generation_server/_dspark.py").read_text(), marker)
    listed = [l for l in (SERIES / "series").read_text().splitlines() if l and not l.startswith("#")]
    assert marker["SERIES"] == "tgi/v3.3.7" and marker["PATCHES"] == listed


@needs_tree
def test_a_batch_whose_requests_all_stopped_is_forgotten_by_dspark(applied_tree):
    """generate_token returns no batch when every request stopped (max_new_tokens = 1, EOS at the
    first token): the router sends no FilterBatch and no decode names them again, so the patch
    has DSpark forget them there, before that return."""
    source = (applied_tree / "server/text_generation_server/models/flash_causal_lm.py").read_text()
    generate = next(n for n in ast.walk(ast.parse(source))
                    if isinstance(n, ast.FunctionDef) and n.name == "generate_token")
    stopped = [n for n in ast.walk(generate) if isinstance(n, ast.If) and ast.unparse(n.test) == "stopped"]
    assert len(stopped) == 1
    body = [ast.unparse(n) for n in stopped[0].body]
    assert body[0] == "if self.dspark is not None:\n    self.dspark.forget([r.id for r in batch.requests])", body
    assert body[-1].startswith("return (generations, None")


# Run in the TGI shard's venv: the patched server.py's own ClearCache over its own Cache, with a real
# drafter holding contexts for requests 10, 11 (batch 1), 20 (batch 2) and 30 (a failed Decode's:
# its batch left the cache); the model is a stand-in carrying only `dspark` (what ClearCache reads).
CLEAR_CACHE = """
import asyncio, os, sys
from pathlib import Path
from types import SimpleNamespace
import torch
from dspark_cli import tiny_models
from dspark_cli.engine_install import generate_stubs
from dspark_cli.integrations.tgi.draft import DSparkDraft, _top_k_bound
from dspark_cli.integrations.tgi.speculation import DSparkSpeculation
tree, draft = Path(sys.argv[1]), sys.argv[2]
generate_stubs(tree, lambda line: None)
sys.path.insert(0, str(tree / "server"))
os.environ.update(ATTENTION="paged", PREFIX_CACHING="0")  # what TGI's launcher sets
from text_generation_server.cache import Cache
from text_generation_server.pb import generate_pb2 as pb
from text_generation_server.server import TextGenerationService
spec = DSparkSpeculation(DSparkDraft.load(draft), None)
ids = [10, 11, 20, 30]
spec.draft.extend_contexts(ids, torch.randn(8, len(tiny_models.TARGET_LAYER_IDS) * tiny_models.HIDDEN),
                           torch.tensor([0, 1] * 4), [2] * 4)
cache = Cache()
for batch_id, requests in ((1, [10, 11]), (2, [20])):
    cache.set(SimpleNamespace(batch_id=batch_id, requests=[pb.Request(id=r) for r in requests]))
service = TextGenerationService(SimpleNamespace(quantize=None, dspark=spec), cache, [])
live = [sorted(spec.draft.context_kv)]
for request in (pb.ClearCacheRequest(id=1), pb.ClearCacheRequest()):
    asyncio.run(service.ClearCache(request, None))
    live.append(sorted(spec.draft.context_kv))
print(live)
"""


@needs_tree
@pytest.mark.skipif(not os.environ.get("DSPARK_TGI_SHARD_PYTHON"), reason="DSPARK_TGI_SHARD_PYTHON is not set")
def test_tgis_clear_cache_has_dspark_forget_the_requests_of_the_dropped_batches(applied_tree, checkpoints, tmp_path):
    """The router's ClearCache(id) (every request of the batch cancelled, or its Prefill/Decode
    failed) and ClearCache() drop batches no decode names again; before patch 0005 DSpark kept
    their requests' contexts (and pending drafts) until the next decode: [[10, 11, 20, 30]] * 3."""
    tree = tmp_path / "tgi"
    shutil.copytree(applied_tree / "server", tree / "server")  # stubs generated here, not in the shared tree
    shutil.copytree(applied_tree / "proto", tree / "proto")
    out = subprocess.run([os.environ["DSPARK_TGI_SHARD_PYTHON"], "-c", CLEAR_CACHE, str(tree), str(checkpoints["oracle"])],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1] == "[[10, 11, 20, 30], [20], []]"


@needs_tree
def test_verify_tgi_checks_the_installed_server_package(applied_tree, tmp_path):
    """`dspark verify tgi` finds the patched text_generation_server on the path (read from disk, not
    imported) and fails with exit 1 on an unpatched copy."""
    server = applied_tree / "server"
    run = lambda path: subprocess.run([sys.executable, "-m", "dspark_cli", "verify", "tgi", "--json"],
                                      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(path)))
    ok = run(server)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    import json
    result = json.loads(ok.stdout)
    assert result["tgi_server"]["series"] == "tgi/v3.3.7" and result["tgi_server"]["problems"] == []
    unpatched = tmp_path / "server"
    subprocess.run(["cp", "-r", str(server), str(unpatched)], check=True)
    (unpatched / "text_generation_server" / "_dspark.py").unlink()
    bad = run(unpatched)
    assert bad.returncode == 1 and "not patched" in bad.stdout + bad.stderr
    # an install of the series before the forget hook: named as a missing hook
    older = tmp_path / "older"
    subprocess.run(["cp", "-r", str(server), str(older)], check=True)
    flash = older / "text_generation_server" / "models" / "flash_causal_lm.py"
    flash.write_text(flash.read_text().replace("self.dspark.forget(", "self.dspark.drop("))
    stale = run(older)
    assert stale.returncode == 1 and "DSpark hook (self.dspark.forget() missing" in stale.stdout, stale.stdout


@pytest.mark.parametrize("damage", ["marker not Python", "marker not UTF-8", "hook file not UTF-8"])
def test_verify_tgi_reports_a_damaged_server_package(tmp_path, monkeypatch, damage):
    """A damaged install (its _dspark.py not Python or not UTF-8, a hooked file not UTF-8) is a
    problem in the report, as doctor has it: it was a ValueError or UnicodeDecodeError traceback."""
    from dspark_cli.integrations.tgi.verify import HOOKS, installed_server

    package = tmp_path / "text_generation_server"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_dspark.py").write_bytes({"marker not Python": b"SERIES = (\n", "marker not UTF-8": b"SERIES = '\xff'\n"}
                                         .get(damage, b'SERIES = "tgi/v3.3.7"\n'))
    hooked = package / next(iter(HOOKS))
    hooked.parent.mkdir(parents=True, exist_ok=True)
    hooked.write_bytes(b"\xff\xfe" if damage == "hook file not UTF-8" else b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    server = installed_server()
    assert server["installed"]
    expected = {"marker not Python": f"{package / '_dspark.py'} is not readable Python",
                "marker not UTF-8": f"{package / '_dspark.py'} is not readable Python",
                "hook file not UTF-8": f"{hooked}: unreadable ("}[damage]
    assert any(p.startswith(expected) for p in server["problems"]), server["problems"]


def test_verify_tgi_compares_the_installed_series_with_the_one_compat_yaml_names(tmp_path, monkeypatch):
    """verify tgi read the packaged patches/tgi/v3.3.7 whatever DSPARK_COMPAT named, so a team's own
    TGI series (in its own compat.yaml, which apply and doctor follow) was "not ours"."""
    import shutil

    import yaml

    from dspark_cli import compat
    from dspark_cli.integrations.tgi.verify import HOOKS, installed_server
    from dspark_cli.series import read_series

    ours = tmp_path / "team-series"
    shutil.copytree(compat.default_path().parent / "patches" / "tgi" / "v3.3.7", ours)
    (ours / "0009-team.patch").write_text((ours / read_series(ours)[0]).read_text())
    with open(ours / "series", "a") as handle:
        handle.write("0009-team.patch\n")
    config = yaml.safe_load(compat.default_path().read_text())
    config["engines"]["tgi"]["pins"]["v3.3.7"]["patches"] = str(ours)
    (tmp_path / "compat.yaml").write_text(yaml.safe_dump(config))
    package = tmp_path / "site" / "text_generation_server"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "_dspark.py").write_text(f"SERIES = 'tgi/v3.3.7'\nPATCHES = {read_series(ours)!r}\n")
    for rel, names in HOOKS.items():
        (package / rel).write_text("\n".join(names))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DSPARK_COMPAT", str(tmp_path / "compat.yaml"))
    assert installed_server()["problems"] == []
    monkeypatch.delenv("DSPARK_COMPAT")
    assert installed_server()["problems"][0].startswith("installed series tgi/v3.3.7 [")
    del config["engines"]["tgi"]  # a compat.yaml without TGI: one problem in the report (was a KeyError)
    (tmp_path / "compat.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("DSPARK_COMPAT", str(tmp_path / "compat.yaml"))
    assert installed_server()["problems"] == ["cannot tell which series is ours: unknown engine 'tgi'; compat.yaml knows: vllm"]


def test_verify_tgi_runs_on_a_cpu_build_of_torch(tmp_path):
    """The TGI checks run on the CPU: a CPU torch (this venv's, in CI) is enough, and without a
    server package on the path they still run the drafter/verifier checks and say what is missing."""
    import json

    out = subprocess.run([sys.executable, "-m", "dspark_cli", "verify", "tgi", "--json"], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] and result["tgi_server"]["installed"] is False
    assert all(check["identical"] for check in result["checks"])


def test_verify_tgi_without_transformers_is_one_line_exit_3():
    code = "import sys; sys.modules['transformers'] = None; from dspark_cli.cli import main; main()"
    out = subprocess.run([sys.executable, "-c", code, "verify", "tgi"], capture_output=True, text=True)
    assert out.returncode == 3 and out.stderr.strip() == (
        "error: dspark verify tgi needs transformers, which is not installed in this Python (pip install transformers)")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    target = tiny_models.build_target(root / "target", "successor")
    return {"target": target,
            "oracle": tiny_models.build_draft(root / "oracle", gamma=3, kind="oracle", target=target),
            "partial": tiny_models.build_draft(root / "partial", gamma=3, kind="partial", target=target),
            "random": tiny_models.build_draft(root / "random", gamma=3, kind="random", seed=5)}


def test_released_format_loads_and_the_oracle_markov_head_drafts_the_successors(checkpoints):
    draft = DSparkDraft.load(checkpoints["oracle"])
    assert draft.config.block_size == 3 and draft.config.target_layer_ids == tiny_models.TARGET_LAYER_IDS
    feats = torch.randn(5, len(tiny_models.TARGET_LAYER_IDS) * tiny_models.HIDDEN)
    draft.extend_context(7, feats, torch.arange(5))
    assert draft.context_kv.length(7) == 5 and draft.context_kv.committed(7, 0)[0].shape[0] == 5
    prop = draft.propose([7], torch.tensor([41]), [5], torch.zeros(1))
    assert prop.draft.tokens.tolist() == [[42, 43, 44]]
    assert torch.all(prop.confidence > 0.99) and prop.survival.shape == (1, 3)


def test_block_attention_sees_the_context(checkpoints):
    draft = DSparkDraft.load(checkpoints["random"])
    feats = torch.randn(4, len(tiny_models.TARGET_LAYER_IDS) * tiny_models.HIDDEN)
    draft.extend_context(1, feats, torch.arange(4))
    draft.extend_context(2, feats * 3, torch.arange(4))
    h1, h2 = draft.hidden_block(1, 9, 4), draft.hidden_block(2, 9, 4)
    assert h1.shape == (3, tiny_models.HIDDEN) and not torch.allclose(h1, h2)


@pytest.mark.parametrize("kind", ["oracle", "partial", "random"])
def test_greedy_output_is_identical_to_no_speculation(checkpoints, kind):
    target = tiny_models.load_transformers(checkpoints["target"])
    spec = DSparkSpeculation.for_target(target, DSparkDraft.load(checkpoints[kind]), scheduler="off")
    prompt = [3, 17, 99]
    out, accepted, rounds = generate(target, spec, prompt, steps=24)
    assert out == greedy_reference(target, prompt, 24) == tiny_models.successor_tokens(prompt, 24)
    mean_len = len(out) / rounds
    if kind == "oracle":  # every draft accepted: γ + 1 tokens per round after prefill
        assert accepted == 3 * (rounds - 1) and mean_len > 3.0
    elif kind == "partial":
        assert 0 < accepted < 3 * (rounds - 1)


def test_scheduler_narrows_the_verified_width_under_a_steep_sps_table(checkpoints):
    """A steep SPS table makes the scheduler hand the target fewer drafts (the loop, like TGI, runs
    1 + width rows); output stays identical."""
    target = tiny_models.load_transformers(checkpoints["target"])
    steep = SPSTable([1, 2, 4, 8], [100.0, 60.0, 20.0, 1.0])  # one request: verifying 3 drafts costs 5x
    spec = DSparkSpeculation.for_target(target, DSparkDraft.load(checkpoints["oracle"]), "exact", steep)
    out, accepted, rounds = generate(target, spec, [5, 6], steps=12)
    assert out == tiny_models.successor_tokens([5, 6], 12)
    assert 0 < spec.stats["verified"] < 3 * (rounds - 1) and accepted == spec.stats["verified"]  # oracle: all pass


def test_uniform_verify_length_grows_while_theta_improves_for_the_batch():
    a = torch.tensor([[0.9, 0.5], [0.8, 0.1]])
    sps = SPSTable([2, 4, 6], [100.0, 80.0, 40.0])
    # Θ(0) = 2·100 = 200, Θ(1) = (2 + 1.7)·80 = 296, Θ(2) = (2 + 1.7 + 0.6)·40 = 172
    assert uniform_verify_length(a, sps) == 1
    assert uniform_verify_length(a, SPSTable([2, 6], [100.0, 100.0])) == 2  # flat: verify everything
    assert uniform_verify_length(torch.zeros(2, 2), SPSTable([2, 6], [100.0, 100.0])) == 0  # ties: fewer rows
    # Θ(2) = 64 + 32e-8 > Θ(1) = 64 on a flat table: in fp32 Θ stayed 64 and the batch stopped at 1
    assert uniform_verify_length(torch.tensor([[1.0, 1e-8]] * 32), SPSTable([1, 128], [1.0, 1.0])) == 2


def test_uniform_verify_length_does_not_look_at_the_survival_of_drafts_it_leaves_out():
    """Non-anticipation (DSPARK.md, Appendix A): the width L may depend on a[:, :L + 1] only (the
    survival up to the first draft left out, which the drafts before it determine). Survival past
    it depends on that draft's own value, so looking there — the argmax over all widths did — makes
    verification lossy: with SPS (1, .5, .45), a = [.8, .72] (draft 1 = A) gave L = 2 and
    a = [.8, 0] (draft 1 = B) L = 0, so A survived with probability .85 instead of .70."""
    sps = SPSTable([1, 2, 3], [1.0, 0.5, 0.45])
    assert uniform_verify_length(torch.tensor([[0.8, 0.72]]), sps) == 0
    assert uniform_verify_length(torch.tensor([[0.8, 0.0]]), sps) == 0
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        R, gamma = int(torch.randint(1, 5, (1,), generator=g)), 7
        a = torch.rand(R, gamma, generator=g).cumprod(1)
        table = SPSTable(list(range(1, R * (gamma + 1) + 1)),
                         torch.rand(R * (gamma + 1), generator=g).add(0.2).cumsum(0).flip(0).tolist())
        L = uniform_verify_length(a, table)
        later = a.clone()
        later[:, L + 1:] = torch.rand(R, gamma - L - 1, generator=g) if L + 1 < gamma else later[:, L + 1:]
        assert uniform_verify_length(later, table) == L


def test_arriving_request_drops_state_left_under_its_id(checkpoints):
    target = tiny_models.load_transformers(checkpoints["target"])
    spec = DSparkSpeculation.for_target(target, DSparkDraft.load(checkpoints["oracle"]), "off")
    feats = torch.randn(64, len(tiny_models.TARGET_LAYER_IDS) * tiny_models.HIDDEN)
    spec.draft.extend_context(0, feats, torch.arange(64))  # TGI's warmup requests are all id 0
    spec.propose([0], torch.tensor([5]), [64], torch.zeros(1))
    spec.forget([0])
    assert 0 not in spec.draft.context_kv and 0 not in spec.pending


def test_concatenated_batches_of_different_widths_pad_to_the_widest():
    class Batch:
        def __init__(self, ids):
            self.speculative_ids = ids

    batches = [Batch(torch.tensor([[4, 5]])), Batch(torch.tensor([[7], [8]])), Batch(torch.zeros(1, 0, dtype=torch.int64))]
    pad_drafts(batches)
    assert [b.speculative_ids.tolist() for b in batches] == [[[4, 5]], [[7, 0], [8, 0]], [[0, 0]]]


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_sampled_tokens_follow_the_target_distribution(device, seeded):
    """Losslessness at T > 0 through our verify path: many requests, one round, drafts from the real
    drafter (Markov chain, its corrected q) and a different target distribution p_j at each verify
    row j; the k-th emitted token of a request follows p_{k-1} (χ², fixed seeds) — a row
    misalignment or an uncorrected q would skew position 2. Seeded (TGI's per-request seeds, as
    hooks.choose passes them): on the GPU with our extension built, our chain and our rejection op,
    which rebuilds the rejected rows; else the shard generator's noise through the torch reference."""
    g = torch.Generator().manual_seed(0)
    V, B, S = tiny_models.VOCAB, 3000, 4
    support = torch.arange(0, V, V // 8)[:8]
    p_logits = torch.full((S, V), -1e9)
    p_logits[:, support] = torch.randn(S, 8, generator=g)
    p = torch.softmax(p_logits, -1)

    cpu_draft = _random_draft_with_q_on_the_support(support, V, g)
    draft = DSparkDraft(cpu_draft.config, {k: v.to(device) for k, v in cpu_draft.w.items()})
    spec = DSparkSpeculation(draft, None, scheduler="off", seed=1)
    ids = list(range(B))
    for r in ids:
        draft.extend_context(r, torch.zeros(0, 1, device=device), torch.zeros(0, device=device))
    seeds = (lambda offset: torch.arange(B, device=device) * 3 + offset) if seeded else (lambda offset: None)
    spec.propose(ids, torch.randint(0, V, (B,), generator=g).to(device), [0] * B, torch.ones(B), seeds=seeds(1))
    if seeded and device == "cuda":
        from dspark_cli.runtime import cuda_ops

        ours = cuda_ops.available(torch.zeros(1, device=device))
        assert (spec.pending[0].draft.source.row_stats is not None) == ours  # our chain drafted it
    logprobs = torch.log_softmax(p_logits.expand(B, S, V).to(device), -1)  # what hooks.choose passes
    tokens, n_acc = spec.verify(ids, logprobs, torch.zeros(B, dtype=torch.bool, device=device), seeds(2))
    for k in range(2):  # position 3 is reached by too few requests for a χ² with 8 cells
        emitted = torch.tensor([t[k] for t in tokens if len(t) > k])
        assert len(emitted) >= 200, f"too few requests reached position {k + 1}"
        assert chi2_pvalue(emitted, p[k]) > 0.01, k  # and nothing outside p's support
    assert 0 < sum(n_acc) < 3 * B  # drafts were really tested, some accepted, some not


def test_batch_merged_from_two_draft_steps_verifies_each_request_as_alone():
    """TGI filters and concatenates batches between draft and verify: a batch of requests drafted in
    two steps, reordered, one finished, verifies each request as verifying it alone does (seeded
    noise is per request), and the drafts were kept lazily (no q [R, γ, V] between steps)."""
    g = torch.Generator().manual_seed(4)
    V = tiny_models.VOCAB
    spec = DSparkSpeculation(_random_draft_with_q_on_the_support(torch.arange(0, V, 4)[:16], V, g), None, "off")
    for r in range(5):
        spec.draft.extend_context(r, torch.zeros(0, 1), torch.zeros(0))
    spec.propose([0, 1, 2], torch.tensor([3, 9, 40]), [0, 0, 0], torch.tensor([1.0, 0.0, 0.7]),
                 seeds=torch.tensor([5, 6, 7]))
    spec.propose([3, 4], torch.tensor([12, 60]), [0, 0], torch.ones(2), seeds=torch.tensor([8, 9]))
    assert all(p.draft.q is None and p.draft.source is not None for p in spec.pending.values())
    order = [4, 0, 2, 3]  # request 1 finished; the older batch concatenated after the newer one
    greedy = torch.tensor([False, False, False, False])
    logits = 2 * torch.randn(len(order), 4, V, generator=g)
    logits[:, :, torch.arange(0, V, 4)[:16]] += 4  # mass where the drafts put theirs: some accepted
    logprobs = torch.log_softmax(logits, -1)
    seeds = torch.tensor([31, 32, 33, 34])
    together, n_together = spec.verify(order, logprobs, greedy, seeds)
    alone = [spec.verify([r], logprobs[i:i + 1], greedy[i:i + 1], seeds[i:i + 1]) for i, r in enumerate(order)]
    assert together == [t[0][0] for t in alone] and n_together == [t[1][0] for t in alone]
    assert 0 < sum(n_together) < 3 * len(order)


def test_seeded_decode_step_draws_what_rejection_sample_draws_at_ell_0():
    """A step without drafts samples as rejection_sample does with ℓ = 0 (same seeds, same token)."""
    from dspark_cli.runtime import rejection_sample

    g = torch.Generator().manual_seed(3)
    V, B = tiny_models.VOCAB, 32
    spec = DSparkSpeculation(_random_draft_with_q_on_the_support(torch.arange(8), V, g), None, scheduler="off")
    logprobs = torch.log_softmax(3 * torch.randn(B, 1, V, generator=g), -1)
    seeds = torch.arange(B) * 101 + 7
    tokens, n_acc = spec.verify(list(range(B)), logprobs, torch.zeros(B, dtype=torch.bool), seeds)
    p = logprobs.exp()
    zeros = torch.zeros(B, 1, dtype=torch.int64)
    ref = rejection_sample(torch.cat([p, p], 1), (zeros, torch.ones(B, 1), p), zeros[:, 0], seeds=seeds)
    assert tokens == [[t] for t in ref.output_tokens[:, 0].tolist()] and n_acc == [0] * B


def _random_draft_with_q_on_the_support(support, V, g):
    """A real DSparkDraft whose base logits favour p's support (so acceptance is neither 0 nor 1)."""
    from dspark_cli.integrations.tgi.draft import DraftConfig

    d = 16
    cfg = DraftConfig(hidden_size=d, num_heads=2, num_kv_heads=1, head_dim=8, num_layers=1, block_size=3,
                      mask_token_id=V - 1, target_layer_ids=[0], rope_theta=1e4, rms_norm_eps=1e-6)
    w = {"embed_tokens.weight": torch.randn(V, d, generator=g), "fc.weight": torch.randn(d, 1, generator=g),
         "hidden_norm.weight": torch.ones(d), "norm.weight": torch.ones(d),
         "markov_head.markov_w1.weight": torch.randn(V, 4, generator=g) * 0.1,
         "markov_head.markov_w2.weight": torch.randn(V, 4, generator=g) * 0.1}
    head = torch.randn(V, d, generator=g) * 0.01
    head[support] += torch.randn(len(support), d, generator=g)
    w["lm_head.weight"] = head * 3
    w.update(tiny_models.layer_tensors("layers.0", g, 0.1, hidden=d, head_dim=8))
    return DSparkDraft(cfg, w)


def test_the_host_side_top_k_bound_counts_the_rows_that_sample():
    """TGI's warps reach the drafter on the host: the bound the CUDA chain skips work with is the
    largest top-k of the sampled rows, a row without top-k (0) counting as the vocabulary."""
    assert _top_k_bound(torch.tensor([20, 50, 7]), torch.tensor([1.0, 0.0, 0.5]), 100) == 20  # greedy 50 left out
    assert _top_k_bound(torch.tensor([0, 20, 7]), torch.tensor([0.7, 1.0, 0.5]), 100) == 100
    assert _top_k_bound(torch.tensor([20, 150]), torch.tensor([1.0, 1.0]), 100) == 100
    assert _top_k_bound(torch.tensor([20, 50]), torch.tensor([0.0, 0.0]), 100) is None
    assert _top_k_bound(None, torch.tensor([1.0]), 100) is None


def test_layer_output_sums_tgi_deferred_residual():
    h, r = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert torch.equal(layer_output((h, r)), torch.full((2, 3), 3.0))
    assert torch.equal(layer_output((h, None)), h) and torch.equal(layer_output(h), h)
    assert torch.equal(layer_output((h, torch.ones(1, 2, 2))), h)  # (hidden, attention weights)


def test_tensor_parallel_vision_language_and_attention_backends_are_refused_at_attach(checkpoints, monkeypatch):
    """maybe_attach refuses, with one error before anything loads, a shard of a tensor-parallel
    model (the drafter is not sharded), a target whose config has a vision_config (the capture
    could hook the vision tower's layers) and TGI's attention backends that cannot verify drafts
    (flashinfer, TGI's default on CUDA for most models; flashdecoding-ipex); a single-shard text
    model on flashdecoding or paged attention attaches."""
    from dspark_cli.integrations.tgi.hooks import maybe_attach

    monkeypatch.setenv("DSPARK_DRAFT", str(checkpoints["oracle"]))
    target = tiny_models.load_transformers(checkpoints["target"])
    with pytest.raises(RuntimeError, match=r"tensor parallelism is not supported \(this shard is one of 2\)"):
        maybe_attach(SimpleNamespace(world_size=2, speculate=3, config=target.config, model=target))
    vlm = SimpleNamespace(world_size=1, speculate=3, config=SimpleNamespace(vision_config={"hidden_size": 8}),
                          model=target)
    with pytest.raises(RuntimeError, match="vision-language targets are not supported"):
        maybe_attach(vlm)
    target.config.vision_config = {"hidden_size": 8}  # on the inner model's config (transformers backend)
    with pytest.raises(RuntimeError, match="vision-language"):
        maybe_attach(SimpleNamespace(world_size=1, speculate=3, model=target))
    del target.config.vision_config
    text_model = SimpleNamespace(world_size=1, speculate=3, config=target.config, model=target)
    for backend in ("flashinfer", "flashdecoding-ipex"):
        monkeypatch.setenv("ATTENTION", backend)
        with pytest.raises(RuntimeError, match=f"ATTENTION={backend} .*; serve with ATTENTION=flashdecoding"):
            maybe_attach(text_model)
    for backend in ("flashdecoding", "paged"):
        monkeypatch.setenv("ATTENTION", backend)
        assert isinstance(maybe_attach(text_model), DSparkSpeculation)
    monkeypatch.delenv("ATTENTION")
    spec = maybe_attach(text_model)
    assert isinstance(spec, DSparkSpeculation)
    monkeypatch.delenv("DSPARK_DRAFT")
    assert maybe_attach(SimpleNamespace(world_size=4, model=target)) is None  # DSpark off: nothing checked


def _rewritten(src: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint src whose tensors edit(tensors) changed in place."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = tiny_models.read_weights(src)
    edit(tensors)
    tiny_models.write_weights(dst, tensors)
    return dst


def test_a_drafter_of_another_vocabulary_is_refused_at_attach(checkpoints, monkeypatch, tmp_path):
    """A drafter whose logits are wider than the target's (V = 300 against 256) is a valid
    checkpoint, but not for this target: maybe_attach refuses it at startup with both sizes, for a
    flash model's config and for the transformers backend's (the inner model's), before any hook."""
    from dspark_cli.integrations.tgi.hooks import maybe_attach

    def widen(w):
        for n in ("embed_tokens.weight", "lm_head.weight", "markov_head.markov_w1.weight",
                  "markov_head.markov_w2.weight"):
            w[n] = torch.cat([w[n], w[n][:44]])

    wide = _rewritten(checkpoints["random"], tmp_path / "wide", widen)
    assert DSparkDraft.load(wide).w["lm_head.weight"].shape[0] == 300
    monkeypatch.setenv("DSPARK_DRAFT", str(wide))
    target = tiny_models.load_transformers(checkpoints["target"])
    message = (rf"DSpark \(DSPARK_DRAFT={wide}\): the drafter's vocabulary has 300 tokens, the target's 256; "
               "a DSpark drafter serves the target it was trained for")
    for flash_model in (SimpleNamespace(world_size=1, speculate=3, config=target.config, model=target),
                        SimpleNamespace(world_size=1, speculate=3, model=target)):
        with pytest.raises(RuntimeError, match=f"^{message}$"):
            maybe_attach(flash_model)
    assert all(not layer._forward_hooks for layer in target.model.layers)  # nothing was attached


def test_a_checkpoint_with_nan_or_inf_is_refused_at_load_naming_the_tensor(checkpoints, tmp_path):
    """DSparkDraft.load checks every tensor once, as cast to the drafter's dtype: a NaN in the
    Markov head, an inf in a layer, and a value beyond fp16's range loaded as fp16 are refused
    with the tensor's name; the checkpoint they came from loads."""
    src = checkpoints["oracle"]
    DSparkDraft.load(src)
    cases = {"markov_head.markov_w2.weight": float("nan"), "markov_head.markov_w1.weight": float("inf"),
             "layers.0.mlp.down_proj.weight": -float("inf")}
    for name, value in cases.items():
        def poison(w, name=name, value=value):
            w[name][3, 5] = value
        bad = _rewritten(src, tmp_path / name, poison)
        with pytest.raises(ValueError, match=rf"^{bad}: NaN or infinite values in {name} \(as torch.float32\); "):
            DSparkDraft.load(bad)

    def large(w):
        w["fc.weight"][0, 0] = 1e6
    big = _rewritten(src, tmp_path / "big", large)
    assert DSparkDraft.load(big).w["fc.weight"][0, 0] == 1e6
    with pytest.raises(ValueError, match=r"NaN or infinite values in fc.weight \(as torch.float16\)"):
        DSparkDraft.load(big, dtype=torch.float16)


def test_speculate_0_leaves_dspark_off_with_one_warning(checkpoints, monkeypatch, caplog):
    """--speculate 0 with DSPARK_DRAFT set (TGI's Model.speculate is 0): nothing is loaded or
    hooked, TGI chooses as without DSpark, and one warning says why (the real shard:
    tests/test_tgi_shard.py)."""
    import logging

    from dspark_cli.integrations.tgi.hooks import maybe_attach

    monkeypatch.setenv("DSPARK_DRAFT", str(checkpoints["oracle"]))
    target = tiny_models.load_transformers(checkpoints["target"])
    with caplog.at_level(logging.WARNING):
        assert maybe_attach(SimpleNamespace(world_size=1, speculate=0, config=target.config, model=target)) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"DSpark: DSPARK_DRAFT={checkpoints['oracle']} is ignored: --speculate is 0 (speculation off)"]
    assert all(not layer._forward_hooks for layer in target.model.layers)


@pytest.mark.parametrize("stored", [torch.int8, torch.float8_e4m3fn])
def test_the_drafter_runs_in_the_declared_dtype_else_the_first_compute_parameters(checkpoints, monkeypatch, stored):
    """A quantized target's first parameter may be int8 (bitsandbytes) or fp8 storage: the drafter
    takes the dtype and device TGI declares for the model (Model.dtype/.device), else those of
    the target's first fp32/fp16/bf16 parameter, and drafts: greedy output as without speculation."""
    from dspark_cli.integrations.tgi.hooks import maybe_attach

    monkeypatch.setenv("DSPARK_DRAFT", str(checkpoints["partial"]))
    target = tiny_models.load_transformers(checkpoints["target"])
    # a quantizer's stored tensor on the root module: the first of target.parameters(), unused by the forward
    target.register_parameter("qzeros", torch.nn.Parameter(torch.zeros(8, dtype=stored), requires_grad=False))
    assert next(target.parameters()).dtype == stored
    spec = maybe_attach(SimpleNamespace(world_size=1, speculate=3, config=target.config, model=target))
    assert {t.dtype for t in spec.draft.w.values()} == {torch.float32}
    out, accepted, _ = generate(target, spec, [3, 17, 99], steps=12)
    assert out == tiny_models.successor_tokens([3, 17, 99], 12) and accepted > 0
    declared = maybe_attach(SimpleNamespace(world_size=1, speculate=3, config=target.config, model=target,
                                            dtype=torch.bfloat16, device=torch.device("cpu")))
    assert {(t.dtype, t.device.type) for t in declared.draft.w.values()} == {(torch.bfloat16, "cpu")}


def _reference_block(draft, feats, positions, anchor, anchor_pos):
    """The drafter's block forward for one request as first written: the context K/V projected
    from its features in one piece, the block's K/V concatenated after them, K/V heads repeated
    for grouped-query attention, SDPA without a mask."""
    import torch.nn.functional as F
    from dspark_cli.integrations.tgi.draft import _rms, _rope, _rope_tables

    c, w = draft.config, draft.w
    ctx = _rms(feats @ w["fc.weight"].T, w["hidden_norm.weight"], c.rms_norm_eps)
    ids = torch.tensor([anchor] + [c.mask_token_id] * (c.block_size - 1))
    pos = torch.arange(anchor_pos, anchor_pos + c.block_size)
    x = w["embed_tokens.weight"][ids]
    groups = c.num_heads // c.num_kv_heads
    for i in range(c.num_layers):
        p = f"layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], c.rms_norm_eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(-1, c.num_heads, c.head_dim)
        q = _rope(_rms(q, w[p + "self_attn.q_norm.weight"], c.rms_norm_eps), _rope_tables(pos, c.head_dim, c.rope_theta))
        k_ctx, v_ctx = draft._project_kv(i, ctx, _rope_tables(positions, c.head_dim, c.rope_theta))
        k_blk, v_blk = draft._project_kv(i, h, _rope_tables(pos, c.head_dim, c.rope_theta))
        k = torch.cat([k_ctx, k_blk]).repeat_interleave(groups, dim=1)
        v = torch.cat([v_ctx, v_blk]).repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
        x = x + o.transpose(0, 1).reshape(c.block_size, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        x = x + (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) \
            @ w[p + "mlp.down_proj.weight"].T
    return _rms(x, w["norm.weight"], c.rms_norm_eps)


def test_batched_block_forward_over_growing_buffers_matches_the_per_request_forward(checkpoints):
    """The hot path: requests' committed rows projected together (extend_contexts), their blocks
    through the dense layers together (hidden_blocks), K/V in pool pages, one masked
    attention call over the padded contexts with grouped-query heads folded into query rows — equal
    to each request's block computed alone from its whole context, after many small commits and an
    empty context."""
    g = torch.Generator().manual_seed(11)
    draft = DSparkDraft.load(checkpoints["random"])
    assert draft.config.num_heads != draft.config.num_kv_heads  # grouped-query attention exercised
    width = len(tiny_models.TARGET_LAYER_IDS) * tiny_models.HIDDEN
    lengths = {1: 0, 2: 3, 3: 41}
    feats = {r: torch.randn(n, width, generator=g) for r, n in lengths.items()}
    places = set()
    for step in range(41):  # one row a step for each request that still has some, in one call
        todo = [(r, f[step:step + 1]) for r, f in feats.items() if step < len(f)]
        draft.extend_contexts([r for r, _ in todo], torch.cat([f for _, f in todo]),
                              torch.cat([torch.tensor([step]) for _ in todo]), [1] * len(todo))
        places.add(draft.context_kv.k.data_ptr())
    assert len(places) == 1  # pages: the rows stay where they were written
    draft.extend_contexts([1], torch.zeros(0, width), torch.zeros(0, dtype=torch.int64), [0])
    assert [draft.context_kv.length(r) for r in lengths] == [0, 3, 41]
    anchors, positions = torch.tensor([5, 9, 200]), [0, 3, 41]
    h = draft.hidden_blocks(list(lengths), anchors, positions)
    for i, (r, n) in enumerate(lengths.items()):
        ref = _reference_block(draft, feats[r], torch.arange(n), int(anchors[i]), positions[i])
        assert torch.allclose(h[i], ref, atol=1e-5, rtol=1e-4), r
    again = draft.hidden_blocks(list(lengths), anchors, positions)  # a block forward commits nothing
    assert torch.equal(again, h) and [draft.context_kv.length(r) for r in lengths] == [0, 3, 41]


def test_block_attention_in_length_chunks_equals_one_call(checkpoints, monkeypatch):
    """Requests sorted by context length and cut into chunks under the key budget (here one request
    or two per chunk) attend as in one batched call; a chunk never splits a request."""
    from dspark_cli.integrations.tgi import draft as draft_module

    g = torch.Generator().manual_seed(12)
    draft = DSparkDraft.load(checkpoints["random"])
    width = len(tiny_models.TARGET_LAYER_IDS) * tiny_models.HIDDEN
    lengths = [30, 0, 5, 12, 29]
    for r, n in enumerate(lengths):
        draft.extend_context(r, torch.randn(n, width, generator=g), torch.arange(n))
    anchors = torch.tensor([1, 2, 3, 4, 5])
    whole = draft.hidden_blocks(list(range(5)), anchors, lengths)
    gamma = draft.config.block_size
    monkeypatch.setattr(draft_module, "ATTENTION_CHUNK_KEYS", 2 * (12 + gamma))
    assert draft_module._chunks_by_length(lengths, gamma) == [[1, 2], [3], [4], [0]]
    assert torch.allclose(draft.hidden_blocks(list(range(5)), anchors, lengths), whole, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drafter_replayed_from_cuda_graphs_matches_the_eager_one(checkpoints, dtype, monkeypatch):
    """The drafter's static-shape work replayed from CUDA graphs (draft_graphs.py) gives the eager
    results: the block forward's hidden states for batch sizes padded to a graph size (3 → 4,
    9 → 16) and exact ones, one size replayed after another ran, contexts growing between replays
    (the attention between the graphs is eager and sees them), a batch whose attention takes several
    length chunks (writing the graphs' input buffer by row index), a batch over the largest graph
    size eager; and the context K/V of commits projected by graphs (R rows a step) or eagerly (the first,
    over the largest commit size). The two drafters share weights and receive the same commits."""
    from dspark_cli.integrations.tgi import draft as draft_module
    from dspark_cli.integrations.tgi import draft_graphs

    g = torch.Generator().manual_seed(21)
    base = DSparkDraft.load(checkpoints["random"])
    w = {k: v.to("cuda", dtype) for k, v in base.w.items()}
    eager, graphed = DSparkDraft(base.config, w, cuda_graphs=False), DSparkDraft(base.config, w, cuda_graphs=True)
    assert eager.graphs is None and graphed.graphs is not None
    width = len(tiny_models.TARGET_LAYER_IDS) * tiny_models.HIDDEN
    V, top = base.w["lm_head.weight"].shape[0], draft_graphs.BLOCK_BATCH_SIZES[-1]
    lengths = torch.randint(0, 40, (top + 3,), generator=g).tolist()
    assert sum(lengths) > draft_graphs.COMMIT_ROWS[-1]
    feats = torch.randn(sum(lengths), width, generator=g).to("cuda", dtype)
    for draft in (eager, graphed):
        draft.extend_contexts(list(range(len(lengths))), feats, torch.cat([torch.arange(n) for n in lengths]).cuda(),
                              lengths)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    budget = draft_module.ATTENTION_CHUNK_KEYS
    for step, R in enumerate([3, 16, 3, 9, 1, top + 3]):
        ids = torch.randperm(len(lengths), generator=g)[:R].tolist()
        anchors = torch.randint(0, V, (R,), generator=g).cuda()
        positions = [lengths[r] + step for r in ids]
        # R = 9: several chunks (two requests of the longest contexts each; contexts are under 60 rows)
        monkeypatch.setattr(draft_module, "ATTENTION_CHUNK_KEYS", 2 * (60 + base.config.block_size) if R == 9 else budget)
        if R == 9:
            assert len(draft_module._chunks_by_length([lengths[r] for r in ids], base.config.block_size)) >= 2
        want = eager.hidden_blocks(ids, anchors, positions)
        got = graphed.hidden_blocks(ids, anchors, positions)
        assert got.shape == want.shape and torch.allclose(got.float(), want.float(), **tol), (R, (got - want).abs().max())
        rows = torch.randn(R, width, generator=g).to("cuda", dtype)  # one more committed row each
        for draft in (eager, graphed):
            draft.extend_contexts(ids, rows, torch.tensor(positions).cuda(), [1] * R)
        for r in ids:
            lengths[r] += 1
    assert sorted(graphed.graphs.blocks) == [1, 4, 16]  # top + 3 ran eagerly
    assert sorted(graphed.graphs.commits) == [1, 4, 16, 512]
    for r, n in enumerate(lengths):
        for layer in range(base.config.num_layers):
            for want, got in zip(eager.context_kv.committed(r, layer), graphed.context_kv.committed(r, layer)):
                assert got.shape[0] == n and torch.allclose(got.float(), want.float(), **tol), (r, layer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graphs_captured_ahead_serve_every_size_without_another_capture(checkpoints):
    """What TGI's model load does (hooks.maybe_attach → capture_all): every block batch size and
    commit row count captured up front; later steps replay them (no new capture) and match eager."""
    from dspark_cli.integrations.tgi import draft_graphs

    g = torch.Generator().manual_seed(22)
    base = DSparkDraft.load(checkpoints["random"])
    w = {k: v.to("cuda", torch.bfloat16) for k, v in base.w.items()}
    eager, graphed = DSparkDraft(base.config, w, cuda_graphs=False), DSparkDraft(base.config, w, cuda_graphs=True)
    graphed.graphs.capture_all()

    def captured():
        return {k: id(v) for k, v in graphed.graphs.blocks.items()}, {k: id(v) for k, v in graphed.graphs.commits.items()}

    before = captured()
    assert sorted(before[0]) == list(draft_graphs.BLOCK_BATCH_SIZES)
    assert sorted(before[1]) == list(draft_graphs.COMMIT_ROWS)
    width = len(tiny_models.TARGET_LAYER_IDS) * tiny_models.HIDDEN
    lengths = [5, 0, 17, 9, 30]
    feats = torch.randn(sum(lengths), width, generator=g).to("cuda", torch.bfloat16)
    positions = torch.cat([torch.arange(n) for n in lengths]).cuda()
    for draft in (eager, graphed):
        draft.extend_contexts(list(range(5)), feats, positions, lengths)
    anchors = torch.randint(0, base.w["lm_head.weight"].shape[0], (5,), generator=g).cuda()
    want = eager.hidden_blocks(list(range(5)), anchors, lengths)
    got = graphed.hidden_blocks(list(range(5)), anchors, lengths)
    assert torch.allclose(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    for r in (0, 2, 3, 4):  # request 1 has no rows
        for want, got in zip(eager.context_kv.committed(r, 0), graphed.context_kv.committed(r, 0)):
            assert torch.allclose(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    assert captured() == before  # nothing captured again


def assert_pages_accounted(pool) -> None:
    """Every page but the zero page is held by exactly one request or free; each request holds the
    pages its rows need and a slot of its own, and its row of the device table names its pages."""
    from dspark_cli.integrations.tgi.kv_pool import PAGE_ROWS

    held = [p for r in pool for p in pool.pages[r]]
    assert sorted(held + pool.free) == list(range(1, pool.k.shape[1] // PAGE_ROWS))
    assert all(len(pool.pages[r]) == -(-pool.length(r) // PAGE_ROWS) for r in pool)
    slots = [pool.slots[r] for r in pool if pool.pages[r]]
    assert 0 not in slots and len(set(slots)) == len(slots) and not set(slots) & set(pool.free_slots)
    for r in pool:
        assert pool.table[pool.slots[r], :len(pool.pages[r])].tolist() == pool.pages[r]


def test_reserving_an_emptied_pool_frees_the_old_tensors_before_making_the_new(monkeypatch):
    """TGI reserves the pool after warmup, whose requests are gone by then: the warmup pool's tensors
    stayed alive while the reserved ones were made, both at once at the peak of startup memory."""
    import weakref

    from dspark_cli.integrations.tgi.kv_pool import PAGE_ROWS, KVPool

    pool = KVPool(2)
    pool.commit([7], [3 * PAGE_ROWS], torch.randn(2, 3 * PAGE_ROWS, 1, 4), torch.randn(2, 3 * PAGE_ROWS, 1, 4))
    pool.drop(7)
    old_k, old_v = weakref.ref(pool.k), weakref.ref(pool.v)
    alive_at_allocation = []
    new_empty = torch.Tensor.new_empty

    def spy(self, *args, **kwargs):
        alive_at_allocation.append(old_k() is not None or old_v() is not None)
        return new_empty(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_empty", spy)
    pool.reserve(10 * PAGE_ROWS, torch.empty(0, 1, 4))
    assert alive_at_allocation == [False, False] and pool.k.shape[1] == 11 * PAGE_ROWS


@pytest.mark.parametrize("reserve", [None, 1000, 4000], ids=["unreserved", "reserved-short", "reserved"])
def test_context_pool_keeps_every_requests_rows_through_growth_and_drops(reserve):
    """The drafter's paged K/V pool under a random sequence of batched commits (1 to 40 rows, new
    and growing requests) and drops: each live request's committed rows are exactly what was
    committed for it, in order; the zero page stays zero; the page table and the padded index read
    a request's rows (then its last one again). Reserved after the fifth step (as TGI's warmup
    does): the tensors stay until the live pages alone outgrow them (1000 rows: they do; 4000:
    never, the live rows peak at 3231)."""
    from dspark_cli.integrations.tgi.kv_pool import MIN_PAGES, PAGE_ROWS, KVPool

    g = torch.Generator().manual_seed(13)
    pool, layers = KVPool(2), 2
    expected: dict[int, list[torch.Tensor]] = {}
    next_id, peak_pages = 0, 0
    for step in range(60):
        if step == 5 and reserve:
            pool.reserve(reserve, torch.empty(0, 3, 4))
            assert pool.k.shape[1] == pool.reserved + PAGE_ROWS and pool.reserved == -(-reserve // PAGE_ROWS) * PAGE_ROWS
        tensor, outgrown, held = pool.k, pool.outgrown, pool.reserved
        if expected and torch.rand(1, generator=g) < 0.2:
            gone = list(expected)[int(torch.randint(len(expected), (1,), generator=g))]
            pool.drop(gone)
            del expected[gone]
        ids = [r for r in expected if torch.rand(1, generator=g) < 0.7]
        if torch.rand(1, generator=g) < 0.5:
            ids.append(next_id)
            next_id += 1
        counts = [int(torch.randint(0, 41, (1,), generator=g)) for _ in ids]
        rows = torch.randn(layers, 2, sum(counts), 3, 4, generator=g)  # [layer, k/v, rows, kv heads, dim]
        pool.commit(ids, counts, rows[:, 0], rows[:, 1])
        start = 0
        for r, n in zip(ids, counts):
            expected.setdefault(r, []).append(rows[:, :, start:start + n])
            start += n
        for r, parts in expected.items():
            want = torch.cat(parts, 2)
            for i in range(layers):
                k, v = pool.committed(r, i) if pool.length(r) else (want[i, 0], want[i, 1])
                assert torch.equal(k, want[i, 0]) and torch.equal(v, want[i, 1]), (step, r)
        if pool.k is not None:
            assert not pool.k[:, :PAGE_ROWS].any() and not pool.v[:, :PAGE_ROWS].any(), step
            assert_pages_accounted(pool)
        live = sum(pool.length(r) for r in expected)
        peak_pages = max(peak_pages, sum(len(pool.pages[r]) for r in pool))
        if pool.reserved:
            assert pool.k.shape[1] == pool.reserved + PAGE_ROWS and pool.reserved >= live
            assert (pool.k is tensor) == (pool.outgrown == outgrown), step  # new tensors only when outgrown
            pages_live = sum(len(pool.pages[r]) for r in pool) * PAGE_ROWS
            assert pool.outgrown == outgrown or pages_live > held  # only when the live pages alone are more
        else:
            assert pool.k is None or pool.k.shape[1] <= max(2 * (peak_pages + 1), MIN_PAGES) * PAGE_ROWS, step
    assert (pool.outgrown > 0) == (reserve == 1000)
    r = next(r for r in expected if pool.length(r) > PAGE_ROWS)
    n, want = pool.length(r), torch.cat(expected[r], 2)
    idx = pool.padded_index([r, next_id + 99], n + 3, "cpu")
    assert torch.equal(pool.k[1][idx[0]], torch.cat([want[1, 0], want[1, 0, -1:].expand(3, -1, -1)]))
    assert idx[1].tolist() == [0] * (n + 3)  # a request without rows: the zero page's row 0
    pages, lengths, longest = pool.page_table([next_id + 99, r], "cpu")
    assert pages.dtype == lengths.dtype == torch.int32 and lengths.tolist() == [0, n] and longest == n
    assert pages[1, :len(pool.pages[r])].tolist() == pool.pages[r] and not pages[0].any()
    # a new request with no rows beside one with rows; one id twice in a call is refused
    rows = torch.randn(2, 5, 3, 4, generator=g)
    pool.commit([next_id, r], [0, 5], rows[0].expand(layers, -1, -1, -1), rows[1].expand(layers, -1, -1, -1))
    assert next_id not in pool and torch.equal(pool.committed(r, 1)[0][-5:], rows[0])
    with pytest.raises(ValueError, match="request ids repeat in one call"):
        pool.commit([r, r], [2, 3], rows[0].expand(layers, -1, -1, -1), rows[1].expand(layers, -1, -1, -1))
    # rows that do not match the counts or the pool are refused before anything changes
    before = (dict(pool.lengths), {q: list(held) for q, held in pool.pages.items()}, list(pool.free))
    for bad_k, bad_v in ((rows[0, :4], rows[1, :4]), (rows[0].half(), rows[1].half()), (rows[0], rows[1, :, :2])):
        with pytest.raises(ValueError, match="commit: k"):
            pool.commit([r, next_id + 5], [2, 3], bad_k.expand(layers, -1, -1, -1), bad_v.expand(layers, -1, -1, -1))
    assert (pool.lengths, pool.pages, pool.free) == before


def test_the_page_table_grows_only_where_it_is_short_and_a_batch_reads_only_its_columns():
    """One request growing a page a commit made the device page table square (rows and columns
    doubled together: 8192 × 8192 int32, 256 MiB, for one request of 8192 pages). And a batch's
    page tables were as wide as the longest request ever held."""
    from dspark_cli.integrations.tgi.kv_pool import PAGE_ROWS, KVPool

    pool = KVPool(1)
    pool.reserve(300 * PAGE_ROWS, torch.empty(0, 1, 1))
    for _ in range(257):
        pool.commit([7], [PAGE_ROWS], torch.ones(1, PAGE_ROWS, 1, 1), torch.ones(1, PAGE_ROWS, 1, 1))
    assert pool.table.shape == (8, 512)
    pool.commit([8], [3 * PAGE_ROWS], torch.ones(1, 3 * PAGE_ROWS, 1, 1), torch.ones(1, 3 * PAGE_ROWS, 1, 1))
    pages, lengths, longest = pool.page_table([8], "cpu")
    assert pages.shape == (1, 3) and pages[0].tolist() == pool.pages[8] and longest == 3 * PAGE_ROWS
    assert pool.page_table([99], "cpu")[0].shape == (1, 1)  # a request without rows: one column of page 0


def test_a_nearly_full_reserved_pool_under_churn_moves_nothing_and_allocates_nothing(monkeypatch):
    """50 requests in 10,000 reserved rows, then 300 steps in which every request adds a row and,
    when it has lived 20 to 60 steps, finishes and a new one arrives with a 100 to 200 row prompt
    (up to 92.7 % of the rows committed, 96 % of the pages taken): finished requests' pages are taken by the next ones, so the
    tensors are never made again and no row is ever copied (with contiguous segments every few
    steps copied all live rows again); every live request's rows stay intact."""
    from dspark_cli.integrations.tgi.kv_pool import KVPool

    remade = []
    remake = KVPool._remake
    monkeypatch.setattr(KVPool, "_remake", lambda self, *a: remade.append(1) or remake(self, *a))
    rng = __import__("random").Random(5)
    pool = KVPool(1)
    pool.reserve(10_000, torch.empty(0, 1, 1))
    tensor, next_id, left, want, fullest = pool.k, 0, {}, {}, 0
    for step in range(300):
        ids, counts = [], []
        for r in list(left) + [None] * (50 - len(left)):
            if r is not None and left[r] > 0:
                left[r] -= 1
                ids.append(r)
                counts.append(1)
                continue
            if r is not None:
                pool.drop(r)
                del left[r], want[r]
            ids.append(next_id)
            counts.append(rng.randint(100, 200))
            left[next_id], next_id = rng.randint(20, 60), next_id + 1
        rows = torch.arange(float(sum(counts)))[None, :, None, None] + 1000 * step
        pool.commit(ids, counts, rows, -rows)
        start = 0
        for r, n in zip(ids, counts):
            want[r] = want.get(r, []) + rows.flatten()[start:start + n].tolist()
            start += n
        fullest = max(fullest, sum(pool.length(r) for r in pool) / pool.reserved)
    assert len(remade) == 1 and pool.k is tensor and pool.outgrown == 0 and fullest > 0.9, (len(remade), fullest)
    assert all(pool.committed(r, 0)[0].flatten().tolist() == w for r, w in want.items())
    assert all(pool.committed(r, 0)[1].flatten().tolist() == [-x for x in w] for r, w in want.items())


def test_the_confidence_head_without_a_bias_reads_zero_and_without_the_markov_input_is_refused(checkpoints):
    base = DSparkDraft.load(checkpoints["oracle"])
    w = dict(base.w)
    bias = w.pop("confidence_head.proj.bias")
    assert bias.numel() == 1
    weight, zero = DSparkDraft(base.config, w).confidence_head
    assert torch.equal(weight, base.confidence_head[0]) and zero.tolist() == [0.0]
    w["confidence_head.proj.weight"] = w["confidence_head.proj.weight"][:, :base.config.hidden_size]
    with pytest.raises(ValueError, match=r"confidence_head_with_markov=false"):
        DSparkDraft(base.config, w)


def _dspark_md_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _dspark_md_rope(x, positions, theta):
    """Rotate-half RoPE of x [n, heads, hd] at positions [n], written from DSPARK.md, not draft.py."""
    hd = x.shape[-1]
    angles = positions.float()[:, None] / theta ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.cat([angles, angles], -1)
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * angles.cos()[:, None] + torch.cat([-x2, x1], -1) * angles.sin()[:, None]


def _dspark_md_block(w, c, features, anchor, anchor_pos):
    """DSPARK.md's draft block for one request: fc over the concatenated target layers, hidden_norm;
    [anchor, mask × (γ−1)] at anchor_pos…, attending without a mask to its context (K/V from the
    normed fc rows, absolute positions) and the block; Qwen3 layers (q/k norms, GQA); final norm."""
    import math

    G, H, KV, hd = c.block_size, c.num_heads, c.num_kv_heads, c.head_dim
    context = _dspark_md_norm(features @ w["fc.weight"].T, w["hidden_norm.weight"])
    x = w["embed_tokens.weight"][torch.tensor([anchor] + [c.mask_token_id] * (G - 1))]
    n = features.shape[0]
    block_pos, all_pos = anchor_pos + torch.arange(G), torch.cat([torch.arange(n), anchor_pos + torch.arange(G)])
    for i in range(c.num_layers):
        a = f"layers.{i}.self_attn."
        h = _dspark_md_norm(x, w[f"layers.{i}.input_layernorm.weight"])
        q = (h @ w[a + "q_proj.weight"].T).view(G, H, hd)
        k = torch.cat([(context @ w[a + "k_proj.weight"].T).view(n, KV, hd), (h @ w[a + "k_proj.weight"].T).view(G, KV, hd)])
        v = torch.cat([(context @ w[a + "v_proj.weight"].T).view(n, KV, hd), (h @ w[a + "v_proj.weight"].T).view(G, KV, hd)])
        q = _dspark_md_rope(_dspark_md_norm(q, w[a + "q_norm.weight"]), block_pos, c.rope_theta)
        k = _dspark_md_rope(_dspark_md_norm(k, w[a + "k_norm.weight"]), all_pos, c.rope_theta)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        attention = (torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", attention, v).reshape(G, -1) @ w[a + "o_proj.weight"].T
        h = _dspark_md_norm(x, w[f"layers.{i}.post_attention_layernorm.weight"])
        m = f"layers.{i}.mlp."
        x = x + (torch.nn.functional.silu(h @ w[m + "gate_proj.weight"].T) * (h @ w[m + "up_proj.weight"].T)) @ w[m + "down_proj.weight"].T
    return _dspark_md_norm(x, w["norm.weight"])


def test_the_drafter_matches_an_independent_statement_of_dspark_md():
    """The drafter tests compared draft.py against references built from draft.py's own norm, RoPE
    and projections, on fixtures whose norm weights are all 1 and with one KV head per two query
    heads: q and k norms swapped, a missing hidden_norm weight or a RoPE convention wrong in both
    would have passed. Here: random norm weights, 4 query heads on 2 KV heads, three requests of
    other context lengths committed in two steps, against DSPARK.md written out independently;
    then the greedy chain and the confidence head σ(w·[h_k ; W1[x_{k−1}]] + b)."""
    from dspark_cli.integrations.tgi.draft import DraftConfig

    torch.manual_seed(0)
    d, H, KV, hd, L, G, V, r, inner, n_aux = 64, 4, 2, 16, 2, 4, 50, 8, 96, 3
    c = DraftConfig(hidden_size=d, num_heads=H, num_kv_heads=KV, head_dim=hd, num_layers=L, block_size=G,
                    mask_token_id=V - 1, target_layer_ids=[1, 2, 3], rope_theta=10000.0, rms_norm_eps=1e-6)
    rand = lambda *shape, scale=0.2: torch.randn(*shape) * scale  # noqa: E731
    w = {"embed_tokens.weight": rand(V, d, scale=1), "fc.weight": rand(d, n_aux * d), "hidden_norm.weight": 1 + rand(d),
         "norm.weight": 1 + rand(d), "lm_head.weight": rand(V, d), "markov_head.markov_w1.weight": rand(V, r),
         "markov_head.markov_w2.weight": rand(V, r), "confidence_head.proj.weight": rand(1, d + r),
         "confidence_head.proj.bias": rand(1)}
    for i in range(L):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        w.update({a + "q_proj.weight": rand(H * hd, d), a + "k_proj.weight": rand(KV * hd, d),
                  a + "v_proj.weight": rand(KV * hd, d), a + "o_proj.weight": rand(d, H * hd),
                  a + "q_norm.weight": 1 + rand(hd), a + "k_norm.weight": 1 + rand(hd), m + "gate_proj.weight": rand(inner, d),
                  m + "up_proj.weight": rand(inner, d), m + "down_proj.weight": rand(d, inner),
                  f"layers.{i}.input_layernorm.weight": 1 + rand(d), f"layers.{i}.post_attention_layernorm.weight": 1 + rand(d)})
    reference = {k: t.clone() for k, t in w.items()}
    draft = DSparkDraft(c, w, cuda_graphs=False)
    lengths = {11: 5, 12: 1, 13: 20}
    features = {k: torch.randn(n, n_aux * d) for k, n in lengths.items()}
    draft.extend_contexts(list(lengths), torch.cat(list(features.values())),
                          torch.cat([torch.arange(n) for n in lengths.values()]), list(lengths.values()))
    more = {11: torch.randn(3, n_aux * d), 13: torch.randn(2, n_aux * d)}
    draft.extend_contexts(list(more), torch.cat(list(more.values())),
                          torch.cat([lengths[k] + torch.arange(f.shape[0]) for k, f in more.items()]),
                          [f.shape[0] for f in more.values()])
    for k, f in more.items():
        features[k] = torch.cat([features[k], f])
    ids, anchors = [13, 11, 12], torch.tensor([3, 7, 9])
    positions = [features[k].shape[0] for k in ids]
    h = draft.hidden_blocks(ids, anchors, positions)
    for j, k in enumerate(ids):
        torch.testing.assert_close(h[j], _dspark_md_block(reference, c, features[k], int(anchors[j]), positions[j]),
                                   atol=1e-4, rtol=1e-4)
    proposal = draft.propose(ids, anchors, positions, torch.zeros(3))
    U, w1, w2 = h @ reference["lm_head.weight"].T, reference["markov_head.markov_w1.weight"], reference["markov_head.markov_w2.weight"]
    prev, z = anchors, []
    for k in range(G):
        z.append(torch.cat([h[:, k], w1[prev]], -1) @ reference["confidence_head.proj.weight"][0]
                 + reference["confidence_head.proj.bias"])
        prev = (U[:, k] + w1[prev] @ w2.T).argmax(-1)
        assert torch.equal(prev, proposal.draft.tokens[:, k]), k
    torch.testing.assert_close(proposal.confidence, torch.sigmoid(torch.stack(z, 1)), atol=1e-5, rtol=1e-5)


def test_the_loop_commits_the_anchor_and_accepted_drafts_only(checkpoints):
    """`dspark verify tgi`'s loop: the drafter's context is the prompt, then per round the old anchor
    and the accepted drafts (rejected drafts never enter it)."""
    target = tiny_models.load_transformers(checkpoints["target"])
    spec = DSparkSpeculation.for_target(target, DSparkDraft.load(checkpoints["partial"]), scheduler="off")
    prompt = [3, 17, 99]
    out, accepted, rounds = generate(target, spec, prompt, steps=24)
    assert 0 < accepted < 3 * (rounds - 1)
    assert spec.draft.context_kv.length(0) == len(prompt) + accepted + rounds - 1


def _verify_tgi(monkeypatch, capsys, break_first=False):
    from dspark_cli.integrations.tgi import verify

    if break_first:  # the first draft's (the oracle's) loop emits wrong tokens
        real, seen = verify.generate, []

        def generate(*args, **kwargs):
            out, accepted, rounds = real(*args, **kwargs)
            seen.append(1)
            return ([t + 1 for t in out] if len(seen) == 1 else out), accepted, rounds
        monkeypatch.setattr(verify, "generate", generate)
    verify.run(as_json=True)
    return json.loads(capsys.readouterr().out)


def test_verify_tgi_reports_the_accepted_length_per_verify_round_and_one_no_speculation_rate(monkeypatch, capsys):
    """1 + accepted drafts per verify round, as `dspark verify vllm` reports it: the prefill's round
    verifies no draft (the oracle read 3.56 of 4 when 32 tokens took 9 rounds, every draft accepted)."""
    rows = {r["draft"]: r for r in _verify_tgi(monkeypatch, capsys)["checks"]}
    assert rows["oracle"]["mean_accepted_length"] == 4.0  # every draft accepted: γ + 1 per verify round
    assert all(1.0 <= rows[k]["mean_accepted_length"] < rows["oracle"]["mean_accepted_length"] for k in ("partial", "random"))
    assert len({r["tokens_per_s_no_spec"] for r in rows.values()}) == 1  # one baseline measurement


def test_verify_tgi_skips_the_shard_of_a_server_that_failed_its_checks_saying_so(monkeypatch, capsys):
    """The shard was skipped as "no patched TGI server installed" next to the server it had just
    found installed (tgi_server.installed true) and named the problems of."""
    from dspark_cli.errors import CheckFailed
    from dspark_cli.integrations.tgi import verify

    problem = "text_generation_server has no _dspark.py: not patched (dspark apply tgi, then reinstall)"
    monkeypatch.setattr(verify, "installed_server", lambda: {"installed": True, "location": "/x", "series": None,
                                                             "problems": [problem]})
    with pytest.raises(CheckFailed, match="not patched"):
        verify.run(as_json=True)
    result = json.loads(capsys.readouterr().out)
    assert result["tgi_shard"] == {"ran": False, "why_not": "the installed TGI server failed its checks"}


def test_verify_tgi_fails_when_any_draft_changes_the_output(monkeypatch, capsys):
    from dspark_cli.errors import CheckFailed

    with pytest.raises(CheckFailed):
        _verify_tgi(monkeypatch, capsys, break_first=True)


def test_the_tgi_loop_runs_the_target_on_the_scheduled_width_only(tmp_path):
    target_path = tiny_models.build_target(tmp_path / "target", "successor")
    target = tiny_models.load_transformers(target_path)
    draft = DSparkDraft.load(tiny_models.build_draft(tmp_path / "oracle", 3, "oracle", target=target_path))
    steep = SPSTable([1, 2, 4, 8], [100.0, 60.0, 20.0, 1.0])
    spec = DSparkSpeculation.for_target(target, draft, "exact", steep)
    widths, verify = [], spec.verify
    spec.verify = lambda ids, logprobs, *a: widths.append(logprobs.shape[1] - 1) or verify(ids, logprobs, *a)
    out, accepted, rounds = generate(target, spec, [5, 6], steps=12)
    assert out == tiny_models.successor_tokens([5, 6], 12)
    assert sum(widths) == spec.stats["verified"] < 3 * (rounds - 1)  # the target saw only the scheduled drafts


def test_a_reserved_pool_outgrown_grows_by_a_quarter():
    from dspark_cli.integrations.tgi.kv_pool import PAGE_ROWS, KVPool

    pool = KVPool(1)
    pool.reserve(64 * PAGE_ROWS, torch.empty(0, 1, 1))
    rows = torch.ones(1, 64 * PAGE_ROWS, 1, 1)
    pool.commit([1], [64 * PAGE_ROWS], rows, rows)
    pool.commit([2], [PAGE_ROWS], rows[:, :PAGE_ROWS], rows[:, :PAGE_ROWS])
    assert pool.outgrown == 1 and pool.k.shape[1] == (65 + 65 // 4) * PAGE_ROWS
