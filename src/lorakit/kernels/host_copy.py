"""Small host tensors (index lists, token ids, slot numbers) copied to the device without making
the host wait for the device's earlier work.

A copy from pageable host memory to a GPU may first wait for everything queued on the stream
before it; through page-locked memory it is queued like a kernel (torch keeps the host block
until the copy has run). A serving engine's step queues several such copies while the step
before it still runs (``serve/engine.py``, ``Engine.overlap``), as does every slot plan.
"""

from __future__ import annotations

import torch


def host_to_device(values: list[int] | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``values`` (a list: int64) on ``device``; a tensor already there is returned as it is."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.int64)
    device = torch.device(device)
    if host.device == device:
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
