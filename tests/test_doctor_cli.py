"""`dspark doctor` as a command: typer's CliRunner, the JSON schema, exit codes, a real process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from typer.testing import CliRunner

from dspark_cli import doctor
from dspark_cli.cli import app
from tests.run_cli import run_dspark

CHECK_KEYS = {"name", "status", "detail", "hint"}


def assert_schema(report: dict) -> None:
    failed = [c["name"] for c in report["checks"] if c["status"] == "fail"]
    if failed:  # the failure's fields, as rebase's and build --self-test's reports carry them
        assert set(report) == {"ok", "checks", "error", "exit_code"} and report["exit_code"] == 1
        assert report["error"] == f"doctor: {', '.join(failed)} failed"
    else:
        assert set(report) == {"ok", "checks"}
    names = [c["name"] for c in report["checks"]]
    assert len(names) == len(set(names)), "one line per check"
    for check in report["checks"]:
        assert set(check) == CHECK_KEYS
        assert check["status"] in ("ok", "warn", "fail")
        assert isinstance(check["name"], str) and isinstance(check["detail"], str)
        assert check["hint"] is None or isinstance(check["hint"], str)
    assert report["ok"] is not any(c["status"] == "fail" for c in report["checks"])


def test_json_schema_and_exit_code_through_cli_runner():
    result = CliRunner().invoke(app, ["doctor", "--json"])
    report = json.loads(result.stdout)
    assert_schema(report)
    assert result.exit_code == (0 if report["ok"] else 1)


def test_failed_check_exits_1_and_prints_the_hint(tmp_path):
    empty = tmp_path / "no-toolkit-here"
    empty.mkdir()
    result = run_dspark("doctor", env={"CUDA_HOME": str(empty)})
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.split()[1:2] == ["CUDA_HOME"])
    assert lines[i].startswith("fail") and f"{empty} has no bin/nvcc" in lines[i]
    assert "→" in lines[i + 1]  # the fix hint on the next line
    # a CI log's last line says what failed (it was empty: the report alone, exit 1)
    failed = [c["name"] for c in json.loads(run_dspark("doctor", "--json", env={"CUDA_HOME": str(empty)}).stdout)["checks"]
              if c["status"] == "fail"]
    assert "CUDA_HOME" in failed and result.stderr == f"error: doctor: {', '.join(failed)} failed\n", result.stderr


def test_only_a_failed_check_exits_1():
    """Warnings alone (e.g. CI: no GPU and a CPU torch) exit 0; whatever this machine reports, the
    exit code and `ok` follow from the statuses."""
    result = CliRunner().invoke(app, ["doctor", "--json", "--workdir", "/nonexistent/dspark-work"])
    report = json.loads(result.stdout)
    failed = any(c["status"] == "fail" for c in report["checks"])
    assert (result.exit_code, report["ok"]) == ((1, False) if failed else (0, True))
    disk = next(c for c in report["checks"] if c["name"] == "disk (workdir)")
    assert disk["detail"].endswith("at /nonexistent/dspark-work")


def test_real_dspark_process():
    script = Path(sys.executable).with_name("dspark")
    dspark = str(script) if script.exists() else shutil.which("dspark")
    if not dspark:
        pytest.skip("no `dspark` command installed here (pip install -e . makes one)")
    out = subprocess.run([dspark, "doctor", "--json"], capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout)
    assert_schema(report)
    assert out.returncode == (0 if report["ok"] else 1)
    assert "Traceback" not in out.stderr


def test_malformed_compat_yaml_is_one_failed_check(tmp_path):
    bad = tmp_path / "compat.yaml"
    bad.write_text("schema: 1\nengines: [vllm]\n")
    result = CliRunner().invoke(app, ["doctor", "--json"], env={"DSPARK_COMPAT": str(bad)})
    report = json.loads(result.stdout)
    assert_schema(report)
    assert result.exit_code == 1
    check = report["checks"][-1]
    assert check["name"] == "compat.yaml" and check["status"] == "fail"
    assert check["detail"].startswith(f"{bad}:2: engines: expected a mapping") and "DSPARK_COMPAT" in check["hint"]


@pytest.mark.parametrize("kind", ["file", "under-a-file", "proc", "read-only"])
def test_a_cache_dspark_cannot_write_fails_with_the_fix(tmp_path, kind):
    """Was `ok disk (cache)` and exit 0, while dspark build then exits 3 on that cache."""
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    cache = {"file": a_file, "under-a-file": a_file / "cache", "proc": Path("/proc/dspark-cache"),
             "read-only": tmp_path / "ro" / "cache"}[kind]
    if kind == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only directory")
        (tmp_path / "ro").mkdir(mode=0o555)
    out = run_dspark("doctor", "--json", env={"DSPARK_CACHE": str(cache)})
    assert out.returncode == 1 and out.stderr.startswith("error: doctor: ") and "disk (cache)" in out.stderr, out.stderr
    check = next(c for c in json.loads(out.stdout)["checks"] if c["name"] == "disk (cache)")
    assert check["status"] == "fail" and check["detail"].startswith(f"DSPARK_CACHE {cache}"), check
    assert "DSPARK_CACHE" in check["hint"]


@pytest.mark.parametrize("under", [False, True])
def test_a_workdir_apply_would_refuse_fails(tmp_path, under):
    """Was `ok disk (workdir)` for a file, where `dspark apply -C` then refuses."""
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    workdir = a_file / "sub" if under else a_file
    out = run_dspark("doctor", "--json", "-C", str(workdir))
    check = next(c for c in json.loads(out.stdout)["checks"] if c["name"] == "disk (workdir)")
    assert out.returncode == 1 and check["status"] == "fail" and "not a directory" in check["detail"], check
    assert "--workdir" in check["hint"]


def test_a_cache_not_made_yet_is_fine_and_left_unmade(tmp_path):
    cache = tmp_path / "new" / "cache"
    out = run_dspark("doctor", "--json", env={"DSPARK_CACHE": str(cache)})
    check = next(c for c in json.loads(out.stdout)["checks"] if c["name"] == "disk (cache)")
    assert check["status"] == "ok" and check["detail"].endswith(f"at {cache}")
    assert list(tmp_path.iterdir()) == []  # the probe directory is gone again


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_a_broken_nvcc_on_path_is_a_warning_with_the_fix(tmp_path):
    """Was `ok cuda toolkit` with another toolkit's nvcc and no word about the one on PATH."""
    (tmp_path / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "nvcc").chmod(0o755)
    out = run_dspark("doctor", env={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "CUDA_HOME": ""})
    lines = out.stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if "cuda toolkit" in line)
    assert lines[i].startswith("warn") and lines[i].endswith(
        f"; {tmp_path / 'nvcc'}, first on PATH, was ignored: `nvcc --version` exits 1"), lines[i]
    assert f"→ repair or remove {tmp_path / 'nvcc'}, or put " in lines[i + 1] and "before it on PATH" in lines[i + 1]


def test_doctor_text_shows_the_hint_of_a_warning(monkeypatch):
    """docs/doctor.md: a warn line carries its fix hint as a fail line does."""
    checks = [doctor.Check("python", "ok", "3.12", "never shown"),
              doctor.Check("ninja", "warn", "not found", "pip install ninja")]
    monkeypatch.setattr(doctor, "run_checks", lambda workdir=None: checks)
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "pip install ninja" in result.stdout and "never shown" not in result.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_a_broken_nvcc_printing_bytes_that_are_not_utf8_is_a_warning_not_a_traceback(tmp_path):
    """Was a UnicodeDecodeError traceback and no JSON: every probe decoded tool output strictly."""
    (tmp_path / "nvcc").write_text("#!/bin/sh\nprintf 'nvcc: \\377\\376 broken\\n' >&2\nexit 1\n")
    (tmp_path / "nvcc").chmod(0o755)
    out = run_dspark("doctor", "--json", env={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "CUDA_HOME": ""})
    assert "Traceback" not in out.stderr, out.stderr
    report = json.loads(out.stdout)
    assert_schema(report)
    check = next(c for c in report["checks"] if c["name"] == "cuda toolkit")
    assert check["status"] == "warn" and f"{tmp_path / 'nvcc'}, first on PATH, was ignored: `nvcc --version` exits 1" \
        in check["detail"], check


def test_a_ninja_that_does_not_run_is_a_warning_with_the_fix(tmp_path):
    """Was `ok ninja  (/path/ninja)`, with no version, while dspark build failed on it."""
    (tmp_path / "ninja").write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named ninja' >&2\nexit 1\n")
    (tmp_path / "ninja").chmod(0o755)
    out = run_dspark("doctor", "--json", env={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    report = json.loads(out.stdout)
    assert_schema(report)
    check = next(c for c in report["checks"] if c["name"] == "ninja")
    assert check["status"] == "warn" and check["detail"] == (
        f"{tmp_path / 'ninja'} does not run: `ninja --version` exits 1 (ModuleNotFoundError: No module named ninja)")
    assert "pip install --force-reinstall ninja" in check["hint"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_a_missing_nvcc_ccbin_is_named_not_the_toolkit(tmp_path):
    """nvcc reads $NVCC_CCBIN: one that is not there was "cannot compile an empty .cu file with its
    default host compiler (/usr/bin/gcc) ... this nvcc's toolkit is incomplete"."""
    out = run_dspark("doctor", "--json", env={"NVCC_CCBIN": str(tmp_path / "gcc-99"), "CC": ""})
    report = json.loads(out.stdout)
    assert_schema(report)
    check = next(c for c in report["checks"] if c["name"] == "c++ compiler")
    assert check["status"] == "fail" and check["detail"].startswith(f"$NVCC_CCBIN is {tmp_path / 'gcc-99'}, which is "
                                                                    "not an executable"), check
    assert check["hint"] == "set NVCC_CCBIN to an installed host compiler, or unset it"


def test_torch_cuda_arch_list_native_without_a_gpu_is_a_warning_not_a_failure():
    """Was `fail arch list  TORCH_CUDA_ARCH_LIST: not a CUDA arch: 'native'` (torch's own value)."""
    out = run_dspark("doctor", "--json", env={"TORCH_CUDA_ARCH_LIST": "native"})
    report = json.loads(out.stdout)
    assert_schema(report)
    check = next(c for c in report["checks"] if c["name"] == "arch list")
    gpu = next(c for c in report["checks"] if c["name"] == "gpu")
    if gpu["status"] == "ok":  # a GPU machine: its archs, detected
        assert check["status"] == "ok" and check["detail"].endswith("(detected GPU)"), check
    else:
        assert check["status"] == "warn" and "no GPU for TORCH_CUDA_ARCH_LIST=native" in check["detail"], check


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_a_blank_nvcc_ccbin_counts_as_unset_as_in_the_build():
    """dspark build drops an empty compiler variable; doctor's probe passed NVCC_CCBIN='' to nvcc, which
    then failed ("Failed to preprocess host compiler properties"), blamed on the toolkit."""
    out = run_dspark("doctor", "--json", env={"NVCC_CCBIN": "", "CC": ""})
    check = next(c for c in json.loads(out.stdout)["checks"] if c["name"] == "c++ compiler")
    assert check["status"] == "ok" and "accepts its default host compiler" in check["detail"], check


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("where", ["PATH", "CUDA_HOME"])
def test_a_path_that_cannot_be_looked_at_is_reported_not_the_end_of_the_report(tmp_path, where):
    """A PATH directory or CUDA_HOME that stat refuses (a name too long here; as another user, a
    directory it may not search: tested below) stopped doctor with "error: .../nvcc: File name too
    long", exit 3, no report."""
    odd = tmp_path / ("x" * 300)
    env = {"PATH": f"{odd}{os.pathsep}{os.environ['PATH']}", "CUDA_HOME": ""} if where == "PATH" else {"CUDA_HOME": str(odd)}
    out = run_dspark("doctor", "--json", env=env)
    report = json.loads(out.stdout)
    assert_schema(report)
    checks = {c["name"]: c for c in report["checks"]}
    if where == "PATH":
        assert checks["cuda toolkit"]["status"] == "ok", checks["cuda toolkit"]
    else:
        assert checks["CUDA_HOME"]["status"] == "fail" and checks["CUDA_HOME"]["detail"].endswith(
            f"{odd} cannot be read (File name too long)"), checks["CUDA_HOME"]


@pytest.mark.skipif(shutil.which("nvcc") is None or os.geteuid() == 0,
                    reason="needs nvcc, and a user the directory's mode binds (root searches any)")
def test_a_path_directory_it_may_not_search_is_passed_over(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    try:
        out = run_dspark("doctor", "--json", env={"PATH": f"{locked}{os.pathsep}{os.environ['PATH']}", "CUDA_HOME": ""})
        report = json.loads(out.stdout)
        assert_schema(report)
        assert next(c for c in report["checks"] if c["name"] == "cuda toolkit")["status"] == "ok"
    finally:
        locked.chmod(0o755)
