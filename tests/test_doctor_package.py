"""`pip install .` gives a working `dspark` command: the non-editable install that
.ci/prepare.d/05-package.sh makes in its own venv (DSPARK_PACKAGE_DSPARK), run outside the checkout."""

import json
import os
import subprocess
from pathlib import Path

import pytest

DSPARK = os.environ.get("DSPARK_PACKAGE_DSPARK")
pytestmark = pytest.mark.skipif(not DSPARK, reason="DSPARK_PACKAGE_DSPARK unset (CI: .ci/prepare.d/05-package.sh)")


def run(*args, cwd):
    return subprocess.run([DSPARK, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_installed_command_runs_help_and_doctor(tmp_path):
    helped = run("--help", cwd=tmp_path)
    assert helped.returncode == 0 and "doctor" in helped.stdout and "apply" in helped.stdout
    doctor = run("doctor", "--json", cwd=tmp_path)
    report = json.loads(doctor.stdout)
    assert doctor.returncode == (0 if report["ok"] else 1)
    assert {c["name"] for c in report["checks"]} >= {"python", "git", "cuda toolkit", "CUDA_HOME"}
    assert "Traceback" not in doctor.stderr
    assert os.path.dirname(DSPARK) in next(c for c in report["checks"] if c["name"] == "python")["detail"]


def test_installed_command_finds_compat_yaml(tmp_path):
    out = run("compat", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    pins = [p for e in json.loads(out.stdout)["engines"].values() for p in e["pins"].values()]
    for pin in pins:  # every series ships with the package, lock included
        series = Path(pin["patches"])
        assert (series / "series").is_file() and (series / "series.lock").is_file(), series
        assert "site-packages" in str(series)


def test_installed_package_carries_the_cuda_sources(tmp_path):
    """`dspark build` from a non-editable install compiles the package's copy of csrc/ (it looked
    for csrc/ beside site-packages and failed with a traceback)."""
    from dspark_cli import build

    python = str(Path(DSPARK).with_name("python"))
    out = subprocess.run([python, "-c", "from dspark_cli import build; print(build.CSRC); print(build.source_hash())"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    csrc, digest = out.stdout.split()
    assert "site-packages" in csrc and digest == build.source_hash()


@pytest.mark.parametrize("target", ["ops", "tgi", "vllm"])
def test_installed_verify_without_torch_or_engine_is_one_line_and_exit_3(tmp_path, target):
    """The package alone has no torch: `verify ops` / `verify tgi` say so; `verify vllm` needs none
    here (the engine's Python runs the models) and says it found no patched vLLM."""
    proc = subprocess.run([DSPARK, "verify", target], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "DSPARK_VLLM_PYTHON": str(Path(DSPARK).with_name("python"))})
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    said = "has no DSpark-patched vLLM" if target == "vllm" else "error: torch is not installed"
    assert said in proc.stderr, proc.stderr


@pytest.mark.parametrize("target", ["ops", "tgi"])
def test_installed_verify_with_a_torch_that_does_not_import_is_one_line_and_exit_3(tmp_path, target):
    """torch installed (its version.py is read) but failing to import, as with a missing CUDA
    library: the checks' own `import torch` was an ImportError traceback, exit 1."""
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "version.py").write_text("__version__ = '2.13.0'\ncuda = None\n")
    (stub / "__init__.py").write_text('raise ImportError("libcudnn.so.9: cannot open shared object file")\n')
    proc = subprocess.run([DSPARK, "verify", target], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(stub.parent)})
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip() == ("error: torch 2.13.0 is installed but does not import: libcudnn.so.9: cannot open "
                                   "shared object file; reinstall torch (pip install --force-reinstall "
                                   "torch==<the version you need>)"), proc.stderr


def test_installed_profile_without_torch_names_what_to_install(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    proc = run("profile", "--model", str(tmp_path), "--out", str(tmp_path / "sps.json"), cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip() == "error: dspark profile needs torch, which is not installed in this Python (pip install torch)"


def test_installed_profile_of_a_missing_model_is_bad_input_before_torch_is_needed(tmp_path):
    proc = run("profile", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "sps.json"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: --model {tmp_path / 'no-model'}: no config.json at {tmp_path / 'no-model'}"


def test_installed_build_extra_brings_numpy(tmp_path):
    """torch warns 'Failed to initialize NumPy' in `dspark build` without it."""
    python = str(Path(DSPARK).with_name("python"))
    out = subprocess.run([python, "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('dspark')))"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    build_extra = {line.split(";")[0].strip() for line in out.stdout.splitlines() if 'extra == "build"' in line}
    assert {"torch>=2.11", "ninja", "numpy"} <= build_extra, out.stdout
