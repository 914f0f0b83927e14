"""cuda_env's probes: CUDA_HOME resolution on real directory layouts and on this machine's real
nvcc (a wrapper script in /usr/local/bin, the case torch's own guess gets wrong), version parsing
and the arch list. Every probe reports a problem and hint instead of raising."""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_cli import cuda_env

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")


def make_prefix(root: Path, nvcc=True, cudart=True, header=True) -> Path:
    """A directory laid out like a CUDA toolkit, with the parts asked for."""
    (root / "bin").mkdir(parents=True)
    if nvcc:
        (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
        (root / "bin" / "nvcc").chmod(0o755)
    if cudart:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so").write_text("")
    if header:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_prefix_problem_names_the_missing_part(tmp_path):
    assert cuda_env.prefix_problem(make_prefix(tmp_path / "ok")) is None
    assert "no bin/nvcc" in cuda_env.prefix_problem(make_prefix(tmp_path / "a", nvcc=False))
    assert "libcudart" in cuda_env.prefix_problem(make_prefix(tmp_path / "b", cudart=False))
    assert "cuda_runtime.h" in cuda_env.prefix_problem(make_prefix(tmp_path / "c", header=False))


def test_libraries_only_under_targets_are_where_torch_does_not_link_from(tmp_path):
    """torch links -L $CUDA_HOME/lib64 (else lib) and includes $CUDA_HOME/include: a toolkit whose
    libcudart.so and headers sit only under targets/x86_64-linux/ fails the link minutes in."""
    prefix = make_prefix(tmp_path / "t", cudart=False, header=False)
    for part, name in (("lib", "libcudart.so"), ("include", "cuda_runtime.h")):
        (prefix / "targets" / "x86_64-linux" / part).mkdir(parents=True)
        (prefix / "targets" / "x86_64-linux" / part / name).write_text("")
    assert "lib64/libcudart.so" in cuda_env.prefix_problem(prefix)


def test_libcudart_only_in_lib_beside_a_lib64_is_where_torch_does_not_link_from(tmp_path):
    """torch links -L lib64 whenever lib64 exists (lib only when it does not): a prefix whose
    libcudart.so sits in lib/ beside a lib64/ without it fails the link."""
    prefix = make_prefix(tmp_path / "split", cudart=False)
    (prefix / "lib64").mkdir()
    (prefix / "lib").mkdir()
    (prefix / "lib" / "libcudart.so").write_text("")
    problem = cuda_env.prefix_problem(prefix)
    assert "no lib64/libcudart.so" in problem and "lib/ has it" in problem
    (prefix / "lib64").rmdir()  # no lib64: torch links lib/, which has it
    assert cuda_env.prefix_problem(prefix) is None and cuda_env.link_dir(prefix) == "lib"


def test_a_relative_cuda_home_is_made_absolute(tmp_path, monkeypatch):
    """ninja runs the compiler from the build directory, where a relative prefix means nothing."""
    make_prefix(tmp_path / "cuda-13.0")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_HOME", "cuda-13.0")
    home = cuda_env.resolve_cuda_home()
    assert home.path == tmp_path / "cuda-13.0" and home.path.is_absolute() and home.problem is None


def test_cuda_home_without_libcudart_is_refused_with_a_hint(tmp_path, monkeypatch):
    """The /usr/local case: bin/nvcc exists (a wrapper) but the prefix has no toolkit libraries."""
    bad = make_prefix(tmp_path / "usr-local", cudart=False, header=False)
    monkeypatch.setenv("CUDA_HOME", str(bad))
    home = cuda_env.resolve_cuda_home()
    assert home.source == "CUDA_HOME" and home.path == bad
    assert "libcudart" in home.problem and "CUDA_HOME" in home.hint


def test_cuda_path_is_honoured_when_cuda_home_is_unset(tmp_path, monkeypatch):
    good = make_prefix(tmp_path / "cuda")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("CUDA_PATH", str(good))
    home = cuda_env.resolve_cuda_home()
    assert (home.path, home.source, home.problem) == (good, "CUDA_PATH", None)


def test_no_toolkit_at_all_is_a_problem_not_an_exception(tmp_path, monkeypatch):
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc anywhere on PATH
    monkeypatch.setattr(cuda_env, "Path", _no_default_cuda(cuda_env.Path))
    home = cuda_env.resolve_cuda_home()
    assert home.path is None and home.problem and home.hint
    nvcc = cuda_env.nvcc_info(home)
    assert nvcc.path is None and nvcc.problem == "nvcc not found" and nvcc.hint


def _no_default_cuda(real_path):
    """Path, except that /usr/local/cuda does not exist (this machine may have one)."""

    class P(type(real_path())):
        def exists(self, *a, **k):
            return False if str(self) == "/usr/local/cuda" else super().exists(*a, **k)

    return P


@needs_nvcc
def test_real_nvcc_resolves_to_its_own_toolkit(monkeypatch):
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    home = cuda_env.resolve_cuda_home()
    assert home.source == "nvcc" and home.path is not None
    assert cuda_env.prefix_problem(home.path) is None
    assert os.access(home.path / "bin" / "nvcc", os.X_OK)
    if Path(NVCC).resolve().parent.parent != home.path:  # nvcc on PATH is a wrapper elsewhere
        assert home.torch_guess == str(Path(NVCC).parent.parent)
    nvcc = cuda_env.nvcc_info(home)
    assert nvcc.problem is None and nvcc.path.startswith(str(home.path))
    major, minor = nvcc.version.split(".")
    assert int(major) >= 11 and minor.isdigit()


def test_nvcc_without_a_release_line_is_reported(tmp_path):
    fake = make_prefix(tmp_path / "odd")
    (fake / "bin" / "nvcc").write_text("#!/bin/sh\necho 'not a compiler'\n")
    (fake / "bin" / "nvcc").chmod((fake / "bin" / "nvcc").stat().st_mode | stat.S_IEXEC)
    info = cuda_env.nvcc_info(cuda_env.CudaHome(fake, "CUDA_HOME"))
    assert info.version is None and "did not report a release" in info.problem


@needs_nvcc
@pytest.mark.parametrize("script, mode, why", [
    ("#!/bin/sh\necho 'nvcc: broken install' >&2\nexit 1\n", 0o755, "`nvcc --version` exits 1 (nvcc: broken install)"),
    ("#!/bin/sh\necho 'not a compiler'\n", 0o755, "`nvcc --version` reports no release"),
    ("#!/bin/sh\nexit 0\n", 0o644, "not executable"),
], ids=["exits-1", "no-release", "not-executable"])
def test_a_broken_nvcc_first_on_path_is_named_when_another_is_used(tmp_path, monkeypatch, script, mode, why):
    """The real toolkit is used (/usr/local/cuda, or the one nvcc further along PATH names), and the
    broken nvcc in front of it is reported instead of passed over in silence."""
    (tmp_path / "nvcc").write_text(script)
    (tmp_path / "nvcc").chmod(mode)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    info = cuda_env.nvcc_info()
    assert info.problem is None and info.version and info.path != str(tmp_path / "nvcc")
    assert cuda_env.ignored_path_nvcc(info.path) == (str(tmp_path / "nvcc"), why)


@needs_nvcc
def test_a_working_nvcc_first_on_path_is_not_reported(tmp_path, monkeypatch):
    """A wrapper that runs the real nvcc (torch's wrong CUDA_HOME guess, reported by CUDA_HOME) is
    no broken nvcc, though the toolkit's own nvcc is the one used."""
    real = cuda_env._nvcc_toolkit_root(NVCC)
    (tmp_path / "nvcc").write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    (tmp_path / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    info = cuda_env.nvcc_info()
    assert info.path == str(real / "bin" / "nvcc") and cuda_env.ignored_path_nvcc(info.path) is None


def test_torch_info_reports_this_torch_without_importing_it():
    probe = ("import sys; from dspark_cli import cuda_env; i = cuda_env.torch_info(); "
             "print(i.version, i.cuda, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    import torch

    assert out == [torch.__version__, str(torch.version.cuda), "False"]
    info = cuda_env.torch_info()
    assert (info.problem is None) == (torch.version.cuda is not None)


def test_arch_list_sources_and_normalisation(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert cuda_env.arch_list("9.0") == (["9.0a"], "--arch")  # Hopper gets its sm_90a features
    assert cuda_env.arch_list("sm_90a, 80 8.6+PTX") == (["8.0", "8.6+PTX", "9.0a"], "--arch")
    assert cuda_env.arch_list("8.6;8.6+PTX") == (["8.6+PTX"], "--arch")  # 8.6+PTX builds 8.6 too
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    assert cuda_env.arch_list() == (["9.0a"], "TORCH_CUDA_ARCH_LIST")
    assert cuda_env.arch_list("8.0") == (["8.0"], "--arch")  # the flag wins over the variable
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert cuda_env.arch_list(gpus=cuda_env.Gpus(["H200"], ["9.0"])) == (["9.0a"], "detected GPU")
    archs, source = cuda_env.arch_list(gpus=cuda_env.Gpus())
    assert archs == [] and "--arch" in source
    with pytest.raises(ValueError, match="not a CUDA arch"):
        cuda_env.arch_list("hopper")  # torch's names are case-sensitive


def test_the_arch_names_torch_expands_are_read_as_torch_reads_them(monkeypatch):
    """TORCH_CUDA_ARCH_LIST=Hopper builds with torch's cpp_extension; doctor failed it ("not a CUDA
    arch: 'Hopper'") and build refused it."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Hopper")
    assert cuda_env.arch_list() == (["9.0a+PTX"], "TORCH_CUDA_ARCH_LIST")
    assert cuda_env.arch_list("Ampere;Hopper") == (["8.0", "8.6+PTX", "9.0a+PTX"], "--arch")
    with pytest.raises(ValueError, match="^--arch: unsupported CUDA arch: '3.5\\+PTX'"):
        cuda_env.arch_list("Kepler")  # named, but below what torch's cpp_extension builds for


def test_an_arch_error_names_its_source(monkeypatch):
    """A bad TORCH_CUDA_ARCH_LIST is named as the source (the message read as if --arch were bad);
    an empty --arch is an error, not the variable's or the GPU's arch list."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a;hopper")
    with pytest.raises(ValueError, match="^TORCH_CUDA_ARCH_LIST: not a CUDA arch: 'hopper'"):
        cuda_env.arch_list()
    with pytest.raises(ValueError, match="^--arch: unsupported CUDA arch: '1.0'"):
        cuda_env.arch_list("1.0")
    with pytest.raises(ValueError, match="^no CUDA arch in --arch ''"):
        cuda_env.arch_list("")


def test_major():
    assert cuda_env.major("13.0") == 13 and cuda_env.major(None) is None


@pytest.mark.parametrize("given, arch", [("sm_120", "12.0"), ("sm_100", "10.0"), ("sm_100a", "10.0a"),
                                         ("120a", "12.0a"), ("sm_90", "9.0a"), ("8.6+PTX", "8.6+PTX"),
                                         ("sm_90+PTX", "9.0a+PTX"), ("7.5", "7.5")])
def test_arch_major_is_all_but_the_last_digit(given, arch):
    assert cuda_env.arch_list(given) == ([arch], "--arch")


@pytest.mark.parametrize("given", ["1.0", "sm_10", "3.5", "sm_100f", "9.0b", ";", " , ", "sm_", "13.0", "", "3.5+PTX"])
def test_bad_or_unbuildable_arch_is_a_value_error(given):
    with pytest.raises(ValueError):
        cuda_env.arch_list(given)


def test_an_unbuildable_detected_gpu_is_no_arch_not_an_error(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    archs, source = cuda_env.arch_list(gpus=cuda_env.Gpus(["K80"], ["3.7"]))
    assert archs == [] and "pass --arch" in source


def test_the_toolkit_nvcc_reports_is_not_taken_without_libcudart(tmp_path, monkeypatch):
    """nvcc on PATH names its toolkit (`-dryrun`'s TOP=): a toolkit there without lib64/libcudart.so
    cannot link our extension, so it is never the CUDA_HOME dspark resolves (nor the one a hint
    tells the user to export)."""
    root = tmp_path / "cuda-broken"
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ TOP={root}' >&2\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert cuda_env._nvcc_toolkit_root(str(nvcc)) == root.resolve()
    assert cuda_env._from_nvcc() is None
    assert cuda_env.resolve_cuda_home().path != root.resolve()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    assert "cuda-broken" not in (cuda_env.resolve_cuda_home().hint or "")


def test_torch_cuda_arch_list_native_is_the_visible_gpus_as_torch_reads_it(monkeypatch):
    """torch's cpp_extension takes TORCH_CUDA_ARCH_LIST=native as unset (the visible GPUs); doctor
    failed it and build refused it (exit 2, "not a CUDA arch: 'native'")."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "native")
    assert cuda_env.arch_list(gpus=cuda_env.Gpus(["H200"], ["9.0"])) == (["9.0a"], "detected GPU")
    archs, source = cuda_env.arch_list(gpus=cuda_env.Gpus())
    assert archs == [] and source == ("none (no GPU for TORCH_CUDA_ARCH_LIST=native; pass --arch or set "
                                      "TORCH_CUDA_ARCH_LIST)")
    assert cuda_env.arch_list("8.0") == (["8.0"], "--arch")
