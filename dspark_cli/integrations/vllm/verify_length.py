"""Per-request verify lengths ℓ_r for one engine step (DSPARK.md §5) on top of dspark_cli.runtime.

Algorithm 1 ("exact") needs only this step's survival. The production variant sizes the budget K
from survival two steps old (the causal barrier) and admits the top-K current candidates; V1
batches change between steps, so stale rows are kept per request id. A request without a
two-step-old row uses its one-step-old row (also computed before this step's drafts existed), and
a new request counts as fully confident (a = 1): neither depends on the current draft tokens."""

import torch

from dspark_cli.runtime import schedule_exact, schedule_production

from dspark_cli.integrations.vllm.settings import SchedulerSettings


class VerifyLengthScheduler:
    def __init__(self, settings: SchedulerSettings):
        self.settings = settings
        # request id -> (stale, newest) survival rows [γ] of its last two steps (views of the step
        # tensors, no copies); stale is the two-step-old row, or the one-step-old one if it has one only.
        self._history: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ones: torch.Tensor | None = None

    def lengths(self, req_ids: list[str], survival: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """survival a [R, γ] of this step's drafts -> ℓ [R] int64 in [0, k] (k ≤ γ drafts can be
        handed over this step; default γ). History keeps whole rows, so k may change between steps."""
        k = survival.shape[1] if k is None else k
        if self.settings.scheduler == "exact":
            return schedule_exact(survival[:, :k], self.settings.sps)
        stale = self._stale(req_ids, survival)
        ell = schedule_production(stale[:, :k], survival[:, :k], self.settings.sps)
        self._remember(req_ids, survival)
        return ell

    def _stale(self, req_ids: list[str], survival: torch.Tensor) -> torch.Tensor:
        """[R, γ] in one stack (one launch), whatever R: a new request's row is a shared row of ones."""
        gamma = survival.shape[1]
        if self._ones is None or self._ones.shape[0] != gamma or self._ones.device != survival.device:
            self._ones = torch.ones(gamma, dtype=torch.float32, device=survival.device)
        rows = []
        for req_id in req_ids:
            past = self._history.get(req_id)
            rows.append(past[0] if past is not None and past[0].shape[0] == gamma else self._ones)
        return torch.stack(rows)

    def _remember(self, req_ids: list[str], survival: torch.Tensor) -> None:
        """Requests not in this step are forgotten (they count as new when they return)."""
        old = self._history
        self._history = {}
        for req_id, row in zip(req_ids, survival.float().unbind(0)):
            past = old.get(req_id)
            self._history[req_id] = (row, row) if past is None else (past[1], row)
