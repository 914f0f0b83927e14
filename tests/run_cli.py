"""The `dspark` command in a fresh process, as a user runs it: real exit codes, stdout and stderr."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_dspark(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m dspark_cli ARGS` with this checkout importable; `env` adds to os.environ."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "dspark_cli", *args], env=full, cwd=cwd, capture_output=True, text=True)


def signal_dspark_when(waiting: Path | list[Path], sig: int, *args: str, env: dict | None = None) -> tuple[int, str, str]:
    """Run `python -m dspark_cli ARGS` as run_dspark does, send it `sig` once `waiting` exists (a
    stand-in git on PATH makes it where it stops), or once each of a list exists in turn (a second
    Ctrl-C); (exit code, stdout, stderr)."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    # SIG_DFL in the child: a run from a background job (nohup, CI) inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-m", "dspark_cli", *args], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for stop in [waiting] if isinstance(waiting, Path) else waiting:
        deadline = time.monotonic() + 120
        while not stop.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stop.exists(), proc.communicate()
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


def run_bound_by_permissions(*args: str) -> subprocess.CompletedProcess:
    """`dspark ARGS` as a process that permission bits bind: root runs it without the capabilities
    that let it read and search anything (as root, a mode-000 directory is readable)."""
    if os.geteuid() != 0:
        return run_dspark(*args)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, which bypasses permission bits, and no setpriv to drop that")
    drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    if subprocess.run([*drop, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root, which bypasses permission bits, and setpriv cannot drop that here")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*drop, sys.executable, "-m", "dspark_cli", *args], env=env, capture_output=True, text=True)
