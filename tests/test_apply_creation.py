"""Making a workspace (a first clone, a pypi tree) while another run makes one for the same
workdir: no workspace lock can cover it (there is no workspace yet), so each builds in its own
flocked sibling: a run that finds another's in use is refused at once, killed runs' are cleared,
and of two that start together the first to move in wins. Real git and the real CLI."""

from __future__ import annotations

import tarfile

import pytest

from dspark_cli import flock, git_source
from dspark_cli.errors import UsageError
from dspark_cli.series import sha256_of
from tests.git_fixtures import toy_workspace
from tests.run_cli import run_bound_by_permissions, run_dspark


@pytest.fixture
def toy(tmp_path, monkeypatch):
    return toy_workspace(tmp_path, monkeypatch)


def test_a_pypi_create_beside_a_live_one_is_refused_at_once_and_clears_only_killed_ones(toy, tmp_path):
    """While another run builds the same workdir (it holds a flock on its sibling) a second is
    refused before it extracts anything, changing nothing. Once that run is gone its sibling is a
    killed run's: the next apply clears it and the other dead one, but not a sibling a live run has
    just made and not yet locked (it still has its `making` name)."""
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
    apply = ("apply", "toy", "--source", "pypi", "-C", str(tmp_path / "pypi-work"))
    env = {"DSPARK_COMPAT": str(toy["compat_path"])}
    with flock.exclusive_nowait(live, directory=True) as (_, ours):  # a live run's
        assert ours
        refused = run_dspark(*apply, env=env)
    assert refused.returncode == 2
    assert f"another dspark run is making {tmp_path / 'pypi-work'} now (in {live.name})" in refused.stderr
    assert "extracting" not in refused.stderr
    assert {p.name for p in tmp_path.glob(".pypi-work.*")} == {live.name, dead.name, young.name}
    assert not (tmp_path / "pypi-work").exists()
    made = run_dspark(*apply, env=env)
    assert made.returncode == 0, made.stderr
    assert {p.name for p in tmp_path.glob(".pypi-work.*")} == {young.name}  # the dead, the gone and ours


def test_a_clone_beside_a_live_one_is_refused_at_once(toy, tmp_path):
    """Another run is cloning into the same workdir: this one is refused before cloning anything."""
    work = tmp_path / "cloning"
    live = tmp_path / ".cloning.dspark-clone-a"
    live.mkdir()
    with flock.exclusive_nowait(live, directory=True) as (_, ours):  # a live run's
        assert ours
        refused = run_dspark("apply", "toy", "-C", str(work), env={"DSPARK_COMPAT": str(toy["compat_path"])})
    assert refused.returncode == 2
    assert f"another dspark run is making {work} now (in {live.name}); run again when it has finished" in refused.stderr
    assert f"into {work}" not in refused.stderr  # (`cloning URL into DIR` comes before a clone)
    assert not work.exists() and [p.name for p in tmp_path.glob(".cloning.*")] == [live.name]


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


def test_status_of_a_workdir_still_being_made_or_left_half_made_says_so(toy, tmp_path):
    """A first apply still making the workdir, or killed while making it, left a sibling (a whole
    release tree): status names it instead of only saying the workdir does not exist."""
    work, env = tmp_path / "half", {"DSPARK_COMPAT": str(toy["compat_path"])}
    sibling = tmp_path / ".half.dspark-new-x"
    sibling.mkdir()
    with flock.exclusive_nowait(sibling, directory=True) as (_, ours):  # a live run's
        assert ours
        live = run_dspark("status", "-C", str(work), env=env)
    assert live.returncode == 2
    assert f"a dspark apply is making it now (in {sibling.name}): run again when it has finished" in live.stderr
    killed = run_dspark("status", "-C", str(work), env=env)
    assert killed.returncode == 2
    assert f"an apply killed while making it left {sibling}, which the next `dspark apply`" in killed.stderr
    cloning = tmp_path / ".half.dspark-clone-y"  # a live clone beside the killed one: named first
    cloning.mkdir()
    with flock.exclusive_nowait(cloning, directory=True) as (_, ours):  # a live run's
        assert ours
        both = run_dspark("status", "-C", str(work), env=env)
    assert f"a dspark apply is making it now (in {cloning.name})" in both.stderr, both.stderr


def test_a_sibling_this_user_cannot_open_blocks_nothing(toy, tmp_path, monkeypatch):
    """A killed run of another user (sudo) left a mode-0700 sibling we cannot open to read its lock:
    it was taken as a live run's, and every apply of that workdir was refused for good."""
    sibling = tmp_path / ".blocked.dspark-clone-x"
    sibling.mkdir(mode=0o000)
    monkeypatch.setenv("DSPARK_COMPAT", str(toy["compat_path"]))
    try:
        made = run_bound_by_permissions("apply", "toy", "-C", str(tmp_path / "blocked"))
    finally:
        sibling.chmod(0o700)
    assert made.returncode == 0, made.stderr


def test_apply_in_the_empty_current_directory_is_refused_before_anything_is_fetched(toy):
    """`dspark apply toy -C .` in an empty directory renamed the new workspace over it: the shell
    that ran it was left in a removed directory (no tree to see there), and its next `dspark status
    -C .` was exit 3, `error: [Errno 2] No such file or directory`. Refused (exit 2), nothing made;
    from the parent directory the same run works."""
    work = toy["workdir"]
    work.mkdir()
    env = {"DSPARK_COMPAT": str(toy["compat_path"])}
    refused = run_dspark("apply", "toy", "-C", ".", env=env, cwd=work)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == (
        f"error: --workdir {work} is the current directory, which a new workspace replaces (your shell would be "
        f"left in a removed directory): run from its parent, with --workdir {work.name}")
    assert list(work.iterdir()) == [] and not list(work.parent.glob(f".{work.name}.dspark-*"))
    done = run_dspark("apply", "toy", "-C", work.name, env=env, cwd=work.parent)
    assert done.returncode == 0, done.stderr
    assert run_dspark("status", "-C", ".", env=env, cwd=work).returncode == 0
    again = run_dspark("apply", "toy", "-C", ".", env=env, cwd=work)  # the workspace is there now: nothing replaces it
    assert again.returncode == 0, again.stderr
