"""patches/vllm/v0.33.0 on the real v0.33.0 release trees from PyPI.

What runs: `dspark apply vllm --commit v0.33.0 --source pypi` on the sdist (downloaded into
$DSPARK_CACHE/releases when missing, 47 MB) and on the x86_64 wheel when it is cached (336 MB:
`.ci/prepare.d/32-vllm-wheels.sh` fetches it in CI; a local run without it skips that case); every Python file the series touches byte-compiles; the hook's
contract is checked on the patched tree's syntax (AST): vLLM's DSparkSpeculator offers
`model.sample_sequential(self, num_reqs, head_hidden)`, our patch defines it on
Qwen3DSparkForCausalLM, and every attribute v2_fused reads exists on those classes.
The patched vLLM imported for real (when `.ci/prepare.d/33-vllm-import.sh` has exported
DSPARK_VLLM033_PYTHON): every module the series changes, plus our integration modules, imports in
a venv of the 0.33.0 wheel with torch 2.14.1 (CUDA 13.0 build; vLLM pins 2.14.0, not installable
here), on vLLM's UnspecifiedPlatform (no GPU); the imported sources carry every line the patches
add, and the hook / lazy imports resolve against the real classes.
What does not run here: vLLM's compiled kernels (vllm._C_stable_libtorch etc. need libcuda.so.1),
the V1/V2 runners and the engine (GPU only).
"""

import py_compile
from pathlib import Path

import pytest

from tests.vllm_release_tree import (MODEL, ROOT, added_lines, applied_release_tree, check_hook_contract,
                                     check_imported_sources_carry_the_series, check_imports, run_probe, series_dir)
from dspark_cli.series import load_series

SERIES = series_dir("v0.33.0")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["sdist", "wheel"])
def patched_tree(request, tmp_path_factory):
    return applied_release_tree("v0.33.0", request.param, tmp_path_factory.mktemp(request.param) / "vllm")


def test_every_patched_module_byte_compiles(patched_tree, tmp_path):
    files = sorted(added_lines("v0.33.0"))
    assert MODEL in files and "vllm/config/vllm.py" in files
    for file in files:
        py_compile.compile(str(patched_tree / file), cfile=str(tmp_path / "x.pyc"), doraise=True)


def test_vllm_offers_the_hook_and_our_patch_takes_it_and_has_what_it_reads(patched_tree):
    check_hook_contract(patched_tree)


# --- The patched vLLM 0.33.0, imported for real -------------------------------------------------
# `.ci/prepare.d/33-vllm-import.sh` builds the venv: the vllm 0.33.0 wheel (--no-deps) + its
# CPU-installable requirements, torch 2.14.1 (CUDA 13.0 build; vLLM pins 2.14.0, not installable
# here) and our series laid over site-packages. No GPU: vLLM picks its UnspecifiedPlatform, and
# none of the modules below needs the driver at import time (vLLM's own kernel libraries, e.g.
# vllm._C_stable_libtorch, do: libcuda.so.1; none of our patches touches or imports them).

# Every module a v0.33.0 patch changes, the modules whose classes our patches hook into or inherit
# from, and our integration modules the patched code imports (lazily, inside methods).
PATCHED_MODULES = ["vllm._dspark", "vllm.config.vllm", "vllm.v1.spec_decode.dflash", "vllm.v1.worker.gpu_model_runner",
                   "vllm.utils.cpu_triton_utils", "vllm.model_executor.models.qwen3_dspark",
                   "vllm.v1.sample.ops.topk_topp_sampler", "vllm.v1.sample.rejection_sampler"]
IMPORTED_MODULES = PATCHED_MODULES + [
    "vllm.config.speculative", "vllm.v1.worker.gpu.spec_decode.dspark.speculator",
    "dspark_cli.integrations.vllm.proposer", "dspark_cli.integrations.vllm.v2_fused",
    "dspark_cli.integrations.vllm.cpu_fixes", "dspark_cli.integrations.vllm.min_tokens"]

_PROBE = r'''
if all(v == "ok" for v in out["imports"].values()):
    import os, torch, vllm, vllm._dspark as marker
    from vllm.platforms import current_platform
    from vllm.config.speculative import SpeculativeConfig
    from vllm.model_executor.models.qwen3_dspark import Qwen3DSparkForCausalLM
    from vllm.v1.spec_decode.dflash import DFlashProposer
    from vllm.v1.worker.gpu.spec_decode.dspark.speculator import DSparkSpeculator
    from dspark_cli.integrations.vllm import cpu_fixes, proposer, v2_fused
    from tests.v2_hook_standins import D, GAMMA, MAX_REQS, make_model, make_spec
    hook = Qwen3DSparkForCausalLM.sample_sequential
    # The release class's hook run on stand-ins: it answers what our path does (off: vLLM's loop).
    hook_ran = {}
    for switch in ("0", "1"):
        os.environ["DSPARK_V2_FUSED"] = switch
        spec = make_spec(2, [0, 1])
        with torch.inference_mode():
            hook_ran[switch] = [hook(make_model(), spec, 2, torch.randn(MAX_REQS * GAMMA, D)),
                                bool(spec.draft_tokens[:2].any())]
    out.update(hook_ran=hook_ran,
        versions=[vllm.__version__, torch.__version__], platform=type(current_platform).__name__,
        series=marker.SERIES, patches=marker.PATCHES, v1_supported=list(marker.V1_SUPPORTED),
        hook_params=list(inspect.signature(hook).parameters), hook_source=inspect.getsource(hook),
        speculator_loop=inspect.getsource(DSparkSpeculator._sample_sequential),
        sources={n: inspect.getsource(importlib.import_module(n)) for n in sys.argv[2].split(",")},
        use_dspark=callable(getattr(SpeculativeConfig, "use_dspark", None)),
        proposer_is_dflash=issubclass(proposer.DSparkProposer, DFlashProposer),
        lazy_names=[callable(f) for f in (proposer.aux_layer_ids, v2_fused.sample_sequential, cpu_fixes.expand_float)],
    )
'''


@pytest.fixture(scope="module")
def imported():
    return run_probe("0.33.0", _PROBE, IMPORTED_MODULES, PATCHED_MODULES)


def test_every_patched_v033_module_imports(imported):
    check_imports(imported, "0.33.0")
    site = Path(imported["files"]["vllm.config.vllm"]).parents[2]
    for name in IMPORTED_MODULES:  # vLLM from the venv, ours from this checkout
        assert Path(imported["files"][name]).is_relative_to(ROOT if name.startswith("dspark_cli") else site), name


def test_imported_v033_modules_are_the_patched_ones(imported):
    assert imported["series"] == "vllm/v0.33.0"
    assert imported["patches"] == [p.path.name for p in load_series(SERIES, "dspark")]
    assert set(imported["v1_supported"]) == {"dspark speculative decoding", "adaptive draft verification"}
    check_imported_sources_carry_the_series("v0.33.0", imported["sources"], PATCHED_MODULES)


def test_hook_and_lazy_imports_resolve_in_real_v033(imported):
    assert imported["hook_params"] == ["self", "spec", "num_reqs", "head_hidden"]
    assert "v2_fused.sample_sequential(self, spec, num_reqs, head_hidden)" in imported["hook_source"]
    assert "sample_sequential" in imported["speculator_loop"]
    assert imported["use_dspark"], "SpeculativeConfig.use_dspark(), which the patched V1 runner calls, is gone"
    assert imported["proposer_is_dflash"]  # our V1 proposer subclasses v0.33.0's real DFlashProposer
    assert imported["lazy_names"] == [True, True, True]
    assert imported["hook_ran"] == {"0": [False, False], "1": [True, True]}, imported["hook_ran"]
