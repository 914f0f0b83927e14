"""A git workspace dspark patches: running git, the state file, and exact snapshots for rollback.

The state file lives inside the git directory (`.git/dspark/state.json`) so it never shows up as
a worktree change. While an operation runs it holds an `in_progress` record (the snapshot taken
before anything was touched); a run killed midway leaves it behind and the next run restores it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import MISSING, asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Iterator

from dspark_cli import oplock
from dspark_cli.errors import EnvironmentProblem, UsageError
from dspark_cli.files import write_text_atomically

TRAILER_PATCH = "Dspark-Patch"
TRAILER_SHA = "Dspark-Patch-Sha256"
# The patch file's bytes as a blob of the workspace's own (keep_patch): what revert checks the
# commit against, whatever has become of the series directory since.
TRAILER_BLOB = "Dspark-Patch-Blob"
PATCH_REFS = "refs/dspark/patches"  # one ref per kept blob, so gc never prunes it
# Our own commits (base, patches) are committed by dspark; patch authors are kept as authors.
DSPARK_IDENTITY = {"GIT_COMMITTER_NAME": "dspark", "GIT_COMMITTER_EMAIL": "dspark@localhost"}
# Author and committer of commits that are ours entirely (release trees, state snapshots), so they
# need no git identity configured on the machine.
DSPARK_AUTHOR = {**DSPARK_IDENTITY, "GIT_AUTHOR_NAME": "dspark", "GIT_AUTHOR_EMAIL": "dspark@localhost"}
# git options for the commits dspark makes (patches, release trees, replays): none signed, and each
# message cleaned as git does by default for `commit -F` (a user's commit.cleanup=strip dropped `#`
# lines; revert's replays override it with verbatim, a plain cherry-pick's default).
OUR_COMMITS = ("-c", "commit.gpgsign=false", "-c", "commit.cleanup=whitespace")
# No git command of ours runs the user's hooks: a failing post-checkout (git-lfs's, where git-lfs is
# not installed) failed a rollback's checkout halfway, and --no-verify still runs prepare-commit-msg.
NO_HOOKS = ("-c", "core.hooksPath=/dev/null")
# Settings of a user's git config that change what the git commands of ours read or write, pinned to
# git's defaults for every one of them: i18n.commitEncoding made `git mailinfo -u` hand us latin-1
# (read as UTF-8: U+FFFD in every commit message apply made) and commit label UTF-8 messages so;
# i18n.logOutputEncoding made `git log` subjects lone surrogates in status; mailinfo.scissors cut a
# patch's message at a `-- >8 --` line; apply.whitespace=error refused (the diagnosis's `--check`,
# the series parse) patches with trailing whitespace; log.showSignature printed gpg's or ssh-keygen's
# check ahead of each signed commit's `git log --format` fields (status took it for the commit id,
# revert cherry-picked it). Given in the environment (config_env), so the
# command line stays `git -c core.hooksPath=/dev/null COMMAND ...`.
GIT_DEFAULTS = {"i18n.commitEncoding": "UTF-8", "i18n.logOutputEncoding": "UTF-8", "mailinfo.scissors": "false",
                "apply.whitespace": "nowarn", "log.showSignature": "false"}


# git's variables that name the repository, work tree, index or object store it works on (`git
# rev-parse --local-env-vars`, less the GIT_CONFIG* ones: settings, not a location). A git hook that
# runs dspark (or a shell that exported GIT_DIR) passed them on, and every git command of ours worked
# on that repository instead of the workspace named with -C: an apply --force stashed the user's
# changes there, fetched into it and switched its HEAD to dspark/<pin>. dspark always names its
# repository by directory, so they are dropped; a scratch index of ours is given after that.
REPOSITORY_ENV = ("GIT_DIR", "GIT_WORK_TREE", "GIT_IMPLICIT_WORK_TREE", "GIT_COMMON_DIR", "GIT_INDEX_FILE",
                  "GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_GRAFT_FILE",
                  "GIT_NO_REPLACE_OBJECTS", "GIT_REPLACE_REF_BASE", "GIT_PREFIX", "GIT_INTERNAL_SUPER_PREFIX",
                  "GIT_SHALLOW_FILE")


def git_environ() -> dict[str, str]:
    """os.environ without REPOSITORY_ENV: the base of every git command's environment."""
    return {key: value for key, value in os.environ.items() if key not in REPOSITORY_ENV}


def config_env(settings: dict[str, str], env: dict[str, str] | None = None) -> dict[str, str]:
    """The GIT_CONFIG_COUNT/KEY_n/VALUE_n variables that give git `settings` as `git -c` does (git
    2.31 and later), numbered after any that `env` (default: ours) already gives."""
    env = os.environ if env is None else env
    try:
        count = max(int(env.get("GIT_CONFIG_COUNT", "0") or 0), 0)
    except ValueError:
        count = 0
    added = {"GIT_CONFIG_COUNT": str(count + len(settings))}
    for n, (key, value) in enumerate(settings.items(), count):
        added.update({f"GIT_CONFIG_KEY_{n}": key, f"GIT_CONFIG_VALUE_{n}": value})
    return added


# Test hook: SIGKILL ourselves at a named point of an operation (kill_point), to test recovery for
# real: "committed:<k>" after apply's k-th patch commit, "applied:<k>" between its `git apply` and
# that commit, "replayed:<k>" after revert's k-th replayed commit.
KILL_AT_ENV = "DSPARK_TEST_KILL_AT"

# How this process's own apply or revert stands, for the line an interrupt prints (cli.main):
# "recovering" (an earlier interrupted one's snapshot), "begun" (its snapshot is recorded: the next
# run restores it), "rolled back" or "finished".
PROGRESS: dict[str, str] = {}


def kill_point(point: str) -> None:
    if point and os.environ.get(KILL_AT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


class GitFailed(EnvironmentProblem):
    """A git command we expected to work failed: one line (git's first error line), exit 3."""

    # git's options that take a value ahead of the command (`git -c k=v commit`, `--work-tree DIR add`)
    _VALUED_OPTIONS = ("-c", "-C", "--work-tree", "--git-dir")

    def __init__(self, args, result):
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        self.reason = next((line for line in lines if line.startswith(("fatal:", "error:"))), lines[0] if lines else "failed")
        super().__init__(f"git {self._command(args)} failed: {self.reason}")

    @classmethod
    def _command(cls, args) -> str:
        """The git command's name: the first argument that is neither an option nor an option's value."""
        args = list(args)
        while args and args[0].startswith("-"):
            args = args[2:] if args[0] in cls._VALUED_OPTIONS else args[1:]
        return args[0] if args else ""


# git's words for a failure of the machine (permissions, a read-only mount, a full disk), not of the
# patch or the user's changes: such a failure is exit 3, whichever command hit it.
_ENVIRONMENT_FAILURE = re.compile(r"Read-only file system|Permission denied|No space left on device|"
                                  r"Disk quota exceeded|insufficient permission|unable to create temporary file")


def environment_failure(stderr: str) -> bool:
    return bool(_ENVIRONMENT_FAILURE.search(stderr))


def require_git() -> None:
    if shutil.which("git") is None:
        raise EnvironmentProblem("git is not installed (needed to patch the engine tree)")
    said = _git_failure(os.environ.get("GIT_CONFIG_GLOBAL"), os.environ.get("HOME"))
    if said:
        raise EnvironmentProblem(f"git does not run: {said}")


@functools.lru_cache(maxsize=8)
def _git_failure(global_config: str | None, home: str | None) -> str | None:
    """git's first line when `git version` fails (a malformed ~/.gitconfig fails every git command:
    a series parse reported it as the patch git cannot read), else None; once per config."""
    ran = subprocess.run(["git", "version"], capture_output=True, text=True, errors="replace",
                         env={**os.environ, "LC_ALL": "C"})
    if ran.returncode == 0:
        return None
    return (ran.stderr.strip().splitlines() or [f"git version: exit {ran.returncode}"])[0]


class Git:
    def __init__(self, cwd: Path):
        self.cwd = Path(cwd)
        require_git()

    def run(self, *args: str, check: bool = True, env: dict | None = None, input: str | None = None):
        """git's output as text: UTF-8, a byte that is not (a path named in another encoding) as a
        surrogate, so it goes back to git as the same byte (input is encoded alike, as Python does
        arguments); no newline is translated, so a patch's CRLF lines stay as they are."""
        # GIT_OPTIONAL_LOCKS=0: `git status` (dspark status, beside a running apply) would otherwise
        # take index.lock to refresh the index, and the apply's own git commands would fail on it.
        full_env = {**git_environ(), "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "GIT_OPTIONAL_LOCKS": "0", **(env or {})}
        full_env.update(config_env(GIT_DEFAULTS, full_env))
        result = subprocess.run(["git", *NO_HOOKS, *args], cwd=self.cwd, env=full_env, capture_output=True,
                                input=None if input is None else input.encode("utf-8", "surrogateescape"))
        result.stdout, result.stderr = (out.decode("utf-8", "surrogateescape") for out in (result.stdout, result.stderr))
        if check and result.returncode != 0:
            raise GitFailed(args, result)
        return result

    def out(self, *args: str, **kwargs) -> str:
        return self.run(*args, **kwargs).stdout.strip()

    def ok(self, *args: str) -> bool:
        return self.run(*args, check=False).returncode == 0


@dataclass
class Snapshot:
    """What `restore` needs to put HEAD, branches, index and worktree back exactly."""

    head: str | None  # None: the repository had no commit yet
    branch: str | None  # full ref HEAD pointed at, None if detached
    work_branch: str  # the dspark/<pin> branch the operation may create or move
    work_branch_sha: str | None  # its value before, None if it did not exist
    stash_message: str | None  # set when local changes were stashed (`--force`)
    pid: int
    op: str
    started: str
    # process_tag(pid) of the process that took it: a pid reused since (a new container, a reboot)
    # is told from a live run. None when written by an older dspark or where /proc cannot tell.
    process: str | None = None
    # {"patch": path, "onto": HEAD} while `git apply` and its commit of one patch run: a kill between
    # them leaves that patch's changes in the worktree, which are ours, not the user's.
    applying: dict | None = None
    # The commit a checkout of ours moves the worktree to, while it runs: a kill part way leaves
    # files of that commit in the worktree, which are ours, not the user's.
    moving_to: str | None = None
    # No state file before the operation (a first apply in a clone of the user's): undoing it
    # removes the state file again, so a failed first apply does not make the clone a workspace.
    first: bool = False


@dataclass(frozen=True)
class AppliedPatch:
    label: str
    sha256: str
    commit: str
    subject: str
    blob: str = ""  # TRAILER_BLOB; "" in commits of a dspark older than it


class Workspace:
    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.git = Git(self.path)

    # -- basic facts -------------------------------------------------------------------------
    @contextlib.contextmanager
    def scratch_index(self, tree: str | None = None, objects: dict | None = None) -> Iterator[dict[str, str]]:
        """The environment for git commands on a throwaway index (holding `tree`, else empty; read
        through `objects`, _scratch_objects' environment, when given): trees and commits made
        without touching the real index, HEAD or the work tree."""
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            if tree:
                self.git.run("read-tree", tree, env={**env, **(objects or {})})
            yield env

    def is_repo(self) -> bool:
        if not (self.path / ".git").exists():
            return False
        found = self.git.run("rev-parse", "--git-dir", check=False)
        refused = another_users_repository(found.stderr, str(self.path), self.path)
        if refused:  # a repository, but git will not work in it (containerized CI)
            raise refused
        return found.returncode == 0

    @property
    def git_dir(self) -> Path:
        return Path(self.git.out("rev-parse", "--absolute-git-dir"))

    @property
    def state_file(self) -> Path:
        return self.git_dir / "dspark" / "state.json"

    def head(self) -> str | None:
        result = self.git.run("rev-parse", "--verify", "-q", "HEAD", check=False)
        return result.stdout.strip() or None

    def current_branch(self) -> str | None:
        result = self.git.run("symbolic-ref", "-q", "HEAD", check=False)
        return result.stdout.strip() or None

    def branch_sha(self, branch: str) -> str | None:
        result = self.git.run("rev-parse", "--verify", "-q", f"refs/heads/{branch}", check=False)
        return result.stdout.strip() or None

    def resolve_commit(self, ref: str) -> str | None:
        result = self.git.run("rev-parse", "--verify", "-q", f"{ref}^{{commit}}", check=False)
        return result.stdout.strip() or None

    def local_changes(self) -> list[str]:
        """`git status --porcelain` lines (`XY PATH`, the path as it is, unquoted): modified, staged
        and untracked (not ignored) paths. Files untracked inside a submodule are not ours to save or
        touch: no stash, checkout or reset recurses into a submodule, so they stay as they are (e.g.
        a build's output)."""
        lines = self._status_lines()
        nested = {f"?? {path}/" for path in self.nested_repositories(lines)}
        return [line for line in lines if line.strip() and line not in nested]

    def _status_lines(self) -> list[str]:
        """`git status --porcelain=v1` lines, read with -z: without it git quotes a path holding a
        space, a quote or a non-ASCII letter (`?? "my tools/"`), which no path of ours then matched.
        A rename's or copy's original path (the entry after it under -z) is left out."""
        entries = iter(self.git.run("status", "--porcelain=v1", "-z", "--untracked-files=all",
                                    "--ignore-submodules=untracked").stdout.split("\0"))
        lines = []
        for entry in entries:
            if not entry:
                continue
            lines.append(entry)
            if entry[:1] in ("R", "C") or entry[1:2] in ("R", "C"):
                next(entries, None)
        return lines

    def nested_repositories(self, status_lines: list[str] | None = None) -> list[str]:
        """Untracked directories that are git repositories of their own (a clone inside the tree):
        git status lists them as `?? DIR/` where it lists every other untracked file singly, and git
        stash leaves them alone ("Ignoring path"), as do our checkouts unless they track paths there."""
        if status_lines is None:
            status_lines = self._status_lines()
        return [line[3:-1] for line in status_lines
                if line.startswith("?? ") and line.endswith("/") and (self.path / line[3:-1] / ".git").exists()]

    def git_paths(self, *names: str) -> list[Path]:
        """Where git keeps each of `names` (index, HEAD.lock, MERGE_HEAD...) for this worktree, the
        shared ones (objects, refs) in the repository's common directory: one rev-parse for all."""
        listed = self.git.out("rev-parse", *(arg for name in names for arg in ("--git-path", name)))
        return [(self.path / path).resolve() for path in listed.splitlines()]

    # git's files for an operation it has under way, what it is, and how the user ends it
    _OPERATIONS = (("MERGE_HEAD", "a merge", "git merge --abort"),
                   ("CHERRY_PICK_HEAD", "a cherry-pick", "git cherry-pick --abort"),
                   ("REVERT_HEAD", "a revert", "git revert --abort"),
                   ("rebase-merge", "a rebase", "git rebase --abort"),
                   ("rebase-apply", "a rebase or git am", "git rebase --abort, or git am --abort"),
                   ("sequencer", "a cherry-pick or revert of several commits", "git cherry-pick --abort"))

    def operation_in_progress(self) -> tuple[str, str] | None:
        """(what, how to abort it) for a merge, cherry-pick, revert or rebase git has under way here:
        our stash and checkouts would end it (a merge's MERGE_HEAD dropped, a stopped rebase going on
        over our branch). One rev-parse for all of git's per-worktree paths."""
        paths = self.git_paths(*(name for name, _, _ in self._OPERATIONS))
        for path, (_, what, abort) in zip(paths, self._OPERATIONS):
            if path.exists():
                return what, abort
        return None

    def changed_submodules(self) -> list[str]:
        """Submodules with another commit checked out or tracked files modified inside: `git stash`
        saves neither ("No local changes to save"), so --force could not keep them. Untracked files
        inside one are left alone by every git command we run, so they are no reason to refuse."""
        records = iter(self.git.run("status", "--porcelain=v2", "-z", "--untracked-files=all").stdout.split("\0"))
        # "1 XY SCMU <5 fields> path", or "2 XY SCMU <6 fields> path" then the original path as its
        # own record for a rename: the third field is S and its flags for a submodule, N... otherwise.
        changed = []
        for record in records:
            kind = record[:2]
            fields = record.split(" ", 9 if kind == "2 " else 8)
            if kind == "2 ":
                next(records, None)
            # the S field is "S" + C (commit changed) + M (tracked changes) + U (untracked), "." if not
            if kind in ("1 ", "2 ") and fields[2].startswith("S") and (fields[2][1] == "C" or fields[2][2] == "M"):
                changed.append(fields[-1])
        return changed

    def hidden_edits(self) -> dict[str, list[str]]:
        """{flag: the files so marked that differ from their index entry}: assume-unchanged ones
        (ls-files -v: a lowercase tag; also when gone, and reset --hard or checkout -f overwrites
        them), and skip-worktree ones (S or s; the usual way to keep a local
        edit of a tracked file out of git status) that are in the worktree (one that is absent is a
        sparse checkout's, no edit): git status and git stash pass both by, and git apply and checkout
        fail on the latter (a patch reported as not applying). Only the flagged files are compared,
        by git itself, in a scratch copy of the index with their flags cleared."""
        entries = [(entry[:1], entry[2:]) for entry in self.git.out("ls-files", "-v", "-z").split("\0") if entry]
        flagged = {"assume-unchanged": [path for tag, path in entries if tag.islower()],
                   "skip-worktree": [path for tag, path in entries
                                     if tag in ("S", "s") and os.path.lexists(self.path / path)]}
        paths = list(dict.fromkeys(flagged["assume-unchanged"] + flagged["skip-worktree"]))
        if not paths:
            return flagged
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            shutil.copyfile(self.git_paths("index")[0], env["GIT_INDEX_FILE"])
            for clear in ("--no-assume-unchanged", "--no-skip-worktree"):  # one flag a run: git heeds only one
                self.git.run("update-index", "-z", clear, "--stdin", input="\0".join(paths) + "\0", env=env)
            differ = set(self.git.out("diff", "--name-only", "-z", env=env).split("\0"))
        return {flag: [path for path in listed if path in differ] for flag, listed in flagged.items()}

    def entries_stash_cannot_keep(self) -> list[str]:
        """'PATH (why)' for index entries `git stash push` fails on, or saves but cannot give back:
        intent-to-add (`git add -N`) and unmerged (a conflicted merge or cherry-pick) entries make
        push fail; a file removed from the index but kept in the worktree (`git rm --cached`) is
        saved, but pop then fails on it (the untracked file collides with the staged deletion)."""
        entries = iter(self.git.out("status", "--porcelain=v2", "-z", "--untracked-files=all",
                                    "--ignore-submodules=all").split("\0"))
        found, removed, untracked = [], [], set()
        for entry in entries:
            if entry.startswith("u "):
                found.append(f"{entry.split(' ', 10)[-1]}: unmerged")
            elif entry.startswith("1 .A "):
                found.append(f"{entry.split(' ', 8)[-1]}: intent-to-add")
            elif entry.startswith("1 D"):
                removed.append(entry.split(" ", 8)[-1])
            elif entry.startswith("2 "):
                next(entries, None)  # -z gives a rename's original path as an entry of its own
            elif entry.startswith("? "):
                untracked.add(entry[2:])
        return found + [f"{path}: removed from the index, kept in the worktree" for path in removed if path in untracked]

    def ignored_in_the_way(self, commits: list[str]) -> list[str]:
        """Ignored files (untracked, matched by .gitignore or the excludes) that checking out or
        resetting to one of `commits` would overwrite or delete without asking, as git takes them
        for disposable: where it tracks a file, where it needs a directory, or under a path it
        tracks as a file. One ls-files, and one ls-tree per commit."""
        ignored = [path for path in self.git.run("ls-files", "-z", "-o", "-i", "--exclude-standard").stdout.split("\0")
                   if path]
        return self._in_the_way(ignored, commits)

    def nested_repositories_in_the_way(self, commits: list[str]) -> list[str]:
        """Nested repositories (nested_repositories) at or under a path one of `commits` tracks:
        a forced checkout or reset there overwrites the files in them."""
        return self._in_the_way(self.nested_repositories(), commits)

    def _in_the_way(self, paths: list[str], commits: list[str]) -> list[str]:
        """Those of `paths` at a path one of `commits` tracks as a file or needs as a directory, or
        under a path it tracks as a file. One ls-tree per commit."""
        if not paths:
            return []
        files = set()
        for commit in dict.fromkeys(commits):
            files.update(self.git.run("ls-tree", "-r", "-z", "--name-only", commit).stdout.split("\0"))
        dirs = {str(parent) for path in files for parent in PurePosixPath(path).parents}
        return [path for path in paths if path in files or path in dirs
                or any(str(parent) in files for parent in PurePosixPath(path).parents)]

    def worktree_on(self, branch: str) -> Path | None:
        """The worktree of this repository (this one or a `git worktree add`) that has `branch`
        checked out, if any. git names a worktree whose git directory sets core.worktree (a
        submodule's: .git/modules/NAME) by that git directory: that one, when it is ours, is this one."""
        path, ours = None, self.git_dir.resolve()
        for line in self.git.out("worktree", "list", "--porcelain").splitlines():
            if line.startswith("worktree "):
                path = Path(line[len("worktree "):]).resolve()
                path = self.path if path == ours else path
            elif line == f"branch refs/heads/{branch}":
                return path
        return None

    def changes_nothing(self, commit: str) -> bool:
        """Whether `commit` changes nothing against its first parent (one rev-parse for both trees)."""
        tree, parent = self.git.out("rev-parse", f"{commit}^{{tree}}", f"{commit}^1^{{tree}}").split()
        return tree == parent

    def is_ancestor(self, ancestor: str, commit: str) -> bool:
        return self.git.ok("merge-base", "--is-ancestor", ancestor, commit)

    # -- state file --------------------------------------------------------------------------
    def read_state(self) -> dict | None:
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (IsADirectoryError, NotADirectoryError, ValueError, RecursionError) as exc:  # damaged (too deep too)
            problem = f"unreadable ({exc})"
        except OSError as exc:  # permissions, I/O: the environment's problem, not the state's
            raise EnvironmentProblem(f"{self.state_file}: cannot read the dspark state ({exc.strerror or exc})") from None
        else:
            problem = _state_shape_problem(state)
            if problem is None:
                return state
        raise UsageError(f"{self.state_file}: corrupt dspark state, {problem}; to start over, run "
                         "`dspark apply` with a new --workdir") from None

    def write_state(self, state: dict) -> None:
        """Atomic replace, so a kill never leaves half a state file."""
        write_text_atomically(self.state_file, json.dumps(state, indent=2, sort_keys=True) + "\n")

    # -- snapshots ---------------------------------------------------------------------------
    def begin(self, op: str, work_branch: str, stash_changes: bool, state: dict) -> Snapshot:
        """Record the pre-operation snapshot in the state file, then stash local changes if asked.
        A stash that saves nothing (git said "No local changes to save") leaves the state as it was
        and is bad input: the operation would carry or lose changes it claims to have kept."""
        first = self.read_state() is None
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        snapshot = Snapshot(
            head=self.head(),
            branch=self.current_branch(),
            work_branch=work_branch,
            work_branch_sha=self.branch_sha(work_branch),
            stash_message=f"dspark {op} {os.getpid()} {stamp}: local changes" if stash_changes else None,
            pid=os.getpid(),
            op=op,
            started=stamp,
            process=process_tag(os.getpid()),
            first=first,
        )
        self.write_state({**state, "in_progress": asdict(snapshot)})
        PROGRESS.update(op=op, stage="begun")
        if stash_changes:
            try:
                pushed = self.git.run("stash", "push", "--include-untracked", "-m", snapshot.stash_message,
                                      check=False)
                stash = self.stash_ref(snapshot.stash_message)  # a Ctrl-C here left the changes only stashed
            except BaseException:
                # Interrupted (Ctrl-C) before the caller's rollback covers it: git stores the stash
                # before it cleans the worktree, so with no stash nothing was touched.
                if self.stash_ref(snapshot.stash_message):
                    self.restore(snapshot)
                self.finish(None if first else state)
                PROGRESS.update(stage="rolled back")
                raise
            if pushed.returncode != 0 or stash is None:
                # Nothing was done yet but this stash: no snapshot may stay behind, or the next run
                # would take the user's changes for an interrupted operation's and "recover" them.
                self.finish(None if first else state)
                changes = self.local_changes()
                if pushed.returncode == 0:
                    raise UsageError(f"git stash saved none of the {len(changes)} local change(s) in {self.path} "
                                     f"(e.g. `{changes[0].strip() if changes else '?'}`); commit or undo them first")
                reason = GitFailed(("stash",), pushed).reason
                if stash is None and environment_failure(pushed.stderr):
                    raise GitFailed(("stash",), pushed)
                if stash is None:
                    raise UsageError(f"git stash could not save the local changes in {self.path} ({reason}); "
                                     "nothing was changed: commit or undo them, then run again")
                raise UsageError(f"git stash failed in {self.path} ({reason}) after saving the local changes as "
                                 f"{stash} ({snapshot.stash_message}); they are kept there: `git stash pop --index` "
                                 "brings them back")
        return snapshot

    def checkout_noted(self, target: str, *args: str) -> None:
        """`git checkout ARGS`, moving the worktree to commit `target`, recorded as under way in the
        in-progress snapshot (lost_by_restore), and no longer once it is done."""
        self._note_in_progress("moving_to", self.resolve_commit(target))
        self.git.run("checkout", *args)
        self._note_in_progress("moving_to", None)

    def _note_in_progress(self, key: str, value) -> None:
        state = self.read_state()
        state["in_progress"][key] = value
        self.write_state(state)

    def note_applying(self, patch: Path) -> None:
        """Record in the in-progress snapshot that `patch` goes onto HEAD now (lost_by_restore)."""
        self._note_in_progress("applying", {"patch": str(patch), "onto": self.head()})

    def finish(self, state: dict | None) -> None:
        """End the operation with `state` (its in_progress cleared); None: no state file at all."""
        if state is None:
            self.state_file.unlink(missing_ok=True)  # dspark/ keeps the lock file (oplock)
        else:
            self.write_state({**state, "in_progress": None})

    def complete(self, op: str, state: dict) -> None:
        """End this run's operation, done, with `state`."""
        self.finish(state)
        PROGRESS.update(op=op, stage="finished")

    def undo(self, snapshot: Snapshot, state: dict, worktree_saved: bool = False) -> None:
        """Restore `snapshot` and end with `state`, or with no state file (and none of the patch
        refs the operation kept) where there was none. worktree_saved: the worktree was just kept
        on a branch (save_before_restore). Called while handling the operation's failure: a
        rollback that fails too says both, and leaves the snapshot for the next run to restore."""
        failure = sys.exc_info()[1]
        try:
            self.restore(snapshot, worktree_saved)
        except Exception as exc:
            why = str(exc) or type(exc).__name__
            raise EnvironmentProblem(f"{failure}; then the rollback failed ({why}): the next dspark apply or revert "
                                     f"restores {self.path} to its state before the {snapshot.op} once that is fixed"
                                     if failure else f"the rollback failed ({why})") from exc
        if snapshot.first and not self._other_workspaces():
            for ref in self.git.out("for-each-ref", "--format=%(refname)", PATCH_REFS).splitlines():
                self.git.run("update-ref", "-d", ref)
        self.finish(None if snapshot.first else state)
        if taken_here(snapshot):  # this run's own operation, not a recovered one's
            PROGRESS.update(stage="rolled back")

    def _other_workspaces(self) -> bool:
        """Whether another worktree of this repository (`git worktree add`) is a dspark workspace: the
        patch refs are the repository's, so they keep its patch commits' copies too."""
        ours = self.git_dir.resolve()
        common = oplock.common_git_dir(ours)
        return any((gitdir / "dspark" / "state.json").is_file() for gitdir in [common, *(common / "worktrees").glob("*")]
                   if gitdir.resolve() != ours)

    def stash_ref(self, message: str) -> str | None:
        """The stash entry (stash@{n}) whose message is `message`."""
        listing = self.git.run("stash", "list", "--format=%gd%x00%gs", check=False).stdout
        for line in listing.split("\n"):  # git's line breaks only: a subject may hold U+2028
            ref, _, subject = line.partition("\0")
            if subject.endswith(message):
                return ref
        return None

    def _remove_stale_locks(self, snapshot: Snapshot) -> None:
        """The index.lock, HEAD.lock or work branch's ref lock left by a git killed with the
        snapshot's owner block the restore's reset, checkout and update-ref for good. Only ours to
        remove while we hold the workspace lock (no other dspark runs git here) and that owner is
        gone (us rolling back, or a killed run; not known to run: recovery --force)."""
        if not oplock.held(self.git_dir) or owner_running(snapshot) is True:
            return
        self.remove_git_locks(snapshot.work_branch)

    def remove_git_locks(self, branch: str) -> None:
        """Remove this worktree's index.lock and HEAD.lock and `branch`'s ref lock: only for a
        caller that holds the workspace lock and knows the git that made them is gone."""
        for lock in self._git_lock_paths(branch):
            lock.unlink(missing_ok=True)

    def git_locks(self, branch: str, older_than: float | None = None) -> list[Path]:
        """Those of the locks remove_git_locks removes that exist (made before `older_than`, a
        time.time(), when given): another git's, running or killed, when no run of ours made them."""
        found = []
        for lock in self._git_lock_paths(branch):
            try:
                made = lock.lstat().st_mtime
            except (FileNotFoundError, NotADirectoryError):
                continue
            if older_than is None or made < older_than:
                found.append(lock)
        return found

    def _git_lock_paths(self, branch: str) -> list[Path]:
        return self.git_paths("index.lock", "HEAD.lock", f"refs/heads/{branch}.lock")

    def lost_by_restore(self, snapshot: Snapshot, base: str) -> tuple[list[str], list[tuple[str, str]]]:
        """What restoring `snapshot` would throw away after a killed run: local changes, and commits
        (not our patch commits) that HEAD or the work branch reach and that no kept ref reaches."""
        tips = [tip for tip in (self.head(), self.branch_sha(snapshot.work_branch)) if tip]
        kept = [sha for sha in (snapshot.head, snapshot.work_branch_sha, base) if sha]
        raw = self.git.out("log", "-z", LOG_FORMAT, *tips, "--not",
                           f"--exclude={snapshot.work_branch}", "--branches", "--tags", "--remotes",
                           *kept) if tips else ""
        commits = [(sha, subject) for sha, subject, trailers in _parse_log(raw) if TRAILER_PATCH not in trailers]
        if commits and snapshot.work_branch_sha:
            # revert's replays of commits the old work branch still holds carry nothing new
            new = {sha for tip in tips for sha in self.git.out(
                "rev-list", "--cherry-pick", "--right-only", f"{snapshot.work_branch_sha}...{tip}").split()}
            commits = [(sha, subject) for sha, subject in commits if sha in new]
        changes = self.local_changes()
        if changes and (self._ours_part_way(snapshot) or self._all_in_our_stash(snapshot)):
            changes = []
        return changes, commits

    def _ours_part_way(self, snapshot: Snapshot) -> bool:
        """Whether the local changes are where a git command of ours, killed part way, left them on
        its way to its target: HEAD plus the patch apply was committing, or the commit a checkout
        was moving to (the user's own changes were stashed before). Git rewrites a path by unlinking
        it and writing it whole, and writes the index last, so each path it was rewriting holds
        the target's bytes, nothing, or a prefix of them; every other path and the index are as
        HEAD (or the index as the target): ours to drop, not the user's."""
        head = self.head()
        if head is None:
            return False
        with self._scratch_objects() as objects:
            targets = [snapshot.moving_to] if snapshot.moving_to else []
            applying = snapshot.applying
            if applying and head == applying.get("onto") and Path(applying.get("patch", "")).is_file():
                targets.append(self._patched_tree(head, Path(applying["patch"]).read_bytes(), objects))
            targets = [target for target in targets if target]
            if not targets:
                return False
            now, index = self._worktree_tree(head, objects), self._index_tree(objects)
            changed = self._paths_differing(head, now, objects)
            head_tree = self._tree_of(head, objects)
            return any(index in (head_tree, self._tree_of(target, objects))
                       and self._part_way_to(head, target, now, changed, objects) for target in targets)

    def _all_in_our_stash(self, snapshot: Snapshot) -> bool:
        """Whether the worktree and the index hold exactly what the snapshot's stash holds (its
        untracked files included): a run killed after `git stash` stored the local changes and
        before it cleaned the worktree. restore pops that stash back over them: nothing is lost."""
        stash = self.stash_ref(snapshot.stash_message) if snapshot.stash_message else None
        head = self.head()
        if stash is None or head is None or head != snapshot.head:
            return False
        with self._scratch_objects() as objects, self.scratch_index(f"{stash}^{{tree}}") as env:
            if self.git.ok("rev-parse", "-q", "--verify", f"{stash}^3^{{commit}}"):
                untracked = self.git.run("ls-tree", "-r", "-z", f"{stash}^3").stdout  # --index-info reads this form
                self.git.run("update-index", "-z", "--index-info", env={**env, **objects}, input=untracked)
            stashed = self.git.out("write-tree", env={**env, **objects})
            return (stashed == self._worktree_tree(head, objects)
                    and self._index_tree(objects) == self.git.out("rev-parse", f"{stash}^2^{{tree}}"))

    def _part_way_to(self, head: str, target: str, now: str, changed: set[str], objects: dict) -> bool:
        """Whether each changed path is one `target` changes, holding its bytes, nothing, or a
        prefix of them."""
        rewritten = self._paths_differing(head, target, objects)
        unlike = self._paths_differing(target, now, objects)
        for name in changed:
            if name not in rewritten:
                return False  # a path git was not writing: the user's change
            path = self.path / name
            if name not in unlike or not (path.exists() or path.is_symlink()):
                continue  # the target's bytes, or unlinked and not yet written
            have = path.read_bytes() if path.is_file() and not path.is_symlink() else None
            # the blob's bytes, or as git writes them into the worktree (core.autocrlf, eol=crlf)
            if have is None or not any(len(have) < len(want) and want.startswith(have)
                                       for want in self._target_bytes(target, name, objects)):
                return False  # a file the target does not hold, or other bytes: the user's
        return True

    def _target_bytes(self, target: str, name: str, objects: dict) -> Iterator[bytes]:
        """The bytes of `name` in `target`: as stored, then as git writes them into the worktree
        (its line-end conversion); none where `target` does not hold it."""
        for form in ("blob", "--filters"):
            blob = self.git.run("cat-file", form, f"{target}:{name}", check=False, env=objects)
            if blob.returncode != 0:
                return
            yield blob.stdout.encode("utf-8", "surrogateescape")  # run() decoded the bytes reversibly

    def paths_written(self, commits: list[str], patches: list[bytes] = ()) -> set[str]:
        """The paths a checkout from HEAD to each of `commits` writes or removes, and those `patches`
        change, applied in turn on the first of `commits` (as far as they apply)."""
        head, written = self.head(), set()
        with self._scratch_objects() as objects:
            for commit in commits:
                written |= self._paths_differing(head, commit, objects) if head else set()
            tree = commits[0] if commits else head
            for patch in patches:
                after = self._patched_tree(tree, patch, objects) if tree else None
                if after is None:
                    break
                written |= self._paths_differing(tree, after, objects)
                tree = after
        return written

    def _paths_differing(self, a: str, b: str, objects: dict) -> set[str]:
        return set(self.git.out("diff-tree", "-r", "-z", "--name-only", a, b, env=objects).split("\0")) - {""}

    def _tree_of(self, commit_or_tree: str, objects: dict) -> str:
        return self.git.out("rev-parse", f"{commit_or_tree}^{{tree}}", env=objects)

    def _index_tree(self, objects: dict) -> str | None:
        """The tree of the real index (its objects to `objects`), None when it has none (unmerged).
        Read from a copy: write-tree takes index.lock, which a killed git may have left."""
        [index] = self.git_paths("index")
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "index"
            try:
                shutil.copyfile(index, copy)
            except FileNotFoundError:  # no index yet: an empty one
                pass
            made = self.git.run("write-tree", check=False, env={**objects, "GIT_INDEX_FILE": str(copy)})
        return made.stdout.strip() if made.returncode == 0 else None

    @contextlib.contextmanager
    def _scratch_objects(self) -> Iterator[dict[str, str]]:
        """The environment for git commands whose new blobs and trees go to a scratch object
        directory (the repository's objects read through it as an alternate): `dspark status` runs
        where it may not write (a read-only mount, which read every patch commit as amended)."""
        [objects] = self.git_paths("objects")
        with tempfile.TemporaryDirectory() as scratch:
            yield {"GIT_OBJECT_DIRECTORY": scratch, "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(objects)}

    def _patched_tree(self, parent: str, patch: bytes, objects: dict | None = None) -> str | None:
        """The tree the patch file `patch` makes on `parent` as apply_and_commit applies it (3-way,
        through a scratch index), None where it does not apply. Its objects go to `objects`
        (_scratch_objects' environment), else to a scratch directory dropped after: only the id is wanted."""
        if objects is None:
            with self._scratch_objects() as scratch:
                return self._patched_tree(parent, patch, scratch)
        with self.scratch_index(parent, objects) as env:
            env = {**env, **objects}
            made = self.git.run("apply", "--cached", "--3way", "--whitespace=nowarn", "-", check=False, env=env,
                                input=patch.decode("utf-8", "surrogateescape"))
            return self.git.out("write-tree", env=env) if made.returncode == 0 else None

    def save_before_restore(self, snapshot: Snapshot, base: str) -> list[str]:
        """Keep what `lost_by_restore` finds on dspark/saved-<time> branches: one at HEAD with the
        local changes (staged, unstaged, untracked) committed on top, one at the work branch when it
        holds commits HEAD does not. Returns the branch names."""
        self._remove_stale_locks(snapshot)
        changes, commits = self.lost_by_restore(snapshot, base)
        lost = {sha for sha, _ in commits}
        head, work_tip = self.head(), self.branch_sha(snapshot.work_branch)
        saved = []
        if head and (changes or self._reaches_any(head, lost)):
            tip = self._commit_worktree(head, f"dspark: local changes saved before recovering an interrupted "
                                              f"{snapshot.op}\n") if changes else head
            saved.append(self.save_branch(tip))
        if work_tip and self._reaches_any(work_tip, lost) and not (head and self.is_ancestor(work_tip, head)):
            saved.append(self.save_branch(work_tip, f"-{snapshot.work_branch.replace('/', '-')}"))
        return saved

    def save_branch(self, tip: str, suffix: str = "") -> str:
        """Create dspark/saved-<time><suffix> at `tip` and return its name; -2, -3... when a branch
        of that name exists (a recovery and the revert after it run within the same second)."""
        first = name = f"dspark/saved-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}{suffix}"
        count = 1
        while self.branch_sha(name) is not None:
            count += 1
            name = f"{first}-{count}"
        self.git.run("branch", name, tip)
        return name

    def _reaches_any(self, tip: str, commits: set[str]) -> bool:
        return any(self.is_ancestor(sha, tip) for sha in commits)

    def _worktree_tree(self, parent: str, objects: dict | None = None) -> str:
        """The tree of the worktree as it is, `parent`'s tree for what it does not track (through a
        scratch index, so a half-merged index does not matter and HEAD does not move); its objects
        to `objects` (_scratch_objects' environment) when given, else to the repository."""
        with self.scratch_index(parent) as env:
            env = {**env, **(objects or {})}
            self.git.run("add", "-A", ".", env=env)
            return self.git.out("write-tree", env=env)

    def identity_or(self, fallback: dict) -> dict:
        """{} where git commits as the user (user.email set, and git able to form both the author and
        the committer from their config: user.useConfigOnly without user.name cannot, and every
        commit of ours failed), else the `fallback` identity's environment."""
        if all(self.git.ok(*args) for args in (("config", "user.email"), ("var", "GIT_AUTHOR_IDENT"),
                                                ("var", "GIT_COMMITTER_IDENT"))):
            return {}
        return fallback

    def _commit_worktree(self, parent: str, message: str) -> str:
        """A commit of the worktree as it is, on `parent`."""
        identity = self.identity_or(DSPARK_AUTHOR)
        return self.git.out("commit-tree", self._worktree_tree(parent), "-p", parent, "-F", "-", input=message,
                            env=identity)

    def restore(self, snapshot: Snapshot, worktree_saved: bool = False) -> None:
        """Put HEAD, the branches, index and worktree back to `snapshot` (local changes included)."""
        self._remove_stale_locks(snapshot)
        self.git.run("cherry-pick", "--abort", check=False)
        if snapshot.head is None:
            self.git.run("reset", "-q", "--hard", check=False)
        else:
            self.git.run("reset", "-q", "--hard")
            self.git.run("checkout", "-q", "-f", "--detach", snapshot.head)
        ref = f"refs/heads/{snapshot.work_branch}"
        if snapshot.work_branch_sha:
            self.git.run("update-ref", ref, snapshot.work_branch_sha)
        elif self.branch_sha(snapshot.work_branch):
            self.git.run("update-ref", "-d", ref)
        if snapshot.branch:
            self.git.run("symbolic-ref", "HEAD", snapshot.branch)
        if snapshot.head is None and self.head() is None:  # still unborn: no commit of the user's since
            self._unborn_again()
        if snapshot.stash_message:
            stash = self.stash_ref(snapshot.stash_message)
            if stash:
                self._clear_stashed_untracked(stash, worktree_saved)
                self.git.run("stash", "pop", "--index", stash)

    def _clear_stashed_untracked(self, stash: str, worktree_saved: bool) -> None:
        """`git stash pop` refuses to put back an untracked file the stash holds while one of that
        name is in the worktree (a pop killed before it dropped the stash; the user took the file
        back after a kill). Remove each such file that holds what the stash holds, or that was just
        kept on a saved branch (not an ignored one: `git add -A` skips those), so the pop restores it."""
        untracked = f"{stash}^3"
        if not self.git.ok("rev-parse", "-q", "--verify", f"{untracked}^{{commit}}"):
            return
        for name in filter(None, self.git.run("ls-tree", "-r", "-z", "--name-only", untracked).stdout.split("\0")):
            path = self.path / name
            if not (path.is_file() or path.is_symlink()) or self.git.ok("ls-files", "--error-unmatch", "--", name):
                continue
            same = not path.is_symlink() and \
                self.git.out("hash-object", "--", name) == self.git.out("rev-parse", f"{untracked}:{name}")
            if same or (worktree_saved and not self.git.ok("check-ignore", "-q", "--no-index", "--", name)):
                path.unlink()

    def _unborn_again(self) -> None:
        """Back on the unborn branch it was on (a repository without commits): no commit to reset
        to, so the index is emptied and the files it held removed, with the directories they leave
        empty. They are all the operation's: git's checkout refuses to overwrite untracked files."""
        files = [name for name in self.git.run("ls-files", "-z").stdout.split("\0") if name]
        self.git.run("read-tree", "--empty")
        for name in files:
            path = self.path / name
            path.unlink(missing_ok=True)
            for parent in path.parents:
                if parent == self.path or any(parent.iterdir()):
                    break
                parent.rmdir()

    # -- applied series ----------------------------------------------------------------------
    def commits_since(self, base: str, tip: str) -> list[tuple[str, str, dict[str, str]]]:
        """(commit, subject, dspark trailers) for base..tip, oldest first."""
        return _parse_log(self.git.out("log", "-z", "--reverse", "--first-parent", LOG_FORMAT, f"{base}..{tip}"))

    def commits_on_no_branch(self, base: str) -> list[tuple[str, str]]:
        """(commit, subject), newest first, of commits a detached HEAD reaches that no branch, tag or
        remote does: moving HEAD away would leave them unreachable."""
        if self.current_branch() is not None or self.head() is None:
            return []
        return [(sha, subject) for sha, subject, _ in _parse_log(self.git.out(
            "log", "-z", LOG_FORMAT, "HEAD", "--not", "--branches", "--tags", "--remotes", base))]

    def applied(self, base: str, tip: str) -> tuple[list[AppliedPatch], list[tuple[str, str]]]:
        """Patches committed on base..tip (by their trailers) and the other, user, commits."""
        patches, user = [], []
        for sha, subject, trailers in self.commits_since(base, tip):
            if TRAILER_PATCH in trailers:
                patches.append(AppliedPatch(trailers[TRAILER_PATCH], trailers.get(TRAILER_SHA, ""), sha, subject,
                                            trailers.get(TRAILER_BLOB, "")))
            else:
                user.append((sha, subject))
        return patches, user

    def keep_patch(self, patch: Path) -> str:
        """Store the patch file's bytes as a blob (a ref of its own keeps it from gc) and return its
        id, for the commit's TRAILER_BLOB."""
        blob = self.git.out("hash-object", "-w", "--no-filters", "--", str(patch))
        self.git.run("update-ref", f"{PATCH_REFS}/{blob}", blob)
        return blob

    def changed_patch_commits(self, applied: list[AppliedPatch],
                              files: dict[tuple[str, str], Path]) -> list[tuple[AppliedPatch, str]]:
        """The patch commits that may hold changes of the user's, each with why: its tree is not what
        its patch makes on its parent (amended, or otherwise rewritten, since apply made it), or its
        patch's bytes are gone, so that cannot be checked. `files` maps (label, sha256) to the series'
        patch file: the only copy of a commit made by a dspark older than TRAILER_BLOB."""
        changed = []
        for done in applied:
            patch = self._patch_bytes(done, files.get((done.label, done.sha256)))
            if patch is None:
                changed.append((done, "cannot be checked against its patch (applied by an older dspark, and the "
                                      "series file it was made from has changed or moved since), so it may hold "
                                      "changes of yours"))
            elif self._patched_tree(f"{done.commit}^", patch) != self.git.out("rev-parse", f"{done.commit}^{{tree}}"):
                changed.append((done, "holds changes beyond its patch (amended since apply made it?)"))
        return changed

    def _patch_bytes(self, done: AppliedPatch, file: Path | None) -> bytes | None:
        """The bytes of the patch `done` was made from: its kept blob, else `file`; either only
        when its sha256 is the commit's (a trailer edited since names no patch we can trust)."""
        if done.blob and self.git.ok("cat-file", "-e", f"{done.blob}^{{blob}}"):
            patch = self.git.run("cat-file", "blob", done.blob).stdout.encode("utf-8", "surrogateescape")
        elif file is not None and file.is_file():
            patch = file.read_bytes()
        else:
            return None
        return patch if hashlib.sha256(patch).hexdigest() == done.sha256 else None


# With `git log -z`: NUL between fields and between commits, the one byte no message holds (any
# other separator, or a split at line breaks, cut a message that held it).
LOG_FORMAT = "--format=%H%x00%s%x00%B"


def _parse_log(raw: str) -> list[tuple[str, str, dict[str, str]]]:
    """(commit, subject, dspark trailers) from `git log -z LOG_FORMAT`."""
    fields = raw.split("\0") if raw else []
    commits = []
    for sha, subject, body in zip(fields[0::3], fields[1::3], fields[2::3]):
        trailers = {}
        for line in body.split("\n"):  # git's line breaks only
            key, sep, value = line.partition(": ")
            if sep and key in (TRAILER_PATCH, TRAILER_SHA, TRAILER_BLOB):
                trailers[key] = value.strip()
        commits.append((sha, subject, trailers))
    return commits


_COMMIT = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")  # a full commit id, SHA-1 or SHA-256
_REF = re.compile(r"(?!-)[^\x00-\x20\x7f~^:?*\[\\]+")  # what git allows in a ref name, roughly


def _text(value) -> bool:
    return isinstance(value, str) and "\0" not in value  # a NUL cannot go into a path or a git argument


def _commit_or_none(value) -> bool:
    return value is None or (isinstance(value, str) and _COMMIT.fullmatch(value) is not None)


def _ref_or_none(value) -> bool:
    return value is None or (isinstance(value, str) and _REF.fullmatch(value) is not None)


# Each snapshot field and what it must be.
_SNAPSHOT_FIELDS = {
    "process": lambda v: v is None or (_text(v) and len(v.split(" ")) == 4),
    "applying": lambda v: not v or (isinstance(v, dict) and set(v) == {"patch", "onto"} and _text(v["patch"])
                                    and _commit_or_none(v["onto"])),
    "moving_to": _commit_or_none,
    "first": lambda v: isinstance(v, bool),
    "head": _commit_or_none,
    "branch": _ref_or_none,
    "work_branch": lambda v: v is not None and _ref_or_none(v),
    "work_branch_sha": _commit_or_none,
    "stash_message": lambda v: v is None or _text(v),
    "pid": lambda v: type(v) is int and 0 < v < 2**31,
    "op": lambda v: v in ("apply", "revert"),
    "started": _text,
}


# those a Snapshot has no default for (the others were added since: an older dspark's lacks them)
_REQUIRED_SNAPSHOT_FIELDS = {f.name for f in fields(Snapshot) if f.default is MISSING}


def _state_shape_problem(state) -> str | None:
    """What is wrong with a parsed state file's shape or types, None when it is one we wrote (so
    no later use of it fails with a traceback or a git error)."""
    if not isinstance(state, dict):
        return f"expected an object, got {type(state).__name__}"
    if not (isinstance(state.get("base"), str) and _COMMIT.fullmatch(state["base"])):
        return "'base' is missing or not a full commit id"
    from dspark_cli.compat import PIN_NAME  # here: build.py imports this module where PyYAML may be absent

    if not (isinstance(state.get("branch"), str) and re.fullmatch(f"dspark/{PIN_NAME.pattern}", state["branch"])):
        return "'branch' is missing or not a dspark/<pin> branch name"
    for key in ("engine", "pin", "compat"):
        if state.get(key) is not None and not _text(state[key]):
            return f"{key!r} is not a string"
    if not isinstance(state.get("unpinned", False), bool):
        return "'unpinned' is not true or false"
    if isinstance(state.get("pin"), str):  # the branch apply made: revert would make and check out another
        wanted = f"dspark/unpinned-{state['base'][:12]}" if state.get("unpinned") else f"dspark/{state['pin']}"
        if state["branch"] != wanted:
            return f"'branch' is {state['branch']}, not {wanted}"
    applied = state.get("applied", [])
    if not (isinstance(applied, list) and all(_text(label) for label in applied)):
        return "'applied' is not a list of patch names"
    source = state.get("source") or {}
    if not (isinstance(source, dict) and all(_text(value) for value in source.values())):
        return "'source' is not an object of strings"
    if source and source.get("kind") not in ("git", "pypi"):
        return "'source.kind' is not git or pypi"
    layers = state.get("layers", [])
    if not (isinstance(layers, list) and all(isinstance(layer, dict) and set(layer) == {"layer", "dir"}
                                             and _text(layer["layer"]) and _text(layer["dir"]) for layer in layers)):
        return "'layers' is not a list of {layer, dir} strings"
    snapshot = state.get("in_progress")
    if snapshot is None:
        return None
    if not (isinstance(snapshot, dict) and _REQUIRED_SNAPSHOT_FIELDS <= set(snapshot)
            <= set(_SNAPSHOT_FIELDS)):
        return "'in_progress' is not a snapshot"
    wrong = next((key for key, valid in _SNAPSHOT_FIELDS.items() if key in snapshot and not valid(snapshot[key])), None)
    return f"'in_progress' has a wrong {wrong!r}" if wrong else None


def another_users_repository(stderr: str, where: str, checked: Path) -> EnvironmentProblem | None:
    """git's refusal of a repository another user owns ("dubious ownership"), as one line with git's
    own safe.directory command (the directory it checked: a work tree, or a clone's .git when it
    reads the clone as a remote); `checked` when git printed none. None for any other failure."""
    if "dubious ownership" not in stderr:
        return None
    fix = next((line.strip() for line in stderr.splitlines() if "safe.directory" in line),
               f"git config --global --add safe.directory {checked}")
    return EnvironmentProblem(f"{where}: git refuses to work in a repository another user owns; run `{fix}`, or "
                              "dspark as its owner")


def safe_name(ref: str) -> str:
    """A ref such as v1.1~1 as a directory or branch name component (v1.1-1)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", ref)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _machine() -> str | None:
    """This boot of this kernel and our pid namespace: where a pid means one process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{socket.gethostname()} {boot} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def process_tag(pid: int) -> str | None:
    """Process `pid` as one that never repeats: the machine, boot and pid namespace, and the
    process's start time (/proc/<pid>/stat field 22). None where /proc cannot tell."""
    machine, fields = _machine(), proc_stat(pid)
    return f"{machine} {fields[19]}" if machine and fields else None


def proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state, ppid, ...: field 3 on), or None.
    The name is cut at the last ')', as it may hold spaces and parentheses."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def taken_here(snapshot: Snapshot) -> bool:
    """Whether this process took `snapshot` (its pid and, where /proc tells, its start)."""
    return snapshot.pid == os.getpid() and snapshot.process in (None, process_tag(os.getpid()))


def owner_running(snapshot: Snapshot) -> bool | None:
    """Whether the process that took `snapshot` still runs: True, False, or None when this
    process cannot see it (another machine or container); a pid reused by another process since
    counts as not running."""
    if taken_here(snapshot):
        return False  # ours: this process runs one operation at a time
    here = _machine()
    if snapshot.process is None or here is None:  # an older dspark's snapshot, or no /proc
        return pid_alive(snapshot.pid)
    host, boot, _, _ = snapshot.process.split(" ")
    here_host, here_boot, _ = here.split(" ")
    if host == here_host and boot != here_boot:
        return False  # rebooted since
    if not snapshot.process.startswith(here + " "):
        return None
    fields = proc_stat(snapshot.pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False  # gone, or killed and not yet reaped (a pid 1 that never reaps keeps it so): it runs nothing
    return f"{here} {fields[19]}" == snapshot.process
