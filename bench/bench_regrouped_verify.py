"""Verification of a regrouped batch, as TGI's DSpark step runs it (eager, lazy top-k drafts), beside
the batch verified as it was drafted: a filter (one request of the drafted batch finished), a
concatenate (two batches drafted apart), the filter's gather_drafts alone, and two drafts' rows
interleaved (vLLM V1 after a skipped step), verified one call per draft and, emulating the code
before 415a7fa, one call per run of rows. Qwen3-4B shapes
(V = 151936, r = 256, γ = 7), all ℓ = γ, target rows near q (acceptances and rejections). Medians
of --repeats calls, one run: CUDA-event time and the host's time until the call returns (this path
is host-bound).

    PYTHONPATH=. python bench/bench_regrouped_verify.py --sizes 16,128"""

import argparse
import statistics
import time

import torch

from bench.bench_kernels import GAMMA, V, markov_inputs, time_replays
from dspark_cli.runtime import gather_drafts, markov_chain, rejection_sample

TOP_K = 50


def drafted(R: int, seed: int, w1, w2):
    """A lazy top-k draft of R requests by the drafter heads w1, w2, target rows near its q, and its seeds."""
    U, anchors, _, _, temperature, seeds = markov_inputs(R, False, seed=seed)
    top_k = torch.full((R,), TOP_K, dtype=torch.int64, device="cuda")
    draft = markov_chain(U, anchors, w1, w2, temperature, top_k=top_k, seeds=seeds, return_q=False)
    q = markov_chain(U, anchors, w1, w2, temperature, top_k=top_k, seeds=seeds, return_q=True).q
    g = torch.Generator(device="cuda").manual_seed(seed)
    noise = torch.rand(R, GAMMA + 1, V, device="cuda", generator=g)
    target = torch.cat([q, torch.zeros(R, 1, V, device="cuda")], 1) + 0.3 * noise / V
    return draft, target / target.sum(-1, keepdim=True), seeds


def bench(R: int, repeats: int) -> None:
    _, _, w1, w2, _, _ = markov_inputs(1, False, seed=0)  # one drafter for every batch
    whole, target, seeds = drafted(R, R, w1, w2)
    half_a, target_a, seeds_a = drafted(R // 2, R + 1, w1, w2)
    half_b, target_b, seeds_b = drafted(R - R // 2, R + 2, w1, w2)
    kept = list(range(1, R))
    ell = torch.full((R,), GAMMA, device="cuda")
    cases = {
        "as drafted": lambda: rejection_sample(target, whole, ell, seeds=seeds),
        f"filtered ({R - 1} of {R})": lambda: rejection_sample(
            target[1:], gather_drafts([(whole, kept)]), ell[1:], seeds=seeds[1:]),
        f"concatenated ({R // 2} + {R - R // 2})": lambda: rejection_sample(
            torch.cat([target_a, target_b]), gather_drafts([(half_a, list(range(R // 2))),
                                                           (half_b, list(range(R - R // 2)))]),
            ell, seeds=torch.cat([seeds_a, seeds_b])),
        "gather_drafts of the filter": lambda: gather_drafts([(whole, kept)]),
    }
    # vLLM V1's batch after a skipped step: the latest step's rows and the held ones interleaved;
    # verified one call per draft, and (emulated) one call per run of rows, as before 415a7fa
    n = R // 2
    parts = [(d, [i]) for i in range(n) for d in (half_a, half_b)]
    mixed_target, mixed_seeds = (torch.stack([t[i] for i in range(n) for t in pair])
                                 for pair in ((target_a, target_b), (seeds_a, seeds_b)))
    cases[f"interleaved ({n} + {n} rows)"] = lambda: rejection_sample(
        mixed_target, gather_drafts(parts), ell[:2 * n], seeds=mixed_seeds)
    cases["interleaved, a call per run"] = lambda: [rejection_sample(
        mixed_target[j:j + 1], gather_drafts([part]), ell[:1], seeds=mixed_seeds[j:j + 1])
        for j, part in enumerate(parts)]
    base = None
    for name, call in cases.items():
        median = statistics.median(time_replays(call, repeats, graph=False)) * 1e3
        base = base or median
        print(f"R = {R:4d}  {name:30} {median:8.3f} ms  {median / base:5.2f}x as drafted   host "
              f"{statistics.median(host_seconds(call, repeats)) * 1e3:.3f} ms", flush=True)


def host_seconds(call, repeats: int) -> list[float]:
    """Seconds until the call returns, the GPU idle at its start."""
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16,128")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    for R in (int(s) for s in args.sizes.split(",")):
        if R < 2:
            ap.error(f"--sizes: {R} cannot be concatenated from two batches (2 or more)")
        bench(R, args.repeats)


if __name__ == "__main__":
    main()
