"""Per-request verify lengths ℓ_r for one engine step (DSPARK.md §5) on top of dspark_cli.runtime.

Algorithm 1 ("exact") needs only this step's survival. The production variant sizes the budget K
from survival two steps old (the causal barrier) and admits the top-K current candidates; V1
batches change between steps, so stale rows are kept per request id. A request without a
two-step-old row uses its one-step-old row (also computed before this step's drafts existed), and
a new request counts as fully confident (a = 1): neither depends on the current draft tokens."""

from collections import deque

import torch

from dspark_cli.runtime import schedule_exact, schedule_production

from dspark_cli.integrations.vllm.settings import SchedulerSettings


class VerifyLengthScheduler:
    def __init__(self, settings: SchedulerSettings):
        self.settings = settings
        self._history: dict[str, deque] = {}

    def lengths(self, req_ids: list[str], survival: torch.Tensor) -> torch.Tensor:
        """survival a [R, γ] of this step's drafts -> ℓ [R] int64 in [0, γ]."""
        if self.settings.scheduler == "exact":
            return schedule_exact(survival, self.settings.sps)
        stale = torch.stack([self._stale_row(r, survival.shape[1], survival) for r in req_ids])
        ell = schedule_production(stale, survival, self.settings.sps)
        self._remember(req_ids, survival)
        return ell

    def _stale_row(self, req_id: str, gamma: int, like: torch.Tensor) -> torch.Tensor:
        past = self._history.get(req_id)
        if not past:
            return torch.ones(gamma, dtype=torch.float32, device=like.device)
        return past[0]

    def _remember(self, req_ids: list[str], survival: torch.Tensor) -> None:
        live = set(req_ids)
        for gone in [r for r in self._history if r not in live]:
            del self._history[gone]
        for req_id, row in zip(req_ids, survival.float()):
            self._history.setdefault(req_id, deque(maxlen=2)).append(row.clone())
