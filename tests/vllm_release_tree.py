"""Checks shared by the tests of our vLLM series on real release trees (test_vllm033_series.py,
test_vllm034_series.py): apply a pin's series to its release file from PyPI, read the patched
tree's syntax, and run a probe in a venv where that patched vLLM imports."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_cli import compat, pypi_source
from dspark_cli.errors import EnvironmentProblem
from dspark_cli.series import load_series
from tests.unavailable import skip_unless_ci

ROOT = Path(__file__).resolve().parent.parent
SPECULATOR = "vllm/v1/worker/gpu/spec_decode/dspark/speculator.py"
MODEL = "vllm/model_executor/models/qwen3_dspark.py"


def release(pin_name: str, kind: str) -> compat.ReleaseFile:
    pin = compat.load(ROOT / "compat.yaml").engine("vllm").pins[pin_name]
    return next(r for r in pin.releases if r.kind == kind and r.package == "vllm")


def series_dir(pin_name: str) -> Path:
    return ROOT / "patches" / "vllm" / pin_name


def applied_release_tree(pin_name: str, kind: str, workdir: Path) -> Path:
    """`dspark apply vllm --commit PIN --source pypi` on the pin's sdist or x86_64 wheel into
    workdir; skips when the wheel is not cached (CI's .ci/prepare.d/32-vllm-wheels.sh caches it)
    or the index cannot be reached."""
    rel = release(pin_name, kind)
    cached = pypi_source.cache_dir() / "releases" / rel.file
    if kind == "wheel" and not cached.is_file():
        skip_unless_ci(f"{rel.file} (240–340 MB) is not cached under {cached.parent} (.ci/prepare.d/32-vllm-wheels.sh "
                       "fetches it); the sdist case covers the tree")
    try:
        pypi_source.fetch_release(rel)
    except EnvironmentProblem as exc:  # the index not reachable; a sha256 mismatch (CheckFailed) fails
        skip_unless_ci(f"cannot fetch {rel.file}: {exc}")
    run = subprocess.run([sys.executable, "-m", "dspark_cli", "apply", "vllm", "--commit", pin_name, "--source", "pypi",
                          "--file", rel.file, "-C", str(workdir), "--json"], capture_output=True, text=True,
                         env={**os.environ, "DSPARK_COMPAT": str(ROOT / "compat.yaml")})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["status"] == "applied"
    return workdir


def added_lines(pin_name: str) -> dict[str, list[str]]:
    """{file: the non-blank lines the series adds to it}, over every patch of the pin's series."""
    added = {}
    for patch in load_series(series_dir(pin_name), "dspark"):
        file = None
        for line in patch.path.read_text().splitlines():
            if line.startswith("diff --git "):
                file = line.split(" b/", 1)[1]
                added.setdefault(file, [])
            elif line.startswith("+") and not line.startswith("+++") and line[1:].strip():
                added[file].append(line[1:])
    return added


def class_def(tree: ast.AST, name: str) -> ast.ClassDef:
    return next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)


def method_def(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)


def attribute_reads(source: str, name: str) -> set[str]:
    """`name.<attr>` reads in a module's source (`name` = spec or model)."""
    return {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)
            and isinstance(n.value, ast.Name) and n.value.id == name}


def self_attributes(tree: ast.AST, class_names: list[str]) -> set[str]:
    """What the classes set on `self` or define as methods."""
    found = set()
    for cls in (class_def(tree, c) for c in class_names):
        for node in ast.walk(cls):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                    and isinstance(node.ctx, ast.Store):
                found.add(node.attr)
            if isinstance(node, ast.FunctionDef):
                found.add(node.name)
    return found


def check_hook_contract(tree: Path, attached: bool = False) -> None:
    """vLLM's DSparkSpeculator offers `model.sample_sequential(self, num_reqs, head_hidden)`, our
    patch defines it on Qwen3DSparkForCausalLM (v0.33.0) or has `v2_fused.attach` give it to each
    instance (`attached`, v0.34.0), and every spec/model attribute v2_fused reads is set by the
    release's speculator and model classes."""
    speculator = ast.parse((tree / SPECULATOR).read_text())
    loop = method_def(class_def(speculator, "DSparkSpeculator"), "_sample_sequential")
    calls = [n for n in ast.walk(loop) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "sample_sequential"]
    assert [[ast.unparse(a) for a in c.args] for c in calls] == [["self", "num_reqs", "head_hidden"]]
    assert 'getattr(self.model, "sample_sequential", None)' in ast.unparse(loop).replace("'", '"')

    model = ast.parse((tree / MODEL).read_text())
    ours_class = class_def(model, "Qwen3DSparkForCausalLM")
    if attached:
        assert not [n for n in ours_class.body if isinstance(n, ast.FunctionDef) and n.name == "sample_sequential"]
        body = ast.unparse(method_def(ours_class, "__init__"))
        assert "from dspark_cli.integrations.vllm import v2_fused" in body and "v2_fused.attach(self)" in body
    else:
        hook = method_def(ours_class, "sample_sequential")
        assert [a.arg for a in hook.args.args] == ["self", "spec", "num_reqs", "head_hidden"]
        body = ast.unparse(hook)
        assert "from dspark_cli.integrations.vllm import v2_fused" in body
        assert "return v2_fused.sample_sequential(self, spec, num_reqs, head_hidden)" in body

    ours = (ROOT / "dspark_cli/integrations/vllm/v2_fused.py").read_text()
    spec_base = tree / "vllm/v1/worker/gpu/spec_decode"
    speculator_attrs = set()
    for file, classes in ((spec_base / "speculator.py", ["BaseSpeculator", "DraftModelSpeculator"]),
                          (spec_base / "dflash/speculator.py", ["DFlashSpeculator"]),
                          (spec_base / "dspark/speculator.py", ["DSparkSpeculator"])):
        speculator_attrs |= self_attributes(ast.parse(file.read_text()), classes)
    missing = attribute_reads(ours, "spec") - speculator_attrs
    assert not missing, f"v2_fused reads spec.{missing} which this release's speculators do not set"

    dflash = ast.parse((tree / "vllm/model_executor/models/qwen3_dflash.py").read_text())
    model_attrs = self_attributes(model, ["Qwen3DSparkForCausalLM"]) | self_attributes(dflash, ["DFlashQwen3ForCausalLM"])
    missing = attribute_reads(ours, "model") - model_attrs
    assert not missing, f"v2_fused reads model.{missing} which Qwen3DSparkForCausalLM does not have"
    heads = self_attributes(model, ["Qwen3DSparkModel", "DSparkMarkovHead", "DSparkConfidenceHead"])
    assert {"markov_head", "confidence_head", "markov_w1", "markov_w2", "proj", "with_markov"} <= heads


_PROBE_HEAD = '''
import importlib, inspect, json, sys, traceback
out = {"imports": {}, "files": {}}
for name in sys.argv[1].split(","):
    try:
        module = importlib.import_module(name)
        out["imports"][name] = "ok"
        out["files"][name] = module.__file__
    except BaseException:
        out["imports"][name] = traceback.format_exc(limit=-3)
'''
_PROBE_TAIL = '''
print("DSPARK-PROBE " + json.dumps(out))
'''


def run_probe(version: str, probe: str, imported: list[str], patched: list[str]) -> dict:
    """Import `imported` with the patched vLLM `version` venv's interpreter (DSPARK_VLLM0xy_PYTHON,
    which .ci/prepare.d/33-vllm-import.sh builds; unset: skip), this checkout first on its path,
    recording each module's file or traceback in `out`, then run `probe`, which adds to `out` (it
    gets sys.argv[2], the `patched` modules, and `importlib`, `inspect`); the JSON of `out`."""
    variable = "DSPARK_VLLM0" + version.split(".")[1] + "_PYTHON"
    python = os.environ.get(variable)
    if not python:
        pytest.skip(f"{variable} is unset: .ci/prepare.d/33-vllm-import.sh builds the patched vLLM {version} venv "
                    "(torch 2.14.1 CUDA build + the vllm wheel, ~1.9 GB) and exports it")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "WARNING", "DSPARK_V2_FUSED": "1"}
    env.pop("DSPARK_VLLM_PYTHON", None)
    script = _PROBE_HEAD + probe + _PROBE_TAIL
    run = subprocess.run([python, "-c", script, ",".join(imported), ",".join(patched)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    line = next((l for l in run.stdout.splitlines() if l.startswith("DSPARK-PROBE ")), None)
    assert run.returncode == 0 and line, run.stderr[-4000:]
    return json.loads(line.removeprefix("DSPARK-PROBE "))


def check_imports(imported: dict, version: str) -> None:
    """run_probe's imports all succeeded, with that vLLM and torch 2.14.1, and nothing faked a GPU."""
    failed = {name: tb for name, tb in imported["imports"].items() if tb != "ok"}
    assert not failed, failed
    assert imported["versions"][0] == version and imported["versions"][1].startswith("2.14.1")
    assert imported["platform"] == "UnspecifiedPlatform"  # no GPU, no driver: nothing faked


def check_imported_sources_carry_the_series(pin_name: str, sources: dict[str, str], modules: list[str]) -> None:
    """Every line a patch adds is in the source of the module vLLM actually imported."""
    by_file = {m.replace(".", "/") + ".py": m for m in modules}
    added = added_lines(pin_name)
    assert set(added) == set(by_file), "the module list is not the set of files the series changes"
    for file, lines in added.items():
        source = sources[by_file[file]].splitlines()
        missing = [line for line in lines if line not in source]
        assert not missing, f"the imported {by_file[file]} lacks the patch's lines {missing[:3]}"
