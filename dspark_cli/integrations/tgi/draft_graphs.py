"""CUDA graphs of the TGI drafter's static-shape work: the block forward between its attention
calls ("piecewise", as vLLM captures models whose attention cannot be captured) and the projection
of committed rows into context K/V.

Why: eager, the drafter's step is host dispatch — ~400 kernel launches at ~15 µs each, 5–8 ms on
an H200 at any batch size against ~2 ms of device time (bench/RESULTS.md, session 17). The dense
parts (norms, projections, RoPE, MLP) have static shapes for a given number of rows; attention does
not (each request's context grows every step, and the chunk plan changes with it). So a block
forward of L layers is L + 1 graphs — embeddings and layer 0's q/k/v; then per layer its output
projection and MLP with the next layer's q/k/v; then the last layer's rest and the final norm —
with our eager attention between them, reading the graphs' q/k/v and writing the next graph's
input buffer. The commit's projection (fc, norm, every layer's K/V with RoPE) is one graph; the
pool write after it stays eager (its rows depend on the pool's layout).

Graphs are captured lazily, once per padded size: a block batch of R requests runs the graphs of
the next size in BLOCK_BATCH_SIZES, a commit of n rows those of the next in COMMIT_ROWS (padding
rows are row-wise independent of the real ones and are dropped); larger ones run eagerly. All
graphs of a drafter share one memory pool: they replay one at a time, in capture order within a
forward, so their scratch memory may be shared; what crosses from one graph to the next or to the
eager code stays referenced here. Memory kept per captured size: a block batch of n requests
L × (x, q, k, v) of n·γ rows, ~31 MB per layer at n = 256, γ = 7, Qwen3-4B widths; a commit of n
rows its input features and K/V, ~45 KB per row. DSPARK_TGI_CUDA_GRAPHS=0 turns graphs off."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

ENV_CUDA_GRAPHS = "DSPARK_TGI_CUDA_GRAPHS"
BLOCK_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
COMMIT_ROWS = tuple(1 << i for i in range(12))  # 1 … 2048: a decode step's commits up to R = 256


def graphs_wanted(requested: bool | None, weight: torch.Tensor) -> bool:
    """Whether a drafter with this weight's device uses CUDA graphs: `requested` when given, else on
    for CUDA unless DSPARK_TGI_CUDA_GRAPHS=0."""
    if requested is None:
        requested = os.environ.get(ENV_CUDA_GRAPHS, "1").strip().lower() not in ("0", "false", "off", "no")
    return bool(requested) and weight.is_cuda


@dataclass
class _BlockGraphs:
    """The graphs of one block batch size and the tensors they read and write (fixed addresses)."""
    ids: torch.Tensor              # [n·γ] token ids in
    pos: torch.Tensor              # [n·γ] positions in
    o: torch.Tensor                # [n·γ, H·hd] attention output in, rewritten before each graph
    graphs: list                   # L + 1 torch.cuda.CUDAGraph
    qkv: list                      # per layer (q, k, v) out: [n·γ, H|kv, hd]
    kept: list                     # residual streams and RoPE tables passed between graphs: held, so
                                   # the pool never hands their memory to another capture
    h: torch.Tensor                # [n·γ, d] final-normed hidden out


@dataclass
class _CommitGraph:
    features: torch.Tensor         # [n, 5·d_target] in
    positions: torch.Tensor        # [n] in
    graph: object
    k: torch.Tensor                # [L, n, kv, hd] out
    v: torch.Tensor


class DraftGraphs:
    def __init__(self, draft):
        self.draft = draft  # a DSparkDraft: its row-wise pieces are what the graphs capture
        self.pool = torch.cuda.graph_pool_handle()
        self.blocks: dict[int, _BlockGraphs] = {}
        self.commits: dict[int, _CommitGraph] = {}

    # ------------------------------------------------------------------ the block forward

    @staticmethod
    def fits_block(batch: int) -> bool:
        return batch <= BLOCK_BATCH_SIZES[-1]

    def block(self, ids: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        """The block forward's final-normed hidden [rows, d] for ids/pos [rows] (R·γ rows, R within
        BLOCK_BATCH_SIZES). attend(layer, q, k, v, out) writes the layer's attention output for the
        R requests into out [R, γ, H, hd]."""
        rows, gamma = ids.shape[0], self.draft.config.block_size
        size = next(n for n in BLOCK_BATCH_SIZES if n * gamma >= rows)
        cap = self.blocks.get(size) or self._capture_block(size)
        cap.ids[:rows].copy_(ids)
        cap.pos[:rows].copy_(pos)
        out = cap.o[:rows].view(rows // gamma, gamma, self.draft.config.num_heads, -1)
        for layer, (graph, (q, k, v)) in enumerate(zip(cap.graphs, cap.qkv)):
            graph.replay()
            attend(layer, q[:rows], k[:rows], v[:rows], out)
        cap.graphs[-1].replay()
        return cap.h[:rows].clone()  # the next step's replay rewrites cap.h

    def _capture_block(self, size: int) -> _BlockGraphs:
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

        warm: dict = {}
        self._warm_up(lambda: [piece(i, warm) for i in range(last + 1)])
        graphs, kept, outs, state = [], [], [], {}
        for i in range(last + 1):
            graph = torch.cuda.CUDAGraph()
            with self._capturing(graph):
                outs.append(piece(i, state))
            graphs.append(graph)
            kept.append(state["x"])
        kept.append(state["rope"])
        cap = _BlockGraphs(ids, pos, o, graphs, outs[:-1], kept, outs[-1])
        self.blocks[size] = cap
        return cap

    # ------------------------------------------------------------------ committed rows

    @staticmethod
    def fits_commit(rows: int) -> bool:
        return rows <= COMMIT_ROWS[-1]

    def project_context(self, features: torch.Tensor, positions: torch.Tensor):
        """DSparkDraft._project_context for rows within COMMIT_ROWS: K, V [L, rows, kv, hd], views of
        the graph's outputs (valid until the next commit)."""
        rows = features.shape[0]
        size = next(n for n in COMMIT_ROWS if n >= rows)
        cap = self.commits.get(size) or self._capture_commit(size, features.shape[1])
        cap.features[:rows].copy_(features)
        cap.positions[:rows].copy_(positions)
        cap.graph.replay()
        return cap.k[:, :rows], cap.v[:, :rows]

    def _capture_commit(self, size: int, width: int) -> _CommitGraph:
        weight = self.draft.w["fc.weight"]
        features = torch.zeros(size, width, dtype=weight.dtype, device=weight.device)
        positions = torch.zeros(size, dtype=torch.int64, device=weight.device)
        self._warm_up(lambda: self.draft._project_context(features, positions))
        graph = torch.cuda.CUDAGraph()
        with self._capturing(graph):
            k, v = self.draft._project_context(features, positions)
        cap = _CommitGraph(features, positions, graph, k, v)
        self.commits[size] = cap
        return cap

    # ------------------------------------------------------------------ capture

    @staticmethod
    def _warm_up(fn) -> None:
        """One eager pass on a side stream first: cuBLAS makes its handles and workspaces outside capture."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def _capturing(self, graph):
        # thread_local: another thread of the server touching CUDA does not break the capture
        return torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local")
