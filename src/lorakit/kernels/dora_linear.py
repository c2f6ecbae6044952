"""Fused DoRA linear: the weight norm once per call, the low-rank term never as a separate output.

    W   = W0 + s B A                               (d_out, d_in)
    c   = m / ||W||  per output unit (the norm detached, as in the paper and the reference path)
    out = c ⊙ (x Wᵀ) + b                           x: (N, d_in), m: (d_out,)

Two ways per direction, chosen from the shapes by ``dispatch.dora_merge_directions`` as for LoRA:

* merged: ``out = x (c ⊙ W)ᵀ + b``, the rescale folded into the built weight, so one GEMM;
  backward ``∂x = g (c ⊙ W)``, with the forward's c ⊙ W kept for it when both directions merge
  (else rebuilt from the saved c). Pays for long inputs (training on a GPU), where a weight-sized
  build is cheap next to the activations; keeping the built weights costs one base-weight-sized
  matrix per layer between forward and backward (within the DoRA memory goal on the 1.2B Llama
  benchmark: docs/benchmarks.md) and saves a build and a kernel launch per layer.
* factored: ``out = c ⊙ (x W0ᵀ + s (x Aᵀ) Bᵀ) + b`` with c from the factored norm
  (``dora_norm.py``: no (d_out, d_in) matrix is built); backward is LoRA's factored backward on
  g ⊙ c. Pays for short inputs (CPU batches, generation), where building, norming and scaling a
  (d_out, d_in) matrix twice per step costs as much as the layer's GEMMs.

Backward (g: (N, d_out)), both ways:

    ∂x = (g ⊙ c) W = g (c ⊙ W)
    ∂A = s ((g ⊙ c) B)ᵀ x = s (g (c ⊙ B))ᵀ x
    ∂B = s (c ⊙ (gᵀ (x Aᵀ)))
    ∂m = Σ_t g ⊙ (x Wᵀ) / ||W||  =  Σ_t g ⊙ (out - b) / m

The last form reads ∂m off the saved output instead of recomputing x Wᵀ (a full GEMM). It is
undefined where m is exactly 0 (the unit's output is 0 whatever x is); there ∂m is returned as 0.
Magnitudes start at ||W0|| and an optimizer does not land on an exact float zero, so this is a
documented edge, not a practical one. Only used without dropout (with dropout DoRA mixes W0 x and
the dropped input, and the reference path handles it).

On a GPU the merged builds of c ⊙ W (with the norm in the forward) are Triton kernels (one pass
over W0, ``triton_merge.py``) and so are ∂m's column sums in eager code (one pass over g and
out, ``triton_colsum.py``); elsewhere torch computes the same expressions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_colsum
from .casting import accumulation_dtype, as_dtype
from .dora_norm import dora_weight, factored_rescale
from .lora_linear import kept_for_backward, lora_backward, lora_forward, merged_weight


def dora_forward(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    merge: bool,
    xa: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out, x Aᵀ, c, c ⊙ W or None) for 2-D x (N, d_in): out (N, d_out), x Aᵀ (N, r), c (d_out,)
    and the merged weight (d_out, d_in) when built are what ``dora_backward`` needs besides the
    inputs. ``xa``: x Aᵀ when the caller computed it."""
    if merge:
        scaled_weight, rescale = dora_weight(weight, A, B, scaling, magnitude)
        return (F.linear(x2, scaled_weight, bias), F.linear(x2, A) if xa is None else xa, rescale, scaled_weight)
    rescale = factored_rescale(weight, A, B, scaling, magnitude)
    out, xa, _ = lora_forward(x2, x2, weight, None, A, B, scaling, merge=False, xa=xa)
    out.mul_(as_dtype(rescale, out.dtype))
    if bias is not None:
        out.add_(bias)
    return out, xa, rescale, None


def dora_backward(
    g: torch.Tensor,
    x2: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    rescale: torch.Tensor,
    out: torch.Tensor,
    scaling: float,
    merge: bool,
    need_x: bool,
    need_A: bool,
    need_B: bool,
    need_m: bool,
    grad_x: torch.Tensor | None = None,
    merged: torch.Tensor | None = None,
    gb_columns: torch.Tensor | None = None,
):
    """(∂x, ∂A, ∂B, ∂m) of ``dora_forward`` for output gradient g (N, d_out), each None when not
    needed. When ``grad_x`` is given, ∂x is accumulated into it in place. ``merged``: the
    forward's c ⊙ W when kept (a merged backward), else it is rebuilt. ``gb_columns``: as for
    ``lora_backward`` (∂A left to the caller)."""
    s = scaling
    grad_m, spare = magnitude_grad(g, out, bias, magnitude) if need_m else (None, None)
    c = as_dtype(rescale, g.dtype)  # for the products below
    grad_A = grad_B = None
    if not merge:
        if need_x or need_A or need_B:  # g ⊙ c: one (N, d_out) temporary, only when something reads it
            scaled_g = torch.mul(g, c, out=spare)  # into ∂m's product buffer when there is one
            grad_x, _, grad_A, grad_B = lora_backward(
                scaled_g, x2, xa, weight, A, B, s, False, need_x, need_A, need_B, grad_x=grad_x, gb_columns=gb_columns
            )
        return grad_x, grad_A, grad_B, grad_m
    if need_x and merged is None:
        # Rebuilt from the saved c: the same matrix the forward used, without a new norm.
        merged = merged_weight(weight, A, B, s, row_scale=rescale)
    # LoRA's merged backward with the rows of B scaled by c: ∂x = g (c ⊙ W), ∂A = s (g (c ⊙ B))ᵀ x,
    # and its ∂B, taken for c ⊙ B, is s (x Aᵀ)ᵀ g, which the c of ∂B = s c ⊙ (gᵀ (x Aᵀ)) finishes.
    row_scaled_B = B * c[:, None] if need_A else B  # B only feeds s (g ⊙ c) B
    grad_x, _, grad_A, grad_B = lora_backward(
        g,
        x2,
        xa,
        weight,
        A,
        row_scaled_B,
        s,
        True,
        need_x,
        need_A,
        need_B,
        grad_x=grad_x,
        merged=merged,
        gb_columns=gb_columns,
    )
    if grad_B is not None:
        grad_B.mul_(c[:, None])
    return grad_x, grad_A, grad_B, grad_m


def magnitude_grad(
    g: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None, magnitude: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(∂m = Σ_t g ⊙ (out − b) / m for g, out (N, d_out), 0 where m == 0 (see the module
    docstring); a spare (N, d_out) buffer of g's dtype or None).

    The column sums run in fp32: one pass over g and out with the Triton kernel on a GPU,
    torch's product-then-sum elsewhere, whose product buffer is then spare: the caller's g ⊙ c
    can go into it instead of a new (N, d_out) allocation."""
    spare = None
    if triton_colsum.available(g):
        total = triton_colsum.column_dot(g, out, bias)
    else:
        acc = accumulation_dtype(g.dtype)
        spare = g * out
        total = spare.sum(0, dtype=acc)
        if bias is not None:
            total -= bias.to(acc) * g.sum(0, dtype=acc)
    # masked_fill_ with a Python number: torch.where(cond, t, 0.0) took a third of this function's
    # host time on a GPU (host_profile.py, docs/benchmarks.md).
    grad = (total / magnitude).masked_fill_(magnitude == 0, 0.0)
    return as_dtype(grad, magnitude.dtype), spare


class DoraLinearFunction(torch.autograd.Function):
    """``out = m/||W0 + sBA|| ⊙ (x (W0 + sBA)ᵀ) + b``; see the module docstring.

    Args of ``apply``: x (..., d_in); weight (d_out, d_in), frozen; bias (d_out,) or None;
    A (r, d_in); B (d_out, r); magnitude m (d_out,); scaling s; merge_forward / merge_backward:
    the merged or the factored way in that direction. Returns (..., d_out).
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, A, B, magnitude, scaling: float, merge_forward: bool = True, merge_backward: bool = True
    ):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        out, xa, rescale, merged = dora_forward(x2, weight, bias, A, B, magnitude, scaling, merge_forward)
        ctx.save_for_backward(
            x2, xa, weight, bias, A, B, magnitude, rescale, out, kept_for_backward(merged, merge_backward)
        )
        ctx.scaling, ctx.merge_backward, ctx.lead = scaling, merge_backward, lead
        return out.view(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, weight, bias, A, B, magnitude, rescale, out, merged = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, _, need_bias, need_A, need_B, need_m = ctx.needs_input_grad[:6]
        grad_x, grad_A, grad_B, grad_m = dora_backward(
            g,
            x2,
            xa,
            weight,
            bias,
            A,
            B,
            magnitude,
            rescale,
            out,
            ctx.scaling,
            ctx.merge_backward,
            need_x,
            need_A,
            need_B,
            need_m,
            merged=merged,
        )
        if grad_x is not None:
            grad_x = grad_x.view(*ctx.lead, grad_x.shape[-1])
        grad_bias = g.sum(0) if need_bias else None
        return grad_x, None, grad_bias, grad_A, grad_B, grad_m, None, None, None
