"""The V1 proposer's drafting memory in vLLM's profiling run (integrations/vllm/step_memory) against
real drafting steps on a GPU: vLLM sizes the KV cache from its profiling run, so the pending q's
reservation and the step made there must take at least the memory that drafting steps at
max_num_seqs take later — greedy and sampled, unwarped and with the top-k/top-p a request may ask
for, with q pending from the step before, held rows of skipped requests, the verifier's copy and
the target's logits the runner holds. Qwen3-4B DSpark shapes. Skipped, with the reason, without a
GPU or a build.

    PYTHONPATH=. python -m pytest -q tests/test_vllm_step_memory_gpu.py     (after `dspark build`)"""

import gc

import pytest
import torch

from dspark_cli.integrations.vllm.draft_probs import PendingDraftProbs
from dspark_cli.integrations.vllm.step_memory import reserve_pending_q, run_largest_step
from dspark_cli.runtime import markov_chain

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_extension")]

V, RANK, HIDDEN, GAMMA = 151936, 256, 2560, 7


def peak_bytes(fn) -> int:
    """Peak bytes of live tensors above those live before `fn` ran. The caching allocator's
    requested bytes, not its allocated bytes: a cached block is handed out whole when less than
    1 MiB of it would remain, so allocated bytes carry up to 1 MiB per tensor that depends on the
    process's history, not on what the step holds (measured: 2-5 MB either way between runs).
    Garbage of earlier tests (tensors in reference cycles) is collected first: freed by a collection
    inside `fn`, it lowers the peak by its size (once, in a full GPU run, the profiled greedy step at
    R = 16 measured 69,574,490 B, 3.8 MiB short of its 73,606,240 alone and in every other run)."""
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["requested_bytes.all.current"]
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.memory_stats()["requested_bytes.all.peak"] - before


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

    def profiled_step():
        reserve = reserve_pending_q(requests, GAMMA, V, device) if sample else None  # from load_model on
        run_largest_step(draft_logits, w1, w2, requests=requests, gamma=GAMMA, hidden_size=HIDDEN,
                         dtype=torch.bfloat16, device=device, sample=sample, confidence_head=confidence_head)
        del reserve

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
            target_logits = torch.randn(R * (GAMMA + 1), V, generator=g, device=device, dtype=torch.bfloat16)
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
            del h, U, draft, target_logits

    # once unmeasured: one-time allocations (cuBLAS's workspace, 32 MiB) come before either measure,
    # as in vLLM they come in its profiling run
    drafting_steps()
    real = peak_bytes(drafting_steps)
    profiled = peak_bytes(profiled_step)
    print(f"requests={requests} sample={sample}: profiled {profiled} B, drafting steps {real} B")
    assert real > 0
    assert profiled >= real, (f"the profiled step took {profiled / 2**20:.0f} MiB, drafting steps "
                              f"{real / 2**20:.0f} MiB at {requests} requests")


def test_a_step_that_does_not_fit_says_what_to_lower():
    """At start, not mid-serving: 100 000 requests' U alone (212 GB in bf16) exceeds the GPU."""
    device = torch.device("cuda")
    lm_head = torch.zeros(V, HIDDEN, dtype=torch.bfloat16, device=device)
    w = torch.zeros(V, RANK, dtype=torch.bfloat16, device=device)
    with pytest.raises(RuntimeError, match=r"DSpark's drafting does not fit at start: max_num_seqs = "
                                           r"100000 requests × γ = 7 × V = 151936 .*lower max_num_seqs"):
        run_largest_step(lambda h: h @ lm_head.T, w, w, requests=100_000, gamma=GAMMA, hidden_size=HIDDEN,
                         dtype=torch.bfloat16, device=device, sample=True)
