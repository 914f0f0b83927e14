"""`dspark apply`, `dspark status`, `dspark revert` and `dspark series lock`."""

from pathlib import Path

import typer

from dspark_cli.output import console, emit

JSON_OPTION = typer.Option(False, "--json", help="Machine-readable output.")


def register(app: typer.Typer) -> None:
    series_app = typer.Typer(help="Work with patch series (docs/patch-series.md).", no_args_is_help=True)

    @series_app.command("lock")
    def series_lock(
        directory: Path = typer.Argument(..., help="Series directory (holds `series`)."),
        check: bool = typer.Option(False, "--check", help="Only check the lock; exit 1 if out of date."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Write DIR/series.lock: the sha256 of every patch listed in DIR/series."""
        from dspark_cli import series

        if check:
            series.check_lock(directory)
            result = {"lock": str(directory / series.LOCK_FILE), "up_to_date": True}
        else:
            result = {"lock": str(series.write_lock(directory)), "up_to_date": True}
        result["patches"] = [
            {"name": name, "sha256": sha} for name, sha in series.read_lock(directory).items()
        ]
        emit(result, as_json, lambda r: console.print(
            f"{r['lock']}: {len(r['patches'])} patch(es) " + ("up to date" if check else "locked")
        ))

    app.add_typer(series_app, name="series")
