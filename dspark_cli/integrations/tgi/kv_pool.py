"""The TGI drafter's context K/V: every request's committed rows in one K and one V tensor
[layers, rows, kv_heads, head_dim], each request owning a contiguous segment of rows, so that a
step's commits are one index_copy_ for K and one for V, and a batch's padded contexts one gather
per layer, whatever the number of requests (per-request tensors cost a few host dispatches each
per layer: most of the drafter's step at R = 128 on an H200, bench/RESULTS.md session 17).

A segment's capacity doubles when its request outgrows it (the request moves to a new segment at
the top: one copy); when the top reaches the end, the other live segments are packed into a fresh
tensor (room doubled) and the growing one placed after them. Dropped requests' rows are reclaimed
by the next packing, or by one at a drop once they outnumber the live rows (and SHRINK_ROWS): after
a packing the pool is twice its live segments' capacity. Rows are zero-initialized
and only ever hold finite K/V: a masked key still enters SDPA's products, and NaN garbage there
would reach the output."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark_cli.integrations.ranges import concat_ranges

MIN_SEGMENT = 16
SHRINK_ROWS = 1 << 12  # dead rows a drop tolerates before packing (no repacking at every drop)


@dataclass
class Segment:
    start: int
    capacity: int
    length: int = 0


class KVPool:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.k: torch.Tensor | None = None  # [layers, rows, kv_heads, head_dim]
        self.v: torch.Tensor | None = None
        self.top = 0  # rows below it belong to segments (live or dropped)
        self.segments: dict[int, Segment] = {}

    def __contains__(self, request_id: int) -> bool:
        return request_id in self.segments

    def __iter__(self):
        return iter(list(self.segments))

    def length(self, request_id: int) -> int:
        seg = self.segments.get(request_id)
        return 0 if seg is None else seg.length

    def drop(self, request_id: int) -> None:
        if self.segments.pop(request_id, None) is None or self.k is None:
            return
        live = self._live_capacity()
        if self.top - live > max(live, SHRINK_ROWS):
            self._pack(0, self.k[0])

    def _live_capacity(self) -> int:
        return sum(seg.capacity for seg in self.segments.values())

    def committed(self, request_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One request's committed K, V [length, kv_heads, head_dim] of a layer (views)."""
        seg = self.segments[request_id]
        rows = slice(seg.start, seg.start + seg.length)
        return self.k[layer, rows], self.v[layer, rows]

    # ------------------------------------------------------------------ writing

    def commit(self, request_ids: list[int], counts: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Append counts[i] rows to request_ids[i]'s context: k, v [layers, Σ counts, kv_heads,
        head_dim], the requests' rows in order; one write each for all layers."""
        if len(set(request_ids)) != len(request_ids):
            raise ValueError(f"commit: request ids repeat in one call: {request_ids}")
        if sum(counts) == 0:
            return
        k0 = k[0]
        for r, n in zip(request_ids, counts):
            seg = self.segments.get(r)
            have = 0 if seg is None else seg.length
            if n and (seg is None or have + n > seg.capacity):
                self._regrow(r, max(have + n, 2 * (0 if seg is None else seg.capacity), MIN_SEGMENT), k0)
        bases = [self.segments[r].start + self.segments[r].length if n else 0 for r, n in zip(request_ids, counts)]
        dst = concat_ranges(bases, counts, k0.device)
        self.k.index_copy_(1, dst, k)
        self.v.index_copy_(1, dst, v)
        for r, n in zip(request_ids, counts):
            if n:
                self.segments[r].length += n

    def _regrow(self, request_id: int, capacity: int, like: torch.Tensor) -> None:
        """Give the request a segment of `capacity` rows at the top, its committed rows moved there
        (when that takes a packing, from the tensor the packing replaced: it is not packed itself)."""
        old = self.segments.pop(request_id, None)
        src_k, src_v = self.k, self.v
        if self.k is None or self.top + capacity > self.k.shape[1]:
            self._pack(capacity, like)
        seg = Segment(self.top, capacity, 0 if old is None else old.length)
        if old is not None and old.length:
            src = slice(old.start, old.start + old.length)
            self.k[:, seg.start:seg.start + old.length] = src_k[:, src]
            self.v[:, seg.start:seg.start + old.length] = src_v[:, src]
        self.segments[request_id] = seg
        self.top += capacity

    def _pack(self, extra: int, like: torch.Tensor) -> None:
        """A fresh tensor holding the live segments packed from row 0 (each keeps its capacity) and
        room for `extra` more rows, twice what is needed. The segments move only once it is filled."""
        shape = (self.num_layers, 2 * (self._live_capacity() + extra), *like.shape[1:])
        k, v = like.new_zeros(shape), like.new_zeros(shape)
        starts, top, src, dst = {}, 0, [], []
        for r, seg in self.segments.items():
            if seg.length:
                src.append(torch.arange(seg.start, seg.start + seg.length))
                dst.append(torch.arange(top, top + seg.length))
            starts[r] = top
            top += seg.capacity
        if src:
            src_rows, dst_rows = torch.cat(src).to(like.device), torch.cat(dst).to(like.device)
            for layer in range(self.num_layers):  # a layer at a time: a smaller temporary
                k[layer].index_copy_(0, dst_rows, self.k[layer].index_select(0, src_rows))
                v[layer].index_copy_(0, dst_rows, self.v[layer].index_select(0, src_rows))
        for r, start in starts.items():
            self.segments[r].start = start
        self.k, self.v, self.top = k, v, top

    # ------------------------------------------------------------------ reading

    def placement(self, request_ids: list[int], device) -> tuple[torch.Tensor, int]:
        """For reading the contexts in place (csrc/draft_attention.cu): int32 [2, n] on `device`, each
        request's first pool row (0 without a segment) and its committed length (one copy), and the
        longest of those lengths."""
        segments = [self.segments.get(r) for r in request_ids]
        lengths = [0 if s is None else s.length for s in segments]
        rows = torch.tensor([[0 if s is None else s.start for s in segments], lengths], dtype=torch.int32)
        return rows.to(device), max(lengths, default=0)

    def padded_index(self, request_ids: list[int], width: int, device) -> torch.Tensor:
        """[n, width] pool rows of each request's context padded to `width` (padding repeats a row
        of the pool: masked by the caller)."""
        starts = torch.tensor([self.segments[r].start if r in self.segments else 0 for r in request_ids])
        last = torch.tensor([max(self.length(r) - 1, 0) for r in request_ids])
        pos = torch.minimum(torch.arange(width)[None], last[:, None])
        return (starts[:, None] + pos).to(device)
