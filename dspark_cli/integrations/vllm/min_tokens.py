"""min_tokens for the bonus token of a speculative step (vLLM V1, every speculative method).

V1's rejection sampler masks a request's stop tokens on each draft row its output has not yet reached
min_tokens at (MinTokensLogitsProcessor.apply_with_spec_decode), then samples the bonus token with
vLLM's Sampler, whose processors see the committed outputs only: while those are short of
min_tokens the bonus token's stop tokens are masked too, though the bonus token comes after every
draft of the step and its position is the committed outputs plus those drafts. A stop token that the
target would give there (greedy: the output ends; sampled: the output ends with that probability) is
then replaced by another token, and the output runs on: not lossless. (The bonus token is used only
when every draft is accepted, so counting all the step's drafts is its exact position.)

`bonus_logitsprocs` gives the bonus token's Sampler call the processors to use: the same ones, with
the min-tokens processor masking only the requests still short of min_tokens at the bonus position."""

import torch


def bonus_logitsprocs(logitsprocs, num_draft_tokens):
    """`logitsprocs` (V1's LogitsProcessors) for sampling the bonus tokens of a step whose requests
    verify num_draft_tokens[i] drafts each (batch order): itself when nothing changes (no request is
    short of min_tokens on its committed outputs yet reaches it with its drafts), else a shallow copy
    whose min-tokens processor counts each request's drafts."""
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor

    processors = getattr(logitsprocs, "non_argmax_invariant", None)
    if not processors:
        return logitsprocs
    swapped, changed = [], False
    for processor in processors:
        if isinstance(processor, MinTokensLogitsProcessor) and _reached_by_drafts(processor, num_draft_tokens):
            processor, changed = _bonus_min_tokens(processor, num_draft_tokens), True
        swapped.append(processor)
    if not changed:
        return logitsprocs
    copy = object.__new__(type(logitsprocs))
    copy.__dict__.update(logitsprocs.__dict__)
    copy.non_argmax_invariant = swapped
    return copy


def _drafts(num_draft_tokens, index: int) -> int:
    return int(num_draft_tokens[index]) if index < len(num_draft_tokens) else 0


def _reached_by_drafts(processor, num_draft_tokens) -> bool:
    return any(len(outputs) + _drafts(num_draft_tokens, index) >= min_tokens
               for index, (min_tokens, outputs, _, _) in processor.min_toks.items())


def _bonus_min_tokens(processor, num_draft_tokens):
    """The min-tokens processor as the bonus tokens see it: a shallow copy holding only the requests
    whose committed outputs plus their num_draft_tokens[i] drafts are still fewer than min_tokens,
    with the stop-token slices vLLM's update_state would build for them. Its own `apply` then masks
    (structured-output restore included): vLLM's logic, not a copy of it."""
    rows, tokens, restore_rows, restore_tokens, short = [], [], [], [], {}
    for index, entry in processor.min_toks.items():
        min_tokens, outputs, stop_tokens, structured = entry
        if len(outputs) + _drafts(num_draft_tokens, index) >= min_tokens:
            continue
        short[index] = entry
        stop_tokens = list(stop_tokens)
        rows += [index] * len(stop_tokens)
        tokens += stop_tokens
        if structured:
            restore_rows += [index] * len(stop_tokens)
            restore_tokens += stop_tokens
    device = processor.neg_inf_tensor.device

    def index(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    view = object.__new__(type(processor))
    view.__dict__.update(processor.__dict__)
    view.min_toks = short
    view.logits_slice = (index(rows), index(tokens))
    view.restore_logits_slice = (index(restore_rows), index(restore_tokens))
    return view
