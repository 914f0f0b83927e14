"""`dspark profile`: measure the SPS cost table (steps/s vs tokens per forward) the DSpark
scheduler reads, by timing a real transformers forward of the target model (random weights)."""

import datetime
import os
import platform
from pathlib import Path
from typing import Optional

import typer

from dspark_cli.commands.params import flag_option, path_option, text_option
from dspark_cli.errors import PATH_SHAPE_ERRORS, EnvironmentProblem, UsageError, missing_module, short_message
from dspark_cli.files import check_dir_option, check_new_names, replace_atomically
from dspark_cli.model_config import config_path
from dspark_cli.output import emit, err_console, say, say_table

MAX_TOKENS = 1 << 20  # tokens in one forward: past any serving batch; a typo past it is refused, not swept


def register(app: typer.Typer) -> None:
    @app.command("profile")
    def profile(
        model: Path = path_option(..., "--model", help="Model directory with config.json, or a config.json file."),
        out: Path = path_option(..., "--out", help="Where to write our SPS table (dspark-sps/1 JSON)."),
        device: str = text_option("cpu", "--device", help="cpu, cuda or cuda:N."),
        max_tokens: int = typer.Option(512, "--max-tokens", min=1, max=MAX_TOKENS, metavar="N",
                                       help="Largest batch size B (tokens per forward)."),
        sizes: Optional[str] = text_option(None, "--sizes", help="Comma-separated batch sizes instead of the default sweep."),
        capture_sizes: str = text_option(
            "auto", "--capture-sizes",
            help="Comma-separated CUDA-graph capture sizes of the serving engine; 'auto' = vLLM's defaults "
                 "on cuda, none on cpu; 'none' = eager."),
        context: int = typer.Option(64, "--context", min=1, metavar="N", help="KV-cache context length per sequence."),
        repeats: int = typer.Option(5, "--repeats", min=1, metavar="N", help="Timed forwards per size (median kept)."),
        warmup: int = typer.Option(2, "--warmup", min=0, metavar="N", help="Untimed forwards per size."),
        dtype: str = text_option("auto", "--dtype", help="auto (bf16 on cuda, fp32 on cpu), bf16, fp16 or fp32."),
        sglang_out: Optional[Path] = path_option(
            None, "--sglang-out",
            help="Where to write SGLang's --speculative-dspark-sps-table-path JSON [default: OUT with .sglang.json]."),
        as_json: bool = flag_option("--json", help="Machine-readable output."),
    ) -> None:
        """Time the target forward across batch-token sizes and write the SPS table (ours + SGLang's)."""
        result = run_profile(model, out, device, max_tokens, sizes, capture_sizes, context, repeats,
                             warmup, dtype, sglang_out, show_progress=True)
        emit(result, as_json, _render)


def _parse_sizes(text: str, option: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UsageError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1 or values[-1] > MAX_TOKENS:
        raise UsageError(f"{option} needs integers from 1 to {MAX_TOKENS}, got {text!r}")
    return values


def run_profile(model, out, device, max_tokens, sizes, capture_sizes, context, repeats, warmup,
                dtype, sglang_out, show_progress=False) -> dict:
    _check_model_exists(model)  # bad input first: a wrong --model is exit 2 also where torch is missing
    try:
        import torch
        import transformers  # noqa: F401 -- sps_profile imports it only when it builds the model

        from dspark_cli.runtime import sps_profile
    except ImportError as exc:
        raise missing_module("dspark profile", exc, ("torch", "transformers")) from exc

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    device = str(parsed)  # canonical: "cpu", "cuda", "cuda:N" ("cpu:0" is the cpu)
    if parsed.type == "cpu":
        device = "cpu"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem(f"--device {device}: torch {torch.__version__} sees no CUDA GPU")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise EnvironmentProblem(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif dtype in dtypes:
        torch_dtype = dtypes[dtype]
    else:
        raise UsageError(f"--dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")

    batch_sizes = _parse_sizes(sizes, "--sizes") if sizes is not None else sps_profile.default_sizes(max_tokens)
    largest = max(max_tokens, batch_sizes[-1])  # --sizes past --max-tokens are timed: their graphs are kept
    if capture_sizes == "auto":
        graphs = sps_profile.vllm_capture_sizes(max_tokens) if device.startswith("cuda") else []
    elif capture_sizes == "none":
        graphs = []
    else:
        graphs = [b for b in _parse_sizes(capture_sizes, "--capture-sizes") if b <= largest]
    batch_sizes = sorted(set(batch_sizes) | set(graphs))  # graph sizes are where the step curve is read

    # both outputs are checked before any timing, and written together only after it
    _check_output(out, "--out")  # first: a directory has no name to derive the SGLang file's from
    sglang_path = sglang_out or out.with_name(out.stem + ".sglang.json")
    _check_output(sglang_path, "--sglang-out")
    if out.resolve() == sglang_path.resolve():
        raise UsageError(f"--out and --sglang-out are the same file: {out}")
    config_file = config_path(model).resolve()
    for option, path in (("--out", out), ("--sglang-out", sglang_path)):
        if path.resolve() == config_file:
            raise UsageError(f"{option} {path} is the model's config.json; give another file")

    try:
        config = sps_profile.load_config(model)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):  # load_config's "no config.json at ..."
            raise UsageError(f"--model {model}: {short_message(exc)}") from exc
        raise EnvironmentProblem(f"--model {model}: cannot read {config_file}: {exc.strerror or exc}") from exc
    except Exception as exc:  # noqa: BLE001 — the user's config, whatever transformers' validation raises
        raise UsageError(f"--model {model}: {short_message(exc)}") from exc
    _check_sizes(config, model, context)
    settings = sps_profile.ProfileSettings(device=device, dtype=torch_dtype, context=context,
                                           warmup=warmup, repeats=repeats)
    try:
        timer = sps_profile.ForwardTimer(config, settings)
    except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as exc:  # e.g. 0 attention heads
        raise UsageError(f"--model {model}: transformers cannot build this config: {short_message(exc)}") from exc
    except RuntimeError as exc:
        if _memory_or_device(exc):
            raise EnvironmentProblem(f"cannot build the model on {device}: {short_message(exc)}") from exc
        # the probe forward runs the config: a shape it cannot run (head_dim 3) fails there
        raise UsageError(f"--model {model}: transformers cannot run this config: {short_message(exc)}") from exc

    metadata = {
        "model": str(model), "model_type": config.model_type, "device": _device_name(torch, device),
        "dtype": str(torch_dtype).removeprefix("torch."), "context": context, "repeats": repeats,
        "shape": "B sequences x 1 new token over a KV cache of `context` tokens; median step time",
        "attention": timer.model.config._attn_implementation,
        "weights": "random (timing only)", "torch": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        table = _measure(sps_profile, timer, batch_sizes, graphs, metadata, show_progress)
    except RuntimeError as exc:
        raise EnvironmentProblem(f"the forward failed on {device}: {exc}") from exc

    _write_both(((out, table.save), (sglang_path, table.save_sglang)))
    return {"out": str(out), "sglang_out": str(sglang_path), "device": metadata["device"],
            "points": [{"tokens": b, "steps_per_s": s} for b, s in zip(table.tokens, table.steps_per_s)],
            "capture_sizes": table.capture_sizes}


# Sizes that become tensor dimensions: transformers does not validate them, and torch's error for a
# negative one (a RuntimeError, read as an environment problem) comes only once the model is built.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim")


def _check_sizes(config, model: Path, context: int) -> None:
    """Bad input (exit 2), found before building: a size of the config that is zero or negative,
    query heads that are no multiple of the key/value heads (torch's error, a RuntimeError, came at
    the first forward), and a --context past the model's positions (a learned position table, as
    GPT-2's, was an IndexError traceback)."""
    text = config.get_text_config()  # a multimodal config keeps its sizes in text_config
    for name in SIZE_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise UsageError(f"--model {model}: {name} is {value} in config.json; it must be a positive integer")
    heads, kv_heads = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise UsageError(f"--model {model}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                         f"{kv_heads} in config.json")
    positions = getattr(text, "max_position_embeddings", None)  # GPT-2's n_positions answers to it too
    if isinstance(positions, int) and not isinstance(positions, bool) and positions < 2:
        raise UsageError(f"--model {model}: max_position_embeddings is {positions} in config.json; a profile "
                         "needs at least 2 (one context token, then the timed one)")
    if isinstance(positions, int) and context + 1 > positions:
        raise UsageError(f"--context {context}: the model has {positions} positions (max_position_embeddings); "
                         f"the timed token sits at position {context}: give --context {positions - 1} or less")


def _memory_or_device(exc: RuntimeError) -> bool:
    """Whether building or running the model failed for want of memory or for the device, not for
    its config: torch's out-of-memory and accelerator errors, or an allocator's or CUDA's words."""
    import torch

    kinds = tuple(kind for kind in (getattr(torch, "OutOfMemoryError", None), getattr(torch, "AcceleratorError", None))
                  if kind is not None)
    text = str(exc).lower()
    return isinstance(exc, kinds) or any(word in text for word in ("out of memory", "allocate", "cuda", "device"))


def _check_model_exists(model: Path) -> None:
    """Refuse a --model with no config.json (the file or in the directory) before torch is needed."""
    try:
        found = config_path(model).is_file()
    except OSError as exc:
        if exc.errno in PATH_SHAPE_ERRORS:  # a name the OS refuses (ENAMETOOLONG)
            raise UsageError(f"--model {model}: {exc.strerror or exc}") from None
        raise EnvironmentProblem(f"--model {model}: cannot read it ({exc.strerror or exc})") from None
    if not found:
        raise UsageError(f"--model {model}: no config.json at {model}")


def _check_output(path: Path, option: str) -> None:
    """Refuse, before any timing, an output path we could not write: a directory, a device, pipe or
    socket, a path under a file or a name too long is bad input (exit 2); a read-only file or
    directory is an environment problem (exit 3)."""
    check_new_names(path, option)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file path")
    if path.exists() and not path.is_file():  # written by renaming over it: a device would be replaced
        raise UsageError(f"{option} {path} is not a regular file (a device, pipe or socket); give a file path")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise EnvironmentProblem(f"{option} {path}: the file is not writable")
    check_dir_option(path.parent, option)


def _write_both(outputs) -> None:
    """Both tables or neither: a failed write leaves the old pair as it was."""
    try:
        replace_atomically(outputs)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot write {exc.filename or 'the SPS tables'}: {exc.strerror or exc}") from exc


def _measure(sps_profile, timer, batch_sizes, graphs, metadata, show_progress):
    if not show_progress:
        return sps_profile.profile_table(timer, batch_sizes, graphs, metadata)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]profiling[/bold] B={task.fields[batch]:>5}"), BarColumn(),
               MofNCompleteColumn(), TextColumn("{task.fields[last]}"), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=False) as progress:
        task = progress.add_task("sps", total=len(batch_sizes), batch=batch_sizes[0], last="")

        def advance(batch, seconds):
            nxt = batch_sizes[min(batch_sizes.index(batch) + 1, len(batch_sizes) - 1)]
            progress.update(task, advance=1, batch=nxt, last=f"B={batch}: {1 / seconds:,.1f} steps/s")

        return sps_profile.profile_table(timer, batch_sizes, graphs, metadata, on_size=advance)


def _device_name(torch, device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _render(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"SPS on {result['device']}")
    table.add_column("tokens B", justify="right")
    table.add_column("steps/s", justify="right")
    table.add_column("tokens/s", justify="right")
    for p in result["points"]:
        table.add_row(str(p["tokens"]), f"{p['steps_per_s']:,.1f}", f"{p['tokens'] * p['steps_per_s']:,.0f}")
    say_table(table)
    say(f"wrote {result['out']} and {result['sglang_out']} (--speculative-dspark-sps-table-path)", markup=False)
