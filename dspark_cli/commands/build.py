"""`dspark build`: compile csrc/ into the build cache (see dspark_cli/build.py); with --engine tgi,
also install the patched TGI server of a workspace into this interpreter (dspark_cli/engine_install.py)."""

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from dspark_cli.commands.params import flag_option, path_option, text_option
from dspark_cli.errors import CheckFailed, UsageError
from dspark_cli.engine_install import TGI_DEFAULT_EXTRAS
from dspark_cli.output import capture_json, console, emit, error_fields, say, stdout_to_stderr


def register(app: typer.Typer) -> None:
    @app.command()
    def build(
        arch: Optional[str] = text_option(None, "--arch", help="Arch list, e.g. '9.0a' or 'sm_90a;8.0' "
                                           "(default: TORCH_CUDA_ARCH_LIST, else the visible GPUs)."),
        jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, metavar="N", help="Parallel compile jobs (ninja)."),
        # a str, not a Path: typer makes --wheel '' Path('.'), the current directory, past check_wheel_dir
        wheel: Optional[str] = typer.Option(None, "--wheel", metavar="DIR", help="Also write a wheel of the built library "
                                            "(package dspark_ops, pinned to this torch) into this directory."),
        force: bool = flag_option("--force", help="Rebuild even if the cache has this build "
                                   "(--engine: also regenerate the gRPC stubs)."),
        self_test: bool = flag_option("--self-test", help="Then check every op on the GPU (dspark verify ops)."),
        verbose: bool = flag_option("--verbose", "-v", help="Show the compiler commands and output."),
        engine: Optional[str] = text_option(None, "--engine", help="Also install this engine's patched server "
                                             "(tgi) from the --workdir workspace into this Python (docs/tgi.md)."),
        workdir: Path = path_option(Path("."), "--workdir", "-C", help="--engine: the workspace `dspark apply` made."),
        no_deps: bool = flag_option("--no-deps", help="--engine: install the server without its "
                                     "dependencies (you manage the stack; grpcio-tools must be there for the stubs)."),
        extras: str = typer.Option(",".join(TGI_DEFAULT_EXTRAS), "--extras", metavar="LIST",
                                   help="--engine: the server's pip extras, comma-separated ('' for none)."),
        no_extension: bool = flag_option("--no-extension", help="--engine: do not build the CUDA extension."),
        as_json: bool = flag_option("--json", help="Print one JSON document (for CI)."),
    ) -> None:
        """Build the CUDA extension with torch.utils.cpp_extension and ninja, cached by torch version,
        the exact nvcc release and CUDA prefix, the host compilers, arch list, compiler flags and
        source hash (an unchanged rebuild takes about a second).
        Exit 3 on a toolchain problem (no nvcc, CUDA major mismatch with torch, no arch).

        With --engine tgi -C DIR: build the extension if this Python's torch has CUDA and nvcc matches,
        else skip it and say why; generate TGI's gRPC stubs if missing; pip-install DIR/server, editable,
        into this Python. Exit 2 if DIR is not an applied TGI workspace, 3 if a step fails."""
        if engine is not None:
            if wheel is not None or self_test:
                raise UsageError("--wheel and --self-test are for the extension alone: run `dspark build` without --engine")
            _install_engine(engine, workdir, not no_deps, extras, not no_extension, arch, jobs, force, verbose, as_json)
            return
        given = [name for name, value in (("--workdir", workdir != Path(".")), ("--no-deps", no_deps),
                                          ("--no-extension", no_extension),
                                          ("--extras", extras != ",".join(TGI_DEFAULT_EXTRAS))) if value]
        if given:
            raise UsageError(f"{given[0]} goes with --engine (e.g. `dspark build --engine tgi -C ./tgi`)")
        from dspark_cli import build as builder

        if wheel is not None:  # a file in the way (2) or no permission (3), before minutes of compiling
            builder.check_wheel_dir(wheel)
        p = builder.plan(arch)
        if wheel is not None:
            builder.wheel_torch_pin()  # torch without metadata: no wheel could pin it, found before compiling
        if not as_json:
            say(f"building for {', '.join(p.archs)} ({p.arch_source}) with nvcc {p.nvcc_version}, "
                f"torch {p.torch_version}, CUDA_HOME={p.cuda_home}", markup=False)
        if as_json or verbose:  # --verbose streams ninja's own [k/N] lines and the compiler output
            with stdout_to_stderr(as_json):
                result = builder.build(arch, jobs, force, verbose, planned=p)
        else:
            sources = len(builder.source_files())
            with console.status(f"compiling csrc/ ({sources} files) with nvcc and ninja "
                                f"(a first build takes 30 s to a few minutes)…"):
                result = builder.build(arch, jobs, force, verbose, planned=p)
        doc = asdict(result)
        if wheel is not None:
            doc["wheel"] = str(builder.write_wheel(result, wheel))

        def render(r):
            say(f"{r['status']} in {r['seconds']:.1f} s: {r['path']}", markup=False)
            if "wheel" in r:
                say(f"wheel: {r['wheel']}", markup=False)

        if not (self_test and as_json):
            emit(doc, as_json, render)
        if self_test:
            _self_test(doc, as_json)


def _self_test(doc: dict, as_json: bool) -> None:
    """dspark verify ops on the library just built. Under --json, one document for both:
    {"ok", "build", "self_test"} (plus error/exit_code when a check fails); a self-test that cannot
    run gives the failure document {"ok": false, "error", "exit_code", "build"}."""
    from dspark_cli.runtime import cuda_ops
    from dspark_cli.selftest import run_self_test

    cuda_ops.load(doc["path"])
    if not as_json:
        run_self_test(as_json=False)
        return
    error_fields(build=doc)
    failure = None
    with capture_json() as docs:
        try:
            run_self_test(as_json=True)
        except CheckFailed as exc:
            failure = exc
    combined = {"ok": failure is None, "build": doc, "self_test": docs[-1] if docs else None}
    if failure is not None:
        combined.update(error=str(failure), exit_code=failure.exit_code)
    emit(combined, True, lambda r: None, failure)


def _install_engine(engine: str, workdir: Path, deps: bool, extras: str, extension: bool, arch: Optional[str],
                    jobs: Optional[int], force: bool, verbose: bool, as_json: bool) -> None:
    from dspark_cli import engine_install

    request = engine_install.EngineInstall(
        workdir=workdir, engine=engine, deps=deps, extras=tuple(e.strip() for e in extras.split(",") if e.strip()),
        extension=extension, force=force, arch=arch, jobs=jobs, verbose=verbose)
    # Progress goes to stderr, with pip's own output: stdout carries only the result (or the JSON).
    with stdout_to_stderr(as_json):  # the extension's build, --verbose: ninja's output
        result = engine_install.install(
            request, log=lambda line: say(f"[dim]>[/dim] {escape(line)}", err=True))

    def render(r: dict) -> None:
        def show(text: str, style: str = "") -> None:  # whole lines, data never read as markup: paths stay copyable
            say(f"[{style}]{escape(text)}[/]" if style else escape(text))

        for note in r["notes"]:
            show(f"note: {note}", "yellow")
        ext, inst = r["extension"], r["install"]
        show("extension  " + (f"skipped: {ext['reason']}" if ext["status"] == "skipped" else f"{ext['status']}: {ext['path']}"))
        show(f"stubs      {r['stubs']['status']} in {r['stubs']['dir']}")
        deps_note = f"with deps, extras [{','.join(inst['extras'])}]" if inst["deps"] else "--no-deps"
        show(f"installed  {inst['package']} {r['check']['version']} (editable, {deps_note}) from {inst['source']} "
            f"into {r['python']}: {len(inst['installed'])} distribution(s) in {inst['seconds']:.0f} s")
        show(f"ok: {r['series']} server imports from the workspace ({r['check']['marker']})", "bold")

    emit(result, as_json, render)
