"""`--source git`: clone or fetch the engine repository (GitPython, with a progress bar) and find the
pinned commit in it."""

from __future__ import annotations

import io
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from dspark_cli.errors import EnvironmentProblem, UsageError

# Without this, importing GitPython on a machine without git raises before require_git can say so.
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
try:
    import git as gitpython  # noqa: E402
except ModuleNotFoundError:  # GitPython itself missing: an install problem, said as it is
    raise
except ImportError as _exc:
    # GitPython runs `git version` on import: a git that cannot start (a malformed ~/.gitconfig)
    # failed every command that imports this module with a traceback. git's own line instead.
    _said = re.search(r"stderr: '(.*?)'?\s*$", str(_exc), re.S)
    raise EnvironmentProblem(f"git does not run: {_said.group(1).strip() if _said else _exc}") from None
from rich.progress import BarColumn, Progress, TextColumn

from dspark_cli.compat import HEX_COMMIT, Compat, is_local_path
from dspark_cli.files import move_into_place
from dspark_cli.flock import scratch_beside, sweep_unless_made_elsewhere
from dspark_cli.output import err_console, say
from dspark_cli.workspace import NO_HOOKS, Git, Workspace, another_users_repository, git_environ, require_git


class _RichProgress(gitpython.RemoteProgress):
    """GitPython progress callbacks drawn as one rich bar per stage on stderr."""

    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress
        self.tasks: dict[int, int] = {}

    def update(self, op_code, cur_count, max_count=None, message=""):
        stage = op_code & self.STAGE_MASK
        if stage not in self.tasks:
            label = {self.COUNTING: "counting", self.COMPRESSING: "compressing", self.RECEIVING: "receiving",
                     self.RESOLVING: "resolving", self.WRITING: "writing"}.get(stage, "git")
            self.tasks[stage] = self.progress.add_task(label, total=max_count or None)
        self.progress.update(self.tasks[stage], completed=cur_count, total=max_count or None)


def _with_progress(action, failure: str):
    """Run a GitPython clone or fetch under a progress bar; a failure is EnvironmentProblem
    `failure: <git's reason>`. The progress handler reads git's stderr, so the reason (git's
    fatal:/error: lines, the first names the cause, the last what failed) is in the handler."""
    # Off where stderr is no terminal (CI logs): a transient bar there only leaves a blank line.
    with Progress(TextColumn("{task.description:>11}"), BarColumn(), TextColumn("{task.completed:,.0f}"),
                  console=err_console, transient=True, disable=not err_console.is_terminal) as progress:
        handler = _RichProgress(progress)
        try:
            return action(handler)
        except gitpython.GitCommandError as exc:
            errors = [line.strip() for line in handler.error_lines]
            other = [line.strip() for line in handler.other_lines if line.strip()]
            reason = "; ".join(dict.fromkeys(errors)) or (other or [str(exc)])[-1]
            raise EnvironmentProblem(f"{failure}: {reason}") from None
        except (gitpython.exc.UnsafeProtocolError, gitpython.exc.UnsafeOptionError):
            # GitPython refuses every transport::address URL (ext:: would run a command): bad input
            raise UsageError(f"{failure}: transport::address URLs are refused (a remote helper runs a command); "
                             "clone it with git and give the clone's directory") from None


def checked_repo(repo: str | None, origin: str = "--repo") -> str | None:
    """--repo (or what `origin` names) as clones and records take it: a local path made absolute
    (git runs it from inside the workspace, where a relative one points elsewhere; a quoted ~ is the
    home directory, as `compat lock` reads it), a URL as given. A path that does not exist, a file
    git cannot clone, or a directory that is no repository (nor a subdirectory of one: git clones
    neither) is bad input, found before any clone, whether or not one is needed."""
    if not repo or not is_local_path(repo):
        return repo
    try:
        path = Path(repo).expanduser().absolute()
    except RuntimeError as exc:  # ~user of no such user
        raise UsageError(f"{origin} {repo}: {exc}") from None
    if not path.exists():
        raise UsageError(f"{origin} {repo}: no such directory (give a clone's directory or a URL)")
    if not path.is_dir() and not _clonable_file(path):
        raise UsageError(f"{origin} {repo}: a file, not a repository (give a clone's directory or a URL)")
    if path.is_dir():
        listed = Git(path).run("ls-remote", "--heads", str(path.absolute()), check=False)
        if listed.returncode != 0:
            reason = next((line for line in listed.stderr.splitlines() if line.startswith("fatal:")), "")
            refused = another_users_repository(listed.stderr, f"{origin} {repo}", path / ".git")
            if refused:  # a clone, but another user's: git's setting, not the path
                raise refused
            raise UsageError(f"{origin} {repo}: git cannot clone it ({reason.removeprefix('fatal: ') or 'no repository'}); "
                             "give a clone's directory or a URL")
    return str(path)


def engine_repository(compat: Compat, engine: str) -> str:
    """compat.yaml's `repository` of `engine`, checked as --repo is when it is used: the user wrote
    that path too, so a missing one is bad input (was exit 3 from the clone), named by file, line and
    key (a relative path was made absolute against the compat.yaml's directory when it was loaded)."""
    where = compat.engine(engine)
    return checked_repo(where.repository, f"{compat.path}:{where.repository_line}: engines.{engine}.repository")


def _clonable_file(path: Path) -> bool:
    """A file `git clone` takes: a bundle, or a .git file pointing at a repository (a worktree's)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return True  # unreadable here: let the clone say why
    return head.startswith((b"# v2 git bundle", b"# v3 git bundle", b"gitdir: "))


def clone(url: str, path: Path) -> None:
    """Clone into a scratch sibling and rename, so a killed clone leaves no half workdir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _clone_scratch(path) as tmp:
        _clone_into(url, tmp, path)
        move_into_place(tmp, path)


@contextmanager
def _clone_scratch(path: Path) -> Iterator[Path]:
    """Where to clone for `path`: in a flocked scratch beside it (removed after the block; killed
    runs' are removed first), so two runs never clone into one directory."""
    sweep_unless_made_elsewhere(path, "clone")
    with scratch_beside(path, "clone") as scratch:
        yield scratch / "tree"


def _run_with_progress(cwd: Path | None, args: list[str], progress: _RichProgress) -> None:
    """`git ARGS --progress` with its stderr fed to `progress` line by line, as GitPython's clone and
    fetch feed it, but decoded here with surrogateescape (as Git.run decodes): GitPython read it as
    strict UTF-8 in a thread of its own, so a path named in another encoding (a workdir `x\\xff`, in
    git's `Cloning into '...'`) killed that thread with a traceback and git with SIGPIPE, exit 3 with
    GitPython's cmdline dump. A failure raises GitCommandError, which _with_progress turns into git's
    reason (the fatal:/error: lines the handler collected)."""
    # NO_HOOKS as for every git command of ours: a hook of the user's (a failing
    # reference-transaction one) aborted the clone
    command = ["git", *NO_HOOKS, *args]
    env = {**git_environ(), "LC_ALL": "C", "LANGUAGE": "C"}  # GitPython's C locale too
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    handle = progress.new_message_handler()
    try:
        # universal newlines: git redraws a progress line with \r, each redraw is one update
        for line in io.TextIOWrapper(proc.stderr, encoding="utf-8", errors="surrogateescape", newline=None):
            handle(line)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.wait() != 0:
        raise gitpython.GitCommandError(command, proc.returncode)


def _clone_into(url: str, tmp: Path, path: Path) -> None:
    require_git()
    say(f"cloning {url} into {path}", err=True, markup=False)

    def clone(progress: _RichProgress) -> None:
        gitpython.Git.check_unsafe_protocols(url)  # ext:: runs a command: refused, as GitPython's clone refused it
        _run_with_progress(None, ["clone", "-v", "--no-checkout", "--progress", "--", url, str(tmp)], progress)

    _with_progress(clone, f"cannot clone {url}")


def fetch(ws: Workspace, url: str) -> None:
    say(f"fetching {url}", err=True, markup=False)
    _with_progress(lambda progress: _fetch_with_progress(ws, url, progress), f"cannot fetch {url}")


UPSTREAM = "dspark-upstream"
# The workdir may be a clone of the user's: upstream's branches and tags are fetched under refs of
# our own, so a tag of theirs that upstream also has (v1.0 on another commit) is never moved.
UPSTREAM_TAGS = f"refs/{UPSTREAM}/tags"
UPSTREAM_REFSPECS = [f"+refs/heads/*:refs/remotes/{UPSTREAM}/*", f"+refs/tags/*:{UPSTREAM_TAGS}/*"]


def _fetch_with_progress(ws: Workspace, url: str, progress: _RichProgress) -> None:
    gitpython.Git.check_unsafe_protocols(url)
    known = ws.git.run("config", "--get", f"remote.{UPSTREAM}.url", check=False)
    if known.returncode != 0:
        ws.git.run("remote", "add", UPSTREAM, url)
    elif known.stdout.rstrip("\n") != url:
        ws.git.run("remote", "set-url", UPSTREAM, url)
    _run_with_progress(ws.path, ["fetch", "--no-tags", "-v", "--progress", "--", UPSTREAM, *UPSTREAM_REFSPECS],
                       progress)


def _resolve(ws: Workspace, ref: str) -> str | None:
    """`ref` in the workdir's own refs, else among upstream's fetched tags (v1.1~1 as well)."""
    return ws.resolve_commit(ref) or ws.resolve_commit(f"{UPSTREAM_TAGS}/{ref}")


def resolve_tag(ws: Workspace, tag: str) -> str | None:
    """The commit of `tag`: upstream's when fetched (it is newer than a clone's own refs/tags, which
    a fetch never moves), else the clone's own."""
    return ws.resolve_commit(f"{UPSTREAM_TAGS}/{tag}") or ws.resolve_commit(f"refs/tags/{tag}")


def is_ambiguous(ws: Workspace, ref: str) -> bool:
    """Whether `ref` failed to resolve because it is a short id several commits share."""
    return "ambiguous" in ws.git.run("rev-parse", "--verify", f"{ref}^{{commit}}", check=False).stderr


def find_commit(ws: Workspace, ref: str, url: str, tag: str | None = None, fetch_missing: bool = True,
                before_fetch: Callable[[Workspace], None] | None = None) -> str:
    """Full id of `ref` (a full or unique short commit id), fetching from `url` if it is missing
    (not in a fresh clone of `url`: a fetch could add nothing; `before_fetch` may refuse first).
    When the pin names a tag that exists here, it must point at the same commit."""
    commit = _resolve(ws, ref)
    if commit is None and fetch_missing:
        if before_fetch is not None:
            before_fetch(ws)
        fetch(ws, url)
        commit = _resolve(ws, ref)
    if commit is None:
        raise UsageError(f"commit {ref} {'is ambiguous' if is_ambiguous(ws, ref) else 'was not found'} in {url}")
    if tag:
        tagged = resolve_tag(ws, tag)
        if tagged and tagged != commit:
            raise UsageError(f"tag {tag} points at {tagged[:12]} but compat.yaml pins {ref}")
    return commit


def prepare(path: Path, url: str, ref: str, tag: str | None,
            before_fetch: Callable[[Workspace], None] | None = None) -> tuple[Workspace, str]:
    """The workspace at `path` (cloned if missing) and the full id of the commit to patch; an
    existing repository lacking it is fetched into after `before_fetch` (which may refuse)."""
    if not path.exists() or not any(path.iterdir()):
        return _fresh_clone(path, url, ref, tag)
    ws = Workspace(path)
    if not ws.is_repo():
        raise UsageError(f"{path} exists and is not a git repository; choose another --workdir")
    return ws, find_commit(ws, ref, url, tag, before_fetch=before_fetch)


def _fresh_clone(path: Path, url: str, ref: str, tag: str | None) -> tuple[Workspace, str]:
    """Clone into a hidden sibling, check out and verify the pinned commit there, and only then move
    it into place: a failure (commit not found, killed clone) leaves no half-made workdir behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _clone_scratch(path) as tmp:
        _clone_into(url, tmp, path)
        scratch = Workspace(tmp)
        commit = find_commit(scratch, ref, url, tag, fetch_missing=False)
        scratch.git.run("checkout", "-q", "--detach", commit)  # a fresh clone: the pinned tree, detached
        head = scratch.head() or ""
        if head != commit or (HEX_COMMIT.fullmatch(ref.lower()) and not head.startswith(ref.lower())):
            raise UsageError(f"{url}: {ref} checked out as {head[:12] or 'nothing'}, not the pinned commit")
        # No workspace lock covers this (there is no workspace yet): two runs may clone at once,
        # each into its own scratch, and the first to move in wins.
        move_into_place(tmp, path)
    return Workspace(path), commit

