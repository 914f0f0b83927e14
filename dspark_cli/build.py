"""Build and load our CUDA extension (csrc/) with torch.utils.cpp_extension and ninja.

Builds go to $DSPARK_CACHE/build/<key> (DSPARK_CACHE defaults to ~/.cache/dspark), keyed by torch
version, CUDA version, arch list, a hash of csrc/ and the compiler flags (build_flags()), so an
unchanged rebuild only finds the .so.
No typer/rich here: the GPU machine builds through `python -c` with PYTHONPATH=. alone.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import signal
import sys
import sysconfig
import tempfile
import threading
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from dspark_cli import __version__, cache_dir, cache_subdir, cuda_env
from dspark_cli.errors import PATH_SHAPE_ERRORS, EnvironmentProblem, UsageError
from dspark_cli.files import check_dir_option, replace_atomically, write_text_atomically
from dspark_cli.flock import exclusive_nowait, wait_exclusive
from dspark_cli.series import sha256_of
from dspark_cli.workspace import PROGRESS, proc_stat

CSRC = Path(__file__).resolve().parent / "csrc"  # a link to the checkout's csrc/; an installed package holds a copy
LIB_NAME = "dspark_ops"
SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")
CFLAGS = ["-O3"]
CUDA_CFLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
# They change the binary too. Read by torch.utils.cpp_extension (2.14): CXX (the .cpp compiler), CC
# (passed to nvcc as -ccbin: the .cu host compiler), PYTORCH_NVCC (run instead of $CUDA_HOME/bin/nvcc),
# CUDA_INC_PATH (one more include directory); by nvcc itself: NVCC_PREPEND_FLAGS, NVCC_APPEND_FLAGS,
# NVCC_CCBIN (the .cu host compiler when torch passes no -ccbin, i.e. CC unset; an empty one fails nvcc).
FLAG_ENV = ("CXX", "CC", "PYTORCH_NVCC", "CUDA_INC_PATH", "NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_CCBIN")


def cache_root() -> Path:
    return cache_dir() / "build"


def source_files() -> list[Path]:
    files = sorted(p for p in CSRC.iterdir() if p.suffix in SOURCE_SUFFIXES)
    if not files:
        raise EnvironmentProblem(f"no CUDA sources in {CSRC} (a damaged install? reinstall dspark)")
    return files


def source_hash() -> str:
    h = hashlib.sha256()
    for p in source_files():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_flags() -> dict:
    """What goes to the compilers besides the sources and the arch list: part of the cache key. The
    library name is the -DTORCH_EXTENSION_NAME define; FLAG_ENV variables count only when set."""
    return {"name": LIB_NAME, "cflags": CFLAGS, "cuda_cflags": CUDA_CFLAGS,
            "env": {k: os.environ[k] for k in FLAG_ENV if os.environ.get(k)}}


@dataclass
class BuildPlan:
    torch_version: str
    torch_cuda: str
    nvcc_version: str
    cuda_home: str
    archs: list[str]
    arch_source: str
    key: str

    @property
    def directory(self) -> Path:
        return cache_root() / self.key

    @property
    def library(self) -> Path:
        return self.directory / f"{LIB_NAME}.so"


def plan(arch: str | None = None) -> BuildPlan:
    """Check the toolchain and work out where the build goes; one clear line on any problem. A bad
    --arch (or TORCH_CUDA_ARCH_LIST) is a usage error, found before anything else."""
    try:
        archs, arch_source = cuda_env.arch_list(arch)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    torch = cuda_env.torch_info()
    if torch.problem:
        raise EnvironmentProblem(f"{torch.problem}; {torch.hint}")
    home = cuda_env.resolve_cuda_home()
    # a prefix found without the variables has at most torch's wrong guess against it: we pass ours
    if home.path is None or (home.problem and home.source in ("CUDA_HOME", "CUDA_PATH")):
        raise EnvironmentProblem(f"CUDA_HOME: {home.problem}; {home.hint}")
    nvcc = cuda_env.nvcc_info(home)
    if nvcc.problem:
        raise EnvironmentProblem(f"{nvcc.problem}; {nvcc.hint}")
    if mismatch := cuda_env.major_mismatch(torch, nvcc, home):
        raise EnvironmentProblem(": ".join(mismatch))
    if not archs:
        raise EnvironmentProblem(f"no CUDA arch to build for: {arch_source}")
    if missing := cuda_env.compiler_problem():
        raise EnvironmentProblem("; ".join(missing))
    # resolved: /usr/local/cuda, a link to /usr/local/cuda-13.0, is the same toolkit and the same build
    toolchain = {"nvcc": nvcc.release, "cuda_home": str(home.path.resolve()), **cuda_env.host_compilers()}
    raw = json.dumps([torch.version, nvcc.version, archs, source_hash(), build_flags(), toolchain], sort_keys=True)
    key = f"torch{torch.version}-cu{nvcc.version}-{'_'.join(archs)}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"
    planned = BuildPlan(torch.version, torch.cuda, nvcc.version, str(home.path), archs, arch_source, key)
    if not planned.library.exists():  # (one there was built by this exact nvcc for these archs: the key says so)
        _check_nvcc_builds(archs, arch_source, nvcc)
    return planned


def _check_nvcc_builds(archs: list[str], arch_source: str, nvcc: cuda_env.Nvcc) -> None:
    """An arch the installed nvcc cannot compile for fails after seconds of ninja: one line first."""
    if problem := cuda_env.unbuildable_archs(archs, arch_source, nvcc):
        raise (UsageError if arch_source in ("--arch", "TORCH_CUDA_ARCH_LIST") else EnvironmentProblem)(problem)


@dataclass
class BuildResult:
    status: str          # "built" | "cached" | "failed" | "interrupted" (the last two recorded, then raised)
    path: str
    key: str
    seconds: float
    archs: list[str]
    torch: str           # torch.__version__ it was built against: the runtime loads it under that torch only


def build(arch: str | None = None, jobs: int | None = None, force: bool = False, verbose: bool = False,
          planned: BuildPlan | None = None) -> BuildResult:
    """Compile csrc/ into the cache (or find it there) and record it in last.json. A cached library
    counts only if library_problem() finds nothing wrong with it; --force (or a bad cached library)
    builds from a clean directory, so ninja cannot call stale objects up to date: the old one is set
    aside (`<key>.previous`) and comes back if the build fails, the failed one kept as `<key>.failed`
    for its log — last.json may point at the old library, which the runtime keeps loading; a build
    killed before that puts the old library back first. A failed build is recorded in
    last-failed.json. Builds of one key run one at a time (a second waits, then finds the first's
    library). A key directory without library.json (a failed or killed build's) is never resumed:
    see _discard. `planned`: plan(arch) when the caller made it already (it runs nvcc and the host compilers, and hashes
    csrc/)."""
    started = time.monotonic()
    p = planned or plan(arch)
    if not force and (hit := _cache_hit(p, started)):  # the fast path takes no lock
        return _done(hit)
    ninja, _, problem = cuda_env.ninja_info()  # torch would say so only after the key's directory is made
    if not ninja:
        raise EnvironmentProblem('ninja not found on PATH: pip install ninja (or pip install ".[build]" in the dspark '
                                 "checkout); torch builds extensions only with ninja")
    if problem:  # torch's own line would be "Ninja is required ... (pip install ninja)", for one on PATH
        raise EnvironmentProblem(f"{problem}; reinstall it (pip install --force-reinstall ninja) or put a working "
                                 "ninja first on PATH")
    cache_subdir("build")  # an unusable DSPARK_CACHE is one line here, not an OSError
    with _key_lock(p):
        return _done(_build_locked(p, started, force, jobs, verbose))


def _done(result: BuildResult) -> BuildResult:
    """What the CLI's interrupted line says of a Ctrl-C after this (a --self-test, an --engine install)."""
    PROGRESS.update(stage=f"the build had finished: {result.path} is recorded in last.json")
    return result


def _cache_hit(p: BuildPlan, started: float) -> BuildResult | None:
    """The key's library, recorded as a cache hit, when its build finished and it is sound."""
    if _finished_problem(p.library) is not None:  # missing too
        return None
    return _record(BuildResult("cached", str(p.library), p.key, time.monotonic() - started, p.archs, p.torch_version))


@contextlib.contextmanager
def _key_lock(p: BuildPlan):
    """One build of a key at a time (CI jobs sharing a cache, a second `dspark build`): ninja runs
    in the key's directory and the set-aside renames move it, so a second build waits for the
    first and then finds its library."""
    path = p.directory.with_name(p.directory.name + ".lock")
    with contextlib.ExitStack() as stack:
        try:
            fd, ours = stack.enter_context(exclusive_nowait(path))
        except OSError as exc:
            raise EnvironmentProblem(f"cannot create the build lock {path}: {exc}") from None
        if not ours:
            print(f"waiting for another dspark build of {p.key} to finish", file=sys.stderr, flush=True)
            wait_exclusive(fd)
        yield


def _build_locked(p: BuildPlan, started: float, force: bool, jobs: int | None, verbose: bool) -> BuildResult:
    aside = p.directory.with_name(p.directory.name + ".previous")
    failed_dir = p.directory.with_name(p.directory.name + ".failed")
    _restore_set_aside(p, aside, failed_dir)
    if not force and (hit := _cache_hit(p, started)):  # built while we waited
        return hit
    set_aside = (p.directory / LIBRARY_RECORD).is_file()  # a finished build: --force, or its library damaged since
    if set_aside and not force:  # not a silent rebuild of minutes
        print(f"rebuilding {p.key}: its cached library is unusable ({_finished_problem(p.library)})", file=sys.stderr,
              flush=True)
    try:
        for old in (aside, failed_dir, *p.directory.parent.glob(p.key + STALE + "*")):
            shutil.rmtree(old, ignore_errors=True)
        if set_aside:
            p.directory.rename(aside)
        elif p.directory.exists():
            _discard(p.directory)
        p.directory.mkdir()
    except OSError as exc:
        raise EnvironmentProblem(f"cannot clear the build directory {p.directory}: {exc}") from None
    env = {"CUDA_HOME": p.cuda_home, "TORCH_CUDA_ARCH_LIST": ";".join(p.archs)}
    if jobs:
        env["MAX_JOBS"] = str(jobs)
    # a compiler variable set but empty counts as unset (our checks and the cache key read it so);
    # torch would pass it on ("-ccbin  -D...", an empty nvcc path)
    blank = [k for k in FLAG_ENV if k in os.environ and not os.environ[k]]
    saved = {k: os.environ.get(k) for k in [*env, *blank]}
    os.environ.update(env)  # torch.utils.cpp_extension reads these from the environment
    for k in blank:
        del os.environ[k]
    try:
        _compile(p, verbose)
        problem = library_problem(p.library)  # a fresh directory has no record yet: nothing hashed twice
        if problem:
            raise RuntimeError(f"the build left no usable library: {problem}")
        write_text_atomically(p.directory / LIBRARY_RECORD, json.dumps(
            {"size": p.library.stat().st_size, "sha256": sha256_of(p.library)}) + "\n")
    except BaseException as exc:  # Ctrl-C too: the old library must come back
        logged = isinstance(exc, Exception) and _write_log(p.directory / BUILD_LOG, exc)
        where = p.directory
        if set_aside:  # the old build back where last.json may point; the failed one kept beside it
            shutil.rmtree(failed_dir, ignore_errors=True)
            where = p.directory.rename(failed_dir)
            aside.rename(p.directory)
        status = "failed" if isinstance(exc, Exception) else "interrupted"
        _record(BuildResult(status, str(where), p.key, time.monotonic() - started, p.archs, p.torch_version))
        if status == "interrupted":  # what the CLI's interrupted line says (cli._after_interrupt)
            PROGRESS.update(stage=f"the previous library is back in {p.directory}" if set_aside and force
                            else "nothing usable was cached: the next build starts over")
            raise
        # ninja's output runs to pages: one line here, all of it in the log
        if verbose:  # torch let ninja write to our stdout: the output is above, the log holds torch's line only
            log = " (ninja's output is above)"
        else:
            log = f"; the whole output is in {where / BUILD_LOG}" if logged else " (rerun with --verbose)"
        raise EnvironmentProblem(f"build failed in {where}: {first_error(str(exc)) or type(exc).__name__}{log}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    shutil.rmtree(aside, ignore_errors=True)
    return _record(BuildResult("built", str(p.library), p.key, time.monotonic() - started, p.archs, p.torch_version))


STALE = ".stale-"  # <key>.stale-XXXX: a discarded unfinished build directory (see _discard)


def _discard(directory: Path) -> None:
    """Move an unfinished build's directory (a failed build's, or a killed one's) out of the way and
    delete it; the next build starts in a fresh one. A build killed outright (SIGKILL) leaves its
    ninja and the compilers ninja started in process groups of their own running; they write
    relative to their working directory, which moves with the rename: resuming there, ninja would
    take their half-written objects, and their link could overwrite the library after we recorded
    it. A unique name, as one still being written to may not go at once (removed at a later build)."""
    stale = tempfile.mkdtemp(prefix=directory.name + STALE, dir=directory.parent)
    directory.rename(stale)  # onto the empty directory mkdtemp made: one atomic step
    shutil.rmtree(stale, ignore_errors=True)


def _restore_set_aside(p: BuildPlan, aside: Path, failed_dir: Path) -> None:
    """A rebuild killed outright (SIGKILL, the machine going down) leaves the good library set aside
    in `<key>.previous` and `<key>`, where last.json points, without one: put it back before anything
    else, so it is found (a cache hit) and not deleted as a stale set-aside copy. The killed build's
    directory becomes `<key>.failed`."""
    if not aside.is_dir() or _finished_problem(p.library) is None or _finished_problem(aside / p.library.name) is not None:
        return
    try:
        if p.directory.exists():
            shutil.rmtree(failed_dir, ignore_errors=True)
            p.directory.rename(failed_dir)
        aside.rename(p.directory)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot move the library set aside in {aside} back to {p.directory}: {exc}") from None


LIBRARY_RECORD = "library.json"  # next to the .so: its size and sha256 as the build wrote it
BUILD_LOG = "build.log"  # in a failed build's directory: the error torch raised, ninja's whole output


def _write_log(path: Path, exc: Exception) -> bool:
    try:
        path.write_text(f"{type(exc).__name__}: {exc}\n")
    except OSError:  # a full disk: the one-line message still says what failed
        return False
    return True


def first_error(output: str) -> str | None:
    """The line of ninja's output that says what went wrong: the first compiler or linker
    diagnostic (error, fatal error), else ninja's first `FAILED:` line, else the last line. The
    commands ninja echoes (`[k/N] cmd`, and the one after `FAILED:`) are skipped: their flags are no
    diagnostic; so is torch's "Error building extension" prefix, which holds ninja's first line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    commands = {i + 1 for i, line in enumerate(lines) if line.startswith("FAILED:")}
    found = next((line for i, line in enumerate(lines)
                  if i not in commands and not line.startswith(("FAILED:", "Error building extension"))
                  and not re.match(r"\[\d+/\d+\] ", line) and re.search(r"\b(error|fatal)\b", line, re.I)), None)
    found = found or next((line for line in lines if line.startswith("FAILED:")), None) or (lines[-1] if lines else None)
    return found[:300] if found else None


def _compile(p: BuildPlan, verbose: bool) -> None:
    """nvcc and ninja through torch.utils.cpp_extension, into p.directory (a test replaces this).

    Not through the public ext.load: it loads the library into this process (torch.ops.load_library;
    only is_standalone=True, which links an executable, skips that), and it counts the builds of one
    name per process (JIT_EXTENSION_VERSIONER), so a second build here (another arch list: another
    key) became dspark_ops_v1.so and p.library was never written. The helper load() runs to build,
    _write_ninja_file_and_build_library (same keywords in torch 2.13 and 2.14), writes build.ninja
    and runs ninja, nothing else: no versioning, no loading. Whoever uses the library loads it
    (cuda_ops.load)."""
    ext = cpp_extension()
    ext.CUDA_HOME = p.cuda_home  # torch resolved its own guess at import; ours is checked
    includes, cublas = _cuda_library_paths(Path(p.cuda_home))
    stopping_children(lambda: ext._write_ninja_file_and_build_library(
        name=LIB_NAME, sources=[str(f) for f in source_files() if f.suffix in (".cpp", ".cu")],
        extra_cflags=list(CFLAGS), extra_cuda_cflags=list(CUDA_CFLAGS), extra_sycl_cflags=[],
        extra_ldflags=[cublas], extra_include_paths=includes, build_directory=str(p.directory),
        verbose=verbose, with_cuda=None, with_sycl=False))


def cpp_extension():
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found, using CUDA_HOME=..."
    warning: building on a machine without a GPU (CI) is normal here, and the CUDA_HOME it names is
    torch's guess, which _compile replaces with the one plan() checked."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as ext
    finally:
        logger.setLevel(level)
    return ext


def stopping_children(run) -> None:
    """run(), where a SIGINT or SIGTERM stops our child processes before we stop: KeyboardInterrupt
    once they have exited. torch runs ninja with subprocess.run, which SIGKILLs ninja on
    KeyboardInterrupt (and SIGTERM kills us alone), so the compilers ninja starts in process groups
    of their own would run on as orphans. ninja, sent SIGTERM instead, stops them and exits; a
    second signal stops waiting for it."""
    if threading.current_thread() is not threading.main_thread():  # handlers go on the main thread only
        run()
        return
    caught = []

    def stop_children(signum, frame):
        children = _child_pids()
        if caught or not children:
            raise KeyboardInterrupt
        caught.append(signum)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    previous = {s: signal.signal(s, stop_children) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run()
    except Exception:
        if not caught:
            raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:  # ninja stopped: torch's "error building" is the interruption
        raise KeyboardInterrupt


def _child_pids() -> list[int]:
    """This process's children, from /proc (none found elsewhere)."""
    me = str(os.getpid())
    pids = [int(entry.name) for entry in Path("/proc").glob("[0-9]*")]
    return [pid for pid in pids if (fields := proc_stat(pid)) and fields[1] == me]


def library_problem(path: Path, check_sha256: bool = True) -> str | None:
    """Why this built library cannot be used (None: it can): missing, empty, not ELF, or not the size
    and sha256 the build recorded next to it (a truncated or overwritten file). Loading needs only
    the size and header (what keeps a truncated file from crashing dlopen): check_sha256=False
    spares every process that loads the ops a hash of the whole library."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if not size:
        return "empty file"
    if head != b"\x7fELF":
        return "not an ELF shared library"
    if not _elf_complete(path, size):
        return f"truncated ({size} bytes: its section table lies beyond the end)"
    try:
        record = json.loads((path.parent / LIBRARY_RECORD).read_text())
    except (OSError, ValueError, RecursionError):
        return None  # a build from before these records: the header is all there is to check
    if not isinstance(record, dict):
        return None
    if record.get("size") != size:
        return f"{size} bytes, the build wrote {record.get('size')}"
    if check_sha256 and record.get("sha256") != sha256_of(path):
        return "its sha256 differs from the one the build wrote"
    return None


def _finished_problem(path: Path) -> str | None:
    """library_problem() for a library in the build cache, which must have its record: a library
    without one is no finished build of ours (a killed build's ninja, still running, may have linked
    it, or be linking it)."""
    if not (path.parent / LIBRARY_RECORD).is_file():
        return f"no {LIBRARY_RECORD} beside it: its build did not finish"
    return library_problem(path)


def _elf_complete(path: Path, size: int) -> bool:
    """Whether a 64-bit little-endian ELF file holds its section header table, which linkers put
    at the end: a truncated library (a killed link or copy) does not, and dlopen of it can SIGBUS."""
    try:
        with path.open("rb") as handle:
            header = handle.read(64)
    except OSError:
        return False
    if len(header) < 64:
        return False
    if header[4] != 2 or header[5] != 1:  # not ELFCLASS64 little-endian, not what we build: no check
        return True
    shoff = int.from_bytes(header[0x28:0x30], "little")
    shentsize, shnum = int.from_bytes(header[0x3A:0x3C], "little"), int.from_bytes(header[0x3C:0x3E], "little")
    return shoff + shentsize * shnum <= size


def _cuda_library_paths(cuda_home: Path) -> tuple[list[str], str]:
    """(extra include dirs, libcublas to link). A bare toolkit (nvcc + cudart, as in CI) has no
    cublas_v2.h or cusparse.h, which torch's CUDA headers need: take them from the CUDA libraries
    torch's wheel brings (site-packages/nvidia/cu13/...). At run time the soname resolves to the
    libcublas torch has already loaded."""
    import torch

    nvidia = Path(torch.__file__).resolve().parent.parent / "nvidia"
    includes = [] if (cuda_home / "include" / "cublas_v2.h").is_file() else \
        sorted(str(d) for d in nvidia.glob("*/include") if (d / "cublas_v2.h").is_file())
    lib = cuda_home / cuda_env.link_dir(cuda_home)
    candidates = [lib / "libcublas.so", *sorted(nvidia.glob("*/lib/libcublas.so*"))]
    cublas = next((c for c in candidates if c.is_file()), None)
    if cublas is None:
        raise EnvironmentProblem(f"libcublas not found under {lib} or {nvidia}: install the CUDA toolkit's cuBLAS")
    return includes, str(cublas)


LAST = "last.json"            # the last good build ("built" or "cached"): what the runtime loads
LAST_FAILED = "last-failed.json"  # the last failed build, kept apart so a good build stays loadable


def _record(result: BuildResult) -> BuildResult:
    """Record the build; a cache that cannot take the record (a directory in its place, say) is the
    environment's problem (exit 3), not a path the user named (the CLI's exit 2 for such shapes)."""
    root = cache_subdir("build")
    text = json.dumps(asdict(result), indent=2) + "\n"
    name = LAST_FAILED if result.status in ("failed", "interrupted") else LAST
    try:
        write_text_atomically(root / name, text)
        if name == LAST:
            (root / LAST_FAILED).unlink(missing_ok=True)
    except OSError as exc:
        if result.status == "cached" and (last_build() or {}).get("path") == result.path:
            return result  # it names this library already: a read-only shared cache serves as it is
        fix = "point DSPARK_CACHE at a directory dspark may write"
        if exc.errno in (errno.EISDIR, errno.ENOTDIR):  # something in the record's way
            fix = "remove it, or point DSPARK_CACHE at another directory"
        elif result.status == "cached":  # a read-only cache whose record names another build
            fix += " (a writable copy of this one: its library is then a cache hit)"
        raise EnvironmentProblem(f"cannot record the build in {exc.filename or root / name} ({exc.strerror}); "
                                 f"{fix}") from None
    return result


def last_build() -> dict | None:
    """The last good build `dspark build` recorded (status, path, key), for the runtime's loader;
    None if there is none or the record is not an object."""
    return read_record(LAST)


def read_record(name: str) -> dict | None:
    """A build record (LAST, or LAST_FAILED: a failed build since the last good one) as an object,
    None if there is none."""
    try:
        record = json.loads((cache_root() / name).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


WHEEL_PACKAGE = "dspark_ops"

_WHEEL_INIT = '''"""Prebuilt dspark CUDA ops, from `dspark build --wheel`. load() registers torch.ops.dspark.*;
dspark_cli.runtime.cuda_ops finds this package when there is no local build."""

from pathlib import Path

LIBRARY = Path(__file__).with_name("dspark_ops.so")
BUILD = {build!r}


def load() -> str:
    import torch

    torch.ops.load_library(str(LIBRARY))
    return str(LIBRARY)
'''


def wheel_torch_pin() -> str:
    """The installed torch distribution's version, which a wheel of our library pins."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise EnvironmentProblem("torch has no installed distribution (no metadata): a wheel pinned to it "
                                 "could never be installed; build without --wheel") from None


def check_wheel_dir(out_dir: str | Path, create: bool = False) -> Path:
    """--wheel must name a directory that exists or can be made, and that this user can write. A
    file in the way is a usage error (2); no permission is an environment problem (3). Checked
    before a build without making anything (a refused build leaves no directory behind); made
    with `create`, when there is a wheel to write."""
    if not str(out_dir).strip():
        raise UsageError("--wheel needs a directory (it was empty)")
    out = Path(out_dir)
    check_dir_option(out, "--wheel")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EnvironmentProblem(f"--wheel {out}: cannot create it: {exc.strerror or exc}") from None
    return out


def write_wheel(result: BuildResult, out_dir: str | Path) -> Path:
    """A wheel holding the built library (package dspark_ops), pinned to the exact torch it was
    built against: the .so uses torch's C++ ABI, not Python's, hence the py3-none tag. The pin is the
    installed distribution's version (2.14.1), not torch.__version__ (2.14.1+cu130): a local label
    in `==` must match the installed version's exactly (PEP 440), and pip sees no label there."""
    info, pin = cuda_env.torch_info(), wheel_torch_pin()
    p = {"torch": info.version, "cuda": info.cuda}
    archs = ".".join("sm" + a.replace(".", "") for a in result.archs)
    local = re.sub(r"[^0-9a-zA-Z]+", ".", f"torch{p['torch']}.{archs}.{result.key[-12:]}")
    version = f"{__version__}+{local.strip('.').lower()}"
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    tag = f"py3-none-{platform}"
    dist_info = f"{WHEEL_PACKAGE}-{version}.dist-info"
    files = {
        f"{WHEEL_PACKAGE}/__init__.py": _WHEEL_INIT.format(build={**p, "key": result.key, "archs": result.archs}).encode(),
        f"{WHEEL_PACKAGE}/dspark_ops.so": Path(result.path).read_bytes(),
        f"{dist_info}/METADATA": (f"Metadata-Version: 2.1\nName: {WHEEL_PACKAGE}\nVersion: {version}\n"
                                  f"Summary: dspark CUDA ops built for {', '.join(result.archs)}\n"
                                  f"Requires-Dist: torch=={pin}\n").encode(),
        f"{dist_info}/WHEEL": (f"Wheel-Version: 1.0\nGenerator: dspark {__version__}\nRoot-Is-Purelib: false\n"
                               f"Tag: {tag}\n").encode(),
    }
    record = [f"{name},sha256={_b64_digest(data)},{len(data)}" for name, data in files.items()]
    files[f"{dist_info}/RECORD"] = ("\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n").encode()
    out = check_wheel_dir(out_dir, create=True)
    wheel = out / f"{WHEEL_PACKAGE}-{version}-{tag}.whl"

    def save(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)

    try:
        replace_atomically([(wheel, save)])  # a full disk leaves no truncated wheel for pip to choke on
    except OSError as exc:  # a directory there or a name too long: the --wheel path given (the library stays cached)
        problem = UsageError if exc.errno in PATH_SHAPE_ERRORS else EnvironmentProblem
        raise problem(f"cannot write the wheel {wheel}: {exc.strerror or exc}") from None
    return wheel


def _b64_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
