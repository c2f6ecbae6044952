"""Fused gated MLP with LoRA or DoRA on all three projections (Llama, Mistral, Qwen, Gemma, ...).

    g = gate(x),  u = up(x),  h = act(g) ⊙ u,  y = down(h)         each projection W0 + s B A
                                                                    (DoRA: rescaled per row, m / ||W||)

x: (N, d), g, u, h: (N, d_ff), y: (N, d). Run as separate layers, a LoRA step must keep h for
the down projection's ∂A (= s (g_y B)ᵀ h), on top of what the frozen model keeps (g for act's
backward, act(g) and u for the product's): three (N, d_ff) tensors plus h. This function keeps
x, g and u only and recomputes act(g) and h in backward, so the MLP of a LoRA step holds less
than the frozen MLP does; the price is two extra elementwise passes in backward. (Keeping h and
recomputing only act(g) measured no faster on a GPU, at a higher peak. On CPUs keeping act(g)
and h measured slower too: the recomputation reads g and u once more, but then they and h are in
cache for the backward that follows, where kept tensors come back from memory. Both in
docs/benchmarks.md.)

The two input gradients (through gate and up) are accumulated into one tensor by the GEMMs
themselves (``addmm_``), where autograd would add two (N, d) tensors; gate's and up's x Aᵀ, and
their ∂A, each come from one GEMM with the two A stacked (one read of x instead of two). DoRA
projections (``dora_linear.py``) also need their outputs for ∂m: g and u are kept anyway, and
y (N, d) is.
One autograd node per MLP instead of three (plus the activation's and the product's) also saves
host time, which is what DoRA's many small operations are short of on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_swiglu
from .projection import project, project_backward, stacked_gb_columns, stacked_input_grads, stacked_inputs


class GateProduct:
    """h = act(g) ⊙ u, and the gradients through it (g, u: (N, d_ff)).

    SiLU (Llama, Mistral, Qwen, ...) on a GPU takes the Triton kernels of ``triton_swiglu.py``
    (one pass each way), elsewhere aten's ``silu`` and ``silu_backward``. Any other activation
    module goes through autograd on a detached copy, which re-enters the autograd engine (about
    as much host time as the rest of the MLP's backward ops together on a fast GPU)."""

    def __init__(self, act: nn.Module, g: torch.Tensor, u: torch.Tensor, for_backward: bool = True) -> None:
        """``for_backward``: keep what ``backward`` needs (the forward pass only wants h)."""
        self.g, self.u = g, u
        self.silu = is_plain_silu(act)
        self.triton = self.silu and triton_swiglu.available(g, u)
        if self.triton:
            self.h = triton_swiglu.silu_mul(g, u)
            return
        if self.silu:
            self.activated = F.silu(g)
        elif for_backward:
            with torch.enable_grad():
                self.leaf = g.detach().requires_grad_(True)
                self.graph = act(self.leaf)
            self.activated = self.graph.detach()
        else:
            self.activated = act(g)
        self.h = self.activated * u

    def backward(self, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(∂g, ∂u) for ∂h (N, d_ff), which is overwritten (the caller's own temporary)."""
        self.h = None  # no longer needed: free it before the gradients are allocated
        if self.triton and dh.is_contiguous():
            return triton_swiglu.silu_mul_backward(dh, self.g, self.u)
        activated = self.activated if not self.triton else F.silu(self.g)
        du = dh * activated
        through_act = dh.mul_(self.u)  # ∂h ⊙ u
        if self.silu:  # ∂g over ∂h ⊙ u (the same elements)
            return torch.ops.aten.silu_backward.grad_input(through_act, self.g, grad_input=through_act), du
        return torch.autograd.grad(self.graph, self.leaf, through_act)[0], du


def is_plain_silu(act: nn.Module) -> bool:
    """True for torch's SiLU and transformers' SiLUActivation (``F.silu``), whose forward is the
    class's own (not replaced on the instance, e.g. by a kernel library)."""
    cls = type(act)
    plain = cls is nn.SiLU or (cls.__name__ == "SiLUActivation" and cls.__module__ == "transformers.activations")
    return plain and "forward" not in act.__dict__


class GatedMlpFunction(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))``; see the module docstring.

    Args of ``apply``: x (..., d); for gate, up and down in turn the four tensors weight, bias, A,
    B (bias None where absent) as positional tensors so autograd sees them; act (the MLP's
    activation module); the three ``Projection`` records (scaling and merge choices); the three
    magnitudes (None for LoRA; a magnitude makes that projection DoRA). Returns (..., d).
    """

    @staticmethod
    def forward(
        ctx,
        x,
        gate_w,
        gate_b,
        gate_A,
        gate_B,
        up_w,
        up_b,
        up_A,
        up_B,
        down_w,
        down_b,
        down_A,
        down_B,
        act,
        plans,
        gate_m,
        up_m,
        down_m,
    ):
        gate_p, up_p, down_p = plans
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        gate_xa, up_xa = stacked_inputs(x2, (gate_A, up_A))  # both x Aᵀ from one GEMM
        g, gate_xa, gate_c, gate_merged = project(x2, gate_w, gate_b, gate_A, gate_B, gate_m, gate_p, gate_xa)
        u, up_xa, up_c, up_merged = project(x2, up_w, up_b, up_A, up_B, up_m, up_p, up_xa)
        h = GateProduct(act, g, u, for_backward=False).h
        y, down_xa, down_c, down_merged = project(h, down_w, down_b, down_A, down_B, down_m, down_p)
        # y only for DoRA's ∂m (the output itself: no copy).
        ctx.save_for_backward(
            x2,
            g,
            u,
            y if down_m is not None else None,
            gate_xa,
            up_xa,
            down_xa,
            gate_c,
            up_c,
            down_c,
            gate_merged,
            up_merged,
            down_merged,
            gate_w,
            gate_b,
            gate_A,
            gate_B,
            gate_m,
            up_w,
            up_b,
            up_A,
            up_B,
            up_m,
            down_w,
            down_b,
            down_A,
            down_B,
            down_m,
        )
        ctx.act, ctx.plans, ctx.lead = act, plans, lead
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        (
            x2,
            g,
            u,
            y,
            gate_xa,
            up_xa,
            down_xa,
            gate_c,
            up_c,
            down_c,
            gate_merged,
            up_merged,
            down_merged,
            gate_w,
            gate_b,
            gate_A,
            gate_B,
            gate_m,
            up_w,
            up_b,
            up_A,
            up_B,
            up_m,
            down_w,
            down_b,
            down_A,
            down_B,
            down_m,
        ) = ctx.saved_tensors
        gate_p, up_p, down_p = ctx.plans
        needs = ctx.needs_input_grad
        need_x = needs[0]
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        gate = GateProduct(ctx.act, g, u)  # h recomputed, not kept from forward
        dh, d_down_A, d_down_B, d_down_m = project_backward(
            dy,
            gate.h,
            down_xa,
            y,
            down_c,
            down_merged,
            down_w,
            down_b,
            down_A,
            down_B,
            down_m,
            down_p,
            True,
            needs[11],
            needs[12],
            needs[17],
        )
        dg, du = gate.backward(dh)
        # Both ∂A from one GEMM when both A are trained (LoRA-FA's are not).
        ranks = [gate_A.shape[0], up_A.shape[0]]
        buffer, (gate_columns, up_columns) = stacked_gb_columns(x2, ranks, needs[3] and needs[7])
        dx, d_gate_A, d_gate_B, d_gate_m = project_backward(
            dg,
            x2,
            gate_xa,
            g,
            gate_c,
            gate_merged,
            gate_w,
            gate_b,
            gate_A,
            gate_B,
            gate_m,
            gate_p,
            need_x,
            needs[3],
            needs[4],
            needs[15],
            gb_columns=gate_columns,
        )
        dx, d_up_A, d_up_B, d_up_m = project_backward(
            du,
            x2,
            up_xa,
            u,
            up_c,
            up_merged,
            up_w,
            up_b,
            up_A,
            up_B,
            up_m,
            up_p,
            need_x,
            needs[7],
            needs[8],
            needs[16],
            grad_x=dx,
            gb_columns=up_columns,
        )
        if buffer is not None:
            d_gate_A, d_up_A = stacked_input_grads(x2, buffer, ranks)
        d_gate_b = dg.sum(0) if needs[2] else None
        d_up_b = du.sum(0) if needs[6] else None
        d_down_b = dy.sum(0) if needs[10] else None
        if dx is not None:
            dx = dx.view(*ctx.lead, dx.shape[-1])
        return (
            dx,
            None,
            d_gate_b,
            d_gate_A,
            d_gate_B,
            None,
            d_up_b,
            d_up_A,
            d_up_B,
            None,
            d_down_b,
            d_down_A,
            d_down_B,
            None,
            None,
            d_gate_m,
            d_up_m,
            d_down_m,
        )
