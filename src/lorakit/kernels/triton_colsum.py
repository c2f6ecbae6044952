"""Triton kernel for DoRA's magnitude gradient: column sums of g ⊙ (out − b) in one pass.

    total[j] = Σ_n g[n, j] (out[n, j] − b[j])          g, out: (N, d_out)   b: (d_out,) or none

In torch this is ``(g * out).sum(0)``: the product is written as an (N, d_out) temporary and read
back, four passes over an (N, d_out) tensor (plus more for the bias term). The kernel reads g and
out once each and accumulates in fp32. Each program sums a block of columns over a slice of the
rows; the slices' partial sums land in an (n_slices, d_out) buffer that torch adds up, so the
result does not depend on scheduling (no atomics).

``dora_linear.magnitude_grad`` uses it for CUDA tensors when Triton is importable, in eager code
(``available``); elsewhere, and under torch.compile, it takes the torch expression, which computes
the same values. The CPU tests run the kernel in Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from . import tuning
from .triton_support import on_gpu_in_kernel_dtype, sm_count, split_evenly, tl, triton

# Tile of one loop iteration; the fastest of (64|128|256) x (16|32|64) on the H200 in bf16.
BLOCK_COLS, BLOCK_ROWS = 64, 64


def available(g: torch.Tensor) -> bool:
    """True when the kernel should compute the column sums for ``g``: ``tuning.TRITON_COLSUM`` on,
    a CUDA tensor of a float dtype, outside torch.compile. (Inductor fuses the torch expression's product and sum by
    itself, and writing ``_LAUNCH_SHAPES`` while dynamo traces DoRA's autograd.Function breaks
    the graph in every DoRA layer.)"""
    return tuning.TRITON_COLSUM and not torch.compiler.is_compiling() and on_gpu_in_kernel_dtype(g)


_LAUNCH_SHAPES: dict[tuple[int, int, torch.device], tuple[int, int]] = {}


def _launch_shape(rows: int, cols: int, device: torch.device) -> tuple[int, int]:
    """(rows per program, row slices): enough programs to fill the GPU a few times over, none
    empty. Remembered per shape: it runs in every DoRA layer's backward, where host time counts.
    (A plain dict, not functools.lru_cache, which torch.compile warns about and traces through.)"""
    key = (rows, cols, device)
    if key not in _LAUNCH_SHAPES:
        if len(_LAUNCH_SHAPES) > 4096:  # dynamic padding gives a new row count per batch: stay bounded
            _LAUNCH_SHAPES.clear()
        column_blocks = triton.cdiv(cols, BLOCK_COLS)
        slices = max(1, min(triton.cdiv(4 * sm_count(device), column_blocks), triton.cdiv(rows, BLOCK_ROWS)))
        _LAUNCH_SHAPES[key] = split_evenly(rows, slices, BLOCK_ROWS)
    return _LAUNCH_SHAPES[key]


if triton is not None:

    @triton.jit
    def _colsum_kernel(
        G,
        OUT,
        BIAS,
        PARTIAL,
        rows,
        cols,
        rows_per_slice,
        stride_g,
        stride_out,
        HAS_BIAS: tl.constexpr,
        BC: tl.constexpr,
        BR: tl.constexpr,
    ):
        col = tl.program_id(0) * BC + tl.arange(0, BC)
        cmask = col < cols
        start = tl.program_id(1).to(tl.int64) * rows_per_slice  # int64: N * d_out may pass 2^31
        end = tl.minimum(start + rows_per_slice, rows)
        acc = tl.zeros((BC,), dtype=tl.float32)
        if HAS_BIAS:
            b = tl.load(BIAS + col, mask=cmask, other=0.0).to(tl.float32)
        for row0 in range(start, end, BR):
            row = row0 + tl.arange(0, BR)
            mask = (row < end)[:, None] & cmask[None, :]
            g = tl.load(G + row[:, None] * stride_g + col[None, :], mask=mask, other=0.0).to(tl.float32)
            o = tl.load(OUT + row[:, None] * stride_out + col[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                o = o - b[None, :]
            acc += tl.sum(g * o, axis=0)
        tl.store(PARTIAL + tl.program_id(1) * cols + col, acc, mask=cmask)


def column_dot(g: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_n g[n, :] ⊙ (out[n, :] − bias) as fp32 (d_out,), for 2-D g and out of one shape (rows may
    be strided, columns contiguous)."""
    rows, cols = g.shape
    if g.stride(1) != 1 or out.stride(1) != 1:
        g, out = g.contiguous(), out.contiguous()
    rows_per_slice, slices = _launch_shape(rows, cols, g.device)
    partial = torch.empty(slices, cols, device=g.device, dtype=torch.float32)
    grid = (triton.cdiv(cols, BLOCK_COLS), slices)
    _colsum_kernel[grid](
        g,
        out,
        bias if bias is not None else g,
        partial,
        rows,
        cols,
        rows_per_slice,
        g.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BC=BLOCK_COLS,
        BR=BLOCK_ROWS,
    )
    return partial[0] if slices == 1 else partial.sum(0)
