"""Fixes for vLLM's CPU fallbacks (0.29.0 to 0.33.0) of Triton kernels that sampled speculative
decoding hits, for every speculative method on the CPU backend, not only DSpark.

- `expand_batch_to_tokens` (rejection sampler: per-token temperature/top-k/top-p) runs through a
  C++ kernel that only handles int64 and writes into a temporary int64 copy, so a float output
  (the temperatures) stays uninitialized and the target's verify probabilities are garbage at
  temperature > 0.
- The C++ accept test of sampled drafts has no check for placeholder drafts (id −1: vLLM pads a
  request with one token left to compute with them): it reads p and q at index −1, the previous
  row's last entry (before the buffer for the first row), and accepts the placeholder with that
  ratio, where vLLM's Triton kernel rejects it surely."""

import torch


def expand_float(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor,
                 replace_from, replace_to) -> None:
    """output[t] = input_val[r] for the tokens t of request r (replace_from → replace_to)."""
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1).to(torch.int64))
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    expanded = torch.repeat_interleave(values, counts)
    output[: expanded.numel()].copy_(expanded.to(output.dtype))


def reject_placeholders(draft_token_ids: torch.Tensor, uniform_probs: torch.Tensor):
    """(ids, uniforms) for the C++ accept test: a placeholder reads id 0 and a NaN uniform, and
    `ratio >= NaN` is false, so it is rejected whatever p and q hold there. Its recovered token was
    sampled before, from the real ids."""
    placeholder = draft_token_ids < 0
    if not bool(placeholder.any()):
        return draft_token_ids, uniform_probs
    return draft_token_ids.clamp_min(0), uniform_probs.masked_fill(placeholder, float("nan"))
