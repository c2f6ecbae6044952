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

Both save x (or x_d) and the small x_d Aᵀ (N, r) — never an (N, d_out) tensor — and compute

    ∂x   = g W0 + s (g B) A                   (g: (N, d_out), the output gradient)
    ∂A   = s (g B)ᵀ x_d                       (r, d_in)
    ∂B   = s gᵀ (x_d Aᵀ)                      (d_out, r)

in the compute dtype with the GEMMs' own (fp32) accumulation. A gradient is only computed when
its input needs one (LoRA-FA's frozen A gets none). Leading dimensions of x are flattened.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W0 + s B A``: (d_out, d_in), in the weight's dtype (accumulated in fp32 by the GEMM)."""
    return torch.addmm(weight, B, A, alpha=scaling)


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
        xa = xl2 @ A.t()                                              # (N, r)
        if merge_forward and x_dropped is None:
            out = F.linear(x2, merged_weight(weight, A, B, scaling), bias)
        else:
            out = F.linear(x2, weight, bias)
            out.addmm_(xa, B.t(), alpha=scaling)                      # + s (x_d Aᵀ) Bᵀ, in place
        ctx.save_for_backward(xl2, xa, weight, A, B)
        ctx.scaling, ctx.merge_backward, ctx.lead = scaling, merge_backward, lead
        ctx.separate_lora_input = x_dropped is not None
        return out.view(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xl2, xa, weight, A, B = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])                  # (N, d_out)
        need_x, need_xd, _, need_bias, need_A, need_B = ctx.needs_input_grad[:6]
        # s g B: (N, r), scaling folded into the GEMM.
        gB = torch.addmm(g.new_empty(()), g, B, beta=0, alpha=s) if (need_x or need_xd or need_A) else None
        grad_x = grad_xd = grad_bias = grad_A = grad_B = None
        if need_x:
            if ctx.merge_backward and not ctx.separate_lora_input:
                grad_x = g @ merged_weight(weight, A, B, s)
            else:
                grad_x = g @ weight
                if not ctx.separate_lora_input:
                    grad_x.addmm_(gB, A)                              # + s (g B) A, in place
        if need_xd and ctx.separate_lora_input:
            grad_xd = gB @ A
        if need_A:
            grad_A = gB.t() @ xl2
        if need_B:
            # (s (x_d Aᵀ)ᵀ g)ᵀ: the same (r, N) x (N, d) layout as ∂A, faster than gᵀ (x_d Aᵀ) on CPU BLAS.
            grad_B = torch.addmm(g.new_empty(()), xa.t(), g, beta=0, alpha=s).t()
        if need_bias:
            grad_bias = g.sum(0)
        lead = ctx.lead
        if grad_x is not None:
            grad_x = grad_x.view(*lead, grad_x.shape[-1])
        if grad_xd is not None:
            grad_xd = grad_xd.view(*lead, grad_xd.shape[-1])
        return grad_x, grad_xd, None, grad_bias, grad_A, grad_B, None, None, None
