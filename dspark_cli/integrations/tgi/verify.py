"""`dspark verify tgi`: is the installed TGI patched with our series, and does our TGI-side
drafter/verifier stay lossless? TGI's server cannot run without its CUDA wheels, so the loop below
drives our hooks' logic over a real transformers target built on the spot (tiny, constructed)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from dspark_cli.errors import CheckFailed
from dspark_cli.output import console, emit


def generate(target, speculation, prompt: list[int], steps: int, temperature: float = 0.0):
    """A minimal engine loop (the target recomputes the whole sequence each round) driving
    verify / commit / propose in the order hooks.choose runs them inside TGI.
    Returns (emitted tokens, accepted drafts, rounds)."""
    seq, rid, emitted, accepted, rounds = list(prompt), 0, [], 0, 0
    greedy = torch.tensor([temperature == 0.0])
    while len(emitted) < steps:
        drafts = speculation.pending[rid].tokens.tolist() if rounds else []
        S = 1 + len(drafts)
        with torch.no_grad():
            logits = target(torch.tensor([seq + drafts])).logits[0, -S:]
        scores = logits / temperature if temperature > 0 else logits
        tokens, n_acc = speculation.verify([rid], scores.unsqueeze(0), greedy)
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


def run(as_json: bool = False) -> None:
    from transformers import AutoModelForCausalLM

    from dspark_cli.doctor import patch_marker
    from dspark_cli.integrations.tgi.draft import DSparkDraft
    from dspark_cli.integrations.tgi.speculation import DSparkSpeculation, HiddenCapture
    from dspark_cli.integrations.vllm import models

    marker = patch_marker("text_generation_server")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        target_path = models.build_target(Path(tmp) / "target", "successor")
        target = AutoModelForCausalLM.from_pretrained(target_path, torch_dtype=torch.float32).eval()
        prompt, steps = [3, 17, 99], 32
        start = time.perf_counter()
        with torch.no_grad():
            ref = target.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False)[0, 3:].tolist()
        base_tps = steps / (time.perf_counter() - start)
        for kind in ("oracle", "partial", "random"):
            draft = DSparkDraft.load(models.build_draft(Path(tmp) / kind, gamma=3, kind=kind, target=target_path))
            spec = DSparkSpeculation(draft, HiddenCapture(target, draft.config.target_layer_ids), scheduler="off")
            start = time.perf_counter()
            out, accepted, rounds = generate(target, spec, prompt, steps)
            rows.append({"draft": kind, "identical": out == ref, "mean_accepted_length": steps / rounds,
                         "tokens_per_s": steps / (time.perf_counter() - start), "tokens_per_s_no_spec": base_tps})
    result = {"tgi_installed_patched": marker.get("SERIES") if marker else None, "checks": rows,
              "ok": all(r["identical"] for r in rows)}

    def render(r):
        console.print(f"installed TGI: {r['tgi_installed_patched'] or 'not installed or not patched here'}")
        for c in r["checks"]:
            mark = "[green]ok[/green]" if c["identical"] else "[red]FAIL[/red]"
            console.print(f"{mark} {c['draft']:8} greedy identical to no speculation; accepted length "
                          f"{c['mean_accepted_length']:.2f} of 4; {c['tokens_per_s']:.0f} tok/s vs "
                          f"{c['tokens_per_s_no_spec']:.0f} without")

    emit(result, as_json, render)
    if not result["ok"]:
        raise CheckFailed("DSpark output differs from no speculation in the TGI-side loop")
