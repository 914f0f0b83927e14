"""Benchmark each dspark_cli.runtime piece at Qwen3-4B DSpark shapes (V=151936, r=256, d=2560, γ=7).

Depends only on torch and dspark_cli.runtime (no install needed):
    PYTHONPATH=. python bench/bench_runtime.py --device cpu --sizes 1,16
    PYTHONPATH=. python bench/bench_runtime.py --device cuda --json-out bench_runtime_cuda.json
Prints one line per (piece, R): the median over --repeats timed calls after --warmup calls, and
whether the call ran our CUDA op or the torch reference (dspark_cli.runtime.cuda_ops.available)."""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

from dspark_cli.runtime import (
    SPSTable,
    confidence_logits,
    confidence_probs,
    cuda_ops,
    markov_chain,
    rejection_sample,
    residual_row,
    schedule_exact,
    schedule_production,
    survival,
)

V, RANK, HIDDEN, GAMMA = 151936, 256, 2560, 7


def make_inputs(R: int, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0, dtype=torch.bfloat16):
        return (scale * torch.randn(*shape, generator=g)).to(dtype=dtype, device=device)

    U = randn(R, GAMMA, V, scale=3.0)
    w1, w2 = randn(V, RANK, scale=0.05), randn(V, RANK, scale=0.05)
    anchors = torch.randint(0, V, (R,), generator=g).to(device)
    h = randn(R, GAMMA, HIDDEN)
    conf_w, conf_b = randn(1, HIDDEN + RANK, scale=0.02), randn(1)
    target = torch.softmax(randn(R, GAMMA + 1, V, scale=3.0, dtype=torch.float32), dim=-1)
    seeds = torch.arange(R, dtype=torch.int64, device=device) + 1234
    return dict(U=U, w1=w1, w2=w2, anchors=anchors, h=h, conf_w=conf_w, conf_b=conf_b, target=target,
                seeds=seeds, ones=torch.ones(R, device=device), zeros=torch.zeros(R, device=device))


def pieces(x, R: int, device: str):
    """name -> zero-argument callable; drafts needed by later pieces are built once up front."""
    sps = SPSTable.default()
    draft_q = markov_chain(x["U"], x["anchors"], x["w1"], x["w2"], x["ones"], seeds=x["seeds"])
    draft_lazy = markov_chain(x["U"], x["anchors"], x["w1"], x["w2"], x["ones"], seeds=x["seeds"], return_q=False)
    a_now = survival(confidence_probs(confidence_logits(x["h"], draft_q.prev_emb, x["conf_w"], x["conf_b"])))
    a_stale = a_now.roll(1, dims=0)
    full = torch.full((R,), GAMMA, dtype=torch.int64, device=device)
    prev = draft_q.tokens[:, 2]
    gen = torch.Generator(device=device).manual_seed(0)
    return {
        # seeds are unused at temperature 0 but let the CUDA op take the call (it declines a generator)
        "markov_chain greedy": lambda: markov_chain(x["U"], x["anchors"], x["w1"], x["w2"], x["zeros"],
                                                    seeds=x["seeds"], return_q=False),
        "markov_chain sampled seeds, q stored": lambda: markov_chain(
            x["U"], x["anchors"], x["w1"], x["w2"], x["ones"], seeds=x["seeds"]),
        "markov_chain sampled seeds, q lazy": lambda: markov_chain(
            x["U"], x["anchors"], x["w1"], x["w2"], x["ones"], seeds=x["seeds"], return_q=False),
        "markov_chain sampled generator, q lazy": lambda: markov_chain(
            x["U"], x["anchors"], x["w1"], x["w2"], x["ones"], generator=gen, return_q=False),
        "confidence (logits+STS-free probs+survival)": lambda: survival(confidence_probs(
            confidence_logits(x["h"], draft_q.prev_emb, x["conf_w"], x["conf_b"]))),
        "schedule_exact (Algorithm 1)": lambda: schedule_exact(a_now, sps, validate=False),
        "schedule_production": lambda: schedule_production(a_stale, a_now, sps, validate=False),
        "residual_row": lambda: residual_row(x["U"][:, 3], prev, x["w1"], x["w2"], x["ones"]),
        "rejection_sample ell=γ, q stored": lambda: rejection_sample(x["target"], draft_q, full, seeds=x["seeds"]),
        "rejection_sample ell=γ, q rebuilt": lambda: rejection_sample(x["target"], draft_lazy, full, seeds=x["seeds"]),
    }


OPS_PIECES = {"markov_chain greedy", "markov_chain sampled seeds, q stored", "markov_chain sampled seeds, q lazy",
              "schedule_production", "rejection_sample ell=γ, q stored", "rejection_sample ell=γ, q rebuilt"}


def time_call(fn, device: str, warmup: int, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = _cpu_model() + f", {torch.get_num_threads()} torch threads"
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d")}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--sizes", default="1,16,128", help="comma-separated R values")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 5 on cpu, 20 on cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 1 on cpu, 3 on cuda)")
    parser.add_argument("--only", default="", help="run only pieces whose name contains this text")
    parser.add_argument("--skip", default="", help="skip pieces whose name contains this text (e.g. seeds)")
    parser.add_argument("--json-out", default="", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"error: --device {args.device} but torch {torch.__version__} sees no CUDA GPU", file=sys.stderr)
        return 3
    repeats = args.repeats or (20 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    env = environment(args.device)
    print(f"# {env['date']} {env['device']} torch {env['torch']} commit {env['commit']}; "
          f"median of {repeats} (warmup {warmup}); V={V} r={RANK} d={HIDDEN} γ={GAMMA}")
    rows = []
    for R in [int(s) for s in args.sizes.split(",") if s]:
        x = make_inputs(R, args.device)
        ops = cuda and cuda_ops.available(x["U"], x["w1"], x["w2"])
        for name, fn in pieces(x, R, args.device).items():
            if (args.only and args.only not in name) or (args.skip and args.skip in name):
                continue
            # "ops on": our CUDA ops are loaded and this piece is one they take (seeded chains,
            # schedule_production, rejection): the rest always run the torch reference
            impl = "ops on" if ops and name in OPS_PIECES else "torch reference"
            ms = 1e3 * time_call(fn, args.device, warmup, repeats)
            rows.append({"piece": name, "R": R, "median_ms": ms, "impl": impl})
            print(f"{name:45s} R={R:<4d} {ms:10.3f} ms  [{impl}]", flush=True)
        del x
        if cuda:
            torch.cuda.empty_cache()
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"environment": env, "repeats": repeats, "warmup": warmup, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
