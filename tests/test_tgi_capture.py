"""Target-side capture for TGI: the hook copies the configured layers' residual stream into a static
buffer (so a CUDA graph replays the copy), and the TGI v3.3.7 fields our hooks read exist in the real
tree (DSPARK_TGI_SRC; TGI's server itself does not import here)."""

import ast
import re
from pathlib import Path

import pytest
import torch

from dspark_cli.integrations.tgi.speculation import HiddenCapture
from tests.tgi_tree import TGI_SRC, needs_tree


class DeferredResidualLayer(torch.nn.Module):
    """Shape of TGI's FlashLlamaLayer.forward: returns (mlp_output, attn_res), the add deferred."""

    def __init__(self, d: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(d, d, generator=g) * 0.3)

    def forward(self, hidden, residual):
        x = hidden if residual is None else hidden + residual
        return torch.tanh(x @ self.w), x


class TinyTarget(torch.nn.Module):
    def __init__(self, d: int = 8, n: int = 4):
        super().__init__()
        self.layers = torch.nn.ModuleList([DeferredResidualLayer(d, i) for i in range(n)])

    def forward(self, x):
        residual, streams = None, []
        for layer in self.layers:
            x, residual = layer(x, residual)
            streams.append(x + residual)
        return streams


def test_features_are_the_residual_streams_of_the_last_forward():
    target, d = TinyTarget(), 8
    capture = HiddenCapture(target, [0, 2])
    big = torch.randn(6, d)
    target(big)  # first (warmup-sized) forward sizes the buffer
    x = torch.randn(3, d)
    streams = target(x)
    feats = capture.features(3)
    assert feats.shape == (3, 2 * d)
    assert torch.allclose(feats, torch.cat([streams[0], streams[2]], -1))
    with pytest.raises(RuntimeError, match="did not run on 7 rows"):
        capture.features(7)


def test_eager_forwards_past_the_pinned_buffer_use_their_own():
    """Once a CUDA graph was captured through it the buffer cannot move; TGI then still runs decode
    batches past its largest graph eagerly, with B·(1 + L) rows that can exceed the warmup prefill
    that sized the buffer. Those go to an overflow buffer; smaller forwards (replays included) keep
    using the pinned one, and features(n) reads the one a forward of n rows wrote."""
    target, d = TinyTarget(), 8
    capture = HiddenCapture(target, [0, 2])
    target(torch.randn(6, d))  # warmup prefill: 6 rows
    capture.graph_captured = True  # as after TGI's graph capture (CPU: no graphs; the flag is the state)
    pinned = capture.buffer
    for n in (10, 3, 12, 6, 10):
        x = torch.randn(n, d)
        streams = target(x)
        assert torch.equal(capture.features(n), torch.cat([streams[0], streams[2]], -1)), n
        assert capture.buffer is pinned and pinned.shape[0] == 6
    assert capture.overflow.shape[0] == 12
    with pytest.raises(RuntimeError, match="did not run on 13 rows"):
        capture.features(13)


def test_last_layer_is_refused():
    with pytest.raises(ValueError, match="last layer"):
        HiddenCapture(TinyTarget(n=3), [0, 2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graph capture)")
def test_capture_is_replayed_by_a_cuda_graph():
    d = 64
    target = TinyTarget(d).cuda()
    capture = HiddenCapture(target, [1, 2])
    target(torch.randn(32, d, device="cuda"))  # eager warmup sizes the buffer (TGI: warmup prefill)
    static_in = torch.zeros(8, d, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        target(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        target(static_in)
    assert capture.graph_captured
    for _ in range(2):
        x = torch.randn(5, d, device="cuda")  # 5 real rows, padded to the graph's 8
        static_in.zero_()
        static_in[:5] = x
        graph.replay()
        replayed = capture.features(5).clone()
        ref = target(x)  # eager, for comparison
        assert torch.allclose(replayed, torch.cat([ref[1], ref[2]], -1), atol=1e-5)
    pinned = capture.buffer.data_ptr()
    big = torch.randn(64, d, device="cuda")  # eager past the largest graph: the overflow buffer
    ref = target(big)
    assert torch.allclose(capture.features(64), torch.cat([ref[1], ref[2]], -1))
    assert capture.buffer.data_ptr() == pinned
    graph.replay()  # a replay after it is read from the pinned buffer again
    assert torch.allclose(capture.features(5), replayed)
    with pytest.raises(RuntimeError, match="cannot grow"):  # a graph larger than the pinned buffer
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            target(torch.zeros(64, d, device="cuda"))


def _class_fields(source: str, name: str) -> set[str]:
    """Annotated fields and self.<attr> assignments of class `name`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == name:
            fields = {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
            for n in ast.walk(node):
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self" \
                        and isinstance(n.ctx, ast.Store):
                    fields.add(n.attr)
            return fields
    raise AssertionError(f"class {name} not found")


@needs_tree
def test_hooks_read_fields_that_exist_in_tgi_v3_3_7():
    server = Path(TGI_SRC) / "server" / "text_generation_server"
    batch = _class_fields((server / "models" / "flash_causal_lm.py").read_text(), "FlashCausalLMBatch")
    assert {"requests", "position_ids", "cu_seqlen_prefill", "cache_lengths", "input_ids", "all_input_ids_tensor",
            "max_current_length", "next_token_chooser", "speculative_ids"} <= batch
    chooser = _class_fields((server / "utils" / "tokens.py").read_text(), "HeterogeneousNextTokenChooser")
    assert {"watermark_processor", "repetition_processor", "frequency_processor", "grammar_processor", "warpers",
            "fsm_grammar_states", "do_sample"} <= chooser
    proto = (Path(TGI_SRC) / "proto" / "v3" / "generate.proto").read_text()
    assert re.search(r"message Request \{[^}]*uint64 id = 1;[^}]*NextTokenChooserParameters parameters", proto)
    assert re.search(r"message NextTokenChooserParameters \{[^}]*float temperature", proto)


@needs_tree
def test_llama_and_qwen2_flash_layers_are_found_by_the_capture():
    """Both families keep their decoder layers in `self.layers` (an nn.ModuleList), which
    find_layers hooks; Llama's layer defers the residual add (a tuple), Qwen2's returns the sum."""
    models = Path(TGI_SRC) / "server" / "text_generation_server" / "models" / "custom_modeling"
    llama = (models / "flash_llama_modeling.py").read_text()
    qwen2 = (models / "flash_qwen2_modeling.py").read_text()
    assert "self.layers = nn.ModuleList()" in llama and "return mlp_output, attn_res" in llama
    assert re.search(r"self\.layers = nn\.ModuleList\(", qwen2)
    assert "hidden_states = mlp_output + residual\n        return hidden_states" in qwen2
