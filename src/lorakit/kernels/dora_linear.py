"""Fused DoRA linear: the weight norm once per call, one GEMM forward and one backward.

    W   = W0 + s B A                               (d_out, d_in)
    c   = m / ||W||  per output unit (the norm detached, as in the paper and the reference path)
    out = c ⊙ (x Wᵀ) + b  =  x (c ⊙ W)ᵀ + b          x: (N, d_in), m: (d_out,)

The rescale is folded into the weight, so the forward is the merged-LoRA build plus one norm and
one row scaling of a (d_out, d_in) matrix, then a single GEMM — no (N, d_out) temporaries. The
reference path instead computes W0 x, the low-rank term and their rescaled sum as separate
(N, d_out) tensors and builds W for the norm on the side.

Backward (g: (N, d_out)):

    ∂x = g (c ⊙ W)                     (W rebuilt, not kept)
    ∂A = s ((g ⊙ c) B)ᵀ x = s (g (c ⊙ B))ᵀ x
    ∂B = s (c ⊙ (gᵀ (x Aᵀ)))
    ∂m = Σ_t g ⊙ (x Wᵀ) / ||W||  =  Σ_t g ⊙ (out - b) / m

The last form reads ∂m off the saved output instead of recomputing x Wᵀ (a full GEMM). It is
undefined where m is exactly 0 (the unit's output is 0 whatever x is); there ∂m is returned as 0.
Magnitudes start at ||W0|| and an optimizer does not land on an exact float zero, so this is a
documented edge, not a practical one. Only used without dropout (with dropout DoRA mixes W0 x and
the dropped input, and the reference path handles it).

On a GPU the builds of c ⊙ W (with the norm in the forward) are Triton kernels (one pass over W0,
``triton_merge.py``) and so are ∂m's column sums (one pass over g and out, ``triton_colsum.py``);
elsewhere torch computes the same expressions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_colsum, triton_merge
from .lora_linear import merged_weight


def dora_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c ⊙ (W0 + s B A), c) with c = m / ||W0 + s B A|| per row, the norm computed in fp32 (or
    wider); c comes back in the precision it was applied in (the weight's dtype with torch, fp32
    with the Triton kernel)."""
    if triton_merge.available(weight, dora=True):
        return triton_merge.dora_weight(weight, A, B, scaling, magnitude)
    combined = merged_weight(weight, A, B, scaling)
    acc = torch.promote_types(combined.dtype, torch.float32)
    rescale = (magnitude / torch.linalg.vector_norm(combined, dim=1, dtype=acc)).to(combined.dtype)
    return combined.mul_(rescale[:, None]), rescale


def magnitude_grad(g: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None,
                   magnitude: torch.Tensor) -> torch.Tensor:
    """∂m = Σ_t g ⊙ (out − b) / m for g, out (N, d_out); 0 where m == 0 (see the module docstring).

    The column sums run in fp32: one pass over g and out with the Triton kernel on a GPU,
    torch's product-then-sum elsewhere."""
    if triton_colsum.available(g):
        total = triton_colsum.column_dot(g, out, bias)
    else:
        acc = torch.promote_types(g.dtype, torch.float32)
        total = (g * out).sum(0, dtype=acc)
        if bias is not None:
            total -= bias.to(acc) * g.sum(0, dtype=acc)
    return torch.where(magnitude != 0, total / magnitude, 0.0).to(magnitude.dtype)


class DoraLinearFunction(torch.autograd.Function):
    """``out = m/||W0 + sBA|| ⊙ (x (W0 + sBA)ᵀ) + b``; see the module docstring.

    Args of ``apply``: x (..., d_in); weight (d_out, d_in), frozen; bias (d_out,) or None;
    A (r, d_in); B (d_out, r); magnitude m (d_out,); scaling s. Returns (..., d_out).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, magnitude, scaling: float):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        scaled_weight, rescale = dora_weight(weight, A, B, scaling, magnitude)
        out = F.linear(x2, scaled_weight, bias)
        xa = x2 @ A.t()                                                # (N, r)
        ctx.save_for_backward(x2, xa, weight, bias, A, B, magnitude, rescale, out)
        ctx.scaling, ctx.lead = scaling, lead
        return out.view(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, weight, bias, A, B, magnitude, rescale, out = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, _, need_bias, need_A, need_B, need_m = ctx.needs_input_grad[:6]
        grad_x = grad_bias = grad_A = grad_B = grad_m = None
        if need_x:
            # Rebuild c ⊙ W from the saved c: the same matrix the forward used, without a new norm.
            grad_x = g @ merged_weight(weight, A, B, s, row_scale=rescale)
            grad_x = grad_x.view(*ctx.lead, grad_x.shape[-1])
        c = rescale if rescale.dtype == g.dtype else rescale.to(g.dtype)  # for the rank-r products
        if need_A:
            grad_A = torch.addmm(g.new_empty(()), g, B * c[:, None], beta=0, alpha=s).t() @ x2
        if need_B:
            grad_B = (g.t() @ xa).mul_(c[:, None]).mul_(s)
        if need_m:
            grad_m = magnitude_grad(g, out, bias, magnitude)
        if need_bias:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_A, grad_B, grad_m, None
