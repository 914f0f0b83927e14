"""`dspark compat lock`: replace short commit ids in compat.yaml with full ones, read from a clone."""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import yaml

from dspark_cli import cache_dir, cache_subdir, git_source
from dspark_cli.compat import Compat, CompatError, Pin, parse, replace_scalar
from dspark_cli.errors import EnvironmentProblem, UsageError, short_message
from dspark_cli.files import cannot_make_in, write_text_atomically
from dspark_cli.flock import try_exclusive, wait_exclusive
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
    repo = git_source.checked_repo(repo)
    with _exclusive(compat.path):
        # read again under the lock: a run we waited for may have locked pins since compat.load
        text, compat = _read(compat.path)
        pending = {name: pins for name in dict.fromkeys(engines)  # `compat lock vllm vllm` locks (and reports) it once
                   if (pins := [pin for pin in compat.engine(name).pins.values() if not pin.commit_is_full])}
        if not pending:
            return []
        _check_writable(compat.path)
        changes = []
        for name, pins in pending.items():
            ws = clone_for(name, repo or git_source.engine_repository(compat, name))
            changes += [_resolved(name, pin, ws) for pin in pins]
        try:  # newlines as read: POSIX writes "\n" unchanged
            write_text_atomically(compat.path, _rewritten(compat, text, changes))
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            raise EnvironmentProblem(f"{compat.path}: cannot be replaced, it is a mount point (a file bind-mounted "
                                     "into a container, say): lock a copy of it, then copy that over it") from None
    return changes


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive flock on compat.yaml for the block: two runs each read it, resolved and wrote it
    back, and the last write dropped the other's commits. A second run waits (a lock is short, but
    for a first clone). The flock is the file's own: a lock file beside it would be left in the
    checkout."""
    fd = _flock_current(path)
    try:
        yield
    finally:
        os.close(fd)


def _flock_current(path: Path) -> int:
    """A descriptor of the file at `path`, exclusively flocked while it is still that path's file:
    the run we waited for renamed its new file over the one we locked, and a third run may lock that."""
    while True:
        fd = os.open(path, os.O_RDONLY)
        try:
            if not try_exclusive(fd):
                print(f"waiting for another dspark compat lock of {path} to finish", file=sys.stderr, flush=True)
                wait_exclusive(fd)
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except BaseException:
            os.close(fd)
            raise
        if current:
            return fd
        os.close(fd)


def _read(path: Path) -> tuple[str, Compat]:
    """compat.yaml's text, decoded from bytes (universal newlines would read a CRLF file as LF, and
    write it back so), and what it says."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CompatError(f"{path}: cannot read: {exc}") from None
    return text, parse(text, path)


def _check_writable(path: Path) -> None:
    """Before any clone or fetch: the new file is written beside compat.yaml (where a symlink
    points) and renamed over it, so its directory must take a new file; a file we may not write is
    refused too (as profile does its --out)."""
    if not os.access(path, os.W_OK):
        raise EnvironmentProblem(f"{path}: the file is not writable")
    directory = Path(os.path.realpath(path)).parent
    if problem := cannot_make_in(directory):
        raise EnvironmentProblem(f"{path}: cannot write its new copy in {directory} ({problem})")


def _resolved(name: str, pin: Pin, ws: Workspace) -> dict:
    """The change locking `pin`: its full commit id, read in `ws`."""
    # resolve_tag: a tag fetched into the cached clone after its first clone is upstream's
    full = git_source.resolve_tag(ws, pin.tag) or ws.resolve_commit(pin.commit)
    if full is None:
        if git_source.is_ambiguous(ws, pin.commit):
            raise UsageError(f"{name} {pin.name}: commit {pin.commit} is ambiguous in {ws.path} "
                             f"(and tag {pin.tag} is not there); give more of its digits")
        raise UsageError(f"{name} {pin.name}: neither tag {pin.tag} nor commit {pin.commit} is in {ws.path}")
    if not full.startswith(pin.commit):
        raise UsageError(f"{name} {pin.name}: tag {pin.tag} is {full[:12]}, but compat.yaml says {pin.commit}")
    return {"engine": name, "pin": pin.name, "short": pin.commit, "commit": full}


def _rewritten(compat: Compat, text: str, changes: list[dict]) -> str:
    """`text` with the changes' full ids written in, checked: it must load to the same compat.yaml
    with only those commits changed. A rewrite that broke the YAML (a block scalar, a tag before an
    anchor did) or changed another pin (an alias of an anchor that two of them share) is refused
    (exit 2), and nothing is written."""
    new = text
    try:
        for c in changes:
            new = replace_scalar(new, ["engines", c["engine"], "pins", c["pin"], "commit"], c["commit"])
        same = parse(new, compat.path) == _locked(compat, changes)
        problem = None if same else "it would change more than the commits"
    except yaml.YAMLError as exc:  # replace_scalar composes the text a previous change rewrote
        problem = getattr(exc, "problem", None) or short_message(exc)
    except CompatError as exc:  # its line is the rewritten file's
        problem = "the rewritten file" + str(exc).removeprefix(str(compat.path))
    if problem:
        raise UsageError(f"{compat.path}: cannot write the full commit ids in place ({problem}); nothing was written")
    return new


def _locked(compat: Compat, changes: list[dict]) -> Compat:
    """`compat` with the changes' commits."""
    engines = dict(compat.engines)
    for c in changes:
        engine = engines[c["engine"]]
        pin = replace(engine.pins[c["pin"]], commit=c["commit"])
        engines[c["engine"]] = replace(engine, pins={**engine.pins, pin.name: pin})
    return replace(compat, engines=engines)
