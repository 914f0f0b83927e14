"""Patch series on disk: the `series` order file, the `series.lock` digests, and loading both.

Format: docs/patch-series.md. Nothing here touches a git workspace; see workspace.py for that.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from dspark_cli.errors import CheckFailed, EnvironmentProblem, UsageError
from dspark_cli.files import write_text_atomically
from dspark_cli.workspace import Git

SERIES_FILE = "series"
LOCK_FILE = "series.lock"
_LOCK_LINE = re.compile(r"([0-9a-f]{64})  (\S+)")
MARKER_NAME = "_dspark.py"
_MARKER_SERIES = re.compile(r'^SERIES = "(?:[^"\\\n]|\\.)*"$', re.M)
_MARKER_PATCHES = re.compile(r"^PATCHES = \[\n(?:[ \t]+\S.*\n)*\]$", re.M)
# What `git apply` takes as a file's diff: a git header (also for binary, mode-only and rename
# diffs, which have no ---/+++ lines), or a traditional unified diff's ---/+++ pair.
_DIFF = re.compile(rb"^(?:diff --git |--- [^\n]*\n\+\+\+ )", re.M)


@dataclass(frozen=True)
class Patch:
    layer: str  # "dspark" for our own series, the directory name for a --series layer
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        """What the commit trailer records, e.g. `dspark/0001-dspark-config.patch`."""
        return f"{self.layer}/{self.name}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _mode(path: Path, shown: Path) -> int | None:
    """path's st_mode, None if there is nothing there; a path we may not look at is
    an EnvironmentProblem (exit 3) naming `shown` (the directory that hides it), not a missing file."""
    try:
        return path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise _unreadable(shown, exc) from None


def _is_file(path: Path, shown: Path) -> bool:
    mode = _mode(path, shown)
    return mode is not None and stat.S_ISREG(mode)


def _unreadable(path: Path, exc: OSError) -> UsageError | EnvironmentProblem:
    """A series file we may not read is exit 3; one that cannot be read otherwise (a directory) 2."""
    kind = EnvironmentProblem if isinstance(exc, PermissionError) else UsageError
    return kind(f"{path}: cannot read ({exc.strerror})")


def read_patch_bytes(path: Path) -> bytes:
    """A patch file's bytes; an unreadable one is one clear error (exit 2, or 3 for permissions)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _read_text(path: Path) -> str:
    try:
        # universal newlines: a CRLF checkout reads as ours; -sig: a BOM (Notepad's) is not part of a name
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise _unreadable(path, exc) from None


def read_series(directory: Path) -> list[str]:
    """Patch names listed in DIR/series, in order."""
    series_file = directory / SERIES_FILE
    mode = _mode(directory, directory)
    if mode is not None and stat.S_ISREG(mode):
        raise UsageError(f"{directory} is a file, not a series directory (the directory holding `series` and the patches)")
    if mode is None or not stat.S_ISDIR(mode):
        raise UsageError(f"{directory}: no such series directory")
    if not _is_file(series_file, directory):
        raise UsageError(f"{series_file}: missing (a series directory needs a `series` file)")
    names: list[str] = []
    for number, raw in enumerate(_read_text(series_file).splitlines(), 1):
        name = raw.split("#", 1)[0].strip()
        if not name:
            continue
        # no whitespace at all: a series.lock line ends at the name's first (str.isspace is re's \s)
        if "/" in name or "\0" in name or any(c.isspace() for c in name) or name in (".", ".."):  # (no path holds a NUL)
            raise UsageError(f"{series_file}:{number}: expected a patch file name without whitespace or '/', got {name!r}")
        if name in (SERIES_FILE, LOCK_FILE):  # the lock hashes the patches: it cannot be one of them
            raise UsageError(f"{series_file}:{number}: {name} is the series' own file, not a patch")
        if name in names:
            raise UsageError(f"{series_file}:{number}: {name} is listed twice")
        mode = _mode(directory / name, directory)
        if mode is None:
            raise UsageError(f"{series_file}:{number}: {name} does not exist in {directory}")
        if not stat.S_ISREG(mode):
            raise UsageError(f"{series_file}:{number}: {name} in {directory} is not a file (a patch is one)")
        names.append(name)
    return names


def read_lock(directory: Path) -> dict[str, str]:
    """name -> sha256 from DIR/series.lock, in file order."""
    lock_file = directory / LOCK_FILE
    mode = _mode(lock_file, lock_file)
    if mode is None:
        raise UsageError(f"{lock_file}: missing; run `dspark series lock {directory}`")
    if not stat.S_ISREG(mode):  # a directory, a device: series lock cannot write over it
        raise UsageError(f"{lock_file}: not a regular file; remove it, then run `dspark series lock {directory}`")
    locked: dict[str, str] = {}
    for number, raw in enumerate(_read_text(lock_file).splitlines(), 1):
        if not raw.strip():
            continue
        match = _LOCK_LINE.fullmatch(raw)
        if not match:
            raise UsageError(f"{lock_file}:{number}: expected '<sha256>  <patch name>', got {raw!r}")
        if match.group(2) in locked:  # which digest holds? neither is trusted (the later one won)
            raise UsageError(f"{lock_file}:{number}: {match.group(2)} is locked twice; run `dspark series lock {directory}`")
        locked[match.group(2)] = match.group(1)
    return locked


def lock_entries(directory: Path) -> list[tuple[str, str]]:
    """(patch name, sha256) of every patch DIR/series lists, in order: what series.lock holds."""
    return [(name, hashlib.sha256(read_patch_bytes(directory / name)).hexdigest()) for name in read_series(directory)]


def lock_text(directory: Path, entries: list[tuple[str, str]] | None = None) -> str:
    return "".join(f"{sha}  {name}\n" for name, sha in (lock_entries(directory) if entries is None else entries))


def write_lock(directory: Path, entries: list[tuple[str, str]] | None = None) -> Path:
    lock_file = directory / LOCK_FILE
    write_text_atomically(lock_file, lock_text(directory, entries))
    return lock_file


def check_lock(directory: Path, entries: list[tuple[str, str]] | None = None) -> None:
    """CheckFailed unless series.lock is exactly what `dspark series lock` would write, naming the
    first difference so that a CI log says which patch moved. A missing or malformed lock is a "no"
    of this check too (exit 1), where apply refuses it as bad input."""
    entries = lock_entries(directory) if entries is None else entries
    lock_file = directory / LOCK_FILE
    relock = f"run `dspark series lock {directory}`"
    if not lock_file.exists():
        raise CheckFailed(f"{lock_file}: missing; {relock}")
    if _read_text(lock_file) == lock_text(directory, entries):  # a directory there: _read_text says so
        return
    try:
        locked = read_lock(directory)
    except UsageError as malformed:
        raise CheckFailed(str(malformed)) from None
    raise CheckFailed(f"{lock_file} is out of date ({_first_difference(locked, entries)}); {relock}")


def _first_difference(locked: dict[str, str], entries: list[tuple[str, str]]) -> str:
    for name, sha in entries:
        if name not in locked:
            return f"{name} is listed in series but not locked"
        if locked[name] != sha:
            return f"{name} changed: sha256 {sha[:12]}…, locked {locked[name][:12]}…"
    listed = {name for name, _ in entries}
    for name in locked:
        if name not in listed:
            return f"{name} is locked but not listed in series"
    return "the order or the layout of its lines differs"


def load_series(directory: Path, layer: str) -> list[Patch]:
    """The patches of one layer, each checked against the lock. Raises before anything is applied."""
    names = read_series(directory)
    locked = read_lock(directory)
    lock_file = directory / LOCK_FILE
    extra = [name for name in locked if name not in names]
    if extra:
        raise UsageError(f"{lock_file}: {extra[0]} is locked but not listed in series; relock")
    patches = []
    for name in names:
        if name not in locked:
            raise UsageError(f"{lock_file}: {name} has no digest; run `dspark series lock {directory}`")
        text = read_patch_bytes(directory / name)
        _check_line_ends(directory / name, text)  # before the lock, which a conversion also fails
        actual = hashlib.sha256(text).hexdigest()
        if actual != locked[name]:
            raise UsageError(
                f"{directory / name}: sha256 {actual[:12]}… does not match the lock ({locked[name][:12]}…)"
            )
        patches.append(Patch(layer=layer, path=directory / name, sha256=actual))
    check_patches(directory, names)
    return patches


def check_patches(directory: Path, names: list[str]) -> None:
    """What apply refuses in a series, refused when it is locked (`dspark series lock`): a listed
    file with no diff in it, or one git cannot parse."""
    for name in names:
        text = read_patch_bytes(directory / name)
        _check_line_ends(directory / name, text)
        _check_is_patch(directory / name, text)
    _check_parses([directory / name for name in names])


def _check_line_ends(path: Path, text: bytes) -> None:
    """Refuse a patch file every line of which ends in CRLF: git format-patch writes its header
    lines (From, Subject, diff --git, @@) with LF, and a patch of CRLF files has CRs on its content
    lines only (kept: they are that file's bytes), so a checkout converted this one (core.autocrlf),
    and git apply matches none of its hunks (after a lock that fails, or was made of the converted bytes)."""
    if b"\n" in text and text.count(b"\r\n") == text.count(b"\n"):
        raise UsageError(f"{path}: every line ends in CRLF, git's header lines too (git format-patch writes LF "
                         "there): a checkout converted its line ends (core.autocrlf=true?); mark the series' files "
                         "-text (`*.patch -text`, `series -text` and `series.lock -text` in the .gitattributes of the "
                         "repository holding them), then delete them and check them out again (`git checkout -- <dir>`)")


def _check_is_patch(path: Path, text: bytes) -> None:
    if not _DIFF.search(text):
        raise UsageError(f"{path}: not a patch (no diff in it)")


def _check_parses(paths: list[Path]) -> None:
    """git reads the diffs (parsing only, no tree needed; one git for the series, then one per file
    to name the one it could not read): a header with a hunk that is no hunk, or one cut short,
    failed later in git am, reported as the patch not applying."""
    if not paths:
        return
    git = Git(paths[0].parent)  # parsing only: any directory will do; this one exists

    def parse(*files: Path):
        return git.run("apply", "--numstat", "--", *(os.path.abspath(f) for f in files), check=False)

    if parse(*paths).returncode == 0:
        return
    for path in paths:
        parsed = parse(path)
        if parsed.returncode != 0:
            said = parsed.stderr.strip().splitlines() or [f"git apply exit {parsed.returncode}"]
            raise UsageError(f"{path}: not a patch git can read ({said[0].removeprefix('error: ')})")


def marker_constants(marker: Path) -> dict:
    """The literal constants (SERIES, PATCHES, ...) of a marker module (<package>/_dspark.py, added by
    a series' first patch), read with ast so the engine is never imported; assignments that are not
    literals are skipped. Raises ValueError for a file that is not readable Python."""
    try:
        tree = ast.parse(marker.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError) as exc:  # the last two: absurd nesting
        raise ValueError(f"{marker} is not readable Python: {exc or type(exc).__name__}") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, RecursionError):
                pass  # not a literal: never evaluated
    return values


def marker_with(text: str, series: str, patches: list[str]) -> str | None:
    """A marker module's text naming `series` (e.g. "vllm/v0.34.0") and listing `patches`, its
    other lines kept; None when it does not have the SERIES line and PATCHES block our markers
    have, for a rebase to leave it to a human rather than guess."""
    if len(_MARKER_SERIES.findall(text)) != 1 or len(_MARKER_PATCHES.findall(text)) != 1:
        return None
    listed = "".join(f"    {json.dumps(name)},\n" for name in patches)  # a JSON string is a Python literal
    text = _MARKER_SERIES.sub(lambda _: f"SERIES = {json.dumps(series)}", text)
    return _MARKER_PATCHES.sub(lambda _: f"PATCHES = [\n{listed}]", text)
