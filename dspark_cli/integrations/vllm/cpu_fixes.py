"""Fixes for vLLM's CPU fallbacks (0.29.0 to 0.33.0) of Triton kernels that sampled speculative decoding hits.

`expand_batch_to_tokens` (rejection sampler: per-token temperature/top-k/top-p) runs on CPU
through a C++ kernel that only handles int64 and writes into a temporary int64 copy, so a float
output (the temperatures) stays uninitialized and the target's verify probabilities are garbage
at temperature > 0 — for every speculative method on the CPU backend, not only DSpark."""

import torch


def expand_float(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor,
                 replace_from, replace_to) -> None:
    """output[t] = input_val[r] for the tokens t of request r (replace_from → replace_to)."""
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1).to(torch.int64))
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    expanded = torch.repeat_interleave(values, counts)
    output[: expanded.numel()].copy_(expanded.to(output.dtype))
