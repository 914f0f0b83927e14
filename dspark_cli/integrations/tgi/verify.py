"""`dspark verify tgi`: is the installed TGI server package patched with our series (marker and
hooks in place), does the installed shard serve identical greedy output with DSpark on and off
(a tiny constructed Llama, driven over gRPC by shard.py's router stand-in; only when a patched
server is installed here), and does our TGI-side drafter/verifier stay lossless in the loop below
(our hooks' logic over a real transformers target built on the spot)?"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from rich.markup import escape

from dspark_cli.errors import CheckFailed, DsparkError
from dspark_cli.integrations.spec_runner import one_line
from dspark_cli.output import emit, say

# file of the installed package -> a name our patch puts there
HOOKS = {"models/__init__.py": ("draft_block_size",),
         "models/flash_causal_lm.py": ("self.dspark.chooser(batch)", "self.dspark.forget("),
         "models/transformers_flash_causal_lm.py": ("maybe_attach",)}


def _expected_series(marker: dict) -> tuple[str, list[str]]:
    """The series name and patch list this checkout's compat.yaml (DSPARK_COMPAT when set, as for
    every command) gives the installed tree: the TGI pin its marker names, else TGI's default pin."""
    from dspark_cli import compat
    from dspark_cli.doctor import installed_pin
    from dspark_cli.series import read_series

    engine = compat.load().engine("tgi")
    pin = installed_pin(engine, "", marker) or engine.resolve_pin(None)
    return f"tgi/{pin.name}", read_series(pin.series_dir())


def installed_server() -> dict:
    """State of the importable text_generation_server (read from disk, never imported: it needs CUDA)."""
    import importlib.util

    from dspark_cli.doctor import patch_marker

    unreadable = None
    try:
        marker = patch_marker("text_generation_server")
    except ValueError as exc:  # a damaged install's marker: reported, as doctor does
        marker, unreadable = {}, str(exc)
    if marker is None:
        return {"installed": False, "problems": []}
    problems = []
    try:
        series, expected = _expected_series(marker)
    except DsparkError as exc:  # a compat.yaml (DSPARK_COMPAT) without TGI, or with a series unreadable
        series = expected = None
        problems.append(f"cannot tell which series is ours: {exc}")
    if unreadable:
        problems.append(f"{unreadable} (dspark apply tgi, then reinstall)")
    elif not marker:
        problems.append("text_generation_server has no _dspark.py: not patched (dspark apply tgi, then reinstall)")
    elif series is not None and (marker.get("SERIES") != series or marker.get("PATCHES") != expected):
        problems.append(f"installed series {marker.get('SERIES')} {marker.get('PATCHES')} is not ours ({series} {expected})")
    root = Path(importlib.util.find_spec("text_generation_server").submodule_search_locations[0])
    for rel, names in HOOKS.items():
        f = root / rel
        try:
            text = f.read_text(encoding="utf-8") if f.is_file() else ""
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{f}: unreadable ({exc})")
            continue
        problems += [f"{f}: DSpark hook ({name}) missing" for name in names if name not in text]
    return {"installed": True, "location": str(root), "series": marker.get("SERIES"), "problems": problems}


def shard_unservable() -> str | None:
    """Why the installed server cannot serve here (None: it can): its generated gRPC stubs, grpc, and
    a device TGI runs on (CUDA, or the CPU through intel-extension-for-pytorch)."""
    import importlib.util

    for module in ("grpc", "text_generation_server.pb.generate_pb2"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            return f"{module} is not importable (TGI's `make gen-server` and server dependencies)"
    if not torch.cuda.is_available() and importlib.util.find_spec("intel_extension_for_pytorch") is None:
        return "no CUDA GPU and no intel-extension-for-pytorch (TGI's CPU path)"
    return None


def shard_check(tmp: Path) -> dict:
    """The installed TGI shard (real `text-generation-server serve`) on a tiny Llama, without and
    with DSpark (a partly wrong draft): same greedy tokens, fewer rounds, speculate = γ."""
    from dspark_cli import tiny_models
    from dspark_cli.integrations.tgi import fixtures, shard

    target = fixtures.build(tmp / "shard-llama", "llama", "successor")
    draft = tiny_models.build_draft(tmp / "shard-draft", gamma=3, kind="partial", target=target)
    waves = [[0, [{"id": 1, "prompt": [3, 17, 99], "max_new_tokens": 16},
                  {"id": 2, "prompt": [40], "max_new_tokens": 12, "repetition_penalty": 1.2}]]]
    try:
        plain = shard.serve_and_drive({"model": str(target), "draft": None, "waves": waves})
        start = time.perf_counter()
        dspark = shard.serve_and_drive({"model": str(target), "draft": str(draft), "waves": waves})
    except RuntimeError as e:  # the shard did not start or failed: its log tail is the message
        return {"ran": True, "identical": False, "error": one_line(e)}
    return {"ran": True, "identical": dspark["tokens"] == plain["tokens"], "speculate": dspark["speculate"],
            "rounds": sum(dspark["rounds"].values()), "rounds_no_spec": sum(plain["rounds"].values()),
            "seconds": time.perf_counter() - start}


def generate(target, speculation, prompt: list[int], steps: int, temperature: float = 0.0):
    """A minimal engine loop (the target recomputes the whole sequence each round) driving
    verify / commit / propose in the order hooks.choose runs them inside TGI.
    Returns (emitted tokens, accepted drafts, rounds)."""
    seq, rid, emitted, accepted, rounds = list(prompt), 0, [], 0, 0
    greedy = torch.tensor([temperature == 0.0])
    while len(emitted) < steps:
        pending = speculation.pending.get(rid)  # as TGI: the target runs 1 + L rows, L the width given
        drafts = pending.tokens[: pending.ell].tolist() if rounds else []
        S = 1 + len(drafts)
        with torch.no_grad():
            logits = target(torch.tensor([seq + drafts])).logits[0, -S:]
        scores = logits / temperature if temperature > 0 else logits
        tokens, n_acc = speculation.verify([rid], torch.log_softmax(scores.float(), -1).unsqueeze(0), greedy)
        features = speculation.capture.features(len(seq) + len(drafts))
        # Context = the prompt after prefill; afterwards the old anchor and the accepted drafts.
        rows = list(range(len(seq))) if not rounds else list(range(len(seq) - 1, len(seq) + n_acc[0]))
        speculation.draft.extend_context(rid, features[rows], torch.tensor(rows))
        seq += tokens[0]
        emitted += tokens[0]
        accepted += n_acc[0]
        rounds += 1
        speculation.propose([rid], torch.tensor([seq[-1]]), [len(seq) - 1], torch.tensor([temperature]))
    return emitted[:steps], accepted, rounds


def greedy_reference(target, prompt: list[int], steps: int) -> list[int]:
    """The target's own greedy continuation (transformers' generate, no speculation)."""
    with torch.no_grad():
        return target.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False)[0, len(prompt):].tolist()


def run(as_json: bool = False) -> None:
    from transformers.utils import logging as hf_logging

    from dspark_cli import tiny_models
    from dspark_cli.integrations.tgi.draft import DSparkDraft
    from dspark_cli.integrations.tgi.speculation import DSparkSpeculation

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    server = installed_server()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        why_not = ("no patched TGI server installed" if not server["installed"]
                   else "the installed TGI server failed its checks" if server["problems"] else shard_unservable())
        served = {"ran": False, "why_not": why_not} if why_not else shard_check(Path(tmp))
        target_path = tiny_models.build_target(Path(tmp) / "target", "successor")
        target = tiny_models.load_transformers(target_path)
        prompt, steps = [3, 17, 99], 32
        start = time.perf_counter()
        ref = greedy_reference(target, prompt, steps)
        base_tps = steps / (time.perf_counter() - start)
        for kind in ("oracle", "partial", "random"):
            draft = DSparkDraft.load(tiny_models.build_draft(Path(tmp) / kind, gamma=3, kind=kind, target=target_path))
            spec = DSparkSpeculation.for_target(target, draft, scheduler="off")
            start = time.perf_counter()
            out, accepted, rounds = generate(target, spec, prompt, steps)
            # as vLLM's: 1 + accepted drafts per verify round (the first round, the prefill, verifies none)
            rows.append({"draft": kind, "identical": out == ref, "mean_accepted_length": 1 + accepted / max(rounds - 1, 1),
                         "tokens_per_s": steps / (time.perf_counter() - start), "tokens_per_s_no_spec": base_tps})
    result = {"tgi_server": server, "tgi_shard": served, "checks": rows,
              "ok": all(r["identical"] for r in rows) and not server["problems"]
              and (not served["ran"] or served["identical"])}

    def render(r):
        srv = r["tgi_server"]
        if not srv["installed"]:
            say("installed TGI server: none in this environment (only the TGI-side loop below ran)")
        elif not srv["problems"]:
            say(f"[green]ok[/green] installed TGI server patched with {srv['series']} ({escape(str(srv['location']))})")
        for problem in srv["problems"]:
            say(f"[red]FAIL[/red] {escape(problem)}")
        sh = r["tgi_shard"]
        if srv["installed"] and not sh["ran"]:
            say(f"skip installed TGI shard: {escape(sh['why_not'])}")
        elif sh["ran"] and "error" in sh:
            say(f"[red]FAIL[/red] installed TGI shard: {escape(sh['error'])}")
        elif sh["ran"]:
            mark = "[green]ok[/green]" if sh["identical"] else "[red]FAIL[/red]"
            say(f"{mark} installed TGI shard: greedy identical with DSpark on/off; {sh['rounds']} rounds "
                f"vs {sh['rounds_no_spec']} without (speculate {sh['speculate']})")
        for c in r["checks"]:
            mark = "[green]ok[/green]" if c["identical"] else "[red]FAIL[/red]"
            say(f"{mark} {c['draft']:8} greedy identical to no speculation; accepted length "
                f"{c['mean_accepted_length']:.2f} of 4; {c['tokens_per_s']:.0f} tok/s vs "
                f"{c['tokens_per_s_no_spec']:.0f} without")

    failure = None if result["ok"] else CheckFailed(
        "; ".join(server["problems"]) or served.get("error") or "DSpark output differs from no speculation"
        + (" in the installed TGI shard" if served["ran"] and not served["identical"] else " in the TGI-side loop"))
    emit(result, as_json, render, failure)
