"""The `dspark` command: a thin typer layer; each command lives in dspark_cli/commands/<name>.py
and exposes `register(app)`. Errors become one line on stderr and the documented exit code."""

import importlib
import signal
import sys

import typer

from dspark_cli.errors import EXIT_ENV, EXIT_INTERRUPTED, EXIT_USAGE, PATH_SHAPE_ERRORS, DsparkError
from dspark_cli import output
from dspark_cli.commands.params import command_group
from dspark_cli.workspace import PROGRESS

# typer may vendor its own click; take the usage-error classes from typer's own exception tree.
ClickUsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

COMMAND_MODULES = ["compat", "apply", "doctor", "build", "verify", "profile", "rebase"]

app = command_group(
    name="dspark",
    help="DSpark speculative decoding for pinned vLLM and TGI trees.",
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)

for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"dspark_cli.commands.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"dspark_cli.commands.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:
    as_json = "--json" in sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else "--json" in sys.argv[1:]
    output.reset()
    PROGRESS.clear()
    try:
        rc = app(standalone_mode=False)  # click returns typer.Exit's code here instead of exiting
    except DsparkError as exc:
        output.emit_error("error", str(exc), exc.exit_code, as_json)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a file or directory we could not read or write (permissions, disk full)
        code = EXIT_USAGE if exc.errno in PATH_SHAPE_ERRORS else EXIT_ENV
        message = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        output.emit_error("error", message, code, as_json)
        sys.exit(code)
    except (typer.Abort, KeyboardInterrupt):
        rc = EXIT_INTERRUPTED
    except ClickUsageError as exc:
        output.emit_error("usage", exc.format_message(), EXIT_USAGE, as_json)
        sys.exit(EXIT_USAGE)
    if rc == EXIT_INTERRUPTED:  # Ctrl-C: typer returns 130 (older click raised Abort)
        command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "")
        output.error_fields(interrupted=True)
        # What was under way has stopped: a second Ctrl-C now would only cut the line short. The
        # handlers come back after it: a host process running main() keeps its own.
        saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            output.emit_error("interrupted", _after_interrupt(command) or "stopped", EXIT_INTERRUPTED, as_json)
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)
    sys.exit(rc if isinstance(rc, int) else 0)


def console() -> None:
    """The `dspark` process (console script, python -m dspark_cli): main(), and after an interrupt
    a further Ctrl-C while Python shuts down is ignored, so the exit stays 130 (it ended the process
    by the signal, or printed a KeyboardInterrupt traceback)."""
    try:
        main()
    except SystemExit as exc:
        if exc.code == EXIT_INTERRUPTED:
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)
        raise


def _after_interrupt(command: str) -> str | None:
    """What the interrupted command left (README's exit 130), as far as it got."""
    if command == "build":  # the stage build.build got to (finished, or interrupted), else it had not begun
        return PROGRESS.get("stage", "the cache is as it was")
    if command == "rebase":
        if "--continue" in sys.argv:
            return ("what it made is left where it stopped, your resolution commits on its work branch: run it "
                    "again with --continue (--force starts over and drops them)")
        return "what it made is left where it stopped: run it again with --force to start over"
    if command not in ("apply", "revert"):
        return None
    op, stage = PROGRESS.get("op", command), PROGRESS.get("stage")
    if stage == "recovering":
        return (f"restoring the state before an interrupted {op} stopped part-way: the next dspark apply or "
                "revert finishes it")
    if stage == "rolled back":
        return f"the {op} under way was rolled back: the workspace is as it was before it"
    if stage == "finished":
        return f"the {op} had finished (dspark status shows the workspace)"
    if stage == "begun":
        return f"the {op} stopped part-way: the next dspark apply or revert restores the state before it"
    return f"the {command} had not begun changing the workspace"


if __name__ == "__main__":
    console()
