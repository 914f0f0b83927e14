"""End-to-end runs of the patched vLLM on constructed models; run inside the vLLM venv:

    python -m dspark_cli.integrations.vllm.e2e SPEC.json OUT.json   (vLLM logs to stdout)

SPEC: {"workdir": dir, "gamma": γ, "target": "successor"|"random"|"flat",
       "draft": "oracle"|"partial"|"random"|"fitted"|"backbone", "baseline": true|false, "adaptive": false,
       "env": {...DSPARK_* knobs...}, "engine": {...more LLM(...) arguments, for both engines...},
       "speculative_config": {...more of vLLM's speculative_config keys...},
       "workloads": [{"name", "prompts": [[ids]], "max_tokens" (one, or one per prompt), "temperature",
                      "seed" | "seeds", "top_k"?, "top_p"?, "regex"? | "choice"?,
                      "params"?: {...SamplingParams arguments, over the ones above...},
                      "score"?: k, "abort"?: {"prompts": [i], "after_tokens": m, "after_steps"?: s}}]}
A workload with a regex or choice is structured output (the target then gets a byte-level tokenizer:
token i is byte i) and ends at EOS (byte 254) once its grammar is complete; one with stop strings
(params "stop") gets that tokenizer too, and is detokenized (its texts and stop reasons reported).
With params "n" > 1 every request's n outputs are reported (`samples`, `sample_finish_reasons`).
`score`: afterwards each prompt + its first output is run through the same engine as a prompt, with
prompt_logprobs = k: `scores`, the target's logprobs of each output token, and `score_top`, the top k
at each position ({token: logprob}), to check the output's own logprobs (`top_logprobs` reports
the output's top logprobs likewise). `abort`: the requests of the listed prompts are aborted once
they have at least m output tokens (and s engine steps ran), while the others run to the end
(their outputs, partial for the aborted ones). With "probe": true in the spec, each workload
also reports the proposer's q cache after it (`pending_q`: the request ids it keeps, held and
rows, and `stale`, those the runner no longer has), an aborting one also after each of its steps
(`probes`); run the engine in process for that (VLLM_ENABLE_V1_MULTIPROCESSING=0 in env: _probe). A `fitted` draft is
fitted to the baseline's outputs (tiny_models.fitted_map), so it needs the baseline.
Per workload: outputs (token ids per prompt) without and with DSpark, their finish reasons, the
chosen tokens' logprobs (and the prompt tokens') where the params ask for them, seconds, tokens/s,
and the engine's counters (spec decode: drafts, draft tokens = verified drafts, accepted tokens;
prefix-cache hits, preemptions); for the successor target also `expected`, the rule's greedy
continuation of each prompt."""

import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from dspark_cli.integrations.spec_runner import EngineUnavailable, run_module, serve_spec

SPEC_METRICS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
    "vllm:prefix_cache_hits": "prefix_cache_hits",
    "vllm:num_preemptions": "preemptions",
}


def _structured(workload: dict):
    from vllm.sampling_params import StructuredOutputsParams

    grammar = {k: workload[k] for k in ("regex", "choice") if k in workload}
    return StructuredOutputsParams(**grammar) if grammar else None


def _engine(target: Path, speculative_config: dict | None, max_num_seqs: int, tokenizer: bool, extra: dict):
    from vllm import LLM

    args = dict(model=str(target), skip_tokenizer_init=not tokenizer, dtype="float32", max_model_len=512,
                enforce_eager=True, seed=0, gpu_memory_utilization=0.1, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=4096, disable_log_stats=False, speculative_config=speculative_config)
    return LLM(**{**args, **extra})


def greedy_workload(name: str, prompts: list[list[int]], max_tokens: int) -> dict:
    return {"name": name, "prompts": prompts, "max_tokens": max_tokens, "temperature": 0.0}


def _params_max_tokens(workload: dict) -> list[int]:
    m = workload["max_tokens"]
    return m if isinstance(m, list) else [m] * len(workload["prompts"])


def _counters(llm) -> dict:
    out = {v: 0 for v in SPEC_METRICS.values()}
    for metric in llm.get_metrics():
        if metric.name in SPEC_METRICS:
            out[SPEC_METRICS[metric.name]] = int(getattr(metric, "value", 0))
    return out


def _seed(workload: dict, i: int) -> int | None:
    """Prompt i's seed: workload["seeds"][i] (None: unseeded) if given, else workload["seed"] + i."""
    if "seeds" in workload:
        return workload["seeds"][i]
    return None if workload.get("seed") is None else workload["seed"] + i


def _params(workload: dict) -> list:
    from vllm import SamplingParams

    warps = {k: workload[k] for k in ("top_k", "top_p") if k in workload}
    structured = _structured(workload)
    options = {"ignore_eos": structured is None, "detokenize": bool(workload.get("params", {}).get("stop")),
               **warps, **workload.get("params", {})}
    max_tokens = _params_max_tokens(workload)
    return [SamplingParams(**{"max_tokens": max_tokens[i], "temperature": workload.get("temperature", 0.0),
                              "structured_outputs": structured, "seed": _seed(workload, i), **options})
            for i in range(len(workload["prompts"]))]


def _generate(llm, workload: dict, probe: bool = False) -> dict:
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p) for p in workload["prompts"]]
    params = _params(workload)
    before = _counters(llm)
    start = time.perf_counter()
    aborted = set()
    if "abort" in workload:
        results, aborted, probes = _generate_aborting(llm, prompts, params, workload["abort"], probe)
    else:
        results = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = _counters(llm)
    outputs = [list(r.outputs[0].token_ids) for r in results]
    generated = sum(len(o) for o in outputs)
    run = {"outputs": outputs,
           "finish_reasons": ["abort" if i in aborted else r.outputs[0].finish_reason for i, r in enumerate(results)],
           "seconds": seconds, "tokens_per_s": generated / seconds, "spec": {k: after[k] - before[k] for k in after}}
    if params[0].n > 1:
        ordered = [sorted(r.outputs, key=lambda o: o.index) for r in results]
        run["samples"] = [[list(o.token_ids) for o in outs] for outs in ordered]
        run["sample_finish_reasons"] = [[o.finish_reason for o in outs] for outs in ordered]
    if params[0].detokenize:
        run["texts"] = [r.outputs[0].text for r in results]
        run["stop_reasons"] = [r.outputs[0].stop_reason for r in results]
    if params[0].logprobs is not None:
        run["logprobs"] = [_chosen(r.outputs[0].logprobs, r.outputs[0].token_ids) for r in results]
        run["top_logprobs"] = [_top(r.outputs[0].logprobs, params[0].logprobs) for r in results]
    if params[0].prompt_logprobs is not None:  # the first prompt token has none
        run["prompt_logprobs"] = [_chosen(r.prompt_logprobs[1:], r.prompt_token_ids[1:]) for r in results]
    if "abort" in workload and probe:
        run["probes"] = probes
    if workload.get("score"):
        run.update(_score(llm, workload["prompts"], outputs, workload["score"]))
    return run


def _generate_aborting(llm, prompts: list, params: list, abort: dict, probe: bool) -> tuple[list, set[int], list]:
    """Run the requests step by step, aborting those of the prompts abort["prompts"] as soon as they
    have abort["after_tokens"] output tokens (default 1; 0: in prefill too), after
    abort["after_steps"] steps if given. The last RequestOutput of each request (in prompt order;
    an aborted one's is its last before the abort, unfinished), the aborted prompts, and with
    `probe` the proposer's q cache after each step (_pending_q_state)."""
    engine = llm.llm_engine
    ids = [f"abort-{i}" for i in range(len(prompts))]
    for request_id, prompt, p in zip(ids, prompts, params):
        engine.add_request(request_id, prompt, p)
    victims = {ids[i] for i in abort["prompts"]}
    last, probes, steps = {}, [], 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if probe:
            probes.append(_probe(llm))
        for out in outputs:
            last[out.request_id] = out
        steps += 1
        due = [r for r in victims if steps >= abort.get("after_steps", 0)
               and len(last[r].outputs[0].token_ids if r in last else ()) >= abort.get("after_tokens", 1)]
        if due:
            engine.abort_request(due)
            victims -= set(due)
    if victims:
        raise RuntimeError(f"requests {sorted(victims)} finished before they could be aborted")
    return [last.get(r, _NO_OUTPUT) for r in ids], set(abort["prompts"]), probes


# what an aborted request that had no output yet (still in prefill) reports
_NO_OUTPUT = SimpleNamespace(outputs=[SimpleNamespace(token_ids=(), finish_reason=None)])


def _score(llm, prompts: list[list[int]], outputs: list[list[int]], k: int) -> dict:
    """The target's logprobs of each output token, read as prompt logprobs of prompt + output."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
    results = llm.generate([TokensPrompt(prompt_token_ids=p + o) for p, o in zip(prompts, outputs)], params,
                           use_tqdm=False)
    scores, tops = [], []
    for r, p, o in zip(results, prompts, outputs):
        entries = r.prompt_logprobs[len(p):]
        scores.append(_chosen(entries, o))
        tops.append(_top(entries, k))
    return {"scores": scores, "score_top": tops}


def _top(logprobs: list[dict], k: int | None = None) -> list[dict]:
    """Each position's top-ranked logprobs ({token: logprob}, ranks 1..k; all ranked ones when k is None)."""
    return [{str(t): float(e.logprob) for t, e in entry.items() if e.rank is not None and (k is None or e.rank <= k)}
            for entry in logprobs]


def _chosen(logprobs: list[dict], tokens: list[int]) -> list[float]:
    """The logprob vLLM reports for each token actually there."""
    return [float(entry[token].logprob) for entry, token in zip(logprobs, tokens)]


def _probe(llm, flush: bool = False) -> dict:
    """The proposer's q cache (_pending_q_state). Run the engine in process (env
    VLLM_ENABLE_V1_MULTIPROCESSING=0) to probe it between steps deterministically: `flush` then
    first runs the step that tells the runner of the requests finished in the last one (vLLM's
    engine process runs it on its own, at some time after the outputs came)."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # in process: the EngineCore
    if flush and core is not None:
        while core.scheduler.has_requests():
            llm.llm_engine.step()
    return llm.collective_rpc(_pending_q_state)[0]


def _pending_q_state(worker) -> dict:
    """What the proposer's pending drafts keep (run on the worker by collective_rpc): lazy blocks or
    stored q (`mode`), the request ids held from older steps and of the last step's rows, those of
    them the runner no longer has (`stale`), its counters."""
    runner = worker.model_runner
    pending = getattr(getattr(runner, "drafter", None), "pending_q", None)
    if pending is None:
        return {}
    held, rows = pending.kept()
    return {"mode": "lazy" if getattr(runner.drafter, "lazy_q", False) else "stored", "held": sorted(held),
            "rows": sorted(rows), "counts": dict(pending.counts),
            "stale": sorted((set(held) | set(rows)) - set(runner.requests))}


def _check_platform() -> None:
    """vLLM finds no device to run on here (its CUDA build without a GPU, say): no engine starts,
    with DSpark or without. Anything else that fails is the run's (our patched code runs in both)."""
    from vllm.platforms import current_platform

    if current_platform.is_unspecified():
        raise EngineUnavailable(f"vLLM finds no platform to run on here ({type(current_platform).__name__})")


def run(spec: dict) -> dict:
    from dspark_cli.tiny_models import build_draft, build_target, fitted_map, successor_tokens, write_byte_tokenizer

    work = Path(spec["workdir"])
    target = build_target(work / f"target-{spec['target']}", spec["target"])
    tokenizer = any(_structured(w) or w.get("params", {}).get("stop") for w in spec["workloads"])
    if tokenizer:
        write_byte_tokenizer(target)
    os.environ.update(spec.get("env", {}))
    max_seqs = max(len(w["prompts"]) * w.get("params", {}).get("n", 1) for w in spec["workloads"])
    extra = spec.get("engine", {})
    result = {"gamma": spec["gamma"], "workloads": {}}
    _check_platform()
    if spec.get("baseline", True):
        llm = _engine(target, None, max_seqs, tokenizer, extra)
        for w in spec["workloads"]:
            result["workloads"].setdefault(w["name"], {})["baseline"] = _generate(llm, w)
        del llm
    follows = None
    if spec["draft"] == "fitted":
        if not spec.get("baseline", True):
            raise ValueError("a fitted draft is fitted to the baseline's outputs: it needs \"baseline\": true")
        follows = fitted_map([p + o for w in spec["workloads"]
                              for p, o in zip(w["prompts"], result["workloads"][w["name"]]["baseline"]["outputs"])])
    draft = build_draft(work / f"draft-{spec['draft']}-{spec['gamma']}", spec["gamma"], spec["draft"], target,
                        follows=follows)
    config = {"method": "dspark", "model": str(draft), "num_speculative_tokens": spec["gamma"],
              "draft_sample_method": spec.get("draft_sample_method", "probabilistic"),
              "enable_adaptive_verification": bool(spec.get("adaptive", False)), **spec.get("speculative_config", {})}
    llm = _engine(target, config, max_seqs, tokenizer, extra)
    for w in spec["workloads"]:
        result["workloads"].setdefault(w["name"], {})["dspark"] = _generate(llm, w, bool(spec.get("probe")))
        if spec.get("probe"):
            result["workloads"][w["name"]]["pending_q"] = _probe(llm, flush=True)
        if spec["target"] == "successor":  # the rule's continuation, for callers without torch
            result["workloads"][w["name"]]["expected"] = [
                successor_tokens(p, m) for p, m in zip(w["prompts"], _params_max_tokens(w))]
    return result


def run_in_python(python: str, spec: dict, timeout_s: float = 900) -> dict:
    """Run `spec` with the vLLM venv's interpreter (this package first on its path)."""
    with tempfile.TemporaryDirectory(prefix="dspark-vllm-") as tmp, sockets_directory() as sockets:
        return run_module(python, "dspark_cli.integrations.vllm.e2e", {"workdir": str(Path(tmp) / "models"), **spec},
                          timeout_s, "vLLM run",
                          env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                               "VLLM_RPC_BASE_PATH": sockets})


SOCKET_PATH_MAX = 107  # bytes of a unix socket's path (sockaddr_un.sun_path less its NUL)


def sockets_directory() -> tempfile.TemporaryDirectory:
    """Where vLLM puts its engine sockets (VLLM_RPC_BASE_PATH), removed after the run: vLLM leaves
    them behind. Under the temporary directory, or /tmp where that is too long a path for a
    socket's (vLLM names each with a 36-character uuid)."""
    base = tempfile.gettempdir()
    if len(os.fsencode(base)) + len("/dvXXXXXXXX/") + 36 > SOCKET_PATH_MAX:
        base = "/tmp"
    return tempfile.TemporaryDirectory(prefix="dv", dir=base)


def step_stats(run: dict, num_prompts: int) -> dict:
    """Per request-step averages from one workload run. accepted_length is vLLM's mean acceptance
    length, 1 + accepted / drafts (a draft = one request-step with ≥ 1 draft token). Every decode
    step of a request emits accepted + 1 tokens and the prefill one, so request-steps ≈ generated −
    prompts − accepted, including steps with ℓ_r = 0; but vLLM counts a last step's accepted drafts
    before max_tokens cuts them from the output, so that comes short, never below the drafts (exact
    when every step drafts). Verified tokens per step counts the anchor plus the drafts the target
    actually computed."""
    generated = sum(len(o) for o in run["outputs"])
    spec = run["spec"]
    steps = max(generated - num_prompts - spec["accepted_tokens"], spec["drafts"], 1)
    return {"request_steps": steps,
            "accepted_length": 1 + spec["accepted_tokens"] / max(spec["drafts"], 1),
            "verified_per_step": (steps + spec["draft_tokens"]) / steps,
            "tokens_per_s": run["tokens_per_s"]}


if __name__ == "__main__":
    serve_spec(run)
