"""The TGI drafter's attention of one layer at Qwen3-4B DSpark sizes (32 query heads, 8 KV heads of
128, γ = 7, bf16): our op reading the contexts in place (csrc/draft_attention.cu) against the
drafter's SDPA path (padded gathers of every context, masked SDPA; its per-step chunk plan timed
apart), and the HBM floor of the op: the context K/V, q, the block's K/V and the output once each
at the copy bandwidth measured in the same run.

    PYTHONPATH=. python bench/bench_draft_attention.py --sizes 1,16,128 [--context 560] [--repeats 50]

Contexts are ragged: request r holds context − (r mod 64) rows, in pages as the drafter's pool hands
them out (committed in four pieces, so each request's pages interleave with the others'). Median of --repeats, each timed by CUDA events over a loop of 10 calls."""

import argparse
import functools
import statistics
from types import SimpleNamespace

import torch

from dspark_cli.integrations.tgi.draft import DSparkDraft, PagedContexts, _attention_chunks
from dspark_cli.integrations.tgi.kv_pool import PAGE_ROWS, KVPool
from dspark_cli.runtime import cuda_ops

HEADS, KV_HEADS, HEAD_DIM, GAMMA = 32, 8, 128, 7
LOOP = 10


def timed(fn, repeats: int) -> float:
    """Median ms of one call."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(LOOP):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / LOOP)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per ms of a 1 GiB device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,16,128")
    ap.add_argument("--context", type=int, default=560)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    if cuda_ops.load() is None:
        raise SystemExit(f"extension not loaded: {cuda_ops.load_error()}")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.2f} TB/s")
    print("| R | keys | op ms | SDPA path ms | its plan ms | SDPA / op | floor ms | op / floor |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator(device="cuda").manual_seed(0)
    for R in map(int, args.sizes.split(",")):
        lengths = [args.context - r % 64 for r in range(R)]
        pool = KVPool(1)
        rand = lambda *s: torch.randn(*s, device="cuda", generator=g).bfloat16()  # noqa: E731
        ids = list(range(R))
        for step in range(4):  # commits in pieces, each request's pages interleaved with the others'
            counts = [n // 4 + (n % 4 if step == 3 else 0) for n in lengths]
            pool.commit(ids, counts, rand(1, sum(counts), KV_HEADS, HEAD_DIM), rand(1, sum(counts), KV_HEADS, HEAD_DIM))
        q, kb, vb = rand(R, GAMMA, HEADS, HEAD_DIM), rand(R, GAMMA, KV_HEADS, HEAD_DIM), rand(R, GAMMA, KV_HEADS, HEAD_DIM)
        out = torch.empty_like(q)
        paged = PagedContexts(*pool.page_table(ids, "cuda"))
        op_ms = timed(lambda: cuda_ops.draft_attention(q, kb, vb, pool.k[0], pool.v[0], paged.pages, PAGE_ROWS,
                                                       paged.lengths, paged.longest, out), args.repeats)
        # the drafter's method without our op: it reads nothing of the drafter but its pool
        sdpa = functools.partial(DSparkDraft._block_attention, SimpleNamespace(context_kv=pool))
        plan = _attention_chunks(pool, ids, GAMMA, "cuda")
        sdpa_ms = timed(lambda: sdpa(0, q, kb, vb, plan, out), args.repeats)
        plan_ms = timed(lambda: _attention_chunks(pool, ids, GAMMA, "cuda"), args.repeats)
        keys = sum(lengths)
        # bf16: the contexts' K and V, then q, the block's K and V and the output
        floor_bytes = 2 * (2 * keys * KV_HEADS * HEAD_DIM + R * GAMMA * (2 * HEADS + 2 * KV_HEADS) * HEAD_DIM)
        floor_ms = floor_bytes / bandwidth
        print(f"| {R} | {keys + R * GAMMA} | {op_ms:.4f} | {sdpa_ms:.4f} | {plan_ms:.4f} | {sdpa_ms / op_ms:.2f}x | "
              f"{floor_ms:.4f} | {op_ms / floor_ms:.2f}x |")


if __name__ == "__main__":
    main()
