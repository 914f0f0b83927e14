"""One `dspark apply`, `revert` or `rebase` at a time in a workspace's repository: an exclusive flock
on `<git-common-dir>/dspark/lock`, held from before recovery to the end of the operation.

Without it two runs interleave: the second sees no snapshot yet (the first writes it only when it
starts changing things), or takes the first's live snapshot for a killed run's and "recovers" it
under the running git. flock is released by the kernel when its holder exits, however it exits,
so a killed run never leaves the workspace locked. The lock file is never removed: a run that
opened it just before the unlink would lock a file no one else can see any more.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dspark_cli.errors import UsageError
from dspark_cli.flock import exclusive_nowait, try_exclusive

_held: set[Path] = set()  # the lock files this process holds
STATUS_PROBE_GRACE_S = 0.2  # `dspark status` (holder()) takes the lock for an instant: not a run to refuse


def common_git_dir(git_dir: Path) -> Path:
    """The git directory all worktrees of a repository share: a linked worktree's names it in its
    `commondir` file (git's layout; read here rather than asking git, which costs a process)."""
    try:
        return (git_dir / (git_dir / "commondir").read_text().strip()).resolve()
    except OSError:  # the main worktree's, or a plain repository's: it is the shared one
        return git_dir.resolve()


def lock_file(git_dir: Path) -> Path:
    """One lock per repository, in its common git directory: its worktrees share the dspark/<pin>
    branches too, and two runs in two worktrees interleaved their commits on one branch."""
    return common_git_dir(git_dir) / "dspark" / "lock"


@contextmanager
def exclusive(git_dir: Path, workdir: Path) -> Iterator[None]:
    """Hold the workspace's lock for the block; another process holding it is bad usage (exit 2),
    refused rather than waited for (its operation may take minutes or need the user), after the
    instant a `dspark status` probe may hold it. Held already by this process (a rebase locks
    before adding its work tree, then again around the patching), the block just runs."""
    path = lock_file(git_dir)
    if path in _held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_nowait(path) as (fd, ours):
        deadline = time.monotonic() + STATUS_PROBE_GRACE_S
        while not ours and time.monotonic() < deadline:
            time.sleep(0.01)
            ours = try_exclusive(fd)
        if not ours:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(f"another dspark apply, revert or rebase (pid {holder}) is running on {workdir} or another "
                             "worktree of its repository")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message of a run refused meanwhile
        _held.add(path)
        try:
            yield
        finally:
            _held.discard(path)


def held(git_dir: Path) -> bool:
    """Whether this process holds the workspace's lock (so no other dspark runs git in it)."""
    return lock_file(git_dir) in _held


def holder(git_dir: Path) -> str | None:
    """The pid (as it wrote it) of another process holding the workspace's lock, an apply, revert
    or rebase running now; None when none does. Probed with a non-blocking flock released at once; a missing
    lock file (no run ever locked this workspace) is not created."""
    path = lock_file(git_dir)
    if path in _held or not path.is_file():
        return None
    try:  # read-only: status also runs where it may not write (another user's workspace); flock does not mind
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # unreadable: nothing to tell, as without a lock file
    try:
        return None if try_exclusive(fd) else os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)
