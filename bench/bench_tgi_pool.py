"""The TGI drafter's context pool reserved at warmup (kv_pool.py), near full: what a step's commit
costs when the segments fit, and what a placement (the segments compacted in place, each given its
share of the room left) costs when one does not. At the drafter's K/V widths of the Qwen3 DSpark
drafters (five layers, 8 KV heads of 128, bf16: 20 KiB per committed token), --requests requests
start at 0.5 to 1.5 times --context rows (spread evenly, so their segments do not all double at
one step) in a pool reserved for --reserve tokens, then --steps steps commit 4 rows to every
request (the anchor row and 3 accepted drafts), as TGI's decode does.

    PYTHONPATH=. python bench/bench_tgi_pool.py [--reserve 1000000] [--requests 256] [--context 2500]
        [--steps 300] [--device cuda] [--json-out FILE]

Prints the median and slowest commit without a placement, each commit's time with one, how many
placements the steps took, the occupancy they reached and the copy floor of one placement (the live
rows read and written once at --bandwidth)."""

import argparse
import json
import statistics
import time

import torch

from dspark_cli.integrations.tgi.kv_pool import KVPool

LAYERS, KV_HEADS, HEAD_DIM, COMMIT = 5, 8, 128, 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reserve", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--context", type=int, default=2500)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bandwidth", type=float, default=4.1e12, help="copy bandwidth, bytes/s (H200: ~4.1e12)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    pool = KVPool(LAYERS)
    like = torch.empty(0, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=args.device)
    pool.reserve(args.reserve, like)
    ids = list(range(args.requests))
    contexts = [args.context * (args.requests + 2 * i) // (2 * args.requests) for i in ids]  # 0.5x .. 1.5x
    rows = torch.randn(LAYERS, sum(contexts), KV_HEADS, HEAD_DIM, device=args.device).bfloat16()
    pool.commit(ids, contexts, rows, rows)
    del rows
    step_rows = torch.randn(LAYERS, args.requests * COMMIT, KV_HEADS, HEAD_DIM, device=args.device).bfloat16()
    row_bytes = LAYERS * 2 * KV_HEADS * HEAD_DIM * 2
    placed = []
    place = pool._place

    def timed_place(*a):  # count and mark the placements a commit makes
        placed.append(True)
        return place(*a)

    pool._place = timed_place
    plain, placing = [], []
    for _ in range(args.steps):
        before = len(placed)
        sync()
        t = time.perf_counter()
        pool.commit(ids, [COMMIT] * args.requests, step_rows, step_rows)
        sync()
        (placing if len(placed) > before else plain).append((time.perf_counter() - t) * 1e3)
    live = sum(pool.length(r) for r in ids)
    floor_ms = 2 * live * row_bytes / args.bandwidth * 1e3
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "reserve": args.reserve, "requests": args.requests, "steps": args.steps,
              "live_rows_end": live, "occupancy_end": live / pool.reserved, "outgrown": pool.outgrown,
              "commit_ms_median": statistics.median(plain) if plain else None,
              "commit_ms_max": max(plain) if plain else None,
              "placements": len(placing), "placement_ms": [round(x, 3) for x in placing],
              "placement_floor_ms_at_end": floor_ms, "pool_gib": pool.reserved * row_bytes / 2**30}
    print(json.dumps(result, indent=1))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
