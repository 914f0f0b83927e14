"""`dspark status` against what it must notice: compat.yaml's pin moving, a corrupt state file,
an interrupted layered apply. Real git, real processes where a kill is involved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_cli import applier, compat
from dspark_cli.errors import UsageError
from dspark_cli.workspace import KILL_AT_ENV
from tests.git_fixtures import git, make_series, make_toy, write_compat
from tests.run_cli import run_dspark

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy(tmp_path, monkeypatch):
    t = make_toy(tmp_path, monkeypatch)
    work = tmp_path / "work"
    applier.apply(compat.load(t["compat_path"]), applier.ApplyRequest(engine="toy", workdir=work))
    return {**t, "workdir": work}


def test_status_reports_a_base_that_is_no_longer_the_pin(toy, monkeypatch):
    """Against the compat.yaml the workspace was applied from, whatever DSPARK_COMPAT says now."""
    monkeypatch.delenv("DSPARK_COMPAT", raising=False)
    assert applier.status(toy["workdir"])["drift"] == []
    write_compat(toy["root"], toy["upstream"], toy["series"], commit=toy["upstream"]["v1.1"])
    drift = applier.status(toy["workdir"])["drift"]
    assert drift == [f"base {toy['upstream']['v1.0'][:12]} differs from compat.yaml's pin v1.0 "
                     f"({toy['upstream']['v1.1'][:12]}); apply it in a new --workdir"]


def test_a_relative_compat_path_is_recorded_resolved(toy, monkeypatch):
    """DSPARK_COMPAT=compat.yaml at apply time: status from another directory must find that file."""
    monkeypatch.delenv("DSPARK_COMPAT", raising=False)
    monkeypatch.chdir(toy["root"])
    work = toy["root"] / "work-relative"
    applier.apply(compat.load(Path("compat.yaml")), applier.ApplyRequest(engine="toy", workdir=work))
    state = json.loads((work / ".git" / "dspark" / "state.json").read_text())
    assert state["compat"] == str(toy["compat_path"].resolve())
    monkeypatch.chdir(work)
    assert applier.status(work)["drift"] == []


@pytest.mark.parametrize("text", ["[]", "{}", '{"base": "x", "branch": "y", "in_progress": {"op": 1}}',
                                  '{"base": "x", "branch": "y", "layers": [1]}'])
def test_a_state_file_of_the_wrong_shape_is_one_clear_error(toy, text):
    (toy["workdir"] / ".git" / "dspark" / "state.json").write_text(text)
    for operation in (applier.status, applier.revert):
        with pytest.raises(UsageError, match="corrupt dspark state, .*; move it away and run `dspark apply` again"):
            operation(toy["workdir"])


def test_status_after_an_interrupted_layered_apply(toy):
    """The state still holds the layers before the apply: status must not call the new layer's
    half-applied patch 'no longer in its series'; the next apply recovers and finishes."""
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                       [("team: readme", {"README.team": "ours\n"})])
    env = {**os.environ, KILL_AT_ENV: "committed:1", "PYTHONPATH": str(REPO_ROOT),
           "DSPARK_COMPAT": str(toy["compat_path"])}
    killed = subprocess.run([sys.executable, "-m", "dspark_cli", "apply", "toy", "-C", str(toy["workdir"]),
                             "--series", str(team)], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert git(toy["workdir"], "log", "-1", "--format=%s") == "team: readme"
    status = applier.status(toy["workdir"])
    assert [p["label"] for p in status["applied"]] == ["dspark/0001-dspark-hook-in-core.patch",
                                                       "dspark/0002-dspark-method-and-module.patch"]
    assert len(status["drift"]) == 1 and "interrupted apply" in status["drift"][0]
    state = json.loads((toy["workdir"] / ".git" / "dspark" / "state.json").read_text())
    assert state["in_progress"]["op"] == "apply"


def test_status_shows_a_failed_kernel_build_beside_the_last_good_one(toy, monkeypatch, tmp_path):
    """A failed build goes to last-failed.json so the runtime keeps loading the good one: status
    must show both, not only the good one (the failure would go unseen)."""
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    build_dir = tmp_path / "cache" / "build"
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "last.json").write_text(json.dumps({"status": "built", "key": "good"}))
    (build_dir / "last-failed.json").write_text(json.dumps({"status": "failed", "key": "bad"}))
    records = applier.status(toy["workdir"])["build"]
    assert [(Path(r["file"]).name, r["record"]["status"]) for r in records] == [
        ("last.json", "built"), ("last-failed.json", "failed")]



def test_status_names_a_series_layer_it_can_no_longer_read(toy):
    """Status reads the layers through the function revert uses (applier._layer_patches): a layer
    that cannot be read is a drift line, and the layers that can still count."""
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                       [("team: readme", {"README.team": "ours\n"})])
    applier.apply(compat.load(toy["compat_path"]),
                  applier.ApplyRequest(engine="toy", workdir=toy["workdir"], series=(team,)))
    (team / "series").unlink()
    out = run_dspark("status", "-C", str(toy["workdir"]), "--json", env={"DSPARK_COMPAT": str(toy["compat_path"])})
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert len(doc["applied"]) == 3
    assert doc["drift"] == [
        f"series team cannot be read: {team / 'series'}: missing (a series directory needs a `series` file)",
        "team/0001-team-readme.patch is applied but no longer in its series"]
