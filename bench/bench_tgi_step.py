"""TGI's DSpark step outside the target forward, as TGI runs it: the verify (the log-softmax of
TGI's warped rows, which TGI returns as its logprobs and whose exp is the target for `.verify`'s
rejection sampling; before session 19 a softmax here and the log-softmax apart, not timed), the commit (`draft.extend_contexts`: each request's anchor row and
3 accepted rows into the drafter's context K/V) and `.propose` (the drafter's block forward, base
logits, Markov chain, confidence head; the block forward eager or its dense parts replayed from
CUDA graphs), at Qwen3-4B DSpark sizes: V = 151936, r = 256, γ = 7, five
draft layers of width 2560 (32 query heads, 8 KV heads of 128, MLP 9728), bf16, random weights;
sampled, seeded as TGI's router seeds every request, all γ drafts verified (DSPARK_SCHEDULER=off);
each request starts from --context committed rows (growing by 4 a cycle).

    PYTHONPATH=. python bench/bench_tgi_step.py --sizes 1,16,128 [--modes eager,graphs] [--attention op,sdpa]
        [--repeats 20] [--context 512] [--json-out FILE]

Median ms of --repeats cycles (after 3 warm-up cycles, which capture the graphs), each phase timed
between device syncs; the ratios of one run between settings that differ in one thing."""

import argparse
import json
import statistics
import time

import torch

from dspark_cli.integrations.tgi.draft import DraftConfig, DSparkDraft
from dspark_cli.integrations.tgi.speculation import DSparkSpeculation

V, RANK, GAMMA = 151936, 256, 7
WIDTH, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS, TARGET_LAYERS = 2560, 32, 8, 128, 9728, 5, 5
COMMIT = 4  # rows committed per request and cycle: the anchor row and 3 accepted drafts


def make_draft(device: str) -> DSparkDraft:
    """Random weights in the released tensor layout, made on the device (bf16)."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device) * std).bfloat16()

    cfg = DraftConfig(hidden_size=WIDTH, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                      num_layers=LAYERS, block_size=GAMMA, mask_token_id=V - 1,
                      target_layer_ids=list(range(1, 1 + TARGET_LAYERS)), rope_theta=1e6, rms_norm_eps=1e-6)
    ones = lambda n: torch.ones(n, device=device, dtype=torch.bfloat16)  # noqa: E731
    w = {"embed_tokens.weight": rand(V, WIDTH), "fc.weight": rand(WIDTH, TARGET_LAYERS * WIDTH),
         "hidden_norm.weight": ones(WIDTH), "norm.weight": ones(WIDTH), "lm_head.weight": rand(V, WIDTH),
         "markov_head.markov_w1.weight": rand(V, RANK, std=0.05), "markov_head.markov_w2.weight": rand(V, RANK, std=0.05),
         "confidence_head.proj.weight": rand(1, WIDTH + RANK), "confidence_head.proj.bias": ones(1) * 0}
    for i in range(LAYERS):
        p = f"layers.{i}."
        w.update({p + "self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, WIDTH),
                  p + "self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, WIDTH),
                  p + "self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, WIDTH),
                  p + "self_attn.o_proj.weight": rand(WIDTH, HEADS * HEAD_DIM),
                  p + "mlp.gate_proj.weight": rand(MLP, WIDTH), p + "mlp.up_proj.weight": rand(MLP, WIDTH),
                  p + "mlp.down_proj.weight": rand(WIDTH, MLP), p + "input_layernorm.weight": ones(WIDTH),
                  p + "post_attention_layernorm.weight": ones(WIDTH), p + "self_attn.q_norm.weight": ones(HEAD_DIM),
                  p + "self_attn.k_norm.weight": ones(HEAD_DIM)})
    return DSparkDraft(cfg, w)


def sync_time(fn, device: str):
    """(ms, fn's result)"""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, out


def bench(weights: DSparkDraft, R: int, repeats: int, context: int, device: str, mode: str, attention: str) -> dict:
    # the weights, with no context committed yet
    draft = DSparkDraft(weights.config, weights.w, cuda_graphs=mode == "graphs")
    draft.paged_attention_fits &= attention == "op"  # "sdpa": the padded gathers and SDPA
    spec = DSparkSpeculation(draft, None, scheduler="off")
    ids = list(range(R))
    g = torch.Generator(device=device).manual_seed(R)
    features = lambda n: torch.randn(n, TARGET_LAYERS * WIDTH, device=device, generator=g).bfloat16()  # noqa: E731
    draft.extend_contexts(ids, features(R * context), torch.arange(context, device=device).repeat(R), [context] * R)
    anchors = torch.randint(0, V, (R,), device=device, generator=g)
    temperature, greedy = torch.ones(R), torch.zeros(R, dtype=torch.bool, device=device)
    seeds = torch.arange(R, dtype=torch.int64, device=device) * 7 + 1
    logits = torch.randn(R, GAMMA + 1, V, device=device, generator=g).bfloat16()
    commit_rows = features(R * COMMIT)
    times = {"verify": [], "commit": [], "propose": []}
    spec.propose(ids, anchors, [context] * R, temperature, seeds=seeds)
    for i in range(repeats + 3):
        at = context + i * COMMIT
        t_ver, _ = sync_time(lambda: spec.verify(ids, torch.log_softmax(logits.float(), -1), greedy, seeds + 1), device)
        positions = (at + torch.arange(COMMIT, device=device)).repeat(R)
        t_com, _ = sync_time(lambda: draft.extend_contexts(ids, commit_rows, positions, [COMMIT] * R), device)
        t_prop, _ = sync_time(lambda: spec.propose(ids, anchors, [at + COMMIT] * R, temperature, seeds=seeds), device)
        if i >= 3:
            for name, t in (("verify", t_ver), ("commit", t_com), ("propose", t_prop)):
                times[name].append(t)
    kept = getattr(spec.pending[0], "draft", None)  # trees before lazy drafts kept q rows instead
    res = {"R": R, "mode": mode, "attention": attention, "context": context,
           "q": "lazy" if kept is not None and kept.q is None else "stored"}
    res.update({f"{name}_ms": statistics.median(t) for name, t in times.items()})
    res["step_ms"] = res["verify_ms"] + res["commit_ms"] + res["propose_ms"]
    return res


def capture_cost(weights: DSparkDraft) -> str:
    """What TGI's model load pays for capturing every graph size up front (hooks.maybe_attach)."""
    draft = DSparkDraft(weights.config, weights.w, cuda_graphs=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    start = time.perf_counter()
    draft.graphs.capture_all()
    torch.cuda.synchronize()
    took, grew = time.perf_counter() - start, (torch.cuda.memory_reserved() - before) / 2**20
    sizes = len(draft.graphs.blocks) + len(draft.graphs.commits)
    return f"capture_all: {sizes} sizes in {took:.2f} s, {grew:.0f} MiB more reserved"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,16,128")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", default="eager,graphs",
                    help="drafter block forward, comma-separated: eager, graphs (CUDA graphs between attention calls)")
    ap.add_argument("--attention", default="op",
                    help="drafter attention, comma-separated: op (our CUDA op reading the context pool in place, "
                         "where it fits), sdpa (padded gathers and SDPA)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    modes, attentions = args.modes.split(","), args.attention.split(",")
    for option, values, known in (("--modes", modes, {"eager", "graphs"}), ("--attention", attentions, {"op", "sdpa"})):
        if not set(values) <= known:
            ap.error(f"{option}: {', '.join(sorted(set(values) - known))} is none of {', '.join(sorted(known))}")
    draft = make_draft(args.device)
    if "graphs" in modes and args.device == "cuda":
        print(capture_cost(draft))
    rows = [bench(draft, int(R), args.repeats, args.context, args.device, mode, attention)
            for R in args.sizes.split(",") for mode in modes for attention in attentions]
    print("| R | drafter | attention | context | q | verify ms | commit ms | propose ms | step ms |")
    print("|---:|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['R']} | {r['mode']} | {r['attention']} | {r['context']} | {r['q']} | {r['verify_ms']:.3f} | "
              f"{r['commit_ms']:.3f} | {r['propose_ms']:.3f} | {r['step_ms']:.3f} |")
    # ratios of one run: each pair that differs in one setting only
    for a, b in ((x, y) for i, x in enumerate(rows) for y in rows[i + 1:] if x["R"] == y["R"]):
        differ = [k for k in ("mode", "attention") if a[k] != b[k]]
        if len(differ) == 1:
            key = differ[0]
            same = "attention" if key == "mode" else "mode"
            print(f"R={a['R']}, {same} {a[same]}: {a[key]} / {b[key]} = {a['propose_ms'] / b['propose_ms']:.2f}x "
                  f"propose, {a['step_ms'] / b['step_ms']:.2f}x step")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
