"""dspark doctor on this real machine, plus the decision rules on constructed probe results."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_cli import cuda_env, doctor

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")


def by_name(checks):
    return {c.name: c for c in checks}


def test_runs_to_the_end_on_this_machine():
    checks = by_name(doctor.run_checks())
    for name in ("python", "git", "gpu", "cuda toolkit", "torch", "arch list", "c++ compiler", "ninja",
                 "CUDA_HOME", "disk", "engine vllm", "engine tgi"):
        assert name in checks, name
        assert checks[name].status in ("ok", "warn", "fail")
    assert checks["python"].status == "ok"
    assert checks["git"].status == "ok"
    if not cuda_env.gpu_info().capabilities:  # CI: no GPU is a warning with a hint, not a crash
        assert checks["gpu"].status == "warn" and checks["gpu"].hint


@needs_nvcc
def test_cuda_home_without_libcudart_fails_and_names_the_real_toolkit(monkeypatch, tmp_path):
    real = cuda_env._nvcc_toolkit_root(NVCC)
    fake = tmp_path / "cuda"  # nvcc and headers, but no lib64/libcudart.so: links would fail
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "nvcc").symlink_to(real / "bin" / "nvcc")
    (fake / "include").symlink_to(real / "targets" / "x86_64-linux" / "include")
    monkeypatch.setenv("CUDA_HOME", str(fake))
    check = doctor.check_cuda_home(cuda_env.resolve_cuda_home())
    assert check.status == "fail"
    assert "libcudart" in check.detail
    assert check.hint == f"export CUDA_HOME={real}"


@needs_nvcc
def test_nvcc_reports_its_real_toolkit_even_through_a_wrapper(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    home = cuda_env.resolve_cuda_home()
    assert home.path is not None and cuda_env.prefix_problem(home.path) is None
    assert cuda_env.nvcc_info(home).version.count(".") == 1


def test_torch_and_nvcc_versions():
    nvcc13 = cuda_env.Nvcc("/x/nvcc", "13.0")
    assert doctor.check_torch(cuda_env.TorchInfo("2.14.1+cu130", "13.0"), nvcc13).status == "ok"
    assert doctor.check_torch(cuda_env.TorchInfo("2.14.1+cu131", "13.1"), nvcc13).status == "warn"
    mismatch = doctor.check_torch(cuda_env.TorchInfo("2.11.0+cu128", "12.8"), nvcc13)
    assert mismatch.status == "fail" and "major" in mismatch.detail
    assert doctor.check_torch(cuda_env.TorchInfo("2.13.0+cpu", None, "torch is a CPU build"), nvcc13).status == "warn"


def test_arch_list(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert cuda_env.arch_list("9.0") == (["9.0a"], "--arch")
    assert cuda_env.arch_list("sm_90a;8.0") == (["8.0", "9.0a"], "--arch")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
    assert cuda_env.arch_list() == (["9.0a"], "TORCH_CUDA_ARCH_LIST")
    assert cuda_env.arch_list(gpus=cuda_env.Gpus()) == (["9.0a"], "TORCH_CUDA_ARCH_LIST")
    with pytest.raises(ValueError, match="not a CUDA arch"):
        cuda_env.arch_list("hopper")


def test_patch_marker_is_read_without_importing_the_engine(tmp_path, monkeypatch):
    # A stand-in package directory, only to exercise the marker reader: importing it would raise.
    pkg = tmp_path / "dspark_fake_engine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('doctor must not import the engine')\n")
    (pkg / "_dspark.py").write_text('SERIES = "vllm/v0.32.0"\nPATCHES = ["0001-a.patch", "0002-b.patch"]\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert doctor.patch_marker("dspark_fake_engine") == {"SERIES": "vllm/v0.32.0",
                                                         "PATCHES": ["0001-a.patch", "0002-b.patch"]}
    assert doctor.patch_marker("json") == {}  # a real package without our marker
    assert doctor.patch_marker("no_such_module_here") is None


def test_cli_json_and_exit_code():
    out = subprocess.run([sys.executable, "-m", "dspark_cli", "doctor", "--json"], capture_output=True, text=True)
    report = json.loads(out.stdout)
    failed = any(c["status"] == "fail" for c in report["checks"])
    assert report["ok"] is not failed
    assert out.returncode == (1 if failed else 0)
    assert all(set(c) == {"name", "status", "detail", "hint"} for c in report["checks"])


def test_cli_human_output_and_bad_cuda_home(tmp_path):
    env = {**__import__("os").environ, "CUDA_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "dspark_cli", "doctor"], capture_output=True, text=True, env=env)
    assert out.returncode == 1  # a CUDA_HOME with no toolkit in it is a failure
    line = next(l for l in out.stdout.splitlines() if "CUDA_HOME" in l)
    assert line.startswith("fail") and "has no bin/nvcc" in line
    assert "Traceback" not in out.stderr
