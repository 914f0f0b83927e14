"""Markov-chain drafting (DSPARK.md §1.3, §4): x_k ~ q_k = warp(softmax((U_k + W2·W1[x_{k-1}]) / T))
with x_0 = the anchor. The fp32 q_k we sample from is exactly the q_k the ratio test uses."""

from dataclasses import dataclass

import torch

from dspark_cli.runtime import _checks, _fp32, rng
from dspark_cli.runtime._dispatch import try_cuda
from dspark_cli.runtime.confidence import check_confidence_inputs, confidence_logits
from dspark_cli.runtime.sampling import check_warps, is_greedy, sample_probs


@dataclass
class DraftSource:
    """What rebuilds any q row without storing q: base logits, anchors, Markov weights, warps."""

    U: torch.Tensor
    anchors: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None
    # [R, γ, 2] fp32 max and sum-exp of each (U_k + B_k)/T row as our CUDA chain computed them: the
    # CUDA rejection rebuilds a row with these instead of recomputing them (then the rebuilt q is
    # bit-for-bit the one the chain sampled from). None from the torch reference.
    row_stats: torch.Tensor | None = None
    # [1] int32, zero: the block counter the CUDA rejection's one-launch path counts finished blocks
    # with (its last block sets it back to zero). The chain zeroes it in a launch it makes anyway, so
    # verifying costs no fill launch. Verify a draft on one stream at a time. None from the reference.
    block_counter: torch.Tensor | None = None
    # [R, γ] fp32: each top-k/top-p row's threshold as our CUDA chain chose it (the row kept x >= t,
    # t an entry's own x in the chain's bits); None from the reference. Only the CUDA rejection,
    # which rebuilds a row with the chain's bias bits, can use it: torch's bits differ in the last
    # place, enough to drop or keep the entry at the threshold.
    thresholds: torch.Tensor | None = None


@dataclass
class MarkovDraft:
    tokens: torch.Tensor  # [R, γ] int64
    q_token: torch.Tensor  # [R, γ] fp32: q_k(x_k) (1.0 for greedy requests)
    q: torch.Tensor | None  # [R, γ, V] fp32 when return_q=True
    prev_emb: torch.Tensor  # [R, γ, r] W1[x_{k-1}] (x_0 = anchor), for the confidence head
    source: DraftSource | None = None  # set when q is None, so residual rows can be rebuilt
    confidence_logits: torch.Tensor | None = None  # [R, γ] fp32 z_k when markov_chain got `confidence`
    # gather_drafts' regrouped rows without q: [(the draft they came from, its rows), ...] in batch
    # order; rejection verifies them part by part with those drafts (q_rows does not serve them)
    parts: list | None = None

    def q_rows(self, position: torch.Tensor) -> torch.Tensor:
        """q_{position_r + 1} for each request r (0-based draft position) -> [R, V] fp32."""
        R, gamma = self.tokens.shape
        _checks.request_vector("position", position, R, _checks.INT_DTYPES)
        _checks.same_device(tokens=self.tokens, position=position)
        # a value check (on CPU by default): a negative position wrapped around to another row
        # (for a lazy draft, one of a position past the block), one ≥ γ was an IndexError
        if _checks.want_value_checks(None, position) and bool(((position < 0) | (position >= gamma)).any()):
            raise ValueError(f"position must be draft positions in [0, γ = {gamma}), got {position.tolist()}")
        rows = torch.arange(R, device=self.tokens.device)
        if self.q is not None:
            return self.q[rows, position]
        if self.parts is not None:
            raise ValueError("a gathered draft's q rows are rebuilt part by part by rejection_sample")
        if self.source is None:
            raise ValueError("this draft has neither q nor the inputs to rebuild q rows")
        s = self.source
        if s.thresholds is not None:
            raise ValueError("this draft's top-k/top-p q rows are rebuilt only by the CUDA rejection (pass seeds, "
                             "not uniforms or a generator), or draft with return_q=True")
        prev_tokens = torch.cat([s.anchors.to(torch.int64).unsqueeze(1), self.tokens], dim=1)
        return residual_row(s.U[rows, position], prev_tokens[rows, position], s.w1, s.w2,
                            s.temperature, top_k=s.top_k, top_p=s.top_p)


def gather_drafts(parts: list[tuple[MarkovDraft, list[int]]]) -> MarkovDraft:
    """One draft of the requests `parts` names, in order: [(draft, its row indices), ...], for a
    verify batch assembled from requests drafted in different steps (an engine that filters and
    merges batches between draft and verify). One draft taken whole and in order comes back as it
    is: no copy, and our CUDA chain's block counter stays with it (one-launch verification). Parts
    that all store q are copied into one draft. Otherwise only the rows' tokens, q_token, prev_emb
    and confidence logits are copied, and the draft keeps the parts: rejection_sample verifies each
    with the draft it came from, at that draft's batch size, so every rebuilt q row is the one the
    chain sampled from to the last bit (a bias GEMM's last bits depend on the batch size, and a
    top-k/top-p row rebuilt at another could drop the entry at its threshold)."""
    if not parts:
        raise ValueError("gather_drafts needs at least one (draft, rows) part")
    parts = _drafted_rows([_checked_part(i, part) for i, part in enumerate(parts)])
    if not parts:
        raise ValueError("gather_drafts: the parts name no rows (a verify batch of no requests)")
    first, first_rows = parts[0]
    for i, (draft, _) in enumerate(parts[1:], 1):
        if draft.tokens.shape[1] != first.tokens.shape[1] or _vocab(draft) != _vocab(first):
            raise ValueError(f"gather_drafts: part {i} drafted γ = {draft.tokens.shape[1]} over V = {_vocab(draft)}, "
                             f"part 0 γ = {first.tokens.shape[1]} over V = {_vocab(first)}")
        if draft.tokens.device != first.tokens.device:  # was index_select's "not on the expected device"
            raise ValueError(f"gather_drafts: part {i} is on {draft.tokens.device}, part 0 on {first.tokens.device}")
        if None not in (_rank(draft), _rank(first)) and _rank(draft) != _rank(first):  # was torch.cat's size error
            raise ValueError(f"gather_drafts: part {i} has Markov rank r = {_rank(draft)}, part 0 r = {_rank(first)}")
    if len(parts) == 1 and list(first_rows) == list(range(first.tokens.shape[0])):
        return first
    # One copy per draft, not per run of its rows (rows interleaved from two steps are many runs),
    # each straight into its places in the batch.
    device = first.tokens.device
    rows_of: dict[int, tuple[MarkovDraft, list[int], list[int]]] = {}  # id(draft) -> draft, its rows, their places
    place = 0
    for d, rows in parts:
        _, own, places = rows_of.setdefault(id(d), (d, [], []))
        own.extend(rows)
        places.extend(range(place, place + len(rows)))
        place += len(rows)
    drafts = [d for d, _, _ in rows_of.values()]
    idx = [device_rows(rows, device) for _, rows, _ in rows_of.values()]
    at = [device_rows(places, device) for _, _, places in rows_of.values()] if len(drafts) > 1 else None

    def cat(field):
        items = [getattr(d, field) for d in drafts]
        if any(t is None for t in items):
            return None
        if at is None:  # one draft (a filter): its rows in order, one copy
            return items[0].index_select(0, idx[0])
        out = items[0].new_empty((place, *items[0].shape[1:]))
        for t, rows, places in zip(items, idx, at):
            out.index_copy_(0, places, t.index_select(0, rows))
        return out

    if all(d.q is not None for d in drafts):
        return MarkovDraft(cat("tokens"), cat("q_token"), cat("q"), cat("prev_emb"), None, cat("confidence_logits"))
    return MarkovDraft(cat("tokens"), cat("q_token"), None, cat("prev_emb"), None, cat("confidence_logits"),
                       parts=[(d, list(rows)) for d, rows in parts])


def device_rows(rows: list[int], device: torch.device) -> torch.Tensor:
    """Host row indices as an int64 index tensor on `device`; to a GPU from pinned memory without
    a sync (a pageable copy waits for the stream: the host then idles until queued work is done)."""
    host = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _drafted_rows(parts) -> list[tuple[MarkovDraft, list[int]]]:
    """The parts with a gathered draft's rows named by the drafts they came from, runs of one
    draft merged."""
    out: list[tuple[MarkovDraft, list[int]]] = []
    for draft, rows in parts:
        if draft.parts is None:  # a drafted batch: its rows as they are
            named = [(draft, list(rows))] if rows else []
        else:
            origin = [(d, row) for d, own in draft.parts for row in own]
            named = [(d, [own]) for d, own in (origin[row] for row in rows)]
        for d, own in named:
            if out and out[-1][0] is d:
                out[-1][1].extend(own)
            else:
                out.append((d, own))
    return out


def _vocab(draft: MarkovDraft) -> int | None:
    """V of the draft's stored q rows or of the base logits it rebuilds them from."""
    rows = draft.q if draft.q is not None else draft.source.U if draft.source is not None else None
    return None if rows is None else rows.shape[-1]


def _rank(draft: MarkovDraft) -> int | None:
    """r of the draft's prev_emb [R, γ, r] (None for a hand-built draft without it)."""
    return None if draft.prev_emb is None else draft.prev_emb.shape[-1]


def _checked_part(i: int, part) -> tuple:
    """The part (draft, rows), its rows as host ints. Rows are on the host, so always checked (no
    device sync): an out-of-range row was an IndexError (or a device-side assert), a row 0.5 or True
    was taken as row 0 or 1. A row named twice is no error: its request is verified twice, as the
    caller asked."""
    if not isinstance(part, (tuple, list)) or len(part) != 2 or not isinstance(part[0], MarkovDraft):
        raise ValueError(f"gather_drafts: part {i} must be a (MarkovDraft, rows) pair, got {_describe(part)}")
    draft, rows = part
    if draft.q is None and draft.source is None and draft.parts is None:
        raise ValueError(f"gather_drafts: part {i}'s draft has neither q nor the inputs to rebuild q rows")
    R = draft.tokens.shape[0]
    indices = _row_indices(rows, R)
    if indices is None:
        raise ValueError(f"gather_drafts: part {i}'s rows must be a list of whole numbers in [0, {R}) "
                         f"(row indices of its draft's requests), got {rows!r}")
    return draft, indices


def _row_indices(rows, R: int):
    """rows as host ints when it is a list (tuple, range) of whole numbers in [0, R), else None.
    Python ints (what engines pass) take a plain type test and one min/max: the numbers check
    costs ~1 µs a row, on every step that follows a finished request in TGI."""
    if not isinstance(rows, (list, tuple, range)):
        return None
    if not (isinstance(rows, range) or all(type(row) is int for row in rows)):  # bool's type is not int
        if not all(map(_checks.whole_number, rows)):
            return None
        rows = [int(row) for row in rows]  # 2.0 is row 2, as a whole number is everywhere
    return rows if not rows or (min(rows) >= 0 and max(rows) < R) else None


def _step_logits(U_k: torch.Tensor, prev: torch.Tensor, w1: torch.Tensor, w2_fp32: torch.Tensor):
    """U_k + W2·W1[prev] in fp32: [R, V]."""
    return U_k.float() + _fp32.matmul(w1[prev].float(), w2_fp32.t())


def residual_row(U_k, prev, w1, w2, temperature, *, top_k=None, top_p=None) -> torch.Tensor:
    """Rebuild q rows [R, V] fp32 from base logits U_k [R, V] and the previous tokens [R] with the
    arithmetic markov_chain sampled with (so engines need not keep q [R, γ, V] in memory). The W2
    product of a batch of another size can differ from the chain's in the last bit (GEMM blocking;
    ~1e-8 on the CPU), which could move an entry across a top-k/top-p cut: rejection_sample
    rebuilds a gathered draft's rows at their drafts' own batch sizes. The CUDA path carries the
    chain's row stats and thresholds too."""
    _checks.tensor("U_k", U_k, 2, _checks.FLOAT_DTYPES)
    _checks.nonempty_batch("U_k", U_k)
    R, V = U_k.shape
    _check_markov_weights(w1, w2, V)
    _check_token_vector("prev", prev, R, V)
    check_warps(temperature, top_k, top_p, R)
    _checks.same_device(U_k=U_k, prev=prev, w1=w1, w2=w2, temperature=temperature, top_k=top_k, top_p=top_p)
    if _checks.want_value_checks(None, U_k):
        _checks.logits("U_k", U_k)
    return sample_probs(_step_logits(U_k, prev.to(torch.int64), w1, w2.float()),
                        temperature.float(), top_k, top_p)


def markov_chain(U, anchors, w1, w2, temperature, *, top_k=None, top_p=None, top_k_max=None, seeds=None,
                 generator=None, return_q=True, confidence=None) -> MarkovDraft:
    """Draft γ tokens per request, sequential over positions, batched over requests.

    x_k is drawn ∝ the fp32 q row: with `seeds` [R] int64 by rng.grouped_race_sample on the
    counter-based stream rng.STREAM_DRAFT, position k (identical on every rank and in our CUDA
    kernel); otherwise by an exponential race with noise from `generator` (or torch's global RNG).
    Greedy requests (temperature < 1e-5) take the argmax and get q = one-hot.
    confidence = (h [R, γ, d], weight [1, d+r] or [d+r], bias [1] or None): the draft also carries the
    confidence head's logits confidence_logits(h, prev_emb, weight, bias) (the CUDA chain computes
    them in its own last launch).
    top_k_max: a bound the caller knows on the host, no sampled row's top-k above it (a row without
    top-k counts as V; greedy rows do not count), or None. The draft is the same whatever it says:
    only the CUDA chain's speed depends on it (docs/kernels.md)."""
    _checks.tensor("U", U, 3, _checks.FLOAT_DTYPES)
    _checks.nonempty_batch("U", U)
    R, gamma, V = U.shape
    if gamma == 0:
        raise ValueError("U has block size γ = 0; nothing to draft")
    _check_markov_weights(w1, w2, V)
    _check_token_vector("anchors", anchors, R, V)
    check_warps(temperature, top_k, top_p, R)
    if top_k_max is not None and (isinstance(top_k_max, bool) or not isinstance(top_k_max, int) or top_k_max < 0):
        raise ValueError(f"top_k_max must be an int >= 0 or None, got {_describe(top_k_max)}")
    if seeds is not None:
        _checks.request_vector("seeds", seeds, R, (torch.int64,))
    _checks.generator(generator)
    _checks.same_device(U=U, anchors=anchors, w1=w1, w2=w2, temperature=temperature,
                        top_k=top_k, top_p=top_p, seeds=seeds)
    if _checks.want_value_checks(None, U):
        _checks.logits("U", U)
    if confidence is not None:
        if not isinstance(confidence, (tuple, list)) or len(confidence) != 3:
            raise ValueError(f"confidence must be a tuple (h, weight, bias), got {_describe(confidence)}")
        check_confidence_inputs(*confidence, R, gamma, w1.shape[1])
        _checks.same_device(U=U, h=confidence[0])

    tensors = [t for t in (U, anchors, w1, w2, temperature, top_k, top_p, seeds) if t is not None]
    out = try_cuda("markov_chain", tensors, U, anchors, w1, w2, temperature, top_k=top_k,
                   top_p=top_p, top_k_max=top_k_max, seeds=seeds, generator=generator, return_q=return_q,
                   confidence=confidence)
    if out is not NotImplemented:
        return out

    temperature = temperature.float()
    w2_fp32 = w2.float()
    # An all-greedy batch on the CPU (the host reads the temperatures for free there): the argmax
    # chain alone, without the softmax, one-hot and race noise each step would spend on its rows
    # (a CPU engine's drafter runs this every step). Same tokens, q and q_token as the loop below.
    all_greedy = U.device.type == "cpu" and bool(is_greedy(temperature).all())
    tokens = torch.empty(R, gamma, dtype=torch.int64, device=U.device)
    q_token = torch.empty(R, gamma, dtype=torch.float32, device=U.device)
    q = torch.empty(R, gamma, V, dtype=torch.float32, device=U.device) if return_q else None
    prev_emb = torch.empty(R, gamma, w1.shape[1], dtype=w1.dtype, device=U.device)
    prev = anchors.to(torch.int64)
    for k in range(gamma):  # the chain is inherently sequential over positions
        prev_emb[:, k] = w1[prev]
        if all_greedy:  # top-k/top-p keep the argmax: a greedy row is its one-hot whatever the warps
            prev = _step_logits(U[:, k], prev, w1, w2_fp32).argmax(dim=-1)
            tokens[:, k] = prev
            continue
        probs = sample_probs(_step_logits(U[:, k], prev, w1, w2_fp32), temperature, top_k, top_p)
        prev = _sample(probs, seeds, k, generator)
        tokens[:, k] = prev
        q_token[:, k] = probs.gather(1, prev.unsqueeze(1)).squeeze(1)
        if q is not None:
            q[:, k] = probs
    if all_greedy:
        q_token.fill_(1.0)
        if q is not None:
            q.zero_().scatter_(2, tokens.unsqueeze(2), 1.0)
    source = None if return_q else DraftSource(U, anchors, w1, w2, temperature, top_k, top_p)
    z = None if confidence is None else confidence_logits(confidence[0], prev_emb, *confidence[1:])
    return MarkovDraft(tokens, q_token, q, prev_emb, source, z)


def _sample(probs, seeds, k: int, generator) -> torch.Tensor:
    """x_k [R] ∝ probs; one-hot rows (greedy) give their argmax."""
    if seeds is not None:
        return rng.grouped_race_sample(probs, seeds, rng.STREAM_DRAFT, k)
    return rng.race_sample(probs, rng.exponential_like(probs, generator))


def _describe(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _check_markov_weights(w1, w2, vocab: int) -> None:
    _checks.tensor("w1", w1, 2, _checks.FLOAT_DTYPES)
    _checks.tensor("w2", w2, 2, _checks.FLOAT_DTYPES)
    _checks.dim("w1", w1, 0, vocab, "vocab size V of the logits")
    _checks.dim("w2", w2, 0, vocab, "vocab size V; W2 is stored [V, r] like nn.Linear(r, V).weight")
    _checks.dim("w2", w2, 1, w1.shape[1], "Markov rank r of w1")


def check_markov_weight_values(w1, w2) -> None:
    """NaN/inf in the Markov head's W1/W2 make every q row NaN. A check of the weights' values for
    engines to run once at load: per chain step it would read W2 (155 MB at Qwen3-4B shapes) again."""
    _checks.tensor("w1", w1, 2, _checks.FLOAT_DTYPES)  # a list was an AttributeError
    _checks.tensor("w2", w2, 2, _checks.FLOAT_DTYPES)
    _checks.finite("the Markov head's W1", w1)
    _checks.finite("the Markov head's W2", w2)


def _check_token_vector(name, t, R: int, vocab: int) -> None:
    """[R] token ids that index W1. Their range is a value check: run where the others run (on CPU
    by default, where min/max cost no device sync); on CUDA the chain trusts them."""
    _checks.request_vector(name, t, R, _checks.INT_DTYPES)
    if _checks.want_value_checks(None, t):
        _checks.token_ids(name, t, vocab)

