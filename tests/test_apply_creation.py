"""Making a workspace (a first clone, a pypi tree) while another run makes one for the same
workdir: no lock can cover it (there is no workspace yet), so each builds in its own sibling,
never removes another live run's, and the first to move in wins. Real git and the real CLI."""

from __future__ import annotations

import fcntl
import os
import tarfile

import pytest

from dspark_cli import git_source
from dspark_cli.errors import UsageError
from dspark_cli.series import sha256_of
from tests.git_fixtures import toy_workspace
from tests.run_cli import run_dspark


@pytest.fixture
def toy(tmp_path, monkeypatch):
    return toy_workspace(tmp_path, monkeypatch)


def test_concurrent_pypi_creates_keep_each_others_temporary_tree(toy, tmp_path):
    """Making a pypi workspace clears what killed runs left beside it, but not the sibling another
    run is building in right now (it holds a flock on it, or has just made it and not yet locked
    it: that one still has its `making` name)."""
    sdist = tmp_path / "toy-engine-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(toy["upstream"]["repo"] / "engine", arcname="toy-engine-1.0/engine")
    (tmp_path / "cache" / "releases").mkdir(parents=True)
    (tmp_path / "cache" / "releases" / sdist.name).write_bytes(sdist.read_bytes())  # no download
    toy["compat_path"].write_text(toy["compat_path"].read_text().replace("releases: []", (
        "releases:\n          - package: toy-engine\n            version: '1.0'\n"
        f"            file: {sdist.name}\n            sha256: {sha256_of(sdist)}")))
    live, dead = tmp_path / ".pypi-work.dspark-new-a", tmp_path / ".pypi-work.dspark-new-b"
    young = tmp_path / ".pypi-work.dspark-making-c"  # made by a live run, not flocked yet
    for sibling in (live, dead, young):
        sibling.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        made = run_dspark("apply", "toy", "--source", "pypi", "-C", str(tmp_path / "pypi-work"),
                          env={"DSPARK_COMPAT": str(toy["compat_path"])})
        assert made.returncode == 0, made.stderr
    finally:
        os.close(fd)
    assert {p.name for p in tmp_path.glob(".pypi-work.*")} == {live.name, young.name}  # dead and ours gone


def test_a_clone_that_lost_the_race_for_the_workdir_leaves_nothing(toy, tmp_path):
    """Another run moved its clone into the workdir first: this one's clone is removed, and it is
    refused (exit 2) with the other's workdir left as it is."""
    work = tmp_path / "raced"
    work.mkdir()
    (work / "theirs").write_text("made by the other run\n")
    with pytest.raises(UsageError, match="was made by another dspark run"):
        git_source._fresh_clone(work, str(toy["upstream"]["repo"]), toy["upstream"]["v1.0"], "v1.0")
    assert [p.name for p in work.iterdir()] == ["theirs"]
    assert not list(tmp_path.glob(".raced.dspark-clone-*"))
