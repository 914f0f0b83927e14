"""vLLM Model Runner V2 (v0.33.0, v0.34.0): run DSpark's Markov chain and confidence head through
dspark_cli.runtime (our fused CUDA ops when the extension is built, the torch reference otherwise).

vLLM's `DSparkSpeculator._sample_sequential` first offers each draft step to the draft model's
`sample_sequential(spec, num_reqs, head_hidden) -> bool`; True means the model wrote
`spec.draft_tokens` (and, where used, the draft logits cache / `spec.draft_token_confidence_probs`)
itself. Our v0.33.0 patch gives `Qwen3DSparkForCausalLM` that method, delegating to
`sample_sequential` below; our v0.34.0 patch gives each instance the hook through `attach`, only
while this path is on, because v0.34.0 keeps the draft logits cache whole and the sequential
sampling replicated across TP ranks for any draft model that has one. The cache `spec.draft_logits`
is the [max_reqs, γ, V] tensor in v0.33.0 and a `DraftLogitsCache` holding it as `.values` in
v0.34.0 (`_logits_cache`).

It runs inside vLLM's FULL CUDA graph of the draft step, so everything here is tensor work on the
device: no `.item()`, no host copies, no data-dependent shapes. Cases we do not cover exactly are
declined once at the first call (vLLM's own loop then runs) and the reason is logged:

  * probabilistic drafting needs `draft_logits` in fp32 (vLLM caches the pre-temperature draft
    logits in `head_dtype`, bf16 by default; the ratio test rebuilds q from that cache, so it must
    hold the fp32 logits our chain sampled from: bit for bit on the torch reference; on our CUDA
    chain they are recomputed in torch, whose W2·W1[x] sum may differ from the kernel's in the
    last fp32 place, a relative change of q around 1e-6). Serve the target with
    `--hf-overrides '{"head_dtype": "float32"}'` to use the fused path with probabilistic drafts;
  * reduced draft vocabularies (d2t), an input vocab_size other than draft_vocab_size, logit scale
    or soft-capping on the draft head, an output logit transform, draft watermarking, the
    acceptance estimator (adaptive verification without a confidence head), a confidence head
    without the Markov input, quantized Markov weights, a recurrent Markov head (v0.34.0's
    `has_recurrent_markov_head`), a draft logits cache sharded across TP ranks (v0.34.0 keeps it
    whole for a model with this hook; declined should that change). On v0.34.0 a declining model
    still has the hook, so its cache stays whole: DSPARK_V2_FUSED=0 gives vLLM its own path back.

Switch: env DSPARK_V2_FUSED=1/0 forces it on/off; unset, it is on exactly when our CUDA extension
is built and loaded (`dspark_cli.runtime.cuda_ops.available()`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from dspark_cli.runtime import check_markov_weight_values, cuda_ops, rng
from dspark_cli.runtime.confidence import confidence_probs
from dspark_cli.runtime.markov import markov_chain

from dspark_cli.integrations.switches import env_switch
from dspark_cli.integrations.vllm.confidence_head import confidence_head_fp32

ENV_SWITCH = "DSPARK_V2_FUSED"
_PLAN_ATTR = "_dspark_v2_plan"

logger = logging.getLogger("dspark.vllm.v2_fused")


def enabled() -> bool:
    """DSPARK_V2_FUSED=1/0 wins; unset, on exactly when our CUDA extension is loaded."""
    switch = env_switch(ENV_SWITCH)
    return bool(cuda_ops.available()) if switch is None else switch


def attach(model) -> None:
    """Our v0.34.0 patch's hook: the draft model instance gets `sample_sequential` only while this
    path is on and can serve the engine's configuration, so otherwise vLLM 0.34.0 runs as released
    (it batch-shards the draft logits and the sequential sampling only for a model without the
    hook: a hook sure to decline every call would cost tensor-parallel engines that sharding)."""
    if enabled() and _configured_cache_reason() is None:
        model.sample_sequential = functools.partial(sample_sequential, model)


def _configured_cache_reason() -> str | None:
    """decline_reason's cache-dtype refusal, read from the engine's config at model construction:
    sampled drafts keep their logits in model_config.head_dtype (bf16 by default)."""
    try:
        from vllm.config import get_current_vllm_config

        config = get_current_vllm_config()
        speculative, head_dtype = config.speculative_config, config.model_config.head_dtype
    except (ImportError, AttributeError, AssertionError):  # no engine config here (vLLM 0.34.0 asserts
        return None  # one is set; a stand-in model): decided per call
    if speculative is not None and speculative.draft_sample_method == "probabilistic" and head_dtype != torch.float32:
        return f"draft_logits are cached in {str(head_dtype).removeprefix('torch.')}"
    return None


@dataclass(frozen=True)
class _Plan:
    """What the fused path needs, resolved once per draft model (None stored = declined)."""

    w1: torch.Tensor  # [V, r] Markov embedding of the previous token
    w2: torch.Tensor  # [V, r] Markov projection (padding rows of the LM-head layout cut off)
    probabilistic: bool  # spec.draft_logits is kept: write the corrected logits, sample at T
    confidence_weight: torch.Tensor | None  # [1, d + r] fp32 when the confidence head is used
    confidence_bias: torch.Tensor | None


def _logits_cache(spec) -> torch.Tensor | None:
    """The [max_reqs, γ, V] draft logits cache: spec.draft_logits itself (v0.33.0) or its `.values`
    (v0.34.0's DraftLogitsCache); None when drafting is greedy."""
    cache = spec.draft_logits
    return cache if cache is None or isinstance(cache, torch.Tensor) else cache.values


def decline_reason(model, spec) -> str | None:
    """Why the fused path cannot reproduce vLLM's semantics exactly for this model, or None."""
    if not enabled():
        return f"{ENV_SWITCH} is off (or our CUDA extension is not built)"
    if getattr(model, "draft_id_to_target_id", None) is not None:
        return "reduced draft vocabulary (d2t mapping)"
    processor = getattr(model, "logits_processor", None)
    if processor is None or getattr(processor, "scale", 1.0) != 1.0 or getattr(processor, "soft_cap", None):
        return "draft head applies a logit scale or soft cap"
    if hasattr(model, "apply_output_logit_transform"):
        return "draft model has an output logit transform"
    if getattr(spec, "draft_watermarker", None) is not None:
        return "draft watermarking is on"
    if getattr(spec, "use_acceptance_estimator", False):
        return "adaptive verification uses the acceptance estimator (no confidence head)"
    if getattr(model, "has_recurrent_markov_head", False):
        return "recurrent Markov head (its state is not the previous token's W1 row)"
    if getattr(spec.draft_logits, "row_mapping", None) is not None:
        return "the draft logits cache is sharded across TP ranks (batch-sharded sampling)"
    head = model.model.markov_head
    w1, w2 = (getattr(getattr(head, name), "weight", None) for name in ("markov_w1", "markov_w2"))
    # fp8 is floating point too, and a GPTQ/AWQ layer has qweight and no weight: our chain (and the
    # torch reference it falls back to) takes W1 and W2 of one of fp32/bf16/fp16
    if w1 is None or w2 is None or w1.dtype != w2.dtype or w1.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return "quantized Markov weights"
    # vLLM sizes W1 by config.vocab_size but W2 and U by draft_vocab_size (unset: vocab_size, as vLLM
    # reads it; subclasses such as Gemma4's do not fill it in); our chain takes one V.
    draft_vocab = getattr(model.config, "draft_vocab_size", None) or model.config.vocab_size
    if w1.shape[0] != draft_vocab:
        return (f"the Markov W1 has {w1.shape[0]} rows (vocab_size), the draft vocabulary of W2 and the "
                f"logits {draft_vocab} (draft_vocab_size)")
    cache = _logits_cache(spec)
    if cache is not None and cache.dtype != torch.float32:
        return (f"draft_logits are cached in {str(cache.dtype).removeprefix('torch.')}, "
                "not float32 (serve with --hf-overrides '{\"head_dtype\": \"float32\"}')")
    if getattr(spec, "use_confidence_head", False):
        confidence = model.model.confidence_head
        if confidence is None or not getattr(confidence, "with_markov", False):
            return "confidence head without the Markov input"
    return None


def _resolve_plan(model, spec) -> _Plan | None:
    reason = decline_reason(model, spec)
    if reason is not None:
        logger.info("DSpark V2 fused Markov path off, vLLM's loop runs: %s", reason)
        return None
    head = model.model.markov_head
    w1 = head.markov_w1.weight
    check_markov_weight_values(w1, head.markov_w2.weight)  # once, at the eager profile run's call
    weight = bias = None
    if spec.use_confidence_head:  # fp32 once here: the chain's confidence launch reads fp32
        weight, bias = confidence_head_fp32(model.model.confidence_head)
    logger.info("DSpark V2 fused Markov path on (CUDA ops: %s)", bool(cuda_ops.available()))
    return _Plan(w1=w1, w2=head.markov_w2.weight[: w1.shape[0]], probabilistic=spec.draft_logits is not None,
                 confidence_weight=weight, confidence_bias=bias)


def _plan_for(model, spec) -> _Plan | None:
    # Resolved at the first call, which vLLM makes eagerly (profile run) before any graph capture.
    if not hasattr(model, _PLAN_ATTR):
        setattr(model, _PLAN_ATTR, _resolve_plan(model, spec))
    return getattr(model, _PLAN_ATTR)


def corrected_logits(U: torch.Tensor, prev_emb: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """U_k + W2·W1[x_{k-1}] in fp32, [R, γ, V], computed position by position as
    runtime.markov_chain's reference does: the logits it sampled from, bit for bit; our CUDA chain's
    may differ in the last place (the module docstring)."""
    w2_fp32 = w2.float()
    return torch.stack([U[:, k].float() + prev_emb[:, k].float() @ w2_fp32.t() for k in range(U.shape[1])], dim=1)


def store_by_request_state(cache: torch.Tensor, state: torch.Tensor, valid: torch.Tensor,
                           rows: torch.Tensor) -> None:
    """cache[state[b], :γ] = rows[b] for valid rows b, without a host sync.

    Invalid rows (state -1: CUDA-graph padding, dummy runs) are pointed at the first valid row's
    slot with that row's own values, so every write into a slot carries identical bits; with no
    valid row they rewrite slot 0 with its current content. Either way no slot changes wrongly.
    """
    gamma = rows.shape[1]
    # One-element index tensors throughout: indexing by a 0-dim CUDA tensor would read it on the host.
    first = torch.argmax(valid.to(torch.int32)).view(1)  # first True, or 0 when none is
    slot = state.clamp(min=0)
    first_slot = slot.index_select(0, first)
    old = cache.index_select(0, first_slot)[:, :gamma].to(rows.dtype)
    filler = torch.where(valid.index_select(0, first).view(1, 1, 1), rows.index_select(0, first), old)
    target = torch.where(valid, slot, first_slot)
    values = torch.where(valid[:, None, None], rows, filler)
    cache[:, :gamma].index_copy_(0, target, values.to(cache.dtype))


def sample_sequential(model, spec, num_reqs: int, head_hidden: torch.Tensor) -> bool:
    """vLLM's draft-model hook: draft γ tokens per request with the Markov chain, fill
    spec.draft_tokens (+ draft_logits, draft_token_confidence_probs); False = vLLM's loop runs."""
    plan = _plan_for(model, spec)
    if plan is None:
        return False
    gamma = spec.num_speculative_steps
    num_sample = num_reqs * gamma
    sample_hidden = head_hidden[spec.sample_indices[:num_sample]]
    U = model.compute_draft_logits(sample_hidden).view(num_reqs, gamma, -1)

    state = spec.sample_idx_mapping[:num_sample].view(num_reqs, gamma)[:, 0]  # -1 = padded row
    valid = state >= 0
    slot = state.clamp(min=0)
    anchors = spec.input_buffers.input_ids[spec._anchor_idx[:num_reqs]]
    if plan.probabilistic:
        temperature = torch.where(valid, spec.temperature[slot], torch.zeros_like(spec.temperature[slot]))
    else:  # greedy drafting (draft_sample_method="greedy"): argmax of the corrected logits
        temperature = torch.zeros(num_reqs, dtype=torch.float32, device=U.device)
    first_pos = spec.sample_pos[:num_sample].view(num_reqs, gamma)[:, 0]
    seeds = rng.round_seeds(spec.seeds[slot], first_pos)

    confidence = None  # the head's logits come with the draft (our CUDA chain: from its last launch)
    if plan.confidence_weight is not None:
        confidence = (sample_hidden.view(num_reqs, gamma, -1), plan.confidence_weight, plan.confidence_bias)
    draft = markov_chain(U, anchors, plan.w1, plan.w2, temperature, seeds=seeds, return_q=False,
                         confidence=confidence)
    spec.draft_tokens[:num_reqs] = draft.tokens
    if plan.probabilistic:
        store_by_request_state(_logits_cache(spec), state, valid, corrected_logits(U, draft.prev_emb, plan.w2))
    if draft.confidence_logits is not None:
        spec.draft_token_confidence_probs[:num_reqs] = confidence_probs(draft.confidence_logits)
    return True
