import math

import pytest
import torch
from scipy import stats

from dspark_cli.runtime import (
    SPSTable,
    admit_top_k,
    confidence_logits,
    confidence_probs,
    markov_chain,
    rejection_sample,
    schedule_exact,
    schedule_production,
    schedule_threshold,
    survival,
    verify_budget,
)

# R = 2 anchors, so B = 2 + admitted drafts. SMOOTH decays; JAGGED has a cliff at 5 and recovers at 6.
SMOOTH = SPSTable([2, 3, 4, 5, 6], [1.0, 0.9, 0.8, 0.5, 0.45])
JAGGED = SPSTable([2, 3, 4, 5, 6], [1.0, 0.9, 0.8, 0.5, 0.7])
A = torch.tensor([[0.9, 0.5], [0.8, 0.1]])
# Ranked: 0.9 (r0,j1), 0.8 (r1,j1), 0.5 (r0,j2), 0.1 (r1,j2)
# Θ_0..Θ_4 smooth: 2.0, 2.9·0.9=2.61, 3.7·0.8=2.96, 4.2·0.5=2.10, 4.3·0.45=1.935
# jagged: same but Θ_4 = 4.3·0.7 = 3.01 (the global maximum behind the cliff)


def test_threshold_rule_cuts_at_first_low_step_confidence():
    c = torch.tensor([[0.9, 0.4, 0.95], [0.8, 0.8, 0.8], [0.1, 0.9, 0.9]])
    assert schedule_threshold(c, 0.5).tolist() == [1, 3, 0]
    assert schedule_threshold(c, 0.0).tolist() == [3, 3, 3]


@pytest.mark.parametrize("dtype, below", [(torch.bfloat16, 0.8984375), (torch.float16, 0.89990234375),
                                           (torch.float32, 0.8999999761581421)])
def test_threshold_rule_compares_against_the_threshold_not_its_rounding_to_c_dtype(dtype, below):
    """c >= 0.9 rounded 0.9 to c's dtype: bf16(0.9) = 0.8984375, so a bf16 confidence of exactly
    that, below the threshold, verified every draft."""
    c = torch.tensor([[below, below]], dtype=dtype)
    assert float(c[0, 0]) == below < 0.9
    assert schedule_threshold(c, 0.9).tolist() == [0]
    assert schedule_threshold(c, below).tolist() == [2]


def test_algorithm1_hand_computed():
    assert schedule_exact(A, SMOOTH).tolist() == [1, 1]
    # early stop at the cliff even though verifying everything would pay off (Θ_4 = 3.01)
    assert schedule_exact(A, JAGGED).tolist() == [1, 1]
    # a flat table: every candidate with a > 0 improves Θ, zero-survival ones are never admitted
    flat = SPSTable([1, 100], [1.0, 1.0])
    a = torch.tensor([[0.9, 0.0], [0.5, 0.2]])
    assert schedule_exact(a, flat).tolist() == [1, 2]
    # a plateau (one capture size): a candidate of survival 1e-6 still strictly improves Θ = 64 + 1e-6;
    # Θ in fp32 absorbed it and stopped every request at 1
    assert schedule_exact(survival(torch.tensor([[1.0, 1e-6]] * 32)), SPSTable([1, 128], [1.0, 1.0])).tolist() == [2] * 32
    # nothing worth verifying: plain decode for everyone
    assert schedule_exact(torch.tensor([[0.05, 0.01], [0.02, 0.0]]), SMOOTH).tolist() == [0, 0]


def test_algorithm1_admits_only_on_strict_improvement_and_never_survival_zero():
    """Θ equal to the last Θ stops admission (Algorithm 1's strict improvement); so does a candidate
    of survival 0 even where a rising table would make Θ grow (a larger forward for no output)."""
    tie = SPSTable([1, 2], [1.5, 1.0])  # Θ_0 = 1 · 1.5 = Θ_1 = 1.5 · 1.0
    assert schedule_exact(torch.tensor([[0.5]]), tie).tolist() == [0]
    rising = SPSTable([1, 2, 3], [1.0, 2.0, 3.0])
    assert schedule_exact(torch.tensor([[0.5, 0.0]]), rising).tolist() == [1]


def test_production_budget_is_a_global_search_and_admission_is_top_k():
    assert int(verify_budget(A, SMOOTH, 2)) == 2
    assert int(verify_budget(A, JAGGED, 2)) == 4  # no early stop: it finds the maximum behind the cliff
    a_now = torch.tensor([[0.3, 0.2], [0.9, 0.85]])
    assert schedule_production(A, a_now, SMOOTH).tolist() == [0, 2]  # K=2, both go to request 1
    assert schedule_production(A, a_now, JAGGED).tolist() == [2, 2]
    assert admit_top_k(a_now, 3).tolist() == [1, 2]
    # the stale batch may have had a different size; K is capped by R·γ of the current batch
    assert int(verify_budget(torch.ones(5, 2), SPSTable([1, 100], [1.0, 1.0]), 2)) == 4


def test_budget_maximizes_over_the_n_the_current_batch_can_admit():
    """4 stale requests, 2 current, γ = 1: Θ_0..Θ_4 = 2.0, 2.9, 1.9, 1.905, 3.438. The argmax over
    all stale n was 4, clamped to R·γ = 2 (Θ 1.9); the best feasible n ≤ 2 is 1 (Θ 2.9)."""
    sps = SPSTable([3, 4, 5, 6], [1.0, 0.5, 0.5, 0.9])  # cliff at B = 4, recovers at B = 6
    a_stale = torch.tensor([[0.9], [0.9], [0.01], [0.01]])
    assert int(verify_budget(a_stale, sps, 2)) == 1
    assert schedule_production(a_stale, torch.tensor([[0.9], [0.8]]), sps).tolist() == [1, 0]


def test_budget_searches_every_n_the_current_batch_can_admit_past_a_smaller_stale_batch():
    """1 stale request, 3 current, γ = 2: the search covers n ≤ 3·2 = 6, the 4 candidates the stale
    batch lacks counting as survival 0. On a table whose steps/s rises with B, Θ_0..Θ_6 = 3.75,
    4.81, 5.63, 6.09, 6.56, 7.03, 7.5: K = 6 (the search stopped at a_stale's 2 candidates, K = 2)."""
    rising = SPSTable([1, 9], [1.0, 2.0])  # SPS(B) = 1 + (B − 1)/8
    a_stale = torch.tensor([[0.5, 0.25]])
    assert int(verify_budget(a_stale, rising, 3)) == 6
    assert schedule_production(a_stale, torch.full((3, 2), 0.5), rising).tolist() == [2, 2, 2]
    # a table whose steps/s never rises: the zero candidates add nothing, the earlier n keeps the tie
    assert int(verify_budget(a_stale, SPSTable([1, 9], [1.0, 1.0]), 3)) == 2


def _brute_force_lengths(a, budget):
    R, gamma = a.shape
    ranked = sorted(((-float(a[r, j]), j, r) for r in range(R) for j in range(gamma)))
    ell = [0] * R
    for _, j, r in ranked[:budget]:
        ell[r] += 1
    return ell


def test_tie_break_is_deterministic_by_position_then_request():
    a = torch.full((3, 2), 0.5)
    assert admit_top_k(a, 4).tolist() == [2, 1, 1]  # (r0,j1),(r1,j1),(r2,j1),(r0,j2)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # many ties (coarse values); results are prefix-closed and repeatable
        c = (torch.randint(1, 4, (7, 5), generator=g) / 3.0)
        a = survival(c)
        k = int(torch.randint(0, 36, (1,), generator=g))
        ell = admit_top_k(a, k)
        assert ell.tolist() == _brute_force_lengths(a, k) == admit_top_k(a.clone(), k).tolist()


@pytest.mark.parametrize("sps", [None, [1.0, 0.5], "sps.json"])
def test_a_cost_table_that_is_not_an_sps_table_is_one_clear_error(sps):
    """None was an AttributeError from inside the ranking."""
    message = rf"^sps must be an SPSTable \(SPSTable.load\(path\) or SPSTable.default\(\)\), got {type(sps).__name__}$"
    for schedule in (lambda: schedule_exact(A, sps), lambda: verify_budget(A, sps, 2),
                     lambda: schedule_production(A, A, sps)):
        with pytest.raises(ValueError, match=message):
            schedule()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        schedule_exact(torch.tensor([[0.9, float("nan")]]), SMOOTH)
    with pytest.raises(ValueError, match="NaN"):
        schedule_production(A, torch.tensor([[0.9, float("nan")], [0.1, 0.1]]), SMOOTH)
    with pytest.raises(ValueError, match="empty batch"):
        schedule_exact(torch.zeros(0, 7), SMOOTH)
    with pytest.raises(ValueError, match="must have 2 dimensions"):
        schedule_exact(torch.ones(7), SMOOTH)
    with pytest.raises(ValueError, match="must have dtype"):
        schedule_threshold(torch.ones(2, 7, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="non-increasing"):
        schedule_exact(torch.tensor([[0.5, 0.9]]), SMOOTH)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        schedule_exact(torch.tensor([[1.5, 0.9]]), SMOOTH)
    with pytest.raises(ValueError, match="block size"):
        schedule_production(torch.ones(2, 3), A, SMOOTH)
    with pytest.raises(ValueError, match="one device: a_stale on cpu, a_now on meta"):  # the CUDA op read
        schedule_production(A, A.to("meta"), SMOOTH)  # a_stale on a_now's GPU
    for count in (-3, 0, 2.5, True):  # -3 gave K = -12
        with pytest.raises(ValueError, match=r"^num_requests must be a whole number ≥ 1 \(anchors in the batch\)"):
            verify_budget(A, SMOOTH, count)
    for budget in (float("nan"), 2.7, -1):  # NaN was a RuntimeError from the int64 cast, 2.7 admitted 2
        with pytest.raises(ValueError, match="budget must be a whole number ≥ 0"):
            admit_top_k(A, budget)
    with pytest.raises(ValueError, match="budget must be one integer"):
        admit_top_k(A, torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="budget must be ≥ 0, got -1"):
        admit_top_k(A, torch.tensor(-1))
    for threshold in (float("nan"), -0.5, 1.5, "0.5", None, True, torch.tensor(0.5)):  # NaN verified nothing
        with pytest.raises(ValueError, match=r"^threshold must be a number in \[0, 1\]"):
            schedule_threshold(torch.full((2, 3), 0.5), threshold)


def test_production_validates_a_stale_before_the_cuda_op(monkeypatch):
    """validate=True checks the stale survival as it checks a_now, before dispatching: the CUDA op
    (stood in for here, accepting anything) does no value checks of its own."""
    import dspark_cli.runtime.scheduler as scheduler

    monkeypatch.setattr(scheduler, "try_cuda", lambda name, tensors, a_stale, a_now, sps: torch.zeros(2, dtype=torch.int64))
    for a_stale, message in [(torch.tensor([[0.9, float("nan")], [0.5, 0.1]]), "a_stale contains NaN"),
                             (torch.tensor([[1.5, 0.9], [0.5, 0.1]]), r"a_stale must lie in \[0, 1\]"),
                             (torch.tensor([[0.5, 0.9], [0.5, 0.1]]), "a_stale must be non-increasing")]:
        with pytest.raises(ValueError, match=message):
            schedule_production(a_stale, A, SMOOTH, validate=True)
    assert schedule_production(A, A, SMOOTH, validate=True).tolist() == [0, 0]  # the op's answer


# ---- Appendix A: why the admission of x_k must not look at x_k ------------------------------------
# Target (0.7, 0.3) over {A, B}; draft (0.5, 0.5); SPS(1..3) = 1, 0.5, 0.45; a_1 = 0.8; c_2 = 0.9
# after x_1 = A and 0 after x_1 = B. The first emitted token must be A with probability 0.7.
# On this table the causal optimum is plain decoding: Θ_0 = 1·SPS(1) = 1 beats Θ_1 = 1.8·SPS(2) = 0.9,
# so Algorithm 1 stops before x_1 on every trial. Verifying pays only once a_2 is seen (after A,
# Θ_2 = 2.52·0.45 = 1.134), and a_2 depends on x_1: that look is the retrospective search. With a
# cheaper second token (SPS(2) = 0.6: Θ_1 = 1.08 > 1) Algorithm 1 verifies x_1 on every trial and
# x_2 only after A: ℓ depends on x_1, but the admission of x_1 does not.
APPENDIX_SPS = SPSTable([1, 2, 3], [1.0, 0.5, 0.45])
CHEAPER_SECOND_TOKEN_SPS = SPSTable([1, 2, 3], [1.0, 0.6, 0.45])
TRIALS = 100_000


def _appendix_round(g):
    """Draft, confidence and target for TRIALS independent single-request rounds (R = 1 each)."""
    V, gamma = 2, 2
    w1 = torch.tensor([[1.0], [-1.0]])  # Markov embedding (r = 1) of A = 0, B = 1
    draft = markov_chain(torch.zeros(TRIALS, gamma, V), torch.zeros(TRIALS, dtype=torch.int64), w1,
                         torch.zeros(V, 1), torch.ones(TRIALS), generator=g)  # q = (0.5, 0.5)
    # z_k = h_k + 100·W1[x_{k-1}]: c_1 = σ(logit 0.8); c_2 = σ(logit 0.9) after A, σ(−197.8) = 0 after B
    h = torch.tensor([math.log(0.8 / 0.2) - 100.0, math.log(0.9 / 0.1) - 100.0]).expand(TRIALS, 1, 2).transpose(1, 2)
    z = confidence_logits(h.contiguous(), draft.prev_emb, torch.tensor([1.0, 100.0]), torch.tensor([0.0]))
    a = survival(confidence_probs(z))
    target = torch.tensor([0.7, 0.3]).expand(TRIALS, gamma + 1, V).contiguous()
    return draft, a, target


def _per_trial(schedule, *survivals):
    """Run a scheduler on every trial as its own batch of one request. The scheduler is a
    deterministic function of its inputs, so it is called once per distinct input row."""
    rows = torch.cat(survivals, dim=1)
    unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
    gamma = survivals[0].shape[1]
    per_unique = torch.stack([schedule(*(u[None, i * gamma:(i + 1) * gamma] for i in range(len(survivals))))[0]
                              for u in unique])
    return per_unique[inverse]


def _prob_first_token_is_a(scheduler_name, seed, sps=APPENDIX_SPS):
    """Emitted first tokens that are A, the verify lengths ℓ and the drafted x_1 of every trial."""
    g = torch.Generator().manual_seed(seed)
    draft, a_now, target = _appendix_round(g)
    if scheduler_name == "exact":
        ell = _per_trial(lambda a: schedule_exact(a, sps), a_now)
    elif scheduler_name == "production":
        _, a_stale, _ = _appendix_round(g)  # survival from an earlier, independent round
        ell = _per_trial(lambda s, n: schedule_production(s, n, sps), a_stale, a_now)
    else:  # retrospective: a global search on the CURRENT survival (the paper's lossy policy)
        ell = _per_trial(lambda n: schedule_production(n, n, sps), a_now)
    out = rejection_sample(target, draft, ell, generator=g)
    hits = int((out.output_tokens[:, 0] == 0).sum())
    return hits, ell, draft.tokens[:, 0]


@pytest.mark.parametrize("case", ["exact", "exact_cheaper_second_token", "production"])
def test_appendix_a_causal_schedulers_keep_p_a_at_0_7(case):
    if case == "exact_cheaper_second_token":
        hits, ell, x1 = _prob_first_token_is_a("exact", seed=21, sps=CHEAPER_SECOND_TOKEN_SPS)
        assert torch.equal(ell, torch.where(x1 == 0, 2, 1))  # x_1 always verified, x_2 after A only
    else:
        hits, ell, x1 = _prob_first_token_is_a(case, seed=21)
    if case == "exact":
        assert torch.all(ell == 0)  # the causal optimum on the paper's table (see above): plain decoding
    if case == "production":  # ℓ = 2 when the stale round's K is 2: independent of the current x_1
        assert set(ell.tolist()) == {0, 2}
        after_a, after_b = (float((ell[x1 == token] == 2).float().mean()) for token in (0, 1))
        assert abs(after_a - after_b) < 0.015
    assert stats.binomtest(hits, TRIALS, 0.7).pvalue > 0.01
    assert abs(hits / TRIALS - 0.7) < 0.005


def test_appendix_a_retrospective_search_biases_p_a_to_0_85():
    hits, ell, x1 = _prob_first_token_is_a("retrospective", seed=22)
    assert torch.equal(ell, torch.where(x1 == 0, 2, 0))  # verifies x_1 only when x_1 = A
    assert stats.binomtest(hits, TRIALS, 0.85).pvalue > 0.01
    assert abs(hits / TRIALS - 0.85) < 0.005


@pytest.mark.parametrize("num_requests", [2**20 + 1, 10**300])
def test_a_batch_larger_than_any_sps_table_is_one_clear_error(num_requests):
    """Padded to num_requests·γ candidates, 10**9 requests allocated ~28 GB and 10**300 raised a
    TypeError from inside torch."""
    from dspark_cli.runtime import verify_budget

    with pytest.raises(ValueError, match="num_requests must be at most 1048576"):
        verify_budget(torch.full((2, 7), 0.5), SPSTable.default(), num_requests)



def test_an_empty_stale_batch_adds_survival_zero():
    """No request with survival two steps old: the docs count missing stale candidates as survival 0,
    yet zero rows were refused as "an empty batch"."""
    a_now = torch.tensor([[0.9, 0.8, 0.5], [0.7, 0.3, 0.1]])
    for table in (SMOOTH, SPSTable([2, 8], [1.0, 3.0])):  # the second favours zero-survival candidates
        zeros = torch.zeros(1, 3)
        assert int(verify_budget(torch.zeros(0, 3), table, 2)) == int(verify_budget(zeros, table, 2))
        assert torch.equal(schedule_production(torch.zeros(0, 3), a_now, table),
                           schedule_production(zeros, a_now, table))
    with pytest.raises(ValueError, match="empty batch"):  # the current batch still may not be empty
        schedule_production(torch.zeros(1, 3), torch.zeros(0, 3), SMOOTH)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")
def test_the_sps_table_warmed_once_serves_every_scheduler_without_a_sync_or_a_copy_in_capture():
    """`sps.dense("cuda")` was cached under "cuda" while lookups asked for "cuda:0" (and
    schedule_exact for fp64): each scheduler call then copied the table to the GPU, a host sync, and
    CUDA-graph capture failed ("Cannot copy between CPU and CUDA tensors during CUDA graph capture")."""
    table = SPSTable.default()
    table.dense("cuda")  # the documented warm-up, before capture
    a = torch.cumprod(torch.rand(64, 7, device="cuda"), dim=1)
    torch.cuda.synchronize()
    results = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in (lambda: schedule_exact(a, table), lambda: schedule_production(a, a, table)):
            call()  # no "called a synchronizing CUDA operation"
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                eager = call()
                with torch.cuda.graph(graph, stream=stream):
                    captured = call()
            graph.replay()
            results.append((captured, eager))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.equal(captured, eager) for captured, eager in results)  # a bool on the host: a sync
