"""The q of every request's pending drafts, kept until the target verifies or replaces them.

V1's runner caches the q a drafter returns only for the batch of the step that drafted
(`_draft_prob_req_ids`). A running request the scheduler skips (token budget spent before its turn)
keeps its spec_token_ids from the last step it ran; when it comes back, the runner has no q row for
it and verifies the WHOLE batch as if every draft were one-hot ("Missing cached draft
probabilities"): still lossless (a draft x accepted with probability p(x), the recovered token drawn
from p without x), but every sampled draft of that step is accepted less often than with its own q,
min(1, p(x)/q(x)). Here each request's q lives until a later step
that includes the request drafts again (or zeroes its drafts), and the runner reads q from here
(`install` replaces its `_get_spec_decode_draft_probs` on the runner instance; vLLM's files are not
touched). Rows whose drafts came without q (greedy drafting, the runner's zeroed drafts) are
one-hot at the draft token, which is what they are.

Placeholder drafts: vLLM's scheduler pads a request with one token left to compute (a new 1-token
prompt, a prefix-cache hit, a request resumed after preemption) with drafts of id −1, and the async
scheduler hands every request not carried over from the last step −1 drafts. They have no q: the
rejection kernel rejects an id < 0 surely and samples the recovered token from max(p − q, 0), so
their q row must be all zeros (the token is then a sample of p, as upstream's no-q path gives for
id −1). A one-hot row at token 0, or q held from before a preemption, would bias that sample.
Placeholders are found from the runner's host lists of this step's drafts (no device sync) and
only their rows are zeroed. A request resumed after preemption (or new, or finished) loses any q
kept for it: its drafts are placeholders or new, never the ones that q was sampled for.

Memory: a held q is γ×V fp32 per skipped request until it drafts again or finishes (worst case
max_num_seqs × γ × V × 4 bytes, ~1.1 GB at 256 × 7 × 152k)."""

import itertools

import torch

from dspark_cli.integrations.ranges import concat_ranges


class PendingDraftProbs:
    def __init__(self):
        self._q: torch.Tensor | None = None  # [R, k, V] of the last drafting step (None: one-hot drafts)
        self._rows: dict[str, int] = {}  # request id -> row of _q, the last drafting step's batch
        self._held: dict[str, torch.Tensor] = {}  # request id -> [k, V]: drafted earlier, skipped since
        # held: requests whose q was held (skipped after drafting); verified_from_held: draft rows
        # verified with a held q; placeholder_rows: draft rows of id < 0 verified with a zero q
        # (or with V1's own no-q path when no row of the batch has q).
        self.counts = {"held": 0, "verified_from_held": 0, "placeholder_rows": 0}

    def drafted(self, req_ids, q: torch.Tensor | None, live=None, discarded=()) -> None:
        """One drafting step: `req_ids` got new drafts, sampled from the rows of `q` [R, k, V] (None:
        one-hot drafts). A request of the previous step that is not among them keeps its drafts in
        the scheduler: its q row is held (copied, so the old batch tensor is freed). `live`: the
        requests the runner still has; held rows of the others are dropped. `discarded`: requests
        of this batch whose drafts vLLM discards (prefill chunks): no q is kept for them."""
        batch = set(req_ids)
        if self._q is not None:
            for req_id, row in self._rows.items():
                if req_id not in batch:
                    self._held[req_id] = self._q[row].clone()
                    self.counts["held"] += 1
        for req_id in [r for r in self._held if r in batch or (live is not None and r not in live)]:
            del self._held[req_id]
        self._q = q
        discarded = set(discarded)
        self._rows = {req_id: i for i, req_id in enumerate(req_ids) if req_id not in discarded}

    def forget(self, req_ids) -> None:
        """Drop whatever q is kept for `req_ids` (resumed after preemption, new, finished): their
        pending drafts, if any, are not the ones it was sampled for."""
        for req_id in req_ids:
            self._held.pop(req_id, None)
            self._rows.pop(req_id, None)

    def kept(self) -> tuple[list[str], list[str]]:
        """The request ids whose q is kept: (held from older steps, rows of the last drafting step)."""
        return list(self._held), list(self._rows)

    def for_verification(self, req_ids, num_draft_tokens, draft_token_ids: torch.Tensor,
                         placeholders=()) -> torch.Tensor | None:
        """q rows [Σ n, V] for the drafts being verified now (request order, n = num_draft_tokens),
        or None when every one of them is one-hot or a placeholder (the rejection sampler's own
        no-q path). `placeholders`: positions in these Σ n drafts whose id is < 0; their rows are
        all zeros."""
        placeholders = list(placeholders)
        self.counts["placeholder_rows"] += len(placeholders)
        out = self._latest_rows(req_ids, num_draft_tokens, copy=bool(placeholders))
        if out is None:
            out = self._general_rows(req_ids, num_draft_tokens, draft_token_ids)
        if out is not None and placeholders:
            # `out` is a fresh tensor here (never the drafted q itself): zero the few rows
            out.index_fill_(0, torch.tensor(placeholders, dtype=torch.int64, device=out.device), 0.0)
        return out

    def _general_rows(self, req_ids, num_draft_tokens, draft_token_ids) -> torch.Tensor | None:
        pieces, offset, vocab, from_held = [], 0, None, 0
        for req_id, n in zip(req_ids, num_draft_tokens):
            if n == 0:
                continue
            row = self._rows.get(req_id)
            if row is not None:
                q = None if self._q is None else self._q[row, :n]
            else:
                q = self._held.get(req_id)
                q = None if q is None else q[:n]
                from_held += 0 if q is None else n
            if q is not None:
                vocab, device = q.shape[-1], q.device
            pieces.append((offset, n, q))
            offset += n
        if vocab is None:
            return None
        self.counts["verified_from_held"] += from_held
        # one allocation, each row written once: the pieces cover it (a cat of per-piece rows would
        # be a second copy of q)
        out = torch.empty(offset, vocab, dtype=torch.float32, device=device)
        for start, n, q in pieces:
            if q is None:
                # one-hot at the draft; a placeholder's (id < 0) row is zeroed by the caller
                ids = draft_token_ids[start:start + n].to(device=device, dtype=torch.int64).clamp_min(0)
                out[start:start + n].zero_().scatter_(1, ids.unsqueeze(1), 1.0)
            else:
                out[start:start + n].copy_(q)
        return out

    def _latest_rows(self, req_ids, num_draft_tokens, copy: bool = False) -> torch.Tensor | None:
        """The common step: every request verified drafted in the last step. Its rows by one gather,
        or the last step's q itself (no copy: R·k·V·4 bytes, 545 MB at 128 × 7 × 152k) when every
        request verifies all k drafts in the order it drafted and `copy` is false. None: take the
        general path."""
        if self._q is None:
            return None
        R, k, V = self._q.shape
        rows = [self._rows.get(req_id) for req_id in req_ids]
        counts = list(num_draft_tokens)
        if any(row is None and n for row, n in zip(rows, counts)) or not any(counts):
            return None
        q = self._q.reshape(R * k, V)
        if not copy and len(rows) == R and rows == list(range(R)) and counts == [k] * R:
            return q  # the drafted batch in its order, every draft verified
        # request i's first n_i rows: row_i·k + j for j < n_i
        flat = concat_ranges([0 if row is None else row * k for row in rows], counts, q.device)
        return q.index_select(0, flat)

    def install(self, runner) -> None:
        """Make `runner` (V1's GPUModelRunner) verify with these q rows (placeholder drafts get zero
        rows); a step whose drafts it zeroes makes the batch's q one-hot (hook_runner)."""

        def draft_probs(spec_decode_metadata):
            req_ids, counts = runner.input_batch.req_ids, spec_decode_metadata.num_draft_tokens
            return self.for_verification(req_ids, counts, spec_decode_metadata.draft_token_ids,
                                         placeholder_positions(runner, req_ids, counts))

        hook_runner(runner, self, draft_probs)


def hook_runner(runner, pending, draft_probs) -> None:
    """Give `runner` (V1's GPUModelRunner) `draft_probs(spec_decode_metadata)` as its
    `_get_spec_decode_draft_probs` (what its rejection sampler gets as draft_probs); a step whose
    drafts it zeroes (`_input_fits_in_drafter` false: the drafter does not run) is
    `pending.drafted(batch, None, live requests)`, and `_update_states` first calls `pending.forget`
    with the requests resumed, preempted, new or finished in the scheduler output."""
    fits = runner._input_fits_in_drafter
    update_states = runner._update_states

    def input_fits_in_drafter(common_attn_metadata):
        ok = fits(common_attn_metadata)
        if not ok:
            pending.drafted(list(runner.input_batch.req_ids), None, runner.requests)
        return ok

    def update_states_and_forget(scheduler_output):
        cached = scheduler_output.scheduled_cached_reqs
        pending.forget([*getattr(cached, "resumed_req_ids", ()), *scheduler_output.finished_req_ids,
                        *(getattr(scheduler_output, "preempted_req_ids", None) or ()),
                        *(r.req_id for r in scheduler_output.scheduled_new_reqs)])
        return update_states(scheduler_output)

    runner._input_fits_in_drafter = input_fits_in_drafter
    runner._get_spec_decode_draft_probs = draft_probs
    runner._update_states = update_states_and_forget


def placeholder_positions(runner, req_ids, num_draft_tokens) -> list[int]:
    """Positions, among this step's Σ n verified drafts, of the placeholders (id < 0), from host
    state: the input batch's per-request draft lists (the scheduler's, in batch order). With async
    scheduling those lists are all −1 and the drafts of a request carried over from the last step
    are copied on the device from that step's drafts: such a request has none."""
    batch = runner.input_batch
    lists = batch.spec_token_ids
    if min(itertools.chain.from_iterable(lists), default=0) >= 0:
        return []  # the common step: no placeholder anywhere (one pass in C, no per-request loop)
    carried = carried_over(runner)
    out, offset = [], 0
    for i, (req_id, n) in enumerate(zip(req_ids, num_draft_tokens)):
        if not n:
            continue
        ids = lists[i][:n]
        if ids and min(ids) < 0 and req_id not in carried:
            out.extend(offset + j for j, t in enumerate(ids) if t < 0)
        offset += n
    return out


def carried_over(runner):
    """The requests whose drafts async scheduling copies on the device from the last step's (their
    host lists hold −1 stand-ins, not placeholders); empty without async scheduling."""
    batch = runner.input_batch
    if (getattr(runner, "use_async_scheduling", False) and getattr(batch, "prev_sampled_token_ids", None) is not None
            and getattr(runner, "_draft_token_ids", None) is not None):
        return getattr(batch, "prev_req_id_to_index", None) or ()
    return ()
