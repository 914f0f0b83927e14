import pytest
import torch

from dspark_cli.runtime import (check_markov_weight_values, confidence_logits, markov_chain, probs_from_logits,
                                residual_row, rng, warp_logits)
from tests.chi2 import chi2_pvalue
from tests.test_runtime_rng import grouped_race_by_hand


def _setup(R=5, gamma=4, V=40, r=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(R, gamma, V, generator=g).to(dtype)
    w1 = torch.randn(V, r, generator=g).to(dtype)
    w2 = (0.3 * torch.randn(V, r, generator=g)).to(dtype)
    anchors = torch.randint(0, V, (R,), generator=g)
    return U, anchors, w1, w2


def _plain_chain(U, anchors, w1, w2, temperature, seeds):
    """One request and one position at a time, straight from DSPARK.md §1.3; seeded draws by the
    grouped race written out group by group (not rng.grouped_race_sample)."""
    R, gamma, V = U.shape
    tokens, qs = torch.zeros(R, gamma, dtype=torch.int64), torch.zeros(R, gamma, V)
    for r in range(R):
        prev = int(anchors[r])
        for k in range(gamma):
            logits = U[r, k].float() + w2.float() @ w1[prev].float()
            T = float(temperature[r])
            if T < 1e-5:
                q = torch.zeros(V)
                q[int(torch.argmax(logits))] = 1.0
            else:
                q = torch.softmax(logits / T, dim=0)
            prev = grouped_race_by_hand(q, int(seeds[r]), rng.STREAM_DRAFT, k)
            tokens[r, k], qs[r, k] = prev, q
    return tokens, qs


@pytest.mark.parametrize("temps", [[0.0] * 5, [1.0, 0.7, 1.3, 0.0, 2.0]], ids=["greedy", "sampled"])
def test_chain_matches_plain_per_step_implementation(temps):
    U, anchors, w1, w2 = _setup(V=43)  # a partial last group of the grouped race
    temperature, seeds = torch.tensor(temps), torch.arange(100, 105)
    draft = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds)
    tokens, qs = _plain_chain(U, anchors, w1, w2, temperature, seeds)
    assert torch.equal(draft.tokens, tokens)
    torch.testing.assert_close(draft.q, qs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(draft.q_token, qs.gather(2, tokens.unsqueeze(2)).squeeze(2))
    prev = torch.cat([anchors.unsqueeze(1), tokens[:, :-1]], dim=1)
    torch.testing.assert_close(draft.prev_emb, w1[prev])


def test_greedy_chain_is_argmax_of_corrected_logits_bf16():
    U, anchors, w1, w2 = _setup(dtype=torch.bfloat16)
    draft = markov_chain(U, anchors, w1, w2, torch.zeros(5))
    prev = anchors
    for k in range(U.shape[1]):
        expected = (U[:, k].float() + w1[prev].float() @ w2.float().t()).argmax(dim=1)
        assert torch.equal(draft.tokens[:, k], expected)
        prev = expected
    assert torch.all(draft.q_token == 1.0)


def test_sampled_chain_joint_distribution_chi2():
    # γ=2, V=5: the joint of (x1, x2) must be q1(x1)·q2(x2 | x1), with q2 depending on x1 via W1.
    N, V = 100_000, 5
    U, anchors, w1, w2 = _setup(R=1, gamma=2, V=V, r=3, seed=3)
    w2 = w2 * 4  # a strong Markov bias so x1 matters
    T = torch.tensor([0.9])
    draft = markov_chain(U.expand(N, 2, V), anchors.expand(N), w1, w2, T.expand(N),
                         generator=torch.Generator().manual_seed(7), return_q=False)
    q1 = probs_from_logits(U[:, 0].float() + w1[anchors].float() @ w2.float().t(), T)[0]
    q2 = probs_from_logits(U[0, 1].float().expand(V, V) + w1.float() @ w2.float().t(), T.expand(V))
    joint = (q1.unsqueeze(1) * q2).flatten()
    assert chi2_pvalue(draft.tokens[:, 0] * V + draft.tokens[:, 1], joint) > 0.01


def _naive_top_k_top_p(logits_row, T, k, p):
    x = logits_row / T
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < k < x.numel():
        keep &= x >= torch.sort(x, descending=True).values[k - 1]
    x = x.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(x, dim=0)
    sorted_p, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_p, 0) - sorted_p
    keep_sorted = mass_before < p
    keep_sorted[0] = True
    keep = torch.zeros_like(keep).scatter(0, order, keep_sorted) & keep
    out = torch.softmax(x.masked_fill(~keep, float("-inf")), dim=0)
    return out


def test_top_k_top_p_warps_q_like_the_target_and_draws_stay_inside():
    U, anchors, w1, w2 = _setup(R=4, gamma=3, V=30)
    temperature = torch.tensor([1.0, 0.8, 1.2, 1.0])
    top_k = torch.tensor([0, 5, 12, 3])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.95])
    draft = markov_chain(U, anchors, w1, w2, temperature, top_k=top_k, top_p=top_p, seeds=torch.arange(4))
    prev = torch.cat([anchors.unsqueeze(1), draft.tokens[:, :-1]], dim=1)
    for r in range(4):
        for k in range(3):
            logits = U[r, k] + w2 @ w1[prev[r, k]]
            expected = _naive_top_k_top_p(logits, float(temperature[r]), int(top_k[r]), float(top_p[r]))
            torch.testing.assert_close(draft.q[r, k], expected, atol=1e-6, rtol=1e-5)
            assert draft.q[r, k, draft.tokens[r, k]] > 0


def test_temperatures_below_1e_5_are_greedy_and_greedy_rows_are_not_scaled():
    """A request with T < GREEDY_BELOW samples the argmax (one-hot q: its drafts are verified as
    greedy), and warping leaves a greedy row's logits as they are (0 or a negative T included):
    dividing by a tiny T would overflow them."""
    logits = torch.tensor([[1.0, 1.0 + 2**-20, -3.0]])
    assert torch.equal(probs_from_logits(logits, torch.tensor([5e-6])), torch.tensor([[0.0, 1.0, 0.0]]))
    for t in (5e-6, 0.0, -1.0):
        assert torch.equal(warp_logits(logits, torch.tensor([t])), logits)


def test_residual_row_rebuilds_q_exactly():
    U, anchors, w1, w2 = _setup(R=3, gamma=4, V=50)
    temperature = torch.tensor([1.0, 0.0, 0.6])
    draft = markov_chain(U, anchors, w1, w2, temperature, top_p=torch.tensor([0.8, 1.0, 0.9]), seeds=torch.arange(3))
    prev = torch.cat([anchors.unsqueeze(1), draft.tokens[:, :-1]], dim=1)
    for k in range(4):
        row = residual_row(U[:, k], prev[:, k], w1, w2, temperature, top_p=torch.tensor([0.8, 1.0, 0.9]))
        assert torch.equal(row, draft.q[:, k])
    lazy = markov_chain(U, anchors, w1, w2, temperature, top_p=torch.tensor([0.8, 1.0, 0.9]),
                        seeds=torch.arange(3), return_q=False)
    assert lazy.q is None and torch.equal(lazy.tokens, draft.tokens)
    assert torch.equal(lazy.q_rows(torch.tensor([0, 3, 2])), draft.q[torch.arange(3), torch.tensor([0, 3, 2])])


def test_seeds_make_draws_reproducible_and_per_request():
    U, anchors, w1, w2 = _setup(R=2, gamma=6, V=200)
    U = U.clone()
    U[1] = U[0]
    anchors = torch.tensor([7, 7])
    T = torch.ones(2)
    a = markov_chain(U, anchors, w1, w2, T, seeds=torch.tensor([11, 12]))
    b = markov_chain(U, anchors, w1, w2, T, seeds=torch.tensor([11, 12]))
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens[0], a.tokens[1])  # same inputs, different seeds
    c = markov_chain(U[:1], anchors[:1], w1, w2, T[:1], seeds=torch.tensor([11]))
    assert torch.equal(c.tokens[0], a.tokens[0])  # a request's draws do not depend on the batch


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "w1": a["w1"][:-1]}, "w1 has shape"),
        (lambda a: {**a, "w2": a["w2"][:, :-1]}, "Markov rank"),
        (lambda a: {**a, "anchors": a["anchors"].float()}, "anchors must have dtype"),
        (lambda a: {**a, "anchors": torch.tensor([0, 40, 1])}, r"anchors must be token ids in \[0, V=40\)"),
        (lambda a: {**a, "anchors": torch.tensor([0, -1, 1])}, r"got values in \[-1, 1\]"),  # w1[-1] would wrap
        (lambda a: {**a, "temperature": torch.ones(2)}, "temperature has shape"),
        (lambda a: {**a, "U": a["U"][0]}, "U must have 3 dimensions"),
        (lambda a: {**a, "U": a["U"][:0], "anchors": a["anchors"][:0], "temperature": torch.ones(0)}, "empty batch"),
        (lambda a: {**a, "confidence": (torch.zeros(3, 3, 6), torch.zeros(14), torch.zeros(1))}, "must be \\(3, 4\\)"),
        (lambda a: {**a, "confidence": (torch.zeros(3, 4, 6), torch.zeros(13), torch.zeros(1))}, "d \\+ r = 6 \\+ 8"),
        (lambda a: {**a, "confidence": (torch.zeros(3, 4, 6), torch.zeros(14), torch.zeros(2))}, "one value"),
        (lambda a: {**a, "confidence": (torch.zeros(3, 4, 6), torch.zeros(14))}, r"\(h, weight, bias\), got a tuple of 2"),
        (lambda a: {**a, "confidence": (torch.zeros(3, 4, 6), [0.0] * 14, torch.zeros(1))}, "weight must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    U, anchors, w1, w2 = _setup(R=3)
    args = change({"U": U, "anchors": anchors, "w1": w1, "w2": w2, "temperature": torch.ones(3)})
    with pytest.raises(ValueError, match=message):
        markov_chain(args["U"], args["anchors"], args["w1"], args["w2"], args["temperature"],
                     confidence=args.get("confidence"))


@pytest.mark.parametrize("warp, message", [
    ({"temperature": torch.tensor([1.0, float("nan"), 1.0])}, "temperature contains NaN or infinite values"),
    ({"temperature": torch.tensor([1.0, float("inf"), 1.0])}, "temperature contains NaN or infinite values"),
    ({"top_p": torch.tensor([1.0, 0.0, 0.5])}, r"top_p must lie in \(0, 1\]"),
    ({"top_p": torch.tensor([1.0, 1.5, 0.5])}, r"top_p must lie in \(0, 1\]"),
    ({"top_p": torch.tensor([1.0, float("nan"), 0.5])}, r"top_p must lie in \(0, 1\]"),
], ids=["T-nan", "T-inf", "top_p-zero", "top_p-above-1", "top_p-nan"])
def test_bad_warp_values_raise_instead_of_drafting_silently(warp, message):
    """A NaN/inf temperature or a top_p outside (0, 1] drafted anyway (NaN rows gave token 0).
    Checked on CPU tensors, as the token ids are. vLLM's greedy T = -1 and top_k = -1 (off) stay valid."""
    U, anchors, w1, w2 = _setup(R=3)
    warps = {"temperature": torch.ones(3), **warp}
    with pytest.raises(ValueError, match=message):
        markov_chain(U, anchors, w1, w2, warps.pop("temperature"), seeds=torch.arange(3), **warps)
    warps = {"temperature": torch.ones(3), **warp}
    with pytest.raises(ValueError, match=message):
        residual_row(U[:, 0], anchors, w1, w2, warps.pop("temperature"), **warps)
    ok = {"top_k": torch.tensor([-1, 1, 0]), "top_p": torch.tensor([1.0, 1e-6, 0.5])}
    draft = markov_chain(U, anchors, w1, w2, torch.tensor([-1.0, 1e-6, 2.0]), seeds=torch.arange(3), **ok)
    assert draft.q_token[0].tolist() == [1.0] * 4  # T = -1: greedy


@pytest.mark.parametrize("bound", [-1, 2.0, True, "20"])
def test_a_top_k_bound_that_is_not_a_count_is_refused(bound):
    U, anchors, w1, w2 = _setup(R=3)
    with pytest.raises(ValueError, match="top_k_max must be an int >= 0 or None"):
        markov_chain(U, anchors, w1, w2, torch.ones(3), top_k=torch.tensor([2, 3, 4]), top_k_max=bound,
                     seeds=torch.arange(3))


def test_the_top_k_bound_does_not_change_the_draft():
    """top_k_max only tells the CUDA chain what it may skip: whether it is right (4), wrong (2) or
    absent, the reference draws the same block."""
    U, anchors, w1, w2 = _setup(R=3)
    args = (U, anchors, w1, w2, torch.tensor([0.8, 1.0, 0.0]))
    warps = {"top_k": torch.tensor([2, 4, 3]), "top_p": torch.tensor([0.9, 1.0, 0.5]), "seeds": torch.arange(3)}
    drafts = [markov_chain(*args, **warps, top_k_max=bound) for bound in (None, 4, 2)]
    for d in drafts[1:]:
        assert torch.equal(d.tokens, drafts[0].tokens) and torch.equal(d.q, drafts[0].q)


@pytest.mark.parametrize("value, message", [
    (float("nan"), r"contains NaN or \+inf values"),
    (float("inf"), r"contains NaN or \+inf values"),
    (None, r"has a row with no finite entry \(all -inf\)"),
], ids=["nan", "+inf", "all-minus-inf-row"])
def test_bad_base_logits_raise_instead_of_drafting_silently(value, message):
    """A NaN or +inf logit (or a row masked whole) made a NaN q row, which drew token 0 or an
    arbitrary one. A single -inf is an engine's mask and stays valid."""
    U, anchors, w1, w2 = _setup(R=3)
    bad = U.clone()
    if value is None:
        bad[1, 2] = float("-inf")
    else:
        bad[1, 2, 5] = value
    with pytest.raises(ValueError, match="^U " + message):
        markov_chain(bad, anchors, w1, w2, torch.ones(3), seeds=torch.arange(3))
    with pytest.raises(ValueError, match="^U_k " + message):
        residual_row(bad[:, 2], anchors, w1, w2, torch.ones(3))
    masked = U.clone()
    masked[:, :, 5] = float("-inf")
    draft = markov_chain(masked, anchors, w1, w2, torch.ones(3), seeds=torch.arange(3))
    assert not (draft.tokens == 5).any() and torch.isfinite(draft.q).all()


def test_residual_row_inputs_on_two_devices_are_one_clear_error():
    """The meta device stands in for a second device: a meta w2 gave NaN rows, silently."""
    U, anchors, w1, w2 = _setup(R=2)
    with pytest.raises(ValueError, match="all inputs must be on one device: .*w2 on meta"):
        residual_row(U[:, 0], anchors, w1, w2.to("meta"), torch.ones(2))
    with pytest.raises(ValueError, match="all inputs must be on one device: .*temperature on meta"):
        residual_row(U[:, 0], anchors, w1, w2, torch.ones(2, device="meta"))


@pytest.mark.parametrize("args, message", [
    ({"logits": torch.zeros(4)}, r"^logits must have 2 dimensions"),
    ({"logits": torch.zeros(3, 4, dtype=torch.int64)}, "^logits must have dtype"),
    ({"logits": torch.tensor([[0.0, float("nan")]] * 3)}, r"^logits contains NaN or \+inf"),
    ({"temperature": torch.ones(2)}, r"^temperature has shape \(2,\): dimension 0 must be 3"),
    ({"temperature": [1.0] * 3}, "^temperature must be a torch.Tensor"),
    ({"temperature": torch.tensor([1.0, float("nan"), 1.0])}, "^temperature contains NaN"),
    ({"top_k": torch.tensor([1, 2])}, r"^top_k has shape \(2,\): dimension 0 must be 3"),
    ({"top_k": torch.tensor([1.5, 2.0, 3.0])}, "^top_k must have dtype int64, int32"),
    ({"top_p": torch.tensor([0.5])}, r"^top_p has shape \(1,\): dimension 0 must be 3"),
    ({"top_p": torch.tensor([0.0, 0.5, 1.0])}, r"^top_p must lie in \(0, 1\]"),
    ({"top_p": torch.ones(3, device="meta")}, "^all inputs must be on one device: .*top_p on meta"),
    ({"logits": torch.randn(3, 0)}, r"^logits has shape \(3, 0\): an empty vocabulary \(V = 0\)$"),  # an IndexError
    ({"logits": torch.empty(3, 0, device="meta"), "temperature": torch.ones(3, device="meta")},
     r"^logits has shape \(3, 0\): an empty vocabulary"),  # a shape: checked where values are not
], ids=["1-D", "int", "nan", "T-length", "T-list", "T-nan", "k-length", "k-float", "p-length", "p-zero", "p-device",
        "V-0", "V-0-meta"])
def test_warping_helpers_check_their_inputs(args, message):
    """warp_logits / probs_from_logits (public) check as markov_chain does: a short top_p vector
    broadcast silently, a float top_k compared as a float, a 1-D row was taken as one request."""
    from dspark_cli.runtime.sampling import warp_logits

    args = {"logits": torch.randn(3, 4), "temperature": torch.ones(3), **args}
    for warp in (warp_logits, probs_from_logits):
        with pytest.raises(ValueError, match=message):
            warp(**args)


def test_residual_row_rejects_out_of_range_previous_tokens():
    U, anchors, w1, w2 = _setup(R=2)
    with pytest.raises(ValueError, match=r"prev must be token ids in \[0, V=40\), got values in \[3, 50\]"):
        residual_row(U[:, 0], torch.tensor([3, 50]), w1, w2, torch.ones(2))


@pytest.mark.parametrize("return_q", [True, False])
def test_an_all_greedy_batch_drafts_exactly_what_its_rows_draft_beside_a_sampled_row(return_q):
    """The CPU's argmax-only loop for all-greedy batches gives every output the general loop gives."""
    U, anchors, w1, w2 = _setup(R=5, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    h, weight, bias = torch.randn(5, 4, 6, generator=g), torch.randn(1, 6 + 8, generator=g), torch.randn(1, generator=g)
    warps = {"top_k": torch.tensor([3, 40, 1, 7, 0]), "top_p": torch.tensor([0.5, 1.0, 0.9, 0.2, 1.0])}
    mixed = markov_chain(U, anchors, w1, w2, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.8]), return_q=return_q,
                         confidence=(h, weight, bias), seeds=torch.arange(5), **warps)
    greedy = markov_chain(U[:4], anchors[:4], w1, w2, torch.zeros(4), return_q=return_q,
                          confidence=(h[:4], weight, bias), seeds=torch.arange(4),
                          **{name: t[:4] for name, t in warps.items()})
    for field in ("tokens", "q_token", "prev_emb", "confidence_logits") + (("q",) if return_q else ()):
        assert torch.equal(getattr(greedy, field), getattr(mixed, field)[:4]), field
    assert torch.all(greedy.q_token == 1.0) and (greedy.source is None) == return_q


def test_chain_returns_the_confidence_heads_logits_when_given_the_head():
    """z_k = w·[h_k ; W1[x_{k-1}]] + b over the chain's own tokens (DSPARK.md §1.4)."""
    U, anchors, w1, w2 = _setup()
    g = torch.Generator().manual_seed(3)
    h, weight, bias = torch.randn(5, 4, 6, generator=g), torch.randn(1, 6 + 8, generator=g), torch.randn(1, generator=g)
    T, seeds = torch.tensor([1.0, 0.7, 1.3, 0.0, 2.0]), torch.arange(5)
    draft = markov_chain(U, anchors, w1, w2, T, seeds=seeds, confidence=(h, weight, bias))
    prev = torch.cat([anchors.unsqueeze(1), draft.tokens[:, :-1]], dim=1)
    expected = torch.cat([h, w1[prev]], dim=2) @ weight.reshape(-1) + bias
    torch.testing.assert_close(draft.confidence_logits, expected)
    assert torch.equal(draft.confidence_logits, confidence_logits(h, draft.prev_emb, weight, bias))
    assert markov_chain(U, anchors, w1, w2, T, seeds=seeds).confidence_logits is None


def test_top_p_keeps_ties_of_its_smallest_kept_value_and_sums_in_fp64():
    """x = [3, 1, 1, 1, 0]: the three 1s share the mass above them (0.687 < 0.75), so top-p 0.75
    keeps all three, as top-k keeps its ties; an fp32-only rule would keep one of them, by sort order."""
    from dspark_cli.runtime.sampling import warp_logits

    x = torch.tensor([[0.0, 1.0, 3.0, 1.0, 1.0]])
    kept = torch.isfinite(warp_logits(x, torch.ones(1), top_p=torch.tensor([0.75])))
    assert kept.tolist() == [[False, True, True, True, True]]
    assert torch.isfinite(warp_logits(x, torch.ones(1), top_p=torch.tensor([0.5]))).tolist() == [
        [False, False, True, False, False]]
    # Mass reaching p only in the last of 150000 equal small terms: fp64 finds where it crosses.
    row = torch.cat([torch.tensor([10.0]), torch.linspace(0.0, -1e-3, 150000)]).unsqueeze(0)
    probs = torch.softmax(row.double(), -1)[0]
    p = float(probs[0] + probs[1:100001].sum()) - 1e-9  # crosses at the 100000th small term
    kept = torch.isfinite(warp_logits(row, torch.ones(1), top_p=torch.tensor([p], dtype=torch.float64).float()))
    expected = int((torch.cumsum(probs.sort(descending=True).values, 0) - probs.sort(descending=True).values
                    < torch.tensor([p], dtype=torch.float64).float().double()).sum())
    assert int(kept.sum()) == expected


@pytest.mark.parametrize("which,value", [(0, float("nan")), (1, float("inf")), (1, float("-inf"))])
def test_markov_weights_with_nan_or_inf_are_refused_by_the_load_time_check(which, value):
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(50, 4, generator=g).bfloat16() for _ in range(2)]
    check_markov_weight_values(*weights)  # finite weights pass
    weights[which][17, 2] = value
    name = ("W1", "W2")[which]
    with pytest.raises(ValueError, match=f"the Markov head's {name} contains NaN or infinite values"):
        check_markov_weight_values(*weights)


@pytest.mark.parametrize("generator, message", [
    (5, "^generator must be a torch.Generator or None, got int$"),
    ("x", "^generator must be a torch.Generator or None, got str$"),
])
def test_a_generator_that_is_not_a_torch_generator_is_one_clear_error(generator, message):
    """generator=5 was a TypeError from inside torch's exponential_."""
    U, anchors, w1, w2 = _setup(R=3)
    with pytest.raises(ValueError, match=message):
        markov_chain(U, anchors, w1, w2, torch.ones(3), generator=generator)


@pytest.mark.parametrize("return_q", [True, False], ids=["stored", "lazy"])
def test_q_rows_refuses_positions_outside_the_block(return_q):
    """A negative position wrapped around silently (a lazy draft rebuilt a row for a position past
    the block: U's last step after the last draft token), one ≥ γ was an IndexError."""
    U, anchors, w1, w2 = _setup(R=3, gamma=4, V=20)
    draft = markov_chain(U, anchors, w1, w2, torch.ones(3), seeds=torch.arange(3), return_q=return_q)
    for position in ([-1, 0, 0], [4, 0, 0]):
        with pytest.raises(ValueError, match=r"^position must be draft positions in \[0, γ = 4\), got "):
            draft.q_rows(torch.tensor(position))
    with pytest.raises(ValueError, match=r"^position has shape \(2,\): dimension 0 must be 3"):
        draft.q_rows(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^position must have dtype int64, int32, got float32$"):
        draft.q_rows(torch.tensor([0.0, 1.0, 2.0]))
    assert draft.q_rows(torch.tensor([3, 0, 1])).shape == (3, 20)


def test_markov_weight_check_refuses_what_is_not_a_weight_matrix():
    """A list was an AttributeError ('list' object has no attribute 'numel')."""
    with pytest.raises(ValueError, match=r"^w1 must be a torch.Tensor, got list$"):
        check_markov_weight_values([[1.0]], torch.ones(1, 1))


def test_an_autocast_region_does_not_lower_q_or_the_confidence_logits():
    """q and z are fp32 by definition, and a draft's q must be the distribution it was sampled from.
    Inside a caller's autocast region the bias W1[x]·W2ᵀ and z ran in bf16: q was off by up to ~1e-2,
    and a lazy draft's q rebuilt outside the region was not the q sampled (a lossy ratio test)."""
    U, anchors, w1, w2 = _setup(V=64, r=16)
    g = torch.Generator().manual_seed(4)
    h, weight, bias = torch.randn(5, 4, 6, generator=g), torch.randn(1, 6 + 16, generator=g), torch.randn(1, generator=g)
    T, seeds = torch.tensor([1.0, 0.7, 1.3, 0.0, 2.0]), torch.arange(5)
    plain = markov_chain(U, anchors, w1, w2, T, seeds=seeds, confidence=(h, weight, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = markov_chain(U, anchors, w1, w2, T, seeds=seeds, confidence=(h, weight, bias))
        lazy = markov_chain(U, anchors, w1, w2, T, seeds=seeds, return_q=False)
        rebuilt = lazy.q_rows(torch.full((5,), 2))
        z = confidence_logits(h, plain.prev_emb, weight, bias)
    assert torch.equal(inside.tokens, plain.tokens) and torch.equal(inside.q, plain.q)
    assert torch.equal(inside.confidence_logits, plain.confidence_logits) and torch.equal(z, plain.confidence_logits)
    assert torch.equal(rebuilt, plain.q[:, 2])
