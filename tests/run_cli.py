"""The `dspark` command in a fresh process, as a user runs it: real exit codes, stdout and stderr."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_dspark(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m dspark_cli ARGS` with this checkout importable; `env` adds to os.environ."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "dspark_cli", *args], env=full, cwd=cwd, capture_output=True, text=True)
