"""One LoRA or DoRA projection inside a fused function that covers several (``gated_mlp.py``,
``sibling_projections.py``): its forward and backward on 2-D tensors, LoRA or DoRA by whether a
magnitude is given. The single-layer functions (``lora_linear.py``, ``dora_linear.py``) hold the
formulas; this only picks between them and carries what backward needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dora_linear import dora_backward, dora_forward
from . import lora_linear
from .lora_linear import lora_backward, lora_forward_keeping_merged


@dataclass(frozen=True)
class Projection:
    """What one projection's computation needs besides its tensors: its scaling and whether to
    use the merged weight W0 + s B A forward / backward (see ``lora_linear.py``, ``dora_linear.py``)."""

    scaling: float
    merge_forward: bool
    merge_backward: bool


def project(x2: torch.Tensor, weight, bias, A, B, magnitude, plan: Projection):
    """One projection's forward for x2 (N, d_in): (out (N, d_out), x Aᵀ (N, r), DoRA's c (d_out,)
    or None, the merged weight to keep for backward or None)."""
    if magnitude is None:
        out, xa, merged = lora_forward_keeping_merged(x2, x2, weight, bias, A, B, plan.scaling, plan.merge_forward)
        return out, xa, None, merged if plan.merge_backward and lora_linear.KEEP_MERGED else None
    out, xa, rescale, merged = dora_forward(x2, weight, bias, A, B, magnitude, plan.scaling, plan.merge_forward)
    return out, xa, rescale, merged if plan.merge_backward and lora_linear.KEEP_MERGED else None


def project_backward(grad, x2, xa, out, rescale, merged, weight, bias, A, B, magnitude, plan: Projection,
                     need_x, need_A, need_B, need_m, grad_x=None):
    """(∂x, ∂A, ∂B, ∂m) of ``project`` for the output gradient (N, d_out); ∂x accumulated into
    ``grad_x`` when given; ∂m None for LoRA. ``out``: the forward's output (DoRA's ∂m reads it)."""
    if magnitude is None:
        grad_x, _, grad_A, grad_B = lora_backward(grad, x2, xa, weight, A, B, plan.scaling, plan.merge_backward,
                                                  need_x, need_A, need_B, grad_x=grad_x, merged=merged)
        return grad_x, grad_A, grad_B, None
    return dora_backward(grad, x2, xa, weight, bias, A, B, magnitude, rescale, out, plan.scaling,
                         plan.merge_backward, need_x, need_A, need_B, need_m, grad_x=grad_x, merged=merged)
