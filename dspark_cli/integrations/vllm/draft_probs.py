"""The q of every request's pending drafts, kept until the target verifies or replaces them.

V1's runner caches the q a drafter returns only for the batch of the step that drafted
(`_draft_prob_req_ids`). A running request the scheduler skips (token budget spent before its turn)
keeps its spec_token_ids from the last step it ran; when it comes back, the runner has no q row for
it and verifies the WHOLE batch as if every draft were one-hot ("Missing cached draft
probabilities"), which is biased for sampled drafts. Here each request's q lives until a later step
that includes the request drafts again (or zeroes its drafts), and the runner reads q from here
(`install` replaces its `_get_spec_decode_draft_probs` on the runner instance; vLLM's files are not
touched). Rows whose drafts came without q (greedy drafting, the runner's zeroed drafts) are
one-hot at the draft token, which is what they are."""

import torch


class PendingDraftProbs:
    def __init__(self):
        self._q: torch.Tensor | None = None  # [R, k, V] of the last drafting step (None: one-hot drafts)
        self._rows: dict[str, int] = {}  # request id -> row of _q, the last drafting step's batch
        self._held: dict[str, torch.Tensor] = {}  # request id -> [k, V]: drafted earlier, skipped since

    def drafted(self, req_ids, q: torch.Tensor | None, live=None) -> None:
        """One drafting step: `req_ids` got new drafts, sampled from the rows of `q` [R, k, V] (None:
        one-hot drafts). A request of the previous step that is not among them keeps its drafts in
        the scheduler: its q row is held (copied, so the old batch tensor is freed). `live`: the
        requests the runner still has; held rows of the others are dropped."""
        batch = set(req_ids)
        if self._q is not None:
            for req_id, row in self._rows.items():
                if req_id not in batch:
                    self._held[req_id] = self._q[row].clone()
        for req_id in [r for r in self._held if r in batch or (live is not None and r not in live)]:
            del self._held[req_id]
        self._q = q
        self._rows = {req_id: i for i, req_id in enumerate(req_ids)}

    def for_verification(self, req_ids, num_draft_tokens, draft_token_ids: torch.Tensor) -> torch.Tensor | None:
        """q rows [Σ n, V] for the drafts being verified now (request order, n = num_draft_tokens),
        or None when every one of them is one-hot (the rejection sampler's own no-q path)."""
        latest = self._latest_rows(req_ids, num_draft_tokens)
        if latest is not None:
            return latest
        pieces, offset, vocab = [], 0, None
        for req_id, n in zip(req_ids, num_draft_tokens):
            if n == 0:
                continue
            row = self._rows.get(req_id)
            if row is not None:
                q = None if self._q is None else self._q[row, :n]
            else:
                q = self._held.get(req_id)
                q = None if q is None else q[:n]
            if q is not None:
                vocab = q.shape[-1]
            pieces.append((offset, n, q))
            offset += n
        if vocab is None:
            return None
        out = []
        for start, n, q in pieces:
            if q is None:
                ids = draft_token_ids[start:start + n].to(torch.int64).clamp_min(0).unsqueeze(1)
                q = torch.zeros(n, vocab, dtype=torch.float32, device=ids.device).scatter_(1, ids, 1.0)
            out.append(q.float())
        return torch.cat(out, dim=0).contiguous()

    def _latest_rows(self, req_ids, num_draft_tokens) -> torch.Tensor | None:
        """The common step: every request verified drafted in the last step. Its rows by one gather,
        or the last step's q itself (no copy: R·k·V·4 bytes, 545 MB at 128 × 7 × 152k) when every
        request verifies all k drafts in the order it drafted. None: take the general path."""
        if self._q is None:
            return None
        R, k, V = self._q.shape
        flat = []
        for req_id, n in zip(req_ids, num_draft_tokens):
            row = self._rows.get(req_id)
            if n and row is None:
                return None
            flat.extend(range(row * k, row * k + n) if n else ())
        if not flat:
            return None
        q = self._q.reshape(R * k, V)
        if flat == list(range(R * k)):
            return q
        return q.index_select(0, torch.tensor(flat, device=q.device))

    def install(self, runner) -> None:
        """Make `runner` (V1's GPUModelRunner) verify with these q rows: its
        `_get_spec_decode_draft_probs` reads them, and a step whose drafts it zeroes
        (`_input_fits_in_drafter` false: the drafter does not run) replaces the batch's q by one-hot."""
        fits = runner._input_fits_in_drafter

        def input_fits_in_drafter(common_attn_metadata):
            ok = fits(common_attn_metadata)
            if not ok:
                self.drafted(list(runner.input_batch.req_ids), None, runner.requests)
            return ok

        def draft_probs(spec_decode_metadata):
            return self.for_verification(runner.input_batch.req_ids, spec_decode_metadata.num_draft_tokens,
                                         spec_decode_metadata.draft_token_ids)

        runner._input_fits_in_drafter = input_fits_in_drafter
        runner._get_spec_decode_draft_probs = draft_probs
