"""Nothing is lost and nothing is half made: commits on a detached HEAD, failed first clones,
odd refs and odd workdirs. Real git throughout (the toy upstream of test_apply_support)."""

from __future__ import annotations

import pytest

from dspark_cli import applier, compat
from dspark_cli.errors import UsageError
from test_apply_support import git, make_toy, tree_fingerprint


@pytest.fixture
def toy(tmp_path, monkeypatch):
    t = make_toy(tmp_path, monkeypatch)
    return {**t, "compat": compat.load(t["compat_path"]), "workdir": tmp_path / "work"}


def run_apply(toy, **options):
    request = applier.ApplyRequest(engine="toy", workdir=toy["workdir"], **options)
    return applier.apply(toy["compat"], request)


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
