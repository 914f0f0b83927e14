import json
import re

import pytest
import torch

from dspark_cli.runtime import SPSTable


def test_interpolation_and_extrapolation():
    t = SPSTable([1, 10, 100], [100.0, 50.0, 10.0])
    assert t.sps(1) == 100.0 and t.sps(0) == 100.0
    assert t.sps(5) == pytest.approx(100 - 50 * 4 / 9)
    assert t.sps(55) == pytest.approx(30.0)
    assert t.sps(200) == pytest.approx(5.0)  # constant token rate beyond the last point
    B = torch.tensor([1, 5, 55, 100, 200, 1000])
    torch.testing.assert_close(t.lookup(B), torch.tensor([t.sps(int(b)) for b in B]))
    # below a first probe past 1 token the first rate holds (not a token rate extrapolated down)
    late = SPSTable([4, 8], [10.0, 5.0])
    assert late.sps(2) == late.sps(1) == float(late.lookup(torch.tensor([2]))[0]) == 10.0


def _linear_sps(table: SPSTable, tokens: int) -> float:
    """SPS(B) as the table computed it with linear scans (the reference for its bisections)."""
    b = next((size for size in table.capture_sizes if size >= tokens), tokens)
    xs, ys = table.tokens, table.steps_per_s
    if b <= xs[0]:
        return ys[0]
    if b in xs:
        return ys[xs.index(b)]
    if b >= xs[-1]:
        return ys[-1] * xs[-1] / b
    i = next(i for i in range(1, len(xs)) if xs[i] >= b)
    return ys[i - 1] + (b - xs[i - 1]) / (xs[i] - xs[i - 1]) * (ys[i] - ys[i - 1])


class CountedReads(list):
    """A list that counts the elements read from it, by index (bisect) or by iteration (a scan)."""
    reads = 0

    def __getitem__(self, i):
        CountedReads.reads += 1
        return super().__getitem__(i)

    def __iter__(self):
        for value in super().__iter__():
            CountedReads.reads += 1
            yield value


def test_a_table_of_8192_probes_and_capture_sizes_builds_its_lookup_in_near_linear_time():
    """dense() asks SPS(B) for every B up to the table's limit; with a scan of the capture sizes and
    one of the probes per B, 8192 of each (up to B = 16384) took tens of seconds. Counted, not
    timed: the elements of the probes and capture sizes read for the whole lookup are O(B log n)
    (bisections: ~30 per B), where the scans read ~8000 per B. The values are those of the scans."""
    tokens = list(range(1, 16384, 2))
    table = SPSTable(tokens, [1e4 / (10 + 0.01 * b) + (b % 7) for b in tokens], capture_sizes=list(range(2, 16385, 2)))
    table.tokens, table.capture_sizes = CountedReads(table.tokens), CountedReads(table.capture_sizes)
    CountedReads.reads = 0
    dense = table.lookup(torch.arange(0, 16400))
    assert CountedReads.reads < 64 * 16400, CountedReads.reads
    table.tokens, table.capture_sizes = list(table.tokens), list(table.capture_sizes)
    for b in [1, 2, 3, 4, 8191, 8192, 16383, 16384, *range(5, 16400, 97)]:
        assert dense[b].item() == pytest.approx(_linear_sps(table, b), rel=1e-6), b
        assert table.sps(b) == _linear_sps(table, b), b


def test_capture_sizes_make_the_curve_step_wise():
    t = SPSTable([1, 8, 16, 32], [80.0, 72.0, 64.0, 40.0], capture_sizes=[8, 16, 32])
    assert t.sps(3) == t.sps(8) == 72.0  # a 3-token forward replays the 8-token graph
    assert t.sps(9) == t.sps(16) == 64.0
    assert t.sps(40) == pytest.approx(40.0 * 32 / 40)  # beyond the graphs: eager, extrapolated
    torch.testing.assert_close(t.lookup(torch.tensor([3, 9, 17])), torch.tensor([72.0, 64.0, 40.0]))


def test_files_round_trip_in_both_formats(tmp_path):
    t = SPSTable([1, 2, 4], [30.0, 29.0, 25.0], capture_sizes=[1, 2, 4], metadata={"model": "tiny"})
    ours, sglang = tmp_path / "sps.json", tmp_path / "sglang.json"
    t.save(ours)
    t.save_sglang(sglang)
    back = SPSTable.load(ours)
    assert (back.tokens, back.steps_per_s, back.capture_sizes) == (t.tokens, t.steps_per_s, t.capture_sizes)
    assert back.metadata["model"] == "tiny"
    assert json.loads(sglang.read_text()) == {  # B = 3 replays the 4-token graph: SPS(4) from 3 on
        "sample_batch_tokens": [1, 2, 3], "sample_steps_per_sec": [30.0, 29.0, 25.0], "max_batch_tokens": 4}
    assert [SPSTable.load(sglang).sps(b) for b in range(1, 5)] == [t.sps(b) for b in range(1, 5)]


def _sglang_sps(doc: dict, batch_tokens: int) -> float:
    """SGLang's SpsCostTable lookup (dspark_sps.py): the value of the largest probe ≤ B, the first
    probe's below it; past the last probe the last value."""
    probes = doc["sample_batch_tokens"]
    below = [i for i, p in enumerate(probes) if p <= batch_tokens]
    return doc["sample_steps_per_sec"][below[-1] if below else 0]


@pytest.mark.parametrize("table", [
    SPSTable([1, 2, 4, 8, 16, 24, 32, 48, 64], [100.0, 99.0, 97.0, 90.0, 80.0, 76.0, 70.0, 60.0, 50.0],
             capture_sizes=[1, 2, 4, 8, 16, 24, 32]),  # graphs up to 32, eager (interpolated) beyond
    SPSTable([1, 10, 100], [100.0, 50.0, 10.0]),  # no graphs: interpolated everywhere
    SPSTable([4, 8], [9.0, 8.0], capture_sizes=[8, 16]),  # the last capture size past the last point
], ids=["graphs-then-eager", "eager", "capture-past-points"])
def test_sglang_file_gives_our_sps_at_every_batch_size(table, tmp_path):
    """SGLang rounds B down to a probe and holds the last value; we round B up to a capture size and
    interpolate. The file it reads must give our SPS at every B up to the table's max, and reading it
    back must give SGLang's (it was a raw copy of our points: 17 tokens got SPS(16), not SPS(24))."""
    path = tmp_path / "sglang.json"
    table.save_sglang(path)
    doc = json.loads(path.read_text())
    assert doc["max_batch_tokens"] == table.dense_limit
    back = SPSTable.load(path)
    for b in range(0, table.dense_limit + 1):
        assert _sglang_sps(doc, b) == table.sps(b) == back.sps(b), b


def test_sglang_files_read_as_sglang_reads_them(tmp_path):
    doc = {"sample_batch_tokens": [8, 16, 32, 64], "sample_steps_per_sec": [1000.0, 950.0, 500.0, 480.0],
           "max_batch_tokens": 128}
    path = tmp_path / "sglang.json"
    path.write_text(json.dumps(doc))
    table = SPSTable.load(path)
    assert [table.sps(b) for b in range(1, 129)] == [_sglang_sps(doc, b) for b in range(1, 129)]
    torch.testing.assert_close(table.lookup(torch.arange(1, 129)), torch.tensor([_sglang_sps(doc, b) for b in range(1, 129)]))


@pytest.mark.parametrize("limit, sps16", [(32.0, 1000.0), (None, 500.0)])
def test_sglang_max_batch_tokens_written_as_a_float_counts(tmp_path, limit, sps16):
    """32.0 is SGLang's 32 (it was dropped: SPS(16) came out of the extrapolation); absent, the
    table ends at its last probe."""
    path = tmp_path / "sglang.json"
    path.write_text(json.dumps({"sample_batch_tokens": [1, 8], "sample_steps_per_sec": [1000.0, 1000.0],
                                **({"max_batch_tokens": limit} if limit is not None else {})}))
    assert SPSTable.load(path).sps(16) == sps16


@pytest.mark.parametrize("limit", ["32", 32.5, 10**12, True])
def test_a_bad_sglang_max_batch_tokens_is_one_error(tmp_path, limit):
    """A huge limit loaded fine and then stalled the first schedule building its dense table."""
    path = tmp_path / "sglang.json"
    path.write_text(json.dumps({"sample_batch_tokens": [1, 8], "sample_steps_per_sec": [1000.0, 900.0],
                                "max_batch_tokens": limit}))
    with pytest.raises(ValueError, match="max_batch_tokens must be a whole number"):
        SPSTable.load(path)


@pytest.mark.parametrize("table", [
    {"sample_batch_tokens": [1, 4_000_000], "sample_steps_per_sec": [100.0, 1.0]},
    {"format": "dspark-sps/1", "tokens": [1, 2**20 + 1], "steps_per_s": [100.0, 1.0]},
    {"format": "dspark-sps/1", "tokens": [1, 8], "steps_per_s": [100.0, 90.0], "capture_sizes": [8, 10**9]},
], ids=["sglang probe", "tokens", "capture size"])
def test_a_size_past_the_dense_limit_is_refused_in_every_field(tmp_path, table):
    """Only SGLang's max_batch_tokens was bounded: a 4M-token probe loaded fine, then took 4 s to
    build the first lookup (10**9: minutes and tens of GB)."""
    path = tmp_path / "sps.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=rf"^{path}: SPS table sizes must be at most 1048576 tokens, got \d+$"):
        SPSTable.load(path)


def test_a_file_that_is_not_utf8_names_itself(tmp_path):
    path = tmp_path / "sps.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=f"cannot read SPS table {path}"):
        SPSTable.load(path)


def test_default_table_is_documented_model():
    t = SPSTable.default()
    assert t.sps(1) == pytest.approx(1 / (10e-3 + 20e-6))
    assert t.sps(512) == pytest.approx(1 / (10e-3 + 20e-6 * 512))
    # sampled at powers of two, as the docs say: interpolated above the model between them
    assert t.sps(768) / (1 / (10e-3 + 20e-6 * 768)) == pytest.approx(1.04, abs=0.005)


@pytest.mark.parametrize("field, values", [("tokens", [1, 2.5]), ("tokens", [1.5, 2]), ("tokens", [1, True]),
                                           ("tokens", [1, float("nan")]), ("capture_sizes", [2.5])])
def test_token_counts_that_are_not_whole_numbers_are_refused(field, values):
    """2.5 was truncated to 2 silently (NaN or inf a bare int() error); 2.0 stays valid."""
    table = {"tokens": [1, 2], "capture_sizes": [], field: values}
    with pytest.raises(ValueError, match=f"^SPS table {field} must be whole numbers, got "):
        SPSTable(table["tokens"], [1.0, 2.0], table["capture_sizes"])
    assert SPSTable([1.0, 2.0], [1.0, 2.0], [2.0]).tokens == [1, 2]


def test_bad_tables_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="strictly increasing"):
        SPSTable([4, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="as many steps_per_s"):
        SPSTable([1, 2], [1.0])
    # 1e39 was inf in the fp32 dense table (every Θ inf: production verified nothing), 1e-50 zero
    for value in (float("nan"), 10**400, 1e39, 1e-50, 0, -1.0):
        with pytest.raises(ValueError, match="finite and positive, within 1e-30..1e\\+30"):
            SPSTable([1, 2], [1.0, value])
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        SPSTable.load(bad)
    with pytest.raises(ValueError, match="cannot read"):
        SPSTable.load(tmp_path / "missing.json")
    bad.write_text('{"tokens": [' + "9" * 5000 + "]}")  # past Python's int conversion limit
    with pytest.raises(ValueError, match=f"^cannot read SPS table {re.escape(str(bad))}: Exceeds the limit"):
        SPSTable.load(bad)
    # wrong JSON types were a TypeError from int()/float(): one line naming the file and the key
    for doc, message in [
        ({"format": "dspark-sps/1", "tokens": 5, "steps_per_s": [1.0]}, "'tokens' must be a list of whole numbers, got 5"),
        ({"format": "dspark-sps/1", "tokens": [1, 2], "steps_per_s": [1.0, None]}, r"'steps_per_s'\[1\] must be a number, got null"),
        ({"format": "dspark-sps/1", "tokens": [1, 2.5], "steps_per_s": [1.0, 2.0]}, r"'tokens'\[1\] must be a whole number"),
        ({"sample_batch_tokens": [1, 2], "sample_steps_per_sec": [1.0, None]}, r"'sample_steps_per_sec'\[1\] must be a number"),
        ({"format": "dspark-sps/1", "tokens": [2, 1], "steps_per_s": [1.0, 2.0]}, "strictly increasing"),
        # float() of a 400-digit integer was an OverflowError traceback
        ({"format": "dspark-sps/1", "tokens": [1, 2], "steps_per_s": [1.0, 10**400]}, r"'steps_per_s'\[1\] must be a number"),
        ({"format": "dspark-sps/1", "tokens": [1, 10**400], "steps_per_s": [1.0, 2.0]}, "sizes must be at most"),
    ]:
        bad.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=f"^{re.escape(str(bad))}: .*{message}"):
            SPSTable.load(bad)


@pytest.mark.parametrize("tokens", [torch.tensor([3.0]), [3], 3, torch.tensor([True])],
                         ids=["float", "list", "int", "bool"])
def test_lookup_takes_an_integer_tensor_of_batch_sizes(tokens):
    """A float tensor was an IndexError from inside the dense table, a list an AttributeError; a host
    number is sps()'s."""
    with pytest.raises(ValueError, match=r"^tokens must be an int64 or int32 tensor of batch sizes \(sps\(B\) takes "
                                         r"one host number\), got "):
        SPSTable.default().lookup(tokens)
    sizes = torch.tensor([0, 1, 3, 768, 9000])
    assert torch.equal(SPSTable.default().lookup(sizes.int()), SPSTable.default().lookup(sizes))


@pytest.mark.parametrize("tokens", ["3", 2.5, -1, None, True, torch.tensor(3)])
def test_sps_takes_a_whole_number_of_tokens(tokens):
    """'3' was read as 3 and 2.5 as 2, silently; 0 reads as 1, as lookup's."""
    with pytest.raises(ValueError, match=r"^tokens must be a whole number ≥ 0 \(a batch size\), got "):
        SPSTable.default().sps(tokens)
    table = SPSTable([1, 10], [100.0, 50.0])
    assert table.sps(0) == table.sps(1) == 100.0 and table.sps(4.0) == table.sps(4)


@pytest.mark.parametrize("args, message", [
    (([1], None), r"^SPS table steps_per_s must be a list of numbers, got None$"),
    ((5, [1.0]), r"^SPS table tokens must be a list of whole numbers, got 5$"),
    (([1], [1.0], None), r"^SPS table capture_sizes must be a list of whole numbers, got None$"),
    (([1], [1.0], [], "x"), r"^SPS table metadata must be a dict or None, got str$"),
])
def test_table_fields_of_the_wrong_type_are_one_clear_error(args, message):
    """SPSTable([1], None) was a TypeError (None is not iterable)."""
    with pytest.raises(ValueError, match=message):
        SPSTable(*args)


@pytest.mark.parametrize("key", ["format", "tokens", "steps_per_s", "capture_sizes"])
def test_metadata_may_not_use_the_tables_own_keys(key):
    """Saved after the table's keys, such metadata overwrote them: a file that no longer loaded."""
    with pytest.raises(ValueError, match=f"^SPS table metadata may not use the key '{key}'"):
        SPSTable([1, 8], [100.0, 50.0], [], {key: "profiled on an H200"})


def test_a_table_without_metadata_saves(tmp_path):
    """metadata=None (no metadata, as STSCalibration's) was accepted and then save() a TypeError."""
    table = SPSTable([1, 2], [1.0, 0.5], [], None)
    table.save(tmp_path / "sps.json")
    assert SPSTable.load(tmp_path / "sps.json") == SPSTable([1, 2], [1.0, 0.5])


def test_capture_sizes_given_out_of_order_still_pad_up(tmp_path):
    path = tmp_path / "sps.json"
    path.write_text(json.dumps({"format": "dspark-sps/1", "tokens": [1, 8, 16, 32], "steps_per_s": [80.0, 72.0, 64.0, 40.0],
                                "capture_sizes": [32, 8, 16]}))
    table = SPSTable.load(path)
    assert table.sps(3) == 72.0 and table.sps(9) == 64.0 and table.capture_sizes == [8, 16, 32]


def test_a_profiled_point_reads_its_own_value_to_the_bit(tmp_path):
    """At a profiled B the table's value is the one measured there, not the interpolation's t = 1 end
    (1.0 + (0.3 − 1.0) = 0.30000000000000004) or the token rate's 0.7·7/7: SGLang's file, read as
    SGLang reads it (a floor step function), gave a value one ulp off its own at every B of a step."""
    table = SPSTable([1, 3, 7], [1.0, 0.3, 0.7])
    assert [table.sps(b) for b in (1, 3, 7)] == [1.0, 0.3, 0.7]
    assert table.lookup(torch.tensor([1, 3, 7]), torch.float64).tolist() == [1.0, 0.3, 0.7]
    doc = {"sample_batch_tokens": [1, 3, 7], "sample_steps_per_sec": [1.0, 0.3, 0.7], "max_batch_tokens": 9}
    path = tmp_path / "sglang.json"
    path.write_text(json.dumps(doc))
    back = SPSTable.load(path)
    assert [back.sps(b) for b in range(1, 10)] == [_sglang_sps(doc, b) for b in range(1, 10)]
    # 54 is both the last probe and max_batch_tokens: the token rate's 1.2999…04·54/54 rounded down
    doc = {"sample_batch_tokens": [1, 2, 3, 54], "sample_steps_per_sec": [1.0, 1.0, 1.0, 1.2999022840268304],
           "max_batch_tokens": 54}
    path.write_text(json.dumps(doc))
    back = SPSTable.load(path)
    assert [back.sps(b) for b in range(1, 55)] == [_sglang_sps(doc, b) for b in range(1, 55)]
