"""`dspark rebase <engine> --from <pin> --onto <commit|release>`: carry a pinned series onto a new
upstream tree with 3-way merges and write the refreshed series (docs/rebase.md)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import typer
import yaml
from packaging.version import InvalidVersion, Version
from rich.markup import escape
from rich.table import Table

from dspark_cli import compat as compat_mod
from dspark_cli import cache_dir, cache_subdir, oplock, pypi_source, rebase
from dspark_cli.commands.params import flag_option, path_option, text_argument, text_option
from dspark_cli.errors import CheckFailed, PatchFailed, UsageError
from dspark_cli.files import check_dir_option
from dspark_cli.output import emit, say, say_table
from dspark_cli.series import load_series
from dspark_cli.workspace import Workspace, safe_name

_VERSION = re.compile(r"v?(\d+(?:\.\d+)+(?:[.-]?(?:post|rc|a|b)\d+)?)")
_COMMIT_ID = re.compile(r"""__commit_id__\s*=\s*(?:commit_id\s*=\s*)?['"]g?([0-9a-f]{7,40})['"]""")


def _sdist_first(pin: compat_mod.Pin) -> compat_mod.ReleaseFile:
    """The pin's sdist if it lists one (an sdist is the tagged tree), else its first release file."""
    if not pin.releases:  # choose_release's own message names `apply`'s --source git, not rebase's --repo
        raise UsageError(f"{pin.engine} {pin.name} has no release file in compat.yaml; rebase from git with "
                         "--repo (a repository holding its commit)")
    sdists = [r for r in pin.releases if r.kind == "sdist"]
    return sdists[0] if sdists else pypi_source.choose_release(pin, None, None)


def _release_pin(engine: compat_mod.Engine, onto: str) -> compat_mod.Pin | None:
    """The pin `onto` names: by name, tag or commit, or a release version (0.33.0) equal to a pin's
    release version or name (v0.33.0), so a pinned release never goes to the package index."""
    pin = engine.resolve_pin(onto)
    match = _VERSION.fullmatch(onto)
    if pin is not None or not match:
        return pin
    wanted = Version(match.group(1))
    for candidate in engine.pins.values():
        versions = [r.version for r in candidate.releases] + [candidate.name.removeprefix("v")]
        if any(_same_version(v, wanted) for v in versions):
            return candidate
    return None


def _same_version(text: str, wanted: Version) -> bool:
    try:
        return Version(text) == wanted
    except InvalidVersion:
        return False


def _onto_release(engine: compat_mod.Engine, onto: str, package: str) -> tuple[compat_mod.ReleaseFile, str, str]:
    """(the release file, its pin's name, upstream's tag for it)."""
    pin = _release_pin(engine, onto)
    if pin is not None and pin.releases:
        return _sdist_first(pin), pin.name, pin.tag
    match = _VERSION.fullmatch(onto)
    if not match:
        raise UsageError(f"--onto {onto!r}: without --repo it must be a release version (e.g. v0.33.0) "
                         "or a pin in compat.yaml")
    return rebase.index_release(package, match.group(1)), f"v{match.group(1)}", f"v{match.group(1)}"


def _release_commit_id(ws: Workspace, commit: str, module: str) -> str | None:
    """The upstream commit a release tree records (vLLM: `<module>/_version.py` __commit_id__)."""
    shown = ws.git.run("show", f"{commit}:{module}/_version.py", check=False)
    match = _COMMIT_ID.search(shown.stdout) if shown.returncode == 0 else None
    return match.group(1) if match else None


def _render(report: dict) -> None:
    under = f" with DSpark's series {report['under']['onto_series']}" if report["under"] else ""
    table = Table(title=escape(f"rebase onto {report['onto'][:12]}{under} (branch {report['branch']})"))
    for column in ("patch", "result", "files", "details"):
        table.add_column(column, overflow="fold")
    for p in report["patches"]:
        style = {"clean": "green", "3-way": "yellow", "resolved": "yellow", "conflict": "red",
                 "already upstream": "cyan"}.get(p["status"], "dim")
        table.add_row(escape(p["patch"]), f"[{style}]{p['status']}[/{style}]", escape("\n".join(p["files"])),
                      escape("\n".join(p["details"])))
    say_table(table)
    if report["compiled"] or report["compile_errors"]:
        failed = f"; failed: {', '.join(report['compile_errors'])}" if report["compile_errors"] else ""
        say(f"byte-compiled {len(report['compiled'])} patched Python files{failed}", markup=False)
    if report["out_dir"]:
        say(f"refreshed series written to {report['out_dir']}", markup=False)
        dropped = [f"{p['patch']} ({'your empty resolution' if p['commit'] else 'already in the new tree'})"
                   for p in report["patches"] if p["status"] == rebase.ALREADY]
        if dropped:
            say(f"left out of it: {', '.join(dropped)}", markup=False)
    if report.get("compat_entry"):
        entry = yaml.safe_dump({report["new_pin"]: report["compat_entry"]}, sort_keys=False)
        say(f"compat.yaml entry for the new pin (add python/torch/cuda/tested):\n{entry}", markup=False)


def _how_to_resolve(conflict: rebase.PatchOutcome, result: rebase.RebaseResult) -> str:
    where = f"on branch {result.branch} in {result.workdir}"
    if any(d.endswith(rebase.NEVER_UPSTREAM) for d in conflict.details):
        underlay = result.trees.underlay
        if underlay is None:
            return ("a series layered on DSpark's (`dspark apply --series`) changes files DSpark's series adds: "
                    "carry it on DSpark's series of both pins with --layered")
        return (f"the file is in neither the new tree nor DSpark's series {underlay.new_name}: a series "
                "layered on another team's must be carried onto that series by hand")
    if any(rebase.GONE in d for d in conflict.details) or rebase.NOT_APPLIED in conflict.details:  # no markers
        return (f"port its change into the new tree {where} and commit it, or drop the patch with an empty commit "
                f"(`git -C {result.workdir} commit --allow-empty -m 'drop {conflict.patch}'`), then run again "
                "with --continue")
    if all(rebase.UNMERGED_NO_MARKERS in d for d in conflict.details):
        return f"choose each file's content {where}, commit, then run again with --continue"
    return f"markers left {where}: resolve, commit, then run again with --continue"


def _how_to_fix_compile(result: rebase.RebaseResult) -> str:
    """The way on when a file one of your resolutions changed no longer compiles or holds conflict
    markers (nothing of the kind when the files are upstream's or a patch's as it applied)."""
    errors = result.compile_errors + result.leftover_markers
    broken = [o for o in result.outcomes if o.status == rebase.RESOLVED and o.commit
              and any(e.startswith(f"{f}: ") for f in o.files for e in errors)]
    if not broken:
        return ""
    last, head = broken[-1], Workspace(result.workdir).head()
    if last.commit == head:
        return (f"; fix your resolution of {last.patch} (`git -C {result.workdir} commit --amend`), then run again "
                "with --continue")
    return (f"; fix your resolution of {last.patch}: `git -C {result.workdir} reset --hard {last.commit[:12]}`, "
            "amend it, then run again with --continue, which applies the patches after it again")


def _layered_onto(engine: compat_mod.Engine, pin: compat_mod.Pin, onto: str, series_dir: Path | None,
                  series_named: Path | None, out: Path | None, repo: Path | None
                  ) -> tuple[compat_mod.Pin, rebase.Underlay]:
    """The pin whose DSpark series a layered series is carried onto, and DSpark's series of both
    pins: --onto must name one (by name, tag, commit or release version), since that series is
    what `apply --series` lays it on. `series_named`: --series as given (a link keeps its name)."""
    if series_dir is None:
        raise UsageError("--layered carries your own series: give it with --series")
    ours = next((p for p in engine.pins.values() if p.patches.resolve() == series_dir), None)
    if ours is not None:
        raise UsageError(f"--layered: --series is DSpark's own series {engine.name}/{ours.name}: carry it without "
                         "--layered")
    onto_pin = _release_pin(engine, onto)
    if onto_pin is None:
        repo_option = f" --repo {repo}" if repo is not None else ""
        raise UsageError(f"--layered: --onto {onto} is no {engine.name} pin in compat.yaml, so DSpark has no series "
                         f"there to layer yours on; carry DSpark's first (`dspark rebase {engine.name} --from "
                         f"{pin.name} --onto {onto}{repo_option}`), add its pin to compat.yaml, then run this again")
    if onto_pin.name == pin.name:
        raise UsageError(f"--layered: --onto {onto} is the --from pin {pin.name} itself")
    if out is None and series_named.name != pin.name:
        raise UsageError(f"--layered: give --out (the carried series is written beside --series only when its "
                         f"directory is named after the --from pin, {pin.name})")
    underlay = rebase.Underlay(f"{engine.name}/{pin.name}", load_series(pin.series_dir(), "dspark"),
                               f"{engine.name}/{onto_pin.name}", load_series(onto_pin.series_dir(), "dspark"))
    return onto_pin, underlay


def _layer_label(series_dir: Path) -> str:
    """A ref- and file-name-safe name of one team's layer (its directory's last two names, cut short,
    and a hash of its resolved path): two layers carried onto the same pin get their own work branch
    and tree, and the same layer the same ones however --series names it."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{series_dir.parent.name}-{series_dir.name}").strip("-")[:48]
    return f"{readable}-{hashlib.sha256(os.fsencode(series_dir)).hexdigest()[:8]}"


def _check_pin_name(name: str, fix: str) -> None:
    """The new pin goes into compat.yaml and names patches/ENGINE/PIN and the work branch: it must
    be a name compat.yaml takes."""
    if not compat_mod.PIN_NAME.fullmatch(name):
        raise UsageError(f"{name!r} cannot be a pin name (letters, digits, '.', '_' or '-', starting with a letter "
                         f"or digit; no '..', no '.' or '.lock' at the end): {fix}")


def register(app: typer.Typer) -> None:
    @app.command("rebase")
    def rebase_command(
        engine_name: str = text_argument(..., "ENGINE", help="Engine in compat.yaml, e.g. vllm."),
        from_pin: str = text_option(..., "--from", help="Pin whose series to carry, e.g. v0.32.0."),
        onto: str = text_option(..., "--onto", help="New upstream: a commit/tag of --repo, or a release (v0.33.0); with --layered, a pin."),
        repo: Path | None = path_option(None, "--repo", help="Git repository holding both the pin's commit and --onto."),
        out: Path | None = path_option(None, "--out", help="Where to write the refreshed series (default: patches/ENGINE/NEW_PIN; with --layered, NEW_PIN beside --series)."),
        new_pin: str | None = typer.Option(None, "--pin", metavar="NAME", help="Name of the new pin (default: the release, tag or short commit)."),
        series_dir: Path | None = path_option(None, "--series", help="Series to carry (default: the --from pin's)."),
        workdir: Path | None = path_option(None, "--workdir", help="Work tree for the rebase (default: under $DSPARK_CACHE/rebase, or rebase-layered with --layered)."),
        force: bool = flag_option("--force", help="Restart an existing work branch; replace a non-empty --out that holds a series."),
        resume: bool = flag_option("--continue", help="Go on after a conflict you resolved and committed."),
        layered: bool = flag_option("--layered", help="--series is layered on DSpark's (apply --series): carry it "
                                    "on DSpark's series of --from onto the --onto pin's tree with DSpark's series for it."),
        as_json: bool = flag_option("--json", help="Machine-readable output."),
    ) -> None:
        """Apply a pin's patch series onto another upstream tree patch by patch (3-way merges),
        report each patch as clean / 3-way / conflict, and write the refreshed series.

        Exit codes: 0 written, 1 a patched file no longer byte-compiles, 2 bad input,
        3 environment, 4 a patch conflicted (markers left on the work branch)."""
        if new_pin is not None:  # before anything is fetched
            _check_pin_name(new_pin, "choose another --pin")
        compat = compat_mod.load()
        engine = compat.engine(engine_name)
        pin = engine.resolve_pin(from_pin)
        if pin is None:
            raise UsageError(f"unknown {engine_name} pin {from_pin!r}; compat.yaml knows: {', '.join(engine.pins)}")
        # Path options are relative to the caller's cwd, but git runs in the work tree (a relative
        # patch path there is "can't open patch", reported as a conflict): make them absolute now.
        # --series as named (a link to a team's series directory is written beside the link), and resolved
        series_named = Path(os.path.abspath(series_dir)) if series_dir else None
        repo, out, series_dir, workdir = (p.resolve() if p else None for p in (repo, out, series_dir, workdir))
        onto_pin, underlay = (_layered_onto(engine, pin, onto, series_dir, series_named, out, repo) if layered
                              else (None, None))
        source_dir = series_dir or pin.patches
        # Before anything reads it: a run killed while swapping a refreshed series in left none.
        for note in rebase.recover_interrupted(source_dir):
            say(note, err=True, markup=False)
        if series_dir is None:
            pin.series_dir()  # one there, or compat.yaml's key named
        patches = load_series(source_dir, "team" if layered else "dspark")
        for option, path in (("--workdir", workdir), ("--out", out)):
            if path is not None:
                check_dir_option(path, option)  # before any work, not an OSError after it

        if repo is None:
            base_release = _sdist_first(pin)
            if onto_pin is not None:  # the tree under the layer is that pin's: its own release file or none
                onto_release = _sdist_first(onto_pin)
            else:
                onto_release, release_name, onto_tag = _onto_release(engine, onto, base_release.package)
        if onto_pin is not None:
            name = new_pin or onto_pin.name
        elif repo is not None:
            # A ref such as main~0 becomes main-0: the name makes the work branch and the out directory.
            name = new_pin or (onto[:12] if compat_mod.HEX_COMMIT.fullmatch(onto.lower()) else safe_name(onto))
        else:
            name = new_pin or release_name
        _check_pin_name(name, "name the new pin with --pin")
        default_work = f"{engine_name}-{name}" if repo is not None else f"{engine_name}-{pin.name}-{name}"
        protected = {"--repo": repo, "dspark cache": cache_dir()}
        if layered:  # the layer's own branch and work tree (no plain run's, no other layer's), out beside it
            label = _layer_label(source_dir)
            branch, out_dir = f"dspark/layered-rebase/{label}/{name}", out or series_named.parent / name
            work = (workdir or cache_subdir("rebase-layered") / label / default_work).resolve()
            protected |= {f"DSpark series {e.name}/{p.name}": p.patches  # of every engine: one --out holds one
                          for e in compat.engines.values() for p in e.pins.values()}
            default_out = "the new pin's name beside --series"
        else:
            branch, out_dir = f"dspark/rebase-{name}", out or pin.patches.parent / name
            work = (workdir or cache_subdir("rebase") / default_work).resolve()  # an unusable DSPARK_CACHE: exit 3
            default_out = "the pin's series beside the compat.yaml in use"
        for note in rebase.recover_interrupted(out_dir):
            say(note, err=True, markup=False)
        protected["work tree"] = work
        rebase.check_targets(out_dir, force, source_dir,
                             {what: path for what, path in protected.items() if path is not None},
                             default_out)  # before any work

        compat_entry = None
        if repo is not None:
            lock = rebase.repository_lock(repo, work)
        else:
            ws, base, onto_commit = rebase.release_commits(work, base_release, onto_release, resume)
            lock = oplock.exclusive(ws.git_dir, ws.path)
            if not layered:  # a layered series is no pin: it is passed to apply with --series
                # the tag is upstream's (compat lock and apply --source git look it up), not --pin's name
                compat_entry = {"commit": _release_commit_id(ws, onto_commit, engine.module), "tag": onto_tag,
                                "patches": f"patches/{engine_name}/{name}", "releases": [vars(onto_release)]}
        # one hold of the repository's lock from the first patch to the series written: another
        # rebase in between could reset the work tree this one compiles and writes the series from
        with lock:
            if repo is not None:
                ws, result = rebase.rebase_in_worktree(repo, work, onto_pin or onto, pin, patches, branch, force,
                                                       resume, underlay)
            else:
                result = rebase.rebase_series(ws, base, onto_commit, patches, branch, force=force, resume=resume,
                                              underlay=underlay)
            try:
                conflict = result.conflicted
                if conflict is None:
                    if not layered:  # the marker module is DSpark's series', not a layer's
                        rebase.refresh_marker(ws, result, f"{engine_name}/{name}")
                    rebase.byte_compile(ws, result)
                    rebase.find_leftover_markers(ws, result)
                    if not (result.compile_errors or result.leftover_markers):
                        rebase.write_series(ws, result, source_dir, out_dir,
                                            None if layered else (f"{engine_name}/{pin.name}", f"{engine_name}/{name}"))
                        rebase.record_finished(ws)
            finally:  # only a killed run leaves its mark: the next takes the locks its git left for its own
                rebase.run_ended(ws)
        failure = None
        if conflict is not None:
            failure = PatchFailed(f"{conflict.patch} conflicts ({'; '.join(conflict.details)}); {_how_to_resolve(conflict, result)}")
        elif result.compile_errors or result.leftover_markers:
            what = []
            if result.compile_errors:
                what.append(f"patched files no longer byte-compile: {'; '.join(result.compile_errors)}")
            if result.leftover_markers:
                what.append(f"conflict markers left: {'; '.join(result.leftover_markers)}")
            failure = CheckFailed(f"{'; '.join(what)}{_how_to_fix_compile(result)}")
        report = {**result.to_json(), "engine": engine_name, "from": pin.name, "new_pin": name,
                  "compat_entry": compat_entry if failure is None else None, "ok": failure is None}
        if failure is not None:  # the report is the one JSON document, so it carries the failure's fields too
            report.update(error=str(failure), exit_code=failure.exit_code)
        emit(report, as_json, _render, failure)
