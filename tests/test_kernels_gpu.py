"""Our CUDA ops against the torch reference on a GPU (H200 in practice): fresh random inputs at
several sizes, odd batch sizes, mixed greedy/sampled requests, outputs allocated over NaN-poisoned
memory, CUDA-graph capture and torch.compile. Skipped, with the reason, without a GPU or a build.

    PYTHONPATH=. python -m pytest -q tests/test_kernels_gpu.py     (after `dspark build`)"""

import dataclasses

import pytest
import torch

from dspark_cli.selftest import (MarkovCase, RejectionCase, compare_confidence, compare_markov, compare_rejection,
                                 compare_schedule, confidence_inputs, markov_inputs, markov_warps, poison_allocator,
                                 rejection_inputs)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_extension")]


CASES = [
    MarkovCase(1, 7, 151936, 256, seed=1),
    MarkovCase(16, 7, 151936, 256, greedy_every=4, seed=2),
    MarkovCase(128, 7, 151936, 256, return_q=False, greedy_every=5, seed=3),
    MarkovCase(37, 3, 50257, 64, torch.float32, torch.float16, greedy_every=2, seed=4),
    MarkovCase(5, 1, 1000, 16, torch.float16, torch.float32, seed=5),
    MarkovCase(3, 4, 151936, 256, greedy_every=1, seed=6),  # all greedy
    # odd V with fp32 weights (scalar split pass), fp16 everywhere, odd batch
    MarkovCase(8, 7, 50001, 256, torch.float32, torch.bfloat16, greedy_every=3, seed=10),
    MarkovCase(7, 2, 151936, 256, torch.float16, torch.float16, greedy_every=2, seed=11),
    MarkovCase(9, 3, 151936, 256, return_q=False, seed=12),
    # odd V (scalar split pass) at more requests, a small odd V, fp32 U beside bf16 weights
    MarkovCase(67, 3, 50001, 256, greedy_every=3, seed=13),
    MarkovCase(130, 2, 4099, 256, torch.float16, torch.float16, return_q=False, greedy_every=7, seed=14),
    MarkovCase(65, 4, 32000, 256, torch.bfloat16, torch.float32, greedy_every=4, seed=15),
    # the small-batch path (R <= 2, rank 256, 16-bit weights): one and two requests, an odd V (a
    # partial last batch of W2 rows), fp32 U
    MarkovCase(2, 7, 151936, 256, torch.float16, torch.bfloat16, greedy_every=2, seed=16),
    MarkovCase(2, 5, 50001, 256, torch.bfloat16, torch.float32, seed=17),
    MarkovCase(1, 3, 4099, 256, torch.bfloat16, torch.float16, return_q=False, seed=18),
    # requests at temperature exactly 1 (no division) beside others; many race groups per thread
    MarkovCase(128, 3, 151936, 256, greedy_every=7, t_one_every=2, seed=22),
    MarkovCase(40, 2, 50000, 256, torch.float16, torch.float32, t_one_every=3, return_q=False, seed=23),
    MarkovCase(29, 3, 151936, 256, torch.bfloat16, torch.float16, greedy_every=3, t_one_every=2, seed=26),
    MarkovCase(50, 2, 32003, 256, return_q=False, greedy_every=4, seed=27),
    # q lazy at R <= 2: all steps in one cooperative launch, W2 batches resident in shared memory
    MarkovCase(1, 7, 151936, 256, return_q=False, t_one_every=2, seed=30),
    MarkovCase(2, 7, 151936, 256, torch.float16, torch.float16, greedy_every=2, return_q=False, seed=31),
    MarkovCase(2, 4, 50001, 256, torch.bfloat16, torch.float32, return_q=False, seed=32),
    # the fused step (sm_90, V % 64 == 0, rank 256): staged rows at R <= 16 (fp32 U, T = 1 rows,
    # q stored and not, V = 32000), unstaged batches with one and two halves partly filled
    MarkovCase(16, 7, 151936, 256, torch.float16, torch.float32, greedy_every=3, t_one_every=2, return_q=False,
               seed=40),
    MarkovCase(12, 3, 32000, 256, torch.bfloat16, torch.float16, greedy_every=4, seed=41),
    MarkovCase(3, 5, 151936, 256, return_q=False, greedy_every=2, seed=44),
    MarkovCase(48, 3, 151936, 256, torch.float16, torch.bfloat16, greedy_every=5, seed=42),
    MarkovCase(100, 2, 32000, 256, torch.bfloat16, torch.float32, return_q=False, t_one_every=3, seed=43),
    # -inf in U (an engine's mask; runtime._checks allows it): a race group all -inf made the row's
    # sum-exp NaN in the fused step and the cuBLAS path's split pass (every draft then rejected).
    # Small-batch kernel, fused step, cuBLAS (fp32 weights at R = 1; R = 130), odd V (scalar loads)
    MarkovCase(2, 4, 151936, 256, greedy_every=2, masked=True, seed=45),
    MarkovCase(16, 4, 151936, 256, greedy_every=4, masked=True, seed=46),
    MarkovCase(1, 3, 4099, 64, torch.float32, torch.float32, masked=True, seed=47),
    MarkovCase(130, 2, 50001, 256, return_q=False, greedy_every=5, masked=True, seed=48),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label())
def test_markov_chain_matches_reference(case):
    res = compare_markov(case)
    assert res["ok"], res


@pytest.mark.parametrize("case", [MarkovCase(1, 7, 151936, 256, seed=19), MarkovCase(2, 4, 50001, 256, greedy_every=2, seed=20)],
                         ids=lambda c: c.label())
@pytest.mark.parametrize("env", ["DSPARK_MARKOV_PATH=gemm", "DSPARK_PDL=0"])
def test_markov_chain_small_batches_other_paths(case, env, monkeypatch):
    """The cuBLAS path forced at R <= 2, and the small-batch path without programmatic launch."""
    name, value = env.split("=")
    monkeypatch.setenv(name, value)
    res = compare_markov(case)
    assert res["ok"], res


@pytest.mark.parametrize("case", [MarkovCase(1, 7, 151936, 256, seed=33), MarkovCase(2, 5, 151936, 256, greedy_every=2, seed=34),
                                  MarkovCase(1, 3, 4099, 256, torch.float16, torch.float16, seed=35),
                                  MarkovCase(2, 7, 50001, 256, torch.bfloat16, torch.float32, seed=36)],
                         ids=lambda c: c.label())
@pytest.mark.parametrize("return_q", [False, True])
def test_markov_chain_all_steps_launch_draws_what_the_per_step_kernels_draw(case, return_q, monkeypatch):
    """At R <= 2, the one cooperative launch (W2 partly resident in shared memory, a grid barrier
    per step) and the per-step kernels compute the same bias bits, noise and keys: identical tokens
    and W1 gathers; q_token and the q rows only sum in another order."""
    from dspark_cli.runtime import markov_chain

    U, anchors, w1, w2, temperature, seeds = markov_inputs(case)
    chain = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=return_q)
    monkeypatch.setenv("DSPARK_MARKOV_PATH", "step")
    poison_allocator()
    steps = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=return_q)
    assert torch.equal(chain.tokens, steps.tokens) and torch.equal(chain.prev_emb, steps.prev_emb)
    torch.testing.assert_close(chain.q_token, steps.q_token, rtol=1e-5, atol=0)
    if return_q:
        torch.testing.assert_close(chain.q, steps.q, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("R", [48, 16, 1])  # fused step (cuBLAS + split pass under "gemm"); small-batch step
@pytest.mark.parametrize("path", ["default", "gemm"])
def test_markov_chain_q_rows_hold_the_probability_it_sampled_with(R, path, monkeypatch):
    """The stored q row (built from the bias the step wrote out, the bits rejection rebuilds) gives
    the drafted token exactly the q_k(x_k) the step reported."""
    from dspark_cli.runtime import markov_chain

    if path == "gemm":
        monkeypatch.setenv("DSPARK_MARKOV_PATH", "gemm")
    U, anchors, w1, w2, temperature, seeds = markov_inputs(MarkovCase(R, 4, 151936, 256, t_one_every=2, seed=28))
    out = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=True)
    assert torch.equal(out.q.gather(-1, out.tokens.unsqueeze(-1)).squeeze(-1), out.q_token)


@pytest.mark.parametrize("R,V,shift", [(5, 50000, "U"), (5, 32768, "U"), (1, 32768, "w1"), (5, 32768, "w1")],
                         ids=["U-split-pass", "U-fused-step", "w1-small-batch", "w1-fused-step"])
def test_markov_chain_with_misaligned_inputs_takes_a_path_without_16_byte_loads(R, V, shift):
    """U or W1 contiguous but starting one element into its storage: 16-byte loads would fault (the
    fused step loads U rows so, the small-batch step W1 rows; V = 32768 is a shape both take when
    aligned), so the op must take a path that does not and still agree with the reference."""
    from dspark_cli.runtime import cuda_ops, markov_chain

    U, anchors, w1, w2, temperature, seeds = markov_inputs(MarkovCase(R, 3, V, 256, seed=21))
    inputs = {"U": U, "w1": w1}
    storage = torch.empty(inputs[shift].numel() + 1, dtype=inputs[shift].dtype, device=U.device)
    shifted = storage[1:].view(inputs[shift].shape)
    shifted.copy_(inputs[shift])
    out = markov_chain(**{**inputs, shift: shifted}, anchors=anchors, w2=w2, temperature=temperature, seeds=seeds,
                       return_q=False)
    with cuda_ops.enabled(False):
        ref = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=False)
    assert (out.tokens == ref.tokens).all(dim=1).sum() >= max(R - 1, 1)  # at most one near-tie flip in a batch


def test_markov_chain_is_deterministic_per_seed():
    """Same seeds -> same tokens (what keeps tensor-parallel ranks in step)."""
    from dspark_cli.runtime import markov_chain

    U, anchors, w1, w2, temperature, seeds = markov_inputs(MarkovCase(8, 7, 32000, 128, seed=7))
    a = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=False)
    poison_allocator()
    b = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.q_token, b.q_token)
    c = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds + 1, return_q=False)
    assert not torch.equal(a.tokens, c.tokens)


def _graph_replays_match_eager(op, args, replays: int = 1, outputs=(0, 1)):
    """op eagerly, then captured in a CUDA graph (warmed on a side stream); each replay, the compared
    outputs poisoned first, must give the eager outputs. Returns the eager outputs."""
    eager = op(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = op(*args)
    for _ in range(replays):
        for i in outputs:
            captured[i].fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(captured[i], eager[i]) for i in outputs)
    return eager


@pytest.mark.parametrize("R", [16, 64, 1, 2])  # the fused step (staged, unstaged); the small-batch chain's cooperative launch
def test_markov_chain_op_captures_in_cuda_graph(R):
    U, anchors, w1, w2, temperature, seeds = markov_inputs(MarkovCase(R, 7, 151936, 256, seed=8))
    _graph_replays_match_eager(torch.ops.dspark.markov_chain, (U, anchors, w1, w2, temperature, seeds, False))


@pytest.mark.parametrize("case", [MarkovCase(1, 7, 151936, 256, greedy_every=0, return_q=False, seed=30),
                                  MarkovCase(2, 5, 50001, 256, greedy_every=2, return_q=True, seed=31),
                                  MarkovCase(16, 7, 151936, 256, greedy_every=3, t_one_every=2, return_q=False, seed=32),
                                  MarkovCase(37, 3, 50257, 64, torch.float32, torch.float16, greedy_every=4, seed=33)],
                         ids=lambda c: c.label())
def test_markov_chain_row_stats_are_each_rows_max_and_sum_exp(case):
    """row_stats[r, k] = max and Σ exp(x - max) of x = (U_k + W2·W1[x_{k-1}]) / T (T = 1 for a
    greedy row) over the chain's own tokens, and q_token = exp(x_tok - max) / sum with them."""
    U, anchors, w1, w2, temperature, seeds = markov_inputs(case)
    poison_allocator()
    tokens, q_token, _, _, stats, _, _, _ = torch.ops.dspark.markov_chain(U, anchors, w1, w2, temperature, seeds, case.return_q)
    prev = torch.cat([anchors.long()[:, None], tokens[:, :-1]], dim=1)
    scale = torch.where(temperature < 1e-5, torch.ones_like(temperature), temperature)[:, None]
    greedy = temperature < 1e-5
    for k in range(case.gamma):
        x = (U[:, k].float() + w1[prev[:, k]].float() @ w2.float().t()) / scale
        m = x.max(dim=1).values
        s = torch.exp(x - m[:, None]).sum(dim=1)
        torch.testing.assert_close(stats[:, k, 0], m, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats[:, k, 1], s, rtol=1e-4, atol=0)
        own = torch.exp(x.gather(1, tokens[:, k:k + 1]).squeeze(1) - stats[:, k, 0]) / stats[:, k, 1]
        torch.testing.assert_close(q_token[:, k][~greedy], own[~greedy], rtol=1e-5, atol=0)


# The chain's last launch differs per path; d % 4 != 0 takes the kernel's scalar loads.
CONFIDENCE_CASES = [
    (MarkovCase(1, 7, 151936, 256, return_q=False, seed=50), torch.bfloat16, 2560),  # one cooperative launch
    (MarkovCase(2, 5, 50001, 256, greedy_every=2, seed=51), torch.float32, 1024),  # small steps, q rows
    (MarkovCase(16, 7, 151936, 256, return_q=False, seed=52), torch.bfloat16, 2560),  # fused step, staged
    (MarkovCase(128, 7, 151936, 256, return_q=False, greedy_every=5, seed=53), torch.bfloat16, 2560),
    (MarkovCase(37, 3, 50257, 64, torch.float32, torch.float16, greedy_every=4, seed=54), torch.float16, 1030),
]


@pytest.mark.parametrize("case,h_dtype,d", CONFIDENCE_CASES, ids=lambda c: c.label() if isinstance(c, MarkovCase) else str(c))
def test_markov_chain_confidence_logits_match_reference(case, h_dtype, d):
    """The chain given the confidence head returns its logits z = w·[h_k ; W1[x_{k-1}]] + b
    (confidence.py's, computed in the chain's own last launch), and drafts the same tokens."""
    res = compare_confidence(case, h_dtype, d)
    assert res["ok"], res


def test_markov_chain_confidence_head_without_bias_adds_nothing():
    """bias None (nn.Linear(bias=False)) reaches our op as no bias (nothing allocated per call): the
    same logits as a zero bias."""
    from dspark_cli.runtime import confidence_logits, markov_chain

    case = MarkovCase(16, 7, 151936, 256, return_q=False, seed=56)
    U, anchors, w1, w2, temperature, seeds = markov_inputs(case)
    h, weight, _ = confidence_inputs(case, torch.bfloat16, 2560)
    drafts = [markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=False, confidence=(h, weight, b))
              for b in (None, torch.zeros(1, device="cuda"))]
    assert torch.equal(drafts[0].tokens, drafts[1].tokens)
    assert torch.equal(drafts[0].confidence_logits, drafts[1].confidence_logits)
    op = torch.ops.dspark.markov_chain(U, anchors, w1, w2, temperature, seeds, False, h, weight.reshape(-1), None)
    assert torch.equal(op[0], drafts[0].tokens) and torch.equal(op[6], drafts[0].confidence_logits)
    torch.testing.assert_close(drafts[0].confidence_logits, confidence_logits(h, drafts[0].prev_emb, weight, None),
                               atol=1e-4, rtol=1e-5)


def test_markov_chain_op_with_confidence_captures_in_cuda_graph():
    case = MarkovCase(16, 7, 151936, 256, seed=55)
    U, anchors, w1, w2, temperature, seeds = markov_inputs(case)
    h, weight, bias = confidence_inputs(case, torch.bfloat16, 2560)
    _graph_replays_match_eager(torch.ops.dspark.markov_chain,
                               (U, anchors, w1, w2, temperature, seeds, False, h, weight.reshape(-1), bias),
                               replays=2, outputs=(0, 1, 6))


def test_markov_chain_op_under_torch_compile():
    U, anchors, w1, w2, temperature, seeds = markov_inputs(MarkovCase(4, 3, 4096, 32, seed=9))

    @torch.compile(fullgraph=True)
    def draft(U, anchors, w1, w2, temperature, seeds):
        tokens, q_token, _, emb, _, _, _, _ = torch.ops.dspark.markov_chain(U, anchors, w1, w2, temperature, seeds, False)
        return tokens + 0, q_token * 2, emb

    tokens, q2, _ = draft(U, anchors, w1, w2, temperature, seeds)
    ref = torch.ops.dspark.markov_chain(U, anchors, w1, w2, temperature, seeds, False)
    assert torch.equal(tokens, ref[0]) and torch.equal(q2, ref[1] * 2)


# Top-k/top-p (warp.cu): every bias path feeds the thresholds (small-batch bias at R <= 2, the fused
# step's bias at 3..128, cuBLAS for fp32 heads and above 128), odd V (scalar loads), fp32 U.
WARPED_CASES = [
    MarkovCase(1, 7, 151936, 256, warps=True, seed=60),
    MarkovCase(2, 5, 50001, 256, torch.bfloat16, torch.float32, greedy_every=2, warps=True, seed=61),
    MarkovCase(16, 7, 151936, 256, greedy_every=5, t_one_every=3, warps=True, seed=62),
    MarkovCase(128, 3, 151936, 256, greedy_every=7, warps=True, seed=63),
    MarkovCase(37, 3, 50257, 64, torch.float32, torch.float16, greedy_every=4, warps=True, seed=64),
    MarkovCase(130, 2, 4099, 256, torch.float16, torch.float16, warps=True, seed=65),
    MarkovCase(9, 4, 1000, 16, torch.float16, torch.float32, warps=True, seed=66),
    # past 264 requests the split pass reads a whole row a block, warp.cu's passes in three blocks
    MarkovCase(300, 2, 151936, 256, greedy_every=6, return_q=False, warps=True, seed=70),
    # with the host's top-k bound: top_k.cu without warp.cu's rounds, its pick thresholding the rows
    # of k > 64 and of top-p alone over the whole row; q stored and lazy, odd V
    MarkovCase(16, 7, 151936, 256, greedy_every=5, t_one_every=3, warps=True, top_k_bound=64, seed=67),
    MarkovCase(128, 3, 151936, 256, greedy_every=7, return_q=False, warps=True, top_k_bound=64, seed=68),
    MarkovCase(130, 2, 50001, 256, torch.float16, torch.float32, warps=True, top_k_bound=20, seed=69),
    # top-p alone: the row max comes from the kernel that makes the bias (small-batch at R <= 2, the
    # fused step's bias rows from R = 32, one or two halves), else from a pass of its own (after the
    # fused step's bias at 3..31, after cuBLAS at V % 64 != 0)
    MarkovCase(1, 7, 151936, 256, warps=True, top_p_alone=True, seed=71),
    MarkovCase(2, 5, 50001, 256, torch.bfloat16, torch.float32, t_one_every=2, warps=True, top_p_alone=True, seed=72),
    MarkovCase(2, 4, 151936, 256, torch.float16, torch.float16, return_q=False, warps=True, top_p_alone=True, seed=73),
    MarkovCase(16, 3, 151936, 256, greedy_every=5, warps=True, top_p_alone=True, seed=74),
    MarkovCase(100, 3, 151936, 256, torch.float16, torch.float32, greedy_every=6, t_one_every=4, return_q=False,
               warps=True, top_p_alone=True, seed=75),
    MarkovCase(37, 4, 50048, 256, torch.bfloat16, torch.float16, t_one_every=3, warps=True, top_p_alone=True, seed=76),
    MarkovCase(8, 3, 50001, 256, greedy_every=4, warps=True, top_p_alone=True, seed=77),
    MarkovCase(64, 2, 151936, 256, t_one_every=5, warps=True, top_p_alone=True, seed=78),
    MarkovCase(32, 3, 151936, 256, torch.bfloat16, torch.float32, greedy_every=3, warps=True, top_p_alone=True,
               seed=79),
    # review coverage (no defect behind them): the fused max taker with one row in its second half
    # (R = 65); a V of 37 (odd, under one slice, one race group short) through top_k.cu with the
    # host's bound (most k >= V: off) and without it (its leftovers to warp.cu), k close to V
    MarkovCase(65, 2, 32000, 256, torch.bfloat16, torch.float16, greedy_every=4, warps=True, top_p_alone=True,
               seed=81),
    MarkovCase(70, 3, 37, 16, torch.float32, torch.float16, greedy_every=5, warps=True, top_k_bound=64, seed=82),
    MarkovCase(33, 2, 37, 16, torch.float32, torch.bfloat16, t_one_every=3, warps=True, seed=83),
]


@pytest.mark.parametrize("case", WARPED_CASES, ids=lambda c: c.label())
def test_markov_chain_with_top_k_top_p_matches_reference(case):
    res = compare_markov(case)
    assert res["ok"], res


def test_markov_chain_warped_rows_keep_what_their_threshold_keeps():
    """Each warped q row keeps exactly the entries a top-k / top-p rule keeps, computed here in fp64
    from the row's own logits: k entries (plus ties) for top-k; for top-p the kept set's mass
    reaches p and falls below it without its smallest entry."""
    from dspark_cli.runtime import markov_chain

    case = MarkovCase(12, 3, 151936, 256, warps=True, seed=67)
    U, anchors, w1, w2, temperature, seeds = markov_inputs(case)
    top_k, top_p = markov_warps(case)
    out = markov_chain(U, anchors, w1, w2, temperature, top_k=top_k, top_p=top_p, seeds=seeds)
    prev = torch.cat([anchors.long()[:, None], out.tokens[:, :-1]], dim=1)
    for k in range(case.gamma):
        x = ((U[:, k].float() + w1[prev[:, k]].float() @ w2.float().t()) / temperature[:, None]).double()
        for r in range(case.R):
            kept = out.q[r, k] > 0
            kk, p = int(top_k[r]), float(top_p[r])
            row = x[r]
            if 0 < kk < case.V:
                kth = row.topk(kk).values[-1]
                assert int(kept.sum()) >= kk or p < 1
                assert bool((row[kept] >= kth - 1e-4).all())
                row = row.masked_fill(row < kth - 1e-4, float("-inf"))
            if p < 1:
                probs = row.softmax(0)
                mass = float(probs[kept].sum())
                assert mass >= p - 1e-5
                assert mass - float(probs[kept].min()) < p + 1e-5
                assert bool((probs[~kept] <= probs[kept].min() * (1 + 1e-4)).all())
            elif not 0 < kk < case.V:
                assert bool(kept.all())


def _small_top_k_rows(R: int, V: int, gamma: int, u_dtype, seed: int):
    """Chain inputs whose rows exercise top_k.cu: k in 1..64 (and 65, 100: warp.cu's), top-p on top
    (p = 0 too) or not, greedy and T = 1 rows; six entries tied at the top across slices, a row with
    fewer finite entries than k, and one whose top fifth ties (its lists overflow: warp.cu takes it)."""
    case = MarkovCase(R, gamma, V, 256, u_dtype, torch.bfloat16, t_one_every=3, seed=seed)
    U, anchors, w1, w2, temperature, seeds = markov_inputs(case)
    g = torch.Generator(device="cpu").manual_seed(seed)
    ks = torch.tensor([1, 2, 20, 50, 64, 65, 100, 7])
    top_k = ks[torch.arange(R) % len(ks)].to("cuda")
    top_p = torch.tensor([1.0, 0.95, 0.0, 0.5])[torch.randint(0, 4, (R,), generator=g)].to("cuda")
    temperature[5::11] = 0.0
    zero_bias = torch.arange(V, device="cuda") % 5 == 0
    w2[zero_bias] = 0  # x = U / T there: equal U, equal x
    ids = 5 * torch.randperm(V // 5, generator=g)[:6].to("cuda")  # other slices, other race groups
    U[::4, :, ids] = 40.0  # six entries tie far above the rest (k = 1: all six kept)
    if R > 2:
        U[2, :, 10:] = float("-inf")  # ten finite entries, k = 20: the row keeps everything
        top_p[2] = 1.0
        U[3, :, zero_bias] = 1000.0  # a fifth of the row ties at the top: lists overflow
    return U, anchors, w1, w2, temperature, seeds, top_k, top_p


@pytest.mark.parametrize("R,V,u_dtype", [(1, 151936, torch.bfloat16), (16, 151936, torch.bfloat16),
                                         (128, 151936, torch.bfloat16), (130, 50001, torch.float32),
                                         (9, 1000, torch.float16), (33, 4097, torch.float32),
                                         (48, 128256, torch.bfloat16), (40, 50257, torch.float16)])
@pytest.mark.parametrize("return_q", [True, False])
def test_small_top_k_draws_what_the_radix_rounds_draw(R, V, u_dtype, return_q, monkeypatch):
    """top_k.cu's one pass and pick (DSPARK_MARKOV_PATH=small-top-k: at any R) against warp.cu's
    rounds (=radix) on the same inputs: the same thresholds and tokens bit for bit (the same kept
    entries, the same race groups and noise), q_token, row stats and q rows to rounding (sums in
    another order)."""
    args = _small_top_k_rows(R, V, 3, u_dtype, seed=70 + R)
    U, anchors, w1, w2, temperature, seeds, top_k, top_p = args

    def chain(path):
        monkeypatch.setenv("DSPARK_MARKOV_PATH", path)
        poison_allocator()
        return torch.ops.dspark.markov_chain(U, anchors, w1, w2, temperature, seeds, return_q, None, None, None,
                                             top_k, top_p)

    fast, radix = chain("small-top-k"), chain("radix")
    assert torch.equal(fast[7], radix[7])  # thresholds
    assert torch.equal(fast[0], radix[0])  # tokens
    torch.testing.assert_close(fast[1], radix[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(fast[4], radix[4], rtol=1e-5, atol=0)
    if return_q:
        torch.testing.assert_close(fast[2], radix[2], rtol=1e-5, atol=1e-12)
    warped = (top_k > 0) & (temperature >= 1e-5)
    assert bool((fast[7][warped] > float("-inf")).any())  # the warps bite
    if R > 2:
        assert bool((fast[7][2] == float("-inf")).all())  # ten finite entries under k = 20


@pytest.mark.parametrize("R,V,u_dtype", [(1, 151936, torch.bfloat16), (40, 151936, torch.bfloat16),
                                         (128, 151936, torch.bfloat16), (130, 50001, torch.float32),
                                         (9, 1000, torch.float16), (24, 128256, torch.bfloat16)])
def test_a_host_bound_on_top_k_draws_what_the_radix_rounds_draw(R, V, u_dtype, monkeypatch):
    """Given top_k_max <= 64 the chain launches no radix rounds where top_k.cu takes the batch, and
    top_k.cu's pick finds the threshold of every warped row its lists do not take over the whole
    row: lists overflowed by ties, rows above the bound (k = 65, 100: the bound is wrong), rows
    with top-p alone (k = 0). The same thresholds and tokens bit for bit as warp.cu's rounds, on
    every call."""
    args = _small_top_k_rows(R, V, 3, u_dtype, seed=90 + R)
    U, anchors, w1, w2, temperature, seeds, top_k, top_p = args
    top_k[1::9] = 0
    top_p[1::9] = 0.9

    def chain(path, top_k_max=0, return_q=True):
        monkeypatch.setenv("DSPARK_MARKOV_PATH", path)
        poison_allocator()
        return torch.ops.dspark.markov_chain(U, anchors, w1, w2, temperature, seeds, return_q, None, None, None,
                                             top_k, top_p, top_k_max)

    radix = chain("radix")
    for path in ("small-top-k", "default"):
        bound = chain(path, top_k_max=64)
        assert torch.equal(bound[7], radix[7])  # thresholds
        assert torch.equal(bound[0], radix[0])  # tokens
        torch.testing.assert_close(bound[1], radix[1], rtol=1e-5, atol=0)
        torch.testing.assert_close(bound[4], radix[4], rtol=1e-5, atol=0)
        torch.testing.assert_close(bound[2], radix[2], rtol=1e-5, atol=1e-12)
        again = chain(path, top_k_max=64, return_q=False)
        assert torch.equal(again[7], bound[7]) and torch.equal(again[0], bound[0])
    sampled = temperature >= 1e-5
    assert bool((radix[7][sampled & (top_k == 0)] > float("-inf")).all())  # top-p alone bites
    if R > 2:
        assert bool((radix[7][3] > float("-inf")).all()) and top_k[3] <= 64  # the overflowing row is warped


def test_a_top_k_bound_past_int64_draws_as_no_bound():
    """markov_chain takes any int >= 0 as top_k_max; one of 2**63 or more failed the op's call (its
    schema's int is an int64). Now it draws as no bound does, bit for bit (the same kernels), and a
    bound of 64 (wrong for rows of k > 64 and of top-p alone) the same tokens."""
    from dspark_cli.runtime import markov_chain

    case = MarkovCase(40, 3, 4099, 256, greedy_every=5, warps=True, seed=92)
    U, anchors, w1, w2, temperature, seeds = markov_inputs(case)
    top_k, top_p = markov_warps(case)
    none, huge, tight = (markov_chain(U, anchors, w1, w2, temperature, top_k=top_k, top_p=top_p, top_k_max=bound,
                                      seeds=seeds) for bound in (None, 2**64, 64))
    assert torch.equal(huge.tokens, none.tokens) and torch.equal(huge.q, none.q)
    assert torch.equal(tight.tokens, none.tokens)
    torch.testing.assert_close(tight.q, none.q, rtol=1e-5, atol=1e-12)


def test_ops_called_directly_refuse_what_they_would_misread():
    """torch.ops.dspark.* are public: inputs the Python layer would refuse must not reach a kernel.
    A W2 with more rows than V wrote past the chain's bias scratch; fp64 U or W was read as 16/32-bit
    data; a per-request vector shorter than R was read past its end."""
    U, anchors, w1, w2, temperature, seeds = markov_inputs(MarkovCase(130, 2, 32000, 256, seed=40))
    chain = torch.ops.dspark.markov_chain
    refusals = {
        "w2 rows beyond V": lambda: chain(U, anchors, w1, torch.cat([w2, w2[:8000]]), temperature, seeds, False),
        "w1 not [V, r]": lambda: chain(U, anchors, w1[:-1], w2[:-1], temperature, seeds, False),
        "fp64 U": lambda: chain(U.double(), anchors, w1, w2, temperature, seeds, False),
        "fp64 W": lambda: chain(U, anchors, w1.double(), w2.double(), temperature, seeds, False),
        "short seeds": lambda: chain(U, anchors, w1, w2, temperature, seeds[:-1], False),
        "short anchors": lambda: chain(U, anchors[:1], w1, w2, temperature, seeds, False),
        "CPU temperature": lambda: chain(U, anchors, w1, w2, temperature.cpu(), seeds, False),
        "γ = 0": lambda: chain(U[:, :0].contiguous(), anchors, w1, w2, temperature, seeds, False),  # wrote through null
        "fp64 conf_h": lambda: chain(U, anchors, w1, w2, temperature, seeds, False,  # refused after its launches
                                     torch.zeros(130, 2, 8, dtype=torch.float64, device="cuda"),
                                     torch.zeros(8 + 256, device="cuda"), None),
    }
    draft = torch.ops.dspark.markov_chain(U, anchors, w1, w2, temperature, seeds, False)
    tokens, q_token = draft[0], draft[1]
    target = torch.softmax(torch.randn(130 * 3, 32000, device="cuda"), -1)
    ell = torch.full((130,), 2, dtype=torch.int64, device="cuda")

    def verify(**changed):
        args = {"tokens": tokens, "q_token": q_token, "U": U, "anchors": anchors, "w1": w1, "w2": w2,
                "temperature": temperature, "ell": ell, "seeds": seeds, "target": target, **changed}
        return torch.ops.dspark.rejection_sample(
            args["target"], None, args["ell"], args["tokens"], args["q_token"], None, args["U"], args["anchors"], args["w1"],
            args["w2"], args["temperature"], None, args["seeds"], row_stride=3)

    refusals.update({
        "verify: fp64 W": lambda: verify(w1=w1.double(), w2=w2.double()),
        "verify: w2 rows beyond V": lambda: verify(w2=torch.cat([w2, w2[:8000]])),
        "verify: short ell": lambda: verify(ell=ell[:5]),
        "verify: U of other requests": lambda: verify(U=U[:7]),
        "verify: q_token not [R, γ]": lambda: verify(q_token=q_token[:, :1]),
        "verify: strided tokens": lambda: verify(tokens=torch.cat([tokens, tokens], 1)[:, :2]),  # read flat
        "verify: strided q_token": lambda: verify(q_token=torch.cat([q_token, q_token], 1)[:, :2]),
        "verify: fewer target rows than R · row_stride": lambda: verify(target=target[:-1]),
        "schedule: sps_dense strided": lambda: torch.ops.dspark.schedule_production(
            torch.rand(4, 7, device="cuda"), torch.rand(4, 7, device="cuda"),
            torch.rand(20, device="cuda")[::2], 9),
        "schedule: no current requests": lambda: torch.ops.dspark.schedule_production(
            torch.rand(4, 7, device="cuda"), torch.rand(0, 7, device="cuda"), torch.rand(10, device="cuda"), 9),
    })
    for what, call in refusals.items():
        with pytest.raises(RuntimeError, match="dspark::"):
            call()
            pytest.fail(f"{what}: accepted")
    verify()  # the same call with nothing changed runs
    torch.cuda.synchronize()
    # A hand-built fp64 DraftSource: the Python layer leaves it to the reference, which refuses it
    # (before, the op verified with its U and W read as garbage)
    from dspark_cli.runtime import markov_chain, rejection_sample

    lazy = markov_chain(U[:4], anchors[:4], w1, w2, temperature[:4], seeds=seeds[:4], return_q=False)
    wide = dataclasses.replace(lazy, source=dataclasses.replace(lazy.source, U=lazy.source.U.double(),
                                                                 w1=w1.double(), w2=w2.double()))
    with pytest.raises(ValueError, match="must have dtype float32, float16, bfloat16, got float64"):
        rejection_sample(target[:4 * 3].view(4, 3, 32000), wide, ell[:4], seeds=seeds[:4])


@pytest.mark.parametrize("q_stored", [True, False])
def test_a_dense_verify_length_past_its_rows_reads_only_its_own_rows(q_stored):
    """A dense batch holds row_stride rows per request: ℓ was clamped to γ only, so ℓ ≥ row_stride
    read the next request's rows (the last one's past the tensor). It verifies as ℓ = row_stride − 1."""
    R, gamma, V, stride = 9, 7, 32000, 3
    U, anchors, w1, w2, temperature, seeds = markov_inputs(MarkovCase(R, gamma, V, 256, seed=41))
    draft = torch.ops.dspark.markov_chain(U, anchors, w1, w2, temperature, seeds, q_stored)
    # each request's rows are its drafts' own q rows: every draft they score is accepted, so a
    # length past them would go on accepting (and reading the next request's rows)
    q_rows = torch.ops.dspark.markov_chain(U, anchors, w1, w2, temperature, seeds, True)[2]
    target = q_rows[:, :stride].reshape(R * stride, V).contiguous()
    rebuild = (None, None, None, None, None) if q_stored else (U, anchors, w1, w2, temperature)
    q = draft[2] if q_stored else None

    def verify(length):
        ell = torch.full((R,), length, dtype=torch.int64, device="cuda")
        return torch.ops.dspark.rejection_sample(target, None, ell, draft[0], draft[1], q, *rebuild, None, seeds,
                                                 None if q_stored else draft[4], row_stride=stride)

    past, within = verify(gamma), verify(stride - 1)
    assert torch.equal(past[0], within[0]) and torch.equal(past[1], within[1])
    assert int(past[1].max()) <= stride - 1


@pytest.mark.parametrize("R", [1, 16])  # the small-batch kernels' bias; the fused step's
@pytest.mark.parametrize("shift", ["w1", "target"])
def test_a_lazy_draft_with_misaligned_w1_or_target_verifies_as_its_stored_q(R, shift):
    """The chain took its fused step with a W1 starting off 16 bytes, which rejection's fused race
    cannot load (so it rebuilt the row with another GEMM's bits), and rejection left the fused race
    for a misaligned target: now both make the row's bias alike, and nothing loads off alignment."""
    from dspark_cli.runtime import cuda_ops, markov_chain, rejection_sample

    case = MarkovCase(R, 5, 32768, 256, greedy_every=4, seed=90 + R)
    U, anchors, w1, w2, temperature, seeds = markov_inputs(case)
    g = torch.Generator(device="cuda").manual_seed(9)
    target = torch.rand(R, case.gamma + 1, case.V, device="cuda", generator=g) ** 8
    target /= target.sum(-1, keepdim=True)
    moved = {"w1": w1, "target": target}[shift]
    storage = torch.empty(moved.numel() + 1, dtype=moved.dtype, device="cuda")
    shifted = storage[1:].view(moved.shape)
    shifted.copy_(moved)
    if shift == "w1":
        w1 = shifted
    else:
        target = shifted
    lazy = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=False)
    stored = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=True)
    ell = torch.randint(0, case.gamma + 1, (R,), device="cuda", generator=g)
    greedy = temperature < 1e-5
    out = rejection_sample(target, lazy, ell, greedy=greedy, seeds=seeds)
    with cuda_ops.enabled(False):
        ref = rejection_sample(target, stored, ell, greedy=greedy, seeds=seeds)
    assert torch.equal(out.num_accepted, ref.num_accepted)
    assert int((out.output_tokens != ref.output_tokens).any(dim=1).sum()) <= max(1, R // 8)  # near-ties of the race


@pytest.mark.parametrize("R", [1, 16, 128, 130])  # the bias of the small-batch kernel, the fused step, cuBLAS
def test_warped_lazy_draft_verifies_as_its_stored_q(R):
    """A top-k/top-p draft with q lazy carries the chain's thresholds; the CUDA rejection rebuilds its
    rows from the chain's bias with them and verifies as the same chain's stored q rows do (the
    reference on the stored draft too): the same accepted counts; recovered tokens the same but for
    a near-tie of the residual race (rebuilt q rounds as exp·(1/sum), stored as exp / sum)."""
    from dspark_cli.runtime import cuda_ops, markov_chain, rejection_sample

    case = MarkovCase(R, 7, 151936, 256, greedy_every=4, t_one_every=3, warps=True, seed=68 + R)
    U, anchors, w1, w2, temperature, seeds = markov_inputs(case)
    top_k, top_p = markov_warps(case)
    lazy = markov_chain(U, anchors, w1, w2, temperature, top_k=top_k, top_p=top_p, seeds=seeds, return_q=False)
    stored = markov_chain(U, anchors, w1, w2, temperature, top_k=top_k, top_p=top_p, seeds=seeds, return_q=True)
    assert lazy.q is None and lazy.source.thresholds is not None and torch.equal(lazy.tokens, stored.tokens)
    g = torch.Generator(device="cuda").manual_seed(5)
    target = torch.rand(case.R, case.gamma + 1, case.V, device="cuda", generator=g) ** 8
    target /= target.sum(-1, keepdim=True)
    ell = torch.randint(0, case.gamma + 1, (case.R,), device="cuda", generator=g)
    greedy = temperature < 1e-5
    poison_allocator()
    out = rejection_sample(target, lazy, ell, greedy=greedy, seeds=seeds)
    from_stored = rejection_sample(target, stored, ell, greedy=greedy, seeds=seeds)
    with cuda_ops.enabled(False):
        ref = rejection_sample(target, stored, ell, greedy=greedy, seeds=seeds)
        with pytest.raises(ValueError, match="CUDA rejection"):
            rejection_sample(target, lazy, ell, greedy=greedy, seeds=seeds)
    assert torch.equal(from_stored.num_accepted, ref.num_accepted)
    assert torch.equal(from_stored.output_tokens, ref.output_tokens)
    assert torch.equal(out.num_accepted, ref.num_accepted) and int((out.num_accepted < ell).sum()) > 0
    assert int((out.output_tokens != from_stored.output_tokens).any(dim=1).sum()) <= max(1, R // 64)


def test_regrouped_warped_rows_recover_only_what_their_residual_holds():
    """TGI regroups lazy drafts between draft and verify (gather_drafts): rows drafted at R = 2
    (small-batch bias), 40 (fused step) and 150 (cuBLAS) verified in batches of other sizes. Each
    target row is p = q/2 + δ_z/2 for the q the chain sampled from (top-k 2..4) and a token z
    outside it: every draft passes with probability 1/2 and the residual max(p − q, 0) is δ_z/2, so
    every recovered (and bonus, from δ_z) token must be z. U = 0 leaves x = bias / T, so the bias's
    last bits decide whether the entry at a row's threshold stays above it: rebuilt at the verify
    batch's own size they differed, the entry dropped now and then, and the residual recovered that
    token. Rows are rebuilt at their drafted sizes instead."""
    from dspark_cli.runtime import gather_drafts, markov_chain, rejection_sample

    gamma, V = 4, 151936
    _, _, w1, w2, _, _ = markov_inputs(MarkovCase(1, gamma, V, 256, seed=90))  # one drafter's heads
    drafts, targets, zs = {}, {}, {}
    for R in (2, 40, 150):
        _, anchors, _, _, temperature, seeds = markov_inputs(MarkovCase(R, gamma, V, 256, seed=90 + R))
        U = torch.zeros(R, gamma, V, dtype=torch.bfloat16, device="cuda")
        top_k = torch.randint(2, 5, (R,), device="cuda")
        lazy = markov_chain(U, anchors, w1, w2, temperature, top_k=top_k, seeds=seeds, return_q=False)
        q = markov_chain(U, anchors, w1, w2, temperature, top_k=top_k, seeds=seeds, return_q=True)
        assert torch.equal(lazy.tokens, q.tokens)
        rows, z = torch.arange(R, device="cuda"), (anchors + 12345) % V
        assert not bool(q.q[rows, :, z].any())  # z is outside every row's top-k
        one_hot = torch.zeros(R, 1, V, device="cuda")
        one_hot[rows, 0, z] = 1.0
        targets[R] = torch.cat([0.5 * q.q + 0.5 * one_hot, one_hot], dim=1)
        drafts[R], zs[R] = lazy, z
    batches = [[(2, [0, 1]), (40, list(range(40))), (150, list(range(100)))],  # 142 rows: cuBLAS
               [(150, list(range(100, 150)))],                                    # 50: the fused step
               [(150, [0]), (40, [0])]]                                           # 2: the small-batch kernel
    rejected = 0
    for parts in batches:
        batch = gather_drafts([(drafts[R], rows) for R, rows in parts])
        pick = lambda t: torch.cat([t[R][torch.tensor(rows, device="cuda")] for R, rows in parts])  # noqa: E731
        n = batch.tokens.shape[0]
        for trial in range(8):  # other ratio-test draws: rejections at other positions
            seeds = torch.arange(n, device="cuda") + 1000 * trial
            res = rejection_sample(pick(targets).contiguous(), batch, torch.full((n,), gamma, device="cuda"),
                                   seeds=seeds)
            emitted = res.output_tokens[torch.arange(n, device="cuda"), res.num_accepted]
            assert torch.equal(emitted, pick(zs)), (emitted != pick(zs)).nonzero().view(-1).tolist()
            rejected += int((res.num_accepted < gamma).sum())
    assert rejected > 1200


def test_held_rows_verify_with_the_rest_of_their_drafts_u_unread():
    """vLLM V1 keeps a skipped request's lazy block as its own rows of U only and verifies it with
    the draft restored at its drafted batch size, U unwritten at the other rows (lazy_drafts._HeldRows).
    The CUDA op reads U only at the rows it rebuilds: at R = 2 (small-batch bias), 40 (fused step)
    and 150 (cuBLAS), unwarped and top-k, the held rows verify to the same tokens with NaN at the
    other rows, for targets near q (a broad residual) and for p = q/2 + δ_z/2 (the residual is δ_z:
    every recovered token is z, which a row rebuilt from another U would miss)."""
    from dspark_cli.runtime import gather_drafts, markov_chain, rejection_sample

    gamma, V = 4, 151936
    _, _, w1, w2, _, _ = markov_inputs(MarkovCase(1, gamma, V, 256, seed=95))
    rejected = 0
    for R, warped in ((2, False), (40, False), (40, True), (150, False), (150, True)):
        U, anchors, _, _, temperature, _ = markov_inputs(MarkovCase(R, gamma, V, 256, seed=95 + R))
        top_k = torch.randint(2, 50, (R,), device="cuda") if warped else None
        seeds = torch.arange(R, device="cuda") + 7 * R
        lazy = markov_chain(U, anchors, w1, w2, temperature, top_k=top_k, seeds=seeds, return_q=False)
        q = markov_chain(U, anchors, w1, w2, temperature, top_k=top_k, seeds=seeds, return_q=True).q
        held = torch.arange(1, R, 3, device="cuda")  # every third row
        poisoned = dataclasses.replace(lazy, source=dataclasses.replace(
            lazy.source, U=torch.full_like(U, float("nan")).index_copy_(0, held, U.index_select(0, held))))
        n, rows = held.numel(), held.tolist()
        q, z = q.index_select(0, held), (anchors.index_select(0, held) + 12345) % V
        one_hot = torch.zeros(n, 1, V, device="cuda")
        one_hot[torch.arange(n, device="cuda"), 0, z] = 1.0
        near = torch.cat([q, q[:, :1]], 1) ** 1.5 + 1e-7
        ell = torch.full((n,), gamma, device="cuda")
        for target in (near / near.sum(-1, keepdim=True), torch.cat([0.5 * q + 0.5 * one_hot, one_hot], dim=1)):
            for trial in range(4):
                verify_seeds = torch.arange(n, device="cuda") + 1000 * trial
                ref, got = (rejection_sample(target.contiguous(), gather_drafts([(d, rows)]), ell, seeds=verify_seeds)
                            for d in (lazy, poisoned))
                assert torch.equal(got.num_accepted, ref.num_accepted)
                assert torch.equal(got.output_tokens, ref.output_tokens)
                rejected += int((got.num_accepted < gamma).sum())
        emitted = got.output_tokens[torch.arange(n, device="cuda"), got.num_accepted]  # the last target's (δ_z)
        assert torch.equal(emitted, z)
    assert rejected > 100


@pytest.mark.parametrize("path", ["default", "small-top-k", "bound"])
def test_warped_chain_is_deterministic_and_captures_in_cuda_graph(path, monkeypatch):
    """The thresholds' integer histograms add in any order to the same sums, and top_k.cu merges its
    race groups in a fixed order: a replay of the captured op, and a second eager call, give the
    same tokens and q bits. "bound": top_k_max = 64, wrong for the rows of k up to 200 and those of
    top-p alone, whose thresholds top_k.cu's pick then finds over the whole row."""
    if path == "small-top-k":
        monkeypatch.setenv("DSPARK_MARKOV_PATH", path)
    case = MarkovCase(16, 4, 151936, 256, greedy_every=5, warps=True, seed=69)
    U, anchors, w1, w2, temperature, seeds = markov_inputs(case)
    top_k, top_p = markov_warps(case)
    for return_q in (True, False):
        args = (U, anchors, w1, w2, temperature, seeds, return_q, None, None, None, top_k, top_p,
                64 if path == "bound" else 0)
        eager = _graph_replays_match_eager(torch.ops.dspark.markov_chain, args, replays=2, outputs=(0, 1, 7))
        poison_allocator()
        again = torch.ops.dspark.markov_chain(*args)
        assert torch.equal(eager[0], again[0]) and torch.equal(eager[2], again[2]) and torch.equal(eager[7], again[7])


@pytest.mark.parametrize("R", [1, 16, 128])
@pytest.mark.parametrize("path", ["default", "radix", "top-p alone"])
def test_warped_chain_draws_the_same_without_programmatic_launch(R, path, monkeypatch):
    """warp.cu's rounds (given top-k) and top_k.cu's kernels start while their predecessor drains
    and wait for it before reading: in plain stream order (DSPARK_PDL=0) the same thresholds, tokens
    and q bits."""
    if path == "radix":
        monkeypatch.setenv("DSPARK_MARKOV_PATH", path)
    case = MarkovCase(R, 4, 151936, 256, greedy_every=5 if R > 1 else 0, warps=True, seed=80 + R)
    U, anchors, w1, w2, temperature, seeds = markov_inputs(case)
    top_k, top_p = markov_warps(case)
    if path == "top-p alone":
        top_k = None
    args = (U, anchors, w1, w2, temperature, seeds, True, None, None, None, top_k, top_p)
    poison_allocator()
    programmatic = torch.ops.dspark.markov_chain(*args)
    monkeypatch.setenv("DSPARK_PDL", "0")
    poison_allocator()
    plain = torch.ops.dspark.markov_chain(*args)
    for i in (0, 1, 2, 7):  # tokens, q_token, q, thresholds
        assert torch.equal(programmatic[i], plain[i]), i


# R·γ on both sides of each power of two the sort pads to (256: no transposes; 512, 1024, 2048: 2, 4, 6)
@pytest.mark.parametrize("R,R_stale,gamma,seed", [(1, 1, 7, 0), (5, 9, 7, 1), (16, 16, 7, 2), (128, 120, 7, 3),
                                                  (256, 256, 7, 4), (256, 256, 8, 5), (300, 40, 5, 6), (2, 1, 1, 7),
                                                  (36, 37, 7, 8), (146, 73, 7, 9), (2048, 2048, 1, 10),
                                                  (1024, 700, 2, 11),
                                                  (16, 0, 7, 12), (300, 0, 5, 13)])  # no stale rows: survival 0
def test_schedule_production_matches_reference(R, R_stale, gamma, seed):
    res = compare_schedule(R, R_stale, gamma, seed)
    assert res["ok"], res


@pytest.mark.parametrize("R,R_stale,gamma,levels,scale", [(256, 256, 7, 4, 1.0), (73, 200, 7, 8, 1.0),
                                                          (36, 36, 7, 2, 1.0), (256, 256, 7, 0, 1e-4),
                                                          (40, 12, 6, 3, 0.02)])
def test_schedule_production_breaks_ties_and_takes_no_budget_as_the_reference(R, R_stale, gamma, levels, scale):
    """Survival rounded to a few levels (equal values: admission by the flat index j·R + r) and
    survival so small that K = 0 (nothing admitted) or small."""
    res = compare_schedule(R, R_stale, gamma, seed=R + gamma, levels=levels, scale=scale)
    assert res["ok"], res
    if scale == 1e-4:
        assert res["budget"] == 0


@pytest.mark.parametrize("R,R_stale,gamma", [(16, 1, 7), (40, 12, 6), (300, 40, 5)])
def test_schedule_production_searches_past_a_smaller_stale_batch_as_the_reference(R, R_stale, gamma):
    """A table whose steps/s rises with the tokens: the best budget lies past the stale batch's own
    candidates (they add survival 0 there), where the kernel stopped its search."""
    from dspark_cli.runtime import SPSTable

    res = compare_schedule(R, R_stale, gamma, seed=R, sps=SPSTable([1, 4096], [1.0, 100.0]))
    assert res["ok"] and res["budget"] > R_stale * gamma, res


def test_schedule_production_declines_too_many_candidates():
    from dspark_cli.runtime import SPSTable, cuda_ops

    a = torch.rand(300, 7, device="cuda")
    assert cuda_ops.schedule_production(a, a, SPSTable.default()) is NotImplemented


@pytest.mark.parametrize("R", [1, 2, 16, 48, 128])  # small-batch kernel, fused step staged / unstaged
def test_v1_layout_rows_verify_as_the_flat_layout(R):
    """vLLM V1's verify batch (lazy_drafts.BlockVerify): no bonus rows, each request's bonus row the
    next request's first row and the last one's a spare row, named by rejection_sample_rows. The
    CUDA op gives the flat layout's accepted counts and tokens, but for the bonus token of a request
    that accepted every draft (drawn from another row; V1 replaces it); counts as the reference's."""
    from dspark_cli.runtime import cuda_ops, markov_chain, rejection_sample_flat, rejection_sample_rows

    case = MarkovCase(R, 7, 151936, 256, greedy_every=5, seed=150 + R)
    U, anchors, w1, w2, temperature, seeds = markov_inputs(case)
    lazy = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=False)
    g = torch.Generator(device="cuda").manual_seed(R)
    ell = torch.randint(0, case.gamma + 1, (R,), device="cuda", generator=g)
    # targets near the drafts' own q (the draft's rows, sharpened): accepts and rejections both
    q_rows = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=True).q
    target = torch.cat([q_rows, q_rows[:, :1]], 1) ** 1.5
    target /= target.sum(-1, keepdim=True)
    n = ell.tolist()
    flat_rows = torch.cat([target[i, :n[i] + 1] for i in range(R)])
    cu = torch.tensor([0] + [k + 1 for k in n], device="cuda").cumsum(0)
    v1_rows = torch.cat([*(target[i, :n[i]] for i in range(R)), torch.full((1, case.V), 1 / case.V, device="cuda")])
    starts = torch.tensor([0] + n[:-1], device="cuda").cumsum(0)
    greedy = temperature < 1e-5
    poison_allocator()
    flat = rejection_sample_flat(flat_rows, cu, lazy, greedy=greedy, seeds=seeds)
    rows = rejection_sample_rows(v1_rows, starts, ell, lazy, greedy=greedy, seeds=seeds)
    with cuda_ops.enabled(False):
        ref = rejection_sample_rows(v1_rows, starts, ell, lazy, greedy=greedy, seeds=seeds)
    assert torch.equal(rows.num_accepted, flat.num_accepted) and torch.equal(rows.num_accepted, ref.num_accepted)
    full = rows.num_accepted == ell
    assert 0 < int(full.sum()) < R or R <= 2
    pos = torch.arange(case.gamma + 1, device="cuda")
    same = (pos < rows.num_accepted.unsqueeze(1)) | ((pos == rows.num_accepted.unsqueeze(1)) & ~full.unsqueeze(1))
    assert torch.equal(torch.where(same, rows.output_tokens, -2), torch.where(same, flat.output_tokens, -2))
    assert torch.equal(rows.output_tokens < 0, flat.output_tokens < 0)


REJECTION_CASES = [
    RejectionCase(1, 7, 151936, 256, seed=1),
    RejectionCase(16, 7, 151936, 256, greedy_every=3, seed=2),
    RejectionCase(16, 7, 151936, 256, q_stored=False, greedy_every=5, seed=3),
    RejectionCase(128, 7, 151936, 256, q_stored=False, seed=4),
    RejectionCase(37, 3, 50257, 64, greedy_every=2, flat=True, seed=5),
    RejectionCase(37, 3, 50257, 64, q_stored=False, greedy_every=2, flat=True, seed=6),
    RejectionCase(5, 1, 1000, 16, q_stored=False, seed=7),
    RejectionCase(9, 4, 32000, 32, greedy_every=1, seed=8),  # all greedy
    RejectionCase(70, 4, 50001, 256, q_stored=False, greedy_every=9, seed=10),
    RejectionCase(128, 7, 151936, 256, q_stored=False, greedy_every=6, seed=11),
    # q rebuilt by the small-batch bias (R <= 2, rank 256)
    RejectionCase(1, 7, 151936, 256, q_stored=False, seed=12),
    RejectionCase(2, 5, 50001, 256, q_stored=False, greedy_every=2, seed=13),
    RejectionCase(2, 7, 151936, 256, q_stored=False, flat=True, seed=14),
    # temperature exactly 1 in the rebuilt rows (no division), stored and rebuilt
    RejectionCase(64, 7, 151936, 256, q_stored=False, greedy_every=9, t_one_every=2, seed=15),
    RejectionCase(33, 4, 50000, 256, t_one_every=3, flat=True, seed=16),
    # drafted by our chain: the rebuilt row takes the chain's row stats (no stats pass)
    RejectionCase(1, 7, 151936, 256, q_stored=False, chain_draft=True, seed=17),
    RejectionCase(2, 7, 151936, 256, q_stored=False, greedy_every=2, flat=True, chain_draft=True, seed=18),
    RejectionCase(16, 7, 151936, 256, q_stored=False, greedy_every=5, chain_draft=True, seed=19),
    RejectionCase(128, 7, 151936, 256, q_stored=False, greedy_every=6, t_one_every=3, chain_draft=True, seed=20),
    RejectionCase(37, 3, 50257, 64, q_stored=False, greedy_every=2, flat=True, chain_draft=True, seed=21),
    # rows rebuilt by the fused step's bias (staged at R = 5, unstaged at 48)
    RejectionCase(5, 7, 151936, 256, q_stored=False, flat=True, chain_draft=True, seed=22),
    RejectionCase(48, 7, 151936, 256, q_stored=False, greedy_every=4, chain_draft=True, seed=23),
    # no greedy request: the racing kernel runs the ratio tests itself (small-batch kernel at R = 2,
    # fused step staged at 16 with its last CTA finishing, unstaged at 48 / 128 with finish_kernel)
    RejectionCase(2, 7, 151936, 256, q_stored=False, chain_draft=True, seed=25),
    RejectionCase(16, 7, 151936, 256, q_stored=False, chain_draft=True, seed=26),
    RejectionCase(48, 5, 151936, 256, q_stored=False, flat=True, chain_draft=True, seed=27),
    RejectionCase(128, 7, 151936, 256, q_stored=False, t_one_every=3, chain_draft=True, seed=28),
    # rejections with no residual mass (p = q / 2): the finishes race over p (q stored: finish_kernel;
    # small-batch kernel; fused step's last CTA at 16, finish_kernel at 48)
    RejectionCase(16, 7, 151936, 256, no_residual=True, seed=29),
    RejectionCase(1, 7, 151936, 256, q_stored=False, chain_draft=True, no_residual=True, seed=30),
    RejectionCase(16, 7, 151936, 256, q_stored=False, chain_draft=True, no_residual=True, seed=31),
    RejectionCase(48, 5, 151936, 256, q_stored=False, flat=True, chain_draft=True, no_residual=True, seed=32),
    # -inf in U: the stats pass of a rebuilt row (a torch-drafted lazy draft) summed exp(-inf - -inf)
    # = NaN (four masked entries, or a masked first entry), so the recovered token came from p
    RejectionCase(16, 7, 151936, 256, q_stored=False, masked=True, seed=33),
    RejectionCase(37, 3, 50001, 256, q_stored=False, greedy_every=3, masked=True, seed=34),
    RejectionCase(16, 7, 151936, 256, q_stored=False, chain_draft=True, masked=True, seed=35),
    # greedy tokens given (target_argmax, as V1 and TGI pass them), the greedy requests' rows NaN:
    # q stored; small-batch kernel; fused step; cuBLAS; flat; all greedy; the fused step finishing
    # itself (up to 16 requests); one all-greedy request (small-batch and fused cases: the racing
    # kernel runs the greedy tests itself)
    RejectionCase(16, 7, 151936, 256, greedy_every=3, argmax_given=True, seed=36),
    RejectionCase(2, 7, 151936, 256, q_stored=False, greedy_every=2, chain_draft=True, argmax_given=True, seed=37),
    RejectionCase(48, 7, 151936, 256, q_stored=False, greedy_every=4, chain_draft=True, argmax_given=True, seed=38),
    RejectionCase(130, 5, 151936, 256, q_stored=False, greedy_every=6, argmax_given=True, seed=39),
    RejectionCase(37, 3, 50257, 64, q_stored=False, greedy_every=2, flat=True, chain_draft=True, argmax_given=True,
                  seed=40),
    RejectionCase(9, 4, 32000, 32, greedy_every=1, argmax_given=True, seed=41),
    RejectionCase(12, 7, 151936, 256, q_stored=False, greedy_every=3, chain_draft=True, argmax_given=True, seed=42),
    RejectionCase(1, 7, 151936, 256, q_stored=False, greedy_every=1, chain_draft=True, argmax_given=True, seed=43),
]


@pytest.mark.parametrize("case", REJECTION_CASES, ids=lambda c: c.label())
def test_rejection_sample_matches_reference(case):
    res = compare_rejection(case)
    assert res["ok"], res
    # both outcomes exercised (a batch of a few requests may see only one)
    assert 0 < res["accepted_total"] < res["verified_total"] or case.R <= 2, res


@pytest.mark.parametrize("R,q_stored,greedy_every", [(1, False, 0), (16, False, 0), (128, False, 0), (37, False, 3),
                                                      (16, True, 0)])
def test_rejection_on_fewer_target_rows_than_gamma_plus_one_matches_the_padded_rows(R, q_stored, greedy_every):
    """TGI hands S = 1 + L rows per request when its width L < γ: the op reads rows r·S + j, j ≤ ℓ_r,
    and gives what it gives on the rows padded to γ + 1 (NaN there: never read), across the one-launch
    small and fused paths, accept_kernel's path (greedy rows) and q stored; counts as the reference's."""
    from dspark_cli.runtime import cuda_ops, rejection_sample

    draft, target, ell, greedy, seeds = rejection_inputs(RejectionCase(
        R, 7, 151936, 256, q_stored=q_stored, chain_draft=not q_stored, greedy_every=greedy_every, seed=40 + R))
    S = 3
    ell = ell.clamp(max=S - 1)
    short = target[:, :S].contiguous()
    padded = torch.cat([short, torch.full_like(target[:, S:], float("nan"))], 1)
    out = rejection_sample(short, draft, ell, greedy=greedy, seeds=seeds)
    full = rejection_sample(padded, draft, ell, greedy=greedy, seeds=seeds)
    assert torch.equal(out.output_tokens, full.output_tokens) and torch.equal(out.num_accepted, full.num_accepted)
    with cuda_ops.enabled(False):
        ref = rejection_sample(short, draft, ell, greedy=greedy, seeds=seeds)
    assert torch.equal(out.num_accepted, ref.num_accepted)
    assert ((out.output_tokens >= 0).sum(1) == out.num_accepted + 1).all()


@pytest.mark.parametrize("R,chain_counter", [(1, True), (1, False), (16, True), (16, False), (128, True)])
def test_rejection_with_chain_row_stats_captures_in_cuda_graph(R, chain_counter):
    """The whole verification in the racing kernel (no greedy request, dense rows without a
    row_start tensor; R = 1: the small-batch kernel, R = 16: the fused step's epilogue and its last
    CTA, R = 128: the fused step and finish_kernel): three replays give the eager outputs, counting
    blocks on the chain's block counter (which each call leaves zero for the next), or on one the op
    zeroes inside the graph."""
    draft, target, ell, greedy, seeds = rejection_inputs(RejectionCase(R, 7, 151936, 256, q_stored=False,
                                                                      chain_draft=True, seed=24))
    gamma = draft.tokens.shape[1]
    s = draft.source
    assert s.block_counter.dtype == torch.int32 and s.block_counter.tolist() == [0]
    args = (target.reshape(-1, target.shape[-1]), None, ell, draft.tokens, draft.q_token, None, s.U, s.anchors.long(),
            s.w1, s.w2, s.temperature.float(), greedy, seeds, s.row_stats, gamma + 1,
            s.block_counter if chain_counter else None)
    _graph_replays_match_eager(torch.ops.dspark.rejection_sample, args, replays=3)
    assert s.block_counter.tolist() == [0]


def test_rejection_sample_op_captures_in_cuda_graph_and_compiles():
    draft, target, ell, greedy, seeds = rejection_inputs(RejectionCase(16, 7, 50257, 64, q_stored=False,
                                                                      greedy_every=4, seed=9))
    R, gamma = draft.tokens.shape
    row_start = torch.arange(R, device="cuda") * (gamma + 1)
    s = draft.source
    args = (target.reshape(-1, target.shape[-1]), row_start, ell, draft.tokens, draft.q_token, None, s.U,
            s.anchors.long(), s.w1, s.w2, s.temperature.float(), greedy, seeds)
    op = torch.ops.dspark.rejection_sample
    eager = _graph_replays_match_eager(op, args)

    @torch.compile(fullgraph=True)
    def verify(*a):
        out, n = op(*a)
        return out + 0, n * 1

    out, n = verify(*args)
    assert torch.equal(out, eager[0]) and torch.equal(n, eager[1])


def test_rejection_with_chain_block_counter_under_torch_compile():
    """The op declares the block counter as written (Tensor(a!)): compiled, it runs the one-launch
    path (R = 16, no greedy request) on the chain's counter, gives the eager outputs twice, and
    leaves the counter zero."""
    draft, target, ell, greedy, seeds = rejection_inputs(RejectionCase(16, 7, 151936, 256, q_stored=False,
                                                                      chain_draft=True, seed=34))
    gamma = draft.tokens.shape[1]
    s = draft.source
    args = (target.reshape(-1, target.shape[-1]), None, ell, draft.tokens, draft.q_token, None, s.U, s.anchors.long(),
            s.w1, s.w2, s.temperature.float(), greedy, seeds, s.row_stats, gamma + 1, s.block_counter)
    op = torch.ops.dspark.rejection_sample
    eager = op(*args)

    @torch.compile(fullgraph=True)
    def verify(*a):
        out, n = op(*a)
        return out + 0, n * 1

    for _ in range(2):
        out, n = verify(*args)
        assert torch.equal(out, eager[0]) and torch.equal(n, eager[1])
    assert s.block_counter.tolist() == [0]


def test_ops_under_dynamic_torch_compile_compile_once_across_batch_sizes():
    """Scheduler, chain (confidence head, top-k/top-p, lazy q) and verification in one
    torch.compile(dynamic=True, fullgraph=True) function: the ops' Meta implementations give
    symbolic shapes, so three batch sizes share one compilation, and each call gives the eager
    outputs."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    from dspark_cli.runtime import SPSTable

    G, V, RANK, D = 7, 32000, 256, 96
    sps = SPSTable.default()
    dense, limit = sps.dense("cuda"), sps.dense_limit
    ops = torch.ops.dspark

    def step(a_stale, a_now, U, anchors, w1, w2, temperature, seeds, h, weight, bias, top_k, top_p, target):
        ell = ops.schedule_production(a_stale, a_now, dense, limit)
        tokens, q_token, _, _, row_stats, counter, z, thresholds = ops.markov_chain(
            U, anchors, w1, w2, temperature, seeds, False, h, weight, bias, top_k, top_p)
        out, n = ops.rejection_sample(target, None, ell, tokens, q_token, None, U, anchors, w1, w2, temperature, None,
                                      seeds, row_stats, G + 1, counter, thresholds)
        return ell, tokens, q_token, z, thresholds, out, n

    def inputs(R):
        case = MarkovCase(R, G, V, RANK, greedy_every=0, warps=True, seed=70 + R)
        U, anchors, w1, w2, temperature, seeds = markov_inputs(case)
        top_k, top_p = markov_warps(case)
        g = torch.Generator(device="cuda").manual_seed(R)
        h = torch.randn(R, G, D, device="cuda", generator=g).to(torch.bfloat16)
        weight = torch.randn(D + RANK, device="cuda", generator=g) / 32
        target = torch.softmax(3 * torch.randn(R * (G + 1), V, device="cuda", generator=g), -1)
        a_now = torch.cumprod(torch.rand(R, G, device="cuda", generator=g) ** 0.3, dim=1)
        return (a_now.flip(0).contiguous(), a_now, U, anchors, w1, w2, temperature, seeds, h, weight,
                torch.randn(1, device="cuda", generator=g), top_k.contiguous(), top_p.float().contiguous(), target)

    compiles = []

    def counting(gm, example_inputs):
        compiles.append(len(gm.graph.nodes))
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, dynamic=True, fullgraph=True, backend=counting)
    for R in (3, 16, 37):  # none equal to another dim of the inputs (duck sizing would tie them)
        args = inputs(R)
        eager = step(*args)
        got = compiled(*args)
        assert got[0].shape == (R,) and got[5].shape == (R, G + 1) and got[4].shape == (R, G)
        for name, a, b in zip(("ell", "tokens", "q_token", "conf_logits", "thresholds", "output_tokens",
                               "num_accepted"), got, eager):
            assert a.shape == b.shape and torch.equal(a, b), (R, name)
    assert len(compiles) == 1 and counters["stats"]["unique_graphs"] == 1, compiles


def test_schedule_production_captures_in_cuda_graph():
    """The production scheduler (runtime.schedule_production on CUDA tensors: our op, no value
    checks) syncs nothing with the host: captured in a CUDA graph, each replay on new survival
    values written in place gives what an eager call gives on them."""
    from dspark_cli.runtime import SPSTable, schedule_production
    from dspark_cli.selftest import survival_matrix

    sps = SPSTable.default()
    g = torch.Generator(device="cpu").manual_seed(77)
    R, R_stale, gamma = 96, 80, 7
    a_stale, a_now = survival_matrix(R_stale, gamma, g).cuda(), survival_matrix(R, gamma, g).cuda()
    eager = schedule_production(a_stale, a_now, sps)  # also caches sps.dense on the GPU
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        schedule_production(a_stale, a_now, sps)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.cuda.set_sync_debug_mode("error")  # a synchronizing torch call raises
        try:
            captured = schedule_production(a_stale, a_now, sps)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert captured.shape == (R,) and captured.dtype == torch.int64
    for i in range(3):
        if i:
            a_stale.copy_(survival_matrix(R_stale, gamma, g).cuda())
            a_now.copy_(survival_matrix(R, gamma, g).cuda())
            eager = schedule_production(a_stale, a_now, sps)
        captured.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager) and int(captured.sum()) > 0, i


@pytest.mark.parametrize("R,chain_draft", [(2, True), (16, True), (16, False), (48, True)])
def test_a_verify_length_beyond_gamma_is_read_as_gamma(R, chain_draft):
    """ℓ > γ is refused by the reference's host check only: the kernels read the next request's
    drafts and q and wrote its output row (ratio tests in the accept kernel, or in the racing
    kernel's verdicts at R = 2 / 16 without greedy requests). Read as γ: the outputs of ℓ = γ."""
    from dspark_cli.runtime import rejection_sample

    draft, target, ell, greedy, seeds = rejection_inputs(
        RejectionCase(R, 4, 151936, 256, q_stored=False, chain_draft=chain_draft, seed=50 + R))
    expected = rejection_sample(target, draft, torch.full_like(ell, 4), greedy=greedy, seeds=seeds)
    beyond = torch.full_like(ell, 4)
    beyond[::2] = 9
    got = rejection_sample(target, draft, beyond, greedy=greedy, seeds=seeds)
    assert torch.equal(got.output_tokens, expected.output_tokens) and torch.equal(got.num_accepted, expected.num_accepted)


def test_batches_beyond_the_grid_limit_run_the_reference():
    """R > 65535 requests put past the grid's y axis failed to launch ("invalid configuration")."""
    from dspark_cli.runtime import cuda_ops, markov_chain

    U, anchors, w1, w2, temperature, seeds = markov_inputs(MarkovCase(65536, 1, 64, 16, torch.float32, seed=51))
    assert cuda_ops.markov_chain(U, anchors, w1, w2, temperature, seeds=seeds) is NotImplemented
    draft = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=False)
    assert draft.tokens.shape == (65536, 1) and int(draft.tokens.max()) < 64


@pytest.mark.parametrize("R", [1, 16, 130])  # small-batch chain, fused step, cuBLAS path
def test_rows_without_a_winner_still_give_ids_inside_the_vocabulary(R):
    """NaN draft logits and all-NaN or all-zero target rows are bad input the GPU path does not
    check (that would be a host sync); the ids it returns must still be < V, since the chain
    gathers W1 rows with them (an id of 0x7fffffff read far outside W1)."""
    from dspark_cli.runtime import markov_chain, rejection_sample

    V = 32000  # V % 64 == 0: the fused step serves R = 16
    U, anchors, w1, w2, temperature, seeds = markov_inputs(MarkovCase(R, 3, V, 256, greedy_every=2, seed=60))
    U[0] = float("nan")
    draft = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=True)
    target = torch.softmax(torch.randn(R, 4, V, device="cuda"), -1)
    target[0] = float("nan")  # request 0 is greedy (greedy_every=2)
    if R > 1:
        target[1] = 0.0  # request 1 samples: no residual mass, no p mass
    ell = torch.full((R,), 3, dtype=torch.int64, device="cuda")
    out = rejection_sample(target, draft, ell, greedy=temperature == 0, seeds=seeds)
    torch.cuda.synchronize()
    for ids in (draft.tokens, out.output_tokens[out.output_tokens >= 0]):
        assert int(ids.min()) >= 0 and int(ids.max()) < V


def test_zero_noise_and_mostly_zero_rows_never_emit_a_zero_probability_token():
    """Engine Exp(1) noise with exact zeros on the GPU: our op takes no engine noise
    (cuda_ops.rejection_sample declines it; its own races key W_g / -logf(u) with u ≤ 1 − 2^-24, so E > 0),
    and the torch reference that runs instead raised 0/0 = NaN over a zero weight, which argmax picked.
    Then the op's seeded races over the same rows, zero on most ids. Every emitted recovered/bonus
    token has positive weight in the row it was raced over (p, or the residual max(p − q, 0))."""
    from dspark_cli.runtime import cuda_ops, rejection_sample
    from dspark_cli.runtime.rejection import _as_draft

    g = torch.Generator(device="cuda").manual_seed(70)
    R, gamma, V = 256, 3, 50000
    keep = torch.rand(R, gamma + 1, V, device="cuda", generator=g) < 0.3
    keep[..., 0] = True
    p = torch.softmax(2 * torch.randn(R, gamma + 1, V, device="cuda", generator=g), -1) * keep
    p /= p.sum(-1, keepdim=True)
    q = torch.softmax(2 * torch.randn(R, gamma, V, device="cuda", generator=g), -1)
    tokens = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(R, gamma)
    q_token = q.gather(2, tokens.unsqueeze(2)).squeeze(2)
    draft = (tokens, q_token, q)
    ell = torch.randint(0, gamma + 1, (R,), device="cuda", generator=g)
    uniforms = torch.rand(R, gamma, device="cuda", generator=g)
    exp_noise = torch.where((p == 0).any(1) | (torch.rand(R, V, device="cuda", generator=g) < 0.2), 0.0,
                            torch.empty(R, V, device="cuda").exponential_(generator=g))
    seeds = torch.arange(R, device="cuda") + 5
    assert cuda_ops.rejection_sample(p.reshape(R * (gamma + 1), V), None, ell, _as_draft(draft), seeds=seeds,
                                     exp_noise=exp_noise, row_stride=gamma + 1) is NotImplemented
    rows = torch.arange(R, device="cuda")
    for kwargs in ({"uniforms": uniforms, "exp_noise": exp_noise}, {"seeds": seeds}):
        res = rejection_sample(p, draft, ell, **kwargs)
        n = res.num_accepted
        last = res.output_tokens[rows, n]
        p_row = p[rows, n]
        residual = (p_row - q[rows, n.clamp(max=gamma - 1)]).clamp(min=0)
        assert bool((p_row.gather(1, last.unsqueeze(1)) > 0).all()), kwargs.keys()
        clear = (n < ell) & (residual.sum(1) > 1e-6)  # rejected, the residual's mass well above the floor
        assert bool((residual.gather(1, last.unsqueeze(1))[clear] > 0).all()), kwargs.keys()
        assert 0 < int(clear.sum()) < R
