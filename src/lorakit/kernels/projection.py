"""One LoRA or DoRA projection inside a fused function that covers several (``gated_mlp.py``,
``sibling_projections.py``): its forward and backward on 2-D tensors, LoRA or DoRA by whether a
magnitude is given. The single-layer functions (``lora_linear.py``, ``dora_linear.py``) hold the
formulas; this only picks between them and carries what backward needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import tuning
from .dora_linear import dora_backward, dora_forward
from .lora_linear import kept_for_backward, lora_backward, lora_forward


@dataclass(frozen=True)
class Projection:
    """What one projection's computation needs besides its tensors: its scaling and whether to
    use the merged weight W0 + s B A forward / backward (see ``lora_linear.py``, ``dora_linear.py``)."""

    scaling: float
    merge_forward: bool
    merge_backward: bool


def project(x2: torch.Tensor, weight, bias, A, B, magnitude, plan: Projection, xa=None):
    """One projection's forward for x2 (N, d_in): (out (N, d_out), x Aᵀ (N, r), DoRA's c (d_out,)
    or None, the merged weight to keep for backward or None). ``xa``: x Aᵀ if already computed."""
    if magnitude is None:
        out, xa, merged = lora_forward(x2, x2, weight, bias, A, B, plan.scaling, plan.merge_forward, xa)
        rescale = None
    else:
        out, xa, rescale, merged = dora_forward(x2, weight, bias, A, B, magnitude, plan.scaling, plan.merge_forward, xa)
    return out, xa, rescale, kept_for_backward(merged, plan.merge_backward)


def project_backward(
    grad,
    x2,
    xa,
    out,
    rescale,
    merged,
    weight,
    bias,
    A,
    B,
    magnitude,
    plan: Projection,
    need_x,
    need_A,
    need_B,
    need_m,
    grad_x=None,
    gb_columns=None,
):
    """(∂x, ∂A, ∂B, ∂m) of ``project`` for the output gradient (N, d_out); ∂x accumulated into
    ``grad_x`` when given; ∂m None for LoRA. ``out``: the forward's output (DoRA's ∂m reads it).
    ``gb_columns``: see ``lora_backward`` (∂A is then None, left to ``stacked_input_grads``)."""
    if magnitude is None:
        grad_x, _, grad_A, grad_B = lora_backward(
            grad,
            x2,
            xa,
            weight,
            A,
            B,
            plan.scaling,
            plan.merge_backward,
            need_x,
            need_A,
            need_B,
            grad_x=grad_x,
            merged=merged,
            gb_columns=gb_columns,
        )
        return grad_x, grad_A, grad_B, None
    return dora_backward(
        grad,
        x2,
        xa,
        weight,
        bias,
        A,
        B,
        magnitude,
        rescale,
        out,
        plan.scaling,
        plan.merge_backward,
        need_x,
        need_A,
        need_B,
        need_m,
        grad_x=grad_x,
        merged=merged,
        gb_columns=gb_columns,
    )


# Projections of one input share two skinny GEMMs: x [A_1; ...; A_k]ᵀ in the forward and
# [g_1 B_1 | ... | g_k B_k]ᵀ x for all ∂A in backward. Each reads the whole (N, d_in) input for
# r output columns, so its time is the input's reading time: one GEMM instead of k saves k - 1
# reads of x each way (and k - 1 kernel launches). ``tuning.STACK_PROJECTIONS`` False: one GEMM
# per projection each way.


def stacked_inputs(x2: torch.Tensor, As) -> list[torch.Tensor]:
    """[x A_iᵀ (N, r_i)] for x2 (N, d_in) and the A_i (r_i, d_in), from one GEMM (column views)."""
    if not tuning.STACK_PROJECTIONS:
        return [torch.nn.functional.linear(x2, A) for A in As]
    xa = torch.nn.functional.linear(x2, torch.cat(As))
    views, start = [], 0
    for A in As:
        views.append(xa[:, start : start + A.shape[0]])
        start += A.shape[0]
    return views


def stacked_gb_columns(
    x2: torch.Tensor, ranks: list[int], wanted: bool = True
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """An (N, Σ r_i) buffer and its column blocks (N, r_i), one per projection, for ``gb_columns``;
    None and Nones when not stacking (``tuning.STACK_PROJECTIONS`` off, or not ``wanted`` by the caller: some
    projection gets no ∂A)."""
    if not (tuning.STACK_PROJECTIONS and wanted):
        return None, [None] * len(ranks)
    buffer = x2.new_empty(x2.shape[0], sum(ranks))
    return buffer, list(buffer.split(ranks, dim=1))


def stacked_input_grads(x2: torch.Tensor, buffer: torch.Tensor, ranks: list[int]) -> list[torch.Tensor]:
    """[∂A_i = (s g_i B_i)ᵀ x (r_i, d_in)] from a ``stacked_gb_columns`` buffer whose blocks backward
    filled, in one GEMM."""
    return list((buffer.t() @ x2).split(ranks))
