"""A gated MLP whose gate, up and down projections serve a pool's slots, through one fused call
over a prefill's rows or a decode batch on a GPU (``kernels/slot_mlp.py``):

    y = down(silu(gate(x)) ⊙ up(x))      each projection W x + B[s] A[s] x     x: (..., d)

``slot_mlp_output`` gathers the three layers' base weights and slot stacks and returns y, or None
when any layer must run its own path (then the MLP's own forward runs, each layer through
``LoraLinear.slots_only``). The patch that calls it in place of a recognised MLP's forward is
``patching/slot_mlp.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import triton_slot_mlp, tuning
from ..kernels.gated_mlp import is_plain_silu
from ..kernels.multi_lora import shared_form
from ..kernels.slot_mlp import slot_mlp_rows, slot_mlp_tokens
from .linear import calls_hooks
from .slot_siblings import shared_slot_operands


def slot_mlp_output(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``mlp(x)`` (..., d) for a gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``)
    serving slots, through the fused call: a prefill's rows or a decode batch; None where it does
    not apply (see ``kernels/slot_mlp.py``; also a named adapter's rows, a bias, another activation
    than SiLU or one with hooks, a layer off the fast path)."""
    # Cheap refusals first: every call of every MLP passes here, on the CPU too.
    if not tuning.SLOT_MLP or torch.is_grad_enabled() or not triton_slot_mlp.available(x):
        return None
    layers = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    routing = layers[0].__dict__.get("row_adapters")
    if routing is None or routing.stack_names or not is_plain_silu(mlp.act_fn) or calls_hooks(mlp.act_fn):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    plan = routing.slot_plan(x.shape[0], x2.shape[0], x.device)
    if plan is None:
        return None
    form = shared_form(plan, x)
    if form is None:
        return None
    operands = shared_slot_operands(layers, routing, x, plan)
    if operands is None or any(bias is not None for _, bias, _ in operands):
        return None
    weights = [weight for weight, _, _ in operands]
    stacks = [stack for _, _, stack in operands]
    fused = slot_mlp_tokens if form == "tokens" else slot_mlp_rows
    y = fused(x2, weights, plan, [s.A for s in stacks], [s.B for s in stacks])
    return None if y is None else y.view(*x.shape[:-1], y.shape[-1])
