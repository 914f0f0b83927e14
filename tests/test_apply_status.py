"""`dspark status` against what it must notice: compat.yaml's pin moving, a corrupt state file,
an interrupted layered apply. Real git, real processes where a kill is involved."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspark_cli import applier, compat
from dspark_cli import series as series_files
from dspark_cli.errors import UsageError
from dspark_cli.workspace import KILL_AT_ENV
from tests.git_fixtures import git, make_series, make_toy, tree_fingerprint, write_compat
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


def test_status_names_another_series_in_the_compat_read_now(toy, tmp_path):
    """Applied from one compat.yaml, then DSPARK_COMPAT names another whose series changed a patch:
    apply refuses it as changed, so status must not call the workspace drift-free."""
    other = tmp_path / "other"
    other.mkdir()
    series = other / "series-copy"
    shutil.copytree(toy["series"], series)
    second = sorted(series.glob("0002-*.patch"))[0]
    second.write_text(second.read_text().replace("Why: dspark: method and module.", "Why: a team's rewording."))
    series_files.write_lock(series)
    env = {"DSPARK_COMPAT": str(write_compat(other, toy["upstream"], series))}
    doc = json.loads(run_dspark("status", "-C", str(toy["workdir"]), "--json", env=env).stdout)
    assert doc["drift"] == [f"the compat.yaml read now, {other / 'compat.yaml'}, names another DSpark series for v1.0 "
                            f"than {toy['compat_path']}, the one it was applied from (dspark/{second.name} differ): "
                            "`dspark apply` here compares with the series read now"]
    refused = run_dspark("apply", "toy", "-C", str(toy["workdir"]), env=env)
    assert refused.returncode == 2 and f"dspark/{second.name} changed since it was applied" in refused.stderr
    same = json.loads(run_dspark("status", "-C", str(toy["workdir"]), "--json",
                                 env={"DSPARK_COMPAT": str(toy["compat_path"])}).stdout)
    assert same["drift"] == []


@pytest.mark.parametrize("text", ["[]", "{}", '{"base": "x", "branch": "y", "in_progress": {"op": 1}}',
                                  '{"base": "x", "branch": "y", "layers": [1]}'])
def test_a_state_file_of_the_wrong_shape_is_one_clear_error(toy, text):
    (toy["workdir"] / ".git" / "dspark" / "state.json").write_text(text)
    for operation in (applier.status, applier.revert):
        with pytest.raises(UsageError, match="corrupt dspark state, .*; to start over, run `dspark apply` with a new --workdir"):
            operation(toy["workdir"])


def test_a_state_file_naming_another_branch_than_its_pins_is_one_clear_error(toy):
    """branch dspark/foo for pin v1.0: revert made and checked out dspark/foo at the base, said
    "reverted", and left the patched dspark/v1.0 as it was."""
    path = toy["workdir"] / ".git" / "dspark" / "state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "branch": "dspark/foo"}))
    for operation in (applier.status, applier.revert):
        with pytest.raises(UsageError, match="corrupt dspark state, 'branch' is dspark/foo, not dspark/v1.0;"):
            operation(toy["workdir"])
    assert git(toy["workdir"], "branch", "--list", "dspark/foo") == ""


def test_revert_with_head_on_a_deleted_branch_is_refused(toy):
    """dspark/v1.0 deleted while checked out (HEAD unborn, the patched files staged): revert said
    "already at base", exit 0, and changed nothing."""
    work = toy["workdir"]
    git(work, "update-ref", "-d", "refs/heads/dspark/v1.0")
    with pytest.raises(UsageError, match="HEAD is on refs/heads/dspark/v1.0, which has no commit"):
        applier.revert(work, force=True)


def test_apply_in_a_workspace_it_may_not_write_reports_already_applied_when_it_is(toy, monkeypatch):
    """A read-only mount or image holding an applied tree: apply was exit 3 ("cannot make anything
    in ...") though it had nothing to do. The directory made immutable stands in for read-only
    (root writes through permissions, not through the immutable flag)."""
    monkeypatch.setenv("DSPARK_COMPAT", str(toy["compat_path"]))
    work = toy["workdir"]
    before = tree_fingerprint(work)
    if subprocess.run(["chattr", "+i", str(work)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        done = run_dspark("apply", "toy", "-C", str(work), "--json")
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["status"] == "already applied" and result["new"] == [] and len(result["applied"]) == 2
        assert result["notes"] == [f"{work} is read-only here: checked, nothing written"]
        team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                           [("team: add", {"team.py": "T = 1\n"})])
        more = run_dspark("apply", "toy", "-C", str(work), "--series", str(team))  # a patch to apply: cannot
        assert more.returncode == 3 and more.stderr == f"error: --workdir {work}: cannot make anything in {work} " \
                                                        "(Operation not permitted)\n", more.stderr
        # a series patch changed since (same name, relocked): not the series applied, so no "already applied"
        patch = sorted(toy["series"].glob("*.patch"))[-1]
        patch.write_text(patch.read_text().replace("Subject: ", "Subject: (changed) ", 1))
        series_files.write_lock(toy["series"])
        changed = run_dspark("apply", "toy", "-C", str(work))
        assert changed.returncode == 3 and "cannot make anything" in changed.stderr, changed.stderr
    finally:
        subprocess.run(["chattr", "-i", str(work)], check=True)
    assert tree_fingerprint(work) == before
    # The branch rebased onto another upstream keeps its patch trailers, not its base: not applied.
    other = git(work, "commit-tree", "-m", "another upstream", f"{toy['upstream']['v1.1']}^{{tree}}")
    git(work, "rebase", "-q", "--onto", other, toy["upstream"]["v1.0"], "dspark/v1.0")
    subprocess.run(["chattr", "+i", str(work)], check=True)
    try:
        moved = run_dspark("apply", "toy", "-C", str(work))
        assert moved.returncode == 3 and "cannot make anything" in moved.stderr, moved.stderr
    finally:
        subprocess.run(["chattr", "-i", str(work)], check=True)


def test_a_state_file_whose_base_is_not_in_the_repository_is_one_clear_error(toy):
    """A full commit id the repository does not have: was exit 3 from git log ("Invalid revision range")."""
    path = toy["workdir"] / ".git" / "dspark" / "state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "base": "0" * 40}))
    for operation in (applier.status, applier.revert):
        with pytest.raises(UsageError, match="corrupt dspark state, its base 000000000000 is not a commit in this "
                                             "repository; to start over, run `dspark apply` with a new --workdir"):
            operation(toy["workdir"])


@pytest.mark.skipif(os.geteuid() != 0, reason="handing the workspace to another user needs root (chown)")
def test_a_workspace_another_user_owns_is_an_environment_problem_naming_the_fix(toy):
    """git refuses such a repository ("dubious ownership", common in containerized CI): say so and
    how to allow it, not that the directory is no workspace or no repository."""
    subprocess.run(["chown", "-R", "65534", str(toy["workdir"])], check=True)
    for args in (["status"], ["revert"], ["apply", "toy"]):
        out = run_dspark(*args, "-C", str(toy["workdir"]), env={"DSPARK_COMPAT": str(toy["compat_path"])})
        assert out.returncode == 3 and out.stderr.count("\n") == 1, (args, out.stderr)
        assert f"git config --global --add safe.directory {toy['workdir']}" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="handing the repository to another user needs root (chown)")
def test_a_repo_another_user_owns_is_an_environment_problem_naming_the_fix(toy, tmp_path):
    """apply and compat lock said "git cannot clone it (detected dubious ownership ...); give a
    clone's directory" (exit 2) of what is a clone; rebase already said exit 3 and the fix."""
    repo = toy["upstream"]["repo"]
    subprocess.run(["chown", "-R", "65534", str(repo)], check=True)
    env = {"DSPARK_COMPAT": str(toy["compat_path"]), "GIT_CONFIG_GLOBAL": os.devnull}
    fix = f"git config --global --add safe.directory {repo / '.git'}"  # what git checks for a clone's source
    for args in (["apply", "toy", "-C", str(tmp_path / "fresh")], ["compat", "lock", "toy"]):
        out = run_dspark(*args, "--repo", str(repo), env=env)
        assert out.returncode == 3, (args, out.stderr)
        assert out.stderr.strip().splitlines() == [
            f"error: --repo {repo}: git refuses to work in a repository another user owns; run `{fix}`, or dspark "
            "as its owner"]
    config = tmp_path / "gitconfig"  # the fix, as said, lets the apply through
    subprocess.run(fix.split(), env={**os.environ, "GIT_CONFIG_GLOBAL": str(config)}, check=True)
    out = run_dspark("apply", "toy", "-C", str(tmp_path / "fresh"), "--repo", str(repo),
                     env={**env, "GIT_CONFIG_GLOBAL": str(config)})
    assert out.returncode == 0, out.stderr


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


def test_a_series_branch_deleted_under_a_detached_head_is_named_with_the_way_back(toy):
    """`git switch --detach; git branch -D dspark/v1.0` leaves the patch commits on no branch:
    status and apply name them as the series' (not as the user's) and the one command that puts the
    branch back; after it, apply finds the series applied."""
    work, env = toy["workdir"], {"DSPARK_COMPAT": str(toy["compat_path"])}
    git(work, "switch", "-q", "--detach")
    git(work, "branch", "-D", "dspark/v1.0")
    way_back = f"branch dspark/v1.0 is gone and HEAD holds its 2 patch commit(s): `git -C {work} switch -c dspark/v1.0` puts it back"
    doc = json.loads(run_dspark("status", "-C", str(work), "--json", env=env).stdout)
    assert way_back in doc["drift"][-1]
    refused = run_dspark("apply", "toy", "-C", str(work), env=env)
    assert refused.returncode == 2 and way_back in refused.stderr, refused.stderr
    git(work, "switch", "-q", "-c", "dspark/v1.0")
    again = run_dspark("apply", "toy", "-C", str(work), "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "already applied", again.stderr
    assert json.loads(run_dspark("status", "-C", str(work), "--json", env=env).stdout)["drift"] == []


@pytest.mark.parametrize("subject", ["fix\x1ething", "fix\x1fthing", "fix\u2028thing", "fix\x0bthing"])
def test_commit_messages_holding_log_separators_or_line_breaks_are_read(toy, subject):
    """git log's fields were cut at \x1f and its records at \x1e, and a detached HEAD's subjects
    at every str.splitlines break (U+2028, \\v, ...): a commit message holding one was a traceback
    in status, apply and revert."""
    work, env = toy["workdir"], {"DSPARK_COMPAT": str(toy["compat_path"])}
    (work / "user.txt").write_text("mine\n")
    git(work, "add", "user.txt")
    git(work, "commit", "-q", "-m", f"{subject}\n\nbody\x1e with\x1f both")
    doc = json.loads(run_dspark("status", "-C", str(work), "--json", env=env).stdout)
    assert "1 commit(s) of yours on dspark/v1.0" in doc["drift"]
    assert len(doc["applied"]) == 2 and doc["user_commits"][0]["subject"] == subject
    git(work, "switch", "-q", "--detach")
    git(work, "commit", "-q", "--allow-empty", "-m", subject)
    doc = json.loads(run_dspark("status", "-C", str(work), "--json", env=env).stdout)
    assert "HEAD is detached with 1 commit(s) on no branch" in doc["drift"][-1]
    assert [c["subject"] for c in doc["detached_commits"]] == [subject]
    refused = run_dspark("apply", "toy", "-C", str(work), env=env)
    assert refused.returncode == 2 and "is detached with 1 commit(s) on no branch" in refused.stderr, refused.stderr
    git(work, "switch", "-q", "dspark/v1.0")
    kept = run_dspark("revert", "-C", str(work), "--keep-user-commits", "--json", env=env)
    assert kept.returncode == 0, kept.stderr
    assert (work / "user.txt").read_text() == "mine\n"


def test_a_build_cache_whose_path_the_os_refuses_is_a_note_in_status_not_its_end(toy, tmp_path):
    """DSPARK_CACHE of a 300-byte name: is_file() raised ENAMETOOLONG and status was exit 2 with
    no report (rebase said exit 3 for the same value)."""
    cache = tmp_path / ("z" * 300)
    result = run_dspark("status", "-C", str(toy["workdir"]), "--json",
                        env={"DSPARK_COMPAT": str(toy["compat_path"]), "DSPARK_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    build = json.loads(result.stdout)["build"]
    assert build and all("File name too long" in record["error"] for record in build)


def test_a_recorded_compat_path_the_os_refuses_is_a_drift_note(toy):
    """A state file's compat of a 300-byte name: status was exit 2 with only 'xxx…: File name too
    long', naming neither the state file nor what it was for."""
    state_file = toy["workdir"] / ".git" / "dspark" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "compat": "/" + "x" * 300}))
    result = run_dspark("status", "-C", str(toy["workdir"]), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["drift"] == [
        f"cannot compare with compat.yaml: the recorded /{'x' * 300}: File name too long"]


def killed_apply_state(toy) -> dict:
    """The state file a real apply killed after its first patch commit leaves (an in_progress snapshot)."""
    git(toy["workdir"], "checkout", "-q", "--detach")
    applier.revert(toy["workdir"])
    killed = run_dspark("apply", "toy", "-C", str(toy["workdir"]), env={KILL_AT_ENV: "committed:1",
                                                                         "DSPARK_COMPAT": str(toy["compat_path"])})
    assert killed.returncode == -signal.SIGKILL
    return json.loads((toy["workdir"] / ".git" / "dspark" / "state.json").read_text())


def set_at(state: dict, path: tuple, value) -> dict:
    """A deep copy of `state` with the value at `path` (keys and list indices) replaced, or removed for DELETE."""
    state = json.loads(json.dumps(state))
    *parents, last = path
    holder = state
    for key in parents:
        holder = holder[key]
    if value is DELETE:
        del holder[last]
    else:
        holder[last] = value
    return state


DELETE = object()
WRONG = [  # (path, value, what the one line says)
    (("base",), "nothex", "'base' is missing or not a full commit id"),
    (("base",), DELETE, "'base' is missing or not a full commit id"),
    (("branch",), "-x", "'branch' is missing or not a dspark/<pin> branch name"),
    (("branch",), "dspark/bad..pin", "'branch' is missing or not a dspark/<pin> branch name"),
    (("branch",), "main", "'branch' is missing or not a dspark/<pin> branch name"),
    (("source", "kind"), "zzz", "'source.kind' is not git or pypi"),
    (("pin",), ["v1.0"], "'pin' is not a string"),
    (("unpinned",), "no", "'unpinned' is not true or false"),
    (("applied",), [1], "'applied' is not a list of patch names"),
    (("source", "repository"), None, "'source' is not an object of strings"),
    (("layers", 0, "dir"), 5, "'layers' is not a list of {layer, dir} strings"),
    (("layers", 0, "dir"), "a\0b", "'layers' is not a list of {layer, dir} strings"),
    (("in_progress", "pid"), "abc", "'in_progress' has a wrong 'pid'"),
    (("in_progress", "pid"), True, "'in_progress' has a wrong 'pid'"),
    (("in_progress", "pid"), 2**70, "'in_progress' has a wrong 'pid'"),
    (("in_progress", "head"), "HEAD", "'in_progress' has a wrong 'head'"),
    (("in_progress", "work_branch"), None, "'in_progress' has a wrong 'work_branch'"),
    (("in_progress", "op"), "rebase", "'in_progress' has a wrong 'op'"),
    (("in_progress", "first"), 0, "'in_progress' has a wrong 'first'"),
    (("in_progress", "applying", "onto"), 5, "'in_progress' has a wrong 'applying'"),
    (("in_progress", "started"), DELETE, "'in_progress' is not a snapshot"),
]


@pytest.mark.parametrize("path, value, problem", WRONG, ids=[f"{'.'.join(map(str, p))}={v!r}" for p, v, _ in WRONG])
def test_a_state_file_with_a_wrong_type_is_one_exit_2_line(toy, path, value, problem):
    """Was a TypeError traceback (layers[0].dir = 5, pid = "abc") or exit 3 (base = "nothex")."""
    state_file = toy["workdir"] / ".git" / "dspark" / "state.json"
    state_file.write_text(json.dumps(set_at(killed_apply_state(toy), path, value)))
    env = {"DSPARK_COMPAT": str(toy["compat_path"])}
    for command in (["status"], ["apply", "toy"], ["revert", "--force"]):
        out = run_dspark(*command, "-C", str(toy["workdir"]), env=env)
        assert (out.returncode, out.stdout) == (2, ""), out.stderr
        assert out.stderr == (f"error: {state_file}: corrupt dspark state, {problem}; to start over, run "
                              "`dspark apply` with a new --workdir\n")


def test_every_snapshot_field_is_validated():
    from dspark_cli.workspace import _SNAPSHOT_FIELDS, Snapshot

    assert set(_SNAPSHOT_FIELDS) == set(Snapshot.__dataclass_fields__)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)
PATHS = [("base",), ("branch",), ("engine",), ("pin",), ("unpinned",), ("applied",), ("compat",), ("source",),
         ("source", "kind"), ("layers",), ("layers", 0), ("layers", 0, "dir"), ("layers", 0, "layer"), ("in_progress",),
         *[("in_progress", key) for key in ("head", "branch", "work_branch", "work_branch_sha", "stash_message", "pid",
                                            "op", "started", "process", "applying", "first")]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_anywhere_in_the_state_is_read_or_refused_in_one_line(toy, data):
    """Whatever a hand edit puts at any place of the state file, status either reads it or says
    `corrupt dspark state` (UsageError, exit 2): never a TypeError, KeyError or git failure."""
    if "killed" not in toy:
        toy["killed"] = killed_apply_state(toy)
    path = data.draw(st.sampled_from(PATHS))
    value = data.draw(st.one_of(st.just(DELETE), JSON))
    (toy["workdir"] / ".git" / "dspark" / "state.json").write_text(json.dumps(set_at(toy["killed"], path, value)))
    try:
        applier.status(toy["workdir"])
    except UsageError as exc:
        assert "\n" not in str(exc)


def test_status_tells_a_running_apply_from_an_interrupted_one(toy):
    """An apply still running (its owner alive and holding the workspace lock) is in progress, not
    'interrupted, half done'; a lock held before any snapshot is written is a run too; once the
    owner is gone, the same snapshot is an interrupted apply again."""
    from dspark_cli import oplock
    from dspark_cli.workspace import process_tag

    work = toy["workdir"]
    state = killed_apply_state(toy)
    state_file = work / ".git" / "dspark" / "state.json"
    env = {"DSPARK_COMPAT": str(toy["compat_path"])}

    def drift():
        out = run_dspark("status", "-C", str(work), "--json", env=env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["drift"]

    started = state["in_progress"]["started"]
    live = {**state["in_progress"], "pid": os.getpid(), "process": process_tag(os.getpid())}  # as if this process ran it
    state_file.write_text(json.dumps({**state, "in_progress": live}))
    with oplock.exclusive(work / ".git", work):
        assert drift()[0] == (f"a dspark apply (pid {os.getpid()}, started {started}) is in progress; run dspark "
                              "status again when it has finished")
        state_file.write_text(json.dumps({**state, "in_progress": None}))  # a run still recovering or fetching
        assert drift()[0] == (f"a dspark apply, revert or rebase (pid {os.getpid()}) is running in {work} or another worktree "
                              "of its repository; run dspark status again when it has finished")
    state_file.write_text(json.dumps(state))
    assert drift()[0].startswith(f"an interrupted apply (started {started}) left the workspace half done")


def test_a_short_pinned_commit_matches_the_full_base_in_status(tmp_path, monkeypatch):
    """compat.yaml may pin a short id (before `dspark compat lock`): the full base commit apply
    resolved is that pin, so status reports no drift."""
    toy = make_toy(tmp_path, monkeypatch)
    (tmp_path / "short").mkdir()
    short = compat.load(write_compat(tmp_path / "short", toy["upstream"], toy["series"],
                                     commit=toy["upstream"]["v1.0"][:9]))
    pin = short.engine("toy").pins["v1.0"]
    assert pin.matches_commit(toy["upstream"]["v1.0"])
    result = applier.apply(short, applier.ApplyRequest(engine="toy", workdir=tmp_path / "w"))
    assert result["base"] == toy["upstream"]["v1.0"]
    assert applier.status(tmp_path / "w")["drift"] == []


def test_status_names_a_series_whose_order_no_longer_starts_with_the_applied_patches(toy, monkeypatch):
    """The series reordered (and relocked) since apply: every applied patch is still in it, unchanged,
    yet apply refuses until a revert; status said "drift none"."""
    monkeypatch.setenv("DSPARK_COMPAT", str(toy["compat_path"]))
    series_file = toy["series"] / "series"
    first, second = [line for line in series_file.read_text().splitlines() if not line.startswith("#")]
    series_file.write_text(f"{second}\n{first}\n")
    series_files.write_lock(toy["series"])
    with pytest.raises(UsageError, match="patch 1 applied is"):
        applier.apply(compat.load(toy["compat_path"]), applier.ApplyRequest(engine="toy", workdir=toy["workdir"]))
    assert applier.status(toy["workdir"])["drift"] == [
        f"dspark/{first} is applied where the series has dspark/{second}: the series no longer starts with the "
        "patches applied, in their order, so dspark apply refuses until `dspark revert` takes them off"]


def test_status_reads_a_layer_from_where_the_last_already_applied_run_was_given_it(toy, monkeypatch):
    """The team moved its series directory (same name, same patches): apply with --series at the new
    place says "already applied", and status reads the layer there; it read the old, gone, place and
    reported the layer unreadable and its patch no longer in its series."""
    monkeypatch.setenv("DSPARK_COMPAT", str(toy["compat_path"]))
    team = make_series(toy["root"], toy["upstream"]["repo"], "team", toy["upstream"]["v1.0"],
                       [("team: readme", {"README.team": "ours\n"})])
    table = compat.load(toy["compat_path"])
    applier.apply(table, applier.ApplyRequest(engine="toy", workdir=toy["workdir"], series=(team,)))
    moved = toy["root"] / "moved" / "team"
    moved.parent.mkdir()
    shutil.move(team, moved)
    again = applier.apply(table, applier.ApplyRequest(engine="toy", workdir=toy["workdir"], series=(moved,)))
    assert again["status"] == "already applied"
    assert applier.status(toy["workdir"])["drift"] == []
