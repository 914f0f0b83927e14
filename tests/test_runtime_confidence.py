import json

import pytest
import torch

from dspark_cli.runtime import STSCalibration, confidence_logits, confidence_probs, markov_chain, survival


def test_confidence_head_matches_linear_layer_on_concatenation():
    g = torch.Generator().manual_seed(0)
    R, gamma, d, r = 3, 7, 16, 8
    h, prev_emb = torch.randn(R, gamma, d, generator=g), torch.randn(R, gamma, r, generator=g)
    head = torch.nn.Linear(d + r, 1)  # DeepSpec's AcceptRatePredictor shape: weight [1, d+r], bias [1]
    with torch.no_grad():
        expected = head(torch.cat([h, prev_emb], dim=-1)).squeeze(-1)
        z = confidence_logits(h.bfloat16().float(), prev_emb, head.weight, head.bias)
        z_exact = confidence_logits(h, prev_emb, head.weight, head.bias)
    torch.testing.assert_close(z_exact, expected)
    assert z.dtype == torch.float32 and z.shape == (R, gamma)
    c = confidence_probs(z_exact)
    torch.testing.assert_close(c, torch.sigmoid(expected))
    a = survival(c)
    torch.testing.assert_close(a, torch.cumprod(torch.sigmoid(expected), dim=1))
    assert bool((a[:, 1:] <= a[:, :-1]).all())


def test_sts_scales_each_position_and_round_trips(tmp_path):
    z = torch.tensor([[2.0, 2.0, -1.0]])
    sts = STSCalibration([1.0, 2.0, 0.5], metadata={"temperature": 0.0})
    torch.testing.assert_close(confidence_probs(z, sts), torch.sigmoid(torch.tensor([[2.0, 1.0, -2.0]])))
    path = tmp_path / "sts.json"
    sts.save(path)
    assert json.loads(path.read_text())["format"] == "dspark-sts/1"
    loaded = STSCalibration.load(path)
    assert loaded.temperatures == [1.0, 2.0, 0.5] and loaded.metadata == {"temperature": 0.0}
    with pytest.raises(ValueError, match="block size"):
        confidence_probs(torch.zeros(1, 4), sts)


@pytest.mark.parametrize("metadata, message", [
    ({"temperatures": "fitted on alpaca"}, "^STS calibration metadata may not use the key 'temperatures'"),
    ({"format": "x"}, "^STS calibration metadata may not use the key 'format'"),
    ("fitted", "^STS calibration metadata must be a dict or None, got str$"),
])
def test_sts_metadata_is_a_dict_that_leaves_the_files_keys_alone(metadata, message):
    """Saved after 'temperatures', such a key overwrote it (the file no longer loaded); a str was a
    TypeError at save."""
    with pytest.raises(ValueError, match=message):
        STSCalibration([1.0, 2.0], metadata)


def test_sts_fit_recovers_overconfidence():
    # True conditional acceptance σ(z/2) per position; the raw head claims σ(z): fitted T ≈ 2,
    # and ECE of the cumulative product drops.
    from dspark_cli.runtime.confidence import expected_calibration_error

    g = torch.Generator().manual_seed(1)
    N, gamma = 40_000, 3
    z = 3 * torch.randn(N, gamma, generator=g)
    accepted_step = torch.rand(N, gamma, generator=g) < torch.sigmoid(z / 2)
    num_accepted = torch.cumprod(accepted_step.long(), dim=1).sum(1)
    sts = STSCalibration.fit(z, num_accepted)
    assert all(1.6 < t < 2.5 for t in sts.temperatures), sts.temperatures
    label = (num_accepted >= gamma).float()
    raw = expected_calibration_error(survival(torch.sigmoid(z))[:, -1], label)
    fitted = expected_calibration_error(survival(confidence_probs(z, sts))[:, -1], label)
    assert fitted < raw / 3


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.bfloat16])
def test_sts_fit_does_not_depend_on_torchs_default_dtype(default_dtype):
    """The fit's survival, its ECE bins and its grid were made in torch's default dtype: under an
    fp64 or bf16 default (models are often built in bf16) the ECE's index_add_ of fp32 values
    into them was a RuntimeError. A fit is the same under any default."""
    g = torch.Generator().manual_seed(2)
    z = 3 * torch.randn(2000, 3, generator=g)
    num_accepted = torch.randint(0, 4, (2000,), generator=g)
    expected = STSCalibration.fit(z, num_accepted).temperatures
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        got = STSCalibration.fit(z, num_accepted).temperatures
    finally:
        torch.set_default_dtype(previous)
    assert got == expected


def test_sts_for_a_shorter_block_keeps_the_leading_temperatures_and_ece_bins_are_equal_width():
    """STS is fitted position by position, so a γ = 2 block takes T_1, T_2 of a 3-position file;
    ECE of 0.1 and 0.12 (one bin of ten) with labels 0, 1 is |0.22 − 1| / 2."""
    from dspark_cli.runtime.confidence import expected_calibration_error

    assert STSCalibration([1.0, 2.0, 3.0]).for_block(2).temperatures == [1.0, 2.0]
    ece = expected_calibration_error(torch.tensor([0.1, 0.12]), torch.tensor([0.0, 1.0]), bins=10)
    assert float(ece) == pytest.approx(0.39)


def test_bad_inputs_raise_clear_errors(tmp_path):
    h, e = torch.zeros(2, 3, 4), torch.zeros(2, 3, 2)
    with pytest.raises(ValueError, match="expected d \\+ r = 4 \\+ 2 = 6"):
        confidence_logits(h, e, torch.zeros(5), torch.zeros(1))
    with pytest.raises(ValueError, match="must match h"):
        confidence_logits(h, torch.zeros(2, 4, 2), torch.zeros(6), torch.zeros(1))
    with pytest.raises(ValueError, match="empty batch"):
        confidence_logits(h[:0], e[:0], torch.zeros(6), torch.zeros(1))
    # 10**400: no OverflowError; 1e-300 was 0 in fp32 (z / T NaN), 1e39 inf
    for temps in ([1.0, 0.0], [float("inf")], [float("nan")], ["a"], [], [10**400], [1.0, 1e-300], [1e39]):
        with pytest.raises(ValueError, match="'temperatures' must be a non-empty list of finite positive numbers"):
            STSCalibration(temps)
    bad = tmp_path / "bad.json"
    bad.write_text('{"temperatures": [1.0]}')
    with pytest.raises(ValueError, match="not a dspark-sts/1 file"):
        STSCalibration.load(bad)
    for temps in ("5", "[1.0, null]"):  # 5 was a TypeError (int is not iterable)
        bad.write_text('{"format": "dspark-sts/1", "temperatures": %s}' % temps)
        with pytest.raises(ValueError, match=f"{bad}: STS 'temperatures' must be a non-empty list"):
            STSCalibration.load(bad)
    with pytest.raises(ValueError, match="z contains NaN"):  # was an IndexError in the ECE bins
        STSCalibration.fit(torch.full((4, 2), float("nan")), torch.zeros(4, dtype=torch.int64))


@pytest.mark.parametrize("call, value, message", [
    (confidence_probs, float("nan"), "^z contains NaN or infinite values"),
    (confidence_probs, float("inf"), "^z contains NaN or infinite values"),
    (survival, float("nan"), "^c contains NaN or infinite values"),
    (survival, 1.5, r"^c must lie in \[0, 1\], got values in \[0.5, 1.5\]"),  # a survival growing along γ
    (survival, -0.1, r"^c must lie in \[0, 1\]"),
])
def test_confidences_out_of_range_are_refused_unless_value_checks_are_off(call, value, message):
    """As the schedulers: value checks by default on CPU tensors (on CUDA only with validate=True:
    they are a host sync), validate=False passes the values through."""
    x = torch.full((2, 3), 0.5)
    x[1, 2] = value
    with pytest.raises(ValueError, match=message):
        call(x)
    with pytest.raises(ValueError, match=message):
        call(x, validate=True)
    assert call(x, validate=False).shape == (2, 3)


@pytest.mark.parametrize("call", [confidence_probs, survival])
def test_confidences_of_an_empty_batch_are_refused(call):
    name = "z" if call is confidence_probs else "c"
    for device in ("cpu", "meta"):  # a shape: checked on every device
        with pytest.raises(ValueError, match=rf"^{name} is an empty batch \(0 requests\)$"):
            call(torch.zeros(0, 3, device=device))


def test_a_weight_of_another_shape_is_refused_though_its_entries_add_up():
    """d + r = 6 entries as [2, 3] or [6, 1] (some other layer's weight) were read flat, silently;
    DeepSpec's head is nn.Linear(d + r, 1): weight [1, d + r], or flat [d + r]."""
    h, e = torch.randn(2, 3, 4), torch.randn(2, 3, 2)
    for shape in ((2, 3), (6, 1), (1, 1, 6)):
        with pytest.raises(ValueError, match=rf"^weight has shape \({', '.join(map(str, shape))},?\); expected d \+ r "
                                             r"= 4 \+ 2 = 6 entries, as \[d \+ r\] or \[1, d \+ r\]"):
            confidence_logits(h, e, torch.ones(shape), torch.zeros(1))
    assert torch.equal(confidence_logits(h, e, torch.ones(1, 6), torch.zeros(1)),
                       confidence_logits(h, e, torch.ones(6), torch.zeros(1)))


@pytest.mark.parametrize("bins", [0, -3, 2.5, True, "5"])
def test_sts_fit_refuses_a_bin_count_that_is_not_a_positive_whole_number(bins):
    """0 was an IndexError inside the ECE, -3 a RuntimeError, 2.5 a TypeError."""
    with pytest.raises(ValueError, match=rf"^bins must be a whole number ≥ 1 \(ECE bins\), got {bins!r}"):
        STSCalibration.fit(torch.randn(8, 2), torch.zeros(8, dtype=torch.int64), bins=bins)


def test_inputs_on_two_devices_are_one_clear_error():
    """The meta device stands in for a second device: was a RuntimeError from inside the matmul."""
    h, prev_emb = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    weight, bias = torch.randn(9), torch.zeros(1)
    with pytest.raises(ValueError, match="all inputs must be on one device: h on cpu, prev_emb on meta"):
        confidence_logits(h, prev_emb.to("meta"), weight, bias)
    with pytest.raises(ValueError, match="all inputs must be on one device: h on cpu, weight on meta"):
        confidence_logits(h, prev_emb, weight.to("meta"), bias)
    with pytest.raises(ValueError, match="all inputs must be on one device: z on cpu, num_accepted on meta"):
        STSCalibration.fit(torch.randn(8, 3), torch.zeros(8, dtype=torch.int64, device="meta"))


def test_a_head_without_bias_adds_none():
    """nn.Linear(d + r, 1, bias=False).bias is None (DSPARK.md lists no bias for V4's head): was
    torch's "Could not infer dtype of NoneType"."""
    g = torch.Generator().manual_seed(5)
    R, gamma, d, r, V = 2, 3, 6, 4, 9
    h, prev_emb = torch.randn(R, gamma, d, generator=g), torch.randn(R, gamma, r, generator=g)
    head = torch.nn.Linear(d + r, 1, bias=False)
    with torch.no_grad():
        expected = head(torch.cat([h, prev_emb], dim=-1)).squeeze(-1)
        torch.testing.assert_close(confidence_logits(h, prev_emb, head.weight, head.bias), expected)
        w1, w2 = torch.randn(V, r, generator=g), torch.randn(V, r, generator=g)
        draft = markov_chain(torch.randn(R, gamma, V, generator=g), torch.tensor([1, 2]), w1, w2, torch.ones(R),
                             seeds=torch.arange(R), confidence=(h, head.weight, None))
        torch.testing.assert_close(draft.confidence_logits,
                                   head(torch.cat([h, w1[torch.cat([torch.tensor([[1], [2]]), draft.tokens[:, :-1]], 1)]],
                                                  dim=-1)).squeeze(-1))


@pytest.mark.parametrize("grid, num_accepted, message", [
    ([], None, r"grid must be a non-empty list of finite temperatures > 0, got \[\]"),
    ([1.0, 0.0], None, r"grid must be a non-empty list of finite temperatures > 0, got \[1.0, 0.0\]"),
    ([float("inf")], None, "grid must be a non-empty list of finite temperatures > 0"),
    (None, [0, 4], r"num_accepted must count accepted drafts, each in \[0, γ = 3\], got values from 0 to 4"),
    (None, [-5, 1], r"num_accepted must count accepted drafts, each in \[0, γ = 3\], got values from -5 to 1"),
    (None, [0.5, 1.0], "num_accepted must have dtype int64, int32, got float32"),
])
def test_sts_fit_refuses_a_bad_grid_or_accepted_counts(grid, num_accepted, message):
    """An empty grid was torch.stack's error; counts outside [0, γ] were fitted silently."""
    n = torch.tensor(num_accepted if num_accepted is not None else [0, 3])
    with pytest.raises(ValueError, match=f"^{message}"):
        STSCalibration.fit(torch.randn(2, 3), n, grid=grid)


@pytest.mark.parametrize("sts", [[1.0, 1.0, 1.0], torch.ones(3), "sts.json"])
def test_a_calibration_that_is_not_an_sts_calibration_is_one_clear_error(sts):
    """A list of temperatures was an AttributeError ('list' object has no attribute 'tensor')."""
    with pytest.raises(ValueError, match=rf"^sts must be an STSCalibration \(STSCalibration.load\(path\) or "
                                         rf"STSCalibration\(temperatures\)\) or None, got {type(sts).__name__}$"):
        confidence_probs(torch.zeros(2, 3), sts)


@pytest.mark.parametrize("grid", ["ab", ["a", 1.0], [None], 5, {1.0: 2.0}, [10**400]])
def test_sts_fit_refuses_a_grid_that_is_not_temperatures(grid):
    """"ab" was a TypeError from torch.as_tensor, 10**400 its RuntimeError (overflow)."""
    with pytest.raises(ValueError, match=r"^grid must be a non-empty list of finite temperatures > 0, got "):
        STSCalibration.fit(torch.randn(4, 2), torch.zeros(4, dtype=torch.int64), grid=grid)
    fitted = STSCalibration.fit(torch.randn(4, 2), torch.zeros(4, dtype=torch.int64), grid=(0.5, 2))
    assert set(fitted.temperatures) <= {0.5, 2.0}


def test_sts_temperatures_and_a_host_bias_are_not_copied_to_the_device_per_call():
    """STSCalibration.tensor made a new device tensor from the host list on every call (on CUDA a
    copy that waits for the queue, per draft step, and a failure inside CUDA-graph capture); a bias
    given as a host number went through the same copy."""
    sts = STSCalibration([1.5, 2.0, 0.5])
    assert sts.tensor("cpu") is sts.tensor(torch.device("cpu"))
    z = torch.tensor([[0.3, -1.0, 2.0]])
    torch.testing.assert_close(confidence_probs(z, sts), torch.sigmoid(z / torch.tensor([1.5, 2.0, 0.5])))
    h, prev_emb, weight = torch.ones(1, 3, 2), torch.ones(1, 3, 1), torch.tensor([0.5, 0.25, 1.0])
    expected = torch.full((1, 3), 1.75 - 0.5)
    for bias in (-0.5, [-0.5], torch.tensor([-0.5])):
        torch.testing.assert_close(confidence_logits(h, prev_emb, weight, bias), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")
def test_sts_on_cuda_makes_no_host_sync_after_its_first_call():
    sts, bias = STSCalibration([1.3] * 7), 0.25
    h, prev_emb, weight = (torch.randn(*shape, device="cuda") for shape in ((16, 7, 32), (16, 7, 8), (40,)))
    sts.tensor("cuda")  # made once, before the engine's steps (and any capture)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        c = confidence_probs(confidence_logits(h, prev_emb, weight, bias), sts)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = torch.sigmoid((h @ weight[:32] + prev_emb @ weight[32:] + bias) / 1.3)
    torch.testing.assert_close(c, expected)


@pytest.mark.parametrize("bias", ["0.5", True, object()], ids=["str", "bool", "object"])
def test_a_bias_that_is_not_a_number_is_one_clear_error(bias):
    """A string or an object was a TypeError from torch.as_tensor; True was added as 1.0."""
    h, prev_emb, weight = torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(9)
    with pytest.raises(ValueError, match=r"^bias must be a number, a list of one or a tensor of one value"):
        confidence_logits(h, prev_emb, weight, bias)
