"""Measure an SPS table: time one real target forward (transformers, random weights built from the
model's config) at each batch size B, decode-shaped: B sequences of one new token on top of a
prefilled KV cache of `context` tokens, i.e. what a verify step costs per token in the batch.

On CUDA a B that is one of the engine's capture sizes is timed as the engine runs it: a replay of
the forward captured in a CUDA graph. Timed eagerly, a model's step on a fast GPU is mostly Python
dispatch, nearly flat in B, and that curve would tell the scheduler that verifying is free."""

import copy
import inspect
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dspark_cli.errors import UsageError
from dspark_cli.model_config import config_path
from dspark_cli.runtime.sps import SPSTable


def default_sizes(max_tokens: int) -> list[int]:
    """Dense where curves bend (small B), sparser above: 1,2,4,8, then every 8 to 128, every 32 to
    512, every 128 beyond, always ending at max_tokens."""
    raw = [1, 2, 4, 8, *range(16, 129, 8), *range(160, 513, 32), *range(640, max_tokens + 1, 128)]
    sizes = sorted({b for b in raw if b <= max_tokens})
    return sizes if sizes and sizes[-1] == max_tokens else sizes + [max_tokens]


def vllm_capture_sizes(max_tokens: int) -> list[int]:
    """vLLM's default CUDA-graph capture sizes (1, 2, 4, then every 8 to 256, every 16 beyond)."""
    raw = [1, 2, 4, *range(8, 256, 8), *range(256, max_tokens + 1, 16)]
    return [b for b in raw if b <= max_tokens]


def load_config(path: Path):
    """A model directory with config.json, or a config.json file."""
    from transformers import AutoConfig

    config_file = config_path(path)
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{config_file} is not JSON ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{config_file} has no model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data["model_type"]
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        import transformers

        # AutoConfig's own error lists every model type it knows (~30 KB): name just this one
        raise ValueError(f"{config_file}: unknown model_type {model_type!r} "
                         f"(transformers {transformers.__version__} has no such model)")
    return AutoConfig.for_model(**data)


ATTENTION = "dspark_profile_sdpa"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention as a serving engine's step reads it, for the only two shapes timed here: a prefill,
    causal from position 0, and one decode token that sees the whole cache (every slot written), so
    no mask is needed; grouped-query heads read K/V once. transformers' own SDPA path builds a full
    mask and copies K/V per query head while a CUDA graph is captured: 3.5x the step at B = 128 on an
    H200. Sliding windows and soft caps are not applied (timing only: context below the window)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=query.shape[2] > 1, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


@dataclass
class ProfileSettings:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    context: int = 64
    warmup: int = 2
    repeats: int = 5
    seed: int = 0


class ForwardTimer:
    """A randomly initialized causal LM and the decode-shaped forward we time."""

    def __init__(self, config, settings: ProfileSettings):
        import transformers

        transformers.AttentionInterface.register(ATTENTION, _attention)
        transformers.logging.set_verbosity_error()  # deprecation chatter would break the progress bar
        torch.manual_seed(settings.seed)
        self.settings = settings
        previous = torch.get_default_dtype()
        torch.set_default_dtype(settings.dtype)  # build in the target dtype, directly on the device
        try:
            with torch.device(settings.device):
                try:
                    self.model = transformers.AutoModelForCausalLM.from_config(
                        copy.deepcopy(config), attn_implementation=ATTENTION)  # a refusal leaves it set in the config
                except ValueError:  # a model that takes no attention function (mamba: it has none) keeps its own
                    self.model = transformers.AutoModelForCausalLM.from_config(config)
                self.model.eval()
        finally:
            torch.set_default_dtype(previous)
        self.config = self.model.config
        self.vocab = config.get_text_config().vocab_size  # (a multimodal config keeps it in text_config)
        params = inspect.signature(self.model.forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
        # A prefill fills the cache; its logits (B·context·V: 78 GB at B = 1008, context 256, V = 152k
        # in bf16) are not wanted, only the last position's where the model can keep just those.
        self.prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._check_kv_cache(config.model_type)

    @torch.inference_mode()
    def _check_kv_cache(self, model_type: str) -> None:
        """Refuse, before any timing, a model without a KV cache we can crop back to the context
        (a failure mid-timing reads as a device problem). UsageError, not ValueError: the CLI would
        report a ValueError as a config transformers cannot build, and it built this one."""
        name = type(self.model).__name__
        recurrent = f"{name} keeps a recurrent state that cannot be rolled back"
        if getattr(self.model, "_is_stateful", False):  # transformers' flag for a recurrent state (mamba, rwkv, hybrids)
            raise self._unsupported(model_type, recurrent)
        probe = torch.zeros(1, 2, dtype=torch.long, device=self.settings.device)
        cache = getattr(self.model(input_ids=probe, use_cache=True), self.cache_name, None)
        if not callable(getattr(cache, "crop", None)):
            raise self._unsupported(model_type, f"{name} returns no KV cache")
        try:  # transformers 5.25 gives mamba a cache whose crop raises instead of the flag
            cache.crop(-1)  # as each timed step does
        except (RuntimeError, ValueError, NotImplementedError):
            raise self._unsupported(model_type, recurrent) from None

    @staticmethod
    def _unsupported(model_type: str, reason: str) -> UsageError:
        return UsageError(f"model_type {model_type!r} is not supported: {reason}; dspark profile times "
                          "a causal LM with a KV cache (a decoder-only transformer such as llama or qwen3)")

    def _sync(self):
        if self.settings.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt [B, context] and the one new token per sequence [B, 1] timed at size B."""
        s = self.settings
        gen = torch.Generator(device="cpu").manual_seed(s.seed + batch)
        prompt = torch.randint(self.vocab, (batch, s.context), generator=gen).to(s.device)
        return prompt, torch.randint(self.vocab, (batch, 1), generator=gen).to(s.device)

    def _seconds(self, call) -> float:
        """Median wall time of `repeats` calls after `warmup` untimed ones."""
        s = self.settings
        times = []
        for i in range(s.warmup + s.repeats):
            self._sync()
            start = time.perf_counter()
            call()
            self._sync()
            if i >= s.warmup:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    @torch.inference_mode()
    def median_step_seconds(self, batch: int, graph: bool = False) -> float:
        """The decode step at size B, eager or (on CUDA) as a CUDA-graph replay."""
        if graph:
            try:
                return self._graph_replay_seconds(self.static_step(batch))
            except RuntimeError as exc:
                raise RuntimeError(f"at B={batch} (a prefill, then the step captured in a CUDA graph): {exc} "
                                   "(--capture-sizes none times every size eagerly)") from exc
        try:  # the graphs' step run eagerly: a dynamic cache's update copies the whole cache per layer
            static = self.static_step(batch)  # each step, which a paged engine never does
        except RuntimeError:  # a transformers without device fill counters: the dynamic cache, cropped
            static = None
        if static is not None:
            return self._seconds(static)
        prompt, step = self._inputs(batch)
        cache = getattr(self.model(input_ids=prompt, use_cache=True, **self.prefill_kwargs), self.cache_name)

        def forward():
            self.model(input_ids=step, use_cache=True, **{self.cache_name: cache})
            cache.crop(-1)  # drop the token just appended: every call sees the same context

        return self._seconds(forward)

    @torch.inference_mode()
    def static_step(self, batch: int):
        """The decode step at size B over a StaticCache prefilled with the context: every tensor it
        touches stays in place, so it can be captured in a CUDA graph. Returns a function giving the
        step's logits; each call first sets the cache's fill counters back to the context (on the
        device, so a replay does it too), so every call writes the slot after the context again."""
        from transformers import StaticCache

        s = self.settings
        prompt, step = self._inputs(batch)
        cache = StaticCache(config=self.config, max_cache_len=s.context + 1)
        self.model(input_ids=prompt, use_cache=True, **self.prefill_kwargs, **{self.cache_name: cache})
        counters = [getattr(layer, "cumulative_length", None) for layer in cache.layers]
        if not all(isinstance(c, torch.Tensor) for c in counters):  # transformers keeps it as a device tensor since 5.x
            raise RuntimeError("this transformers' StaticCache keeps no device fill counter to rewind")
        position = torch.full((1, 1), s.context, device=s.device)

        @torch.inference_mode()
        def forward() -> torch.Tensor:
            for counter in counters:
                counter.fill_(s.context)
            return self.model(input_ids=step, position_ids=position, use_cache=True,
                              **{self.cache_name: cache}).logits
        return forward

    def _graph_replay_seconds(self, forward) -> float:
        graph, _ = capture_graph(forward)
        return self._seconds(graph.replay)


def capture_graph(forward):
    """forward() captured in a CUDA graph: (graph, the tensor it returns, rewritten by each replay)."""
    side = torch.cuda.Stream()  # capture wants its warm-up call off the default stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = forward()
    return graph, output


def profile_table(timer: ForwardTimer, sizes: list[int], capture_sizes: list[int], metadata: dict,
                  on_size=None) -> SPSTable:
    """Time every size; on CUDA the capture sizes as graph replays, the others eagerly (an engine
    pads a batch up to a capture size, and runs one above the largest eagerly)."""
    graphs = set(capture_sizes) if timer.settings.device.startswith("cuda") else set()
    metadata = {**metadata, "timing": "CUDA-graph replay at the capture sizes, eager elsewhere" if graphs else "eager"}
    timer.median_step_seconds(sizes[0])  # first-call costs (allocator, kernels) stay out of the table
    steps = []
    for batch in sizes:
        seconds = timer.median_step_seconds(batch, graph=batch in graphs)
        steps.append(1.0 / seconds)
        if on_size is not None:
            on_size(batch, seconds)
    return SPSTable(sizes, steps, capture_sizes, metadata)
