"""Paths read from real `git format-patch` output, including the ones git C-quotes (non-ASCII,
quotes, backslashes, tabs) and names with spaces, checked against git's own -z name listing."""

from __future__ import annotations

import pytest

from dspark_cli import rebase
from dspark_cli.diff_headers import FileDiff, file_diffs, unquote
from dspark_cli.patching import PatchConflict, apply_and_commit, created_paths, hunk_at
from dspark_cli.series import Patch, sha256_of
from dspark_cli.workspace import Workspace
from tests.git_fixtures import git, isolate_git

ODD = ["café.py", "with space.py", 'quote"d.py', "back\\slash.py", "tab\tname.py", "a b/ b/x.py"]
LINES = "".join(f"line {n}\n" for n in range(1, 21))


@pytest.fixture
def repo(monkeypatch, tmp_path):
    isolate_git(monkeypatch, tmp_path)
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    for name in ODD + ["old é.py", "gone é.py", "mode é.sh"]:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("gone\n" if name.startswith("gone") else LINES)
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "base")
    return path


def _change_everything(repo):
    for name in ODD:
        (repo / name).write_text(LINES.replace("line 8\n", "line eight\n"))
    (repo / "new ünï.py").write_text("new\n")
    git(repo, "mv", "old é.py", "new é.py")
    (repo / "new é.py").write_text(LINES.replace("line 2\n", "line two\n"))
    (repo / "gone é.py").unlink()
    (repo / "mode é.sh").chmod(0o755)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "change")


def _truth(repo) -> list[FileDiff]:
    """git's own reading of HEAD~..HEAD with renames, NUL-separated (never quoted)."""
    fields = git(repo, "diff", "--name-status", "-z", "-M", "HEAD~", "HEAD").split("\0")
    diffs, i = [], 0
    while i < len(fields) and fields[i]:
        status = fields[i][0]
        if status == "R":
            diffs.append(FileDiff(fields[i + 1], fields[i + 2]))
            i += 3
            continue
        name = fields[i + 1]
        diffs.append(FileDiff(None if status == "A" else name, None if status == "D" else name))
        i += 2
    return sorted(diffs, key=lambda d: d.path)


@pytest.mark.parametrize("quote_path", ["true", "false"])
def test_names_match_gits_own_listing(repo, quote_path):
    _change_everything(repo)
    patch = git(repo, "-c", f"core.quotePath={quote_path}", "format-patch", "-M", "--stdout", "HEAD~")
    if quote_path == "true":
        assert '"a/caf\\303\\251.py"' in patch  # the case this module exists for
    parsed = sorted((FileDiff(d.old, d.new) for d in file_diffs(patch)), key=lambda d: d.path)
    assert parsed == _truth(repo)
    assert all(d.hunks for d in file_diffs(patch) if d.path in ODD)


def test_created_and_changed_files_decode_quoted_names(repo, tmp_path):
    _change_everything(repo)
    patch_file = tmp_path / "change.patch"
    patch_file.write_text(git(repo, "format-patch", "-M", "--stdout", "HEAD~") + "\n")
    assert created_paths(patch_file) == ["new é.py", "new ünï.py"]
    text = patch_file.read_text()
    assert sorted(rebase.changed_files(text)) == sorted(ODD + ["old é.py", "gone é.py", "mode é.sh"])
    assert "café.py" in rebase.patch_files(text) and "gone é.py" in rebase.patch_files(text)
    assert hunk_at(patch_file, "café.py", 5) == "#1 (@@ -5,7 +5,7 @@)"
    assert hunk_at(patch_file, "old é.py", 1) == hunk_at(patch_file, "new é.py", 1) == "#1 (@@ -1,5 +1,5 @@)"


def test_a_failing_patch_on_a_non_ascii_file_names_its_file_and_hunk(repo, tmp_path):
    """git says `patch failed: café.py:5`; the patch file says "a/caf\\303\\251.py": the hunk is found."""
    (repo / "café.py").write_text(LINES.replace("line 8\n", "line eight\n"))
    git(repo, "commit", "-q", "-am", "ours")
    patch_file = tmp_path / "0001-ours.patch"
    patch_file.write_text(git(repo, "format-patch", "--stdout", "HEAD~") + "\n")
    git(repo, "reset", "-q", "--hard", "HEAD~")
    (repo / "café.py").write_text(LINES.replace("line 7\n", "line 7 upstream\n"))
    git(repo, "commit", "-q", "-am", "upstream moved on")
    with pytest.raises(PatchConflict) as failure:
        apply_and_commit(Workspace(repo), Patch("team", patch_file, sha256_of(patch_file)))
    assert failure.value.file == "café.py" and failure.value.hunk == "#1 (@@ -5,7 +5,7 @@)"


@pytest.mark.parametrize("quoted, plain", [
    ('"caf\\303\\251"', "café"), ('"a\\tb\\nc\\"d\\\\e"', 'a\tb\nc"d\\e'), ("plain name", "plain name"),
    ('"\\377x"', b"\xffx".decode("utf-8", "surrogateescape")), ('"cut\\', '"cut\\'), ('"', '"'),
])
def test_unquote(quoted, plain):
    assert unquote(quoted) == plain


@pytest.mark.parametrize("text", ['diff --git "a/unterminated\n', "diff --git \n", "diff --git a/x\n@@ junk\n"])
def test_malformed_headers_do_not_raise(text):
    assert len(file_diffs(text)) == 1
