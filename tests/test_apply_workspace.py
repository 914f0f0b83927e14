"""The patch-series engine on a throwaway upstream repository, with real git throughout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from dspark_cli import applier, compat
from dspark_cli.errors import PatchFailed, UsageError
from dspark_cli.workspace import KILL_AT_ENV
from tests.git_fixtures import (CORE, dspark_edits, git, make_series, run_apply, toy_workspace, tree_fingerprint,
                                write_compat)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy(tmp_path, monkeypatch):
    return toy_workspace(tmp_path, monkeypatch)


SERIES_COMMITS = ["dspark: method and module", "dspark: hook in core"]  # the toy series, newest first


def series_commits(toy, work: Path) -> list[str]:
    """The subjects of the commits on the toy pin's base, newest first."""
    return git(work, "log", "--format=%s", f"{toy['upstream']['v1.0']}..HEAD").splitlines()


def assert_recovered_cleanly(toy, work: Path) -> None:
    """The whole series applied, nothing left in the worktree, nothing saved as the user's work."""
    assert series_commits(toy, work) == SERIES_COMMITS
    assert git(work, "status", "--porcelain") == "" and not git(work, "branch", "--list", "dspark/saved-*")


def test_apply_commits_each_patch_on_the_pin_branch(toy):
    result = run_apply(toy)
    work = toy["workdir"]
    assert result["status"] == "applied"
    assert result["base"] == toy["upstream"]["v1.0"]
    assert git(work, "symbolic-ref", "HEAD") == "refs/heads/dspark/v1.0"
    assert git(work, "log", "--format=%s", f"{result['base']}..HEAD").splitlines() == [
        "dspark: method and module", "dspark: hook in core"]
    assert git(work, "log", "-1", "--format=%an") == "Test"  # the patch's author is kept
    body = git(work, "log", "-1", "--format=%B")
    assert "Dspark-Patch: dspark/0002-dspark-method-and-module.patch" in body
    assert "Why: dspark: method and module." in body
    assert "import engine.dspark  # hook" in (work / "engine" / "core.py").read_text()
    assert (work / "engine" / "dspark.py").read_text() == "ENABLED = True\n"
    assert git(work, "status", "--porcelain") == ""


def test_second_apply_reports_already_applied_and_changes_nothing(toy):
    run_apply(toy)
    before = tree_fingerprint(toy["workdir"])
    state_file = toy["workdir"] / ".git" / "dspark" / "state.json"
    state_before = state_file.read_bytes()
    result = run_apply(toy)
    assert result["status"] == "already applied" and result["new"] == []
    assert tree_fingerprint(toy["workdir"]) == before
    assert state_file.read_bytes() == state_before


def test_dirty_worktree_is_refused_without_force_and_kept_with_it(toy):
    run_apply(toy, commit="v1.0")
    git(toy["workdir"], "checkout", "-q", "--detach", toy["upstream"]["v1.0"])  # leave the branch
    (toy["workdir"] / "engine" / "config.py").write_text("mine\n")
    (toy["workdir"] / "notes.txt").write_text("untracked\n")
    before = tree_fingerprint(toy["workdir"])
    with pytest.raises(UsageError, match="local change"):
        run_apply(toy)
    assert tree_fingerprint(toy["workdir"]) == before
    result = run_apply(toy, force=True)
    assert any("git stash pop" in note for note in result["notes"])
    assert not (toy["workdir"] / "notes.txt").exists()
    git(toy["workdir"], "checkout", "-q", "--detach", toy["upstream"]["v1.0"])
    git(toy["workdir"], "stash", "pop")
    assert (toy["workdir"] / "engine" / "config.py").read_text() == "mine\n"
    assert (toy["workdir"] / "notes.txt").read_text() == "untracked\n"


def test_a_dirty_clone_of_yours_lacking_the_pin_is_refused_before_any_fetch(toy):
    """A repository of the user's without the pinned commit is fetched into; with local changes and
    no --force it is refused first (exit 2), so that no remote or upstream object is added to it."""
    work = toy["workdir"]
    work.mkdir()
    git(work, "init", "-q")
    (work / "mine.txt").write_text("committed\n")
    git(work, "add", "mine.txt")
    git(work, "commit", "-q", "-m", "mine")
    (work / "mine.txt").write_text("edited\n")
    before = tree_fingerprint(work)
    with pytest.raises(UsageError, match="1 local change") as refused:
        run_apply(toy)
    assert refused.value.exit_code == 2
    assert git(work, "remote") == "" and git(work, "cat-file", "-t", toy["upstream"]["v1.0"], check=False) == ""
    assert tree_fingerprint(work) == before
    assert run_apply(toy, force=True)["status"] == "applied"  # --force: fetched, the edit stashed


def test_failing_patch_restores_the_exact_previous_state(toy):
    """DSpark's series is applied; a team layer's 2nd patch conflicts. With --force over staged
    and unstaged edits, the failure must give back HEAD, branches, index, stash and every byte."""
    run_apply(toy)
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"], [
        ("team: readme", {"README.team": "ours\n"}),
        ("team: conflicting core edit", {"engine/core.py": CORE.replace("line 11\n", "line eleven\n")}),
    ])
    work = toy["workdir"]
    (work / "engine" / "config.py").write_text("staged edit\n")
    git(work, "add", "engine/config.py")
    (work / "engine" / "config.py").write_text("unstaged edit on top\n")
    (work / "scratch.txt").write_text("untracked\n")
    before = tree_fingerprint(work)
    with pytest.raises(PatchFailed) as failure:
        run_apply(toy, series=(team,), force=True)
    message = str(failure.value)
    assert "team/0002-team-conflicting-core-edit.patch" in message
    assert "file engine/core.py" in message and "hunk #1 (@@ -8,7 +8,7 @@)" in message
    assert failure.value.exit_code == 4
    assert tree_fingerprint(work) == before
    state = json.loads((work / ".git" / "dspark" / "state.json").read_text())
    assert state["in_progress"] is None


def test_layered_series_goes_after_dspark_and_only_new_patches_are_applied(toy):
    run_apply(toy)
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"], [
        ("team: telemetry", {"engine/telemetry.py": "ON = 1\n"}),
    ])
    result = run_apply(toy, series=(team,))
    assert result["new"] == ["team/0001-team-telemetry.patch"]
    assert result["applied"][:2] == ["dspark/0001-dspark-hook-in-core.patch", "dspark/0002-dspark-method-and-module.patch"]
    assert git(toy["workdir"], "log", "-1", "--format=%s") == "team: telemetry"
    status = applier.status(toy["workdir"])
    assert [p["label"] for p in status["applied"]] == result["applied"]
    assert status["drift"] == []
    with pytest.raises(UsageError, match=r"team/0001-team-telemetry.patch is applied from your series layer 'team', "
                                         r"which this run was not given: pass --series with its directory again"):
        run_apply(toy)  # the layer left out


def test_a_layer_left_out_before_one_given_is_named_as_left_out(toy):
    """--series team --series extra applied, then --series extra alone: the team layer is named as
    the one not given (was: "patch 3 applied is team/..., the series has extra/...; run `dspark revert`
    first", which takes every layer off)."""
    team, extra = (make_series(toy["root"], toy["upstream"]["repo"], name, toy["upstream"]["v1.0"],
                               [(f"{name}: file", {f"engine/{name}.py": "ON = 1\n"})]) for name in ("team", "extra"))
    run_apply(toy, series=(team, extra))
    with pytest.raises(UsageError, match=r"team/0001-team-file.patch is applied from your series layer 'team', "
                                         r"which this run was not given: pass --series with its directory again"):
        run_apply(toy, series=(extra,))


def test_patch_changed_after_apply_is_refused(toy):
    run_apply(toy)
    patch = toy["series"] / "0002-dspark-method-and-module.patch"
    patch.write_text(patch.read_text().replace("ENABLED = True", "ENABLED = False"))
    with pytest.raises(UsageError, match="does not match the lock"):
        run_apply(toy)
    from dspark_cli import series
    series.write_lock(toy["series"])
    with pytest.raises(UsageError, match="changed since it was applied"):
        run_apply(toy)
    assert any("changed in its series" in line for line in applier.status(toy["workdir"])["drift"])


def test_unpinned_commit_is_refused_unless_allowed(toy):
    with pytest.raises(UsageError, match=r"known pins: v1\.0"):
        run_apply(toy, commit=toy["upstream"]["v1.1"])
    assert not toy["workdir"].exists()
    result = run_apply(toy, commit=toy["upstream"]["v1.1"][:10], allow_unpinned=True)
    assert result["status"] == "applied" and result["base"] == toy["upstream"]["v1.1"]
    assert "1 commit(s) ahead of and 0 behind v1.0" in result["drift"][0]


def test_short_commit_and_tag_are_checked_against_the_clone(toy, tmp_path):
    short = write_compat(tmp_path / "short", toy["upstream"], toy["series"], commit=toy["upstream"]["v1.0"][:9]) \
        if (tmp_path / "short").mkdir() is None else None
    result = applier.apply(compat.load(short), applier.ApplyRequest(engine="toy", workdir=tmp_path / "w2"))
    assert result["base"] == toy["upstream"]["v1.0"]
    git(toy["upstream"]["repo"], "tag", "-f", "v1.0", toy["upstream"]["v1.1"])  # a moved tag
    with pytest.raises(UsageError, match="tag v1.0 points at"):
        applier.apply(compat.load(short), applier.ApplyRequest(engine="toy", workdir=tmp_path / "w3"))


def test_revert_goes_back_to_base_and_never_loses_user_commits(toy):
    run_apply(toy)
    work = toy["workdir"]
    old_tip = git(work, "rev-parse", "HEAD")
    result = applier.revert(work)
    assert result["status"] == "reverted" and len(result["removed"]) == 2
    assert git(work, "rev-parse", "HEAD") == toy["upstream"]["v1.0"]
    assert git(work, "rev-parse", "refs/dspark/before-revert") == old_tip
    assert git(work, "status", "--porcelain") == ""
    assert applier.revert(work)["status"] == "already at base"

    run_apply(toy)
    (work / "mine.py").write_text("x = 1\n")
    git(work, "add", "mine.py")
    git(work, "commit", "-q", "-m", "my own work")
    before = tree_fingerprint(work)
    with pytest.raises(UsageError, match="1 commit\\(s\\) of yours"):
        applier.revert(work)
    assert tree_fingerprint(work) == before
    result = applier.revert(work, keep_user_commits=True)
    assert git(work, "log", "--format=%s", f"{toy['upstream']['v1.0']}..HEAD") == "my own work"
    assert (work / "mine.py").exists() and not (work / "engine" / "dspark.py").exists()
    assert run_apply(toy)["status"] == "applied"  # patches go back on top of the user's commit


def test_an_amended_patch_commit_is_the_users_work(toy):
    """A patch commit amended after apply keeps its trailers but not the patch's tree: status says
    so, revert refuses to drop it, and with --force keeps it on a dspark/saved-<time> branch."""
    run_apply(toy)
    work = toy["workdir"]
    amended = amend_patch_commit(work)
    drift = applier.status(work)["drift"]
    assert any("0002-dspark-method-and-module.patch's commit" in line and "beyond its patch" in line for line in drift)
    result, saved = revert_refused_then_forced(work, amended)
    assert any(f"kept on branch {saved}" in note for note in result["notes"])


def amend_patch_commit(work) -> str:
    (work / "engine" / "dspark.py").write_text("ENABLED = False  # mine\n")
    git(work, "commit", "-q", "-a", "--amend", "--no-edit")
    return git(work, "rev-parse", "HEAD")


def revert_refused_then_forced(work, amended: str) -> tuple[dict, str]:
    """revert refuses to drop the amended commit and changes nothing; --force reverts and keeps it
    on a dspark/saved-<time> branch. Returns the forced result and that branch."""
    before = tree_fingerprint(work)
    with pytest.raises(UsageError, match=f"commit {amended[:12]} holds changes beyond its patch"):
        applier.revert(work)
    assert tree_fingerprint(work) == before
    result = applier.revert(work, force=True)
    saved = git(work, "for-each-ref", "--format=%(refname:short)", "refs/heads/dspark/saved-*")
    assert result["status"] == "reverted" and git(work, "rev-parse", saved) == amended
    return result, saved


@pytest.mark.parametrize("series_since", ["patch edited", "moved", "deleted"])
def test_an_amended_patch_commit_is_found_whatever_became_of_its_series(toy, series_since):
    """The check rebuilt a patch commit from the series file, and skipped it once that file
    changed (or the --series directory moved): revert then dropped the amendment silently, just
    when apply says to run it. Apply now keeps the patch's bytes in the repository (gc-safe)."""
    run_apply(toy)
    work = toy["workdir"]
    amended = amend_patch_commit(work)
    patch = toy["series"] / "0002-dspark-method-and-module.patch"
    if series_since == "patch edited":
        patch.write_text(patch.read_text().replace("ENABLED = True", "ENABLED = 2"))
        from dspark_cli import series
        series.write_lock(toy["series"])
        with pytest.raises(UsageError, match="changed since it was applied; run `dspark revert` first"):
            run_apply(toy)
    elif series_since == "moved":
        toy["series"].rename(toy["root"] / "elsewhere")
    else:
        shutil.rmtree(toy["series"])
    git(work, "reflog", "expire", "--expire=now", "--all")
    git(work, "gc", "-q", "--prune=now")
    assert any(f"commit {amended[:12]} holds changes beyond its patch" in line
               for line in applier.status(work)["drift"])
    revert_refused_then_forced(work, amended)


def test_an_unamended_series_reverts_after_its_patch_files_changed(toy):
    run_apply(toy)
    shutil.rmtree(toy["series"])
    assert not any("beyond its patch" in line or "cannot be checked" in line
                   for line in applier.status(toy["workdir"])["drift"])
    assert applier.revert(toy["workdir"])["status"] == "reverted"


def as_an_older_dspark_made_them(work, base: str) -> None:
    """The work branch's commits again, without the patch blob trailer (as dspark wrote them before)."""
    parent = base
    for sha in git(work, "rev-list", "--reverse", f"{base}..HEAD").split():
        message = git(work, "log", "-1", "--format=%B", sha)
        message = "".join(line + "\n" for line in message.splitlines() if not line.startswith("Dspark-Patch-Blob:"))
        parent = git(work, "commit-tree", f"{sha}^{{tree}}", "-p", parent, input=message)
    git(work, "reset", "-q", "--hard", parent)


def test_a_patch_commit_of_an_older_dspark_is_checked_while_its_file_matches_and_else_counts_as_changed(toy):
    run_apply(toy)
    work = toy["workdir"]
    as_an_older_dspark_made_them(work, toy["upstream"]["v1.0"])
    assert applier.status(work)["drift"] == []  # checked against the series file, as it still matches
    patch = toy["series"] / "0001-dspark-hook-in-core.patch"
    patch.write_text(patch.read_text().replace("# hook", "# the hook"))
    first = git(work, "rev-parse", "HEAD~1")
    with pytest.raises(UsageError, match=f"commit {first[:12]} cannot be checked against its patch .* may hold "
                                         "changes of yours: .* pass --force"):
        applier.revert(work)
    assert applier.revert(work, force=True)["status"] == "reverted"
    assert git(work, "rev-parse", "HEAD") == toy["upstream"]["v1.0"]


def test_a_patch_applied_by_3_way_merge_is_not_taken_for_an_amended_one(toy):
    """A team patch made on v1.0 whose context v1.1 changed goes on by 3-way merge; rebuilding its
    commit's tree takes the same merge, so status sees no change of the user's."""
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                       [("team: edit line 22", {"engine/core.py": CORE.replace("line 22\n", "line 22 (team)\n")})])
    plain = subprocess.run(["git", "apply", "--check", str(next(team.glob("0001-*.patch")))],
                           cwd=toy["upstream"]["repo"], capture_output=True, text=True)  # upstream is at v1.1
    assert plain.returncode != 0 and "patch does not apply" in plain.stderr
    result = run_apply(toy, commit="v1.1", allow_unpinned=True, series=(team,))
    assert result["status"] == "applied" and "line 25 (1.1)" in (toy["workdir"] / "engine" / "core.py").read_text()
    assert not any("beyond its patch" in line for line in applier.status(toy["workdir"])["drift"])


def test_revert_that_cannot_replay_a_user_commit_changes_nothing(toy):
    run_apply(toy)
    work = toy["workdir"]
    (work / "engine" / "dspark.py").write_text("ENABLED = False  # tuned\n")
    git(work, "commit", "-q", "-am", "tune dspark")
    before = tree_fingerprint(work)
    with pytest.raises(PatchFailed, match="does not apply without the patches"):
        applier.revert(work, keep_user_commits=True)
    assert tree_fingerprint(work) == before


def run_cli(toy, *args: str, kill_after: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DSPARK_COMPAT": str(toy["compat_path"]), "PYTHONPATH": str(REPO_ROOT)}
    if kill_after:
        env[KILL_AT_ENV] = kill_after
    return subprocess.run([sys.executable, "-m", "dspark_cli", *args], env=env, capture_output=True, text=True)


def test_apply_killed_midway_is_recovered_by_the_next_run(toy):
    """SIGKILL the real CLI right after its first patch commit, then run apply again."""
    killed = run_cli(toy, "apply", "toy", "--workdir", str(toy["workdir"]), kill_after="committed:1")
    assert killed.returncode == -signal.SIGKILL
    work = toy["workdir"]
    state = json.loads((work / ".git" / "dspark" / "state.json").read_text())
    assert state["in_progress"]["op"] == "apply"
    assert git(work, "log", "-1", "--format=%s") == "dspark: hook in core"  # half applied
    assert any("interrupted apply" in line for line in applier.status(work)["drift"])

    result = run_apply(toy)
    assert result["recovered"].startswith("recovered an interrupted apply")
    assert result["new"] == ["dspark/0001-dspark-hook-in-core.patch", "dspark/0002-dspark-method-and-module.patch"]
    assert series_commits(toy, work) == SERIES_COMMITS
    assert git(work, "status", "--porcelain") == ""


def test_apply_killed_between_git_apply_and_its_commit_is_recovered_without_force(toy):
    """Patch 2 is in the worktree but not committed: those changes are the apply's own (the
    snapshot says which patch went onto which HEAD), so recovery drops them without asking."""
    work = toy["workdir"]
    assert run_cli(toy, "apply", "toy", "-C", str(work), kill_after="applied:2").returncode == -signal.SIGKILL
    assert git(work, "status", "--porcelain") != ""  # patch 2's files, uncommitted
    assert not any("would discard" in line for line in applier.status(work)["drift"])
    again = run_cli(toy, "apply", "toy", "-C", str(work))
    assert again.returncode == 0, again.stderr
    assert_recovered_cleanly(toy, work)


def test_apply_killed_while_git_apply_writes_its_files_is_recovered_without_force(toy):
    """git apply unlinks each file it changes, then writes them back whole: killed between, files
    are missing or cut short and its index.lock stays. The next run took those for the user's
    work ("would discard N local change(s)"; --force kept them on a bogus saved branch)."""
    work = toy["workdir"]
    assert run_cli(toy, "apply", "toy", "-C", str(work), kill_after="applied:2").returncode == -signal.SIGKILL
    (work / "engine" / "config.py").unlink()  # unlinked, not yet written
    (work / "engine" / "dspark.py").write_text("ENABLED")  # written part way
    (work / ".git" / "index.lock").write_text("")
    again = run_cli(toy, "apply", "toy", "-C", str(work))
    assert again.returncode == 0, again.stderr
    assert_recovered_cleanly(toy, work)


def test_the_same_changes_edited_after_such_a_kill_are_the_users(toy):
    """The worktree differing from HEAD + the patch in one byte is work of the user's: refused."""
    work = toy["workdir"]
    assert run_cli(toy, "apply", "toy", "-C", str(work), kill_after="applied:2").returncode == -signal.SIGKILL
    (work / "engine" / "dspark.py").write_text("ENABLED = False\n")
    refused = run_cli(toy, "apply", "toy", "-C", str(work))
    assert refused.returncode == 2 and "would discard" in refused.stderr, refused.stderr


def test_bytes_that_are_no_prefix_of_the_patched_file_are_the_users(toy):
    """Cut short is a prefix of what git was writing; anything else in such a file is the user's."""
    work = toy["workdir"]
    assert run_cli(toy, "apply", "toy", "-C", str(work), kill_after="applied:2").returncode == -signal.SIGKILL
    (work / "engine" / "config.py").unlink()
    (work / "engine" / "dspark.py").write_text("ENABLED = Tru3")
    refused = run_cli(toy, "apply", "toy", "-C", str(work))
    assert refused.returncode == 2 and "would discard" in refused.stderr, refused.stderr


def test_revert_killed_after_a_replay_is_recovered_without_force(toy):
    """revert --keep-user-commits killed after replaying a commit of the user's: the replay holds
    the same change as the original the old branch keeps, so recovery does not count it as lost."""
    run_apply(toy)
    work = toy["workdir"]
    (work / "mine.txt").write_text("mine\n")
    git(work, "add", "mine.txt")
    git(work, "commit", "-q", "-m", "user: add mine.txt")
    killed = run_cli(toy, "revert", "-C", str(work), "--keep-user-commits", kill_after="replayed:1")
    assert killed.returncode == -signal.SIGKILL
    again = run_cli(toy, "revert", "-C", str(work), "--keep-user-commits")
    assert again.returncode == 0, again.stderr
    assert git(work, "log", "--format=%s", f"{toy['upstream']['v1.0']}..HEAD").splitlines() == ["user: add mine.txt"]
    assert not git(work, "branch", "--list", "dspark/saved-*")


def test_a_pid_reused_since_the_kill_does_not_block_recovery(toy):
    """The snapshot names its process by pid and start time (and machine, boot, pid namespace):
    another process holding that pid now is not the apply; one from another container may be."""
    work = toy["workdir"]
    assert run_cli(toy, "apply", "toy", "-C", str(work), kill_after="committed:1").returncode == -signal.SIGKILL
    state_file = work / ".git" / "dspark" / "state.json"
    state = json.loads(state_file.read_text())
    other = subprocess.Popen(["sleep", "60"])
    try:
        state["in_progress"]["pid"] = other.pid  # the killed apply's pid, now another process's
        state_file.write_text(json.dumps(state))
        recovered = run_cli(toy, "apply", "toy", "-C", str(work))
        assert recovered.returncode == 0 and "recovered an interrupted apply" in recovered.stderr, recovered.stderr
    finally:
        other.kill()
    assert run_cli(toy, "revert", "-C", str(work)).returncode == 0
    host, boot, _, start = state["in_progress"]["process"].split(" ")
    state["in_progress"]["process"] = f"{host} {boot} pid:[1] {start}"  # another pid namespace
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "in_progress": state["in_progress"]}))
    refused = run_cli(toy, "apply", "toy", "-C", str(work))
    assert refused.returncode == 2 and "another container or machine" in refused.stderr, refused.stderr
    assert run_cli(toy, "apply", "toy", "-C", str(work), "--force").returncode == 0


def test_a_killed_apply_not_yet_reaped_does_not_block_recovery(toy):
    """SIGKILLed under `timeout` (or in a container whose pid 1 never reaps), the apply stays a
    zombie with its pid and start time: it was taken for a live run, and recovery refused ("another
    dspark apply is running") for as long as nobody reaped it."""
    from dspark_cli.workspace import proc_stat, process_tag

    work = toy["workdir"]
    assert run_cli(toy, "apply", "toy", "-C", str(work), kill_after="committed:1").returncode == -signal.SIGKILL
    state_file = work / ".git" / "dspark" / "state.json"
    state = json.loads(state_file.read_text())
    zombie = subprocess.Popen(["sleep", "60"])
    try:
        zombie.kill()
        for _ in range(100):  # until the kernel has made it a zombie
            if proc_stat(zombie.pid)[0] == "Z":
                break
            time.sleep(0.01)
        state["in_progress"].update(pid=zombie.pid, process=process_tag(zombie.pid))  # the kill's own process
        state_file.write_text(json.dumps(state))
        recovered = run_cli(toy, "apply", "toy", "-C", str(work))
        assert recovered.returncode == 0 and "recovered an interrupted apply" in recovered.stderr, recovered.stderr
    finally:
        zombie.wait()
    assert series_commits(toy, work) == SERIES_COMMITS


@pytest.mark.parametrize("work_since", ["commit", "edit", "both"])
def test_recovery_never_discards_work_done_after_the_kill(toy, work_since):
    """After a killed apply the user edits and/or commits on dspark/v1.0: recovery refuses (exit 2,
    one line, nothing touched); with --force it keeps all of it on a dspark/saved-<time> branch."""
    work = toy["workdir"]
    assert run_cli(toy, "apply", "toy", "-C", str(work), kill_after="committed:1").returncode == -signal.SIGKILL
    if work_since in ("commit", "both"):
        (work / "mine.py").write_text("mine = 1\n")
        git(work, "add", "mine.py")
        git(work, "commit", "-q", "-m", "my work after the kill")
    if work_since in ("edit", "both"):
        (work / "engine" / "config.py").write_text("my edit\n")
    assert any("refuses while that would discard" in line for line in applier.status(work)["drift"])
    before = tree_fingerprint(work)
    for command in ("apply", "revert"):
        refused = run_cli(toy, command, *(["toy"] if command == "apply" else []), "-C", str(work))
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert "would discard" in refused.stderr and "--force" in refused.stderr
        assert tree_fingerprint(work) == before

    result = run_apply(toy, force=True)
    saved = git(work, "for-each-ref", "--format=%(refname:short)", "refs/heads/dspark/saved-*").splitlines()
    assert len(saved) == 1 and f"kept on branch {saved[0]}" in result["recovered"]
    assert result["status"] == "applied" and len(result["new"]) == 2
    if work_since in ("commit", "both"):
        assert "my work after the kill" in git(work, "log", "--format=%s", saved[0])
        assert git(work, "show", f"{saved[0]}:mine.py") == "mine = 1"
    if work_since in ("edit", "both"):
        assert git(work, "show", f"{saved[0]}:engine/config.py") == "my edit"


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A real HTTP package index (PEP 691 JSON) on localhost, serving files from `root/files`."""
    import functools
    import http.server
    import threading

    root = tmp_path / "index"
    (root / "files").mkdir(parents=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("PIP_INDEX_URL", f"{url}/simple")

    def publish(project: str, path: Path) -> None:
        (root / "files" / path.name).write_bytes(path.read_bytes())
        (root / "simple" / project).mkdir(parents=True, exist_ok=True)
        (root / "simple" / project / "index.html").write_text(json.dumps(
            {"files": [{"filename": path.name, "url": f"{url}/files/{path.name}"}]}))

    yield publish
    server.shutdown()


def publish_toy_sdist(toy, tmp_path, local_index) -> tuple[Path, str]:
    """toy-engine-1.0.tar.gz (the v1.0 tree) on the local index and pinned in compat.yaml."""
    import tarfile

    from dspark_cli.series import sha256_of

    sdist = tmp_path / "toy-engine-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(toy["upstream"]["repo"] / "engine", arcname="toy-engine-1.0/engine")
    local_index("toy-engine", sdist)
    digest = sha256_of(sdist)
    toy["compat_path"].write_text(toy["compat_path"].read_text().replace("releases: []", (
        "releases:\n          - package: toy-engine\n            version: '1.0'\n"
        f"            file: toy-engine-1.0.tar.gz\n            sha256: {digest}")))
    return sdist, digest


def test_pypi_source_downloads_checks_and_records_the_release(toy, tmp_path, local_index):
    """The PyPI path end to end against a local index: download, sha256, base commit, series."""
    from dspark_cli.errors import CheckFailed
    from dspark_cli.series import sha256_of

    sdist, digest = publish_toy_sdist(toy, tmp_path, local_index)
    request = applier.ApplyRequest(engine="toy", workdir=tmp_path / "pypi-work", source="pypi")
    result = applier.apply(compat.load(toy["compat_path"]), request)
    work = tmp_path / "pypi-work"
    assert result["status"] == "applied" and result["source"]["file"] == "toy-engine-1.0.tar.gz"
    assert sha256_of(tmp_path / "cache" / "releases" / "toy-engine-1.0.tar.gz") == digest
    message = git(work, "log", "-1", "--format=%B", result["base"])
    assert f"Dspark-Base-Sha256: {digest}" in message and "toy-engine 1.0" in message
    assert git(work, "ls-tree", "-r", "--name-only", result["base"]).splitlines() == ["engine/config.py", "engine/core.py"]
    assert applier.apply(compat.load(toy["compat_path"]), request)["status"] == "already applied"

    # a cached file is checked again before use: a changed one is fetched anew, not unpacked
    cached = tmp_path / "cache" / "releases" / "toy-engine-1.0.tar.gz"
    cached.write_bytes(cached.read_bytes() + b"tampered")
    again = applier.apply(compat.load(toy["compat_path"]),
                          applier.ApplyRequest(engine="toy", workdir=tmp_path / "pypi-again", source="pypi"))
    assert sha256_of(cached) == digest and again["base"] == result["base"]

    (tmp_path / "cache" / "releases" / "toy-engine-1.0.tar.gz").unlink()
    sdist.write_bytes(sdist.read_bytes() + b"tampered")
    local_index("toy-engine", sdist)
    with pytest.raises(CheckFailed, match="sha256 .* does not match compat.yaml"):
        applier.apply(compat.load(toy["compat_path"]),
                      applier.ApplyRequest(engine="toy", workdir=tmp_path / "pypi-2", source="pypi"))
    assert not (tmp_path / "pypi-2").exists()
    assert not (tmp_path / "cache" / "releases" / "toy-engine-1.0.tar.gz").exists()


def test_one_release_file_makes_one_base_commit_anywhere(toy, tmp_path, local_index):
    """The base commit is dated by the release's newest file, not the clock: two workspaces made
    from one release file (by CI runs on different days, say) have the same base."""
    import tarfile
    import time

    sdist, _ = publish_toy_sdist(toy, tmp_path, local_index)
    with tarfile.open(sdist) as tar:
        newest = max(int(member.mtime) for member in tar.getmembers())
    bases = []
    for name in ("first", "second"):
        request = applier.ApplyRequest(engine="toy", workdir=tmp_path / name, source="pypi")
        bases.append(applier.apply(compat.load(toy["compat_path"]), request)["base"])
        time.sleep(1.1)  # git dates have one-second resolution
    assert bases[0] == bases[1]
    assert git(tmp_path / "first", "log", "-1", "--format=%at %ct", bases[0]) == f"{newest} {newest}"


def test_a_wheel_release_is_dated_by_its_newest_member_in_utc(tmp_path):
    import calendar
    import zipfile

    from dspark_cli import pypi_source

    wheel = tmp_path / "toy_engine-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(zipfile.ZipInfo("engine/core.py", date_time=(2026, 3, 1, 12, 0, 0)), "x = 1\n")
        archive.writestr(zipfile.ZipInfo("engine/config.py", date_time=(2026, 3, 2, 8, 30, 2)), "y = 2\n")
    assert pypi_source.extract(wheel, tmp_path / "tree") == calendar.timegm((2026, 3, 2, 8, 30, 2))
    assert (tmp_path / "tree" / "engine" / "config.py").read_text() == "y = 2\n"


def test_a_zeroed_zip_date_is_no_time_not_a_traceback(tmp_path):
    """A DOS date of 0 reads back as month 0, which calendar.timegm refused (ValueError)."""
    import zipfile

    from dspark_cli import pypi_source

    wheel = tmp_path / "toy_engine-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(zipfile.ZipInfo("engine/core.py", date_time=(1980, 0, 0, 0, 0, 0)), "x = 1\n")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.infolist()[0].date_time[1] == 0
    assert pypi_source.extract(wheel, tmp_path / "tree") == 0


def test_a_pypi_workspace_is_refused_for_git_before_any_fetch(toy, tmp_path, local_index):
    publish_toy_sdist(toy, tmp_path, local_index)
    work = tmp_path / "pypi-work"
    applier.apply(compat.load(toy["compat_path"]), applier.ApplyRequest(engine="toy", workdir=work, source="pypi"))
    before = tree_fingerprint(work)
    with pytest.raises(UsageError, match="was made from toy-engine-1.0.tar.gz"):
        applier.apply(compat.load(toy["compat_path"]),
                      applier.ApplyRequest(engine="toy", workdir=work, repo=str(toy["upstream"]["repo"])))
    assert git(work, "remote") == ""  # no remote added, nothing fetched
    assert git(work, "cat-file", "-t", toy["upstream"]["v1.1"], check=False) == ""
    assert tree_fingerprint(work) == before


def test_a_pypi_workspace_is_refused_for_another_release_file_of_the_same_name(toy, tmp_path, local_index):
    """A release re-published under the same file name and pinned with its new sha256 is another
    base: the workspace made from the old one is not reused for it."""
    import tarfile

    from dspark_cli.series import sha256_of

    sdist, digest = publish_toy_sdist(toy, tmp_path, local_index)
    work = tmp_path / "pypi-work"
    applier.apply(compat.load(toy["compat_path"]), applier.ApplyRequest(engine="toy", workdir=work, source="pypi"))
    before = tree_fingerprint(work)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "NOTICE").write_text("re-published\n")
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(toy["upstream"]["repo"] / "engine", arcname="toy-engine-1.0/engine")
        tar.add(tmp_path / "extra" / "NOTICE", arcname="toy-engine-1.0/NOTICE")
    local_index("toy-engine", sdist)
    toy["compat_path"].write_text(toy["compat_path"].read_text().replace(digest, sha256_of(sdist)))
    with pytest.raises(UsageError, match="was made from toy-engine-1.0.tar.gz"):
        applier.apply(compat.load(toy["compat_path"]), applier.ApplyRequest(engine="toy", workdir=work, source="pypi"))
    assert tree_fingerprint(work) == before


def test_a_pypi_workspace_keeps_its_source_when_source_is_left_out(toy, tmp_path, local_index):
    """README's quickstart then `dspark apply vllm --series ./our-patches -C ./vllm-v0.32.0`: was exit 2
    '...was made from vllm-0.32.0.tar.gz; use another --workdir for this source'."""
    publish_toy_sdist(toy, tmp_path, local_index)
    work = tmp_path / "pypi-work"
    made = applier.apply(compat.load(toy["compat_path"]), applier.ApplyRequest(engine="toy", workdir=work, source="pypi"))
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                       [("team: readme", {"README.team": "ours\n"})])
    run = subprocess.run([sys.executable, "-m", "dspark_cli", "apply", "toy", "--series", str(team), "-C", str(work),
                          "--json"], capture_output=True, text=True,
                         env={**os.environ, "DSPARK_COMPAT": str(toy["compat_path"]), "PYTHONPATH": str(REPO_ROOT)})
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["source"] == made["source"] and result["base"] == made["base"]
    assert result["new"] == ["team/0001-team-readme.patch"] and (work / "README.team").read_text() == "ours\n"
    assert git(work, "remote") == ""  # nothing cloned or fetched

    with pytest.raises(UsageError, match=r"was made from toy-engine-1.0.tar.gz \(--source pypi --file "
                                         r"toy-engine-1.0.tar.gz\); give that source"):
        applier.apply(compat.load(toy["compat_path"]), applier.ApplyRequest(engine="toy", workdir=work, source="git"))


def test_a_workspace_keeps_its_pin_when_commit_is_left_out(toy):
    """`apply --commit v1.1 -C W`, then `apply --series team -C W` without --commit: W's pin, not
    the default one (was exit 2: 'W holds toy v1.1; use another --workdir for toy v1.0')."""
    import yaml

    doc = yaml.safe_load(toy["compat_path"].read_text())
    pins = doc["engines"]["toy"]["pins"]
    pins["v1.1"] = {**pins["v1.0"], "commit": toy["upstream"]["v1.1"], "tag": "v1.1"}
    toy["compat_path"].write_text(yaml.safe_dump(doc))
    table = compat.load(toy["compat_path"])
    work = toy["workdir"]
    made = applier.apply(table, applier.ApplyRequest(engine="toy", workdir=work, commit="v1.1"))
    assert made["pin"] == "v1.1" and made["base"] == toy["upstream"]["v1.1"]
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.1"],
                       [("team: readme", {"README.team": "ours\n"})])
    again = applier.apply(table, applier.ApplyRequest(engine="toy", workdir=work, series=(team,)))
    assert again["pin"] == "v1.1" and again["base"] == made["base"] and again["new"] == ["team/0001-team-readme.patch"]
    assert git(work, "symbolic-ref", "HEAD") == "refs/heads/dspark/v1.1"
    fresh = applier.apply(table, applier.ApplyRequest(engine="toy", workdir=toy["root"] / "fresh"))
    assert fresh["pin"] == "v1.0"  # a new workdir still takes the default pin


def test_a_workspace_keeps_the_repository_it_was_cloned_from(toy, tmp_path):
    """Made from a mirror (--repo), a workspace re-applied without --repo keeps the mirror as its
    source (recorded, shown by status, fetched from) rather than compat.yaml's repository."""
    mirror = tmp_path / "mirror.git"
    git(tmp_path, "clone", "-q", "--bare", str(toy["upstream"]["repo"]), str(mirror))
    run_apply(toy, repo=str(mirror))
    result = run_apply(toy)
    assert result["status"] == "already applied" and result["source"]["repository"] == str(mirror)
    state = json.loads((toy["workdir"] / ".git" / "dspark" / "state.json").read_text())
    assert state["source"]["repository"] == str(mirror)


def test_a_patch_already_in_the_tree_is_refused_not_committed_empty(toy):
    """A team series repeating DSpark's 0001: `git am` stops there; so does apply, tree restored."""
    run_apply(toy)
    work = toy["workdir"]
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"], [dspark_edits()[0]])
    before = tree_fingerprint(work)
    with pytest.raises(PatchFailed, match="team/0001-dspark-hook-in-core.patch did not apply: its changes are already in the tree"):
        run_apply(toy, series=(team,))
    assert tree_fingerprint(work) == before


def test_apply_and_rebase_read_the_package_index_alike(toy, tmp_path, local_index):
    """pypi_source.index_files serves the release download and rebase's --onto lookup; an answer
    that is not a file list is one EnvironmentProblem line for both."""
    from dspark_cli import pypi_source, rebase
    from dspark_cli.compat import ReleaseFile
    from dspark_cli.errors import EnvironmentProblem

    sdist, digest = publish_toy_sdist(toy, tmp_path, local_index)
    page = tmp_path / "index" / "simple" / "toy-engine" / "index.html"
    entry = json.loads(page.read_text())["files"][0]
    page.write_text(json.dumps({"files": [entry, {**entry, "filename": "toy_engine-1.0.tar.gz",
                                                   "hashes": {"sha256": digest}}]}))
    project_page, files = pypi_source.index_files("toy_engine")
    assert project_page.endswith("/simple/toy-engine/") and files[0]["filename"] == sdist.name
    assert rebase.index_release("toy-engine", "1.0") == ReleaseFile("toy-engine", "1.0", "toy_engine-1.0.tar.gz", digest)
    page.write_text(json.dumps({"files": [1]}))
    release = ReleaseFile("toy-engine", "1.0", sdist.name, digest)
    for lookup in (lambda: pypi_source.fetch_release(release), lambda: rebase.index_release("toy-engine", "1.0")):
        with pytest.raises(EnvironmentProblem, match="cannot read the package index .*not a list of objects"):
            lookup()


def test_an_index_listing_a_relative_url_is_read_against_the_project_page(toy, tmp_path, local_index):
    """PEP 503 lets a mirror list "../../files/x.tar.gz": urlopen took it as is, a ValueError
    traceback ("unknown url type"), exit 1."""
    sdist, _ = publish_toy_sdist(toy, tmp_path, local_index)
    page = tmp_path / "index" / "simple" / "toy-engine" / "index.html"
    page.write_text(json.dumps({"files": [{"filename": sdist.name, "url": f"../../files/{sdist.name}"}]}))
    run = run_cli(toy, "apply", "toy", "--source", "pypi", "--workdir", str(tmp_path / "relative"))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "relative" / "engine" / "core.py").is_file()


def test_an_index_url_that_is_no_url_is_one_line(toy, tmp_path, local_index, monkeypatch):
    """A PIP_INDEX_URL urllib cannot open was a ValueError traceback, exit 1."""
    publish_toy_sdist(toy, tmp_path, local_index)
    monkeypatch.setenv("PIP_INDEX_URL", "not a url")
    run = run_cli(toy, "apply", "toy", "--source", "pypi", "--workdir", str(tmp_path / "w"))
    assert run.returncode == 3 and run.stderr.splitlines()[-1:] == [
        "error: cannot read the package index not a url: unknown url type: 'not a url/toy-engine/'"], run.stderr
    assert not (tmp_path / "w").exists()


def _absolute_link_sdist(path: Path) -> bytes:
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        link = tarfile.TarInfo("toy-engine-1.0/engine/evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        data = b"X = 1\n"
        member = tarfile.TarInfo("toy-engine-1.0/engine/core.py")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return path.read_bytes()


@pytest.mark.parametrize("name, make", [
    ("toy-engine-1.0.tar.gz", lambda path: b"not a tar"),
    ("toy_engine-1.0-py3-none-any.whl", lambda path: b"not a zip"),
    ("toy-engine-1.0.tar.gz", _absolute_link_sdist),  # Python's "data" extraction filter refuses it
], ids=["garbage-sdist", "garbage-wheel", "absolute-link"])
def test_a_release_file_that_cannot_be_unpacked_is_one_line(toy, tmp_path, name, make):
    """Its sha256 matches compat.yaml, so the entry names a bad file: a tarfile.ReadError /
    zipfile.BadZipFile / AbsoluteLinkError traceback, exit 1, before."""
    import tarfile

    from dspark_cli.series import sha256_of

    if make is _absolute_link_sdist and not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tar extraction filters (before 3.10.12 / 3.11.4)")
    release = tmp_path / "cache" / "releases" / name
    release.parent.mkdir(parents=True, exist_ok=True)
    data = make(release)
    release.write_bytes(data)
    toy["compat_path"].write_text(toy["compat_path"].read_text().replace("releases: []", (
        "releases:\n          - package: toy-engine\n            version: '1.0'\n"
        f"            file: {name}\n            sha256: {sha256_of(release)}")))
    run = run_cli(toy, "apply", "toy", "--source", "pypi", "--workdir", str(tmp_path / "w"))
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.splitlines()[-1].startswith(f"error: {name}: cannot be unpacked: "), run.stderr
    assert not (tmp_path / "w").exists()


def test_paths_with_brackets_print_as_they_are(toy, tmp_path):
    """rich read a workdir like `work[/x]` as markup: a MarkupError traceback from apply, and
    `status` dropped `[cpu]` from the path it printed."""
    work = tmp_path / "vllm[cpu][/x]"
    applied = run_cli(toy, "apply", "toy", "--workdir", str(work))
    assert applied.returncode == 0 and "Traceback" not in applied.stderr, applied.stderr
    assert f"cloning {toy['upstream']['repo']} into {work}" in applied.stderr and f"in {work} (base" in applied.stdout
    status = run_cli(toy, "status", "--workdir", str(work))
    assert status.returncode == 0 and f"workspace  {work}  (toy" in status.stdout, status.stdout


@pytest.mark.parametrize("since", ["moved", "deleted"])
def test_recovery_leaves_head_detached_when_its_branch_moved_since_the_kill(toy, tmp_path, since):
    """The branch HEAD was on at the snapshot, moved (or deleted) by the user after the kill: back
    on it HEAD would name the user's commit over the old commit's files. Recovery restores the
    snapshot's HEAD detached, says so, and leaves the user's branch where they put it."""
    work = toy["workdir"]
    git(tmp_path, "clone", "-q", str(toy["upstream"]["repo"]), str(work))
    git(work, "checkout", "-q", "-b", "mybranch")
    head = git(work, "rev-parse", "HEAD")
    assert run_cli(toy, "apply", "toy", "-C", str(work), kill_after="committed:1").returncode == -signal.SIGKILL
    git(work, "checkout", "-q", "mybranch")
    if since == "moved":
        (work / "engine" / "core.py").write_text("mine\n")
        git(work, "commit", "-q", "-am", "mine")
        detail = f"branch mybranch moved to {git(work, 'rev-parse', 'HEAD')[:12]} since"
    else:
        git(work, "checkout", "-q", "--detach")
        git(work, "branch", "-q", "-D", "mybranch")
        detail = "branch mybranch was deleted since"
    mine = git(work, "rev-parse", "-q", "--verify", "mybranch", check=False)
    done = run_cli(toy, "revert", "-C", str(work))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ("note: recovered an interrupted apply (started "
                           f"{done.stderr.split('(started ')[1].split(')')[0]}): restored the state before it; HEAD "
                           f"is left detached at {head[:12]}, as {detail}\n")
    assert git(work, "symbolic-ref", "-q", "HEAD", check=False) == "" and git(work, "rev-parse", "HEAD") == head
    assert git(work, "status", "--porcelain", "--untracked-files=all") == ""  # files are HEAD's
    assert git(work, "rev-parse", "-q", "--verify", "mybranch", check=False) == mine


def test_saved_branches_of_a_recovery_and_the_revert_after_it_never_collide(toy):
    """A recovery and a --force revert of an amended patch commit both keep work on
    dspark/saved-<time>: within one second they asked git for the same name (exit 3, the finished
    revert left marked interrupted). Every name of the next two minutes is taken here, so both must
    find a free one."""
    run_apply(toy)
    work = toy["workdir"]
    (work / "engine" / "dspark.py").write_text("ENABLED = False  # mine\n")
    git(work, "commit", "-q", "-a", "--amend", "--no-edit")
    amended = git(work, "rev-parse", "HEAD")
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                       [("team: readme", {"TEAM.md": "team\n"})])
    killed = run_cli(toy, "apply", "toy", "-C", str(work), "--series", str(team), kill_after="committed:1")
    assert killed.returncode == -signal.SIGKILL
    (work / "engine" / "config.py").write_text("local edit\n")
    now = datetime.now(timezone.utc)
    taken = {f"refs/heads/dspark/saved-{(now + timedelta(seconds=n)).strftime('%Y%m%dT%H%M%SZ')}" for n in range(120)}
    git(work, "update-ref", "--stdin", input="".join(f"create {ref} {toy['upstream']['v1.0']}\n" for ref in taken))
    reverted = run_cli(toy, "revert", "-C", str(work), "--force", "--json")
    assert reverted.returncode == 0, reverted.stderr
    assert json.loads((work / ".git" / "dspark" / "state.json").read_text())["in_progress"] is None
    saved = set(git(work, "for-each-ref", "--format=%(refname)", "refs/heads/dspark/saved-*").splitlines()) - taken
    assert len(saved) == 2 and all(ref.rsplit("-", 1)[0] in taken for ref in saved)
    by_tip = {git(work, "rev-parse", ref): ref for ref in saved}
    assert amended in by_tip
    (local,) = set(by_tip) - {amended}
    assert git(work, "show", f"{local}:engine/config.py") == "local edit"


def test_an_unpinned_workspace_is_named_as_such_when_the_pin_is_left_out(toy):
    work = toy["workdir"]
    v11 = toy["upstream"]["v1.1"]
    run_apply(toy, commit="v1.1", allow_unpinned=True)
    with pytest.raises(UsageError) as refused:
        run_apply(toy)
    assert str(refused.value) == (f"{work} holds toy at the unpinned commit {v11[:12]}; pass --commit {v11[:12]} "
                                  "--allow-unpinned to work on it, or use another --workdir for toy v1.0")
    assert run_apply(toy, commit=v11[:12], allow_unpinned=True)["status"] == "already applied"


def test_a_file_name_that_is_not_utf8_round_trips_through_status_revert_and_apply(toy):
    """git's output was decoded as strict UTF-8: a file named in another encoding was a
    UnicodeDecodeError traceback from revert (and apply after it)."""
    run_apply(toy)
    work = toy["workdir"]
    name = os.fsdecode(b"caf\xe9.txt")  # latin-1, not UTF-8
    (work / name).write_text("mine\n")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "my latin-1 file")
    for args in (("status",), ("revert", "--keep-user-commits"), ("apply", "toy"), ("status",)):
        done = run_cli(toy, *args, "-C", str(work))
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert (work / name).read_text() == "mine\n"
    assert git(work, "log", "-1", "--format=%s") == "dspark: method and module"
    assert git(work, "ls-files", "--", name) == '"caf\\351.txt"'  # tracked (git quotes the byte)


@pytest.mark.parametrize("name", [" team", "team\nx"])
def test_a_layer_whose_name_its_commit_trailer_cannot_hold_is_refused_before_anything_changes(toy, name):
    """The layer's name begins each patch's Dspark-Patch trailer, which is read back stripped and line
    by line: " team" was applied, then read back as "team", so status called its patch not applied
    and the next apply refused the workspace ("run `dspark revert` first")."""
    made = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                       [("team: readme", {"README.team": "ours\n"})])
    team = made.rename(made.with_name(name))
    with pytest.raises(UsageError, match="rename the directory"):
        run_apply(toy, series=(team,))
    assert not toy["workdir"].exists()
