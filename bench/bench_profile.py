"""One target decode step on a GPU as `dspark profile` times it, eager (transformers' Python
dispatch, kernel by kernel) against a CUDA-graph replay (how serving engines run decode), and the
replay with transformers' own SDPA attention instead of the profile's, side by side from one run,
with the step's HBM floor: every weight the step reads once (the embedding table
only as the LM head when tied) plus the KV cache of B sequences of `context + 1` tokens, at the copy
bandwidth measured in the same run.

    PYTHONPATH=. python bench/bench_profile.py --model bench/configs/qwen3-4b.json --sizes 1,8,64,256 --context 256

Random weights (timing only); median of --repeats per size."""

import argparse
from pathlib import Path

import torch

from bench.bench_draft_attention import copy_bandwidth
from dspark_cli.runtime.sps_profile import ATTENTION, ForwardTimer, ProfileSettings, load_config


def step_bytes(model, config, batch: int, context: int, itemsize: int) -> int:
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embedding.data_ptr() != head.data_ptr():  # an untied table is only gathered: B rows
        weights[embedding.data_ptr()] = batch * embedding.shape[1] * embedding.element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = batch * (context + 1) * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * itemsize
    return sum(weights.values()) + kv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("bench/configs/qwen3-4b.json"))
    ap.add_argument("--sizes", default="1,8,64,256")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    config = load_config(args.model)
    timer = ForwardTimer(config, ProfileSettings(device="cuda", dtype=torch.bfloat16, context=args.context,
                                                 warmup=3, repeats=args.repeats))
    bandwidth = copy_bandwidth() * 1e3  # bytes per second
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {args.model} bf16, context {args.context}, "
          f"median of {args.repeats}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print("| B | eager ms | graph ms | eager / graph | graph, transformers' SDPA ms | that / graph | floor ms "
          "| graph / floor |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    timer.median_step_seconds(1)  # first-call costs stay out of the table
    for batch in (int(b) for b in args.sizes.split(",")):
        eager = timer.median_step_seconds(batch) * 1e3
        graph = timer.median_step_seconds(batch, graph=True) * 1e3
        timer.model.set_attn_implementation("sdpa")
        theirs = timer.median_step_seconds(batch, graph=True) * 1e3
        timer.model.set_attn_implementation(ATTENTION)
        floor = step_bytes(timer.model, config, batch, args.context, 2) / bandwidth * 1e3
        print(f"| {batch} | {eager:.3f} | {graph:.3f} | {eager / graph:.2f} | {theirs:.3f} | {theirs / graph:.2f} "
              f"| {floor:.3f} | {graph / floor:.2f} |", flush=True)


if __name__ == "__main__":
    main()
