"""Tiny constructed targets for running the real TGI shard: Llama and Qwen2 checkpoints (the two
flash model families the series captures from) and Qwen3 (TGI's transformers backend, patch 0004)
with a word-level tokenizer, so TGI loads them
from a local directory like any hub model. Same dimensions as dspark_cli.tiny_models,
so its DSpark drafts (released format) fit them: the successor target's greedy next token is
(prev + 1) mod V and the `oracle` draft predicts exactly that."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dspark_cli import tiny_models

FAMILIES = ("llama", "qwen2", "qwen3")  # qwen3: TGI's transformers backend (no flash Qwen3 model)
LOOP_FROM, LOOP_TO = 23, 22  # the `loop` target: successor, except 23 → 22 (20 21 22 23 22 23 …)


def loop_map() -> torch.Tensor:
    f = (torch.arange(tiny_models.VOCAB) + 1) % tiny_models.VOCAB
    f[LOOP_FROM] = LOOP_TO
    return f


def build(path: Path, family: str = "llama", kind: str = "successor", seed: int = 0,
          logit_scale: float = 1.0) -> Path:
    """A `family` checkpoint of the `kind` weights of tiny_models.build_target (successor | random), or
    `loop`: the successor target with lm_head row y = Σ embed[x] over f(x) = y for f = loop_map(),
    so greedy decoding revisits tokens (what repetition penalties act on).
    logit_scale multiplies lm_head (a small scale gives a spread-out distribution to sample from)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    path = Path(path)
    tiny_models.build_target(path, "successor" if kind == "loop" else kind, seed=seed)
    tensors = tiny_models.read_weights(path)
    if kind == "loop":
        embed = tensors["model.embed_tokens.weight"]
        tensors["lm_head.weight"] = torch.zeros_like(embed).index_add_(0, loop_map(), embed)
    # Qwen3's per-head q/k norms are not part of Llama or Qwen2; Qwen2 adds q/k/v biases.
    if family != "qwen3":
        tensors = {k: v for k, v in tensors.items() if "q_norm" not in k and "k_norm" not in k}
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * logit_scale
    g = torch.Generator().manual_seed(seed + 1000)
    if family == "qwen2":
        for i in range(tiny_models.TARGET_LAYERS):
            for proj, width in (("q_proj", 2 * tiny_models.HEAD_DIM), ("k_proj", tiny_models.HEAD_DIM),
                                ("v_proj", tiny_models.HEAD_DIM)):
                tensors[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.randn(width, generator=g) * 0.05
    tiny_models.write_weights(path, tensors)
    (path / "config.json").write_text(json.dumps(_config(family), indent=2))
    write_tokenizer(path)
    return path


def build_map_draft(path: Path, gamma: int, target: Path, mapping: torch.Tensor,
                    scale: float = tiny_models.MARKOV_SCALE) -> Path:
    """A draft (released format) whose Markov head predicts mapping[prev] with logit `scale` over
    zero base logits: one-hot q at the default scale (e.g. loop_map() for the `loop` target), a q
    that also spreads over every other token at a small one."""
    tiny_models.build_draft(path, gamma=gamma, kind="oracle", target=target)
    tensors = tiny_models.read_weights(path)
    w2 = torch.zeros(tiny_models.VOCAB, tiny_models.VOCAB)
    w2[mapping, torch.arange(tiny_models.VOCAB)] = scale
    tensors["markov_head.markov_w2.weight"] = w2
    tiny_models.write_weights(path, tensors)
    return Path(path)


def _config(family: str) -> dict:
    c = tiny_models.target_config()
    base = {k: c[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                              "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                              "bos_token_id", "eos_token_id", "torch_dtype")}
    base["rope_theta"] = c["rope_parameters"]["rope_theta"]
    if family == "qwen3":  # transformers 4.51 (TGI's pin) reads rope_theta, not rope_parameters
        return {**tiny_models.target_config(), "rope_theta": base["rope_theta"]}
    if family == "llama":
        return {**base, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                "mlp_bias": False}
    return {**base, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": tiny_models.TARGET_LAYERS}


def token(i: int) -> str:
    return f"t{i}"


def text(ids: list[int]) -> str:
    return " ".join(token(i) for i in ids)


def write_tokenizer(path: Path) -> None:
    """Word-level vocabulary t0 … t{V-1}: token i is the word `t{i}`; no special tokens are added.
    Written as tokenizer.json + a PreTrainedTokenizerFast config so any transformers version reads it."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers

    unk = token(tiny_models.VOCAB - 3)
    tok = Tokenizer(tok_models.WordLevel({token(i): i for i in range(tiny_models.VOCAB)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(Path(path) / "tokenizer.json"))
    (Path(path) / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(0), "eos_token": token(tiny_models.VOCAB - 2),
        "unk_token": unk, "pad_token": unk, "model_max_length": 1024}, indent=2))
