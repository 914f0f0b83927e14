"""What CUDA toolchain, torch and GPU this machine has — shared by `dspark build` and `dspark doctor`.

Every probe returns a small dataclass carrying a `problem` and a fix `hint` instead of raising, so
doctor can print one line per check and build can refuse with one clear line.

CUDA_HOME is the subtle one: torch guesses it as the parent of the directory holding `nvcc`, and
when `nvcc` on PATH is a wrapper (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc)
that guess is /usr/local, which has no libcudart: extension links then fail late and obscurely.
We ask nvcc itself where its toolkit is (`nvcc -dryrun` prints TOP=...) and check the prefix.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from dspark_cli.errors import short_message


@dataclass
class CudaHome:
    path: Path | None
    source: str                      # where the answer came from: CUDA_HOME, CUDA_PATH, nvcc, default
    torch_guess: str | None = None   # what torch.utils.cpp_extension would use
    problem: str | None = None
    hint: str | None = None


@dataclass
class Nvcc:
    path: str | None
    version: str | None              # "13.0"
    problem: str | None = None
    hint: str | None = None
    release: str = ""                # "release 13.0, V13.0.88": the exact compiler, for the build's cache key


@dataclass
class TorchInfo:
    version: str | None              # "2.14.1+cu130"
    cuda: str | None                 # torch.version.cuda, None for a CPU build
    problem: str | None = None
    hint: str | None = None


@dataclass
class Gpus:
    names: list[str] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)   # "9.0"
    driver: str | None = None
    unread: list[str] = field(default_factory=list)  # nvidia-smi lines or capabilities we could not read
    problem: str | None = None
    hint: str | None = None


def _run(cmd: list[str], timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess | None:
    # errors="replace": a tool's output that is not valid UTF-8 (a broken nvcc, a path or message in
    # another encoding) raised UnicodeDecodeError, a traceback from doctor and build
    try:
        return subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _is_file(path: Path) -> bool:
    """Path.is_file, False where the path cannot be looked at: under a directory we may not search
    (another user's ~/.local/bin on PATH, as a CI image's USER inherits it) or a name too long.
    is_file raised there, and doctor stopped with that one line instead of its report."""
    try:
        return path.is_file()
    except OSError:
        return False


def prefix_problem(prefix: Path) -> str | None:
    """Why `prefix` cannot serve as CUDA_HOME for building extensions, or None if it can."""
    try:
        return _prefix_problem(prefix)
    except OSError as exc:  # a prefix we may not search (see _is_file)
        return f"{prefix} cannot be read ({exc.strerror or exc})"


def _prefix_problem(prefix: Path) -> str | None:
    if not (prefix / "bin" / "nvcc").is_file():
        return f"{prefix} has no bin/nvcc"
    # where torch's cpp_extension looks (-L link_dir; -I include): a toolkit with these only under
    # targets/<arch>/ (and no links to them) passes nvcc's own checks but fails the link
    lib = link_dir(prefix)
    if not (prefix / lib / "libcudart.so").exists():
        also = " (lib/ has it, but torch links from lib64/ while that exists)" \
            if lib == "lib64" and (prefix / "lib" / "libcudart.so").exists() else ""
        return f"{prefix} has no {lib}/libcudart.so{also} (extension links would fail)"
    if not (prefix / "include" / "cuda_runtime.h").exists():
        return f"{prefix} has no include/cuda_runtime.h"
    return None


def link_dir(prefix: Path) -> str:
    """The directory under a CUDA prefix torch's cpp_extension links from (-L): lib64, or lib when
    there is no lib64 but a lib."""
    return "lib" if not (prefix / "lib64").exists() and (prefix / "lib").exists() else "lib64"


def _nvcc_toolkit_root(nvcc: str) -> Path | None:
    """The toolkit nvcc really belongs to, as nvcc itself reports it (follows wrapper scripts)."""
    out = _run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull])
    if out is None:
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    return Path(m.group(1).strip()).resolve() if m else None


def torch_cuda_home_guess() -> str | None:
    """torch's own guess, reproduced without importing torch: env vars, then `which nvcc`/../.."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).parent.parent)
    return "/usr/local/cuda" if Path("/usr/local/cuda").exists() else None


def resolve_cuda_home() -> CudaHome:
    guess = torch_cuda_home_guess()
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            problem = prefix_problem(Path(value))
            hint = None
            if problem:
                real = _from_nvcc()
                hint = f"export {var}={real}" if real else f"point {var} at a CUDA toolkit"
            # absolute: ninja runs the compiler from the build directory
            return CudaHome(Path(value).absolute(), var, guess, problem, hint)
    real = _from_nvcc()
    if real:
        return _unless_torch_guesses_wrong(CudaHome(real, "nvcc", guess))
    default = Path("/usr/local/cuda")
    if default.exists() and not prefix_problem(default):
        return _unless_torch_guesses_wrong(CudaHome(default, "default", guess))
    return CudaHome(None, "none", guess, "no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset)",
                    "install the CUDA toolkit matching torch's CUDA version and set CUDA_HOME")


def _unless_torch_guesses_wrong(home: CudaHome) -> CudaHome:
    """torch would pick another prefix that cannot build (a broken nvcc first on PATH, say): we pass
    ours explicitly when building, but anything else using torch's cpp_extension needs the variable."""
    guess = home.torch_guess
    if guess and Path(guess).resolve() != home.path.resolve() and (guess_problem := prefix_problem(Path(guess))):
        home.problem = f"torch would guess CUDA_HOME={guess}, but {guess_problem}"
        home.hint = f"export CUDA_HOME={home.path}"
    return home


def _from_nvcc() -> Path | None:
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    root = _nvcc_toolkit_root(nvcc)
    return root if root and not prefix_problem(root) else None


def nvcc_info(home: CudaHome | None = None) -> Nvcc:
    home = home or resolve_cuda_home()
    nvcc = str(home.path / "bin" / "nvcc") if home.path and _is_file(home.path / "bin" / "nvcc") \
        else shutil.which("nvcc")
    if not nvcc:
        return Nvcc(None, None, "nvcc not found", "install the CUDA toolkit (nvcc) and put its bin/ on PATH")
    out = _run([nvcc, "--version"])
    m = re.search(r"release (\d+\.\d+).*", out.stdout if out else "")
    if not m:
        said = ((out.stderr or out.stdout).strip().splitlines() or [""])[-1][:200] if out else "it did not run"
        return Nvcc(nvcc, None, f"{nvcc} --version did not report a release" + (f" ({said})" if said else ""),
                    "check the CUDA toolkit install")
    return Nvcc(nvcc, m.group(1), release=m.group(0))


def toolkit_for(cuda: str, other_than: Path | None) -> Path | None:
    """A complete toolkit here, other than `other_than`, whose nvcc is CUDA `cuda`'s major version:
    the one nvcc on PATH belongs to, else /usr/local/cuda. The fix to name when CUDA_HOME points at
    a toolkit of another CUDA than torch's ("install the CUDA 13 toolkit" sent users after one they had)."""
    for prefix in (_from_nvcc(), Path("/usr/local/cuda")):
        if prefix is None or prefix_problem(prefix) or (other_than and prefix.resolve() == other_than.resolve()):
            continue
        if major(nvcc_info(CudaHome(prefix, "nvcc")).version) == major(cuda):
            return prefix
    return None


def major_mismatch(torch: TorchInfo, nvcc: Nvcc, home: CudaHome | None) -> tuple[str, str] | None:
    """(problem, fix) when nvcc is of another CUDA major version than torch was built for (the
    extension would not load), else None. When CUDA_HOME/CUDA_PATH chose that nvcc and a toolkit of
    torch's major is here too, the fix names it. What `dspark build` refuses and doctor fails."""
    if major(nvcc.version) == major(torch.cuda):
        return None
    want = major(torch.cuda)
    if home and home.source in ("CUDA_HOME", "CUDA_PATH") and (fix := toolkit_for(torch.cuda, home.path)):
        return (f"{home.source}={home.path} is CUDA {nvcc.version} but torch {torch.version} was built for "
                f"CUDA {torch.cuda}", f"export {home.source}={fix} (a CUDA {want}.x toolkit here)")
    return (f"nvcc is CUDA {nvcc.version} but torch {torch.version} was built for CUDA {torch.cuda}",
            f"install a CUDA {want}.x toolkit (torch's is {torch.cuda}) or a torch built for CUDA {nvcc.version}")


def nvcc_archs(nvcc: Nvcc) -> set[str] | None:
    """The archs this nvcc compiles for, as parse_arch writes them without a suffix ("7.5", "9.0",
    "10.0", ...; `nvcc --list-gpu-arch`), None when it cannot say (an older nvcc without the option)."""
    out = _run([nvcc.path, "--list-gpu-arch"]) if nvcc.path else None
    found = re.findall(r"compute_(\d+)(\d)\b", out.stdout) if out and out.returncode == 0 else []
    return {f"{major}.{minor}" for major, minor in found} or None


def unbuildable_archs(archs: list[str], arch_source: str, nvcc: Nvcc) -> str | None:
    """Why this nvcc cannot build these archs (one line naming what it builds), or None; None too
    when it cannot say (nvcc_archs). What `dspark build` refuses before compiling and doctor fails."""
    buildable = nvcc_archs(nvcc)
    unknown = [a for a in archs if buildable and a.removesuffix("+PTX").rstrip("a") not in buildable]
    if not unknown:
        return None
    listed = ", ".join(sorted(buildable, key=lambda a: tuple(map(int, a.split(".")))))
    return f"{arch_source}: nvcc {nvcc.version} does not build for {', '.join(unknown)} (it builds {listed})"


def cxx_path() -> str | None:
    """The C++ compiler torch's cpp_extension runs for the .cpp files: $CXX, else c++ on PATH (no
    other is tried)."""
    return shutil.which(os.environ.get("CXX") or "c++")


def compiler_version(path: str) -> str | None:
    out = _run([path, "-dumpfullversion", "-dumpversion"])
    return out.stdout.strip() if out and out.returncode == 0 else None


def compiler_problem() -> tuple[str, str] | None:
    """(problem, fix) when a compiler torch's cpp_extension runs is missing: cxx_path() for the
    .cpp files; $CC, when set, reaches nvcc as -ccbin; $PYTORCH_NVCC, when set, replaces nvcc."""
    wanted = os.environ.get("CXX")
    if not cxx_path():
        if wanted:
            return (f"$CXX is {wanted}, which is not an executable (nor on PATH)",
                    "set CXX to an installed C++ compiler, or unset it to use c++")
        return "no c++ on PATH", "install g++ (Debian/Ubuntu: build-essential)"
    cc = os.environ.get("CC")
    if cc and not shutil.which(cc):
        return (f"$CC is {cc}, which is not an executable (nor on PATH): torch passes it to nvcc as -ccbin",
                "set CC to an installed host compiler, or unset it")
    ccbin = os.environ.get("NVCC_CCBIN")
    if not cc and ccbin and not (shutil.which(ccbin) or os.path.isdir(ccbin)):  # nvcc takes a directory too
        return (f"$NVCC_CCBIN is {ccbin}, which is not an executable (nor on PATH): nvcc compiles the .cu "
                "files' host code with it", "set NVCC_CCBIN to an installed host compiler, or unset it")
    nvcc = os.environ.get("PYTORCH_NVCC")
    if nvcc:
        # torch writes it into ninja's command line as it stands, so it may be a launcher and nvcc
        # ("ccache nvcc"): the shell runs its first word
        try:
            program = shlex.split(nvcc)[0]
        except (ValueError, IndexError):
            program = None
        if not program or not shutil.which(program):
            return (f"$PYTORCH_NVCC is {nvcc}, whose command {program or '(none)'} is not an executable (nor on "
                    "PATH): torch runs it instead of $CUDA_HOME/bin/nvcc",
                    "set PYTORCH_NVCC to an nvcc (or a launcher and nvcc, like 'ccache nvcc'), or unset it")
    return None


def ninja_info() -> tuple[str | None, str | None, str | None]:
    """(path, version, problem) of the ninja on PATH, the one torch's cpp_extension runs. A ninja that
    is found but does not run (pip's `ninja` script in a moved venv, or without its module) is a
    problem too: torch then says only "Ninja is required ... (pip install ninja)"."""
    ninja = shutil.which("ninja")
    if not ninja:
        return None, None, "not found"
    out = _run([ninja, "--version"])
    if out is None or out.returncode != 0:
        said = ((out.stdout + out.stderr).strip().splitlines() or [""])[-1].strip()[:200] if out else ""
        why = "did not run" if out is None else f"exits {out.returncode}"
        return ninja, None, f"{ninja} does not run: `ninja --version` {why}" + (f" ({said})" if said else "")
    return ninja, out.stdout.strip(), None


def host_compiler_name() -> str:
    """The .cu files' host compiler as nvcc gets it: $CC (torch passes -ccbin $CC), else $NVCC_CCBIN
    (nvcc reads it when given no -ccbin), else nvcc's default, gcc on PATH."""
    return os.environ.get("CC") or os.environ.get("NVCC_CCBIN") or "gcc"


def host_compilers() -> dict[str, str]:
    """Which C++ compiler and which nvcc host compiler a build runs, by path and version: a change
    of either (a gcc upgrade, another $CC or $NVCC_CCBIN) must not find the other's objects in the cache."""
    found = {}
    ccbin = host_compiler_name()
    # nvcc runs <dir>/gcc for a directory (-dryrun shows it): keyed by that gcc, so an upgrade of
    # the compiler in it rebuilds (the directory alone was keyed "missing")
    ccbin_path = shutil.which("gcc", path=ccbin) if os.path.isdir(ccbin) else shutil.which(ccbin)
    for role, path in (("cxx", cxx_path()), ("ccbin", ccbin_path)):
        found[role] = f"{os.path.realpath(path)} {compiler_version(path) or ''}".strip() if path else "missing"
    return found


def ignored_path_nvcc(used: str | None) -> tuple[str, str] | None:
    """(path, why) of the first nvcc on PATH when it is broken and so not `used`, the one nvcc_info
    found: a shell, a build tool or torch's CUDA_HOME guess finds it first. Doctor's question only
    (it runs that nvcc), so not asked by nvcc_info, which every build calls."""
    first = next((Path(d or ".") / "nvcc" for d in os.environ.get("PATH", "").split(os.pathsep)
                  if _is_file(Path(d or ".") / "nvcc")), None)  # executable or not: shutil.which skips those
    if first is None or (used and first.resolve() == Path(used).resolve()):
        return None
    if not os.access(first, os.X_OK):
        return str(first), "not executable"
    out = _run([str(first), "--version"])
    if out is None:
        return str(first), "`nvcc --version` did not run"
    if out.returncode != 0:
        said = (out.stdout + out.stderr).strip().splitlines()
        return str(first), f"`nvcc --version` exits {out.returncode}" + (f" ({said[-1].strip()[:120]})" if said else "")
    if not re.search(r"release \d+\.\d+", out.stdout):
        return str(first), "`nvcc --version` reports no release"
    return None  # it works: another toolkit was chosen on purpose (CUDA_HOME)


def torch_info() -> TorchInfo:
    """torch's version and CUDA version, read from its torch/version.py without importing torch:
    the import costs seconds, and an unchanged `dspark build` must answer in well under two."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return TorchInfo(None, None, "torch is not installed",
                         'pip install torch (the one your engine pins), or pip install ".[build]" in the dspark checkout')
    version_py = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        text = version_py.read_text() if version_py.is_file() else ""
        version = re.search(r"^__version__\s*(?::[^=]*)?=\s*'([^']+)'", text, re.M)
        cuda = re.search(r"^cuda\s*(?::[^=]*)?=\s*(?:None|'([^']*)')", text, re.M)
        if version and cuda:
            version, cuda = version.group(1), cuda.group(1)
        else:  # a layout we do not know: ask torch itself
            import torch

            version, cuda = torch.__version__, torch.version.cuda
    except Exception as exc:  # an unreadable file, a torch that does not import (a missing CUDA library)
        return TorchInfo(None, None, f"torch is installed but unusable: {short_message(exc)}",
                         "reinstall torch (pip install --force-reinstall torch==<the version you need>)")
    return TorchInfo(version, cuda,
                     None if cuda else "torch is a CPU build (no CUDA)",
                     None if cuda else "install a CUDA build of torch to build or run our kernels")


def gpu_info() -> Gpus:
    smi = shutil.which("nvidia-smi")
    smi_failed, torch_saw = None, "torch sees none"
    if smi:
        out = _run([smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"])
        if out and out.returncode == 0 and out.stdout.strip():
            return _parse_smi(out.stdout)
        if out and out.returncode != 0:  # "NVIDIA-SMI has failed because it could not communicate with the driver"
            smi_failed = ((out.stdout + out.stderr).strip().splitlines() or [f"exit {out.returncode}"])[0][:200]
    try:
        import torch

        if torch.cuda.is_available():
            g = Gpus()
            for i in range(torch.cuda.device_count()):
                g.names.append(torch.cuda.get_device_name(i))
                major, minor = torch.cuda.get_device_capability(i)
                g.capabilities.append(f"{major}.{minor}")
            return g
    except ImportError:
        torch_saw = "no torch installed to ask"
    except Exception as exc:  # torch installed but broken (a missing CUDA library), or CUDA init failing
        return Gpus(problem=f"no GPU found: nvidia-smi gave nothing and torch failed: {short_message(exc)}",
                    hint="fix the driver or torch install; builds still work with --arch or TORCH_CUDA_ARCH_LIST")
    if smi_failed:
        return Gpus(problem=f"no NVIDIA GPU visible: {smi} failed ({smi_failed}), {torch_saw}",
                    hint="check the NVIDIA driver (nvidia-smi must run); builds still work with --arch or "
                         "TORCH_CUDA_ARCH_LIST")
    return Gpus(problem=f"no NVIDIA GPU visible (no nvidia-smi, {torch_saw})",
                hint="builds still work with --arch or TORCH_CUDA_ARCH_LIST; kernels need a GPU to run")


def _parse_smi(text: str) -> Gpus:
    """`name, compute_cap, driver` lines; a capability such as [N/A] (MIG, old drivers) or a line
    of another shape is reported, not guessed."""
    g = Gpus()
    for line in text.strip().splitlines():
        fields = [x.strip() for x in line.split(",")]
        if len(fields) != 3:
            g.unread.append(f"nvidia-smi line {line.strip()!r}")
            continue
        name, cap, g.driver = fields
        if re.fullmatch(r"\d+\.\d+", cap):
            g.names.append(name)
            g.capabilities.append(cap)
        else:
            g.unread.append(f"the compute capability of {name} ({cap})")
    if g.unread:
        g.problem = f"could not read {'; '.join(g.unread)}"
        g.hint = "pass --arch to dspark build or set TORCH_CUDA_ARCH_LIST (e.g. 9.0a)"
    return g


def arch_list(explicit: str | None = None, gpus: Gpus | None = None) -> tuple[list[str], str]:
    """(arch list, where it came from). Hopper gets 9.0a: our kernels use sm_90a-only instructions.
    `explicit` is --arch: an empty one is an error (it fell through to the GPU before). A ValueError
    names where the bad arch came from (--arch or TORCH_CUDA_ARCH_LIST)."""
    source = "--arch"
    spec = explicit
    # TORCH_CUDA_ARCH_LIST=native is torch's "the visible GPUs" (as if unset): was "not a CUDA arch", exit 2
    native = os.environ.get("TORCH_CUDA_ARCH_LIST") == "native"
    if spec is None and os.environ.get("TORCH_CUDA_ARCH_LIST") and not native:
        spec, source = os.environ["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST"
    if spec is None:
        gpus = gpus or gpu_info()
        if not gpus.capabilities:
            what = "the GPU's compute capability could not be read" if gpus.unread else "no GPU"
            what += " for TORCH_CUDA_ARCH_LIST=native" if native else ""
            return [], f"none ({what}; pass --arch or set TORCH_CUDA_ARCH_LIST)"
        spec, source = ";".join(sorted(set(gpus.capabilities))), "detected GPU"
    archs = []
    items = [one for item in re.split(r"[;,\s]+", spec.strip()) if item for one in NAMED_ARCHS.get(item, item).split(";")]
    for item in items:
        try:
            archs.append(parse_arch(item))
        except ValueError as exc:
            if source != "detected GPU":
                raise ValueError(f"{source}: {exc}") from None
            return [], f"none ({exc}; pass --arch or set TORCH_CUDA_ARCH_LIST)"
    if not archs:
        raise ValueError(f"no CUDA arch in {source} {spec!r} (expected e.g. 9.0a, 8.0, sm_90a)")
    return sorted({a for a in archs if a + "+PTX" not in archs}), source  # 8.6 and 8.6+PTX: 8.6+PTX


# What torch.utils.cpp_extension (2.14) accepts for TORCH_CUDA_ARCH_LIST, from Maxwell (5.0) on.
KNOWN_ARCHS = ("5.0", "5.2", "5.3", "6.0", "6.1", "6.2", "7.0", "7.2", "7.5", "8.0", "8.6", "8.7", "8.9",
               "9.0", "9.0a", "10.0", "10.0a", "10.3", "10.3a", "10.7", "10.7a", "11.0", "11.0a",
               "12.0", "12.0a", "12.1", "12.1a")


# The architecture names torch's cpp_extension (2.14) expands in TORCH_CUDA_ARCH_LIST ("Kepler": below
# KNOWN_ARCHS, so refused as unsupported).
NAMED_ARCHS = {"Kepler+Tesla": "3.7", "Kepler": "3.5+PTX", "Maxwell+Tegra": "5.3", "Maxwell": "5.0;5.2+PTX",
               "Pascal": "6.0;6.1+PTX", "Volta+Tegra": "7.2", "Volta": "7.0+PTX", "Turing": "7.5+PTX",
               "Ampere+Tegra": "8.7", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX",
               "Blackwell+Tegra": "11.0", "Blackwell": "10.0;10.3;12.0;12.1+PTX", "Rubin": "10.7+PTX"}


def parse_arch(item: str) -> str:
    """One arch: 'sm_90a', '90a', '9.0a', 'sm_120', '100a', '8.6+PTX' -> '9.0a', '12.0', '10.0a',
    '8.6+PTX' (a bare number's last digit is the minor version). ValueError for anything else or an
    arch torch's cpp_extension does not build for. Plain 9.0 becomes 9.0a: our kernels use
    sm_90a-only instructions. +PTX stays (torch then embeds that arch's PTX too, which newer GPUs
    JIT-compile; an `a` arch's PTX, e.g. compute_90a, runs on that arch only): it changes the
    library, so it is in the cache key."""
    given = item
    item = item.strip()
    ptx = "+PTX" if item.endswith("+PTX") else ""
    item = item.removesuffix("+PTX")
    m = re.fullmatch(r"(?:sm_)?(\d+)(\d)([af]?)", item) or re.fullmatch(r"(\d+)\.(\d)([af]?)", item)
    if not m:
        raise ValueError(f"not a CUDA arch: {given!r} (expected e.g. 9.0a, 8.0, sm_90a, sm_120)")
    arch = f"{int(m[1])}.{m[2]}{m[3]}"
    if arch == "9.0":
        arch = "9.0a"
    if arch not in KNOWN_ARCHS:
        raise ValueError(f"unsupported CUDA arch: {given!r} ({arch}; torch's cpp_extension builds for "
                         f"{', '.join(KNOWN_ARCHS)})")
    return arch + ptx


def major(version: str | None) -> int | None:
    return int(version.split(".")[0]) if version else None
