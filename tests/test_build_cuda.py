"""A real nvcc build of csrc/ (sm_90a) in the CUDA torch venv that .ci/prepare.d/20-cuda-torch.sh
makes ($DSPARK_CUDA_TORCH_PYTHON), run in a subprocess: the library links, loads without a GPU,
registers its ops with Meta implementations (symbolic: torch.compile(dynamic=True) compiles once across
batch sizes), and a second build is a cache hit."""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

PYTHON = os.environ.get("DSPARK_CUDA_TORCH_PYTHON")
ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, torch
from dspark_cli.build import build, last_build, write_wheel
from dspark_cli.runtime import cuda_ops
first = build(arch="sm_90a", jobs=2)
wheel = write_wheel(first, WHEEL_DIR)
second = build(arch="sm_90a")  # (its time: bench/gpu_run.sh prints it; a test does not time)
assert cuda_ops.load(first.path) == first.path, cuda_ops.load_error()
meta = lambda *s, dtype=torch.float32: torch.empty(*s, device="meta", dtype=dtype)
outs = torch.ops.dspark.markov_chain(meta(3, 7, 1000, dtype=torch.bfloat16), meta(3, dtype=torch.long),
                                     meta(1000, 64, dtype=torch.bfloat16), meta(1000, 64, dtype=torch.bfloat16),
                                     meta(3), meta(3, dtype=torch.long), False)
ell = torch.ops.dspark.schedule_production(meta(4, 7), meta(5, 7), meta(9), 8)
L = lambda *s: meta(*s, dtype=torch.long)
rej = torch.ops.dspark.rejection_sample(meta(20, 1000), L(3), L(3), L(3, 7), meta(3, 7), None,
                                        meta(3, 7, 1000, dtype=torch.bfloat16), L(3), meta(1000, 64, dtype=torch.bfloat16),
                                        meta(1000, 64, dtype=torch.bfloat16), meta(3), None, L(3), row_stats=meta(3, 7, 2))
# torch.compile(dynamic=True, fullgraph=True) over three batch sizes: the Meta impls build their
# outputs from the inputs' sym sizes, so each function compiles once (recompile_limit 1: a second
# compilation of the frame fails); markov_chain with the confidence head and top-k/top-p gives
# non-empty conf_logits and thresholds.
import torch._dynamo
from torch._dynamo.utils import counters
torch._dynamo.config.recompile_limit = 1
bf = lambda *s: meta(*s, dtype=torch.bfloat16)
G, V, RANK, D = 7, 1000, 64, 32
def chain(U, anchors, w1, w2, T, seeds, h, cw, cb, k, p):
    return torch.ops.dspark.markov_chain(U, anchors, w1, w2, T, seeds, True, h, cw, cb, k, p)
def chain_lazy(U, anchors, w1, w2, T, seeds):
    return torch.ops.dspark.markov_chain(U, anchors, w1, w2, T, seeds, False)
def sched(a_stale, a_now, dense):
    return torch.ops.dspark.schedule_production(a_stale, a_now, dense, 8)
def rej_op(target, ell, tokens, q_token, U, anchors, w1, w2, T, seeds, row_stats, thresholds, target_stats=None):
    return torch.ops.dspark.rejection_sample(target, None, ell, tokens, q_token, None, U, anchors, w1, w2, T, None,
                                             seeds, row_stats, G + 1, None, thresholds, None, target_stats)
def attend(q, kb, vb, kp, vp, pages, lengths, out):
    torch.ops.dspark.draft_attention(q, kb, vb, kp, vp, pages, 16, lengths, 600, out)
    return out
def stats_op(logits, stats, best):
    torch.ops.dspark.softmax_stats(logits, stats, best)
    return stats, best
I32 = lambda *s: meta(*s, dtype=torch.int32)
cases = {
    "markov_chain": (chain, lambda R: (bf(R, G, V), L(R), bf(V, RANK), bf(V, RANK), meta(R), L(R), bf(R, G, D),
                                       meta(D + RANK), meta(1), L(R), meta(R))),
    "markov_chain_lazy": (chain_lazy, lambda R: (bf(R, G, V), L(R), bf(V, RANK), bf(V, RANK), meta(R), L(R))),
    "schedule_production": (sched, lambda R: (meta(R + 2, G), meta(R, G), meta(9))),
    "draft_attention": (attend, lambda R: (bf(R, G, 32, 128), bf(R, G, 8, 128), bf(R, G, 8, 128), bf(4096, 8, 128),
                                           bf(4096, 8, 128), I32(R, 40), I32(R), bf(R, G, 32, 128))),
    "softmax_stats": (stats_op, lambda R: (meta(R * G, V), meta(R * G, 2), L(R * G + 1))),
    "rejection_sample": (rej_op, lambda R: (meta(R * (G + 1), V), L(R), L(R, G), meta(R, G), bf(R, G, V), L(R),
                                            bf(V, RANK), bf(V, RANK), meta(R), L(R), meta(R, G, 2), meta(R, G))),
    "rejection_sample_logits": (rej_op, lambda R: (meta(R * (G + 1), V), L(R), L(R, G), meta(R, G), bf(R, G, V), L(R),
                                                   bf(V, RANK), bf(V, RANK), meta(R), L(R), meta(R, G, 2), meta(R, G),
                                                   meta(R * (G + 1), 2))),
}
dyn = {}
for name, (fn, make) in cases.items():
    torch._dynamo.reset(); counters.clear()
    frames = []
    def counting(gm, example_inputs):
        frames.append(name)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend=counting)
    dyn[name] = {"shapes": {}}
    try:
        for R in (3, 5, 11):  # none equal to another dim (duck sizing would tie them)
            out = compiled(*make(R))
            out = out if isinstance(out, (tuple, list)) else (out,)
            dyn[name]["shapes"][str(R)] = [[list(o.shape), str(o.dtype)] for o in out]
    except Exception as exc:
        dyn[name]["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
    dyn[name].update(compiles=len(frames), unique_graphs=counters["stats"]["unique_graphs"])
print(json.dumps({"dyn": dyn, "wheel": str(wheel), "first": first.status, "second": second.status, "path": first.path,
                  "last": last_build(), "meta": [[list(o.shape), str(o.dtype)] for o in outs], "ell": [list(ell.shape), str(ell.dtype)],
                  "rej": [[list(o.shape), str(o.dtype)] for o in rej], "counter_offset": outs[5].storage_offset(),
                  "ops": sorted(n for n in dir(torch.ops.dspark) if not n.startswith("_") and n not in ("name", "overloads")),
                  "schema": str(torch.ops.dspark.markov_chain.default._schema),
                  "smem": {f"{rows},{hd}": torch.ops.dspark.draft_attention_smem(rows, hd)
                           for rows, hd in ((128, 128), (113, 64), (28, 128), (32, 128), (0, 128), (129, 128), (32, 96))}}))
"""


@pytest.mark.skipif(not PYTHON, reason="DSPARK_CUDA_TORCH_PYTHON unset (.ci/prepare.d/20-cuda-torch.sh makes it where nvcc exists)")
def test_csrc_compiles_links_and_registers_ops(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DSPARK_CACHE": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    wheels = tmp_path / "wheels"
    proc = subprocess.run([PYTHON, "-W", "ignore", "-c", f"WHEEL_DIR = {str(wheels)!r}\n" + SCRIPT], env=env, capture_output=True, text=True,
                          timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["first"] == "built" and res["second"] == "cached"
    # A fresh process finds the cached build without importing torch (its import alone takes seconds).
    fresh = subprocess.run([PYTHON, "-c", "import sys; from dspark_cli.build import build; "
                            "print(build(arch='sm_90a').status, 'torch' in sys.modules)"],
                           env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert fresh.stdout.split() == ["cached", "False"], fresh.stderr[-2000:]
    assert res["last"]["status"] == "cached" and res["last"]["path"] == res["path"]
    assert "9.0a" in Path(res["path"]).parent.name
    assert res["meta"] == [[[3, 7], "torch.int64"], [[3, 7], "torch.float32"], [[0], "torch.float32"],
                           [[3, 7, 64], "torch.bfloat16"], [[3, 7, 2], "torch.float32"], [[1], "torch.int32"],
                           [[0, 7], "torch.float32"], [[0, 7], "torch.float32"]]
    assert res["counter_offset"] == 7  # as the CUDA op's: the last of γ + 1 counters
    assert res["ell"] == [[5], "torch.int64"]
    assert res["rej"] == [[[3, 8], "torch.int64"], [[3], "torch.int64"]]
    assert {"markov_chain", "rejection_sample", "schedule_production", "draft_attention", "softmax_stats"} \
        <= set(res["ops"]), res["ops"]
    assert res["schema"].startswith("dspark::markov_chain(Tensor U, Tensor anchors")
    check_draft_attention_smem(res["smem"])
    check_dynamic_shapes(res["dyn"])
    check_wheel(Path(res["wheel"]), Path(res["path"]), tmp_path)
    # the library carries sm_90a machine code (the cache directory's name only says what was asked)
    listing = subprocess.run([str(cuobjdump()), "--list-elf", res["path"]], capture_output=True, text=True)
    assert ".sm_90a." in listing.stdout, listing.stdout + listing.stderr


def cuobjdump() -> Path:
    """The toolkit's cuobjdump, else one on PATH, else the copy triton ships beside the CUDA torch
    (a toolkit of nvcc alone, as this machine's, has none): the check must not pass unrun."""
    found = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"]
    found += [Path(p) for p in [shutil.which("cuobjdump")] if p]
    triton = subprocess.run([PYTHON, "-c", "import os, triton; print(os.path.dirname(triton.__file__))"],
                            capture_output=True, text=True)
    if triton.returncode == 0:
        found.append(Path(triton.stdout.strip()) / "backends" / "nvidia" / "bin" / "cuobjdump")
    tool = next((p for p in found if p.is_file()), None)
    assert tool is not None, f"no cuobjdump to list the library's machine code (looked at {', '.join(map(str, found))})"
    return tool


def check_draft_attention_smem(smem: dict) -> None:
    """dspark::draft_attention_smem, the count cuda_ops.draft_attention_fits holds against the GPU's
    limit, worked by hand from csrc/draft_attention.cu's Layout: queries, the K/V ring (or the fp32
    output over it), scores, probabilities, eight warps' rescale scratch, row stats; rows padded to
    16, and 0 for a shape the op does not take."""
    assert smem["128,128"] == 34816 + 69632 + 34816 + 18432 + 10240 + 1536 == 169472
    assert smem["113,64"] == 18432 + 36864 + 34816 + 18432 + 10240 + 1536 == 120320
    assert smem["28,128"] == smem["32,128"] == 8704 + 69632 + 8704 + 4608 + 10240 + 384 == 102272  # Qwen3-4B's drafter
    # above the 101,376 bytes a block may take on sm_86/89 and within sm_80's 166,912 and sm_90's 232,448
    assert 101376 < smem["32,128"] < 166912 < smem["128,128"] < 232448
    assert smem["0,128"] == smem["129,128"] == smem["32,96"] == 0


def check_dynamic_shapes(dyn: dict) -> None:
    """Each op under torch.compile(dynamic=True, fullgraph=True) on Meta tensors compiled once for
    R = 3, 5, 11, and the outputs have the shapes of the CUDA implementations."""
    f32, i64 = "torch.float32", "torch.int64"
    for name, res in dyn.items():
        assert "error" not in res and res["compiles"] == 1 and res["unique_graphs"] == 1, (name, res)
        assert sorted(res["shapes"]) == ["11", "3", "5"], (name, res)
    for R in (3, 5, 11):
        r = str(R)
        assert dyn["markov_chain"]["shapes"][r] == [[[R, 7], i64], [[R, 7], f32], [[R, 7, 1000], f32],
                                                    [[R, 7, 64], "torch.bfloat16"], [[R, 7, 2], f32],
                                                    [[1], "torch.int32"], [[R, 7], f32], [[R, 7], f32]]
        assert dyn["markov_chain_lazy"]["shapes"][r] == [[[R, 7], i64], [[R, 7], f32], [[0], f32],
                                                         [[R, 7, 64], "torch.bfloat16"], [[R, 7, 2], f32],
                                                         [[1], "torch.int32"], [[0, 7], f32], [[0, 7], f32]]
        assert dyn["schedule_production"]["shapes"][r] == [[[R], i64]]
        assert dyn["rejection_sample"]["shapes"][r] == dyn["rejection_sample_logits"]["shapes"][r] == [[[R, 8], i64],
                                                                                                      [[R], i64]]
        assert dyn["draft_attention"]["shapes"][r] == [[[R, 7, 32, 128], "torch.bfloat16"]]
        assert dyn["softmax_stats"]["shapes"][r] == [[[R * 7, 2], f32], [[R * 7 + 1], i64]]


def check_wheel(wheel: Path, library: Path, tmp_path: Path) -> None:
    """`dspark build --wheel`: a valid wheel (RECORD hashes) that pip installs and that registers
    the ops from its installed location, pinned to the torch it was built against."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        for line in zf.read(record).decode().splitlines():
            name, digest, size = line.split(",")
            if name != record:
                data = zf.read(name)
                assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert int(size) == len(data)
        assert zf.read("dspark_ops/dspark_ops.so") == library.read_bytes()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert wheel.name.startswith("dspark_ops-0.1.0+torch2.14.1.cu130") and wheel.name.endswith("-py3-none-linux_x86_64.whl")
    assert "Requires-Dist: torch==2.14.1\n" in metadata
    check_pip_accepts_the_pin(wheel)
    site = tmp_path / "site"
    subprocess.run([PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = ("import sys, torch; from dspark_cli.runtime import cuda_ops; p = cuda_ops.load(); "
             "print(p); print(sorted(torch.ops.dspark.rejection_sample.overloads()))")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{site}", "DSPARK_CACHE": str(tmp_path / "empty-cache"),
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("DSPARK_OPS_LIB", None)
    out = subprocess.run([PYTHON, "-W", "ignore", "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, overloads = out.stdout.strip().splitlines()[-2:]
    assert loaded == str(site / "dspark_ops" / "dspark_ops.so") and overloads == "['default']"


def check_pip_accepts_the_pin(wheel: Path) -> None:
    """pip, with its dependencies (no --no-deps) and no index, finds the wheel's torch pin satisfied by
    the torch installed in the venv that built it: a pin of torch.__version__ (2.14.1+cu130) was not
    (the installed distribution is 2.14.1), so pip looked for that torch and found none."""
    # --isolated: no pip config, whose find-links (a local wheel store) could offer a torch to install
    out = subprocess.run([PYTHON, "-m", "pip", "--isolated", "install", "--no-index", "--dry-run", str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    assert "Requirement already satisfied: torch==2.14.1 " in out.stdout, out.stdout
    would = next(line for line in out.stdout.splitlines() if line.startswith("Would install "))
    assert would.split()[2:] == [wheel.name.split("-py3")[0]], would  # dspark_ops alone


@pytest.mark.skipif(not PYTHON, reason="DSPARK_CUDA_TORCH_PYTHON unset (.ci/prepare.d/20-cuda-torch.sh makes it where nvcc exists)")
def test_a_wheel_installs_beside_the_torch_it_was_built_with(tmp_path):
    """write_wheel in the CUDA torch venv (a stand-in library: no compile), then pip's resolver
    against that venv's torch, as test_csrc_compiles_links_and_registers_ops checks its real wheel."""
    lib = tmp_path / "dspark_ops.so"
    lib.write_bytes(b"\x7fELF" + bytes(60))
    script = ("import sys; from dspark_cli.build import BuildResult, write_wheel; "
              "print(write_wheel(BuildResult('built', sys.argv[1], 'k' * 12, 0.0, ['9.0a'], '2.14.1+cu130'), sys.argv[2]))")
    made = subprocess.run([PYTHON, "-c", script, str(lib), str(tmp_path / "wheels")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert made.returncode == 0, made.stderr[-2000:]
    check_pip_accepts_the_pin(Path(made.stdout.strip()))


@pytest.mark.skipif(not PYTHON, reason="DSPARK_CUDA_TORCH_PYTHON unset (.ci/prepare.d/20-cuda-torch.sh makes it where nvcc exists)")
def test_the_build_imports_cpp_extension_without_its_no_cuda_runtime_warning():
    """A build on a machine without a GPU (CI) printed torch's import-time warning "No CUDA runtime is
    found, using CUDA_HOME=<its guess>": a second stderr line under --json, naming a CUDA_HOME the
    build does not use."""
    script = "from dspark_cli.build import cpp_extension; cpp_extension(); import torch; print(torch.cuda.is_available())"
    out = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "No CUDA runtime is found" not in out.stderr, out.stderr


def test_build_refuses_cuda_major_mismatch(monkeypatch):
    """One clear line, exit code 3, when nvcc's CUDA major differs from torch's."""
    from dspark_cli import build, cuda_env
    from dspark_cli.errors import EnvironmentProblem

    monkeypatch.setattr(cuda_env, "torch_info", lambda: cuda_env.TorchInfo("2.14.1+cu130", "13.0"))
    monkeypatch.setattr(cuda_env, "resolve_cuda_home", lambda: cuda_env.CudaHome(Path("/opt/cuda-12.8"), "CUDA_HOME"))
    monkeypatch.setattr(cuda_env, "nvcc_info", lambda home=None: cuda_env.Nvcc("/opt/cuda-12.8/bin/nvcc", "12.8"))
    with pytest.raises(EnvironmentProblem) as exc:
        build.plan("9.0a")
    assert exc.value.exit_code == 3 and "CUDA 12.8" in str(exc.value) and "CUDA 13.0" in str(exc.value)


def test_build_key_changes_with_sources_and_arch(monkeypatch, tmp_path):
    from dspark_cli import build, cuda_env

    monkeypatch.setattr(cuda_env, "torch_info", lambda: cuda_env.TorchInfo("2.14.1+cu130", "13.0"))
    monkeypatch.setattr(cuda_env, "resolve_cuda_home", lambda: cuda_env.CudaHome(Path("/usr/local/cuda"), "nvcc"))
    monkeypatch.setattr(cuda_env, "nvcc_info", lambda home=None: cuda_env.Nvcc("/usr/local/cuda/bin/nvcc", "13.0"))
    a, b = build.plan("9.0a"), build.plan("8.0;9.0")
    assert a.key != b.key and b.archs == ["8.0", "9.0a"]
    ptx = build.plan("8.0+PTX;9.0")  # +PTX adds the PTX to the library: another build
    assert ptx.archs == ["8.0+PTX", "9.0a"] and ptx.key != b.key
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "x.cu").write_text("// v1\n")
    monkeypatch.setattr(build, "CSRC", src)
    k1 = build.plan("9.0a").key
    (src / "x.cu").write_text("// v2\n")
    assert build.plan("9.0a").key != k1



def fake_compilers(bin_dir: Path, monkeypatch, versions: dict[str, str]) -> None:
    """Executables on PATH named as `versions` says, each answering -dumpfullversion with its version."""
    bin_dir.mkdir(exist_ok=True)
    for name, version in versions.items():
        (bin_dir / name).write_text(f"#!/bin/sh\necho {version}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_build_key_changes_with_the_toolchain(monkeypatch, tmp_path):
    """Not only nvcc's major.minor: its exact release, the CUDA prefix and the host compilers'
    versions are in the key (a toolkit or gcc upgrade must not reuse objects built with the old)."""
    from dspark_cli import build, cuda_env

    monkeypatch.setattr(cuda_env, "torch_info", lambda: cuda_env.TorchInfo("2.14.1+cu130", "13.0"))
    monkeypatch.setattr(cuda_env, "nvcc_archs", lambda nvcc: None)
    for var in ("CC", "CXX"):
        monkeypatch.delenv(var, raising=False)
    toolkit = {"home": Path("/usr/local/cuda"), "release": "release 13.0, V13.0.88"}
    monkeypatch.setattr(cuda_env, "resolve_cuda_home", lambda: cuda_env.CudaHome(toolkit["home"], "nvcc"))
    monkeypatch.setattr(cuda_env, "nvcc_info", lambda home=None: cuda_env.Nvcc("/x/bin/nvcc", "13.0",
                                                                               release=toolkit["release"]))
    fake_compilers(tmp_path / "bin", monkeypatch, {"c++": "13.2.0", "gcc": "13.2.0"})
    keys = [build.plan("9.0a").key]
    toolkit["release"] = "release 13.0, V13.0.48"
    keys.append(build.plan("9.0a").key)
    toolkit["home"] = Path("/opt/cuda-13.0")
    keys.append(build.plan("9.0a").key)
    fake_compilers(tmp_path / "bin", monkeypatch, {"gcc": "14.1.0"})  # nvcc's default host compiler
    keys.append(build.plan("9.0a").key)
    fake_compilers(tmp_path / "bin", monkeypatch, {"c++": "14.1.0"})
    keys.append(build.plan("9.0a").key)
    assert len(set(keys)) == 5 and build.plan("9.0a").key == keys[-1]


def test_an_arch_nvcc_cannot_build_and_a_missing_compiler_are_one_line_before_building(monkeypatch):
    """--arch 7.0 with an nvcc that lists compute_75 and up: bad usage (exit 2), naming what it
    builds; a $CXX that is not there: an environment problem (exit 3), not minutes of nvcc first."""
    from dspark_cli import build, cuda_env
    from dspark_cli.errors import EnvironmentProblem, UsageError

    monkeypatch.setattr(cuda_env, "torch_info", lambda: cuda_env.TorchInfo("2.14.1+cu130", "13.0"))
    monkeypatch.setattr(cuda_env, "resolve_cuda_home", lambda: cuda_env.CudaHome(Path("/usr/local/cuda"), "nvcc"))
    monkeypatch.setattr(cuda_env, "nvcc_info", lambda home=None: cuda_env.Nvcc("/x/bin/nvcc", "13.0"))
    monkeypatch.setattr(cuda_env, "nvcc_archs", lambda nvcc: {"7.5", "8.0", "9.0", "10.0", "12.0"})
    with pytest.raises(UsageError) as bad:
        build.plan("7.0;9.0a")
    assert bad.value.exit_code == 2
    assert str(bad.value) == "--arch: nvcc 13.0 does not build for 7.0 (it builds 7.5, 8.0, 9.0, 10.0, 12.0)"
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(EnvironmentProblem) as missing:
        build.plan("9.0a")
    assert str(missing.value) == ("$CXX is /nonexistent/g++, which is not an executable (nor on PATH); "
                                  "set CXX to an installed C++ compiler, or unset it to use c++")
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PYTORCH_NVCC", __file__)  # a file, not executable: ninja's "code=126" once compiling began
    with pytest.raises(EnvironmentProblem) as not_nvcc:
        build.plan("9.0a")
    assert str(not_nvcc.value).startswith(f"$PYTORCH_NVCC is {__file__}, whose command {__file__} is not an "
                                          "executable (nor on PATH)")


def test_pytorch_nvcc_may_be_a_launcher_and_nvcc(monkeypatch, tmp_path):
    """torch writes $PYTORCH_NVCC into ninja's command line as it stands ("ccache nvcc" is its own
    example): the shell runs the first word, so that word is what must exist."""
    from dspark_cli import cuda_env

    for var in ("CC", "CXX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PYTORCH_NVCC", "dspark-test-launcher nvcc")
    problem = cuda_env.compiler_problem()
    assert problem and problem[0].startswith("$PYTORCH_NVCC is dspark-test-launcher nvcc, whose command "
                                             "dspark-test-launcher is not an executable")
    fake_compilers(tmp_path / "bin", monkeypatch, {"dspark-test-launcher": "4.9"})
    assert cuda_env.compiler_problem() is None
    monkeypatch.setenv("PYTORCH_NVCC", "'unbalanced nvcc")
    assert "whose command (none) is not an executable" in cuda_env.compiler_problem()[0]


def test_nvcc_ccbin_is_checked_only_where_nvcc_reads_it(monkeypatch, tmp_path):
    """nvcc takes $NVCC_CCBIN only when given no -ccbin (torch passes -ccbin $CC when CC is set), and
    takes a directory as well as a compiler: neither case is a missing host compiler."""
    from dspark_cli import cuda_env

    for var in ("CC", "CXX", "PYTORCH_NVCC"):
        monkeypatch.delenv(var, raising=False)
    fake_compilers(tmp_path / "bin", monkeypatch, {"c++": "13.1", "dspark-test-cc": "13.1"})
    missing = str(tmp_path / "gcc-99")
    monkeypatch.setenv("NVCC_CCBIN", missing)
    problem = cuda_env.compiler_problem()
    assert problem and problem[0].startswith(f"$NVCC_CCBIN is {missing}, which is not an executable"), problem
    monkeypatch.setenv("CC", "dspark-test-cc")  # -ccbin $CC: nvcc does not read NVCC_CCBIN
    assert cuda_env.compiler_problem() is None
    monkeypatch.delenv("CC")
    monkeypatch.setenv("NVCC_CCBIN", str(tmp_path / "bin"))  # a directory holding the host compiler
    assert cuda_env.compiler_problem() is None


def test_nvcc_lists_the_archs_it_builds():
    """The real nvcc's --list-gpu-arch, as plan() reads it (CUDA 13 starts at Turing)."""
    import shutil

    from dspark_cli import cuda_env

    if not shutil.which("nvcc"):
        pytest.skip("no nvcc on PATH")
    nvcc = cuda_env.nvcc_info()
    archs = cuda_env.nvcc_archs(nvcc)
    assert archs and {"9.0", "10.0", "12.0"} <= archs
    if cuda_env.major(nvcc.version) >= 13:
        assert min(archs, key=lambda a: tuple(map(int, a.split(".")))) == "7.5" and "7.0" not in archs


def test_build_key_changes_with_flags(monkeypatch, tmp_path):
    """The compiler flags (and the environment nvcc and cpp_extension read them from) are in the key."""
    from dspark_cli import build, cuda_env

    monkeypatch.setattr(cuda_env, "torch_info", lambda: cuda_env.TorchInfo("2.14.1+cu130", "13.0"))
    monkeypatch.setattr(cuda_env, "resolve_cuda_home", lambda: cuda_env.CudaHome(Path("/usr/local/cuda"), "nvcc"))
    monkeypatch.setattr(cuda_env, "nvcc_info", lambda home=None: cuda_env.Nvcc("/usr/local/cuda/bin/nvcc", "13.0"))
    for var in build.FLAG_ENV:
        monkeypatch.delenv(var, raising=False)
    base = build.plan("9.0a").key
    assert build.plan("9.0a").key == base
    keys = {base}
    monkeypatch.setattr(build, "CUDA_CFLAGS", [*build.CUDA_CFLAGS, "-DDSPARK_DEBUG"])
    keys.add(build.plan("9.0a").key)
    monkeypatch.setattr(build, "CFLAGS", ["-O2"])
    keys.add(build.plan("9.0a").key)
    monkeypatch.setenv("NVCC_APPEND_FLAGS", "-G")
    keys.add(build.plan("9.0a").key)
    fake_compilers(tmp_path / "bin", monkeypatch, {"clang++": "18.1.3", "gcc-12": "12.3.0", "ccache": "4.9"})
    monkeypatch.setenv("CXX", "clang++")
    keys.add(build.plan("9.0a").key)
    monkeypatch.setenv("CC", "gcc-12")  # torch passes it to nvcc as -ccbin: the .cu files' host compiler
    keys.add(build.plan("9.0a").key)
    monkeypatch.setenv("PYTORCH_NVCC", "ccache nvcc")
    keys.add(build.plan("9.0a").key)
    monkeypatch.setenv("CUDA_INC_PATH", "/opt/cuda-extra/include")
    keys.add(build.plan("9.0a").key)
    assert len(keys) == 8
    # build() hands the compilers exactly the flags the key hashed
    import torch.utils.cpp_extension as ext

    seen = {}
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_cuda_library_paths", lambda home: ([], "/usr/local/cuda/lib64/libcublas.so"))
    def fake_build(**kw):  # a library that passes build.library_problem() (no ELF class: the header only)
        seen.update(kw)
        (Path(kw["build_directory"]) / f"{kw['name']}.so").write_bytes(b"\x7fELF" + bytes(60))

    monkeypatch.setattr(ext, "_write_ninja_file_and_build_library", fake_build)
    assert build.build("9.0a").status == "built"
    assert seen["extra_cflags"] == ["-O2"] and seen["extra_cuda_cflags"] == [*build.CUDA_CFLAGS]
    assert seen["extra_cuda_cflags"][-1] == "-DDSPARK_DEBUG" and seen["name"] == build.build_flags()["name"]
