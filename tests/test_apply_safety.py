"""Nothing is lost and nothing is half made: commits on a detached HEAD, failed first clones,
odd refs and odd workdirs. Real git throughout (the toy upstream of tests/git_fixtures.py)."""

from __future__ import annotations

import os
import time

import pytest

from dspark_cli import applier, flock
from dspark_cli.errors import PatchFailed, UsageError
from tests.git_fixtures import CORE, git, make_series, run_apply, toy_workspace, tree_fingerprint


@pytest.fixture
def toy(tmp_path, monkeypatch):
    return toy_workspace(tmp_path, monkeypatch)


def commit_on_detached_head(work) -> str:
    git(work, "checkout", "-q", "--detach")
    (work / "mine.py").write_text("x = 1\n")
    git(work, "add", "mine.py")
    git(work, "commit", "-q", "-m", "my detached work")
    return git(work, "rev-parse", "HEAD")


@pytest.mark.parametrize("operation", ["revert", "apply"])
def test_commits_on_a_detached_head_are_refused_then_kept_with_force(toy, operation):
    run_apply(toy)
    work = toy["workdir"]
    mine = commit_on_detached_head(work)
    status = applier.status(work)
    assert [c["commit"] for c in status["detached_commits"]] == [mine]
    assert any("detached with 1 commit(s) on no branch" in line for line in status["drift"])

    def run(**options):
        return applier.revert(work, **options) if operation == "revert" else run_apply(toy, **options)

    before = tree_fingerprint(work)
    with pytest.raises(UsageError, match=f"HEAD {mine[:12]} .* on no branch.*--force"):
        run()
    assert tree_fingerprint(work) == before
    result = run(force=True)
    assert any(f"dspark/saved-{mine[:12]}" in note for note in result["notes"])
    assert git(work, "rev-parse", f"refs/heads/dspark/saved-{mine[:12]}") == mine
    assert applier.status(work)["detached_commits"] == []


def test_a_detached_head_on_a_branch_commit_is_not_refused(toy):
    run_apply(toy)
    git(toy["workdir"], "checkout", "-q", "--detach", toy["upstream"]["v1.0"])
    assert applier.status(toy["workdir"])["detached_commits"] == []
    assert applier.revert(toy["workdir"])["status"] == "reverted"


def test_a_failed_first_clone_leaves_no_workdir_and_the_rerun_works(toy):
    with pytest.raises(UsageError, match="deadbeef1 was not found"):
        run_apply(toy, commit="deadbeef1", allow_unpinned=True)
    assert not toy["workdir"].exists()
    assert list(toy["root"].glob(".work.dspark-*")) == []
    assert run_apply(toy)["status"] == "applied"


def test_a_killed_clones_scratch_is_removed_by_the_next_clone_and_a_live_ones_kept(toy):
    """Was named by pid and removed only by a run of that same pid: a killed clone's stayed for
    good, and in a container (every run pid 1) a live run's was removed under it. A live run's
    refuses the clone at once, removing nothing; once that run is gone its scratch is a killed
    one's. A `making` name (not locked yet) is a live run's unless it is an hour old."""
    dead, live = toy["root"] / ".work.dspark-clone-dead", toy["root"] / ".work.dspark-clone-live"
    young, old = toy["root"] / ".work.dspark-making-young", toy["root"] / ".work.dspark-making-old"
    for scratch in (dead, live, young, old):
        (scratch / "tree").mkdir(parents=True)
    os.utime(old, (time.time() - 2 * flock.MAKING_DEAD_AFTER_S,) * 2)
    with flock.exclusive_nowait(live, directory=True) as (_, ours):
        assert ours
        with pytest.raises(UsageError, match=f"another dspark run is making {toy['workdir']} now"):
            run_apply(toy)
        assert len(list(toy["root"].glob(".work.dspark-*"))) == 4
    assert run_apply(toy)["status"] == "applied"
    assert sorted(p.name for p in toy["root"].glob(".work.dspark-*")) == [young.name]


def test_an_empty_workdir_is_cloned_into(toy):
    toy["workdir"].mkdir()
    assert run_apply(toy)["base"] == toy["upstream"]["v1.0"]


def test_a_failed_apply_in_a_repository_without_commits_leaves_it_without_any(toy):
    """An unborn branch has no commit to reset to: the rollback empties the index and removes what
    the apply checked out, and the next apply starts from the same empty repository."""
    work = toy["workdir"]
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    conflicting = make_series(toy["root"], toy["upstream"]["repo"], "mine", toy["upstream"]["v1.1"],
                              [("mine", {"engine/core.py": CORE.replace("line 25\n", "line 25 mine\n")})])
    with pytest.raises(PatchFailed, match="back to its state before the apply"):
        run_apply(toy, series=(conflicting,))
    assert git(work, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert git(work, "rev-parse", "-q", "--verify", "HEAD", check=False) == ""
    assert git(work, "status", "--porcelain", "--untracked-files=all") == ""
    assert [p.name for p in work.iterdir()] == [".git"] and git(work, "branch", "--list") == ""
    assert run_apply(toy)["status"] == "applied"


def test_a_ref_that_names_the_pinned_commit_is_that_pin(toy):
    result = run_apply(toy, commit="v1.1~1", allow_unpinned=True)
    assert result["branch"] == "dspark/v1.0" and result["drift"] == []
    assert any("pinned as v1.0" in note for note in result["notes"])


def test_an_unpinned_ref_gets_a_valid_branch_name(toy):
    git(toy["upstream"]["repo"], "commit", "-q", "--allow-empty", "-m", "after 1.1")
    result = run_apply(toy, commit="main~0", allow_unpinned=True)
    assert result["branch"] == f"dspark/unpinned-{result['base'][:12]}"


@pytest.mark.parametrize("blocking", ["dspark", "dspark/v1.0/mine"])
def test_a_branch_in_the_way_of_the_work_branch_is_a_clear_error(toy, blocking):
    """refs are paths: neither dspark nor dspark/v1.0/mine may exist beside dspark/v1.0."""
    git(toy["upstream"]["repo"], "branch", "dspark")
    toy["workdir"].mkdir()
    git(toy["root"], "clone", "-q", str(toy["upstream"]["repo"]), str(toy["workdir"]))
    git(toy["workdir"], "branch", blocking)
    with pytest.raises(UsageError, match=f"has a branch named {blocking}, so git cannot create dspark/v1.0"):
        run_apply(toy)


@pytest.mark.parametrize("workdir", ["afile", "afile/sub"])
def test_a_workdir_that_is_a_file_is_bad_input(toy, workdir):
    (toy["root"] / "afile").write_text("x\n")
    toy["workdir"] = toy["root"] / workdir
    with pytest.raises(UsageError, match="is a file, not a directory"):
        run_apply(toy)


@pytest.mark.parametrize("option", [{"package": "nonsense"}, {"file": "nonsense.whl"}])
def test_pypi_only_options_are_refused_with_the_git_source(toy, option):
    with pytest.raises(UsageError, match="only applies to --source pypi"):
        run_apply(toy, **option)
    assert not toy["workdir"].exists()


def test_a_short_id_that_git_resolves_to_another_commit_is_refused(toy):
    """A tag named like a short id (cafe1234) makes rev-parse pick the tag: HEAD is then not that id."""
    git(toy["upstream"]["repo"], "tag", "cafe1234", toy["upstream"]["v1.1"])
    with pytest.raises(UsageError, match="cafe1234 checked out as .*, not the pinned commit"):
        run_apply(toy, commit="cafe1234", allow_unpinned=True)
    assert not toy["workdir"].exists()


def test_applying_in_a_clone_of_yours_never_moves_your_tags(toy):
    """A repository of the user's that lacks the pin: upstream is fetched under refs/dspark-upstream
    and refs/remotes/dspark-upstream; their tag v1.0, on a commit of theirs, stays where it was."""
    work = toy["workdir"]
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    (work / "mine.txt").write_text("mine\n")
    git(work, "add", "mine.txt")
    git(work, "commit", "-q", "-m", "my project")
    git(work, "tag", "v1.0")
    git(work, "commit", "-q", "--allow-empty", "-m", "my next")
    mine = git(work, "rev-parse", "v1.0")
    result = run_apply(toy)
    assert result["status"] == "applied" and result["base"] == toy["upstream"]["v1.0"]
    assert git(work, "rev-parse", "v1.0") == mine and git(work, "rev-parse", "main~1") == mine
    assert git(work, "rev-parse", "refs/dspark-upstream/tags/v1.0") == toy["upstream"]["v1.0"]
    assert git(work, "tag") == "v1.0"  # upstream's v1.1 is not among the user's tags either


def test_clone_and_fetch_failures_say_gits_reason(toy):
    """The progress handler reads git's stderr: its fatal: line must still reach the one-line error."""
    from dspark_cli.errors import EnvironmentProblem

    not_a_repo = toy["root"] / "not-a-repo"  # as a local path refused before git runs (exit 2); as a URL, git's
    not_a_repo.mkdir()
    url = f"file://{not_a_repo}"
    reason = "fatal: .* does not appear to be a git repository; fatal: Could not read from remote"
    with pytest.raises(EnvironmentProblem, match=f"cannot clone {url}: {reason}"):
        run_apply(toy, repo=url)
    assert not toy["workdir"].exists()
    run_apply(toy)
    with pytest.raises(EnvironmentProblem, match=f"cannot fetch {url}: {reason}"):
        run_apply(toy, repo=url, commit="deadbeef1", allow_unpinned=True)


def test_a_workdir_or_repo_named_in_another_encoding_is_cloned_and_fetched(toy):
    """git prints the clone's path ("Cloning into '...'") and a fetch's URL on stderr, which
    GitPython read as strict UTF-8 in a thread: a path with a byte that is no UTF-8 (a latin-1 name)
    was a traceback, git killed by SIGPIPE and exit 3 with GitPython's cmdline dump."""
    import subprocess
    import sys

    from tests.run_cli import ROOT

    def run_dspark(*args, env):  # its output names the path as it is on disk, not UTF-8
        return subprocess.run([sys.executable, "-m", "dspark_cli", *args], capture_output=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **env}, errors="surrogateescape")

    env = {"DSPARK_COMPAT": str(toy["compat_path"])}
    work = toy["root"] / os.fsdecode(b"w\xe9rk")  # a surrogate in str, the byte 0xe9 on disk
    run = run_dspark("apply", "toy", "-C", str(work), env=env)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert git(work, "rev-parse", "HEAD") != toy["upstream"]["v1.0"]
    # a clone of the user's that lacks the pin fetches it from --repo, here a path in latin-1 too
    mirror = toy["root"] / os.fsdecode(b"mirr\xf6r")
    git(toy["root"], "clone", "-q", "--bare", str(toy["upstream"]["repo"]), str(mirror))
    mine = toy["root"] / "mine"
    mine.mkdir()
    git(mine, "init", "-q", "-b", "main")
    git(mine, "commit", "-q", "--allow-empty", "-m", "my project")
    run = run_dspark("apply", "toy", "-C", str(mine), "--repo", str(mirror), env=env)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert git(mine, "rev-parse", "refs/dspark-upstream/tags/v1.0") == toy["upstream"]["v1.0"]


def test_a_failed_git_command_is_named_past_its_global_options(tmp_path):
    """Was `git -c failed: ...` and `git --work-tree failed: ...`."""
    from dspark_cli.workspace import Git, GitFailed

    git_in = Git(tmp_path)  # not a repository: every command below fails
    for args, name in ((("-c", "commit.gpgsign=false", "commit", "-q", "-m", "x"), "commit"),
                       (("--work-tree", str(tmp_path), "add", "-A"), "add"), (("rev-parse", "HEAD"), "rev-parse")):
        with pytest.raises(GitFailed, match=rf"^git {name} failed: fatal: not a git repository"):
            git_in.run(*args)


def test_a_fetch_from_another_url_fetches_from_that_url(tmp_path):
    """The workspace's upstream remote was made for the first URL: a fetch with another (--repo
    changed) sets the remote to it and fetches from it, not from the old one."""
    from dspark_cli import git_source
    from dspark_cli.workspace import Workspace

    heads = {}
    for name in ("first", "second"):
        repo = tmp_path / name
        repo.mkdir()
        git(repo, "init", "-q", "-b", "main")
        (repo / "f.txt").write_text(f"{name}\n")
        git(repo, "add", "f.txt")
        git(repo, "commit", "-q", "-m", name)
        heads[name] = git(repo, "rev-parse", "HEAD")
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    ws = Workspace(work)
    for name in ("first", "second"):
        git_source.fetch(ws, str(tmp_path / name))
        assert git(work, "rev-parse", f"refs/remotes/{git_source.UPSTREAM}/main") == heads[name]
    assert git(work, "config", "--get", f"remote.{git_source.UPSTREAM}.url") == str(tmp_path / "second")
