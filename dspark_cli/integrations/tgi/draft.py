"""The DSpark drafter for TGI: the released checkpoint format (Qwen3DSparkModel: config.json keys and
tensor names of DSPARK.md §2) in plain torch, with its own per-request context KV cache.

Why plain torch: TGI's flash layers assume paged KV and causal attention; the draft needs
non-causal attention from γ block queries onto "committed context + the block" (KV injection), so
it keeps its own small cache (5 layers × committed tokens). Attention reads it in place with our
CUDA op where it covers the drafter (csrc/draft_attention.cu: bf16/fp16, head_dim 64 or 128), else
runs SDPA with a key mask over the requests' padded contexts.

Per step: the committed rows of all requests go through fc/K/V projections together
(`extend_contexts`), and the blocks of all requests through the dense layers together
(`hidden_blocks`, R·γ rows). The committed K/V of all requests live in one pool (kv_pool.py: pages
of 16 rows, each request a list of them), written by one index_copy_ for K and one for V, all
layers at once. Attention runs
batched too (`_block_attention`): a few calls per layer whatever R is, where one SDPA call per
request cost ~0.3 ms of eager dispatch each on an H200 (bench/RESULTS.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dspark_cli import runtime
from dspark_cli.integrations.tgi.draft_graphs import DraftGraphs, graphs_wanted
from dspark_cli.integrations.tgi.kv_pool import PAGE_ROWS, KVPool
from dspark_cli.runtime import _checks, cuda_ops
from dspark_cli.runtime.sampling import is_greedy

# Key rows (requests × padded context + block) one batched attention call may gather per layer: a
# bound on its transient K/V copy (at 8 KV heads × 128 dims, bf16, 512 MB for K and V together).
ATTENTION_CHUNK_KEYS = 1 << 17
# Every SDPA backend but cuDNN's: the drafter's key length grows by a few rows every step and cuDNN
# builds a graph per new shape (~65 ms of host time per call on an H200 with torch 2.11, against
# ~0.2 ms for the memory-efficient kernel; bench/RESULTS.md, session 17).
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
        """The drafter's config.json; a missing file, key or a count that is not a whole number is
        one ValueError naming the file (TGI's get_model reads this first, for γ)."""
        file = Path(path) / "config.json"
        try:
            c = json.loads(file.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise ValueError(f"{file}: cannot read the DSpark drafter's config ({exc})") from None
        if not isinstance(c, dict) or "Qwen3DSparkModel" not in (c.get("architectures") or []):
            raise ValueError(f"{path}: not a Qwen3DSparkModel checkpoint "
                             f"(architectures={c.get('architectures') if isinstance(c, dict) else None})")
        counts = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "block_size",
                  "mask_token_id")
        for key in counts:
            value, least = c.get(key), 0 if key == "mask_token_id" else 1
            if not (_checks.integer(value) and value >= least):
                raise ValueError(f"{file}: {key!r} must be a whole number ≥ {least}, got {value!r}")
        ids = c.get("target_layer_ids")
        if not isinstance(ids, list) or not ids or not all(_checks.integer(i) and i >= 0 for i in ids):
            raise ValueError(f"{file}: 'target_layer_ids' must be a non-empty list of layer numbers ≥ 0, got {ids!r}")
        rope = c.get("rope_parameters") or {}
        _check_supported_settings(file, c, rope)
        reals = {"rope_theta": rope.get("rope_theta", c.get("rope_theta", 1e6)), "rms_norm_eps": c.get("rms_norm_eps", 1e-6)}
        for key, value in reals.items():
            if not (_checks.real_number(value) and value > 0):
                raise ValueError(f"{file}: {key!r} must be a number > 0, got {value!r}")
        return cls(hidden_size=c["hidden_size"], num_heads=c["num_attention_heads"],
                   num_kv_heads=c["num_key_value_heads"],
                   head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                   num_layers=c["num_hidden_layers"], block_size=c["block_size"], mask_token_id=c["mask_token_id"],
                   target_layer_ids=list(ids), rope_theta=float(reals["rope_theta"]),
                   rms_norm_eps=float(reals["rms_norm_eps"]))


def _check_supported_settings(file: Path, c: dict, rope: dict) -> None:
    """The released drafters' settings are the ones this drafter computes: default RoPE, no
    attention bias, SiLU. Another (a YaRN-scaled or biased checkpoint) would draft with the wrong
    math: still lossless, but accepted far less, with no error; refused here instead."""
    scaling = c.get("rope_scaling") if isinstance(c.get("rope_scaling"), dict) else {}
    for key, value, supported in (
            ("rope_parameters.rope_type", rope.get("rope_type", rope.get("type", "default")), "default"),
            ("rope_scaling", scaling.get("rope_type", scaling.get("type", "default")), "default"),
            ("attention_bias", bool(c.get("attention_bias", False)), False),
            ("hidden_act", c.get("hidden_act", "silu"), "silu")):
        if value != supported:
            raise ValueError(f"{file}: {key} = {value!r}; the TGI drafter runs the released drafters' default RoPE, "
                             "no attention bias and SiLU")


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last dim with weight w, one op (torch normalizes in fp32 and returns x's
    dtype); a per-head weight [heads, hd] (q and k heads normed together) is applied after it."""
    if w.shape == x.shape[-1:]:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return F.rms_norm(x, (x.shape[-1],), eps=eps) * w


def _rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, 1, head_dim] of absolute positions [n], computed in fp32 and given in `dtype`
    (the model's: RoPE then runs in it, as Qwen3's does): made once per step, shared by every
    layer's queries and keys (eager launches are most of the drafter's step)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.float()[:, None] * inv[None]
    return ang.cos().repeat(1, 2)[:, None].to(dtype), ang.sin().repeat(1, 2)[:, None].to(dtype)


def _rope(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [n, heads, hd] rotated by _rope_tables of its positions (rotate-half convention, as Qwen3),
    in the tables' dtype, returned in x's."""
    cos, sin = tables
    half = x.shape[-1] // 2
    return (x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin).to(x.dtype)


def _not_finite(weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or ±inf, checked once at load (as cast: a value beyond
    fp16's range is inf there), never per step. One min/max reduction per tensor and one host
    sync in all, no elementwise mask as large as the tensor (lm_head is V×d)."""
    names = [n for n, t in weights.items() if t.numel()]  # (aminmax refuses an empty tensor)
    ends = torch.stack([torch.stack(torch.aminmax(weights[n])) for n in names])  # one dtype: load casts all
    return [n for n, ok in zip(names, torch.isfinite(ends).all(1).tolist()) if not ok]


@dataclass
class FusedLayer:
    """One layer's projections concatenated once at load: one GEMM where there were three (q, k, v)
    and two (gate, up), and the q and k heads normed in one op (eager launches, and in graphs the
    device time of small kernels, are much of the drafter's step)."""
    qkv: torch.Tensor       # [(H + 2·kv)·hd, d]
    gate_up: torch.Tensor   # [2·mlp, d]
    qk_norm: torch.Tensor   # [H + kv, hd]: q_norm's weight for each query head, k_norm's for each key head


def _fuse_layers(config: DraftConfig, w: dict[str, torch.Tensor]) -> list[FusedLayer]:
    """FusedLayer of every layer; w's q/k/v and gate/up entries become views of them (one copy of
    the weights, under the checkpoint's names)."""
    fused = []
    for i in range(config.num_layers):
        attn, mlp = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        parts = {n: w[n] for n in (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight",
                                   mlp + "gate_proj.weight", mlp + "up_proj.weight")}
        names = list(parts)
        qkv, gate_up = torch.cat([parts[n] for n in names[:3]]), torch.cat([parts[n] for n in names[3:]])
        for whole, group in ((qkv, names[:3]), (gate_up, names[3:])):
            for n, piece in zip(group, whole.split([parts[n].shape[0] for n in group])):
                w[n] = piece
        qk_norm = torch.cat([w[attn + "q_norm.weight"].expand(config.num_heads, -1),
                             w[attn + "k_norm.weight"].expand(config.num_kv_heads, -1)])
        fused.append(FusedLayer(qkv, gate_up, qk_norm))
    return fused


@dataclass
class BlockProposal:
    draft: runtime.MarkovDraft     # tokens [R, γ], q_token, prev_emb, source (q rebuilt, not stored)
    confidence: torch.Tensor       # c [R, γ] (conditional)
    survival: torch.Tensor         # a [R, γ]


def _confidence_head(config: DraftConfig, weights: dict[str, torch.Tensor]):
    """The confidence head's weight and bias in fp32 once (the chain's head reads fp32), or None for
    a checkpoint without the head; a head without a bias (as V4's) gets 0. A head that does not read
    W1[x_{k-1}] is refused here, at load, rather than at the first draft."""
    weight = weights.get("confidence_head.proj.weight")
    if weight is None:
        return None
    expected = config.hidden_size + weights["markov_head.markov_w1.weight"].shape[1]
    if weight.numel() != expected:
        raise ValueError(f"the DSpark draft's confidence head has {weight.numel()} inputs, not d + r = {expected}: "
                         "it does not read W1[x_{k-1}] (confidence_head_with_markov=false); every DSpark release does")
    bias = weights.get("confidence_head.proj.bias")
    return weight.float(), bias.float() if bias is not None else torch.zeros(1, device=weight.device)


class DSparkDraft:
    def __init__(self, config: DraftConfig, weights: dict[str, torch.Tensor],
                 sts: runtime.STSCalibration | None = None, cuda_graphs: bool | None = None):
        """cuda_graphs: replay the block forward's dense parts and the commit's projection from CUDA
        graphs (None: on for CUDA weights unless DSPARK_TGI_CUDA_GRAPHS=0; draft_graphs.py)."""
        self.config = config
        self.w = dict(weights)  # the caller's dict keeps its tensors; ours become views of the fused ones
        self.fused = _fuse_layers(config, self.w)
        self.sts = sts  # per-position confidence temperatures (DSPARK_STS); None = raw sigmoid
        self.confidence_head = _confidence_head(config, weights)
        self.context_kv = KVPool(config.num_layers)  # committed context K/V of every request
        # Our attention op fits these weights and shapes (whether the extension is loaded and
        # enabled is asked each step: cuda_ops.enabled switches it for comparisons).
        self.paged_attention_fits = cuda_ops.draft_attention_fits(
            weights["embed_tokens.weight"], config.head_dim, config.num_heads // config.num_kv_heads * config.block_size)
        self.graphs = DraftGraphs(self) if graphs_wanted(cuda_graphs, weights["embed_tokens.weight"]) else None
        self.checkpoint_dtype: torch.dtype | None = None  # the stored weights' (load sets it)

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "DSparkDraft":
        from safetensors.torch import load_file

        config = DraftConfig.load(path)
        weights, stored = {}, {}
        for f in sorted(Path(path).glob("*.safetensors")):
            for name, tensor in load_file(str(f)).items():
                stored[name] = tensor.dtype
                weights[name] = tensor.to(device=device, dtype=dtype)
        per_layer = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
                     "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                     "post_attention_layernorm")  # of each of the config's num_hidden_layers
        missing = [n for n in ("embed_tokens.weight", "fc.weight", "hidden_norm.weight", "norm.weight",
                               "lm_head.weight", "markov_head.markov_w1.weight", "markov_head.markov_w2.weight",
                               *(f"layers.{i}.{p}.weight" for i in range(config.num_layers) for p in per_layer))
                   if n not in weights]
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {', '.join(missing)}")
        biases = sorted(n for n in weights if n.startswith("layers.") and n.endswith(".bias"))
        if biases:  # the layers this drafter computes have none (the released format's)
            raise ValueError(f"{path}: checkpoint has bias tensors the drafter would not apply: {', '.join(biases[:3])}")
        if config.mask_token_id >= weights["embed_tokens.weight"].shape[0]:
            raise ValueError(f"{path}: mask_token_id {config.mask_token_id} is outside the drafter's vocabulary "
                             f"({weights['embed_tokens.weight'].shape[0]} tokens)")
        bad = _not_finite(weights)
        if bad:
            raise ValueError(f"{path}: NaN or infinite values in {', '.join(bad)} (as {dtype}); "
                             "the drafter would draft from NaN probabilities")
        draft = cls(config, weights)
        draft.checkpoint_dtype = stored["fc.weight"]  # what it was trained and saved in (fc: every release has it)
        return draft

    # ------------------------------------------------------------------ context (committed tokens)

    def extend_context(self, request_id: int, features: torch.Tensor, positions: torch.Tensor) -> None:
        """Project newly committed tokens' target features [n, 5·d_t] into the draft's context K/V."""
        self.extend_contexts([request_id], features, positions, [features.shape[0]])

    def extend_contexts(self, request_ids: list[int], features: torch.Tensor, positions: torch.Tensor,
                        counts: list[int]) -> None:
        """extend_context for several requests at once: features/positions hold counts[i] rows for
        request_ids[i], in order. One projection for all rows (replayed from a CUDA graph when the
        drafter has them), one pool write for K and one for V."""
        if features.shape[0] == 0:
            return
        if self.graphs is not None and self.graphs.fits_commit(features.shape[0]):
            k, v = self.graphs.project_context(features, positions)
        else:
            k, v = self._project_context(features, positions)
        self.context_kv.commit(request_ids, counts, k, v)

    def _project_context(self, features: torch.Tensor, positions: torch.Tensor):
        """Every layer's K, V [L, n, kv, hd] of committed rows' target features [n, 5·d_t]."""
        c, w = self.config, self.w
        h = _rms(features.to(w["fc.weight"].dtype) @ w["fc.weight"].T, w["hidden_norm.weight"], c.rms_norm_eps)
        rope = _rope_tables(positions, c.head_dim, c.rope_theta, w["fc.weight"].dtype)
        kv = [self._project_kv(i, h, rope) for i in range(c.num_layers)]
        return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])

    def drop(self, request_id: int) -> None:
        self.context_kv.drop(request_id)

    def context_bytes_per_token(self) -> int:
        """What one committed token's K and V take in the context pool, over all layers."""
        c = self.config
        return c.num_layers * 2 * c.num_kv_heads * c.head_dim * self.w["fc.weight"].element_size()

    def reserve_context(self, tokens: int) -> None:
        """Hold the context pool at `tokens` rows for good (TGI's warmup, once it sized its KV cache
        with context_bytes_per_token added to each token's cost)."""
        w, c = self.w["fc.weight"], self.config
        self.context_kv.reserve(tokens, w.new_empty(0, c.num_kv_heads, c.head_dim))

    def _project_kv(self, i: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Layer i's k (normed, rotated) and v [n, kv, hd] of normed hidden rows h [n, d]: one GEMM
        on the K and V rows of the fused projection."""
        c = self.config
        kv = (h @ self.fused[i].qkv[c.num_heads * c.head_dim:].T).view(-1, 2 * c.num_kv_heads, c.head_dim)
        k, v = kv.split(c.num_kv_heads, 1)
        return _rope(_rms(k, self.w[f"layers.{i}.self_attn.k_norm.weight"], c.rms_norm_eps), rope), v

    # ------------------------------------------------------------------ one block

    def hidden_block(self, request_id: int, anchor: int, anchor_pos: int) -> torch.Tensor:
        """Final-normed hidden h [γ, d] of the block [anchor, mask × (γ−1)] at anchor_pos…"""
        dev = self.w["embed_tokens.weight"].device
        return self.hidden_blocks([request_id], torch.tensor([anchor], device=dev), [anchor_pos])[0]

    def hidden_blocks(self, request_ids: list[int], anchors: torch.Tensor, anchor_positions: list[int]) -> torch.Tensor:
        """hidden_block for R requests: [R, γ, d]. Everything runs on all R·γ rows at once;
        attention (non-causal: every block query sees all committed context and the whole block)
        through _block_attention, the dense parts between those calls eagerly or replayed from
        CUDA graphs (draft_graphs.py). Nothing is committed: the context pool does not change."""
        c, w = self.config, self.w
        R, G = len(request_ids), c.block_size
        dev = w["embed_tokens.weight"].device
        plan = self._attention_plan(request_ids, dev)
        ids = torch.full((R, G), c.mask_token_id, dtype=torch.int64, device=dev)
        ids[:, 0] = anchors.to(dev, torch.int64)
        pos = (torch.tensor(anchor_positions, dtype=torch.int64).to(dev)[:, None]
               + torch.arange(G, device=dev)).view(-1)

        def attend(layer, q, k, v, out=None):  # [R·γ, ·] rows in, [R, γ, H, hd] out
            return self._block_attention(layer, q.view(R, G, c.num_heads, c.head_dim),
                                         k.view(R, G, c.num_kv_heads, c.head_dim),
                                         v.view(R, G, c.num_kv_heads, c.head_dim), plan, out)

        if self.graphs is not None and self.graphs.fits_block(R):
            return self.graphs.block(ids.view(-1), pos, attend).view(R, G, -1)
        x, rope = self._embed_block(ids.view(-1), pos)
        for i in range(c.num_layers):
            x = self._after_attention(i, x, attend(i, *self._attention_inputs(i, x, rope)))
        return self._final_norm(x).view(R, G, -1)

    # The dense pieces of the block forward, row-wise (what CUDA graphs capture; rows past a
    # batch's own, padding a graph's batch size, never mix with them).
    def _embed_block(self, ids: torch.Tensor, pos: torch.Tensor):
        """Embeddings [n, d] of token ids [n] and the RoPE tables of their positions [n]."""
        embed = self.w["embed_tokens.weight"]
        return embed[ids], _rope_tables(pos, self.config.head_dim, self.config.rope_theta, embed.dtype)

    def _attention_inputs(self, i: int, x: torch.Tensor, rope):
        """Layer i's q [n, H, hd], k and v [n, kv, hd] of the residual stream x [n, d]: one GEMM for
        all three, the q and k heads normed and rotated together (views of one tensor come back)."""
        c, f, H = self.config, self.fused[i], self.config.num_heads
        h = _rms(x, self.w[f"layers.{i}.input_layernorm.weight"], c.rms_norm_eps)
        qkv = (h @ f.qkv.T).view(-1, H + 2 * c.num_kv_heads, c.head_dim)
        qk = _rope(_rms(qkv[:, :H + c.num_kv_heads], f.qk_norm, c.rms_norm_eps), rope)
        return qk[:, :H], qk[:, H:], qkv[:, H + c.num_kv_heads:]

    def _after_attention(self, i: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Layer i's residual stream after its attention output o (x's rows, H·hd each) and MLP."""
        c, w, p = self.config, self.w, f"layers.{i}."
        x = x + o.reshape(x.shape[0], -1) @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        gate, up = (h @ self.fused[i].gate_up.T).chunk(2, -1)
        return x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x, self.w["norm.weight"], self.config.rms_norm_eps)

    def _attention_plan(self, request_ids: list[int], device) -> PagedContexts | list[AttentionChunk]:
        """How every layer's attention of this step finds the requests' contexts: in place in the pool
        (our op) or by chunks of padded gathers (SDPA)."""
        if self.paged_attention_fits and cuda_ops.available(self.w["embed_tokens.weight"]):
            return PagedContexts(*self.context_kv.page_table(request_ids, device))
        return _attention_chunks(self.context_kv, request_ids, self.config.block_size, device)

    def _block_attention(self, layer: int, q: torch.Tensor, k_blk: torch.Tensor, v_blk: torch.Tensor,
                         plan: PagedContexts | list[AttentionChunk], out: torch.Tensor | None = None) -> torch.Tensor:
        """q [R, γ, H, hd] onto each request's committed K/V and its block's k_blk/v_blk [R, γ, kv, hd]
        -> [R, γ, H, hd], one SDPA call per chunk of the plan over [padded contexts ; blocks] with
        the chunk's key mask: keys carry their positions in RoPE, so where a block's keys sit does
        not matter. Grouped-query heads without copying K/V per query head: the g query heads of a
        KV head and the γ positions make g·γ query rows of that head. `out`: where to write (a CUDA
        graph's input buffer). With PagedContexts, our op does all of it in one or two launches."""
        R, G, H, hd = q.shape
        kv = k_blk.shape[2]
        if isinstance(plan, PagedContexts):
            pool = self.context_kv
            k_pool, v_pool = (pool.k[layer], pool.v[layer]) if pool.k is not None else (k_blk.new_empty(0, kv, hd),) * 2
            return cuda_ops.draft_attention(q, k_blk, v_blk, k_pool, v_pool, plan.pages, PAGE_ROWS, plan.lengths,
                                            plan.longest, out)
        out = torch.empty_like(q) if out is None else out
        g = H // kv
        for chunk in plan:
            n = len(chunk.rows)

            def pick(t):  # the chunk's rows of a batch tensor (all of them, in order: no gather)
                return t if chunk.index is None else t[chunk.index]

            if chunk.context is None:
                k, v = pick(k_blk), pick(v_blk)
            else:  # padded contexts and γ spare rows in one gather each, then the block's K/V in the spare rows
                k, v = self.context_kv.k[layer][chunk.context], self.context_kv.v[layer][chunk.context]
                k[:, -G:], v[:, -G:] = pick(k_blk), pick(v_blk)
            qg = pick(q).view(n, G, kv, g, hd).permute(0, 2, 3, 1, 4).reshape(n, kv, g * G, hd)
            with sdpa_kernel(ATTENTION_BACKENDS):
                o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=chunk.keep)
            o = o.view(n, kv, g, G, hd).permute(0, 3, 1, 2, 4)  # [n, G, kv, g, hd]
            if chunk.index is None:
                out.view(n, G, kv, g, hd).copy_(o)
            else:
                out[chunk.index] = o.reshape(n, G, H, hd)
        return out

    def propose(self, request_ids: list[int], anchors: torch.Tensor, anchor_positions: list[int],
                temperature: torch.Tensor, *, top_k=None, top_p=None, seeds=None, generator=None) -> BlockProposal:
        """Draft one block per request: backbone, base logits, Markov chain, confidence head.
        Lazily: the draft keeps U and what rebuilds a q row, and verification rebuilds the one row
        each rejected request needs (on the GPU our chain and rejection ops, bit-for-bit the row the
        chain sampled from), instead of writing and holding q [R, γ, V] fp32 between steps."""
        w = self.w
        h = self.hidden_blocks(request_ids, anchors, anchor_positions)
        U = h @ w["lm_head.weight"].T
        dev = U.device
        head = None if self.confidence_head is None else (h, *self.confidence_head)
        draft = runtime.markov_chain(U, anchors.to(dev, torch.int64), w["markov_head.markov_w1.weight"],
                                     w["markov_head.markov_w2.weight"], temperature.to(dev, torch.float32),
                                     top_k=None if top_k is None else top_k.to(dev),
                                     top_p=None if top_p is None else top_p.to(dev),
                                     top_k_max=_top_k_bound(top_k, temperature, U.shape[-1]),
                                     seeds=None if seeds is None else seeds.to(dev), generator=generator,
                                     confidence=head, return_q=False)
        if draft.confidence_logits is not None:  # the head's logits come with the draft
            c = runtime.confidence_probs(draft.confidence_logits, self.sts)
        else:  # a checkpoint without the head: verify everything (scheduler sees certainty)
            c = torch.ones(draft.tokens.shape, dtype=torch.float32, device=U.device)
        return BlockProposal(draft=draft, confidence=c, survival=runtime.survival(c))


@dataclass
class PagedContexts:
    """The batch's contexts where they lie in the pool, for our attention op: each request's pages
    (int32 [R, columns]) and length (int32 [R]) on the device, and the longest length (sizes the
    op's key splits)."""
    pages: torch.Tensor
    lengths: torch.Tensor
    longest: int


@dataclass
class AttentionChunk:
    """Requests attended in one call (the same for every layer of a step): their batch rows (as a
    device index; None: the whole batch in its order), the pool rows of their contexts padded to
    the longest and γ more [n, width + γ] (None: no context yet; the last γ are overwritten by the
    block's K/V after the gather) and the key mask [n, 1, 1, width + γ]."""
    rows: list[int]
    index: torch.Tensor | None
    context: torch.Tensor | None
    keep: torch.Tensor


def _top_k_bound(top_k: torch.Tensor | None, temperature: torch.Tensor, vocab: int) -> int | None:
    """The sampled rows' largest top-k (none: the vocabulary size) when the hooks hand the warps
    over on the host, as TGI's do: the CUDA chain skips work with it, the draft is the same."""
    if top_k is None or top_k.is_cuda or temperature.is_cuda:
        return None
    sampled = ~is_greedy(temperature)
    if not bool(sampled.any()):
        return None
    k = top_k[sampled]
    return int(torch.where((k > 0) & (k < vocab), k, vocab).max())


def _attention_chunks(pool: KVPool, request_ids: list[int], block: int, device) -> list[AttentionChunk]:
    """_chunks_by_length's chunks with their indices and key masks, made once per step: a key is
    kept when it is in the request's own context or in its block."""
    lengths = [pool.length(r) for r in request_ids]
    plan = _chunks_by_length(lengths, block)
    whole = len(plan) == 1  # one call for the batch: in its own order, no gathers of its rows
    chunks = []
    for rows in [list(range(len(lengths)))] if whole else plan:
        width = max(lengths[r] for r in rows)
        key = torch.arange(width + block, device=device)
        real = torch.tensor([lengths[r] for r in rows], device=device)
        keep = (key < real[:, None]) | (key >= width)
        context = pool.padded_index([request_ids[r] for r in rows], width + block, device) if width else None
        index = None if whole else torch.tensor(rows, device=device)
        chunks.append(AttentionChunk(rows, index, context, keep[:, None, None]))
    return chunks


def _chunks_by_length(lengths: list[int], block: int) -> list[list[int]]:
    """Request indices sorted by context length, cut into chunks whose padded key rows
    (requests × (longest context + block)) stay within ATTENTION_CHUNK_KEYS (one request at least)."""
    chunks: list[list[int]] = []
    for r in sorted(range(len(lengths)), key=lengths.__getitem__):
        if chunks and (len(chunks[-1]) + 1) * (lengths[r] + block) <= ATTENTION_CHUNK_KEYS:
            chunks[-1].append(r)
        else:
            chunks.append([r])
    return chunks
