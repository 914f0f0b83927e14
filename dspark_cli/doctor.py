"""`dspark doctor`: one check per line — ok / warn / fail with a fix hint.

Checks are plain functions returning Check records; none raises, so doctor always finishes (a
machine without a GPU gets warnings, not a crash). Only `fail` makes the exit code 1.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from dspark_cli import cache_dir, cuda_env
from dspark_cli.compat import load as load_compat
from dspark_cli.errors import DsparkError
from dspark_cli.files import check_dir_option, nearest_existing
from dspark_cli.series import marker_constants, read_series

OK, WARN, FAIL = "ok", "warn", "fail"
MIN_FREE_GB = 20  # a vLLM tree + wheel cache + build cache


@dataclass
class Check:
    name: str
    status: str
    detail: str
    hint: str | None = None


def check_python() -> Check:
    v = platform.python_version()
    if sys.version_info < (3, 10):
        return Check("python", FAIL, v, "use Python 3.10 or newer")
    return Check("python", OK, f"{v} ({sys.executable})")


def check_git() -> Check:
    git = shutil.which("git")
    if not git:
        return Check("git", FAIL, "not found", "install git (apply, status, revert and rebase need it)")
    out = cuda_env._run([git, "--version"])
    if out and out.returncode != 0:  # git that cannot read its config (a malformed ~/.gitconfig) fails everything
        said = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[0]
        return Check("git", FAIL, f"{git} does not run: {said}", "fix what git says (apply, status, revert and "
                     "rebase need it)")
    version = out.stdout.strip() if out else git
    found = re.search(r"(\d+)\.(\d+)", version)
    if found and (int(found.group(1)), int(found.group(2))) < (2, 31):
        return Check("git", WARN, version, "git 2.31 or newer: older git ignores the settings dspark gives it through "
                     "GIT_CONFIG_COUNT, so your git config can change what apply and rebase write (docs/cli.md)")
    return Check("git", OK, version)


def check_gpu(gpus: cuda_env.Gpus) -> Check:
    driver = f", driver {gpus.driver}" if gpus.driver else ""
    listing = ", ".join(f"{n} (sm {c})" for n, c in zip(gpus.names, gpus.capabilities)) + driver
    if gpus.problem:
        return Check("gpu", WARN, f"{listing}; {gpus.problem}" if gpus.names else gpus.problem, gpus.hint)
    return Check("gpu", OK, listing)


def check_nvcc(nvcc: cuda_env.Nvcc) -> Check:
    broken = cuda_env.ignored_path_nvcc(nvcc.path)
    ignored = f"; {broken[0]}, first on PATH, was ignored: {broken[1]}" if broken else ""
    if nvcc.problem:
        return Check("cuda toolkit", FAIL, nvcc.problem + ignored, nvcc.hint)
    detail = f"nvcc {nvcc.version} ({nvcc.path})"
    if ignored:  # works for dspark, but a shell, a build tool or torch's CUDA_HOME guess takes the broken one
        return Check("cuda toolkit", WARN, detail + ignored,
                     f"repair or remove {broken[0]}, or put {Path(nvcc.path).parent} before it on PATH")
    return Check("cuda toolkit", OK, detail)


def check_torch(torch: cuda_env.TorchInfo, nvcc: cuda_env.Nvcc, home: cuda_env.CudaHome | None = None) -> Check:
    if torch.version is None:
        return Check("torch", WARN, torch.problem, torch.hint)
    if torch.cuda is None:
        return Check("torch", WARN, f"{torch.version}: {torch.problem}", torch.hint)
    detail = f"{torch.version}, built for CUDA {torch.cuda}"
    if nvcc.version:
        if mismatch := cuda_env.major_mismatch(torch, nvcc, home):
            return Check("torch", FAIL, *mismatch)
        if nvcc.version != torch.cuda:
            return Check("torch", WARN, f"{detail}; nvcc is {nvcc.version} (minor versions differ)",
                         "usually fine; match them if the build fails")
        detail += "; matches nvcc"
    return Check("torch", OK, detail)


def check_arch(gpus: cuda_env.Gpus, nvcc: cuda_env.Nvcc) -> Check:
    try:
        archs, source = cuda_env.arch_list(gpus=gpus)
    except ValueError as exc:
        return Check("arch list", FAIL, str(exc), "fix TORCH_CUDA_ARCH_LIST (e.g. 9.0a)")
    if not archs:
        return Check("arch list", WARN, source, "dspark build --arch 9.0a (Hopper) or set TORCH_CUDA_ARCH_LIST")
    if problem := cuda_env.unbuildable_archs(archs, source, nvcc):  # what dspark build refuses, in its words
        return Check("arch list", FAIL, problem, "build only archs this nvcc lists (set TORCH_CUDA_ARCH_LIST or "
                     "pass --arch), or install a CUDA toolkit that builds them")
    return Check("arch list", OK, f"{';'.join(archs)} ({source})")


def check_compiler(nvcc: cuda_env.Nvcc) -> Check:
    # Two compilers build the extension, as torch's cpp_extension runs them: $CXX (else c++ on PATH;
    # no other is tried when $CXX is missing) compiles the .cpp files, and nvcc compiles the .cu
    # files' host code with $CC when set (torch passes `-ccbin $CC`), else with its own default (gcc
    # on PATH). The .cu host compiler is the one nvcc must accept.
    if missing := cuda_env.compiler_problem():
        return Check("c++ compiler", FAIL, *missing)
    cxx = cuda_env.cxx_path()
    detail = f"{cxx} {cuda_env.compiler_version(cxx) or '(version unknown)'}"
    if not nvcc.path or nvcc.version is None:
        why = "no nvcc" if not nvcc.path else "nvcc does not run: see cuda toolkit"
        return Check("c++ compiler", OK, f"{detail}; not checked against nvcc ({why})")
    cc, ccbin = os.environ.get("CC"), os.environ.get("NVCC_CCBIN")
    # without $CC, nvcc takes $NVCC_CCBIN: naming gcc then sent the user after the wrong compiler
    host = f"$CC={cc}" if cc else f"$NVCC_CCBIN={ccbin}" if ccbin else \
        f"its default host compiler ({shutil.which('gcc') or 'gcc, not on PATH'})"
    # Ask nvcc itself: its host_config.h refuses host compilers it does not support, and
    # preprocessing an empty .cu file runs exactly that check (~0.1 s).
    # a blank $NVCC_CCBIN fails nvcc; dspark build drops it (an empty compiler variable counts as unset): so does the probe
    env = {k: v for k, v in os.environ.items() if k != "NVCC_CCBIN" or v}
    probe = cuda_env._run([nvcc.path, *(["-ccbin", cc] if cc else []), "-E", "-x", "cu", os.devnull, "-o", os.devnull],
                          env=env)
    if probe is None or probe.returncode != 0:
        lines = ((probe.stdout + probe.stderr) if probe else "nvcc did not run").strip().splitlines()
        refusal = next((l.split("#error", 1)[1].strip(" -") for l in lines if "#error" in l), None)
        if refusal is not None:  # host_config.h's: this host compiler is not supported
            return Check("c++ compiler", FAIL, f"{detail}; nvcc {nvcc.version} refuses {host}: {refusal[:200]}",
                         "set CC to a host compiler this nvcc supports (torch passes it to nvcc as -ccbin)")
        # anything else is not the host compiler's fault: e.g. a toolkit without its headers
        # (conda's cuda-nvcc without cuda-cudart-dev: "fatal error: cuda_runtime.h: No such file")
        reason = next((l for l in lines if "error" in l), lines[-1] if lines else "unknown error")
        return Check("c++ compiler", FAIL, f"{detail}; nvcc {nvcc.version} cannot compile an empty .cu file with "
                     f"{host}: {reason[:200]}", "this nvcc's toolkit is incomplete (a missing header: install its cudart "
                     "development files) or broken; or point CUDA_HOME at a complete toolkit")
    return Check("c++ compiler", OK, f"{detail}; nvcc {nvcc.version} accepts {host}")


def check_ninja() -> Check:
    ninja, version, problem = cuda_env.ninja_info()
    if problem is None:
        return Check("ninja", OK, f"{version} ({ninja})")
    if ninja:  # found but broken: was ok, while dspark build failed on it
        return Check("ninja", WARN, problem, "reinstall it (pip install --force-reinstall ninja) or put a working "
                     "ninja first on PATH: dspark build needs it, torch builds extensions only with ninja")
    return Check("ninja", WARN, "not found", 'pip install ninja (or pip install ".[build]" in the dspark checkout): '
                 "dspark build needs it, torch builds extensions only with ninja")


def check_cuda_home(home: cuda_env.CudaHome) -> Check:
    if home.path is None:
        return Check("CUDA_HOME", FAIL, home.problem, home.hint)
    detail = f"{home.path} (from {home.source})"
    if home.problem:
        status = FAIL if home.source in ("CUDA_HOME", "CUDA_PATH") else WARN
        return Check("CUDA_HOME", status, f"{detail}: {home.problem}", home.hint)
    return Check("CUDA_HOME", OK, detail)


def check_disk(name: str, path: Path) -> Check:
    """Free space where `path` will live (its nearest existing parent)."""
    free_gb = shutil.disk_usage(nearest_existing(path)).free / 2**30
    detail = f"{free_gb:.1f} GiB free at {path}"
    if free_gb < MIN_FREE_GB:
        return Check(name, WARN, detail, f"a vLLM tree, its release file and builds want about {MIN_FREE_GB} GiB")
    return Check(name, OK, detail)


def check_place(name: str, place, option: str, use: str) -> Check:
    """The disk check at a directory dspark makes or writes in (`place`: it, or a callable giving
    it), once it can: a file in the way, a place it may not write, or one it cannot name (a ~user
    without a home) is what `dspark apply`, `build`, `rebase` would stop on (exit 2 or 3)."""
    try:
        path = place() if callable(place) else place
        check_dir_option(path, option)
    except DsparkError as exc:
        return Check(name, FAIL, str(exc), f"point {option} at a directory you can write (dspark keeps {use} there)")
    return check_disk(name, path)


def patch_marker(module: str) -> dict | None:
    """Literal constants (SERIES, PATCHES, ...) of <module>/_dspark.py; None without the module, {} without
    the marker. Found with find_spec and read with ast: the engine is never imported (vLLM takes seconds).
    Raises ValueError for a marker that is not valid Python or whose SERIES is no string or PATCHES
    no list of names (what our series write)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        marker = Path(location) / "_dspark.py"
        if marker.is_file():
            values = marker_constants(marker)
            patches = values.get("PATCHES")
            if not isinstance(values.get("SERIES"), str) or not (
                    isinstance(patches, list) and all(isinstance(p, str) for p in patches)):
                raise ValueError(f"{marker} has no SERIES string and PATCHES list of patch names")
            return values
    return {}


def installed_distribution(engine) -> tuple[str, str] | None:
    """(distribution, version) of the first of the engine's distributions installed here, or None."""
    for dist in engine.distributions:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def engine_checks(engine, torch: cuda_env.TorchInfo) -> list[Check]:
    """The engine's line (installed here? at which version? with which of our patches, read from
    its marker once), and a torch line when its pin asks for a torch range this torch is outside."""
    name = f"engine {engine.name}"
    installed = installed_distribution(engine)
    if not installed:
        return [Check(name, OK, "not installed in this environment",
                      f"dspark apply {engine.name}, then install the patched tree here to use DSpark")]
    dist, version = installed
    try:
        marker = patch_marker(engine.module)
    except ValueError as exc:
        return [Check(name, WARN, f"{dist} {version}; DSpark marker unreadable: {exc}",
                      f"dspark apply {engine.name} and reinstall the patched tree"),
                *_torch_check(engine, installed, installed_pin(engine, version, None), torch)]
    pin = installed_pin(engine, version, marker)
    return [_patches_check(engine, installed, marker, pin), *_torch_check(engine, installed, pin, torch)]


def _patches_check(engine, installed: tuple[str, str], marker: dict, pin) -> Check:
    name, (dist, version) = f"engine {engine.name}", installed
    if not marker:
        return Check(name, WARN, f"{dist} {version} installed, without DSpark patches",
                     f"dspark apply {engine.name} --commit {pin.name if pin else '<pin>'} and install the patched tree")
    series, patches = marker["SERIES"], marker["PATCHES"]
    detail = f"{dist} {version}, patched with {series} ({len(patches)} patches)"
    if pin is None:
        return Check(name, WARN, f"{detail}; {version} is not pinned in compat.yaml", "dspark compat lists the pins")
    if series != f"{engine.name}/{pin.name}":
        return Check(name, FAIL, f"{detail}, but {version} is pin {pin.name}: the series is for another release",
                     f"dspark apply {engine.name} --commit {pin.name} and reinstall the tree")
    drift = _series_drift(pin, patches)
    if drift:
        return Check(name, WARN, f"{detail}; {drift}",
                     f"dspark apply {engine.name} --commit {pin.name} and reinstall the tree")
    return Check(name, OK, f"{detail}; matches {pin.patches.name}/series")


def _series_drift(pin, installed: list[str]) -> str | None:
    """How the installed patch list differs from the series this checkout would apply now."""
    try:
        current = read_series(pin.series_dir())
    except DsparkError as exc:
        return f"cannot read the current series ({exc})"
    missing = [n for n in current if n not in installed]
    extra = [n for n in installed if n not in current]
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"not in the series now: {', '.join(extra)}"] if extra else [])
        return "older series than this checkout's: " + "; ".join(parts)
    return None


def installed_pin(engine, version: str, marker: dict | None):
    """The pin of an installed engine: the one naming its version, else, for a pin that names no
    release, the one its marker's SERIES (`tgi/v3.3.7`) says was applied: TGI's server package is
    2.0.5.dev0 at every TGI release, so only the series tells which tree it is. None: not pinned."""
    pin = next((p for p in engine.pins.values() if _same_release(version, p)), None)
    series = (marker or {}).get("SERIES")
    return pin or next((p for p in engine.pins.values() if not p.releases and series == f"{engine.name}/{p.name}"), None)


def _same_release(version: str, pin) -> bool:
    """An installed version (maybe with a local tag, 0.32.0+cpu) is the release a pin names."""
    try:
        release = Version(version).release
        return (any(Version(r.version).release == release for r in pin.releases)
                or Version(pin.name.lstrip("v")).release == release)
    except InvalidVersion:
        return False


def _torch_check(engine, installed: tuple[str, str], pin, torch: cuda_env.TorchInfo) -> list[Check]:
    if pin is None or not torch.version:
        return []
    base = re.sub(r"\+.*$", "", torch.version)
    if SpecifierSet(pin.torch).contains(base, prereleases=True):
        return []
    dist, version = installed
    return [Check(f"engine {engine.name} torch", WARN, f"{dist} {version} pins torch{pin.torch}, found {torch.version}",
                  f"pip install 'torch{pin.torch}'")]


def run_checks(workdir: Path | None = None) -> list[Check]:
    home = cuda_env.resolve_cuda_home()
    nvcc = cuda_env.nvcc_info(home)
    torch = cuda_env.torch_info()
    gpus = cuda_env.gpu_info()
    checks = [check_python(), check_git(), check_gpu(gpus), check_nvcc(nvcc), check_torch(torch, nvcc, home),
              check_arch(gpus, nvcc), check_compiler(nvcc), check_ninja(), check_cuda_home(home),
              check_place("disk (workdir)", workdir or Path.cwd(), "--workdir", "the engine trees it patches"),
              check_place("disk (cache)", cache_dir, "DSPARK_CACHE", "release files, kernel builds and rebase trees")]
    try:
        engines = load_compat().engines.values()
    except DsparkError as exc:  # a missing or malformed compat.yaml is one failed check, not a crash
        return checks + [Check("compat.yaml", FAIL, str(exc),
                               "fix the file (dspark compat names the key), or point DSPARK_COMPAT at a valid one")]
    for engine in engines:
        checks += engine_checks(engine, torch)
    return checks
