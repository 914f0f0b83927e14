"""The TGI drafter's context K/V: every request's committed rows in one K and one V tensor
[layers, rows, kv_heads, head_dim], each request owning a contiguous segment of rows, so that a
step's commits are one index_copy_ for K and one for V, and a batch's padded contexts one gather
per layer, whatever the number of requests (per-request tensors cost a few host dispatches each
per layer: most of the drafter's step at R = 128 on an H200, bench/RESULTS.md session 17).

A segment's capacity doubles when its request outgrows it (the request moves to a new segment at
the top: one copy); when the top reaches the end, the live segments are placed again from row 0,
the growing one last. Unreserved, into a fresh tensor with twice their capacity (room doubled);
dropped requests' rows are reclaimed by such a packing, or by one at a drop once they outnumber the
live rows (and SHRINK_ROWS). Reserved (`reserve`, from TGI's warmup: the drafter's rows come out of
the budget that sizes TGI's KV cache), within the reserved rows (when the room is short, each segment
keeps its rows plus a share of the room left in proportion to them, so placements stay rare near a
full pool), so serving allocates nothing more unless the live rows alone outgrow it.

Rows outside the committed ones are never read (our attention op reads each context's rows;
`padded_index` pads with a committed row, or row 0 for a request without rows), so a tensor is
made empty with only row 0 zeroed: a masked key still enters SDPA's products, and NaN garbage
there would reach the output."""

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
        self.reserved = 0  # rows held for good (0: none; the tensor grows and shrinks with the live rows)
        self.outgrown = 0  # how often the live rows alone outgrew the reservation (each time: a fresh tensor)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self.segments

    def __iter__(self):
        return iter(list(self.segments))

    def length(self, request_id: int) -> int:
        seg = self.segments.get(request_id)
        return 0 if seg is None else seg.length

    def drop(self, request_id: int) -> None:
        if self.segments.pop(request_id, None) is None or self.k is None or self.reserved:
            return
        live = self._live_capacity()
        if self.top - live > max(live, SHRINK_ROWS):
            self._pack(None, 0, {}, self.k[0])

    def reserve(self, rows: int, like: torch.Tensor) -> None:
        """Hold `rows` rows (at least the live segments' capacity) from now on; like: a tensor of
        the K/V dtype and device, shaped [any, kv_heads, head_dim]."""
        self.reserved = max(rows, self._live_capacity())
        self._place(list(self.segments), {r: seg.capacity for r, seg in self.segments.items()},
                    *self._allocate(self.reserved, like))

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
        k0, incoming = k[0], None
        for r, n in zip(request_ids, counts):
            seg = self.segments.get(r)
            have = 0 if seg is None else seg.length
            if n and (seg is None or have + n > seg.capacity):
                incoming = incoming or dict(zip(request_ids, counts))  # (made only when a segment grows)
                self._regrow(r, have + n, k0, incoming)
        bases = [self.segments[r].start + self.segments[r].length if n else 0 for r, n in zip(request_ids, counts)]
        dst = concat_ranges(bases, counts, k0.device)
        self.k.index_copy_(1, dst, k)
        self.v.index_copy_(1, dst, v)
        for r, n in zip(request_ids, counts):
            if n:
                self.segments[r].length += n

    def _regrow(self, request_id: int, needed: int, like: torch.Tensor, incoming: dict[int, int]) -> None:
        """Give the request a segment of at least `needed` rows (twice its old capacity when there
        is room), its committed rows moved there: at the top, or last when the segments are placed
        again. incoming: the rows the commit is about to write, per request."""
        old = self.segments.get(request_id)
        capacity = max(needed, 2 * (0 if old is None else old.capacity), MIN_SEGMENT)
        if self.k is None or self.top + capacity > self.k.shape[1]:
            self._pack(request_id, capacity, incoming, like)
            return
        seg = Segment(self.top, capacity, 0 if old is None else old.length)
        if seg.length:
            src = slice(old.start, old.start + old.length)
            self.k[:, seg.start:seg.start + old.length] = self.k[:, src]
            self.v[:, seg.start:seg.start + old.length] = self.v[:, src]
        self.segments[request_id] = seg
        self.top += capacity

    def _pack(self, growing: int | None, capacity: int, incoming: dict[int, int], like: torch.Tensor) -> None:
        """Place the live segments from row 0, each keeping its capacity, then `growing`'s (None:
        none) with `capacity` rows. Unreserved: in a fresh tensor twice their size. Reserved: in
        place; when that is short, every segment keeps its rows and the `incoming` ones a commit is
        about to write plus its share of the room left, and only when even those rows are short, a
        fresh tensor twice their size, which becomes the reservation."""
        order = [r for r in self.segments if r != growing] + ([] if growing is None else [growing])
        caps = {r: seg.capacity for r, seg in self.segments.items()}
        if growing is not None:
            caps[growing] = capacity
        if self.reserved and sum(caps.values()) > self.reserved:
            caps = {r: self.length(r) + incoming.get(r, 0) for r in order}
            # The room left goes to the segments in proportion to their rows: each grows into its
            # share before the next placement (with none, every later growth would place them all).
            held, spare = sum(caps.values()), self.reserved - sum(caps.values())
            if spare > 0:
                caps = {r: n + spare * n // held for r, n in caps.items()}
        total = sum(caps.values())
        if self.reserved and total <= self.reserved:
            self._place(order, caps, self.k, self.v)
            return
        rows = 2 * total
        if self.reserved:
            self.reserved, self.outgrown = rows, self.outgrown + 1
        self._place(order, caps, *self._allocate(rows, like))

    def _allocate(self, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_layers, max(rows, 1), *like.shape[1:])  # row 0 exists for padding
        k, v = like.new_empty(shape), like.new_empty(shape)
        k[:, :1].zero_()  # the row a request without rows is padded with (module docstring)
        v[:, :1].zero_()
        return k, v

    def _place(self, order: list[int], caps: dict[int, int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Lay the requests in `order` out from row 0 of k, v with capacities `caps`, their committed
        rows moved there; k, v may be the pool's own tensors (every row is read before any is
        written: a layer at a time, a smaller temporary)."""
        starts, top, src, dst = {}, 0, [], []
        for r in order:
            n = self.length(r)
            if n:
                seg = self.segments[r]
                src.append(torch.arange(seg.start, seg.start + n))
                dst.append(torch.arange(top, top + n))
            starts[r] = top
            top += caps[r]
        if src:
            src_rows, dst_rows = torch.cat(src).to(k.device), torch.cat(dst).to(k.device)
            for layer in range(self.num_layers):
                k[layer].index_copy_(0, dst_rows, self.k[layer].index_select(0, src_rows))
                v[layer].index_copy_(0, dst_rows, self.v[layer].index_select(0, src_rows))
        self.segments = {r: Segment(starts[r], caps[r], self.length(r)) for r in order}
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
