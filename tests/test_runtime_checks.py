"""The one-pass value checks (_checks.finite, nonnegative, in_unit_interval): one torch.aminmax
pass over the tensor must still catch a single bad entry anywhere in it, in every float dtype."""
import pytest
import torch

from dspark_cli.runtime import _checks

NAN, INF = float("nan"), float("inf")
SHAPE = (3, 7, 1001)  # odd sizes: the bad entry also lands in a vectorized reduction's tail
POSITIONS = [(0, 0, 0), (1, 3, 500), (2, 6, 1000), (2, 6, 997)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _with(value, index, dtype, fill=0.25):
    t = torch.full(SHAPE, fill, dtype=dtype)
    t[index] = value
    return t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index", POSITIONS, ids=str)
@pytest.mark.parametrize("value, word", [(NAN, "nan"), (INF, "inf"), (-INF, "-inf")])
@pytest.mark.parametrize("check", [_checks.finite, _checks.nonnegative, _checks.in_unit_interval],
                         ids=lambda f: f.__name__)
def test_a_single_nan_or_inf_anywhere_is_caught(check, value, word, index, dtype):
    with pytest.raises(ValueError, match=rf"^q contains NaN or infinite values \({word} at index "
                                         rf"\[{index[0]}, {index[1]}, {index[2]}\]\)$"):
        check("q", _with(value, index, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index", POSITIONS, ids=str)
def test_a_single_negative_anywhere_is_caught(index, dtype):
    small = torch.finfo(dtype).tiny  # the smallest normal negative: no tolerance
    for value in (-1.0, -small):
        t = _with(value, index, dtype)
        with pytest.raises(ValueError, match=rf"^q must be ≥ 0, got a minimum of {float(t[index]):.6g} at index "
                                             rf"\[{index[0]}, {index[1]}, {index[2]}\]$"):
            _checks.nonnegative("q", t)
        with pytest.raises(ValueError, match=r"^q must lie in \[0, 1\], got values in \["):
            _checks.in_unit_interval("q", t)
        _checks.finite("q", t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zeros_negative_zero_and_the_bounds_pass(dtype):
    for fill in (0.0, -0.0, 1.0):
        t = torch.full(SHAPE, fill, dtype=dtype)
        t[1, 2, 3] = -0.0
        for check in (_checks.finite, _checks.nonnegative, _checks.in_unit_interval):
            check("q", t)
    _checks.nonnegative("q", _with(torch.finfo(dtype).max, (1, 3, 500), dtype))  # large, still finite
    _checks.finite("q", _with(-torch.finfo(dtype).max, (1, 3, 500), dtype))
    with pytest.raises(ValueError, match=r"^q must lie in \[0, 1\], got values in \[0.25, 1.0[01]"):
        _checks.in_unit_interval("q", _with(1.01, (2, 6, 1000), dtype))


def test_nan_is_reported_before_a_negative_and_empty_or_strided_tensors_work():
    t = _with(-1.0, (0, 0, 0), torch.float32)
    t[2, 6, 1000] = NAN
    with pytest.raises(ValueError, match=r"^q contains NaN or infinite values \(nan at index \[2, 6, 1000\]\)$"):
        _checks.nonnegative("q", t)
    for check in (_checks.finite, _checks.nonnegative, _checks.in_unit_interval):
        check("q", torch.zeros(0, 7))  # aminmax raises on an empty tensor: the check skips it
        check("q", torch.zeros(3, 0, 5))
    strided = _with(NAN, (1, 3, 500), torch.float32).transpose(0, 2)[::2]  # a non-contiguous view
    with pytest.raises(ValueError, match=r"\(nan at index \[250, 3, 1\]\)$"):
        _checks.nonnegative("q", strided)


def test_locate_false_leaves_out_the_index_of_a_gathered_tensor():
    t = _with(-0.5, (1, 3, 500), torch.float32)
    with pytest.raises(ValueError, match=r"^rows must be ≥ 0, got a minimum of -0.5$"):
        _checks.nonnegative("rows", t, locate=False)
    t[0, 0, 1] = INF
    with pytest.raises(ValueError, match=r"^rows contains NaN or infinite values \(inf\)$"):
        _checks.nonnegative("rows", t, locate=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_the_load_time_weight_check_catches_one_bad_entry_on_cuda(value, dtype):
    """Engines check the Markov weights once at load, on the GPU: CUDA's aminmax must propagate
    NaN in every float dtype too (W2 at Qwen3-4B size, the bad entry in its last position)."""
    from dspark_cli.runtime import check_markov_weight_values

    w1 = torch.full((151936, 256), 0.25, dtype=dtype, device="cuda")
    w2 = w1.clone()
    check_markov_weight_values(w1, w2)
    w2[-1, -1] = value
    with pytest.raises(ValueError, match="the Markov head's W2 contains NaN or infinite values"):
        check_markov_weight_values(w1, w2)


def _whole_number_calls():
    """(argument name, a call taking the count) for each public function that takes a host count."""
    from dspark_cli.runtime import SPSTable, STSCalibration, admit_top_k, gather_drafts, markov_chain, verify_budget

    g = torch.Generator().manual_seed(0)
    a = torch.tensor([[0.9, 0.5], [0.8, 0.1], [0.7, 0.6]])
    z, accepted = torch.randn(8, 2, generator=g), torch.randint(0, 3, (8,), generator=g)
    V = 6
    draft = markov_chain(torch.randn(3, 2, V, generator=g), torch.tensor([0, 1, 2]), torch.randn(V, 2, generator=g),
                         torch.randn(V, 2, generator=g), torch.ones(3), seeds=torch.arange(3))
    return [
        ("budget", lambda n: admit_top_k(a, n).tolist()),
        ("num_requests", lambda n: int(verify_budget(a, SPSTable.default(), n))),
        ("bins", lambda n: STSCalibration.fit(z, accepted, bins=n).temperatures),
        ("rows", lambda n: gather_drafts([(draft, [n])]).tokens.tolist()),
        ("tokens", lambda n: SPSTable.default().sps(n)),
    ]


@pytest.mark.parametrize("index", range(5))
def test_a_whole_number_means_the_same_in_every_public_function(index):
    """docs/runtime-api.md: a whole number is an int or a float without a fraction (2.0 is 2, 2.5
    refused), as SPS table sizes read from JSON. admit_top_k, STSCalibration.fit's bins and
    gather_drafts' rows refused 2.0 (bins even said "must be a whole number, got 20.0")."""
    name, call = _whole_number_calls()[index]
    assert call(2.0) == call(2)
    for bad in (2.5, "2", True, float("nan"), None):
        with pytest.raises(ValueError, match=rf"\b{name}\b.* must be a .*whole number"):
            call(bad)
