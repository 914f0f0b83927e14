"""patches/vllm/v0.34.0 on the real v0.34.0 release trees from PyPI.

vLLM v0.34.0 removed Model Runner V1 (v1/worker/gpu_model_runner.py, v1/spec_decode/dflash.py and
utils/cpu_triton_utils.py are gone; the x86 CPU backend runs a V2-style runner), so the series is
the marker and the V2 `sample_sequential` hook that routes DSpark's Markov loop to our kernels,
given to each draft model instance only while our path is on (v0.34.0 stops batch-sharding the
draft logits for a model that has the hook).

What runs: `dspark apply vllm --commit v0.34.0 --source pypi` on the sdist (51 MB) and the x86_64
wheel when cached (`.ci/prepare.d/32-vllm-wheels.sh`); the V1 files are checked gone (why the V1
patches are not carried); every patched file byte-compiles; the hook contract on the AST. With
`.ci/prepare.d/33-vllm-import.sh`'s venv (DSPARK_VLLM034_PYTHON: the 0.34.0 wheel, torch 2.14.1,
no GPU): the patched modules import, carry every added line, and the hook runs on CPU through the
release's real `DraftLogitsCache` (replicated, as v0.34.0 makes it for a model with the hook),
writing the same drafts and logits as into v0.33.0's plain tensor.
Not run: the V2 runner and the engine (GPU + Triton; no CPU build of 0.34.0 is on PyPI).
"""

import py_compile

import pytest

from tests.vllm_release_tree import (MODEL, ROOT, added_lines, applied_release_tree, check_hook_contract,
                                     check_imported_sources_carry_the_series, check_imports, run_probe)

pytestmark = pytest.mark.slow
V1_FILES = ["vllm/v1/worker/gpu_model_runner.py", "vllm/v1/spec_decode/dflash.py", "vllm/utils/cpu_triton_utils.py"]


@pytest.fixture(scope="module", params=["sdist", "wheel"])
def patched_tree(request, tmp_path_factory):
    return applied_release_tree("v0.34.0", request.param, tmp_path_factory.mktemp(request.param) / "vllm")


def test_v1_runner_is_gone_and_the_series_patches_only_the_marker_and_the_v2_hook(patched_tree, tmp_path):
    assert not [f for f in V1_FILES if (patched_tree / f).exists()]
    config = (patched_tree / "vllm/config/vllm.py").read_text()
    assert "use_v2_model_runner" not in config and "dspark speculative decoding" not in config  # no runner choice, no refusal
    files = sorted(added_lines("v0.34.0"))
    assert files == ["vllm/_dspark.py", MODEL]
    for file in files:
        py_compile.compile(str(patched_tree / file), cfile=str(tmp_path / "x.pyc"), doraise=True)
    assert 'SERIES = "vllm/v0.34.0"' in (patched_tree / "vllm/_dspark.py").read_text()


def test_vllm_offers_the_hook_and_our_patch_attaches_it_and_has_what_it_reads(patched_tree):
    check_hook_contract(patched_tree, attached=True)


PATCHED_MODULES = ["vllm._dspark", "vllm.model_executor.models.qwen3_dspark"]
IMPORTED_MODULES = PATCHED_MODULES + ["vllm.v1.worker.gpu.spec_decode.dspark.speculator",
                                      "vllm.v1.worker.gpu.spec_decode.draft_logits",
                                      "dspark_cli.integrations.vllm.v2_fused"]

_PROBE = r'''
import os, types
if all(v == "ok" for v in out["imports"].values()):
    import torch, vllm, vllm._dspark as marker
    from vllm.platforms import current_platform
    from vllm.model_executor.models.qwen3_dspark import Qwen3DSparkForCausalLM
    from vllm.v1.worker.gpu.spec_decode.draft_logits import DraftLogitsCache
    from vllm.v1.worker.gpu.spec_decode.dspark.speculator import DSparkSpeculator
    from dspark_cli.integrations.vllm import v2_fused
    from tests.v2_hook_standins import D, GAMMA, MAX_REQS, V, make_model, make_spec

    # With our path off a model gets no hook, and vLLM may batch-shard its draft logits again.
    sharding = {}
    for switch in ("0", "1"):
        os.environ["DSPARK_V2_FUSED"] = switch
        attached = make_model()
        v2_fused.attach(attached)
        sharding[switch] = DSparkSpeculator.supports_batch_sharded_draft_logits(types.SimpleNamespace(model=attached))
    # The hook on the release's own cache class against v0.33.0's plain tensor, same inputs.
    model, states = make_model(), [4, -1, 2]
    hidden = torch.randn(MAX_REQS * GAMMA, D)
    plain, real = make_spec(3, states), make_spec(3, states)
    real.draft_logits = DraftLogitsCache(MAX_REQS, GAMMA, V, dtype=torch.float32, fill=-123.0, device="cpu")
    with torch.inference_mode():
        ran = [v2_fused.sample_sequential(model, s, 3, hidden) for s in (plain, real)]
    out.update(
        versions=[vllm.__version__, torch.__version__], platform=type(current_platform).__name__,
        series=marker.SERIES, patches=marker.PATCHES,
        class_has_hook=hasattr(Qwen3DSparkForCausalLM, "sample_sequential"),
        init_source=inspect.getsource(Qwen3DSparkForCausalLM.__init__), sharding=sharding,
        speculator_loop=inspect.getsource(DSparkSpeculator._sample_sequential),
        sources={n: inspect.getsource(importlib.import_module(n)) for n in sys.argv[2].split(",")},
        real_cache_declined=v2_fused.decline_reason(model, real), ran=ran,
        row_mapping_is_none=real.draft_logits.row_mapping is None,
        same_tokens=torch.equal(plain.draft_tokens, real.draft_tokens),
        same_logits=torch.equal(plain.draft_logits, real.draft_logits.values),
        logits_written=bool((real.draft_logits.values[4] != -123.0).all()),
    )
'''


@pytest.fixture(scope="module")
def imported():
    return run_probe("0.34.0", _PROBE, IMPORTED_MODULES, PATCHED_MODULES)


def test_patched_v034_modules_import_and_are_the_patched_ones(imported):
    check_imports(imported, "0.34.0")
    assert imported["files"]["dspark_cli.integrations.vllm.v2_fused"].startswith(str(ROOT))
    assert imported["series"] == "vllm/v0.34.0"
    assert imported["patches"] == ["0001-dspark-marker-module.patch", "0002-dspark-V2-sample-sequential-hook.patch"]
    check_imported_sources_carry_the_series("v0.34.0", imported["sources"], PATCHED_MODULES)
    assert not imported["class_has_hook"] and "v2_fused.attach(self)" in imported["init_source"]
    assert "sample_sequential" in imported["speculator_loop"]


def test_with_our_path_off_vllm_may_shard_the_draft_logits_again(imported):
    """v0.34.0 batch-shards the draft logits cache only for a draft model without the hook
    (DSparkSpeculator.supports_batch_sharded_draft_logits, the release's own method)."""
    assert imported["sharding"] == {"0": True, "1": False}


def test_hook_writes_the_real_v034_draft_logits_cache_as_v033s_tensor(imported):
    assert imported["real_cache_declined"] is None and imported["ran"] == [True, True]
    assert imported["row_mapping_is_none"]
    assert imported["same_tokens"] and imported["same_logits"] and imported["logits_written"]
