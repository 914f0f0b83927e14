"""`dspark build`: compile csrc/ into the build cache (see dspark_cli/build.py)."""

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from dspark_cli.output import console, emit


def register(app: typer.Typer) -> None:
    @app.command()
    def build(
        arch: Optional[str] = typer.Option(None, "--arch", help="Arch list, e.g. '9.0a' or 'sm_90a;8.0' "
                                           "(default: TORCH_CUDA_ARCH_LIST, else the visible GPUs)."),
        jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Parallel compile jobs (ninja)."),
        wheel: Optional[Path] = typer.Option(None, "--wheel", help="Also write a wheel of the built library "
                                             "(package dspark_ops, pinned to this torch) into this directory."),
        force: bool = typer.Option(False, "--force", help="Rebuild even if the cache has this build."),
        self_test: bool = typer.Option(False, "--self-test", help="Then check every op on the GPU (dspark verify ops)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the compiler commands and output."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON document (for CI)."),
    ) -> None:
        """Build the CUDA extension with torch.utils.cpp_extension and ninja, cached by torch version,
        CUDA version, arch list and source hash (an unchanged rebuild takes about a second).
        Exit 3 on a toolchain problem (no nvcc, CUDA major mismatch with torch, no arch)."""
        from dspark_cli import build as builder

        if not as_json:
            p = builder.plan(arch)
            console.print(f"building for {', '.join(p.archs)} ({p.arch_source}) with nvcc {p.nvcc_version}, "
                          f"torch {p.torch_version}, CUDA_HOME={p.cuda_home}", highlight=False)
        if as_json or verbose:  # --verbose streams ninja's own [k/N] lines and the compiler output
            result = builder.build(arch, jobs, force, verbose)
        else:
            sources = len(builder.source_files())
            with console.status(f"compiling csrc/ ({sources} files) with nvcc and ninja "
                                f"(a first build takes 30 s to a few minutes)…"):
                result = builder.build(arch, jobs, force, verbose)
        doc = asdict(result)
        if wheel is not None:
            doc["wheel"] = str(builder.write_wheel(result, wheel))

        def render(r):
            console.print(f"{r['status']} in {r['seconds']:.1f} s: {r['path']}", highlight=False)
            if "wheel" in r:
                console.print(f"wheel: {r['wheel']}", highlight=False)

        emit(doc, as_json, render)
        if self_test:
            from dspark_cli.runtime import cuda_ops
            from dspark_cli.selftest import run_self_test

            cuda_ops.load(result.path)
            run_self_test(as_json=as_json)
