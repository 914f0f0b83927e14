"""Human output through rich, machine output as one JSON document on stdout."""

import contextlib
import errno
import json
import math
import os
import sys
from typing import Any, Callable

from rich.console import Console
from rich.measure import Measurement
from rich.text import Text

from dspark_cli.errors import EnvironmentProblem


class _StdoutConsole(Console):
    """rich's Console, except that stdout's reader gone is an error emit() names (exit 3, or the
    failure the report held), not rich's quiet exit 1 (ours for "a check failed")."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


console = _StdoutConsole()
err_console = Console(stderr=True)
_json_emitted = False  # a command that emits its report and then fails keeps that one document
_captured: list | None = None  # inside capture_json(): where emit() puts its documents
_error_fields: dict = {}  # added to the failure document (error_fields())
_stdout_failed = False  # stdout took no report (full disk, closed): the failure goes to stderr alone


def _check_stdout_open() -> None:
    """An OSError when descriptor 1 was closed when Python started (`dspark ... >&-`): rich's
    console would print the report into nothing and the command would end 0."""
    if sys.stdout is None:
        raise OSError(errno.EBADF, "closed")


def _write_stdout(text: str) -> None:
    """`text` on stdout now (flushed); an OSError when stdout cannot take it."""
    _check_stdout_open()
    sys.stdout.write(text)
    sys.stdout.flush()


def _stdout_lost(exc: OSError) -> EnvironmentProblem:
    """stdout could not take what we print (a full disk, a closed descriptor, its reader gone): what
    it still buffers is dropped, so that Python's exit does not fail on it with a traceback, and the
    error names stdout (exit 3). Not an OSError: click ends an EPIPE with exit 1 and no word."""
    global _stdout_failed
    _stdout_failed = True
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")
    return EnvironmentProblem(f"stdout: {exc.strerror or exc}")


def emit(result: Any, as_json: bool, render: Callable[[Any], None], failure: Exception | None = None) -> None:
    """Print `result` as JSON (for CI) or through `render` (for people). Every command's document
    has `ok` (true unless the report says otherwise), as every error document does. `failure`: what
    the report says went wrong, raised once the report is out; a stdout that cannot take the report
    raises it too (its code, a note on stdout), not the stdout's error."""
    global _json_emitted
    try:
        if as_json and _captured is not None:  # folded into the capturing command's document
            _captured.append(result)
        elif as_json:
            document = {"ok": True, **result} if isinstance(result, dict) else result
            _write_stdout(json.dumps(_finite(document), indent=2, sort_keys=True, default=str) + "\n")
            _json_emitted = True
        else:
            _check_stdout_open()
            render(result)
    except OSError as exc:
        lost = _stdout_lost(exc)
        if failure is None:
            raise lost from None
        raise type(failure)(f"{failure} (and stdout could not take the report: {exc.strerror or exc})") from None
    if failure is not None:
        raise failure


def _finite(value: Any) -> Any:
    """`value` with every float that is not finite as None: json.dumps writes NaN and Infinity,
    which are no JSON (a self-test over a kernel that left NaN in its output reported its error so)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


@contextlib.contextmanager
def capture_json():
    """JSON documents emitted inside the block go to the yielded list, not to stdout: a command that
    runs another's report (build --self-test) folds it into its own one document."""
    global _captured
    saved, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = saved


@contextlib.contextmanager
def stdout_to_stderr(active: bool = True):
    """File descriptor 1 is 2 inside the block (when active): under --json, what child processes
    write to our stdout (torch hands ninja fd 1 itself under --verbose) goes to stderr, and stdout
    holds the JSON document alone."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def reset() -> None:
    """Forget what the last command emitted: one process may run several (tests, embedding)."""
    global _json_emitted, _stdout_failed
    _json_emitted = _stdout_failed = False
    _error_fields.clear()


def error_fields(**fields: Any) -> None:
    """Fields that a failure document under --json carries besides ok/error/exit_code (e.g. the build
    that succeeded before its self-test failed)."""
    _error_fields.update(fields)


def say(text: str, err: bool = False, markup: bool = True) -> None:
    """One line of rich markup (markup=False: plain text, for lines made of data such as paths,
    where `[...]` must print as it is), never hard-wrapped (piped output and CI logs keep whole
    lines); no :emoji: codes, so data such as `cuda:x` prints as it is."""
    (err_console if err else console).print(text, highlight=False, soft_wrap=True, emoji=False, markup=markup)


def say_table(table) -> None:
    """A rich Table on stdout: in a terminal it fits the window; piped (CI logs) at its natural width
    rather than rich's 80 columns, so no cell (a patch name, a path) is folded mid-word."""
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update_width(100_000), table).maximum
    _StdoutConsole(width=max(console.width, natural), highlight=False, emoji=False).print(table)


def emit_error(label: str, message: str, exit_code: int, as_json: bool) -> None:
    """An error as one line on stderr and, under --json, also as the one JSON document on stdout
    (when stdout cannot take it, the line says so, as emit's does). The message is printed as plain
    text: no markup, no :emoji: codes."""
    if as_json and not (_json_emitted or _stdout_failed):
        try:
            _write_stdout(json.dumps(_finite({"ok": False, "error": message, "exit_code": exit_code, **_error_fields}),
                                     default=str) + "\n")
        except OSError as exc:  # the line below is all there is
            _stdout_lost(exc)
            message = f"{message} (and stdout could not take the report: {exc.strerror or exc})"
    err_console.print(Text.assemble((f"{label}:", "red"), " ", message), highlight=False, soft_wrap=True,
                      emoji=False, markup=False)
