"""Apply one format-patch file as one commit (like `git am`), and explain a patch that fails."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dspark_cli.diff_headers import file_diffs
from dspark_cli.series import Patch
from dspark_cli.workspace import (DSPARK_IDENTITY, OUR_COMMITS, TRAILER_BLOB, TRAILER_PATCH, TRAILER_SHA, GitFailed,
                                  Workspace, environment_failure, kill_point)

_HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+\d+(?:,\d+)? @@")
_FAILED_AT = re.compile(r"patch failed: (.+):(\d+)$")
_FILE_ERROR = re.compile(r"^(?:patch failed: )?(.+?): (.+)$")  # a git_errors line


class PatchConflict(Exception):
    """`git apply` refused a patch; `file`/`hunk` say where, as precisely as git tells."""

    def __init__(self, patch: Patch, file: str | None, hunk: str | None, detail: str):
        self.patch, self.file, self.hunk, self.detail = patch, file, hunk, detail
        where = (f"file {file}" + (f", hunk {hunk}" if hunk else "") + ": ") if file else ""
        super().__init__(f"{patch.label} did not apply: {where}{detail}")


@dataclass(frozen=True)
class MailInfo:
    author: str
    email: str
    date: str
    subject: str
    body: str


def mail_info(ws: Workspace, patch: Patch) -> MailInfo:
    """Author, date, subject and message of a format-patch file, parsed by `git mailinfo`."""
    with tempfile.TemporaryDirectory() as tmp:
        msg, diff = Path(tmp) / "msg", Path(tmp) / "patch"
        raw = patch.path.read_text(encoding="utf-8", errors="replace")
        # -b: strip only the [PATCH ...] format-patch adds, not a subject's own leading tag ("[Core] ..."):
        # without it a carried series lost such tags from its subjects, and apply from its commits
        info = ws.git.run("mailinfo", "-u", "-b", str(msg), str(diff), input=raw).stdout
        body = msg.read_text(encoding="utf-8", errors="replace").strip()
    fields = dict(line.split(": ", 1) for line in info.splitlines() if ": " in line)
    return MailInfo(
        author=fields.get("Author", "").strip() or "dspark",
        email=fields.get("Email", "").strip() or "dspark@localhost",
        date=fields.get("Date", "").strip(),
        subject=fields.get("Subject", "").strip() or patch.name,
        body=body,
    )


def am_message(ws: Workspace, patch: Patch) -> tuple[list[str], dict]:
    """What `git am` would commit `patch` with: its message's parts (subject, body) and the
    environment naming its author and date."""
    info = mail_info(ws, patch)
    env = {**DSPARK_IDENTITY, "GIT_AUTHOR_NAME": info.author, "GIT_AUTHOR_EMAIL": info.email}
    if info.date:
        env["GIT_AUTHOR_DATE"] = info.date
    return [info.subject] + ([info.body] if info.body else []), env


def commit_as_am(ws: Workspace, patch: Patch, trailers: bool) -> str:
    """Commit the index as `git am` would commit `patch` (its author, date, subject and message),
    with the Dspark-Patch trailers that record it in a workspace when `trailers`; the new commit id."""
    parts, env = am_message(ws, patch)
    if trailers:
        parts.append(f"{TRAILER_PATCH}: {patch.label}\n{TRAILER_SHA}: {patch.sha256}\n"
                     f"{TRAILER_BLOB}: {ws.keep_patch(patch.path)}")
    ws.git.run(*OUR_COMMITS, "commit", "-q", "--no-verify", "--allow-empty", "-F", "-",
               input="\n\n".join(parts) + "\n", env=env)
    return ws.head()


def apply_and_commit(ws: Workspace, patch: Patch, kill_at: str = "") -> str:
    """Apply `patch` with `git apply --3way` and commit it; returns the new commit id. `kill_at`
    names the point between the two for the recovery tests' kill_point."""
    absent = [path for path in created_paths(patch.path) if not os.path.lexists(ws.path / path)]
    result = ws.git.run("apply", "--3way", "--index", "--whitespace=nowarn", str(patch.path), check=False)
    if result.returncode != 0:
        # git wrote the files before it failed to record them (a read-only object store): the
        # rollback's reset does not remove files the index never held
        for path in absent:
            if os.path.lexists(ws.path / path) and not ws.git.ok("ls-files", "--error-unmatch", "--", path):
                os.unlink(ws.path / path)
        if environment_failure(result.stderr):  # no conflict: exit 3, not 4
            raise GitFailed(("apply",), result)
        raise diagnose(ws, patch, result.stderr)
    kill_point(kill_at)
    if ws.git.ok("diff", "--cached", "--quiet"):
        # Like `git am`, which stops there: an empty commit would claim the patch did something.
        raise PatchConflict(patch, None, None, "its changes are already in the tree (an earlier patch or the "
                                               "base made them); drop it from its series")
    return commit_as_am(ws, patch, trailers=True)


def created_paths(patch_path: Path) -> list[str]:
    """The paths a patch file creates: its new files, and its renames' and copies' targets."""
    text = patch_path.read_text(encoding="utf-8", errors="surrogateescape")
    return [diff.new for diff in file_diffs(text) if diff.created]


def diagnose(ws: Workspace, patch: Patch, three_way_stderr: str) -> PatchConflict:
    """Find the file and hunk that failed: reset the half-applied patch, then ask `git apply --check`."""
    ws.git.run("reset", "-q", "--hard")
    check = ws.git.run("apply", "--check", "--verbose", str(patch.path), check=False)
    stderr = check.stderr if check.returncode != 0 else three_way_stderr
    errors = git_errors(stderr)
    for line in errors:
        failed = _FAILED_AT.search(line)
        if failed:
            file, old_start = failed.group(1), int(failed.group(2))
            return PatchConflict(patch, file, hunk_at(patch.path, file, old_start), "context does not match the tree")
    for line in errors:
        match = _FILE_ERROR.match(line)
        if match:
            return PatchConflict(patch, match.group(1), None, match.group(2))
    detail = (errors or stderr.strip().splitlines() or ["git apply failed"])[0]
    return PatchConflict(patch, None, None, detail)


def git_errors(stderr: str) -> list[str]:
    """git's `error: ` lines, without that prefix."""
    return [line.removeprefix("error: ") for line in stderr.splitlines() if line.startswith("error:")]


def hunk_at(patch_path: Path, file: str, old_start: int) -> str | None:
    """'#2 (@@ -12,6 +12,7 @@)': the hunk of `file` (either of its names) in the patch that starts
    at old line `old_start`."""
    for diff in file_diffs(patch_path.read_text(encoding="utf-8", errors="surrogateescape")):
        if file not in (diff.old, diff.new):
            continue
        for number, line in enumerate(diff.hunks, 1):
            match = _HUNK.match(line)
            if match and int(match.group(1)) == old_start:
                return f"#{number} ({line.split('@@')[1].strip().join(['@@ ', ' @@'])})"
    return None
