"""`dspark rebase` with real git on throwaway repositories: a clean carry (with offsets), a 3-way
merge, a conflict left for a human and finished with --continue, and a tree that no longer
byte-compiles."""

import ast
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dspark_cli import flock, rebase, series
from tests.git_fixtures import git, tree_fingerprint
from tests.run_cli import ROOT, run_dspark, signal_dspark_when

MOD = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(8))
OTHER = "A = 1\nB = 2\nC = 3\nD = 4\nE = 5\nF = 6\n"


def commit_files(repo, files, message):
    for name, text in files.items():
        (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def pin_entry(name, commit):
    """compat.yaml's entry of eng's pin `name` (its tag too) at `commit`, series in patches/eng/NAME."""
    return f"""      {name}:
        commit: {commit}
        tag: {name}
        patches: patches/eng/{name}
        releases: []
        python: ">=3.8"
        torch: ">=2.0"
        cuda: ">=12"
        tested:
          ci-cpu: test
"""


@pytest.fixture
def upstream(tmp_path):
    return make_upstream(tmp_path)


def make_upstream(tmp_path: Path) -> dict:
    """A repository with base commit A, a three-patch series made on A, and compat.yaml naming it."""
    repo = tmp_path / "upstream"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    base = commit_files(repo, {"mod.py": MOD, "other.py": OTHER}, "base")
    git(repo, "tag", "v1.0")
    git(repo, "checkout", "-q", "-b", "work")
    commit_files(repo, {"mod.py": MOD.replace("return x + 3", "return x + 3  # ours")}, "ours: mark f3")
    commit_files(repo, {"ours.py": "HOOK = True\n"}, "ours: new module")
    commit_files(repo, {"other.py": OTHER.replace("D = 4\n", "D = 4\nOURS = 44\n")}, "ours: other")
    patches = tmp_path / "patches" / "eng" / "v1.0"
    names = git(repo, "format-patch", "-o", str(patches), "--zero-commit", "--no-signature", "-U2", base).splitlines()
    (patches / "series").write_text("# test series eng/v1.0 (not eng/v1.0.1)\n"
                                    + "".join(Path(n).name + "\n" for n in names))
    series.write_lock(patches)
    git(repo, "checkout", "-q", "main")
    compat = tmp_path / "compat.yaml"
    compat.write_text(f"""schema: 1
engines:
  eng:
    repository: {repo}
    module: eng
    distributions: [eng]
    default_pin: v1.0
    pins:
""" + pin_entry("v1.0", base))
    return {"repo": repo, "base": base, "patches": patches, "compat": compat, "tmp": tmp_path}


def dspark(env_paths, *args):
    return run_dspark("rebase", "eng", "--from", "v1.0", *args, "--json",
                      env={"DSPARK_COMPAT": str(env_paths["compat"]), "DSPARK_CACHE": str(env_paths["tmp"] / "cache"),
                           "GIT_CONFIG_GLOBAL": os.devnull})


def rebase_onto(u, onto: str, wd: Path, out: Path, *args):
    """`dspark rebase` of the fixture's series onto `onto` in the fixture's repository."""
    return dspark(u, "--onto", onto, "--repo", str(u["repo"]), "--workdir", str(wd), "--out", str(out), *args)


def new_upstream(u, files, tag):
    git(u["repo"], "checkout", "-q", "main")
    commit = commit_files(u["repo"], files, f"upstream {tag}")
    git(u["repo"], "tag", tag)
    return commit


def test_clean_and_three_way_patches_are_carried_and_the_series_is_refreshed(upstream):
    u = upstream
    onto = new_upstream(u, {
        "mod.py": "import os\n\n\n" + MOD,  # f3 moves down three lines: still a clean apply, at an offset
        "other.py": OTHER.replace("C = 3", "C = 33").replace("F = 6", "F = 66"),  # our context changed
    }, "v2.0")
    run = dspark(u, "--onto", "v2.0", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / "wd"))
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["ok"] is True and "error" not in report
    status = {p["patch"]: p for p in report["patches"]}
    first, second, third = sorted(status)
    assert status[first]["status"] == "clean" and "offset 3" in status[first]["details"][0]
    assert status[second]["status"] == "clean"
    assert status[third]["status"] == "3-way" and status[third]["files"] == ["other.py"]
    assert report["onto"] == onto and sorted(report["compiled"]) == ["mod.py", "other.py", "ours.py"]

    out = u["tmp"] / "patches" / "eng" / "v2.0"
    assert Path(report["out_dir"]) == out
    refreshed = series.load_series(out, "dspark")  # lock matches what was written
    assert [p.name for p in refreshed] == sorted(status)
    assert "@@ -3,4 +3,5 @@" in (out / third).read_text()  # the series' -U2 context is kept
    assert [(out / name).read_text().count(f"Subject: [PATCH {k}/3] ") for k, name in enumerate(sorted(status), 1)] == [1, 1, 1]
    # The refreshed series applies exactly (no 3-way) to the new tree and gives the rebased result.
    fresh = u["tmp"] / "fresh"
    git(u["tmp"], "clone", "-q", str(u["repo"]), str(fresh))
    git(fresh, "checkout", "-q", onto)
    for p in refreshed:
        git(fresh, "apply", "--index", str(p.path))
    wd = u["tmp"] / "wd"
    for name in ("mod.py", "other.py", "ours.py"):
        assert (fresh / name).read_text() == (wd / name).read_text()
    assert "C = 33\nD = 4\nOURS = 44\nE = 5\nF = 66" in (wd / "other.py").read_text()
    subjects = git(wd, "log", "--format=%s", f"{onto}..HEAD").splitlines()
    assert subjects == ["ours: other", "ours: new module", "ours: mark f3"]


def test_a_series_carried_onto_its_own_tree_is_written_byte_for_byte_as_it_was(upstream):
    """Subjects led by a tag of their own ("[Core] ...", vLLM's style) lost it: `git mailinfo`
    without -b strips every leading [...] of a subject, not only format-patch's [PATCH k/n]."""
    u = upstream
    git(u["repo"], "checkout", "-q", "-b", "tagged", u["base"])
    commit_files(u["repo"], {"mod.py": MOD.replace("return x + 3", "return x + 3  # ours")}, "[Core] ours: mark f3")
    commit_files(u["repo"], {"ours.py": "HOOK = True\n"}, "[V1][Spec Decode] ours: new module")
    for old in u["patches"].glob("*.patch"):
        old.unlink()
    names = git(u["repo"], "format-patch", "-o", str(u["patches"]), "--zero-commit", "--no-signature", "-U2",
                u["base"]).splitlines()
    (u["patches"] / "series").write_text("".join(Path(n).name + "\n" for n in names))
    series.write_lock(u["patches"])
    out = u["tmp"] / "out42"
    run = dspark(u, "--onto", "v1.0", "--pin", "same", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / "wd42"),
                 "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert [p["status"] for p in json.loads(run.stdout)["patches"]] == ["clean", "clean"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in u["patches"].iterdir())
    for original in sorted(u["patches"].iterdir()):  # the patches, then series and its lock
        assert (out / original.name).read_bytes() == original.read_bytes(), original.name
    assert "Subject: [PATCH 2/2] [V1][Spec Decode] ours: new module" in (out / Path(names[1]).name).read_text()


def test_conflict_is_left_for_a_human_then_continue_finishes(upstream):
    u = upstream
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300")}, "v3.0")
    wd = u["tmp"] / "wd3"
    run = dspark(u, "--onto", "v3.0", "--repo", str(u["repo"]), "--workdir", str(wd))
    assert run.returncode == 4, run.stderr
    report = json.loads(run.stdout)
    assert report["ok"] is False and report["exit_code"] == 4 and report["error"] in run.stderr  # README's failure fields
    assert [p["status"] for p in report["patches"]] == ["conflict", "not run", "not run"]
    assert report["patches"][0]["details"][0].startswith("mod.py: conflict markers at lines ")
    assert report["out_dir"] is None and not (u["tmp"] / "patches" / "eng" / "v3.0").exists()
    assert "conflicts" in run.stderr and "dspark/rebase-v3.0" in run.stderr
    text = (wd / "mod.py").read_text()
    assert "<<<<<<<" in text and ">>>>>>>" in text
    assert git(u["repo"], "branch", "--list", "dspark/rebase-v3.0")  # the work branch lives in the user's repo
    assert git(u["repo"], "rev-parse", "--abbrev-ref", "HEAD") == "main"  # their checkout was not touched

    again = dspark(u, "--onto", "v3.0", "--repo", str(u["repo"]), "--workdir", str(wd))
    assert again.returncode == 2 and "--force" in again.stderr  # never overwrite work in progress silently

    resolved = MOD.replace("return x + 3", "return x + 300  # ours")
    (wd / "mod.py").write_text(resolved)
    git(wd, "add", "mod.py")
    git(wd, "commit", "-q", "-m", "ours: mark f3")
    done = dspark(u, "--onto", "v3.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--continue")
    assert done.returncode == 0, done.stderr
    statuses = [p["status"] for p in json.loads(done.stdout)["patches"]]
    assert statuses == ["resolved", "clean", "clean"]
    # The work branch now holds the patches: a second --continue reports how each one got there.
    again = dspark(u, "--onto", "v3.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--continue", "--force")
    assert [p["status"] for p in json.loads(again.stdout)["patches"]] == ["resolved", "clean", "clean"]
    out = u["tmp"] / "patches" / "eng" / "v3.0"
    first = series.load_series(out, "dspark")[0]
    assert "+    return x + 300  # ours" in first.path.read_text()


def test_a_resolved_patch_keeps_its_author_date_and_message(upstream):
    """The human commits the resolution with a message of their own, later: the refreshed patch is
    still the carried patch, with its author, date and message, as git am keeps them."""
    u = upstream
    wd, out = u["tmp"] / "wd17", u["tmp"] / "out17"
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300")}, "v17.0")
    assert dspark(u, "--onto", "v17.0", "--repo", str(u["repo"]), "--workdir", str(wd)).returncode == 4
    (wd / "mod.py").write_text(MOD.replace("return x + 3", "return x + 300  # ours"))
    time.sleep(1.1)  # another second than the patch's date (git dates have one-second resolution)
    git(wd, "commit", "-q", "-am", "fix conflict")
    done = rebase_onto(u, "v17.0", wd, out, "--continue")
    assert done.returncode == 0, done.stderr
    name = sorted(u["patches"].glob("0001-*.patch"))[0].name
    original, refreshed = (u["patches"] / name).read_text(), (out / name).read_text()

    def header(text):
        return [line for line in text.split("\n---\n", 1)[0].splitlines()[1:]]  # all but format-patch's From <sha>

    assert header(refreshed) == header(original) and "fix conflict" not in refreshed
    assert "+    return x + 300  # ours" in refreshed


def test_a_tree_that_no_longer_byte_compiles_is_reported_and_not_written(upstream):
    u = upstream
    new_upstream(u, {"other.py": "def broken(:\n" + OTHER}, "v4.0")
    run = dspark(u, "--onto", "v4.0", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / "wd4"))
    assert run.returncode == 1
    report = json.loads(run.stdout)
    assert report["ok"] is False and report["exit_code"] == 1 and "no longer byte-compile" in report["error"]
    assert report["compile_errors"] and report["compile_errors"][0].startswith("other.py")
    assert report["out_dir"] is None


def test_unknown_pin_and_unknown_onto_are_usage_errors(upstream):
    u = upstream
    bad_pin = run_dspark("rebase", "eng", "--from", "v9", "--onto", "x", "--repo", str(u["repo"]),
                         env={"DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache")})
    assert bad_pin.returncode == 2 and "v1.0" in bad_pin.stderr
    bad_onto = dspark(u, "--onto", "no-such-tag", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / "wd5"))
    assert bad_onto.returncode == 2 and "Traceback" not in bad_onto.stderr


def test_a_release_version_matches_its_pin_without_the_package_index(monkeypatch):
    """`--onto 0.33.0` is pin v0.33.0 (its release version): the pinned sdist, never an index query."""
    from dspark_cli import compat
    from dspark_cli.commands.rebase import _onto_release

    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # any query would fail
    vllm = compat.load(Path(__file__).resolve().parents[1] / "compat.yaml").engine("vllm")
    for onto in ("0.33.0", "v0.33.0", "0.33"):
        release, name, tag = _onto_release(vllm, onto, "vllm")
        assert (release.file, name, tag) == ("vllm-0.33.0.tar.gz", "v0.33.0", "v0.33.0")


def worktrees(repo) -> list[str]:
    return [line for line in git(repo, "worktree", "list", "--porcelain").splitlines() if line.startswith("worktree ")]


@pytest.mark.parametrize("option", ["--workdir", "--out"])
def test_a_directory_option_naming_a_file_is_refused_before_any_work(upstream, option):
    u = upstream
    new_upstream(u, {"new.py": "X = 1\n"}, "v5.0")
    afile = u["tmp"] / "afile"
    afile.write_text("x\n")
    args = ["--onto", "v5.0", "--repo", str(u["repo"]), option, str(afile)]
    if option == "--out":
        args += ["--workdir", str(u["tmp"] / "wd-out")]
    run = dspark(u, *args)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"{option} {afile} is a file, not a directory" in run.stderr
    assert len(worktrees(u["repo"])) == 1 and not (u["tmp"] / "wd-out").exists()
    assert git(u["repo"], "branch", "--list", "dspark/*") == ""


def test_a_non_empty_out_is_refused_before_any_work(upstream):
    """Was refused only after the rebase, leaving its worktree and branch behind."""
    u = upstream
    new_upstream(u, {"new.py": "X = 1\n"}, "v5.1")
    out = u["tmp"] / "out"
    out.mkdir()
    (out / "keep").write_text("mine\n")
    run = dspark(u, "--onto", "v5.1", "--repo", str(u["repo"]), "--out", str(out), "--workdir", str(u["tmp"] / "wd51"))
    assert run.returncode == 2 and f"{out} exists and is not empty; give a new --out, or pass --force to replace it" in run.stderr, run.stderr
    assert len(worktrees(u["repo"])) == 1 and not (u["tmp"] / "wd51").exists()
    assert git(u["repo"], "branch", "--list", "dspark/*") == "" and (out / "keep").read_text() == "mine\n"
    # --force replaces a series directory only: a checkout of yours (or any directory without a
    # series file) given as --out was deleted whole
    git(out, "init", "-q")
    (out / "series").write_text("0001-x.patch\n")
    for checkout in (True, False):  # a checkout holding a series file; then a directory without one
        if not checkout:
            shutil.rmtree(out / ".git")
            (out / "series").unlink()
        forced = dspark(u, "--onto", "v5.1", "--repo", str(u["repo"]), "--out", str(out), "--workdir",
                        str(u["tmp"] / "wd51"), "--force")
        assert forced.returncode == 2 and f"--out {out} is not a patch series" in forced.stderr, forced.stderr
        assert (out / "keep").read_text() == "mine\n" and not (u["tmp"] / "wd51").exists()


def test_an_onto_ref_that_is_no_branch_name_is_sanitized_and_failures_leave_no_worktree(upstream):
    u = upstream
    new_upstream(u, {"new.py": "X = 1\n"}, "v6.0")
    bad = dspark(u, "--onto", "main~0", "--repo", str(u["repo"]), "--pin", "a..b", "--workdir", str(u["tmp"] / "wd6"))
    assert bad.returncode == 2 and "'a..b' cannot be a pin name" in bad.stderr, bad.stderr
    assert len(worktrees(u["repo"])) == 1
    run = dspark(u, "--onto", "main~0", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / "wd6"))
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["branch"] == "dspark/rebase-main-0"

    other = u["tmp"] / "other"  # a repository without the pin's commit: fails after the worktree is added
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    commit_files(other, {"mod.py": MOD}, "unrelated")
    missing = dspark(u, "--onto", "main~0", "--repo", str(other), "--workdir", str(u["tmp"] / "wd6b"),
                     "--out", str(u["tmp"] / "out6b"))
    assert missing.returncode == 2 and "has neither" in missing.stderr, missing.stderr
    assert len(worktrees(other)) == 1 and not (u["tmp"] / "wd6b").exists()
    assert git(other, "branch", "--list", "dspark/*") == ""


def test_a_workdir_inside_your_checkout_is_refused(upstream):
    """--workdir R/sub added the linked work tree inside the user's checkout (`?? sub/` in their
    git status): "your own checkout is never touched"."""
    u = upstream
    new_upstream(u, {"new.py": "X = 1\n"}, "v5.3")
    run = dspark(u, "--onto", "v5.3", "--repo", str(u["repo"]), "--workdir", str(u["repo"] / "sub"))
    assert run.returncode == 2 and f"--workdir {u['repo'] / 'sub'} is inside your checkout {u['repo']}" in run.stderr
    assert git(u["repo"], "status", "--porcelain") == "" and len(worktrees(u["repo"])) == 1


@pytest.mark.parametrize("where", ["main checkout", "linked worktree"])
def test_a_checkout_of_yours_is_never_a_rebase_workdir(upstream, where):
    """A rebase resets and cleans its work tree: the user's own checkout, or a worktree of theirs,
    is refused as --workdir (run from inside it, where git names the common dir relatively), and
    its staged, unstaged, untracked and ignored files and its branch stay as they were."""
    u = upstream
    new_upstream(u, {"new.py": "X = 1\n"}, "v5.2")
    mine = u["repo"]
    if where == "linked worktree":
        mine = u["tmp"] / "feature"
        git(u["repo"], "worktree", "add", "-q", "-b", "feature", str(mine), "v1.0")
    (mine / ".gitignore").write_text(".env\n")
    (mine / ".env").write_text("SECRET=1\n")
    (mine / "mod.py").write_text("edited\n")
    (mine / "staged.py").write_text("S = 1\n")
    git(mine, "add", "staged.py")
    before = tree_fingerprint(mine)
    run = run_dspark("rebase", "eng", "--from", "v1.0", "--onto", "v5.2", "--repo", ".", "--workdir", ".",
                     "--out", str(u["tmp"] / "out52"), "--json", cwd=mine,
                     env={"DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache"),
                          "GIT_CONFIG_GLOBAL": os.devnull})
    assert run.returncode == 2 and "is a checkout dspark rebase did not make" in run.stderr, run.stderr
    assert tree_fingerprint(mine) == before and (mine / ".env").read_text() == "SECRET=1\n"


def test_a_repository_of_yours_is_never_a_release_mode_workdir(tmp_path):
    """Without --repo the workdir holds the two release trees; a repository rebase did not make is
    refused before any release is fetched."""
    mine = tmp_path / "mine"
    mine.mkdir()
    git(mine, "init", "-q", "-b", "main")
    (mine / "notes.txt").write_text("mine\n")
    run = run_dspark("rebase", "vllm", "--from", "v0.32.0", "--onto", "v0.33.0", "--workdir", str(mine),
                     "--out", str(tmp_path / "out"),
                     env={"DSPARK_CACHE": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple"})
    assert run.returncode == 2 and "is a checkout dspark rebase did not make" in run.stderr, run.stderr
    assert (mine / "notes.txt").read_text() == "mine\n" and not (tmp_path / "out").exists()


def test_the_empty_current_directory_is_no_release_mode_workdir(tmp_path):
    """Release mode makes its repository beside the workdir and renames it over an empty one: with
    `--workdir .` the shell was left in a removed directory. Refused before any release is fetched."""
    here = tmp_path / "here"
    here.mkdir()
    run = run_dspark("rebase", "vllm", "--from", "v0.32.0", "--onto", "v0.33.0", "--workdir", ".",
                     "--out", str(tmp_path / "out"), cwd=here,
                     env={"DSPARK_CACHE": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple"})
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: --workdir {here} is the current directory, which a new workspace replaces (your shell would be "
        "left in a removed directory): run from its parent, with --workdir here")
    assert list(here.iterdir()) == [] and not (tmp_path / "out").exists()


def test_an_existing_work_branch_is_refused_before_a_worktree_is_added(upstream):
    u = upstream
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300")}, "v7.0")
    first = dspark(u, "--onto", "v7.0", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / "wd7"))
    assert first.returncode == 4  # a conflict: the work branch is checked out in wd7 for a human
    assert len(worktrees(u["repo"])) == 2
    again = dspark(u, "--onto", "v7.0", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / "wd7b"))
    assert again.returncode == 2 and "branch dspark/rebase-v7.0" in again.stderr, again.stderr
    forced = dspark(u, "--onto", "v7.0", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / "wd7b"), "--force")
    assert forced.returncode == 2 and f"checked out in the worktree {u['tmp'] / 'wd7'}" in forced.stderr, forced.stderr
    assert len(worktrees(u["repo"])) == 2 and not (u["tmp"] / "wd7b").exists()


def test_a_work_tree_deleted_by_hand_is_pruned_so_its_path_and_branch_can_be_used_again(upstream):
    """rm -rf of a rebase's work tree left it registered: the next run at that path was exit 3
    ("'.../wd8' is a missing but already registered worktree") and its branch stayed checked out there."""
    u = upstream
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300")}, "v8.0")
    wd = u["tmp"] / "wd8"
    assert dspark(u, "--onto", "v8.0", "--repo", str(u["repo"]), "--workdir", str(wd)).returncode == 4
    shutil.rmtree(wd)
    again = dspark(u, "--onto", "v8.0", "--repo", str(u["repo"]), "--workdir", str(wd))
    assert again.returncode == 2 and "branch dspark/rebase-v8.0 exists" in again.stderr, again.stderr
    elsewhere = dspark(u, "--onto", "v8.0", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / "wd8b"), "--force")
    assert elsewhere.returncode == 4, elsewhere.stderr  # the conflict again, the branch no longer held by wd8
    shutil.rmtree(u["tmp"] / "wd8b")
    same = dspark(u, "--onto", "v8.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--force")
    assert same.returncode == 4, same.stderr
    assert worktrees(u["repo"]) == [f"worktree {u['repo']}", f"worktree {wd}"]


@pytest.mark.parametrize("pin, message", [
    ("a b", "'a b'"), ("", "''"),  # empty: was the default name, silently
    ('v2"2', "'v2\"2'"), ("a/b", "'a/b'"),  # a quote made a marker that was no Python; a slash nested directories
], ids=["space", "empty", "quote", "slash"])
def test_a_bad_pin_name_in_release_mode_is_refused_before_the_releases_are_fetched(tmp_path, pin, message):
    """Was exit 3 from `git checkout` after both release trees were unpacked."""
    run = run_dspark("rebase", "vllm", "--from", "v0.32.0", "--onto", "v0.33.0", "--pin", pin,
                     "--out", str(tmp_path / "out"),
                     env={"DSPARK_CACHE": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple"})
    assert run.returncode == 2 and run.stderr.strip() == (
        f"error: {message} cannot be a pin name (letters, digits, '.', '_' or '-', starting with a letter or digit; no '..', no '.' or '.lock' at the end): choose another --pin")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_a_release_mode_entry_proposes_upstreams_tag_not_the_pins_name(tmp_path):
    """With --pin the proposed compat.yaml entry had `tag: <pin name>`; compat lock and apply
    --source git look a pin up by its tag. v0.32.0's series carries cleanly onto 0.31.0."""
    run = run_dspark("rebase", "vllm", "--from", "v0.32.0", "--onto", "0.31.0", "--pin", "v0.31.0-ours",
                     "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"), "--json")
    assert run.returncode == 0, run.stderr
    entry = json.loads(run.stdout)["compat_entry"]
    assert (entry["tag"], entry["patches"], entry["commit"]) == ("v0.31.0", "patches/vllm/v0.31.0-ours", "db9527a46")


def snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("target", ["--out", "default out"])
def test_the_series_being_carried_is_refreshed_in_place(upstream, target):
    """--out (or the default patches/ENGINE/PIN) naming the --series directory itself: was deleted
    before its patches were read."""
    u = upstream
    onto = new_upstream(u, {"mod.py": "import os\n\n\n" + MOD}, "v8.0")  # every hunk of 0001 moves
    before = snapshot(u["patches"])
    u["patches"].chmod(0o750)
    args = ["--out", str(u["patches"])] if target == "--out" else ["--pin", "v1.0"]
    run = dspark(u, "--onto", "v8.0", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / "wd8"), "--force", *args)
    assert run.returncode == 0, run.stderr
    assert u["patches"].stat().st_mode & 0o7777 == 0o750  # the refreshed directory keeps its mode
    assert Path(json.loads(run.stdout)["out_dir"]) == u["patches"]
    refreshed = series.load_series(u["patches"], "dspark")  # its lock matches what was written
    assert sorted(snapshot(u["patches"])) == sorted(before) and snapshot(u["patches"]) != before
    assert sorted(p.name for p in u["patches"].parent.iterdir()) == ["v1.0"]  # no temporary directory left
    fresh = u["tmp"] / "fresh8"
    git(u["tmp"], "clone", "-q", str(u["repo"]), str(fresh))
    git(fresh, "checkout", "-q", onto)
    for p in refreshed:
        assert "offset" not in git(fresh, "apply", "--index", "--verbose", str(p.path))


def test_a_failure_while_writing_leaves_the_old_series_intact(upstream):
    """The series is written beside --out and swapped in whole: git failing on the second patch
    (a commit that does not exist) leaves the series being refreshed in place as it was."""
    from dspark_cli import rebase
    from dspark_cli.workspace import GitFailed, Workspace

    u = upstream
    new_upstream(u, {"mod.py": "import os\n\n\n" + MOD}, "v8.1")
    wd = u["tmp"] / "wd81"
    run = dspark(u, "--onto", "v8.1", "--repo", str(u["repo"]), "--workdir", str(wd), "--out", str(u["tmp"] / "o81"))
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    outcomes = [rebase.PatchOutcome(patch=p["patch"], status=p["status"], commit=p["commit"]) for p in report["patches"]]
    outcomes[1].commit = "0" * 40
    trees = rebase.Trees(report["base"], report["onto"], report["base"], report["onto"])
    result = rebase.RebaseResult(workdir=wd, branch=report["branch"], trees=trees, outcomes=outcomes)
    before = snapshot(u["patches"])
    with pytest.raises(GitFailed):
        rebase.write_series(Workspace(wd), result, u["patches"], u["patches"])
    assert snapshot(u["patches"]) == before and result.out_dir is None
    assert sorted(p.name for p in u["patches"].parent.iterdir()) == ["v1.0"]


def test_relative_paths_are_the_callers_not_the_work_trees(upstream):
    """--repo, --series, --out and --workdir relative to the cwd, which is neither the repository
    nor the series' parent: --series was opened by git in the work tree ("can't open patch",
    reported as a conflict, exit 4)."""
    u = upstream
    new_upstream(u, {"mod.py": "import os\n\n\n" + MOD}, "v9.0")
    here = u["tmp"] / "here"
    here.mkdir()
    env = {"DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache"), "GIT_CONFIG_GLOBAL": os.devnull}

    def rebase_here(*args):
        return run_dspark("rebase", "eng", "--from", "v1.0", "--onto", "v9.0", "--repo", "../upstream",
                          "--workdir", "wd9", *args, "--json", cwd=here, env=env)

    run = rebase_here("--series", "../patches/eng/v1.0", "--out", "out")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert [p["status"] for p in report["patches"]] == ["clean", "clean", "clean"]
    assert report["out_dir"] == str((here / "out").resolve()) and report["workdir"] == str((here / "wd9").resolve())
    assert [p.name for p in series.load_series(here / "out", "dspark")] == sorted(p["patch"] for p in report["patches"])
    # The reviewer's case: a relative --series refreshed in place.
    again = rebase_here("--series", "out", "--out", "out", "--force")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["out_dir"] == str((here / "out").resolve())
    series.load_series(here / "out", "dspark")


def stand_in_git(u, tmp_path, stops_at: str) -> tuple[dict, Path]:
    """The env to run dspark with under a stand-in git on PATH: the real git, but for a command
    matching `stops_at`, a sh case arm (`pattern) commands;;`) in which {waiting} is the file to
    touch when dspark gets there and {real} the real git; and that file (for signal_dspark_when)."""
    bin_dir, waiting = tmp_path / "bin", tmp_path / "waiting"
    bin_dir.mkdir()
    real = shutil.which("git")
    (bin_dir / "git").write_text(f'#!/bin/sh\ncase "$*" in {stops_at.format(waiting=waiting, real=real)} esac\n'
                                 f'exec {real} "$@"\n')
    (bin_dir / "git").chmod(0o755)
    return {"DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache"),
            "GIT_CONFIG_GLOBAL": os.devnull, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, waiting


def conflict_then_resolve(u, tag, workdir, broken=False):
    """A rebase stopped at 0001's conflict, resolved and committed by the 'human' in `workdir` (with
    `broken`, a resolution that no longer byte-compiles)."""
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300")}, tag)
    run = dspark(u, "--onto", tag, "--repo", str(u["repo"]), "--workdir", str(workdir))
    assert run.returncode == 4, run.stderr
    (workdir / "mod.py").write_text(MOD.replace("return x + 3", "return (x + 300  # ours" if broken else
                                                "return x + 300  # ours"))
    git(workdir, "commit", "-q", "-am", "ours: mark f3")
    return git(workdir, "rev-parse", "HEAD")


def test_continue_refuses_commits_that_do_not_match_the_patches_one_to_one(upstream):
    """Was matched by position: an extra commit after the resolution became 0002 (which never
    ran), exit 0, and 0002's real change was lost from the refreshed series."""
    u = upstream
    wd = u["tmp"] / "wd10"
    resolution = conflict_then_resolve(u, "v10.0", wd)
    (wd / "extra.py").write_text("X = 1\n")
    git(wd, "add", "extra.py")
    git(wd, "commit", "-q", "-m", "an extra commit")
    extra = git(wd, "rev-parse", "HEAD")
    out = u["tmp"] / "out10"
    run = rebase_onto(u, "v10.0", wd, out, "--continue")
    first = sorted(p.name for p in u["patches"].glob("*.patch"))[0]
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (
        f"error: dspark/rebase-v10.0: found 2 commits on the new tree ({resolution[:12]}, {extra[:12]}), expected 1, "
        f"one per patch so far: {first} (your resolution); leave exactly those (one commit resolving the conflict) "
        "or start over with --force")
    assert not out.exists() and git(wd, "rev-parse", "HEAD") == extra  # nothing assigned, nothing written

    git(wd, "reset", "-q", "--hard", "HEAD~1")  # drop the extra commit: now it matches
    done = rebase_onto(u, "v10.0", wd, out, "--continue")
    assert done.returncode == 0, done.stderr
    assert [p["status"] for p in json.loads(done.stdout)["patches"]] == ["resolved", "clean", "clean"]
    second = series.load_series(out, "dspark")[1]
    assert "+HOOK = True" in second.path.read_text()  # 0002's own change, not the extra commit

    git(wd, "reset", "-q", "--hard", "HEAD~2")  # a commit of a patch that applied is gone: refused too
    git(wd, "commit", "-q", "--allow-empty", "-m", "not 0002")
    again = rebase_onto(u, "v10.0", wd, out, "--continue", "--force")
    assert again.returncode == 2 and "found 2 commits on the new tree" in again.stderr and "expected 3" in again.stderr


def test_onto_head_names_the_repositorys_head_not_the_work_trees(upstream):
    """--onto HEAD (or HEAD~1, @) was resolved in the linked work tree once it existed, where HEAD
    is the work branch: --continue looked for a rebase onto the user's own resolution commit."""
    u = upstream
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300")}, "v12.0")
    head = git(u["repo"], "rev-parse", "HEAD")
    wd, out = u["tmp"] / "wd12", u["tmp"] / "out12"
    args = ["--onto", "HEAD", "--repo", str(u["repo"]), "--workdir", str(wd), "--out", str(out)]
    assert dspark(u, *args).returncode == 4
    (wd / "mod.py").write_text(MOD.replace("return x + 3", "return x + 300  # ours"))
    git(wd, "commit", "-q", "-am", "ours: mark f3")
    done = dspark(u, *args, "--continue")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["onto"] == head and [p["status"] for p in report["patches"]] == ["resolved", "clean", "clean"]


def test_continue_without_a_resolution_commit_is_refused(upstream):
    u = upstream
    wd = u["tmp"] / "wd11"
    conflict_then_resolve(u, "v11.0", wd)
    git(wd, "reset", "-q", "--hard", "HEAD~1")  # the resolution was not committed after all
    run = dspark(u, "--onto", "v11.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--continue")
    assert run.returncode == 2 and "found 0 commits on the new tree (none), expected 1" in run.stderr, run.stderr


def test_a_conflict_resolved_to_the_new_tree_as_it_is_is_left_out_of_the_series(upstream):
    """The human decides upstream's version is the patch's change (an empty resolution commit):
    --continue reports it `already upstream` and drops it, not a 0-byte patch in the series."""
    u = upstream
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300")}, "v13.0")
    wd, out = u["tmp"] / "wd13", u["tmp"] / "out13"
    assert dspark(u, "--onto", "v13.0", "--repo", str(u["repo"]), "--workdir", str(wd)).returncode == 4
    git(wd, "checkout", "HEAD", "--", "mod.py")  # the new tree's mod.py, markers gone
    git(wd, "commit", "-q", "--allow-empty", "-m", "upstream has it")
    done = rebase_onto(u, "v13.0", wd, out, "--continue")
    assert done.returncode == 0, done.stderr
    first, second, third = json.loads(done.stdout)["patches"]
    assert (first["status"], second["status"], third["status"]) == ("already upstream", "clean", "clean")
    assert first["commit"] == git(wd, "rev-parse", "HEAD~2") and first["details"] == [
        "your resolution keeps the new tree as it is: dropped from the refreshed series"]
    written = series.load_series(out, "dspark")
    assert len(written) == 2 and all(p.path.stat().st_size > 0 for p in written)


def upstream_drops_other_py(u, tag):
    """A new upstream release without other.py, which the series' third patch changes."""
    git(u["repo"], "checkout", "-q", "main")
    git(u["repo"], "rm", "-q", "other.py")
    git(u["repo"], "commit", "-q", "-m", "upstream drops other.py")
    git(u["repo"], "tag", tag)


def test_a_patch_whose_file_upstream_deleted_is_named_so_and_can_be_dropped(upstream):
    """vLLM 0.34.0 deleted the V1 runner our V1 patches change: git said "does not exist in index"
    beside "moved or missing upstream, merged 3-way" and the way out read "markers left ... resolve"
    (there were none). Now the file is named as deleted upstream with the two ways on, and an empty
    commit drops the patch; the text run says which patches were left out and why."""
    u = upstream
    upstream_drops_other_py(u, "v15.0")
    wd, out = u["tmp"] / "wd15", u["tmp"] / "out15"
    stopped = dspark(u, "--onto", "v15.0", "--repo", str(u["repo"]), "--workdir", str(wd))
    assert stopped.returncode == 4, stopped.stderr
    third = json.loads(stopped.stdout)["patches"][2]
    assert third["status"] == "conflict" and third["details"] == ["other.py: deleted upstream (not in the new tree)"]
    assert (f"port its change into the new tree on branch dspark/rebase-v15.0 in {wd} and commit it, or drop the "
            f"patch with an empty commit (`git -C {wd} commit --allow-empty -m 'drop {third['patch']}'`)") in stopped.stderr
    git(wd, "commit", "-q", "--allow-empty", "-m", f"drop {third['patch']}")
    done = run_dspark("rebase", "eng", "--from", "v1.0", "--onto", "v15.0", "--repo", str(u["repo"]), "--workdir",
                      str(wd), "--out", str(out), "--continue",
                      env={"DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache"),
                           "GIT_CONFIG_GLOBAL": os.devnull})
    assert done.returncode == 0, done.stderr
    assert f"left out of it: {third['patch']} (your empty resolution)" in done.stdout
    assert len(series.load_series(out, "dspark")) == 2


def test_a_patch_whose_file_upstream_renamed_names_the_new_name(upstream):
    """A file upstream moved was reported "deleted upstream", sending the human to look for where
    its code went: the report names where it went."""
    u = upstream
    git(u["repo"], "checkout", "-q", "main")
    (u["repo"] / "conf").mkdir()
    git(u["repo"], "mv", "other.py", "conf/other.py")
    git(u["repo"], "commit", "-q", "-m", "upstream moves other.py")
    git(u["repo"], "tag", "v41.0")
    stopped = dspark(u, "--onto", "v41.0", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / "wd41"))
    assert stopped.returncode == 4, stopped.stderr
    third = json.loads(stopped.stdout)["patches"][2]
    assert third["details"] == ["other.py: renamed upstream to conf/other.py (not in the new tree)"]
    assert "port its change into the new tree" in stopped.stderr


def test_a_binary_conflict_is_said_to_have_no_markers_and_a_resolution_is_carried(upstream):
    """git leaves no markers in a binary file it cannot merge: the conflict read "blob.bin:
    unmerged" and "markers left ... resolve" (there were none). It names the file as binary, which
    version the work tree has and how to take the patch's; that resolution is carried as a binary
    patch."""
    u = upstream
    repo = u["repo"]
    git(repo, "checkout", "-q", "work")
    commit_files(repo, {"blob.bin": "\0ours\0" * 50}, "ours: a binary file")
    [made] = git(repo, "format-patch", "-o", str(u["patches"]), "--zero-commit", "--no-signature",
                 "--start-number", "4", "-1").splitlines()
    with open(u["patches"] / "series", "a") as listed:
        listed.write(Path(made).name + "\n")
    series.write_lock(u["patches"])
    new_upstream(u, {"blob.bin": "\0upstream\0" * 50}, "v42.0")
    wd, out = u["tmp"] / "wd42", u["tmp"] / "out42"
    stopped = dspark(u, "--onto", "v42.0", "--repo", str(repo), "--workdir", str(wd))
    assert stopped.returncode == 4, stopped.stderr
    fourth = json.loads(stopped.stdout)["patches"][3]
    assert fourth["status"] == "conflict" and fourth["details"] == [
        "blob.bin: unmerged, without conflict markers (binary) (the work tree has the new tree's version; "
        "`git checkout --theirs -- blob.bin` the patch's)"]
    assert f"choose each file's content on branch dspark/rebase-v42.0 in {wd}, commit" in stopped.stderr
    assert "markers left" not in stopped.stderr
    assert (wd / "blob.bin").read_bytes() == b"\0upstream\0" * 50
    git(wd, "checkout", "--theirs", "--", "blob.bin")
    git(wd, "add", "blob.bin")
    git(wd, "commit", "-q", "-m", "ours: a binary file")
    done = dspark(u, "--onto", "v42.0", "--repo", str(repo), "--workdir", str(wd), "--out", str(out), "--continue")
    assert done.returncode == 0, done.stderr
    check = u["tmp"] / "check42"
    git(u["tmp"], "clone", "-q", "-b", "v42.0", str(repo), str(check))
    for patch in series.load_series(out, "eng"):
        git(check, "apply", str(patch.path))
    assert (check / "blob.bin").read_bytes() == b"\0ours\0" * 50


def test_a_deletion_of_a_file_upstream_changed_is_said_to_be_not_applied_not_merged(upstream):
    """git merges no deletion 3-way ("Falling back to direct application"), so none of the patch
    applied and no markers were left, yet its hunk read "merged 3-way" beside git's "while
    searching for:" and the way on read "markers left ... resolve" (an empty commit, there being
    nothing to resolve, then dropped the patch's other change unseen)."""
    u = upstream
    git(u["repo"], "checkout", "-q", "-b", "deletes", u["base"])
    git(u["repo"], "rm", "-q", "other.py")
    commit_files(u["repo"], {"mod.py": MOD.replace("return x + 3", "return x + 3  # ours")}, "ours: drop other")
    for old in u["patches"].glob("*.patch"):
        old.unlink()
    name = Path(git(u["repo"], "format-patch", "-o", str(u["patches"]), "--zero-commit", "--no-signature", "-U2",
                    u["base"])).name
    (u["patches"] / "series").write_text(name + "\n")
    series.write_lock(u["patches"])
    new_upstream(u, {"other.py": OTHER + "G = 7\n"}, "v40.0")
    wd = u["tmp"] / "wd40"
    run = dspark(u, "--onto", "v40.0", "--repo", str(u["repo"]), "--workdir", str(wd))
    assert run.returncode == 4, run.stderr
    [only] = json.loads(run.stdout)["patches"]
    assert only["status"] == "conflict" and only["details"] == [
        "other.py: hunk #1 (@@ -1,6 +0,0 @@) does not apply", "other.py: patch does not apply", rebase.NOT_APPLIED]
    assert git(wd, "status", "--porcelain") == ""  # indeed nothing applied: no markers to resolve
    assert "markers left" not in run.stderr and "port its change into the new tree on branch dspark/rebase-v40.0" in run.stderr


def team_series(u, edits):
    """A team series made on top of DSpark's v1.0 series (the `work` branch), as `dspark apply
    --series` lays it, in team/v1.0 (named after the pin it sits on)."""
    git(u["repo"], "checkout", "-q", "-B", "team", "work")
    for subject, files in edits:
        commit_files(u["repo"], files, subject)
    team = u["tmp"] / "team" / "v1.0"
    names = git(u["repo"], "format-patch", "-o", str(team), "--zero-commit", "--no-signature",
                f"HEAD~{len(edits)}").splitlines()
    (team / "series").write_text("".join(Path(n).name + "\n" for n in names))
    series.write_lock(team)
    return team


def dspark_pin_v2(u, ours_py, drop_other=False):
    """Upstream v2.0 (mod.py moves down three lines) and DSpark's own series for it, pinned in
    compat.yaml: our three patches carried, with ours.py now `ours_py` (None: not added), and
    other.py deleted instead of changed with `drop_other`."""
    onto = new_upstream(u, {"mod.py": "import os\n\n\n" + MOD}, "v2.0")
    git(u["repo"], "checkout", "-q", "-b", "dspark-v2", "v2.0")
    commit_files(u["repo"], {"mod.py": ("import os\n\n\n" + MOD).replace("return x + 3", "return x + 3  # ours")},
                 "ours: mark f3")
    if ours_py is not None:  # None: DSpark's v2.0 series no longer adds ours.py
        commit_files(u["repo"], {"ours.py": ours_py}, "ours: new module")
    if drop_other:
        git(u["repo"], "rm", "-q", "other.py")
        git(u["repo"], "commit", "-q", "-m", "ours: other goes")
    else:
        commit_files(u["repo"], {"other.py": OTHER.replace("D = 4\n", "D = 4\nOURS = 44\n")}, "ours: other")
    patches = u["tmp"] / "patches" / "eng" / "v2.0"
    names = git(u["repo"], "format-patch", "-o", str(patches), "--zero-commit", "--no-signature", "-U2",
                "v2.0").splitlines()
    (patches / "series").write_text("".join(Path(n).name + "\n" for n in names))
    series.write_lock(patches)
    with u["compat"].open("a") as compat:
        compat.write(pin_entry("v2.0", onto))
    git(u["repo"], "checkout", "-q", "main")
    return onto


HOOK_EDIT = ("team: extend the hook", {"ours.py": "HOOK = True\nTEAM = 1\n"})  # a team patch to ours.py


def layered(u, team, *args):
    """`--layered` of `team` from v1.0 onto v2.0 in git mode."""
    return dspark(u, "--onto", "v2.0", "--repo", str(u["repo"]), "--series", str(team), "--layered", *args)


def resolved_hook_conflict(u, *args):
    """A layered run of HOOK_EDIT stopped on DSpark's v2.0 ours.py, which adds a line where the
    team's goes, and that conflict resolved and committed: (team series, the stopped run's report)."""
    team = team_series(u, [HOOK_EDIT])
    dspark_pin_v2(u, "HOOK = True\nV2 = 1\n")
    stopped = layered(u, team, *args)
    assert stopped.returncode == 4, stopped.stderr
    report = json.loads(stopped.stdout)
    assert report["patches"][0]["details"][0].startswith("ours.py: conflict markers at lines ")
    work = Path(report["workdir"])
    (work / "ours.py").write_text("HOOK = True\nV2 = 1\nTEAM = 1\n")
    git(work, "commit", "-q", "-am", "resolved")
    return team, report


def test_a_layered_series_is_carried_on_dspark_series_of_both_pins_and_applies_on_the_new_pin(upstream):
    """A team series made on top of DSpark's (apply --series) changes ours.py, which our series adds:
    carried onto the bare new tree it is a conflict whose file no upstream tree has, and the way on
    is --layered. With it, the layer is carried from v1.0 + DSpark's v1.0 series onto v2.0 + DSpark's
    v2.0 series, written beside it (team/v2.0), and `dspark apply --series` of it gives the result."""
    u = upstream
    team = team_series(u, [HOOK_EDIT,
                           ("team: mark f6", {"mod.py": MOD.replace("return x + 3", "return x + 3  # ours")
                                                          .replace("return x + 6", "return x + 6  # team")})])
    dspark_pin_v2(u, "# v2\nHOOK = True\n")
    bare = dspark(u, "--onto", "v2.0", "--repo", str(u["repo"]), "--series", str(team),
                  "--workdir", str(u["tmp"] / "wd-bare"), "--out", str(u["tmp"] / "out-bare"))
    assert bare.returncode == 4, bare.stderr
    first = json.loads(bare.stdout)["patches"][0]
    assert first["status"] == "conflict" and first["details"] == ["ours.py: in neither upstream tree (a file another series adds)"]
    assert "carry it on DSpark's series of both pins with --layered" in bare.stderr

    run = layered(u, team)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    label = f"team-v1-0-{hashlib.sha256(str(team).encode()).hexdigest()[:8]}"  # the layer's own names
    assert report["branch"] == f"dspark/layered-rebase/{label}/v2.0"
    assert Path(report["workdir"]) == u["tmp"] / "cache" / "rebase-layered" / label / "eng-v2.0"
    # base and onto are upstream's commits; the trees with DSpark's series are named apart
    assert (report["base"], report["onto"]) == (u["base"], git(u["repo"], "rev-parse", "v2.0"))
    assert {k: v for k, v in report["under"].items() if not k.endswith("_with_series")} == {
        "base_series": "eng/v1.0", "onto_series": "eng/v2.0"}
    assert git(u["repo"], "rev-parse", f"{report['under']['onto_with_series']}^") == report["onto"]
    assert [p["status"] for p in report["patches"]] == ["3-way", "clean"]  # merged with ours.py of DSpark's v2.0
    assert report["patches"][0]["details"] == ["ours.py: hunk #1 (@@ -1 +1,2 @@) merged 3-way"]
    assert report["compat_entry"] is None  # a layer is no pin
    out = u["tmp"] / "team" / "v2.0"
    assert Path(report["out_dir"]) == out and [p.name for p in series.load_series(out, "team")] == sorted(
        p["patch"] for p in report["patches"])
    assert not (u["tmp"] / "patches" / "eng" / "v2.0" / "series").read_text().count("team")  # ours untouched

    work = u["tmp"] / "applied"
    applied = run_dspark("apply", "eng", "--commit", "v2.0", "--workdir", str(work), "--series", str(out), "--json",
                         env={"DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache"),
                              "GIT_CONFIG_GLOBAL": os.devnull})
    assert applied.returncode == 0, applied.stderr
    assert (work / "ours.py").read_text() == "# v2\nHOOK = True\nTEAM = 1\n"
    mod = (work / "mod.py").read_text()
    assert mod.startswith("import os\n") and "x + 3  # ours" in mod and "x + 6  # team" in mod
    subjects = git(work, "log", "--format=%s", "-5").splitlines()
    assert subjects == ["team: mark f6", "team: extend the hook", "ours: other", "ours: new module", "ours: mark f3"]


def release_files(u, versions):
    """Release files (sdists in the cache) for the first pins of compat.yaml, one per version in order."""
    compat = u["compat"].read_text()
    for version in versions:
        archive = u["tmp"] / "cache" / "releases" / f"eng-{version}.tar.gz"
        archive.parent.mkdir(parents=True, exist_ok=True)
        git(u["repo"], "archive", "--format=tar.gz", f"--prefix=eng-{version}/", "-o", str(archive), f"v{version}")
        compat = compat.replace("releases: []", (
            f"releases:\n          - package: eng\n            version: '{version}'\n            file: {archive.name}\n"
            f"            sha256: {series.sha256_of(archive)}"), 1)
    u["compat"].write_text(compat)


@pytest.mark.parametrize("onto", ["v2.0", "commit"])
def test_a_layered_onto_pin_without_release_files_names_repo_in_release_mode(upstream, onto):
    """Was the package index (exit 3 offline) by name, and 'must be a release version or a pin' by commit."""
    u = upstream
    team = team_series(u, [HOOK_EDIT])
    commit = dspark_pin_v2(u, "# v2\nHOOK = True\n")
    release_files(u, ("1.0",))
    run = dspark(u, "--onto", commit if onto == "commit" else onto, "--series", str(team), "--layered")
    assert run.returncode == 2
    assert run.stderr.strip() == ("error: eng v2.0 has no release file in compat.yaml; rebase from git with --repo "
                                  "(a repository holding its commit)")


def test_a_layered_series_is_carried_between_release_files_too(upstream):
    """Without --repo the two trees are the pins' release files (sdists, here in the cache)."""
    u = upstream
    team = team_series(u, [HOOK_EDIT])
    dspark_pin_v2(u, "# v2\nHOOK = True\n")
    release_files(u, ("1.0", "2.0"))
    run = dspark(u, "--onto", "2.0", "--series", str(team), "--layered")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["under"]["onto_series"] == "eng/v2.0" and report["compat_entry"] is None
    assert [p["status"] for p in report["patches"]] == ["3-way"]
    [patch] = series.load_series(u["tmp"] / "team" / "v2.0", "team")
    assert "+TEAM = 1" in patch.path.read_text()


def test_a_layered_conflict_is_resolved_and_continued_on_the_same_trees(upstream):
    """The trees with DSpark's series are remade on every run: --continue must find the same ones."""
    u = upstream
    wd, out = u["tmp"] / "wd-l", u["tmp"] / "out-l"
    team, _ = resolved_hook_conflict(u, "--workdir", str(wd), "--out", str(out))
    done = layered(u, team, "--workdir", str(wd), "--out", str(out), "--continue")
    assert done.returncode == 0, done.stderr
    assert [p["status"] for p in json.loads(done.stdout)["patches"]] == ["resolved"]
    [patch] = series.load_series(out, "team")
    assert "+TEAM = 1" in patch.path.read_text() and "Subject: [PATCH 1/1] team: extend the hook" in patch.path.read_text()


def test_a_layered_series_is_carried_onto_a_pin_named_by_its_release_version_in_a_repo_without_its_tag(upstream):
    """--onto 2.0 names pin v2.0 by its version: in git mode that is the pin's commit (or tag)."""
    u = upstream
    team = team_series(u, [HOOK_EDIT])
    onto = dspark_pin_v2(u, "# v2\nHOOK = True\n")
    git(u["repo"], "tag", "-d", "v2.0")
    run = dspark(u, "--onto", "2.0", "--repo", str(u["repo"]), "--series", str(team), "--layered")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["onto"] == onto and report["new_pin"] == "v2.0"
    assert [p["status"] for p in report["patches"]] == ["3-way"]


@pytest.mark.parametrize("how", ["--out", "--out of another pin", "--out of another engine", "--series"])
def test_a_layered_run_never_writes_over_dspark_series(upstream, how):
    """--out naming DSpark's series of any pin, or --series naming one (whose default out is the
    other pin's series), is refused before any work, even with --force."""
    u = upstream
    team = team_series(u, [HOOK_EDIT])
    dspark_pin_v2(u, "# v2\nHOOK = True\n")
    ours = u["tmp"] / "patches" / "eng"
    shutil.copytree(ours / "v1.0", ours / "v3.0")
    theirs = u["tmp"] / "patches" / "eng2" / "v1.0"
    shutil.copytree(ours / "v1.0", theirs)
    with u["compat"].open("a") as compat:
        compat.write(pin_entry("v3.0", u["base"]))
        compat.write(f"  eng2:\n    repository: {u['repo']}\n    module: eng2\n    distributions: [eng2]\n"
                     "    default_pin: v1.0\n    pins:\n" + pin_entry("v1.0", u["base"]).replace("eng/", "eng2/"))
    before = {name: snapshot(ours / name) for name in ("v1.0", "v2.0", "v3.0")} | {"eng2": snapshot(theirs)}
    args = {"--out": ["--series", str(team), "--out", str(ours / "v2.0")],
            "--out of another pin": ["--series", str(team), "--out", str(ours / "v3.0")],
            "--out of another engine": ["--series", str(team), "--out", str(theirs)],
            "--series": ["--series", str(ours / "v1.0")]}[how]
    run = dspark(u, "--onto", "v2.0", "--repo", str(u["repo"]), "--layered", "--force", *args)
    assert run.returncode == 2, run.stderr
    expected = {"--out": "is the DSpark series eng/v2.0", "--out of another pin": "is the DSpark series eng/v3.0",
                "--out of another engine": "is the DSpark series eng2/v1.0",
                "--series": "--series is DSpark's own series eng/v1.0: carry it without --layered"}[how]
    assert expected in run.stderr
    assert {name: snapshot(ours / name) for name in ("v1.0", "v2.0", "v3.0")} | {"eng2": snapshot(theirs)} == before
    assert not git(u["repo"], "branch", "--list", "dspark/*")


def test_a_file_dspark_old_series_added_and_its_new_one_does_not_is_named_so(upstream):
    """Not 'deleted upstream': upstream never had it."""
    u = upstream
    team = team_series(u, [HOOK_EDIT,
                           ("team: more other", {"other.py": OTHER.replace("D = 4\n", "D = 4\nOURS = 44\n")
                                                                  .replace("F = 6\n", "F = 6\nTEAM = 66\n")})])
    dspark_pin_v2(u, None)
    stopped = layered(u, team)
    assert stopped.returncode == 4, stopped.stderr
    first = json.loads(stopped.stdout)["patches"][0]
    assert first["details"] == ["ours.py: not in the new tree: DSpark's series eng/v1.0 adds it, eng/v2.0 does not"]
    assert "port its change into the new tree" in stopped.stderr
    work = Path(json.loads(stopped.stdout)["workdir"])
    git(work, "commit", "-q", "--allow-empty", "-m", "drop it")
    done = layered(u, team, "--continue")
    assert done.returncode == 0, done.stderr
    assert [p["status"] for p in json.loads(done.stdout)["patches"]] == ["already upstream", "clean"]


def test_a_file_an_earlier_dropped_patch_of_the_layer_adds_is_named_so(upstream):
    """Not blamed on DSpark's series: the team's own first patch adds it and was dropped."""
    u = upstream
    team = team_series(u, [("team: hook and module", {"ours.py": "HOOK = True\nTEAM = 1\n", "team.py": "T = 1\n"}),
                           ("team: module", {"team.py": "T = 2\n"})])
    dspark_pin_v2(u, "HOOK = True\nV2 = 1\n")
    stopped = layered(u, team)
    assert stopped.returncode == 4, stopped.stderr
    work = Path(json.loads(stopped.stdout)["workdir"])
    git(work, "reset", "-q", "--hard")
    git(work, "commit", "-q", "--allow-empty", "-m", "drop it")
    again = layered(u, team, "--continue")
    assert again.returncode == 4, again.stderr
    assert json.loads(again.stdout)["patches"][1]["details"] == [
        "team.py: not in the new tree: an earlier patch of this series adds it, and the work branch does not have it"]


def test_a_file_dspark_new_series_deletes_is_named_so(upstream):
    u = upstream
    team = team_series(u, [("team: more other", {"other.py": OTHER.replace("D = 4\n", "D = 4\nOURS = 44\n")
                                                                 .replace("F = 6\n", "F = 6\nTEAM = 66\n")})])
    dspark_pin_v2(u, "# v2\nHOOK = True\n", drop_other=True)
    stopped = layered(u, team)
    assert stopped.returncode == 4, stopped.stderr
    assert json.loads(stopped.stdout)["patches"][0]["details"] == [
        "other.py: not in the new tree: DSpark's series eng/v2.0 deletes it"]
    assert "port its change into the new tree" in stopped.stderr


def test_a_layered_change_dspark_new_series_makes_is_said_to_be_in_it(upstream):
    u = upstream
    team = team_series(u, [("team: v2 hook", {"ours.py": "# v2\nHOOK = True\n"})])
    dspark_pin_v2(u, "# v2\nHOOK = True\n")
    run = layered(u, team)
    assert run.returncode == 0, run.stderr
    [patch] = json.loads(run.stdout)["patches"]
    assert patch["status"] == "already upstream"
    assert patch["details"] == ["its changes are already in the new tree with DSpark's series eng/v2.0: dropped "
                                "from the refreshed series"]


def test_a_layered_default_out_that_exists_is_named_as_beside_the_series(upstream):
    u = upstream
    team = team_series(u, [HOOK_EDIT])
    dspark_pin_v2(u, "# v2\nHOOK = True\n")
    (u["tmp"] / "team" / "v2.0").mkdir()
    (u["tmp"] / "team" / "v2.0" / "mine").write_text("x")
    run = layered(u, team)
    assert run.returncode == 2
    assert "(without --out it is the new pin's name beside --series)" in run.stderr


def test_continue_after_dspark_series_under_the_layer_changed_says_so(upstream):
    u = upstream
    team, _ = resolved_hook_conflict(u)
    ours = u["tmp"] / "patches" / "eng" / "v2.0"
    (ours / "series").write_text("".join(line for line in (ours / "series").read_text().splitlines(True)
                                         if "other" not in line))
    series.write_lock(ours)
    resumed = layered(u, team, "--continue")
    assert resumed.returncode == 2
    assert "DSpark's series eng/v2.0 changed since the last run of dspark/layered-rebase/team-v1-0-" in resumed.stderr


def test_a_plain_run_can_take_no_name_a_layered_run_uses(upstream):
    """A plain run's work tree and branch (named after --pin) never meet a layered run's."""
    u = upstream
    team, stopped = resolved_hook_conflict(u)
    for pin in ("v2.0-layered", "layered"):
        plain = dspark(u, "--onto", "v2.0", "--repo", str(u["repo"]), "--pin", pin)
        assert plain.returncode == 0, plain.stderr
        assert json.loads(plain.stdout)["workdir"] != stopped["workdir"]
    done = layered(u, team, "--continue")
    assert done.returncode == 0, done.stderr


def test_two_teams_layers_are_carried_onto_one_pin_side_by_side(upstream):
    """Was one work branch and tree per new pin: a second team's layered run was refused while the
    first's conflict waited, and --force there discarded the first team's resolution."""
    u = upstream
    team, stopped = resolved_hook_conflict(u, "--out", str(u["tmp"] / "out-a"))
    other = u["tmp"] / "team-b" / "v1.0"
    shutil.copytree(team, other)
    second = layered(u, other, "--out", str(u["tmp"] / "out-b"))
    assert second.returncode == 4, second.stderr  # its own conflict, on its own branch and tree
    report = json.loads(second.stdout)
    assert report["branch"] != stopped["branch"] and report["workdir"] != stopped["workdir"]
    done = layered(u, team, "--out", str(u["tmp"] / "out-a"), "--continue")
    assert done.returncode == 0, done.stderr
    assert [p["status"] for p in json.loads(done.stdout)["patches"]] == ["resolved"]
    [patch] = series.load_series(u["tmp"] / "out-a", "team")
    assert "+TEAM = 1" in patch.path.read_text()


def test_a_layer_behind_a_link_named_after_the_pin_is_written_beside_the_link(upstream):
    """The name check and the default --out took the link's target (team-2026q3): refused, 'give --out'."""
    u = upstream
    team = team_series(u, [HOOK_EDIT])
    dspark_pin_v2(u, "# v2\nHOOK = True\n")
    store = u["tmp"] / "store" / "team-2026q3"
    store.parent.mkdir()
    team.rename(store)
    team.symlink_to(store)
    run = layered(u, team)
    assert run.returncode == 0, run.stderr
    assert Path(json.loads(run.stdout)["out_dir"]) == team.parent / "v2.0"


def test_a_layer_with_a_long_or_undecodable_directory_name_gets_a_usable_label(upstream):
    """A path not in UTF-8 was a traceback (the label's hash), and two 140-character names made a
    label longer than a file name may be ("File name too long", exit 2)."""
    u = upstream
    team = team_series(u, [HOOK_EDIT])
    dspark_pin_v2(u, "# v2\nHOOK = True\n")
    for parent, name in (("t\udcffeam", "v1.0"), ("t" * 140, "v" * 140)):
        odd = u["tmp"] / parent / name
        shutil.copytree(team, odd)
        run = layered(u, odd, "--out", str(u["tmp"] / f"out-{len(parent)}"))
        assert run.returncode == 0, run.stderr
        label = json.loads(run.stdout)["branch"].split("/")[2]
        assert len(label) <= 57 and git(u["repo"], "check-ref-format", "--branch", label)


def test_layered_needs_a_series_and_an_onto_pin_with_dspark_series(upstream):
    u = upstream
    team = team_series(u, [HOOK_EDIT])
    new_upstream(u, {"mod.py": "import os\n" + MOD}, "v3.0")
    no_series = dspark(u, "--onto", "v3.0", "--repo", str(u["repo"]), "--layered")
    assert no_series.returncode == 2 and "--layered carries your own series: give it with --series" in no_series.stderr
    no_pin = dspark(u, "--onto", "v3.0", "--repo", str(u["repo"]), "--series", str(team), "--layered")
    assert no_pin.returncode == 2, no_pin.stderr
    assert "--onto v3.0 is no eng pin in compat.yaml" in no_pin.stderr
    assert "dspark rebase eng --from v1.0 --onto v3.0" in no_pin.stderr
    assert not git(u["repo"], "branch", "--list", "dspark/*")  # refused before any work


def test_an_empty_resolution_still_owns_its_commit_at_the_next_continue(upstream):
    """Was recorded `already upstream` with no commit: when a later patch conflicted too and was
    resolved, the next --continue found one commit more than expected and refused (exit 2) forever."""
    u = upstream
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300"),
                     "other.py": OTHER.replace("D = 4\n", "D = 4\nTHEIRS = 1\n")}, "v14.0")
    wd, out = u["tmp"] / "wd14", u["tmp"] / "out14"
    assert dspark(u, "--onto", "v14.0", "--repo", str(u["repo"]), "--workdir", str(wd)).returncode == 4
    git(wd, "checkout", "HEAD", "--", "mod.py")  # 0001: upstream's version is the patch's change
    git(wd, "commit", "-q", "--allow-empty", "-m", "upstream has it")
    empty = git(wd, "rev-parse", "HEAD")
    stopped = rebase_onto(u, "v14.0", wd, out, "--continue")
    assert stopped.returncode == 4, stopped.stderr  # 0003 conflicts with THEIRS
    assert [p["status"] for p in json.loads(stopped.stdout)["patches"]] == ["already upstream", "clean", "conflict"]
    (wd / "other.py").write_text(OTHER.replace("D = 4\n", "D = 4\nOURS = 44\nTHEIRS = 1\n"))
    git(wd, "commit", "-q", "-am", "ours: other")
    done = rebase_onto(u, "v14.0", wd, out, "--continue")
    assert done.returncode == 0, done.stderr
    first, second, third = json.loads(done.stdout)["patches"]
    assert (first["status"], first["commit"]) == ("already upstream", empty)
    assert (second["status"], third["status"]) == ("clean", "resolved")
    assert [p.name for p in series.load_series(out, "dspark")] == [second["patch"], third["patch"]]
    assert "+OURS = 44" in (out / third["patch"]).read_text()


def test_a_patch_upstream_already_has_is_reported_and_left_out_of_the_series(upstream):
    """Was committed empty, reported 3-way and written as a 0-byte patch that made the refreshed
    series unappliable ("No valid patches in input")."""
    u = upstream
    onto = new_upstream(u, {"ours.py": "HOOK = True\n"}, "v12.0")  # upstream took 0002 as it is
    out = u["tmp"] / "out12"
    wd = u["tmp"] / "wd12"
    run = rebase_onto(u, "v12.0", wd, out)
    assert run.returncode == 0, run.stderr
    first, second, third = json.loads(run.stdout)["patches"]
    assert (first["status"], second["status"], third["status"]) == ("clean", "already upstream", "clean")
    assert second["commit"] is None and second["details"] == [
        "its changes are already in the new tree: dropped from the refreshed series"]
    assert len(git(wd, "rev-list", f"{onto}..HEAD").splitlines()) == 2
    refreshed = series.load_series(out, "dspark")
    assert [p.name for p in refreshed] == [first["patch"], third["patch"]]
    # the comment names the new pin (--onto's name), not the one carried from
    assert (out / "series").read_text() == f"# test series eng/v12.0 (not eng/v1.0.1)\n{first['patch']}\n{third['patch']}\n"
    assert not (out / second["patch"]).exists()
    fresh = u["tmp"] / "fresh12"
    git(u["tmp"], "clone", "-q", str(u["repo"]), str(fresh))
    git(fresh, "checkout", "-q", onto)
    for p in refreshed:
        git(fresh, "apply", "--index", str(p.path))
    # --continue after it keeps it dropped (it owns no commit on the work branch)
    again = rebase_onto(u, "v12.0", wd, out, "--continue", "--force")
    assert again.returncode == 0, again.stderr
    assert [p["status"] for p in json.loads(again.stdout)["patches"]] == ["clean", "already upstream", "clean"]
    assert [p.name for p in series.load_series(out, "dspark")] == [first["patch"], third["patch"]]


def test_a_new_file_upstream_added_too_is_named_in_the_three_way_details(upstream):
    """Was reported 3-way with no details at all: git's "already exists" was not read."""
    u = upstream
    git(u["repo"], "checkout", "-q", "-b", "both", u["base"])
    commit_files(u["repo"], {"both.py": "SAME = 1\n", "other.py": OTHER + "G = 7\n"}, "ours: both")
    for old in u["patches"].glob("*.patch"):
        old.unlink()
    name = Path(git(u["repo"], "format-patch", "-o", str(u["patches"]), "--zero-commit", "--no-signature", "-U2",
                    u["base"])).name
    (u["patches"] / "series").write_text(name + "\n")
    series.write_lock(u["patches"])
    new_upstream(u, {"both.py": "SAME = 1\n"}, "v13.0")
    run = dspark(u, "--onto", "v13.0", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / "wd13"),
                 "--out", str(u["tmp"] / "out13"))
    assert run.returncode == 0, run.stderr
    [only] = json.loads(run.stdout)["patches"]
    assert (only["status"], only["details"]) == ("3-way", ["both.py: a file this patch adds, added upstream too, "
                                                           "merged 3-way"])


@pytest.mark.parametrize("where", ["repo", "inside repo", "work tree", "contains cache", "parent of series"])
def test_an_out_that_would_replace_the_repo_workdir_cache_or_series_is_refused_even_with_force(upstream, where):
    """--out equal to --repo deleted its .git with --force; a parent of --series deleted the series."""
    u = upstream
    new_upstream(u, {"new.py": "X = 1\n"}, "v13.0")
    wd = u["tmp"] / "wd13"
    out, relation, what = {
        "repo": (u["repo"], "is", f"--repo {u['repo']}"),
        "inside repo": (u["repo"] / "series", "is inside", f"--repo {u['repo']}"),
        "work tree": (wd, "is", f"work tree {wd}"),
        "contains cache": (u["tmp"] / "c", "contains", f"dspark cache {u['tmp'] / 'c' / 'cache'}"),
        "parent of series": (u["tmp"] / "patches", None, None),
    }[where]
    env = {"DSPARK_COMPAT": str(u["compat"]), "GIT_CONFIG_GLOBAL": os.devnull,
           "DSPARK_CACHE": str(u["tmp"] / "c" / "cache")}
    before = tree_fingerprint(u["repo"])
    run = run_dspark("rebase", "eng", "--from", "v1.0", "--onto", "v13.0", "--repo", str(u["repo"]),
                     "--workdir", str(wd), "--out", str(out), "--force", env=env)
    expected = (f"error: --out {out} {relation} the {what}; the refreshed series replaces its --out whole: "
                "choose another --out") if relation else (
        f"error: --out {out} contains the series being carried ({u['patches']}); the refreshed series "
        "replaces its --out whole: choose another --out")
    assert run.returncode == 2 and run.stderr.strip() == expected, run.stderr
    assert tree_fingerprint(u["repo"]) == before and (u["repo"] / ".git").is_dir()
    assert len(worktrees(u["repo"])) == 1 and not wd.exists()
    series.load_series(u["patches"], "dspark")  # the series is untouched


KILL_BETWEEN_RENAMES = """
import os, signal, sys
from dspark_cli import rebase
real, target = os.replace, sys.argv[-1]
def replace(a, b):
    real(a, b)
    if str(a) == target:  # the series just moved aside: die before the new one goes in
        os.kill(os.getpid(), signal.SIGKILL)
rebase.os.replace = replace
from dspark_cli.cli import main
sys.argv = ["dspark"] + sys.argv[1:-1]
main()
"""


@pytest.mark.parametrize("pid", ["gone", "reused"])
def test_a_series_stranded_by_a_killed_in_place_refresh_is_recovered_by_the_next_run(upstream, pid):
    """SIGKILL between _swap_in's two renames left no series, the old one only in the scratch
    directory's `old`, which nothing recovered or cleaned up. Whether its run is alive was asked of
    the pid in the scratch's name: a pid reused since (in a container every dspark is pid 1) kept
    the series stranded for good; the scratch's flock, which the kernel dropped, tells."""
    import subprocess
    import sys

    u = upstream
    new_upstream(u, {"mod.py": "import os\n\n\n" + MOD}, "v14.0")
    before = snapshot(u["patches"])
    wd = u["tmp"] / "wd14"
    args = ["rebase", "eng", "--from", "v1.0", "--onto", "v14.0", "--repo", str(u["repo"]), "--workdir", str(wd),
            "--out", str(u["patches"]), "--force"]
    env = {**os.environ, "DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache"),
           "GIT_CONFIG_GLOBAL": os.devnull, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, *args, str(u["patches"])], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not u["patches"].exists()
    [scratch] = u["patches"].parent.glob(".v1.0.dspark-*")
    assert snapshot(scratch / "old") == before
    if pid == "reused":  # the name as the old scheme gave it, with a pid alive now: this process's
        scratch = scratch.rename(scratch.with_name(f".v1.0.dspark-series-{os.getpid()}-{scratch.name[-8:]}"))

    # The next run recovers it before anything else, even one that then fails (an unknown --onto).
    bad = dspark(u, "--onto", "no-such-tag", "--repo", str(u["repo"]), "--workdir", str(wd), "--force",
                 "--out", str(u["patches"]))
    assert bad.returncode == 2, bad.stderr
    assert f"{u['patches']}: restored from {scratch / 'old'} (a run was killed while replacing it)" in bad.stderr
    assert snapshot(u["patches"]) == before
    assert sorted(p.name for p in u["patches"].parent.iterdir()) == ["v1.0"]  # the dead run's scratch is gone
    done = dspark(u, "--onto", "v14.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--force", "--out",
                  str(u["patches"]))
    assert done.returncode == 0, done.stderr
    series.load_series(u["patches"], "dspark")


def test_continue_in_release_mode_with_no_rebase_there_fetches_nothing(tmp_path):
    """Downloaded and imported both release trees (~20 s, a 97 MB repository left behind) before
    saying there was nothing to continue; the git mode refused at once."""
    work = tmp_path / "rbw"
    run = run_dspark("rebase", "vllm", "--from", "v0.32.0", "--onto", "v0.33.0", "--pin", "p10", "--out",
                     str(tmp_path / "out"), "--workdir", str(work), "--continue",
                     env={"DSPARK_CACHE": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple"})
    assert run.returncode == 2 and run.stderr.strip() == (
        f"error: {work}: no rebase to continue here (run without --continue first)"), run.stderr
    assert not work.exists() and not (tmp_path / "out").exists() and not (tmp_path / "cache" / "releases").exists()


def test_a_pin_without_release_files_names_repo_in_release_mode(upstream):
    u = upstream
    run = dspark(u, "--onto", "v2.0")
    assert run.returncode == 2
    assert run.stderr.strip() == ("error: eng v1.0 has no release file in compat.yaml; rebase from git with --repo "
                                  "(a repository holding its commit)")


def test_the_scratch_of_a_run_still_writing_is_left_alone(upstream):
    """A scratch directory someone holds the flock of is a live run's, whatever its name says."""
    target = upstream["patches"]
    live = target.parent / ".v1.0.dspark-series-1-abcdefgh"
    (live / "new").mkdir(parents=True)
    with flock.exclusive_nowait(live, directory=True) as (_, ours):
        assert ours
        assert rebase.recover_interrupted(target) == []
        assert (live / "new").is_dir()
    assert rebase.recover_interrupted(target) == [] and not live.exists()  # its run is gone: cleared


def marker_series(u, patches_listed: str) -> tuple[Path, list[str]]:
    """A series whose first patch adds the marker module eng/_dspark.py (as ours do), then
    ours.py and other.py as in the fixture's series."""
    repo = u["repo"]
    git(repo, "checkout", "-q", "-b", "marked", u["base"])
    (repo / "eng").mkdir()
    commit_files(repo, {"eng/_dspark.py": f'"""Marker."""\n\nSERIES = "eng/v1.0"\n{patches_listed}\nLEVEL = 2\n'},
                 "ours: marker")
    commit_files(repo, {"ours.py": "HOOK = True\n"}, "ours: new module")
    commit_files(repo, {"other.py": OTHER.replace("D = 4\n", "D = 4\nOURS = 44\n")}, "ours: other")
    directory = u["tmp"] / "marked"
    names = [Path(n).name for n in git(repo, "format-patch", "-o", str(directory), "--zero-commit", "--no-signature",
                                        "-U2", u["base"]).splitlines()]
    (directory / "series").write_text("".join(n + "\n" for n in names))
    series.write_lock(directory)
    git(repo, "checkout", "-q", "main")
    return directory, names


def test_the_marker_names_the_new_pin_and_only_the_patches_the_refreshed_series_keeps(upstream):
    """Carried as it was, patch 0001's marker named the old pin and listed a patch the new series
    dropped: `dspark doctor` reported every install of the new pin as drifted. The user's hooks in
    the repository (shared by the linked work tree) touch none of the commits dspark makes."""
    u = upstream
    listed = "PATCHES = [\n    \"old-0001.patch\",\n    \"old-0002.patch\",\n]"
    directory, names = marker_series(u, listed)
    hook = u["repo"] / ".git" / "hooks" / "prepare-commit-msg"
    hook.write_text('#!/bin/sh\necho "Hooked-By: $2" >> "$1"\n')
    hook.chmod(0o755)
    onto = new_upstream(u, {"ours.py": "HOOK = True\n"}, "v20.0")  # upstream took the second patch
    out, wd = u["tmp"] / "out20", u["tmp"] / "wd20"
    run = rebase_onto(u, "v20.0", wd, out, "--series", str(directory))
    assert run.returncode == 0, run.stderr
    first, second, third = json.loads(run.stdout)["patches"]
    assert [p["status"] for p in (first, second, third)] == ["clean", "already upstream", "clean"]
    assert first["details"][-1] == "eng/_dspark.py: names eng/v20.0 and the 2 patches of the refreshed series"
    # The work branch is what the series says: the report's commits are its commits, authors kept.
    assert git(wd, "rev-list", "--reverse", f"{onto}..HEAD").splitlines() == [first["commit"], third["commit"]]
    assert git(wd, "log", "--format=%an %ad|%B", "--date=raw", f"{onto}..HEAD").split("\n\n") == [
        git(u["repo"], "log", "-1", "--format=%an %ad|%B", "--date=raw", f"marked{rev}") for rev in ("", "~2")]
    fresh = u["tmp"] / "fresh20"
    git(u["tmp"], "clone", "-q", str(u["repo"]), str(fresh))
    git(fresh, "checkout", "-q", onto)
    for p in series.load_series(out, "dspark"):
        git(fresh, "apply", "--index", str(p.path))
    marker = fresh / "eng" / "_dspark.py"
    assert series.marker_constants(marker) == {"SERIES": "eng/v20.0", "PATCHES": [names[0], names[2]], "LEVEL": 2}
    assert (fresh / "other.py").read_text() == (wd / "other.py").read_text()
    # --continue after it finds the branch it recorded and leaves the marker as it is now.
    again = rebase_onto(u, "v20.0", wd, out, "--series", str(directory), "--continue", "--force")
    assert again.returncode == 0, again.stderr
    assert [p["commit"] for p in json.loads(again.stdout)["patches"]] == [first["commit"], None, third["commit"]]


KILL_IN_MARKER_MOVE = """
import os, signal, sys
from dspark_cli import rebase
real, stage = rebase._move_to_remade, sys.argv[-1]
def move(ws, branch, tip, remade_tip):
    if stage == "moved":  # the branch moved, the work tree and index not yet
        ws.git.run("update-ref", f"refs/heads/{branch}", remade_tip, tip)
    os.kill(os.getpid(), signal.SIGKILL)
rebase._move_to_remade = move
from dspark_cli.cli import main
sys.argv = ["dspark"] + sys.argv[1:-1]
main()
"""


@pytest.mark.parametrize("edited", [False, True], ids=["as killed", "marker edited since"])
@pytest.mark.parametrize("stage", ["journaled", "moved"])
def test_a_continue_killed_while_refreshing_the_marker_is_finished_by_the_next(upstream, stage, edited):
    """Killed between the marker's remade commits and the record naming them, --continue found
    commits matching neither and refused for good; the only way on, --force, threw away the
    human's resolution. The move is journaled: the next --continue finishes it."""
    import subprocess
    import sys

    u = upstream
    directory, names = marker_series(u, "PATCHES = [\n    \"old.patch\",\n]")
    new_upstream(u, {"other.py": OTHER.replace("D = 4\n", "D = 40\n")}, "v23.0")  # patch 3 conflicts
    wd, out = u["tmp"] / "wd23", u["tmp"] / "out23"
    args = ["--onto", "v23.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--out", str(out),
            "--series", str(directory)]
    assert dspark(u, *args).returncode == 4
    (wd / "other.py").write_text(OTHER.replace("D = 4\n", "D = 40\nOURS = 44\n"))
    git(wd, "commit", "-q", "-am", "ours: other")
    env = {**os.environ, "DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache"),
           "GIT_CONFIG_GLOBAL": os.devnull, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = subprocess.run([sys.executable, "-c", KILL_IN_MARKER_MOVE, "rebase", "eng", "--from", "v1.0", *args,
                             "--continue", stage], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    marker = wd / "eng" / "_dspark.py"
    if edited:  # an edit of the user's since: never reset away, refused as any local change
        marker.write_text(marker.read_text() + "EXTRA = 1\n")
        refused = dspark(u, *args, "--continue")
        assert refused.returncode == 2 and "holds changes not committed (eng/_dspark.py)" in refused.stderr, \
            refused.stderr
        assert marker.read_text().endswith("EXTRA = 1\n")
        git(wd, "checkout", "--", "eng/_dspark.py")  # the user drops it: the move is finished after all
    done = dspark(u, *args, "--continue")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["patches"]
    assert [p["status"] for p in report] == ["clean", "clean", "resolved"]
    assert git(wd, "rev-list", "--reverse", "v23.0..HEAD").splitlines() == [p["commit"] for p in report]
    assert git(wd, "status", "--porcelain") == ""
    assert series.marker_constants(wd / "eng" / "_dspark.py")["SERIES"] == "eng/v23.0"
    assert "+OURS = 44" in series.load_series(out, "dspark")[2].path.read_text()  # the resolution kept


def test_a_marker_not_in_our_form_is_left_for_a_human_and_said_so(upstream):
    u = upstream
    directory, _ = marker_series(u, "PATCHES = list_of_patches()")
    new_upstream(u, {"mod.py": "import os\n\n\n" + MOD}, "v21.0")
    out = u["tmp"] / "out21"
    run = dspark(u, "--onto", "v21.0", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / "wd21"),
                 "--out", str(out), "--series", str(directory))
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["patches"][0]["details"][-1] == (
        'eng/_dspark.py: left as it was (not in the SERIES/PATCHES form, or a later patch changes it): '
        'set SERIES = "eng/v21.0" and PATCHES by hand')
    assert '+SERIES = "eng/v1.0"' in (out / sorted(p.name for p in out.glob("0001-*"))[0]).read_text()


def test_marker_values_are_written_as_python_string_literals():
    """A patch name may hold a quote or a backslash (a series names any file without spaces)."""
    text = 'X = 1\nSERIES = "eng/v1"\nPATCHES = [\n    "a.patch",\n]\n'
    names = ['0001-say-"hi".patch', "0002-back\\slash.patch"]
    marked = series.marker_with(text, "eng/v2", names)
    assert ast.literal_eval(marked.split("PATCHES = ", 1)[1]) == names and marked.startswith("X = 1\n")
    assert series.marker_with(marked, "eng/v3", ["b.patch"]) == 'X = 1\nSERIES = "eng/v3"\nPATCHES = [\n    "b.patch",\n]\n'


def test_the_files_a_patch_expects_are_the_old_trees_names():
    """A rename's source must exist (its destination is new); a created file need not."""
    text = ("diff --git a/old name.py b/new name.py\nsimilarity index 90%\nrename from old name.py\nrename to new name.py\n"
            "diff --git a/kept.py b/kept.py\nindex 1..2 100644\n--- a/kept.py\n+++ b/kept.py\n"
            "diff --git a/made.py b/made.py\nnew file mode 100644\nindex 0000000..1\n")
    assert rebase.changed_files(text) == ["old name.py", "kept.py"]


STOP_BEFORE_MARKING = """
import os, signal, sys
from dspark_cli import rebase
how = sys.argv[-1]
def stop(ws):  # the work tree is added, not yet marked as ours
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise KeyboardInterrupt
rebase.mark_made_by_rebase = stop
from dspark_cli.cli import main
sys.argv = ["dspark"] + sys.argv[1:-1]
main()
"""


@pytest.mark.parametrize("how", ["kill", "ctrl-c"])
def test_a_run_stopped_before_its_work_tree_was_marked_leaves_nothing_the_next_cannot_use(upstream, how):
    """Stopped right after `git worktree add`, the work tree had no marker: every later run, --force
    too, refused it as "a checkout dspark rebase did not make" and it stayed registered in the
    user's repository. A Ctrl-C now removes it at once; after a kill the next run does."""
    import subprocess
    import sys

    u = upstream
    new_upstream(u, {"new.py": "X = 1\n"}, "v30.0")
    wd, out = u["tmp"] / "wd30", u["tmp"] / "out30"
    args = ["rebase", "eng", "--from", "v1.0", "--onto", "v30.0", "--repo", str(u["repo"]), "--workdir", str(wd),
            "--out", str(out)]
    env = {**os.environ, "DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache"),
           "GIT_CONFIG_GLOBAL": os.devnull, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    stopped = subprocess.run([sys.executable, "-c", STOP_BEFORE_MARKING, *args, how], env=env, capture_output=True,
                             text=True)
    assert stopped.returncode == (-9 if how == "kill" else 130), stopped.stderr
    if how == "ctrl-c":
        assert not wd.exists() and len(worktrees(u["repo"])) == 1
    done = rebase_onto(u, "v30.0", wd, out)
    assert done.returncode == 0, done.stderr
    assert len(worktrees(u["repo"])) == 2 and len(series.load_series(out, "dspark")) == 3
    assert not list((u["repo"] / ".git" / "dspark" / "rebase-adding").iterdir())


def test_a_run_killed_inside_git_worktree_add_leaves_nothing_the_next_cannot_use(upstream):
    """Killed inside `git worktree add`, the work tree's registration stays locked ("initializing"):
    one --force and prune leave a locked one, so every later run failed (exit 3, "a missing but
    locked worktree")."""
    from dspark_cli.workspace import Workspace

    u = upstream
    onto = new_upstream(u, {"new.py": "X = 1\n"}, "v31.0")
    wd, out = u["tmp"] / "wd31", u["tmp"] / "out31"
    record = rebase._adding_record(Workspace(u["repo"]), wd)  # as the killed run wrote it
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_bytes(os.fsencode(wd))
    git(u["repo"], "worktree", "add", "-q", "--lock", "--detach", str(wd), onto)
    shutil.rmtree(wd)  # its checkout had not begun
    done = rebase_onto(u, "v31.0", wd, out)
    assert done.returncode == 0, done.stderr
    assert len(worktrees(u["repo"])) == 2 and len(series.load_series(out, "dspark")) == 3
    assert not record.exists()


@pytest.mark.parametrize("lock", ["index.lock", "HEAD.lock", "branch"])
def test_a_lock_a_killed_git_left_in_the_work_tree_does_not_fail_the_next_runs(upstream, tmp_path, lock):
    """A git killed with a rebase left its lock file: every later run, --force too, failed on it
    (exit 3, "Unable to create ...lock: File exists"). Only the killed run's: a lock made before that
    run started is another git's (see the test after this one)."""
    from dspark_cli.workspace import Workspace

    u = upstream
    new_upstream(u, {"new.py": "X = 1\n"}, "v32.0")
    wd, out = u["tmp"] / "wd32", u["tmp"] / "out32"
    args = ("--onto", "v32.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--out", str(out))
    assert dspark(u, *args).returncode == 0
    git_dir = Workspace(wd).git_dir
    path = u["repo"] / ".git" / "refs" / "heads" / "dspark" / "rebase-v32.0.lock" if lock == "branch" else git_dir / lock
    assert path.parent.is_dir(), path
    env, waiting = stand_in_git(u, tmp_path, '*"apply --check"*) touch {waiting}; sleep 30; exit 1;;')
    code, _, stderr = signal_dspark_when(waiting, signal.SIGKILL, "rebase", "eng", "--from", "v1.0", *args, "--force",
                                         env=env)
    assert code == -signal.SIGKILL, stderr
    path.write_text("")  # as the killed run's git left it
    again = dspark(u, *args, "--force")
    assert again.returncode == 0, again.stderr
    assert not path.exists()


def test_a_rebase_is_refused_while_another_dspark_run_holds_the_repository(upstream):
    """Without the repository's dspark lock two runs into one work tree raced in git ("index.lock:
    File exists", exit 3) and an apply beside it could interleave its commits."""
    from dspark_cli import oplock
    from dspark_cli.workspace import Workspace

    u = upstream
    new_upstream(u, {"new.py": "X = 1\n"}, "v33.0")
    wd, out = u["tmp"] / "wd33", u["tmp"] / "out33"
    with oplock.exclusive(Workspace(u["repo"]).git_dir, u["repo"]):
        refused = rebase_onto(u, "v33.0", wd, out)
    assert refused.returncode == 2, refused.stderr
    assert f"another dspark apply, revert or rebase (pid {os.getpid()})" in refused.stderr
    assert not wd.exists() and len(worktrees(u["repo"])) == 1
    assert rebase_onto(u, "v33.0", wd, out).returncode == 0


def test_a_resolution_ported_to_another_file_is_byte_compiled(upstream):
    """The byte-compile took the files from the patch's own text: a resolution that ported the
    change of a patch whose file upstream deleted into another file was never compiled, and a
    series that breaks the tree was written, exit 0."""
    u = upstream
    upstream_drops_other_py(u, "v31.0")
    wd, out = u["tmp"] / "wd31", u["tmp"] / "out31"
    assert dspark(u, "--onto", "v31.0", "--repo", str(u["repo"]), "--workdir", str(wd)).returncode == 4
    (wd / "consts.py").write_text("OURS = 44\ndef broken(:\n")
    git(wd, "add", "consts.py")
    git(wd, "commit", "-q", "-m", "ours: other, ported")
    resumed = rebase_onto(u, "v31.0", wd, out, "--continue")
    assert resumed.returncode == 1, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["patches"][2]["status"] == "resolved" and report["patches"][2]["files"] == ["consts.py"]
    assert report["compile_errors"] and report["compile_errors"][0].startswith("consts.py") and not out.exists()
    (wd / "consts.py").write_text("OURS = 44\n")
    git(wd, "commit", "-q", "--amend", "-a", "--no-edit")
    assert rebase_onto(u, "v31.0", wd, out, "--continue").returncode == 0
    assert "consts.py" in series.load_series(out, "dspark")[2].path.read_text()


def test_a_broken_resolution_under_later_patches_is_amended_after_a_reset_to_it(upstream):
    """0001's resolution broke mod.py and 0002, 0003 applied on top of it: amending it rewrote 0003's
    commit and every way to fix it was refused ("found N commits ... expected ..."), but --force,
    which drops the resolution. Now a reset to the resolution, an amend and --continue apply the
    later patches again, as the failure says."""
    u = upstream
    wd, out = u["tmp"] / "wd45", u["tmp"] / "out45"
    resolution = conflict_then_resolve(u, "v45.0", wd, broken=True)
    broken = rebase_onto(u, "v45.0", wd, out, "--continue")
    assert broken.returncode == 1, broken.stderr
    assert [p["status"] for p in json.loads(broken.stdout)["patches"]] == ["resolved", "clean", "clean"]
    assert (f"fix your resolution of 0001-ours-mark-f3.patch: `git -C {wd} reset --hard {resolution[:12]}`, amend "
            "it, then run again with --continue, which applies the patches after it again") in broken.stderr
    git(wd, "reset", "-q", "--hard", resolution)
    (wd / "mod.py").write_text(MOD.replace("return x + 3", "return x + 300  # ours"))
    git(wd, "commit", "-q", "--amend", "-a", "--no-edit")
    done = rebase_onto(u, "v45.0", wd, out, "--continue")
    assert done.returncode == 0, done.stderr
    assert [p["status"] for p in json.loads(done.stdout)["patches"]] == ["resolved", "clean", "clean"]
    refreshed = [p.path.read_text() for p in series.load_series(out, "dspark")]
    assert "+    return x + 300  # ours" in refreshed[0] and "+OURS = 44" in refreshed[2]


def test_conflict_markers_a_resolution_leaves_in_a_file_other_than_python_fail_the_check(upstream):
    """Only Python files were checked (by byte-compiling): a resolution that committed a kernel or
    config file with its markers in it was written into the refreshed series, exit 0."""
    u = upstream
    wd, out = u["tmp"] / "wd47", u["tmp"] / "out47"
    resolution = conflict_then_resolve(u, "v47.0", wd)
    (wd / "kernel.cu").write_text("int a;\n<<<<<<< ours\nint b;\n=======\nint c;\n>>>>>>> theirs\n")
    (wd / "README.rst").write_text("\nTitle\n=======\n")  # a heading's underline: no marker
    git(wd, "add", "kernel.cu", "README.rst")
    git(wd, "commit", "-q", "--amend", "--no-edit")
    args = ("--onto", "v47.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--out", str(out), "--continue")
    failed = dspark(u, *args)
    assert failed.returncode == 1, failed.stderr
    assert json.loads(failed.stdout)["leftover_markers"] == [
        f"kernel.cu: leftover conflict marker at line {n}" for n in (2, 6)]
    assert "conflict markers left: kernel.cu: leftover conflict marker at line 2" in failed.stderr
    assert "fix your resolution of 0001-ours-mark-f3.patch: `git -C" in failed.stderr and not out.exists()
    git(wd, "reset", "-q", "--hard", git(wd, "rev-parse", "HEAD~2"))  # back to the resolution, fixed:
    (wd / "kernel.cu").write_text("int a;\nint b;\n")
    git(wd, "add", "kernel.cu")
    git(wd, "commit", "-q", "--amend", "--no-edit")
    assert git(wd, "rev-parse", "HEAD") != resolution
    done = dspark(u, *args)
    assert done.returncode == 0, done.stderr
    assert "+int b;" in (out / "0001-ours-mark-f3.patch").read_text()


def test_conflict_markers_a_resolution_leaves_in_a_python_string_fail_the_check(upstream):
    """Python files were left to the byte-compile check, but markers inside a docstring or another
    multi-line string compile: they went into the refreshed series, exit 0."""
    u = upstream
    wd, out = u["tmp"] / "wd48", u["tmp"] / "out48"
    conflict_then_resolve(u, "v48.0", wd)
    (wd / "doc.py").write_text('"""Doc.\n<<<<<<< ours\nmine\n=======\ntheirs\n>>>>>>> theirs\n"""\n')
    git(wd, "add", "doc.py")
    git(wd, "commit", "-q", "--amend", "--no-edit")
    failed = rebase_onto(u, "v48.0", wd, out, "--continue")
    assert failed.returncode == 1, failed.stderr
    report = json.loads(failed.stdout)
    assert "doc.py" in report["compiled"] and not report["compile_errors"] and not out.exists()
    assert report["leftover_markers"] == [f"doc.py: leftover conflict marker at line {n}" for n in (2, 6)]


def test_a_resolution_amended_to_hold_later_patches_is_refused_not_folded_in(upstream):
    """`git reset --soft` to the broken resolution and `commit --amend -a` folded 0002 and 0003 into it:
    --continue applied them again as `already upstream` and wrote a series of 0001 alone, exit 0."""
    u = upstream
    wd, out = u["tmp"] / "wd48", u["tmp"] / "out48"
    resolution = conflict_then_resolve(u, "v48.0", wd, broken=True)
    args = ("--onto", "v48.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--out", str(out), "--continue")
    assert dspark(u, *args).returncode == 1
    git(wd, "reset", "-q", "--soft", resolution)
    (wd / "mod.py").write_text(MOD.replace("return x + 3", "return x + 300  # ours"))
    git(wd, "commit", "-q", "--amend", "-a", "--no-edit")
    amended = git(wd, "rev-parse", "HEAD")
    refused = dspark(u, *args)
    assert refused.returncode == 2, refused.stderr
    assert ("0002-ours-new-module.patch's change is on the work branch but not in the new tree: your resolution "
            "holds it") in refused.stderr
    assert git(wd, "rev-parse", "HEAD") == amended and not git(wd, "status", "--porcelain") and not out.exists()


def test_a_later_conflict_amended_into_an_earlier_resolution_is_refused(upstream):
    """While 0003's conflict waited, its resolution committed with --amend into 0002's: --continue
    took the branch as reset to 0002's resolution, applied 0003 again as `already upstream` and wrote
    0002's patch with 0003's change in it, exit 0."""
    u = upstream
    wd = u["tmp"] / "wd49"
    new_upstream(u, {"ours.py": "HOOK = False\n", "other.py": OTHER.replace("D = 4", "D = 40")}, "v49.0")
    args = ("--onto", "v49.0", "--repo", str(u["repo"]), "--workdir", str(wd))
    assert dspark(u, *args).returncode == 4  # 0002: ours.py
    (wd / "ours.py").write_text("HOOK = True\n")
    git(wd, "commit", "-q", "-am", "ours: new module")
    assert dspark(u, *args, "--continue").returncode == 4  # 0003: other.py
    (wd / "other.py").write_text(OTHER.replace("D = 4\n", "D = 40\nOURS = 44\n"))
    git(wd, "commit", "-q", "--amend", "-a", "--no-edit")  # the slip
    refused = dspark(u, *args, "--continue")
    assert refused.returncode == 2, refused.stderr
    assert "found 2 commits on the new tree" in refused.stderr


def test_a_conflict_is_still_reported_when_stdout_cannot_take_the_json_report(upstream):
    """Was exit 3 with `error: stdout: No space left on device` alone: the conflict left on the work
    branch was not mentioned."""
    import subprocess
    import sys

    from tests.run_cli import ROOT

    u = upstream
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300")}, "v50.0")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DSPARK_COMPAT": str(u["compat"]),
           "DSPARK_CACHE": str(u["tmp"] / "cache"), "GIT_CONFIG_GLOBAL": os.devnull}
    for n, as_json in enumerate((["--json"], [])):  # the text report too (was exit 3, `[Errno 28] ...`)
        with open("/dev/full", "w") as full:
            run = subprocess.run([sys.executable, "-m", "dspark_cli", "rebase", "eng", "--from", "v1.0", "--onto",
                                  "v50.0", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / f"wd50-{n}"),
                                  "--pin", f"v50.0-{n}", *as_json], env=env, stdout=full, stderr=subprocess.PIPE,
                                 text=True)
        assert run.returncode == 4, run.stderr
        [line] = run.stderr.strip().splitlines()
        assert line.startswith("error: 0001-ours-mark-f3.patch conflicts (mod.py: conflict markers at lines ")
        assert line.endswith("(and stdout could not take the report: No space left on device)")


def test_a_resolution_that_brings_in_a_later_patch_is_refused_not_called_upstream(upstream):
    """0001's resolution also committed ours.py, 0002's new module: --continue called 0002 `already
    upstream` ("its changes are already in the new tree", which has no ours.py) and dropped it."""
    u = upstream
    wd = u["tmp"] / "wd51"
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300")}, "v51.0")
    args = ("--onto", "v51.0", "--repo", str(u["repo"]), "--workdir", str(wd))
    assert dspark(u, *args).returncode == 4
    (wd / "mod.py").write_text(MOD.replace("return x + 3", "return x + 300  # ours"))
    (wd / "ours.py").write_text("HOOK = True\n")
    git(wd, "add", "-A")
    git(wd, "commit", "-q", "-m", "ours: mark f3")
    resolution = git(wd, "rev-parse", "HEAD")
    refused = dspark(u, *args, "--continue")
    assert refused.returncode == 2, refused.stderr
    assert "0002-ours-new-module.patch's change is on the work branch but not in the new tree" in refused.stderr
    assert git(wd, "rev-parse", "HEAD") == resolution and not git(wd, "status", "--porcelain")


def test_a_patch_upstream_took_is_still_already_upstream_after_a_resolution(upstream):
    """The check above must not refuse what upstream really has: v52.0 has 0002's ours.py itself."""
    u = upstream
    wd, out = u["tmp"] / "wd52", u["tmp"] / "out52"
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300"), "ours.py": "HOOK = True\n"}, "v52.0")
    args = ("--onto", "v52.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--out", str(out))
    assert dspark(u, *args).returncode == 4
    (wd / "mod.py").write_text(MOD.replace("return x + 3", "return x + 300  # ours"))
    git(wd, "commit", "-q", "-am", "ours: mark f3")
    done = dspark(u, *args, "--continue")
    assert done.returncode == 0, done.stderr
    assert [p["status"] for p in json.loads(done.stdout)["patches"]] == ["resolved", "already upstream", "clean"]


def test_a_last_broken_resolution_is_amended_in_place(upstream):
    u = upstream
    upstream_drops_other_py(u, "v46.0")
    wd = u["tmp"] / "wd46"
    assert dspark(u, "--onto", "v46.0", "--repo", str(u["repo"]), "--workdir", str(wd)).returncode == 4
    (wd / "consts.py").write_text("def broken(:\n")
    git(wd, "add", "consts.py")
    git(wd, "commit", "-q", "-m", "ours: other, ported")
    broken = dspark(u, "--onto", "v46.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--continue")
    assert broken.returncode == 1
    assert (f"fix your resolution of 0003-ours-other.patch (`git -C {wd} commit --amend`), then run again with "
            "--continue") in broken.stderr


@pytest.mark.parametrize("left", ["edits", "a resolution not yet continued"])
def test_another_rebase_in_the_same_workdir_keeps_what_a_pending_one_left(upstream, left):
    """Was reset and cleaned away without --force: a resolution being made (its edits), or the
    committed resolution's record, so the first rebase could not --continue."""
    u = upstream
    wd = u["tmp"] / "wd47"
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300")}, "v47.0")
    assert dspark(u, "--onto", "v47.0", "--repo", str(u["repo"]), "--workdir", str(wd)).returncode == 4
    (wd / "mod.py").write_text(MOD.replace("return x + 3", "return x + 300  # ours"))
    if left == "a resolution not yet continued":
        git(wd, "commit", "-q", "-am", "ours: mark f3")
    other = dspark(u, "--onto", "v47.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--pin", "v47.0-b")
    assert other.returncode == 2
    assert (f"{wd}: holds changes not committed" if left == "edits" else
            f"{wd}: holds the unfinished rebase of dspark/rebase-v47.0 (resolve it and run it with --continue)") \
        in other.stderr
    if left == "edits":
        git(wd, "commit", "-q", "-am", "ours: mark f3")
    done = dspark(u, "--onto", "v47.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--out",
                  str(u["tmp"] / "out47"), "--continue")
    assert done.returncode == 0, done.stderr
    # finished: the work tree is free for another run, no --force needed
    again = dspark(u, "--onto", "v47.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--pin", "v47.0-b",
                   "--out", str(u["tmp"] / "out47b"))
    assert again.returncode == 4, again.stderr  # its own conflict, on its own branch
    assert json.loads(again.stdout)["branch"] == "dspark/rebase-v47.0-b"


def test_an_out_whose_directory_cannot_be_written_is_refused_before_any_work(upstream):
    """--out is replaced by a rename in its parent: an --out writable in a parent that is not
    passed the check, and the run failed after the whole rebase, leaving its branch and work tree."""
    import subprocess

    u = upstream
    new_upstream(u, {"new.py": "X = 1\n"}, "v32.0")
    parent = u["tmp"] / "frozen"
    out = parent / "out"
    shutil.copytree(u["patches"], out)
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        run = dspark(u, "--onto", "v32.0", "--repo", str(u["repo"]), "--workdir", str(u["tmp"] / "wd32"), "--out",
                     str(out), "--force")
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)
    assert run.returncode == 3 and f"--out {out}: cannot replace it: cannot make anything in {parent}" in run.stderr
    assert len(worktrees(u["repo"])) == 1 and git(u["repo"], "branch", "--list", "dspark/*") == ""
    assert snapshot(out) == snapshot(u["patches"])


def test_the_context_read_from_a_patch_counts_context_after_a_hunk_at_the_top_of_a_file():
    """A -U1 patch whose only hunk inserts at line 1 has no context before it: it read as no
    context at all, so the refreshed patch was written with 3 lines."""
    top = "diff --git a/m.py b/m.py\n--- a/m.py\n+++ b/m.py\n@@ -1 +1,2 @@\n+import os\n A = 1\n-- \n2.39.5\n"
    assert rebase.context_lines(top) == 1
    middle = ("@@ -3,5 +3,6 @@\n a\n b\n+c\n d\n e\n@@ -20,4 +21,3 @@\n x\n y\n-z\n w\n\\ No newline at end of file\n")
    assert rebase.context_lines(middle) == 2
    assert rebase.context_lines("@@ -0,0 +1,2 @@\n+a\n+b\n") == 3  # a new file tells nothing: the default


def test_release_mode_removes_what_killed_runs_left_beside_its_work_tree(tmp_path, monkeypatch):
    """A kill while a release tree was extracted left `.dspark-tree-*` (140 MB for vLLM) beside the
    work tree for good; a repository is now made and marked beside it and moved in whole, so a
    stop in between leaves no unmarked repository there."""
    work = tmp_path / "rebase" / "vllm-a-b"
    work.parent.mkdir()
    dead = [work.parent / f".{work.name}.dspark-{kind}-x1" for kind in ("tree", "init")]
    for d in dead:
        (d / "tree").mkdir(parents=True)
    with pytest.raises(rebase.UsageError, match="no rebase to continue here"):
        rebase.release_commits(work, None, None, resume=True)
    assert not any(d.exists() for d in dead)

    def stop(ws):
        raise KeyboardInterrupt
    monkeypatch.setattr(rebase, "mark_made_by_rebase", stop)
    with pytest.raises(KeyboardInterrupt):
        rebase.release_commits(work, None, None)
    assert list(work.parent.iterdir()) == []


def test_a_rebase_stopped_by_ctrl_c_says_how_to_start_over(upstream, tmp_path):
    u = upstream
    new_upstream(u, {"new.py": "X = 1\n"}, "v18.0")
    env, waiting = stand_in_git(u, tmp_path, '*"apply --check"*) touch {waiting}; sleep 60; exit;;')
    wd = u["tmp"] / "wd18"
    code, _, stderr = signal_dspark_when(
        waiting, signal.SIGINT, "rebase", "eng", "--from", "v1.0", "--onto", "v18.0", "--repo", str(u["repo"]),
        "--workdir", str(wd), env=env)
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == ("interrupted: what it made is left where it stopped: run it again "
                                               "with --force to start over")
    again = dspark(u, "--onto", "v18.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--force")
    assert again.returncode == 0, again.stderr


def test_a_swap_that_fails_after_the_old_series_moved_aside_puts_it_back(tmp_path, monkeypatch):
    """write_series moves --out aside, then renames the new series in: when that second rename
    fails (or Ctrl-C lands between them) the old series must be back at --out, not left in the
    scratch directory that is removed right after."""
    out, new, old = tmp_path / "out", tmp_path / "scratch" / "new", tmp_path / "scratch" / "old"
    out.mkdir()
    (out / "series").write_text("0001-old.patch\n")
    new.mkdir(parents=True)
    (new / "series").write_text("0001-new.patch\n")
    real = os.replace

    def failing_replace(src, dst):
        if Path(src) == new:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(rebase.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        rebase._swap_in(new, out, old)
    assert (out / "series").read_text() == "0001-old.patch\n" and not old.exists()


def test_a_continue_stopped_by_ctrl_c_after_some_patches_is_continued_by_the_next(upstream, tmp_path):
    """A --continue interrupted after it committed 0002 left that commit on the branch while the
    record still said 0002 `not run`: the next --continue (what the interrupt line says to run)
    was refused, 'found 2 commits ... expected 1', and --force would drop the resolution."""
    u = upstream
    wd, out = u["tmp"] / "wd-int", u["tmp"] / "out-int"
    resolution = conflict_then_resolve(u, "v30.0", wd)
    third = sorted(p.name for p in u["patches"].glob("*.patch"))[2]
    env, waiting = stand_in_git(u, tmp_path, f'*"apply --check"*{third}*) touch {{waiting}}; sleep 60; exit 1;;')
    args = ["rebase", "eng", "--from", "v1.0", "--onto", "v30.0", "--repo", str(u["repo"]), "--workdir", str(wd),
            "--out", str(out), "--continue"]
    code, _, stderr = signal_dspark_when(waiting, signal.SIGINT, *args, env=env)
    assert code == 130 and "run it again with --continue" in stderr, stderr
    assert len(git(wd, "rev-list", "v30.0..HEAD").splitlines()) == 2  # the resolution and 0002's commit
    again = rebase_onto(u, "v30.0", wd, out, "--continue")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert [p["status"] for p in report["patches"]] == ["resolved", "clean", "clean"]
    assert report["patches"][0]["commit"] == resolution


def test_the_refreshed_series_has_git_apply_prefixes_whatever_the_users_diff_config(upstream, tmp_path):
    """With diff.noprefix (or format.signOff) in the user's git config, format-patch wrote
    `diff --git mod.py mod.py` (and a Signed-off-by): exit 0, and no patch of the series applied."""
    u = upstream
    onto = new_upstream(u, {"mod.py": "import os\n\n\n" + MOD}, "v31.0")
    config = tmp_path / "user.gitconfig"
    config.write_text("[diff]\n\tnoprefix = true\n[format]\n\tsignOff = true\n[user]\n\tname = U\n\temail = u@x\n")
    out = u["tmp"] / "out31"
    run = run_dspark("rebase", "eng", "--from", "v1.0", "--onto", "v31.0", "--repo", str(u["repo"]),
                     "--workdir", str(u["tmp"] / "wd31"), "--out", str(out), "--json",
                     env={"DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache"),
                          "GIT_CONFIG_GLOBAL": str(config)})
    assert run.returncode == 0, run.stderr
    fresh = u["tmp"] / "fresh31"
    git(u["tmp"], "clone", "-q", str(u["repo"]), str(fresh))
    git(fresh, "checkout", "-q", onto)
    for p in series.load_series(out, "dspark"):
        text = p.path.read_text()
        assert "\ndiff --git a/" in text and "Signed-off-by" not in text
        git(fresh, "apply", "--index", str(p.path))


def test_continue_refuses_a_resolution_amended_into_the_new_trees_own_commit(upstream):
    """`git commit --amend` of the resolution of the first patch rewrote upstream's commit: the one
    commit on the new tree's parent matched, exit 0, and the refreshed 0001 carried upstream's
    whole change (it no longer applies to the new tree)."""
    u = upstream
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300")}, "v32.0")
    wd, out = u["tmp"] / "wd32", u["tmp"] / "out32"
    assert dspark(u, "--onto", "v32.0", "--repo", str(u["repo"]), "--workdir", str(wd)).returncode == 4
    (wd / "mod.py").write_text(MOD.replace("return x + 3", "return x + 300  # ours"))
    git(wd, "commit", "-q", "-a", "--amend", "--no-edit")
    run = rebase_onto(u, "v32.0", wd, out, "--continue")
    assert run.returncode == 2, run.stderr
    assert "no longer starts from the new tree" in run.stderr and not out.exists()


def test_continue_with_another_series_of_the_same_patch_names_is_refused(upstream):
    """The record matched the series by patch names only: --continue with another --from pin's
    (or --series) series of the same names took the first run's commits as its own patches' and
    wrote a series mixing the two, exit 0. Patches the last run did not get to are still taken."""
    u = upstream
    wd, out = u["tmp"] / "wd33", u["tmp"] / "out33"
    conflict_then_resolve(u, "v33.0", wd)
    other = u["tmp"] / "other" / "v1.0"
    shutil.copytree(u["patches"], other)
    first, _, third = sorted(other.glob("*.patch"))
    first.write_text(first.read_text().replace("# ours", "# theirs"))  # the patch the resolution resolves
    series.write_lock(other)
    args = ["--onto", "v33.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--out", str(out), "--continue"]
    run = dspark(u, *args, "--series", str(other))
    assert run.returncode == 2 and "the series is not the one the last run" in run.stderr, run.stderr
    assert not out.exists()

    shutil.copy(u["patches"] / first.name, first)  # only a patch not run yet differs: that one is taken
    third.write_text(third.read_text().replace("+OURS = 44", "+OURS = 45"))
    series.write_lock(other)
    done = dspark(u, *args, "--series", str(other))
    assert done.returncode == 0, done.stderr
    assert "+OURS = 45" in (out / third.name).read_text()


def test_another_run_is_refused_while_a_rebase_writes_its_series(upstream, tmp_path):
    """The repository's lock was released when the patches were carried: the marker refresh, the
    byte-compile check and the series write ran without it, and a second rebase --force into the
    same work tree ran to exit 0 meanwhile (free to reset the tree the first was writing from)."""
    from dspark_cli import oplock
    from dspark_cli.errors import UsageError
    from dspark_cli.workspace import Workspace

    u = upstream
    new_upstream(u, {"new.py": "X = 1\n"}, "v34.0")
    wd, out = u["tmp"] / "wd34", u["tmp"] / "out34"
    bin_dir, waiting, go = tmp_path / "bin", tmp_path / "waiting", tmp_path / "go"
    bin_dir.mkdir()
    (bin_dir / "git").write_text(f"""#!/bin/sh
case "$*" in *format-patch*) touch {waiting}; while [ ! -e {go} ]; do sleep 0.05; done;; esac
exec {shutil.which("git")} "$@"
""")
    (bin_dir / "git").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DSPARK_COMPAT": str(u["compat"]),
           "DSPARK_CACHE": str(u["tmp"] / "cache"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "dspark_cli", "rebase", "eng", "--from", "v1.0", "--onto", "v34.0",
                             "--repo", str(u["repo"]), "--workdir", str(wd), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not waiting.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting.exists(), proc.communicate()
        with pytest.raises(UsageError, match=f"another dspark apply, revert or rebase \\(pid {proc.pid}\\)"):
            with oplock.exclusive(Workspace(u["repo"]).git_dir, wd):
                pass
    finally:
        go.touch()
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert (out / "series").exists()


def test_non_ascii_file_names_are_reported_as_the_files_are_named(tmp_path):
    """git C-quotes `módulo.py` in a patch and in its name listings: the report names the file
    itself, finds its conflict markers and names the hunk a 3-way merge took."""
    repo = tmp_path / "upstream"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    base = commit_files(repo, {"módulo.py": MOD, "ótro.py": OTHER}, "base")
    git(repo, "checkout", "-q", "-b", "work")
    commit_files(repo, {"módulo.py": MOD.replace("return x + 3", "return x + 3  # ours")}, "ours: mark f3")
    commit_files(repo, {"ótro.py": OTHER.replace("D = 4\n", "D = 4\nOURS = 44\n")}, "ours: other")
    patches = tmp_path / "patches" / "eng" / "v1.0"
    names = git(repo, "format-patch", "-o", str(patches), "--zero-commit", "--no-signature", "-U2", base).splitlines()
    assert '"a/m\\303\\263dulo.py"' in Path(names[0]).read_text()
    (patches / "series").write_text("".join(Path(n).name + "\n" for n in names))
    series.write_lock(patches)
    git(repo, "checkout", "-q", "main")
    compat = tmp_path / "compat.yaml"
    compat.write_text(f"schema: 1\nengines:\n  eng:\n    repository: {repo}\n    module: eng\n"
                      "    distributions: [eng]\n    default_pin: v1.0\n    pins:\n" + pin_entry("v1.0", base))
    u = {"repo": repo, "compat": compat, "tmp": tmp_path}
    new_upstream(u, {"módulo.py": MOD.replace("return x + 3", "return x + 300"),
                     "ótro.py": "Z = 0\n" + OTHER.replace("C = 3", "C = 33")}, "v2.0")
    run = dspark(u, "--onto", "v2.0", "--repo", str(repo), "--workdir", str(tmp_path / "wd"))
    assert run.returncode == 4, run.stderr
    first = json.loads(run.stdout)["patches"][0]
    assert first["files"] == ["módulo.py"] and first["details"][0].startswith("módulo.py: conflict markers at lines ")
    (tmp_path / "wd" / "módulo.py").write_text(MOD.replace("return x + 3", "return x + 300  # ours"))
    git(tmp_path / "wd", "commit", "-q", "-am", "ours: mark f3")
    done = dspark(u, "--onto", "v2.0", "--repo", str(repo), "--workdir", str(tmp_path / "wd"), "--continue")
    assert done.returncode == 0, done.stderr
    second = json.loads(done.stdout)["patches"][1]
    assert second["status"] == "3-way" and second["files"] == ["ótro.py"]
    assert second["details"] == ["ótro.py: hunk #1 (@@ -3,4 +3,5 @@) merged 3-way"]
    new_upstream(u, {"módulo.py": MOD, "ótro.py": "Y = 0\n" + OTHER}, "v3.0")  # a clean carry, at an offset
    moved = dspark(u, "--onto", "v3.0", "--repo", str(repo), "--workdir", str(tmp_path / "wd3"))
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["patches"][1]["details"] == ["ótro.py: hunk #1 at line 4 (offset 1)"]


def test_a_lock_of_a_git_running_in_the_work_tree_is_refused_and_left_alone(upstream, tmp_path):
    """A `git commit -a` waiting on its editor in the work tree (the human committing a resolution)
    holds index.lock: `dspark rebase --continue` run meanwhile deleted it (it took every lock there
    for a killed git's), so two gits wrote the index at once. A lock no killed run of ours left is
    another git's: refused as apply refuses it (exit 2), and left in place."""
    u = upstream
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300")}, "v34.0")
    wd = u["tmp"] / "wd34"
    args = ("--onto", "v34.0", "--repo", str(u["repo"]), "--workdir", str(wd))
    assert dspark(u, *args).returncode == 4
    (wd / "mod.py").write_text(MOD.replace("return x + 3", "return x + 300  # ours"))
    editing, done = tmp_path / "editing", tmp_path / "done"
    editor = tmp_path / "editor"
    editor.write_text(f"#!/bin/sh\necho 'ours: mark f3' > \"$1\"\ntouch {editing}\n"
                      f"while [ ! -e {done} ]; do sleep 0.05; done\n")
    editor.chmod(0o755)
    env = {**os.environ, "GIT_EDITOR": str(editor), "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_NAME": "T",
           "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@x"}
    committing = subprocess.Popen(["git", "commit", "-q", "-a"], cwd=wd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not editing.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        index_lock = Path(git(wd, "rev-parse", "--path-format=absolute", "--git-path", "index.lock"))
        assert index_lock.exists()
        refused = dspark(u, *args, "--continue")
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines()[-1] == (
            f"error: {index_lock} exists: another git process is running in {wd}, or one was killed and left it; "
            "let it finish, or remove the file if no git process is running, and run again")
        assert index_lock.exists()
    finally:
        done.touch()
        _, stderr = committing.communicate(timeout=60)
    assert committing.returncode == 0, stderr
    assert dspark(u, *args, "--continue").returncode == 0


def test_a_run_that_fails_inside_the_lock_leaves_no_mark_that_takes_a_later_gits_lock(upstream):
    """A run that stops with an error of its own (here --continue with the conflict unresolved) is no
    killed run: its mark goes with it, so a lock a git makes after it is still another git's (refused
    and left alone), not taken for a lock that run's git left."""
    u = upstream
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300")}, "v35.0")
    wd = u["tmp"] / "wd35"
    args = ("--onto", "v35.0", "--repo", str(u["repo"]), "--workdir", str(wd))
    assert dspark(u, *args).returncode == 4
    failed = dspark(u, *args, "--continue")  # nothing resolved
    assert failed.returncode not in (0, 3, 4), failed.stderr
    index_lock = Path(git(wd, "rev-parse", "--path-format=absolute", "--git-path", "index.lock"))
    index_lock.write_text("")  # a git started since
    refused = dspark(u, *args, "--continue")
    assert refused.returncode == 2, refused.stderr
    assert f"{index_lock} exists: another git process is running" in refused.stderr
    assert index_lock.exists()


def test_markers_in_a_python_file_that_fails_to_compile_are_reported_once_as_its_compile_error(upstream):
    """A Python file whose markers break its syntax is reported by the byte-compile; the marker check
    names only the files that compiled (a .py in a string, a .cu), not that one a second time."""
    u = upstream
    wd, out = u["tmp"] / "wd48", u["tmp"] / "out48"
    conflict_then_resolve(u, "v48.0", wd)
    (wd / "kernel.cu").write_text("int a;\n<<<<<<< ours\nint b;\n=======\nint c;\n>>>>>>> theirs\n")
    (wd / "broken.py").write_text("A = 1\n<<<<<<< ours\nB = 2\n=======\nB = 3\n>>>>>>> theirs\n")
    git(wd, "add", "kernel.cu", "broken.py")
    git(wd, "commit", "-q", "--amend", "--no-edit")
    failed = rebase_onto(u, "v48.0", wd, out, "--continue")
    assert failed.returncode == 1, failed.stderr
    report = json.loads(failed.stdout)
    assert [e.split(": ", 1)[0] for e in report["compile_errors"]] == ["broken.py"], report
    assert report["leftover_markers"] == [f"kernel.cu: leftover conflict marker at line {n}" for n in (2, 6)]
    assert not out.exists()


KILL_AFTER_A_COMMIT = """
import os, signal, sys
from dspark_cli import rebase
real, victim = rebase.apply_one, sys.argv[-1]
def apply_one(ws, patch, *args, **kwargs):
    outcome = real(ws, patch, *args, **kwargs)
    if patch.name.startswith(victim):  # committed, the record not yet naming it
        os.kill(os.getpid(), signal.SIGKILL)
    return outcome
rebase.apply_one = apply_one
from dspark_cli.cli import main
sys.argv = ["dspark"] + sys.argv[1:-1]
main()
"""


def kill_after_commit(u, victim: str, *args: str) -> None:
    env = {**os.environ, "DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache"),
           "GIT_CONFIG_GLOBAL": os.devnull, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_A_COMMIT, "rebase", "eng", "--from", "v1.0", *args,
                             "--json", victim], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr


@pytest.mark.parametrize("resolved_first", [False, True], ids=["plain run", "continue after a resolution"])
def test_a_run_killed_between_a_patch_commit_and_its_record_is_continued_by_the_next(upstream, resolved_first):
    """SIGKILL after a patch's commit and before the record named it: the next --continue found
    one commit more than recorded and refused ('found 2 commits ..., expected 1'), so the only way
    on was --force, which threw away a resolution. That commit is the killed run's own (the next
    patch's author, date and message, committed by dspark): it is made again."""
    u = upstream
    wd, out = u["tmp"] / "wd-kc", u["tmp"] / "out-kc"
    if resolved_first:
        resolution = conflict_then_resolve(u, "v40.0", wd)
    else:
        new_upstream(u, {"mod.py": "import os\n\n\n" + MOD}, "v40.0")
    args = ["--onto", "v40.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--out", str(out)]
    kill_after_commit(u, "0002-", *args, *(["--continue"] if resolved_first else []))
    before = git(wd, "rev-list", "v40.0..HEAD").splitlines()
    assert len(before) == 2  # 0001 (or its resolution) and 0002's commit, the record naming only the first
    done = dspark(u, *args, "--continue")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["patches"]
    assert [p["status"] for p in report] == ["resolved" if resolved_first else "clean", "clean", "clean"]
    if resolved_first:
        assert report[0]["commit"] == resolution
    assert git(wd, "rev-list", "--reverse", "v40.0..HEAD").splitlines() == [p["commit"] for p in report]
    assert "+HOOK = True" in series.load_series(out, "dspark")[1].path.read_text()


def test_a_commit_of_the_users_after_the_recorded_ones_is_still_refused(upstream):
    """Only the killed run's own commit is made again: one of the user's on top of it is refused as
    before, and left on the branch."""
    u = upstream
    wd, out = u["tmp"] / "wd-ku", u["tmp"] / "out-ku"
    new_upstream(u, {"mod.py": "import os\n\n\n" + MOD}, "v41.0")
    args = ["--onto", "v41.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--out", str(out)]
    kill_after_commit(u, "0002-", *args)
    (wd / "extra.py").write_text("X = 1\n")
    git(wd, "add", "extra.py")
    git(wd, "commit", "-q", "-m", "ours: other")  # the next patch's subject, but the user's commit
    mine = git(wd, "rev-parse", "HEAD")
    refused = dspark(u, *args, "--continue")
    assert refused.returncode == 2 and "found 3 commits" in refused.stderr, refused.stderr
    assert git(wd, "rev-parse", "HEAD") == mine


def index_lengths(text: str) -> set[int]:
    return {len(side) for line in text.splitlines() if line.startswith("index ")
            for side in line.split()[1].split("..")}


@pytest.mark.parametrize("how", ["a large repository", "core.abbrev"])
def test_the_refreshed_patches_name_blobs_as_the_series_did_whatever_the_repository(upstream, tmp_path, how):
    """format-patch abbreviates the `index` lines' blob names by the repository's size (git's
    default grows with its object count) or the user's core.abbrev: carried with --repo of a real
    vLLM clone (or the two-tree work repository of six releases), every patch of the series changed
    (`index 6c8fb7e2..b84e79e7` for `index 6c8fb7e..b84e79e`) and so its series.lock, while the patches
    did not. They keep the series' own length (git lengthens one only where it would be ambiguous)."""
    u = upstream
    env = {"DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache"), "GIT_CONFIG_GLOBAL": os.devnull}
    if how == "core.abbrev":
        config = tmp_path / "user.gitconfig"
        config.write_text("[core]\n\tabbrev = 12\n")
        env["GIT_CONFIG_GLOBAL"] = str(config)
    else:  # more than 2**14 objects: git's own abbreviation is 8 characters
        blobs = "".join(f"blob\ndata {len(str(i)) + 1}\n{i}\n" for i in range(17000))
        subprocess.run(["git", "-C", str(u["repo"]), "fast-import", "--quiet"], input=blobs, text=True, check=True)
        assert len(git(u["repo"], "rev-parse", "--short", "HEAD")) > 7
    assert index_lengths("".join(p.read_text() for p in u["patches"].glob("*.patch"))) == {7}
    onto = u["base"]  # the series carried onto its own tree: it should come out as it was
    git(u["repo"], "tag", "v42.0", onto)
    out = u["tmp"] / "out42"
    run = run_dspark("rebase", "eng", "--from", "v1.0", "--onto", "v42.0", "--repo", str(u["repo"]),
                     "--workdir", str(u["tmp"] / "wd42"), "--out", str(out), "--json", env=env)
    assert run.returncode == 0, run.stderr
    for patch in sorted(u["patches"].glob("*.patch")):
        assert index_lengths((out / patch.name).read_text()) == {7}
        assert (out / patch.name).read_text() == patch.read_text()
    assert (out / "series.lock").read_text() == (u["patches"] / "series.lock").read_text()


def test_a_continue_stopped_by_ctrl_c_inside_a_patch_is_continued_by_the_next(upstream, tmp_path):
    """Ctrl-C after `git apply --index` of 0003 and before its commit left 0003's change staged:
    the next --continue (what the interrupt line says to run) was refused, 'resolve the conflict
    markers and commit the patch before --continue', though there was no conflict, and a commit of
    it would be refused as an extra one. The interrupted patch is taken back out of the work tree."""
    u = upstream
    wd, out = u["tmp"] / "wd-int2", u["tmp"] / "out-int2"
    resolution = conflict_then_resolve(u, "v43.0", wd)
    third = sorted(p.name for p in u["patches"].glob("*.patch"))[2]
    env, waiting = stand_in_git(u, tmp_path, f'*"apply --index --whitespace=nowarn"*{third}*) {{real}} "$@"; '
                                             'touch {waiting}; sleep 60; exit 0;;')
    args = ["rebase", "eng", "--from", "v1.0", "--onto", "v43.0", "--repo", str(u["repo"]), "--workdir", str(wd),
            "--out", str(out), "--continue"]
    code, _, stderr = signal_dspark_when(waiting, signal.SIGINT, *args, env=env)
    assert code == 130 and "run it again with --continue" in stderr, stderr
    assert git(wd, "status", "--porcelain") == ""  # 0003's staged change taken back out
    again = rebase_onto(u, "v43.0", wd, out, "--continue")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert [p["status"] for p in report["patches"]] == ["resolved", "clean", "clean"]
    assert report["patches"][0]["commit"] == resolution


KILL_BEFORE_A_COMMIT = """
import os, signal, sys
from dspark_cli import rebase
victim = sys.argv[-1]
def commit_as_am(ws, patch, trailers):  # its change staged, not committed
    if patch.name.startswith(victim):
        os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("not the patch to stop in")
real = rebase.commit_as_am
rebase.commit_as_am = lambda ws, patch, trailers: (commit_as_am(ws, patch, trailers) if patch.name.startswith(victim)
                                                   else real(ws, patch, trailers))
from dspark_cli.cli import main
sys.argv = ["dspark"] + sys.argv[1:-1]
main()
"""


@pytest.mark.parametrize("edit", [None, "in a file of the patch", "in another file"])
def test_a_run_killed_inside_a_patch_is_continued_by_the_next(upstream, edit):
    """SIGKILL after `git apply --index` of 0002 and before its commit left its change staged: the
    next --continue said 'resolve the conflict markers and commit the patch', with no conflict
    (committing it was refused as an extra commit). What the killed run staged is its own (each
    changed file holds the new tree's bytes or the patch's): taken out, the patch applied again. An
    edit of the user's since is kept, and refused as before."""
    u = upstream
    wd, out = u["tmp"] / "wd-kb", u["tmp"] / "out-kb"
    new_upstream(u, {"mod.py": "import os\n\n\n" + MOD}, "v44.0")
    args = ["--onto", "v44.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--out", str(out)]
    env = {**os.environ, "DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache"),
           "GIT_CONFIG_GLOBAL": os.devnull, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILL_BEFORE_A_COMMIT, "rebase", "eng", "--from", "v1.0", *args,
                             "--json", "0002-"], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert git(wd, "status", "--porcelain") == "A  ours.py"
    if edit == "in a file of the patch":
        (wd / "ours.py").write_text("HOOK = False  # mine\n")
    elif edit == "in another file":
        (wd / "other.py").write_text(OTHER + "MINE = 1\n")
    done = dspark(u, *args, "--continue")
    if edit:
        assert done.returncode == 2 and "holds changes not committed" in done.stderr, done.stderr
        assert "MINE = 1" in (wd / "other.py").read_text() if edit == "in another file" else \
            (wd / "ours.py").read_text() == "HOOK = False  # mine\n"
        return
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["patches"]
    assert [p["status"] for p in report] == ["clean", "clean", "clean"]
    assert git(wd, "rev-list", "--reverse", "v44.0..HEAD").splitlines() == [p["commit"] for p in report]
    assert "+HOOK = True" in series.load_series(out, "dspark")[1].path.read_text()


def test_a_run_killed_as_a_patch_conflicted_is_resolved_and_continued(upstream):
    """SIGKILL after 0003's 3-way merge left its markers and before the record said so: --continue
    rightly asked to resolve them and commit, then refused that commit as an extra one ('found 3
    commits ..., expected 2'), so only --force was left, dropping the resolution. The record names
    the patch being applied: the one commit on the commit it went onto resolves it."""
    u = upstream
    wd, out = u["tmp"] / "wd-kx", u["tmp"] / "out-kx"
    new_upstream(u, {"other.py": OTHER.replace("D = 4\n", "D = 40\n")}, "v45.0")  # 0003 conflicts
    args = ["--onto", "v45.0", "--repo", str(u["repo"]), "--workdir", str(wd), "--out", str(out)]
    kill = KILL_AFTER_A_COMMIT.replace("if patch.name.startswith(victim):", "if outcome.status == 'conflict':")
    env = {**os.environ, "DSPARK_COMPAT": str(u["compat"]), "DSPARK_CACHE": str(u["tmp"] / "cache"),
           "GIT_CONFIG_GLOBAL": os.devnull, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", kill, "rebase", "eng", "--from", "v1.0", *args, "--json", "-"],
                            env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    asked = dspark(u, *args, "--continue")
    assert asked.returncode == 2 and "resolve the conflict markers in other.py and commit the patch" in asked.stderr, \
        asked.stderr
    (wd / "other.py").write_text(OTHER.replace("D = 4\n", "D = 40\nOURS = 44\n"))
    git(wd, "commit", "-q", "-am", "resolved")
    resolution = git(wd, "rev-parse", "HEAD")
    done = dspark(u, *args, "--continue")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["patches"]
    assert [p["status"] for p in report] == ["clean", "clean", "resolved"]
    assert report[2]["commit"] == resolution
    assert "+OURS = 44" in series.load_series(out, "dspark")[2].path.read_text()


@pytest.mark.parametrize("left", ["backup", "unmerged"])
def test_continue_names_what_is_left_uncommitted(upstream, left):
    """A resolution committed, with the backup `git mergetool` keeps (mod.py.orig, untracked) left
    beside it: --continue said 'resolve the conflict markers and commit the patch' (there were none,
    and it was committed) without naming the file. The line names what is left, and says conflict
    markers only where a file is still unmerged."""
    u = upstream
    wd = u["tmp"] / "wd-orig"
    new_upstream(u, {"mod.py": MOD.replace("return x + 3", "return x + 300")}, "v46.0")
    args = ["--onto", "v46.0", "--repo", str(u["repo"]), "--workdir", str(wd)]
    assert dspark(u, *args).returncode == 4
    if left == "backup":
        shutil.copy(wd / "mod.py", wd / "mod.py.orig")
        (wd / "mod.py").write_text(MOD.replace("return x + 3", "return x + 300  # ours"))
        git(wd, "commit", "-q", "-am", "ours: mark f3")
    refused = dspark(u, *args, "--continue")
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip()
    assert len(line.splitlines()) == 1
    if left == "backup":
        assert "mod.py.orig" in line and "conflict markers" not in line, line
    else:
        assert "resolve the conflict markers in mod.py and commit the patch" in line, line


def test_index_abbreviation_is_the_patch_own():
    """A binary file's index line is full whatever the option: a patch with one beside a text
    file's keeps the text file's short names (--full-index only where every name is full)."""
    text_line, binary_line = "index 6c8fb7e..b84e79e 100644\n", f"index {'a' * 40}..{'b' * 40}\n"
    assert rebase.index_abbrev(text_line + binary_line) == "--abbrev=7"
    assert rebase.index_abbrev("index 6c8fb7e2a..b84e79e71 100755\n") == "--abbrev=9"
    assert rebase.index_abbrev(binary_line) == "--full-index"
    assert rebase.index_abbrev("similarity index 100%\nrename from a\nrename to b\n") == "--abbrev=7"
