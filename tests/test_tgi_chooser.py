"""hooks.choose against TGI's own HeterogeneousNextTokenChooser (real v3.3.7 code).

TGI's utils/tokens.py, logits_process.py and watermark.py are copied from DSPARK_TGI_SRC into a
temporary `text_generation_server` package (with generate_pb2 compiled from the real proto) and
imported in DSPARK_TGI_UTILS_PYTHON (a Python with TGI's loguru/outlines/protobuf/grpcio-tools;
.ci/prepare.d/40-tgi-utils.sh builds it). Only the flash batch stays a plain object: its module
needs TGI's CUDA kernels. Checks:
- our warped scores are exactly the ones TGI's chooser turns into log-probs without speculation,
  row j with drafts 1..j already emitted (penalties, temperature, top-k, top-p);
- on an all-greedy batch, choose() returns TGI's next ids, accepted counts and log-probs for the
  same drafts (TGI's exact-match acceptance is the greedy limit of ours).
"""

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # torch is imported where the code runs (inside DSPARK_TGI_UTILS_PYTHON)
    import torch

TGI_SRC = os.environ.get("DSPARK_TGI_SRC")
TGI_PY = os.environ.get("DSPARK_TGI_UTILS_PYTHON")
REPO = Path(__file__).resolve().parent.parent


def build_tgi_utils_package(src: Path, dest: Path, python: str) -> Path:
    pkg = dest / "text_generation_server"
    (pkg / "pb").mkdir(parents=True)
    (pkg / "utils").mkdir()
    for f in (pkg / "__init__.py", pkg / "pb" / "__init__.py", pkg / "utils" / "__init__.py"):
        f.touch()  # the real utils/__init__ imports the weights/hub/CUDA side; we need three leaf modules
    for name in ("tokens.py", "logits_process.py", "watermark.py"):
        shutil.copy(src / "server" / "text_generation_server" / "utils" / name, pkg / "utils" / name)
    subprocess.run([python, "-m", "grpc_tools.protoc", f"-I{src / 'proto' / 'v3'}", f"--python_out={pkg / 'pb'}",
                    "generate.proto"], check=True)
    return dest


@pytest.mark.skipif(not (TGI_SRC and TGI_PY), reason="needs DSPARK_TGI_SRC (a v3.3.7 clone: .ci/prepare.d/39-tgi-src.sh "
                                                     "when it could clone the tag) and DSPARK_TGI_UTILS_PYTHON (40-tgi-utils.sh)")
def test_choose_matches_tgi_next_token_chooser(tmp_path):
    root = build_tgi_utils_package(Path(TGI_SRC), tmp_path / "tgi", TGI_PY)
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{REPO}")
    out = subprocess.run([TGI_PY, __file__, str(tmp_path / "ckpt")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "greedy-equivalent" in out.stdout and "warped-equal" in out.stdout, out.stdout


@pytest.mark.skipif(not (TGI_SRC and TGI_PY), reason="needs DSPARK_TGI_SRC (a v3.3.7 clone: .ci/prepare.d/39-tgi-src.sh "
                                                     "when it could clone the tag) and DSPARK_TGI_UTILS_PYTHON (40-tgi-utils.sh)")
def test_watermarked_request_shorter_than_the_batch_is_greedy_identical_to_plain_tgi(tmp_path):
    """TGI's WatermarkLogitsProcessor seeds its green list from the last column of the ids it is
    given; plain TGI's flash path gives it all_input_ids_tensor[:, :max_current_length], so a
    request shorter than the batch's longest is seeded from the padding 0. WATERMARK_DELTA (TGI's
    own knob, read when watermark.py is imported) is set high so that the green list decides the
    greedy token on the successor target."""
    root = build_tgi_utils_package(Path(TGI_SRC), tmp_path / "tgi", TGI_PY)
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{REPO}", WATERMARK_DELTA="200")
    out = subprocess.run([TGI_PY, __file__, str(tmp_path / "ckpt"), "watermark"], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "watermark-identical" in out.stdout, out.stdout


# ---------------------------------------------------------------- runs inside DSPARK_TGI_UTILS_PYTHON


@dataclass
class DecodeBatch:
    """The FlashCausalLMBatch fields hooks.choose reads (v3.3.7 names; tests/test_tgi_capture.py checks them)."""
    requests: list
    next_token_chooser: object
    input_ids: "torch.Tensor"
    position_ids: "torch.Tensor"
    all_input_ids_tensor: "torch.Tensor"
    max_current_length: int
    speculative_ids: object = None
    cu_seqlen_prefill: object = None
    cache_lengths: list = None

    def __len__(self):
        return len(self.requests)


def plain_rows(chooser, history, logits, drafts, S):
    """TGI's log-probs without speculation, row by row: row j once drafts 1..j had been emitted
    (the reference for losslessness; TGI's speculative chooser gives every row the same history)."""
    import torch

    B = history.shape[0]
    rows = logits.view(B, S, -1)
    out = [chooser(torch.cat([history, drafts[:, :j].to(history.dtype)], 1), rows[:, j].clone(), 0)[2]
           for j in range(S)]
    return torch.stack(out, 1).view(B * S, -1)


def _params(pb, **kw):
    base = dict(temperature=1.0, repetition_penalty=1.0, frequency_penalty=0.0, top_k=0, top_p=1.0, typical_p=1.0,
                do_sample=False, seed=0, watermark=False)
    base.update(kw)
    return pb.NextTokenChooserParameters(**base)


def _check(ckpt_dir: Path) -> None:
    import torch
    from text_generation_server.pb import generate_pb2 as pb
    from text_generation_server.utils.tokens import HeterogeneousNextTokenChooser

    from dspark_cli import tiny_models
    from dspark_cli.integrations.tgi.draft import DSparkDraft
    from dspark_cli.integrations.tgi.hooks import _warped_logits, choose
    from dspark_cli.integrations.tgi.speculation import DSparkSpeculation

    torch.manual_seed(0)
    target_path = tiny_models.build_target(ckpt_dir / "target", "successor")
    target = tiny_models.load_transformers(target_path)
    draft = DSparkDraft.load(tiny_models.build_draft(ckpt_dir / "partial", gamma=3, kind="partial", target=target_path))
    spec = DSparkSpeculation.for_target(target, draft, scheduler="off")

    # 1. Warped scores (sampling parameters) equal TGI's.
    sampled = [_params(pb, temperature=0.7, top_k=5, do_sample=True), _params(pb, top_p=0.9, frequency_penalty=0.5,
               do_sample=True), _params(pb, repetition_penalty=1.3), _params(pb, temperature=1.3, typical_p=0.8)]
    chooser = HeterogeneousNextTokenChooser.from_pb(sampled, torch.float32, torch.device("cpu"), None)
    B, S, V = len(sampled), 4, tiny_models.VOCAB
    history = torch.randint(0, V, (B, 6))
    batch = DecodeBatch([pb.Request(id=i, parameters=p) for i, p in enumerate(sampled)], chooser, history[:, -1],
                        torch.full((B,), 5), history, 6, speculative_ids=torch.randint(0, V, (B, S - 1)))
    logits = torch.randn(B * S, V)
    ours = torch.log_softmax(_warped_logits(batch, logits.clone(), S).view(B * S, V), -1)
    tgi_all = plain_rows(chooser, history, logits, batch.speculative_ids, S)
    assert torch.allclose(ours, tgi_all, equal_nan=True), (ours - tgi_all).abs().nan_to_num().max()
    print("warped-equal")

    # 2. Greedy batch: prefill, then decode steps; TGI's chooser and ours agree on every output.
    # TGI's chooser here sees the batch's padded history (0s), ours each request's own: they agree
    # for the penalized request only because its prompt (0 3 6 9 12) holds token 0 already; with
    # other prompts expect the difference the watermark test below shows, not a bug.
    greedy = [_params(pb), _params(pb, repetition_penalty=1.2), _params(pb)]
    B, P = len(greedy), 5
    prompts = torch.stack([torch.arange(P) * (i + 2) % (V - 2) for i in range(B)])
    requests = [pb.Request(id=10 + i, parameters=p) for i, p in enumerate(greedy)]
    seqs = prompts.clone()
    with torch.no_grad():
        logits = target(prompts).logits  # prefill: rows i*P + t, as TGI's cu_seqlen_prefill layout
    chooser = HeterogeneousNextTokenChooser.from_pb(greedy, torch.float32, torch.device("cpu"), None)
    pre = DecodeBatch(requests, chooser, prompts.view(-1), torch.arange(P).repeat(B), seqs, P,
                      cu_seqlen_prefill=torch.arange(0, B * P + 1, P), cache_lengths=[0] * B)
    # TGI's router sends warmup requests as id 0 and numbers real ones from 0 again: state left
    # under an arriving id (here 64 warmup rows) must not become the new request's draft context.
    spec.draft.extend_context(10, torch.randn(64, draft.w["fc.weight"].shape[1]), torch.arange(64))
    next_ids, _, _, accepted, drafts = choose(spec, pre, logits[:, -1].clone(), 3)
    assert [spec.draft.context_kv.length(r.id) for r in requests] == [P] * B
    seqs = [[int(t) for t in prompt] + [int(t)] for prompt, t in zip(prompts, next_ids)]
    total_accepted = 0
    for _ in range(4):
        # Each request's rows: its sequence plus its drafts through the target; stacked they are
        # what TGI's one flattened decode forward (B·S rows) produces.
        S = 1 + drafts.shape[1]
        rows_logits, rows_feats = [], []
        for i in range(B):
            inp = torch.tensor([seqs[i] + drafts[i].tolist()])
            with torch.no_grad():
                rows_logits.append(target(inp).logits[0, -S:])
            rows_feats.append(spec.capture.features(inp.shape[1])[-S:].clone())
        spec.capture.buffer = torch.cat(rows_feats)
        step_logits = torch.cat(rows_logits)
        L = max(len(x) for x in seqs)
        history = torch.tensor([x + [0] * (L - len(x)) for x in seqs])  # right-padded, as TGI's tensor
        dec = DecodeBatch(requests, chooser, history[:, 0].new_tensor([x[-1] for x in seqs]),
                          torch.tensor([len(x) - 1 for x in seqs]), history, L, speculative_ids=drafts.clone())
        t_ids, _, _, t_acc, _ = chooser(history, step_logits.clone(), S - 1, drafts.clone())
        t_all = plain_rows(chooser, history, step_logits, drafts, S)
        o_ids, o_lp, o_all, o_acc, drafts = choose(spec, dec, step_logits.clone(), 3)
        assert torch.equal(o_ids, t_ids) and torch.equal(o_acc, t_acc), (o_ids, t_ids, o_acc, t_acc)
        kept = [i * S + j for i, n in enumerate(t_acc.tolist()) for j in range(n)]
        assert torch.allclose(o_all, t_all) and torch.allclose(o_lp, t_all[kept, t_ids])
        total_accepted += int(t_acc.sum()) - B
        for x, new in zip(seqs, t_ids.split(t_acc.tolist())):
            x.extend(int(t) for t in new)
    assert total_accepted > 0, "no draft was accepted: the comparison did not exercise acceptance"
    print(f"greedy-equivalent (accepted drafts: {total_accepted})")


def plain_generate(target, params, prompts, steps):
    """Plain TGI without speculation (flash_causal_lm.py generate_token): every step the chooser
    gets all_input_ids_tensor[:, :max_current_length], right-padded with 0 to the longest request.
    Returns each request's generated tokens."""
    import torch
    from text_generation_server.utils.tokens import HeterogeneousNextTokenChooser

    chooser = HeterogeneousNextTokenChooser.from_pb(params, torch.float32, torch.device("cpu"), None)
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        L = max(len(x) for x in seqs)
        history = torch.tensor([x + [0] * (L - len(x)) for x in seqs])
        with torch.no_grad():
            logits = torch.stack([target(torch.tensor([x])).logits[0, -1] for x in seqs])
        for x, t in zip(seqs, chooser(history, logits, 0)[0].tolist()):
            x.append(t)
    return [x[len(p):] for x, p in zip(seqs, prompts)]


def dspark_generate(target, spec, params, prompts, steps):
    """The same batch through hooks.choose: one prefill (rows of all prompts flattened, as TGI's
    cu_seqlen_prefill layout), then decode steps of 1 + L rows per request, the history tensor
    right-padded as TGI's. Returns (each request's first `steps` tokens, drafts accepted)."""
    import torch
    from text_generation_server.pb import generate_pb2 as pb
    from text_generation_server.utils.tokens import HeterogeneousNextTokenChooser

    from dspark_cli.integrations.tgi.hooks import choose

    B = len(prompts)
    chooser = HeterogeneousNextTokenChooser.from_pb(params, torch.float32, torch.device("cpu"), None)
    requests = [pb.Request(id=20 + i, parameters=p) for i, p in enumerate(params)]
    seqs = [list(p) for p in prompts]

    def forward(rows_per_request):  # each request's rows through the target, stacked as TGI's flat forward
        logits, feats = [], []
        for x, n in zip(seqs, rows_per_request):
            inp = torch.tensor([x])
            with torch.no_grad():
                logits.append(target(inp).logits[0, -n:])
            feats.append(spec.capture.features(inp.shape[1])[-n:].clone())
        spec.capture.buffer = torch.cat(feats)
        return torch.cat(logits)

    def history():
        L = max(len(x) for x in seqs)
        return torch.tensor([x + [0] * (L - len(x)) for x in seqs]), L

    lengths = [len(p) for p in prompts]
    logits = forward(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0)
    hist, L = history()
    pre = DecodeBatch(requests, chooser, torch.tensor([t for p in prompts for t in p]),
                      torch.cat([torch.arange(n) for n in lengths]), hist, L, cu_seqlen_prefill=cu,
                      cache_lengths=[0] * B)
    next_ids, _, _, _, drafts = choose(spec, pre, logits[cu[1:] - 1].clone(), 3)
    for x, t in zip(seqs, next_ids.tolist()):
        x.append(t)
    accepted = 0
    while min(len(x) - len(p) for x, p in zip(seqs, prompts)) < steps:
        S = 1 + drafts.shape[1]
        for x, d in zip(seqs, drafts.tolist()):
            x.extend(d)
        logits = forward([S] * B)
        for x in seqs:
            del x[-(S - 1):]
        hist, L = history()
        dec = DecodeBatch(requests, chooser, torch.tensor([x[-1] for x in seqs]), torch.tensor([len(x) - 1 for x in seqs]),
                          hist, L, speculative_ids=drafts.clone())
        next_ids, _, _, acc, drafts = choose(spec, dec, logits, 3)
        accepted += int(acc.sum()) - B
        for x, new in zip(seqs, next_ids.split(acc.tolist())):
            x.extend(new.tolist())
    return [x[len(p):len(p) + steps] for x, p in zip(seqs, prompts)], accepted


def _check_watermark(ckpt_dir: Path) -> None:
    """A watermarked greedy request shorter than its batch's longest (and one with a repetition
    penalty, whose padding is token 0's occurrence): DSpark's tokens equal plain TGI's for the
    request served alone, where TGI seeds the watermark from the request's own last token."""
    import torch
    from text_generation_server.pb import generate_pb2 as pb

    from dspark_cli import tiny_models
    from dspark_cli.integrations.tgi.draft import DSparkDraft
    from dspark_cli.integrations.tgi.speculation import DSparkSpeculation

    torch.manual_seed(0)
    target_path = tiny_models.build_target(ckpt_dir / "target", "successor")
    target = tiny_models.load_transformers(target_path)
    draft = DSparkDraft.load(tiny_models.build_draft(ckpt_dir / "partial", gamma=3, kind="partial", target=target_path))
    params = [_params(pb, watermark=True), _params(pb, watermark=True), _params(pb, repetition_penalty=10.0)]
    prompts = [[5, 9, 14, 30, 31, 32], [60, 61, 62], [251, 252]]  # request 0 the longest throughout
    steps = 12
    alone = [plain_generate(target, [p], [x], steps)[0] for p, x in zip(params, prompts)]
    batched = plain_generate(target, params, prompts, steps)
    print(f"plain alone   {alone}\nplain batched {batched}")
    assert batched[0] == alone[0], "the longest request is seeded from its own last token in both"
    # The reference is ambiguous for the shorter ones: plain TGI's own tokens depend on the batch.
    assert batched[1] != alone[1] and batched[2] != alone[2], "the padding did not change plain TGI's tokens"
    for together in (True, False):
        spec = DSparkSpeculation.for_target(target, draft, scheduler="off")
        if together:
            out, accepted = dspark_generate(target, spec, params, prompts, steps)
        else:
            runs = [dspark_generate(target, spec, [p], [x], steps) for p, x in zip(params, prompts)]
            out, accepted = [o[0] for o, _ in runs], sum(a for _, a in runs)
        print(f"dspark {'batched' if together else 'alone  '} {out} (accepted drafts: {accepted})")
        assert accepted > 0, "no draft was accepted: verify rows j >= 1 were not exercised"
        assert out == alone, (together, out, alone)
    print("watermark-identical")


if __name__ == "__main__":
    if sys.argv[2:] == ["watermark"]:
        _check_watermark(Path(sys.argv[1]))
    else:
        _check(Path(sys.argv[1]))
