"""`dspark verify ops` / `dspark build --self-test`: load the built extension and check each op
against the torch reference (dspark_cli.runtime with the CUDA ops switched off) on the GPU.

The comparison (compare_markov) is shared with tests/test_kernels_gpu.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark_cli.errors import CheckFailed, EnvironmentProblem


@dataclass
class MarkovCase:
    R: int
    gamma: int
    V: int
    rank: int
    w_dtype: torch.dtype = torch.bfloat16
    u_dtype: torch.dtype = torch.bfloat16
    greedy_every: int = 0      # every n-th request greedy (0: none)
    return_q: bool = True
    seed: int = 0

    def label(self) -> str:
        w, u = str(self.w_dtype).removeprefix("torch."), str(self.u_dtype).removeprefix("torch.")
        return (f"markov R={self.R} γ={self.gamma} V={self.V} r={self.rank} w={w} U={u} "
                f"greedy_every={self.greedy_every} return_q={self.return_q}")


def markov_inputs(case: MarkovCase, device: str = "cuda"):
    g = torch.Generator(device="cpu").manual_seed(case.seed)
    U = (3 * torch.randn(case.R, case.gamma, case.V, generator=g)).to(case.u_dtype).to(device)
    w1 = torch.randn(case.V, case.rank, generator=g).to(case.w_dtype).to(device)
    w2 = (torch.randn(case.V, case.rank, generator=g) / case.rank**0.5).to(case.w_dtype).to(device)
    anchors = torch.randint(0, case.V, (case.R,), generator=g).to(device)
    temperature = (0.5 + torch.rand(case.R, generator=g)).to(device)
    if case.greedy_every:
        temperature[:: case.greedy_every] = 0.0
    seeds = torch.randint(-2**62, 2**62, (case.R,), generator=g).to(device)
    return U, anchors, w1, w2, temperature, seeds


def poison_allocator(device: str = "cuda", nbytes: int = 1 << 30) -> None:
    """Fill freed caching-allocator blocks with NaN so unwritten output elements show up."""
    junk = torch.full((nbytes // 4,), float("nan"), device=device)
    del junk


def run_markov(case: MarkovCase, use_cuda_ops: bool, inputs=None):
    from dspark_cli.runtime import cuda_ops, markov_chain

    inputs = inputs or markov_inputs(case)
    U, anchors, w1, w2, temperature, seeds = inputs
    cuda_ops.set_enabled(use_cuda_ops)
    try:
        poison_allocator()
        return markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=case.return_q)
    finally:
        cuda_ops.set_enabled(True)


def compare_markov(case: MarkovCase) -> dict:
    """Kernel vs reference on the same inputs. Tokens must match exactly; a near-tie in the race
    (keys within fp32 rounding: the kernel compares x - log E, the reference q / E) may flip one
    request's chain, which is reported as `diverged` rather than hidden."""
    inputs = markov_inputs(case)
    ref = run_markov(case, False, inputs)
    out = run_markov(case, True, inputs)
    same_tokens = (out.tokens == ref.tokens).all(dim=1)
    ok_rows = same_tokens  # compare probabilities only where the chains agree
    qt_err = (out.q_token - ref.q_token)[ok_rows].abs().div(ref.q_token[ok_rows].abs().clamp_min(1e-30)).max()
    res = {
        "case": case.label(),
        "requests": case.R,
        "diverged": int((~same_tokens).sum()),
        "q_token_max_rel_err": float(qt_err) if ok_rows.any() else 0.0,
        "prev_emb_equal": bool(torch.equal(out.prev_emb[ok_rows], ref.prev_emb[ok_rows])),
        "finite": bool(torch.isfinite(out.q_token).all() and (out.q is None or torch.isfinite(out.q).all())),
        "tokens_in_range": bool(((out.tokens >= 0) & (out.tokens < case.V)).all()),
    }
    if case.return_q:
        res["q_max_abs_err"] = float((out.q - ref.q)[ok_rows].abs().max()) if ok_rows.any() else 0.0
        res["q_rows_sum_err"] = float((out.q.sum(-1) - 1).abs().max())
    else:
        res["q_is_none"] = out.q is None and out.source is not None
    res["ok"] = (res["diverged"] <= max(1, case.R // 64) and res["q_token_max_rel_err"] < 1e-4
                 and res["prev_emb_equal"] and res["finite"] and res["tokens_in_range"]
                 and res.get("q_max_abs_err", 0.0) < 1e-5 and res.get("q_rows_sum_err", 0.0) < 1e-4
                 and res.get("q_is_none", True))
    return res


def survival_matrix(R: int, gamma: int, g: torch.Generator) -> torch.Tensor:
    """Random non-increasing survival rows a_{r,j} = prod_{i<=j} c_{r,i}, c in (0, 1)."""
    return torch.cumprod(torch.rand(R, gamma, generator=g) ** 0.3, dim=1)


def compare_schedule(R: int, R_stale: int, gamma: int = 7, seed: int = 0) -> dict:
    """schedule_production kernel vs reference: ℓ must match exactly (lengths and their sum)."""
    from dspark_cli.runtime import SPSTable, cuda_ops, schedule_production

    g = torch.Generator(device="cpu").manual_seed(seed)
    a_stale, a_now = survival_matrix(R_stale, gamma, g).cuda(), survival_matrix(R, gamma, g).cuda()
    sps = SPSTable.default()
    cuda_ops.set_enabled(False)
    try:
        ref = schedule_production(a_stale, a_now, sps)
    finally:
        cuda_ops.set_enabled(True)
    poison_allocator()
    out = schedule_production(a_stale, a_now, sps)
    return {"case": f"schedule_production R={R} R_stale={R_stale} γ={gamma}", "ok": bool(torch.equal(out, ref)),
            "budget": int(out.sum()), "budget_ref": int(ref.sum()), "rows_differing": int((out != ref).sum())}


SELF_TEST_CASES = [
    MarkovCase(1, 7, 151936, 256),
    MarkovCase(16, 7, 151936, 256, greedy_every=3, return_q=False),
    MarkovCase(13, 5, 50257, 64, torch.float32, torch.float16, greedy_every=2),
]


def run_self_test(as_json: bool = False) -> list[dict]:
    from dspark_cli.output import console, emit
    from dspark_cli.runtime import cuda_ops

    if not torch.cuda.is_available():
        raise EnvironmentProblem("no CUDA GPU visible to torch: the self-test runs the kernels on a GPU")
    if cuda_ops.load() is None:
        raise EnvironmentProblem(f"CUDA extension not loaded: {cuda_ops.load_error()}; run dspark build")
    results = [compare_markov(c) for c in SELF_TEST_CASES] + [compare_schedule(256, 256, seed=1),
                                                             compare_schedule(5, 9, seed=2)]

    def render(doc):
        for r in doc["results"]:
            detail = (f"diverged={r['diverged']} q_token_rel={r['q_token_max_rel_err']:.2e}" if "diverged" in r
                      else f"budget={r['budget']} (reference {r['budget_ref']})")
            console.print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']}  {detail}", highlight=False)

    emit({"ok": all(r["ok"] for r in results), "library": cuda_ops.load(), "results": results}, as_json, render)
    if not all(r["ok"] for r in results):
        raise CheckFailed("a CUDA op disagrees with the torch reference (see above)")
    return results

