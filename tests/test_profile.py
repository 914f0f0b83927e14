"""`dspark profile` end to end on the CPU: a tiny Qwen3 built from its config by transformers."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dspark_cli.runtime import SPSTable, sps_profile
from dspark_cli.runtime.sps_profile import ForwardTimer, ProfileSettings, default_sizes, vllm_capture_sizes
from tests.run_cli import run_bound_by_permissions

TINY_QWEN3 = {
    "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
    "max_position_embeddings": 1024,
}


def _dspark(*args):
    return subprocess.run([sys.executable, "-m", "dspark_cli", *args], capture_output=True, text=True, timeout=300)


def _dspark_without(module, *args):
    """The CLI in a Python where `module` does not import: None in sys.modules makes `import module`
    raise ModuleNotFoundError, as an uninstalled package does."""
    code = f"import sys; sys.modules[{module!r}] = None; from dspark_cli.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(TINY_QWEN3))
    return tmp_path / "model"


def test_profile_times_a_real_forward_and_writes_both_tables(model_dir, tmp_path):
    out = tmp_path / "sps.json"
    proc = _dspark("profile", "--model", str(model_dir), "--out", str(out), "--max-tokens", "16",
                   "--capture-sizes", "4,8", "--repeats", "2", "--warmup", "1", "--context", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    table = SPSTable.load(out)
    assert table.tokens == [1, 2, 4, 8, 16] == [p["tokens"] for p in result["points"]]
    assert table.capture_sizes == [4, 8]
    assert all(s > 0 for s in table.steps_per_s)
    assert table.metadata["model_type"] == "qwen3" and table.metadata["device"].startswith("cpu")
    assert table.metadata["timing"] == "eager"  # no graphs on the CPU
    assert table.metadata["attention"] == "dspark_profile_sdpa"
    assert table.sps(3) == table.sps(4)  # a 3-token forward replays the 4-token graph
    # SGLang's file gives our SPS at every B up to the table's max under SGLang's lookup (the value
    # of the largest probe ≤ B, dspark_sps.py), and reads back as the same curve
    sglang_path = tmp_path / "sps.sglang.json"
    sglang = json.loads(sglang_path.read_text())
    assert set(sglang) == {"sample_batch_tokens", "sample_steps_per_sec", "max_batch_tokens"}
    assert sglang["max_batch_tokens"] == 16 and sglang["sample_batch_tokens"][:3] == [1, 5, 9]  # the 4- and 8-token graphs
    probes, values = sglang["sample_batch_tokens"], sglang["sample_steps_per_sec"]
    for b in range(1, 17):
        assert values[max(i for i, p in enumerate(probes) if p <= b)] == table.sps(b) == SPSTable.load(sglang_path).sps(b)


def test_capture_sizes_up_to_the_largest_size_asked_for_are_kept(model_dir, tmp_path):
    """--sizes past --max-tokens (default 512) are timed, so the capture sizes given up to them stay
    graphs: 600 was dropped without a word, and a B between 256 and 600 read off an eager 600 where
    the engine pads it to the 600-token graph."""
    out = tmp_path / "sps.json"
    proc = _dspark("profile", "--model", str(model_dir), "--out", str(out), "--sizes", "1,600",
                   "--capture-sizes", "4,600,700", "--repeats", "1", "--warmup", "0", "--context", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    table = SPSTable.load(out)
    assert table.tokens == [1, 4, 600] and table.capture_sizes == [4, 600] == json.loads(proc.stdout)["capture_sizes"]


def test_profile_errors_have_documented_exit_codes(model_dir, tmp_path):
    missing = _dspark("profile", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.json"))
    assert missing.returncode == 2 and "no config.json" in missing.stderr
    bad_sizes = _dspark("profile", "--model", str(model_dir), "--out", str(tmp_path / "x.json"), "--sizes", "0,4")
    assert bad_sizes.returncode == 2 and "integers from 1 to 1048576" in bad_sizes.stderr
    # a typo'd size is refused in one line (the sweep of sizes up to 10^20 was a MemoryError traceback)
    huge = _dspark("profile", "--model", str(model_dir), "--out", str(tmp_path / "x.json"),
                   "--max-tokens", "99999999999999999999")
    [line] = huge.stderr.strip().splitlines()
    assert huge.returncode == 2 and line.startswith("usage: Invalid value for '--max-tokens'") and "1048576" in line
    if not torch.cuda.is_available():
        no_gpu = _dspark("profile", "--model", str(model_dir), "--out", str(tmp_path / "x.json"), "--device", "cuda")
        assert no_gpu.returncode == 3 and "sees no CUDA GPU" in no_gpu.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("fields, message", [
    ({"hidden_size": 65, "num_attention_heads": 4}, "is not a multiple of the number of attention heads"),
    ({"hidden_size": "abc"}, "Validation error for field 'hidden_size'"),
    ({"num_attention_heads": 0}, "division or modulo by zero"),
], ids=["indivisible", "string", "zero-heads"])
def test_a_config_transformers_rejects_is_one_line_exit_2(tmp_path, fields, message):
    """Were tracebacks with exit 1 (huggingface_hub's validation, a ZeroDivisionError)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **fields}))
    proc = _dspark("profile", "--model", str(tmp_path), "--out", str(tmp_path / "x.json"), "--max-tokens", "2",
                   "--repeats", "1", "--warmup", "0", "--context", "4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and message.lower() in proc.stderr.lower()


@pytest.mark.parametrize("field, value", [("vocab_size", -5), ("vocab_size", 0), ("hidden_size", -64),
                                          ("head_dim", -16)])
def test_a_size_below_one_is_bad_input(tmp_path, field, value):
    """Was exit 3, 'cannot build the model on cpu: Trying to create tensor with negative dimension'
    (and a torch warning besides the line for a vocab_size of 0)."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY_QWEN3, field: value}))
    proc = _dspark("profile", "--model", str(tmp_path), "--out", str(tmp_path / "x.json"), "--max-tokens", "2",
                   "--repeats", "1", "--warmup", "0", "--context", "4")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: --model {tmp_path}: {field} is {value} in config.json; it must be a positive integer\n"
    assert not (tmp_path / "x.json").exists()


def test_query_heads_not_a_multiple_of_the_kv_heads_are_bad_input(tmp_path):
    """Was exit 3, 'cannot build the model on cpu: Number of heads in key and value must divide ...'."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY_QWEN3, "num_attention_heads": 3, "num_key_value_heads": 2}))
    proc = _dspark("profile", "--model", str(tmp_path), "--out", str(tmp_path / "x.json"), "--max-tokens", "2",
                   "--repeats", "1", "--warmup", "0", "--context", "4")
    assert proc.returncode == 2 and proc.stderr == (
        f"error: --model {tmp_path}: num_attention_heads 3 is not a multiple of num_key_value_heads 2 in config.json\n")


def test_a_context_past_the_models_positions_is_bad_input(tmp_path):
    """GPT-2's learned position table of n_positions rows: --context 64 over 16 was an IndexError
    traceback, exit 1."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 16, "n_embd": 32,
                                                      "n_layer": 1, "n_head": 2, "vocab_size": 128,
                                                      "bos_token_id": 0, "eos_token_id": 0}))
    args = ["profile", "--model", str(tmp_path), "--out", str(tmp_path / "x.json"), "--max-tokens", "2",
            "--repeats", "1", "--warmup", "0"]
    proc = _dspark(*args, "--context", "64")
    assert proc.returncode == 2 and proc.stderr == (
        "error: --context 64: the model has 16 positions (max_position_embeddings); the timed token sits at "
        "position 64: give --context 15 or less\n"), proc.stderr
    assert _dspark(*args, "--context", "15").returncode == 0
    # one position: no --context fits (its least is 1), so the advice is not "give --context 0"
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_positions": 1}))
    proc = _dspark(*args, "--context", "1")
    assert proc.returncode == 2 and proc.stderr == (
        f"error: --model {tmp_path}: max_position_embeddings is 1 in config.json; a profile needs at least 2 "
        "(one context token, then the timed one)\n"), proc.stderr


@pytest.mark.parametrize("config, reason", [
    ({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
      "intermediate_size": 32, "vocab_size": 128}, "BertLMHeadModel returns no KV cache"),
    ({"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 128, "state_size": 4},
     "MambaForCausalLM keeps a recurrent state that cannot be rolled back"),
], ids=["bert", "mamba"])
def test_a_model_without_a_kv_cache_is_bad_input(tmp_path, config, reason):
    """Was an AttributeError traceback (bert) and exit 3 'the forward failed on cpu' (mamba)."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = _dspark("profile", "--model", str(tmp_path), "--out", str(tmp_path / "x.json"), "--max-tokens", "2",
                   "--repeats", "1", "--warmup", "0", "--context", "4")
    assert proc.returncode == 2, proc.stderr
    line = f"error: model_type '{config['model_type']}' is not supported: {reason}; dspark profile times a causal LM with a KV cache"
    assert line in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "x.json").exists()


def test_a_config_the_probe_forward_cannot_run_is_bad_input(tmp_path):
    """A head_dim that does not fit the rotary embedding fails in the first forward: was exit 3,
    "cannot build the model on cpu: The size of tensor a (3) must match ...", blaming the machine."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY_QWEN3, "head_dim": 3}))
    proc = _dspark("profile", "--model", str(tmp_path), "--out", str(tmp_path / "x.json"), "--max-tokens", "2",
                   "--repeats", "1", "--warmup", "0", "--context", "4")
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: --model {tmp_path}: transformers cannot run this config: "), line
    assert not (tmp_path / "x.json").exists()


def test_a_config_dspark_may_not_read_is_an_environment_problem(model_dir, tmp_path):
    """README: a file dspark may not read is exit 3 (was exit 2, "--model ...: Permission denied")."""
    config = model_dir / "config.json"
    config.chmod(0)
    try:
        proc = run_bound_by_permissions("profile", "--model", str(model_dir), "--out", str(tmp_path / "x.json"))
    finally:
        config.chmod(0o644)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr == f"error: --model {model_dir}: cannot read {config}: Permission denied\n"


def test_the_model_path_is_checked_before_torch_is_needed(model_dir, tmp_path):
    """A missing --model is exit 2 also where torch is not installed; a model directory dspark may
    not search is exit 3."""
    nope = tmp_path / "nope"
    missing = _dspark_without("torch", "profile", "--model", str(nope), "--out", str(tmp_path / "x.json"))
    assert missing.returncode == 2 and missing.stderr == f"error: --model {nope}: no config.json at {nope}\n"
    model_dir.chmod(0)
    try:
        proc = run_bound_by_permissions("profile", "--model", str(model_dir), "--out", str(tmp_path / "x.json"))
    finally:
        model_dir.chmod(0o755)
    assert proc.returncode == 3 and proc.stderr == f"error: --model {model_dir}: cannot read it (Permission denied)\n"


def test_without_transformers_it_is_one_line_exit_3_naming_the_install(model_dir, tmp_path):
    """Was a ModuleNotFoundError traceback from sps_profile.load_config."""
    args = ["profile", "--model", str(model_dir), "--out", str(tmp_path / "x.json")]
    human = _dspark_without("transformers", *args)
    line = "error: dspark profile needs transformers, which is not installed in this Python (pip install transformers)"
    assert human.returncode == 3 and human.stderr.strip() == line, human.stderr
    as_json = _dspark_without("transformers", *args, "--json")
    assert as_json.returncode == 3 and json.loads(as_json.stdout) == {
        "ok": False, "exit_code": 3, "error": line.removeprefix("error: ")}
    assert not (tmp_path / "x.json").exists()


def test_a_multimodal_config_profiles_its_text_model(tmp_path):
    """gemma3's config keeps vocab_size and the sizes in text_config (was an AttributeError
    traceback, exit 1); a negative size there is found too."""
    text = {"model_type": "gemma3_text", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 16}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text,
                                                      "vision_config": vision}))
    args = ["profile", "--model", str(tmp_path), "--out", str(tmp_path / "sps.json"), "--sizes", "1,2",
            "--repeats", "1", "--warmup", "0", "--context", "4", "--json"]
    proc = _dspark(*args)
    assert proc.returncode == 0, proc.stderr
    assert [p["tokens"] for p in json.loads(proc.stdout)["points"]] == [1, 2]
    assert SPSTable.load(tmp_path / "sps.json").tokens == [1, 2]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {**text, "vocab_size": -1},
                                                      "vision_config": vision}))
    bad = _dspark(*args)
    assert bad.returncode == 2 and "vocab_size is -1 in config.json" in bad.stderr, bad.stderr


def test_default_sweeps():
    assert default_sizes(16) == [1, 2, 4, 8, 16]
    assert default_sizes(100)[-1] == 100 and 96 in default_sizes(100)
    assert vllm_capture_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]


@pytest.mark.parametrize("where", ["out_dir", "out_cwd", "out_config", "out_under_file", "out_fifo", "out_long_dir",
                                   "sglang_dir", "sglang_under_file", "sglang_fifo", "sglang_long_name", "same_file"])
def test_bad_output_paths_are_refused_before_timing(model_dir, tmp_path, where):
    """Were a traceback and exit 1 after all the timing, --sglang-out leaving our table written alone
    (--out . a traceback before it; --out the model's config.json overwrote it; --out a pipe, or as
    root /dev/null, was replaced by a regular file; a name too long under a directory not made yet
    was exit 3 after the timing)."""
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "file.json").write_text("keep")
    config = (model_dir / "config.json").read_text()
    out, sglang = tmp_path / "sps.json", None
    if where == "out_dir":
        out = tmp_path / "dir"
    elif where == "out_cwd":
        out = Path(".")
    elif where == "out_config":
        out = model_dir / "config.json"
    elif where == "out_under_file":
        out = tmp_path / "file.json" / "sub.json"
    elif where == "out_fifo":
        out = tmp_path / "pipe"
    elif where == "out_long_dir":
        out = tmp_path / "new" / ("d" * 300) / "sps.json"
    elif where == "sglang_long_name":
        sglang = tmp_path / "new" / ("s" * 300 + ".json")
    elif where == "sglang_fifo":
        sglang = tmp_path / "pipe"
    elif where == "sglang_dir":
        sglang = tmp_path / "dir"
    elif where == "sglang_under_file":
        sglang = tmp_path / "file.json" / "sub.json"
    else:
        sglang = out
    args = ["profile", "--model", str(model_dir), "--out", str(out), "--max-tokens", "2", "--repeats", "1",
            "--warmup", "0", "--context", "4", "--json"]
    proc = _dspark(*args, *(["--sglang-out", str(sglang)] if sglang else []))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "profiling" not in proc.stderr  # no timing ran
    assert len(proc.stderr.strip().splitlines()) == 1
    result = json.loads(proc.stdout)
    assert result["ok"] is False and result["exit_code"] == 2
    assert ("--sglang-out" if where.startswith("sglang") else "--out") in result["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file.json", "model", "pipe"]  # nothing written
    assert stat.S_ISFIFO((tmp_path / "pipe").stat().st_mode)
    assert not any((tmp_path / "dir").iterdir()) and (tmp_path / "file.json").read_text() == "keep"
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json"] and (model_dir / "config.json").read_text() == config


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write a read-only directory")
def test_an_unwritable_output_directory_is_an_environment_problem(model_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        proc = _dspark("profile", "--model", str(model_dir), "--out", str(locked / "sps.json"))
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 3 and "cannot make anything in" in proc.stderr and "profiling" not in proc.stderr
    assert not any(locked.iterdir())


def test_both_tables_are_written_or_neither(tmp_path):
    """A pair is renamed into place only after both files were written in full."""
    from dspark_cli.commands.profile import _write_both
    from dspark_cli.errors import EnvironmentProblem

    ours, theirs = tmp_path / "sps.json", tmp_path / "sps.sglang.json"
    ours.write_text("old")

    def save_ok(path):
        Path(path).write_text("new")

    def save_fails(path):
        Path(path).write_text("half")
        raise OSError(28, "No space left on device", str(path))

    with pytest.raises(EnvironmentProblem, match="No space left on device"):
        _write_both(((ours, save_ok), (theirs, save_fails)))
    assert ours.read_text() == "old" and not theirs.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sps.json"]  # no temporary files left
    _write_both(((ours, save_ok), (theirs, save_ok)))
    assert ours.read_text() == theirs.read_text() == "new"


@pytest.mark.parametrize("device", ["cuda:x", "cuda:-1", "gpu", "cpu:"])
def test_a_malformed_device_is_bad_input(model_dir, tmp_path, device):
    """'cuda:x' was exit 3 (no CUDA GPU) on a machine without one."""
    proc = _dspark("profile", "--model", str(model_dir), "--out", str(tmp_path / "x.json"), "--device", device)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: --device must be cpu, cuda or cuda:N, got {device!r}"
    assert not (tmp_path / "x.json").exists()


def test_an_unknown_model_type_is_one_short_line(tmp_path):
    """Was ~30 KB: transformers' error lists every model type it knows."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nonsense", "hidden_size": 8}))
    proc = _dspark("profile", "--model", str(tmp_path), "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and len(line) < 300, line[:500]
    assert "unknown model_type 'nonsense'" in line and str(tmp_path / "config.json") in line
    assert not (tmp_path / "x.json").exists()


def test_the_static_cache_step_is_the_eager_step(model_dir):
    """The forward captured in a CUDA graph on GPUs (StaticCache, our mask-free attention) computes
    the logits of transformers' own eager decode step over a DynamicCache, for the same inputs."""
    from dspark_cli.runtime.sps_profile import ATTENTION, load_config

    timer = ForwardTimer(load_config(model_dir), ProfileSettings(context=8))
    assert timer.model.config._attn_implementation == ATTENTION
    prompt, step = timer._inputs(3)
    timer.model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        cache = getattr(timer.model(input_ids=prompt, use_cache=True), timer.cache_name)  # its name, either way
        eager = timer.model(input_ids=step, use_cache=True, **{timer.cache_name: cache}).logits
    timer.model.set_attn_implementation(ATTENTION)
    static = timer.static_step(3)
    first, again = static(), static()  # a second call rewrites the same slot: same context, same logits
    assert first.shape == eager.shape == (3, 1, TINY_QWEN3["vocab_size"])
    torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, again)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")
def test_on_cuda_the_capture_sizes_are_graph_replays_of_the_real_forward(model_dir, tmp_path):
    from dspark_cli.runtime.sps_profile import ForwardTimer, ProfileSettings, capture_graph, load_config

    timer = ForwardTimer(load_config(model_dir), ProfileSettings(device="cuda", dtype=torch.bfloat16, context=8))
    forward = timer.static_step(4)
    eager = forward().clone()
    graph, replayed = capture_graph(forward)
    with torch.inference_mode():
        replayed.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, eager)  # the replay recomputes the step, over the same context

    out = tmp_path / "sps.json"
    proc = _dspark("profile", "--model", str(model_dir), "--out", str(out), "--device", "cuda", "--max-tokens", "16",
                   "--capture-sizes", "4,8", "--repeats", "3", "--warmup", "1", "--context", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    table = SPSTable.load(out)
    assert table.metadata["timing"] == "CUDA-graph replay at the capture sizes, eager elsewhere"
    assert table.metadata["dtype"] == "bfloat16" and table.tokens == [1, 2, 4, 8, 16]
    assert all(s > 0 for s in table.steps_per_s)


def _bare_timer(**settings) -> ForwardTimer:
    timer = ForwardTimer.__new__(ForwardTimer)  # no model: _seconds only reads the settings
    timer.settings = ProfileSettings(**settings)
    return timer


def test_warmup_calls_stay_out_of_the_median(monkeypatch):
    clock, calls = [0.0], []
    monkeypatch.setattr(sps_profile.time, "perf_counter", lambda: clock[0])

    def call():  # the first (warm-up) calls are slow, the timed ones take 1 s each
        calls.append(1)
        clock[0] += 10.0 if len(calls) <= 3 else 1.0

    assert _bare_timer(warmup=3, repeats=2)._seconds(call) == 1.0
    assert len(calls) == 5


def test_each_timed_call_is_synchronized_on_both_sides_on_cuda(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    _bare_timer(device="cuda", warmup=0, repeats=2)._seconds(lambda: events.append("call"))
    assert events == ["sync", "call", "sync"] * 2  # kernels launched asynchronously are waited for


class _FakeTimer:
    def __init__(self, device):
        self.settings = ProfileSettings(device=device)
        self.calls = []

    def median_step_seconds(self, batch, graph=False):
        self.calls.append((batch, graph))
        return 0.001 * batch


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_profile_table_stores_steps_per_second_and_replays_graphs_at_the_capture_sizes(device):
    timer = _FakeTimer(device)
    table = sps_profile.profile_table(timer, [1, 2, 4, 8], [2, 8], {"model_type": "x"})
    assert table.steps_per_s == pytest.approx([1000.0, 500.0, 250.0, 125.0])  # 1 / step seconds, not tokens/s
    cuda = device == "cuda"
    assert timer.calls[1:] == [(1, False), (2, cuda), (4, False), (8, cuda)]  # after one untimed first call
    assert table.capture_sizes == [2, 8]


def test_default_sweeps_follow_their_documented_spacing():
    assert vllm_capture_sizes(512) == [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]
    assert default_sizes(1024) == [1, 2, 4, 8, *range(16, 129, 8), *range(160, 513, 32), 640, 768, 896, 1024]
