import pytest
import torch
from scipy import stats

from dspark_cli.runtime import markov_chain, rejection_sample, rejection_sample_flat, rejection_sample_rows, rng
from dspark_cli.runtime import rejection
from dspark_cli.runtime.rejection import RESIDUAL_MASS_FLOOR
from tests.chi2 import chi2_pvalue
from tests.test_runtime_rng import grouped_race_by_hand

N = 100_000


def _dist(g, *shape):
    return torch.softmax(2.0 * torch.randn(*shape, generator=g), dim=-1)


def _tuple_draft(q, g):
    """Independent per-position drafts x_j ~ q_j for N identical requests (q: [γ, V])."""
    gamma, V = q.shape
    tokens = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(gamma)], dim=1)
    q_full = q.expand(N, gamma, V)
    return tokens, q_full.gather(2, tokens.unsqueeze(2)).squeeze(2), q_full


@pytest.mark.parametrize("case", ["ell0", "partial", "full_acceptance"])
def test_first_token_and_bonus_follow_target_chi2(case):
    g = torch.Generator().manual_seed({"ell0": 1, "partial": 2, "full_acceptance": 3}[case])
    gamma, V = 3, 6
    p = _dist(g, gamma + 1, V)
    q = _dist(g, gamma, V)
    if case == "full_acceptance":
        q = p[:gamma].clone()
    ell = {"ell0": 0, "partial": 2, "full_acceptance": 3}[case]
    draft = _tuple_draft(q, g)
    res = rejection_sample(p.expand(N, gamma + 1, V).contiguous(), draft, torch.full((N,), ell),
                           seeds=torch.arange(N) + 1000 * ell)
    assert torch.all(res.num_accepted <= ell)
    assert chi2_pvalue(res.output_tokens[:, 0], p[0]) > 0.01
    if case == "ell0":
        assert torch.all(res.num_accepted == 0) and torch.all(res.output_tokens[:, 1:] == -1)
    if case == "partial":  # x_1 is rejected with probability Σ max(q_1 − p_0, 0), the residual's mass
        rejected = int((res.num_accepted == 0).sum())
        assert stats.binomtest(rejected, N, float(torch.clamp(q[0] - p[0], min=0).sum())).pvalue > 0.01
    if case == "full_acceptance":
        assert torch.all(res.num_accepted == ell)
        assert chi2_pvalue(res.output_tokens[:, ell], p[ell]) > 0.01  # the bonus token


def test_near_zero_residual_falls_back_to_target_chi2():
    """At a rejection whose residual max(p − q, 0) has mass ≤ RESIDUAL_MASS_FLOOR the next token
    comes from p. With U(0,1) uniforms that case is (almost) never reached: for normalized p and q,
    P(reject) = Σ max(q − p, 0) = Σ max(p − q, 0), the residual's own mass, so a ≤ 1e-8 residual
    means ≤ 1e-8 rejections. Engine-drawn uniforms pinned just below 1 reject every draft with
    q(x) > p(x), however slightly: here q(x_1) exceeds p(x_1) by a few fp32 ulps, the residual mass
    is that excess, and every request must fall back to p (the residual itself is all on token 1,
    which p draws only 1 % of the time)."""
    V = 6
    p = torch.tensor([[0.01, 0.01, 0.2, 0.3, 0.28, 0.2], [1 / 6] * 6])  # row 1 would give the bonus
    q = p[:1].clone()
    q[0, 0] += 5e-9  # the drafted token
    q[0, 1] -= 5e-9
    residual_mass = float(torch.clamp(p[0] - q[0], min=0).sum())
    assert 0 < residual_mass <= RESIDUAL_MASS_FLOOR
    tokens = torch.zeros(N, 1, dtype=torch.int64)
    uniforms = torch.full((N, 1), float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))))
    res = rejection_sample(p.expand(N, 2, V).contiguous(), (tokens, q[0, 0].expand(N, 1), q.expand(N, 1, V)),
                           torch.ones(N, dtype=torch.int64), uniforms=uniforms, seeds=torch.arange(N) + 4000)
    assert int((res.num_accepted == 0).sum()) == N  # every draft rejected, every residual below the floor
    assert chi2_pvalue(res.output_tokens[:, 0], p[0]) > 0.01


@pytest.mark.parametrize("ell", [0, 1, 2])
def test_two_token_sequences_follow_target_with_markov_drafts_chi2(ell):
    """End to end over rounds: Markov-chain drafts (q_2 depends on x_1), a prefix-dependent target,
    verify ℓ drafts; the first two emitted tokens must be distributed as p(y1)·p(y2 | y1)."""
    g = torch.Generator().manual_seed(10 + ell)
    V, gamma, r = 4, 2, 3
    p0, p1, p2 = _dist(g, V), _dist(g, V, V), _dist(g, V, V, V)
    U1, U2 = torch.randn(gamma, V, generator=g), torch.randn(gamma, V, generator=g)
    w1, w2 = torch.randn(V, r, generator=g), 2 * torch.randn(V, r, generator=g)
    ones = torch.ones(N)

    d1 = markov_chain(U1.expand(N, gamma, V), torch.zeros(N, dtype=torch.int64), w1, w2, ones, generator=g)
    x1, x2 = d1.tokens[:, 0], d1.tokens[:, 1]
    target1 = torch.stack([p0.expand(N, V), p1[x1], p2[x1, x2]], dim=1)
    r1 = rejection_sample(target1, d1, torch.full((N,), ell), generator=g)
    y1, y2 = r1.output_tokens[:, 0], r1.output_tokens[:, 1].clone()

    need = (r1.num_accepted == 0).nonzero().squeeze(1)  # only y1 emitted: run a second round
    M = need.numel()
    assert torch.equal(r1.output_tokens[need, 1], torch.full((M,), -1))  # round 1 gave them no y2
    # ℓ = 0 is a plain decode step for everyone; with ℓ ≥ 1 both paths to y2 occur (from round 1
    # after an acceptance, from round 2 after a rejection), so the χ² below covers both
    assert M == N if ell == 0 else 0 < M < N
    d2 = markov_chain(U2.expand(M, gamma, V), y1[need], w1, w2, ones[:M], generator=g)
    target2 = torch.stack([p1[y1[need]], p2[y1[need], d2.tokens[:, 0]], _dist(g, V).expand(M, V)], dim=1)
    r2 = rejection_sample(target2, d2, torch.full((M,), ell), generator=g)
    y2[need] = r2.output_tokens[:, 0]
    assert bool((y2 >= 0).all())
    joint = (p0.unsqueeze(1) * p1).flatten()
    assert chi2_pvalue(y1 * V + y2, joint) > 0.01


def test_residual_floor_falls_back_to_target_and_residual_is_used_above_it():
    p = torch.tensor([[1e-3, 1e-3, 0.998], [1 / 3, 1 / 3, 1 / 3]])
    tokens = torch.tensor([[0]])
    u = torch.tensor([[0.9999999]])  # forces rejection whenever p(x) < q(x) at all
    # residual mass 5e-9 ≤ 1e-8 (all on token 1): the next token comes from p instead, and this
    # noise makes p pick token 2
    q_tiny = torch.tensor([[[1e-3 + 5e-9, 1e-3 - 5e-9, 0.998]]])
    noise = torch.tensor([[1.0, 1.0, 0.9]])
    res = rejection_sample(p.unsqueeze(0), (tokens, q_tiny[:, :, 0], q_tiny), torch.tensor([1]),
                           uniforms=u, exp_noise=noise)
    assert res.num_accepted.tolist() == [0]
    assert res.output_tokens.tolist() == [[2, -1]]
    # residual mass 0.049: the next token is where p exceeds q (token 2), whatever the noise says
    q_big = torch.tensor([[[0.05, 1e-3, 0.949]]])
    res = rejection_sample(p.unsqueeze(0), (tokens, q_big[:, :, 0], q_big), torch.tensor([1]),
                           uniforms=u, exp_noise=torch.tensor([[1e-6, 5.0, 1.0]]))  # p would give token 0
    assert res.output_tokens.tolist() == [[2, -1]]


def test_seeded_residual_and_bonus_are_the_grouped_race():
    """With seeds the recovered/bonus token is the grouped race (stream 2, position 0) on the
    residual row, or on p when all ℓ_r were accepted or the residual mass is below the floor."""
    g = torch.Generator().manual_seed(7)
    R, gamma, V = 48, 3, 37  # a partial last group
    target = _dist(g, R, gamma + 1, V)
    q = _dist(g, R, gamma, V)
    q[:4] = target[:4, :gamma]  # p = q: every draft accepted, the bonus comes from p_ℓ
    tokens = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(R, gamma)
    ell = torch.randint(0, gamma + 1, (R,), generator=g)
    seeds = torch.arange(R) * 7919 - 5
    res = rejection_sample(target, (tokens, q.gather(2, tokens.unsqueeze(2)).squeeze(2), q), ell, seeds=seeds)
    for r in range(R):
        n = int(res.num_accepted[r])
        weights = target[r, n]
        if n < int(ell[r]):
            residual = torch.clamp(target[r, n] - q[r, n], min=0.0)
            weights = residual if float(residual.sum()) > 1e-8 else weights
        assert int(res.output_tokens[r, n]) == grouped_race_by_hand(weights, int(seeds[r]), rng.STREAM_RECOVER, 0)


def _naive_greedy(target, tokens, ell):
    out = []
    for r in range(tokens.shape[0]):
        emitted = []
        for j in range(int(ell[r])):
            best = int(target[r, j].argmax())
            if int(tokens[r, j]) != best:
                break
            emitted.append(best)
        emitted.append(int(target[r, len(emitted)].argmax()))
        out.append(emitted)
    return out


def test_greedy_is_exact_argmax_match():
    g = torch.Generator().manual_seed(5)
    R, gamma, V = 64, 4, 5
    target = _dist(g, R, gamma + 1, V)
    tokens = target[:, :gamma].argmax(-1)
    flip = torch.rand(R, gamma, generator=g) < 0.3  # some drafts disagree with the target
    tokens = torch.where(flip, (tokens + 1) % V, tokens)
    q = _dist(g, R, gamma, V)
    ell = torch.randint(0, gamma + 1, (R,), generator=g)
    res = rejection_sample(target, (tokens, q.gather(2, tokens.unsqueeze(2)).squeeze(2), q), ell,
                           greedy=torch.ones(R, dtype=torch.bool), seeds=torch.arange(R))
    expected = _naive_greedy(target, tokens, ell)
    for r in range(R):
        n = int(res.num_accepted[r])
        assert res.output_tokens[r, : n + 1].tolist() == expected[r]
        assert torch.all(res.output_tokens[r, n + 1 :] == -1)


def test_flat_layout_matches_padded_and_lazy_q_matches_stored():
    g = torch.Generator().manual_seed(6)
    R, gamma, V, r = 6, 3, 20, 4
    U = torch.randn(R, gamma, V, generator=g)
    w1, w2 = torch.randn(V, r, generator=g), torch.randn(V, r, generator=g)
    T = torch.tensor([1.0, 0.5, 0.0, 1.0, 2.0, 1.0])
    anchors = torch.randint(0, V, (R,), generator=g)
    stored = markov_chain(U, anchors, w1, w2, T, seeds=torch.arange(R))
    lazy = markov_chain(U, anchors, w1, w2, T, seeds=torch.arange(R), return_q=False)
    target = _dist(g, R, gamma + 1, V)
    ell = torch.tensor([0, 1, 3, 2, 3, 1])
    greedy = T < 1e-5
    padded = rejection_sample(target, stored, ell, greedy=greedy, seeds=torch.arange(R) + 50)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(ell + 1, 0)])
    flat_rows = torch.cat([target[i, : int(ell[i]) + 1] for i in range(R)])
    flat = rejection_sample_flat(flat_rows, cu, lazy, greedy=greedy, seeds=torch.arange(R) + 50)
    assert torch.equal(padded.output_tokens, flat.output_tokens)
    assert torch.equal(padded.num_accepted, flat.num_accepted)


def test_rows_named_per_request_match_the_flat_layout_and_may_overlap():
    """rejection_sample_rows on the flat layout's own rows gives the flat entry's tokens; on vLLM
    V1's layout (no bonus rows: each request's bonus row is the next request's first row, the last
    one's a spare row) the accepted drafts and recovered tokens of rejected requests are the same."""
    g = torch.Generator().manual_seed(7)
    R, gamma, V, r = 6, 3, 20, 4
    U = torch.randn(R, gamma, V, generator=g)
    w1, w2 = torch.randn(V, r, generator=g), torch.randn(V, r, generator=g)
    T = torch.tensor([1.0, 0.5, 0.0, 1.0, 2.0, 1.0])
    lazy = markov_chain(U, torch.randint(0, V, (R,), generator=g), w1, w2, T, seeds=torch.arange(R),
                        return_q=False)
    ell = torch.tensor([0, 1, 3, 2, 3, 1])
    rows = [_dist(g, int(n) + 1, V) for n in ell]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(ell + 1, 0)])
    noise = {"greedy": T < 1e-5, "seeds": torch.arange(R) + 50}
    flat = rejection_sample_flat(torch.cat(rows), cu, lazy, **noise)
    named = rejection_sample_rows(torch.cat(rows), cu[:-1], ell, lazy, **noise)
    assert torch.equal(flat.output_tokens, named.output_tokens) and torch.equal(flat.num_accepted, named.num_accepted)

    v1 = torch.cat([*(x[:-1] for x in rows), torch.full((1, V), 1.0 / V)])  # drafts' rows, one spare row
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(ell, 0)[:-1]])
    overlapped = rejection_sample_rows(v1, starts, ell, lazy, **noise)
    assert torch.equal(overlapped.num_accepted, flat.num_accepted)
    for i in range(R):
        n = int(flat.num_accepted[i])
        last = n if n < int(ell[i]) else n - 1  # a full acceptance's bonus came from another row
        assert overlapped.output_tokens[i, :last + 1].tolist() == flat.output_tokens[i, :last + 1].tolist()


def test_rows_named_past_target_probs_are_refused():
    draft = (torch.tensor([[1, 2]]), torch.full((1, 2), 0.5), torch.full((1, 2, 4), 0.25))
    with pytest.raises(ValueError, match="rows row_start .. row_start \\+ ell must lie in the 2 rows"):
        rejection_sample_rows(torch.full((2, 4), 0.25), torch.tensor([0]), torch.tensor([2]), draft,
                              seeds=torch.tensor([1]))


def test_a_cpu_step_that_reads_no_q_row_rebuilds_none(monkeypatch):
    """Rebuilding a lazy draft's q rows is a rank-r GEMM over V per request: an all-greedy step, or
    one where every sampled request accepts all it verifies, reads none, so on the CPU (where
    knowing that costs no sync) none is rebuilt; the tokens are those of the stored-q draft."""
    from dspark_cli.runtime import markov
    g = torch.Generator().manual_seed(8)
    R, gamma, V, r = 4, 3, 20, 4
    U = torch.randn(R, gamma, V, generator=g)
    w1, w2 = torch.randn(V, r, generator=g), torch.randn(V, r, generator=g)
    anchors = torch.randint(0, V, (R,), generator=g)
    T = torch.tensor([0.0, 1.0, 0.0, 1.0])
    stored = markov_chain(U, anchors, w1, w2, T, seeds=torch.arange(R))
    lazy = markov_chain(U, anchors, w1, w2, T, seeds=torch.arange(R), return_q=False)
    target = _dist(g, R, gamma + 1, V)
    for j in range(gamma):  # the sampled requests' drafts are certain under the target: all accepted
        target[1::2, j] = torch.nn.functional.one_hot(stored.tokens[1::2, j], V).float()
    ell, greedy = torch.tensor([3, 3, 0, 2]), T < 1e-5
    expected = rejection_sample(target, stored, ell, greedy=greedy, seeds=torch.arange(R) + 9)
    monkeypatch.setattr(markov, "residual_row", lambda *a, **k: pytest.fail("a q row was rebuilt"))
    got = rejection_sample(target, lazy, ell, greedy=greedy, seeds=torch.arange(R) + 9)
    assert torch.equal(got.output_tokens, expected.output_tokens) and got.num_accepted.tolist() == [
        int(expected.num_accepted[0]), 3, 0, 2]


def test_fewer_target_rows_than_gamma_plus_one_verify_as_the_padded_batch():
    """An engine that verified S − 1 < γ drafts per request hands its S rows as they are (TGI's
    layout at a width the scheduler narrowed): the same tokens as those rows padded to γ + 1."""
    g = torch.Generator().manual_seed(9)
    R, gamma, V, r, S = 7, 4, 24, 4, 3
    U = torch.randn(R, gamma, V, generator=g)
    w1, w2 = torch.randn(V, r, generator=g), torch.randn(V, r, generator=g)
    T = torch.tensor([1.0, 0.7, 0.0, 1.0, 1.5, 1.0, 0.0])
    anchors = torch.randint(0, V, (R,), generator=g)
    target = _dist(g, R, S, V)
    padded_target = torch.cat([target, _dist(g, R, gamma + 1 - S, V)], 1)
    ell = torch.tensor([0, 1, 2, 2, 1, 2, 2])
    for return_q in (True, False):
        draft = markov_chain(U, anchors, w1, w2, T, seeds=torch.arange(R), return_q=return_q)
        short = rejection_sample(target, draft, ell, greedy=T < 1e-5, seeds=torch.arange(R) + 9)
        full = rejection_sample(padded_target, draft, ell, greedy=T < 1e-5, seeds=torch.arange(R) + 9)
        assert torch.equal(short.output_tokens, full.output_tokens)
        assert torch.equal(short.num_accepted, full.num_accepted)
        assert (short.num_accepted < ell).any() and (short.num_accepted == ell).any()


def test_bad_inputs_raise_clear_errors():
    g = torch.Generator().manual_seed(0)
    p = _dist(g, 2, 4, 5)
    q = _dist(g, 2, 3, 5)
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    draft = (tokens, q[:, :, 0], q)
    with pytest.raises(ValueError, match=r"verify lengths must lie in \[0, γ=3\]"):
        rejection_sample(p, draft, torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="target_probs must have dtype float32"):
        rejection_sample(p.bfloat16(), draft, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="expected 1 to γ \\+ 1 = 4 target rows"):
        rejection_sample(torch.cat([p, p[:, :1]], 1), draft, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="below the 3 target rows per request"):
        rejection_sample(p[:, :3], draft, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="empty batch"):
        rejection_sample(p[:0], (tokens[:0], q[:0, :, 0], q[:0]), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="draft shapes disagree"):
        rejection_sample(p, (tokens[:, :2], q[:, :, 0], q), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="one verify length per request"):
        rejection_sample(p, draft, torch.tensor([1]))


@pytest.mark.parametrize("row, message", [
    (torch.zeros(5), "all-zero row among the verified rows"),
    (-torch.full((5,), 0.2), "target_probs must be ≥ 0"),
    (torch.tensor([0.5, float("nan"), 0.5, 0.0, 0.0]), "target_probs contains NaN or infinite values"),
    (torch.tensor([0.5, float("inf"), 0.5, 0.0, 0.0]), "target_probs contains NaN or infinite values"),
    (torch.tensor([0.3, 0.2, 0.1, 0.0, 0.0]), "rows must sum to 1 .* sums to 0.6"),  # masked, not renormalized
], ids=["all-zero", "negative", "nan", "inf", "unnormalized"])
def test_bad_target_rows_raise_instead_of_drawing_garbage(row, message):
    """For V = 5 such a row drew token 7 (≥ V) or 0. Only rows the verify reads are checked: request
    0 verifies 1 draft (rows 0, 1), so its rows 2, 3 may hold anything; request 1's row 0 is bad."""
    g = torch.Generator().manual_seed(5)
    p, q = _dist(g, 2, 4, 5), _dist(g, 2, 3, 5)
    draft = (torch.zeros(2, 3, dtype=torch.int64), q[:, :, 0], q)
    p[0, 2:] = torch.tensor([float("nan"), -1.0, 0.0, 0.0, 0.0])  # unread padding
    assert rejection_sample(p, draft, torch.tensor([1, 0]), seeds=torch.arange(2)).output_tokens.max() < 5
    p[1, 0] = row
    for ell in (torch.tensor([1, 0]), torch.tensor([0, 3])):
        with pytest.raises(ValueError, match=message):
            rejection_sample(p, draft, ell, seeds=torch.arange(2))
    flat = torch.cat([p[0, :2], p[1, :1]])
    with pytest.raises(ValueError, match=message):
        rejection_sample_flat(flat, torch.tensor([0, 2, 3]), draft, seeds=torch.arange(2))


@pytest.mark.parametrize("field, value, message", [
    ("uniforms", -1.0, "uniforms must lie in"), ("uniforms", float("nan"), "uniforms contains NaN"),
    ("exp_noise", -1.0, "exp_noise must be ≥ 0"), ("exp_noise", float("nan"), "exp_noise contains NaN"),
    ("q_token", -1.0, "draft q_token must lie in"), ("q", -1.0, "draft q must be ≥ 0"),
    ("uniforms", 1.5, r"uniforms must lie in \[0, 1\], got values in \[1.5, 1.5\]"),
    ("uniforms", float("inf"), "uniforms contains NaN or infinite values"),
    ("exp_noise", float("inf"), "exp_noise contains NaN or infinite values"),
    ("q", float("nan"), r"draft q contains NaN or infinite values \(nan at index \[0, 0, 0\]\)"),
    ("q", float("inf"), "draft q contains NaN or infinite values"),
    ("q", -float("inf"), "draft q contains NaN or infinite values"),
])
def test_engine_noise_and_draft_values_are_checked(field, value, message):
    """A uniform of −1 (or a q_token of −1) accepted a draft the target gives probability 0; NaN
    exp_noise always drew token 0. Integer noise is refused too."""
    p = torch.zeros(1, 2, 3)
    p[0, :, 0] = 1.0
    q = torch.full((1, 1, 3), 1 / 3)
    draft = {"tokens": torch.ones(1, 1, dtype=torch.int64), "q_token": q[:, :, 1].clone(), "q": q.clone()}
    noise = {"uniforms": torch.full((1, 1), 0.5), "exp_noise": torch.ones(1, 3)}
    target = draft if field in draft else noise
    target[field] = torch.full_like(target[field], value)
    with pytest.raises(ValueError, match=message):
        rejection_sample(p, (draft["tokens"], draft["q_token"], draft["q"]), torch.tensor([1]), **noise)
    with pytest.raises(ValueError, match="uniforms must be a floating-point tensor"):
        rejection_sample(p, (draft["tokens"], q[:, :, 1], q), torch.tensor([1]),
                         uniforms=torch.zeros(1, 1, dtype=torch.int64), exp_noise=torch.ones(1, 3))


def test_a_q_token_that_is_not_q_at_the_token_is_refused():
    """q_token (the ratio test) and q (the residual) of different distributions, e.g. q_token of
    the unwarped row: accepted silently and sampled lossy. Only verified positions of sampled
    requests are compared (greedy ones read neither); fp32 rounding of an engine's own gather passes."""
    g = torch.Generator().manual_seed(4)
    p, q = _dist(g, 2, 4, 5), _dist(g, 2, 3, 5)
    tokens = torch.tensor([[1, 2, 3], [4, 0, 2]])
    q_token = q.gather(2, tokens.unsqueeze(2)).squeeze(2)
    shifted = q_token.clone()
    shifted[1, 1] *= 0.5
    with pytest.raises(ValueError, match=r"^draft q_token must be q at the drafted token: request 1, draft 1"):
        rejection_sample(p, (tokens, shifted, q), torch.tensor([1, 2]), seeds=torch.arange(2))
    rejection_sample(p, (tokens, shifted, q), torch.tensor([3, 1]), seeds=torch.arange(2))  # draft 1 of request 1 unread
    rejection_sample(p, (tokens, q_token * (1 + 1e-6), q), torch.tensor([3, 3]), seeds=torch.arange(2))
    rejection_sample(p, (tokens, shifted, q), torch.tensor([1, 2]), greedy=torch.tensor([False, True]))


def test_q_rows_that_do_not_sum_to_one_are_refused_where_the_verify_reads_them():
    """A q masked by top-k/top-p and not renormalized passed (q ≥ 0, q_token = q at the token) while
    the ratio test and the residual read it as a distribution: lossy, silently. As for q_token,
    only verified positions of sampled requests are checked."""
    g = torch.Generator().manual_seed(6)
    p, q = _dist(g, 2, 4, 5), _dist(g, 2, 3, 5)
    tokens = torch.tensor([[1, 2, 3], [4, 0, 2]])
    q[1, 1] *= 0.5  # request 1's second draft: a masked row left unnormalized
    q_token = q.gather(2, tokens.unsqueeze(2)).squeeze(2)
    with pytest.raises(ValueError, match=r"^draft q rows must sum to 1 \(within 0.001\); request 1, draft 1 sums to 0.5$"):
        rejection_sample(p, (tokens, q_token, q), torch.tensor([1, 2]), seeds=torch.arange(2))
    rejection_sample(p, (tokens, q_token, q), torch.tensor([3, 1]), seeds=torch.arange(2))  # unread
    rejection_sample(p, (tokens, q_token, q), torch.tensor([1, 2]), greedy=torch.tensor([False, True]))


def test_a_draft_without_q_or_its_source_is_refused_before_any_work():
    """A hand-built MarkovDraft with neither: the comment promised an error only when a sampled
    request is rejected, but the reference asked for q rows every time; now one error, up front,
    on every path."""
    from dspark_cli.runtime import MarkovDraft
    g = torch.Generator().manual_seed(7)
    p = _dist(g, 2, 4, 5)
    bare = MarkovDraft(torch.zeros(2, 3, dtype=torch.int64), torch.full((2, 3), 0.2), None, None)
    for ell in (torch.tensor([0, 0]), torch.tensor([3, 1])):
        with pytest.raises(ValueError, match=r"^the draft has neither q nor the inputs to rebuild its rows"):
            rejection_sample(p, bare, ell, seeds=torch.arange(2))


def test_draft_tensors_on_another_device_are_one_clear_error():
    """The meta device stands in for a second device: was a RuntimeError from inside torch."""
    g = torch.Generator().manual_seed(4)
    p, q = _dist(g, 2, 4, 5), _dist(g, 2, 3, 5)
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    for field, draft in (("q_token", (tokens, q[:, :, 0].to("meta"), q)), ("q", (tokens, q[:, :, 0], q.to("meta")))):
        with pytest.raises(ValueError, match=f"^all inputs must be on one device: .*{field} on meta"):
            rejection_sample(p, draft, torch.tensor([1, 2]), seeds=torch.arange(2))
        with pytest.raises(ValueError, match=f"^all inputs must be on one device: .*{field} on meta"):
            rejection_sample_flat(torch.cat([p[0, :2], p[1, :3]]), torch.tensor([0, 2, 5]), draft)


@pytest.mark.parametrize("cu", [[1, 3, 5], [0, 3, 3], [0, 4, 3], [0, 2, 4], [0, 3, 6]],
                         ids=["first-not-0", "empty-request", "decreasing", "short-last", "long-last"])
def test_bad_cu_num_tokens_is_one_error_naming_it(cu):
    """A first offset of 1 or a last offset short of the rows skipped target rows silently; the
    others were errors about the verify lengths or target_probs, not the offsets."""
    g = torch.Generator().manual_seed(4)
    p, q = _dist(g, 2, 4, 5), _dist(g, 2, 3, 5)
    draft = (torch.zeros(2, 3, dtype=torch.int64), q[:, :, 0], q)
    flat = torch.cat([p[0, :3], p[1, :2]])
    rejection_sample_flat(flat, torch.tensor([0, 3, 5]), draft, seeds=torch.arange(2))
    with pytest.raises(ValueError, match=r"^cu_num_tokens must start at 0, grow by at least 1 per request and end "
                                         r"at the 5 rows of target_probs, got \[" + ", ".join(map(str, cu))):
        rejection_sample_flat(flat, torch.tensor(cu), draft, seeds=torch.arange(2))


def test_mismatched_drafts_and_token_ids_raise_clear_errors():
    g = torch.Generator().manual_seed(8)
    R, gamma, V, r = 2, 3, 10, 4
    U = torch.randn(R, gamma, V, generator=g)
    w1, w2 = torch.randn(V, r, generator=g), torch.randn(V, r, generator=g)
    stored = markov_chain(U, torch.tensor([1, 2]), w1, w2, torch.ones(R), generator=g)
    lazy = markov_chain(U, torch.tensor([1, 2]), w1, w2, torch.ones(R), generator=g, return_q=False)
    p = _dist(g, 3, gamma + 1, V)
    for requests in (3, 1):  # more and fewer target rows than drafts
        with pytest.raises(ValueError, match="one draft per request of target_probs"):
            rejection_sample(p[:requests], stored, torch.ones(requests, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"draft source U has shape \(2, 3, 10\): dimension 2 must be 12"):
        rejection_sample(_dist(g, R, gamma + 1, V + 2), lazy, torch.ones(R, dtype=torch.int64))
    with pytest.raises(ValueError, match="draft source U"):
        rejection_sample_flat(_dist(g, 4, V + 1), torch.tensor([0, 2, 4]), lazy)
    far = stored.tokens.clone()
    far[1, 2] = V + 5
    with pytest.raises(ValueError, match=r"draft tokens must be token ids in \[0, V=10\)"):
        rejection_sample(p[:R], (far, stored.q_token, stored.q), torch.ones(R, dtype=torch.int64))
    lazy.source.anchors = torch.tensor([-1, 2])  # would silently gather W1[V - 1]
    with pytest.raises(ValueError, match=r"draft anchors must be token ids in \[0, V=10\), got values in \[-1, 2\]"):
        rejection_sample(p[:R], lazy, torch.zeros(R, dtype=torch.int64))



def test_gathered_drafts_verify_each_request_as_its_own_draft_does(monkeypatch):
    """A verify batch made of rows of drafts from different steps (lazy with and without top-k,
    stored, a row named twice, a gathered draft gathered again): each request's tokens are those
    its own draft, verified in its own batch, gives it (seeded noise is per request); one draft
    taken whole comes back as it is; all-stored parts become one stored draft."""
    from dspark_cli.runtime import gather_drafts

    g = torch.Generator().manual_seed(11)
    gamma, V, r = 3, 30, 4
    w1, w2 = torch.randn(V, r, generator=g), torch.randn(V, r, generator=g)

    def draft(R, seed, return_q, top_k=None, w=(w1, w2)):
        U = torch.randn(R, gamma, V, generator=g)
        T = torch.tensor([1.0, 0.0, 0.8, 1.3][:R])
        return markov_chain(U, torch.randint(0, V, (R,), generator=g), *w, T, seeds=torch.arange(R) + seed,
                            return_q=return_q, top_k=top_k)

    a, b = draft(3, 0, False), draft(2, 10, False, top_k=torch.tensor([5, 0]))
    stored = draft(2, 20, True)
    other_weights = draft(2, 30, False, w=(torch.randn(V, r, generator=g), torch.randn(V, r, generator=g)))
    order = [(b, 1), (a, 2), (a, 0), (b, 0), (stored, 1), (other_weights, 0), (a, 2)]
    batch = gather_drafts([(b, [1]), (a, [2, 0]), (b, [0]), (stored, [1]), (other_weights, [0]), (a, [2])])
    assert batch.q is None and batch.source is None
    assert torch.equal(batch.tokens, torch.stack([d.tokens[row] for d, row in order]))
    assert gather_drafts([(a, [0, 1, 2])]) is a
    with pytest.raises(ValueError, match="^a gathered draft's q rows are rebuilt part by part by rejection_sample$"):
        batch.q_rows(torch.zeros(len(order), dtype=torch.int64))
    R = len(order)
    q = torch.stack([torch.stack([d.q_rows(torch.full((d.tokens.shape[0],), k))[row] for k in range(gamma)])
                     for d, row in order])
    target = _dist(g, R, gamma + 1, V)
    target[:, :gamma] = 0.7 * q + 0.3 * target[:, :gamma]  # near q: acceptances and rejections
    ell = torch.tensor([3, 2, 3, 1, 2, 3, 0])
    seeds = torch.arange(R) * 7 + 1
    greedy = torch.stack([d.source.temperature[row] < 1e-5 if d.source else torch.tensor(False) for d, row in order])
    res = rejection_sample(target, batch, ell, greedy=greedy, seeds=seeds)
    for i, (d, row) in enumerate(order):
        n = d.tokens.shape[0]
        # row `row` verified in its own draft's batch, the other rows verifying nothing
        t = target[i:i + 1].expand(n, -1, -1).contiguous()
        one = rejection_sample(t, d, torch.zeros(n, dtype=torch.int64).index_fill_(0, torch.tensor([row]), int(ell[i])),
                               greedy=torch.zeros(n, dtype=torch.bool).index_fill_(0, torch.tensor([row]), bool(greedy[i])),
                               seeds=torch.zeros(n, dtype=torch.int64).index_fill_(0, torch.tensor([row]), int(seeds[i])))
        assert torch.equal(one.output_tokens[row], res.output_tokens[i]), i
    assert 0 < int(res.num_accepted.sum()) < int(ell.sum())
    # the gathered batch, then one verification call per draft wherever its rows sit in the batch,
    # a second for a's row 2 named twice
    drafts_verified = []
    real_verify = rejection._verify

    def counting(target, row_start, ell, draft, *args, **kwargs):
        drafts_verified.append(id(draft))
        return real_verify(target, row_start, ell, draft, *args, **kwargs)

    monkeypatch.setattr(rejection, "_verify", counting)
    again_res = rejection_sample(target, batch, ell, greedy=greedy, seeds=seeds)
    monkeypatch.undo()
    assert drafts_verified == [id(batch), id(b), id(a), id(a), id(stored), id(other_weights)]
    assert torch.equal(again_res.output_tokens, res.output_tokens)
    twice = gather_drafts([(b, [1]), (b, [1])])  # one row named twice: verified in two calls
    assert twice.parts == [(b, [1, 1])]
    both = rejection_sample(target[:2], twice, ell[:2], greedy=greedy[[0, 0]], seeds=seeds[:2])
    assert torch.equal(both.output_tokens[0], res.output_tokens[0])
    assert torch.equal(both.output_tokens[1], rejection_sample(target[1:2], gather_drafts([(b, [1])]), ell[1:2],
                                                               greedy=greedy[:1], seeds=seeds[1:2]).output_tokens[0])
    again = gather_drafts([(batch, [3, 0]), (a, [1])])  # rows of a gathered draft name their own drafts
    assert [(id(d), rows) for d, rows in again.parts] == [(id(b), [0, 1]), (id(a), [1])]
    assert torch.equal(gather_drafts([(stored, [1]), (stored, [0])]).q, stored.q.flip(0))
    flat = rejection_sample_flat(target[:, :2].reshape(2 * R, V), torch.arange(0, 2 * R + 1, 2), batch,
                                 greedy=greedy, seeds=seeds)
    capped = rejection_sample(target[:, :2].contiguous(), batch, torch.ones(R, dtype=torch.int64), greedy=greedy,
                              seeds=seeds)
    assert torch.equal(flat.output_tokens, capped.output_tokens)


@pytest.mark.parametrize("part, message", [
    (lambda d: (d, [2]), r"part 1's rows must be a list of whole numbers in \[0, 2\) \(row indices of its draft's "
                         r"requests\), got \[2\]"),
    (lambda d: (d, [-1]), r"part 1's rows must be a list of whole numbers in \[0, 2\)"),  # index_select: IndexError
    (lambda d: (d, [0.5]), r"part 1's rows must be a list of whole numbers"),  # was taken as row 0
    (lambda d: (d, [True]), r"part 1's rows must be a list of whole numbers"),
    (lambda d: (d, [1, True]), r"part 1's rows must be a list of whole numbers"),  # past the all-int fast path
    (lambda d: (d, (0, 1, 2)), r"part 1's rows must be a list of whole numbers in \[0, 2\)"),
    (lambda d: (d, range(3)), r"part 1's rows must be a list of whole numbers in \[0, 2\)"),
    (lambda d: (d, 1), r"part 1's rows must be a list of whole numbers"),
    (lambda d: d, r"part 1 must be a \(MarkovDraft, rows\) pair, got a MarkovDraft"),
], ids=["past-end", "negative", "float", "bool", "int-and-bool", "tuple-past-end", "range-past-end", "int",
        "no-rows"])
def test_gather_drafts_refuses_bad_row_indices(part, message):
    """A row named twice is no error: that request is verified twice, as asked."""
    from dspark_cli.runtime import gather_drafts

    g = torch.Generator().manual_seed(2)
    V = 12
    w1, w2 = torch.randn(V, 4, generator=g), torch.randn(V, 4, generator=g)
    draft = markov_chain(torch.randn(2, 3, V, generator=g), torch.tensor([1, 2]), w1, w2, torch.ones(2),
                         seeds=torch.arange(2))
    with pytest.raises(ValueError, match="^gather_drafts: " + message):
        gather_drafts([(draft, [0]), part(draft)])
    assert torch.equal(gather_drafts([(draft, [1]), (draft, [1])]).tokens, draft.tokens[[1, 1]])
    assert torch.equal(gather_drafts([(draft, []), (draft, [1])]).tokens, draft.tokens[[1]])
    assert torch.equal(gather_drafts([(draft, range(1, 2)), (draft, (0, 1))]).tokens, draft.tokens[[1, 0, 1]])
    with pytest.raises(ValueError, match=r"^gather_drafts: the parts name no rows \(a verify batch of no requests\)$"):
        gather_drafts([(draft, []), (draft, [])])


def test_gather_drafts_refuses_parts_of_another_block_size_or_vocabulary():
    """Was torch.cat's "Sizes of tensors must match" from inside the gather."""
    from dspark_cli.runtime import gather_drafts

    g = torch.Generator().manual_seed(3)
    V = 12
    w1, w2 = torch.randn(V, 4, generator=g), torch.randn(V, 4, generator=g)

    def draft(gamma, vocab, return_q):
        U = torch.randn(2, gamma, vocab, generator=g)
        return markov_chain(U, torch.tensor([1, 2]), w1[:vocab], w2[:vocab], torch.ones(2), seeds=torch.arange(2),
                            return_q=return_q)

    for return_q in (True, False):
        base = draft(3, V, return_q)
        with pytest.raises(ValueError, match=r"^gather_drafts: part 1 drafted γ = 4 over V = 12, part 0 γ = 3 over V = 12$"):
            gather_drafts([(base, [0]), (draft(4, V, return_q), [1])])
        with pytest.raises(ValueError, match=r"^gather_drafts: part 1 drafted γ = 3 over V = 10, part 0 γ = 3 over V = 12$"):
            gather_drafts([(base, [0]), (draft(3, 10, return_q), [1])])


def test_a_regrouped_verify_reports_the_callers_noise_not_its_stand_ins():
    """A part verified at its draft's size fills the rows it does not own with stand-in noise (0.5,
    1.0): an error about the caller's noise names the caller's values only."""
    from dspark_cli.runtime import gather_drafts

    g = torch.Generator().manual_seed(4)
    V = 12
    w1, w2 = torch.randn(V, 4, generator=g), torch.randn(V, 4, generator=g)
    lazy = markov_chain(torch.randn(3, 2, V, generator=g), torch.tensor([1, 2, 3]), w1, w2, torch.ones(3),
                        seeds=torch.arange(3), return_q=False)
    batch = gather_drafts([(lazy, [2, 1])])
    target = torch.softmax(torch.randn(2, 3, V, generator=g), -1)
    ell = torch.full((2,), 2)
    with pytest.raises(ValueError, match=r"^uniforms must lie in \[0, 1\], got values in \[0\.9, 1\.5\]$"):
        rejection_sample(target, batch, ell, uniforms=torch.tensor([[0.9, 0.9], [0.9, 1.5]]))
    noise = torch.full((2, V), 2.0)
    noise[0, 3] = -1.0  # row 2 of the part's call (its draft's row 2)
    with pytest.raises(ValueError, match=r"^exp_noise must be ≥ 0, got a minimum of -1 at index \[0, 3\]$"):
        rejection_sample(target, batch, ell, exp_noise=noise)


@pytest.mark.parametrize("field, value, message", [
    ("q_token", lambda d: d.q_token.double(), "draft q_token must have dtype float32, got float64"),
    ("q_token", lambda d: d.tokens, "draft q_token must have dtype float32, got int64"),
    ("q", lambda d: d.q.double(), "draft q must have dtype float32, got float64"),
])
def test_a_hand_made_markov_draft_of_the_wrong_dtype_is_one_clear_error(field, value, message):
    """A MarkovDraft built by hand skipped the checks a (tokens, q_token, q) tuple gets: a float64
    q_token was torch's "Double did not match Float" from inside the ratio test."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(4)
    d = markov_chain(torch.randn(2, 3, 7, generator=g), torch.tensor([1, 2]), torch.randn(7, 4, generator=g),
                     torch.randn(7, 4, generator=g), torch.ones(2))
    target = torch.softmax(torch.randn(2, 4, 7, generator=g), -1)
    with pytest.raises(ValueError, match=f"^{message}$"):
        rejection_sample(target, replace(d, **{field: value(d)}), torch.tensor([0, 3]))


def test_race_sample_never_picks_a_zero_weight_over_zero_noise():
    """An engine's Exp(1) entry of exactly 0 (or −0.0) over a zero weight was 0/0 = NaN, which argmax
    picks: /tmp/review-rt-1's p = [.5, .5, 0, 0] with noise [1, 1, 1, 0] drew token 3. Noise counts
    as max(E, NOISE_FLOOR): a positive weight over E = 0 wins, the heavier of two such wins, and
    noise at or above the floor keys exactly as w / E did."""
    w = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.2, 0.8, 0.0, 0.0], [0.2, 0.8, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7]])
    noise = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, -0.0], [0.0, -0.0, 1.0, 3.0]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):  # fp16 cannot hold the floor
        assert rng.race_sample(w, noise.to(dtype)).tolist() == [0, 1, 0, 2], dtype
    assert noise[0, 3] == 0 and noise.tolist()[2][3] == 0.0  # the caller's noise is not clamped in place
    g = torch.Generator().manual_seed(3)
    rows = _dist(g, 64, 1000)
    e = rng.exponential_like(rows, g).clamp_min(rng.NOISE_FLOOR)
    assert torch.equal(rng.race_sample(rows, e), torch.argmax(rows / e, dim=-1))


@pytest.mark.parametrize("ell", [0, 1, 3])
def test_zero_engine_noise_never_emits_a_zero_probability_token(ell):
    """Many requests whose raced row (p at ℓ = 0 or on acceptance, else the residual max(p − q, 0))
    is zero on most ids, with engine noise 0 on every one of those ids and on some others: every
    emitted recovered/bonus token has positive weight in its row, exactly."""
    g = torch.Generator().manual_seed(20 + ell)
    R, gamma, V = 2000, 3, 16
    keep = torch.rand(R, gamma + 1, V, generator=g) < 0.3
    keep[..., 0] = True  # every row a distribution
    p = _dist(g, R, gamma + 1, V) * keep
    p /= p.sum(-1, keepdim=True)
    q = _dist(g, R, gamma, V)
    tokens = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(R, gamma)
    q_token = q.gather(2, tokens.unsqueeze(2)).squeeze(2)
    uniforms = torch.rand(R, gamma, generator=g)
    # noise 0 wherever p is 0 in any row (so on every zero-weight id of the raced row), and at random elsewhere
    exp_noise = torch.where(((p == 0).any(1)) | (torch.rand(R, V, generator=g) < 0.2), 0.0,
                            torch.empty(R, V).exponential_(generator=g))
    res = rejection_sample(p, (tokens, q_token, q), torch.full((R,), ell), uniforms=uniforms, exp_noise=exp_noise)
    n = res.num_accepted
    rows = torch.arange(R)
    last = res.output_tokens[rows, n]
    p_row = p[rows, n]
    rejected = n < ell
    residual = (p_row - q[rows, n.clamp(max=gamma - 1)]).clamp(min=0)
    use_residual = rejected & (residual.sum(1) > RESIDUAL_MASS_FLOOR)
    weights = torch.where(use_residual.unsqueeze(1), residual, p_row)
    assert bool((weights.gather(1, last.unsqueeze(1)) > 0).all())
    assert (int(rejected.sum()) > 100) == (ell > 0) and int((weights == 0).sum()) > R * V // 2
    # the zero-noise ids are mostly zero-weight ones: under 0/0 = NaN a row with one drew it
    assert int(((weights == 0) & (exp_noise == 0)).any(1).sum()) > R // 2


def _markov_draft_fields(R=3, gamma=4, V=11, r=5, return_q=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(R, gamma, V, generator=g)
    w1, w2 = torch.randn(V, r, generator=g), torch.randn(V, r, generator=g)
    draft = markov_chain(U, torch.zeros(R, dtype=torch.int64), w1, w2, torch.ones(R), seeds=torch.arange(R),
                         return_q=return_q, top_k=torch.full((R,), 5) if not return_q else None)
    return draft, _dist(g, R, gamma + 1, V)


def _with(draft, source=False, **fields):
    """A copy of draft (or of its source) with fields replaced."""
    from dataclasses import replace

    if source:
        return replace(draft, source=replace(draft.source, **fields))
    return replace(draft, **fields)


@pytest.mark.parametrize("bad, message", [
    (lambda d: _with(d, q_token=d.q_token[:, :1]), r"draft q_token has shape \(3, 1\), expected \(3, 4\) \(\[R, γ\]"),
    (lambda d: _with(d, q_token=d.q_token[:2]), r"draft q_token has shape \(2, 4\), expected \(3, 4\)"),
    (lambda d: _with(d, q_token=d.q_token[0]), r"draft q_token has shape \(4,\), expected \(3, 4\)"),
    (lambda d: _with(d, q_token=torch.cat([d.q_token, d.q_token], 1)), r"draft q_token has shape \(3, 8\)"),
    (lambda d: _with(d, q=d.q[:, :2]), r"draft q has shape \(3, 2, 11\), expected \(3, 4, 11\) \(\[R, γ, V\]"),
    (lambda d: _with(d, q=torch.cat([d.q, d.q])), r"draft q has shape \(6, 4, 11\), expected \(3, 4, 11\)"),
    (lambda d: _with(d, q=d.q[0]), r"draft q must have 3 dimensions, got shape \(4, 11\)"),
    (lambda d: _with(d, tokens=d.tokens[0]), r"draft tokens must have 2 dimensions, got shape \(4,\)"),
    (lambda d: _with(d, tokens=d.tokens.float()), r"draft tokens must have dtype int64, int32, got float32"),
], ids=["q_token-gamma", "q_token-R", "q_token-1d", "q_token-long", "q-gamma", "q-R", "q-2d", "tokens-1d",
        "tokens-float"])
def test_a_hand_built_markov_draft_with_mismatched_stored_fields_is_one_clear_error(bad, message):
    """/tmp/review-rt-5: an IndexError or RuntimeError from inside torch, or (a longer field) rows
    read in part, silently. Shapes are metadata: checked with value checks off too (meta tensors
    stand in for CUDA ones, whose values are not checked)."""
    draft, target = _markov_draft_fields()
    bad_draft = bad(draft)
    ell = torch.tensor([4, 2, 0])
    with pytest.raises(ValueError, match="^" + message):
        rejection_sample(target, bad_draft, ell, seeds=torch.arange(3))
    with pytest.raises(ValueError, match="^" + message):
        rejection_sample_flat(torch.cat([target[0], target[1, :3], target[2, :1]]), torch.tensor([0, 5, 8, 9]),
                              bad_draft, seeds=torch.arange(3))
    meta = {f: getattr(bad_draft, f).to("meta") for f in ("tokens", "q_token", "q", "prev_emb")}
    with pytest.raises(ValueError, match="^" + message):
        rejection_sample(target.to("meta"), _with(bad_draft, **meta), ell.to("meta"),
                         seeds=torch.arange(3, device="meta"))


@pytest.mark.parametrize("field, bad, message", [
    ("U", lambda s: s.U[:, :3], r"draft source U has shape \(3, 3, 11\), expected \(3, 4, 11\)"),
    ("U", lambda s: torch.cat([s.U, s.U]), r"draft source U has shape \(6, 4, 11\), expected \(3, 4, 11\)"),
    ("anchors", lambda s: s.anchors[:2], r"draft source anchors has shape \(2,\), expected \(3,\) \(one entry per"),
    ("temperature", lambda s: s.temperature[:, None], r"draft source temperature has shape \(3, 1\), expected \(3,\)"),
    ("top_k", lambda s: torch.cat([s.top_k, s.top_k]), r"draft source top_k has shape \(6,\), expected \(3,\)"),
    ("w1", lambda s: s.w1[:, :3], r"draft source w2 has shape \(11, 5\), expected \(11, 3\) \(\[V, r\] as w1\)"),
    ("w2", lambda s: s.w2.t(), r"draft source w2 has shape \(5, 11\), expected \(11, 5\)"),
    ("w1", lambda s: s.w1[:9], r"draft source w1 has shape \(9, 5\), expected \(11, 5\) \(\[V, r\] with V of the"),
    ("row_stats", lambda s: torch.zeros(3, 4), r"draft source row_stats has shape \(3, 4\), expected \(3, 4, 2\)"),
    ("thresholds", lambda s: torch.zeros(3, 2), r"draft source thresholds has shape \(3, 2\), expected \(3, 4\)"),
], ids=["U-gamma", "U-R", "anchors", "temperature", "top_k", "w1-rank", "w2-transposed", "w1-V", "row_stats",
        "thresholds"])
def test_a_lazy_draft_with_a_mismatched_source_field_is_one_clear_error(field, bad, message):
    """The rebuild of q rows reads the source per request and position; the CUDA op trusts its shapes."""
    draft, target = _markov_draft_fields(return_q=False, seed=1)
    bad_draft = _with(draft, source=True, **{field: bad(draft.source)})
    for ell in (torch.tensor([4, 2, 0]), torch.tensor([0, 0, 0])):  # also when no q row would be rebuilt
        with pytest.raises(ValueError, match="^" + message):
            rejection_sample(target, bad_draft, ell, seeds=torch.arange(3))


@pytest.mark.parametrize("generator", ["x", 5, torch.Generator().get_state()])
def test_a_generator_that_is_not_a_torch_generator_is_one_clear_error(generator):
    """generator="x" was a TypeError from inside torch.rand."""
    g = torch.Generator().manual_seed(0)
    p, q = _dist(g, 2, 4, 5), _dist(g, 2, 3, 5)
    draft = (torch.zeros(2, 3, dtype=torch.int64), q[:, :, 0], q)
    message = rf"^generator must be a torch.Generator or None, got {type(generator).__name__}$"
    with pytest.raises(ValueError, match=message):
        rejection_sample(p, draft, torch.tensor([1, 0]), generator=generator)
    with pytest.raises(ValueError, match=message):
        rejection_sample_flat(p[:, :2].reshape(4, 5), torch.tensor([0, 2, 4]), draft, generator=generator)


def test_ratio_test_is_strict():
    """Accept x iff u·q(x) < p(x), strictly: engines' uniforms (torch.rand) can be exactly 0, and a
    token the target gives probability 0 (one outside its top-k, say) must never be accepted then;
    at u = 1 a draft with p(x) = q(x) is rejected."""
    q = torch.tensor([[[1 / 3, 1 / 3, 1 / 3]]])
    draft = (torch.tensor([[0]]), q[:, :, 0], q)
    p = torch.tensor([[[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]]])
    res = rejection_sample(p, draft, torch.tensor([1]), uniforms=torch.zeros(1, 1), exp_noise=torch.ones(1, 3))
    assert res.num_accepted.tolist() == [0] and int(res.output_tokens[0, 0]) != 0
    p_equal = q.expand(1, 2, 3).contiguous()
    res = rejection_sample(p_equal, draft, torch.tensor([1]), uniforms=torch.ones(1, 1), exp_noise=torch.ones(1, 3))
    assert res.num_accepted.tolist() == [0]


def test_seeded_acceptance_draws_its_own_stream_at_each_position():
    """A seeded request's ratio tests take u_j from STREAM_ACCEPT at draft position j (the kernels
    draw the same words): not the draft's stream, whose noise chose x_j, and not one u for all j."""
    R, gamma = 256, 4
    q = torch.tensor([0.8, 0.2]).expand(R, gamma, 2).contiguous()
    p = torch.tensor([0.4, 0.6]).expand(R, gamma + 1, 2).contiguous()  # p/q = 0.5 at the drafted token 0
    tokens = torch.zeros(R, gamma, dtype=torch.int64)
    seeds = torch.arange(R) * 104729 + 3
    res = rejection_sample(p, (tokens, q[:, :, 0], q), torch.full((R,), gamma), seeds=seeds)
    u = rng.uniform(seeds, rng.STREAM_ACCEPT, torch.arange(gamma).unsqueeze(0), 0)
    assert torch.equal(res.num_accepted, torch.cumprod((u * 0.8 < 0.4).to(torch.int64), dim=1).sum(dim=1))


def test_draft_and_verify_under_the_same_seeds_follow_target_chi2():
    """A seeded request drafts and verifies under one seed: x_1 from the draft's grouped race, its
    test and the recovered token from their own streams. Were the test's uniform the draft's race
    noise, acceptance would depend on x_1 beyond q and the output would not follow p. V = 24 gives the
    race several groups (with one group its uniform never decides the token)."""
    g = torch.Generator().manual_seed(11)
    V = 24
    p, q = _dist(g, 2, V), _dist(g, 1, V)
    seeds = torch.arange(N) * 7 + 1
    tokens = rng.grouped_race_sample(q.expand(N, V).contiguous(), seeds, rng.STREAM_DRAFT, 0).unsqueeze(1)
    q_n = q.expand(N, 1, V)
    res = rejection_sample(p.expand(N, 2, V).contiguous(), (tokens, q_n.gather(2, tokens.unsqueeze(2)).squeeze(2), q_n),
                           torch.ones(N, dtype=torch.int64), seeds=seeds)
    assert chi2_pvalue(res.output_tokens[:, 0], p[0]) > 0.01


def test_residual_above_the_floor_is_sampled():
    """The other side of the floor: a residual of 5× RESIDUAL_MASS_FLOOR is the distribution the
    recovered token comes from (here all of it on token 1, which the noise would not pick from p)."""
    excess = 5 * RESIDUAL_MASS_FLOOR
    p = torch.tensor([[1e-3, 1e-3, 0.998], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[[1e-3 + excess, 1e-3 - excess, 0.998]]])
    res = rejection_sample(p.unsqueeze(0), (torch.tensor([[0]]), q[:, :, 0], q), torch.tensor([1]),
                           uniforms=torch.tensor([[0.9999999]]), exp_noise=torch.tensor([[1.0, 1.0, 0.9]]))
    assert res.output_tokens.tolist() == [[1, -1]]


def test_gather_drafts_refuses_parts_of_another_markov_rank_or_device():
    """Was torch.cat's "Sizes of tensors must match" (rank) or index_select's "Tensor on device meta
    is not on the expected device cpu!" from inside the gather, as γ and V were."""
    from dspark_cli.runtime import MarkovDraft, gather_drafts

    g = torch.Generator().manual_seed(4)
    V = 12

    def draft(rank, return_q):
        w1, w2 = torch.randn(V, rank, generator=g), torch.randn(V, rank, generator=g)
        return markov_chain(torch.randn(2, 3, V, generator=g), torch.tensor([1, 2]), w1, w2, torch.ones(2),
                            seeds=torch.arange(2), return_q=return_q)

    for return_q in (True, False):
        with pytest.raises(ValueError, match=r"^gather_drafts: part 1 has Markov rank r = 5, part 0 r = 4$"):
            gather_drafts([(draft(4, return_q), [0]), (draft(5, return_q), [1])])
    base = draft(4, True)
    on_meta = MarkovDraft(*(t.to("meta") for t in (base.tokens, base.q_token, base.q, base.prev_emb)))
    with pytest.raises(ValueError, match=r"^gather_drafts: part 1 is on meta, part 0 on cpu$"):
        gather_drafts([(base, [0]), (on_meta, [1])])


@pytest.mark.parametrize("field", ["uniforms", "exp_noise"])
def test_engine_noise_that_is_not_a_tensor_is_one_clear_error(field):
    """A list was an AttributeError ('list' object has no attribute 'shape'); seeds, greedy and ell
    already said "must be a torch.Tensor"."""
    R, gamma, V = 2, 3, 5
    p = torch.full((R, gamma + 1, V), 1 / V)
    tokens = torch.zeros(R, gamma, dtype=torch.int64)
    q = torch.full((R, gamma, V), 1 / V)
    noise = {"uniforms": [[0.5] * gamma] * R, "exp_noise": [[1.0] * V] * R}
    with pytest.raises(ValueError, match=f"^{field} must be a torch.Tensor, got list$"):
        rejection_sample(p, (tokens, q[..., 0], q), torch.ones(R, dtype=torch.int64), **{field: noise[field]})


@pytest.mark.parametrize("seeded", [False, True], ids=["generator", "seeds"])
def test_inputs_that_track_gradients_draft_and_verify_as_detached_ones(seeded):
    """A drafter's nn.Parameter weights and logits computed outside torch.no_grad() track
    gradients: the exponential race's division into its noise buffer (out=) was a RuntimeError
    from autograd for them. Sampling takes no gradient; the draws are those of the detached inputs."""
    g = torch.Generator().manual_seed(5)
    R, gamma, V, r = 4, 3, 12, 2
    U = torch.randn(R, gamma, V, generator=g).requires_grad_()
    w1, w2 = torch.nn.Parameter(torch.randn(V, r, generator=g)), torch.nn.Parameter(torch.randn(V, r, generator=g))
    anchors, temperature = torch.randint(0, V, (R,), generator=g), torch.tensor([1.0, 0.0, 0.7, 1.0])
    target = torch.softmax(torch.randn(R, gamma + 1, V, generator=g), dim=-1).detach().requires_grad_()
    ell = torch.tensor([3, 1, 0, 2])

    def run(U, w1, w2, target):
        noise = {"seeds": torch.arange(R) + 9} if seeded else {"generator": torch.Generator().manual_seed(3)}
        draft = markov_chain(U, anchors, w1, w2, temperature, return_q=False, **noise)
        noise = {"seeds": torch.arange(R) + 9} if seeded else {"generator": torch.Generator().manual_seed(4)}
        return draft.tokens, rejection_sample(target, draft, ell, greedy=temperature < 1e-5, **noise).output_tokens

    tracked = run(U, w1, w2, target)
    detached = run(U.detach(), w1.detach(), w2.detach(), target.detach())
    assert all(torch.equal(a, b) for a, b in zip(tracked, detached))


@pytest.mark.parametrize("default_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_acceptance_uniforms_are_fp32_whatever_torchs_default_dtype(default_dtype):
    """The generator path's ratio-test uniforms were drawn in torch's default dtype: under a bf16
    default (models are often built that way) u took ~2^8 values per octave, so a draft with
    p/q = 0.999 was always accepted (lossy), and under fp64 the same generator drew other tokens."""
    R, V = 20_000, 2
    q = torch.tensor([0.5, 0.5]).expand(R, 1, V)
    p = torch.tensor([0.4995, 0.5005]).expand(R, 2, V).contiguous()  # p/q = 0.999 at the drafted token 0
    draft = (torch.zeros(R, 1, dtype=torch.int64), q[:, :, 0], q)

    def verify():
        return rejection_sample(p, draft, torch.ones(R, dtype=torch.int64), generator=torch.Generator().manual_seed(1))

    expected = verify()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        got = verify()
    finally:
        torch.set_default_dtype(previous)
    assert int((expected.num_accepted == 0).sum()) > 0  # ~20 of the 20,000 are rejected
    assert torch.equal(got.num_accepted, expected.num_accepted)
    assert torch.equal(got.output_tokens, expected.output_tokens)
