"""What TGI's patched files call (patches/tgi/v3.3.7): maybe_attach at model load, pad_drafts
when batches concatenate, and choose (through DSparkSpeculation.chooser) in generate_token.
Everything that touches TGI's batch object lives here; the math is in speculation.py and
dspark_cli.runtime.

Run inside the real TGI v3.3.7 shard on the CPU (tests/test_tgi_shard.py); the batch fields used
below are those of FlashCausalLMBatch at v3.3.7 (requests, position_ids, cu_seqlen_prefill,
cache_lengths, input_ids, all_input_ids_tensor, max_current_length, next_token_chooser,
speculative_ids); tests/test_tgi_capture.py checks they exist in the real tree.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from dspark_cli import runtime
from dspark_cli.integrations.tgi.draft import DSparkDraft
from dspark_cli.integrations.tgi.speculation import (ENV_SCHEDULER, ENV_SPS, ENV_STS, DSparkSpeculation,
                                                     configured_draft, step_seeds)
from dspark_cli.runtime._checks import FLOAT_DTYPES  # what the drafter computes in (float8: a weight's storage)


try:  # TGI logs through loguru, to a sink that passes only text_generation_server's modules' records
    import loguru

    logger = loguru.logger.patch(lambda record: record.update(name=f"text_generation_server.{record['name']}"))
except ImportError:
    logger = logging.getLogger(__name__)


# TGI v3.3.7's attention backends that cannot verify drafts, whoever drafts them (its n-gram too).
SPECULATION_BREAKS_ATTENTION = {
    # flash_causal_lm.forward builds flashinfer's ragged block table from the per-request lengths,
    # not the request × (1 + drafts) rows it verifies: the rows attend to the wrong KV blocks
    "flashinfer": "attends the verified rows to the wrong KV blocks (TGI builds its block table per request, "
                  "not per verified row)",
    "flashdecoding-ipex": "crashes inside intel-extension-for-pytorch when TGI speculates",
}


def unsupported(flash_model) -> str | None:
    """Why DSpark cannot serve this shard's model, or None. Tensor parallelism would run the
    unsharded drafter on every rank against a sharded target; a vision-language target's first
    decoder `layers` list (what the capture hooks) may be its vision tower's; two of TGI's attention
    backends cannot verify drafts."""
    world_size = getattr(flash_model, "world_size", None)
    if world_size is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        world_size = torch.distributed.get_world_size()
    if (world_size or 1) > 1:
        return (f"tensor parallelism is not supported (this shard is one of {world_size}); "
                "serve with --num-shard 1 or unset DSPARK_DRAFT")
    attention = os.environ.get("ATTENTION")  # TGI's backend: the launcher resolves it for every shard
    if attention in SPECULATION_BREAKS_ATTENTION:
        return (f"ATTENTION={attention} {SPECULATION_BREAKS_ATTENTION[attention]}; "
                "serve with ATTENTION=flashdecoding (CUDA) or ATTENTION=paged")
    for config in (getattr(flash_model, "config", None), getattr(getattr(flash_model, "model", None), "config", None)):
        if getattr(config, "vision_config", None) is not None:
            return (f"vision-language targets are not supported ({type(config).__name__} has a vision_config); "
                    "unset DSPARK_DRAFT")
    return None


def maybe_attach(flash_model) -> DSparkSpeculation | None:
    """Called at the end of FlashCausalLM.__init__: DSpark on when DSPARK_DRAFT is set and TGI
    speculates. Setups DSpark does not support are refused here, at startup, with one error (not
    served silently)."""
    path = configured_draft()
    if path is None:
        return None
    if flash_model.speculate == 0:
        # An explicit --speculate 0 (without it patch 0002 makes speculate γ): the router reserves
        # no KV slots for drafts and TGI may chunk prefills, so DSpark stays off, as TGI's own
        # speculation would; drafting each step for nothing is what this avoids.
        logger.warning(f"DSpark: DSPARK_DRAFT={path} is ignored: --speculate is 0 (speculation off)")
        return None
    reason = unsupported(flash_model)
    if reason is not None:
        raise RuntimeError(f"DSpark (DSPARK_DRAFT={path}): {reason}")
    target = flash_model.model
    draft = DSparkDraft.load(path, *_compute_placement(flash_model))
    vocab, target_vocab = draft.w["lm_head.weight"].shape[0], _target_config(flash_model, "vocab_size")
    if target_vocab is not None and vocab != target_vocab:
        raise RuntimeError(f"DSpark (DSPARK_DRAFT={path}): the drafter's vocabulary has {vocab} tokens, the "
                           f"target's {target_vocab}; a DSpark drafter serves the target it was trained for")
    # fc reads the captured layers concatenated: a drafter of another hidden size or layer count
    # would otherwise fail at the first step's fc with a bare shape error
    width, hidden = draft.w["fc.weight"].shape[1], _target_config(flash_model, "hidden_size")
    n_layers = len(draft.config.target_layer_ids)
    if hidden is not None and width != n_layers * hidden:
        raise RuntimeError(f"DSpark (DSPARK_DRAFT={path}): the drafter's fc reads {width} features, the target gives "
                           f"{n_layers} layers × hidden size {hidden} = {n_layers * hidden}; a DSpark drafter "
                           "serves the target it was trained for")
    for warning in startup_warnings(draft):
        logger.warning(f"DSpark: {warning}")
    if os.environ.get(ENV_STS):
        draft.sts = _sts_for(draft, os.environ[ENV_STS], path)
    sps = runtime.SPSTable.load(os.environ[ENV_SPS]) if os.environ.get(ENV_SPS) else None
    if draft.graphs is not None:
        _capture_draft_graphs(draft)
    return DSparkSpeculation.for_target(target, draft, os.environ.get(ENV_SCHEDULER) or "exact", sps)


def startup_warnings(draft: DSparkDraft) -> list[str]:
    """Settings TGI serves DSpark under, exactly, but not as well or not as tested as it could: said
    once at startup (the launcher's defaults lead into each)."""
    warnings = []
    if draft.w["fc.weight"].dtype == torch.float16 and draft.checkpoint_dtype == torch.bfloat16:
        # TGI's transformers backend (Qwen3 has no flash model in v3.3.7) defaults to float16
        warnings.append("the target runs in float16 and the drafter, saved in bfloat16, runs in it too (its captured "
                        "features may overflow there: fewer drafts accepted, output still exact); serve with "
                        "--dtype bfloat16")
    if os.environ.get("PREFIX_CACHING", "").lower() in {"1", "true"}:
        warnings.append("PREFIX_CACHING is on: prompt rows served from the prefix cache are not in the drafter's "
                        "context (fewer drafts accepted, output still exact); set PREFIX_CACHING=0")
    graphs = [size for size in os.environ.get("CUDA_GRAPHS", "").split(",") if size.strip() not in ("", "0")]
    if graphs and draft.w["fc.weight"].is_cuda:
        warnings.append(f"TGI's CUDA graphs (CUDA_GRAPHS={os.environ['CUDA_GRAPHS']}, the launcher's default) have "
                        "not run with DSpark: pass --cuda-graphs 0 until they have been checked on your GPU "
                        "(docs/tgi.md)")
    return warnings


def _sts_for(draft: DSparkDraft, sts_path: str, path: Path) -> runtime.STSCalibration:
    """DSPARK_STS for this drafter (STSCalibration.for_block), checked at startup (it was first read
    at warmup's first draft): too short a calibration, or a drafter without a confidence head, is refused."""
    gamma = draft.config.block_size
    if draft.confidence_head is None:
        raise RuntimeError(f"DSpark (DSPARK_DRAFT={path}): {ENV_STS}={sts_path} calibrates a confidence head, and "
                           "this drafter has none; unset it")
    sts = runtime.STSCalibration.load(sts_path)
    served = sts.for_block(gamma)
    if served is None:
        raise RuntimeError(f"DSpark: {ENV_STS}={sts_path} holds {len(sts.temperatures)} temperature(s) for a drafter "
                           f"of block size {gamma}; calibrate at least {gamma} positions")
    return served


def _compute_placement(flash_model) -> tuple[torch.device, torch.dtype]:
    """Device and dtype for the drafter: those TGI declares for the model (Model.__init__ sets
    .device and .dtype, the compute dtype also for quantized weights), else those of the target's
    first parameter in a compute dtype (a quantized target's first parameter may be int8 or fp8)."""
    device, dtype = getattr(flash_model, "device", None), getattr(flash_model, "dtype", None)
    if device is not None and dtype in FLOAT_DTYPES:
        return torch.device(device), dtype
    weight = next((p for p in flash_model.model.parameters() if p.dtype in FLOAT_DTYPES), None)
    if weight is None:
        raise RuntimeError(f"DSpark: the model declares dtype {dtype} and the target has no float32/float16/"
                           "bfloat16 parameter to run the drafter in")
    return weight.device, weight.dtype


def _target_config(flash_model, name: str) -> int | None:
    """`name` (vocab_size, hidden_size) of the target's config: FlashCausalLM.config, or the
    transformers model's for TGI's transformers backend; None when neither declares it."""
    for config in (getattr(flash_model, "config", None), getattr(flash_model.model, "config", None)):
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    return None


def _capture_draft_graphs(draft: DSparkDraft) -> None:
    """The drafter's CUDA graphs for every size now, before TGI's warmup sizes its KV cache from
    the free memory. A capture that fails leaves the drafter eager (slower, same output)."""
    started, before = time.monotonic(), torch.cuda.memory_reserved()
    try:
        draft.graphs.capture_all()
    except RuntimeError as exc:  # out of memory included
        draft.graphs = None
        logger.warning(f"DSpark: the drafter's CUDA graphs could not be captured ({exc}); it runs eagerly")
        return
    logger.info(f"DSpark: drafter CUDA graphs captured in {time.monotonic() - started:.1f} s, "
                f"{(torch.cuda.memory_reserved() - before) / 2**20:.0f} MiB")


def reserve_context(spec: DSparkSpeculation, tokens: int) -> None:
    """Called at the end of FlashCausalLM.warmup, which counted the drafter's context bytes per
    token in the memory that sized the KV cache: the drafter's context pool is held at `tokens`
    rows from now on (the KV cache's tokens and a prefill batch's, whose arriving requests commit
    before the finished ones they replace are dropped)."""
    spec.draft.reserve_context(tokens)
    logger.info(f"DSpark: the drafter's context pool holds {tokens} tokens "
                f"({tokens * spec.draft.context_bytes_per_token() / 2**30:.2f} GiB)")


def pad_drafts(batches) -> None:
    """FlashCausalLMBatch.concatenate with drafts of different widths (each batch's verify width
    was chosen for it): pad to the widest so TGI's one-width layout holds them. A request still
    accepts at most its own width (Pending.ell); the padded rows are computed and unused."""
    width = max(b.speculative_ids.shape[1] for b in batches)
    for b in batches:
        ids = b.speculative_ids
        b.speculative_ids = torch.cat([ids, ids.new_zeros(ids.shape[0], width - ids.shape[1])], 1)


def _own_history(batch, history: torch.Tensor) -> torch.Tensor:
    """The history TGI hands its processors with each request's right padding (TGI pads with 0 to
    the batch's longest request) replaced by the request's last token. TGI's watermark seeds its
    green list from the last column, so plain TGI seeds a request shorter than the batch's longest
    from the padding 0 and the same request alone from its last token; its repetition penalty
    counts the padding as an occurrence of token 0. DSpark's batch lengths differ from plain TGI's
    (requests accept different numbers of drafts: the longest can change), so the one reference it
    can match is the request alone. Repeating the last token keeps both exact: the watermark reads
    only the last column, and the repetition penalty penalises each distinct token once."""
    last_rows = None if batch.cu_seqlen_prefill is None else batch.cu_seqlen_prefill[1:] - 1
    # The row each request samples after holds its last token (decode: batch.input_ids), at
    # position_ids = its index in all_input_ids_tensor.
    last = batch.input_ids if last_rows is None else batch.input_ids[last_rows]
    positions = batch.position_ids.view(-1) if last_rows is None else batch.position_ids[last_rows]
    pad = torch.arange(history.shape[1], device=history.device) > positions.to(history.device).view(-1, 1)
    return torch.where(pad, last.to(history.device, history.dtype).view(-1, 1), history)


def _warped_logits(batch, logits: torch.Tensor, S: int) -> torch.Tensor:
    """TGI's processors and warpers as HeterogeneousNextTokenChooser applies them, without the choice.
    Row j scores the token after draft j, so its processors see drafts 1..j as already emitted, as
    plain (non-speculative) TGI's would: penalties count them and the grammar state has advanced
    through them. TGI's own speculative chooser gives every row the committed history and grammar
    state, which makes penalties lossy and lets grammar-constrained requests accept invalid drafts."""
    chooser = batch.next_token_chooser
    history = batch.all_input_ids_tensor[:, : batch.max_current_length]
    per_request = chooser.watermark_processor is not None or chooser.repetition_processor is not None
    own = _own_history(batch, history) if per_request else None
    grammar_states = chooser.fsm_grammar_states
    scores = logits.view(len(batch), S, -1).clone()
    for j in range(S):
        input_ids, own_ids = history, own
        if j > 0:
            drafts = batch.speculative_ids[:, :j].to(history.dtype)
            input_ids = torch.cat([history, drafts], 1)
            own_ids = None if own is None else torch.cat([own, drafts], 1)
        s = scores[:, j]
        # The watermark seeds from the last column (j = 0: the request's last token, j >= 1: draft
        # j) and the repetition penalty sees the request's tokens only, as for the request alone;
        # the frequency penalty keeps TGI's padded width (docs/tgi.md: not batch-independent).
        for proc, ids in ((chooser.watermark_processor, own_ids), (chooser.repetition_processor, own_ids),
                          (chooser.frequency_processor, input_ids)):
            if proc is not None:
                s = proc(ids, s)
        if chooser.grammar_processor is not None:
            if j > 0:  # (advance_at_index, unlike advance_batch, passes requests without a grammar)
                grammar_states = [chooser.grammar_processor.advance_at_index(t, state, i) for i, (t, state)
                                  in enumerate(zip(batch.speculative_ids[:, j - 1].tolist(), grammar_states))]
            s = chooser.grammar_processor(s, grammar_states)
        for warper in chooser.warpers:
            s = warper(input_ids, s)
        scores[:, j] = s
    return scores


def choose(spec: DSparkSpeculation, batch, next_token_logits: torch.Tensor, speculate: int):
    """Drop-in for batch.next_token_chooser(...): (next_ids, next_logprobs, alllogprobs, accepted_ids, speculative_ids)."""
    request_ids = [r.id for r in batch.requests]
    warmup = len(set(request_ids)) < len(request_ids)
    if warmup:  # TGI's router warms up with several requests, every one id 0: keys of their own
        request_ids = [-1 - i for i in range(len(request_ids))]  # (no real id is negative)
    if batch.cu_seqlen_prefill is None:
        # A decode batch holds every live request (the router decodes all cached batches together);
        # a prefill batch holds only the arriving ones, so forgetting there would drop live drafts.
        spec.forget_except(set(request_ids))
    else:  # with speculation TGI prefills a request in one piece (no chunking): it is new
        spec.forget(request_ids)
    S = 1 + batch.speculative_ids.shape[1] if batch.speculative_ids is not None else 1
    device = next_token_logits.device
    do_sample = batch.next_token_chooser.do_sample  # TGI's effective flag (temperature != 1 implies sampling)
    greedy = torch.tensor([not s for s in do_sample], device=device)
    # Each request's TGI seed keys its own noise (position of the row it samples after), so like
    # plain TGI a seeded request's output does not depend on what else is in the batch.
    seeds = [r.parameters.seed for r in batch.requests]
    last_rows = batch.cu_seqlen_prefill[1:] - 1 if batch.cu_seqlen_prefill is not None else None
    sample_positions = (batch.position_ids.view(-1) if last_rows is None else batch.position_ids[last_rows]).tolist()
    # TGI's logprobs of every row, and through them the target probabilities of the verification.
    # Each [B·S, V] copy is dropped as soon as the next exists: the warped (model dtype) scores once
    # their fp32 copy is made, that copy once log_softmax returns (torch fuses the fp32 cast into
    # log_softmax for fp16 only, not bf16), so at most two are alive, as during the verification.
    scores = _warped_logits(batch, next_token_logits, S).view(len(batch) * S, -1).float()
    # Greedy TGI takes the argmax of these scores: exp(log_softmax(·)) can round two distinct
    # maxima to one probability, whose argmax is then the lower token id.
    best = scores.argmax(-1).view(len(batch), S) if not all(do_sample) else None
    alllogprobs = torch.log_softmax(scores, -1)
    del scores
    tokens, n_acc = spec.verify(request_ids, alllogprobs.view(len(batch), S, -1), greedy,
                                step_seeds(seeds, sample_positions), target_argmax=best)

    # Commit: target features of the anchor + accepted rows extend each request's draft context.
    if batch.cu_seqlen_prefill is not None:  # prefill: every computed prompt row is context
        cu = batch.cu_seqlen_prefill.tolist()
        rows = [list(range(cu[i], cu[i + 1])) for i in range(len(batch))]
        positions = batch.position_ids.view(-1)
        if any(batch.cache_lengths) and not spec.warned_prefix_cache:
            spec.warned_prefix_cache = True  # still lossless; the draft just misses the cached prefix
            logger.warning("DSpark: prefix-cached prompt rows are not in the draft's context; "
                           "set PREFIX_CACHING=0 for full draft quality")
    else:
        rows = [[i * S + j for j in range(n_acc[i] + 1)] for i in range(len(batch))]
        positions = (batch.position_ids.view(-1, 1) + torch.arange(S, device=batch.position_ids.device)).view(-1)
    features = spec.capture.features(positions.numel())
    idx = torch.tensor([j for r in rows for j in r]).to(features.device)  # one host->device copy
    pool = spec.draft.context_kv
    outgrown = pool.outgrown
    spec.draft.extend_contexts(request_ids, features[idx], positions[idx.to(positions.device)],
                               [len(r) for r in rows])
    if pool.outgrown != outgrown:
        logger.warning(f"DSpark: the drafter's live contexts outgrew the pool reserved at warmup; it now holds "
                       f"{pool.reserved} tokens, beyond the memory TGI's KV cache was sized with")
    anchors = torch.tensor([t[-1] for t in tokens]).to(device)
    # The anchor follows each request's last committed row: its sample position (the prompt's last
    # row; decode: the row of the first verify slot) + the drafts it accepted — host values already.
    anchor_positions = [p + n + 1 for p, n in zip(sample_positions, n_acc)]
    params = [r.parameters for r in batch.requests]
    temperature = torch.tensor([p.temperature if s else 0.0 for p, s in zip(params, do_sample)])
    # No warp at all passes None, not a tensor of no-op values: given a warp tensor our CUDA chain
    # takes its top-k/top-p path (the bias written out, threshold passes per step) for the batch.
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64) if any(p.top_k > 0 for p in params) else None
    top_p = torch.tensor([p.top_p if 0 < p.top_p < 1 else 1.0 for p in params], dtype=torch.float32) \
        if any(0 < p.top_p < 1 for p in params) else None
    proposal, width = spec.propose(request_ids, anchors, anchor_positions, temperature, top_k, top_p,
                                   step_seeds(seeds, anchor_positions))
    spec.stats["steps"] += 1
    if warmup:  # the drafter ran (warmup measures its memory too); nothing of it outlives the batch
        spec.forget(request_ids)

    flat_rows = [i * S + j for i in range(len(batch)) for j in range(len(tokens[i]))]
    next_ids = torch.tensor([t for ts in tokens for t in ts], device=device, dtype=torch.long)
    # the emitted tokens' entries only (not a copy of their rows)
    next_logprobs = alllogprobs[torch.tensor(flat_rows, device=device), next_ids]
    accepted_ids = torch.tensor([len(t) for t in tokens], device=device, dtype=batch.input_ids.dtype)
    # The drafts' width is the next forward's: TGI runs 1 + width rows per request.
    speculative_ids = proposal.draft.tokens[:, :min(speculate, width)].to(device) if speculate > 0 else None
    return next_ids, next_logprobs, alllogprobs, accepted_ids, speculative_ids
