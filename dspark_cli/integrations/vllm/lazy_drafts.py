"""Sampled DSpark drafts verified on V1 without a q tensor (the default where the series has the hook).

V1's RejectionSampler takes the drafts' q as a tensor [Σ n, V] fp32 and reads every row of it (it
samples a recovered token at every draft position). Stored, that q is most of the chain's bytes at
larger batches: at R = 128, γ = 7, V = 151936 the chain writes 545 MB of q and V1 reads it back
(docs/vllm.md). Here the proposer drafts lazily (`markov_chain(return_q=False)`: tokens, q_token and
what rebuilds a row), each request's block is kept until verified, and patch 0008's hook (0009 on
v0.33.0) in `RejectionSampler.forward` hands V1's processed target logits and its bonus tokens to
`BlockVerify.dspark_rejection_sample`, which verifies with `dspark_cli.runtime.rejection_sample_rows`:
the ratio tests read q_token, and only the one residual row a rejected request needs is rebuilt
from U, W1 and W2 (on the GPU by our rejection kernel, with the chain's bits).

What V1 does and this keeps:
- The bonus token is V1's sampler's (its logits processors, penalties, bad words, min_tokens): a
  request that accepts all its drafts emits it. Our runtime draws a token from row
  row_start + ℓ_r there, which here is the next request's first row (the last request's is a
  spare row): that token is replaced.
- Greedy requests: accept iff the draft is the argmax of the target's logits; emit that argmax
  (the runtime's target_argmax: their probability rows are not read). On the CPU, so does a row
  without a distribution (logits all -inf or NaN), as in V1.
- Placeholder drafts (id −1: vLLM pads a request that has one token left to compute, and the
  async scheduler pads requests it did not carry over) are rejected surely and the token is a
  sample of p: verified with ℓ = the first placeholder's position, whose row is then raced over
  as it is (no bonus replacement). A request whose drafts are all placeholders reads no q: it
  verifies as a one-hot row, its block (if any) left pending.
- Noise: on the CPU (torch reference) exactly V1's: one float64 uniform per draft token in
  request order from vLLM's own `generate_uniform_probs` (a seeded request's from its generator),
  then one Exp(1) row per request (global RNG, a seeded request with drafts from its generator),
  the recovered token argmax(max(p − q, 0) / E); the same drafts give the same tokens as V1's
  stored-q verification. On CUDA our kernels draw counter-based noise: each request's key comes
  from torch's generator, a seeded request's from its own generator (batch-independent).
- Drafts the drafter did not make (the runner zeroed them when the input did not fit the
  drafter) are verified one-hot at their token, as V1 verifies drafts without q.

Requests the scheduler skipped keep their block, and only theirs: once at most half of an older
step's rows are pending, those rows are taken out of its draft (`_HeldRows`: their U rows, the
step's small per-request tensors whole) and the rest of it is freed, as PendingDraftProbs copies
held q rows. A rebuilt row must come from the draft at its drafted batch size (only there are its
bias bits the chain's), so verifying held rows restores a draft of that size for the step, U
written only at those rows. `DSPARK_V1_DRAFT_Q=stored` keeps V1's stored-q path
(draft_probs.PendingDraftProbs), e.g. to compare."""

import dataclasses
import itertools
import os

import torch
from vllm.v1.sample.rejection_sampler import GREEDY_TEMPERATURE, generate_uniform_probs

from dspark_cli.runtime import MarkovDraft, cuda_ops, gather_drafts, rejection_sample_rows
from dspark_cli.runtime.markov import device_rows

from dspark_cli.integrations.ranges import concat_ranges
from dspark_cli.integrations.vllm.draft_probs import carried_over, hook_runner
from dspark_cli.integrations.vllm.target_rows import target_rows

SWITCH = "DSPARK_V1_DRAFT_Q"
MODES = ("lazy", "stored")


def lazy_mode(hook_present: bool, environ=os.environ) -> bool:
    """Whether sampled drafts go to V1's verifier lazily: DSPARK_V1_DRAFT_Q (lazy, the default, or
    stored; any case) where the applied series has the verify hook; stored without it (a tree
    patched by an older series)."""
    value = (environ.get(SWITCH) or "lazy").strip().lower()
    if value not in MODES:
        raise ValueError(f"{SWITCH}={environ[SWITCH]!r}: expected one of {', '.join(MODES)}")
    return value == "lazy" and hook_present


class PendingDrafts:
    """Each request's pending block, as (the MarkovDraft of the step that drafted it, or the
    _HeldRows or stored-q draft kept of it once the request was skipped, its row there)."""

    def __init__(self):
        self._rows: dict[str, tuple[MarkovDraft | _HeldRows, int]] = {}
        # PendingDraftProbs' counters: held (requests skipped after drafting), verified_from_held
        # (draft rows verified from an older step's block), placeholder_rows; and blocks_verified
        # (verify steps that went through BlockVerify), blocks_cut (held blocks cut down to their rows)
        self.counts = {"held": 0, "verified_from_held": 0, "placeholder_rows": 0, "blocks_verified": 0,
                       "blocks_cut": 0}
        self._step = None  # the last drafting step's draft

    def drafted(self, req_ids, draft: MarkovDraft | None, live=None, discarded=()) -> None:
        """One drafting step: `req_ids` got the rows of `draft` (None: the drafter did not run and the
        runner zeroed their drafts). `live`: the requests the runner still has; `discarded`: requests
        whose drafts vLLM discards (prefill chunks)."""
        batch = set(req_ids)
        blocks: dict[int, tuple] = {}  # the blocks still pending for requests not in this batch
        for req_id, (held, _) in list(self._rows.items()):
            if req_id in batch or (live is not None and req_id not in live):
                del self._rows[req_id]
                continue
            if held is self._step:  # skipped at this step: its block stays until verified
                self.counts["held"] += 1
            blocks.setdefault(id(held), (held, []))[1].append(req_id)
        discarded = set(discarded)
        if draft is not None:
            self._rows.update({req_id: (draft, i) for i, req_id in enumerate(req_ids) if req_id not in discarded})
        self._step = draft
        self._cut_held_blocks(blocks.values())

    def _cut_held_blocks(self, blocks) -> None:
        """Free what pending requests no longer need: an older step's block (with the requests
        holding it) of which at most half the rows are still pending is cut down to those rows (its
        U, or q where stored, is most of a step's memory). Halving bounds both the memory held (at
        most twice the held requests' own rows) and the copying (each row copied at most twice)."""
        for block, req_ids in blocks:
            rows = sorted(self._rows[req_id][1] for req_id in req_ids)
            if 2 * len(rows) > _rows_kept(block):
                continue
            if isinstance(block, _HeldRows):
                kept, at = block.cut(rows), {row: row for row in rows}
            elif block.q is not None:  # stored q (torch top-k/top-p rows): the rows are the block, as they are
                kept, at = gather_drafts([(block, rows)]), {row: i for i, row in enumerate(rows)}
            else:
                kept, at = _HeldRows.of(block, rows), {row: row for row in rows}
            for req_id in req_ids:
                self._rows[req_id] = (kept, at[self._rows[req_id][1]])
            self.counts["blocks_cut"] += 1

    def kept(self) -> tuple[list[str], list[str]]:
        """The request ids with a pending block: (held from older steps, rows of the last drafting step)."""
        held = [r for r, (draft, _) in self._rows.items() if draft is not self._step]
        return held, [r for r, (draft, _) in self._rows.items() if draft is self._step]

    def forget(self, req_ids) -> None:
        """Drop the blocks of requests resumed after preemption, new or finished."""
        for req_id in req_ids:
            self._rows.pop(req_id, None)

    def verifier(self, req_ids, num_draft_tokens, draft_token_ids: torch.Tensor, spec_token_ids,
                 placeholder_requests) -> "BlockVerify | None":
        """The verification of this step's drafts, or None for V1's own path: no request here has a
        block of ours (V1's no-q path is then exactly the one-hot verification). Requests without
        drafts are left out of it (their token is V1's bonus token): naming them as stand-in rows of
        a block would split its verification into a second call. spec_token_ids: the runner's
        host lists of drafts (batch order), for placeholders; placeholder_requests: the batch
        positions whose lists are placeholders (not carried over on the device)."""
        counts = list(num_draft_tokens)
        starts = list(itertools.accumulate([0] + counts[:-1]))
        verified = [i for i, n in enumerate(counts) if n]
        parts, ell, one_hot = [], [], []
        from_held = 0
        restored = {}  # a _HeldRows' draft, restored once for all its rows here (one verification call)
        for i in verified:
            held, n = self._rows.get(req_ids[i]), counts[i]
            first = n
            if i in placeholder_requests:
                first = next((j for j, t in enumerate(spec_token_ids[i][:n]) if t < 0), n)
                self.counts["placeholder_rows"] += n - first
            ell.append(first)
            if not first:  # placeholders only: no q row is read; as a one-hot row it names no other
                held = None  # request's row a second time (a second call) and restores no held block
            if held is None:  # drafts without a block of ours: one-hot at their tokens
                one_hot.append(len(parts))
            from_held += first if held is not None and held[0] is not self._step else 0
            if held is not None and isinstance(held[0], _HeldRows):
                if id(held[0]) not in restored:
                    restored[id(held[0])] = held[0].restored()
                held = (restored[id(held[0])], held[1])
            parts.append(held)
        if all(p is None for p in parts):
            return None
        self.counts["verified_from_held"] += from_held
        self.counts["blocks_verified"] += 1
        if one_hot:
            like = next(p for p in parts if p is not None)[0]
            hot = _one_hot_draft(draft_token_ids, [starts[verified[k]] for k in one_hot], [ell[k] for k in one_hot],
                                 like)
            for j, k in enumerate(one_hot):
                parts[k] = (hot, j)
        draft = gather_drafts(_runs(parts))
        return BlockVerify(draft, verified, ell)

    def install(self, runner) -> None:
        """Make `runner` (V1's GPUModelRunner) hand its rejection sampler our BlockVerify instead of
        q rows (None in an all-greedy step: V1's greedy path needs no q); zeroed drafts and the
        requests that leave are handled as for stored q (draft_probs.hook_runner)."""

        def draft_probs(spec_decode_metadata):
            batch = runner.input_batch
            if batch.sampling_metadata.all_greedy:
                return None
            req_ids, counts = batch.req_ids, spec_decode_metadata.num_draft_tokens
            return self.verifier(req_ids, counts, spec_decode_metadata.draft_token_ids, batch.spec_token_ids,
                                 placeholder_requests(runner, req_ids, counts))

        hook_runner(runner, self, draft_probs)


def _rows_kept(block) -> int:
    return len(block.rows) if isinstance(block, _HeldRows) else block.tokens.shape[0]


class _HeldRows:
    """What a lazy draft keeps for the requests skipped after it: their rows of U (γ × V each) and
    the draft's per-request tensors whole (tokens, anchors, row stats: small). `restored()` gives
    the draft back at its drafted batch size with only those rows of U: the draft's other rows go
    along as greedy stand-ins whose output is dropped, and the bias is rebuilt for all of them,
    as the chain made it."""

    def __init__(self, draft: MarkovDraft, batch: int, rows: list[int], U_rows: torch.Tensor):
        self._draft, self._batch, self.rows, self._U_rows = draft, batch, rows, U_rows

    @classmethod
    def of(cls, draft: MarkovDraft, rows: list[int]) -> "_HeldRows":
        U = draft.source.U
        return cls(dataclasses.replace(draft, source=dataclasses.replace(draft.source, U=None)), U.shape[0], rows,
                   U.index_select(0, device_rows(rows, U.device)))

    def cut(self, rows: list[int]) -> "_HeldRows":
        at = {row: i for i, row in enumerate(self.rows)}
        return _HeldRows(self._draft, self._batch, rows,
                         self._U_rows.index_select(0, device_rows([at[row] for row in rows], self._U_rows.device)))

    def restored(self) -> MarkovDraft:
        # a draft of our CUDA chain (its row stats) is verified by our CUDA op, which reads U only at
        # the rows it rebuilds (tests/test_kernels_gpu.py, with NaN at the others): the other rows
        # are left unwritten; the torch reference rebuilds every row and checks U's values on the
        # CPU: zeros there
        shape = (self._batch, *self._U_rows.shape[1:])
        ours = self._draft.source.row_stats is not None
        U = self._U_rows.new_empty(shape) if ours else self._U_rows.new_zeros(shape)
        U.index_copy_(0, device_rows(self.rows, U.device), self._U_rows)
        return dataclasses.replace(self._draft, source=dataclasses.replace(self._draft.source, U=U))


def placeholder_requests(runner, req_ids, num_draft_tokens) -> set[int]:
    """Batch positions whose host draft lists hold placeholders (id < 0) that are real for this
    step: with async scheduling those lists are all −1 and the drafts of a request carried over from
    the last step are copied on the device from that step's drafts, so such a request has none."""
    lists = runner.input_batch.spec_token_ids
    if min(itertools.chain.from_iterable(lists), default=0) >= 0:
        return set()
    carried = carried_over(runner)
    return {i for i, (req_id, n) in enumerate(zip(req_ids, num_draft_tokens))
            if n and lists[i][:n] and min(lists[i][:n]) < 0 and req_id not in carried}


def _runs(rows: list[tuple[MarkovDraft, int]]) -> list[tuple[MarkovDraft, list[int]]]:
    """gather_drafts' parts: consecutive rows of one draft as one part."""
    parts = []
    for draft, row in rows:
        if parts and parts[-1][0] is draft:
            parts[-1][1].append(row)
        else:
            parts.append((draft, [row]))
    return parts


def _one_hot_draft(draft_token_ids: torch.Tensor, starts: list[int], counts: list[int], like: MarkovDraft):
    """A stored draft of one-hot rows at the given drafts [Σ counts] of `draft_token_ids`, padded
    with token 0 to the block size γ of `like` (the padding is not verified)."""
    k, gamma = len(starts), like.tokens.shape[1]
    V = (like.q if like.q is not None else like.source.U).shape[-1]
    device = draft_token_ids.device
    tokens = torch.zeros(k * gamma, dtype=torch.int64, device=device)
    tokens.index_copy_(0, concat_ranges([i * gamma for i in range(k)], counts, device),
                       draft_token_ids[concat_ranges(starts, counts, device)].to(torch.int64))
    tokens = tokens.view(k, gamma)
    q = torch.zeros(k, gamma, V, dtype=torch.float32, device=device).scatter_(2, tokens.unsqueeze(2), 1.0)
    return MarkovDraft(tokens, torch.ones(k, gamma, dtype=torch.float32, device=device), q, prev_emb=None)


class BlockVerify:
    """What PendingDrafts.install's runner hands its rejection sampler as `draft_probs`: patch 0008
    calls `dspark_rejection_sample` in place of V1's `rejection_sample`, with its arguments.
    `verified`: the batch positions of the requests with drafts, the rows of `draft`; `ell`: how
    many of each one's drafts are verified (fewer than it has at a placeholder)."""

    def __init__(self, draft: MarkovDraft, verified: list[int], ell: list[int]):
        self.draft, self.verified, self.ell = draft, verified, ell

    def dspark_rejection_sample(self, draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                                draft_probs, target_logits, bonus_token_ids, sampling_metadata,
                                synthetic_mode=False, synthetic_conditional_rates=None, use_fp64_gumbel=False,
                                fly_window_size=None, **fly) -> torch.Tensor:
        """V1's output_token_ids [R, max_spec_len + 1] int32 (−1 padded) from its processed target
        logits [Σ n, V] and bonus tokens [R, 1]. fly_*: v0.33.0's FLy acceptance, which is not this."""
        if synthetic_mode or fly_window_size is not None:  # the proposer stores q for these (DSparkProposer)
            raise RuntimeError("DSpark blocks without q rows verify with standard rejection sampling only")
        counts = list(num_draft_tokens)
        R, V = len(counts), target_logits.shape[1]
        device = target_logits.device
        greedy = None if sampling_metadata.all_random else sampling_metadata.temperature[:R] == GREEDY_TEMPERATURE
        target, best = target_rows(target_logits, any_greedy=greedy is not None)
        starts = list(itertools.accumulate([0] + counts[:-1]))
        rows = self.verified
        index = None if len(rows) == R else device_rows(rows, device)

        def take(x):  # the verified requests' entries of a per-request tensor
            return x if index is None or x is None else x.index_select(0, index)

        row_start, ell, n = device_rows([starts[i] for i in rows] + self.ell + [counts[i] for i in rows],
                                        device).split(len(rows))
        noise = self._noise(counts, sampling_metadata.generators, V, target_logits, use_fp64_gumbel)
        res = rejection_sample_rows(target, row_start, ell, self.draft, greedy=take(greedy), target_argmax=best,
                                    **{k: take(v) for k, v in noise.items()})
        # a request that accepted all its drafts (ℓ = n, no placeholder) emits V1's bonus token
        bonus = bonus_token_ids.view(R, 1).to(torch.int64)
        at = res.num_accepted.unsqueeze(1)
        ours = res.output_tokens.scatter(1, at, torch.where(at == n.unsqueeze(1), take(bonus),
                                                            res.output_tokens.gather(1, at)))
        if index is not None:  # requests without drafts: their bonus token alone
            out = ours.new_full((R, ours.shape[1]), -1)
            out[:, :1] = bonus
            ours = out.index_copy_(0, index, ours)
        return ours[:, :max_spec_len + 1].to(torch.int32)

    def _noise(self, counts, generators, V: int, target: torch.Tensor, fp64_exp: bool) -> dict:
        """Per-request noise for all R requests of the batch (V1 draws it so), before the verified
        requests' rows are taken."""
        device = target.device
        R, gamma = len(counts), self.draft.tokens.shape[1]
        if cuda_ops.available(target):
            seeds = torch.randint(0, 2**63 - 1, (R,), dtype=torch.int64, device=device)
            for i, gen in generators.items():
                if i < R and counts[i]:
                    seeds[i] = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=device, generator=gen)
            return {"seeds": seeds}
        flat = generate_uniform_probs(sum(counts), counts, generators, device)
        uniforms = torch.full((R * gamma,), 0.5, dtype=torch.float64, device=device)
        uniforms.index_copy_(0, concat_ranges([i * gamma for i in range(R)], counts, device), flat)
        # V1's recovered-token noise: one row per request, drawn after the uniforms
        exp_noise = torch.empty(R, V, dtype=torch.float64 if fp64_exp else torch.float32, device=device)
        exp_noise.exponential_()
        for i, gen in generators.items():
            if i < R and counts[i]:
                exp_noise[i].exponential_(generator=gen)
        return {"uniforms": uniforms.view(R, gamma), "exp_noise": exp_noise}
