"""Human output through rich, machine output as one JSON document on stdout."""

import json
import sys
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)
_json_emitted = False  # a command that emits its report and then fails keeps that one document


def emit(result: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print `result` as JSON (for CI) or through `render` (for people)."""
    global _json_emitted
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
        _json_emitted = True
    else:
        render(result)


def say(text: str, err: bool = False) -> None:
    """One line of rich markup, never hard-wrapped (piped output and CI logs keep whole lines)."""
    (err_console if err else console).print(text, highlight=False, soft_wrap=True)


def emit_error(label: str, message: str, exit_code: int, as_json: bool) -> None:
    """An error as one line on stderr and, under --json, also as the one JSON document on stdout."""
    if as_json and not _json_emitted:
        sys.stdout.write(json.dumps({"ok": False, "error": message, "exit_code": exit_code}) + "\n")
    say(f"[red]{label}:[/red] {escape(message)}", err=True)
