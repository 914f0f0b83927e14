"""`dspark compat lock`: replace short commit ids in compat.yaml with full ones, read from a clone."""

from __future__ import annotations

from pathlib import Path

from dspark_cli import cache_dir, cache_subdir, git_source
from dspark_cli.compat import Compat, replace_scalar
from dspark_cli.errors import EnvironmentProblem, UsageError
from dspark_cli.files import write_text_atomically
from dspark_cli.workspace import Workspace


def clone_for(engine: str, repo: str) -> Workspace:
    """A local repository to read commits from: `repo` itself if it is a local clone, else a cached clone."""
    local = Path(repo).expanduser()
    if local.is_dir():
        ws = Workspace(local)
        if not ws.git.ok("rev-parse", "--git-dir"):
            raise UsageError(f"{local} is not a git repository")
        return ws
    path = cache_dir() / "git" / engine
    if not path.exists():
        cache_subdir("git")
        git_source.clone(repo, path)
    elif not _is_clone(path):  # clone() moves a finished clone into place: this one is not ours
        raise EnvironmentProblem(f"{path} (dspark's cached clone of {engine}) is not a git repository: remove it "
                                 f"and run dspark compat lock again")
    else:
        git_source.fetch(Workspace(path), repo)
    return Workspace(path)


def _is_clone(path: Path) -> bool:
    """A directory that is the top of a git work tree (not a directory inside another one)."""
    if not path.is_dir():
        return False
    top = Workspace(path).git.run("rev-parse", "--show-toplevel", check=False)
    return top.returncode == 0 and Path(top.stdout.strip()).resolve() == path.resolve()


def lock(compat: Compat, engines: list[str], repo: str | None) -> list[dict]:
    """Resolve each pin's commit (through its tag when present) and write the full ids back."""
    git_source.check_repo_option(repo)
    # bytes, not read_text: universal newlines would read a CRLF file as LF, and write it back so
    text = compat.path.read_bytes().decode("utf-8")
    changes = []
    for name in dict.fromkeys(engines):  # `compat lock vllm vllm` locks (and reports) it once
        engine = compat.engine(name)
        pending = [pin for pin in engine.pins.values() if not pin.commit_is_full]
        if not pending:
            continue
        ws = clone_for(name, repo or engine.repository)
        for pin in pending:
            # resolve_tag: a tag fetched into the cached clone after its first clone is upstream's
            full = git_source.resolve_tag(ws, pin.tag) or ws.resolve_commit(pin.commit)
            if full is None:
                if git_source.is_ambiguous(ws, pin.commit):
                    raise UsageError(f"{name} {pin.name}: commit {pin.commit} is ambiguous in {ws.path} "
                                     f"(and tag {pin.tag} is not there); give more of its digits")
                raise UsageError(f"{name} {pin.name}: neither tag {pin.tag} nor commit {pin.commit} is in {ws.path}")
            if not full.startswith(pin.commit):
                raise UsageError(f"{name} {pin.name}: tag {pin.tag} is {full[:12]}, but compat.yaml says {pin.commit}")
            text = replace_scalar(text, ["engines", name, "pins", pin.name, "commit"], full)
            changes.append({"engine": name, "pin": pin.name, "short": pin.commit, "commit": full})
    if changes:
        write_text_atomically(compat.path, text)  # (newlines as read: POSIX writes "\n" unchanged)
    return changes
