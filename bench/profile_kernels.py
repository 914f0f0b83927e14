"""Per-kernel device time of one markov_chain / rejection_sample / schedule_production call
(torch.profiler), at the shapes of bench_kernels.py: where a call's time goes, kernel by kernel.
A kernel launched as a programmatic dependent (the small-batch Markov steps) starts early and waits
for its predecessor, so its time includes that wait and the sum can exceed the call's wall time.

    PYTHONPATH=. python bench/profile_kernels.py --sizes 1,128,256 [--calls 20]
"""

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_kernels import GAMMA, V, markov_inputs
from dspark_cli.runtime import SPSTable, cuda_ops, markov_chain, rejection_sample, schedule_production
from dspark_cli.selftest import survival_matrix


def breakdown(fn, calls: int) -> list[tuple[str, float, int]]:
    """(kernel name, µs per call, launches per call), largest first."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total, count = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total[event.name] += event.device_time
            count[event.name] += 1
    return sorted(((name[:90], total[name] / calls, count[name] // calls) for name in total), key=lambda t: -t[1])


def warped_cases(args, U, anchors, w1, w2, temperature, seeds) -> dict:
    """The chain warped by --top-k / --top-p for every request, q lazy and stored; none without them."""
    if args.top_k is None and args.top_p is None:
        return {}
    R = U.shape[0]
    top_k = None if args.top_k is None else torch.full((R,), args.top_k, dtype=torch.int64, device="cuda")
    top_p = None if args.top_p is None else torch.full((R,), args.top_p, device="cuda")
    name = f"top-k {args.top_k} top-p {args.top_p}"
    return {f"markov_chain {name}, q {'stored' if return_q else 'lazy'}":
            lambda return_q=return_q: markov_chain(U, anchors, w1, w2, temperature, top_k=top_k, top_p=top_p,
                                                   seeds=seeds, return_q=return_q)
            for return_q in (False, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,128")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--top-k", type=int, help="also profile the chain warped by this top-k (and --top-p)")
    ap.add_argument("--top-p", type=float)
    args = ap.parse_args()
    if cuda_ops.load() is None:
        raise SystemExit(f"extension not loaded: {cuda_ops.load_error()} (run dspark build)")
    sps = SPSTable.default()  # its dense table is cached on the GPU once
    for R in (int(s) for s in args.sizes.split(",")):
        U, anchors, w1, w2, temperature, seeds = markov_inputs(R, greedy=False)
        draft = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=False)
        target = torch.rand(R, GAMMA + 1, V, device="cuda")
        target /= target.sum(-1, keepdim=True)
        target[torch.arange(R, device="cuda"), 0, draft.tokens[:, 0]] = 0  # every request rejects at 0
        ell = torch.full((R,), GAMMA, device="cuda", dtype=torch.int64)
        g = torch.Generator().manual_seed(R)
        a_stale, a_now = (survival_matrix(R, GAMMA, g).cuda() for _ in range(2))
        cases = {"markov_chain sampled, q lazy":
                     lambda: markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=False),
                 "markov_chain sampled, q stored":
                     lambda: markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=True),
                 **warped_cases(args, U, anchors, w1, w2, temperature, seeds),
                 "rejection_sample q rebuilt": lambda: rejection_sample(target, draft, ell, seeds=seeds),
                 "schedule_production": lambda: schedule_production(a_stale, a_now, sps)}
        for name, fn in cases.items():
            rows = breakdown(fn, args.calls)
            print(f"\n{name}, R={R}: {sum(t for _, t, _ in rows):.1f} µs of kernels per call")
            for kernel, us, launches in rows:
                print(f"  {us:8.1f} µs  {launches:3d}×  {kernel}")


if __name__ == "__main__":
    main()
