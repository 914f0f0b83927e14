"""Tiny constructed checkpoints for end-to-end checks in any engine (vLLM, TGI, transformers): a
Qwen3 target and DSpark drafts in the released format (architecture `Qwen3DSparkModel`, config keys
and tensor names of DSPARK.md §2).

- `successor` target: greedy next token = (prev + 1) mod V. Every layer's o_proj/down_proj is
  zero, so the residual stream stays the token embedding; lm_head row y is embedding row y−1.
- `oracle` draft: zero final norm (base logits U = 0) and a one-hot Markov head W2·W1[x] = α·e_{f(x)}
  with f(x) = x+1 (or a partially wrong f); confidence head bias +6 (c ≈ 0.998).
- `random` target/draft: seeded random weights; a `flat` target is a random one whose head is
  scaled down so its next-token distribution is spread out: sampled drafts are often accepted and
  every draw shows in the output.
- `fork` target/draft: at temperature 1 the next token is x+1 or x+2 (nearly all the mass, in
  proportions that vary with x), so a few sampled tokens cover each output position; the draft's
  Markov head draws x+1 or x+2 about evenly, and its confidence depends on the parity of the
  previous drafted token (c ≈ 0.98 after an even one, 0.02 after an odd one): a scheduler that let
  a_{k+1} decide whether x_k is verified would favour even tokens (DSPARK.md §4, Appendix A).
- `fitted` draft: the oracle's construction with f(x) = the token that most often follows x in
  given outputs of a context-dependent (random) target: drafts accepted often, rejected often enough,
  so an engine's multi-token steps run next to its rejections.
- `skew` draft: the fork draft leaning 9 : 1 to x+1, confidence as the oracle's. Its q differs
  from the fork target's p, and from row to row in which tokens it favours: a draft verified with
  another row's q (drafted after another token) biases the output."""

import copy
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

VOCAB = 256
HIDDEN = 128
HEAD_DIM = 64
TARGET_LAYERS = 4
DRAFT_LAYERS = 2
TARGET_LAYER_IDS = [0, 2]  # decoder-layer outputs the draft reads (never the last layer)
MASK_TOKEN_ID = VOCAB - 1
MARKOV_SCALE = 40.0
FORK_LOGIT = 12.0  # the fork target's logit for x+1 and x+2 (others: about ±1.5)
SKEW_LOGIT = math.log(9.0)  # the skew draft's lean: odds 9 : 1 for x+1 against x+2
WEIGHTS = "model.safetensors"


def target_config() -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": TARGET_LAYERS,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": HEAD_DIM,
        "hidden_act": "silu", "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "tie_word_embeddings": False, "attention_bias": False, "sliding_window": None,
        "use_sliding_window": False, "bos_token_id": 0, "eos_token_id": VOCAB - 2,
        "dtype": "float32", "torch_dtype": "float32",
    }


def draft_config(gamma: int) -> dict:
    cfg = copy.deepcopy(target_config())
    cfg.update({
        "architectures": ["Qwen3DSparkModel"], "num_hidden_layers": DRAFT_LAYERS,
        "num_target_layers": TARGET_LAYERS, "block_size": gamma, "target_layer_ids": TARGET_LAYER_IDS,
        "mask_token_id": MASK_TOKEN_ID, "num_anchors": 512, "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * DRAFT_LAYERS, "enable_confidence_head": True,
        "confidence_head_with_markov": True, "markov_rank": VOCAB, "markov_head_type": "vanilla",
    })
    return cfg


def layer_tensors(prefix: str, g: torch.Generator, std: float, hidden: int = HIDDEN,
                  head_dim: int = HEAD_DIM) -> dict:
    """One Qwen3 decoder layer (2 query heads, 1 KV head, MLP width 2·hidden): seeded random
    projections, unit norms."""
    q, kv, inter = 2 * head_dim, head_dim, 2 * hidden
    shapes = {
        "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    out = {f"{prefix}.{k}": torch.randn(s, generator=g) * std for k, s in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"{prefix}.{norm}.weight"] = torch.ones(hidden)
    for norm in ("self_attn.q_norm", "self_attn.k_norm"):
        out[f"{prefix}.{norm}.weight"] = torch.ones(head_dim)
    return out


def read_weights(path: Path) -> dict:
    return load_file(str(Path(path) / WEIGHTS))


def write_weights(path: Path, tensors: dict) -> None:
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(Path(path) / WEIGHTS))


def _save(path: Path, config: dict, tensors: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_weights(path, tensors)
    return path


def build_target(path: Path, kind: str = "successor", seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(VOCAB, HIDDEN, generator=g)
    tensors = {"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(HIDDEN)}
    for i in range(TARGET_LAYERS):
        tensors.update(layer_tensors(f"model.layers.{i}", g, 0.1))
    if kind in ("successor", "fork"):
        for i in range(TARGET_LAYERS):
            tensors[f"model.layers.{i}.self_attn.o_proj.weight"].zero_()
            tensors[f"model.layers.{i}.mlp.down_proj.weight"].zero_()
    if kind == "successor":
        tensors["lm_head.weight"] = torch.roll(embed, shifts=1, dims=0)
    elif kind == "fork":  # the final hidden is e_x / rms(e_x): logit y = FORK_LOGIT·(cos(e_x, e_{y-1}) + cos(e_x, e_{y-2}))
        unit = embed / embed.norm(dim=1, keepdim=True) / HIDDEN ** 0.5
        tensors["lm_head.weight"] = FORK_LOGIT * (torch.roll(unit, shifts=1, dims=0) + torch.roll(unit, shifts=2, dims=0))
    elif kind in ("random", "flat"):
        tensors["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=g) * (0.3 if kind == "random" else 0.05)
    else:
        raise ValueError(f"unknown target kind {kind!r}")
    return _save(path, target_config(), tensors)


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer for a constructed model: token i is byte i (V = 256), as GPT-2's byte
    alphabet spells it, no merges; so text, regexes and JSON grammars map to token ids one byte each
    (vLLM's structured outputs need a real tokenizer). BOS is byte 0 and EOS byte 254, as the
    configs say. tokenizer.json + a PreTrainedTokenizerFast config, readable by any transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(VOCAB) if b not in printable]  # spelled from U+0100 up, as GPT-2 does
    spelling = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    tok = Tokenizer(models.BPE(vocab={spelling[b]: b for b in range(VOCAB)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(Path(path) / "tokenizer.json"))
    (Path(path) / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": spelling[0], "eos_token": spelling[VOCAB - 2],
        "model_max_length": 1024}, indent=2))


def successor_tokens(prompt: list[int], n: int) -> list[int]:
    """The successor target's greedy continuation of `prompt`: n tokens counting up from its last."""
    return [(prompt[-1] + 1 + i) % VOCAB for i in range(n)]


def load_transformers(path: Path):
    """A constructed target as a transformers causal LM (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def successor_map(kind: str) -> torch.Tensor:
    """f(x) that the Markov head of an oracle-style draft predicts after token x."""
    x = torch.arange(VOCAB)
    if kind == "oracle":
        return (x + 1) % VOCAB
    if kind == "partial":  # right for two tokens in three
        return torch.where(x % 3 == 2, (x + 2) % VOCAB, (x + 1) % VOCAB)
    raise ValueError(f"unknown draft kind {kind!r}")


def fitted_map(sequences: list[list[int]]) -> torch.Tensor:
    """f(x) for a `fitted` draft: the token that most often follows x in `sequences` (ties to the
    lower id; x+1 where x is never followed)."""
    counts = torch.zeros(VOCAB, VOCAB)
    for seq in sequences:
        for x, y in zip(seq, seq[1:]):
            counts[x, y] += 1
    return torch.where(counts.sum(dim=1) > 0, counts.argmax(dim=1), (torch.arange(VOCAB) + 1) % VOCAB)


def build_draft(path: Path, gamma: int, kind: str = "oracle", target: Path | None = None, seed: int = 1,
                follows: torch.Tensor | None = None) -> Path:
    """kind: oracle | partial | fitted (Markov head encodes f, base logits zero; fitted: f = follows,
    from fitted_map) | fork | skew | random | backbone (the first draft from the backbone alone, below)."""
    g = torch.Generator().manual_seed(seed)
    n_aux = len(TARGET_LAYER_IDS)
    tensors = {
        "fc.weight": torch.randn(HIDDEN, n_aux * HIDDEN, generator=g) * 0.05,
        "hidden_norm.weight": torch.ones(HIDDEN), "norm.weight": torch.ones(HIDDEN),
        "confidence_head.proj.weight": torch.randn(1, HIDDEN + VOCAB, generator=g) * 0.1,
        "confidence_head.proj.bias": torch.tensor([1.0]),
    }
    for i in range(DRAFT_LAYERS):
        tensors.update(layer_tensors(f"layers.{i}", g, 0.1))
    if target is not None:  # the released drafts carry byte copies of the target's embedding/head
        t = read_weights(target)
        tensors["embed_tokens.weight"], tensors["lm_head.weight"] = t["model.embed_tokens.weight"], t["lm_head.weight"]
    else:
        tensors["embed_tokens.weight"] = torch.randn(VOCAB, HIDDEN, generator=g)
        tensors["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=g) * 0.3
    w1 = torch.eye(VOCAB)
    x = torch.arange(VOCAB)
    if kind == "random":
        w2 = torch.randn(VOCAB, VOCAB, generator=g)
    elif kind == "backbone":
        # Needs the successor target, whose embedding and head it copies. Attention and MLP add
        # nothing, so the anchor's query (the block's first) keeps the anchor's embedding and its
        # base logits are the target's: the first draft is the anchor + 1, from the backbone alone.
        # The mask token's embedding is zero (its queries' base logits flat) and the Markov head is
        # zero: each step accepts the first draft and no other (2 tokens per step; 1 if the
        # backbone's draft went astray).
        if target is None:
            raise ValueError("a backbone draft copies the successor target's embedding and head: pass target")
        for i in range(DRAFT_LAYERS):
            tensors[f"layers.{i}.self_attn.o_proj.weight"].zero_()
            tensors[f"layers.{i}.mlp.down_proj.weight"].zero_()
        tensors["embed_tokens.weight"] = tensors["embed_tokens.weight"].clone()
        tensors["embed_tokens.weight"][MASK_TOKEN_ID] = 0.0
        w2 = torch.zeros(VOCAB, VOCAB)
        tensors["confidence_head.proj.weight"] = torch.zeros(1, HIDDEN + VOCAB)
        tensors["confidence_head.proj.bias"] = torch.tensor([6.0])
    elif kind in ("oracle", "partial", "fitted", "fork", "skew"):
        tensors["norm.weight"] = torch.zeros(HIDDEN)  # h = 0, so U = lm_head(h) = 0
        w2 = torch.zeros(VOCAB, VOCAB)
        if kind == "fitted" and follows is None:
            raise ValueError("a fitted draft needs `follows` (fitted_map of the target's outputs)")
        if kind in ("oracle", "partial", "fitted"):
            w2[follows if kind == "fitted" else successor_map(kind), x] = MARKOV_SCALE
        else:  # x+1 or x+2: evenly (fork) or 9 : 1 (skew)
            lean = SKEW_LOGIT / 2 if kind == "skew" else 0.0
            w2[(x + 1) % VOCAB, x] = FORK_LOGIT + lean
            w2[(x + 2) % VOCAB, x] = FORK_LOGIT - lean
        # c ≈ 0.998 everywhere; the fork draft's c_k by the parity of x_{k-1} instead (W1 = I)
        parity = torch.where(x % 2 == 0, 4.0, -4.0) if kind == "fork" else torch.zeros(VOCAB)
        tensors["confidence_head.proj.weight"] = torch.cat([torch.zeros(HIDDEN), parity]).unsqueeze(0)
        tensors["confidence_head.proj.bias"] = torch.tensor([0.0 if kind == "fork" else 6.0])
    else:
        raise ValueError(f"unknown draft kind {kind!r}")
    tensors["markov_head.markov_w1.weight"] = w1
    tensors["markov_head.markov_w2.weight"] = w2
    return _save(path, draft_config(gamma), tensors)
