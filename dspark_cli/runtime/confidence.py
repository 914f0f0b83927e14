"""Confidence head (DSPARK.md §1.4): c_k = σ(z_k / T_k), z_k = w·[h_k ; W1[x_{k-1}]] + b, the
conditional probability that draft k survives given 1..k-1 survived; survival a_k = Π_{i≤k} c_i.
T_k is the per-position Sequential Temperature Scaling (STS) calibration (1.0 when absent)."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dspark_cli.runtime import _checks, _fp32
from dspark_cli.runtime._on_device import OnDevice

STS_FORMAT = "dspark-sts/1"


def check_confidence_inputs(h, weight, bias, R: int, gamma: int, rank: int) -> None:
    """The head's inputs for R requests of γ drafts, Markov rank r: h [R, γ, d], weight with d + r
    entries, one bias value or None (a head without bias: nn.Linear(bias=False).bias)."""
    _checks.tensor("h", h, 3, _checks.FLOAT_DTYPES)
    _checks.nonempty_batch("h", h)
    _checks.same_device(h=h, weight=weight, bias=bias)
    if tuple(h.shape[:2]) != (R, gamma):
        raise ValueError(f"h has shape {tuple(h.shape)}: its [R, γ] must be {(R, gamma)}")
    d = h.shape[2]
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    # [1, d + r] (nn.Linear(d + r, 1).weight) or flat; any other shape of d + r entries, a [2, 7] say,
    # is some other layer's weight and was read flat, silently
    if tuple(weight.shape) not in ((d + rank,), (1, d + rank)):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected d + r = {d} + {rank} = {d + rank} "
                         f"entries, as [d + r] or [1, d + r]")
    if bias is not None and not isinstance(bias, torch.Tensor):  # a host number (or a list of one)
        try:
            host = torch.as_tensor(bias)
        except (TypeError, ValueError, RuntimeError):  # "0.5" or an object was torch's TypeError
            host = None
        if host is None or host.dtype == torch.bool or host.is_complex():
            raise ValueError(f"bias must be a number, a list of one or a tensor of one value, got {bias!r}")
    values = 1 if bias is None else torch.as_tensor(bias).numel()
    if values != 1:
        raise ValueError(f"bias must hold one value, got {values}")


def confidence_logits(h, prev_emb, weight, bias) -> torch.Tensor:
    """h [R, γ, d], prev_emb [R, γ, r], weight [1, d+r] or [d+r], bias [1], scalar or None -> z [R, γ] fp32."""
    _checks.tensor("prev_emb", prev_emb, 3, _checks.FLOAT_DTYPES)
    _checks.tensor("h", h, 3, _checks.FLOAT_DTYPES)
    if prev_emb.shape[:2] != h.shape[:2]:
        raise ValueError(f"prev_emb has shape {tuple(prev_emb.shape)}: its [R, γ] must match h {tuple(h.shape[:2])}")
    check_confidence_inputs(h, weight, bias, *prev_emb.shape)
    _checks.same_device(h=h, prev_emb=prev_emb)
    d = h.shape[2]
    w = weight.reshape(-1).float()
    z = _fp32.matmul(h.float(), w[:d]) + _fp32.matmul(prev_emb.float(), w[d:])
    if bias is None:
        return z
    if isinstance(bias, torch.Tensor):
        return z + bias.reshape(-1).float()
    return z + float(torch.as_tensor(bias).reshape(-1)[0])  # a host number stays one: no copy to the GPU


def confidence_probs(z: torch.Tensor, sts: "STSCalibration | None" = None, *, validate=None) -> torch.Tensor:
    """σ(z_k / T_k) -> c [R, γ] fp32. validate: the value check (z finite), by default on CPU
    tensors only (on CUDA it would be a host sync per draft step)."""
    _checks.tensor("z", z, 2, _checks.FLOAT_DTYPES)
    _checks.nonempty_batch("z", z)
    if _checks.want_value_checks(validate, z):
        _checks.finite("z", z)  # NaN would be a NaN confidence, read as 0 by every comparison
    if sts is None:
        return torch.sigmoid(z.float())
    if not isinstance(sts, STSCalibration):  # a list of temperatures was an AttributeError
        raise ValueError(f"sts must be an STSCalibration (STSCalibration.load(path) or STSCalibration(temperatures)) "
                         f"or None, got {type(sts).__name__}")
    temps = sts.tensor(z.device)  # made once per device: no copy (a host sync) per draft step
    _checks.dim("z", z, 1, temps.numel(), "block size γ of the STS calibration")
    return torch.sigmoid(z.float() / temps)


def survival(c: torch.Tensor, *, validate=None) -> torch.Tensor:
    """Prefix survival a_{r,j} = Π_{i≤j} c_{r,i} -> [R, γ], non-increasing along γ. validate: the
    value check (c in [0, 1]), by default on CPU tensors only, as confidence_probs'."""
    _checks.tensor("c", c, 2, _checks.FLOAT_DTYPES)
    _checks.nonempty_batch("c", c)
    if _checks.want_value_checks(validate, c):
        _checks.in_unit_interval("c", c)  # c > 1 made a survival that grows along γ
    return torch.cumprod(c.float(), dim=1)


@dataclass
class STSCalibration:
    """Per-position temperatures T_1..T_γ on the confidence logits.

    File (JSON): {"format": "dspark-sts/1", "temperatures": [T_1, ..., T_γ], ...metadata}."""

    temperatures: list[float]
    metadata: dict | None = None
    _on_device: OnDevice = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        temps = self.temperatures
        if not isinstance(temps, (list, tuple)) or not temps or not all(map(_checks.in_scale_range, temps)):
            raise ValueError(f"STS 'temperatures' must be a non-empty list of finite positive numbers within "
                             f"{_checks.SCALE_MIN:g}..{_checks.SCALE_MAX:g}, got {temps!r}")
        self.temperatures = [float(t) for t in temps]
        _checks.file_metadata("STS calibration", self.metadata, ("format", "temperatures"))
        self._on_device = OnDevice(self.temperatures.copy, (torch.float32,))

    def tensor(self, device) -> torch.Tensor:
        """T_1..T_γ as fp32 on `device`, made on first use there (call once before CUDA-graph capture)."""
        return self._on_device.get(device, torch.float32)

    def for_block(self, gamma: int) -> "STSCalibration | None":
        """This calibration for blocks of γ drafts: STS is fitted position by position (T_k with
        T_1..T_k-1 fixed), so one of a longer block serves with its first γ temperatures; None when
        it has fewer than γ (the engine refuses it at start, naming where it came from)."""
        if len(self.temperatures) < gamma:
            return None
        return STSCalibration(self.temperatures[:gamma], self.metadata)

    @classmethod
    def load(cls, path) -> "STSCalibration":
        data = _checks.read_json(path, "STS calibration")
        if not isinstance(data, dict) or data.get("format") != STS_FORMAT or "temperatures" not in data:
            raise ValueError(f"{path} is not a {STS_FORMAT} file (need 'format' and 'temperatures')")
        meta = {k: v for k, v in data.items() if k not in ("format", "temperatures")}
        try:
            return cls(data["temperatures"], meta or None)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def save(self, path) -> None:
        doc = {"format": STS_FORMAT, "temperatures": self.temperatures, **(self.metadata or {})}
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")

    @classmethod
    def fit(cls, z: torch.Tensor, num_accepted: torch.Tensor, grid=None, bins: int = 20) -> "STSCalibration":
        """Fit T_k in order k = 1..γ by grid search minimizing the ECE of the cumulative product
        Π_{i≤k} σ(z_i/T_i) against the realized survival 1[num_accepted ≥ k], with earlier T fixed
        (paper §3.2.1). z [N, γ] from rounds verified at full length; num_accepted [N]."""
        _checks.tensor("z", z, 2, _checks.FLOAT_DTYPES)
        _checks.nonempty_batch("z", z)
        bins = _checks.count("bins", bins, 1, "ECE bins")
        _checks.tensor("num_accepted", num_accepted, 1, _checks.INT_DTYPES)
        _checks.dim("num_accepted", num_accepted, 0, z.shape[0], "one entry per calibration round")
        _checks.finite("z", z)  # offline fitting: the passes over the inputs cost nothing that matters
        _checks.same_device(z=z, num_accepted=num_accepted)
        if not bool(((num_accepted >= 0) & (num_accepted <= z.shape[1])).all()):
            raise ValueError(f"num_accepted must count accepted drafts, each in [0, γ = {z.shape[1]}], got values "
                             f"from {int(num_accepted.min())} to {int(num_accepted.max())}")
        grid = _grid(grid)
        z = z.float()
        survived_before = torch.ones_like(z[:, 0])  # fp32, as z (not torch's default dtype)
        temps = []
        for k in range(z.shape[1]):
            label = (num_accepted >= k + 1).float()
            eces = torch.stack([expected_calibration_error(survived_before * torch.sigmoid(z[:, k] / t), label, bins)
                                for t in grid])
            best = grid[int(torch.argmin(eces))]
            temps.append(float(best))
            survived_before = survived_before * torch.sigmoid(z[:, k] / best)
        return cls(temps)


def _grid(grid) -> torch.Tensor:
    """STSCalibration.fit's temperatures to try: exp(-2..2) in 81 steps by default, else a list,
    tuple or 1-D tensor of finite numbers > 0, as fp32 ("ab" was a TypeError from torch)."""
    if grid is None:
        return torch.exp(torch.linspace(-2.0, 2.0, 81, dtype=torch.float32))
    if isinstance(grid, (list, tuple)) and all(map(_checks.finite_real, grid)):
        grid = torch.tensor(grid, dtype=torch.float32)
    if not isinstance(grid, torch.Tensor) or grid.dim() != 1 or grid.numel() == 0 or \
            not bool((torch.isfinite(grid.float()) & (grid > 0)).all()):
        shown = grid.tolist() if isinstance(grid, torch.Tensor) else grid
        raise ValueError(f"grid must be a non-empty list of finite temperatures > 0, got {shown!r}")
    return grid.float()


def expected_calibration_error(prob: torch.Tensor, label: torch.Tensor, bins: int = 20) -> torch.Tensor:
    """ECE with equal-width bins: Σ_b (n_b/N)·|mean(prob_b) − mean(label_b)|, summed in prob's dtype
    (index_add_ refuses bins of torch's default dtype when it is another)."""
    idx = torch.clamp((prob * bins).long(), max=bins - 1)
    p_sum = prob.new_zeros(bins).index_add_(0, idx, prob)
    y_sum = prob.new_zeros(bins).index_add_(0, idx, label.to(prob.dtype))
    return (p_sum - y_sum).abs().sum() / prob.numel()
