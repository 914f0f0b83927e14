"""DSpark inside TGI's flash causal-LM loop: what our hooks in TGI call.

- `maybe_attach(model)` (end of FlashCausalLM.__init__, only with DSPARK_DRAFT set): load the
  drafter and hook the target's configured decoder layers to capture their residual stream
  (raw layer output, pre-final-norm, DSPARK.md §1.1) into a CUDA-graph-safe buffer.
- `DSparkSpeculation.chooser(batch)(...)` replaces `batch.next_token_chooser(...)` in
  generate_token and returns the same 5-tuple, so the rest of TGI (and the Rust router, which
  only knows the global `--speculate γ`) is unchanged.
- `hooks.pad_drafts(batches)` in FlashCausalLMBatch.concatenate, for batches drafted at
  different widths.

Verification is lossless rejection sampling against TGI's own warped target distribution
(its processors and warpers run exactly as in the plain path) with the Markov-corrected q the
drafts were sampled from; greedy requests need an exact argmax match. The verify length comes
from our scheduler, within TGI's global γ: TGI lays a speculative batch out as 1 + L rows per
request for the width L of the drafts it is handed, so the scheduler grows L while Algorithm 1's
Θ = E[accepted tokens] · SPS(rows) over the batch improves (`uniform_verify_length`, early stop)
and the target's next forward really shrinks to B·(1 + L) rows. (Per-request lengths below L would only
throw away rows TGI computes anyway.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dspark_cli import runtime
from dspark_cli.runtime import rng
from dspark_cli.integrations.tgi.draft import BlockProposal, DSparkDraft

ENV_DRAFT = "DSPARK_DRAFT"
ENV_SCHEDULER = "DSPARK_SCHEDULER"      # exact (Algorithm 1's Θ over the batch's width) | off (all γ)
ENV_SPS = "DSPARK_SPS_TABLE"
ENV_STS = "DSPARK_STS"                  # STS calibration file (dspark-sts/1) for the confidence head


def configured_draft() -> Path | None:
    """The drafter checkpoint DSPARK_DRAFT names; None: DSpark is off."""
    path = os.environ.get(ENV_DRAFT)
    return Path(path) if path else None


def draft_block_size() -> int | None:
    """γ of the configured drafter (get_model's hook sets TGI's global speculate to it)."""
    path = configured_draft()
    if path is None:
        return None
    from dspark_cli.integrations.tgi.draft import DraftConfig

    try:
        return DraftConfig.load(path).block_size
    except ValueError as exc:
        raise ValueError(f"{ENV_DRAFT}={path}: {exc}") from None


def layer_output(out) -> torch.Tensor:
    """TGI's flash decoder layers return (hidden, residual) with the residual add deferred to the
    next layer: the residual stream after the layer is their sum."""
    if isinstance(out, tuple):  # transformers layers may return (hidden,) or (hidden, attn_weights)
        hidden, rest = out[0], out[1] if len(out) > 1 else None
        deferred = isinstance(rest, torch.Tensor) and rest.shape == hidden.shape
        return hidden + rest if deferred else hidden
    return out


def find_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return module
    raise ValueError("no decoder `layers` ModuleList found in the target model")


class HiddenCapture:
    """Forward hooks on the target layers copy each layer's residual stream into one static buffer
    [rows, n_layers·d_t]; `features(n)` = its first n rows (the last forward's real rows).

    Copying into a buffer that outlives every forward (rather than keeping the layer's output) is
    what makes this CUDA-graph safe: a graph captured through the hook records the copy and
    replays it into the same buffer; padded graph rows land after the real ones. The buffer grows
    with eager forwards until a graph is captured through it (TGI captures its largest graph first,
    after an eager run of it), then never moves. An eager forward with more rows than it holds
    after that (TGI's warmup prefill need not be its largest forward: a decode batch past the
    largest graph runs B·(1 + L) rows eagerly) writes into a separate overflow buffer instead. A
    forward writes the static buffer iff its rows fit there, and a replay's rows always do, so
    `features(n)` reads the overflow exactly when n does not fit."""

    def __init__(self, model: torch.nn.Module, layer_ids: list[int]):
        layers = find_layers(model)
        if min(layer_ids) < 0:  # (Python would index them from the end, silently)
            raise ValueError(f"target_layer_ids {layer_ids}: negative ids are not supported (-1 would be the "
                             "embedding output, which no DSpark release reads)")
        if max(layer_ids) >= len(layers):
            raise ValueError(f"target_layer_ids {layer_ids}: the target has only {len(layers)} decoder layers")
        if max(layer_ids) == len(layers) - 1:
            raise ValueError(f"target_layer_ids {layer_ids}: the last layer ({len(layers) - 1}) is normed; not allowed")
        self.layer_ids = layer_ids
        self.buffer: torch.Tensor | None = None
        self.overflow: torch.Tensor | None = None  # eager forwards larger than the graph-pinned buffer
        self.graph_captured = False
        self.handles = [layers[i].register_forward_hook(self._hook(slot)) for slot, i in enumerate(layer_ids)]

    def _hook(self, slot: int):
        def hook(module, args, out):
            x = layer_output(out).detach()
            x = x.reshape(-1, x.shape[-1])
            d = x.shape[-1]
            self._target(x)[: x.shape[0], slot * d:(slot + 1) * d].copy_(x)
        return hook

    @staticmethod
    def _holds(buf: torch.Tensor | None, x: torch.Tensor) -> bool:
        return buf is not None and buf.shape[0] >= x.shape[0] and buf.device == x.device and buf.dtype == x.dtype

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        """The buffer this forward's rows go to (allocated or grown as needed)."""
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        self.graph_captured |= capturing
        if self._holds(self.buffer, x):
            return self.buffer
        width = len(self.layer_ids) * x.shape[-1]
        if not self.graph_captured:
            self.buffer = x.new_empty((x.shape[0], width))
            return self.buffer
        if capturing or self.buffer is None or self.buffer.device != x.device or self.buffer.dtype != x.dtype:
            raise RuntimeError(f"DSpark capture buffer ({None if self.buffer is None else self.buffer.shape[0]} rows) "
                               f"cannot grow to {x.shape[0]} rows after a CUDA graph was captured through it")
        if not self._holds(self.overflow, x):  # an eager forward past the largest graph
            self.overflow = x.new_empty((x.shape[0], width))
        return self.overflow

    def features(self, rows: int) -> torch.Tensor:
        buf = self.buffer
        if buf is not None and buf.shape[0] < rows:
            buf = self.overflow
        if buf is None or buf.shape[0] < rows:
            raise RuntimeError(f"the target layers {self.layer_ids} did not run on {rows} rows")
        return buf[:rows]


@dataclass
class Pending:
    """What the next verify needs from this step's proposal, for one request: its row of the
    step's draft (drafted lazily: the draft keeps U and what rebuilds q rows, not q [R, γ, V])."""
    draft: runtime.MarkovDraft
    row: int
    ell: int                  # verify length chosen by the scheduler

    @property
    def tokens(self) -> torch.Tensor:  # [γ]
        return self.draft.tokens[self.row]


def step_seeds(request_seeds: list[int], positions: list[int]) -> torch.Tensor:
    """One counter-based key per request and step (rng.round_seeds): its TGI seed, a u64 held
    wrapped in int64, keys Philox of the absolute position the step samples at (fresh every step,
    the same whatever else is in the batch)."""
    return rng.round_seeds(rng.seed_tensor(request_seeds), torch.tensor(positions, dtype=torch.int64))


def uniform_verify_length(a: torch.Tensor, sps: runtime.SPSTable) -> int:
    """Algorithm 1 over the lengths TGI's layout can run, one L for all R requests:
    Θ(L) = (R + Σ_r Σ_{j<L} a_{r,j}) · SPS(R·(1 + L)); L grows while Θ strictly improves and stops
    at the first non-improvement. a [R, γ] survival. The early stop keeps it non-anticipating:
    whether draft L + 1 is verified depends on a[:, :L + 1], i.e. on the drafts before it. (The
    argmax over all L looked at later positions' survival, which depends on draft L + 1 itself
    through W1[x]: lossy, DSPARK.md's Appendix A.)"""
    R, gamma = a.shape
    # float64, as runtime.schedule_exact: fp32 would stop on an SPS plateau where Θ still improves
    accepted = torch.cat([a.new_zeros(1, dtype=torch.float64), a.double().sum(0).cumsum(0)])  # Σ_r Σ_{j<L} a_{r,j}
    rows = R * (1 + torch.arange(gamma + 1, device=a.device))
    theta = (R + accepted) * sps.lookup(rows, torch.float64)
    return int(torch.cumprod((theta[1:] > theta[:-1]).to(torch.int64), dim=0).sum())


def _logprob_rows(logprobs: torch.Tensor) -> runtime.LogitRows:
    """Log-probabilities [N, V] as target rows: max 0 and 1 / Σ = 1, so an entry's probability is
    exactly its exp."""
    stats = torch.zeros(logprobs.shape[0], 2, dtype=torch.float32, device=logprobs.device)
    stats[:, 1] = 1.0
    return runtime.LogitRows(logprobs, stats)


def batch_draft(pend: list[Pending]) -> runtime.MarkovDraft:
    """The verify batch's draft: the step's own when the batch is the one drafted, in order (TGI's
    usual decode step: no copy), else its requests' rows gathered run by run (after a filter or a
    concatenate of batches drafted in different steps)."""
    runs: list[tuple[runtime.MarkovDraft, list[int]]] = []
    for p in pend:
        if runs and runs[-1][0] is p.draft:
            runs[-1][1].append(p.row)
        else:
            runs.append((p.draft, [p.row]))
    return runtime.gather_drafts(runs)


class DSparkSpeculation:
    def __init__(self, draft: DSparkDraft, capture: HiddenCapture | None, scheduler: str = "exact",
                 sps: runtime.SPSTable | None = None, seed: int = 0):
        if scheduler not in ("exact", "off"):
            # (vLLM's `production` variant sizes per-request lengths: TGI's layout runs one per batch)
            raise ValueError(f"{ENV_SCHEDULER} must be exact or off for TGI, got {scheduler!r}")
        self.draft, self.capture, self.scheduler = draft, capture, scheduler
        self.sps = sps or runtime.SPSTable.default()
        self.pending: dict[int, Pending] = {}
        # on the draft's device: the runtime draws its noise on the tensors' device
        self.generator = torch.Generator(device=draft.w["embed_tokens.weight"].device).manual_seed(seed)
        self.stats = {"steps": 0, "verified": 0, "accepted": 0}
        self.warned_prefix_cache = False

    @classmethod
    def for_target(cls, target: torch.nn.Module, draft: DSparkDraft, scheduler: str = "exact",
                   sps: runtime.SPSTable | None = None) -> "DSparkSpeculation":
        """Speculation over `target`, its layers that the draft reads hooked for capture."""
        return cls(draft, HiddenCapture(target, draft.config.target_layer_ids), scheduler, sps)

    # ------------------------------------------------------------------ verification

    def verify(self, request_ids: list[int], target_logprobs: torch.Tensor, greedy: torch.Tensor,
               seeds: torch.Tensor | None = None, target_argmax: torch.Tensor | None = None):
        """target_logprobs [B, S, V] fp32: the log-softmax of TGI's warped scores (S = 1 + γ with
        drafts, 1 without), which hooks.choose computes once and also returns to TGI as its
        logprobs; the target probabilities are their exp, which the verification computes where it
        reads an entry (LogitRows with max 0 and sum 1: no [B, S, V] copy).
        seeds [B] int64: this step's counter-based key per request (step_seeds), so a request's
        sampled output depends on its own seed only, not on the batch; else the shard's generator.
        target_argmax [B, S]: the argmax of each row's warped scores (what greedy TGI takes), given by
        hooks.choose when the batch has a greedy request: the greedy rows are verified against it
        (exp∘log_softmax can round two distinct maxima to one probability, a tie the argmax of the
        probabilities breaks towards the lower id), their probabilities not read.
        Returns (tokens per request, number of accepted drafts per request)."""
        B, S, _ = target_logprobs.shape
        # A plain step draws from row 0: its exp only ([B, V]), not the [B·S, V] rows'.
        if S == 1 or not all(r in self.pending for r in request_ids):
            probs = target_logprobs[:, 0].exp()
            if seeds is not None:
                # what rejection_sample draws with ℓ = 0
                sampled = rng.grouped_race_sample(probs, seeds.to(probs.device), rng.STREAM_RECOVER, 0)
            else:
                probs = probs.to(self.generator.device)
                sampled = torch.multinomial(probs, 1, generator=self.generator).view(-1)
            best = probs.argmax(-1) if target_argmax is None else target_argmax[:, 0].to(probs.device)
            nxt = torch.where(greedy.to(probs.device), best, sampled.to(probs.device))
            return [[t] for t in nxt.tolist()], [0] * B
        pend = [self.pending[r] for r in request_ids]
        ells = [min(p.ell, S - 1) for p in pend]
        target = _logprob_rows(target_logprobs.reshape(B * S, -1))
        device = target.device
        res = runtime.rejection_sample_rows(target, torch.arange(B, device=device) * S,
                                            torch.tensor(ells, dtype=torch.int64).to(device), batch_draft(pend),
                                            greedy=greedy, seeds=None if seeds is None else seeds.to(device),
                                            generator=None if seeds is not None else self.generator,
                                            target_argmax=None if target_argmax is None
                                            else target_argmax.reshape(B * S).to(device))
        # One device-to-host copy each, not one sync per token (this runs every decode step).
        n_acc, rows = res.num_accepted.tolist(), res.output_tokens.tolist()
        out = [row[: n + 1] for row, n in zip(rows, n_acc)]
        self.stats["verified"] += sum(ells)  # from the host values: no device sync for a statistic
        self.stats["accepted"] += sum(n_acc)
        return out, n_acc

    # ------------------------------------------------------------------ drafting

    def propose(self, request_ids: list[int], anchors: torch.Tensor, anchor_positions: list[int],
                temperature: torch.Tensor, top_k: torch.Tensor | None = None,
                top_p: torch.Tensor | None = None, seeds: torch.Tensor | None = None) -> tuple[BlockProposal, int]:
        """The block and the verify width L the scheduler gives the batch's next forward.
        top_k/top_p: the request's warp, applied to q as to the target (higher acceptance; any q
        stays lossless because the drafts are tested against the q they were sampled from).
        seeds: as in verify (the draft stream of the key is independent of its accept/recover streams)."""
        proposal = self.draft.propose(request_ids, anchors, anchor_positions, temperature, top_k=top_k, top_p=top_p,
                                      seeds=seeds, generator=None if seeds is not None else self.generator)
        gamma = proposal.survival.shape[1]
        width = gamma if self.scheduler == "off" else uniform_verify_length(proposal.survival, self.sps)
        for i, r in enumerate(request_ids):
            self.pending[r] = Pending(proposal.draft, i, width)
        return proposal, width

    def forget(self, request_ids: list[int]) -> None:
        """Drop what is kept for these requests (pending draft, context K/V). For arriving requests,
        which start from nothing: TGI's router reuses ids (every warmup request is id 0, and so is
        the first real one), so a cache or draft under the id is someone else's. And for a batch
        whose requests all stopped (patch 0003): no FilterBatch or decode names them again, so a
        run of prefills that finish at once (max_new_tokens = 1) would otherwise keep them all."""
        for r in request_ids:
            self.pending.pop(r, None)
            self.draft.drop(r)

    def chooser(self, batch):
        """What patched TGI calls in place of batch.next_token_chooser, with its arguments (token
        history, logits, speculate, speculative ids and logits); DSpark needs the logits and
        speculate (hooks.choose reads the rest from the batch)."""
        from dspark_cli.integrations.tgi.hooks import choose

        return lambda _history, next_token_logits, speculate, *_: choose(self, batch, next_token_logits, speculate)

    def cache_cleared(self, cached: dict, batch_id: int | None) -> None:
        """TGI's ClearCache (patch 0005), before the shard's cache drops batch `batch_id` (None: all
        of them; `cached`: that cache's {batch id: batch}): only the requests of the batches that stay
        cached live on. Between two RPCs those are all the live requests, so this also covers the
        router's ClearCache after a failed Prefill or Decode, whose batch had already left the cache.
        Without it the cleared requests' contexts and pending drafts (their step's U, B·γ·V) were
        kept until the next decode, which an idle shard does not get."""
        self.forget_except(set() if batch_id is None else
                           {r.id for i, b in cached.items() if i != batch_id for r in b.requests})

    def forget_except(self, live: set[int]) -> None:
        for r in [r for r in self.pending if r not in live]:
            self.pending.pop(r)
        for r in [r for r in self.draft.context_kv if r not in live]:
            self.draft.drop(r)
