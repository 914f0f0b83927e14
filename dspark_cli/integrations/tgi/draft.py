"""The DSpark drafter for TGI: the released checkpoint format (Qwen3DSparkModel: config.json keys and
tensor names of DSPARK.md §2) in plain torch, with its own per-request context KV cache.

Why plain torch: TGI's flash layers assume paged KV and causal attention; the draft needs
non-causal attention from γ block queries onto "committed context + the block" (KV injection), so
it keeps its own small cache (5 layers × committed tokens) and runs SDPA without a mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dspark_cli import runtime


@dataclass
class DraftConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    block_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    rope_theta: float
    rms_norm_eps: float

    @classmethod
    def load(cls, path: Path) -> "DraftConfig":
        c = json.loads((Path(path) / "config.json").read_text())
        if "Qwen3DSparkModel" not in c.get("architectures", []):
            raise ValueError(f"{path}: not a Qwen3DSparkModel checkpoint (architectures={c.get('architectures')})")
        rope = c.get("rope_parameters") or {}
        return cls(hidden_size=c["hidden_size"], num_heads=c["num_attention_heads"],
                   num_kv_heads=c["num_key_value_heads"],
                   head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                   num_layers=c["num_hidden_layers"], block_size=c["block_size"], mask_token_id=c["mask_token_id"],
                   target_layer_ids=list(c["target_layer_ids"]),
                   rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 1e6))),
                   rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)))


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [n, heads, hd] rotated at absolute positions [n] (rotate-half convention, as Qwen3)."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    ang = positions.float()[:, None] * inv[None]
    cos, sin = ang.cos().repeat(1, 2)[:, None], ang.sin().repeat(1, 2)[:, None]
    xf = x.float()
    x1, x2 = xf[..., : hd // 2], xf[..., hd // 2:]
    return (xf * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


@dataclass
class RequestCache:
    """Context K/V per draft layer for one request's committed tokens (positions < anchor)."""
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    length: int = 0


@dataclass
class BlockProposal:
    draft: runtime.MarkovDraft     # tokens [R, γ], q_token, q, prev_emb
    confidence: torch.Tensor       # c [R, γ] (conditional)
    survival: torch.Tensor         # a [R, γ]


class DSparkDraft:
    def __init__(self, config: DraftConfig, weights: dict[str, torch.Tensor],
                 sts: runtime.STSCalibration | None = None):
        self.config = config
        self.w = weights
        self.sts = sts  # per-position confidence temperatures (DSPARK_STS); None = raw sigmoid
        # The confidence head's weight and bias in fp32 once here (the chain's head reads fp32), or
        # None for a checkpoint without the head.
        self.confidence_head = (weights["confidence_head.proj.weight"].float(),
                                weights["confidence_head.proj.bias"].float()) \
            if "confidence_head.proj.weight" in weights else None
        self.caches: dict[int, RequestCache] = {}

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "DSparkDraft":
        from safetensors.torch import load_file

        config = DraftConfig.load(path)
        weights = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            weights.update({k: v.to(device=device, dtype=dtype) for k, v in load_file(str(f)).items()})
        missing = [n for n in ("embed_tokens.weight", "fc.weight", "hidden_norm.weight", "norm.weight",
                               "lm_head.weight", "markov_head.markov_w1.weight", "markov_head.markov_w2.weight")
                   if n not in weights]
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {', '.join(missing)}")
        return cls(config, weights)

    # ------------------------------------------------------------------ context (committed tokens)

    def extend_context(self, request_id: int, features: torch.Tensor, positions: torch.Tensor) -> None:
        """Project newly committed tokens' target features [n, 5·d_t] into the draft's context K/V."""
        c, w = self.config, self.w
        cache = self.caches.setdefault(request_id, RequestCache())
        if features.shape[0] == 0:
            return
        h = _rms(features.to(w["fc.weight"].dtype) @ w["fc.weight"].T, w["hidden_norm.weight"], c.rms_norm_eps)
        for i in range(c.num_layers):
            k, v = self._kv(i, h, positions)
            if len(cache.k) <= i:
                cache.k.append(k)
                cache.v.append(v)
            else:
                cache.k[i] = torch.cat([cache.k[i], k])
                cache.v[i] = torch.cat([cache.v[i], v])
        cache.length += features.shape[0]

    def drop(self, request_id: int) -> None:
        self.caches.pop(request_id, None)

    def _kv(self, i: int, h: torch.Tensor, positions: torch.Tensor):
        c, w, p = self.config, self.w, f"layers.{i}.self_attn."
        k = (h @ w[p + "k_proj.weight"].T).view(-1, c.num_kv_heads, c.head_dim)
        k = _rope(_rms(k, w[p + "k_norm.weight"], c.rms_norm_eps), positions, c.rope_theta)
        v = (h @ w[p + "v_proj.weight"].T).view(-1, c.num_kv_heads, c.head_dim)
        return k, v

    # ------------------------------------------------------------------ one block

    def hidden_block(self, request_id: int, anchor: int, anchor_pos: int) -> torch.Tensor:
        """Final-normed hidden h [γ, d] of the block [anchor, mask × (γ−1)] at anchor_pos…"""
        c, w = self.config, self.w
        cache = self.caches.setdefault(request_id, RequestCache())
        dev = w["embed_tokens.weight"].device
        ids = torch.tensor([anchor] + [c.mask_token_id] * (c.block_size - 1), device=dev)
        pos = torch.arange(anchor_pos, anchor_pos + c.block_size, device=dev)
        x = w["embed_tokens.weight"][ids]
        groups = c.num_heads // c.num_kv_heads
        for i in range(c.num_layers):
            p = f"layers.{i}."
            h = _rms(x, w[p + "input_layernorm.weight"], c.rms_norm_eps)
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(-1, c.num_heads, c.head_dim)
            q = _rope(_rms(q, w[p + "self_attn.q_norm.weight"], c.rms_norm_eps), pos, c.rope_theta)
            k_blk, v_blk = self._kv(i, h, pos)
            k = torch.cat([cache.k[i], k_blk]) if cache.k else k_blk   # block K/V are scratch: not cached
            v = torch.cat([cache.v[i], v_blk]) if cache.v else v_blk
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
            # Non-causal: every block query sees all committed context and the whole block.
            o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
            x = x + o.transpose(0, 1).reshape(c.block_size, -1) @ w[p + "self_attn.o_proj.weight"].T
            h = _rms(x, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            up = h @ w[p + "mlp.up_proj.weight"].T
            x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        return _rms(x, w["norm.weight"], c.rms_norm_eps)

    def propose(self, request_ids: list[int], anchors: torch.Tensor, anchor_positions: list[int],
                temperature: torch.Tensor, *, top_k=None, top_p=None, seeds=None, generator=None) -> BlockProposal:
        """Draft one block per request: backbone, base logits, Markov chain, confidence head."""
        w = self.w
        h = torch.stack([self.hidden_block(r, int(a), p) for r, a, p in zip(request_ids, anchors.tolist(),
                                                                              anchor_positions)])
        U = h @ w["lm_head.weight"].T
        dev = U.device
        head = None if self.confidence_head is None else (h, *self.confidence_head)
        draft = runtime.markov_chain(U, anchors.to(dev, torch.int64), w["markov_head.markov_w1.weight"],
                                     w["markov_head.markov_w2.weight"], temperature.to(dev, torch.float32),
                                     top_k=None if top_k is None else top_k.to(dev),
                                     top_p=None if top_p is None else top_p.to(dev), seeds=seeds, generator=generator,
                                     confidence=head)
        if draft.confidence_logits is not None:  # the head's logits come with the draft
            c = runtime.confidence_probs(draft.confidence_logits, self.sts)
        else:  # a checkpoint without the head: verify everything (scheduler sees certainty)
            c = torch.ones(draft.tokens.shape, dtype=torch.float32, device=U.device)
        return BlockProposal(draft=draft, confidence=c, survival=runtime.survival(c))
