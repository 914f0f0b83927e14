"""The host-side rules of dspark_cli.runtime.cuda_ops that need no GPU."""

from dspark_cli.runtime.cuda_ops import DRAFT_ATTENTION_MAX_ROWS, draft_attention_smem


def test_draft_attention_smem_is_the_kernels_layout():
    """Layout<T, HD>::bytes of csrc/draft_attention.cu, worked by hand for bf16: queries, the K/V ring
    (or the fp32 output over it), scores, probabilities, eight warps' rescale scratch, row stats."""
    assert draft_attention_smem(DRAFT_ATTENTION_MAX_ROWS, 128, 2) == 34816 + 69632 + 34816 + 18432 + 10240 + 1536 == 169472
    assert draft_attention_smem(DRAFT_ATTENTION_MAX_ROWS, 64, 2) == 18432 + 36864 + 34816 + 18432 + 10240 + 1536 == 120320
    assert draft_attention_smem(32, 128, 2) == 8704 + 69632 + 8704 + 4608 + 10240 + 384 == 102272  # Qwen3-4B's drafter
    # above the 101,376 bytes a block may take on sm_86/89 and within sm_80's 166,912 and sm_90's 232,448
    assert 101376 < draft_attention_smem(32, 128, 2) < 166912 < draft_attention_smem(128, 128, 2) < 232448
