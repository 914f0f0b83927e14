"""Dispatch to our CUDA extension (csrc/, built by `dspark build`).

The extension is found through $DSPARK_OPS_LIB, the last successful build recorded in
$DSPARK_CACHE/build/last.json, or an installed dspark_ops wheel (`dspark build --wheel`), and loaded
once. $DSPARK_DISABLE_CUDA_OPS=1 (or `with enabled(False):` for a block) keeps every op unavailable, so callers run the torch reference (benchmarks compare the two).
Each op returns NotImplemented for cases it does not cover; the torch reference then runs."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch

from dspark_cli.runtime._checks import FLOAT_DTYPES

_state = {"tried": False, "loaded": None, "error": None, "note": None,
          "enabled": os.environ.get("DSPARK_DISABLE_CUDA_OPS") != "1"}


# Requests per call our chain and rejection kernels take: some put the request on the grid's y axis,
# whose limit this is (a launch beyond it fails); the torch reference serves larger batches.
MAX_REQUESTS = 65535


def library_path() -> Path | None:
    explicit = os.environ.get("DSPARK_OPS_LIB")
    if explicit:
        return Path(explicit)
    from dspark_cli.build import LAST, cache_root, last_build  # the record `dspark build` leaves

    _state["note"] = None
    last = last_build()  # None also for a record that is not a JSON object
    if last is None and (cache_root() / LAST).is_file():
        _state["note"] = f"{cache_root() / LAST} is not a build record"
    elif last is not None and last.get("status") in ("built", "cached"):
        built_for = last.get("torch")  # absent from records written before it was kept: not checked
        if built_for and built_for != torch.__version__:  # torch's C++ ABI: loading could crash later
            _state["note"] = (f"{cache_root() / LAST} is a build for torch {built_for}, this is torch "
                              f"{torch.__version__}: run dspark build with this torch")
        elif isinstance(last.get("path"), str) and last["path"]:
            return Path(last["path"])
        else:
            _state["note"] = f"{cache_root() / LAST} has no library path"
    wheel = importlib.util.find_spec("dspark_ops")  # installed from `dspark build --wheel`
    return Path(wheel.origin).with_name("dspark_ops.so") if wheel and wheel.origin else None


def load(path: str | Path | None = None) -> str | None:
    """Load the extension (once); returns the loaded path or None. load_error() says why not."""
    if _state["loaded"] or (_state["tried"] and path is None):
        return _state["loaded"]
    _state["tried"] = True
    lib = Path(path) if path else library_path()
    if lib is None or not lib.is_file():
        note = f"; {_state['note']}" if _state["note"] and lib is None else ""
        _state["error"] = f"no built extension ({lib or 'run dspark build'}){note}"
        return None
    from dspark_cli.build import library_problem

    problem = library_problem(lib, check_sha256=False)
    if problem:  # a truncated .so can crash the process (SIGBUS) inside dlopen
        _state["error"] = f"{lib}: {problem} (run dspark build)"
        return None
    try:
        torch.ops.load_library(str(lib))
    except OSError as exc:
        _state["error"] = f"{lib}: {exc}"
        return None
    _state["loaded"] = str(lib)
    return _state["loaded"]


def load_error() -> str | None:
    return _state["error"]


@contextlib.contextmanager
def enabled(flag: bool):
    """Our ops (flag True) or the torch reference (False) inside the block; the setting before it
    comes back after, so a reference run inside DSPARK_DISABLE_CUDA_OPS=1 does not switch ops on."""
    previous = _state["enabled"]
    _state["enabled"] = flag
    try:
        yield
    finally:
        _state["enabled"] = previous


def available(*tensors) -> bool:
    if not _state["enabled"] or not all(t.is_cuda for t in tensors):
        return False
    return load() is not None


def markov_chain(U, anchors, w1, w2, temperature, *, top_k=None, top_p=None, top_k_max=None, seeds=None,
                 generator=None, return_q=True, confidence=None):
    """Covers: seeded (counter-based) noise, greedy and sampled rows mixed, top-k/top-p per request,
    w1 and w2 of one dtype (bf16, fp16 or fp32), U of any of those dtypes; the confidence head
    with h of those dtypes and a CUDA tensor bias (an fp32 weight saves a cast per call). With
    top_k or top_p and q lazy the draft's source carries the chain's thresholds [R, γ]: rejection
    rebuilds the warped rows with them. top_k_max (the caller's host-side bound on the sampled
    rows' top-k) at most 64 spares warp.cu's rounds where top_k.cu's lists take the rows."""
    from dspark_cli.runtime.markov import DraftSource, MarkovDraft

    if seeds is None or w1.dtype != w2.dtype or U.shape[0] > MAX_REQUESTS:
        return NotImplemented
    if U.shape[2] >= 2**31 or not all(t.dtype in (torch.bfloat16, torch.float16, torch.float32) for t in (U, w1)):
        return NotImplemented
    conf = (None, None, None)
    if confidence is not None:
        h, weight, bias = confidence
        if h.dtype not in (torch.bfloat16, torch.float16, torch.float32) or not (
                (bias is None or isinstance(bias, torch.Tensor) and bias.device == U.device)
                and weight.device == U.device and h.device == U.device):
            return NotImplemented
        conf = (h.contiguous(), weight.reshape(-1).float().contiguous(),
                None if bias is None else bias.reshape(-1).float())
    warps = (None if top_k is None else top_k.to(torch.int64).contiguous(),
             None if top_p is None else top_p.to(torch.float32).contiguous())
    warped = top_k is not None or top_p is not None
    # The op's top_k_max is an int64 (a bound of 2**63 or more failed its call); every bound past 64
    # tells it the same (none), so the clamp leaves the draft as it is.
    top_k_bound = min(top_k_max or 0, 2**63 - 1)
    temperature = temperature.to(torch.float32).contiguous()
    tokens, q_token, q, prev_emb, row_stats, block_counter, z, thresholds = torch.ops.dspark.markov_chain(
        U.contiguous(), anchors.contiguous(), w1.contiguous(), w2.contiguous(), temperature,
        seeds.contiguous(), return_q, *conf, *warps, top_k_bound)
    source = None if return_q else DraftSource(U, anchors, w1, w2, temperature, *warps, row_stats, block_counter,
                                                  thresholds if warped else None)
    return MarkovDraft(tokens, q_token, q if return_q else None, prev_emb, source,
                       None if confidence is None else z)


MAX_SCHEDULE_CANDIDATES = 2048  # R·γ of either survival matrix: one block sorts them in shared memory


def schedule_production(a_stale, a_now, sps):
    """Covers R·γ <= 2048 for both survival matrices (R = 256 at γ = 7 fits)."""
    if a_stale.numel() > MAX_SCHEDULE_CANDIDATES or a_now.numel() > MAX_SCHEDULE_CANDIDATES:
        return NotImplemented
    return torch.ops.dspark.schedule_production(a_stale.float().contiguous(), a_now.float().contiguous(),
                                                sps.dense(a_now.device), sps.dense_limit)


def rejection_sample(target, row_start, ell, draft, *, greedy=None, seeds=None, generator=None, uniforms=None,
                     exp_noise=None, row_stride=0, target_argmax=None):
    """Covers seeded (counter-based) randomness, greedy and sampled requests mixed, q stored or
    rebuilt from draft.source (W1 and W2 of one dtype), with the chain's row stats when the CUDA
    chain drafted it; top-k/top-p rows rebuilt only with the CUDA chain's thresholds. row_start
    None: request r's rows start at r·row_stride. target_argmax [N]: the greedy requests' token per
    target row (their rows are then not read). target: ProbRows or LogitRows (target_probs.py)."""
    from dspark_cli.runtime.rejection import VerifyResult
    from dspark_cli.runtime.target_probs import LogitRows

    if seeds is None or uniforms is not None or exp_noise is not None or draft.tokens.shape[0] > MAX_REQUESTS:
        return NotImplemented
    row_stats = block_counter = thresholds = None
    if draft.q is not None:
        q, rebuild = draft.q.float().contiguous(), (None,) * 5
    else:
        s = draft.source
        warped_by_torch = (s is not None and s.thresholds is None
                           and (s.top_k is not None or s.top_p is not None))
        if (s is None or warped_by_torch or s.w1.dtype != s.w2.dtype
                or s.U.dtype not in FLOAT_DTYPES or s.w1.dtype not in FLOAT_DTYPES):  # the op has no fp64 kernels
            return NotImplemented
        q, rebuild = None, (s.U.contiguous(), s.anchors.to(torch.int64).contiguous(), s.w1.contiguous(),
                            s.w2.contiguous(), s.temperature.to(torch.float32).contiguous())
        row_stats, block_counter, thresholds = s.row_stats, s.block_counter, s.thresholds
    if isinstance(target, LogitRows):  # the op clamps rows past the logits to the last: the spare rows
        target, target_stats = target.logits, target.stats.contiguous()
        if target_stats.data_ptr() % 8:  # the op reads each row's pair as one float2
            target_stats = target_stats.clone()
        if target_argmax is not None:
            target_argmax = target_argmax[:target.shape[0]]
    else:
        target, target_stats = target.probs, None
    output_tokens, num_accepted = torch.ops.dspark.rejection_sample(
        target.contiguous(), None if row_start is None else row_start.to(torch.int64).contiguous(),
        ell.to(torch.int64).contiguous(), draft.tokens.to(torch.int64).contiguous(),
        draft.q_token.to(torch.float32).contiguous(), q, *rebuild, None if greedy is None else greedy.contiguous(),
        seeds.contiguous(), row_stats, row_stride, block_counter, thresholds,
        None if target_argmax is None else target_argmax.to(torch.int64).contiguous(), target_stats)
    return VerifyResult(output_tokens, num_accepted)


SOFTMAX_STATS_MAX_V = 2**31 - 1 - 8192  # csrc/softmax_stats.cu kMaxV: its int indices stay below 2^31


def softmax_stats(logits, stats, best):
    """Covers contiguous logits and best, N rows within MAX_REQUESTS (one per grid row), V within
    SOFTMAX_STATS_MAX_V."""
    if (logits.shape[0] > MAX_REQUESTS or logits.shape[1] > SOFTMAX_STATS_MAX_V
            or not all(t is None or t.is_contiguous() for t in (logits, best))):
        return NotImplemented
    torch.ops.dspark.softmax_stats(logits, stats, best)


def draft_attention_fits(weight: torch.Tensor, head_dim: int, query_rows: int) -> bool:
    """Whether draft_attention covers a drafter with weights like `weight`: bf16 or fp16 on a GPU of
    compute capability 8.0 or more (bf16 tensor cores), and a shape the op takes (head_dim 64 or 128,
    (H / kv)·γ query rows per KV head within 128 once padded to 16) whose CTA's shared memory, as the
    library itself counts it (`dspark::draft_attention_smem`), is within the GPU's per-block limit
    (sm_86/89's 99 KB does not hold 32 rows at head_dim 128). False without a loadable extension;
    whether it is enabled is available()'s question."""
    if not (weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)) or load() is None:
        return False
    smem = torch.ops.dspark.draft_attention_smem(query_rows, head_dim)
    props = torch.cuda.get_device_properties(weight.device)
    limit = getattr(props, "shared_memory_per_block_optin", None)  # a torch without it: Hopper holds every size
    return smem > 0 and props.major >= 8 and (smem <= limit if limit is not None else props.major >= 9)


def draft_attention(q, k_block, v_block, k_pool, v_pool, pages, page_rows: int, lengths, max_length: int, out=None):
    """The drafter's block attention onto its paged context (csrc/draft_attention.cu): q [R, γ, H, hd]
    and the block's k/v [R, γ, kv, hd] onto request r's lengths[r] committed rows of the pool's k/v
    [rows, kv, hd] (row i at pool row pages[r, i // page_rows] · page_rows + i % page_rows) followed
    by the block's own keys, non-causal, scale 1/√hd. pages int32 [R, columns] and lengths int32 [R]
    on the GPU; max_length (host) the longest context, which sizes the key splits. Writes `out`
    (allocated when None) and returns it. For what draft_attention_fits."""
    out = torch.empty_like(q) if out is None else out
    torch.ops.dspark.draft_attention(q.contiguous(), k_block.contiguous(), v_block.contiguous(), k_pool, v_pool,
                                     pages, int(page_rows), lengths, int(max_length), out)
    return out
