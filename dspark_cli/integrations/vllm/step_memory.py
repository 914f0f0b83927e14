"""The largest DSpark drafting step's tensors, made once inside vLLM's memory-profiling run.

vLLM sizes the KV cache from the peak memory of its profiling run (`profile_run`, before the KV
cache exists; the CPU worker runs it only when it compiles); memory a drafter first takes later comes out of what the
KV cache already holds. The DFlash dummy run the V1 proposer inherits runs the draft's forward
only. A DSpark step also makes the draft logits U [R·γ, V] (model dtype) and the Markov chain's q
[R, γ, V] fp32 with the chain's scratch, while the previous step's drafts and q and the q held for
skipped requests (draft_probs.PendingDraftProbs: at most max_num_seqs rows together) are alive. At
max_num_seqs = 256, γ = 7, V = 151936: U 0.5 GB in bf16 and 1.1 GB per q. Verification takes less
of ours: the pending rows and at most one copy of them. Only values differ from a real step here,
and the chain's allocations do not depend on values."""

import torch

from dspark_cli.runtime import cuda_ops, markov_chain


@torch.inference_mode()
def run_largest_step(draft_logits, w1, w2, *, requests: int, gamma: int, hidden_size: int, dtype,
                     device, sample: bool, confidence_head=None) -> None:
    """One drafting step at `requests` rows with everything a real step keeps alive. draft_logits:
    hidden [n, hidden_size] -> logits [n, V] (the draft model's own head). sample: the engine may
    draft by sampling: q is stored, the previous step's q is pending, and the warped chain
    (top-k/top-p) runs besides the unwarped one, as either may be the larger.
    confidence_head: (weight, bias) as confidence_head_fp32 gives them, or None."""
    h = torch.zeros(requests * gamma, hidden_size, dtype=dtype, device=device)
    U = draft_logits(h).view(requests, gamma, -1)
    V = U.shape[-1]
    anchors = torch.zeros(requests, dtype=torch.int64, device=device)
    confidence = None if confidence_head is None else (h.view(requests, gamma, -1), *confidence_head)
    # the proposer's keys: counter-based whenever our CUDA chain runs (the torch chain without keys
    # takes more memory, and is not what runs there)
    seeds = torch.zeros(requests, dtype=torch.int64, device=device) if cuda_ops.available(U) else None
    # the previous step's drafts (in the runner) and, when drafts are sampled, its q and the held
    # rows: alive while this step drafts
    pending = [torch.empty(requests, gamma, dtype=torch.int64, device=device)]
    warps = [(None, None)]
    if sample:
        pending.append(torch.empty(requests, gamma, V, dtype=torch.float32, device=device))
        warps.append((torch.full((requests,), V - 1, dtype=torch.int64, device=device),
                      torch.full((requests,), 0.9, dtype=torch.float32, device=device)))
    temperature = torch.full((requests,), 1.0 if sample else 0.0, dtype=torch.float32, device=device)
    for top_k, top_p in warps:
        markov_chain(U, anchors, w1, w2[:V], temperature, top_k=top_k, top_p=top_p, seeds=seeds,
                     return_q=sample, confidence=confidence)
    del pending
