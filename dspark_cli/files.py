"""Writing files so that a kill, a full disk or a failing writer never leaves half of one, or half
of a set that belongs together (the SPS table and its SGLang form, a state file, a build record)."""

import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

from dspark_cli.errors import EnvironmentProblem, UsageError


def replace_atomically(outputs: Iterable[tuple[Path, Callable[[str], None]]]) -> None:
    """Write every (path, save) through save(temporary path beside it), then rename them all into
    place; when any write or rename fails (or is interrupted), every path is left as it was and the
    temporaries are removed: a path renamed already gets its old file back from a hard link made
    (or a copy) before the renames. An existing file keeps its permissions; a new one gets the umask's; a
    symlink is written through (its target replaced, the link kept: the package's compat.yaml links
    to the repository's). A device, pipe or socket at a path is refused (EINVAL), never replaced.
    Raises OSError."""
    outputs = [(Path(os.path.realpath(path)), save) for path, save in outputs]
    for path, _ in outputs:
        if path.exists() and not path.is_file() and not path.is_dir():  # a directory: rename's own error
            raise OSError(errno.EINVAL, "not a regular file (renaming over it would replace it)", str(path))
        _remove_stale_temporaries(path)
    temps, olds, renamed = [], {}, []
    path = None
    try:
        for path, save in outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
            os.close(fd)
            temps.append(Path(tmp))
            save(tmp)
            os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        if len(outputs) > 1:
            for (path, _), tmp in zip(outputs, temps):
                if path.exists():
                    olds[path] = tmp.with_suffix(".old")
                    try:
                        os.link(path, olds[path])
                    except OSError:  # a filesystem without hard links (vfat, some FUSE mounts)
                        shutil.copy2(path, olds[path])
        for (path, _), tmp in zip(outputs, temps):
            os.replace(tmp, path)
            renamed.append(path)
    except BaseException as exc:
        for done in reversed(renamed):
            if done in olds:
                os.replace(olds.pop(done), done)
            else:
                done.unlink(missing_ok=True)
        for leftover in [*temps, *olds.values()]:
            leftover.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and path is not None:
            # name the file being written, not our temporary beside it
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    for old in olds.values():
        old.unlink(missing_ok=True)


STALE_TEMPORARY_S = 3600  # a temporary lives while its save runs: one an hour old is a killed run's


NAME_PART_BYTES = 100  # of a file's name in the names made beside it: they stay within NAME_MAX (255)


def name_part(path: Path) -> str:
    """`path`'s name for the names of what we make beside it (temporaries, scratch directories):
    a long (legal) name is cut to NAME_PART_BYTES and told apart by a hash of the whole, so two
    names sharing the cut part never take each other's leftovers."""
    name = os.fsencode(path.name)
    if len(name) <= NAME_PART_BYTES:
        return path.name
    return f"{name[:NAME_PART_BYTES - 17].decode(errors='ignore')}-{hashlib.sha256(name).hexdigest()[:16]}"


def _temporary_prefix(path: Path) -> str:
    return f".{name_part(path)}.dspark-"


def _remove_stale_temporaries(path: Path) -> None:
    """The temporaries (and .old links) beside `path` that runs killed while writing it left: a
    kill between a save and its rename left `.compat.yaml.dspark-<random>.tmp` in the user's
    checkout for good. Only the names we make, unchanged for an hour (ctime: an .old link keeps
    the mtime of the file it links, however new the link)."""
    pattern = re.compile(re.escape(_temporary_prefix(path)) + r"[a-z0-9_]{8}\.(tmp|old)")
    try:
        for leftover in path.parent.iterdir():
            if pattern.fullmatch(leftover.name) and time.time() - leftover.lstat().st_ctime > STALE_TEMPORARY_S:
                leftover.unlink(missing_ok=True)
    except OSError:  # a directory we cannot list or change: the write says so itself
        pass


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists: a directory to be made may not be there yet."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def cannot_make_in(directory: Path) -> str | None:
    """Why nothing can be made in the existing `directory` (the OSError's reason), or None. Probed
    by making a directory there and removing it: permission bits do not tell root about a read-only
    mount or /proc."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=directory, prefix=".dspark-probe-"))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_dir_option(directory: Path, option: str) -> None:
    """A directory the user named (`option directory`) that we will make or write in: a file at it
    or above it is bad input (UsageError, exit 2), a place we may not write an environment problem
    (EnvironmentProblem, exit 3). Probed, nothing left behind; a directory not there yet is not made."""
    try:
        existing = nearest_existing(directory)
    except OSError as exc:  # a name too long for the file system
        raise UsageError(f"{option} {directory}: {exc.strerror}") from None
    if not existing.is_dir():
        where = f"{option} {directory}" + ("" if existing == directory.absolute() else f": {existing}")
        raise UsageError(f"{where} is a file, not a directory")
    _check_names_below(directory, existing, option)
    if problem := cannot_make_in(existing):
        raise EnvironmentProblem(f"{option} {directory}: cannot make anything in {existing} ({problem})")


def check_new_names(path: Path, option: str) -> None:
    """A name in `path` below its nearest existing directory that is longer than that file system
    takes (NAME_MAX) is bad input (UsageError, exit 2), found now: the OS says so only when the
    name is made, after the work (and `exists()` under a missing directory does not see it)."""
    try:
        existing = nearest_existing(path)
    except OSError as exc:  # a name too long where the path exists up to it
        raise UsageError(f"{option} {path}: {exc.strerror}") from None
    _check_names_below(path, existing, option)


def _check_names_below(path: Path, existing: Path, option: str) -> None:
    """check_new_names with `path`'s nearest existing directory already found."""
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):  # a file system that does not say
        return
    for part in path.absolute().relative_to(existing).parts:
        if len(os.fsencode(part)) > name_max:
            raise UsageError(f"{option} {path}: File name too long (a name of {len(os.fsencode(part))} bytes; "
                             f"the file system takes {name_max})")


def refuse_replacing_cwd(directory: Path, option: str) -> None:
    """A new workspace is made beside `directory` and renamed over it when it is an empty directory
    (move_into_place): when that directory is the current one (`-C .` in an empty directory) the
    shell that ran us is left in a removed directory, where the tree does not show and the next
    `dspark status -C .` failed with `[Errno 2] No such file or directory`. Refused (exit 2) before
    anything is fetched; from the parent directory the same run works."""
    try:
        here = Path.cwd()
        if not directory.is_dir() or not os.path.samefile(directory, here) or any(directory.iterdir()):
            return
    except OSError:
        return  # the run's own checks say what is wrong with it
    raise UsageError(f"{option} {directory} is the current directory, which a new workspace replaces (your shell "
                     f"would be left in a removed directory): run from its parent, with {option} {here.name}")


def check_listable(directory: Path, option: str) -> None:
    """A directory we may not list is exit 3, naming it; a missing path or a file is left to the
    caller, which says so (exit 2)."""
    try:
        os.scandir(directory).close()
    except PermissionError as exc:
        raise EnvironmentProblem(f"{option} {directory}: cannot read ({exc.strerror})") from None
    except OSError:
        pass


def write_text_atomically(path: Path, text: str) -> None:
    replace_atomically([(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))])


def _umask() -> int:
    umask = os.umask(0)  # the only way to read it: set and restore
    os.umask(umask)
    return umask


def move_into_place(made: Path, path: Path) -> None:
    """Rename the directory `made` (finished beside `path`) to `path`, which may be missing or an
    empty directory: rename(2) replaces an empty one atomically. When another run put its own
    workspace there meanwhile the rename fails rather than mixing the two: that run's is kept and
    this one is refused (exit 2), its `made` left for the caller to remove."""
    try:
        os.replace(made, path)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise UsageError(f"{path} was made by another dspark run while this one was making it; "
                         "run again to use it") from None
