"""The memory of DSpark's drafting in vLLM's memory-profiling run, so the KV cache leaves room for it.

vLLM sizes the KV cache from its profiling run (`profile_run`, before the KV cache exists; the CPU
worker runs it only when it compiles): the memory allocated after it plus its transient peak over
that. Memory a drafter first takes later comes out of what the KV cache already holds. The DFlash
dummy run the V1 proposer inherits runs the draft's forward only. DSpark also holds, at
max_num_seqs = 256, γ = 7, V = 151936 (bf16 model):
- the pending blocks between steps, alive through the next step's target forward, sampler and
  drafting: by default (lazy_drafts.PendingDrafts) the last drafting step's base logits U
  [max_num_seqs, γ, V] in the model's dtype (0.5 GB in bf16), which rebuild the residual rows;
  with stored q (DSPARK_V1_DRAFT_Q=stored, draft_probs.PendingDraftProbs) its q rows and those held
  for skipped requests, at most max_num_seqs × γ × V fp32 together (1.1 GB): `reserve_pending_q`
  takes that size in load_model, before the profiling run, and the proposer lets it go at its
  first real draft;
- while it drafts: the draft logits U [R·γ, V] (0.5 GB), the chain's q [R, γ, V] fp32 when it
  stores q (1.1 GB) and scratch, beside the target's logits [R·(γ+1), V] that the runner keeps
  through drafting (0.6 GB): `run_largest_step`, in the profiling run's dummy draft.
Lazy blocks held for requests the scheduler skipped keep only their own rows of U
(lazy_drafts._HeldRows): with the step's own draft at most twice the reservation. Not covered: at
a step that verifies held rows, their drafting step's U restored at its batch size; the verifier's
copy of the pending rows (made when placeholder drafts or rows without q are verified) beside vLLM's rejection sampler, whose own dummy run verifies one
draft per request, not γ (upstream's accounting, for its own drafters too)."""

import torch

from dspark_cli.runtime import cuda_ops, markov_chain


def warped_by_torch(U: torch.Tensor, top_k, top_p) -> bool:
    """A top-k/top-p step on the torch reference: its rows cannot be rebuilt to the bits the chain
    sampled from (MarkovDraft.q_rows refuses them), so that step stores q even for lazy blocks."""
    return (top_k is not None or top_p is not None) and not cuda_ops.available(U)


def reserve_pending_q(requests: int, gamma: int, vocab: int, device, dtype=torch.float32) -> torch.Tensor:
    """The pending blocks' size, [requests, γ, V] of `dtype` (fp32 q, or the draft logits' dtype for
    lazy blocks), held until the first real draft replaces it."""
    return _fitting(requests, gamma, vocab, lambda: torch.empty(requests, gamma, vocab, dtype=dtype, device=device))


@torch.inference_mode()
def run_largest_step(draft_logits, w1, w2, *, requests: int, gamma: int, hidden_size: int, dtype,
                     device, sample: bool, store_q: bool = True, confidence_head=None) -> None:
    """One drafting step at `requests` rows with what a real step keeps alive beside it (the
    pending q is `reserve_pending_q`'s). draft_logits: hidden [n, hidden_size] -> logits [n, V]
    (the draft model's own head); dtype: the model's (target logits, hidden states). sample: the
    engine may draft by sampling: the warped chain (top-k/top-p) runs besides the unwarped one, as
    either may be the larger; store_q: sampled steps store q (else only a top-k/top-p step on the
    torch reference does, as the proposer's). confidence_head: (weight, bias) as
    confidence_head_fp32 gives them, or None."""
    _fitting(requests, gamma, w2.shape[0], lambda: _run(draft_logits, w1, w2, requests, gamma, hidden_size, dtype,
                                                        device, sample, store_q, confidence_head))


def _fitting(requests: int, gamma: int, vocab: int, make):
    """make(), with an out-of-memory error that says what did not fit and what to lower. This runs
    before the KV cache exists, beside the weights alone: gpu_memory_utilization (the KV cache's
    share) frees nothing here."""
    try:
        return make()
    except torch.OutOfMemoryError as exc:
        raise RuntimeError(
            f"DSpark's drafting does not fit at start: max_num_seqs = {requests} requests × γ = {gamma} × V = "
            f"{vocab} (each fp32 q is {requests * gamma * vocab * 4 / 2**30:.2f} GiB) beside the weights; lower "
            f"max_num_seqs or num_speculative_tokens, shard the model (tensor_parallel_size), or free the GPU of "
            f"other processes") from exc


def _run(draft_logits, w1, w2, requests, gamma, hidden_size, dtype, device, sample, store_q, confidence_head) -> None:
    h = torch.zeros(requests * gamma, hidden_size, dtype=dtype, device=device)
    U = draft_logits(h).view(requests, gamma, -1)
    V = U.shape[-1]
    # the target's logits and the previous step's drafts, which the runner holds while this step drafts
    held = (torch.empty(requests * (gamma + 1), V, dtype=dtype, device=device),
            torch.empty(requests, gamma, dtype=torch.int64, device=device))
    anchors = torch.zeros(requests, dtype=torch.int64, device=device)
    confidence = None if confidence_head is None else (h.view(requests, gamma, -1), *confidence_head)
    # the proposer's keys: counter-based whenever our CUDA chain runs (the torch chain without keys
    # takes more memory, and is not what runs there)
    seeds = torch.zeros(requests, dtype=torch.int64, device=device) if cuda_ops.available(U) else None
    warps = [(None, None)]
    if sample:
        warps.append((torch.full((requests,), V - 1, dtype=torch.int64, device=device),
                      torch.full((requests,), 0.9, dtype=torch.float32, device=device)))
    temperature = torch.full((requests,), 1.0 if sample else 0.0, dtype=torch.float32, device=device)
    for top_k, top_p in warps:
        markov_chain(U, anchors, w1, w2[:V], temperature, top_k=top_k, top_p=top_p, seeds=seeds,
                     return_q=sample and (store_q or warped_by_torch(U, top_k, top_p)), confidence=confidence)
    del held
