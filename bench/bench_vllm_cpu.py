"""DSpark on the vLLM 0.32.0 CPU engine (Model Runner V1): tokens/s with vs without DSpark and the
mean accepted length, from one run, with the constructed oracle draft at γ = 7.

    DSPARK_VLLM_PYTHON=/path/to/venv/bin/python python bench/bench_vllm_cpu.py [--json]

Goals (issue 5): speedup ≥ 3×, mean accepted length ≥ 7.5 of 8. The models are tiny, so this
measures the engine-side overhead of drafting/verification, not a real model's speedup."""

import json
import os
import sys

from dspark_cli.integrations.vllm.e2e import greedy_workload, run_in_python, step_stats

GAMMA = 7
PROMPTS = [[1, 2, 3], [40, 41], [100, 7, 9, 11]]
MAX_TOKENS = 256


def main() -> None:
    python = os.environ.get("DSPARK_VLLM_PYTHON", sys.executable)
    results = {}
    for batch in (1, len(PROMPTS)):
        run = run_in_python(python, {"gamma": GAMMA, "target": "successor", "draft": "oracle",
                                     "workloads": [greedy_workload("w", PROMPTS[:batch], MAX_TOKENS)]})["workloads"]["w"]
        assert run["dspark"]["outputs"] == run["baseline"]["outputs"], "DSpark changed the greedy output"
        s, b = step_stats(run["dspark"], batch), step_stats(run["baseline"], batch)
        results[f"batch{batch}"] = {"tokens_per_s_dspark": s["tokens_per_s"], "tokens_per_s_baseline": b["tokens_per_s"],
                                    "speedup": s["tokens_per_s"] / b["tokens_per_s"],
                                    "accepted_length": s["accepted_length"], "gamma": GAMMA}
    if "--json" in sys.argv:
        print(json.dumps(results, indent=2))
        return
    for name, r in results.items():
        print(f"{name}: {r['tokens_per_s_baseline']:.0f} tok/s without, {r['tokens_per_s_dspark']:.0f} tok/s with DSpark "
              f"({r['speedup']:.2f}x), mean accepted length {r['accepted_length']:.2f} of {GAMMA + 1}")


if __name__ == "__main__":
    main()
