"""Run one of our modules in an engine's own Python (its venv: vLLM, the TGI shard) with a JSON spec
in and a JSON result out, so the caller never imports the engine:

    python -m <module> SPEC.json OUT.json"""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # this dspark_cli, a checkout's or an installed one
UNAVAILABLE_EXIT = 3  # the module's exit when the engine itself cannot run here (EngineUnavailable)


class EngineUnavailable(RuntimeError):
    """The engine does not start here even without DSpark (no GPU for a CUDA build, say): raised
    by the module for run_module to raise in turn, so the caller can tell it from a DSpark failure."""


def run_module(python: str, module: str, spec: dict, timeout_s: float, what: str, env: dict | None = None) -> dict:
    """`python -m module SPEC.json OUT.json` -> OUT; RuntimeError("<what> failed …" + output tail) if it fails."""
    with tempfile.TemporaryDirectory(prefix="dspark-spec-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        # The engine's Python imports this dspark_cli, whatever its site-packages hold, and nothing else
        # of ours: the folder holding an installed dspark_cli is our whole site-packages (our torch).
        only_ours = Path(tmp) / "path"
        only_ours.mkdir()
        (only_ours / "dspark_cli").symlink_to(PACKAGE_DIR, target_is_directory=True)
        pythonpath = os.pathsep.join(filter(None, [str(only_ours), os.environ.get("PYTHONPATH")]))
        # Its own process group: the engine's processes (vLLM's engine core and workers) are its
        # children, which outlive a kill of it alone (a timeout, Ctrl-C), so they go with the group.
        with subprocess.Popen([python, "-m", module, str(spec_path), str(out_path)],
                              env={**os.environ, **(env or {}), "PYTHONPATH": pythonpath}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=timeout_s)
            except BaseException:
                _end_group(proc)
                raise
        if proc.returncode != 0 or not out_path.exists():
            failure = EngineUnavailable if proc.returncode == UNAVAILABLE_EXIT else RuntimeError
            raise failure(f"{what} failed (exit {proc.returncode}):\n{(stdout + stderr)[-4000:]}")
        return json.loads(out_path.read_text())


GRACE_S = 5  # for the run to shut down on SIGTERM before SIGKILL


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the run's process group, then, once the run has exited (or after GRACE_S), SIGKILL
    to what is left of the group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone
            break
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pass


def one_line(exc: Exception) -> str:
    """run_module's failure in one line: its header and the output's last line (the error raised)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) < 2:
        return lines[0] if lines else type(exc).__name__
    return f"{lines[0]} {lines[-1]}"


def serve_spec(run) -> None:
    """The module side (its `__main__`): OUT.json = run(SPEC.json) for the paths on the command line."""
    spec_path, out_path = sys.argv[1:3]
    try:
        result = run(json.loads(Path(spec_path).read_text()))
    except EngineUnavailable as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(UNAVAILABLE_EXIT)
    Path(out_path).write_text(json.dumps(result))
