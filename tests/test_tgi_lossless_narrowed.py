"""Losslessness of sampled requests while the scheduler narrows the verify width (χ², CPU).

The TGI-side drafter/verifier (DSparkSpeculation.propose/verify, with the per-request seeds and
positions hooks.choose passes) driven as TGI's router drives the shard, with real tensors:
- scheduler `exact` (uniform_verify_length) under SPS tables that make the batch's width L narrower
  than γ, and (small batches) take every value 0..γ depending on the drafts' survival;
- a confidence head whose c_{k+1} is decided by the class of x_k (through W1[x_k]: good, medium,
  bad), so a scheduler that looked at the survival of drafts it leaves out (DSPARK.md App. A)
  verifies a draft mostly when the draft itself is good: the bias this test must not see;
- cohort A prefilled and drafted alone, then cohort B prefilled and drafted alone (A's drafts are
  now a step older than the current one, usually of another width), then A and B verified as one
  concatenated batch ([B, A], padded to the wider width; each request accepts at most its own),
  drafted together, A filtered out once it has its tokens, B decoded on;
- q warped per request (temperature, top-k, top-p) and kept lazily: the rejected row's q is
  rebuilt from U at verification (MarkovDraft.q_rows);
- the target is a first-order Markov chain over a small vocabulary, warped per request as TGI's
  warpers do, so the exact law of every emitted sequence is known.
The first K = 3 tokens of every request must follow that law: the joint of (t1, t2, t3), the pairs
and each position's marginal (χ²), per sampling group and cohort and pooled.

Power (same seeds and sizes, the code under test broken on purpose, 2026-12-02): the scheduler's
former argmax over L (a look-ahead) fails the small-batch test (pooled (t1, t2): p = 3e-8); the
survival shifted by one draft (the width for draft k reading c_{k+1}, i.e. x_k) fails it with
p = 6e-22; the rejected row's q rebuilt without the request's top-k/top-p fails the large-batch
test in 25 of its 42 χ² tests, rebuilt at temperature 1 in 15."""

import time

import torch

from dspark_cli import tiny_models
from dspark_cli.integrations.tgi.draft import DraftConfig, DSparkDraft
from dspark_cli.integrations.tgi.hooks import pad_drafts
from dspark_cli.integrations.tgi.speculation import DSparkSpeculation, step_seeds
from dspark_cli.runtime import SPSTable
from dspark_cli.runtime.sampling import probs_from_logits
from tests.chi2 import chi2_pvalue

V, GAMMA, D, RANK = 12, 3, 16, 4
# c_{k+1} = σ(z[x_k]): good (0-3) ≈ .9975, medium (4-7) .8, bad (8-11) ≈ .0025
Z = torch.tensor([6.0] * 4 + [1.3863] * 4 + [-6.0] * 4)
GROUPS = {"T=1": (1.0, 0, 1.0), "T=0.7,top-k=5": (0.7, 5, 1.0), "T=1.3,top-p=0.8": (1.3, 0, 0.8)}
K = 3                                  # tokens checked per request
P_MIN = 1e-5                           # per χ² test: 42 tests per run, so < 1e-3 for the run
MAX_NEW = {"A": K, "B": K + 3}         # A is filtered out while B still decodes
PROMPT_LAST = {"A": 5, "B": 9}         # A's prompt ends in a medium token, B's in a bad one
# One request per draft step (rows 1 + L): verifying draft 1 pays iff a_1 > .82 (a good anchor),
# draft 2 iff a_2 > .75, draft 3 iff a_3 > .75 (about) — with the early stop L = 0..3 from the
# survival of the drafts before each. After a medium anchor (a_1 = .8: Θ(1) = .99 < Θ(0) = 1) the
# argmax over L (a look-ahead) takes L = 2 exactly when draft 1 is good (Θ(2) = 1.04, else ≤ .98):
# DSPARK.md App. A. Two requests per step: 2, 4, 6, 8 rows.
ALPHA = 0.6
PROMPT_TO_MEDIUM = 4.0
MEDIUM_TO_GOOD = 0.5
SPS_SMALL = SPSTable([1, 2, 3, 4, 5, 6, 7, 8], [1.0, 0.55, 0.40, 0.32, 0.27, 0.23, 0.20, 0.18])


def sps_power_law(alpha: float, step: int, points: int) -> SPSTable:
    """SPS(B) = B^-α: Θ(L) ∝ (1 + mean Σ_{j<L} a_j) / (1 + L)^α whatever the batch size, so cohorts
    and their concatenation narrow alike (α steep enough that fewer than γ drafts pay)."""
    sizes = [step * (i + 1) for i in range(points)]
    return SPSTable(sizes, [b ** -alpha for b in sizes])


def make_draft(g: torch.Generator) -> DSparkDraft:
    """A real DSparkDraft (1 layer, d = 16) whose confidence head reads only W1[x_{k-1}]'s first
    column, set to the class logit Z; the Markov bias W2·W1[x_{k-1}] makes q depend on x_{k-1}."""
    cfg = DraftConfig(hidden_size=D, num_heads=2, num_kv_heads=1, head_dim=8, num_layers=1, block_size=GAMMA,
                      mask_token_id=V - 1, target_layer_ids=[0], rope_theta=1e4, rms_norm_eps=1e-6)
    w1 = torch.randn(V, RANK, generator=g)
    w1[:, 0] = Z
    w2 = torch.randn(V, RANK, generator=g) * 0.4
    w2[:, 0] = 0.0  # the class column decides the confidence only
    # after a medium token the drafter prefers good ones (and so does the target, target_tables)
    w1[:, 1] = torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4)
    w2[:, 1] = torch.tensor([MEDIUM_TO_GOOD] * 4 + [0.0] * 8)
    w = {"embed_tokens.weight": torch.randn(V, D, generator=g), "fc.weight": torch.randn(D, 1, generator=g),
         "hidden_norm.weight": torch.ones(D), "norm.weight": torch.ones(D),
         "lm_head.weight": torch.randn(V, D, generator=g) * 0.05,
         "markov_head.markov_w1.weight": w1, "markov_head.markov_w2.weight": w2,
         "confidence_head.proj.weight": torch.cat([torch.zeros(D), torch.tensor([1.0, 0, 0, 0])]).unsqueeze(0),
         "confidence_head.proj.bias": torch.zeros(1)}
    w.update(tiny_models.layer_tensors("layers.0", g, 0.3, hidden=D, head_dim=8))
    return DSparkDraft(cfg, w)


def target_tables(draft: DSparkDraft, g: torch.Generator) -> torch.Tensor:
    """[groups, V, V]: row x = the warped target distribution of the token after x (what TGI's
    processors and warpers give the verification). Its logits are the drafter's Markov bias plus
    noise, so drafts are often, not always, accepted."""
    w1, w2 = draft.w["markov_head.markov_w1.weight"], draft.w["markov_head.markov_w2.weight"]
    logits = w1[:, 2:] @ w2[:, 2:].T + torch.randn(V, V, generator=g)
    # after a medium token the target is about the drafter's own q (mostly good tokens, accepted):
    # a look-ahead that verifies draft 1 only when it is good emits good tokens with probability
    # q(G) + (1 - q(G))·p(G) instead of p(G)
    logits[4:8] = (w1 @ w2.T)[4:8] + 0.3 * torch.randn(4, V, generator=g)
    # A's prompt continues into medium tokens mostly (a_1 = .8 next: where a look-ahead pays)
    logits[PROMPT_LAST["A"]] += torch.tensor([0.0] * 4 + [PROMPT_TO_MEDIUM] * 4 + [0.0] * 4)
    return torch.stack([probs_from_logits(logits, torch.full((V,), t), torch.full((V,), k, dtype=torch.int64),
                                          torch.full((V,), p)) for t, k, p in GROUPS.values()])


class Cohort:
    """Requests that arrive together (one prefill batch) in one role (A or B)."""

    def __init__(self, role: str, groups: torch.Tensor, first_id: int):
        n = groups.numel()
        self.role, self.groups = role, groups
        self.ids = list(range(first_id, first_id + n))
        self.seeds = [7919 * i + 17 for i in self.ids]
        self.tokens = [[] for _ in range(n)]
        self.last = [PROMPT_LAST[role]] * n   # the token the next sample follows
        self.position = [4] * n               # its position (prompts of 5 tokens)


class Batch:
    """What TGI's FlashCausalLMBatch carries for us: its requests (cohort, index) and the drafts
    it was handed (speculative_ids [n, width]; None for a prefill batch)."""

    def __init__(self, entries: list[tuple[Cohort, int]], speculative_ids: torch.Tensor | None = None):
        self.entries, self.speculative_ids = entries, speculative_ids


class Driver:
    """Steps a batch as the shard does with hooks.choose: verify the pending drafts against the
    target rows TGI's forward computes (1 + the batch's speculative_ids width per request: the
    anchor, then the drafts as TGI holds them, padding included), then draft the batch's next
    block; the scheduler's width sets the next speculative_ids, as choose returns them."""

    def __init__(self, spec: DSparkSpeculation, tables: torch.Tensor):
        self.spec, self.tables = spec, tables
        self.widths = torch.zeros(GAMMA + 1, dtype=torch.int64)

    def step(self, batch: Batch) -> None:
        spec, n = self.spec, len(batch.entries)
        ids = [c.ids[i] for c, i in batch.entries]
        anchors = torch.tensor([c.last[i] for c, i in batch.entries]).unsqueeze(1)
        prev = anchors if batch.speculative_ids is None else torch.cat([anchors, batch.speculative_ids], 1)
        groups = torch.stack([c.groups[i] for c, i in batch.entries])
        rows = self.tables[groups.unsqueeze(1), prev]                      # [n, S, V]: row j after token j
        seeds = step_seeds([c.seeds[i] for c, i in batch.entries], [c.position[i] for c, i in batch.entries])
        tokens, n_acc = spec.verify(ids, rows.log(), torch.zeros(n, dtype=torch.bool), seeds)
        for (c, i), ts, a in zip(batch.entries, tokens, n_acc):
            c.tokens[i] += ts
            c.last[i], c.position[i] = ts[-1], c.position[i] + a + 1
        params = torch.tensor([list(GROUPS.values())[int(gr)] for gr in groups])
        top_k, top_p = params[:, 1].to(torch.int64), params[:, 2]
        positions = [c.position[i] for c, i in batch.entries]
        proposal, width = spec.propose(ids, torch.tensor([c.last[i] for c, i in batch.entries]), positions,
                                       params[:, 0], top_k if bool((top_k > 0).any()) else None,
                                       top_p if bool((top_p < 1).any()) else None,
                                       step_seeds([c.seeds[i] for c, i in batch.entries], positions))
        self.widths[width] += 1
        batch.speculative_ids = proposal.draft.tokens[:, :min(GAMMA, width)]  # choose's return, speculate = γ

    def episode(self, a: Cohort, b: Cohort, stats: dict) -> None:
        """A prefilled and drafted; B prefilled and drafted (A's drafts wait a step); [B, A]
        concatenated (FlashCausalLMBatch.concatenate: pad_drafts when the widths differ) and decoded
        together; finished requests filtered out (FilterBatch keeps the survivors' drafts)."""
        for c in (a, b):
            self.spec.forget(c.ids)
            for r in c.ids:
                self.spec.draft.extend_context(r, torch.zeros(0, 1), torch.zeros(0))  # empty contexts
        batch_a, batch_b = Batch([(a, i) for i in range(len(a.ids))]), Batch([(b, i) for i in range(len(b.ids))])
        self.step(batch_a)
        self.step(batch_b)
        parts = [batch_b, batch_a]
        if len({p.speculative_ids.shape[1] for p in parts}) > 1:  # patch 0003's concatenate
            stats["padded"] += 1
            pad_drafts(parts)
        batch = Batch(batch_b.entries + batch_a.entries, torch.cat([p.speculative_ids for p in parts]))
        while batch.entries:
            stats["merged"] += len({id(c) for c, _ in batch.entries}) > 1
            self.step(batch)
            keep = [k for k, (c, i) in enumerate(batch.entries) if len(c.tokens[i]) < MAX_NEW[c.role]]
            for k, (c, i) in enumerate(batch.entries):
                if k not in keep:
                    self.spec.draft.drop(c.ids[i])
            batch = Batch([batch.entries[k] for k in keep], batch.speculative_ids[keep])  # FlashCausalLMBatch.filter
            self.spec.forget_except({c.ids[i] for c, i in batch.entries})  # what choose does on the next decode


def run(episodes: int, cohort_size: int, sps: SPSTable, seed: int = 0):
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs cost more than they save
    g = torch.Generator().manual_seed(seed)
    draft = make_draft(g)
    tables = target_tables(draft, g)
    driver = Driver(DSparkSpeculation(draft, None, scheduler="exact", sps=sps), tables)
    cohorts, stats, next_id = [], {"padded": 0, "merged": 0}, 0
    for e in range(episodes):
        a = Cohort("A", torch.randint(0, len(GROUPS), (cohort_size,), generator=g), next_id)
        b = Cohort("B", torch.randint(0, len(GROUPS), (cohort_size,), generator=g), next_id + cohort_size)
        next_id += 2 * cohort_size
        driver.episode(a, b, stats)
        cohorts += [a, b]
    return cohorts, tables, driver.widths, stats, driver.spec.stats


def pvalues(cohorts: list[Cohort], tables: torch.Tensor) -> dict:
    """χ² p-values of the first K tokens against their exact law: per (group, cohort) and pooled over
    all (expected counts Σ n_(group, cohort) · law_(group, cohort)), for the joint (t1, t2, t3), the
    pairs (t1, t2) and (t2, t3), and each position."""
    stats = {"joint": lambda s: s[:, 0] * V * V + s[:, 1] * V + s[:, 2], "t1t2": lambda s: s[:, 0] * V + s[:, 1],
             "t2t3": lambda s: s[:, 1] * V + s[:, 2], "t1": lambda s: s[:, 0], "t2": lambda s: s[:, 1],
             "t3": lambda s: s[:, 2]}
    laws = {"joint": lambda l: l.reshape(-1), "t1t2": lambda l: l.sum(2).reshape(-1),
            "t2t3": lambda l: l.sum(0).reshape(-1), "t1": lambda l: l.sum((1, 2)), "t2": lambda l: l.sum((0, 2)),
            "t3": lambda l: l.sum((0, 1))}
    out, pooled = {}, {k: [] for k in stats}
    for role in ("A", "B"):
        seqs = torch.tensor([t[:K] for c in cohorts if c.role == role for t in c.tokens])
        groups = torch.cat([c.groups for c in cohorts if c.role == role])
        for gi, name in enumerate(GROUPS):
            s, table = seqs[groups == gi], tables[gi]
            law = torch.einsum("a,ab,bc->abc", table[PROMPT_LAST[role]], table, table)  # P(t1, t2, t3)
            for k in stats:
                out[(name, role, k)] = chi2_pvalue(stats[k](s), laws[k](law))
                pooled[k].append((stats[k](s), laws[k](law).double() * len(s)))
    for k, parts in pooled.items():
        out[("pooled", k)] = chi2_pvalue(torch.cat([x for x, _ in parts]), sum(e for _, e in parts))
    return out


def _check(cohorts, tables, widths, stats, spec_stats, started, narrow) -> None:
    n = sum(len(c.ids) for c in cohorts)
    ps = pvalues(cohorts, tables)
    print(f"{n} requests in {time.monotonic() - started:.1f} s; widths drafted {widths.tolist()}; {stats}; "
          f"{spec_stats}; smallest p {min(ps.values()):.4f}")
    assert narrow(widths), widths
    assert stats["merged"] > 0 and stats["padded"] > 0, stats
    assert 0.15 < spec_stats["accepted"] / spec_stats["verified"] < 0.95, spec_stats
    bad = {k: v for k, v in ps.items() if not v > P_MIN}
    assert not bad, bad


def test_small_batches_where_the_width_follows_each_drafts_survival():
    """One request per cohort: each draft step's width is 0..γ from that request's own survival
    (where a look-ahead would be lossy). 2000 requests."""
    started = time.monotonic()
    out = run(episodes=1000, cohort_size=1, sps=SPS_SMALL)
    _check(*out, started, narrow=lambda w: bool((w > w.sum() // 40).all()))


def test_large_batches_narrowed_below_gamma_at_1e5_requests():
    """Cohorts of 10,000 requests (10^5 requests in all): batches verify 1 or 2 of γ = 3 drafts,
    a few all 3."""
    started = time.monotonic()
    out = run(episodes=5, cohort_size=10_000, sps=sps_power_law(ALPHA, 1000, 80))
    _check(*out, started, narrow=lambda w: w[GAMMA] < w.sum() // 2 and w[1:GAMMA].sum() > w.sum() // 3)
