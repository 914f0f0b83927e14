"""patches/vllm/v0.33.0 on the real v0.33.0 release trees from PyPI.

What runs: `dspark apply vllm --commit v0.33.0 --source pypi` on the sdist (downloaded into
$DSPARK_CACHE/releases when missing, 47 MB) and on the x86_64 wheel when it is cached (336 MB:
.ci/prepare.d/32-vllm033-wheel.sh fetches it in CI; a local run without it skips that case); every Python file the series touches byte-compiles; the hook's
contract is checked on the patched tree's syntax (AST): vLLM's DSparkSpeculator offers
`model.sample_sequential(self, num_reqs, head_hidden)`, our patch defines it on
Qwen3DSparkForCausalLM, and every attribute v2_fused reads exists on those classes.
What does not run here: importing the patched vLLM (it needs its CUDA torch 2.14.0) and the V2
runner itself (GPU + Triton only).
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
from dspark_cli.errors import DsparkError
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
    except DsparkError as exc:
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
