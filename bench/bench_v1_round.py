"""One sampled DSpark round's chain + verification as our vLLM V1 integration runs them, q stored
against q lazy (lazy_drafts, patch 0008), at Qwen3-4B shapes (V=151936, r=256, γ=7, bf16), from
one run on the GPU.

    PYTHONPATH=. python bench/bench_v1_round.py --sizes 1,16,128 [--repeats 30]

Per R: the chain (markov_chain, return_q True / False) and the verification of all γ drafts per
request in V1's layout (target rows [R·γ, V] with no bonus rows plus one spare row,
rejection_sample_rows with our seeds), every request rejected at a random position so each reads
(stored) or rebuilds (lazy) one q row: the path BlockVerify takes on CUDA, less its host lists and
the bonus-token scatter. Each is captured in a CUDA graph and replayed; medians of --repeats.
"held restore": what a step verifying requests held from an older step adds (lazy_drafts._HeldRows):
that step's U restored at its batch size R, written only at the held rows (half of them here).
Floors at the measured copy bandwidth: chain W2 per step + U (+ q when stored: issue 4's floor);
verification, stored: the p and q rows it reads (R·V·4 each); lazy: the p row, W2 once and the U
row. V1's own stored-q verification (not run here: no vLLM on the GPU machine) reads every q row
and every p row to draw a recovered token at each position: "V1 recovered-pass floor", Σ n·V·8
bytes, is its least time, in place of our stored verification's.
"from logits": the verification as BlockVerify runs it from V1's fp32 logits [R·γ, V] (target_rows:
the logits' softmax stats and, when a request is greedy, their argmax, then rejection_sample_rows
from LogitRows with those greedy tokens), every other request greedy / none (an all-greedy step
takes V1's greedy path), against the same from written probabilities (torch's softmax and argmax,
then rejection_sample_rows from them); floor of the first: the logits read once, the kernel's
reads (a sampled request's p row, its U row, and W2 once when any request samples).
"target probs": that preparation alone from the logits [R·γ, V]: torch's softmax and argmax
against logit_rows (stats and argmax, no probabilities); floors: the logits read once and the
probabilities written once, the logits read once."""

import argparse
import statistics

import torch

from bench.bench_kernels import GAMMA, RANK, V, copy_bandwidth, markov_inputs, time_replays, write_rows
from dspark_cli.integrations.vllm.target_rows import target_rows
from dspark_cli.runtime import cuda_ops, markov_chain, rejection_sample_rows
from dspark_cli.runtime.target_probs import logit_rows, softmax_rows


def v1_verify_inputs(R: int, draft, seed: int):
    """V1's layout: request r's γ draft rows at r·γ, a spare row at the end; p(x_j) = 0 at one random
    position per request, so each is rejected there."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    target = torch.rand(R * GAMMA + 1, V, device="cuda", generator=g)
    target /= target.sum(-1, keepdim=True)
    reject_at = torch.randint(0, GAMMA, (R,), device="cuda", generator=g)
    rows = torch.arange(R, device="cuda") * GAMMA + reject_at
    target[rows, draft.tokens.gather(1, reject_at[:, None])[:, 0]] = 0
    starts = torch.arange(R, device="cuda", dtype=torch.int64) * GAMMA
    ell = torch.full((R,), GAMMA, device="cuda", dtype=torch.int64)
    return target, starts, ell


def held_restore(R: int, U: torch.Tensor, bw: float, repeats: int) -> dict:
    """The held rows' U (every other row) restored into an unwritten [R, γ, V] as _HeldRows does
    for our CUDA op: its time and floor (the rows read and written)."""
    held = torch.arange(0, R, 2, device="cuda")
    U_rows = U.index_select(0, held)
    restore_s = statistics.median(time_replays(
        lambda: U_rows.new_empty(U.shape).index_copy_(0, held, U_rows), repeats))
    floor = 2 * U_rows.numel() * U.element_size() / bw
    print(f"{R:4d}  held restore ({held.numel()} of {R} rows): {restore_s * 1e3:.3f} ms "
          f"({restore_s / floor:.2f}x its floor {floor * 1e3:.3f} ms)", flush=True)
    return {"R": R, "q": "held restore", "restore_ms": restore_s * 1e3, "restore_floor_ms": floor * 1e3}


def from_logits(R: int, bw: float, repeats: int) -> list[dict]:
    """BlockVerify's CUDA path from V1's logits, with and without greedy requests, against the same
    through written probabilities: median ms, floor."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(R + 7)
    logits = torch.randn(R * GAMMA, V, device="cuda", generator=g).mul_(3)
    starts = torch.arange(R, device="cuda", dtype=torch.int64) * GAMMA
    ell = torch.full((R,), GAMMA, device="cuda", dtype=torch.int64)
    for mix, every in (("half greedy", 2), ("sampled", 0)):
        U, anchors, w1, w2, temperature, seeds = markov_inputs(R, greedy=False)
        greedy = torch.arange(R, device="cuda") % every == 0 if every else torch.zeros(R, dtype=torch.bool, device="cuda")
        temperature[greedy] = 0.0
        draft = markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=False)
        n_greedy = int(greedy.sum())

        def verify():
            target, best = target_rows(logits, any_greedy=n_greedy > 0)
            return rejection_sample_rows(target, starts, ell, draft, greedy=greedy if n_greedy else None, seeds=seeds,
                                         target_argmax=best)

        def verify_through_probs():
            N = logits.shape[0]
            probs = torch.empty(N + 1, V, device="cuda")
            best = torch.zeros(N + 1, dtype=torch.int64, device="cuda") if n_greedy else None
            softmax_rows(logits, probs, best)
            probs[N].fill_(1.0 / V)
            return rejection_sample_rows(probs, starts, ell, draft, greedy=greedy if n_greedy else None, seeds=seeds,
                                         target_argmax=best)

        verify_s = statistics.median(time_replays(verify, repeats))
        probs_s = statistics.median(time_replays(verify_through_probs, repeats))
        sampled = R - n_greedy
        # W2 only for a sampled request's rebuilt q row (greedy ones test the given argmax: no q)
        floor = (logits.numel() * 4 + sampled * V * 4 + (V * RANK * 2 if sampled else 0) + sampled * V * 2) / bw
        rows.append({"R": R, "q": f"from logits, {mix}", "verify_ms": verify_s * 1e3, "verify_floor_ms": floor * 1e3,
                     "through_probs_ms": probs_s * 1e3})
        print(f"{R:4d}  from logits, {mix:>11}: {verify_s * 1e3:.3f} ms ({verify_s / floor:.2f}x its floor "
              f"{floor * 1e3:.3f} ms); through probabilities {probs_s * 1e3:.3f} ms ({probs_s / verify_s:.2f}x)",
              flush=True)
    return rows


def target_probs(R: int, bw: float, repeats: int) -> dict:
    """torch's softmax + argmax of V1's logits (runtime.softmax_rows) against logit_rows' stats + argmax."""
    logits = torch.randn(R * GAMMA, V, device="cuda", generator=torch.Generator(device="cuda").manual_seed(R)).mul_(3)
    N = logits.shape[0]
    probs = torch.empty(N + 1, V, device="cuda")
    best = torch.empty(N + 1, dtype=torch.int64, device="cuda")

    torch_s = statistics.median(time_replays(lambda: softmax_rows(logits, probs, best), repeats))
    stats_s = statistics.median(time_replays(lambda: logit_rows(logits, best), repeats))
    floor, stats_floor = 2 * logits.numel() * 4 / bw, logits.numel() * 4 / bw
    print(f"{R:4d}  target probs: torch's softmax + argmax {torch_s * 1e3:.3f} ms ({torch_s / floor:.2f}x its floor "
          f"{floor * 1e3:.3f} ms); logit_rows {stats_s * 1e3:.3f} ms ({stats_s / stats_floor:.2f}x its floor "
          f"{stats_floor * 1e3:.3f} ms; {torch_s / stats_s:.2f}x faster)", flush=True)
    return {"R": R, "q": "target probs", "torch_ms": torch_s * 1e3, "floor_ms": floor * 1e3,
            "logit_rows_ms": stats_s * 1e3, "logit_rows_floor_ms": stats_floor * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,16,128")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    if cuda_ops.load() is None:
        raise SystemExit(f"extension not loaded: {cuda_ops.load_error()} (run dspark build)")
    bw = copy_bandwidth()
    print(f"GPU {torch.cuda.get_device_name()}  torch {torch.__version__}  copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'R':>4} {'q':>7} {'chain ms':>9} {'÷floor':>7} {'÷issue':>7} {'verify ms':>10} {'÷floor':>7} "
          f"{'round ms':>9} {'V1 recovered-pass floor ms':>27}")
    rows = []
    for R in [int(s) for s in args.sizes.split(",")]:
        U, anchors, w1, w2, temperature, seeds = markov_inputs(R, greedy=False)
        round_ms = {}
        for stored in (True, False):
            def chain():
                return markov_chain(U, anchors, w1, w2, temperature, seeds=seeds, return_q=stored)

            chain_s = statistics.median(time_replays(chain, args.repeats))
            draft = chain()
            target, starts, ell = v1_verify_inputs(R, draft, seed=R)
            verify_s = statistics.median(time_replays(
                lambda: rejection_sample_rows(target, starts, ell, draft, seeds=seeds), args.repeats))
            q_bytes = R * GAMMA * V * 4
            base = GAMMA * V * RANK * 2 + R * GAMMA * V * 2
            chain_floor = (base + (q_bytes if stored else 0)) / bw
            verify_floor = (R * V * 4 + (R * V * 4 if stored else V * RANK * 2 + R * V * 2)) / bw
            v1_pass = 2 * q_bytes / bw if stored else None
            round_ms[stored] = (chain_s + verify_s) * 1e3
            row = {"R": R, "q": "stored" if stored else "lazy", "chain_ms": chain_s * 1e3,
                   "chain_floor_ms": chain_floor * 1e3, "issue_floor_ms": (base + q_bytes) / bw * 1e3,
                   "verify_ms": verify_s * 1e3, "verify_floor_ms": verify_floor * 1e3, "round_ms": round_ms[stored],
                   "v1_recovered_pass_floor_ms": None if v1_pass is None else v1_pass * 1e3}
            rows.append(row)
            print(f"{R:4d} {row['q']:>7} {row['chain_ms']:9.3f} {chain_s / chain_floor:7.2f} "
                  f"{row['chain_ms'] / row['issue_floor_ms']:7.2f} {row['verify_ms']:10.3f} "
                  f"{verify_s / verify_floor:7.2f} {row['round_ms']:9.3f} "
                  f"{'-' if v1_pass is None else f'{v1_pass * 1e3:.3f}':>27}", flush=True)
        print(f"{R:4d}  lazy round = {round_ms[False] / round_ms[True]:.2f}x the stored round "
              f"({round_ms[True] - round_ms[False]:+.3f} ms saved, before V1's recovered pass)", flush=True)
        rows.append(held_restore(R, U, bw, args.repeats))
        rows.extend(from_logits(R, bw, args.repeats))
        rows.append(target_probs(R, bw, args.repeats))
    if args.json_out:
        write_rows(args.json_out, bw, rows)


if __name__ == "__main__":
    main()
