"""`dspark compat` (what compat.yaml supports) and `dspark compat lock` (full commit ids)."""

from typing import List, Optional

import typer
from rich.markup import escape

from dspark_cli.commands.params import flag_option, plain_help_typer, text_argument, text_option
from dspark_cli.output import emit, say


def _as_dict(compat) -> dict:
    engines = {}
    for name, engine in compat.engines.items():
        engines[name] = {
            "repository": engine.repository, "module": engine.module, "distributions": list(engine.distributions),
            "default_pin": engine.default_pin,
            "pins": {pin.name: {
                "commit": pin.commit, "commit_is_full": pin.commit_is_full, "tag": pin.tag,
                "patches": str(pin.patches), "python": pin.python, "torch": pin.torch, "cuda": pin.cuda,
                "releases": [{"package": r.package, "version": r.version, "file": r.file, "sha256": r.sha256,
                              "kind": r.kind} for r in pin.releases],
                "tested": dict(pin.tested),
            } for pin in engine.pins.values()},
        }
    return {"path": str(compat.path), "engines": engines}


def _render(result: dict) -> None:
    """Engine and pin names in bold; the rest is data (paths, ranges), escaped so it prints as it is."""
    e = escape
    out = [f"compat.yaml: {e(result['path'])}"]
    for name, engine in result["engines"].items():
        out.append(f"[bold]{e(name)}[/bold]  {e(engine['repository'])}")
        for pin_name, pin in engine["pins"].items():
            default = " (default)" if pin_name == engine["default_pin"] else ""
            out.append(f"  [bold]{e(pin_name)}[/bold]{default}  commit {e(pin['commit'])}  tag {e(pin['tag'])}")
            out.append(e(f"    python {pin['python']}  torch {pin['torch']}  cuda {pin['cuda']}"))
            out.append(e(f"    series   {pin['patches']}"))
            for release in pin["releases"] or [None]:
                out.append(e(f"    release  {release['file']} ({release['package']}, sha256 {release['sha256'][:16]}…)"
                             if release else "    release  none on PyPI (use --source git)"))
            out += [e(f"    tested   {place}: {what}") for place, what in pin["tested"].items()]
    say("\n".join(out))


def register(app: typer.Typer) -> None:
    compat_app = plain_help_typer(help="Supported engines and pins (compat.yaml; $DSPARK_COMPAT overrides its path).",
                             invoke_without_command=True)

    @compat_app.callback()
    def compat_show(ctx: typer.Context,
                    as_json: bool = flag_option("--json", help="Machine-readable output.")) -> None:
        """Show every engine, pin, release file and supported range; validates compat.yaml."""
        if ctx.invoked_subcommand is not None:
            return
        from dspark_cli import compat

        emit(_as_dict(compat.load()), as_json, _render)

    @compat_app.command("lock")
    def compat_lock(
        ctx: typer.Context,
        engines: Optional[List[str]] = text_argument(None, "ENGINES", help="Engines to lock (default: all)."),
        repo: Optional[str] = text_option(None, "--repo", help="Clone URL or local clone to read commits from."),
        as_json: bool = flag_option("--json", help="Machine-readable output."),
    ) -> None:
        """Replace short commit ids in compat.yaml with full 40-hex ids resolved in a clone."""
        from dspark_cli import compat, compat_lock

        as_json = as_json or ctx.parent.params["as_json"]  # `dspark compat --json lock` asks for JSON too
        loaded = compat.load()
        changes = compat_lock.lock(loaded, engines or list(loaded.engines), repo)
        emit({"path": str(loaded.path), "locked": changes}, as_json, lambda r: say(
            "\n".join(f"{c['engine']} {c['pin']}: {c['short']} -> {c['commit']}" for c in r["locked"])
            or "every pin already has a full commit id", markup=False))

    app.add_typer(compat_app, name="compat")
