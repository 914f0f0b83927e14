"""`dspark build --engine tgi`: install the patched TGI server of an applied workspace into the
interpreter dspark runs in, so that `text-generation-server` serves with DSpark.

Steps, each named in its error (one line, exit 3 for the environment; exit 2 for a workspace that
is not an applied TGI tree):
  workspace   the workdir is a `dspark apply tgi` workspace and its server carries our marker
  preflight   pip in this interpreter, and grpc_tools when the stubs must be generated
  extension   our CUDA extension (dspark_cli/build.py), or skipped with the reason when torch has no
              CUDA or there is no matching nvcc; a compile error stops here, before anything is installed
  gen-tools   grpcio-tools at the tree's requirements_gen.txt versions (only when deps are managed
              by us and grpc_tools is missing), so the generated stubs match the protobuf runtime
  stubs       TGI's gRPC stubs: grpc_tools.protoc over proto/v3/generate.proto into
              server/text_generation_server/pb with package-relative imports (what TGI's
              `make gen-server` produces, minus the mypy .pyi files)
  install     `python -m pip install -e server[extras]` (or --no-deps), pip's output streamed to stderr
  check       a fresh interpreter imports text_generation_server._dspark from this workspace

Nothing half-done: every check runs before the first change, stubs are written to a scratch
directory and moved in whole, and stubs made by this run are removed again if pip fails (pip
rolls back its own install; grpcio-tools from gen-tools stays, a tool added to the environment).
No typer/rich here: the CLI layer (commands/build.py) only renders what this returns.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dspark_cli.errors import EnvironmentProblem, UsageError
from dspark_cli.files import write_text_atomically
from dspark_cli.series import marker_constants

ENGINES = ("tgi",)
# TGI's Makefile `install-server` target installs the server with these extras.
TGI_DEFAULT_EXTRAS = ("accelerate", "compressed-tensors", "quantize", "peft", "outlines")
TGI_DISTRIBUTION = "text-generation-server"
MARKER = Path("server/text_generation_server/_dspark.py")
PROTO = Path("proto/v3/generate.proto")
PB_DIR = Path("server/text_generation_server/pb")
STUBS = ("generate_pb2.py", "generate_pb2_grpc.py", "__init__.py")
GEN_REQUIREMENTS = Path("server/requirements_gen.txt")
GEN_TOOL_PACKAGES = ("grpcio-tools", "protobuf")  # pinned together: gencode must match the runtime
MIN_PIP = (22, 2)  # `pip install --report`

# protoc writes `import generate_pb2 as generate__pb2` into the _grpc module; inside the pb
# package that must be a relative import.
_ABSOLUTE_PB2_IMPORT = re.compile(r"^import (\w+_pb2)\b", re.MULTILINE)


class StepFailed(EnvironmentProblem):
    def __init__(self, step: str, message: str):
        super().__init__(f"step {step}: {message}")
        self.step = step


@dataclass
class EngineInstall:
    workdir: Path
    engine: str = "tgi"
    deps: bool = True
    extras: tuple[str, ...] = TGI_DEFAULT_EXTRAS
    extension: bool = True
    force: bool = False  # regenerate the stubs and rebuild the extension
    arch: str | None = None
    jobs: int | None = None
    verbose: bool = False


Log = Callable[[str], None]


def install(request: EngineInstall, log: Log = lambda line: None) -> dict:
    """Run every step for `request`; returns what was done (the --json document)."""
    if request.engine not in ENGINES:
        raise UsageError(f"--engine {request.engine}: only {', '.join(ENGINES)} can be installed by `dspark build` "
                         "(a vLLM tree is built and installed by vLLM's own setup)")
    started = time.monotonic()
    python = sys.executable
    tree = check_workspace(Path(request.workdir).resolve())
    workdir = Path(tree["workdir"])
    log(f"workspace {workdir}: {tree['series']} ({len(tree['patches'])} patches)")
    stubs_needed = request.force or bool(missing_stubs(workdir))
    pip_version = check_pip()
    grpc_tools = distribution_version("grpc_tools", "grpcio-tools") if stubs_needed else None
    if stubs_needed and grpc_tools is None and not request.deps:
        raise StepFailed("preflight", f"grpc_tools is not importable in {python} and the gRPC stubs are "
                         f"missing; with --no-deps dspark installs nothing else: `{python} -m pip install "
                         f"{' '.join(gen_tool_requirements(workdir))}` (TGI's gen extra), then rerun")
    extension = build_extension(request, log)

    gen_tools = {"status": "present" if stubs_needed else "not needed", "version": grpc_tools}
    if stubs_needed and grpc_tools is None:
        requirements = gen_tool_requirements(workdir)
        log(f"installing the stub generator: {' '.join(requirements)}")
        run_pip(["install", *requirements], "gen-tools")
        gen_tools = {"status": "installed", "requirements": requirements,
                     "version": distribution_version("grpc_tools", "grpcio-tools")}

    created = generate_stubs(workdir, log) if stubs_needed else []
    stubs = {"status": "generated" if stubs_needed else "present", "dir": str(workdir / PB_DIR),
             "files": list(STUBS)}
    try:
        installed = pip_install_server(request, workdir, log)
    except BaseException:
        for path in created:  # stubs this run added go again; the tree is as it was
            path.unlink(missing_ok=True)
        raise
    check = check_installed(workdir)
    result = {
        "engine": request.engine, "workdir": str(workdir), "pin": tree["pin"], "series": tree["series"],
        "patches": tree["patches"], "notes": tree["notes"], "python": python, "pip": pip_version,
        "extension": extension, "gen_tools": gen_tools, "stubs": stubs, "install": installed, "check": check,
        "seconds": round(time.monotonic() - started, 1),
    }
    record(result)
    return result


# -- workspace ------------------------------------------------------------------------------------
def check_workspace(workdir: Path) -> dict:
    """The applied TGI tree in `workdir`, or exit 2 saying why it is not one."""
    from dspark_cli import applier  # imports git machinery; only needed here

    try:
        status = applier.status(workdir)
    except UsageError as exc:
        raise UsageError(f"step workspace: {exc}") from None
    if status["in_progress"]:  # pip would install a tree that is being changed, or is half changed
        raise UsageError(f"step workspace: {status['in_progress']}")
    if status["engine"] != "tgi":
        raise UsageError(f"step workspace: {workdir} holds {status['engine']} {status['pin']}, not tgi; "
                         "pass the workdir of `dspark apply tgi`")
    marker = workdir / MARKER
    if not marker.is_file():
        raise UsageError(f"step workspace: {workdir} has no {MARKER} (the series is not applied; "
                         f"run `dspark apply tgi -C {workdir}`)")
    series, patches = read_marker(marker)
    expected = f"tgi/{status['pin']}"
    if series != expected:
        raise UsageError(f"step workspace: {marker} names series {series!r}, the workspace pin is {expected!r}")
    applied = {p["label"].split("/", 1)[-1] for p in status["applied"]}
    missing = [p for p in patches if p not in applied]
    if missing:
        raise UsageError(f"step workspace: {len(missing)} patch(es) of {series} not applied ({missing[0]}, ...); "
                         f"run `dspark apply tgi -C {workdir}`")
    if not (workdir / PROTO).is_file() or not (workdir / "server" / "pyproject.toml").is_file():
        raise UsageError(f"step workspace: {workdir} lacks {PROTO} or server/pyproject.toml (not a TGI tree)")
    return {"workdir": str(workdir), "pin": status["pin"], "series": series, "patches": patches,
            "notes": status["drift"]}


def read_marker(marker: Path) -> tuple[str, list[str]]:
    """SERIES and PATCHES from the marker module, read without importing it."""
    try:
        values = marker_constants(marker)
        return str(values["SERIES"]), [str(p) for p in values["PATCHES"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"step workspace: {marker} is not a dspark marker ({type(exc).__name__}: {exc})") from None


# -- extension ------------------------------------------------------------------------------------
def build_extension(request: EngineInstall, log: Log) -> dict:
    """Our CUDA extension for this interpreter's torch, or why it was skipped. A missing or
    mismatched toolchain skips (the server runs on the PyTorch fallbacks); a compile error fails."""
    if not request.extension:
        return {"status": "skipped", "reason": "--no-extension"}
    from dspark_cli import build as builder

    try:
        plan = builder.plan(request.arch)
    except EnvironmentProblem as exc:
        log(f"extension skipped: {exc}")
        return {"status": "skipped", "reason": str(exc)}
    log(f"building the CUDA extension for {', '.join(plan.archs)} (nvcc {plan.nvcc_version}, torch {plan.torch_version})")
    try:
        built = builder.build(request.arch, request.jobs, request.force, request.verbose, planned=plan)
    except EnvironmentProblem as exc:
        raise StepFailed("extension", f"{exc}; nothing was installed") from None
    return {"status": built.status, "path": built.path, "key": built.key, "archs": built.archs}


# -- interpreter probes ---------------------------------------------------------------------------
def check_pip() -> str:
    python = sys.executable
    out = _run([python, "-m", "pip", "--version"])
    if out.returncode != 0:
        raise StepFailed("preflight", f"pip is not available in {python} (`{python} -m ensurepip` adds it)")
    version = out.stdout.split()[1]
    if tuple(int(p) for p in re.findall(r"\d+", version)[:2]) < MIN_PIP:
        raise StepFailed("preflight", f"pip {version} in {python} is older than 22.2: `{python} -m pip install -U pip`")
    return version


def distribution_version(module: str, distribution: str) -> str | None:
    """`distribution`'s version if `module` imports in a fresh interpreter (ours may have cached a
    failed import), else None."""
    code = (f"import importlib, importlib.metadata as m; importlib.import_module({module!r}); "
            f"print(m.version({distribution!r}))")
    out = _run([sys.executable, "-c", code])
    return out.stdout.strip() if out.returncode == 0 else None


def gen_tool_requirements(workdir: Path) -> list[str]:
    """grpcio-tools and protobuf at the versions TGI locked for `make gen-server`; unpinned if the
    tree does not say (pip then picks a protobuf the generated code accepts)."""
    pins = {}
    try:
        for line in (workdir / GEN_REQUIREMENTS).read_text(encoding="utf-8").splitlines():
            name, sep, version = line.strip().partition("==")
            if sep and name.lower() in GEN_TOOL_PACKAGES:
                pins[name.lower()] = version.strip()
    except OSError:
        pass
    return [f"{name}=={pins[name]}" if name in pins else name for name in GEN_TOOL_PACKAGES]


# -- stubs ----------------------------------------------------------------------------------------
def missing_stubs(workdir: Path) -> list[str]:
    return [name for name in STUBS if not (workdir / PB_DIR / name).is_file()]


def generate_stubs(workdir: Path, log: Log) -> list[Path]:
    """Compile the proto into a scratch directory, fix the imports, then move the files into pb/.
    Returns the files that did not exist before (for rollback; regenerated ones are complete too)."""
    proto = workdir / PROTO
    target = workdir / PB_DIR
    log(f"generating gRPC stubs from {PROTO} into {PB_DIR}")
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dspark-pb-", dir=target.parent) as scratch:
        out = _run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto.parent}", f"--python_out={scratch}",
                    f"--grpc_python_out={scratch}", str(proto)])
        if out.returncode != 0:
            last = (out.stderr.strip() or out.stdout.strip() or f"exit {out.returncode}").splitlines()[-1]
            raise StepFailed("stubs", f"grpc_tools.protoc failed on {proto}: {last}")
        generated = sorted(Path(scratch).glob("*.py"))
        if {p.name for p in generated} != set(STUBS) - {"__init__.py"}:
            raise StepFailed("stubs", f"grpc_tools.protoc wrote {[p.name for p in generated]}, expected "
                             "generate_pb2.py and generate_pb2_grpc.py")
        for path in generated:
            path.write_text(_ABSOLUTE_PB2_IMPORT.sub(r"from . import \1", path.read_text(encoding="utf-8")),
                            encoding="utf-8")
        (Path(scratch) / "__init__.py").touch()
        created = []
        for name in STUBS:
            destination = target / name
            if name == "__init__.py" and destination.exists():
                continue
            if not destination.exists():
                created.append(destination)
            os.replace(Path(scratch) / name, destination)
    return created


# -- pip ------------------------------------------------------------------------------------------
def pip_install_server(request: EngineInstall, workdir: Path, log: Log) -> dict:
    server = workdir / "server"
    spec = f"{server}[{','.join(request.extras)}]" if request.extras and request.deps else str(server)
    args = ["install", *([] if request.deps else ["--no-deps"]), "-e", spec]
    log(f"pip {' '.join(args)}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dspark-pip-report-") as scratch:
        report = Path(scratch) / "report.json"  # what pip resolved and installed, as JSON
        run_pip(args, "install", hidden=("--report", str(report)))
        installed = _report_installs(report)
    return {"package": TGI_DISTRIBUTION, "source": str(server), "editable": True, "deps": request.deps,
            "extras": list(request.extras) if request.deps else [], "installed": installed,
            "command": [sys.executable, "-m", "pip", *args], "seconds": round(time.monotonic() - started, 1)}


def run_pip(args: list[str], step: str, hidden: tuple[str, ...] = ()) -> None:
    """pip in this interpreter, its output (and progress bars, on a terminal) on our stderr:
    stdout stays free for --json. `hidden` args are passed but left out of the error line."""
    command = [sys.executable, "-m", "pip", *args]
    try:
        code = subprocess.call([*command, *hidden], stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno())
    except OSError as exc:
        raise StepFailed(step, f"could not run {sys.executable}: {exc}") from None
    if code != 0:
        raise StepFailed(step, f"`{' '.join(command)}` exited {code} (pip's output is above)")


def _report_installs(report: Path) -> list[dict]:
    try:
        doc = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return []
    return [{"name": item["metadata"]["name"], "version": item["metadata"]["version"]}
            for item in doc.get("install", [])]


# -- check ----------------------------------------------------------------------------------------
_CHECK = """
import importlib.metadata as m, json, text_generation_server._dspark as d
print(json.dumps({"series": d.SERIES, "marker": d.__file__, "version": m.version("text-generation-server")}))
"""


def check_installed(workdir: Path) -> dict:
    """A fresh interpreter (ours has stale import caches) imports the marker, away from the tree
    (cwd is on sys.path); it must come from this workspace, not from another TGI on sys.path."""
    python = sys.executable
    out = _run([python, "-c", _CHECK], cwd=tempfile.gettempdir())
    if out.returncode != 0:
        last = (out.stderr.strip() or f"exit {out.returncode}").splitlines()[-1]
        raise StepFailed("check", f"the installed server does not import in {python}: {last}")
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if Path(found["marker"]).resolve() != (workdir / MARKER).resolve():
        raise StepFailed("check", f"{python} imports text_generation_server from {found['marker']}, not from "
                         f"{workdir / 'server'} (another copy is earlier on sys.path, e.g. PYTHONPATH)")
    return found


def record(result: dict) -> None:
    """Leave the install next to the extension's build record, where `dspark status` lists it."""
    from dspark_cli.build import cache_root

    summary = {"status": "installed", "engine": result["engine"], "workdir": result["workdir"],
               "python": result["python"], "package": result["install"]["package"],
               "version": result["check"]["version"], "extension": result["extension"]["status"]}
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_text_atomically(root / f"engine-{result['engine']}.json", json.dumps(summary, indent=2) + "\n")
    except OSError:
        pass  # the install is done; a read-only cache only loses the record


def _run(command: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    except OSError as exc:
        raise EnvironmentProblem(f"could not run {command[0]}: {exc}") from None

