"""Lossless variable-length rejection sampling (DSPARK.md §3.2 V2-V3, §4).

Request r verifies its first ℓ_r drafts: target rows p_0..p_{ℓ_r} (row j scores draft x_{j+1},
row ℓ_r gives the bonus). Accept x_j iff u_j·q_j(x_j) < p_{j-1}(x_j) (= u_j < min(1, p/q), no
clamp on q, which would bias rare draws) along the prefix; at the first rejection sample from
max(p − q, 0) (from p when that mass ≤ 1e-8); if all ℓ_r are accepted, sample the bonus from p_{ℓ_r}.
ℓ_r = 0 is a plain decode step. Greedy requests: accept iff x_j = argmax p_{j-1}; emit argmax (or
the engine's own argmax per row, `target_argmax`: an engine's greedy token is the argmax of its
logits, which an fp32 softmax can tie; given it, greedy requests' probability rows are not read).
rejection_sample_rows and rejection_sample_flat take the target rows as probabilities or as
LogitRows (target_probs.py: logits and their softmax statistics; on CUDA the entries read are
computed where read, no [N, V] probabilities written).
Everything is tensor ops: no host sync, no Python loop over requests or positions."""

from dataclasses import dataclass

import torch

from dspark_cli.runtime import _checks, rng
from dspark_cli.runtime._dispatch import try_cuda
from dspark_cli.runtime.markov import MarkovDraft, device_rows
from dspark_cli.runtime.target_probs import LogitRows, ProbRows

RESIDUAL_MASS_FLOOR = 1e-8


@dataclass
class VerifyResult:
    output_tokens: torch.Tensor  # [R, γ+1] int64: accepted drafts, then the recovered/bonus token, −1 padded
    num_accepted: torch.Tensor  # [R] int64; request r emits num_accepted + 1 tokens


def rejection_sample(target_probs, draft, ell, *, greedy=None, seeds=None, generator=None,
                     uniforms=None, exp_noise=None, target_argmax=None) -> VerifyResult:
    """target_probs [R, S, V] fp32, S ≤ γ+1 rows per request (rows beyond ℓ_r are ignored: an
    engine that verified only S−1 drafts per request passes its rows as they are, the draft keeps
    all γ); draft: MarkovDraft or (tokens [R, γ], q_token [R, γ], q [R, γ, V]); ell [R] int64 or
    int32 in [0, S−1]; greedy [R] bool (None: no greedy request). Randomness: seeds [R] int64
    (counter-based, see rng.py; the residual/bonus by the grouped race), else `generator` (a
    torch.Generator or None: torch's global RNG; exponential race); an engine that draws with its
    own per-request generators passes them instead: uniforms [R, γ] in [0, 1] for the ratio tests
    (u = 1 accepts only where q(x) < p(x)), exp_noise [R, V] Exp(1) for the residual/bonus
    (exponential race). target_argmax [R, S] int64 or int32: the greedy requests' token per row in
    place of the argmax of target_probs (the argmax of the engine's logits, its greedy token); their
    rows of target_probs are then not read."""
    draft = _as_draft(draft)
    _checks.tensor("target_probs", target_probs, 3, (torch.float32,))
    _checks.nonempty_batch("target_probs", target_probs)
    R, rows, V = target_probs.shape
    gamma = draft.tokens.shape[1]
    _checks.dim("draft tokens", draft.tokens, 0, R, "one draft per request of target_probs")
    if not 1 <= rows <= gamma + 1:
        raise ValueError(f"target_probs has {rows} rows per request, expected 1 to γ + 1 = {gamma + 1} target rows")
    _checks.tensor("ell", ell, 1, (torch.int64, torch.int32))
    _checks.dim("ell", ell, 0, R, "one verify length per request")
    if target_argmax is not None:
        _check_argmax_shape(target_argmax, (R, rows))
        target_argmax = target_argmax.reshape(R * rows)
    # request r's rows start at r·rows: no row_start tensor (the CUDA op computes it, saving a launch)
    return _verify(ProbRows(target_probs.reshape(R * rows, V)), None, ell.to(torch.int64), draft, greedy, seeds,
                   generator, uniforms, exp_noise, check_values=_checks.want_value_checks(None, ell), row_stride=rows,
                   target_argmax=target_argmax)


def rejection_sample_flat(target_probs, cu_num_tokens, draft, *, greedy=None, seeds=None,
                          generator=None, uniforms=None, exp_noise=None, target_argmax=None) -> VerifyResult:
    """Varlen entry (the layout of a flattened verify batch, as vLLM V1 builds it):
    target_probs [Σ_r (1+ℓ_r), V] fp32, request r owns rows cu_num_tokens[r] .. cu_num_tokens[r+1]−1
    (its anchor row and ℓ_r draft rows); cu_num_tokens [R+1] int64 or int32 starting at 0. Drafts
    stay [R, γ]. target_argmax: [Σ_r (1+ℓ_r)], as rejection_sample's per row. target_probs may be
    LogitRows (its rows, spare ones included, as the rows here)."""
    draft = _as_draft(draft)
    target_probs = _target_rows(target_probs)
    _checks.tensor("cu_num_tokens", cu_num_tokens, 1, (torch.int64, torch.int32))
    R = draft.tokens.shape[0]
    _checks.dim("cu_num_tokens", cu_num_tokens, 0, R + 1, "R + 1 offsets")
    cu = cu_num_tokens.to(torch.int64)
    check_values = _checks.want_value_checks(None, cu)
    if check_values:
        _check_offsets(cu, target_probs.shape[0])
    ell = cu[1:] - cu[:-1] - 1
    if target_argmax is not None:
        _check_argmax_shape(target_argmax, target_probs.shape[:1])
    return _verify(target_probs, cu[:-1], ell, draft, greedy, seeds, generator, uniforms, exp_noise,
                   check_values=check_values, target_argmax=target_argmax)


def rejection_sample_rows(target_probs, row_start, ell, draft, *, greedy=None, seeds=None, generator=None,
                          uniforms=None, exp_noise=None, target_argmax=None) -> VerifyResult:
    """Rows named per request (an engine whose target rows are not laid out 1 + ℓ_r per request):
    target_probs [N, V] fp32; request r's draft j+1 is scored by row row_start[r] + j (j < ℓ_r) and
    its bonus/ℓ_r = 0 token comes from row row_start[r] + ℓ_r, which must exist. Requests' rows may
    overlap: vLLM V1 gives the bonus token itself and has no bonus rows, so its hook points each
    request's bonus row at the next request's first row (and one spare row after the last) and
    replaces the tokens drawn there. row_start, ell [R] int64 or int32. target_argmax: [N], as
    rejection_sample's per row (V1 takes its greedy tokens from the logits so). target_probs may be
    LogitRows (its rows, spare ones included, as the rows here: V1's spare row is one)."""
    draft = _as_draft(draft)
    target_probs = _target_rows(target_probs)
    R = draft.tokens.shape[0]
    for name, t in (("row_start", row_start), ("ell", ell)):
        _checks.tensor(name, t, 1, (torch.int64, torch.int32))
        _checks.dim(name, t, 0, R, "one entry per request")
    row_start, ell = row_start.to(torch.int64), ell.to(torch.int64)
    if target_argmax is not None:
        _check_argmax_shape(target_argmax, target_probs.shape[:1])
    check_values = _checks.want_value_checks(None, row_start)
    if check_values and bool(((row_start < 0) | (row_start + ell.clamp_min(0) >= target_probs.shape[0])).any()):
        raise ValueError(f"rows row_start .. row_start + ell must lie in the {target_probs.shape[0]} rows of "
                         f"target_probs, got row_start {row_start.tolist()}, ell {ell.tolist()}")
    return _verify(target_probs, row_start, ell, draft, greedy, seeds, generator, uniforms, exp_noise,
                   check_values=check_values, target_argmax=target_argmax)


def _target_rows(target) -> ProbRows | LogitRows:
    """A caller's target rows [N, V] as the verification reads them: LogitRows (which checked
    itself), or fp32 probabilities as ProbRows."""
    if isinstance(target, LogitRows):
        return target
    _checks.tensor("target_probs", target, 2, (torch.float32,))
    return ProbRows(target)


def _check_argmax_shape(target_argmax, rows: tuple) -> None:
    _checks.tensor("target_argmax", target_argmax, len(rows), (torch.int64, torch.int32))
    _check_shape("target_argmax", target_argmax, tuple(rows), "one token id per target row")


def _check_offsets(cu: torch.Tensor, num_rows: int) -> None:
    """Request r owns rows cu[r] .. cu[r+1]−1, at least its anchor row, and the offsets cover
    target_probs exactly: a first offset of 1 or a short last one skipped rows silently."""
    if int(cu[0]) != 0 or int(cu[-1]) != num_rows or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_num_tokens must start at 0, grow by at least 1 per request and end at the "
                         f"{num_rows} rows of target_probs, got {cu.tolist()}")


def _as_draft(draft) -> MarkovDraft:
    if isinstance(draft, MarkovDraft):
        _checks.tensor("draft tokens", draft.tokens, 2, _checks.INT_DTYPES)  # [R, γ]: R and γ come from it
        for name, t in (("draft q_token", draft.q_token), ("draft q", draft.q)):  # shapes: checked later
            if isinstance(t, torch.Tensor) and t.dtype != torch.float32:  # a hand-made draft's, say
                raise ValueError(f"{name} must have dtype float32, got {str(t.dtype).removeprefix('torch.')}")
        return draft
    if isinstance(draft, (tuple, list)) and len(draft) == 3:
        tokens, q_token, q = draft
        _checks.tensor("draft tokens", tokens, 2, (torch.int64, torch.int32))
        _checks.tensor("draft q_token", q_token, 2, (torch.float32,))
        if q is None:
            raise ValueError("a (tokens, q_token, q) draft needs q; pass a MarkovDraft to rebuild q rows")
        _checks.tensor("draft q", q, 3, (torch.float32,))
        if q_token.shape != tokens.shape or q.shape[:2] != tokens.shape:
            raise ValueError(f"draft shapes disagree: tokens {tuple(tokens.shape)}, q_token "
                             f"{tuple(q_token.shape)}, q {tuple(q.shape)}")
        return MarkovDraft(tokens.to(torch.int64), q_token, q, prev_emb=None)
    raise ValueError("draft must be a MarkovDraft or a (tokens, q_token, q) tuple")


def _check_draft_vocab(draft: MarkovDraft, vocab: int) -> None:
    """The draft's q rows (stored, or rebuilt from its base logits) span the target's vocabulary."""
    if draft.q is not None:
        _checks.dim("draft q", draft.q, 2, vocab, "vocab size V of target_probs")
    elif draft.source is not None:
        _checks.dim("draft source U", draft.source.U, 2, vocab, "vocab size V of target_probs")


def _check_shape(name: str, t, shape: tuple, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape} ({what})")


def _check_draft_shapes(draft: MarkovDraft, R: int, gamma: int) -> None:
    """Every draft field the verify reads has the shape the draft tokens [R, γ] give it: a
    hand-built MarkovDraft with a short field was an IndexError or RuntimeError from inside torch,
    and a longer one (more requests, positions or ranks) was read in part, silently; the CUDA op
    trusts these shapes. Metadata only (no device sync): checked on every device, always. The vocab
    axis is _check_draft_vocab's."""
    _check_shape("draft q_token", draft.q_token, (R, gamma), "[R, γ] as the draft tokens")
    if draft.q is not None:
        _checks.tensor("draft q", draft.q, 3)
        _check_shape("draft q", draft.q, (R, gamma, draft.q.shape[2]), "[R, γ, V] with R, γ of the draft tokens")
        return
    s = draft.source
    if s is None:
        if draft.parts is None:  # a hand-built draft: every path would stop at its first q row
            raise ValueError("the draft has neither q nor the inputs to rebuild its rows (markov_chain's drafts have one)")
        return
    _checks.tensor("draft source U", s.U, 3)
    _check_shape("draft source U", s.U, (R, gamma, s.U.shape[2]), "[R, γ, V] with R, γ of the draft tokens")
    for name in ("anchors", "temperature", "top_k", "top_p"):
        if (t := getattr(s, name)) is not None:
            _check_shape(f"draft source {name}", t, (R,), "one entry per request")
    _checks.tensor("draft source w1", s.w1, 2)
    _check_shape("draft source w1", s.w1, (s.U.shape[2], s.w1.shape[1]), "[V, r] with V of the draft's U")
    _check_shape("draft source w2", s.w2, tuple(s.w1.shape), "[V, r] as w1")
    if s.row_stats is not None:
        _check_shape("draft source row_stats", s.row_stats, (R, gamma, 2), "[R, γ, 2]: each q row's max, sum-exp")
    if s.thresholds is not None:
        _check_shape("draft source thresholds", s.thresholds, (R, gamma), "[R, γ] as the draft tokens")


SUM_TOLERANCE = 1e-3


def _check_target_rows(target, row_start, ell, row_stride, unread=None) -> None:
    """The rows the verify reads (each request's 1 + ℓ_r, but those of the requests `unread` [R]
    marks; the others may be padding) are distributions: a NaN, negative or all-zero row drew an
    arbitrary token, silently."""
    if row_start is None:
        row_start = torch.arange(ell.numel(), dtype=torch.int64) * row_stride
    pos = torch.arange(int(ell.max()) + 1, dtype=torch.int64)
    read = pos <= ell.unsqueeze(1)
    if unread is not None:
        read &= ~unread.unsqueeze(1)
    rows = target.rows((row_start.unsqueeze(1) + pos)[read])  # LogitRows: only those rows computed
    if rows.shape[0] == 0:
        return
    _checks.nonnegative("target_probs", rows, locate=False)  # an index into rows, not target_probs, would mislead
    sums = rows.sum(dim=1, dtype=torch.float64)
    if bool((sums == 0).any()):
        raise ValueError("target_probs has an all-zero row among the verified rows (no distribution)")
    # an fp32 softmax over 151,936 entries sums to 1 within ~1e-5; a row masked by top-k/top-p and
    # not renormalized does not, and would be sampled as if it did
    if bool(((sums - 1).abs() > SUM_TOLERANCE).any()):
        raise ValueError(f"target_probs rows must sum to 1 (within {SUM_TOLERANCE}); a verified row sums to "
                         f"{float(sums[(sums - 1).abs().argmax()]):.6g} (renormalize after masking)")


def _check_stored_q(draft: MarkovDraft, ell: torch.Tensor, greedy) -> None:
    """On the verified positions q rows are distributions and q_token is q at the drafted token:
    the ratio test reads q_token and the residual reads q, so a q masked by top-k/top-p and not
    renormalized, or a q_token of another distribution (an unwarped q, a shifted position), is no
    longer lossless. fp32 rounding (a softmax's sum, an engine's own gather) stays within the
    tolerances. Greedy requests read neither."""
    verified = torch.arange(draft.tokens.shape[1], device=ell.device) < ell.unsqueeze(1)
    if greedy is not None:
        verified &= ~greedy.unsqueeze(1)
    sums = draft.q.sum(dim=2, dtype=torch.float64)
    off = verified & ((sums - 1).abs() > SUM_TOLERANCE)
    if bool(off.any()):
        r, j = (int(i) for i in off.nonzero()[0])
        raise ValueError(f"draft q rows must sum to 1 (within {SUM_TOLERANCE}); request {r}, draft {j} sums to "
                         f"{float(sums[r, j]):.6g}")
    at_token = draft.q.gather(2, draft.tokens.unsqueeze(2)).squeeze(2)
    off = verified & ~torch.isclose(draft.q_token, at_token, rtol=1e-3, atol=1e-6)
    if bool(off.any()):
        r, j = (int(i) for i in off.nonzero()[0])
        raise ValueError(f"draft q_token must be q at the drafted token: request {r}, draft {j} has q_token "
                         f"{float(draft.q_token[r, j]):.6g}, q {float(at_token[r, j]):.6g}")


def _verify(target, row_start, ell, draft: MarkovDraft, greedy, seeds, generator, uniforms, exp_noise,
            check_values, row_stride=0, target_argmax=None) -> VerifyResult:
    """target: ProbRows or LogitRows [num_rows, V]. row_start [R] int64, or None for dense
    rows: request r's start at r·row_stride. target_argmax [num_rows]: the greedy requests' tokens,
    the caller's (see rejection_sample), or each row's argmax made once for a regrouped draft's parts."""
    R, gamma = draft.tokens.shape
    num_rows, V = target.shape
    _checks.nonempty_batch("draft tokens", draft.tokens)
    if gamma == 0:
        raise ValueError("drafts have block size γ = 0")
    _check_draft_shapes(draft, R, gamma)
    _check_draft_vocab(draft, V)
    for name, t in (("greedy", greedy), ("seeds", seeds)):
        if t is not None:
            _checks.tensor(name, t, 1, (torch.bool,) if name == "greedy" else (torch.int64,))
            _checks.dim(name, t, 0, R, "one entry per request")
    for name, t, shape in (("uniforms", uniforms, (R, gamma)), ("exp_noise", exp_noise, (R, V))):
        if t is not None:  # a list was an AttributeError on .shape
            _check_shape(name, t, shape, "engine-drawn noise")
    _checks.same_device(target=target.tensors[0], tokens=draft.tokens,
                        q_token=draft.q_token, q=draft.q, ell=ell, greedy=greedy, seeds=seeds, uniforms=uniforms,
                        exp_noise=exp_noise, target_argmax=target_argmax)
    _checks.generator(generator)
    if check_values:
        if bool(((ell < 0) | (ell > gamma)).any()):
            raise ValueError(f"verify lengths must lie in [0, γ={gamma}], got {ell.tolist()}")
        if row_start is None and bool((ell >= row_stride).any()):
            raise ValueError(f"verify lengths must be below the {row_stride} target rows per request, got {ell.tolist()}")
        # the caller's noise, here: a part's call would see it with its stand-ins' fill values
        for name, t in (("uniforms", uniforms), ("exp_noise", exp_noise)):
            if t is not None and not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if uniforms is not None:
            _checks.in_unit_interval("uniforms", uniforms)
        if exp_noise is not None:
            _checks.nonnegative("exp_noise", exp_noise)
        if target_argmax is not None:
            _checks.token_ids("target_argmax", target.as_read(target_argmax), V)  # the entries read
    if greedy is None:
        target_argmax = None  # no request reads it
    if draft.parts is not None:  # each part's call checks the values below, for its draft's rows
        return _verify_by_part(target, row_start, ell, draft, greedy, seeds, generator, uniforms, exp_noise,
                               check_values, row_stride, target_argmax)
    if check_values:
        # token ids index target rows and W1: checked with the other value checks (on CPU by
        # default, where min/max cost no device sync); on CUDA the kernels trust them
        _checks.token_ids("draft tokens", draft.tokens, V)
        if draft.q is None and draft.source is not None:
            _checks.token_ids("draft anchors", draft.source.anchors, V)
        _check_target_rows(target, row_start, ell, row_stride, None if target_argmax is None else greedy)
        _checks.in_unit_interval("draft q_token", draft.q_token)
        if draft.q is not None:
            _checks.nonnegative("draft q", draft.q)
            _check_stored_q(draft, ell, greedy)

    tensors = [t for t in (*target.tensors, row_start, ell, draft.tokens, draft.q_token, greedy, seeds,
                           uniforms, exp_noise, target_argmax) if t is not None]
    out = try_cuda("rejection_sample", tensors, target, row_start, ell, draft, greedy=greedy,
                   seeds=seeds, generator=generator, uniforms=uniforms, exp_noise=exp_noise, row_stride=row_stride,
                   target_argmax=target_argmax)
    if out is not NotImplemented:
        return out
    if row_start is None:
        row_start = torch.arange(0, R * row_stride, row_stride, device=target.device, dtype=torch.int64)

    device = target.device
    if target_argmax is not None:
        target_argmax = target.as_read(target_argmax)  # a spare row's token is the row it reads
    elif greedy is not None:
        target_argmax = target.argmax()  # per row: no [R, γ, V] gather
    pos = torch.arange(gamma, device=device, dtype=torch.int64).unsqueeze(0)  # draft j+1 at index j
    verified = pos < ell.unsqueeze(1)
    rows = torch.clamp(row_start.unsqueeze(1) + pos, max=num_rows - 1)  # row j scores draft j+1
    tokens = draft.tokens
    # [R, γ]; LogitRows: those entries computed, as a kernel does (no [N, V] probabilities)
    p_token = target.entries(rows, tokens)

    if uniforms is not None:
        u = uniforms.float()
    elif seeds is not None:
        u = rng.uniform(seeds, rng.STREAM_ACCEPT, pos, 0)
    else:
        # fp32 whatever torch's default dtype: a bf16 default's u (at most 0.99609) accepted every p/q above it
        u = torch.rand(R, gamma, device=device, generator=generator, dtype=torch.float32)
    accept = u * draft.q_token.float() < p_token
    if greedy is not None:
        match = tokens == target_argmax[rows].to(torch.int64)
        accept = torch.where(greedy.unsqueeze(1), match, accept)
    num_accepted = torch.cumprod((accept & verified).to(torch.int64), dim=1).sum(dim=1)

    p_row = target.rows(row_start + num_accepted)  # [R, V]: scores the first unaccepted slot
    rejected = num_accepted < ell
    q_row = _q_rows_read(draft, torch.clamp(num_accepted, max=gamma - 1),
                         rejected if greedy is None else rejected & ~greedy, V)
    residual = torch.clamp(p_row - q_row, min=0.0)
    use_residual = rejected & (residual.sum(dim=1) > RESIDUAL_MASS_FLOOR)
    weights = torch.where(use_residual.unsqueeze(1), residual, p_row)  # neither race needs normalization
    if exp_noise is not None:
        next_token = rng.race_sample(weights, exp_noise)  # raises entries below NOISE_FLOOR (0/0 = NaN) to it
    elif seeds is not None:
        # the draft's grouped race: no per-id noise (one Philox call per 16 ids, one log per 8)
        next_token = rng.grouped_race_sample(weights, seeds, rng.STREAM_RECOVER, 0)
    else:
        next_token = rng.race_sample(weights, rng.exponential_like(weights, generator))
    if greedy is not None:
        next_token = torch.where(greedy, target_argmax[row_start + num_accepted].to(torch.int64), next_token)

    out_pos = torch.arange(gamma + 1, device=device, dtype=torch.int64).unsqueeze(0)
    padded = torch.cat([tokens, torch.full((R, 1), -1, dtype=torch.int64, device=device)], dim=1)
    output = torch.where(out_pos < num_accepted.unsqueeze(1), padded, torch.full_like(padded, -1))
    output.scatter_(1, num_accepted.unsqueeze(1), next_token.unsqueeze(1))
    return VerifyResult(output, num_accepted)


def _q_rows_read(draft: MarkovDraft, position: torch.Tensor, needed: torch.Tensor, vocab: int) -> torch.Tensor:
    """The q rows the residual reads (those of rejected, sampled requests). Rebuilding is a rank-r
    GEMM over V for every request, at the draft's batch size (only there are its bits the chain's,
    so no subset is rebuilt); on the CPU, where reading `needed` costs no sync, a step that reads
    none skips it (zeros: every weight then comes from p)."""
    if draft.q is None and needed.device.type == "cpu" and not bool(needed.any()):
        return torch.zeros(needed.shape[0], vocab, dtype=torch.float32)  # (an fp64 default made the race's rows fp64)
    return draft.q_rows(position)


def _verify_by_part(target, row_start, ell, draft: MarkovDraft, greedy, seeds, generator, uniforms, exp_noise,
                    check_values, row_stride, target_argmax) -> VerifyResult:
    """A regrouped draft (gather_drafts) verified part by part, each part with the draft its rows
    came from and at that draft's batch size, so its q rows are rebuilt by the kernel, and to the
    bits, the chain sampled them with. That draft's other rows go along as stand-ins whose output
    is dropped: greedy, ℓ = 0, on target row 0 (request 0's first row, which every layout has).
    One call per draft (and per repeat of a row); a call's batch positions are a slice when
    consecutive (TGI's case): no index upload for them."""
    R, gamma = draft.tokens.shape
    device = target.device
    if row_start is None:
        row_start = torch.arange(R, device=device, dtype=torch.int64) * row_stride
    done = []  # (batch positions, output tokens, accepted counts) per call
    argmax = [] if target_argmax is None else [target_argmax]  # else target.argmax(), made at most once
    if target_argmax is None and greedy is not None and check_values:
        # the parts' calls take the greedy rows' argmax from here and skip those rows: checked once
        _check_target_rows(target, row_start, ell, row_stride, unread=~greedy)

    def best():
        if not argmax:
            argmax.append(target.argmax())
        return argmax[0]

    for part, at, own in _part_calls(draft.parts):
        n = part.tokens.shape[0]
        span = slice(at[0], at[-1] + 1) if at == list(range(at[0], at[-1] + 1)) else device_rows(at, device)

        def take(x):
            return None if x is None else x[span] if isinstance(span, slice) else x.index_select(0, span)

        if own == list(range(n)):  # the part's whole draft, in its order
            res = _verify(target, take(row_start), take(ell), part, take(greedy), take(seeds), generator,
                          take(uniforms), take(exp_noise), check_values,
                          target_argmax=None if greedy is None else best())
            done.append((span, res.output_tokens, res.num_accepted))
            continue
        own_t = device_rows(own, device)

        def placed(x, fill):
            return None if x is None else x.new_full((n, *x.shape[1:]), fill).index_copy_(0, own_t, take(x))

        # stand-ins are greedy: their argmax of row 0 costs no race
        part_greedy = (placed(greedy, True) if greedy is not None
                       else torch.ones(n, dtype=torch.bool, device=device).index_fill_(0, own_t, False))
        res = _verify(target, placed(row_start, 0), placed(ell, 0), part, part_greedy, placed(seeds, 0), generator,
                      placed(uniforms, 0.5), placed(exp_noise, 1.0), check_values, target_argmax=best())
        done.append((span, res.output_tokens.index_select(0, own_t), res.num_accepted.index_select(0, own_t)))
    if _tile_the_batch([span for span, _, _ in done], R):
        if len(done) == 1:
            return VerifyResult(done[0][1], done[0][2])
        return VerifyResult(torch.cat([t for _, t, _ in done]), torch.cat([a for _, _, a in done]))
    output = torch.empty(R, gamma + 1, dtype=torch.int64, device=device)
    num_accepted = torch.empty(R, dtype=torch.int64, device=device)
    for span, tokens, accepted in done:
        output[span] = tokens
        num_accepted[span] = accepted
    return VerifyResult(output, num_accepted)


def _tile_the_batch(spans, R) -> bool:
    """Whether the spans are slices covering 0..R in order (then a cat assembles the output)."""
    at = 0
    for s in spans:
        if not isinstance(s, slice) or s.start != at:
            return False
        at = s.stop
    return at == R


def _part_calls(parts):
    """(draft, batch positions, its rows) per verification call: one per draft, its rows taken from
    wherever they sit in the batch (an engine that reorders its batch, or puts requests held from
    an older step between the latest step's, splits a draft's rows into runs: a call per run cost a
    rejection launch and, for a lazy draft, the rebuild of its every row); a row named twice going
    to a second call (a call verifies each of its draft's rows once)."""
    drafts: dict[int, tuple] = {}  # in first appearance: (draft, batch positions, its rows)
    at = 0
    for draft, rows in parts:
        _, positions, own = drafts.setdefault(id(draft), (draft, [], []))
        positions.extend(range(at, at + len(rows)))
        own.extend(rows)
        at += len(rows)
    for draft, positions, own in drafts.values():
        calls: list[tuple[list[int], list[int]]] = []
        seen: dict[int, int] = {}
        for position, row in zip(positions, own):
            k = seen.get(row, 0)
            seen[row] = k + 1
            if k == len(calls):
                calls.append(([], []))
            calls[k][0].append(position)
            calls[k][1].append(row)
        for call_positions, call_rows in calls:
            yield draft, call_positions, call_rows
