"""Dtypes: conversion without the call when there is nothing to convert, and the dtype sums run in."""

from __future__ import annotations

import torch


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``: itself when it already is. A no-op ``.to()`` still costs an aten
    call's host time, and a DoRA step on a GPU makes hundreds of them; on a fast GPU the step's
    host time is what bounds it (docs/benchmarks.md)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to sum or combine ``dtype`` tensors in: fp32 for half precision, their own dtype
    for fp32 / fp64 (so float64 tests stay exact)."""
    return torch.promote_types(dtype, torch.float32)
