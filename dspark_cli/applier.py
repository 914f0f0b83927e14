"""`dspark apply`, `status` and `revert`: put a patch series on a pinned tree, atomically and
idempotently, report where a workspace stands, and take it back to its pristine base.

Invariant: every operation that changes the workspace records a snapshot first
(Workspace.begin) and either finishes or restores it; a run killed in between is restored by
the next one (`recover`). Nothing the user had (local changes, commits) is ever dropped.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Iterator

from dspark_cli import git_source, oplock, pypi_source
from dspark_cli.build import LAST, LAST_FAILED, cache_root
from dspark_cli.compat import Compat, Engine, Pin, default_path
from dspark_cli.compat import load as load_compat
from dspark_cli.errors import DsparkError, EnvironmentProblem, PatchFailed, UsageError, name_some
from dspark_cli.files import check_dir_option, check_listable, refuse_replacing_cwd
from dspark_cli.flock import MADE_IN, scratches
from dspark_cli.output import say
from dspark_cli.patching import PatchConflict, apply_and_commit
from dspark_cli.series import Patch, load_series, read_patch_bytes
from dspark_cli.workspace import (DSPARK_IDENTITY, OUR_COMMITS, PROGRESS, AppliedPatch, Snapshot, Workspace, kill_point,
                                  owner_running, safe_name)


@dataclass
class ApplyRequest:
    engine: str
    commit: str | None = None
    workdir: Path | None = None
    repo: str | None = None
    source: str | None = None  # None: the workspace's own source (resolve_source)
    series: tuple[Path, ...] = ()
    force: bool = False
    allow_unpinned: bool = False
    package: str | None = None
    file: str | None = None


def load_layers(pin: Pin, extra: tuple[Path, ...]) -> tuple[list[Patch], list[dict]]:
    """DSpark's series for `pin`, then each --series layer; every digest checked against its lock."""
    layers = [("dspark", pin.series_dir())] + [(Path(d).resolve().name, Path(d).resolve()) for d in extra]
    names = [name for name, _ in layers]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise UsageError(f"two series layers are both named {duplicate!r}; layer directories need distinct names")
    # the name begins each patch's Dspark-Patch trailer, which is read back line by line and stripped
    unrecordable = next((d for name, d in layers if name != name.lstrip() or "\n" in name), None)
    if unrecordable:
        raise UsageError(f"series layer {str(unrecordable)!r}: its directory's name starts with whitespace or holds a "
                         "line break, which the commit trailers naming its patches cannot record; rename the directory")
    patches = [patch for name, directory in layers for patch in load_series(directory, name)]
    return patches, [{"layer": name, "dir": str(directory)} for name, directory in layers]


def recover(ws: Workspace, force: bool = False) -> str | None:
    """Restore the snapshot an interrupted operation left in the state file. Work done in the
    workspace since (local changes, commits) would go with it: refuse, or with --force keep it on
    dspark/saved-<time> branches first. The caller holds the workspace lock (oplock), so a
    snapshot found here is never that of a run still going in this machine."""
    state = ws.read_state()
    if not state or not state.get("in_progress"):
        return None
    snapshot = Snapshot(**state["in_progress"])
    running = owner_running(snapshot)
    if running:
        raise UsageError(f"another dspark {snapshot.op} (pid {snapshot.pid}) is running in {ws.path}")
    if running is None and not force:
        raise UsageError(f"{ws.path}: a dspark {snapshot.op} (pid {snapshot.pid}, started {snapshot.started}) in "
                         "another container or machine did not finish; if it is not running any more, pass "
                         "--force to recover")
    if _touched_nothing(ws, snapshot):
        ws.finish(None if snapshot.first else state)
        message = (f"cleared the record of an interrupted {snapshot.op} (started {snapshot.started}), which had "
                   "changed nothing: your local changes are as they were")
        say(f"note: {message}", err=True, markup=False)
        return message
    # restore removes the locks the killed run's git left: not one there before that run started
    _refuse_git_locks(ws, snapshot.work_branch, _time_of(snapshot.started))
    _refuse_assume_unchanged_edits(ws, [snapshot.head])  # restore's reset --hard would overwrite them
    _refuse_ignored_in_the_way(ws, f"recovering the interrupted {snapshot.op}", [ws.head(), snapshot.head])
    moved = _moved_since(ws, snapshot)
    if moved:  # back on that branch HEAD would name a commit whose files are not the ones restored
        snapshot = replace(snapshot, branch=None)
    lost = _lost_by_recovery(ws, snapshot, state["base"])
    if lost and not force:
        raise UsageError(f"{ws.path}: recovering the interrupted {snapshot.op} (started {snapshot.started}) would "
                         f"discard {lost}; pass --force to keep them on a dspark/saved-<time> branch first")
    saved = ws.save_before_restore(snapshot, state["base"]) if lost else []
    PROGRESS.update(op=snapshot.op, stage="recovering")
    ws.undo(snapshot, state, worktree_saved=bool(saved))
    PROGRESS.clear()
    kept = f"; your work since is kept on branch {' and '.join(saved)}" if saved else ""
    kept += f"; HEAD is left detached at {snapshot.head[:12]}, as {moved}" if moved else ""
    message = f"recovered an interrupted {snapshot.op} (started {snapshot.started}): restored the state before it{kept}"
    # Said now: the operation that follows may still fail (on the local changes just restored),
    # and the user must know the workspace was changed.
    say(f"note: {message}", err=True, markup=False)
    return message


def _time_of(stamp: str) -> float | None:
    """A snapshot's `started` as a time.time(); None where it is no ISO time (then every lock counts)."""
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except (TypeError, ValueError):
        return None


def _touched_nothing(ws: Workspace, snapshot: Snapshot) -> bool:
    """Killed before its stash of the local changes was stored (git stores it before cleaning the
    worktree), or after a rollback had popped it back: HEAD and the branches are as the snapshot
    has them and no patch was being applied, so the local changes are the user's, untouched."""
    return (snapshot.stash_message is not None and ws.stash_ref(snapshot.stash_message) is None
            and snapshot.applying is None and ws.head() == snapshot.head
            and ws.current_branch() == snapshot.branch
            and ws.branch_sha(snapshot.work_branch) == snapshot.work_branch_sha)


def _moved_since(ws: Workspace, snapshot: Snapshot) -> str | None:
    """'branch X was deleted since' or 'branch X moved to <sha> since': the branch HEAD was on
    when `snapshot` was taken no longer points at the snapshot's HEAD (the user moved it after the
    kill). None when it does, or when it is the work branch, which restore puts back itself."""
    if snapshot.branch is None or snapshot.head is None or snapshot.branch == f"refs/heads/{snapshot.work_branch}":
        return None
    now = ws.resolve_commit(snapshot.branch)
    name = snapshot.branch.removeprefix("refs/heads/")
    if now == snapshot.head:
        return None
    return f"branch {name} was deleted since" if now is None else f"branch {name} moved to {now[:12]} since"


def _lost_by_recovery(ws: Workspace, snapshot: Snapshot, base: str) -> str | None:
    """'2 local change(s) (e.g. `M x.py`) and 1 commit(s) (abc123 fix)', or None when nothing would be lost."""
    changes, commits = ws.lost_by_restore(snapshot, base)
    parts = [f"{len(changes)} local change(s) (e.g. `{changes[0].strip()}`)"] if changes else []
    parts += [f"{len(commits)} commit(s) ({commits[0][0][:12]} {commits[0][1]})"] if commits else []
    return " and ".join(parts) or None


def unknown_pin_message(engine: Engine, commit: str) -> str:
    known = ", ".join(f"{p.name} ({p.commit[:12]})" for p in engine.pins.values())
    return f"{commit} is not pinned in compat.yaml for {engine.name}; known pins: {known}. Use --allow-unpinned to try anyway"


def _made_state(workdir: Path) -> dict | None:
    """The state of the dspark workspace at `workdir`, or None (no workspace there yet)."""
    ws = Workspace(workdir)
    return ws.read_state() if workdir.is_dir() and ws.is_repo() else None


def _workspace_pin(engine: Engine, made: dict | None) -> str | None:
    """--commit left out: the pin the workspace was applied for (None: the default pin; an
    unpinned workspace names its commit with --commit again)."""
    if not made or made.get("engine") != engine.name or made.get("unpinned"):
        return None
    return made.get("pin") if made.get("pin") in engine.pins else None


def resolve_source(request: ApplyRequest, made: dict | None, pin: Pin | None) -> ApplyRequest:
    """--source left out: git with --repo; else the source the workspace was made from (and, with
    neither --package nor --file, its release file while the pin still lists it); else git."""
    if request.source is not None:
        return request
    source = ((made if request.repo is None else None) or {}).get("source") or {}
    if source.get("kind") != "pypi":
        return replace(request, source="git")
    if request.package or request.file or pin is None:
        return replace(request, source="pypi")
    listed = any(r.file == source.get("file") for r in pin.releases)
    return replace(request, source="pypi", file=source["file"] if listed else None)


def _checked_request(request: ApplyRequest) -> ApplyRequest:
    if request.source not in ("git", "pypi"):
        raise UsageError(f"--source must be git or pypi, got {request.source!r}")
    if request.source == "pypi" and request.repo:
        raise UsageError("--repo only applies to --source git")
    if request.source == "git" and (request.package or request.file):
        raise UsageError(f"{'--package' if request.package else '--file'} only applies to --source pypi")
    return replace(request, repo=git_source.checked_repo(request.repo))


def apply(compat: Compat, request: ApplyRequest) -> dict:
    engine = compat.engine(request.engine)
    given = Path(request.workdir).resolve() if request.workdir else None
    if given:
        check_listable(given, "--workdir")
    made = _made_state(given) if given else None  # --commit and --source default to the workspace's
    if request.commit is None:
        request = replace(request, commit=_workspace_pin(engine, made))
    pin = engine.resolve_pin(request.commit)
    if pin is None and not request.allow_unpinned:
        raise UsageError(unknown_pin_message(engine, request.commit))
    series_pin = pin or engine.pins[engine.default_pin]
    workdir = given or Path(f"{engine.name}-{series_pin.name if pin else safe_name(request.commit)[:12]}").resolve()
    if not given:
        check_listable(workdir, "--workdir")
    made = made if given else _made_state(workdir)
    if made and made.get("engine") != engine.name:  # before anything of this engine is fetched into it
        raise UsageError(f"{workdir} holds {made.get('engine')} {made.get('pin')}; use another --workdir for "
                         f"{engine.name} {series_pin.name if pin else request.commit}")
    request = resolve_source(request, made, pin)
    request = _checked_request(request)
    if pin is None and request.source == "pypi":
        raise UsageError("--source pypi builds pinned releases only; use --source git for an unpinned commit")
    patches, layers = load_layers(series_pin, request.series)  # all checks before touching anything
    try:
        check_dir_option(workdir, "--workdir")
    except EnvironmentProblem:
        done = _applied_read_only(engine, pin, request, made, workdir, patches)
        if done is None:
            raise
        return done
    refuse_replacing_cwd(workdir, "--workdir")

    notes, recovered = [], None
    with ExitStack() as lock:
        ws = Workspace(workdir) if workdir.exists() else None
        state = None
        if ws is not None and ws.is_repo():
            lock.enter_context(oplock.exclusive(ws.git_dir, workdir))
            recovered = recover(ws, request.force)
            state = ws.read_state()
        if state is not None and (state.get("source") or {}).get("kind") != request.source:
            raise UsageError(_made_from(state, workdir))  # before any download or fetch into it

        if request.source == "pypi":
            branch = f"dspark/{pin.name}"
            identity = {"engine": engine.name, "pin": pin.name, "unpinned": False, "branch": branch}
            release = pypi_source.choose_release(pin, request.package, request.file)
            source = {"kind": "pypi", "package": release.package, "version": release.version,
                      "file": release.file, "sha256": release.sha256}
            if state is None:
                if workdir.exists() and any(workdir.iterdir()):
                    raise UsageError(f"{workdir} exists and is not a dspark workspace; choose another --workdir")
                ws, base = pypi_source.create(workdir, pin, release, branch, {**identity, "source": source, "layers": layers})
            else:
                _check_same_workspace(state, identity, source, workdir)
                base = state["base"]
        else:
            # Without --repo a workspace keeps the repository it was made from (a mirror given once
            # with --repo), for any fetch and in its recorded source.
            url = (request.repo or ((state or {}).get("source") or {}).get("repository")
                   or git_source.engine_repository(compat, engine.name))
            ws, base = git_source.prepare(workdir, url, pin.commit if pin else request.commit, pin.tag if pin else None,
                                          before_fetch=None if request.force else _refuse_local_changes_now)
            if pin is None:
                # A ref such as v1.1~1 may name a pinned commit: then it is that pin, series and all.
                pin = next((p for p in engine.pins.values() if p.matches_commit(base)), None)
                if pin is not None:
                    notes.append(f"{request.commit} is {base[:12]}, pinned as {pin.name}")
                    series_pin = pin
                    patches, layers = load_layers(pin, request.series)
            branch = f"dspark/{pin.name}" if pin else f"dspark/unpinned-{base[:12]}"
            identity = {"engine": engine.name, "pin": series_pin.name, "unpinned": pin is None, "branch": branch}
            source = {"kind": "git", "repository": url, "commit": base}
            if not oplock.held(ws.git_dir):  # cloned just now, maybe by a run beside this one: recovered if it died
                lock.enter_context(oplock.exclusive(ws.git_dir, workdir))
                recovered = recover(ws, request.force)
            state = ws.read_state()
            if state is not None:
                _check_same_workspace(state, identity, source, workdir)
        if not oplock.held(ws.git_dir):  # a workspace made just now from a release: locked before its patching starts
            lock.enter_context(oplock.exclusive(ws.git_dir, workdir))
        drift = [] if pin else [_unpinned_drift(ws, base, series_pin)]
        state = {**(ws.read_state() or {}), **identity, "source": source, "base": base, "layers": layers,
                 "compat": str(compat.path.resolve())}  # status may run from another cwd
        result = _apply_series(ws, base, branch, patches, request.force, state)
    result.update({"workdir": str(workdir), "engine": engine.name, "pin": series_pin.name, "source": source,
                   "base": base, "branch": branch, "notes": notes + result.pop("notes"), "drift": drift,
                   "recovered": recovered})
    return result


def _applied_read_only(engine: Engine, pin: Pin | None, request: ApplyRequest, state: dict | None, workdir: Path,
                       patches: list[Patch]) -> dict | None:
    """The "already applied" result for a workspace we may not write in (a read-only mount or
    image), when reading it shows exactly this series applied on its branch, from the source asked
    for, and no operation left unfinished; None otherwise (the caller reports why it cannot write)."""
    if pin is None or not state or state.get("in_progress") or state.get("engine") != engine.name:
        return None
    source, branch = state.get("source") or {}, f"dspark/{pin.name}"
    if state.get("pin") != pin.name or state.get("branch") != branch or source.get("kind") != request.source:
        return None
    ws = Workspace(workdir)
    if request.source == "pypi":
        release = pypi_source.choose_release(pin, request.package, request.file)
        if source.get("sha256") != release.sha256:
            return None
    elif request.repo is not None or ws.resolve_commit(pin.commit) != state["base"]:
        return None
    tip = ws.branch_sha(branch)
    if tip is None or ws.current_branch() != f"refs/heads/{branch}" or not ws.is_ancestor(state["base"], tip):
        return None  # the last: a branch rebased elsewhere keeps its patch trailers, not its base
    applied, _ = ws.applied(state["base"], tip)
    if [(p.label, p.sha256) for p in applied] != [(p.label, p.sha256) for p in patches]:
        return None
    labels = [p.label for p in patches]
    return {"status": "already applied", "applied": labels, "new": [], "workdir": str(workdir),
            "engine": engine.name, "pin": pin.name, "source": source, "base": state["base"], "branch": branch,
            "notes": [f"{workdir} is read-only here: checked, nothing written"], "drift": [], "recovered": None}


def _check_same_workspace(state: dict, identity: dict, source: dict, workdir: Path) -> None:
    if state.get("engine") != identity["engine"] or state.get("branch") != identity["branch"]:
        wanted = f"{identity['engine']} " + (source["commit"][:12] if identity["unpinned"] else identity["pin"])
        if state.get("unpinned"):  # its pin is only the series it took: --commit names it again
            raise UsageError(f"{workdir} holds {state.get('engine')} at the unpinned commit {state['base'][:12]}; pass "
                             f"--commit {state['base'][:12]} --allow-unpinned to work on it, or use another "
                             f"--workdir for {wanted}")
        raise UsageError(f"{workdir} holds {state.get('engine')} {state.get('pin')}; use another --workdir for {wanted}")
    if source["kind"] == "pypi" and state["source"].get("sha256") != source["sha256"]:
        raise UsageError(_made_from(state, workdir))


def _made_from(state: dict, workdir: Path) -> str:
    source = state.get("source") or {}
    how = f"--source pypi --file {source.get('file')}" if source.get("kind") == "pypi" else "--source git"
    return (f"{workdir} was made from {source.get('file') or source.get('repository')} ({how}); "
            "give that source, or use another --workdir for this one")


def _unpinned_drift(ws: Workspace, base: str, pin: Pin) -> str:
    pinned = ws.resolve_commit(pin.commit)
    if pinned is None:
        return f"base {base[:12]} is not pinned; series of {pin.name} applied; pin {pin.commit[:12]} is not in this repository"
    ahead = ws.git.out("rev-list", "--count", f"{pinned}..{base}")
    behind = ws.git.out("rev-list", "--count", f"{base}..{pinned}")
    return f"base {base[:12]} is not pinned: {ahead} commit(s) ahead of and {behind} behind {pin.name} ({pinned[:12]})"


def _apply_series(ws: Workspace, base: str, branch: str, patches: list[Patch], force: bool, state: dict) -> dict:
    branch_sha = ws.branch_sha(branch)
    if branch_sha is None:
        _check_branch_name_free(ws, branch)
    applied, user = ws.applied(base, branch_sha) if branch_sha else ([], [])
    if branch_sha and not ws.is_ancestor(base, branch_sha):
        raise UsageError(f"branch {branch} does not contain base {base[:12]}; rename or delete it")
    for index, done in enumerate(applied):
        layer = done.label.split("/", 1)[0]
        if layer not in {p.layer for p in patches}:  # a --series layer left out of this run, last or not
            raise UsageError(f"{done.label} is applied from your series layer {layer!r}, which this run was not "
                             f"given: pass --series with its directory again (`dspark revert` takes every patch off, ours too)")
        if index >= len(patches):
            raise UsageError(f"{done.label} is applied but not in the series any more; run `dspark revert` first")
        if done.label != patches[index].label:
            raise UsageError(f"patch {index + 1} applied is {done.label}, the series has {patches[index].label}; "
                             "run `dspark revert` first")
        if done.sha256 != patches[index].sha256:
            raise UsageError(f"{done.label} changed since it was applied; run `dspark revert` first")
    todo = patches[len(applied):]
    on_branch = ws.current_branch() == f"refs/heads/{branch}"
    prior_state = ws.read_state() or {}
    if not todo and on_branch:
        done = {**state, "applied": [p.label for p in patches], "in_progress": None}
        if done != prior_state:  # also where the layers or compat.yaml were given from moved: status reads them there
            ws.write_state(done)
        return {"status": "already applied", "applied": [p.label for p in patches], "new": [], "notes": []}
    if branch_sha:
        _check_not_in_another_worktree(ws, branch)
    _refuse_git_locks(ws, branch)
    changes = _local_changes(ws, force, [branch_sha or base], todo)
    _refuse_ignored_in_the_way(ws, "apply", [ws.head(), branch_sha or base])  # HEAD: a rollback's reset
    notes = _save_detached_commits(ws, base, branch, force)
    if user and todo:
        notes.append(f"{len(user)} commit(s) of yours on {branch} are kept; the new patches go on top")
    with _copies(todo) as copies:
        snapshot = ws.begin("apply", branch, bool(changes), {**prior_state, "in_progress": None} if prior_state else state)
        try:
            if branch_sha:
                ws.checkout_noted(branch_sha, "-q", branch)
            else:
                ws.checkout_noted(base, "-q", "-b", branch, base)
            for count, (patch, copy) in enumerate(zip(todo, copies), 1):
                ws.note_applying(patch.path)
                apply_and_commit(ws, copy, kill_at=f"applied:{count}")
                kill_point(f"committed:{count}")
            # named before finish: a Ctrl-C after it would be reported as a rollback of an apply that is done
            stash = ws.stash_ref(snapshot.stash_message) if snapshot.stash_message else None
        except PatchConflict as conflict:
            ws.undo(snapshot, prior_state)
            raise PatchFailed(f"{conflict}; {ws.path} is back to its state before the apply") from None
        except BaseException:
            ws.undo(snapshot, prior_state)
            raise
    ws.complete("apply", {**state, "applied": [p.label for p in patches]})
    if stash:
        notes.append(f"your local changes are saved as `{stash}` (`git stash pop` in {ws.path} brings them back)")
    return {"status": "applied", "applied": [p.label for p in patches], "new": [p.label for p in todo], "notes": notes}


@contextmanager
def _copies(patches: list[Patch]) -> Iterator[list[Patch]]:
    """The patches as copies, in a directory of ours, of the bytes their lock was checked against:
    a series directory in the workdir goes away with the stash of --force (untracked there) or a
    checkout (tracked on another branch) before its patches are applied."""
    with tempfile.TemporaryDirectory(prefix="dspark-patches-") as tmp:
        copies = []
        for number, patch in enumerate(patches):
            data = read_patch_bytes(patch.path)
            if hashlib.sha256(data).hexdigest() != patch.sha256:
                raise UsageError(f"{patch.path} changed while dspark read its series; run again")
            copy = Path(tmp) / str(number) / patch.name
            copy.parent.mkdir()
            copy.write_bytes(data)
            copies.append(replace(patch, path=copy))
        yield copies


def _local_changes(ws: Workspace, force: bool, commits: list[str], patches: list[Patch] = ()) -> list[str]:
    """The worktree's local changes, which the operation stashes with --force. Changes git stash
    cannot save or give back are refused even then, before anything is changed: changes inside a
    submodule, edits to files marked assume-unchanged, and index entries stash fails on; and
    a merge, cherry-pick, revert or rebase of git's under way, which the operation would end."""
    if under_way := ws.operation_in_progress():
        what, abort = under_way
        raise UsageError(f"{ws.path}: {what} is in progress; finish it, or abort it ({abort}), and run again "
                         "(not even --force: the stash and checkouts would end it)")
    inside = ws.changed_submodules()
    if inside:
        raise UsageError(f"{ws.path} has changes inside submodule(s) {', '.join(inside)}, which git stash "
                         "cannot save (so not even --force would keep them); commit, stash or undo them in "
                         "the submodule first")
    _refuse_assume_unchanged_edits(ws, commits, patches)
    changes = ws.local_changes()
    stuck = ws.entries_stash_cannot_keep() if changes else []
    if stuck:
        raise UsageError(f"{ws.path} has index entries git stash cannot save and give back ({name_some(stuck)}), so "
                         "not even --force would keep them; commit them, or take them out of the index (`git reset "
                         "-q -- <path>` keeps the file; an unmerged one: resolve it or abort the merge or "
                         "cherry-pick) and run again")
    if not force:
        _refuse_local_changes(ws, changes)
    return changes


def _refuse_local_changes_now(ws: Workspace) -> None:
    """Before a fetch into a clone of the user's that lacks the pin (without --force): a fetch would
    add our remote and refs to a repository we then refuse to patch."""
    _refuse_local_changes(ws, ws.local_changes())


def _refuse_local_changes(ws: Workspace, changes: list[str]) -> None:
    """Without --force a worktree with local changes is refused."""
    if changes:
        raise UsageError(f"{ws.path} has {len(changes)} local change(s) (e.g. `{changes[0].strip()}`); "
                         "commit or stash them, or pass --force (they are stashed, not lost)")


def _refuse_git_locks(ws: Workspace, branch: str, older_than: float | None = None) -> None:
    """A lock file of git's (index.lock, HEAD.lock, the work branch's) there before the operation is
    another git's: running (an editor's, a `git commit` waiting on its editor) or killed. Our git
    commands would fail on it, and a rollback's lock removal, meant for our own killed git's, would
    delete it: refuse first, even with --force, and leave it alone."""
    locks = ws.git_locks(branch, older_than)
    if locks:
        raise UsageError(f"{locks[0]} exists: another git process is running in {ws.path}, or one was killed and "
                         "left it; let it finish, or remove the file if no git process is running, and run again")


def _refuse_assume_unchanged_edits(ws: Workspace, commits: list[str | None], patches: list[Patch] = ()) -> None:
    """Edits git status and git stash pass by: to files marked assume-unchanged (a reset --hard
    overwrites them), or skip-worktree where the operation's checkouts (HEAD to each of `commits`)
    or `patches` write (git apply and checkout fail there; elsewhere git leaves them alone)."""
    edits = ws.hidden_edits()
    if edits["skip-worktree"]:
        written = ws.paths_written([c for c in commits if c], [read_patch_bytes(p.path) for p in patches])
        edits["skip-worktree"] = [path for path in edits["skip-worktree"] if path in written]
    for flag, edited in edits.items():
        if edited:
            raise UsageError(f"{ws.path} has local changes to {name_some(edited)}, marked {flag}: git status does "
                             "not show them and git stash does not save them, so not even --force would keep them; "
                             f"clear the flag (`git update-index --no-{flag} <path>`) and run again")


def _refuse_ignored_in_the_way(ws: Workspace, what: str, commits: list[str | None]) -> None:
    """Ignored files and nested repositories of the user's are not local changes (not refused, not
    stashed), yet the checkouts and resets of `what` (and of its rollback) would overwrite or delete
    those at paths its `commits` track: refuse first, naming them, even with --force."""
    commits = [commit for commit in commits if commit]
    in_the_way = ws.ignored_in_the_way(commits)
    if in_the_way:
        raise UsageError(f"{ws.path} has ignored files where {what} would check out tracked ones "
                         f"({name_some(in_the_way)}); git overwrites or deletes ignored files there without asking, so "
                         "not even --force goes ahead: move them away and run again")
    nested = ws.nested_repositories_in_the_way(commits)
    if nested:
        raise UsageError(f"{ws.path} has git repositories of their own where {what} would check out tracked "
                         f"files ({name_some(nested)}); the checkout would overwrite files in them, so not even --force "
                         "goes ahead: move them away and run again")


def _check_not_in_another_worktree(ws: Workspace, branch: str) -> None:
    """git refuses to check out a branch another worktree has checked out, and `checkout -B` or
    update-ref would move it under that worktree's files: refuse first, naming it."""
    other = ws.worktree_on(branch)
    if other is not None and other != ws.path and not other.exists():  # removed with rm -rf: git still counts it
        raise UsageError(f"branch {branch} is checked out in another worktree, {other}, whose directory is gone; "
                         f"`git -C {ws.path} worktree prune` forgets it, then run again")
    if other is not None and other != ws.path:
        raise UsageError(f"branch {branch} is checked out in another worktree, {other}; switch that worktree "
                         f"to another branch (`git -C {other} switch --detach`) and run again")


def _check_branch_name_free(ws: Workspace, branch: str) -> None:
    """git cannot create dspark/v1.0 while a branch named `dspark` or `dspark/v1.0/x` exists (refs
    are paths)."""
    parts = branch.split("/")
    blocking = (next((p for p in ("/".join(parts[:n]) for n in range(1, len(parts))) if ws.branch_sha(p)), None)
                or ws.git.out("for-each-ref", "--count=1", "--format=%(refname:short)", f"refs/heads/{branch}/"))
    if blocking:
        raise UsageError(f"{ws.path} has a branch named {blocking}, so git cannot create {branch}; "
                         f"rename it (`git -C {ws.path} branch -m {blocking} NEWNAME`) and run again")


def _save_detached_commits(ws: Workspace, base: str, branch: str, force: bool) -> list[str]:
    """Commits made on a detached HEAD that no branch holds would become unreachable when we move
    HEAD: refuse, or with --force keep them on a dspark/saved-<sha> branch first."""
    stray = ws.commits_on_no_branch(base)
    if not stray:
        return []
    head, subject = stray[0]
    saved = f"dspark/saved-{head[:12]}"
    if not force:
        how = _lost_branch_at_head(ws, base, branch) or f"put them on a branch (`git -C {ws.path} branch NAME {head[:12]}`)"
        raise UsageError(f"HEAD {head[:12]} ({subject}) is detached with {len(stray)} commit(s) on no branch; "
                         f"{how}, or pass --force to keep them on branch {saved}")
    ws.git.run("branch", "-f", saved, head)
    return [f"{len(stray)} commit(s) of yours on a detached HEAD are kept on branch {saved}"]


def _lost_branch_at_head(ws: Workspace, base: str, branch: str) -> str | None:
    """How to get the series branch back when it was deleted while a detached HEAD held its patch
    commits (`git switch --detach; git branch -D`): None when that is not what happened."""
    head = ws.head()
    if ws.branch_sha(branch) is not None or head is None or not ws.is_ancestor(base, head):
        return None
    patches, user = ws.applied(base, head)
    if not patches:
        return None
    yours = f" and {len(user)} of yours" if user else ""
    return (f"branch {branch} is gone and HEAD holds its {len(patches)} patch commit(s){yours}: "
            f"`git -C {ws.path} switch -c {branch}` puts it back")


def _enclosing_workspace(path: Path) -> Path | None:
    """The dspark workspace a subdirectory lies in (its top holds .git/dspark/state.json, or a
    worktree's .git file names a git directory that holds dspark/state.json), if any."""
    for parent in path.resolve().parents:
        if (parent / ".git" / "dspark" / "state.json").is_file():
            return parent
        if (parent / ".git").is_file() and Workspace(parent).is_repo() and Workspace(parent).state_file.is_file():
            return parent
    return None


def _being_made(workdir: Path) -> str:
    """What the first apply for `workdir` left beside it: the sibling it is making the workspace in
    now, or a killed one's (which is large: a whole release tree)."""
    found = [found for kind in MADE_IN for found in scratches(workdir, kind)]
    for scratch, live in sorted(found, key=lambda f: not f[1]):  # a live one first
        if live:
            return f"; a dspark apply is making it now (in {scratch.name}): run again when it has finished"
        return (f"; an apply killed while making it left {scratch}, which the next `dspark apply` making "
                "this --workdir from the same source removes (or remove it yourself)")
    return ""


def _existing_workspace(workdir: Path) -> tuple[Workspace, dict]:
    """The dspark workspace at `workdir` and its state; bad input otherwise."""
    if not workdir.exists():
        raise UsageError(f"{workdir} does not exist; --workdir/-C names the directory `dspark apply` made"
                         + _being_made(workdir))
    if not workdir.is_dir():
        raise UsageError(f"{workdir} is a file; --workdir/-C names the directory `dspark apply` made")
    check_listable(workdir, "--workdir")
    ws = Workspace(workdir)
    state = ws.read_state() if ws.is_repo() else None
    if state is None:
        top = _enclosing_workspace(workdir)
        if top is not None:
            raise UsageError(f"{workdir} is inside the dspark workspace {top}; pass --workdir {top}")
        raise UsageError(f"{workdir} is not a dspark workspace (run `dspark apply` first, or pass --workdir/-C)")
    if ws.resolve_commit(state["base"]) is None:
        raise UsageError(f"{ws.state_file}: corrupt dspark state, its base {state['base'][:12]} is not a commit in "
                         "this repository; to start over, run `dspark apply` with a new --workdir")
    return ws, state


def revert(workdir: Path, force: bool = False, keep_user_commits: bool = False) -> dict:
    """Back to the pristine base on the dspark branch. Commits of the user's on top are replayed
    onto the base with --keep-user-commits, else the revert is refused; the old tip stays as
    refs/dspark/before-revert."""
    ws, _ = _existing_workspace(workdir)
    with oplock.exclusive(ws.git_dir, ws.path):
        recovered = recover(ws, force)
        state = ws.read_state()  # recovery may have rewritten it, or removed it
        if state is None:  # a killed first apply, undone: the directory is as it was before dspark
            return {"workdir": str(ws.path), "status": "nothing to revert", "base": None, "branch": None,
                    "removed": [], "kept": [], "recovered": recovered,
                    "notes": ["the interrupted first `dspark apply` was undone: this is no longer a dspark workspace"]}
        result = _revert(ws, state, force, keep_user_commits)
    return {**result, "recovered": recovered}


def _revert(ws: Workspace, state: dict, force: bool, keep_user_commits: bool) -> dict:
    base, branch = state["base"], state["branch"]
    tip = ws.branch_sha(branch) or base
    applied, user = ws.applied(base, tip)
    notes = []
    result = {"workdir": str(ws.path), "base": base, "branch": branch, "notes": notes,
              "removed": [p.label for p in applied], "kept": [sha for sha, _ in user]}
    if ws.head() is None:  # HEAD on a branch deleted by hand: "already at base" would be a claim, not a revert
        raise UsageError(f"{ws.path}: HEAD is on {ws.current_branch() or '?'}, which has no commit (deleted?); "
                         f"check out a branch or commit (the base is {base[:12]}), then run again")
    if not applied and ws.current_branch() == f"refs/heads/{branch}":
        ws.finish({**state, "applied": []})
        return {**result, "status": "already at base"}
    if user:
        _check_no_merge(ws, base, tip, branch, applied[-1].commit if applied else base)
    if user and not keep_user_commits:
        listing = "; ".join(f"{sha[:12]} {subject}" for sha, subject in user[:3])
        raise UsageError(f"{len(user)} commit(s) of yours on {branch} ({listing}); pass --keep-user-commits "
                         "to replay them onto the base, or move them to another branch first")
    changed = ws.changed_patch_commits(applied, _patch_files(_layer_patches(state)[0]))
    if changed and not force:
        done, why = changed[0]
        raise UsageError(f"{done.label}'s commit {done.commit[:12]} {why}: move them into a commit of their own, "
                         "or pass --force to revert anyway with the branch kept as dspark/saved-<time>")
    _check_not_in_another_worktree(ws, branch)
    _refuse_git_locks(ws, branch)
    changes = _local_changes(ws, force, [base, *(sha for sha, _ in user)])
    _refuse_ignored_in_the_way(ws, "revert", [ws.head(), base, *(sha for sha, _ in user)])  # user's: replayed
    notes += _save_detached_commits(ws, base, branch, force)
    snapshot = ws.begin("revert", branch, bool(changes), state)
    try:
        ws.checkout_noted(base, "-q", "-f", "-B", branch, base)
        identity = ws.identity_or(DSPARK_IDENTITY)  # the user commits their replayed commits
        for count, (sha, subject) in enumerate(user, 1):
            # --keep-redundant-commits: a commit whose changes the base already has (it undid a
            # patch, say) is kept as an empty commit and named below, not dropped or refused.
            # the message byte for byte, as a plain cherry-pick keeps it (not OUR_COMMITS' cleanup)
            picked = ws.git.run(*OUR_COMMITS, "-c", "commit.cleanup=verbatim", "cherry-pick",
                                "--keep-redundant-commits", sha, check=False, env=identity)
            if picked.returncode != 0:
                raise PatchFailed(f"your commit {sha[:12]} ({subject}) does not apply without the patches; "
                                  f"{ws.path} is back to its state before the revert")
            if ws.changes_nothing("HEAD") and not ws.changes_nothing(sha):
                notes.append(f"your commit {sha[:12]} ({subject}) changes nothing without the patches; it is kept "
                             "as an empty commit")
            kill_point(f"replayed:{count}")
        ws.git.run("update-ref", "refs/dspark/before-revert", tip)
        if changed:
            saved = ws.save_branch(tip)
            notes.append(f"{len(changed)} patch commit(s) holding changes of yours are kept on branch {saved}")
        stash = ws.stash_ref(snapshot.stash_message) if snapshot.stash_message else None  # before finish, as apply
    except BaseException:
        ws.undo(snapshot, state)
        raise
    ws.complete("revert", {**state, "applied": []})
    if stash:
        notes.append(f"your local changes are saved as `{stash}`")
    return {**result, "status": "reverted", "head": ws.head()}


def _check_no_merge(ws: Workspace, base: str, tip: str, branch: str, onto: str) -> None:
    """Revert replays the user's commits one by one with cherry-pick, which cannot replay a merge
    (it asks which parent to diff against): name the merge and refuse before touching anything."""
    merges = ws.git.out("rev-list", "--min-parents=2", f"{base}..{tip}").split()
    if merges:
        subject = ws.git.out("log", "-1", "--format=%s", merges[0])
        raise UsageError(f"your commit {merges[0][:12]} ({subject}) on {branch} is a merge, which revert cannot "
                         f"replay onto the base; make your commits a line (`git -C {ws.path} rebase {onto[:12]}` "
                         "drops merges and replays what they brought in) or move them to another branch, then run again")


def status(workdir: Path) -> dict:
    """Where a workspace stands: base, applied patches, drift from pin and series, build record."""
    ws, state = _existing_workspace(workdir)
    base, branch = state["base"], state["branch"]
    tip = ws.branch_sha(branch) or base
    drift = []
    snapshot = Snapshot(**state["in_progress"]) if state.get("in_progress") else None
    running = oplock.holder(ws.git_dir)  # an apply/revert running now (it may be recovering `snapshot`)
    busy = None  # why the tree is not the applied series now: something running, or an interrupted run
    if snapshot and owner_running(snapshot):
        busy = (f"a dspark {snapshot.op} (pid {snapshot.pid}, started {snapshot.started}) is in progress; "
                "run dspark status again when it has finished")
    elif running:
        busy = (f"a dspark apply, revert or rebase (pid {running}) is running in {ws.path} or another worktree of its "
                "repository; run dspark status again "
                "when it has finished")
    elif snapshot:
        lost = _lost_by_recovery(ws, snapshot, base)
        busy = (f"an interrupted {snapshot.op} (started {snapshot.started}) left the workspace half done; the next "
                "dspark apply or revert restores the state before it" + (
                    f", but refuses while that would discard {lost}: with --force it keeps them on a "
                    "dspark/saved-<time> branch first" if lost else ""))
    if busy:
        drift.append(busy)
    if snapshot:
        # The state's layers are those before it: compare the branch as recovery will restore it.
        tip = state["in_progress"]["work_branch_sha"] or base
    applied, user = ws.applied(base, tip)
    if state.get("unpinned"):
        drift.append(f"base {base[:12]} is not a pinned commit (applied with --allow-unpinned)")
    else:
        drift += _pin_drift(state)
    expected, unreadable = _layer_patches(state)
    drift += unreadable + _series_read_now(state, expected)
    by_label = {p.label: p for p in expected}
    for done in applied:
        wanted = by_label.get(done.label)
        if wanted is None:
            drift.append(f"{done.label} is applied but no longer in its series")
        elif wanted.sha256 != done.sha256:
            drift.append(f"{done.label} changed in its series since it was applied")
    drift += _out_of_order(applied, expected)
    for done, why in ws.changed_patch_commits(applied, _patch_files(expected)):
        drift.append(f"{done.label}'s commit {done.commit[:12]} {why}; dspark revert refuses to drop them without "
                     "--force")
    missing = [p.label for p in expected if p.label not in {d.label for d in applied}]
    if missing:
        drift.append(f"{len(missing)} patch(es) of the series not applied: {', '.join(missing)}")
    if user:
        drift.append(f"{len(user)} commit(s) of yours on {branch}")
    changes = ws.local_changes()
    if changes:
        drift.append(f"{len(changes)} local change(s) in the worktree")
    detached = ws.commits_on_no_branch(base)
    if detached:
        how = _lost_branch_at_head(ws, base, branch) or "put them on a branch before dspark apply or revert"
        drift.append(f"HEAD is detached with {len(detached)} commit(s) on no branch (newest {detached[0][0][:12]}); {how}")
    elif ws.current_branch() != f"refs/heads/{branch}":
        drift.append(f"HEAD is not on {branch}")
    return {
        "workdir": str(ws.path), "engine": state.get("engine"), "pin": state.get("pin"),
        "source": state.get("source"), "base": base, "branch": branch, "head": ws.head(),
        "applied": [{"label": p.label, "commit": p.commit, "subject": p.subject, "sha256": p.sha256} for p in applied],
        "user_commits": [{"commit": sha, "subject": subject} for sha, subject in user],
        "detached_commits": [{"commit": sha, "subject": subject} for sha, subject in detached],
        "drift": drift, "in_progress": busy, "build": build_records(state.get("engine"), ws.path),
    }


def _out_of_order(applied: list[AppliedPatch], expected: list[Patch]) -> list[str]:
    """apply refuses a series that does not start with the patches applied, in their order (reordered,
    or one inserted before them): a line naming the first difference. Patches no longer in the series
    (or in a layer that cannot be read) are left out here: their own lines name them."""
    listed = [p.label for p in expected]
    known = [done.label for done in applied if done.label in listed]
    for done, wanted in zip(known, listed):
        if done != wanted:
            return [f"{done} is applied where the series has {wanted}: the series no longer starts with the "
                    "patches applied, in their order, so dspark apply refuses until `dspark revert` takes them off"]
    return []


def _layer_patches(state: dict) -> tuple[list[Patch], list[str]]:
    """The patches of the series layers a workspace was applied with, as far as they can still be
    read, and a line for each layer that cannot be (status reports it; revert does without it)."""
    patches, unreadable = [], []
    for layer in state.get("layers", []):
        try:
            patches += load_series(Path(layer["dir"]), layer["layer"])
        except DsparkError as exc:
            unreadable.append(f"series {layer['layer']} cannot be read: {exc}")
    return patches, unreadable


def _series_read_now(state: dict, expected: list[Patch]) -> list[str]:
    """Status compares with the compat.yaml the workspace was applied from; when the commands now read
    another one (DSPARK_COMPAT set or unset since) that names another DSpark series for the pin,
    `dspark apply` would compare with that one instead: say so, or status and apply disagree
    silently. One that cannot be read or lacks the pin is not compared: apply says so itself."""
    recorded = state.get("compat")
    try:
        now = default_path().resolve()
        if not isinstance(recorded, str) or now == Path(recorded):
            return []
        engine = load_compat(now).engines.get(state.get("engine") or "")
        pin = engine.pins.get(state.get("pin") or "") if engine else None
        series = load_series(pin.series_dir(), "dspark") if pin else []
    except (DsparkError, OSError):
        return []
    was = {p.label: p.sha256 for p in expected if p.layer == "dspark"}
    is_now = {p.label: p.sha256 for p in series}
    differ = sorted(label for label in was.keys() | is_now.keys() if was.get(label) != is_now.get(label))
    if not pin or not differ:
        return []
    return [f"the compat.yaml read now, {now}, names another DSpark series for {pin.name} than {recorded}, the one "
            f"it was applied from ({', '.join(differ)} differ): `dspark apply` here compares with the series read now"]


def _patch_files(patches: list[Patch]) -> dict[tuple[str, str], Path]:
    """(label, sha256) → patch file: what a patch commit of an older dspark, which kept no copy of its
    patch, is compared with (changed_patch_commits)."""
    return {(p.label, p.sha256): p.path for p in patches}


def _pin_drift(state: dict) -> list[str]:
    """The workspace's base against the pin in the compat.yaml it was applied from, as that file is
    now (its commit, or its release file's sha256); the default compat.yaml for older workspaces."""
    recorded = state.get("compat")
    try:
        path = Path(recorded) if isinstance(recorded, str) and Path(recorded).is_file() else None
    except OSError as exc:  # a name the OS refuses (ENAMETOOLONG)
        return [f"cannot compare with compat.yaml: the recorded {recorded}: {exc.strerror}"]
    try:
        engine = load_compat(path).engine(state.get("engine") or "")
    except (UsageError, EnvironmentProblem) as exc:  # status still reports, with this note
        return [f"cannot compare with compat.yaml: {exc}"]
    pin = engine.pins.get(state.get("pin") or "")
    if pin is None:
        return [f"pin {state.get('pin')} is no longer in compat.yaml for {engine.name}"]
    source = state.get("source") or {}
    if source.get("kind") == "pypi":
        if not any(r.file == source.get("file") and r.sha256 == source.get("sha256") for r in pin.releases):
            return [f"base is {source.get('file')} (sha256 {str(source.get('sha256'))[:12]}), which compat.yaml no "
                    f"longer pins for {pin.name}; revert and apply in a new --workdir"]
    elif not pin.matches_commit(state["base"]):
        return [f"base {state['base'][:12]} differs from compat.yaml's pin {pin.name} ({pin.commit[:12]}); "
                "apply it in a new --workdir"]
    return []


def build_records(engine: str | None, workdir: Path) -> list[dict]:
    """What `dspark build` recorded that concerns this workdir: the kernel build (last.json: the last
    good one; last-failed.json: a failed one since), and the install of this engine's server from
    this workdir (engine-<name>.json; another tree's is not shown)."""
    root = cache_root()
    records = []
    for path in (root / LAST, root / LAST_FAILED, root / f"engine-{engine}.json"):
        try:
            if not path.is_file():  # (raises on a name the OS refuses: ENAMETOOLONG)
                continue
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:  # (RecursionError: nesting too deep)
            records.append({"file": str(path), "error": f"unreadable: {exc}"})
            continue
        named = record.get("workdir", "") if isinstance(record, dict) else None
        if not isinstance(named, str) or "\0" in named:  # no path holds a NUL (resolve() raised on it)
            records.append({"file": str(path), "error": "corrupt: not an object with a workdir path"})
            continue
        if path.name.startswith("engine-") and Path(named).resolve() != workdir.resolve():
            continue
        records.append({"file": str(path), "record": record})
    return records
