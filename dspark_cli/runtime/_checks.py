"""Input validation shared by the runtime: one clear ValueError per problem, raised before any
work. Shape/dtype checks never touch device memory; value checks (NaN, range) need a
device->host sync, so callers run them only when asked (default: on CPU tensors)."""

import json
import math
import numbers
from pathlib import Path

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int64, torch.int32)


def tensor(name: str, t, ndim: int, dtypes=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype {names}, got {str(t.dtype).removeprefix('torch.')}")
    return t


def dim(name: str, t: torch.Tensor, axis: int, expected: int, what: str) -> None:
    if t.shape[axis] != expected:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}: dimension {axis} must be {expected} ({what})"
        )


def integer(value) -> bool:
    """A host integer (Python's or numpy's), not a bool: True would count as 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def real_number(value) -> bool:
    """A host int or float, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def finite_real(value) -> bool:
    """A host int or float that is a finite float: a JSON integer of 400 digits is not (float()
    of it raises OverflowError), nor JSON's Infinity/NaN."""
    try:
        return real_number(value) and math.isfinite(value)
    except OverflowError:
        return False


# Rates and scales read from files (steps/s, STS temperatures) live within these: the runtime keeps
# them in fp32 and multiplies them by up to ~2^21 tokens (Θ) or divides by them (z / T). 1e39 was
# inf in fp32 and 1e-300 zero, each accepted from a file and then a wrong schedule or NaN.
SCALE_MIN, SCALE_MAX = 1e-30, 1e30


def in_scale_range(value) -> bool:
    """A host number within SCALE_MIN..SCALE_MAX (so finite and positive)."""
    return finite_real(value) and SCALE_MIN <= value <= SCALE_MAX


def whole_number(value) -> bool:
    """An integer, or a float without a fraction (JSON's 32.0); not a bool."""
    return integer(value) or (real_number(value) and float(value).is_integer())


def count(name: str, value, minimum: int, what: str) -> int:
    """value as an int when it is a whole number ≥ minimum: the one meaning of a count in the
    runtime (2.0 is 2, as in an SPS file; 2.5, "2" and True are refused)."""
    if not whole_number(value) or value < minimum:
        raise ValueError(f"{name} must be a whole number ≥ {minimum} ({what}), got {value!r}")
    return int(value)


def generator(g) -> None:
    """None or a torch.Generator: anything else was a TypeError from inside torch's sampling."""
    if g is not None and not isinstance(g, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(g).__name__}")


def request_vector(name: str, t, R: int, dtypes) -> None:
    tensor(name, t, 1, dtypes)
    dim(name, t, 0, R, "one entry per request")


def nonempty_batch(name: str, t: torch.Tensor) -> None:
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (0 requests)")


def nonempty_vocabulary(name: str, t: torch.Tensor) -> None:
    """Rows [N, V] need an entry (V ≥ 1): their max, argmax and softmax have none to take."""
    if t.shape[-1] == 0:
        raise ValueError(f"{name} has shape {tuple(t.shape)}: an empty vocabulary (V = 0)")


def same_device(**tensors) -> None:
    devices = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device: {listing}")


def want_value_checks(validate: bool | None, t: torch.Tensor) -> bool:
    return (t.device.type == "cpu") if validate is None else validate


def _value_range(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of t in one pass over it, one host sync. torch.aminmax is documented to propagate
    NaN (both are then NaN), so a comparison on them fails for NaN too. (0, 0) for an empty t."""
    if t.numel() == 0:
        return 0.0, 0.0  # aminmax raises on an empty tensor; nothing to check
    lo, hi = torch.aminmax(t)
    return tuple(torch.stack((lo, hi)).tolist())


def _first(bad: torch.Tensor) -> tuple[int, ...]:
    """The index of the first entry where the mask bad holds (the slow path, after a check failed)."""
    return tuple(int(i) for i in bad.nonzero()[0])


def _at(index: tuple[int, ...], locate: bool) -> str:
    return f" at index {list(index)}" if locate else ""


def _not_finite(name: str, t: torch.Tensor, locate: bool = True) -> None:
    """The failure path of the one-pass checks: NaN, +inf and -inf come first, as their own error."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        index = _first(bad)
        raise ValueError(f"{name} contains NaN or infinite values ({float(t[index]):.6g}{_at(index, locate)})")


def finite(name: str, t: torch.Tensor) -> None:
    lo, hi = _value_range(t)
    if not (-torch.inf < lo and hi < torch.inf):  # NaN fails both
        _not_finite(name, t)


def logits(name: str, t: torch.Tensor) -> None:
    """-inf masks an entry (an engine's padded or banned vocabulary); NaN, +inf or a row with no
    finite entry softmaxes to a NaN row, which then draws an arbitrary token."""
    row_max = t.amax(dim=-1)  # one pass over the logits (engines check every draft step): amax keeps NaN
    if bool((torch.isnan(row_max) | (row_max == torch.inf)).any()):
        raise ValueError(f"{name} contains NaN or +inf values (-inf masks an entry)")
    if bool((row_max == -torch.inf).any()):
        raise ValueError(f"{name} has a row with no finite entry (all -inf)")


def nonnegative(name: str, t: torch.Tensor, locate: bool = True) -> None:
    """Finite and ≥ 0 (-0.0 is fine), in one aminmax pass (engines check q, R×γ×V, every verify
    step; isfinite/all/<0/any were four passes and two full-size bool tensors). An error names
    the first bad entry's index in t unless locate=False (t gathered from the caller's tensor)."""
    lo, hi = _value_range(t)
    if not (lo >= 0 and hi < torch.inf):  # NaN fails both; -inf fails the first, +inf the second
        _not_finite(name, t, locate)
        raise ValueError(f"{name} must be ≥ 0, got a minimum of {lo:.6g}{_at(_first(t == lo), locate)}")


def in_unit_interval(name: str, t: torch.Tensor) -> None:
    lo, hi = _value_range(t)
    if not (lo >= 0 and hi <= 1):  # NaN fails both, ±inf one of them
        _not_finite(name, t)
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.6g}, {hi:.6g}]")


def token_ids(name: str, t: torch.Tensor, vocab: int) -> None:
    """Every id in [0, vocab): a negative id would wrap around in a gather (w1[-1]), a large one
    is an IndexError or a device-side assert."""
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise ValueError(f"{name} must be token ids in [0, V={vocab}), got values in "
                         f"[{int(t.min())}, {int(t.max())}]")


def read_json(path, what: str):
    """The parsed JSON file at path; an unreadable or malformed file is one ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    # ValueError: malformed JSON, and an integer of over 4300 digits (Python's conversion limit)
    except (OSError, ValueError, RecursionError) as exc:  # (nesting too deep)
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc


def file_metadata(what: str, metadata, own_keys) -> None:
    """Metadata saved beside a file's own keys: a dict (or None) naming none of them, which it
    would overwrite in the saved file (then no longer loadable)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise ValueError(f"{what} metadata must be a dict or None, got {type(metadata).__name__}")
    for key in own_keys:
        if key in metadata:
            raise ValueError(f"{what} metadata may not use the key '{key}' (the file's own)")
