"""Verify-length schedulers (DSPARK.md §5): how many drafts ℓ_r ∈ [0, γ] each request verifies.

All candidates (r, j) are ranked by survival a_{r,j} descending, ties broken by position j, then by
request r: never by token values, and since a is non-increasing in j this order respects every
request's prefix. Admitting the first n candidates gives ℓ_r = #admitted of request r, the batch
B = R + n tokens and τ = R + Σ a. Everything is tensor ops on a's device: no host sync, no loop."""

import torch

from dspark_cli.runtime import _checks
from dspark_cli.runtime._dispatch import try_cuda
from dspark_cli.runtime.sps import MAX_DENSE_TOKENS, SPSTable


def schedule_threshold(c: torch.Tensor, threshold: float, *, validate=None) -> torch.Tensor:
    """DeepSpec's static rule: ℓ_r = first k with per-step c_k < threshold (0 verifies all)."""
    _check_matrix("c", c, validate)
    # a host number: NaN verified nothing and 1.5 or -0.5 nothing or everything, silently
    if not _checks.real_number(threshold) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1] (a per-step confidence), got {threshold!r}")
    # in float64: c >= 0.9 rounds 0.9 to c's dtype (bf16: 0.8984375, counted as confident)
    return torch.cumprod((c.double() >= threshold).to(torch.int64), dim=1).sum(dim=1)


def schedule_exact(a: torch.Tensor, sps: SPSTable, *, validate=None) -> torch.Tensor:
    """Algorithm 1: admit candidates in rank order while Θ = τ·SPS(B) strictly improves; stop at
    the first non-improvement (early stop keeps admission non-anticipating). a = survival(c).
    Admission also stops at the first candidate of survival 0 (all after it are 0 too): it adds no
    expected token, so it could improve Θ only through a table whose steps/s rises with B, a
    larger forward for no output."""
    _check_survival("a", a, validate)
    _check_sps(sps)
    R = a.shape[0]
    a_sorted, request = _ranked(a)
    # in float64: fp32's τ absorbs a candidate of a < τ·6e-8, which on an SPS plateau (the common
    # case: B padded to a capture size) stopped Algorithm 1 where Θ still strictly improves
    theta = _theta(a_sorted.double(), R, sps)  # Θ_0 .. Θ_n
    improves = (theta[1:] > theta[:-1]) & (a_sorted > 0)
    admitted = torch.cumprod(improves.to(torch.int64), dim=0).sum()
    return _lengths(request, admitted, R)


def verify_budget(a_stale: torch.Tensor, sps: SPSTable, num_requests: int, *, validate=None) -> torch.Tensor:
    """Production step 1 (paper §5.2): K = argmax_n Θ_n over ALL n ≤ num_requests·γ (no early
    stop), from survival two steps old, for a batch of `num_requests` anchors; candidates past a
    smaller stale batch's count as survival 0. Returns a 0-dim int64 tensor (no sync); the
    earliest n wins ties. Stale data cannot depend on the current drafts: the causal barrier."""
    _check_survival("a_stale", a_stale, validate, empty_ok=True)
    _check_sps(sps)
    num_requests = _checks.count("num_requests", num_requests, 1, "anchors in the batch")
    if num_requests > MAX_DENSE_TOKENS:  # the zeros _admissible pads with would fill memory first
        raise ValueError(f"num_requests must be at most {MAX_DENSE_TOKENS} (an SPS table's largest batch), "
                         f"got {num_requests}")
    a_sorted, _ = _ranked(a_stale)
    # in float32, as the CUDA op: unlike Algorithm 1's early stop, a global argmax loses only the
    # candidates whose survival fp32's τ absorbs (each < τ·6e-8), a negligible share of τ
    theta = _theta(_admissible(a_sorted, num_requests * a_stale.shape[1]), num_requests, sps)
    return torch.argmax(theta)


def _admissible(a_sorted: torch.Tensor, n: int) -> torch.Tensor:
    """The first n ranked values, then zeros up to n: a larger stale batch's candidates past n
    would pick a K the current batch cannot admit, and a smaller one's missing candidates add no
    survival, yet a table whose steps/s rises with B can still favour them. n is a host int: no sync."""
    return torch.nn.functional.pad(a_sorted[:n], (0, max(n - a_sorted.numel(), 0)))


def admit_top_k(a_now: torch.Tensor, budget, *, validate=None) -> torch.Tensor:
    """Production step 2: admit the `budget` highest-ranked current candidates (B = R + budget)."""
    _check_survival("a_now", a_now, validate)
    budget = _check_budget(budget, validate)
    _, request = _ranked(a_now)
    # a host budget stays a host int (no copy to the device), capped so that no int64 overflows
    admitted = budget.to(a_now.device) if isinstance(budget, torch.Tensor) else min(budget, request.numel())
    return _lengths(request, admitted, a_now.shape[0])


def schedule_production(a_stale: torch.Tensor, a_now: torch.Tensor, sps: SPSTable, *, validate=None) -> torch.Tensor:
    """K from t−2 survival (verify_budget), then top-K by current survival (admit_top_k).

    Passing the current survival as a_stale is the retrospective search of the paper's Appendix A
    and is NOT lossless; tests/test_runtime_scheduler.py measures that bias."""
    _check_survival("a_stale", a_stale, validate, empty_ok=True)  # before the CUDA op, which checks nothing
    _check_survival("a_now", a_now, validate)
    if a_stale.shape[1] != a_now.shape[1]:
        raise ValueError(f"a_stale has block size {a_stale.shape[1]}, a_now {a_now.shape[1]}")
    _checks.same_device(a_stale=a_stale, a_now=a_now)  # the CUDA op reads both on a_now's GPU
    _check_sps(sps)
    out = try_cuda("schedule_production", [a_stale, a_now], a_stale, a_now, sps)
    if out is not NotImplemented:
        return out
    return admit_top_k(a_now, verify_budget(a_stale, sps, a_now.shape[0], validate=False), validate=False)


def _ranked(a: torch.Tensor):
    """Flatten j-major (index j·R + r) so a stable descending sort breaks ties by j, then r."""
    R = a.shape[0]
    flat = a.t().reshape(-1).float()
    order = torch.sort(flat, descending=True, stable=True).indices
    return flat[order], order % R


def _theta(a_sorted: torch.Tensor, num_requests: int, sps: SPSTable) -> torch.Tensor:
    """Θ_n = (R + Σ_{i≤n} a_i)·SPS(R + n) for n = 0..len(a_sorted), in a_sorted's dtype."""
    device, dtype = a_sorted.device, a_sorted.dtype
    n = torch.arange(a_sorted.numel() + 1, device=device, dtype=torch.int64)
    tau = num_requests + torch.cat([torch.zeros(1, device=device, dtype=dtype), torch.cumsum(a_sorted, dim=0)])
    return tau * sps.lookup(num_requests + n, dtype)


def _lengths(request: torch.Tensor, admitted, R: int) -> torch.Tensor:
    """ℓ_r = r's candidates among the first `admitted` (an int or a 0-dim tensor; < 0 admits none)."""
    take = (torch.arange(request.numel(), device=request.device) < admitted).to(torch.int64)
    return torch.zeros(R, dtype=torch.int64, device=request.device).scatter_add_(0, request, take)


def _check_matrix(name: str, t, validate, empty_ok: bool = False) -> None:
    _checks.tensor(name, t, 2, _checks.FLOAT_DTYPES)
    if not empty_ok:
        _checks.nonempty_batch(name, t)
    if t.shape[1] == 0:
        raise ValueError(f"{name} has block size γ = 0")
    if _checks.want_value_checks(validate, t):
        _checks.in_unit_interval(name, t)


def _check_survival(name: str, a, validate, empty_ok: bool = False) -> None:
    """empty_ok: a stale batch of no rows (no request has survival two steps old) adds survival 0."""
    _check_matrix(name, a, validate, empty_ok)
    if _checks.want_value_checks(validate, a) and bool((a[:, 1:] > a[:, :-1]).any()):
        raise ValueError(f"{name} must be non-increasing along γ: pass survival(c), not c")


def _check_sps(sps) -> None:
    if not isinstance(sps, SPSTable):  # None was an AttributeError from inside the ranking
        raise ValueError(f"sps must be an SPSTable (SPSTable.load(path) or SPSTable.default()), got {type(sps).__name__}")


def _check_budget(budget, validate):
    """The budget as an int (a whole number ≥ 0) or verify_budget's one-value integer tensor. A
    tensor's value is checked only with the other value checks: reading it is a host sync on CUDA."""
    if isinstance(budget, torch.Tensor):
        if budget.numel() != 1 or budget.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"budget must be one integer (verify_budget's K), got a {str(budget.dtype).removeprefix('torch.')} "
                             f"tensor of shape {tuple(budget.shape)}")
        if _checks.want_value_checks(validate, budget) and int(budget) < 0:
            raise ValueError(f"budget must be ≥ 0, got {int(budget)}")
        return budget
    return _checks.count("budget", budget, 0, "draft tokens to admit")
