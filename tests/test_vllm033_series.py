"""patches/vllm/v0.33.0 on the real v0.33.0 release trees from PyPI.

What runs: `dspark apply vllm --commit v0.33.0 --source pypi` on the sdist (downloaded into
$DSPARK_CACHE/releases when missing, 47 MB) and on the x86_64 wheel when it is cached (336 MB:
.ci/prepare.d/32-vllm033-wheel.sh fetches it in CI; a local run without it skips that case); every Python file the series touches byte-compiles; the hook's
contract is checked on the patched tree's syntax (AST): vLLM's DSparkSpeculator offers
`model.sample_sequential(self, num_reqs, head_hidden)`, our patch defines it on
Qwen3DSparkForCausalLM, and every attribute v2_fused reads exists on those classes.
The patched vLLM imported for real (when .ci/prepare.d/33-vllm033-import.sh has exported
DSPARK_VLLM033_PYTHON): every module the series changes, plus our integration modules, imports in
a venv of the 0.33.0 wheel with torch 2.14.1 (CUDA 13.0 build; vLLM pins 2.14.0, not installable
here), on vLLM's UnspecifiedPlatform (no GPU); the imported sources carry every line the patches
add, and the hook / lazy imports resolve against the real classes.
What does not run here: vLLM's compiled kernels (vllm._C_stable_libtorch etc. need libcuda.so.1),
the V1/V2 runners and the engine (GPU only).
"""

import ast
import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_cli import compat, pypi_source
from dspark_cli.errors import EnvironmentProblem
from dspark_cli.integrations.vllm import v2_fused
from dspark_cli.series import load_series

ROOT = Path(__file__).resolve().parent.parent
SERIES = ROOT / "patches" / "vllm" / "v0.33.0"
SPECULATOR = "vllm/v1/worker/gpu/spec_decode/dspark/speculator.py"
MODEL = "vllm/model_executor/models/qwen3_dspark.py"
pytestmark = pytest.mark.slow


def release(kind):
    pin = compat.load(ROOT / "compat.yaml").engine("vllm").pins["v0.33.0"]
    return next(r for r in pin.releases if r.kind == kind and r.package == "vllm")


@pytest.fixture(scope="module", params=["sdist", "wheel"])
def patched_tree(request, tmp_path_factory):
    rel = release(request.param)
    cached = pypi_source.cache_dir() / "releases" / rel.file
    if request.param == "wheel" and not cached.is_file():
        pytest.skip(f"{rel.file} (336 MB) is not cached under {cached.parent} (.ci/prepare.d/32-vllm033-wheel.sh "
                    "fetches it); the sdist case covers the tree")
    try:
        pypi_source.fetch_release(rel)
    except EnvironmentProblem as exc:  # the index not reachable; a sha256 mismatch (CheckFailed) fails
        pytest.skip(f"cannot fetch {rel.file}: {exc}")
    workdir = tmp_path_factory.mktemp(request.param) / "vllm"
    run = subprocess.run([sys.executable, "-m", "dspark_cli", "apply", "vllm", "--commit", "v0.33.0", "--source", "pypi",
                          "--file", rel.file, "-C", str(workdir), "--json"], capture_output=True, text=True,
                         env={**os.environ, "DSPARK_COMPAT": str(ROOT / "compat.yaml")})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["status"] == "applied"
    return workdir


def touched_files():
    files = set()
    for patch in load_series(SERIES, "dspark"):
        files |= {line.split(" b/", 1)[1] for line in patch.path.read_text().splitlines() if line.startswith("diff --git ")}
    return sorted(files)


def test_every_patched_module_byte_compiles(patched_tree, tmp_path):
    files = touched_files()
    assert MODEL in files and "vllm/config/vllm.py" in files
    for file in files:
        py_compile.compile(str(patched_tree / file), cfile=str(tmp_path / "x.pyc"), doraise=True)


def _class(tree, name):
    return next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)


def _method(cls, name):
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)


def test_vllm_offers_the_hook_and_our_patch_takes_it(patched_tree):
    speculator = ast.parse((patched_tree / SPECULATOR).read_text())
    loop = _method(_class(speculator, "DSparkSpeculator"), "_sample_sequential")
    calls = [n for n in ast.walk(loop) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "sample_sequential"]
    assert [[ast.unparse(a) for a in c.args] for c in calls] == [["self", "num_reqs", "head_hidden"]]
    assert 'getattr(self.model, "sample_sequential", None)' in ast.unparse(loop).replace("'", '"')

    model = ast.parse((patched_tree / MODEL).read_text())
    hook = _method(_class(model, "Qwen3DSparkForCausalLM"), "sample_sequential")
    assert [a.arg for a in hook.args.args] == ["self", "spec", "num_reqs", "head_hidden"]
    body = ast.unparse(hook)
    assert "from dspark_cli.integrations.vllm import v2_fused" in body
    assert "return v2_fused.sample_sequential(self, spec, num_reqs, head_hidden)" in body


def _attribute_reads(source: str, name: str) -> set[str]:
    """`name.<attr>` reads in our module (`name` = spec or model)."""
    return {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == name}


def _self_attributes(tree, class_names) -> set[str]:
    found = set()
    for cls in (_class(tree, c) for c in class_names):
        for node in ast.walk(cls):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                    and isinstance(node.ctx, ast.Store):
                found.add(node.attr)
            if isinstance(node, ast.FunctionDef):
                found.add(node.name)
    return found


def test_every_attribute_v2_fused_reads_exists_in_v033(patched_tree):
    ours = Path(v2_fused.__file__).read_text()
    spec_base = patched_tree / "vllm/v1/worker/gpu/spec_decode"
    speculator_attrs = set()
    for file, classes in ((spec_base / "speculator.py", ["BaseSpeculator", "DraftModelSpeculator"]),
                          (spec_base / "dflash/speculator.py", ["DFlashSpeculator"]),
                          (spec_base / "dspark/speculator.py", ["DSparkSpeculator"])):
        speculator_attrs |= _self_attributes(ast.parse(file.read_text()), classes)
    missing = _attribute_reads(ours, "spec") - speculator_attrs
    assert not missing, f"v2_fused reads spec.{missing} which vLLM v0.33.0's speculators do not set"

    models = ast.parse((patched_tree / MODEL).read_text())
    dflash = ast.parse((patched_tree / "vllm/model_executor/models/qwen3_dflash.py").read_text())
    model_attrs = _self_attributes(models, ["Qwen3DSparkForCausalLM"]) | _self_attributes(dflash, ["DFlashQwen3ForCausalLM"])
    missing = _attribute_reads(ours, "model") - model_attrs
    assert not missing, f"v2_fused reads model.{missing} which Qwen3DSparkForCausalLM does not have"
    heads = _self_attributes(models, ["Qwen3DSparkModel", "DSparkMarkovHead", "DSparkConfidenceHead"])
    assert {"markov_head", "confidence_head", "markov_w1", "markov_w2", "proj", "with_markov"} <= heads


# --- The patched vLLM 0.33.0, imported for real -------------------------------------------------
# .ci/prepare.d/33-vllm033-import.sh builds the venv: the vllm 0.33.0 wheel (--no-deps) + its
# CPU-installable requirements, torch 2.14.1 (CUDA 13.0 build; vLLM pins 2.14.0, not installable
# here) and our series laid over site-packages. No GPU: vLLM picks its UnspecifiedPlatform, and
# none of the modules below needs the driver at import time (vLLM's own kernel libraries, e.g.
# vllm._C_stable_libtorch, do: libcuda.so.1; none of our patches touches or imports them).

VLLM033_PYTHON = os.environ.get("DSPARK_VLLM033_PYTHON")
# Every module a v0.33.0 patch changes, the modules whose classes our patches hook into or inherit
# from, and our integration modules the patched code imports (lazily, inside methods).
PATCHED_MODULES = ["vllm._dspark", "vllm.config.vllm", "vllm.v1.spec_decode.dflash", "vllm.v1.worker.gpu_model_runner",
                   "vllm.utils.cpu_triton_utils", "vllm.model_executor.models.qwen3_dspark",
                   "vllm.v1.sample.ops.topk_topp_sampler"]
IMPORTED_MODULES = PATCHED_MODULES + [
    "vllm.config.speculative", "vllm.v1.worker.gpu.spec_decode.dspark.speculator",
    "dspark_cli.integrations.vllm.proposer", "dspark_cli.integrations.vllm.v2_fused",
    "dspark_cli.integrations.vllm.cpu_fixes"]

_PROBE = r'''
import importlib, inspect, json, sys, traceback
out = {"imports": {}, "files": {}}
for name in sys.argv[1].split(","):
    try:
        module = importlib.import_module(name)
        out["imports"][name] = "ok"
        out["files"][name] = module.__file__
    except BaseException:
        out["imports"][name] = traceback.format_exc(limit=-3)
if all(v == "ok" for v in out["imports"].values()):
    import torch, vllm, vllm._dspark as marker
    from vllm.platforms import current_platform
    from vllm.config.speculative import SpeculativeConfig
    from vllm.model_executor.models.qwen3_dspark import Qwen3DSparkForCausalLM
    from vllm.v1.spec_decode.dflash import DFlashProposer
    from vllm.v1.worker.gpu.spec_decode.dspark.speculator import DSparkSpeculator
    from dspark_cli.integrations.vllm import cpu_fixes, proposer, v2_fused
    hook = Qwen3DSparkForCausalLM.sample_sequential
    out.update(
        versions=[vllm.__version__, torch.__version__], platform=type(current_platform).__name__,
        series=marker.SERIES, patches=marker.PATCHES, v1_supported=list(marker.V1_SUPPORTED),
        hook_params=list(inspect.signature(hook).parameters), hook_source=inspect.getsource(hook),
        speculator_loop=inspect.getsource(DSparkSpeculator._sample_sequential),
        sources={n: inspect.getsource(importlib.import_module(n)) for n in sys.argv[2].split(",")},
        use_dspark=callable(getattr(SpeculativeConfig, "use_dspark", None)),
        proposer_is_dflash=issubclass(proposer.DSparkProposer, DFlashProposer),
        lazy_names=[callable(f) for f in (proposer.aux_layer_ids, v2_fused.sample_sequential, cpu_fixes.expand_float)],
    )
print("DSPARK-PROBE " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def imported():
    if not VLLM033_PYTHON:
        pytest.skip("DSPARK_VLLM033_PYTHON is unset: .ci/prepare.d/33-vllm033-import.sh builds the patched vLLM "
                    "0.33.0 venv (torch 2.14.1 CUDA build + the vllm 0.33.0 wheel, ~1.9 GB) and exports it")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "WARNING", "DSPARK_V2_FUSED": "1"}
    env.pop("DSPARK_VLLM_PYTHON", None)
    run = subprocess.run([VLLM033_PYTHON, "-c", _PROBE, ",".join(IMPORTED_MODULES), ",".join(PATCHED_MODULES)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    line = next((l for l in run.stdout.splitlines() if l.startswith("DSPARK-PROBE ")), None)
    assert run.returncode == 0 and line, run.stderr[-4000:]
    return json.loads(line.removeprefix("DSPARK-PROBE "))


def test_every_patched_v033_module_imports(imported):
    failed = {name: tb for name, tb in imported["imports"].items() if tb != "ok"}
    assert not failed, failed
    site = Path(imported["files"]["vllm.config.vllm"]).parents[2]
    for name in IMPORTED_MODULES:  # vLLM from the venv, ours from this checkout
        assert Path(imported["files"][name]).is_relative_to(ROOT if name.startswith("dspark_cli") else site), name
    assert imported["versions"][0] == "0.33.0" and imported["versions"][1].startswith("2.14.1")
    assert imported["platform"] == "UnspecifiedPlatform"  # no GPU, no driver: nothing faked


def test_imported_v033_modules_are_the_patched_ones(imported):
    assert imported["series"] == "vllm/v0.33.0"
    assert imported["patches"] == [p.path.name for p in load_series(SERIES, "dspark")]
    assert set(imported["v1_supported"]) == {"dspark speculative decoding", "adaptive draft verification"}
    # Every line a patch adds is in the source of the module vLLM actually imported.
    added = {}
    for patch in load_series(SERIES, "dspark"):
        file = None
        for line in patch.path.read_text().splitlines():
            if line.startswith("diff --git "):
                file = line.split(" b/", 1)[1]
            elif line.startswith("+") and not line.startswith("+++") and line[1:].strip():
                added.setdefault(file, []).append(line[1:])
    modules = {m.replace(".", "/") + ".py": m for m in PATCHED_MODULES}
    assert set(added) == set(modules), "PATCHED_MODULES is not the set of files the series changes"
    for file, lines in added.items():
        source = imported["sources"][modules[file]].splitlines()
        missing = [line for line in lines if line not in source]
        assert not missing, f"the imported {modules[file]} lacks the patch's lines {missing[:3]}"


def test_hook_and_lazy_imports_resolve_in_real_v033(imported):
    assert imported["hook_params"] == ["self", "spec", "num_reqs", "head_hidden"]
    assert "v2_fused.sample_sequential(self, spec, num_reqs, head_hidden)" in imported["hook_source"]
    assert "sample_sequential" in imported["speculator_loop"]
    assert imported["use_dspark"], "SpeculativeConfig.use_dspark(), which the patched V1 runner calls, is gone"
    assert imported["proposer_is_dflash"]  # our V1 proposer subclasses v0.33.0's real DFlashProposer
    assert imported["lazy_names"] == [True, True, True]
