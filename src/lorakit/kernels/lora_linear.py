"""Fused LoRA linear: one autograd function per layer that saves only what backward needs.

    out = x W0ᵀ + b + s (x_d Aᵀ) Bᵀ          x: (N, d_in)  W0: (d_out, d_in)  A: (r, d_in)  B: (d_out, r)

x_d is the dropped-out input (x itself without dropout). W0 and b are frozen. Each direction has
two ways to add the low-rank term, chosen per call by ``dispatch.py`` from the shapes:

* factored: forward ``out.addmm_(x_d Aᵀ, Bᵀ, alpha=s)`` after the base GEMM, in place; backward
  ``∂x.addmm_(s g B, A)`` after the base input-gradient GEMM. Extra traffic: one read-modify-write
  of the (N, d_out) output, resp. of the (N, d_in) input gradient.
* merged: one GEMM with ``W = W0 + s B A`` (built by a small-K GEMM, not kept between forward and
  backward). Extra traffic: building a (d_out, d_in) matrix, independent of N.
  The forward can only merge when x_d = x (no dropout).

Both save x (or x_d) and the small x_d Aᵀ (N, r) — never an (N, d_out) tensor. When both
directions merge, the forward's merged weight is kept for backward instead of built again: one
(d_out, d_in) matrix per layer between the two passes (a small fraction of what a step keeps for
backward: docs/benchmarks.md) for two to four fewer passes over it. Backward computes

    ∂x   = g W0 + s (g B) A                   (g: (N, d_out), the output gradient)
    ∂A   = s (g B)ᵀ x_d                       (r, d_in)
    ∂B   = s gᵀ (x_d Aᵀ)                      (d_out, r)

in the compute dtype with the GEMMs' own (fp32) accumulation. A gradient is only computed when
its input needs one (LoRA-FA's frozen A gets none). Leading dimensions of x are flattened.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_merge, tuning
from .casting import as_dtype


def kept_for_backward(merged: torch.Tensor | None, merge_backward: bool) -> torch.Tensor | None:
    """The forward's merged weight if the backward will use it (``tuning.KEEP_MERGED``), else None."""
    return merged if merge_backward and tuning.KEEP_MERGED else None


def merged_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, row_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``W0 + s B A`` (d_out, d_in) in the weight's dtype, times ``row_scale`` (d_out,) per row when
    given (DoRA). One pass over W0 with the Triton kernel where ``triton_merge.available`` says
    so (on a GPU: DoRA's row-scaled build by default), else torch's addmm."""
    if triton_merge.available(weight, dora=row_scale is not None):
        return triton_merge.merged_weight(weight, A, B, scaling, row_scale)
    merged = torch.addmm(weight, B, A, alpha=scaling)
    return merged if row_scale is None else merged.mul_(as_dtype(row_scale, merged.dtype)[:, None])


def lora_forward(
    x2: torch.Tensor,
    xl2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    merge: bool,
    xa: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x W0ᵀ + b + s (x_d Aᵀ) Bᵀ, x_d Aᵀ, the merged weight W0 + s B A used or None when
    factored) for 2-D x (N, d_in) and x_d; ``merge`` needs x_d is x. ``xa``: x_d Aᵀ when the
    caller computed it (with other projections' A stacked)."""
    if xa is None:
        xa = F.linear(xl2, A)  # x_d Aᵀ (N, r), one op on the host
    if merge and xl2 is x2:
        merged = merged_weight(weight, A, B, scaling)
        return F.linear(x2, merged, bias), xa, merged
    out = F.linear(x2, weight, bias)
    out.addmm_(xa, B.t(), alpha=scaling)  # + s (x_d Aᵀ) Bᵀ, in place
    return out, xa, None


def lora_backward(
    g: torch.Tensor,
    xl2: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    merge: bool,
    need_x: bool,
    need_A: bool,
    need_B: bool,
    separate_lora_input: bool = False,
    grad_x: torch.Tensor | None = None,
    merged: torch.Tensor | None = None,
    gb_columns: torch.Tensor | None = None,
):
    """Gradients of ``lora_forward`` for output gradient g (N, d_out).

    Returns (∂x, ∂x_d, ∂A, ∂B), each None when not needed. With ``separate_lora_input`` (dropout)
    the low-rank part of the input gradient is returned as ∂x_d; otherwise it is inside ∂x. When
    ``grad_x`` is given, ∂x is accumulated into it in place (a sibling layer's input gradient).
    ``merged``: W0 + s B A when the caller still has it from the forward (a merged backward).
    ``gb_columns``: an (N, r) column block of a buffer for s g B; ∂A is then left to the caller,
    who computes the ∂A of several projections of one input in one GEMM
    (``projection.stacked_input_grads``).
    """
    s = scaling
    need_gB = need_A or (need_x and (separate_lora_input or not merge))
    gB = scaled_gb(g, B, s, gb_columns) if need_gB else None  # s g B: (N, r)
    if gb_columns is not None:
        need_A = False
    grad_xd = grad_A = grad_B = None
    if need_x:
        full = weight
        if merge and not separate_lora_input:
            full = merged if merged is not None else merged_weight(weight, A, B, s)
        if grad_x is None:
            grad_x = g @ full
        else:
            grad_x.addmm_(g, full)
        if full is weight:
            if separate_lora_input:
                grad_xd = gB @ A
            else:
                grad_x.addmm_(gB, A)  # + s (g B) A, in place
    if need_A:
        grad_A = gB.t() @ xl2
    if need_B:
        # (s (x_d Aᵀ)ᵀ g)ᵀ: the same (r, N) x (N, d) layout as ∂A, faster than gᵀ (x_d Aᵀ) on CPU BLAS.
        grad_B = torch.addmm(g.new_empty(()), xa.t(), g, beta=0, alpha=s).t()
    return grad_x, grad_xd, grad_A, grad_B


def scaled_gb(g: torch.Tensor, B: torch.Tensor, scaling: float, columns: torch.Tensor | None) -> torch.Tensor:
    """s g B (N, r); written into ``columns`` (an (N, r) view with unit column stride) when given.
    (Written transposed into (r, N) rows instead, the GEMM measured slower on the CPU and the same
    on a GPU: docs/benchmarks.md.)"""
    return torch.addmm(g.new_empty(()), g, B, beta=0, alpha=scaling, out=columns)


class LoraLinearFunction(torch.autograd.Function):
    """``out = x W0ᵀ + b + s (x_d Aᵀ) Bᵀ``; see the module docstring.

    Args of ``apply``: x (..., d_in); x_dropped (same shape, or None when there is no dropout);
    weight (d_out, d_in), frozen; bias (d_out,) or None; A (r, d_in); B (d_out, r); scaling s;
    merge_forward / merge_backward: use the merged weight in that direction (forward only
    without dropout). Returns (..., d_out).
    """

    @staticmethod
    def forward(ctx, x, x_dropped, weight, bias, A, B, scaling: float, merge_forward: bool, merge_backward: bool):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xl2 = x2 if x_dropped is None else x_dropped.reshape(-1, x.shape[-1])
        out, xa, merged = lora_forward(x2, xl2, weight, bias, A, B, scaling, merge_forward)
        # The forward's merged weight serves the merged backward too (see the module docstring).
        ctx.save_for_backward(xl2, xa, weight, A, B, kept_for_backward(merged, merge_backward))
        ctx.scaling, ctx.merge_backward, ctx.lead = scaling, merge_backward, lead
        ctx.separate_lora_input = x_dropped is not None
        return out.view(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xl2, xa, weight, A, B, merged = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
        need_x, need_xd, _, need_bias, need_A, need_B = ctx.needs_input_grad[:6]
        grad_x, grad_xd, grad_A, grad_B = lora_backward(
            g,
            xl2,
            xa,
            weight,
            A,
            B,
            ctx.scaling,
            ctx.merge_backward,
            need_x or need_xd,
            need_A,
            need_B,
            separate_lora_input=ctx.separate_lora_input,
            merged=merged,
        )
        grad_bias = g.sum(0) if need_bias else None
        lead = ctx.lead
        grad_x = grad_x.view(*lead, -1) if (grad_x is not None and need_x) else None
        grad_xd = grad_xd.view(*lead, -1) if grad_xd is not None else None
        return grad_x, grad_xd, None, grad_bias, grad_A, grad_B, None, None, None
