"""apply and revert against what else happens in a repository: another dspark run at the same
time, a clone of the user's, submodules, other worktrees, merges among the user's commits. Real
git and the real CLI in its own process throughout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dspark_cli import applier, oplock
from dspark_cli import series as series_files
from dspark_cli.errors import PatchFailed, UsageError
from dspark_cli.workspace import KILL_AT_ENV
from tests.git_fixtures import CORE, git, make_series, run_apply, toy_workspace, tree_fingerprint
from tests.run_cli import run_dspark, signal_dspark_when


@pytest.fixture
def toy(tmp_path, monkeypatch):
    return toy_workspace(tmp_path, monkeypatch)


def dspark(toy, *args: str, kill_after: str | None = None):
    env = {"DSPARK_COMPAT": str(toy["compat_path"]), **({KILL_AT_ENV: kill_after} if kill_after else {})}
    return run_dspark(*args, env=env)


def user_commit(work: Path, name: str, text: str = "mine\n") -> str:
    (work / name).write_text(text)
    git(work, "add", name)
    git(work, "commit", "-q", "-m", f"user: {name}")
    return git(work, "rev-parse", "HEAD")


# -- 1. one apply/revert at a time -----------------------------------------------------------------

def test_a_second_run_is_refused_while_one_holds_the_workspace(toy):
    """The test process holds the lock as a running apply does (the same helper); the CLI, another
    process, must refuse at once and change nothing, even with a killed run's snapshot to recover
    and that run's git's index.lock lying there."""
    work = toy["workdir"]
    assert dspark(toy, "apply", "toy", "-C", str(work), kill_after="committed:1").returncode == -signal.SIGKILL
    git_dir = work / ".git"
    (git_dir / "index.lock").write_text("")  # as a live git holds it
    state = (git_dir / "dspark" / "state.json").read_bytes()
    (work / "engine" / "config.py").write_text("mine\n")
    before = tree_fingerprint(work)
    with oplock.exclusive(git_dir, work):
        for command in (["apply", "toy", "-C", str(work), "--force"], ["revert", "-C", str(work), "--force"]):
            refused = dspark(toy, *command)
            assert refused.returncode == 2, refused.stderr
            assert refused.stderr.strip() == f"error: another dspark apply, revert or rebase (pid {os.getpid()}) is running on {work} or another worktree of its repository"
        assert (git_dir / "index.lock").exists()
        assert (git_dir / "dspark" / "state.json").read_bytes() == state
        (git_dir / "index.lock").unlink()
        assert tree_fingerprint(work) == before
    assert not oplock.held(git_dir)
    recovered = dspark(toy, "apply", "toy", "-C", str(work), "--force")  # the lock is free again
    assert recovered.returncode == 0, recovered.stderr


# -- 2. a failed first apply in a clone of the user's ----------------------------------------------

def test_a_failed_first_apply_in_a_clone_leaves_no_workspace_behind(toy, tmp_path):
    clone = tmp_path / "my-clone"
    git(tmp_path, "clone", "-q", str(toy["upstream"]["repo"]), str(clone))
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"], [
        ("team: conflicting core edit", {"engine/core.py": CORE.replace("line 11\n", "line eleven\n")})])
    before = tree_fingerprint(clone)
    failed = dspark(toy, "apply", "toy", "-C", str(clone), "--series", str(team))
    assert failed.returncode == 4, failed.stderr
    assert tree_fingerprint(clone) == before
    assert not (clone / ".git" / "dspark" / "state.json").exists()
    assert git(clone, "for-each-ref", "refs/dspark") == ""  # the patch blobs' refs went with it
    status = dspark(toy, "status", "-C", str(clone))
    assert status.returncode == 2 and "is not a dspark workspace" in status.stderr
    assert dspark(toy, "apply", "toy", "-C", str(clone)).returncode == 0  # a clean start, as before



def test_a_failed_first_apply_in_another_worktree_keeps_this_workspaces_patch_copies(toy, tmp_path):
    """Worktrees share refs: a first apply that failed in a linked worktree removed every
    refs/dspark/patches/* of the repository, the main worktree's workspace's too, so after a gc and
    a change to its series, status called its patch commit "applied by an older dspark ... may hold
    changes of yours" and revert refused it (exit 2)."""
    clone = tmp_path / "my-clone"
    git(tmp_path, "clone", "-q", str(toy["upstream"]["repo"]), str(clone))
    assert dspark(toy, "apply", "toy", "-C", str(clone)).returncode == 0
    kept = git(clone, "for-each-ref", "refs/dspark/patches")
    other = tmp_path / "other"
    git(clone, "worktree", "add", "-q", "--detach", str(other), "v1.1")
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"], [
        ("team: conflicting core edit", {"engine/core.py": CORE.replace("line 25\n", "line twenty-five\n")})])
    failed = dspark(toy, "apply", "toy", "-C", str(other), "--commit", "v1.1", "--allow-unpinned", "--series", str(team))
    assert failed.returncode == 4, failed.stderr
    assert git(clone, "for-each-ref", "refs/dspark/patches") == kept
    git(clone, "gc", "-q", "--prune=now")
    second = sorted(toy["series"].glob("0002-*.patch"))[0]  # a newer dspark's fix of the patch
    second.write_text(second.read_text().replace("Why:", "Why (fixed):"))
    series_files.write_lock(toy["series"])
    reverted = dspark(toy, "revert", "-C", str(clone))
    assert reverted.returncode == 0, reverted.stderr
    assert git(clone, "rev-parse", "HEAD") == toy["upstream"]["v1.0"]


def test_a_revert_after_a_killed_first_apply_undoes_it_and_says_so(toy, tmp_path):
    """The revert's recovery undoes the killed first apply and removes its state: nothing is left
    to revert (it read the state it had just removed: a traceback, exit 1)."""
    clone = tmp_path / "my-clone"
    git(tmp_path, "clone", "-q", str(toy["upstream"]["repo"]), str(clone))
    (clone / "engine" / "config.py").write_text("mine\n")
    before = tree_fingerprint(clone)
    killed = dspark(toy, "apply", "toy", "-C", str(clone), "--force", kill_after="committed:1")
    assert killed.returncode == -signal.SIGKILL
    reverted = dspark(toy, "revert", "-C", str(clone))
    assert reverted.returncode == 0, reverted.stderr
    assert "nothing to revert" in reverted.stdout and "Traceback" not in reverted.stderr
    assert tree_fingerprint(clone) == before
    assert not (clone / ".git" / "dspark" / "state.json").exists()

# -- 3. changes git stash cannot save --------------------------------------------------------------

@pytest.mark.parametrize("name", ["vendor/sub", "vendor/süb mod"])  # git status quotes the latter
def test_changes_inside_a_submodule_are_refused_even_with_force(toy, tmp_path, name):
    sub = tmp_path / "sub"
    sub.mkdir()
    git(sub, "init", "-q", "-b", "main")
    user_commit(sub, "a.txt")
    clone = tmp_path / "my-clone"
    git(tmp_path, "clone", "-q", str(toy["upstream"]["repo"]), str(clone))
    git(clone, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(sub), name)
    git(clone, "commit", "-q", "-m", "user: a submodule")
    (clone / name / "a.txt").write_text("edited inside the submodule\n")
    before = tree_fingerprint(clone)
    refused = dspark(toy, "apply", "toy", "-C", str(clone), "--force")
    assert refused.returncode == 2, refused.stderr
    assert f"changes inside submodule(s) {name}, which git stash cannot save" in refused.stderr
    assert "None" not in refused.stderr + refused.stdout
    assert tree_fingerprint(clone) == before
    assert not (clone / ".git" / "dspark" / "state.json").exists()
    assert (clone / name / "a.txt").read_text() == "edited inside the submodule\n"


def test_files_untracked_inside_a_submodule_are_left_alone_not_refused(toy, tmp_path):
    """No stash, checkout or reset recurses into a submodule: a build's output in one stays as it
    is, and neither apply nor revert needs --force for it."""
    sub = tmp_path / "sub"
    sub.mkdir()
    git(sub, "init", "-q", "-b", "main")
    user_commit(sub, "a.txt")
    work = toy["workdir"]
    assert dspark(toy, "apply", "toy", "-C", str(work)).returncode == 0
    git(work, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(sub), "vendor/sub")
    git(work, "commit", "-q", "-m", "user: a submodule")
    (work / "vendor" / "sub" / "build.o").write_bytes(b"object")
    reverted = dspark(toy, "revert", "-C", str(work), "--keep-user-commits")
    assert reverted.returncode == 0, reverted.stderr
    again = dspark(toy, "apply", "toy", "-C", str(work))
    assert again.returncode == 0, again.stderr
    assert (work / "vendor" / "sub" / "build.o").read_bytes() == b"object"


def test_a_workdir_that_is_a_submodule_of_the_users_is_no_other_worktree(toy, tmp_path):
    """The engine tree vendored as a submodule of a superproject: git's `worktree list` names a
    submodule's worktree by its git directory (.git/modules/...), so revert, and apply with a
    layer added, refused: "branch dspark/v1.0 is checked out in another worktree, .../.git/modules/..."."""
    superproject = tmp_path / "platform"
    superproject.mkdir()
    git(superproject, "init", "-q", "-b", "main")
    git(superproject, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(toy["upstream"]["repo"]),
        "engines/toy")
    git(superproject, "commit", "-q", "-m", "user: the engine as a submodule")
    work = superproject / "engines" / "toy"
    assert dspark(toy, "apply", "toy", "-C", str(work)).returncode == 0
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                       [("team: readme", {"TEAM.md": "team\n"})])
    layered = dspark(toy, "apply", "toy", "-C", str(work), "--series", str(team))
    assert layered.returncode == 0, layered.stderr
    assert (work / "TEAM.md").read_text() == "team\n"
    reverted = dspark(toy, "revert", "-C", str(work))
    assert reverted.returncode == 0, reverted.stderr
    assert git(work, "rev-parse", "HEAD") == toy["upstream"]["v1.0"]
    assert git(work, "symbolic-ref", "HEAD") == "refs/heads/dspark/v1.0"


def test_commit_messages_keep_their_hash_lines_whatever_the_users_commit_cleanup(toy, tmp_path):
    """With commit.cleanup=strip in the user's git config, revert --keep-user-commits replayed a
    commit of the user's without its `#123 ...` line: part of their message lost. The message comes
    back byte for byte."""
    config = tmp_path / "user.gitconfig"
    config.write_text("[commit]\n\tcleanup = strip\n[user]\n\tname = U\n\temail = u@x\n")
    work = toy["workdir"]
    assert dspark(toy, "apply", "toy", "-C", str(work)).returncode == 0
    (work / "mine.txt").write_text("mine\n")
    git(work, "add", "mine.txt")
    # trailing spaces and a run of blank lines too: a plain cherry-pick keeps them (verbatim), and
    # so must the replay (commit.cleanup=whitespace, right for `commit -F`, would clean them)
    message = "user: mine  \n\n\n\n#123 the issue this fixes   \n\n\n"
    git(work, "commit", "-q", "--cleanup=verbatim", "-m", message)
    env = {"DSPARK_COMPAT": str(toy["compat_path"]), "GIT_CONFIG_GLOBAL": str(config)}
    reverted = run_dspark("revert", "-C", str(work), "--keep-user-commits", env=env)
    assert reverted.returncode == 0, reverted.stderr
    replayed = subprocess.run(["git", "cat-file", "commit", "HEAD"], cwd=work, capture_output=True, text=True,
                              check=True).stdout  # as git stores it (git() strips its output)
    assert replayed.split("\n\n", 1)[1] == message


def nested_repository(work: Path, path: str) -> Path:
    """A clone of the user's inside the tree, untracked, with a commit and an uncommitted edit."""
    nested = work / path
    nested.mkdir(parents=True)
    git(nested, "init", "-q", "-b", "main")
    user_commit(nested, "tracked.txt")
    (nested / "tracked.txt").write_text("edited, not committed\n")
    return nested


def test_a_nested_repository_is_left_alone_not_stashed(toy):
    """git stash skips a repository inside the tree ("Ignoring path"): with --force, apply reported
    the local changes "saved as stash@{0}", an empty stash; without, it refused a change it cannot save."""
    work = toy["workdir"]
    assert dspark(toy, "apply", "toy", "-C", str(work)).returncode == 0
    nested = nested_repository(work, "tools/mine")
    reverted = dspark(toy, "revert", "-C", str(work))
    assert reverted.returncode == 0, reverted.stderr
    applied = dspark(toy, "apply", "toy", "-C", str(work), "--force", "--json")
    assert applied.returncode == 0, applied.stderr
    assert not any("stash" in note for note in json.loads(applied.stdout)["notes"]), applied.stdout
    assert git(work, "stash", "list") == ""
    assert (nested / "tracked.txt").read_text() == "edited, not committed\n"
    assert git(nested, "log", "--format=%s") == "user: tracked.txt"



@pytest.mark.parametrize("path", ["my tools/mine", "tools/clöne", 'tools/"quoted"'])
def test_a_nested_repository_whose_path_git_quotes_is_left_alone_too(toy, path):
    """git status --porcelain quotes a path with a space, a non-ASCII letter or a quote
    (`?? "my tools/mine/"`): the nested repository was taken for a local change, so apply refused
    without --force, made an empty stash with it ("saved as stash@{0}"), and status reported it."""
    work = toy["workdir"]
    assert dspark(toy, "apply", "toy", "-C", str(work)).returncode == 0
    nested = nested_repository(work, path)
    reverted = dspark(toy, "revert", "-C", str(work))
    assert reverted.returncode == 0, reverted.stderr
    applied = dspark(toy, "apply", "toy", "-C", str(work), "--json")
    assert applied.returncode == 0, applied.stderr
    assert not any("stash" in note for note in json.loads(applied.stdout)["notes"]), applied.stdout
    assert git(work, "stash", "list") == ""
    status = dspark(toy, "status", "-C", str(work), "--json")
    assert json.loads(status.stdout)["drift"] == [], status.stdout
    assert (nested / "tracked.txt").read_text() == "edited, not committed\n"

def test_a_series_layer_kept_untracked_in_the_workdir_applies_with_force(toy, tmp_path):
    """--series naming a directory inside the workdir, untracked there: --force stashed it with the
    other local changes before its patches were read, and the apply failed on a file that exists
    (exit 3, "...team/0001-team-readme.patch: No such file or directory")."""
    work = toy["workdir"]
    assert dspark(toy, "apply", "toy", "-C", str(work)).returncode == 0
    team = make_series(tmp_path, toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                       [("team: readme", {"TEAM.md": "team\n"})])
    shutil.move(str(team), str(work / "team"))
    applied = dspark(toy, "apply", "toy", "-C", str(work), "--series", str(work / "team"), "--force", "--json")
    assert applied.returncode == 0, applied.stderr
    assert (work / "TEAM.md").read_text() == "team\n"
    assert git(work, "log", "-1", "--format=%s") == "team: readme"
    assert any("stash@{0}" in note for note in json.loads(applied.stdout)["notes"]), applied.stdout
    git(work, "stash", "pop")
    assert (work / "team" / "series").is_file()


def hidden_edit_refusal(work, flag: str) -> str:
    """The one line apply and revert refuse an edit git status and git stash pass by with."""
    return (f"error: {work} has local changes to engine/config.py, marked {flag}: git status does not show "
            "them and git stash does not save them, so not even --force would keep them; clear the flag "
            f"(`git update-index --no-{flag} <path>`) and run again\n")


def test_a_nested_repository_where_a_checkout_writes_is_refused_even_with_force(toy):
    """git checkout -f writes tracked files into an untracked repository at their path, over its own."""
    work = toy["workdir"]
    assert dspark(toy, "apply", "toy", "-C", str(work)).returncode == 0
    git(work, "checkout", "-q", "-b", "mine")
    git(work, "rm", "-q", "-r", "engine")
    git(work, "commit", "-q", "-m", "user: no engine")
    nested = nested_repository(work, "engine")
    (nested / "config.py").write_text("the nested repository's own\n")
    before = tree_fingerprint(work)
    refused = dspark(toy, "revert", "-C", str(work), "--force", "--keep-user-commits")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr == (f"error: {work} has git repositories of their own where revert would check out tracked "
                              "files (engine); the checkout would overwrite files in them, so not even --force goes "
                              "ahead: move them away and run again\n")
    assert tree_fingerprint(work) == before
    assert (nested / "config.py").read_text() == "the nested repository's own\n"

@pytest.mark.parametrize("command", [["apply", "toy"], ["revert"]])
def test_an_edit_to_a_skip_worktree_file_is_refused_not_blamed_on_the_patch(toy, command):
    """`git update-index --skip-worktree` keeps a local edit of a tracked file (a config of the
    user's) out of git status and git stash: apply reported the patch touching it as not applying
    (exit 4, "context does not match the tree"), revert its checkout as an environment failure
    (exit 3, "Entry ... not uptodate")."""
    work = toy["workdir"]
    run_apply(toy)
    if command[0] == "apply":
        assert dspark(toy, "revert", "-C", str(work)).returncode == 0
    git(work, "update-index", "--skip-worktree", "engine/config.py")
    (work / "engine" / "config.py").write_text("my local settings\n")
    before = tree_fingerprint(work)
    refused = dspark(toy, *command, "-C", str(work), "--force")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr == hidden_edit_refusal(work, "skip-worktree")
    assert tree_fingerprint(work) == before and (work / "engine" / "config.py").read_text() == "my local settings\n"


def test_an_edit_to_a_skip_worktree_file_no_commit_or_patch_touches_is_left_alone(toy):
    """git's checkouts leave a skip-worktree file alone where the commits they move between agree on
    it, and no patch touches it: its edit is no reason to refuse."""
    work = toy["workdir"]
    run_apply(toy)
    (work / "local.cfg").write_text("tracked default\n")
    git(work, "add", "local.cfg")
    git(work, "commit", "-q", "-m", "user: a config")
    assert dspark(toy, "revert", "-C", str(work), "--keep-user-commits").returncode == 0
    git(work, "update-index", "--skip-worktree", "local.cfg")
    (work / "local.cfg").write_text("my local settings\n")
    applied = dspark(toy, "apply", "toy", "-C", str(work))
    assert applied.returncode == 0, applied.stderr
    assert (work / "local.cfg").read_text() == "my local settings\n"


@pytest.mark.parametrize("command", [["apply", "toy", "--series"], ["revert"]])
def test_an_edit_to_an_assume_unchanged_file_is_refused_even_with_force(toy, command):
    """git status does not show it and git stash does not save it: reset --hard would wipe it."""
    work = toy["workdir"]
    run_apply(toy)
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                       [("team: readme", {"TEAM.md": "team\n"})])
    git(work, "update-index", "--assume-unchanged", "engine/config.py", "engine/core.py")
    (work / "engine" / "config.py").write_text("mine\n")  # core.py stays as it is: not named
    args = [*command, str(team)] if command[0] == "apply" else command
    before = tree_fingerprint(work)
    refused = dspark(toy, *args, "-C", str(work), "--force")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr == hidden_edit_refusal(work, "assume-unchanged")
    assert tree_fingerprint(work) == before and (work / "engine" / "config.py").read_text() == "mine\n"
    assert json.loads((work / ".git" / "dspark" / "state.json").read_text())["in_progress"] is None
    git(work, "update-index", "--no-assume-unchanged", "engine/config.py")
    done = dspark(toy, *args, "-C", str(work), "--force")  # now stashed, as any local change
    assert done.returncode == 0, done.stderr
    assert git(work, "show", "stash@{0}:engine/config.py") == "mine"


def test_recovery_refuses_to_overwrite_an_assume_unchanged_edit(toy):
    work = toy["workdir"]
    assert dspark(toy, "apply", "toy", "-C", str(work), kill_after="committed:1").returncode == -signal.SIGKILL
    git(work, "update-index", "--assume-unchanged", "engine/config.py")
    (work / "engine" / "config.py").write_text("mine\n")
    state = (work / ".git" / "dspark" / "state.json").read_bytes()
    before = tree_fingerprint(work)
    refused = dspark(toy, "apply", "toy", "-C", str(work), "--force")
    assert refused.returncode == 2 and "has local changes to engine/config.py, marked assume-unchanged" in refused.stderr
    assert tree_fingerprint(work) == before and (work / "engine" / "config.py").read_text() == "mine\n"
    assert (work / ".git" / "dspark" / "state.json").read_bytes() == state  # still to recover, later


def ignore(work: Path, *patterns: str) -> None:
    with open(work / ".git" / "info" / "exclude", "a") as exclude:
        exclude.write("".join(f"{pattern}\n" for pattern in patterns))


def in_the_way(setup: str, toy: dict) -> tuple[list[str], dict]:
    """An ignored file of the user's where the commit the command checks out tracks one, as each
    command meets it: (the command, the file's path -> its content)."""
    work = toy["workdir"]
    if setup == "apply":  # the work branch's tip tracks engine/dspark.py and build/; HEAD, the user's branch, not
        team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                           [("team: build dir", {"build/gen.py": "X = 1\n"})])
        command = ["apply", "toy", "--series", str(team)]
        assert dspark(toy, *command, "-C", str(work)).returncode == 0
        git(work, "checkout", "-q", "-b", "mine", toy["upstream"]["v1.0"])
        ignore(work, "engine/dspark.py", "/build")
        mine = {"build": "mine\n", "engine/dspark.py": "mine\n"}  # build: a file where the tip has a directory
    elif setup == "revert":  # the base tracks engine/config.py; HEAD, the user's branch, does not
        git(work, "checkout", "-q", "-b", "mine")
        git(work, "rm", "-q", "engine/config.py")
        git(work, "commit", "-q", "-m", "drop config")
        ignore(work, "*.o")
        mine = {"engine/config.py/cache.o": "mine\n"}  # under a path the base has as a file
        command = ["revert"]
    else:  # a revert killed after its replay left HEAD without engine/dspark.py; recovery puts the tip back
        user_commit(work, "mine.py")
        assert dspark(toy, "revert", "-C", str(work), "--keep-user-commits",
                      kill_after="replayed:1").returncode == -signal.SIGKILL
        ignore(work, "engine/")
        mine = {"engine/dspark.py": "mine\n"}
        command = ["apply", "toy"]
    for path, text in mine.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(text)
    return command, mine


@pytest.mark.parametrize("setup", ["apply", "revert", "recovery"])
def test_ignored_files_a_checkout_would_overwrite_are_refused_even_with_force(toy, setup):
    """git takes ignored files for disposable: apply's checkout of the work branch, revert's of the
    base and recovery's of the snapshot overwrote or deleted the user's ignored files there."""
    work = toy["workdir"]
    run_apply(toy)
    command, mine = in_the_way(setup, toy)
    state = (work / ".git" / "dspark" / "state.json").read_bytes()
    before = tree_fingerprint(work)
    refused = dspark(toy, *command, "-C", str(work), "--force")
    assert refused.returncode == 2, refused.stderr
    what = "recovering the interrupted revert" if setup == "recovery" else setup
    assert refused.stderr == (f"error: {work} has ignored files where {what} would check out tracked ones "
                              f"({', '.join(mine)}); git overwrites or deletes ignored files there without asking, "
                              "so not even --force goes ahead: move them away and run again\n")
    assert tree_fingerprint(work) == before
    assert all((work / path).read_text() == text for path, text in mine.items())
    assert (work / ".git" / "dspark" / "state.json").read_bytes() == state
    for path in mine:
        (work / path).rename(work.parent / path.replace("/", "-"))
    done = dspark(toy, *command, "-C", str(work), "--force")
    assert done.returncode == 0, done.stderr


def unmerged(work: Path) -> None:
    """Conflict stages with no git operation under way, as a conflicted `git stash pop` leaves them
    (a conflicted cherry-pick is refused as the operation it is: test_a_git_operation_under_way_...)."""
    blob = git(work, "hash-object", "-w", "engine/config.py")
    git(work, "update-index", "--index-info", input=f"0 {'0' * 40}\tengine/config.py\n" + "".join(  # stage 0 out
        f"100644 {blob} {stage}\tengine/config.py\n" for stage in (1, 2, 3)))
    assert git(work, "ls-files", "--unmerged", "--", "engine/config.py") != ""  # a conflict left in the index


INDEX_STATES = {  # what the user did, and how the refusal names it
    "intent-to-add": (lambda work: ((work / "new.py").write_text("x\n"), git(work, "add", "-N", "new.py")),
                      "new.py: intent-to-add"),
    "unmerged": (unmerged, "engine/config.py: unmerged"),
    "rm --cached": (lambda work: git(work, "rm", "-q", "--cached", "engine/config.py"),
                    "engine/config.py: removed from the index, kept in the worktree"),
}


@pytest.mark.parametrize("case", sorted(INDEX_STATES))
@pytest.mark.parametrize("command", [["apply", "toy", "--series"], ["revert"]])
def test_index_entries_git_stash_cannot_keep_are_refused_before_anything_changes(toy, case, command):
    """git stash push fails on intent-to-add and unmerged entries, and saves `git rm --cached` but
    cannot pop it back: the run must stop before its snapshot, so nothing is taken for an
    interrupted run later and no run wedges on a stash that does not pop."""
    work = toy["workdir"]
    run_apply(toy)
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                       [("team: readme", {"TEAM.md": "team\n"})])
    make, named = INDEX_STATES[case]
    make(work)
    args = [*command, str(team)] if command[0] == "apply" else command
    before = tree_fingerprint(work)
    for force in ([], ["--force"]):
        refused = dspark(toy, *args, "-C", str(work), *force)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr == (
            f"error: {work} has index entries git stash cannot save and give back ({named}), so not even --force "
            "would keep them; commit them, or take them out of the index (`git reset -q -- <path>` keeps the file; "
            "an unmerged one: resolve it or abort the merge or cherry-pick) and run again\n")
        assert tree_fingerprint(work) == before
        assert json.loads((work / ".git" / "dspark" / "state.json").read_text())["in_progress"] is None
    assert not any("interrupted" in line for line in applier.status(work)["drift"])


def test_a_failed_stash_leaves_no_snapshot_and_changes_nothing(toy):
    """git stash push failing (here: refs/stash locked) must not leave the snapshot it was taken
    under: the next run would take the user's changes for an interrupted revert's."""
    work = toy["workdir"]
    run_apply(toy)
    (work / "engine" / "core.py").write_text("mine\n")
    (work / ".git" / "refs" / "stash.lock").write_text("")
    before = tree_fingerprint(work)
    refused = dspark(toy, "revert", "-C", str(work), "--force")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr == (f"error: git stash could not save the local changes in {work} (Cannot save the current "
                              "status); nothing was changed: commit or undo them, then run again\n")
    assert tree_fingerprint(work) == before
    assert json.loads((work / ".git" / "dspark" / "state.json").read_text())["in_progress"] is None
    (work / ".git" / "refs" / "stash.lock").unlink()
    again = dspark(toy, "revert", "-C", str(work), "--force")
    assert again.returncode == 0 and "note: recovered" not in again.stderr, again.stderr
    assert git(work, "show", "stash@{0}:engine/core.py") == "mine"

def stopped_around_its_stash(toy, tmp_path: Path, command: list[str], stashed: bool, sig: int):
    """Run `command` with --force through a git on PATH that waits at `git stash push`, before the
    real stash (stashed False) or after it (True), and send the CLI `sig` there. ($1 $2 of every git
    command dspark runs are `-c core.hooksPath=/dev/null`.)"""
    bin_dir, waiting = tmp_path / "bin", tmp_path / "waiting"
    bin_dir.mkdir()
    real = shutil.which("git")
    stash = f'{real} "$@"; touch {waiting}; sleep 60; exit' if stashed else f"touch {waiting}; sleep 60"
    (bin_dir / "git").write_text(f'#!/bin/sh\nif [ "$3 $4" = "stash push" ]; then {stash}; fi\nexec {real} "$@"\n')
    (bin_dir / "git").chmod(0o755)
    code, _, stderr = signal_dspark_when(waiting, sig, *command, "--force", env={
        "DSPARK_COMPAT": str(toy["compat_path"]), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    return code, stderr


def dirty(work: Path) -> None:
    (work / "engine" / "core.py").write_text("mine\n")
    (work / "notes.txt").write_text("untracked\n")


def applied_and_dirty(toy, command: list[str]) -> tuple[Path, list[str], dict]:
    """The toy workspace applied, then given local changes; `command` with what it needs (apply gets a
    team series to apply); the worktree's fingerprint before the command."""
    work = toy["workdir"]
    run_apply(toy)
    if command[0] == "apply":
        command = [*command, str(make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                                             [("team: add", {"team.py": "T = 1\n"})]))]
    dirty(work)
    return work, command, tree_fingerprint(work)


@pytest.mark.parametrize("command", [["apply", "toy", "--series"], ["revert"]], ids=lambda c: c[0])
@pytest.mark.parametrize("stashed", [False, True], ids=["before the stash", "after it"])
def test_ctrl_c_around_the_stash_of_local_changes_rolls_back_and_leaves_no_snapshot(toy, tmp_path, command,
                                                                                     stashed):
    """Was exit 130 "rolled back" with the snapshot left behind: the next run called the user's
    own changes an interrupted operation's work and refused, or with --force saved them away."""
    work, command, before = applied_and_dirty(toy, command)
    code, stderr = stopped_around_its_stash(toy, tmp_path, [*command, "-C", str(work)], stashed, signal.SIGINT)
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == (f"interrupted: the {command[0]} under way was "
                                               "rolled back: the workspace is as it was before it")
    assert tree_fingerprint(work) == before
    assert json.loads((work / ".git" / "dspark" / "state.json").read_text())["in_progress"] is None


@pytest.mark.parametrize("command", [["apply", "toy", "--series"], ["revert"]], ids=lambda c: c[0])
@pytest.mark.parametrize("nth", [1, 2], ids=["naming the stash", "naming it for the note"])
def test_ctrl_c_when_the_stash_is_looked_up_rolls_back(toy, tmp_path, command, nth):
    """After `git stash push`, the lookup of its stash@{n} was outside every rollback: a Ctrl-C
    at the first said "rolled back" with the changes left only in the stash; at the second, after
    the operation had finished, it said "rolled back" of an operation that was done."""
    work, command, before = applied_and_dirty(toy, command)
    bin_dir, waiting, pushed, count = tmp_path / "bin", tmp_path / "waiting", tmp_path / "pushed", tmp_path / "count"
    bin_dir.mkdir()
    real = shutil.which("git")
    (bin_dir / "git").write_text(f"""#!/bin/sh
[ "$3 $4" = "stash push" ] && touch {pushed}
if [ "$3 $4" = "stash list" ] && [ -e {pushed} ]; then
  echo x >> {count}
  if [ "$(wc -l < {count})" -eq {nth} ]; then {real} "$@"; touch {waiting}; sleep 60; exit; fi
fi
exec {real} "$@"
""")
    (bin_dir / "git").chmod(0o755)
    code, _, stderr = signal_dspark_when(waiting, signal.SIGINT, *command, "-C", str(work), "--force", env={
        "DSPARK_COMPAT": str(toy["compat_path"]), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert code == 130 and "interrupted" in stderr, stderr
    assert tree_fingerprint(work) == before
    assert json.loads((work / ".git" / "dspark" / "state.json").read_text())["in_progress"] is None


def test_a_second_ctrl_c_during_the_rollback_says_the_next_run_restores_it(toy, tmp_path):
    """Ctrl-C in a revert's replay, then again in its rollback: the line must not claim a rollback
    that did not happen; the next run restores the state before the revert, as it says."""
    work = toy["workdir"]
    run_apply(toy)
    user_commit(work, "mine.py")
    before = tree_fingerprint(work)
    bin_dir, first, second = tmp_path / "bin", tmp_path / "in-replay", tmp_path / "in-rollback"
    bin_dir.mkdir()
    real = shutil.which("git")
    (bin_dir / "git").write_text(f"""#!/bin/sh
case "$*" in
  *" cherry-pick --abort"*) touch {second}; sleep 60; exit;;
  *" cherry-pick --keep-redundant-commits "*) touch {first}; sleep 60; exit;;
esac
exec {real} "$@"
""")
    (bin_dir / "git").chmod(0o755)
    env = {"DSPARK_COMPAT": str(toy["compat_path"]), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    code, _, stderr = signal_dspark_when([first, second], signal.SIGINT, "revert", "-C", str(work),
                                         "--keep-user-commits", env=env)  # Ctrl-C in the replay, then in the rollback
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == ("interrupted: the revert stopped part-way: the "
                                               "next dspark apply or revert restores the state before it")
    again = dspark(toy, "apply", "toy", "-C", str(work))
    assert again.returncode == 0 and "note: recovered an interrupted revert" in again.stderr, again.stderr
    assert tree_fingerprint(work) == before


def test_a_run_killed_before_its_stash_leaves_the_local_changes_to_the_user(toy, tmp_path):
    """SIGKILL while `git stash push` had not stored anything: the next run finds the snapshot,
    sees nothing was touched, clears it and says so; the changes are the user's, refused as any."""
    work = toy["workdir"]
    run_apply(toy)
    dirty(work)
    before = tree_fingerprint(work)
    code, _ = stopped_around_its_stash(toy, tmp_path, ["revert", "-C", str(work)], False, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert json.loads((work / ".git" / "dspark" / "state.json").read_text())["in_progress"]["op"] == "revert"
    again = dspark(toy, "revert", "-C", str(work))
    assert again.returncode == 2, again.stderr
    assert "note: cleared the record of an interrupted revert" in again.stderr and "would discard" not in again.stderr
    assert tree_fingerprint(work) == before and not git(work, "branch", "--list", "dspark/saved-*")
    assert dspark(toy, "revert", "-C", str(work), "--force").returncode == 0
    assert git(work, "show", "stash@{0}^3:notes.txt") == "untracked"


@pytest.mark.parametrize("taken_back", ["as stashed", "then edited"])
def test_recovery_puts_stashed_untracked_files_back_over_copies_in_the_worktree(toy, taken_back):
    """After a kill the user took the stash's untracked file back (`git stash apply`; a `git stash
    pop` killed before its drop leaves the same). Was exit 3 on every recovery (`git stash pop`
    will not overwrite untracked files), with one more saved branch each try."""
    work = toy["workdir"]
    run_apply(toy)
    assert dspark(toy, "revert", "-C", str(work)).returncode == 0
    (work / "notes.txt").write_text("untracked\n")
    assert dspark(toy, "apply", "toy", "-C", str(work), "--force", kill_after="committed:1").returncode == -signal.SIGKILL
    git(work, "stash", "apply", "-q", "stash@{0}")
    if taken_back == "then edited":
        (work / "notes.txt").write_text("edited since\n")
    recovered = dspark(toy, "apply", "toy", "-C", str(work), "--force")
    assert recovered.returncode == 0 and "note: recovered an interrupted apply" in recovered.stderr, recovered.stderr
    saved = git(work, "for-each-ref", "--format=%(refname:short)", "refs/heads/dspark/saved-*").splitlines()
    # the worktree as recovery found it on the saved branch; the stashed file put back, then stashed by this apply
    assert len(saved) == 1 and git(work, "show", f"{saved[0]}:notes.txt") == (
        "untracked" if taken_back == "as stashed" else "edited since")
    assert git(work, "stash", "list", "--format=%gs").count("\n") == 0
    assert git(work, "show", "stash@{0}^3:notes.txt") == "untracked"
    assert git(work, "log", "-1", "--format=%s") == "dspark: method and module"


# -- 4. a branch another worktree has checked out --------------------------------------------------

def test_the_work_branch_checked_out_in_another_worktree_is_never_moved(toy, tmp_path):
    run_apply(toy)
    work, other = toy["workdir"], tmp_path / "other-worktree"
    git(work, "checkout", "-q", "--detach")
    git(work, "worktree", "add", "-q", str(other), "dspark/v1.0")
    tip = git(work, "rev-parse", "dspark/v1.0")
    for command in (["revert", "-C", str(work)], ["apply", "toy", "-C", str(work)]):
        refused = dspark(toy, *command)
        assert refused.returncode == 2, refused.stderr
        assert f"branch dspark/v1.0 is checked out in another worktree, {other.resolve()}" in refused.stderr
        assert git(work, "rev-parse", "dspark/v1.0") == tip
        assert git(other, "status", "--porcelain") == ""



def test_a_worktree_whose_directory_is_gone_is_named_with_the_way_out(toy, tmp_path):
    """A worktree removed with rm -rf, not `git worktree remove`, still holds its branch for git
    until `git worktree prune`: the refusal told the user to run `git -C <the gone directory> switch
    --detach`, which cannot run there."""
    run_apply(toy)
    work, other = toy["workdir"], tmp_path / "other-worktree"
    git(work, "checkout", "-q", "--detach")
    git(work, "worktree", "add", "-q", str(other), "dspark/v1.0")
    shutil.rmtree(other)
    refused = dspark(toy, "revert", "-C", str(work))
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr == (f"error: branch dspark/v1.0 is checked out in another worktree, {other.resolve()}, "
                              f"whose directory is gone; `git -C {work} worktree prune` forgets it, then run again\n")
    git(work, "worktree", "prune")
    assert dspark(toy, "revert", "-C", str(work)).returncode == 0

# -- 5. merges and emptied commits among the user's commits ----------------------------------------

def test_a_merge_among_the_users_commits_is_named_and_nothing_changes(toy):
    run_apply(toy)
    work = toy["workdir"]
    git(work, "checkout", "-q", "-b", "side")
    user_commit(work, "side.txt")
    git(work, "checkout", "-q", "dspark/v1.0")
    user_commit(work, "main.txt")
    git(work, "merge", "-q", "--no-ff", "-m", "user: merge side", "side")
    merge = git(work, "rev-parse", "HEAD")
    before = tree_fingerprint(work)
    for extra in ([], ["--keep-user-commits"]):
        refused = dspark(toy, "revert", "-C", str(work), *extra)
        assert refused.returncode == 2, refused.stderr
        assert f"your commit {merge[:12]} (user: merge side) on dspark/v1.0 is a merge" in refused.stderr
        assert tree_fingerprint(work) == before


def test_a_commit_that_only_undoes_a_patch_is_kept_empty_and_named(toy):
    run_apply(toy)
    work = toy["workdir"]
    git(work, "revert", "--no-edit", "HEAD")  # undoes patch 2: nothing left of it on the base
    undo = git(work, "rev-parse", "HEAD")
    result = applier.revert(work, keep_user_commits=True)
    assert result["status"] == "reverted"
    assert any(note.startswith(f"your commit {undo[:12]} (") and "changes nothing without the patches" in note
               for note in result["notes"])
    assert git(work, "rev-parse", "HEAD^{tree}") == git(work, "rev-parse", f"{toy['upstream']['v1.0']}^{{tree}}")
    assert git(work, "log", "-1", "--format=%s") == git(work, "log", "-1", "--format=%s", undo)


# -- 6. a recovery is said even when the run then fails --------------------------------------------

def test_a_recovery_is_reported_at_once_when_the_revert_then_fails(toy):
    run_apply(toy)
    work = toy["workdir"]
    user_commit(work, "mine.txt")
    (work / "engine" / "config.py").write_text("local edit\n")
    killed = dspark(toy, "revert", "-C", str(work), "--force", "--keep-user-commits", kill_after="replayed:1")
    assert killed.returncode == -signal.SIGKILL
    again = dspark(toy, "revert", "-C", str(work), "--keep-user-commits")
    assert again.returncode == 2 and "local change" in again.stderr, again.stderr
    assert "note: recovered an interrupted revert" in again.stderr
    assert (work / "engine" / "config.py").read_text() == "local edit\n"


# -- what a series may hold --------------------------------------------------------------------------

def series_of(directory: Path, patches: dict[str, bytes]) -> Path:
    """A series directory holding `patches` (name -> content) in that order, locked."""
    from dspark_cli import series as series_files

    directory.mkdir()
    for name, content in patches.items():
        (directory / name).write_bytes(content)
    (directory / "series").write_text("".join(f"{name}\n" for name in patches))
    series_files.write_lock(directory)
    return directory


def test_a_file_that_is_not_a_patch_is_refused_before_anything_changes(toy):
    """Was exit 4 with git's "No valid patches in input (allow with "--allow-empty")", an option
    dspark does not have, after the workspace had been touched."""
    assert dspark(toy, "apply", "toy", "-C", str(toy["workdir"])).returncode == 0
    before = tree_fingerprint(toy["workdir"])
    mine = series_of(toy["root"] / "mine", {"0001-hello.patch": b"hello\n"})
    result = dspark(toy, "apply", "toy", "-C", str(toy["workdir"]), "--series", str(mine))
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: {mine / '0001-hello.patch'}: not a patch (no diff in it)\n"
    assert tree_fingerprint(toy["workdir"]) == before


@pytest.mark.parametrize("content, why", [
    (b"diff --git a/x b/x\n@@ garbage\n", "No valid patches in input"),
    (b"diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n-a\n", "corrupt patch at line 6"),
], ids=["no hunk", "cut short"])
def test_a_diff_git_cannot_read_is_refused_before_anything_changes(toy, content, why):
    """A diff header passed the check, then git am failed on the file: exit 4, as a conflict."""
    assert dspark(toy, "apply", "toy", "-C", str(toy["workdir"])).returncode == 0
    before = tree_fingerprint(toy["workdir"])
    mine = series_of(toy["root"] / "mine", {"0001-bad.patch": content})
    result = dspark(toy, "apply", "toy", "-C", str(toy["workdir"]), "--series", str(mine))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {mine / '0001-bad.patch'}: not a patch git can read ({why}")
    assert len(result.stderr.splitlines()) == 1
    assert tree_fingerprint(toy["workdir"]) == before


def test_patches_without_text_hunks_still_load_and_apply(toy, tmp_path):
    """git format-patch of a binary file, a rename, a mode-only change and a deletion (none has a
    ---/+++ pair of its own), and a traditional `diff -u` patch, are all patches."""
    scratch = tmp_path / "scratch-mine"
    git(tmp_path, "clone", "-q", str(toy["upstream"]["repo"]), str(scratch))
    steps = [("add a binary and a script", lambda: ((scratch / "blob.bin").write_bytes(bytes(range(256))),
                                                   (scratch / "run.sh").write_text("echo hi\n"))),
             ("rename the script", lambda: git(scratch, "mv", "run.sh", "go.sh")),
             ("make it executable", lambda: (scratch / "go.sh").chmod(0o755)),
             ("delete the binary", lambda: (scratch / "blob.bin").unlink())]
    for subject, change in steps:
        change()
        git(scratch, "add", "-A")
        git(scratch, "commit", "-q", "-m", subject)
    made = git(scratch, "format-patch", "--zero-commit", "--no-signature", "-o", str(tmp_path / "made"), "HEAD~4")
    patches = {Path(p).name: Path(p).read_bytes() for p in made.splitlines()}
    assert b"GIT binary patch" in patches["0001-add-a-binary-and-a-script.patch"]
    assert b"+++ " not in patches["0002-rename-the-script.patch"] + patches["0003-make-it-executable.patch"]
    patches["0005-traditional.patch"] = b"--- a/go.sh\n+++ b/go.sh\n@@ -1 +1 @@\n-echo hi\n+echo hello\n"
    mine = series_of(tmp_path / "mine", patches)
    result = dspark(toy, "apply", "toy", "-C", str(toy["workdir"]), "--series", str(mine))
    assert result.returncode == 0, result.stderr
    work = toy["workdir"]
    assert not (work / "blob.bin").exists() and (work / "go.sh").read_text() == "echo hello\n"
    assert os.access(work / "go.sh", os.X_OK)


# -- 6. git's own state: hooks, operations under way, linked worktrees, stale locks -----------------

def test_a_failing_checkout_hook_does_not_stop_a_rollback_halfway(toy, tmp_path):
    """git-lfs's post-checkout hook fails where git-lfs is not installed: the rollback's checkout
    failed ("git checkout failed"), HEAD stayed detached with a stray dspark/v1.0 branch and the
    user's edit only in a stash, and every later run failed alike. Our git commands run no hooks."""
    clone = tmp_path / "hooked"
    git(tmp_path, "clone", "-q", str(toy["upstream"]["repo"]), str(clone))
    hook = clone / ".git" / "hooks" / "post-checkout"
    hook.write_text("#!/bin/sh\nexit 1\n")
    hook.chmod(0o755)
    (clone / "engine" / "config.py").write_text("mine\n")
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"], [
        ("team: conflicting core edit", {"engine/core.py": CORE.replace("line 11\n", "line eleven\n")})])
    before = tree_fingerprint(clone)
    failed = dspark(toy, "apply", "toy", "-C", str(clone), "--force", "--series", str(team))
    assert failed.returncode == 4, failed.stderr
    assert tree_fingerprint(clone) == before
    applied = dspark(toy, "apply", "toy", "-C", str(clone), "--force")
    assert applied.returncode == 0, applied.stderr
    assert dspark(toy, "revert", "-C", str(clone)).returncode == 0


@pytest.mark.parametrize("operation", ["merge", "rebase", "cherry-pick"])
def test_a_git_operation_under_way_is_refused_even_with_force(toy, operation):
    """The stash dropped a merge's MERGE_HEAD (the user's next commit silently no merge), and an
    apply during a stopped `git rebase -i` let the rebase's --continue rewrite their branch."""
    run_apply(toy)
    work = toy["workdir"]
    git(work, "checkout", "-q", "-b", "mine", "main")
    first = user_commit(work, "a.txt")
    user_commit(work, "b.txt")
    if operation == "merge":
        git(work, "checkout", "-q", "-b", "feat", "main")
        user_commit(work, "c.txt")
        git(work, "checkout", "-q", "mine")
        git(work, "merge", "-q", "--no-ff", "--no-commit", "feat")
        marker, what = "MERGE_HEAD", "a merge is in progress; finish it, or abort it (git merge --abort)"
    elif operation == "cherry-pick":  # conflicted: its unmerged entries are not the reason given
        git(work, "checkout", "-q", "-b", "side", "main")
        user_commit(work, "a.txt", "theirs\n")
        git(work, "checkout", "-q", "mine")
        git(work, "cherry-pick", "side", check=False)
        marker, what = "CHERRY_PICK_HEAD", "a cherry-pick is in progress; finish it, or abort it (git cherry-pick --abort)"
    else:
        git(work, "-c", "sequence.editor=sed -i 1s/^pick/edit/", "rebase", "-q", "-i", f"{first}^")
        marker, what = "rebase-merge", "a rebase is in progress; finish it, or abort it (git rebase --abort)"
    before = tree_fingerprint(work)
    for command in (["apply", "toy", "-C", str(work), "--force"], ["revert", "-C", str(work), "--force"]):
        refused = dspark(toy, *command)
        assert refused.returncode == 2 and what in refused.stderr, refused.stderr
        assert tree_fingerprint(work) == before and (work / ".git" / marker).exists()


def test_two_worktrees_of_one_repository_take_turns(toy, tmp_path):
    """The lock was per worktree, yet linked worktrees share the dspark/<pin> branch: two applies
    at once interleaved their commits on it. A run in one worktree now refuses one in another."""
    run_apply(toy)
    work = toy["workdir"]
    git(work, "checkout", "-q", "main")
    other = tmp_path / "other"
    git(work, "worktree", "add", "-q", "--detach", str(other), "main")
    with oplock.exclusive(Path(git(other, "rev-parse", "--absolute-git-dir")), other):
        refused = dspark(toy, "apply", "toy", "-C", str(work))
        assert refused.returncode == 2, refused.stderr
        assert f"is running on {work} or another worktree of its repository" in refused.stderr


@pytest.mark.parametrize("lock", ["HEAD.lock", "refs/heads/dspark/v1.0.lock"])
def test_a_lock_file_a_killed_git_left_does_not_block_recovery(toy, lock):
    """Only a stale index.lock was removed: a HEAD.lock or the work branch's ref lock left by the
    killed run's git failed every later recovery and revert (exit 3)."""
    work = toy["workdir"]
    work.mkdir()
    git(work, "clone", "-q", str(toy["upstream"]["repo"]), ".")
    before = tree_fingerprint(work)
    assert dspark(toy, "apply", "toy", "-C", str(work), kill_after="committed:1").returncode == -signal.SIGKILL
    (work / ".git" / lock).write_text("")
    recovered = dspark(toy, "revert", "-C", str(work))
    assert recovered.returncode == 0, recovered.stderr
    assert tree_fingerprint(work) == before and not (work / ".git" / lock).exists()



@pytest.mark.parametrize("lock", ["index.lock", "HEAD.lock", "refs/heads/dspark/v1.0.lock"])
@pytest.mark.parametrize("command", ["apply", "revert"])
def test_a_git_lock_there_before_the_run_is_refused_and_left_alone(toy, command, lock):
    """A git running beside dspark (an editor's `git status`, a `git commit` waiting on its editor)
    holds index.lock: apply and revert failed on it (exit 3, git's "File exists") and their rollback
    deleted it, the other git's, without a word. Refused up front now, the lock never touched."""
    work = toy["workdir"]
    work.mkdir()
    git(work, "clone", "-q", str(toy["upstream"]["repo"]), ".")
    if command == "revert":
        assert dspark(toy, "apply", "toy", "-C", str(work)).returncode == 0
    path = work / ".git" / lock
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    before = tree_fingerprint(work)
    args = ["apply", "toy", "-C", str(work)] if command == "apply" else ["revert", "-C", str(work)]
    for force in ([], ["--force"]):
        refused = dspark(toy, *args, *force)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip() == (
            f"error: {path} exists: another git process is running in {work}, or one was killed and left it; "
            "let it finish, or remove the file if no git process is running, and run again"), refused.stderr
        assert path.exists() and tree_fingerprint(work) == before
    path.unlink()
    assert dspark(toy, *args).returncode == 0


def test_a_git_lock_older_than_a_killed_run_is_not_taken_for_its_own(toy):
    """Recovery removes the locks a killed run's git left, which no git holds: one already there
    when that run started is not its own (the run's git would have failed on it)."""
    work = toy["workdir"]
    assert dspark(toy, "apply", "toy", "-C", str(work), kill_after="committed:1").returncode == -signal.SIGKILL
    lock = work / ".git" / "index.lock"
    lock.write_text("")
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    before = tree_fingerprint(work)
    refused = dspark(toy, "revert", "-C", str(work))
    assert refused.returncode == 2 and f"error: {lock} exists: another git process is running" in refused.stderr
    assert lock.exists() and tree_fingerprint(work) == before
    os.utime(lock)  # as the killed run's git left it
    recovered = dspark(toy, "revert", "-C", str(work))
    assert recovered.returncode == 0, recovered.stderr
    assert not lock.exists() and "recovered an interrupted apply" in recovered.stderr

def test_status_where_objects_cannot_be_written_finds_no_drift(toy):
    """status compares each patch commit with the patch applied afresh, which wrote objects: on a
    read-only workspace every patch commit read as amended since apply made it."""
    import subprocess

    run_apply(toy)
    objects = toy["workdir"] / ".git" / "objects"
    if subprocess.run(["chattr", "-R", "+i", str(objects)], capture_output=True).returncode != 0:
        subprocess.run(["chattr", "-R", "-i", str(objects)], capture_output=True)
        pytest.skip("chattr +i is not available on this file system")
    try:
        status = dspark(toy, "status", "-C", str(toy["workdir"]), "--json")
    finally:
        subprocess.run(["chattr", "-R", "-i", str(objects)], check=True)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["drift"] == []


def test_objects_that_cannot_be_written_are_an_environment_problem(toy):
    """A read-only object store made `git apply` fail, which was reported as the patch not
    applying (exit 4), and `git stash` fail, which was reported as changes to commit (exit 2):
    neither the series nor the user's changes are at fault (exit 3), and nothing changes."""
    import subprocess

    run_apply(toy)
    work = toy["workdir"]
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                       [("team: readme", {"TEAM.md": "team\n"})])
    objects = work / ".git" / "objects"
    if subprocess.run(["chattr", "-R", "+i", str(objects)], capture_output=True).returncode != 0:
        subprocess.run(["chattr", "-R", "-i", str(objects)], capture_output=True)
        pytest.skip("chattr +i is not available on this file system")
    try:
        before = tree_fingerprint(work)
        layered = dspark(toy, "apply", "toy", "-C", str(work), "--series", str(team))
        assert layered.returncode == 3 and layered.stderr.startswith("error: git apply failed: "), layered.stderr
        assert tree_fingerprint(work) == before
        (work / "engine" / "config.py").write_text("mine\n")
        before = tree_fingerprint(work)
        forced = dspark(toy, "apply", "toy", "-C", str(work), "--series", str(team), "--force")
        assert forced.returncode == 3 and forced.stderr.startswith("error: git stash failed: "), forced.stderr
        assert tree_fingerprint(work) == before
    finally:
        subprocess.run(["chattr", "-R", "-i", str(objects)], check=True)


def killed_in_its_checkout(toy, tmp_path, left: str) -> Path:
    """A clone of the user's where `dspark apply` was killed inside its checkout of the pin, after
    the shell line `left` did to the first file the checkout changes what git had done to it (git
    writes the index and HEAD last); $1 $2 of our git commands are -c core.hooksPath=/dev/null."""
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(toy["upstream"]["repo"]), str(clone))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = shutil.which("git")
    (bin_dir / "git").write_text(f"""#!/bin/sh
if [ "$3" = checkout ]; then
  for target; do :; done
  path=$({real} diff --name-only HEAD "$target" | head -n 1)
  {left.format(real=real)}
  kill -9 $PPID
  exit 1
fi
exec {real} "$@"
""")
    (bin_dir / "git").chmod(0o755)
    killed = run_dspark("apply", "toy", "-C", str(clone), env={
        "DSPARK_COMPAT": str(toy["compat_path"]), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return clone


@pytest.mark.parametrize("left", ['{real} show "$target:$path" > "$path"',  # written
                                  'rm "$path"',  # unlinked, not yet written
                                  '{real} show "$target:$path" | head -c 10 > "$path"'])  # cut short
def test_a_run_killed_part_way_through_its_checkout_is_recovered_without_blaming_the_user(toy, tmp_path, left):
    """Killed while its checkout was moving the worktree (a big tree takes seconds), the next run
    took the files of the pin's commit lying there for local changes of the user's: "would discard
    N local change(s); pass --force", and --force kept them on a bogus dspark/saved-* branch. Git
    unlinks a file and writes it whole, so a file part way may also be missing or cut short."""
    before = tree_fingerprint(toy["upstream"]["repo"])
    clone = killed_in_its_checkout(toy, tmp_path, left)
    assert git(clone, "status", "--porcelain") != ""  # the checkout's file lies there
    recovered = dspark(toy, "revert", "-C", str(clone))
    assert recovered.returncode == 0, recovered.stderr
    assert "recovered an interrupted apply" in recovered.stderr
    after = tree_fingerprint(clone)
    assert [after[k] for k in ("head", "status", "index", "files")] == [before[k] for k in ("head", "status", "index", "files")]
    assert git(clone, "branch", "--list", "dspark/saved-*") == ""


@pytest.mark.parametrize("users", ["staged, then removed", "a file the checkout keeps, removed"])
def test_what_the_user_did_beside_a_checkout_killed_part_way_is_theirs(toy, tmp_path, users):
    """Only paths the checkout was rewriting may be missing or cut short, and only the worktree
    was compared: a file the user staged and then deleted, or one the checkout does not touch that
    they deleted, went with the restore without --force."""
    clone = killed_in_its_checkout(toy, tmp_path, 'rm "$path"')
    if users == "staged, then removed":
        (clone / "mine.txt").write_text("mine\n")
        git(clone, "add", "mine.txt")
        (clone / "mine.txt").unlink()
    else:
        (clone / "engine" / "config.py").unlink()
    refused = dspark(toy, "revert", "-C", str(clone))
    assert refused.returncode == 2 and "would discard" in refused.stderr, refused.stderr


def test_a_run_killed_after_its_stash_was_stored_before_the_worktree_was_cleaned_is_recovered(toy, tmp_path):
    """`git stash push` stores the stash, then cleans the worktree: killed between, the local
    changes are both in the stash and still in the worktree. The next run refused them as work it
    would discard (with --force: a bogus dspark/saved-* branch); restoring pops the stash over them."""
    run_apply(toy)
    work = toy["workdir"]
    (work / "engine" / "config.py").write_text("mine\n")
    (work / "notes.txt").write_text("my notes\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = shutil.which("git")
    # the stash stored and its changes put back as they were: the window's state
    (bin_dir / "git").write_text(f"""#!/bin/sh
if [ "$3" = stash ] && [ "$4" = push ]; then
  {real} "$@" && {real} stash apply -q --index && kill -9 $PPID
  exit 1
fi
exec {real} "$@"
""")
    (bin_dir / "git").chmod(0o755)
    killed = run_dspark("revert", "-C", str(work), "--force", env={
        "DSPARK_COMPAT": str(toy["compat_path"]), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(git(work, "stash", "list").splitlines()) == 1 and (work / "notes.txt").is_file()
    recovered = dspark(toy, "status", "-C", str(work))
    assert not any("would discard" in line for line in recovered.stdout.splitlines()), recovered.stdout
    again = dspark(toy, "revert", "-C", str(work), "--force")
    assert again.returncode == 0, again.stderr
    assert "recovered an interrupted revert" in again.stderr and git(work, "branch", "--list", "dspark/saved-*") == ""
    assert git(work, "stash", "show", "-p", "--include-untracked", "stash@{0}").count("+mine") == 1


def test_a_rollback_that_fails_too_says_both_and_the_next_run_restores(toy, tmp_path):
    """The rollback's first failing git command replaced the patch's failure in the message, and
    did not say that the snapshot stays for the next run."""
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(toy["upstream"]["repo"]), str(clone))
    (clone / "engine" / "config.py").write_text("mine\n")
    before = tree_fingerprint(clone)
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"], [
        ("team: conflicting core edit", {"engine/core.py": CORE.replace("line 11\n", "line eleven\n")})])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # the second `reset -q --hard` fails: the rollback's (the first is the failed patch's diagnosis);
    # $1 $2 of our git commands: -c core.hooksPath=/dev/null
    (bin_dir / "git").write_text(f"""#!/bin/sh
if [ "$3 $4 $5" = "reset -q --hard" ]; then
  echo x >> {tmp_path / "resets"}
  [ "$(wc -l < {tmp_path / "resets"})" -ge 2 ] && {{ echo "fatal: the disk went away" >&2; exit 128; }}
fi
exec {shutil.which("git")} "$@"
""")
    (bin_dir / "git").chmod(0o755)
    failed = run_dspark("apply", "toy", "-C", str(clone), "--force", "--series", str(team), env={
        "DSPARK_COMPAT": str(toy["compat_path"]), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert failed.returncode == 3, failed.stderr
    assert failed.stderr.startswith("error: team/0001-team-conflicting-core-edit.patch did not apply: file engine/core.py")
    assert (f"; then the rollback failed (git reset failed: fatal: the disk went away): the next dspark apply or revert "
            f"restores {clone} to its state before the apply once that is fixed") in failed.stderr
    recovered = dspark(toy, "revert", "-C", str(clone))
    assert recovered.returncode == 0 and "recovered an interrupted apply" in recovered.stderr, recovered.stderr
    assert tree_fingerprint(clone) == before


def test_a_workspace_of_another_engine_is_refused_before_anything_is_fetched_into_it(toy):
    """`dspark apply other -C <toy's workspace>` fetched the other engine's repository into it (a
    remote and its tags added, then "commit ... was not found"), never saying what it holds."""
    from tests.git_fixtures import make_upstream

    other = make_upstream(toy["root"] / "other")["repo"]
    (other / "other.txt").write_text("another engine\n")
    git(other, "add", ".")
    git(other, "commit", "-q", "-m", "another engine's release")
    text = toy["compat_path"].read_text()
    toy_block = text[text.index("  toy:"):]
    toy["compat_path"].write_text(text + toy_block.replace("  toy:", "  other:", 1)
                                  .replace(str(toy["upstream"]["repo"]), str(other))
                                  .replace(toy["upstream"]["v1.0"], git(other, "rev-parse", "HEAD")))
    work = toy["workdir"]
    assert dspark(toy, "apply", "toy", "-C", str(work)).returncode == 0
    before = tree_fingerprint(work), git(work, "remote"), git(work, "for-each-ref")
    refused = dspark(toy, "apply", "other", "-C", str(work))
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == f"error: {work} holds toy v1.0; use another --workdir for other v1.0"
    assert (tree_fingerprint(work), git(work, "remote"), git(work, "for-each-ref")) == before


def test_a_failed_layered_apply_leaves_the_state_file_as_it_was(toy):
    """The rollback of a patch failure must restore the state file too, not only the tree: with the
    new run's layers recorded, status reported the failed layer's patches as 'not applied' drift."""
    run_apply(toy)
    work = toy["workdir"]
    state_before = (work / ".git" / "dspark" / "state.json").read_bytes()
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"], [
        ("team: conflicting core edit", {"engine/core.py": CORE.replace("line 11\n", "line eleven\n")}),
    ])
    with pytest.raises(PatchFailed):
        run_apply(toy, series=(team,))
    assert (work / ".git" / "dspark" / "state.json").read_bytes() == state_before
    assert applier.status(work)["drift"] == []


def test_a_staged_only_change_is_a_local_change_refused_without_force(toy):
    """A change staged and not edited since (`git add`; status `M `) is the user's too: taken for a
    clean tree, it rode along the checkout and was committed inside the first patch commit."""
    run_apply(toy)
    work = toy["workdir"]
    applier.revert(work)
    (work / "engine" / "config.py").write_text("mine, staged\n")
    git(work, "add", "engine/config.py")
    (work / "staged-new.txt").write_text("new, staged\n")
    git(work, "add", "staged-new.txt")
    before = tree_fingerprint(work)
    with pytest.raises(UsageError, match="local change"):
        run_apply(toy)
    assert tree_fingerprint(work) == before
    git(work, "reset", "-q", "--hard")  # (drops the staged new file too)
    (work / "untracked.txt").write_text("new, not added\n")  # untracked alone is a local change too
    with pytest.raises(UsageError, match="local change"):
        run_apply(toy)
    (work / "untracked.txt").unlink()
    run_apply(toy)
    (work / "staged-new.txt").write_text("new, staged\n")
    git(work, "add", "staged-new.txt")
    before = tree_fingerprint(work)
    with pytest.raises(UsageError, match="local change"):
        applier.revert(work)
    assert tree_fingerprint(work) == before


def test_changed_submodules_reads_renames_and_names_git_would_quote(tmp_path):
    """status -z: a staged rename is two records (the new path's, then the original path's), and a
    name is given as it is. The original path is no record of its own to parse ("1 x" read as one
    raised IndexError), and a submodule named with a tab is named whole, not cut at the tab."""
    from dspark_cli.workspace import Workspace

    sub = tmp_path / "sub"
    sub.mkdir()
    git(sub, "init", "-q", "-b", "main")
    user_commit(sub, "a.txt")
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    user_commit(work, "1 x")
    name = "vendor/tab\there"
    git(work, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(sub), name)
    git(work, "commit", "-q", "-m", "user: a submodule")
    git(work, "mv", "1 x", "renamed.txt")  # a staged rename whose original path reads like a record
    (work / name / "a.txt").write_text("edited inside the submodule\n")
    assert Workspace(work).changed_submodules() == [name]


def test_a_subdirectory_of_a_workspace_that_is_a_git_worktree_names_the_workspace(toy, tmp_path):
    """A workspace made in a `git worktree add` of the user's clone has a .git file, not a directory:
    -C one of its subdirectories is named as inside it, as in a workspace of its own repository."""
    clone, work = tmp_path / "clone", tmp_path / "wt"
    git(tmp_path, "clone", "-q", str(toy["upstream"]["repo"]), str(clone))
    git(clone, "worktree", "add", "-q", "--detach", str(work), toy["upstream"]["v1.0"])
    run_apply({**toy, "workdir": work})
    with pytest.raises(UsageError, match=f"is inside the dspark workspace {work}; pass --workdir {work}"):
        applier.status(work / "engine")
