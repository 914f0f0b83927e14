"""Our CUDA ops vs the torch reference vs the HBM floor, from one run, at Qwen3-4B shapes
(V=151936, r=256, γ=7, bf16 U/W1/W2).

    PYTHONPATH=. python bench/bench_kernels.py --sizes 1,16,128 [--ops ...] [--kernel-only] [--json-out FILE]

Each op is captured in a CUDA graph (both paths; eager if capture fails) and replayed; the median
of --repeats replays is reported. Floors = bytes counted / measured copy bandwidth (read + written
bytes per second). Markov chain: "floor" counts issue 4's bytes for what the call returns — W2 once
per step (γ·V·r·2), U (R·γ·V·2) and q (R·γ·V·4) only when return_q; "issue floor" is issue 4's
definition, W2 + U + q always. W2 once per step is that convention, not a bound: at R ≤ 2 the
one-launch chain keeps part of W2 in shared memory across steps and can run below it. "vs vLLM"
divides the vLLM v0.33.0 V2 loop's time on one H200 as issue 4 reports it (0.316 / 0.480 / 1.631 ms
at R = 1 / 16 / 128, sampled, no q) by ours.
"cold ms": the same op with L2 emptied before each call (a 256 MB write, after resetting any
persisting lines), so nothing a previous call left in L2 is found; the difference between the two
columns is what back-to-back replays gain from L2 leftovers.
Confidence: the sampled chain (q lazy) given the confidence head (h [R, γ, 2560] bf16, fp32
weight), which computes the logits in its own last launch, against the chain followed by the torch
confidence_logits, and the chain alone; "+µs" is each one's cost over the chain alone.
Rejection sampling (all ℓ_r = γ, every request rejected at a random position, so every request
reads a q row): the p row and the q row (R·V·4 each), or, rebuilding q, W2 once (V·r·2) and the U
row (R·V·2) instead; "q rebuilt" verifies a draft of our chain (the rebuilt row takes the chain's
row stats), "q rebuilt, stats pass" one of the torch reference (the kernel computes them first).
Warped: the sampled chain with every request at top-k 50, top-p 0.9 or both (warp.cu's thresholds
on the materialized bias: 3, 4 or 6 histogram passes per step), q stored ("+q", against the torch
reference, a sort per row and step) and q lazy (rejection rebuilds rows with the thresholds), each
beside the unwarped chain the same way: the cost of the warp; floor as "markov sampled +q".
", bound": the same top-k rows given the host-side top_k_max (= k), as the engines pass it.
The scheduler (schedule_production, SPSTable.default()) is latency-bound: no floor, goal <= 20 µs
at R = 256; timed per replay of a one-call graph (includes the graph launch) and per call inside a
graph of 20 calls (its cost inside an engine's captured step). The production rejection path is
timed that way too: per call in a graph of 8, each call on inputs of its own (no L2 reuse)."""

import argparse
import json
import statistics

import torch

from dspark_cli.runtime import (SPSTable, confidence_logits, cuda_ops, markov_chain, rejection_sample,
                                schedule_production)
from dspark_cli.runtime.sps_profile import capture_graph

V, RANK, GAMMA, HIDDEN = 151936, 256, 7, 2560
VLLM_V2_LOOP_MS = {1: 0.316, 16: 0.480, 128: 1.631}  # issue 4, measured by its author on one H200


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    times = time_replays(lambda: dst.copy_(src), 20, graph=False)
    return 2 * nbytes / statistics.median(times)


def cold_l2():
    """A callable that empties L2 before a timed call: persisting lines reset (cudart), then a
    256 MB write evicts the rest."""
    import ctypes

    cudart = ctypes.CDLL(f"libcudart.so.{torch.version.cuda.split('.')[0]}")
    scratch = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def flush():
        torch.cuda.synchronize()
        assert cudart.cudaCtxResetPersistingL2Cache() == 0
        scratch.fill_(1)
    return flush


def time_replays(fn, repeats: int, graph: bool = True, inner: int = 1, before=None) -> list[float]:
    """Seconds per call, one CUDA-event pair each; with inner > 1 the graph holds that many calls
    back to back (a small op's cost inside an engine's captured step, without the graph launch).
    `before` runs ahead of each timed call, outside the timing."""
    fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        try:
            run = capture_graph(lambda: [fn() for _ in range(inner)])[0].replay
        except RuntimeError as exc:
            print(f"  (capture failed, timing eagerly: {str(exc).splitlines()[0][:100]})")
            torch.cuda.synchronize()
    for _ in range(3):
        run()
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3 / (inner if run is not fn else 1))
    return out


def markov_inputs(R: int, greedy: bool, temperature: float = 1.0, seed: int | None = None):
    g = torch.Generator(device="cuda").manual_seed(R if seed is None else seed)
    U = torch.randn(R, GAMMA, V, device="cuda", generator=g).mul_(3).to(torch.bfloat16)
    w1 = torch.randn(V, RANK, device="cuda", generator=g).to(torch.bfloat16)
    w2 = torch.randn(V, RANK, device="cuda", generator=g).div_(16).to(torch.bfloat16)
    anchors = torch.randint(0, V, (R,), device="cuda", generator=g)
    temperature = torch.full((R,), 0.0 if greedy else temperature, device="cuda")
    seeds = torch.randint(0, 2**62, (R,), device="cuda", generator=g)
    return U, anchors, w1, w2, temperature, seeds


def ms(seconds):
    return None if seconds is None else seconds * 1e3


def fmt(value_ms, width: int = 10) -> str:
    return f"{'-':>{width}}" if value_ms is None else f"{value_ms:{width}.3f}"


def timed(call, repeats: int, kernel_only: bool, flush) -> tuple[dict, float]:
    """Median seconds: {True: our op, False: torch reference (None with kernel_only)}, and our op
    with L2 emptied before each call."""
    medians = {True: statistics.median(time_replays(call, repeats))}
    cold = statistics.median(time_replays(call, repeats, before=flush))
    medians[False] = None
    if not kernel_only:
        with cuda_ops.enabled(False):
            medians[False] = statistics.median(time_replays(call, repeats))
    return medians, cold


def rejection_call(R: int, temperature: float, stored: bool, chain_draft: bool, seed: int | None = None,
                   top_p: float | None = None):
    """One verification at Qwen3-4B shapes on inputs of its own (seed): all ℓ_r = γ, p(x_j) = 0 at one
    random position per request, so every request is rejected there and draws over V."""
    U, anchors, w1, w2, temperature, seeds = markov_inputs(R, greedy=False, temperature=temperature, seed=seed)
    warp = None if top_p is None else torch.full((R,), top_p, device="cuda")
    with cuda_ops.enabled(chain_draft):
        draft = markov_chain(U, anchors, w1, w2, temperature, top_p=warp, seeds=seeds, return_q=stored)
    g = torch.Generator(device="cuda").manual_seed(R + 1 if seed is None else seed + 1)
    target = torch.rand(R, GAMMA + 1, V, device="cuda", generator=g)
    target /= target.sum(-1, keepdim=True)
    reject_at = torch.randint(0, GAMMA, (R,), device="cuda", generator=g)
    target[torch.arange(R, device="cuda"), reject_at, draft.tokens.gather(1, reject_at[:, None])[:, 0]] = 0
    ell = torch.full((R,), GAMMA, device="cuda", dtype=torch.int64)
    return lambda: rejection_sample(target, draft, ell, seeds=seeds)


GRAPH_OF = 8  # rejection calls in one graph, each on its own inputs (8 · 78 MB of W2 alone: no L2 reuse)


def bench_rejection(R: int, bw: float, repeats: int, kernel_only: bool, flush, temperature: float) -> list[dict]:
    rows = []
    # q rebuilt from a draft of our chain (its row stats: no stats pass), the production path; from a
    # torch-reference draft (a stats pass first); q stored; rebuilt from a top-p 0.9 draft of our
    # chain (bias GEMM, then a race pass masking below the chain's thresholds).
    variants = (("q rebuilt", False, True, None), ("q rebuilt, stats pass", False, False, None),
                ("q stored", True, False, None), ("q rebuilt, top-p 0.9 draft", False, True, 0.9))
    for name, stored, chain_draft, top_p in variants:
        call = rejection_call(R, temperature, stored, chain_draft, top_p=top_p)
        # (the torch reference cannot rebuild our chain's thresholded rows: not timed there)
        medians, cold = timed(call, repeats, kernel_only or top_p is not None, flush)
        nbytes = R * V * 4 + (R * V * 4 if stored else V * RANK * 2 + R * V * 2)
        floor = nbytes / bw
        name = f"rejection {name}"
        row = {"op": name, "R": R, "kernel_ms": medians[True] * 1e3, "kernel_cold_l2_ms": cold * 1e3,
               "torch_ms": ms(medians[False]), "floor_ms": floor * 1e3}
        in_graph = ""
        if not stored and chain_draft and top_p is None:
            # The verification's cost inside an engine's captured step: no graph launch, and no L2
            # leftovers either (each call reads its own inputs).
            calls = [call] + [rejection_call(R, temperature, stored, chain_draft, seed=1000 * i + R)
                              for i in range(1, GRAPH_OF)]
            per_call = statistics.median(time_replays(lambda: [c() for c in calls], repeats)) / GRAPH_OF
            row[f"kernel_in_graph_of_{GRAPH_OF}_ms"] = per_call * 1e3
            in_graph = f"   per call in a graph of {GRAPH_OF} (own inputs each): {per_call * 1e3:.3f} ms = " \
                       f"{per_call / floor:.2f}x floor"
            del calls
        rows.append(row)
        print(f"{name:28} {R:4d} {row['kernel_ms']:10.3f} {cold * 1e3:8.3f} {fmt(row['torch_ms'])} "
              f"{row['floor_ms']:9.3f} {medians[True] / floor:8.2f} {cold / floor:7.2f}{in_graph}", flush=True)
        del call
        torch.cuda.empty_cache()
    return rows


# top-k 20 + top-p 0.95: Qwen3's generation config (vLLM applies a model's sampling defaults)
WARPS = {"top-k 50": (50, None), "top-p 0.9": (None, 0.9), "top-k 50 + top-p 0.9": (50, 0.9),
         "top-k 20 + top-p 0.95": (20, 0.95)}


def bench_warped(R: int, bw: float, repeats: int, kernel_only: bool, temperature: float) -> list[dict]:
    U, anchors, w1, w2, temp, seeds = markov_inputs(R, False, temperature)
    plain = {return_q: statistics.median(time_replays(
        lambda: markov_chain(U, anchors, w1, w2, temp, seeds=seeds, return_q=return_q), repeats))
        for return_q in (True, False)}
    floor = (GAMMA * V * RANK * 2 + R * GAMMA * V * 2 + R * GAMMA * V * 4) / bw
    rows = []
    for name, (k, p, bound) in [(name, warp + (None,)) for name, warp in WARPS.items()] + [
            (f"{name}, bound", (k, p, k)) for name, (k, p) in WARPS.items() if k is not None]:
        top_k = None if k is None else torch.full((R,), k, dtype=torch.int64, device="cuda")
        top_p = None if p is None else torch.full((R,), p, device="cuda")

        def chain(return_q):
            return lambda: markov_chain(U, anchors, w1, w2, temp, top_k=top_k, top_p=top_p, top_k_max=bound,
                                        seeds=seeds, return_q=return_q)

        kernel = {return_q: statistics.median(time_replays(chain(return_q), repeats)) for return_q in (True, False)}
        reference = None
        if not kernel_only:
            with cuda_ops.enabled(False):
                reference = statistics.median(time_replays(chain(True), max(5, repeats // 5)))
        row = {"op": f"markov sampled, {name}", "R": R, "kernel_q_ms": kernel[True] * 1e3,
               "kernel_lazy_ms": kernel[False] * 1e3, "torch_q_ms": ms(reference),
               "unwarped_q_ms": plain[True] * 1e3, "unwarped_lazy_ms": plain[False] * 1e3, "floor_q_ms": floor * 1e3}
        rows.append(row)
        speedup = f"{reference / kernel[True]:8.1f}x" if reference else f"{'-':>9}"
        print(f"{row['op']:32} {R:4d} {kernel[True] * 1e3:8.3f} {fmt(row['torch_q_ms'])} {speedup} "
              f"{plain[True] * 1e3:9.3f} {kernel[False] * 1e3:8.3f} {plain[False] * 1e3:9.3f} "
              f"{kernel[True] / floor:8.2f}", flush=True)
    return rows


def bench_confidence(R: int, repeats: int) -> dict:
    """The sampled chain (q lazy) with the confidence head's logits from its own last launch, against
    the chain followed by the torch confidence_logits, and the chain alone; each in a CUDA graph,
    the three timed in turn over three rounds (median of the rounds' medians), so that a drift of
    the GPU's clocks between them does not read as a cost."""
    U, anchors, w1, w2, temperature, seeds = markov_inputs(R, False)
    g = torch.Generator(device="cuda").manual_seed(R)
    h = torch.randn(R, GAMMA, HIDDEN, device="cuda", generator=g).to(torch.bfloat16)
    weight = torch.randn(1, HIDDEN + RANK, device="cuda", generator=g).div_(64)
    bias = torch.zeros(1, device="cuda")
    chain = lambda **kw: markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=False, **kw)
    variants = {"fused": lambda: chain(confidence=(h, weight, bias)),
                "torch": lambda: confidence_logits(h, chain().prev_emb, weight, bias),
                "alone": chain}
    rounds = {name: [] for name in variants}
    for _ in range(3):
        for name, fn in variants.items():
            rounds[name].append(statistics.median(time_replays(fn, repeats)))
    t = {name: statistics.median(r) * 1e3 for name, r in rounds.items()}
    row = {"op": "markov sampled + confidence", "R": R, "kernel_ms": t["fused"], "chain_then_torch_ms": t["torch"],
           "chain_alone_ms": t["alone"]}
    print(f"{'markov sampled + confidence':28} {R:4d} {t['fused']:10.3f} {t['torch']:14.3f} {t['alone']:11.3f} "
          f"{(t['fused'] - t['alone']) * 1e3:9.1f} {(t['torch'] - t['alone']) * 1e3:9.1f}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,16,128")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--ops", default="markov,warped,confidence,rejection,schedule",
                    help="which of markov, warped, confidence, rejection, schedule to run")
    ap.add_argument("--kernel-only", action="store_true", help="skip timing the torch reference (markov, rejection)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="of the sampled rows (at exactly 1 the kernels skip dividing by it)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    if cuda_ops.load() is None:
        raise SystemExit(f"extension not loaded: {cuda_ops.load_error()} (run dspark build)")
    bw = copy_bandwidth()
    print(f"GPU {torch.cuda.get_device_name()}  torch {torch.__version__}  copy bandwidth {bw / 1e12:.2f} TB/s  "
          f"L2 {torch.cuda.get_device_properties(0).L2_cache_size >> 20} MB  sampled rows at T = {args.temperature:g}")
    flush = cold_l2()
    rows = []
    ops = set(args.ops.split(","))
    if "markov" in ops:
        print(f"{'op':28} {'R':>4} {'kernel ms':>10} {'cold ms':>8} {'torch ms':>10} {'floor ms':>9} "
              f"{'k/floor':>8} {'issue floor':>11} {'k/issue':>8} {'c/issue':>7} {'vs vLLM (cold)':>14}")
    for R in [int(s) for s in args.sizes.split(",")] if "markov" in ops else []:
        for greedy in (False, True):
            inputs = markov_inputs(R, greedy, args.temperature)
            U, anchors, w1, w2, temperature, seeds = inputs
            for return_q in (False, True):
                def call():
                    return markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=return_q)

                medians, cold = timed(call, args.repeats, args.kernel_only, flush)
                q_bytes = R * GAMMA * V * 4
                base = GAMMA * V * RANK * 2 + R * GAMMA * V * 2
                floor = (base + (q_bytes if return_q else 0)) / bw
                issue_floor = (base + q_bytes) / bw
                name = f"markov {'greedy' if greedy else 'sampled'}{' +q' if return_q else ''}"
                kernel = medians[True]
                peer = VLLM_V2_LOOP_MS.get(R) if not greedy and not return_q else None
                row = {"op": name, "R": R, "kernel_ms": kernel * 1e3, "kernel_cold_l2_ms": cold * 1e3,
                       "torch_ms": ms(medians[False]), "floor_ms": floor * 1e3, "issue_floor_ms": issue_floor * 1e3,
                       "vllm_v2_loop_ms": peer}
                rows.append(row)
                vs = f"{peer / (kernel * 1e3):7.2f}x {peer / (cold * 1e3):5.2f}x" if peer else f"{'-':>14}"
                print(f"{name:28} {R:4d} {kernel * 1e3:10.3f} {cold * 1e3:8.3f} {fmt(row['torch_ms'])} "
                      f"{floor * 1e3:9.3f} {kernel / floor:8.2f} {issue_floor * 1e3:11.3f} "
                      f"{kernel / issue_floor:8.2f} {cold / issue_floor:7.2f} {vs}", flush=True)
    if "warped" in ops:
        print(f"{'op':32} {'R':>4} {'+q ms':>8} {'torch +q':>10} {'speedup':>9} {'unwarped':>9} "
              f"{'lazy ms':>8} {'unwarped':>9} {'+q/floor':>8}")
    for R in [int(s) for s in args.sizes.split(",")] if "warped" in ops else []:
        rows += bench_warped(R, bw, args.repeats, args.kernel_only, args.temperature)
    if "confidence" in ops:
        print(f"{'op':28} {'R':>4} {'kernel ms':>10} {'+ torch conf':>14} {'chain only':>11} "
              f"{'+µs ours':>9} {'+µs torch':>9}   (d = {HIDDEN}, h bf16, fp32 head)")
    for R in [int(s) for s in args.sizes.split(",")] if "confidence" in ops else []:
        rows.append(bench_confidence(R, args.repeats))
    if "rejection" in ops:
        print(f"{'op':28} {'R':>4} {'kernel ms':>10} {'cold ms':>8} {'torch ms':>10} {'floor ms':>9} "
              f"{'k/floor':>8} {'c/floor':>7}")
    for R in [int(s) for s in args.sizes.split(",")] if "rejection" in ops else []:
        rows += bench_rejection(R, bw, args.repeats, args.kernel_only, flush, args.temperature)
    if "schedule" in ops:
        print(f"{'op':28} {'R':>4} {'kernel ms':>10} {'torch ms':>10} {'speedup':>8}")
    sps = SPSTable.default()
    for R in (16, 128, 256) if "schedule" in ops else ():
        g = torch.Generator(device="cuda").manual_seed(R)
        a_stale, a_now = (torch.cumprod(torch.rand(R, GAMMA, device="cuda", generator=g) ** 0.3, dim=1) for _ in range(2))
        medians = {}
        for use_ops in (True, False):
            with cuda_ops.enabled(use_ops):
                medians[use_ops] = statistics.median(time_replays(lambda: schedule_production(a_stale, a_now, sps),
                                                                  args.repeats))
        in_graph = statistics.median(time_replays(lambda: schedule_production(a_stale, a_now, sps), args.repeats,
                                                  inner=20))
        row = {"op": "schedule_production", "R": R, "kernel_ms": medians[True] * 1e3, "torch_ms": medians[False] * 1e3,
               "floor_ms": None, "kernel_in_graph_of_20_ms": in_graph * 1e3}
        rows.append(row)
        print(f"{'schedule_production':28} {R:4d} {row['kernel_ms']:10.4f} {row['torch_ms']:10.3f} "
              f"{medians[False] / medians[True]:8.1f}x   per call in a graph of 20: {in_graph * 1e6:.1f} µs",
              flush=True)
    if args.json_out:
        write_rows(args.json_out, bw, rows)


def write_rows(path: str, bw: float, rows: list[dict]) -> None:
    """The run's rows as JSON, with the GPU, torch and the measured copy bandwidth."""
    with open(path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bytes_per_s": bw,
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
