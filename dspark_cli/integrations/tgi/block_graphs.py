"""CUDA graphs of the drafter's block forward between its attention calls ("piecewise", as vLLM
captures models whose attention cannot be captured).

Why: eager, the drafter's step is host dispatch — ~400 kernel launches at ~15 µs each, 5–8 ms on
an H200 at any batch size against ~2 ms of device time (bench/RESULTS.md, session 17). Its dense
parts (norms, projections, RoPE, MLP) have static shapes for a given batch size; its attention
does not (each request's context grows every step, and the chunk plan changes with it). So a
block forward of L layers is L + 1 graphs — embeddings and layer 0's q/k/v; then per layer its
output projection and MLP with the next layer's q/k/v; then the last layer's rest and the final
norm — with our eager attention between them, reading the graphs' q/k/v and writing the next
graph's input buffer.

Graphs are captured lazily, once per batch size of GRAPH_BATCH_SIZES (a batch is padded to the
next one: the padding rows are row-wise independent of the real ones and are dropped), all in one
memory pool: graphs replay one at a time in capture order, so their scratch memory may be shared;
what crosses from one graph to the next or to attention stays referenced here. Memory kept per
captured size n: L × (x, q, k, v) rows of n·γ, ~31 MB per layer at n = 256, γ = 7, Qwen3-4B widths.
Larger batches run eagerly. DSPARK_TGI_CUDA_GRAPHS=0 turns graphs off."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

ENV_CUDA_GRAPHS = "DSPARK_TGI_CUDA_GRAPHS"
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def block_graphs_wanted(requested: bool | None, weight: torch.Tensor) -> bool:
    """Whether a drafter with this weight's device uses CUDA graphs: `requested` when given, else on
    for CUDA unless DSPARK_TGI_CUDA_GRAPHS=0."""
    if requested is None:
        requested = os.environ.get(ENV_CUDA_GRAPHS, "1").strip().lower() not in ("0", "false", "off", "no")
    return bool(requested) and weight.is_cuda


@dataclass
class _Captured:
    """The graphs of one batch size and the tensors they read and write (fixed addresses)."""
    ids: torch.Tensor              # [n·γ] token ids in
    pos: torch.Tensor              # [n·γ] positions in
    o: torch.Tensor                # [n·γ, H·hd] attention output in, rewritten before each graph
    graphs: list                   # L + 1 torch.cuda.CUDAGraph
    qkv: list                      # per layer (q, k, v) out: [n·γ, H|kv, hd]
    kept: list                     # residual streams and RoPE tables passed between graphs: held, so
                                   # the pool never hands their memory to another capture
    h: torch.Tensor                # [n·γ, d] final-normed hidden out


class BlockGraphs:
    def __init__(self, draft):
        self.draft = draft  # a DSparkDraft: its _embed_block/_attention_inputs/_after_attention/_final_norm
        self.pool = torch.cuda.graph_pool_handle()
        self.captured: dict[int, _Captured] = {}

    @staticmethod
    def fits(batch: int) -> bool:
        return batch <= GRAPH_BATCH_SIZES[-1]

    def run(self, ids: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        """The block forward's final-normed hidden [rows, d] for ids/pos [rows] (R·γ rows, R ≤ the
        largest graph batch size). attend(layer, q, k, v, out) writes the layer's attention output
        for the R requests into out [R, γ, H, hd]."""
        rows, gamma = ids.shape[0], self.draft.config.block_size
        size = next(n for n in GRAPH_BATCH_SIZES if n * gamma >= rows)
        cap = self.captured.get(size) or self._capture(size)
        cap.ids[:rows].copy_(ids)
        cap.pos[:rows].copy_(pos)
        out = cap.o[:rows].view(rows // gamma, gamma, self.draft.config.num_heads, -1)
        for layer, (graph, (q, k, v)) in enumerate(zip(cap.graphs, cap.qkv)):
            graph.replay()
            attend(layer, q[:rows], k[:rows], v[:rows], out)
        cap.graphs[-1].replay()
        return cap.h[:rows].clone()  # the next step's replay rewrites cap.h

    def _capture(self, size: int) -> _Captured:
        d, c = self.draft, self.draft.config
        weight = d.w["embed_tokens.weight"]
        rows = size * c.block_size
        ids = torch.full((rows,), c.mask_token_id, dtype=torch.int64, device=weight.device)
        pos = torch.zeros(rows, dtype=torch.int64, device=weight.device)
        o = torch.zeros(rows, c.num_heads * c.head_dim, dtype=weight.dtype, device=weight.device)

        last = c.num_layers

        def piece(i: int, state: dict):  # graph i's body; state carries x and rope to the next one
            if i == 0:
                state["x"], state["rope"] = d._embed_block(ids, pos)
            else:
                state["x"] = d._after_attention(i - 1, state["x"], o)
            return d._attention_inputs(i, state["x"], state["rope"]) if i < last else d._final_norm(state["x"])

        # One eager pass on a side stream first: cuBLAS makes its handles and workspaces outside capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm: dict = {}
            for i in range(last + 1):
                piece(i, warm)
        torch.cuda.current_stream().wait_stream(side)

        graphs, kept, outs, state = [], [], [], {}
        for i in range(last + 1):
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread of the server touching CUDA does not break the capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outs.append(piece(i, state))
            graphs.append(graph)
            kept.append(state["x"])
        kept.append(state["rope"])
        cap = _Captured(ids, pos, o, graphs, outs[:-1], kept, outs[-1])
        self.captured[size] = cap
        return cap
