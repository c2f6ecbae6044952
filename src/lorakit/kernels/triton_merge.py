"""Triton kernels that build the merged weight in one pass over W0 (GPU only).

    W = W0 + s B A                        (d_out, d_in); B (d_out, r), A (r, d_in)
    W = c ⊙ (W0 + s B A)                  DoRA, c per row (given, or c = m / ||W0 + s B A|| computed here)

``torch.addmm(W0, B, A)`` copies W0 into the output and then runs a GEMM that reads and writes
it again: four passes over a (d_out, d_in) matrix, plus two more for DoRA's row scaling and one
for its norm. These kernels read W0 once and write W once (DoRA with the norm: W0 is read twice,
as the norm of a row must be known before the row is written). The rank-r product is a
``tl.dot`` per tile, accumulated in fp32 (``ieee`` precision for fp32 inputs: no TF32).

On a GPU the kernels build every DoRA weight: there one kernel replaces a copy, a GEMM, a norm
and a row scaling whose broadcast multiply torch runs unvectorised. For plain LoRA they build the
large weights only (``tuning.LARGE_LORA_BUILD`` elements and more: an MLP's projections), where they
replace a copy and a GEMM with K = r that cuBLAS runs at about half the memory bandwidth. A
Triton launch costs more Python time than an aten call, and a LoRA step's forward is host-bound
on slower hosts, so the small builds (attention's, little GPU time to gain) stay with torch (the
measurements: docs/benchmarks.md). ``LORAKIT_TRITON_MERGE=1`` (``tuning.TRITON_MERGE``) uses the
kernels for every build, ``=0`` for none. Everything else (CPU tensors, no Triton, other dtypes) takes the torch
expression, which computes the same values. The CPU tests run the kernels in Triton's
interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from . import tuning
from .casting import as_dtype
from .triton_support import on_gpu_in_kernel_dtype, tl, triton


def available(weight: torch.Tensor, dora: bool) -> bool:
    """True when the kernels should build the merged weight for ``weight``: a GPU tensor of a
    kernel dtype, Triton importable, and ``tuning.TRITON_MERGE`` covering this build (see the docstring)."""
    mode = tuning.TRITON_MERGE
    wanted = mode == "1" or (mode == "auto" and (dora or weight.numel() >= tuning.LARGE_LORA_BUILD))
    return wanted and on_gpu_in_kernel_dtype(weight)


def _padded_rank(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs dimensions >= 16


if triton is not None:

    @triton.jit
    def _tile_kernel(
        W,
        B,
        A,
        OUT,
        SCALE,
        s,
        d_out,
        d_in,
        R: tl.constexpr,
        RP: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # int64: d_out * d_in may pass 2^31
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        # (.to(fp32) after s *: under torch.compile s arrives as a float64 scalar; sums stay fp32.)
        ks = tl.arange(0, RP)
        rmask, cmask, kmask = rows < d_out, cols < d_in, ks < R
        b = tl.load(B + rows[:, None] * R + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        a = tl.load(A + ks[:, None] * d_in + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        mask = rmask[:, None] & cmask[None, :]
        w = tl.load(W + rows[:, None] * d_in + cols[None, :], mask=mask, other=0.0)
        v = w.to(tl.float32) + (s * tl.dot(b, a, input_precision=PRECISION)).to(tl.float32)
        if HAS_SCALE:
            v = v * tl.load(SCALE + rows, mask=rmask, other=0.0)[:, None]
        tl.store(OUT + rows[:, None] * d_in + cols[None, :], v.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_kernel(
        W,
        B,
        A,
        OUT,
        SCALE,
        MAG,
        s,
        d_out,
        d_in,
        R: tl.constexpr,
        RP: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        ks = tl.arange(0, RP)
        rmask, kmask = rows < d_out, ks < R
        b = tl.load(B + rows[:, None] * R + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        total = tl.zeros((BM,), dtype=tl.float32)
        for start in range(0, d_in, BN):
            cols = start + tl.arange(0, BN)
            cmask = cols < d_in
            a = tl.load(A + ks[:, None] * d_in + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
            w = tl.load(W + rows[:, None] * d_in + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            v = w.to(tl.float32) + (s * tl.dot(b, a, input_precision=PRECISION)).to(tl.float32)
            total += tl.sum(v * v, axis=1)
        scale = tl.load(MAG + rows, mask=rmask, other=1.0).to(tl.float32) / tl.sqrt(total)
        tl.store(SCALE + rows, scale, mask=rmask)
        for start in range(0, d_in, BN):
            cols = start + tl.arange(0, BN)
            cmask = cols < d_in
            mask = rmask[:, None] & cmask[None, :]
            a = tl.load(A + ks[:, None] * d_in + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
            w = tl.load(W + rows[:, None] * d_in + cols[None, :], mask=mask, other=0.0)
            v = (w.to(tl.float32) + (s * tl.dot(b, a, input_precision=PRECISION)).to(tl.float32)) * scale[:, None]
            tl.store(OUT + rows[:, None] * d_in + cols[None, :], v.to(OUT.dtype.element_ty), mask=mask)


def _operands(weight, A, B):
    weight, A, B = weight.contiguous(), as_dtype(A, weight.dtype).contiguous(), as_dtype(B, weight.dtype).contiguous()
    precision = "ieee" if weight.dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs
    return weight, A, B, precision


def merged_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, row_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``W0 + s B A``, times ``row_scale`` (d_out,) per row when given; W0's dtype."""
    weight, A, B, precision = _operands(weight, A, B)
    d_out, d_in = weight.shape
    out = torch.empty_like(weight)
    BM, BN = 64, 128
    scale = as_dtype(row_scale, torch.float32).contiguous() if row_scale is not None else weight  # unused when None
    grid = (triton.cdiv(d_out, BM), triton.cdiv(d_in, BN))
    _tile_kernel[grid](
        weight,
        B,
        A,
        out,
        scale,
        float(scaling),
        d_out,
        d_in,
        R=A.shape[0],
        RP=_padded_rank(A.shape[0]),
        BM=BM,
        BN=BN,
        HAS_SCALE=row_scale is not None,
        PRECISION=precision,
    )
    return out


def dora_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, magnitude: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c ⊙ (W0 + s B A), c) with c = m / ||W0 + s B A|| per row, c in float32."""
    weight, A, B, precision = _operands(weight, A, B)
    d_out, d_in = weight.shape
    out = torch.empty_like(weight)
    scale = torch.empty(d_out, device=weight.device, dtype=torch.float32)
    BM, BN = 16, 256
    _norm_kernel[(triton.cdiv(d_out, BM),)](
        weight,
        B,
        A,
        out,
        scale,
        magnitude.contiguous(),
        float(scaling),
        d_out,
        d_in,
        R=A.shape[0],
        RP=_padded_rank(A.shape[0]),
        BM=BM,
        BN=BN,
        PRECISION=precision,
    )
    return out, scale
