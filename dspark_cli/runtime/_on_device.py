"""Host values kept as device tensors, made once per device: a host-to-device copy per call waits for
the GPU's queue (a host sync) and cannot be captured in a CUDA graph."""

from typing import Callable

import torch


def device_key(device) -> torch.device:
    """`cuda` and `cuda:N` (N the current device) are one device, so a cache warmed through either
    serves tensors on the other."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class OnDevice:
    """The host list `values()` as a 1-D tensor on each device, in each of `dtypes` and any other
    dtype asked for: all of a device's made at its first use (one call before capture serves every
    dtype); the host list is not kept."""

    def __init__(self, values: Callable[[], list[float]], dtypes: tuple[torch.dtype, ...]):
        self._values, self._dtypes = values, dtypes
        self._made: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, device, dtype: torch.dtype) -> torch.Tensor:
        device = device_key(device)
        if (device, dtype) not in self._made:
            host = self._values()
            for made in (*self._dtypes, dtype):
                if (device, made) not in self._made:
                    self._made[(device, made)] = torch.tensor(host, dtype=made, device=device)
        return self._made[(device, dtype)]
