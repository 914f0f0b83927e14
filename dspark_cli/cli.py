"""The `dspark` command: a thin typer layer; each command lives in dspark_cli/commands/<name>.py
and exposes `register(app)`. Errors become one line on stderr and the documented exit code."""

import importlib
import sys

import typer
from rich.markup import escape

from dspark_cli.errors import EXIT_USAGE, DsparkError
from dspark_cli.output import err_console

# typer may vendor its own click; take the usage-error class from typer's own exception tree.
ClickUsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

COMMAND_MODULES = ["compat", "apply", "doctor", "build", "verify", "profile", "rebase"]

app = typer.Typer(
    name="dspark",
    help="DSpark speculative decoding for pinned vLLM and TGI trees.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
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
    try:
        rc = app(standalone_mode=False)  # click returns typer.Exit's code here instead of exiting
    except DsparkError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except ClickUsageError as exc:
        err_console.print(f"[red]usage:[/red] {escape(exc.format_message())}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_USAGE)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
