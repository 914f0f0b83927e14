"""`dspark build --engine tgi`: the patched TGI server goes into the Python that runs dspark.

Real throughout: trees are applied with our series machinery (real git), `dspark` runs as a
subprocess under a throwaway venv's own interpreter (our package pip-installed into it, as a user
would), grpc_tools compiles the proto, pip installs. Two trees: a small constructed one with TGI's
layout (runs everywhere; a marker patch applied through a test compat.yaml), and the real
v3.3.7 tree from DSPARK_TGI_SRC (skipped with the reason when it is absent).
Needs a package index for pip (setuptools for the build, grpcio-tools, our package's dependencies).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_cli import applier, compat, oplock
from tests.git_fixtures import git, isolate_git, make_series, tree_fingerprint
from tests.tgi_tree import TGI_SRC, needs_tree

REPO = Path(__file__).resolve().parents[1]
MARKER = Path("server/text_generation_server/_dspark.py")
# The versions of the shard venv (.ci/prepare.d/41-tgi-shard.sh): usually in pip's cache already.
GEN_TOOLS = ["grpcio-tools==1.70.0", "protobuf==5.29.3"]

MINI_PROTO = """syntax = "proto3";
package generate.v3;

service TextGenerationService {
  rpc Health (HealthRequest) returns (HealthResponse) {}
}
message HealthRequest {}
message HealthResponse {}
message Request {
  uint64 id = 1;
  string inputs = 2;
}
"""
MINI_PYPROJECT = """[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "text-generation-server"
version = "0.0.1"
dependencies = ["protobuf>=5.26"]

[project.optional-dependencies]
grpc = ["grpcio>=1.60"]

[tool.setuptools.packages.find]
include = ["text_generation_server*"]
"""


def make_mini_tgi(root: Path) -> Path:
    """A git repository with TGI's layout where it matters to us: proto/v3/generate.proto, a
    server/ package (pyproject, text_generation_server/pb/ with TGI's .gitignore), requirements_gen.txt."""
    repo = root / "mini-tgi"
    pkg = repo / "server" / "text_generation_server"
    (pkg / "pb").mkdir(parents=True)
    (repo / "proto" / "v3").mkdir(parents=True)
    (repo / "proto" / "v3" / "generate.proto").write_text(MINI_PROTO)
    (repo / "server" / "pyproject.toml").write_text(MINI_PYPROJECT)
    (repo / "server" / ".gitignore").write_text("*.egg-info/\nbuild/\n__pycache__/\n")
    (repo / "server" / "requirements_gen.txt").write_text("".join(f"{r}\n    # via test\n" for r in GEN_TOOLS))
    (pkg / "__init__.py").write_text("")
    (pkg / "pb" / ".gitignore").write_text("*.py\n*.pyi\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "mini TGI")
    git(repo, "tag", "v3.3.7")
    return repo


MINI_MARKER = """SERIES = "tgi/v3.3.7"
PATCHES = ["0001-dspark-marker-module.patch"]
"""


def apply_mini(root: Path, name: str = "ws") -> Path:
    """`dspark apply tgi` onto the mini tree: a compat.yaml pinning it as tgi v3.3.7 with a
    one-patch series (made with git format-patch) that adds a marker naming just that patch."""
    upstream = make_mini_tgi(root) if not (root / "mini-tgi").exists() else root / "mini-tgi"
    series_dir = root / "series-tgi"
    if not series_dir.exists():
        make_series(root, upstream, series_dir.name, "v3.3.7", [("dspark: marker module", {str(MARKER): MINI_MARKER})])
    path = root / "compat.yaml"
    path.write_text(f"""schema: 1
engines:
  tgi:
    repository: {upstream}
    module: text_generation_server
    distributions: [text-generation-server]
    default_pin: v3.3.7
    pins:
      v3.3.7:
        commit: {git(upstream, "rev-parse", "HEAD")}
        tag: v3.3.7
        patches: {series_dir}
        releases: []
        python: ">=3.9"
        torch: ">=2.4"
        cuda: ">=12.1"
        tested:
          ci: tests
""")
    workdir = root / name
    applier.apply(compat.load(path), applier.ApplyRequest(engine="tgi", workdir=workdir))
    return workdir


def dspark(python: Path | str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "dspark_cli", *args], capture_output=True, text=True, cwd=cwd)


def pip(python: Path, *args: str) -> None:
    out = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def target_python(tmp_path_factory) -> Path:
    """A throwaway venv with our package (and its dependencies) pip-installed, no torch."""
    venv = tmp_path_factory.mktemp("target") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip(python, "-e", str(REPO))
    return python


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    isolate_git(monkeypatch, tmp_path)  # also DSPARK_CACHE under tmp_path: the install record lands there
    # the commands read the compat.yaml apply_mini pins the mini tree in, as a user of their own would
    # (the shipped one names another v3.3.7 series: status says so)
    monkeypatch.setenv("DSPARK_COMPAT", str(tmp_path / "compat.yaml"))
    return tmp_path


def error_line(out: subprocess.CompletedProcess) -> str:
    """The one error line, last on stderr (after progress lines and pip's own output)."""
    lines = out.stderr.strip().splitlines()
    assert sum(line.startswith("error:") for line in lines) == 1, out.stderr[-3000:]
    return lines[-1]


def imports(python: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd="/")


def test_mini_tree_no_deps_refusal_then_install_then_rerun(root, target_python):
    ws = apply_mini(root)
    uninstall = subprocess.run([str(target_python), "-m", "pip", "uninstall", "-y", "-q", "grpcio-tools",
                                "text-generation-server"], capture_output=True, text=True)
    assert imports(target_python, "import grpc_tools").returncode != 0, uninstall.stderr
    before = tree_fingerprint(ws)

    # --no-deps with no grpc_tools: refused before anything changes (one line, exit 3, names the step).
    out = dspark(target_python, "build", "--engine", "tgi", "-C", str(ws), "--no-deps")
    assert out.returncode == 3, out.stderr
    assert error_line(out).startswith("error: step preflight: grpc_tools is not importable")
    assert "grpcio-tools==1.70.0 protobuf==5.29.3" in out.stderr  # the tree's own pins
    assert tree_fingerprint(ws) == before
    assert imports(target_python, "import text_generation_server").returncode != 0

    # Managed deps: the stub generator at the tree's pins, the stubs, the package with its extra.
    out = dspark(target_python, "build", "--engine", "tgi", "-C", str(ws), "--extras", "grpc", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)  # stdout is the JSON alone; pip's output went to stderr
    assert "Successfully installed" in out.stderr
    assert result["python"] == str(target_python)
    assert result["extension"] == {"status": "skipped", "reason": result["extension"]["reason"]}
    assert "torch is not installed" in result["extension"]["reason"]
    assert result["gen_tools"]["status"] == "installed" and result["gen_tools"]["requirements"] == GEN_TOOLS
    assert result["gen_tools"]["version"] == "1.70.0"
    assert result["stubs"]["status"] == "generated"
    installed = {d["name"]: d["version"] for d in result["install"]["installed"]}
    assert installed["text-generation-server"] == "0.0.1"
    assert result["install"]["extras"] == ["grpc"] and result["install"]["deps"] is True
    assert result["check"]["series"] == "tgi/v3.3.7" and result["check"]["version"] == "0.0.1"
    assert result["check"]["marker"] == str(ws / "server" / "text_generation_server" / "_dspark.py")
    assert result["notes"] == []

    # The stubs work as a package (relative import fixed) and the tree shows no change to git.
    pb = ws / "server" / "text_generation_server" / "pb"
    assert "from . import generate_pb2 as generate__pb2" in (pb / "generate_pb2_grpc.py").read_text()
    check = imports(target_python, "from text_generation_server.pb import generate_pb2 as g, generate_pb2_grpc as s;"
                                   "r = g.Request(id=7, inputs='hi'); assert g.Request.FromString(r.SerializeToString()).id == 7;"
                                   "print(s.TextGenerationServiceStub.__name__)")
    assert check.returncode == 0 and check.stdout.strip() == "TextGenerationServiceStub", check.stderr
    assert git(ws, "status", "--porcelain") == ""

    # The record `dspark status` lists.
    status = json.loads(dspark(target_python, "status", "-C", str(ws), "--json").stdout)
    records = {Path(b["file"]).name: b["record"] for b in status["build"]}
    assert records["engine-tgi.json"]["workdir"] == str(ws) and records["engine-tgi.json"]["status"] == "installed"

    # Again with --no-deps: the stubs are there and kept; pip reinstalls only the package.
    stub_bytes = (pb / "generate_pb2.py").read_bytes()
    out = dspark(target_python, "build", "--engine", "tgi", "-C", str(ws), "--no-deps")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "extension  skipped: torch is not installed" in out.stdout
    assert "stubs      present" in out.stdout and "--no-deps" in out.stdout
    assert (pb / "generate_pb2.py").read_bytes() == stub_bytes


def test_pip_failure_removes_the_stubs_it_made(root, target_python):
    """A user commit breaks server/pyproject.toml: pip fails, the step is named, exit 3, and the
    tree is byte-for-byte as before (the stubs this run generated are gone again)."""
    ws = apply_mini(root)
    pip(target_python, *GEN_TOOLS)
    (ws / "server" / "pyproject.toml").write_text(MINI_PYPROJECT.replace('version = "0.0.1"', 'version = "0.0.1'))
    git(ws, "commit", "-q", "-am", "my broken edit")
    before = tree_fingerprint(ws)
    out = dspark(target_python, "build", "--engine", "tgi", "-C", str(ws), "--no-deps", "--json")
    assert out.returncode == 3
    assert json.loads(out.stdout)["exit_code"] == 3  # --json: the error as a document on stdout too
    last = error_line(out)
    assert last.startswith(f"error: step install: `{target_python} -m pip install --no-deps -e {ws / 'server'}` exited ")
    assert last.endswith("(pip's output is above)") and "Illegal character" in out.stderr  # pip's TOML error, streamed
    assert tree_fingerprint(ws) == before
    assert not (ws / "server" / "text_generation_server" / "pb" / "generate_pb2.py").exists()


def test_refuses_trees_that_are_not_applied_tgi_workspaces(root):
    """Exit 2, one line, before any probe of the environment (runs under the dev interpreter, which
    must never get a server installed)."""
    plain = make_mini_tgi(root)
    out = dspark(sys.executable, "build", "--engine", "tgi", "-C", str(plain))
    assert out.returncode == 2 and "is not a dspark workspace" in out.stderr and out.stderr.count("\n") == 1

    ws = apply_mini(root)
    with oplock.exclusive(ws / ".git", ws):  # an apply, revert or rebase running there: its tree may change under pip
        out = dspark(sys.executable, "build", "--engine", "tgi", "-C", str(ws))
    assert out.returncode == 2 and "step workspace: a dspark apply, revert or rebase" in out.stderr
    assert dspark(sys.executable, "revert", "-C", str(ws)).returncode == 0
    out = dspark(sys.executable, "build", "--engine", "tgi", "-C", str(ws))
    assert out.returncode == 2 and "has no server/text_generation_server/_dspark.py" in out.stderr
    assert "dspark apply tgi -C" in out.stderr

    out = dspark(sys.executable, "build", "--engine", "vllm", "-C", str(ws))
    assert out.returncode == 2 and "only tgi" in out.stderr
    out = dspark(sys.executable, "build", "--no-deps")
    assert out.returncode == 2 and "--no-deps goes with --engine" in out.stderr
    out = dspark(sys.executable, "build", "--engine", "tgi", "-C", str(ws), "--wheel", str(root / "w"))
    assert out.returncode == 2 and "--wheel and --self-test" in out.stderr


@needs_tree
def test_real_tgi_tree_installs_and_imports(root, target_python, monkeypatch):
    """The real v3.3.7 tree with our whole series: stubs from TGI's generate.proto, the server
    installed --no-deps (its build requires `kernels`, which pip's isolated build fetches)."""
    monkeypatch.delenv("DSPARK_COMPAT")  # the shipped compat.yaml pins the real tree (root's is for the mini one)
    ws = root / "tgi"
    out = dspark(sys.executable, "apply", "tgi", "--repo", TGI_SRC, "-C", str(ws), "--json")
    assert out.returncode == 0, out.stderr
    pip(target_python, *GEN_TOOLS)
    out = dspark(target_python, "build", "--engine", "tgi", "-C", str(ws), "--no-deps", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["series"] == "tgi/v3.3.7" and len(result["patches"]) == 5
    assert result["stubs"]["status"] == "generated" and result["install"]["deps"] is False
    assert [d["name"] for d in result["install"]["installed"]] == ["text-generation-server"]
    assert result["check"]["version"] == "2.0.5.dev0"
    check = imports(target_python, "from text_generation_server.pb import generate_pb2 as g, generate_pb2_grpc as s;"
                                   "import text_generation_server._dspark as d; print(d.SERIES, len(g.Request.DESCRIPTOR.fields),"
                                   " s.TextGenerationServiceStub.__name__)")
    assert check.returncode == 0, check.stderr
    series, fields, stub = check.stdout.split()
    assert series == "tgi/v3.3.7" and int(fields) >= 8 and stub == "TextGenerationServiceStub"
    assert (target_python.parent / "text-generation-server").is_file()  # TGI's console script
    assert git(ws, "status", "--porcelain") == ""


def test_the_extension_step_skips_without_a_toolchain_and_fails_on_a_build_error(tmp_path, monkeypatch):
    """docs: a missing or mismatched toolchain skips the extension (the server runs on the PyTorch
    fallbacks), a compile error stops the install before anything is installed, and --force
    rebuilds."""
    from types import SimpleNamespace

    from dspark_cli import build, engine_install
    from dspark_cli.errors import EnvironmentProblem

    def no_nvcc(arch):
        raise EnvironmentProblem("nvcc not found")

    request = engine_install.EngineInstall(workdir=tmp_path, force=True)
    monkeypatch.setattr(build, "plan", no_nvcc)
    assert engine_install.build_extension(request, print) == {"status": "skipped", "reason": "nvcc not found"}
    calls = []

    def failing_build(arch, jobs, force, verbose, planned):
        calls.append(force)
        raise EnvironmentProblem("nvcc exited 1")

    monkeypatch.setattr(build, "plan", lambda arch: SimpleNamespace(archs=["9.0a"], nvcc_version="13.0",
                                                                    torch_version="2.14.1"))
    monkeypatch.setattr(build, "build", failing_build)
    with pytest.raises(engine_install.StepFailed, match="nvcc exited 1; nothing was installed"):
        engine_install.build_extension(request, print)
    assert calls == [True]
