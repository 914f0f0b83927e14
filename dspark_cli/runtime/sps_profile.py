"""Measure an SPS table: time one real target forward (transformers, random weights built from the
model's config) at each batch size B, decode-shaped: B sequences of one new token on top of a
prefilled KV cache of `context` tokens, i.e. what a verify step costs per token in the batch."""

import inspect
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dspark_cli.errors import UsageError
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

    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    data = json.loads(config_file.read_text())
    if "model_type" not in data:
        raise ValueError(f"{config_file} has no model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data["model_type"]
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        import transformers

        # AutoConfig's own error lists every model type it knows (~30 KB): name just this one
        raise ValueError(f"{config_file}: unknown model_type {model_type!r} "
                         f"(transformers {transformers.__version__} has no such model)")
    return AutoConfig.for_model(**data)


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

        transformers.logging.set_verbosity_error()  # deprecation chatter would break the progress bar
        torch.manual_seed(settings.seed)
        self.settings = settings
        previous = torch.get_default_dtype()
        torch.set_default_dtype(settings.dtype)  # build in the target dtype, directly on the device
        try:
            with torch.device(settings.device):
                self.model = transformers.AutoModelForCausalLM.from_config(config).eval()
        finally:
            torch.set_default_dtype(previous)
        self.vocab = config.vocab_size
        params = inspect.signature(self.model.forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
        self._check_kv_cache(config.model_type)

    @torch.inference_mode()
    def _check_kv_cache(self, model_type: str) -> None:
        """Refuse, before any timing, a model without a KV cache we can crop back to the context
        (a failure mid-timing reads as a device problem). UsageError, not ValueError: the CLI would
        report a ValueError as a config transformers cannot build, and it built this one."""
        name = type(self.model).__name__
        if getattr(self.model, "_is_stateful", False):  # transformers' flag for a recurrent state (mamba, rwkv, hybrids)
            reason = f"{name} keeps a recurrent state that cannot be rolled back"
        else:
            probe = torch.zeros(1, 1, dtype=torch.long, device=self.settings.device)
            cache = getattr(self.model(input_ids=probe, use_cache=True), self.cache_name, None)
            if callable(getattr(cache, "crop", None)):
                return
            reason = f"{name} returns no KV cache"
        raise UsageError(f"model_type {model_type!r} is not supported: {reason}; dspark profile times "
                         "a causal LM with a KV cache (a decoder-only transformer such as llama or qwen3)")

    def _sync(self):
        if self.settings.device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.inference_mode()
    def median_step_seconds(self, batch: int) -> float:
        s = self.settings
        gen = torch.Generator(device="cpu").manual_seed(s.seed + batch)
        prompt = torch.randint(self.vocab, (batch, s.context), generator=gen).to(s.device)
        cache = getattr(self.model(input_ids=prompt, use_cache=True), self.cache_name)
        step = torch.randint(self.vocab, (batch, 1), generator=gen).to(s.device)
        times = []
        for i in range(s.warmup + s.repeats):
            self._sync()
            start = time.perf_counter()
            self.model(input_ids=step, use_cache=True, **{self.cache_name: cache})
            self._sync()
            if i >= s.warmup:
                times.append(time.perf_counter() - start)
            cache.crop(-1)  # drop the token just appended: every repeat sees the same context
        del cache
        return statistics.median(times)


def profile_table(timer: ForwardTimer, sizes: list[int], capture_sizes: list[int], metadata: dict,
                  on_size=None) -> SPSTable:
    timer.median_step_seconds(sizes[0])  # first-call costs (allocator, kernels) stay out of the table
    steps = []
    for batch in sizes:
        seconds = timer.median_step_seconds(batch)
        steps.append(1.0 / seconds)
        if on_size is not None:
            on_size(batch, seconds)
    return SPSTable(sizes, steps, capture_sizes, metadata)
