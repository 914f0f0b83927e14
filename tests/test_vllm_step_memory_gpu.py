"""The V1 proposer's profiling step (integrations/vllm/step_memory) against real drafting steps on a
GPU: vLLM sizes the KV cache from its profiling run's peak, so the step made there must take at
least the memory that drafting steps at max_num_seqs take later — greedy and sampled, unwarped and
with the top-k/top-p a request may ask for, with q pending from the step before, held rows of
skipped requests and the verifier's copy. Qwen3-4B DSpark shapes. Skipped, with the reason,
without a GPU or a build.

    PYTHONPATH=. python -m pytest -q tests/test_vllm_step_memory_gpu.py     (after `dspark build`)"""

import pytest
import torch

from dspark_cli.integrations.vllm.draft_probs import PendingDraftProbs
from dspark_cli.integrations.vllm.step_memory import run_largest_step
from dspark_cli.runtime import markov_chain

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_extension")]

V, RANK, HIDDEN, GAMMA = 151936, 256, 2560, 7


def peak_bytes(fn) -> int:
    """Peak allocated bytes above what was allocated before `fn` ran."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("sample", [True, False], ids=["sampled", "greedy"])
@pytest.mark.parametrize("requests", [16, 64])
def test_the_profiled_step_takes_at_least_what_drafting_steps_take(requests, sample):
    device = torch.device("cuda")
    g = torch.Generator(device).manual_seed(requests)
    lm_head = (torch.randn(V, HIDDEN, generator=g, device=device) * 0.02).bfloat16()
    w1 = (torch.randn(V, RANK, generator=g, device=device) * 0.05).bfloat16()
    w2 = (torch.randn(V, RANK, generator=g, device=device) * 0.05).bfloat16()
    confidence_head = (torch.randn(1, HIDDEN + RANK, generator=g, device=device) * 0.02, torch.zeros(1, device=device))

    def draft_logits(h):
        return h @ lm_head.T

    profiled = peak_bytes(lambda: run_largest_step(
        draft_logits, w1, w2, requests=requests, gamma=GAMMA, hidden_size=HIDDEN, dtype=torch.bfloat16,
        device=device, sample=sample, confidence_head=confidence_head))

    ids = [f"r{i}" for i in range(requests)]
    full = lambda v, dtype: torch.full((requests,), v, dtype=dtype, device=device)  # noqa: E731
    warps = [(None, None), (full(50, torch.int64), None), (None, full(0.95, torch.float32)),
             (full(20, torch.int64), full(0.8, torch.float32)), (full(-1, torch.int64), full(1.0, torch.float32))]
    # each warp on all requests, then on every other one (the rest held)
    batches = [ids, ids[::2]] * len(warps)

    def drafting_steps():
        pending, tokens = PendingDraftProbs(), None
        for step, batch in enumerate(batches):
            R = len(batch)
            if tokens is not None and sample:  # verification of the drafts pending for this batch (a copy, freed)
                pending.for_verification(batch, [GAMMA] * R, tokens.reshape(-1)[: R * GAMMA], placeholders=[0])
            h = torch.randn(R * GAMMA, HIDDEN, generator=g, device=device, dtype=torch.bfloat16)
            U = draft_logits(h).view(R, GAMMA, V)
            top_k, top_p = warps[step // 2] if sample else (None, None)
            temperature = torch.full((R,), 0.8 if sample else 0.0, device=device)
            draft = markov_chain(
                U, torch.randint(0, V, (R,), generator=g, device=device), w1, w2, temperature,
                top_k=None if top_k is None else top_k[:R], top_p=None if top_p is None else top_p[:R],
                seeds=torch.randint(0, 2**62, (R,), generator=g, device=device), return_q=sample,
                confidence=(h.view(R, GAMMA, HIDDEN), *confidence_head))
            # what the proposer keeps of a step: the tokens (in vLLM's hands) and q (pending)
            tokens = draft.tokens
            pending.drafted(batch, draft.q if sample else None)
            del h, U, draft

    real = peak_bytes(drafting_steps)
    print(f"requests={requests} sample={sample}: profiled {profiled} B, drafting steps {real} B")
    assert real > 0
    assert profiled >= real, (f"the profiled step took {profiled / 2**20:.0f} MiB, drafting steps "
                              f"{real / 2**20:.0f} MiB at {requests} requests")
