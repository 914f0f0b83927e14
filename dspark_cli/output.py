"""Human output through rich, machine output as one JSON document on stdout."""

import json
import sys
from typing import Any, Callable

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def emit(result: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print `result` as JSON (for CI) or through `render` (for people)."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    else:
        render(result)
