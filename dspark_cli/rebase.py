"""Carry a patch series onto another upstream tree: `dspark rebase`.

The worktree holds both trees: the commit the series was made on (`base`) and the new upstream
commit (`onto`). Each patch is applied on `onto` in series order and classified:

  clean     `git apply` with the patch's own context (hunks may sit at an offset);
  3-way     the context moved or changed, and `git apply --3way` merged the patch using the
            base blobs named in its `index` lines (which is why `base` must be in the repository);
  conflict  the merge left conflict markers (or could not run); the rebase stops there, on the
            work branch, for a human to resolve;
  already upstream  it applied but changed nothing: the new tree has its changes. It makes no
            commit and is left out of the refreshed series (`dspark apply` refuses such a patch).

Each applied patch becomes one commit (author, date and message kept, like `git am`). When every
patch applied, the marker module is pointed at the new series (refresh_marker) and the refreshed
series is written from those commits with `git format-patch`, with the original file names, order
and amount of diff context, and a new lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import py_compile
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dspark_cli import oplock, pypi_source
from dspark_cli import series as series_mod
from dspark_cli.compat import Pin, ReleaseFile
from dspark_cli.diff_headers import file_diffs, unquote
from dspark_cli.errors import EnvironmentProblem, UsageError, name_some
from dspark_cli.files import (cannot_make_in, check_dir_option, move_into_place, refuse_replacing_cwd,
                              write_text_atomically)
from dspark_cli.flock import dead_scratches, remove_dead_scratches, scratch_beside
from dspark_cli.patching import am_message, commit_as_am, created_paths, git_errors, hunk_at
from dspark_cli.series import MARKER_NAME, Patch, marker_with
from dspark_cli.workspace import DSPARK_AUTHOR, DSPARK_IDENTITY, Workspace

CLEAN, THREE_WAY, CONFLICT, NOT_RUN = "clean", "3-way", "conflict", "not run"
RESOLVED = "resolved"  # a conflict a human resolved and committed on the work branch (--continue)
ALREADY = "already upstream"  # applied to no change: dropped from the refreshed series
SCRATCH = "series"  # the kind of write_series' scratch directories (flock.scratch_beside)
_OFFSET = re.compile(r"Hunk #(\d+) succeeded at (\d+)(?: \(offset (-?\d+) lines?\))?")
_CHECKING = re.compile(r"^Checking patch (.+)\.\.\.$")
_AUTHOR = re.compile(r"^author (.*) <(.*)> (\d+ [+-]\d{4})$", re.M)  # a raw commit's author header
_HUNK_HEADER = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")


@dataclass
class PatchOutcome:
    patch: str
    status: str
    files: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # offsets, merged files, conflict regions
    commit: str | None = None


@dataclass(frozen=True)
class Underlay:
    """DSpark's series a layered series (`dspark apply --series`) sits on: `old` (named `old_name`,
    e.g. vllm/v0.32.0) on the base tree, `new` on the tree it is carried onto."""
    old_name: str
    old: list[Patch]
    new_name: str
    new: list[Patch]


@dataclass(frozen=True)
class Trees:
    """The commits a series is carried between: upstream's `base` (it was made on) and `onto`;
    for a layered series, `base_with`/`onto_with` are those with DSpark's series of `underlay`
    applied, which the series is made on and carried onto (otherwise the upstream commits)."""
    base: str
    onto: str
    base_with: str
    onto_with: str
    underlay: Underlay | None = None

    def gone_label(self, ws: Workspace, file: str, series_adds: set[str]) -> str:
        """Why a file the patch changes is not in the tree it is carried onto."""
        if file in series_adds:  # a patch before it adds it: one resolved to leave it out, say
            return f"{GONE}: an earlier patch of this series adds it, and the work branch does not have it"
        if not _has(ws, self.base_with, file):
            return NEVER_UPSTREAM
        if self.underlay is not None and not _has(ws, self.base, file):
            return f"{GONE}: DSpark's series {self.underlay.old_name} adds it, {self.underlay.new_name} does not"
        if self.underlay is not None and _has(ws, self.onto, file):
            return f"{GONE}: DSpark's series {self.underlay.new_name} deletes it"
        renamed = _renamed_to(ws, self.base, self.onto, file)
        return f"renamed upstream to {renamed} ({GONE})" if renamed else f"deleted upstream ({GONE})"

    def already_detail(self) -> str:
        where = f" with DSpark's series {self.underlay.new_name}" if self.underlay else ""
        return f"its changes are already in the new tree{where}: dropped from the refreshed series"

    def to_json(self) -> dict:
        """upstream's base and onto; for a layered series, DSpark's series under it and the trees with them."""
        under = None if self.underlay is None else {
            "base_series": self.underlay.old_name, "onto_series": self.underlay.new_name,
            "base_with_series": self.base_with, "onto_with_series": self.onto_with}
        return {"base": self.base, "onto": self.onto, "under": under}


def _renamed_to(ws: Workspace, old: str, new: str, file: str) -> str | None:
    """Where upstream moved `file` between commits `old` and `new` (git's rename detection), if it
    did: a file moved was reported "deleted upstream", which sent the human looking for where its
    code went instead of naming it."""
    listed = ws.git.run("diff", "-M", "--diff-filter=R", "--name-status", "-z", old, new, check=False)
    fields = listed.stdout.split("\0") if listed.returncode == 0 else []
    for i in range(0, len(fields) - 2, 3):  # R<score> NUL old NUL new NUL
        if fields[i].startswith("R") and fields[i + 1] == file:
            return fields[i + 2]
    return None


def _has(ws: Workspace, commit: str, file: str) -> bool:
    return ws.git.ok("cat-file", "-e", f"{commit}:{file}")


@dataclass
class RebaseResult:
    workdir: Path
    branch: str
    trees: Trees
    outcomes: list[PatchOutcome]
    out_dir: Path | None = None
    compiled: list[str] = field(default_factory=list)  # patched .py files that byte-compile
    compile_errors: list[str] = field(default_factory=list)
    leftover_markers: list[str] = field(default_factory=list)  # "file: ... line N" in a resolution's other files
    sources: dict[str, str] = field(default_factory=dict)  # patch name -> sha256 of the file carried (the record's)

    @property
    def conflicted(self) -> PatchOutcome | None:
        return next((o for o in self.outcomes if o.status == CONFLICT), None)

    def to_json(self) -> dict:
        return {
            "workdir": str(self.workdir), "branch": self.branch, **self.trees.to_json(),
            "patches": [vars(o) for o in self.outcomes],
            "out_dir": str(self.out_dir) if self.out_dir else None,
            "compiled": self.compiled, "compile_errors": self.compile_errors,
            "leftover_markers": self.leftover_markers,
        }


def patch_files(text: str) -> list[str]:
    """Paths a patch touches (new side; the old side for deletions)."""
    return [diff.path for diff in file_diffs(text)]


def changed_files(text: str) -> list[str]:
    """Paths a patch expects to exist, as the old tree named them (a rename's or copy's source; not
    the files it creates)."""
    return [diff.old for diff in file_diffs(text) if diff.old is not None]


def context_lines(text: str, default: int = 3) -> int:
    """The diff context the patch was made with, so a refreshed patch keeps the original's minimal
    context: its widest run of context before or after a hunk's changes (a hunk at a file's start
    has none before them, one at its end none after). Each hunk is read by its header's counts."""
    widest, lines = 0, text.split("\n")  # not splitlines(): a form feed in a line is no line break
    for i, line in enumerate(lines):
        header = _HUNK_HEADER.match(line)
        if not header:
            continue
        old, new = (1 if n is None else int(n) for n in header.groups())
        marks = []
        for body in lines[i + 1:]:
            if old <= 0 and new <= 0:
                break
            mark = body[:1] or " "  # an empty context line whose space an editor stripped
            if mark == "\\":  # "\ No newline at end of file"
                continue
            marks.append(mark)
            old, new = old - (mark != "+"), new - (mark != "-")
        run = "".join(marks)
        widest = max(widest, len(run) - len(run.lstrip(" ")), len(run) - len(run.rstrip(" ")))
    return widest or default


_INDEX_LINE = re.compile(r"^index ([0-9a-f]+)\.\.([0-9a-f]+)(?: |$)", re.M)


def index_abbrev(text: str) -> str:
    """format-patch's option naming blobs in `index` lines as the patch did: its length (git's
    default grows with the repository's object count, and the user's core.abbrev changes it, so a
    refreshed patch differed from one carried unchanged), or --full-index. git still lengthens a
    name that would be ambiguous."""
    lengths = [len(name) for names in _INDEX_LINE.findall(text) for name in names]
    short = [n for n in lengths if n < 40]  # a binary file's are full whatever the option (--binary)
    if lengths and not short:
        return "--full-index"
    return f"--abbrev={max(min(short), 7) if short else 7}"


def conflict_regions(path: Path) -> list[str]:
    """'120-134' line ranges of the conflict markers left in a file."""
    regions, start = [], None
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    for number, line in enumerate(lines, 1):
        if line.startswith("<<<<<<< "):
            start = number
        elif line.startswith(">>>>>>> ") and start is not None:
            regions.append(f"{start}-{number}")
            start = None
    return regions


def check_branch_free(ws: Workspace, branch: str, force: bool) -> None:
    if ws.branch_sha(branch) is not None and not force:
        raise UsageError(f"{ws.path}: branch {branch} exists (an earlier rebase, perhaps being resolved); "
                         "finish or delete it, or pass --force to start over")


def check_worktree_free(ws: Workspace, branch: str, force: bool) -> None:
    """What another run left in this work tree (a conflict being resolved, a resolution not yet
    continued, edits) is kept unless `force`: a run for another branch would reset it away."""
    if force:
        return
    if ws.local_changes():
        raise UsageError(f"{ws.path}: holds changes not committed (a conflict being resolved?): commit them and "
                         "run that rebase with --continue, give another --workdir, or --force to discard them")
    record = _read_record(ws)
    if record.get("branch") not in (None, branch) and not record.get("finished"):
        raise UsageError(f"{ws.path}: holds the unfinished rebase of {record['branch']} (resolve it and run it with "
                         "--continue); give another --workdir, or --force to discard it (a run of an older dspark, "
                         "or one stopped as it wrote its series, is taken for unfinished too)")


def start_branch(ws: Workspace, branch: str, onto: str, force: bool) -> None:
    """Put the worktree on a fresh `branch` at `onto`; an existing branch, and another run's
    unfinished work in the worktree, are kept unless `force`."""
    check_branch_free(ws, branch, force)
    check_worktree_free(ws, branch, force)
    # The record describes the branch being replaced: a run that fails midway must not leave
    # --continue matching the new branch against it (the marker keeps check_made_by_rebase true).
    mark_made_by_rebase(ws)
    _record_file(ws).unlink(missing_ok=True)
    ws.git.run("reset", "-q", "--hard", check=False)  # a conflicted earlier run (only with --force)
    ws.git.run("checkout", "-q", "-f", "-B", branch, onto)
    ws.git.run("clean", "-q", "-fdx")


def apply_one(ws: Workspace, patch: Patch, trees: Trees, series_adds: set[str] = frozenset()) -> PatchOutcome:
    """Apply one patch on HEAD as a commit, or leave its conflict markers in the worktree. `trees`
    tell a file upstream deleted from one it never had (or one DSpark's series under it dropped);
    `series_adds`: files the earlier patches of this series add (never upstream, but not another's)."""
    text = patch.path.read_text(encoding="utf-8", errors="replace")
    outcome = PatchOutcome(patch=patch.name, status=CLEAN, files=patch_files(text))
    check = ws.git.run("apply", "--check", "--verbose", "--whitespace=nowarn", str(patch.path), check=False)
    if check.returncode == 0:
        ws.git.run("apply", "--index", "--whitespace=nowarn", str(patch.path))
        outcome.details = _offsets(check.stderr)
    else:
        merged = ws.git.run("apply", "--3way", "--index", "--verbose", "--whitespace=nowarn", str(patch.path),
                            check=False)
        unmerged = [f for f in ws.git.out("diff", "--name-only", "-z", "--diff-filter=U").split("\0") if f]
        if merged.returncode != 0 or unmerged:
            outcome.status = CONFLICT
            gone = {f: trees.gone_label(ws, f, series_adds) for f in changed_files(text) if not _has(ws, "HEAD", f)}
            outcome.details = _conflict_details(ws, patch, check.stderr, merged.stderr, unmerged, gone)
            return outcome
        outcome.status = THREE_WAY
        outcome.details = _failed_hunks(patch, check.stderr)
    if ws.git.ok("diff", "--cached", "--quiet"):
        # Nothing to commit: an (empty) commit would become a 0-byte patch that no series can apply.
        outcome.status = ALREADY
        outcome.details = [trees.already_detail()]
        return outcome
    outcome.commit = commit_as_am(ws, patch, trailers=False)  # the refreshed series is made from it
    return outcome


def _in_new_tree(ws: Workspace, patch: Patch, onto: str) -> bool:
    """Whether `patch` changes nothing on the new tree `onto` itself: its change is upstream's (or,
    layered, DSpark's series'), not one a resolution on the work branch brought in."""
    with ws.scratch_index(onto) as index:  # the patch undoes on it: its result is there already
        return ws.git.run("apply", "--cached", "--check", "-R", "--whitespace=nowarn", str(patch.path), env=index,
                          check=False).returncode == 0


def _offsets(verbose_stderr: str) -> list[str]:
    details, current = [], None
    for line in verbose_stderr.splitlines():
        checking = _CHECKING.match(line)
        if checking:
            current = " => ".join(unquote(name) for name in checking.group(1).split(" => "))  # a rename: old => new
        match = _OFFSET.search(line)
        if match and match.group(3):
            details.append(f"{current}: hunk #{match.group(1)} at line {match.group(2)} (offset {match.group(3)})")
    return details


def _failed_hunks(patch: Patch, check_stderr: str, merged: bool = True) -> list[str]:
    """'file: hunk #2 (@@ … @@) merged 3-way' for each hunk whose context no longer matched; with
    `merged` False (the 3-way merge could not run), 'file: hunk #2 (@@ … @@) does not apply'."""
    details, how = [], ", merged 3-way" if merged else ""
    for match in re.finditer(r"patch failed: (.+):(\d+)", check_stderr):
        file, line = match.group(1), int(match.group(2))
        hunk = hunk_at(patch.path, file, line) or f"at old line {line}"
        details.append(f"{file}: hunk {hunk}" + (" merged 3-way" if merged else " does not apply"))
    for match in re.finditer(r"error: (.+): (does not exist in index|No such file or directory)", check_stderr):
        details.append(f"{match.group(1)}: moved or missing upstream{how}")
    for match in re.finditer(r"error: (.+): already exists in (working directory|index)", check_stderr):
        details.append(f"{match.group(1)}: a file this patch adds, added upstream too{how}")
    return details


UNMERGED_NO_MARKERS = "unmerged, without conflict markers (binary)"
GONE = "not in the new tree"  # in every label of a file the base tree had and the new one lacks
# A series layered on DSpark's (apply --series) changes files DSpark's adds: no upstream tree has them.
NEVER_UPSTREAM = "in neither upstream tree (a file another series adds)"


def _conflict_details(ws: Workspace, patch: Patch, check_stderr: str, merge_stderr: str,
                      unmerged: list[str], gone: dict[str, str]) -> list[str]:
    """What stopped the patch: conflict regions per file, the files it changes that the new tree
    does not have (`gone`, each with why), and otherwise what git said."""
    details = []
    for file in unmerged:
        regions = conflict_regions(ws.path / file)
        # git writes no markers into a binary file: the work tree keeps the new tree's version
        details.append(f"{file}: conflict markers at lines {', '.join(regions)}" if regions
                       else f"{file}: {UNMERGED_NO_MARKERS} (the work tree has the new tree's version; "
                            f"`git checkout --theirs -- {file}` the patch's)")
    details += [f"{file}: {why}" for file, why in gone.items()]
    if not unmerged:
        # 3-way could not even start (no base blob, a file gone, the deletion of a file the new tree
        # changed, which git does not merge): `git apply` applied none of the patch, so its hunks
        # are no "merged 3-way" (they read as done, and the way on as "markers left"). git's "patch
        # failed: F:N" is named as its hunk; its "while searching for:" heads the hunk's lines.
        said = _failed_hunks(patch, check_stderr, merged=False)
        said += [d for d in git_errors(merge_stderr)
                 if d not in said and d != "while searching for:" and not _PATCH_FAILED.fullmatch(d)]
        details += [d for d in said if d.split(": ", 1)[0] not in gone]  # git's words for a gone file add nothing
        if not gone:  # (a gone file's label leads to the same way on)
            details.append(NOT_APPLIED)
    return details or ["git apply --3way failed"]


_PATCH_FAILED = re.compile(r"patch failed: .+:\d+")
# A conflict that left no markers to resolve: the patch's change is to be made by hand.
NOT_APPLIED = "git could not merge it 3-way: none of it was applied"


def with_series(ws: Workspace, commit: str, patches: list[Patch], name: str) -> str:
    """`commit` with DSpark's series `name` applied, as one child commit made in a scratch index
    (HEAD and the work tree untouched). Its author, committer and date are fixed (the date is
    `commit`'s), so every run makes the same commit id and --continue finds the tree it stopped on."""
    with ws.scratch_index(commit) as env:
        for patch in patches:
            applied = ws.git.run("apply", "--cached", "--whitespace=nowarn", str(patch.path), env=env, check=False)
            if applied.returncode != 0:
                said = (git_errors(applied.stderr) or ["git apply failed"])[0]
                raise UsageError(f"DSpark's series {name} does not apply to its own upstream tree ({commit[:12]}): "
                                 f"{patch.name}: {said}")
        tree = ws.git.out("write-tree", env=env)
    date = f"@{ws.git.out('show', '-s', '--format=%ct', commit)} +0000"
    return ws.git.out("commit-tree", tree, "-p", commit, "-F", "-", input=f"upstream with DSpark's series {name}\n",
                      env={**DSPARK_AUTHOR, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date})


def rebase_series(ws: Workspace, base: str, onto: str, patches: list[Patch], branch: str,
                  force: bool = False, resume: bool = False, underlay: Underlay | None = None) -> RebaseResult:
    """Apply `patches` on `onto` (both commits in ws) one by one; stop at the first conflict.
    With an `underlay`, `patches` are a series layered on DSpark's: they are carried from `base`
    with DSpark's old series onto `onto` with its new one.

    With `resume`, the work branch already holds the first patches as commits (a human resolved a
    conflict and committed it): those count as resolved and the rest are applied on top."""
    resolved = []
    for name, commit in (("base", base), ("onto", onto)):
        resolved.append(ws.resolve_commit(commit))
        if resolved[-1] is None:
            raise UsageError(f"{ws.path}: {name} commit {commit} is not in the repository")
    base, onto = resolved
    trees = Trees(base, onto, base, onto)
    if underlay is not None:
        trees = Trees(base, onto, with_series(ws, base, underlay.old, underlay.old_name),
                      with_series(ws, onto, underlay.new, underlay.new_name), underlay)
    with oplock.exclusive(ws.git_dir, ws.path):  # one dspark run at a time in this repository
        take_over_git_locks(ws, branch)
        try:
            return _rebase_locked(ws, trees, patches, branch, force, resume)
        except BaseException:  # our git exited with us (a Ctrl-C reaches it too): no lock of its is left
            run_ended(ws)
            raise


def _running_file(ws: Workspace) -> Path:
    return ws.git_dir / "dspark" / "rebase-running"


def take_over_git_locks(ws: Workspace, branch: str) -> None:
    """Remove the git lock files (index.lock, HEAD.lock, the work branch's) a git killed with an
    earlier run of ours left, which failed every later run's reset and checkout; then mark this run
    as running (run_ended clears it). Only a killed run leaves the mark, so only locks made since it
    started are its git's: any other is a live git's (a `git commit -a` of the human resolving a
    conflict, waiting on its editor) or one killed outside dspark, and deleting it let two gits
    write the index at once. Refused as apply refuses it (exit 2), and left alone."""
    running = _running_file(ws)
    try:
        since = running.stat().st_mtime  # the file's own clock and granularity, as the locks'
    except OSError:
        since = None
    theirs = ws.git_locks(branch) if since is None else ws.git_locks(branch, older_than=since)
    if theirs:
        raise UsageError(f"{theirs[0]} exists: another git process is running in {ws.path}, or one was killed and "
                         "left it; let it finish, or remove the file if no git process is running, and run again")
    ws.remove_git_locks(branch)
    running.parent.mkdir(parents=True, exist_ok=True)
    running.write_text(f"{os.getpid()}\n")  # rewritten: its mtime is this run's start


def run_ended(ws: Workspace) -> None:
    """This run's git commands are over (finished, failed or interrupted, not killed)."""
    _running_file(ws).unlink(missing_ok=True)


def _rebase_locked(ws: Workspace, trees: Trees, patches: list[Patch], branch: str, force: bool,
                   resume: bool) -> RebaseResult:
    outcomes: list[PatchOutcome] = []
    if resume:
        outcomes = _resumed_outcomes(ws, branch, trees, patches)
    else:
        start_branch(ws, branch, trees.onto_with, force)
    series_adds = {f for p in patches[:len(outcomes)] for f in created_paths(p.path)}  # by the patches before
    tip, resolved, start = ws.head(), any(o.status == RESOLVED for o in outcomes), len(outcomes)
    for patch in patches[len(outcomes):]:
        if any(o.status == CONFLICT for o in outcomes):
            text = patch.path.read_text(encoding="utf-8", errors="replace")
            outcomes.append(PatchOutcome(patch=patch.name, status=NOT_RUN, files=patch_files(text)))
            continue
        before = ws.head()
        _record_applying(ws, patch, before)  # a kill inside it: the next --continue takes it back out
        try:
            outcomes.append(apply_one(ws, patch, trees, series_adds))
        except BaseException:  # a Ctrl-C inside it: what it staged or committed is not recorded,
            ws.git.run("reset", "-q", "--hard", before, check=False)  # so the next --continue applies it again
            raise
        series_adds |= set(created_paths(patch.path))
        if resolved and outcomes[-1].status == ALREADY and not _in_new_tree(ws, patch, trees.onto_with):
            ws.git.run("reset", "-q", "--hard", tip)  # the branch as you left it
            _record_progress(ws, branch, trees, outcomes[:start], patches)  # and the record as it matches it
            raise UsageError(f"{ws.path}: {patch.name}'s change is on the work branch but not in the new tree: "
                             "your resolution holds it (amended or copied in?); leave it out of the resolution, "
                             "then --continue")
        # A run stopped from here on (Ctrl-C, a kill) left the commits so far: --continue matches them.
        _record_progress(ws, branch, trees, outcomes, patches)
    result = RebaseResult(workdir=ws.path, branch=branch, trees=trees, outcomes=outcomes,
                          sources={p.name: p.sha256 for p in patches})
    _record_statuses(ws, result)
    return result


def _record_progress(ws: Workspace, branch: str, trees: Trees, outcomes: list[PatchOutcome],
                     patches: list[Patch]) -> None:
    """The record of a run under way: the outcomes so far, the patches after them not run."""
    rest = [PatchOutcome(patch=p.name, status=NOT_RUN) for p in patches[len(outcomes):]]
    _record_statuses(ws, RebaseResult(workdir=ws.path, branch=branch, trees=trees, outcomes=[*outcomes, *rest],
                                      sources={p.name: p.sha256 for p in patches}))


def _record_applying(ws: Workspace, patch: Patch, on: str) -> None:
    """Name the patch being applied on `on` in the record (the next _record_progress drops it)."""
    record = _read_record(ws)
    if "patches" in record:  # only a run with patches recorded can be continued
        write_text_atomically(_record_file(ws), json.dumps({**record, "applying": {"patch": patch.name, "on": on}}))


def _take_back_killed_patch(ws: Workspace, patches: list[Patch], pending: object) -> None:
    """A run killed inside a patch (its change staged or being written, no commit yet) left that
    change in the work tree, the record naming the patch and the commit it went onto: when every
    changed file holds that commit's bytes or the patch's (none of the user's edits), it is taken
    back out, so the patch is applied again. Anything else is left for the local-changes refusal."""
    if not isinstance(pending, dict) or pending.get("on") != ws.head():
        return
    patch = next((p for p in patches if p.name == pending.get("patch")), None)
    if patch is None or ws.git.out("diff", "--name-only", "--diff-filter=U"):
        return
    changed = {f for f in ws.git.run("diff", "--name-only", "--no-renames", "-z", "HEAD").stdout.split("\0") if f}
    untracked = {f for f in ws.git.run("ls-files", "--others", "--exclude-standard", "-z").stdout.split("\0") if f}
    if not changed | untracked:
        return
    with ws.scratch_index("HEAD") as index:  # the tree the patch makes on it
        made = ws.git.run("apply", "--cached", "--whitespace=nowarn", str(patch.path), env=index, check=False)
        if made.returncode != 0:
            made = ws.git.run("apply", "--cached", "--3way", "--whitespace=nowarn", str(patch.path), env=index,
                              check=False)
        if made.returncode != 0:
            return
        target = ws.git.out("write-tree", env=index)

    def blob(rev: str, path: str) -> str | None:
        found = ws.git.run("rev-parse", "--verify", "-q", f"{rev}:{path}", check=False)
        return found.stdout.strip() if found.returncode == 0 else None

    for path in changed | untracked:
        allowed = {blob("HEAD", path), blob(target, path)}
        staged = ws.git.out("--literal-pathspecs", "ls-files", "-s", "--", path).split()
        on_disk = ws.path / path
        if os.path.islink(on_disk) or (on_disk.exists() and not on_disk.is_file()):
            return
        written = ws.git.out("hash-object", "--", path) if on_disk.exists() else None
        if (staged[1] if len(staged) > 1 else None) not in allowed or written not in allowed:
            return
    ws.git.run("reset", "-q", "--hard")
    for path in untracked:
        (ws.path / path).unlink(missing_ok=True)


def _marker(ws: Workspace) -> Path:
    return ws.git_dir / "dspark" / "rebase-workdir"


def mark_made_by_rebase(ws: Workspace) -> None:
    _marker(ws).parent.mkdir(parents=True, exist_ok=True)
    _marker(ws).write_text("made by dspark rebase, which resets and cleans this work tree on every run\n")


def check_made_by_rebase(ws: Workspace) -> None:
    """A rebase resets and cleans its work tree: refuse any checkout it did not make (the user's
    own, or a worktree of theirs). Work trees of older runs carry the status record instead."""
    if not (_marker(ws).is_file() or _record_file(ws).is_file()):
        raise UsageError(f"{ws.path}: is a checkout dspark rebase did not make, and a rebase resets and cleans "
                         "its work tree; give a new --workdir")


def _record_file(ws: Workspace) -> Path:
    return ws.git_dir / "dspark" / "rebase.json"


def _record_statuses(ws: Workspace, result: RebaseResult, marker_move: dict | None = None) -> None:
    """Remember how each patch applied and its commit, so --continue can match the work branch;
    `marker_move`: the branch move refresh_marker is about to make."""
    record = _record_file(ws)
    record.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(record, json.dumps({
        "branch": result.branch, "onto": result.trees.onto_with, "upstream_onto": result.trees.onto,
        "patches": [{"patch": o.patch, "status": o.status, "commit": o.commit, "details": o.details,
                     "sha256": result.sources.get(o.patch)} for o in result.outcomes],
        **({"marker_move": marker_move} if marker_move else {})}))


def _read_record(ws: Workspace) -> dict:
    try:
        data = json.loads(_record_file(ws).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def record_finished(ws: Workspace) -> None:
    """The run's series is written: another run may take this work tree without --force."""
    write_text_atomically(_record_file(ws), json.dumps({**_read_record(ws), "finished": True}))


def _recorded_outcomes(ws: Workspace, branch: str, trees: Trees) -> list[dict]:
    data = _read_record(ws)
    if (trees.underlay is not None and data.get("branch") == branch and data.get("upstream_onto") == trees.onto
            and data.get("onto") != trees.onto_with):  # the tree with it is made anew from the series' patches
        raise UsageError(f"{ws.path}: DSpark's series {trees.underlay.new_name} changed since the last run of "
                         f"{branch}, so the tree your resolution was made on is gone; start over with --force")
    if data.get("branch") != branch or data.get("onto") != trees.onto_with or "patches" not in data:
        raise UsageError(f"{ws.path}: no record of a rebase of {branch} onto {trees.onto[:12]} here; nothing to "
                         "continue (start over with --force)")
    return finish_marker_move(ws, branch, data)


def _resumed_outcomes(ws: Workspace, branch: str, trees: Trees, patches: list[Patch]) -> list[PatchOutcome]:
    """The outcomes of the patches the last run got through, matched to the work branch's commits
    since `onto` one to one: each patch that applied keeps its recorded commit, the conflicted one
    owns the single commit after them (the human's resolution, which they may amend after a
    byte-compile failure: a resolved patch is matched alike); `already upstream` owns none, unless
    it was an empty resolution: that commit stays its own, so a later --continue still counts it.
    Anything else (an extra commit, a missing or rewritten one) is refused: matching by position
    gave an extra commit to a patch that never ran and silently lost that patch's change. A branch
    reset to a resolution after a byte-compile failure drops the patches the last run applied after
    it: they are applied again."""
    if ws.current_branch() != f"refs/heads/{branch}":
        raise UsageError(f"{ws.path}: not on the work branch {branch}; nothing to continue")
    recorded = _recorded_outcomes(ws, branch, trees)
    if not ws.is_ancestor(trees.onto_with, "HEAD"):  # `git commit --amend` of upstream's own commit, say
        raise UsageError(f"{ws.path}: the work branch {branch} no longer starts from the new tree {trees.onto[:12]} "
                         "(a commit of the new tree amended or reset away?): commit your resolution on top of it "
                         "(not --amend), or start over with --force")
    pending = _read_record(ws).get("applying")  # the patch a killed run was applying, and onto what
    _take_back_killed_patch(ws, patches, pending)
    unmerged = [f for f in ws.git.run("diff", "--name-only", "-z", "--diff-filter=U").stdout.split("\0") if f]
    if unmerged:
        raise UsageError(f"{ws.path}: resolve the conflict markers in {name_some(unmerged)} and commit the patch before "
                         "--continue")
    left = ws.local_changes()
    if left:  # a resolution committed, a merge tool's backup (FILE.orig) or an edit left beside it
        raise UsageError(f"{ws.path}: holds changes not committed ({name_some([line[3:] for line in left])}): commit "
                         "them into the patch's resolution or remove them (a merge tool's .orig backup?), then "
                         "--continue")
    # by name and, for the patches the branch holds (or that a resolution resolves), by content: a
    # --continue with another --from or --series of the same patch names mixed the two series
    if [r["patch"] for r in recorded] != [p.name for p in patches] or any(
            r["status"] != NOT_RUN and r.get("sha256") not in (None, p.sha256) for p, r in zip(patches, recorded)):
        raise UsageError(f"{ws.path}: the series is not the one the last run of {branch} applied; "
                         "start over with --force")
    commits = ws.git.out("rev-list", "--reverse", f"{trees.onto_with}..HEAD").splitlines()
    outcomes: list[PatchOutcome] = []
    expected: list[str] = []  # the commit each patch so far should own, as "name (sha)"
    claimed: list[str | None] = []  # those commits, as found
    resolutions: list[tuple[int, int]] = []  # (outcomes, claimed commits) up to each resolution
    for patch, record in zip(patches, recorded):
        if record["status"] == NOT_RUN:
            break
        files = patch_files(patch.path.read_text(encoding="utf-8", errors="replace"))
        outcome = PatchOutcome(patch=patch.name, status=record["status"], files=files,
                               details=record.get("details", []))
        if record["status"] in (CLEAN, THREE_WAY) or (record["status"] == ALREADY and record["commit"]):
            outcome.commit = record["commit"]
            claimed.append(outcome.commit)
            expected.append(f"{patch.name} ({record['commit'][:12]})")
        elif record["status"] in (CONFLICT, RESOLVED):  # resolved: amended after a byte-compile failure, say
            resolution = commits[len(expected)] if len(commits) > len(expected) else None
            claimed.append(resolution)
            expected.append(f"{patch.name} (your resolution)")
            outcome.commit = resolution  # kept even when dropped: the work branch still holds it
            if resolution and ws.changes_nothing(resolution):  # resolved to the new tree as it is
                outcome.status = ALREADY
                outcome.details = ["your resolution keeps the new tree as it is: dropped from the refreshed series"]
            else:  # a resolution may port the patch to other files (its own was deleted upstream)
                outcome.status, outcome.details = RESOLVED, []
                outcome.files = commit_files(ws, resolution) if resolution else files
            resolutions.append((len(outcomes) + 1, len(claimed)))
        outcomes.append(outcome)
    # The branch reset to a resolution to amend it after a byte-compile failure (the last run got
    # through every patch): the patches it applied after that are ours to apply again.
    got_through = all(r["status"] not in (CONFLICT, NOT_RUN) for r in recorded)
    cut = next(((o, c) for o, c in reversed(resolutions) if claimed[:c] == commits and o < len(outcomes)), None)
    if claimed != commits and got_through and cut is not None:
        outcomes, claimed = outcomes[:cut[0]], claimed[:cut[1]]
    # A run killed between a patch's commit and the record naming it left that commit after the
    # recorded ones: the next patch's, made by dspark (its author, date and message). It is the
    # killed run's own, not the user's: dropped, and the patch applied again.
    if (len(commits) == len(claimed) + 1 and commits[:-1] == claimed and None not in claimed
            and len(outcomes) < len(patches) and _made_for(ws, commits[-1], patches[len(outcomes)])):
        ws.git.run("reset", "-q", "--hard", claimed[-1] if claimed else trees.onto_with)
        commits = commits[:-1]
    # A run killed inside a patch that conflicted (its markers left, the record naming the patch
    # being applied, not the conflict): the one commit on the commit it went onto is your resolution.
    if (len(commits) == len(claimed) + 1 and commits[:-1] == claimed and None not in claimed
            and len(outcomes) < len(patches) and isinstance(pending, dict)
            and pending.get("patch") == patches[len(outcomes)].name
            and pending.get("on") == (claimed[-1] if claimed else trees.onto_with)):
        resolution, patch = commits[-1], patches[len(outcomes)]
        if ws.changes_nothing(resolution):
            outcome = PatchOutcome(patch=patch.name, status=ALREADY, commit=resolution,
                                   files=patch_files(patch.path.read_text(encoding="utf-8", errors="replace")),
                                   details=["your resolution keeps the new tree as it is: dropped from the refreshed "
                                            "series"])
        else:
            outcome = PatchOutcome(patch=patch.name, status=RESOLVED, commit=resolution,
                                   files=commit_files(ws, resolution))
        outcomes.append(outcome)
        claimed.append(resolution)
    if claimed != commits:
        found = ", ".join(c[:12] for c in commits) or "none"
        raise UsageError(f"{branch}: found {len(commits)} commits on the new tree ({found}), expected {len(expected)}, "
                         f"one per patch so far: {', '.join(expected) or 'none'}; leave exactly those "
                         "(one commit resolving the conflict) or start over with --force")
    return outcomes


def _made_for(ws: Workspace, commit: str, patch: Patch) -> bool:
    """Whether `commit` is the one apply_one makes of `patch`: committed by dspark with the patch's
    author, date and message (as `git am` would commit it)."""
    parts, env = am_message(ws, patch)
    wanted = ws.git.run("var", "GIT_AUTHOR_IDENT", env=env).stdout.strip()
    message = ws.git.run("stripspace", input="\n\n".join(parts) + "\n").stdout
    found = ws.git.run("log", "-1", "--format=%an <%ae> %ad%n%cn <%ce>", "--date=raw", commit).stdout.splitlines()
    body = ws.git.run("log", "-1", "--format=%B", commit).stdout
    committer = f"{DSPARK_IDENTITY['GIT_COMMITTER_NAME']} <{DSPARK_IDENTITY['GIT_COMMITTER_EMAIL']}>"
    return found == [wanted, committer] and body.rstrip("\n") == message.rstrip("\n")


def refresh_marker(ws: Workspace, result: RebaseResult, series_name: str) -> None:
    """Point the marker module (<package>/_dspark.py, added by the series' first patch) at the new
    series: carried as it was it named the old pin and listed patches the refreshed series drops,
    which `dspark doctor` reports as drift on every install. Its commit and the later ones (none may
    touch the marker) are re-made with the new marker in their trees, by plumbing: no hook, signing
    or half-done cherry-pick, and the branch moves in one update-ref."""
    kept = [o for o in result.outcomes if o.status != ALREADY]
    owner = next((o for o in kept if o.commit and any(PurePosixPath(f).name == MARKER_NAME for f in o.files)), None)
    if owner is None:
        return
    path = next(f for f in owner.files if PurePosixPath(f).name == MARKER_NAME)
    shown = ws.git.run("show", f"{owner.commit}:{path}", check=False)
    if shown.returncode != 0:
        return  # the patch deletes it
    text = marker_with(shown.stdout, series_name, [o.patch for o in kept])
    if text is None or ws.git.out("log", "--format=%H", f"{owner.commit}..HEAD", "--", path):
        owner.details.append(f"{path}: left as it was (not in the SERIES/PATCHES form, or a later patch "
                             f"changes it): set SERIES = \"{series_name}\" and PATCHES by hand")
        return
    if text == shown.stdout:
        return
    blob = ws.git.out("hash-object", "-w", "--stdin", input=text)
    tip, parent = ws.head(), ws.resolve_commit(f"{owner.commit}^")
    remade = {}
    for commit in [owner.commit, *ws.git.out("rev-list", "--reverse", f"{owner.commit}..HEAD").splitlines()]:
        parent = remade[commit] = _remade_with(ws, commit, parent, path, blob)
    # Journaled: a run stopped between here and the record below is finished by the next --continue
    # (finish_marker_move), whose commits would otherwise match neither record nor branch.
    _record_statuses(ws, result, {"from": tip, "to": parent, "remade": remade, "path": path})
    _move_to_remade(ws, result.branch, tip, parent)
    for outcome in result.outcomes:
        outcome.commit = remade.get(outcome.commit, outcome.commit)
    owner.details.append(f"{path}: names {series_name} and the {len(kept)} patches of the refreshed series")
    _record_statuses(ws, result)


def _move_to_remade(ws: Workspace, branch: str, tip: str, remade_tip: str) -> None:
    ws.git.run("update-ref", f"refs/heads/{branch}", remade_tip, tip)
    ws.git.run("reset", "-q", "--hard")  # the work tree and index to the branch: only the marker changes


def finish_marker_move(ws: Workspace, branch: str, record: dict) -> list[dict]:
    """The recorded outcomes, after finishing a marker refresh the last run journaled and did not
    complete (stopped between its record and the branch move, or before the work tree followed).
    Only when the branch is at either end of that move and nothing but the marker differs from it:
    anything else is the user's and is left to the usual checks."""
    move, patches = record.get("marker_move"), record["patches"]
    if not isinstance(move, dict):
        return patches
    head = ws.branch_sha(branch)
    changed = set(ws.git.out("diff", "--name-only", "-z", "HEAD").split("\0")) - {""}
    if head not in (move.get("from"), move.get("to")) or not changed <= {move.get("path")}:
        return patches
    # What the stopped run may have left: at `from` an untouched tree; at `to` the marker still as
    # `from` had it. Any other marker text is an edit of the user's: left to the local-changes refusal.
    if changed and (head == move["from"] or not (
            ws.git.ok("diff", "--quiet", move["from"], "--", move["path"])
            and ws.git.ok("diff", "--cached", "--quiet", move["from"], "--", move["path"]))):
        return patches
    if head == move["from"]:
        _move_to_remade(ws, branch, move["from"], move["to"])
    elif changed:
        ws.git.run("reset", "-q", "--hard")
    remade = move.get("remade") or {}
    return [{**p, "commit": remade.get(p.get("commit"), p.get("commit"))} for p in patches]


def _remade_with(ws: Workspace, commit: str, parent: str, path: str, blob: str) -> str:
    """`commit` made again on `parent` with `path` set to `blob` in its tree: author, date and
    message kept byte for byte (the message from the raw commit, not a pretty format)."""
    with ws.scratch_index(commit) as index:
        mode = ws.git.out("ls-tree", commit, "--", path).split()[0]
        ws.git.run("update-index", "--cacheinfo", f"{mode},{blob},{path}", env=index)
        tree = ws.git.out("write-tree", env=index)
    raw = ws.git.run("cat-file", "commit", commit).stdout
    headers, message = raw.split("\n\n", 1)
    name, email, date = _AUTHOR.search(headers).groups()
    env = {**DSPARK_IDENTITY, "GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_AUTHOR_DATE": date}
    return ws.git.out("commit-tree", tree, "-p", parent, "-F", "-", input=message, env=env)


def commit_files(ws: Workspace, commit: str) -> list[str]:
    """The paths `commit` changes against its parent (a rename's new name)."""
    listed = ws.git.run("diff-tree", "-r", "-z", "--no-commit-id", "--name-only", commit).stdout
    return [name for name in listed.split("\0") if name]


def byte_compile(ws: Workspace, result: RebaseResult) -> None:
    """Every Python file the refreshed series touches must still compile on the new tree: the
    files of the commits it is made from (a resolution's may not be its patch's)."""
    touched = sorted({f for o in result.outcomes for f in (commit_files(ws, o.commit) if o.commit else o.files)
                      if f.endswith(".py")})
    with tempfile.TemporaryDirectory() as tmp:
        for file in touched:
            path = ws.path / file
            if not path.is_file():
                continue  # deleted by the series
            try:
                py_compile.compile(str(path), cfile=str(Path(tmp) / "x.pyc"), doraise=True)
                result.compiled.append(file)
            except py_compile.PyCompileError as exc:
                result.compile_errors.append(f"{file}: {exc.msg.strip().splitlines()[-1]}")


def find_leftover_markers(ws: Workspace, result: RebaseResult) -> None:
    """Conflict markers a resolution committed (in a Python file that byte-compiles too: markers in a
    string do): a .cu or .yaml with them would be written into the series as the patch. Of the
    lines `git diff --check` flags, the `<<<<<<<` and `>>>>>>>` ones: it flags `=======` too, which
    underlines a heading in reStructuredText and Markdown."""
    # A Python file that failed to compile is reported so already; one that compiles may still hold
    # markers, inside a docstring or another multi-line string, and was written into the series.
    not_compiled = {error.split(": ", 1)[0] for error in result.compile_errors}
    for outcome in result.outcomes:
        if outcome.status != RESOLVED or not outcome.commit:
            continue
        check = ws.git.run("diff", "--check", f"{outcome.commit}^", outcome.commit, check=False).stdout
        lines: dict[str, list[str] | None] = {}
        for flagged in check.splitlines():
            found = _FLAGGED_MARKER.match(flagged)
            if not found or found.group(1) in not_compiled:
                continue
            path, number = found.group(1), int(found.group(2))
            if path not in lines:  # (a path git quoted is not found: its flagged lines all count)
                shown = ws.git.run("show", f"{outcome.commit}:{path}", check=False)
                lines[path] = shown.stdout.split("\n") if shown.returncode == 0 else None
            if lines[path] is None or _OPEN_OR_CLOSE_MARKER.match(lines[path][number - 1]):
                result.leftover_markers.append(f"{path}: leftover conflict marker at line {number}")


_FLAGGED_MARKER = re.compile(r"(.+):(\d+): leftover conflict marker$")  # `git diff --check`'s line
_OPEN_OR_CLOSE_MARKER = re.compile(r"(<{7}|>{7})(\s|$)")


def check_targets(out_dir: Path, force: bool, source_dir: Path, protected: dict[str, Path],
                  default_out: str) -> None:
    """What the rebase will create, checked before any work (the new pin's name, which names the
    work branch, was checked as compat.yaml's): an out directory that is empty unless `force` (a
    refusal after the rebase would leave its branch).

    A refreshed series replaces `out_dir` whole, so even with `force` it must be a series directory
    (a `series` file, no `.git`: a checkout given by mistake was deleted) and may not be, contain or sit
    in a `protected` directory (the --repo, the work tree, the cache: --out equal to --repo deleted
    its .git), nor contain the series being carried (equal to it is the refresh in place).
    `default_out` says where --out goes when not given."""
    out = out_dir.resolve()
    for what, path in protected.items():
        path = path.resolve()
        if out == path or out in path.parents or path in out.parents:
            relation = "is" if out == path else "contains" if out in path.parents else "is inside"
            raise UsageError(f"--out {out_dir} {relation} the {what} {path}; the refreshed series replaces "
                             "its --out whole: choose another --out")
    if out in source_dir.resolve().parents:
        raise UsageError(f"--out {out_dir} contains the series being carried ({source_dir}); the refreshed "
                         "series replaces its --out whole: choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise UsageError(f"{out_dir} exists and is not empty; give a new --out, or pass --force to replace it "
                             f"(without --out it is {default_out})")
        if (out_dir / ".git").exists() or not (out_dir / series_mod.SERIES_FILE).is_file():
            raise UsageError(f"--out {out_dir} is not a patch series (a git checkout, or no series file); --force "
                             "replaces only a series directory: choose another --out")
    check_dir_option(out_dir, "--out")
    if out_dir.exists() and (problem := cannot_make_in(out_dir.parent)):  # replaced by a rename there
        raise EnvironmentProblem(f"--out {out_dir}: cannot replace it: cannot make anything in {out_dir.parent} ({problem})")


def write_series(ws: Workspace, result: RebaseResult, source_dir: Path, out_dir: Path,
                 renamed: tuple[str, str] | None = None) -> None:
    """The refreshed series from the rebase commits: same names and order (less the patches
    already upstream, unlisted from `series` too), new lock. `out_dir` was checked by check_targets.
    `renamed` (old, new), e.g. ("vllm/v0.32.0", "vllm/v0.33.0"): the series name as the `series`
    file's comments spell it, so its header names the pin it now belongs to.

    `out_dir` may be `source_dir` itself (a refresh in place), so every source text is read before
    anything is written; the new series is made in a temporary sibling of `out_dir` and swapped in
    whole, so a failure midway leaves the old series as it was."""
    texts = {o.patch: (source_dir / o.patch).read_text(encoding="utf-8", errors="replace") for o in result.outcomes}
    contexts = {name: context_lines(text) for name, text in texts.items()}
    abbrevs = {name: index_abbrev(text) for name, text in texts.items()}
    if out_dir.resolve() in source_dir.resolve().parents:  # check_targets refuses it; never swap it away
        raise UsageError(f"--out {out_dir} contains the series being carried ({source_dir})")
    dropped = {o.patch for o in result.outcomes if o.status == ALREADY}
    series_file = _without(source_dir / series_mod.SERIES_FILE, dropped)
    if renamed is not None:
        series_file = _renamed_in_comments(series_file, *renamed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with scratch_beside(out_dir, SCRATCH) as scratch:
        new = scratch / "new"
        new.mkdir()
        kept = [o for o in result.outcomes if o.patch not in dropped]
        for number, outcome in enumerate(kept, 1):
            # numbered "[PATCH k/n]" as `git format-patch` numbers a series; one call per patch
            # because each keeps its own diff context
            commit = outcome.commit
            if outcome.status == RESOLVED:
                commit = _as_its_patch(ws, commit, source_dir / outcome.patch)
            # a/ b/ prefixes and no sign-off whatever the user's config says (diff.noprefix,
            # diff.mnemonicPrefix, format.signOff): `git apply -p1` must take the patch; nor any
            # other format.* setting of theirs (a cover letter ahead of the patch, a base-commit
            # that fails without an upstream, threading, To/Cc/extra headers, a MIME attachment,
            # another From, notes), and renames found as without diff.renames=false
            text = ws.git.run("format-patch", "-1", "--stdout", "--zero-commit", "--no-signature",
                              "--src-prefix=a/", "--dst-prefix=b/", "--no-signoff", "--no-cover-letter",
                              "--no-base", "--no-thread", "--no-attach", "--no-to", "--no-cc", "--no-add-header",
                              "--no-from", "--no-notes", "-M",
                              f"--subject-prefix=PATCH {number}/{len(kept)}", "--no-numbered",
                              f"-U{contexts[outcome.patch]}", abbrevs[outcome.patch], commit).stdout
            (new / outcome.patch).write_bytes(text.encode("utf-8", "surrogateescape"))  # git's bytes exactly
        (new / series_mod.SERIES_FILE).write_bytes(series_file)  # dropped patches unlisted
        series_mod.write_lock(new)
        _swap_in(new, out_dir, scratch / "old")
    result.out_dir = out_dir


def _as_its_patch(ws: Workspace, commit: str, patch_file: Path) -> str:
    """A human's resolution commit made again (on no branch) with the author, date and message of
    the patch it resolves, as `git am` would have committed it: the refreshed patch is that patch
    carried, whatever the resolution's own commit said."""
    parts, env = am_message(ws, Patch("dspark", patch_file, ""))
    return ws.git.out("commit-tree", f"{commit}^{{tree}}", "-p", f"{commit}^", "-F", "-",
                      input="\n\n".join(parts) + "\n", env=env)


def _without(series_file: Path, dropped: set[str]) -> bytes:
    """The `series` file's bytes without the lines listing `dropped` patches (comments kept)."""
    lines = series_file.read_bytes().splitlines(keepends=True)
    return b"".join(line for line in lines
                    if line.decode("utf-8", "replace").split("#", 1)[0].strip() not in dropped)


def _renamed_in_comments(series_file: bytes, old: str, new: str) -> bytes:
    """`old` as a whole name (not "vllm/v0.32.0rc1") replaced by `new` in the comment part of each
    line; the patch names listed are left as they are."""
    name = re.compile(rf"(?<![\w./-]){re.escape(old)}(?![\w/-]|\.\w)".encode())
    lines = series_file.splitlines(keepends=True)
    return b"".join(listed + hash_ + name.sub(new.encode(), comment)
                    for listed, hash_, comment in (line.partition(b"#") for line in lines))


def recover_interrupted(target: Path) -> list[str]:
    """Undo what a killed write_series left beside `target`: a run killed between _swap_in's two
    renames left no `target`, the old series only in its scratch `old`; bring that back, and
    remove the scratch directories of runs no longer alive. What it did, as lines to report."""
    if not target.parent.is_dir():
        return []
    notes = []
    with dead_scratches(target, SCRATCH) as dead:
        for scratch in reversed(dead):  # newest first
            if not target.exists() and (scratch / "old").is_dir():
                os.replace(scratch / "old", target)
                notes.append(f"{target}: restored from {scratch / 'old'} (a run was killed while replacing it)")
            shutil.rmtree(scratch, ignore_errors=True)
    return notes


def _swap_in(new: Path, out_dir: Path, old: Path) -> None:
    """Put directory `new` at `out_dir` by renames. A directory cannot be renamed over a non-empty
    one, so the current `out_dir` moves aside to `old` first and comes back if `new` cannot go in.
    The new directory takes the mode of the one it replaces."""
    if out_dir.exists():
        os.chmod(new, out_dir.stat().st_mode & 0o7777)
        os.replace(out_dir, old)
    try:
        os.replace(new, out_dir)
    except BaseException:
        if old.exists():
            os.replace(old, out_dir)
        raise


# ------------------------------------------------------------------ where the two trees come from


def pin_commit(ws: Workspace, pin: Pin) -> str:
    """The pin's commit in ws, or its tag's (a clone may lack one or the other)."""
    commit = ws.resolve_commit(pin.commit) or ws.resolve_commit(pin.tag)
    if commit is None:
        raise UsageError(f"{ws.path}: has neither {pin.name}'s commit {pin.commit} nor tag {pin.tag}")
    return commit


def worktree_of(repo: Path, workdir: Path, onto: str | Pin, branch: str, force: bool,
                resume: bool) -> tuple[Workspace, bool, str]:
    """A linked worktree of the user's `repo` at `workdir`, so their own checkout is never touched,
    whether this run added it, and `onto` (a name, or a pin) as the commit it names in `repo` (in
    the worktree HEAD or a relative name would be the work branch's own commits). Everything that can refuse is checked
    before `git worktree add`: bad input leaves nothing registered in their repository. `repo` is
    a repository (rebase_in_worktree checked it)."""
    source = Workspace(repo)
    # A work tree deleted by hand stays registered: git would refuse its path ("missing but already
    # registered") and keep its branch checked out. Prune drops only such entries (not locked ones).
    source.git.run("worktree", "prune")
    _undo_unfinished_add(source, workdir)
    onto_commit = pin_commit(source, onto) if isinstance(onto, Pin) else source.resolve_commit(onto)
    if onto_commit is None:
        raise UsageError(f"{repo}: --onto {onto} does not name a commit")
    holder = source.worktree_on(branch)
    if holder is not None and holder != workdir:
        raise UsageError(f"{repo}: branch {branch} is checked out in the worktree {holder}; rebase there "
                         f"(--workdir {holder}) or remove it (`git -C {repo} worktree remove {holder}`)")
    if (workdir / ".git").exists():
        ws = Workspace(workdir)
        if oplock.common_git_dir(ws.git_dir) != oplock.common_git_dir(source.git_dir):
            raise UsageError(f"{workdir}: is a git worktree of another repository; use another --workdir")
        check_made_by_rebase(ws)
        return ws, False, onto_commit
    if workdir.exists() and any(workdir.iterdir()):
        raise UsageError(f"{workdir}: exists, is not empty and is not a worktree of {repo}")
    shown = source.git.run("rev-parse", "--show-toplevel", check=False)  # fails in a bare repository: no checkout
    top = Path(shown.stdout.strip()).resolve() if shown.returncode == 0 else None
    if top is not None and (workdir.resolve() == top or top in workdir.resolve().parents):  # in their `git status`
        raise UsageError(f"--workdir {workdir} is inside your checkout {top}; give one outside it")
    if resume:
        raise UsageError(f"{workdir}: no rebase to continue here (run without --continue first)")
    check_branch_free(source, branch, force)
    # Until the work tree carries our marker, a record in the repository names it: a run killed in
    # between left a checkout no run would take as its own (even with --force), and git's own
    # cleanup after a Ctrl-C can leave a .git file pointing nowhere.
    adding = _adding_record(source, workdir)
    adding.parent.mkdir(parents=True, exist_ok=True)
    adding.write_bytes(os.fsencode(workdir))
    try:
        source.git.run("worktree", "add", "-q", "--detach", str(workdir), onto_commit)
        ws = Workspace(workdir)
        mark_made_by_rebase(ws)
    except BaseException:
        _undo_unfinished_add(source, workdir)
        raise
    adding.unlink()
    return ws, True, onto_commit


def _adding_record(source: Workspace, workdir: Path) -> Path:
    """One per work tree path, so a record left by a run killed at one path outlives runs at others."""
    name = hashlib.sha256(os.fsencode(workdir)).hexdigest()[:16]
    return oplock.common_git_dir(source.git_dir) / "dspark" / "rebase-adding" / name


def _undo_unfinished_add(source: Workspace, workdir: Path) -> None:
    """Remove the work tree at `workdir` that a run began to add and never marked (it was missing
    or empty before: worktree_of checked), with its registration in the user's repository."""
    adding = _adding_record(source, workdir)
    try:
        unfinished = adding.read_bytes() == os.fsencode(workdir)
    except OSError:
        return
    if unfinished:
        # twice: a worktree killed inside `git worktree add` is still locked ("initializing"), and
        # neither one --force nor prune drops a locked one (every later run then failed on it)
        source.git.run("worktree", "remove", "--force", "--force", str(workdir), check=False)
        shutil.rmtree(workdir, ignore_errors=True)
        source.git.run("worktree", "prune")
        adding.unlink()


def rebase_in_worktree(repo: Path, workdir: Path, onto: str | Pin, pin: Pin, patches: list[Patch], branch: str,
                       force: bool, resume: bool, underlay: Underlay | None = None) -> tuple[Workspace, RebaseResult]:
    """rebase_series in a linked worktree of `repo`. A run that fails (a conflict is a result, not a
    failure) leaves neither a worktree it added nor its branch behind in the user's repository."""
    with repository_lock(repo, workdir):  # before its work tree is added: one run at a time
        return _rebase_in_worktree(Workspace(repo), repo, workdir, onto, pin, patches, branch, force, resume,
                                   underlay)


def repository_lock(repo: Path, workdir: Path):
    """The dspark lock of `repo`, which its worktrees share (oplock; held again by this process, a
    no-op)."""
    source = Workspace(repo)
    if not source.is_repo():
        raise UsageError(f"{repo}: not a git repository")
    return oplock.exclusive(source.git_dir, workdir)


def _rebase_in_worktree(source: Workspace, repo: Path, workdir: Path, onto: str | Pin, pin: Pin, patches: list[Patch],
                        branch: str, force: bool, resume: bool, underlay: Underlay | None) -> tuple[Workspace, RebaseResult]:
    ws, added, onto_commit = worktree_of(repo, workdir, onto, branch, force, resume)
    branch_before = source.branch_sha(branch)
    try:
        base = pin_commit(source, pin)  # the worktree shares its objects and refs
        return ws, rebase_series(ws, base, onto_commit, patches, branch, force=force, resume=resume, underlay=underlay)
    except BaseException:
        if added:
            source.git.run("worktree", "remove", "--force", "--force", str(workdir), check=False)
            if branch_before is not None:
                source.git.run("update-ref", f"refs/heads/{branch}", branch_before, check=False)
            elif source.branch_sha(branch):
                source.git.run("branch", "-D", branch, check=False)
        raise


def import_tree(ws: Workspace, directory: Path, parent: str | None, message: str) -> str:
    """Commit the files under `directory` as one commit (on `parent`), without touching HEAD."""
    with ws.scratch_index() as env:
        ws.git.run("--work-tree", str(directory), "add", "-A", "-f", ".", env=env)
        tree = ws.git.out("write-tree", env=env)
    parents = ["-p", parent] if parent else []
    return ws.git.out("commit-tree", tree, *parents, "-F", "-", input=message, env=DSPARK_AUTHOR)


def release_label(release: ReleaseFile) -> str:
    return f"{release.package}=={release.version} {release.file} sha256={release.sha256}"


def release_commits(workdir: Path, base: ReleaseFile, onto: ReleaseFile,
                    resume: bool = False) -> tuple[Workspace, str, str]:
    """A repository holding two release trees: base (root commit) and onto (its child). The
    release files come from the cache or the index (sha256 checked); a repository that already
    holds these exact trees is reused. `resume` (--continue) needs one already there."""
    for kind in ("init", "tree"):  # what runs killed while making the repository or a tree left
        remove_dead_scratches(workdir, kind)
    ws = Workspace(workdir)
    if (workdir / ".git").exists():
        check_made_by_rebase(ws)
    elif resume:  # before downloading and importing two trees for nothing
        raise UsageError(f"{workdir}: no rebase to continue here (run without --continue first)")
    else:
        if workdir.exists() and any(workdir.iterdir()):
            raise UsageError(f"{workdir}: exists, is not empty and is not a git repository")
        refuse_replacing_cwd(workdir, "--workdir")
        workdir.parent.mkdir(parents=True, exist_ok=True)
        with scratch_beside(workdir, "init") as scratch:  # made and marked beside, then moved in whole
            made = scratch / "repo"
            made.mkdir()
            Workspace(made).git.run("init", "-q")
            mark_made_by_rebase(Workspace(made))
            move_into_place(made, workdir)
    commits: list[str] = []
    for release in (base, onto):
        parent = commits[-1] if commits else None
        ref = f"refs/dspark/release/{release.sha256}" + (f"-on-{parent[:12]}" if parent else "")
        commit = ws.resolve_commit(ref)
        if commit is None:
            archive = pypi_source.fetch_release(release)
            with scratch_beside(workdir, "tree") as tmp:
                tree = tmp / "tree"
                pypi_source.extract(archive, tree)
                label = release_label(release)
                commit = import_tree(ws, tree, parent, f"{release.package} {release.version}\n\nDspark-Base: {label}\n")
            ws.git.run("update-ref", ref, commit)
        commits.append(commit)
    return ws, commits[0], commits[1]


def index_release(package: str, version: str) -> ReleaseFile:
    """The sdist of `package==version` as the package index lists it (name and sha256), for
    releases compat.yaml does not know yet (`--onto 0.31.0`)."""
    wanted = f"{package.replace('-', '_')}-{version}.tar.gz"
    index, files = pypi_source.index_files(package)
    for entry in files:
        if entry.get("filename", "").lower() == wanted.lower() and entry.get("hashes", {}).get("sha256"):
            return ReleaseFile(package=package, version=version, file=entry["filename"],
                               sha256=entry["hashes"]["sha256"])
    raise UsageError(f"{index} lists no sdist {wanted} for {package} {version}")
