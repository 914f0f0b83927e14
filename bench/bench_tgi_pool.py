"""The TGI drafter's context pool reserved at warmup (kv_pool.py), near full: what a step's commit
costs, with and without requests finishing and arriving. At the drafter's K/V widths of the Qwen3
DSpark drafters (five layers, 8 KV heads of 128, bf16: 20 KiB per committed token), --requests
requests start at 0.5 to 1.5 times --context rows (spread evenly) in a pool reserved for --reserve
tokens, then --steps steps commit 4 rows to every request (the anchor row and 3 accepted drafts),
as TGI's decode does. With --lifetime LO,HI, a serving pool's churn: each request finishes after LO
to HI steps (random, seeded) and a new one arrives in its place in the same commit with a prompt of
0.5 to 1.5 times --context rows.

    PYTHONPATH=. python bench/bench_tgi_pool.py [--reserve 1000000] [--requests 256] [--context 2500]
        [--steps 300] [--lifetime LO,HI] [--device cuda] [--json-out FILE]

Prints the median, 99th percentile and slowest commit (timed between device syncs), how often the
tensors were made again (`_remake`: only when the live pages outgrow the reservation), the rows
committed and the pages taken at the fullest step, and the floor of a decode step's commit (its
rows read and written once at the copy bandwidth, which counts both: bench_kernels' measured on
the device first, or --bandwidth; none on the CPU without it)."""

import argparse
import json
import random
import statistics
import time

import torch

from bench.bench_kernels import copy_bandwidth
from dspark_cli.integrations.tgi.kv_pool import PAGE_ROWS, KVPool

LAYERS, KV_HEADS, HEAD_DIM, COMMIT = 5, 8, 128, 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reserve", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--context", type=int, default=2500)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lifetime", help="LO,HI: each request finishes after LO..HI steps and a new one arrives")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bandwidth", type=float, help="copy bandwidth, bytes/s (default: measured on a GPU)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    lifetime = tuple(map(int, args.lifetime.split(","))) if args.lifetime else None
    rng = random.Random(0)
    on_gpu = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    bandwidth = args.bandwidth or (copy_bandwidth() if on_gpu else None)  # before the pool takes its memory

    pool = KVPool(LAYERS)
    like = torch.empty(0, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=args.device)
    pool.reserve(args.reserve, like)
    ids = list(range(args.requests))
    contexts = [args.context * (args.requests + 2 * i) // (2 * args.requests) for i in ids]  # 0.5x .. 1.5x
    rows = torch.randn(LAYERS, max(sum(contexts), args.requests * COMMIT), KV_HEADS, HEAD_DIM,
                       device=args.device).bfloat16()
    pool.commit(ids, contexts, rows[:, :sum(contexts)], rows[:, :sum(contexts)])
    remade = []
    remake = pool._remake
    pool._remake = lambda *a: remade.append(1) or remake(*a)  # count the tensors made again
    times, fullest, pages_fullest = [], 0.0, 0.0
    left = {r: rng.randint(*lifetime) for r in ids} if lifetime else {}
    next_id = args.requests
    for _ in range(args.steps):
        counts = [COMMIT] * args.requests
        for i, r in enumerate(ids if left else ()):
            left[r] -= 1
            if left[r] == 0:  # finished: a new request's prompt takes its place
                pool.drop(r)
                del left[r]
                ids[i], next_id = next_id, next_id + 1
                left[ids[i]] = rng.randint(*lifetime)
                counts[i] = rng.randint(args.context // 2, 3 * args.context // 2)
        n = sum(counts)
        step_rows = rows[:, :n] if n <= rows.shape[1] else rows[:, :1].expand(-1, n, -1, -1)
        sync()
        t = time.perf_counter()
        pool.commit(ids, counts, step_rows, step_rows)
        sync()
        times.append((time.perf_counter() - t) * 1e3)
        fullest = max(fullest, sum(pool.length(r) for r in ids) / pool.reserved)
        pages_fullest = max(pages_fullest, sum(len(pool.pages[r]) for r in ids) * PAGE_ROWS / pool.reserved)
    row_bytes = LAYERS * 2 * KV_HEADS * HEAD_DIM * 2
    times.sort()
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "reserve": args.reserve, "requests": args.requests, "steps": args.steps, "lifetime": lifetime,
              "arrivals": next_id - args.requests, "rows_committed_fullest": fullest,
              "pages_taken_fullest": pages_fullest, "remade": len(remade), "outgrown": pool.outgrown,
              "commit_ms_median": statistics.median(times), "commit_ms_p99": times[int(0.99 * (len(times) - 1))],
              "commit_ms_max": times[-1],
              "copy_bandwidth": bandwidth,
              "decode_commit_floor_ms": 2 * args.requests * COMMIT * row_bytes / bandwidth * 1e3 if bandwidth else None,
              "pool_gib": pool.k.numel() * 2 * pool.k.element_size() / 2**30}
    print(json.dumps(result, indent=1))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
