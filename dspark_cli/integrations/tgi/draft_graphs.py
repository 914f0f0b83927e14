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

Graphs are captured once per padded size — all of them when TGI loads the model (capture_all,
before TGI's warmup measures free memory to size its KV cache, so their memory is in that plan and
no decode step pays for a capture), else lazily at a size's first use: a block batch of R requests
runs the graphs of the next size in BLOCK_BATCH_SIZES, a commit of n rows those of the next in
COMMIT_ROWS (padding rows are row-wise independent of the real ones and are dropped); larger ones
run eagerly. What the graphs read and write between each other and the eager code lives in
buffers made once at the largest size and sliced for the others (one size runs at a time); all
graphs share one memory pool for their scratch, which they may reuse because they replay one at a
time and in capture order within a step. Memory at Qwen3-4B widths on an H200: the
buffers, ~46 MB (block) and ~73 MB (commit), and 310 MiB more for capturing every size (the pool
and cuBLAS's workspace for the warm-up stream; 0.5 s). DSPARK_TGI_CUDA_GRAPHS=0 turns graphs off."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dspark_cli.integrations.switches import env_switch

ENV_CUDA_GRAPHS = "DSPARK_TGI_CUDA_GRAPHS"
BLOCK_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
COMMIT_ROWS = tuple(1 << i for i in range(12))  # 1 … 2048: a decode step's commits up to R = 256


def graphs_wanted(requested: bool | None, weight: torch.Tensor) -> bool:
    """Whether a drafter with this weight's device uses CUDA graphs: `requested` when given, else on
    for CUDA unless DSPARK_TGI_CUDA_GRAPHS=0."""
    if requested is None:
        requested = env_switch(ENV_CUDA_GRAPHS) is not False
    return requested and weight.is_cuda


class DraftGraphs:
    def __init__(self, draft):
        self.draft = draft  # a DSparkDraft: its row-wise pieces are what the graphs capture
        self.pool = torch.cuda.graph_pool_handle()
        # One stream for every warm-up: cuBLAS keeps a workspace per stream it ran on (32 MiB on an
        # H200), so a fresh stream per capture would leave one behind each time.
        self.warm_stream = torch.cuda.Stream()
        self.blocks: dict[int, list] = {}     # batch size -> its L + 1 graphs
        self.commits: dict[int, object] = {}  # row count -> its graph
        # What the graphs read and write, made once at the largest size (outside the graphs' pool)
        # and sliced for the smaller ones: only one size's graphs run at a time.
        c, w = draft.config, draft.w
        weight = w["embed_tokens.weight"]

        def zeros(*shape, dtype=weight.dtype):
            return torch.zeros(shape, dtype=dtype, device=weight.device)

        rows, kv = BLOCK_BATCH_SIZES[-1] * c.block_size, (c.num_kv_heads, c.head_dim)
        # block: ids/pos in, each layer's attention output o in, its q/k/v out, the hidden h out
        self.block_io = SimpleNamespace(
            ids=zeros(rows, dtype=torch.int64).fill_(c.mask_token_id), pos=zeros(rows, dtype=torch.int64),
            o=zeros(rows, c.num_heads * c.head_dim), q=zeros(rows, c.num_heads, c.head_dim),
            k=zeros(rows, *kv), v=zeros(rows, *kv), h=zeros(rows, c.hidden_size))
        # commit: target features and positions in, every layer's K and V out
        n = COMMIT_ROWS[-1]
        self.commit_io = SimpleNamespace(
            features=zeros(n, w["fc.weight"].shape[1]), positions=zeros(n, dtype=torch.int64),
            k=zeros(c.num_layers, n, *kv), v=zeros(c.num_layers, n, *kv))

    # ------------------------------------------------------------------ the block forward

    @staticmethod
    def fits_block(batch: int) -> bool:
        return batch <= BLOCK_BATCH_SIZES[-1]

    def block(self, ids: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        """The block forward's final-normed hidden [rows, d] for ids/pos [rows] (R·γ rows, R within
        BLOCK_BATCH_SIZES). attend(layer, q, k, v, out) writes the layer's attention output for the
        R requests into out [R, γ, H, hd]."""
        rows, gamma, io = ids.shape[0], self.draft.config.block_size, self.block_io
        size = next(n for n in BLOCK_BATCH_SIZES if n * gamma >= rows)
        graphs = self.blocks.get(size) or self._capture_block(size)
        io.ids[:rows].copy_(ids)
        io.pos[:rows].copy_(pos)
        out = io.o[:rows].view(rows // gamma, gamma, self.draft.config.num_heads, -1)
        for layer, graph in enumerate(graphs[:-1]):
            graph.replay()
            attend(layer, io.q[:rows], io.k[:rows], io.v[:rows], out)
        graphs[-1].replay()
        return io.h[:rows].clone()  # the next step's replay rewrites io.h

    def _capture_block(self, size: int) -> list:
        d, io = self.draft, self.block_io
        rows, last = size * d.config.block_size, d.config.num_layers
        ids, pos, o = io.ids[:rows], io.pos[:rows], io.o[:rows]

        def piece(i: int, state: dict) -> None:  # graph i's body; state carries x and rope to the next one
            if i == 0:
                state["x"], state["rope"] = d._embed_block(ids, pos)
            else:
                state["x"] = d._after_attention(i - 1, state["x"], o)
            if i < last:
                for buffer, value in zip((io.q, io.k, io.v), d._attention_inputs(i, state["x"], state["rope"])):
                    buffer[:rows].copy_(value)
            else:
                io.h[:rows].copy_(d._final_norm(state["x"]))

        warm: dict = {}
        self._warm_up(lambda: [piece(i, warm) for i in range(last + 1)])
        # x and rope stay referenced until the graphs that read them are captured (so no capture in
        # between takes their memory); after that the pool may hand it to other captures, whose
        # graphs never run between a write and its read here.
        graphs, state = [], {}
        for i in range(last + 1):
            graph = torch.cuda.CUDAGraph()
            with self._capturing(graph):
                piece(i, state)
            graphs.append(graph)
        self.blocks[size] = graphs
        return graphs

    # ------------------------------------------------------------------ committed rows

    @staticmethod
    def fits_commit(rows: int) -> bool:
        return rows <= COMMIT_ROWS[-1]

    def project_context(self, features: torch.Tensor, positions: torch.Tensor):
        """DSparkDraft._project_context for rows within COMMIT_ROWS: K, V [L, rows, kv, hd], views of
        the graphs' output buffers (valid until the next commit)."""
        rows, io = features.shape[0], self.commit_io
        size = next(n for n in COMMIT_ROWS if n >= rows)
        graph = self.commits.get(size) or self._capture_commit(size)
        io.features[:rows].copy_(features)
        io.positions[:rows].copy_(positions)
        graph.replay()
        return io.k[:, :rows], io.v[:, :rows]

    def _capture_commit(self, size: int):
        io = self.commit_io

        def body() -> None:
            k, v = self.draft._project_context(io.features[:size], io.positions[:size])
            io.k[:, :size].copy_(k)
            io.v[:, :size].copy_(v)

        self._warm_up(body)
        graph = torch.cuda.CUDAGraph()
        with self._capturing(graph):
            body()
        self.commits[size] = graph
        return graph

    # ------------------------------------------------------------------ capture

    def capture_all(self) -> None:
        """Every block batch size and commit row count, ahead of serving."""
        for size in BLOCK_BATCH_SIZES:
            if size not in self.blocks:
                self._capture_block(size)
        for rows in COMMIT_ROWS:
            if rows not in self.commits:
                self._capture_commit(rows)

    def _warm_up(self, fn) -> None:
        """One eager pass on a side stream first: cuBLAS makes its handles and workspaces outside capture."""
        self.warm_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.warm_stream):
            fn()
        torch.cuda.current_stream().wait_stream(self.warm_stream)

    def _capturing(self, graph):
        # thread_local: another thread of the server touching CUDA does not break the capture
        return torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local")
