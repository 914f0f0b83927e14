"""`dspark build`'s cache without nvcc: the compile step replaced by one that writes a fake library
(ELF header), records in a DSPARK_CACHE under tmp_path. --force, damaged cached libraries, the good
record surviving a failed build, --wheel checks, --arch errors, --self-test's one JSON document."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from dspark_cli import build, cli, cuda_env
from dspark_cli.errors import EnvironmentProblem, UsageError
from dspark_cli.runtime import cuda_ops
from dspark_cli.workspace import PROGRESS
from tests.run_cli import run_dspark

REAL_COMPILE = build._compile  # the toolchain fixture replaces it


@pytest.fixture
def toolchain(monkeypatch, tmp_path):
    """A CUDA 13 toolchain as plan() sees it, and a compile that writes a fake library (counted)."""
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DSPARK_OPS_LIB", raising=False)
    # this process's torch (the runtime loads a build only under the torch it was made with), as a CUDA 13.0 build
    monkeypatch.setattr(cuda_env, "torch_info", lambda: cuda_env.TorchInfo(torch.__version__, "13.0"))
    monkeypatch.setattr(cuda_env, "resolve_cuda_home", lambda: cuda_env.CudaHome(Path("/usr/local/cuda"), "nvcc"))
    monkeypatch.setattr(cuda_env, "nvcc_info", lambda home=None: cuda_env.Nvcc("/usr/local/cuda/bin/nvcc", "13.0"))
    calls = {"n": 0, "fail": False, "seen": []}

    def fake_compile(p, verbose):
        calls["n"] += 1
        calls["seen"].append(sorted(x.name for x in p.directory.iterdir()))
        if calls["fail"]:
            raise RuntimeError("nvcc: error in markov.cu")
        p.library.write_bytes(b"\x7fELF" + bytes(range(256)) * 4)

    monkeypatch.setattr(build, "_compile", fake_compile)
    PROGRESS.clear()  # as cli.main clears it for each command
    return calls


def test_cached_then_force_rebuilds_from_a_clean_directory(toolchain):
    first = build.build("9.0a")
    assert first.status == "built" and toolchain["n"] == 1
    assert build.build("9.0a").status == "cached" and toolchain["n"] == 1
    stale = Path(first.path).with_name("markov.cuda.o")
    stale.write_bytes(b"old object")  # ninja would call this up to date
    forced = build.build("9.0a", force=True)
    assert forced.status == "built" and toolchain["n"] == 2
    assert "markov.cuda.o" not in toolchain["seen"][-1] and not stale.exists()


@pytest.mark.parametrize("damage", ["truncate", "empty", "not-elf", "same-size-other-bytes"])
def test_a_damaged_cached_library_is_rebuilt_not_cached(toolchain, damage, capfd):
    """and says why: a rebuild takes minutes."""
    first = build.build("9.0a")
    lib = Path(first.path)
    data = lib.read_bytes()
    lib.write_bytes({"truncate": data[:100], "empty": b"", "not-elf": b"MZ" + data[2:],
                     "same-size-other-bytes": data[:-1] + b"!"}[damage])
    problem = build.library_problem(lib)
    assert problem
    capfd.readouterr()
    again = build.build("9.0a")
    assert again.status == "built" and toolchain["n"] == 2 and build.library_problem(lib) is None
    assert capfd.readouterr().err == f"rebuilding {first.key}: its cached library is unusable ({problem})\n"


def test_a_failed_build_keeps_the_last_good_record(toolchain, monkeypatch):
    good = build.build("9.0a")
    toolchain["fail"] = True
    with pytest.raises(EnvironmentProblem, match="build failed"):
        build.build("8.0")
    assert build.last_build()["path"] == good.path and build.last_build()["status"] == "built"
    assert build.read_record(build.LAST_FAILED)["status"] == "failed"
    assert cuda_ops.library_path() == Path(good.path)  # the runtime still finds the good build
    toolchain["fail"] = False
    build.build("8.0")
    assert build.read_record(build.LAST_FAILED) is None


def test_a_failed_forced_build_gives_the_old_library_back(toolchain):
    """--force builds from a clean directory; when that build fails, the old library (where last.json
    points) comes back, still loadable, and the failed build stays beside it for its log."""
    good = build.build("9.0a")
    data = Path(good.path).read_bytes()
    toolchain["fail"] = True
    with pytest.raises(EnvironmentProblem, match=r"build failed in .*\.failed"):
        build.build("9.0a", force=True)
    assert Path(good.path).read_bytes() == data and build.library_problem(Path(good.path)) is None
    assert build.last_build()["path"] == good.path and Path(build.read_record(build.LAST_FAILED)["path"]).name.endswith(".failed")
    assert cuda_ops.library_path() == Path(good.path)
    toolchain["fail"] = False
    assert build.build("9.0a", force=True).status == "built"
    assert not Path(good.path).parent.with_name(Path(good.path).parent.name + ".previous").exists()


def test_a_relative_dspark_cache_records_absolute_paths(toolchain, monkeypatch, tmp_path):
    """DSPARK_CACHE=rel-cache (or ~/...): last.json names the library by an absolute path, which a
    process in another working directory (an engine's server) loads; it was cwd-relative."""
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    monkeypatch.setenv("DSPARK_CACHE", "rel-cache")
    built = build.build("9.0a")
    monkeypatch.chdir(tmp_path / "elsewhere")
    record = json.loads((tmp_path / "here" / "rel-cache" / "build" / "last.json").read_text())
    assert record["path"] == built.path == str(tmp_path / "here" / "rel-cache" / "build" / built.key / "dspark_ops.so")
    assert build.library_problem(Path(record["path"])) is None
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DSPARK_CACHE", "~/cache")
    assert build.build("9.0a").path.startswith(str(tmp_path / "home" / "cache" / "build") + "/")


FAILING_COMPILER = """#!/bin/sh
# a C++ compiler whose compiles (-c) fail as g++ does, with a diagnostic amid other output; g++ for torch's probes
case " $* " in *" -c "*) echo "In file included from tiny.cpp:1:" >&2
  echo "tiny.cpp:3:7: error: stand-in refuses this line" >&2; echo "    3 | int x = ;" >&2; exit 1;; esac
exec g++ "$@"
"""


def tiny_real_build(monkeypatch, tmp_path) -> None:
    """csrc/ as one tiny.cpp built by torch's real cpp_extension, ninja and g++ (no nvcc: minutes
    less; no CUDA source, so no cuBLAS to link)."""
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "tiny.cpp").write_text("int tiny() { return 1; }\n")
    monkeypatch.setattr(build, "CSRC", src)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(build, "_compile", REAL_COMPILE)
    monkeypatch.setattr(build, "_cuda_library_paths", lambda home: ([], "-lm"))


def failing_sources(monkeypatch, tmp_path) -> None:
    """csrc/ as one tiny.cpp and CXX a stand-in compiler that refuses it (FAILING_COMPILER)."""
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "tiny.cpp").write_text("int tiny() { return 1; }\n")
    compiler = tmp_path / "c++"
    compiler.write_text(FAILING_COMPILER)
    compiler.chmod(0o755)
    monkeypatch.setattr(build, "CSRC", src)
    monkeypatch.setenv("CXX", str(compiler))


@pytest.mark.skipif(not (shutil.which("ninja") and shutil.which("g++")), reason="needs ninja and g++")
@pytest.mark.parametrize("forced", [False, True])
def test_a_failed_compile_keeps_its_log_and_names_the_error(toolchain, monkeypatch, tmp_path, forced):
    """torch's real cpp_extension and ninja, a stand-in CXX that fails: the one-line error carries the
    compiler's diagnostic (it carried ninja's last line, "ninja: build stopped: subcommand failed.")
    and the path of build.log, which holds the whole output, in the failed build's directory."""
    failing_sources(monkeypatch, tmp_path)
    if forced:
        good = build.build("9.0a")  # the fixture's fake compile: a library of this key to set aside
    monkeypatch.setattr(build, "_compile", REAL_COMPILE)
    monkeypatch.setattr(build, "_cuda_library_paths", lambda home: ([], "/nonexistent/libcublas.so"))
    with pytest.raises(EnvironmentProblem) as exc:
        build.build("9.0a", force=forced)
    where = Path(build.read_record(build.LAST_FAILED)["path"])
    log = where / build.BUILD_LOG
    assert where.name.endswith(".failed") == forced
    assert str(exc.value) == (f"build failed in {where}: tiny.cpp:3:7: error: stand-in refuses this line; "
                              f"the whole output is in {log}")
    text = log.read_text()
    assert re.search(r"FAILED: (\[code=1\] )?tiny\.o", text) and "int x = ;" in text and "ninja: build stopped" in text
    if forced:
        assert build.last_build()["path"] == good.path and build.library_problem(Path(good.path)) is None


@pytest.mark.skipif(not (shutil.which("ninja") and shutil.which("g++")), reason="needs ninja and g++")
def test_two_builds_in_one_process_write_their_own_library_and_load_neither(toolchain, monkeypatch, tmp_path):
    """torch's real cpp_extension, ninja and g++ on a one-function C++ source (no nvcc: minutes
    less): two builds for different archs in one process each write <key>/dspark_ops.so. Through
    ext.load the second built dspark_ops_v1.so (torch's per-process versioner) and failed "left no
    usable library", and each library was loaded into the building process."""
    tiny_real_build(monkeypatch, tmp_path)
    first, second = build.build("9.0a"), build.build("8.0")
    assert first.status == second.status == "built" and first.key != second.key
    for result in (first, second):
        assert Path(result.path).name == "dspark_ops.so" and build.library_problem(Path(result.path)) is None
        assert result.path not in Path("/proc/self/maps").read_text()
    assert build.build("8.0", force=True).status == "built"


@pytest.mark.skipif(not (shutil.which("ninja") and shutil.which("g++")), reason="needs ninja and g++")
def test_an_empty_compiler_variable_counts_as_unset_in_the_build_too(toolchain, monkeypatch, tmp_path):
    """CXX= (or CC=, PYTORCH_NVCC=) passed our checks as unset, and torch then wrote `cxx = ''` into
    build.ninja: a failure after compiling had started, naming no variable."""
    tiny_real_build(monkeypatch, tmp_path)
    for var in ("CXX", "CC", "PYTORCH_NVCC"):
        monkeypatch.setenv(var, "")
    assert build.build("9.0a").status == "built"
    assert all(os.environ[var] == "" for var in ("CXX", "CC", "PYTORCH_NVCC"))  # given back as they were


def test_a_wheel_path_that_cannot_be_one_is_bad_input(toolchain, tmp_path):
    """A directory where the wheel goes was exit 3 ("Is a directory"), as a disk problem would be."""
    from dspark_cli.errors import UsageError

    result = build.build("9.0a")
    name = build.write_wheel(result, tmp_path / "first").name
    (tmp_path / "second" / name).mkdir(parents=True)
    with pytest.raises(UsageError, match="^cannot write the wheel .*: Is a directory$") as refused:
        build.write_wheel(result, tmp_path / "second")
    assert refused.value.exit_code == 2


def test_first_error_skips_the_command_ninja_echoes():
    output = ("Error building extension 'dspark_ops': [1/3] c++ -c ops.cpp\n[2/3] nvcc -DFATAL_X -c warp.cu\n"
              "FAILED: [code=2] markov.cuda.o\n"
              "/usr/local/cuda/bin/nvcc -Xcudafe --diag_error=20 -DFATAL_IF=1 -c markov.cu\n"
              "markov.cu(12): error: identifier \"x\" is undefined\n1 error detected\n"
              "ninja: build stopped: subcommand failed.\n")
    assert build.first_error(output) == 'markov.cu(12): error: identifier "x" is undefined'
    assert build.first_error("FAILED: dspark_ops.so\nc++ -shared x.o\nld: undefined reference\nninja: stopped\n") \
        == "FAILED: dspark_ops.so"
    assert build.first_error("\n") is None


@pytest.mark.parametrize("killed", ["while compiling", "while swapping back"])
@pytest.mark.parametrize("force", [False, True])
def test_a_killed_forced_build_gives_the_set_aside_library_back(toolchain, killed, force):
    """A --force rebuild killed outright leaves the good library in <key>.previous and <key> without
    one (killed while compiling: partial objects; while putting a failed build's directories back:
    no <key> at all). The next build puts the library back where last.json points: a cache hit, or
    with --force a rebuild that can fail without losing it. It deleted <key>.previous first."""
    good = build.build("9.0a")
    library, data = Path(good.path), Path(good.path).read_bytes()
    directory = library.parent
    aside = directory.with_name(directory.name + ".previous")
    directory.rename(aside)  # what build(force=True) does before compiling
    if killed == "while compiling":
        directory.mkdir()
        (directory / "markov.cuda.o").write_bytes(b"half an object")
    assert build.last_build()["path"] == good.path and not library.exists()
    toolchain["fail"] = force
    if force:
        with pytest.raises(EnvironmentProblem, match="build failed"):
            build.build("9.0a", force=True)
        assert toolchain["n"] == 2 and toolchain["seen"][-1] == []  # built from a clean directory
    else:
        assert build.build("9.0a").status == "cached" and toolchain["n"] == 1
    assert library.read_bytes() == data and build.library_problem(library) is None
    assert build.last_build()["path"] == good.path and not aside.exists()


def test_jobs_below_one_is_bad_usage():
    result = run_dspark("build", "--jobs", "0", "--arch", "9.0a")
    assert result.returncode == 2 and "--jobs" in result.stderr


def test_ctrl_c_in_a_forced_build_gives_the_old_library_back(toolchain, monkeypatch):
    """KeyboardInterrupt is no Exception: the set-aside library must come back on it too."""
    good = build.build("9.0a")

    def interrupted(p, verbose):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_compile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.build("9.0a", force=True)
    assert build.library_problem(Path(good.path)) is None and build.last_build()["path"] == good.path
    assert build.read_record(build.LAST_FAILED)["status"] == "interrupted"
    assert cli._after_interrupt("build") == f"the previous library is back in {Path(good.path).parent}"


def test_ctrl_c_in_a_first_build_says_nothing_was_cached(toolchain, monkeypatch):
    def interrupted(p, verbose):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_compile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.build("9.0a")
    assert build.last_build() is None and build.read_record(build.LAST_FAILED)["status"] == "interrupted"
    assert cli._after_interrupt("build") == "nothing usable was cached: the next build starts over"


def test_ctrl_c_after_the_build_finished_says_it_is_recorded(toolchain):
    """A --self-test or an --engine install after the build: the build is there, not 'as it was'."""
    built = build.build("9.0a")
    assert cli._after_interrupt("build") == f"the build had finished: {built.path} is recorded in last.json"


def test_ctrl_c_in_the_rebuild_of_a_damaged_library_does_not_call_it_the_previous_one(toolchain, monkeypatch):
    lib = Path(build.build("9.0a").path)
    lib.write_bytes(b"")

    def interrupted(p, verbose):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_compile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.build("9.0a")
    assert cli._after_interrupt("build") == "nothing usable was cached: the next build starts over"


def test_a_truncated_elf_without_its_record_is_refused(tmp_path):
    """A link killed before library.json was written leaves no record to compare with: the ELF
    section table past the end still shows the truncation (dlopen of such a file can SIGBUS)."""
    whole = Path(sys.executable).resolve().read_bytes()  # a complete 64-bit ELF file
    lib = tmp_path / "dspark_ops.so"
    lib.write_bytes(whole)
    assert build.library_problem(lib) is None
    lib.write_bytes(whole[:len(whole) // 2])
    assert "truncated" in build.library_problem(lib)


@pytest.mark.parametrize("record", ["[1]", '{"status": "built"}', '{"status": "built", "path": 3}', '"x"'])
def test_a_wrong_shaped_last_json_is_no_build(toolchain, monkeypatch, record):
    root = build.cache_root()
    root.mkdir(parents=True)
    (root / "last.json").write_text(record)
    monkeypatch.setattr(cuda_ops.importlib.util, "find_spec", lambda name: None)  # no installed wheel
    assert cuda_ops.library_path() is None
    monkeypatch.setitem(cuda_ops._state, "tried", False)
    monkeypatch.setitem(cuda_ops._state, "loaded", None)
    assert cuda_ops.load() is None and "last.json" in cuda_ops.load_error()


def test_the_runtime_refuses_a_build_for_another_torch(toolchain, monkeypatch):
    """last.json records the torch a library was built against; under another torch (an engine venv
    upgraded since) the loader refuses it with one line, before dlopen: the library binds to torch's
    C++ ABI. A record from before the field was kept is still loaded."""
    good = build.build("9.0a")
    last = build.cache_root() / build.LAST
    assert json.loads(last.read_text())["torch"] == torch.__version__
    monkeypatch.setattr(cuda_ops.importlib.util, "find_spec", lambda name: None)  # no installed wheel
    assert cuda_ops.library_path() == Path(good.path)
    last.write_text(json.dumps({**json.loads(last.read_text()), "torch": "2.0.0+cu118"}))
    monkeypatch.setitem(cuda_ops._state, "tried", False)
    monkeypatch.setitem(cuda_ops._state, "loaded", None)
    assert cuda_ops.load() is None
    assert cuda_ops.load_error() == (f"no built extension (run dspark build); {last} is a build for torch 2.0.0+cu118, "
                                     f"this is torch {torch.__version__}: run dspark build with this torch")
    record = json.loads(last.read_text())
    del record["torch"]
    last.write_text(json.dumps(record))
    assert cuda_ops.library_path() == Path(good.path)


def test_the_runtime_refuses_a_truncated_library(toolchain, monkeypatch):
    lib = Path(build.build("9.0a").path)
    lib.write_bytes(lib.read_bytes()[:50])
    monkeypatch.setitem(cuda_ops._state, "tried", False)
    monkeypatch.setitem(cuda_ops._state, "loaded", None)
    assert cuda_ops.load() is None and "truncated" in cuda_ops.load_error()


def test_wheel_dir_checks(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(UsageError):
        build.check_wheel_dir(a_file)
    with pytest.raises(UsageError):
        build.check_wheel_dir(a_file / "sub")
    with pytest.raises(EnvironmentProblem):
        build.check_wheel_dir("/proc/dspark-wheels")
    with pytest.raises(UsageError, match="--wheel needs a directory"):
        build.check_wheel_dir("")  # Path("") is the current directory: never what was meant
    assert not build.check_wheel_dir(tmp_path / "new" / "dir").exists()  # checked before a build: nothing made
    assert build.check_wheel_dir(tmp_path / "new" / "dir", create=True).is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "new"]  # no probe left behind


@pytest.mark.parametrize("arch", [";", "1.0", "sm_100f", "sm_x", ""])
def test_bad_arch_is_exit_2_before_anything_is_created(tmp_path, arch):
    cache = tmp_path / "cache"
    out = run_dspark("build", "--arch", arch, "--json", env={"DSPARK_CACHE": str(cache)})
    assert out.returncode == 2, out.stderr
    doc = json.loads(out.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 2 and "arch" in doc["error"]
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert not cache.exists()


@pytest.mark.parametrize("kind, code", [("file", 2), ("proc", 3)])
def test_bad_wheel_dir_is_one_line_before_building(tmp_path, kind, code):
    target = tmp_path / "afile" if kind == "file" else Path("/proc/dspark-wheels")
    if kind == "file":
        target.write_text("x")
    cache = tmp_path / "cache"
    out = run_dspark("build", "--arch", "9.0a", "--wheel", str(target), "--json", env={"DSPARK_CACHE": str(cache)})
    assert out.returncode == code, out.stderr
    assert json.loads(out.stdout)["exit_code"] == code and "--wheel" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (cache / "build").exists()


def test_self_test_json_without_a_gpu_is_one_failure_document(toolchain, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a visible GPU")
    from dspark_cli import cli

    monkeypatch.setitem(cuda_ops._state, "tried", False)
    monkeypatch.setitem(cuda_ops._state, "loaded", None)
    monkeypatch.setattr(sys, "argv", ["dspark", "build", "--arch", "9.0a", "--self-test", "--json"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 3
    doc = json.loads(capsys.readouterr().out)  # exactly one JSON document
    assert doc["ok"] is False and doc["exit_code"] == 3 and "GPU" in doc["error"]
    assert doc["build"]["status"] == "built"
    # the next command in this process fails on its own: its document carries no stale build
    monkeypatch.setattr(sys, "argv", ["dspark", "apply", "nosuch", "--json"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    doc = json.loads(capsys.readouterr().out)
    assert exc.value.code == 2 and doc["exit_code"] == 2 and "build" not in doc


def test_a_failed_self_test_under_json_fails_the_build_document(monkeypatch, capsys):
    """emit() raised a report's failure on stdout only: inside capture_json (build --self-test
    --json folds the self-test's report into its own) it returned, and a CUDA op that disagreed
    with the reference gave {"ok": true} and exit 0. The self-test's own report (run_self_test's
    emit with its failure) stands in for a GPU here."""
    from dspark_cli import selftest
    from dspark_cli.commands.build import _self_test
    from dspark_cli.errors import CheckFailed
    from dspark_cli.output import emit

    def failing_self_test(as_json):
        emit({"ok": False, "results": [{"case": "markov", "ok": False}]}, as_json, lambda r: None,
             CheckFailed("a CUDA op disagrees with the torch reference (see above)"))

    monkeypatch.setattr(selftest, "run_self_test", failing_self_test)
    monkeypatch.setattr(cuda_ops, "load", lambda path=None: path)
    with pytest.raises(CheckFailed, match="disagrees with the torch reference"):
        _self_test({"path": "/nowhere/dspark_ops.so", "status": "cached"}, as_json=True)
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["exit_code"] == 1 and doc["self_test"]["ok"] is False


def test_error_lines_keep_emoji_codes_and_brackets(capsys):
    from dspark_cli.output import emit_error

    emit_error("error", "--device cuda:x: bad [bold]device[/bold]", 2, False)
    err = capsys.readouterr().err
    assert "cuda:x: bad [bold]device[/bold]" in err


@pytest.mark.parametrize("kind", ["file", "under-a-file", "proc"])
def test_a_cache_it_cannot_write_is_one_line_exit_3(toolchain, monkeypatch, tmp_path, capsys, kind):
    """Through the CLI, its toolchain as the fixture's (no CUDA torch here): what doctor fails as
    `disk (cache)` stops the build with one line, before anything is compiled."""
    from dspark_cli import cli

    a_file = tmp_path / "afile"
    a_file.write_text("x")
    cache = {"file": a_file, "under-a-file": a_file / "cache", "proc": Path("/proc/dspark-cache")}[kind]
    monkeypatch.setenv("DSPARK_CACHE", str(cache))
    monkeypatch.setattr(sys, "argv", ["dspark", "build", "--arch", "9.0a", "--json"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    assert exc.value.code == 3 and toolchain["n"] == 0
    assert json.loads(out.out)["error"].startswith(f"cannot create {cache / 'build'} (")
    assert out.err.count("\n") == 1 and "point DSPARK_CACHE at a writable directory" in out.err


def test_a_record_the_cache_cannot_take_is_exit_3_not_bad_usage(toolchain, monkeypatch, tmp_path, capsys):
    """last.json a directory (damaged cache): was exit 2, the exit of a path the user named."""
    from dspark_cli import cli

    build.build("9.0a")
    (tmp_path / "cache" / "build" / build.LAST).unlink()
    (tmp_path / "cache" / "build" / build.LAST).mkdir()
    monkeypatch.setattr(sys, "argv", ["dspark", "build", "--arch", "9.0a", "--json"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 3
    assert json.loads(capsys.readouterr().out)["error"].startswith(
        f"cannot record the build in {tmp_path / 'cache' / 'build' / build.LAST}")


@pytest.mark.parametrize("last_names", ["this library", "another build"])
def test_a_read_only_cache_serves_a_hit_its_record_names(toolchain, monkeypatch, tmp_path, last_names):
    """A shared prebuilt cache mounted read-only: a hit whose library last.json already names needs
    no record (was exit 3 saying "remove it"); one it does not name cannot be loaded through it, so
    that is exit 3 saying to use a writable copy (DSPARK_OPS_LIB would load it without the torch check)."""
    hit = build.build("9.0a")
    if last_names == "another build":
        other = json.loads((tmp_path / "cache" / "build" / build.LAST).read_text()) | {"path": "/elsewhere/x.so"}
        (tmp_path / "cache" / "build" / build.LAST).write_text(json.dumps(other))

    def read_only(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(build, "write_text_atomically", read_only)
    if last_names == "this library":
        assert build.build("9.0a").status == "cached" and toolchain["n"] == 1
        return
    with pytest.raises(EnvironmentProblem, match=re.escape(
            "(Read-only file system); point DSPARK_CACHE at a directory dspark may write (a writable copy of this "
            "one: its library is then a cache hit)")):
        build.build("9.0a")
    assert hit.status == "built"


def test_a_cache_under_a_home_that_cannot_be_found_is_one_line_exit_3(monkeypatch, capsys):
    """DSPARK_CACHE=~nosuchuser/x: was pathlib's RuntimeError traceback, exit 1, nothing on stdout."""
    from dspark_cli import cache_dir

    monkeypatch.setenv("DSPARK_CACHE", "~dspark-no-such-user/x")
    with pytest.raises(EnvironmentProblem, match=r"^DSPARK_CACHE ~dspark-no-such-user/x: Could not determine home "
                                                  r"directory; set DSPARK_CACHE to an absolute directory$"):
        cache_dir()


STAND_IN_COMPILER = """#!/bin/sh
# a compile (-c) that runs until it is stopped, as nvcc on csrc/ takes minutes; g++ for torch's probes
case " $* " in *" -c "*) touch "$STARTED"; exec sleep 300;; esac
exec g++ "$@"
"""
LAUNCH = """import sys, torch.utils.cpp_extension as ext
from dspark_cli import build
build.stopping_children(lambda: ext.load(name="tiny", sources=[sys.argv[1]], build_directory=sys.argv[2],
                                         is_python_module=False))
"""


def processes_with(tag: str) -> list[int]:
    """Live processes whose environment holds `tag` (a zombie's environment reads empty)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if tag.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            pass
    return found


@pytest.mark.skipif(not (shutil.which("ninja") and shutil.which("g++") and Path("/proc/self/environ").exists()),
                    reason="needs ninja, g++ and /proc")
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "Ctrl-C"])
def test_an_interrupted_build_leaves_no_compiler_running(tmp_path, how):
    """torch's cpp_extension runs ninja, ninja a compiler in a process group of its own; the build's
    launch (build.stopping_children, what _compile runs torch's ext.load in) interrupted by a signal to
    the process (SIGINT, SIGTERM) or to its group (Ctrl-C in a terminal) leaves nothing running.
    Before it, SIGINT and SIGTERM to the process left the compiler (and for SIGTERM ninja) running."""
    compiler = tmp_path / "c++"
    compiler.write_text(STAND_IN_COMPILER)
    compiler.chmod(0o755)
    (tmp_path / "tiny.cpp").write_text("int tiny() { return 1; }\n")
    (tmp_path / "build").mkdir()
    tag = f"DSPARK_TEST_TAG={uuid.uuid4().hex}"
    started = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "CXX": str(compiler),
           "STARTED": str(started), tag.split("=")[0]: tag.split("=")[1]}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(tmp_path / "tiny.cpp"), str(tmp_path / "build")],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started.exists(), proc.communicate()[0][-2000:]
        if how == "Ctrl-C":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, getattr(signal, how))
        output = proc.communicate(timeout=60)[0]
        assert "KeyboardInterrupt" in output, output[-2000:]
        deadline = time.monotonic() + 5
        while processes_with(tag) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_with(tag) == []
    finally:
        for pid in processes_with(tag):
            os.kill(pid, signal.SIGKILL)


def test_a_second_build_of_a_key_waits_for_the_first_and_finds_its_library(toolchain, capfd):
    """Two builds of one key at once ran ninja in one directory and moved it under each other
    (torch's own lock went with ext.load). The first here holds the key's lock while it compiles;
    the second, in another thread, waits and then takes the first's library as a cache hit."""
    p = build.plan("9.0a")
    started, release = threading.Event(), threading.Event()
    compile_first = build._compile

    def slow_compile(plan, verbose):
        started.set()
        release.wait(30)
        compile_first(plan, verbose)

    build._compile = slow_compile
    try:
        first = threading.Thread(target=build.build, kwargs={"arch": "9.0a", "planned": p})
        first.start()
        assert started.wait(30)
        second = {}
        waiter = threading.Thread(target=lambda: second.update(result=build.build("9.0a")))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive()  # waiting on the lock, not compiling beside the first
        build._compile = compile_first
        release.set()
        first.join(30)
        waiter.join(30)
    finally:
        build._compile = compile_first
        release.set()
    assert second["result"].status == "cached" and toolchain["n"] == 1
    assert "waiting for another dspark build of" in capfd.readouterr().err


@pytest.mark.skipif(not (shutil.which("ninja") and shutil.which("g++")), reason="needs ninja and g++")
def test_a_failed_verbose_build_points_at_the_output_above_not_at_the_log(toolchain, monkeypatch, tmp_path, capfd):
    """With --verbose torch lets ninja write to stdout and its error holds one line: the message
    said "the whole output is in build.log", which then held only that line."""
    failing_sources(monkeypatch, tmp_path)
    monkeypatch.setattr(build, "_compile", REAL_COMPILE)
    monkeypatch.setattr(build, "_cuda_library_paths", lambda home: ([], "/nonexistent/libcublas.so"))
    with pytest.raises(EnvironmentProblem) as exc:
        build.build("9.0a", verbose=True)
    assert str(exc.value).endswith("(ninja's output is above)") and "build.log" not in str(exc.value)
    assert "stand-in refuses this line" in capfd.readouterr().out


WAITING_COMPILER = """#!/bin/sh
# a compile (-c) that waits for $RELEASE, then compiles as g++ does: a killed build's, still running; g++ otherwise
case " $* " in *" -c "*) touch "$STARTED"; while [ ! -e "$RELEASE" ]; do sleep 0.1; done;; esac
exec g++ "$@"
"""
LAUNCH_INTO = """import sys, torch.utils.cpp_extension as ext
ext._write_ninja_file_and_build_library(
    name="dspark_ops", sources=[sys.argv[1]], extra_cflags=[], extra_cuda_cflags=[], extra_sycl_cflags=[],
    extra_ldflags=[], extra_include_paths=[], build_directory=sys.argv[2], verbose=True, with_cuda=False,
    with_sycl=False)
"""


@pytest.mark.skipif(not (shutil.which("ninja") and shutil.which("g++") and Path("/proc/self/environ").exists()),
                    reason="needs ninja, g++ and /proc")
def test_a_killed_builds_ninja_left_running_cannot_touch_the_next_build(toolchain, monkeypatch, tmp_path):
    """A build killed outright (SIGKILL: no handler runs, its key lock goes) leaves ninja and its
    compiler running in <key> (under --verbose ninja writes to the terminal: no SIGPIPE stops it). The next build of the key resumed ninja there: its library, once
    recorded, was overwritten by the orphan's link (then refused: the sha256 differs). It now builds
    in a fresh directory; the orphan's output goes to the discarded one, removed."""
    compiler = tmp_path / "c++"
    compiler.write_text(WAITING_COMPILER)
    compiler.chmod(0o755)
    (tmp_path / "tiny.cpp").write_text("int tiny() { return 1; }\n")
    p = build.plan("9.0a")
    p.directory.mkdir(parents=True)
    tag = f"DSPARK_TEST_TAG={uuid.uuid4().hex}"
    started, release = tmp_path / "started", tmp_path / "release"
    env = {**os.environ, "CXX": str(compiler), "STARTED": str(started), "RELEASE": str(release),
           tag.split("=")[0]: tag.split("=")[1]}
    killed = subprocess.Popen([sys.executable, "-c", LAUNCH_INTO, str(tmp_path / "tiny.cpp"), str(p.directory)],
                              env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started.exists()
        killed.kill()  # the build's python only: ninja and the compiler run on
        killed.wait()
        assert processes_with(tag)
        built = build.build("9.0a", planned=p)
        assert built.status == "built" and toolchain["seen"][-1] == []  # nothing of the killed build's
        release.touch()  # the orphan compiles and links
        deadline = time.monotonic() + 60
        while processes_with(tag) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_with(tag) == []
    finally:
        release.touch()
        for pid in processes_with(tag):
            os.kill(pid, signal.SIGKILL)
    assert build.library_problem(Path(built.path)) is None and build.build("9.0a").status == "cached"
    assert not list(build.cache_root().glob(p.key + build.STALE + "*"))


def test_a_library_without_its_record_is_no_cache_hit(toolchain):
    """What an orphaned ninja's link leaves (see above): a library, no library.json. It was taken as
    a cache hit (a build from before the records); now the key is built again, from a clean directory."""
    lib = Path(build.build("9.0a").path)
    (lib.parent / build.LIBRARY_RECORD).unlink()
    assert build.build("9.0a").status == "built" and toolchain["n"] == 2 and toolchain["seen"][-1] == []


def test_no_ninja_is_one_line_before_the_key_directory_is_made(toolchain, monkeypatch, tmp_path):
    p = build.plan("9.0a")
    monkeypatch.setenv("PATH", str(tmp_path))  # no ninja
    with pytest.raises(EnvironmentProblem, match="^ninja not found on PATH: pip install ninja"):
        build.build(planned=p)
    assert not build.cache_root().exists() and toolchain["n"] == 0


def test_a_linked_cuda_home_is_the_key_of_its_target(toolchain, monkeypatch, tmp_path):
    """/usr/local/cuda, a link to /usr/local/cuda-13.0, is one toolkit: one key, not two builds."""
    (tmp_path / "cuda-13.0").mkdir()
    (tmp_path / "cuda").symlink_to(tmp_path / "cuda-13.0")
    keys = set()
    for home in ("cuda", "cuda-13.0"):
        monkeypatch.setattr(cuda_env, "resolve_cuda_home", lambda: cuda_env.CudaHome(tmp_path / home, "CUDA_HOME"))
        keys.add(build.plan("9.0a").key)
    assert len(keys) == 1


def test_an_empty_wheel_dir_is_bad_usage_through_the_cli(tmp_path):
    """typer made --wheel '' Path('.'): the wheel went into the current directory, exit 0."""
    (tmp_path / "cwd").mkdir()
    out = run_dspark("build", "--arch", "9.0a", "--wheel", "", "--json", env={"DSPARK_CACHE": str(tmp_path / "cache")},
                     cwd=tmp_path / "cwd")
    assert out.returncode == 2, out.stderr
    assert json.loads(out.stdout)["error"] == "--wheel needs a directory (it was empty)"
    assert len(out.stderr.strip().splitlines()) == 1 and not list((tmp_path / "cwd").iterdir())


@pytest.mark.skipif(not (shutil.which("ninja") and shutil.which("g++")), reason="needs ninja and g++")
def test_json_verbose_keeps_stdout_one_json_document(toolchain, monkeypatch, tmp_path, capfd):
    """torch hands ninja fd 1 under --verbose: its lines went to stdout before the JSON document.
    Under --json they go to stderr."""
    from dspark_cli import cli

    tiny_real_build(monkeypatch, tmp_path)
    monkeypatch.setattr(sys, "argv", ["dspark", "build", "--arch", "9.0a", "--json", "--verbose"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capfd.readouterr()
    assert exc.value.code == 0 and json.loads(out.out)["status"] == "built"
    assert re.search(r"\[2/2\] .*dspark_ops\.so", out.err)  # ninja's link line, on stderr


IMPORT_WITHOUT_CLI_DEPS = """
import importlib, importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("yaml", "git", "typer"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
for module in sys.argv[1:]:
    importlib.import_module(module)
"""


def test_the_build_and_the_gpu_paths_import_without_the_clis_dependencies():
    """Machines that build or run the kernels may lack PyYAML, GitPython and typer (the nvcc build
    test's venv, the GPU device): workspace.py importing compat's loader broke `import
    dspark_cli.build` there, seen only where the CUDA venv runs."""
    modules = ["dspark_cli.build", "dspark_cli.cuda_env", "dspark_cli.runtime", "dspark_cli.runtime.cuda_ops",
               "dspark_cli.selftest", "dspark_cli.integrations.tgi.draft", "dspark_cli.integrations.tgi.kv_pool"]
    out = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_CLI_DEPS, *modules], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_loaders_check_without_sha256_still_compares_the_recorded_size(tmp_path):
    """cuda_ops.load checks with check_sha256=False: the size against library.json is all that
    catches a library overwritten by one of another size there."""
    lib = tmp_path / "dspark_ops.so"
    lib.write_bytes(b"\x7fELF" + bytes(range(256)) * 4)
    size = lib.stat().st_size
    (tmp_path / build.LIBRARY_RECORD).write_text(json.dumps({"size": size + 1, "sha256": "0" * 64}))
    assert build.library_problem(lib, check_sha256=False) == f"{size} bytes, the build wrote {size + 1}"
    (tmp_path / build.LIBRARY_RECORD).write_text(json.dumps({"size": size, "sha256": "0" * 64}))
    assert build.library_problem(lib, check_sha256=False) is None


def test_a_library_cut_inside_its_section_table_is_truncated(tmp_path):
    """The whole section header table must lie within the file, not only its start."""
    whole = Path(sys.executable).resolve().read_bytes()
    shoff = int.from_bytes(whole[0x28:0x30], "little")
    shentsize = int.from_bytes(whole[0x3A:0x3C], "little")
    assert shoff and int.from_bytes(whole[0x3C:0x3E], "little") > 1
    lib = tmp_path / "dspark_ops.so"
    lib.write_bytes(whole[:shoff + shentsize])  # the first section header only
    assert build.library_problem(lib, check_sha256=False).startswith("truncated")


def test_a_ninja_that_does_not_run_is_one_line_naming_it_before_the_key_directory_is_made(toolchain, monkeypatch,
                                                                                           tmp_path):
    """Was torch's "Ninja is required to load C++ extensions (pip install ninja to get it)" for a
    ninja on PATH (pip's script in a moved venv), after a failed build was recorded."""
    p = build.plan("9.0a")
    (tmp_path / "ninja").write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named ninja' >&2\nexit 1\n")
    (tmp_path / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(EnvironmentProblem, match=re.escape(
            f"{tmp_path / 'ninja'} does not run: `ninja --version` exits 1 (ModuleNotFoundError: No module named "
            "ninja); reinstall it")):
        build.build(planned=p)
    assert not build.cache_root().exists() and toolchain["n"] == 0


def test_nvcc_ccbin_is_in_the_key(toolchain, monkeypatch, tmp_path):
    """nvcc compiles the .cu host code with $NVCC_CCBIN when torch passes no -ccbin ($CC unset): another
    host compiler there found the cached library of gcc's build."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("NVCC_CCBIN", raising=False)
    plain = build.plan("9.0a").key
    other = tmp_path / "gcc-other"  # a real compiler, reporting another version
    other.write_text(f'#!/bin/sh\ncase "$*" in *-dumpversion*) echo 99.1.0;; *) exec {shutil.which("gcc")} "$@";; esac\n')
    other.chmod(0o755)
    monkeypatch.setenv("NVCC_CCBIN", str(other))
    assert build.plan("9.0a").key != plain
    assert cuda_env.host_compilers()["ccbin"] == f"{other} 99.1.0"
    monkeypatch.setenv("CC", shutil.which("gcc"))  # torch passes -ccbin $CC: nvcc does not read NVCC_CCBIN then
    assert cuda_env.host_compilers()["ccbin"].startswith(f"{os.path.realpath(shutil.which('gcc'))} ")
    monkeypatch.delenv("CC")
    keys = set()
    for name in ("gcc-dir-a", "gcc-dir-b"):  # nvcc takes a directory too: which one is in the key
        (tmp_path / name).mkdir()
        monkeypatch.setenv("NVCC_CCBIN", str(tmp_path / name))
        keys.add(build.plan("9.0a").key)
    assert len(keys) == 2
    shutil.copy(other, tmp_path / "gcc-dir-b" / "gcc")  # nvcc runs <dir>/gcc: its version is in the key
    assert cuda_env.host_compilers()["ccbin"] == f"{tmp_path / 'gcc-dir-b' / 'gcc'} 99.1.0"
    monkeypatch.setenv("NVCC_CCBIN", str(tmp_path / "missing-gcc"))
    with pytest.raises(EnvironmentProblem, match=re.escape(f"$NVCC_CCBIN is {tmp_path / 'missing-gcc'}, which is not")):
        build.plan("9.0a")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("variable", ["CUDA_HOME", "CUDA_PATH"])
def test_cuda_home_at_another_cuda_than_torchs_names_the_toolkit_here(monkeypatch, tmp_path, variable):
    """Was "install the CUDA 13.x toolkit", with one on PATH: CUDA_HOME pointed elsewhere. The real
    nvcc on PATH; CUDA_HOME a toolkit of the major before (its nvcc a script reporting it)."""
    real = cuda_env._nvcc_toolkit_root(shutil.which("nvcc"))
    version = cuda_env.nvcc_info(cuda_env.CudaHome(real, "nvcc")).version
    old = tmp_path / "cuda-old"
    for part in ("bin", "lib64", "include"):
        (old / part).mkdir(parents=True)
    (old / "lib64" / "libcudart.so").write_text("")
    (old / "include" / "cuda_runtime.h").write_text("")
    (old / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 9.2, V9.2.1'\n")
    (old / "bin" / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv(variable, str(old))
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cuda_env, "torch_info", lambda: cuda_env.TorchInfo("2.14.1+cu", version))  # a CUDA torch
    with pytest.raises(EnvironmentProblem, match=re.escape(
            f"{variable}={old} is CUDA 9.2 but torch 2.14.1+cu was built for CUDA {version}: export {variable}={real} "
            f"(a CUDA {version.split('.')[0]}.x toolkit here)")):
        build.plan("9.0a")
    assert not (tmp_path / "cache").exists()
