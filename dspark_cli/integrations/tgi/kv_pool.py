"""The TGI drafter's context K/V in pages: every request's committed rows in one K and one V tensor
[layers, pages · PAGE_ROWS, kv_heads, head_dim], each request owning a list of pages that hold its
rows in order, so that a step's commits are one index_copy_ for K and one for V and our attention
op reads each context through its page table, whatever the number of requests (per-request
tensors cost a few host dispatches each per layer: most of the drafter's step at R = 128 on an
H200, bench/RESULTS.md session 17).

Nothing ever moves: a request takes pages from a free list as its context grows and gives them
back when it finishes, so requests finishing and arriving at every step near a full pool cost
nothing more (contiguous segments did: an arrival found the room shared out, and every live row was
copied again every few steps, bench/RESULTS.md session 27). A request leaves fewer than PAGE_ROWS
rows unused, less than TGI's own KV blocks (16 or 256 tokens) leave.

Unreserved (in tests, and before TGI's warmup), the tensors are made again with twice the pages
when the free list runs out. Reserved (`reserve`, from TGI's warmup: the drafter's rows come out of
the budget that sizes TGI's KV cache), serving allocates nothing more unless the live pages alone
outgrow it (then a quarter more, counted in `outgrown`: the memory is already beyond TGI's plan,
and old and new tensors are held at once while the rows move).

Rows outside the committed ones are never read (our attention op reads each context's rows;
`padded_index` pads with a committed row), except page 0's: it belongs to no request and stays
zero, the padding of a request without rows (a masked key still enters SDPA's products, and NaN
garbage there would reach the output)."""

from __future__ import annotations

import torch

PAGE_ROWS = 16
MIN_PAGES = 8  # the first tensor's pages (the zero page included)


class KVPool:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.k: torch.Tensor | None = None  # [layers, pages · PAGE_ROWS, kv_heads, head_dim]
        self.v: torch.Tensor | None = None
        self.pages: dict[int, list[int]] = {}  # a request's pages, in the order of its rows
        self.lengths: dict[int, int] = {}
        self.free: list[int] = []  # pages no request holds (page 0 never among them)
        # Every request's pages on the device too, one row of `table` each (`slots`; row 0: a
        # request without rows, all page 0), written as pages are taken: a step's page tables are
        # one gather, not a copy of every request's pages from the host (62k at 1M rows).
        self.table: torch.Tensor | None = None  # int32 [slot rows, most pages]
        self.slots: dict[int, int] = {}
        self.free_slots: list[int] = []
        self.reserved: int | None = None  # rows held for good (None: the tensors grow as the live pages need)
        self.outgrown = 0  # how often the live pages alone outgrew the reservation (each time: new tensors)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self.pages

    def __iter__(self):
        return iter(list(self.pages))

    def length(self, request_id: int) -> int:
        return self.lengths.get(request_id, 0)

    def drop(self, request_id: int) -> None:
        self.free.extend(reversed(self.pages.pop(request_id, [])))
        self.lengths.pop(request_id, None)
        if request_id in self.slots:
            self.free_slots.append(self.slots.pop(request_id))

    def reserve(self, rows: int, like: torch.Tensor) -> None:
        """Hold `rows` rows (at least the live pages) from now on; like: a tensor of the K/V dtype
        and device, shaped [any, kv_heads, head_dim]."""
        pages = max(-(-rows // PAGE_ROWS), self._live_pages()) + 1
        self.reserved = (pages - 1) * PAGE_ROWS
        self._remake(pages, like)

    def _live_pages(self) -> int:
        return sum(map(len, self.pages.values()))

    def committed(self, request_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One request's committed K, V [length, kv_heads, head_dim] of a layer (copies)."""
        rows = self._rows([request_id], [0], [self.length(request_id)], self.k.device)
        return self.k[layer].index_select(0, rows), self.v[layer].index_select(0, rows)

    # ------------------------------------------------------------------ writing

    def commit(self, request_ids: list[int], counts: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Append counts[i] rows to request_ids[i]'s context: k, v [layers, Σ counts, kv_heads,
        head_dim], the requests' rows in order; one write each for all layers."""
        if len(set(request_ids)) != len(request_ids):
            raise ValueError(f"commit: request ids repeat in one call: {request_ids}")
        self._check_rows(counts, k, v)  # before anything changes: a bad call leaves the pool as it was
        if sum(counts) == 0:
            return
        have = [self.length(r) for r in request_ids]
        short = sum(max(-(-(h + n) // PAGE_ROWS) - len(self.pages.get(r, ())), 0)
                    for r, h, n in zip(request_ids, have, counts) if n)
        if short > len(self.free):
            self._make_room(short, k[0])
        taken = []  # (slot, column, page) of every page taken now
        for r, h, n in zip(request_ids, have, counts):
            if n:
                pages = self.pages.setdefault(r, [])
                for column in range(len(pages), -(-(h + n) // PAGE_ROWS)):
                    pages.append(self.free.pop())
                    taken.append((self._slot(r), column, pages[-1]))
                self.lengths[r] = h + n
        self._write_table(taken, k.device)
        dst = self._rows(request_ids, have, counts, k.device)
        self.k.index_copy_(1, dst, k)
        self.v.index_copy_(1, dst, v)

    def _check_rows(self, counts: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        if min(counts, default=0) < 0:
            raise ValueError(f"commit: negative row counts {counts}")
        want = (self.num_layers, sum(counts))
        if k.dim() != 4 or v.shape != k.shape or tuple(k.shape[:2]) != want:
            raise ValueError(f"commit: k and v must both be [{want[0]} layers, {want[1]} rows (Σ counts), kv_heads, "
                             f"head_dim], got {tuple(k.shape)} and {tuple(v.shape)}")
        held = [(t.dtype, t.device, t.shape[2:]) for t in (k, v, self.k) if t is not None]
        if len(set(held)) > 1:
            raise ValueError(f"commit: k, v (and the pool's rows) differ in dtype, device or shape: {held}")

    def _make_room(self, short: int, like: torch.Tensor) -> None:
        """Tensors with `short` more free pages than the free list has: unreserved, at least twice
        the pages; reserved (the live pages alone outgrew the reservation: counted), a quarter more."""
        have = 1 if self.k is None else self.k.shape[1] // PAGE_ROWS
        grown = have + have // 4 if self.reserved is not None else 2 * have
        pages = max(grown, self._live_pages() + short + 1, MIN_PAGES)
        if self.reserved is not None:
            self.reserved, self.outgrown = (pages - 1) * PAGE_ROWS, self.outgrown + 1
        self._remake(pages, like)

    def _remake(self, pages: int, like: torch.Tensor) -> None:
        """New tensors of `pages` pages with page 0 zeroed, the live pages moved to 1, 2, ... in
        request order (one gather per layer and tensor); every other page free."""
        live = [p for r in self.pages for p in self.pages[r]]
        if not live:  # nothing to move (warmup's pool at reserve): free it before the new one is made
            self.k = self.v = None
        shape = (self.num_layers, pages * PAGE_ROWS, *like.shape[1:])
        k, v = like.new_empty(shape), like.new_empty(shape)
        k[:, :PAGE_ROWS].zero_()
        v[:, :PAGE_ROWS].zero_()
        if live:
            src = (torch.tensor(live)[:, None] * PAGE_ROWS + torch.arange(PAGE_ROWS)).flatten().to(k.device)
            end = (1 + len(live)) * PAGE_ROWS
            for new, old in ((k, self.k), (v, self.v)):
                for layer in range(self.num_layers):
                    torch.index_select(old[layer], 0, src, out=new[layer, PAGE_ROWS:end])
        first = 1
        for r, held in self.pages.items():
            self.pages[r] = list(range(first, first + len(held)))
            first += len(held)
        self.free = list(range(pages - 1, first - 1, -1))  # popped from the end: low pages first
        self.k, self.v = k, v
        self.table = None
        self._write_table([(self.slots[r], c, p) for r, held in self.pages.items() for c, p in enumerate(held)],
                          k.device)

    def _slot(self, request_id: int) -> int:
        if request_id not in self.slots:
            self.slots[request_id] = self.free_slots.pop() if self.free_slots else len(self.slots) + 1
        return self.slots[request_id]

    def _write_table(self, entries: list[tuple[int, int, int]], device) -> None:
        """table[slot, column] = page for each entry (one copy to the device), the table made
        again with twice the rows, or the columns, it lacks (each on its own: growing both at once
        made a table of one 1M-token request 65536 × 65536)."""
        need = (1 + max(self.slots.values(), default=0), max([len(p) for p in self.pages.values()] + [1]))
        have = (0, 0) if self.table is None else tuple(self.table.shape)
        if need[0] > have[0] or need[1] > have[1]:
            old, self.table = self.table, torch.zeros(
                *(h if n <= h else max(n, 2 * h, 8) for n, h in zip(need, have)), dtype=torch.int32, device=device)
            if old is not None:
                self.table[:have[0], :have[1]] = old
        if entries:
            slot, column, page = torch.tensor(entries, dtype=torch.int64).to(device).T
            self.table[slot, column] = page.int()

    def _rows(self, request_ids: list[int], starts: list[int], counts: list[int], device) -> torch.Tensor:
        """int64 [Σ counts] on `device`: the pool rows of positions starts[i] .. starts[i] +
        counts[i] − 1 of request_ids[i]'s context, concatenated; one copy to the device. Only the
        pages those positions touch are gathered on the host (a decode step's: one or two each)."""
        touched, first, spans = [], [], []
        for r, s, n in zip(request_ids, starts, counts):
            lo = s // PAGE_ROWS
            first.append(len(touched) - lo)
            if n:
                touched.extend(self.pages[r][lo:(s + n - 1) // PAGE_ROWS + 1])
            spans.append(n)
        n = torch.tensor(spans, dtype=torch.int64)
        owner_first = torch.repeat_interleave(torch.tensor(first, dtype=torch.int64), n)
        pos = torch.repeat_interleave(torch.tensor(starts, dtype=torch.int64), n)
        pos += torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        page = torch.tensor(touched, dtype=torch.int64)[owner_first + pos // PAGE_ROWS] if touched else pos
        return (page * PAGE_ROWS + pos % PAGE_ROWS).to(device)

    # ------------------------------------------------------------------ reading

    def page_table(self, request_ids: list[int], device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """For reading the contexts in place (csrc/draft_attention.cu): the requests' pages int32 [n,
        columns] (a row's columns past the request's own pages hold anything: not read) and
        committed lengths int32 [n] on the pool's device (one copy, one gather), and the longest
        of those lengths."""
        if self.table is None:  # nothing committed yet
            self._write_table([], device)
        lengths = [self.length(r) for r in request_ids]
        host = torch.tensor([lengths, [self.slots.get(r, 0) for r in request_ids]], dtype=torch.int32)
        lengths_dev, slots = host.to(device)
        longest = max(lengths, default=0)
        columns = max(-(-longest // PAGE_ROWS), 1)  # the batch's own, not the most any request ever held
        return self.table[:, :columns].index_select(0, slots), lengths_dev, longest

    def padded_index(self, request_ids: list[int], width: int, device) -> torch.Tensor:
        """[n, width] pool rows of each request's context padded to `width` (padding repeats its
        last row, or row 0 of the zero page for a request without rows: masked by the caller)."""
        pages, lengths, _ = self.page_table(request_ids, device)
        pos = torch.minimum(torch.arange(width, device=device)[None], (lengths.long() - 1).clamp(min=0)[:, None])
        return pages.long().gather(1, pos // PAGE_ROWS) * PAGE_ROWS + pos % PAGE_ROWS
