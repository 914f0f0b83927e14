"""Exclusive flocks, for the one-at-a-time guards (a workspace's apply/revert, a build key) and for
the scratch directories a run builds in before moving the result into place (a clone, a release
tree, a refreshed series): a scratch whose flock anyone can take is a killed run's. The kernel
drops a flock when its descriptor closes, so a holder that is killed, however, never leaves
anything locked."""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from dspark_cli.errors import UsageError
from dspark_cli.files import name_part


@contextmanager
def exclusive_nowait(path: Path, directory: bool = False) -> Iterator[tuple[int, bool]]:
    """Open `path` (a file, created when missing; or an existing directory) and try an exclusive
    flock on it without waiting. Yields (descriptor, whether we hold it); the descriptor is closed, and the
    lock released, at the end of the block. Raises OSError when `path` cannot be opened."""
    flags = os.O_RDONLY | os.O_DIRECTORY if directory else os.O_RDWR | os.O_CREAT
    fd = os.open(path, flags, 0o666)
    try:
        yield fd, try_exclusive(fd)
    finally:
        os.close(fd)


def try_exclusive(fd: int) -> bool:
    """An exclusive flock on the open descriptor, if no one else holds one now."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def wait_exclusive(fd: int) -> None:
    """An exclusive flock on the open descriptor, waiting for its holder to let go."""
    fcntl.flock(fd, fcntl.LOCK_EX)


def _scratch_prefix(path: Path, kind: str) -> str:
    # name_part: paths that share a long name's start never share scratches (recover_interrupted
    # restores a scratch's `old` to its path)
    return f".{name_part(path)}.dspark-{kind}-"


@contextmanager
def scratch_beside(path: Path, kind: str) -> Iterator[Path]:
    """A new directory `.<name>.dspark-<kind>-<random>` beside `path` for the block, flocked all
    along and removed after it: what a run builds before moving it into `path`. It is made under a
    `.dspark-making-` name and gets its kind's name only once locked, so dead_scratches never finds
    a live run's unlocked (a pid in the name could not tell: in a container every run may be pid 1,
    and pids are reused). mkdtemp's mode is 0700: build what others read in a plain mkdir under it."""
    try:
        making = Path(tempfile.mkdtemp(dir=path.parent, prefix=_scratch_prefix(path, "making")))
    except OSError as exc:  # named by the directory it was to go in, not the random name tried
        raise OSError(exc.errno, exc.strerror, str(path.parent)) from exc
    with exclusive_nowait(making, directory=True):  # a directory just made: no one else holds it
        scratch = making.with_name(_scratch_prefix(path, kind) + making.name.rsplit("-", 1)[1])
        os.rename(making, scratch)  # the flock is the directory's, whatever its name
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


MAKING_DEAD_AFTER_S = 3600  # a `making` name lives for microseconds: one this old is a killed run's


@contextmanager
def dead_scratches(path: Path, kind: str) -> Iterator[list[Path]]:
    """The scratch directories of `kind` beside `path` (scratch_beside) whose run is gone, oldest
    first, flocked by us for the block: the kernel dropped a killed run's flock, a live run holds
    its own. Each kind has its own prefix, so one kind's are never taken for another's. Also the
    `making` directories of runs killed before they locked theirs (an hour old: never a live one)."""
    with ExitStack() as held:
        dead = [p for p, live in _tried(held, [*_beside(path, kind), *_killed_making(path)]) if not live]
        yield sorted(dead, key=_mtime)


def scratches(path: Path, kind: str) -> list[tuple[Path, bool]]:
    """The scratch directories of `kind` beside `path`, each with whether a live run holds it."""
    with ExitStack() as held:
        return _tried(held, _beside(path, kind))


MADE_IN = ("clone", "new")  # the scratch kinds a first apply makes its workdir in (git, pypi)


def sweep_unless_made_elsewhere(path: Path, kind: str) -> None:
    """Before a first apply makes `path` in a `kind` scratch: refuse at once, before any clone or
    extraction, while another live run is making it (from either source: only one of the two could
    move its tree into place); else remove the killed runs' `kind` scratches, as
    remove_dead_scratches does. One scan: each sibling's flock is tried once, and a killed run's
    stays ours until it is removed."""
    with ExitStack() as held:
        found = {made_in: _tried(held, _beside(path, made_in)) for made_in in MADE_IN}
        for scratch, live in (f for each in found.values() for f in each):
            if live:
                raise UsageError(f"another dspark run is making {path} now (in {scratch.name}); run again when "
                                 "it has finished")
        dead = [p for p, _ in found[kind]] + [p for p, live in _tried(held, _killed_making(path)) if not live]
        for scratch in sorted(dead, key=_mtime):
            shutil.rmtree(scratch, ignore_errors=True)


def _beside(path: Path, kind: str) -> list[Path]:
    return sorted(path.parent.glob(f"{glob.escape(_scratch_prefix(path, kind))}*"))


def _killed_making(path: Path) -> list[Path]:
    return [p for p in _beside(path, "making") if time.time() - _mtime(p) > MAKING_DEAD_AFTER_S]


def _tried(held: ExitStack, directories: list[Path]) -> list[tuple[Path, bool]]:
    """Each directory with whether a live run holds its flock; one no run holds (a killed run's)
    stays flocked by us until `held` closes. One we cannot open (gone meanwhile, or another user's:
    no lock to read) is left out."""
    found = []
    for directory in directories:
        try:
            _, ours = held.enter_context(exclusive_nowait(directory, directory=True))
        except OSError:
            continue
        found.append((directory, not ours))
    return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by another run's sweep
        return 0.0


def remove_dead_scratches(path: Path, kind: str) -> None:
    with dead_scratches(path, kind) as dead:
        for scratch in dead:
            shutil.rmtree(scratch, ignore_errors=True)
