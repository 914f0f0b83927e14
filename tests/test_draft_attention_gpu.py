"""Our drafter attention op (csrc/draft_attention.cu) on a GPU: each request's block queries onto its
context where it lies in the pool (pages in shuffled order, poisoned rows around them) and its own
block, against attention computed per request in fp32 from the same inputs; outputs over
NaN-poisoned memory; one launch and the split-and-merge path; CUDA-graph capture; and the TGI
drafter with the op against itself on SDPA. Skipped, with the reason, without a GPU or a build.

    PYTHONPATH=. python -m pytest -q tests/test_draft_attention_gpu.py     (after `dspark build`)"""

import pytest
import torch

from dspark_cli.runtime import cuda_ops
from dspark_cli.selftest import compare_draft_attention, draft_attention_inputs, draft_attention_reference

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_extension")]


CASES = [  # lengths, γ, H, kv, hd, dtype, ramp, page rows: one launch and split keys (few requests, long contexts)
    ([560] * 128, 7, 32, 8, 128, torch.bfloat16, False, 16),  # Qwen3-4B DSpark at R = 128 (the TGI pool's pages)
    ([0, 1, 63, 64, 65, 700, 3], 7, 32, 8, 128, torch.bfloat16, False, 16),  # tile edges, an empty context
    ([0, 1, 63, 64, 65, 700, 3], 7, 32, 8, 128, torch.bfloat16, False, 1),   # a page per row
    ([3000], 7, 32, 8, 128, torch.bfloat16, False, 64),       # R = 1: keys split, merged; a page per tile
    ([5, 2000], 4, 16, 2, 64, torch.float16, False, 7),       # hd 64, fp16, split with a short request; odd pages
    ([40, 0, 17] * 44, 16, 8, 1, 64, torch.bfloat16, False, 16),  # 128 query rows per KV head, R = 132
    ([0, 0], 3, 2, 1, 64, torch.bfloat16, False, 16),         # no context at all (the tiny drafter's shape)
    ([900] * 40, 7, 32, 8, 128, torch.bfloat16, True, 16),    # scores growing along the context
    ([2500], 7, 32, 8, 128, torch.float16, True, 100),        # the same in the splits; pages across tiles
    ([560] * 16, 7, 32, 8, 128, torch.bfloat16, False, 16),   # R = 16: as many splits as one wave of CTAs holds
]


@pytest.mark.parametrize("lengths,gamma,heads,kv,hd,dtype,ramp,page_rows", CASES)
def test_draft_attention_matches_per_request_attention(lengths, gamma, heads, kv, hd, dtype, ramp, page_rows):
    res = compare_draft_attention(lengths, gamma, heads, kv, hd, dtype, seed=len(lengths) * 31 + gamma, ramp=ramp,
                                  page_rows=page_rows)
    assert res["ok"], res


def test_a_too_small_max_length_still_reads_every_key():
    """max_length only sizes the key splits: the last split takes whatever keys are left."""
    inputs = draft_attention_inputs([1500, 2], 7, 32, 8, 128, torch.bfloat16, seed=3)
    out = cuda_ops.draft_attention(*inputs, 100)
    assert (out.float() - draft_attention_reference(*inputs)).abs().max().item() < 2e-2


def test_an_empty_block_is_a_no_op():
    """γ = 0: no query, nothing to write (the key split divided by zero tiles when there was no context)."""
    for lengths in ([0], [5, 0]):
        inputs = draft_attention_inputs(lengths, 0, 32, 8, 128, torch.bfloat16, seed=6)
        out = cuda_ops.draft_attention(*inputs, max(lengths))
        torch.cuda.synchronize()
        assert out.shape == (len(lengths), 0, 32, 128)


def test_draft_attention_replays_from_a_cuda_graph():
    """No host sync and its split workspace from the caching allocator: the op captures, and a
    replay after the contexts changed in place reads the new rows."""
    q, kb, vb, kp, vp, pages, page_rows, lengths = draft_attention_inputs([900, 20], 7, 32, 8, 128, torch.bfloat16,
                                                                          seed=4)
    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda_ops.draft_attention(q, kb, vb, kp, vp, pages, page_rows, lengths, 900, out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_ops.draft_attention(q, kb, vb, kp, vp, pages, page_rows, lengths, 900, out)
    kp.mul_(-1.5)
    lengths[1] = 10
    pages[0, :56] = pages[0, :56].flip(0)  # request 0's full pages (900 rows: 56 of 16, then 4) in another order
    graph.replay()
    torch.cuda.synchronize()
    ref = draft_attention_reference(q, kb, vb, kp, vp, pages, page_rows, lengths)
    assert (out.float() - ref).abs().max().item() < 2e-2


def test_draft_attention_refuses_what_it_does_not_cover():
    q, kb, vb, kp, vp, pages, page_rows, lengths = draft_attention_inputs([4], 7, 32, 8, 128, torch.bfloat16, seed=5)
    with pytest.raises(RuntimeError, match="bf16 or fp16"):
        cuda_ops.draft_attention(q.float(), kb.float(), vb.float(), kp.float(), vp.float(), pages, page_rows, lengths, 4)
    with pytest.raises(RuntimeError, match="int32"):
        cuda_ops.draft_attention(q, kb, vb, kp, vp, pages.long(), page_rows, lengths, 4)
    with pytest.raises(RuntimeError, match="divide the pool's rows"):
        cuda_ops.draft_attention(q, kb, vb, kp, vp, pages, 7, lengths, 4)
    with pytest.raises(RuntimeError, match="max_length must be"):  # was a division by zero: SIGFPE
        cuda_ops.draft_attention(q, kb, vb, kp, vp, pages, page_rows, lengths, -7)
    assert not cuda_ops.draft_attention_fits(q.float(), 128, 28)
    assert not cuda_ops.draft_attention_fits(q, 96, 28) and not cuda_ops.draft_attention_fits(q, 128, 129)
    assert cuda_ops.draft_attention_fits(q, 128, 28)


@pytest.mark.parametrize("head_dim,heads,kv,gamma", [(64, 2, 1, 3), (128, 8, 2, 7)])
def test_drafter_on_the_op_matches_the_drafter_on_sdpa(head_dim, heads, kv, gamma):
    """The TGI drafter's block forward with attention from our op and from its SDPA path
    (cuda_ops.enabled(False)) over one pool: ragged contexts including an empty one."""
    from dspark_cli.integrations.tgi.draft import DraftConfig, DSparkDraft, PagedContexts

    g = torch.Generator(device="cuda").manual_seed(head_dim)
    width, layers, vocab, mlp = 256, 2, 512, 512
    rand = lambda *s: (torch.randn(*s, device="cuda", generator=g) * 0.05).bfloat16()  # noqa: E731
    ones = lambda n: torch.ones(n, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    cfg = DraftConfig(hidden_size=width, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, num_layers=layers,
                      block_size=gamma, mask_token_id=vocab - 1, target_layer_ids=[1, 2], rope_theta=1e6,
                      rms_norm_eps=1e-6)
    w = {"embed_tokens.weight": rand(vocab, width) * 20, "fc.weight": rand(width, 2 * width),
         "hidden_norm.weight": ones(width), "norm.weight": ones(width), "lm_head.weight": rand(vocab, width),
         "markov_head.markov_w1.weight": rand(vocab, 16), "markov_head.markov_w2.weight": rand(vocab, 16)}
    for i in range(layers):
        p = f"layers.{i}."
        w.update({p + "self_attn.q_proj.weight": rand(heads * head_dim, width) * 10,
                  p + "self_attn.k_proj.weight": rand(kv * head_dim, width) * 10,
                  p + "self_attn.v_proj.weight": rand(kv * head_dim, width) * 10,
                  p + "self_attn.o_proj.weight": rand(width, heads * head_dim),
                  p + "mlp.gate_proj.weight": rand(mlp, width), p + "mlp.up_proj.weight": rand(mlp, width),
                  p + "mlp.down_proj.weight": rand(width, mlp), p + "input_layernorm.weight": ones(width),
                  p + "post_attention_layernorm.weight": ones(width), p + "self_attn.q_norm.weight": ones(head_dim),
                  p + "self_attn.k_norm.weight": ones(head_dim)})
    draft = DSparkDraft(cfg, w, cuda_graphs=False)
    lengths = [70, 0, 300, 5, 129]
    draft.extend_contexts(list(range(5)), torch.randn(sum(lengths), 2 * width, device="cuda", generator=g).bfloat16(),
                          torch.cat([torch.arange(n) for n in lengths]).cuda(), lengths)
    assert draft.paged_attention_fits and isinstance(draft._attention_plan([0], "cuda"), PagedContexts)
    ids, anchors = [4, 1, 2, 0, 3], torch.tensor([5, 9, 200, 7, 1], device="cuda")
    positions = [lengths[r] for r in ids]
    on_op = draft.hidden_blocks(ids, anchors, positions)
    with cuda_ops.enabled(False):
        assert isinstance(draft._attention_plan([0], "cuda"), list)
        on_sdpa = draft.hidden_blocks(ids, anchors, positions)
    err = (on_op.float() - on_sdpa.float()).abs().max().item()
    assert err < 5e-2 * on_sdpa.float().abs().max().item(), err


@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("gamma", [3, 7, 16])
def test_the_op_runs_exactly_where_fits_says_it_does(hd, gamma):
    """draft_attention_fits' shared-memory count against the op's own check on this GPU: every
    shape it accepts runs, every one it refuses is refused by the op with the same count."""
    heads, kv = 8 * (16 // gamma if gamma < 16 else 1), 1
    rows = heads // kv * gamma
    inputs = draft_attention_inputs([70, 5], gamma, heads, kv, hd, torch.bfloat16, seed=gamma)
    if cuda_ops.draft_attention_fits(inputs[0], hd, rows):
        cuda_ops.draft_attention(*inputs, 70)
        torch.cuda.synchronize()
    elif torch.ops.dspark.draft_attention_smem(rows, hd) > 0:
        with pytest.raises(RuntimeError, match="bytes of shared memory per block"):
            cuda_ops.draft_attention(*inputs, 70)
