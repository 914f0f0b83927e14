"""dspark doctor's checks on this real machine (nvcc, gcc, git, no GPU in CI), plus the torch/nvcc
version rules on constructed probe results (no machine here has a CUDA torch next to nvcc)."""

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from dspark_cli import cuda_env, doctor

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
ALL_CHECKS = ("python", "git", "gpu", "cuda toolkit", "torch", "arch list", "c++ compiler", "ninja",
              "CUDA_HOME", "disk (workdir)", "disk (cache)", "engine vllm", "engine tgi")


NO_NVCC = cuda_env.Nvcc(None, None)  # the arch list alone: no nvcc to ask what it builds


def by_name(checks):
    return {c.name: c for c in checks}


def real_toolkit() -> Path:
    return cuda_env._nvcc_toolkit_root(NVCC)


def test_runs_to_the_end_on_this_machine():
    checks = by_name(doctor.run_checks())
    for name in ALL_CHECKS:
        assert name in checks, name
        assert checks[name].status in ("ok", "warn", "fail")
        assert checks[name].detail
        if checks[name].status != "ok":
            assert checks[name].hint, name
    assert checks["python"].status == "ok"
    assert checks["git"].status == "ok" and "git version" in checks["git"].detail


def test_a_git_older_than_2_31_warns(tmp_path, monkeypatch):
    """dspark pins the git settings that change what it writes through GIT_CONFIG_COUNT, which git
    before 2.31 ignores: doctor says so (a stand-in git reporting 2.30.2, Debian 11's)."""
    (tmp_path / "git").write_text("#!/bin/sh\necho 'git version 2.30.2'\n")
    (tmp_path / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    check = doctor.check_git()
    assert check.status == doctor.WARN and check.detail == "git version 2.30.2" and "2.31" in check.hint


@pytest.mark.skipif(bool(cuda_env.gpu_info().capabilities), reason="this machine has a GPU")
def test_without_a_gpu_gpu_and_arch_list_warn(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    checks = by_name(doctor.run_checks())
    assert checks["gpu"].status == "warn" and "no NVIDIA GPU" in checks["gpu"].detail
    assert checks["arch list"].status == "warn" and "--arch" in checks["arch list"].hint
    # An explicit arch list is what a GPU-less build machine uses: then the arch check is fine.
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0;8.0")
    arch = by_name(doctor.run_checks())["arch list"]
    assert arch.status == "ok" and arch.detail == "8.0;9.0a (TORCH_CUDA_ARCH_LIST)"


def test_without_nvidia_smi_or_torch_the_gpu_line_says_torch_was_not_there_to_ask(monkeypatch, tmp_path):
    """Was "torch sees none" with no torch installed."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch: ImportError
    assert cuda_env.gpu_info().problem == "no NVIDIA GPU visible (no nvidia-smi, no torch installed to ask)"


@pytest.mark.skipif(not cuda_env.gpu_info().capabilities, reason="no GPU on this machine")
def test_with_a_gpu_it_is_named_and_targeted(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    gpus = cuda_env.gpu_info()
    checks = by_name(doctor.run_checks())
    assert checks["gpu"].status == "ok" and f"(sm {gpus.capabilities[0]})" in checks["gpu"].detail
    assert checks["arch list"].status == "ok" and checks["arch list"].detail.endswith("(detected GPU)")


@needs_nvcc
def test_toolkit_and_compiler_on_this_machine():
    checks = by_name(doctor.run_checks())
    version = cuda_env.nvcc_info().version
    assert checks["cuda toolkit"].status == "ok" and f"nvcc {version}" in checks["cuda toolkit"].detail
    assert checks["c++ compiler"].status == "ok"
    assert f"nvcc {version} accepts " in checks["c++ compiler"].detail


def gnu16(tmp_path) -> Path:
    """A real g++ that reports __GNUC__ 16 to the preprocessor: nvcc's own host_config.h refuses it."""
    compiler = tmp_path / "g++-16"
    compiler.write_text(f'#!/bin/sh\nexec {shutil.which("g++")} -D__GNUC__=16 "$@"\n')
    compiler.chmod(0o755)
    return compiler


@needs_nvcc
def test_a_host_compiler_nvcc_refuses_fails(monkeypatch, tmp_path):
    """$CC is what torch passes to nvcc (-ccbin $CC): the compiler probed is that one."""
    cc = gnu16(tmp_path)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("CC", str(cc))
    check = doctor.check_compiler(cuda_env.nvcc_info())
    assert check.status == "fail"
    assert "unsupported GNU version" in check.detail and f"refuses $CC={cc}" in check.detail
    assert "set CC" in check.hint
    monkeypatch.setenv("CC", str(tmp_path / "no-such-gcc"))
    check = doctor.check_compiler(cuda_env.nvcc_info())
    assert check.status == "fail" and f"$CC is {tmp_path / 'no-such-gcc'}, which is not an executable" in check.detail


@needs_nvcc
def test_a_toolkit_without_headers_is_not_blamed_on_the_host_compiler(monkeypatch, tmp_path):
    """An nvcc whose toolkit has no include/ (conda's cuda-nvcc without the cudart headers) fails
    on cuda_runtime.h: doctor said "nvcc refuses its default host compiler: compilation terminated."
    and told the user to change CC."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(cuda_env.nvcc_info().path)  # nvcc looks for include/ beside bin/
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    nvcc = cuda_env.nvcc_info()
    assert nvcc.path == str(tmp_path / "bin" / "nvcc")
    check = doctor.check_compiler(nvcc)
    assert check.status == "fail" and "cannot compile an empty .cu file" in check.detail
    assert "cuda_runtime.h" in check.detail and "refuses" not in check.detail
    assert "set CC" not in check.hint and "missing header" in check.hint


@needs_nvcc
def test_cxx_is_not_nvccs_host_compiler(monkeypatch, tmp_path):
    """$CXX compiles the .cpp files only; without $CC nvcc uses its default host compiler (gcc on
    PATH), so a $CXX nvcc would refuse is no failure (doctor probed nvcc with -ccbin $CXX, which no
    build runs), and the detail names the host compiler nvcc does use."""
    cxx = gnu16(tmp_path)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.delenv("CC", raising=False)
    check = doctor.check_compiler(cuda_env.nvcc_info())
    assert check.status == "ok", check
    assert check.detail.startswith(f"{cxx} ") and f"accepts its default host compiler ({shutil.which('gcc')})" in check.detail


LIB_DIRS = ("lib64", "lib", "targets/x86_64-linux/lib")  # where a toolkit keeps libcudart


def toolkit_without_libcudart(src: Path, dst: Path, rel: str = "") -> None:
    """`dst` mirrors the real toolkit `src` through symlinks, except that libcudart is missing."""
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        path = rel + entry.name
        if path in LIB_DIRS:
            (dst / entry.name).mkdir()
            for lib in entry.iterdir():
                if not lib.name.startswith("libcudart"):
                    (dst / entry.name / lib.name).symlink_to(lib)
        elif entry.is_dir() and any(d.startswith(path + "/") for d in LIB_DIRS):
            toolkit_without_libcudart(entry, dst / entry.name, path + "/")
        else:
            (dst / entry.name).symlink_to(entry)


@needs_nvcc
def test_cuda_home_without_libcudart_fails_and_names_the_real_toolkit(monkeypatch, tmp_path):
    real = real_toolkit()
    fake = tmp_path / "cuda"
    toolkit_without_libcudart(real, fake)
    assert (fake / "bin" / "nvcc").is_file() and (fake / "include" / "cuda_runtime.h").is_file()
    assert not any((fake / d / "libcudart.so").exists() for d in LIB_DIRS)
    monkeypatch.setenv("CUDA_HOME", str(fake))
    check = by_name(doctor.run_checks())["CUDA_HOME"]
    assert check.status == "fail"
    assert "libcudart" in check.detail and str(fake) in check.detail
    assert check.hint == f"export CUDA_HOME={real}"


@pytest.mark.skipif(cuda_env.prefix_problem(Path("/usr/local/cuda")) is not None, reason="no toolkit at /usr/local/cuda")
def test_torch_guessing_a_broken_nvccs_prefix_warns_when_the_default_toolkit_is_used(monkeypatch, tmp_path):
    """A broken nvcc first on PATH: we fall back to /usr/local/cuda, torch would guess its prefix."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    home = cuda_env.resolve_cuda_home()
    check = doctor.check_cuda_home(home)
    assert home.source == "default" and check.status == "warn"
    assert f"torch would guess CUDA_HOME={tmp_path}" in check.detail and check.hint == "export CUDA_HOME=/usr/local/cuda"


@needs_nvcc
def test_torch_guessing_a_prefix_without_libcudart_warns(monkeypatch, tmp_path):
    # nvcc on PATH is a wrapper script (as /usr/local/bin/nvcc often is): torch would take its
    # grandparent as CUDA_HOME. Our resolution asks nvcc for its real toolkit and says what to set.
    real = real_toolkit()
    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    check = doctor.check_cuda_home(cuda_env.resolve_cuda_home())
    assert check.status == "warn"
    assert f"torch would guess CUDA_HOME={tmp_path}" in check.detail and "libcudart" in check.detail
    assert check.hint == f"export CUDA_HOME={real}"


def test_torch_and_nvcc_versions():
    nvcc13 = cuda_env.Nvcc("/x/nvcc", "13.0")
    assert doctor.check_torch(cuda_env.TorchInfo("2.14.1+cu130", "13.0"), nvcc13).status == "ok"
    minor = doctor.check_torch(cuda_env.TorchInfo("2.14.1+cu131", "13.1"), nvcc13)
    assert minor.status == "warn" and "minor" in minor.detail
    mismatch = doctor.check_torch(cuda_env.TorchInfo("2.11.0+cu128", "12.8"), nvcc13)
    assert mismatch.status == "fail" and mismatch.detail == "nvcc is CUDA 13.0 but torch 2.11.0+cu128 was built for CUDA 12.8"
    assert mismatch.hint == "install a CUDA 12.x toolkit (torch's is 12.8) or a torch built for CUDA 13.0"
    cpu = doctor.check_torch(cuda_env.TorchInfo("2.13.0+cpu", None, "torch is a CPU build"), nvcc13)
    assert cpu.status == "warn" and "CPU build" in cpu.detail
    # This machine's real torch (a CPU build in CI) is reported, not crashed on.
    assert doctor.check_torch(cuda_env.torch_info(), cuda_env.nvcc_info()).status in ("ok", "warn")


def test_arch_list(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert cuda_env.arch_list("9.0") == (["9.0a"], "--arch")
    assert cuda_env.arch_list("sm_90a;8.0") == (["8.0", "9.0a"], "--arch")
    assert doctor.check_arch(cuda_env.Gpus(names=["H200"], capabilities=["9.0"]), NO_NVCC).detail == "9.0a (detected GPU)"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "hopper")
    bad = doctor.check_arch(cuda_env.Gpus(), NO_NVCC)
    assert bad.status == "fail" and "not a CUDA arch" in bad.detail


def test_an_arch_list_nvcc_cannot_build_fails_as_build_refuses_it(monkeypatch, tmp_path):
    """An nvcc stand-in that lists compute_75 and up (as CUDA 13.0 does): doctor said ok for
    TORCH_CUDA_ARCH_LIST=5.0;10.7, which dspark build then refused; now it fails with build's line."""
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\n[ \"$1\" = --list-gpu-arch ] && printf 'compute_75\\ncompute_90\\ncompute_100\\n'\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "5.0;10.7")
    check = doctor.check_arch(cuda_env.Gpus(), cuda_env.Nvcc(str(nvcc), "13.0"))
    assert check.status == "fail"
    assert check.detail == "TORCH_CUDA_ARCH_LIST: nvcc 13.0 does not build for 10.7, 5.0 (it builds 7.5, 9.0, 10.0)"
    assert "TORCH_CUDA_ARCH_LIST" in check.hint
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a;10.0")
    assert doctor.check_arch(cuda_env.Gpus(), cuda_env.Nvcc(str(nvcc), "13.0")).status == "ok"


def test_disk_for_a_workdir_not_created_yet_and_the_cache(monkeypatch, tmp_path):
    check = doctor.check_disk("disk (workdir)", tmp_path / "not" / "yet")
    assert check.status in ("ok", "warn") and f"GiB free at {tmp_path / 'not' / 'yet'}" in check.detail
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    assert doctor.cache_dir() == tmp_path / "cache"
    assert by_name(doctor.run_checks(tmp_path))["disk (cache)"].detail.endswith(f"at {tmp_path / 'cache'}")


@pytest.mark.parametrize("line, unread", [
    ("NVIDIA H200, [N/A], 570.86", "the compute capability of NVIDIA H200 ([N/A])"),
    ("NVIDIA H200 570.86", "nvidia-smi line 'NVIDIA H200 570.86'"),
])
def test_an_nvidia_smi_line_we_cannot_read_is_a_warning(monkeypatch, tmp_path, line, unread):
    """A real nvidia-smi stand-in on PATH: doctor warns and says to pass --arch, never fails or crashes."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho 'NVIDIA H100, 9.0, 570.86'\necho '{line}'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    gpus = cuda_env.gpu_info()
    gpu = doctor.check_gpu(gpus)
    assert gpu.status == "warn" and gpu.detail == f"NVIDIA H100 (sm 9.0), driver 570.86; could not read {unread}"
    assert "--arch" in gpu.hint and doctor.check_arch(gpus, NO_NVCC).detail == "9.0a (detected GPU)"
    smi.write_text(f"#!/bin/sh\necho '{line}'\n")
    arch = doctor.check_arch(cuda_env.gpu_info(), NO_NVCC)
    assert arch.status == "warn" and "could not be read; pass --arch or set TORCH_CUDA_ARCH_LIST" in arch.detail


def test_an_nvidia_smi_that_fails_is_named_with_its_message(monkeypatch, tmp_path):
    """Was "no nvidia-smi" for an nvidia-smi that ran and could not reach the driver."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA "
                   "driver.'\nexit 9\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    gpus = cuda_env.gpu_info()
    if gpus.names:
        pytest.skip("torch sees a GPU here")
    gpu = doctor.check_gpu(gpus)
    assert gpu.status == "warn" and gpu.detail.startswith(f"no NVIDIA GPU visible: {smi} failed (NVIDIA-SMI has "
                                                          "failed because it could not communicate")
    assert "driver" in gpu.hint


def test_an_nvcc_that_does_not_run_is_the_toolkits_failure_not_the_compilers(monkeypatch, tmp_path):
    """Was "nvcc None refuses its default host compiler", with a hint to change CC."""
    home = tmp_path / "cuda"
    for part in ("bin", "lib64", "include"):
        (home / part).mkdir(parents=True)
    (home / "lib64" / "libcudart.so").write_text("")
    (home / "include" / "cuda_runtime.h").write_text("")
    (home / "bin" / "nvcc").write_text("#!/bin/sh\necho 'nvcc: error while loading shared libraries: libnvvm.so' >&2"
                                       "\nexit 127\n")
    (home / "bin" / "nvcc").chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(home))
    nvcc = cuda_env.nvcc_info()
    toolkit, compiler = doctor.check_nvcc(nvcc), doctor.check_compiler(nvcc)
    assert toolkit.status == "fail" and "(nvcc: error while loading shared libraries: libnvvm.so)" in toolkit.detail
    assert compiler.status == "ok" and compiler.detail.endswith("; not checked against nvcc (nvcc does not run: "
                                                                "see cuda toolkit)")


@pytest.mark.parametrize("place", ["workdir", "cache"])
def test_a_place_doctor_cannot_name_is_a_failed_check_not_a_lost_report(monkeypatch, tmp_path, place):
    """A name too long for the file system, a ~user without a home: was no report at all (one
    error line, exit 2), or pathlib's traceback."""
    long_name = tmp_path / ("a" * 300)
    workdir = long_name if place == "workdir" else tmp_path
    monkeypatch.setenv("DSPARK_CACHE", "~dspark-no-such-user/x" if place == "cache" else str(tmp_path / "cache"))
    checks = by_name(doctor.run_checks(workdir))
    assert set(ALL_CHECKS) <= set(checks)
    check = checks[f"disk ({place})"]
    assert check.status == "fail", check
    expected = (f"--workdir {long_name}: File name too long" if place == "workdir"
                else "DSPARK_CACHE ~dspark-no-such-user/x: Could not determine home directory")
    assert check.detail.startswith(expected), check.detail


def test_a_cxx_that_does_not_exist_fails_rather_than_falling_back(monkeypatch):
    """torch's cpp_extension builds with $CXX as it is: doctor said ok with /usr/bin/g++ instead."""
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    check = doctor.check_compiler(cuda_env.nvcc_info())
    assert check.status == "fail" and check.detail == "$CXX is /nonexistent/g++, which is not an executable (nor on PATH)"
    assert "CXX" in check.hint


def test_a_torch_that_does_not_import_is_a_warning_not_a_crash(tmp_path):
    """torch installed but broken (its import fails on a missing CUDA library): doctor still runs to
    the end, and the torch and gpu lines say why (nvidia-smi kept off PATH, so torch is asked)."""
    broken = tmp_path / "site" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise OSError("libcudnn.so.9: cannot open shared object file")\n')
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists())
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": path, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(root)])}
    proc = subprocess.run([sys.executable, "-m", "dspark_cli", "doctor", "--json"], env=env, capture_output=True,
                          text=True, timeout=120)
    report = json.loads(proc.stdout)
    checks = by_name(doctor.Check(**c) for c in report["checks"])
    # stderr: nothing, or the one line naming failed checks (a machine without nvcc, say); no traceback
    assert proc.stderr == ("" if report["ok"] else f"error: {report['error']}\n") and set(ALL_CHECKS) <= set(checks)
    assert checks["torch"].status == "warn" and "unusable: libcudnn.so.9" in checks["torch"].detail
    assert checks["gpu"].status == "warn" and "torch failed: libcudnn.so.9" in checks["gpu"].detail


Usage = namedtuple("Usage", "total used free")


def test_disk_check_counts_gib_and_warns_below_the_minimum(monkeypatch, tmp_path):
    """Free space read in the wrong unit (2**20) made 10 GiB look like 10240 'GiB': never a warning."""
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: Usage(2**40, 0, 10 * 2**30))
    check = doctor.check_disk("disk (workdir)", tmp_path)
    assert check.status == "warn" and check.detail.startswith("10.0 GiB free at ")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: Usage(2**40, 0, 30 * 2**30))
    check = doctor.check_disk("disk (workdir)", tmp_path)
    assert check.status == "ok" and check.detail.startswith("30.0 GiB free at ")


def fake_toolkit(root: Path, release: str) -> Path:
    """A toolkit layout whose nvcc (a script: no CUDA of that version on this machine) reports `release`."""
    for part in ("bin", "lib64", "include"):
        (root / part).mkdir(parents=True)
    (root / "lib64" / "libcudart.so").write_text("")
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "bin" / "nvcc").write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    (root / "bin" / "nvcc").chmod(0o755)
    return root


@needs_nvcc
def test_cuda_home_at_another_cuda_than_torchs_names_the_toolkit_here(tmp_path, monkeypatch):
    """CUDA_HOME at a CUDA 12 toolkit, torch built for this machine's CUDA: the hint was "install the
    CUDA 13.0 toolkit", which is installed (nvcc on PATH); the fix is to point CUDA_HOME at it."""
    real = real_toolkit()
    version = cuda_env.nvcc_info(cuda_env.CudaHome(real, "nvcc")).version
    old = fake_toolkit(tmp_path / "cuda-old", f"{int(version.split('.')[0]) - 1}.4")
    monkeypatch.setenv("CUDA_HOME", str(old))
    home = cuda_env.resolve_cuda_home()
    check = doctor.check_torch(cuda_env.TorchInfo("2.14.1+cu", version), cuda_env.nvcc_info(home), home)
    assert check.status == "fail" and check.detail == f"CUDA_HOME={old} is CUDA {int(version.split('.')[0]) - 1}.4 but " \
        f"torch 2.14.1+cu was built for CUDA {version}"
    assert check.hint == f"export CUDA_HOME={real} (a CUDA {version.split('.')[0]}.x toolkit here)"


@needs_nvcc
def test_the_report_names_the_toolkit_here_for_cuda_home_at_another_cuda(tmp_path, monkeypatch):
    """run_checks hands the CUDA home it resolved to the torch check: the fix names the toolkit here."""
    real = real_toolkit()
    version = cuda_env.nvcc_info(cuda_env.CudaHome(real, "nvcc")).version
    old = fake_toolkit(tmp_path / "cuda-old", f"{int(version.split('.')[0]) - 1}.4")
    monkeypatch.setenv("CUDA_HOME", str(old))
    monkeypatch.setattr(cuda_env, "torch_info", lambda: cuda_env.TorchInfo("2.14.1+cu", version))
    check = by_name(doctor.run_checks())["torch"]
    assert check.status == "fail" and check.hint == f"export CUDA_HOME={real} (a CUDA {version.split('.')[0]}.x toolkit here)"


@needs_nvcc
def test_the_compiler_check_names_nvcc_ccbin_as_the_host_compiler_without_cc(monkeypatch):
    """Without $CC nvcc compiles with $NVCC_CCBIN: the check names it, not nvcc's default gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc on PATH")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("NVCC_CCBIN", gcc)
    check = doctor.check_compiler(cuda_env.nvcc_info())
    assert f"$NVCC_CCBIN={gcc}" in check.detail, check
