"""Host values kept as device tensors, made once per device: a host-to-device copy per call waits for
the GPU's queue (a host sync) and cannot be captured in a CUDA graph."""

import torch


def device_key(device) -> torch.device:
    """`cuda` and `cuda:N` (N the current device) are one device, so a cache warmed through either
    serves tensors on the other."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class OnDevice:
    """`values` (a host list) as a 1-D tensor of each dtype on each device, each made on first use."""

    def __init__(self, values: list[float]):
        self._values = values
        self._made: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, device, dtype: torch.dtype) -> torch.Tensor:
        key = (device_key(device), dtype)
        if key not in self._made:
            self._made[key] = torch.tensor(self._values, dtype=dtype, device=key[0])
        return self._made[key]
