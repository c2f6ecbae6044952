"""Dtype conversion without the call when there is nothing to convert."""

from __future__ import annotations

import torch


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``: itself when it already is. A no-op ``.to()`` still costs several µs
    of host time, and a DoRA step on a GPU makes hundreds of them; on a fast GPU the step's
    host time is what bounds it (docs/benchmarks.md)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
