"""Verification from an engine's logits without probabilities written (runtime.target_probs:
logit_rows, LogitRows; csrc/softmax_stats.cu, csrc/target_rows.cuh) on a GPU: the stats and
argmax against torch's softmax and argmax (ties across a row's slices, NaN and ±inf rows); every
racing path of the rejection op (accept_kernel + race pass, stored or rebuilt q; the small-batch
kernel; the fused step staged and unstaged; residual-free rejections; greedy tokens given) giving
from LogitRows exactly the tokens it gives from LogitRows.probs(), the same probabilities written
out; V1's layout with its spare row, eager and captured in a CUDA graph. Skipped, with the
reason, without a GPU or a build.

    PYTHONPATH=. python -m pytest -q tests/test_logit_rows_gpu.py     (after `dspark build`)"""

import math

import pytest
import torch

from dspark_cli.integrations.vllm.target_rows import target_rows
from dspark_cli.runtime import LogitRows, cuda_ops, logit_rows, markov_chain, rejection_sample_rows
from dspark_cli.selftest import RejectionCase, poison_allocator, rejection_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_extension")]


def op_rows(logits: torch.Tensor) -> tuple[LogitRows, torch.Tensor]:
    """Our op's LogitRows and argmax, the argmax into a buffer with a spare row (−7) it must not write."""
    N = logits.shape[0]
    best = torch.full((N + 1,), -7, dtype=torch.int64, device="cuda")
    with cuda_ops.enabled(True):
        rows = logit_rows(logits, best)
    assert best[N] == -7, "the spare row was written"
    return rows, best[:N]


@pytest.mark.parametrize("N,V", [(7, 151936), (896, 151936), (130, 50257), (3, 37), (1, 4099)])
def test_stats_and_argmax_match_torch(N, V):
    """N = 7: split rows and the merge kernel; 896: a block per row; odd V: scalar loads."""
    g = torch.Generator(device="cuda").manual_seed(N + V)
    logits = torch.randn(N, V, device="cuda", generator=g).mul_(4)
    rows, best = op_rows(logits)
    assert torch.equal(rows.stats[:, 0], logits.amax(-1))
    torch.testing.assert_close(rows.stats[:, 1], torch.exp(logits - logits.amax(-1, keepdim=True)).sum(-1).reciprocal(),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(rows.probs(), torch.softmax(logits, -1), rtol=1e-5, atol=1e-12)
    assert torch.equal(best, logits.argmax(-1))


@pytest.mark.parametrize("extra_rows", [0, 600])
def test_ties_take_the_first_maximum_across_splits(extra_rows):
    """Equal maxima in different slices of one row (and in one thread's group of 4): the lowest id,
    torch.argmax's answer, whatever slice finishes first; with 600 extra all-zero rows a block
    takes a whole row and writes its stats itself."""
    V = 151936
    logits = torch.zeros(4 + extra_rows, V, device="cuda")
    logits[0, [5, 90000, 151935]] = 3.0
    logits[1, [151934, 151935]] = 2.0
    logits[2, [4097, 4096]] = 1.0
    rows, best = op_rows(logits)  # row 3: all equal
    probs = rows.probs()
    assert best.tolist() == logits.argmax(-1).tolist() == [5, 151934, 4096] + [0] * (1 + extra_rows)
    torch.testing.assert_close(probs, torch.softmax(logits, -1), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("extra_rows", [0, 600])
def test_rows_without_a_distribution_are_nan_as_in_torch(extra_rows):
    """A row of −inf only, a NaN entry, one and two +inf entries, a finite row masked to one entry:
    the probabilities NaN where torch's softmax is, its values elsewhere; the argmax torch's (NaN
    first). With 600 more rows, a block a row."""
    V = 50000
    logits = torch.randn(6 + extra_rows, V, device="cuda")
    logits[0] = float("-inf")
    logits[1, 123] = float("nan")
    logits[2, 777] = float("inf")
    logits[3, [10, 40000]] = float("inf")
    logits[4] = float("-inf")
    logits[4, 31337] = 0.5
    rows, best = op_rows(logits)
    probs = rows.probs()
    torch.testing.assert_close(probs, torch.softmax(logits, -1), rtol=1e-5, atol=1e-12, equal_nan=True)
    assert probs[:4].isnan().all() and not probs[4:].isnan().any()
    assert torch.equal(best, logits.argmax(-1)) and best[1] == 123 and best[4] == 31337
    assert probs[4, 31337] == 1.0


CASES = [
    RejectionCase(16, 7, 151936, 256, greedy_every=3, seed=2),  # accept_kernel + race pass, q stored
    RejectionCase(16, 7, 151936, 256, q_stored=False, greedy_every=5, seed=3),  # rebuilt: GEMM + stats + race
    RejectionCase(1, 7, 151936, 256, q_stored=False, chain_draft=True, seed=17),  # small-batch kernel
    RejectionCase(2, 7, 151936, 256, q_stored=False, greedy_every=2, chain_draft=True, seed=18),
    RejectionCase(5, 7, 151936, 256, q_stored=False, chain_draft=True, seed=22),  # fused step, staged
    RejectionCase(48, 7, 151936, 256, q_stored=False, greedy_every=4, chain_draft=True, seed=23),  # unstaged
    RejectionCase(128, 7, 151936, 256, q_stored=False, t_one_every=3, chain_draft=True, seed=28),
    RejectionCase(16, 7, 151936, 256, no_residual=True, seed=29),  # the finishes' race over p
    RejectionCase(1, 7, 151936, 256, q_stored=False, chain_draft=True, no_residual=True, seed=30),
    RejectionCase(16, 7, 151936, 256, q_stored=False, chain_draft=True, no_residual=True, seed=31),
    RejectionCase(48, 5, 151936, 256, q_stored=False, chain_draft=True, no_residual=True, seed=32),
    RejectionCase(16, 7, 151936, 256, greedy_every=3, argmax_given=True, seed=36),
    RejectionCase(2, 7, 151936, 256, q_stored=False, greedy_every=2, chain_draft=True, argmax_given=True, seed=37),
    RejectionCase(48, 7, 151936, 256, q_stored=False, greedy_every=4, chain_draft=True, argmax_given=True, seed=38),
    RejectionCase(12, 7, 151936, 256, q_stored=False, greedy_every=3, chain_draft=True, argmax_given=True, seed=42),
    RejectionCase(37, 3, 50257, 64, q_stored=False, greedy_every=2, chain_draft=True, seed=21),  # V % 8 != 0
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label())
def test_every_racing_path_verifies_logit_rows_as_their_probabilities(case):
    """The case's target rows as logits log p + c (c a random shift per row) with stats (c, 1), so
    their probabilities are p to rounding, unnormalized where p is (the residual-free cases): the
    op from LogitRows and from LogitRows.probs() agree token for token. Greedy tokens given: the
    greedy requests' logits and stats NaN, never read."""
    draft, target, ell, greedy, seeds = rejection_inputs(case)
    R, S, V = target.shape
    flat = target.reshape(R * S, V)
    shift = 5 * torch.randn(R * S, 1, device="cuda", generator=torch.Generator(device="cuda").manual_seed(case.seed))
    logits, stats = torch.log(flat) + shift, torch.cat([shift, torch.ones_like(shift)], 1)
    argmax = None
    if case.argmax_given:
        argmax = flat.argmax(-1)
        unread = greedy.repeat_interleave(S).unsqueeze(1)
        logits, stats = logits.masked_fill(unread, float("nan")), stats.masked_fill(unread, float("nan"))
    rows = LogitRows(logits, stats)
    starts = torch.arange(R, device="cuda") * S
    with cuda_ops.enabled(True):
        poison_allocator()
        ours = rejection_sample_rows(rows, starts, ell, draft, greedy=greedy, seeds=seeds, target_argmax=argmax)
        plain = rejection_sample_rows(rows.probs(), starts, ell, draft, greedy=greedy, seeds=seeds,
                                      target_argmax=argmax)
    assert torch.equal(ours.output_tokens, plain.output_tokens) and torch.equal(ours.num_accepted, plain.num_accepted)
    verified = int(ell.sum())
    assert 0 < int(ours.num_accepted.sum()) < verified or R <= 2


def _v1_batch(R: int, seed: int):
    """V1's verify batch: γ = 7 drafts per request, all verified, every fifth request greedy."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    V, gamma, rank = 151936, 7, 256
    U = torch.randn(R, gamma, V, device="cuda", generator=g, dtype=torch.bfloat16)
    w1 = (torch.randn(V, rank, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(V, rank, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    temperature = torch.where(torch.arange(R, device="cuda") % 5 == 0, 0.0, 0.9)
    seeds = torch.randint(0, 2**62, (R,), device="cuda", generator=g)
    anchors = torch.randint(0, V, (R,), device="cuda", generator=g)
    with cuda_ops.enabled(True):
        draft = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=False)
    # the target near the drafts: their logits plus noise, so drafts are accepted and rejected
    logits = (U.float().reshape(R * gamma, V) + torch.randn(R * gamma, V, device="cuda", generator=g)).contiguous()
    starts = torch.arange(R, device="cuda") * gamma
    ell = torch.full((R,), gamma, device="cuda")
    return draft, logits, starts, ell, temperature < 1e-5, seeds


@pytest.mark.parametrize("R", [1, 16, 128])
def test_v1_target_rows_verify_as_their_probabilities_and_capture(R):
    """BlockVerify's target side (target_rows: LogitRows with V1's spare row) verified by the op,
    against LogitRows.probs() through the op and the torch reference on the LogitRows (counts),
    then captured in a CUDA graph: a replay on new logits gives the eager result on them."""
    draft, logits, starts, ell, greedy, seeds = _v1_batch(R, seed=R)

    def verify():
        target, best = target_rows(logits, any_greedy=True)
        res = rejection_sample_rows(target, starts, ell, draft, greedy=greedy, seeds=seeds, target_argmax=best)
        return target, best, res

    with cuda_ops.enabled(True):
        target, best, ours = verify()
        assert isinstance(target, LogitRows) and target.shape == (R * 7 + 1, 151936)
        plain = rejection_sample_rows(target.probs(), starts, ell, draft, greedy=greedy, seeds=seeds,
                                      target_argmax=best)
    with cuda_ops.enabled(False):  # the torch reference from the LogitRows: the rows and entries it reads
        ref = rejection_sample_rows(target, starts, ell, draft, greedy=greedy, seeds=seeds, target_argmax=best)
    assert torch.equal(ours.output_tokens, plain.output_tokens) and torch.equal(ours.num_accepted, plain.num_accepted)
    assert torch.equal(ours.num_accepted, ref.num_accepted)
    with cuda_ops.enabled(True):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _, _, captured = verify()
        logits.add_(torch.randn_like(logits))
        graph.replay()
        _, _, eager = verify()
    torch.cuda.synchronize()
    assert torch.equal(captured.output_tokens, eager.output_tokens)
    assert torch.equal(captured.num_accepted, eager.num_accepted)


@pytest.mark.parametrize("q_stored", [True, False])
def test_a_greedy_rows_nan_logit_is_its_token_as_torch_argmax_says(q_stored):
    """Greedy requests without target_argmax take the row's torch.argmax, NaN first: request 0's
    first row has one NaN logit (id 77), request 2's first row is all NaN (id 0). The op's argmax
    skipped NaN (the races' pick), so request 0 accepted drafts torch's argmax rejects."""
    draft, target, ell, greedy, seeds = rejection_inputs(
        RejectionCase(4, 3, 4096, 64, q_stored=q_stored, greedy_every=2, seed=5))
    R, S, V = target.shape
    logits = torch.log(target.reshape(R * S, V)).contiguous()
    logits[0, 77] = float("nan")
    logits[2 * S] = float("nan")
    starts = torch.arange(R, device="cuda") * S
    with cuda_ops.enabled(True):
        rows = logit_rows(logits)
        ours = rejection_sample_rows(rows, starts, ell, draft, greedy=greedy, seeds=seeds)
        from_probs = rejection_sample_rows(rows.probs(), starts, ell, draft, greedy=greedy, seeds=seeds)
    with cuda_ops.enabled(False):
        ref = rejection_sample_rows(rows, starts, ell, draft, greedy=greedy, seeds=seeds)
    assert ref.output_tokens[0, 0] == 77 and ref.output_tokens[2, 0] == 0 and ref.num_accepted[[0, 2]].sum() == 0
    assert torch.equal(ours.output_tokens[::2], ref.output_tokens[::2])
    assert torch.equal(from_probs.output_tokens[2], ref.output_tokens[2])  # all NaN: NaN probabilities too


def test_stats_at_the_largest_v_the_op_takes_and_past_it():
    """V = 2^31 − 8193 (the op's limit: its int indices stay below 2^31) on the op, and V = 2^31 − 64
    on the torch fallback (the op's slices wrapped there and read nothing)."""
    for V, on_op in ((cuda_ops.SOFTMAX_STATS_MAX_V, True), (2**31 - 64, False)):
        logits = torch.zeros(1, V, device="cuda")
        logits[0, -1] = 1.0
        rows, best = op_rows(logits)
        assert best.tolist() == [V - 1] and rows.stats[0, 0] == 1.0, (V, on_op)
        assert abs(float(rows.stats[0, 1]) * (V - 1 + math.e) / math.e - 1) < 1e-3  # 1 / (1 + (V − 1)/e)
        del logits, rows
        torch.cuda.empty_cache()


def test_stats_at_an_odd_address_are_read_as_aligned_ones():
    """A hand-made LogitRows whose stats start 4 bytes past an 8-byte boundary: the op, which reads
    each row's pair as a float2, gets an aligned copy (it refused them)."""
    draft, target, ell, greedy, seeds = rejection_inputs(RejectionCase(3, 3, 4096, 64, q_stored=True, seed=9))
    R, S, V = target.shape
    logits = torch.log(target.reshape(R * S, V)).contiguous()
    stats = logit_rows(logits).stats
    buffer = torch.empty(2 * R * S + 1, device="cuda")
    odd = buffer[1:].view(R * S, 2)
    odd.copy_(stats)
    starts = torch.arange(R, device="cuda") * S
    with cuda_ops.enabled(True):
        ours = rejection_sample_rows(LogitRows(logits, odd), starts, ell, draft, greedy=greedy, seeds=seeds)
        aligned = rejection_sample_rows(LogitRows(logits, stats), starts, ell, draft, greedy=greedy, seeds=seeds)
    assert odd.data_ptr() % 8 == 4 and torch.equal(ours.output_tokens, aligned.output_tokens)
