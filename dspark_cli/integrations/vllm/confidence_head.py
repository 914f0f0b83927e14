"""vLLM's DSparkConfidenceHead as dspark_cli.runtime takes it (V1 proposer and V2 hook alike);
reads the module's attributes only, so it loads without vLLM."""

import torch


@torch.no_grad()
def confidence_head_fp32(head) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [1, d + r] and bias [1] in fp32, once per model (a checkpoint without a bias, like
    V4's, gets 0)."""
    if head is None:
        raise ValueError("enable_adaptive_verification needs a DSpark draft with a confidence head")
    if not getattr(head, "with_markov", False):
        raise ValueError("the DSpark draft's confidence head does not read W1[x_{k-1}] "
                         "(confidence_head_with_markov=false); every DSpark release does")
    proj = head.proj
    weight = proj.weight
    if weight.numel() == 0:
        # vLLM's CPU backend packs linear weights for oneDNN / sgl-kernel and drops the originals.
        # The layer's own GEMM on the identity gives them back exactly: output i is w_i·1 plus zeros.
        eye = torch.eye(proj.input_size, dtype=torch.float32, device=weight.device)
        weight = proj.quant_method.apply(proj, eye, None).reshape(1, -1)
    weight = weight.float()
    bias = proj.bias.float() if proj.bias is not None else torch.zeros(1, device=weight.device)
    return weight, bias
