"""Builders shared by the apply/compat/CLI/rebase tests: a throwaway upstream repository
with two tagged releases, patch series made with real `git format-patch`, and a compat.yaml for them.
Everything is real git; nothing is mocked."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from dspark_cli import series as series_files

CORE = "".join(f"line {n}\n" for n in range(1, 31))
CONFIG = "SPECULATIVE_METHODS = ['ngram', 'eagle']\nDEFAULT = None\n"


def isolate_git(monkeypatch, tmp_path: Path) -> None:
    """No global or system git config leaks in; identity only where a test sets it."""
    empty = tmp_path / "gitconfig"
    empty.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))


def git(cwd: Path, *args: str, check: bool = True, input: str | None = None) -> str:
    """git with a fixed identity; the global config only where a test set one (isolate_git), never
    the user's (a commit.gpgsign or hook there would change what the tests see)."""
    env = {"GIT_CONFIG_GLOBAL": os.devnull, **os.environ, "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.com"}
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {result.stderr}")
    return result.stdout.strip()


def make_upstream(root: Path) -> dict:
    """A repository with releases v1.0 and v1.1 (v1.1 edits a line our patches do not touch)."""
    repo = root / "upstream"
    (repo / "engine").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "engine" / "core.py").write_text(CORE)
    (repo / "engine" / "config.py").write_text(CONFIG)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "release 1.0")
    git(repo, "tag", "v1.0")
    v10 = git(repo, "rev-parse", "HEAD")
    (repo / "engine" / "core.py").write_text(CORE.replace("line 25\n", "line 25 (1.1)\n"))
    git(repo, "commit", "-q", "-am", "release 1.1")
    git(repo, "tag", "v1.1")
    return {"repo": repo, "v1.0": v10, "v1.1": git(repo, "rev-parse", "HEAD")}


def make_series(root: Path, upstream: Path, name: str, base: str, edits: list[tuple[str, dict[str, str]]]) -> Path:
    """A series directory `root/name` whose patches are `git format-patch` of one commit per edit
    (subject, {path: new content}) on top of `base`, with its series and series.lock."""
    scratch = root / f"scratch-{name}"
    git(root, "clone", "-q", str(upstream), str(scratch))
    git(scratch, "checkout", "-q", "--detach", base)
    for subject, files in edits:
        for path, content in files.items():
            (scratch / path).parent.mkdir(parents=True, exist_ok=True)
            (scratch / path).write_text(content)
        git(scratch, "add", "-A")
        git(scratch, "commit", "-q", "-m", subject, "-m", f"Why: {subject}.")
    directory = root / name
    directory.mkdir()
    names = git(scratch, "format-patch", "--zero-commit", "--no-signature", "-o", str(directory),
                f"HEAD~{len(edits)}").splitlines() if edits else []
    (directory / "series").write_text("# test series\n" + "".join(Path(p).name + "\n" for p in names))
    series_files.write_lock(directory)
    return directory


def dspark_edits() -> list[tuple[str, dict[str, str]]]:
    """Two patches: a hook line in core.py and a new method in config.py plus a new module."""
    return [
        ("dspark: hook in core", {"engine/core.py": CORE.replace("line 10\n", "line 10\nimport engine.dspark  # hook\n")}),
        ("dspark: method and module", {
            "engine/config.py": CONFIG.replace("'eagle'", "'eagle', 'dspark'"),
            "engine/dspark.py": "ENABLED = True\n",
        }),
    ]


def write_compat(root: Path, upstream: dict, series_dir: Path, commit: str | None = None) -> Path:
    path = root / "compat.yaml"
    path.write_text(f"""# test compat
schema: 1
engines:
  toy:
    repository: {upstream['repo']}
    module: engine
    distributions: [toy-engine]
    default_pin: v1.0
    pins:
      v1.0:
        commit: {commit or upstream['v1.0']}   # the release
        tag: v1.0
        patches: {series_dir}
        releases: []
        python: ">=3.10"
        torch: ">=2.0"
        cuda: ">=12.0"
        tested:
          ci: tests
""")
    return path


def tree_fingerprint(repo: Path) -> dict:
    """Everything `restore` must bring back: HEAD, symbolic HEAD, refs, index, stash, worktree bytes."""
    files = {}
    for path in sorted(repo.rglob("*")):
        if ".git" in path.relative_to(repo).parts or not path.is_file():
            continue
        files[str(path.relative_to(repo))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {
        "head": git(repo, "rev-parse", "HEAD"),
        "symbolic": git(repo, "symbolic-ref", "-q", "HEAD", check=False),
        "refs": git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads", "refs/tags"),
        "index": git(repo, "ls-files", "--stage"),
        "status": git(repo, "status", "--porcelain=v1", "--untracked-files=all"),
        "stash": git(repo, "stash", "list", "--format=%gs"),
        "files": files,
    }


def make_toy(tmp_path: Path, monkeypatch) -> dict:
    """The toy engine end to end: isolated git, an upstream repository, DSpark's two-patch series
    and a compat.yaml pinning it (root, upstream, series, compat_path)."""
    isolate_git(monkeypatch, tmp_path)
    upstream = make_upstream(tmp_path)
    series_dir = make_series(tmp_path, upstream["repo"], "dspark-series", upstream["v1.0"], dspark_edits())
    return {"root": tmp_path, "upstream": upstream, "series": series_dir,
            "compat_path": write_compat(tmp_path, upstream, series_dir)}


def toy_workspace(tmp_path: Path, monkeypatch) -> dict:
    """make_toy plus its loaded compat and the workdir apply writes to."""
    from dspark_cli import compat

    t = make_toy(tmp_path, monkeypatch)
    return {**t, "compat": compat.load(t["compat_path"]), "workdir": tmp_path / "work"}


def run_apply(toy: dict, **options):
    from dspark_cli import applier

    request = applier.ApplyRequest(engine="toy", workdir=toy["workdir"], **options)
    return applier.apply(toy["compat"], request)
