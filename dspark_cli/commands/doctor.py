"""`dspark doctor`: can this machine apply, build and run DSpark? One line per check."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from dspark_cli.commands.params import flag_option, path_option
from dspark_cli.errors import CheckFailed
from dspark_cli.output import emit, say

STYLE = {"ok": "green", "warn": "yellow", "fail": "red"}


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(
        workdir: Optional[Path] = path_option(None, "--workdir", "-C", help="Where trees and builds go (disk check)."),
        as_json: bool = flag_option("--json", help="Print one JSON document (for CI)."),
    ) -> None:
        """Check Python, git, GPU, nvcc, torch, arch list, compiler, ninja, CUDA_HOME, disk, engines.

        One line per check: ok / warn / fail with a fix hint. Exit 1 if any check fails, 0 otherwise.
        """
        from dspark_cli.doctor import FAIL, run_checks

        checks = run_checks(workdir)
        failed = any(c.status == FAIL for c in checks)

        def render(_):
            width = max(len(c.name) for c in checks)
            for c in checks:
                line = f"[{STYLE[c.status]}]{c.status:4}[/] {escape(c.name):{width}} {escape(str(c.detail))}"
                if c.hint and c.status != "ok":
                    line += f"\n     {'':{width}} → {escape(c.hint)}"
                say(line)

        report = {"ok": not failed, "checks": [asdict(c) for c in checks]}
        failure = None
        if failed:  # the report is the one JSON document, so it carries the failure's fields too
            failure = CheckFailed(f"doctor: {', '.join(c.name for c in checks if c.status == FAIL)} failed")
            report.update(error=str(failure), exit_code=failure.exit_code)
        emit(report, as_json, render, failure)
