"""Exclusive flocks, for the one-at-a-time guards (a workspace's apply/revert, a build key, a
release tree being made). The kernel drops a flock when its descriptor closes, so a holder that
is killed, however, never leaves anything locked."""

from __future__ import annotations

import fcntl
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator


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


@contextmanager
def claimed(directory: Path) -> Iterator[bool]:
    """An exclusive flock on `directory` for the block: True when we hold it, False when another
    process does (or the directory is gone)."""
    with ExitStack() as stack:
        try:
            _, ours = stack.enter_context(exclusive_nowait(directory, directory=True))
        except OSError:
            ours = False
        yield ours


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
