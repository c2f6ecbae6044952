"""Fused gated MLP with LoRA on all three projections (Llama, Mistral, Qwen, Gemma, ...).

    g = gate(x),  u = up(x),  h = act(g) ⊙ u,  y = down(h)         each projection W0 + s B A

x: (N, d), g, u, h: (N, d_ff), y: (N, d). Run as separate layers, a LoRA step must keep h for
the down projection's ∂A (= s (g_y B)ᵀ h), on top of what the frozen model keeps (g for act's
backward, act(g) and u for the product's): three (N, d_ff) tensors plus h. This function keeps
x, g and u only and recomputes act(g) and h in backward, so the MLP of a LoRA step holds less
than the frozen MLP does; the price is two extra elementwise passes in backward. (Keeping h and
recomputing only act(g) measured no faster on the H200 benchmark, at +1 GiB of peak memory.)

The two input gradients (through gate and up) are accumulated into one tensor by the GEMMs
themselves (``addmm_``), where autograd would add two (N, d) tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lora_linear import lora_backward, lora_forward


@dataclass(frozen=True)
class Projection:
    """What one projection's computation needs besides its tensors: its scaling and whether to
    use the merged weight W0 + sBA forward / backward (see ``lora_linear.py``)."""

    scaling: float
    merge_forward: bool
    merge_backward: bool


class GatedMlpFunction(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))``; see the module docstring.

    Args of ``apply``: x (..., d); act (the MLP's activation module); the nine tensors
    (weight, A, B for gate, up, down) and three biases as positional tensors so autograd sees
    them; the three ``Projection`` records (scaling and merge choices).
    Returns (..., d).
    """

    @staticmethod
    def forward(ctx, x, act, gate_w, gate_b, gate_A, gate_B, up_w, up_b, up_A, up_B, down_w, down_b, down_A,
                down_B, plans):
        gate_p, up_p, down_p = plans
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        g, gate_xa = lora_forward(x2, x2, gate_w, gate_b, gate_A, gate_B, gate_p.scaling, gate_p.merge_forward)
        u, up_xa = lora_forward(x2, x2, up_w, up_b, up_A, up_B, up_p.scaling, up_p.merge_forward)
        h = act(g) * u
        y, down_xa = lora_forward(h, h, down_w, down_b, down_A, down_B, down_p.scaling, down_p.merge_forward)
        ctx.save_for_backward(x2, g, u, gate_xa, up_xa, down_xa, gate_w, gate_A, gate_B, up_w, up_A, up_B,
                              down_w, down_A, down_B)
        ctx.act, ctx.plans, ctx.lead = act, plans, lead
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        (x2, g, u, gate_xa, up_xa, down_xa, gate_w, gate_A, gate_B, up_w, up_A, up_B, down_w, down_A,
         down_B) = ctx.saved_tensors
        gate_p, up_p, down_p = ctx.plans
        needs = ctx.needs_input_grad
        need_x = needs[0]
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        with torch.enable_grad():
            g_leaf = g.detach().requires_grad_(True)
            activated = ctx.act(g_leaf)                                # recomputed, not kept from forward
        h = activated.detach() * u
        dh, _, d_down_A, d_down_B = lora_backward(dy, h, down_xa, down_w, down_A, down_B, down_p.scaling,
                                                  down_p.merge_backward, True, needs[12], needs[13])
        del h
        du = dh * activated.detach()
        (dg,) = torch.autograd.grad(activated, g_leaf, dh.mul_(u))      # dh ⊙ u through act
        dx, _, d_gate_A, d_gate_B = lora_backward(dg, x2, gate_xa, gate_w, gate_A, gate_B, gate_p.scaling,
                                                  gate_p.merge_backward, need_x, needs[4], needs[5])
        dx, _, d_up_A, d_up_B = lora_backward(du, x2, up_xa, up_w, up_A, up_B, up_p.scaling, up_p.merge_backward,
                                              need_x, needs[8], needs[9], grad_x=dx)
        d_gate_b = dg.sum(0) if needs[3] else None
        d_up_b = du.sum(0) if needs[7] else None
        d_down_b = dy.sum(0) if needs[11] else None
        if dx is not None:
            dx = dx.view(*ctx.lead, dx.shape[-1])
        return (dx, None, None, d_gate_b, d_gate_A, d_gate_B, None, d_up_b, d_up_A, d_up_B, None, d_down_b,
                d_down_A, d_down_B, None)
