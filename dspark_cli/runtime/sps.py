"""SPS cost table: engine steps per second as a function of the tokens in one target forward
(DSPARK.md §5.1, §5.4), profiled once per model and GPU by `dspark profile`.

Our file (JSON):
  {"format": "dspark-sps/1", "tokens": [1, 2, 4, ...], "steps_per_s": [...],
   "capture_sizes": [...CUDA-graph capture sizes, may be empty...], ...metadata}
SGLang's file for --speculative-dspark-sps-table-path (its SpsCostTable, dspark_sps.py):
  {"sample_batch_tokens": [...], "sample_steps_per_sec": [...], "max_batch_tokens": N}
SGLang's lookup is a floor step function: the value of the largest probe ≤ B, the first below the
first probe, the last beyond the final one (max_batch_tokens is only checked ≥ the last probe).
`to_sglang` writes our curve in that form and `SPSTable.load` reads both, each SPS equal to the
other's at every B up to the table's max (dense_limit; SGLang's max_batch_tokens). Past it our
lookup extrapolates (below) where SGLang keeps the last value.

Lookup SPS(B): with CUDA graphs a forward of B tokens runs padded to the smallest capture size
≥ B, so B is first rounded up to it (this is what makes the real curve step-wise); then linear
interpolation between profiled points, the first value below the first point, and beyond the last
point a constant token rate (SPS = SPS_last · B_last / B), a conservative extrapolation."""

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dspark_cli.runtime import _checks
from dspark_cli.runtime._on_device import OnDevice

SPS_FORMAT = "dspark-sps/1"

# Documented default when no profile exists: step time = 10 ms + 20 µs per token, an
# order-of-magnitude stand-in for a dense 4-8B model on one H100/H200-class GPU. Profile instead.
# default() samples it at powers of two and interpolates: +4% over the model at B = 768.
DEFAULT_FIXED_S = 10e-3
DEFAULT_PER_TOKEN_S = 20e-6

# The dense lookup table holds one entry per batch size up to the table's largest size, built
# once on the host: a size of 10**9 tokens would stall the first scheduled step for minutes.
MAX_DENSE_TOKENS = 1 << 20


@dataclass
class SPSTable:
    tokens: list[int]
    steps_per_s: list[float]
    capture_sizes: list[int] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self._check_field_types()
        for name in ("tokens", "capture_sizes"):  # int() truncated a 2.5 to 2, silently
            bad = [v for v in getattr(self, name) if not _checks.whole_number(v)]
            if bad:
                raise ValueError(f"SPS table {name} must be whole numbers, got {bad[0]!r}")
        if not all(_checks.in_scale_range(s) for s in self.steps_per_s):
            raise ValueError(f"SPS table steps_per_s must be finite and positive, within {_checks.SCALE_MIN:g}.."
                             f"{_checks.SCALE_MAX:g}")
        self.tokens = [int(t) for t in self.tokens]
        self.steps_per_s = [float(s) for s in self.steps_per_s]
        self.capture_sizes = sorted(int(c) for c in self.capture_sizes)
        if self.metadata is None:  # no metadata, as STSCalibration's
            self.metadata = {}
        if not self.tokens or len(self.tokens) != len(self.steps_per_s):
            raise ValueError("an SPS table needs as many steps_per_s values as tokens entries, at least one")
        if self.tokens[0] < 1 or any(b <= a for a, b in zip(self.tokens, self.tokens[1:])):
            raise ValueError(f"SPS table tokens must be strictly increasing and ≥ 1, got {self.tokens}")
        if self.capture_sizes and self.capture_sizes[0] < 1:
            raise ValueError("CUDA-graph capture sizes must be ≥ 1")
        if self.dense_limit > MAX_DENSE_TOKENS:
            raise ValueError(f"SPS table sizes must be at most {MAX_DENSE_TOKENS} tokens, got {self.dense_limit}")
        self._dense_values = OnDevice(self._dense_host, (torch.float32, torch.float64))

    def _check_field_types(self) -> None:
        """Lists (or tuples) and a dict or None: SPSTable([1], None) was a TypeError, and a metadata
        of None was accepted, then save() a TypeError; metadata naming a table key overwrote it."""
        for name, kind in (("tokens", "whole numbers"), ("steps_per_s", "numbers"), ("capture_sizes", "whole numbers")):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ValueError(f"SPS table {name} must be a list of {kind}, got {getattr(self, name)!r}")
        _checks.file_metadata("SPS table", self.metadata, ("format", "tokens", "steps_per_s", "capture_sizes"))

    # ---- lookup -------------------------------------------------------------------------------
    def _padded(self, b: int) -> int:
        """The smallest capture size ≥ b, else b (a bisection: dense() asks it for every B)."""
        i = bisect.bisect_left(self.capture_sizes, b)
        return self.capture_sizes[i] if i < len(self.capture_sizes) else b

    def sps(self, tokens: int) -> float:
        """SPS at one batch size B, a whole number ≥ 0 (0 reads as 1, as in lookup) -> host float."""
        return self._sps(max(_checks.count("tokens", tokens, 0, "a batch size"), 1))

    def _sps(self, b: int) -> float:
        """sps() for a host int b ≥ 1, unchecked (dense() asks it for every B up to 2^20)."""
        b = self._padded(b)
        xs, ys = self.tokens, self.steps_per_s
        if b <= xs[0]:
            return ys[0]
        if b >= xs[-1]:  # at the last point its own value, not ys·xs/b rounded (one ulp off)
            return ys[-1] if b == xs[-1] else ys[-1] * xs[-1] / b
        i = bisect.bisect_left(xs, b)  # the first point ≥ b (≥ 1: xs[0] < b)
        if xs[i] == b:  # a profiled point: its value, not the t = 1 end y0 + (y1 − y0) (one ulp off)
            return ys[i]
        t = (b - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + t * (ys[i] - ys[i - 1])

    @property
    def dense_limit(self) -> int:
        return max(self.tokens[-1], self.capture_sizes[-1] if self.capture_sizes else 1)

    def _dense_host(self) -> list[float]:
        return [self._sps(max(b, 1)) for b in range(self.dense_limit + 1)]

    def dense(self, device, dtype=torch.float32) -> torch.Tensor:
        """SPS for B = 0..dense_limit as a tensor on `device` (index 0 unused), cached per device
        (`cuda` and the current `cuda:N` are one) and dtype; fp32 is what our CUDA scheduler and the
        production variant read, fp64 Algorithm 1's: a first call on a device makes both, so one
        call before CUDA-graph capture serves every scheduler."""
        return self._dense_values.get(device, dtype)

    def lookup(self, tokens: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Vectorized SPS(B) for an int64 or int32 tensor of batch sizes (any shape; values < 1 read
        as 1), on its device, no host sync: the values are not checked."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in _checks.INT_DTYPES:
            got = f"a {str(tokens.dtype).removeprefix('torch.')} tensor" if isinstance(tokens, torch.Tensor) \
                else type(tokens).__name__
            raise ValueError(f"tokens must be an int64 or int32 tensor of batch sizes (sps(B) takes one host number), "
                             f"got {got}")
        dense = self.dense(tokens.device, dtype)
        limit = self.dense_limit
        inside = dense[torch.clamp(tokens, 1, limit)]
        beyond = dense[limit] * limit / torch.clamp(tokens, min=1).to(dtype)
        return torch.where(tokens > limit, beyond, inside)

    # ---- files --------------------------------------------------------------------------------
    @classmethod
    def default(cls) -> "SPSTable":
        sizes = [2**i for i in range(14)]  # 1 .. 8192
        return cls(sizes, [1.0 / (DEFAULT_FIXED_S + DEFAULT_PER_TOKEN_S * b) for b in sizes],
                   metadata={"source": "default model: 10 ms + 20 us per token (not profiled)"})

    @classmethod
    def load(cls, path) -> "SPSTable":
        data = _checks.read_json(path, "SPS table")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: an SPS table is a JSON object")
        if data.get("format") == SPS_FORMAT:
            keys = ("tokens", "steps_per_s", "capture_sizes")
            meta = {k: v for k, v in data.items() if k not in ("format", *keys)}
        elif "sample_batch_tokens" in data and "sample_steps_per_sec" in data:
            keys = ("sample_batch_tokens", "sample_steps_per_sec", None)
            meta = {"source": "sglang", "max_batch_tokens": data.get("max_batch_tokens")}
        else:
            raise ValueError(f"{path} is neither a {SPS_FORMAT} table nor SGLang's SpsCostTable JSON")
        tokens, steps = _column(path, data, keys[0], whole=True), _column(path, data, keys[1], whole=False)
        captures = _column(path, data, keys[2], whole=True) if keys[2] else []
        try:
            table = cls(tokens, steps, captures, meta)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if keys[2] is None:
            # SGLang's floor step as ours: probe i's value holds up to probe i+1 − 1 (the last one
            # up to max_batch_tokens), so a point at each step's end, each a size B is rounded up to
            last = _max_batch_tokens(path, meta["max_batch_tokens"])
            ends = [b - 1 for b in table.tokens[1:]] + [max(last, table.tokens[-1])]
            table = cls(ends, table.steps_per_s, ends, meta)
        return table

    def to_dict(self) -> dict:
        return {"format": SPS_FORMAT, "tokens": self.tokens, "steps_per_s": self.steps_per_s,
                "capture_sizes": self.capture_sizes, **self.metadata}

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def to_sglang(self) -> dict:
        """SGLang's SpsCostTable fields: our SPS(B) for B = 1..dense_limit as SGLang's floor step
        function, a probe wherever the value changes (at 1 and after each capture size where graphs
        pad; every B where we interpolate between eager points)."""
        probes, values = [], []
        for b in range(1, self.dense_limit + 1):
            value = self._sps(b)
            if not values or value != values[-1]:
                probes.append(b)
                values.append(value)
        return {"sample_batch_tokens": probes, "sample_steps_per_sec": values,
                "max_batch_tokens": self.dense_limit}

    def save_sglang(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_sglang()) + "\n")


def _max_batch_tokens(path, value) -> int:
    """SGLang's max_batch_tokens: absent (0), or a whole number (32 or 32.0) of at most
    MAX_DENSE_TOKENS; "32", 32.5 or 10**12 are bad input, not ignored or a stalled scheduler."""
    if value is None:
        return 0
    if not _checks.whole_number(value) or not 0 <= value <= MAX_DENSE_TOKENS:
        raise ValueError(f"{path}: max_batch_tokens must be a whole number in [0, {MAX_DENSE_TOKENS}], got {value!r}")
    return int(value)


def _column(path, data: dict, key: str, whole: bool) -> list:
    """data[key] (absent: []) as a list of numbers, whole ones for token counts; anything else is
    one ValueError naming the file and the key, not a TypeError from int()/float()."""
    values = data.get(key, [])
    kind = "whole number" if whole else "number"
    if not isinstance(values, list):
        raise ValueError(f"{path}: '{key}' must be a list of {kind}s, got {json.dumps(values)}")
    for i, v in enumerate(values):
        if not (_checks.whole_number(v) if whole else _checks.finite_real(v)):
            raise ValueError(f"{path}: '{key}'[{i}] must be a {kind}, got {json.dumps(v)}")
    return values
