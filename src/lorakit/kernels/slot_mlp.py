"""A gated MLP served from slot stacks in one fused pass over its widest activations (GPU only):

    y = down(silu(gate(x)) ⊙ up(x))      each projection W x + B[s] A[s] x, s the token's slot

    x: (N, d)   W_gate, W_up: (F, d)   W_down: (d, F)   A_k: (S, r_k, d_in)   B_k: (S, d_out, r_k)

1. h = x [A_gate; A_up][s]ᵀ: a prefill's rows, one batched GEMM (``multi_lora.rows_shrink``); a
   decode batch, BGMV's shrink launch (``triton_bgmv.shrink_planes``);
2. g = x W_gateᵀ, u = x W_upᵀ: the base GEMMs, nothing else on their outputs;
3. ``triton_slot_mlp``: the expands added to g and u, the SiLU gate, the down projection's shrink,
   one pass reading g and u and writing a (N, F);
4. the down projection's base GEMM and expand (a prefill: the expand written, the base GEMM
   accumulated onto it, ``multi_lora.expand_then_base``; a decode batch: BGMV's expand launch).

Against the layers one by one (``LoraLinear.slots_only`` through ``SlotSiblings``), a prefill
spares four passes over (N, F) tensors per MLP (the gate's and the up's products each written and
read back by their base GEMMs, silu(g) written and read, a read by the down projection's shrink)
and a decode step three launches (the gate's and the up's expand, the down projection's shrink,
silu and the product become one; docs/benchmarks.md). Tensors only; ``layers/slot_mlp.py``
gathers them from a model's MLP.
"""

from __future__ import annotations

import torch

from . import triton_bgmv, triton_slot_mlp, tuning
from .multi_lora import SlotPlan, expand_then_base, rows_shrink, takes_bgmv


def slot_mlp_rows(
    x: torch.Tensor, weights: list[torch.Tensor], plan: SlotPlan, A_stacks: list, B_stacks: list
) -> torch.Tensor | None:
    """y (N, d) for x (N, d) contiguous; weights, A_stacks, B_stacks: gate's, up's, down's (no
    biases, no DoRA slots). None where the fused pass does not apply: not a prefill's rows
    (``plan.rows``), BGMV's batches, autograd recording, autocast, no Triton for these tensors
    (the CPU), dtypes, layouts or ranks it does not take, ``tuning.SLOT_MLP`` off (or the knobs of
    the per-layer forms it stands for: ``SHARED_SIBLINGS``, ``BATCHED_ROWS``, ``LORA_FIRST``)."""
    if (
        not _takes(x, weights, plan, A_stacks, B_stacks)
        or not tuning.BATCHED_ROWS
        or not tuning.LORA_FIRST
        or plan.rows is None
        or takes_bgmv(plan, x)
        or any(A.shape[0] != plan.num_slots for A in A_stacks)
    ):
        return None
    (W_gate, W_up, W_down), (A_gate, A_up, A_down), (B_gate, B_up, B_down) = weights, A_stacks, B_stacks
    T, row_slots = plan.rows
    h = rows_shrink(x, plan, [A_gate, A_up])  # (N, r_gate + r_up)
    g, u = torch.mm(x, W_gate.t()), torch.mm(x, W_up.t())  # (N, F) each
    a, h_down = triton_slot_mlp.gate_product(g, u, h, B_gate, B_up, A_down, row_slots, T)
    del g, u  # before the down projection's output is allocated
    return expand_then_base(h_down.to(x.dtype), a, W_down, plan, B_down)


def slot_mlp_tokens(
    x: torch.Tensor, weights: list[torch.Tensor], plan: SlotPlan, A_stacks: list, B_stacks: list
) -> torch.Tensor | None:
    """``slot_mlp_rows`` for a decode batch (BGMV's regime: ``takes_bgmv``, each token its own
    slot; a CUDA graph's plan included). None where it does not apply: other batches, autograd
    recording, autocast, no Triton for these tensors, ranks it does not take, a plan with no
    adapter (the layers add nothing then), ``tuning.SLOT_MLP`` or ``SHARED_SIBLINGS`` off."""
    takes = _takes(x, weights, plan, A_stacks, B_stacks) and takes_bgmv(plan, x)
    if not takes or not (plan.graphed or plan.present):
        return None
    (W_gate, W_up, W_down), (A_gate, A_up, A_down), (B_gate, B_up, B_down) = weights, A_stacks, B_stacks
    h = triton_bgmv.shrink_planes(x, plan.token_slots, [A_gate, A_up])  # (split, N, r_gate + r_up)
    g, u = torch.mm(x, W_gate.t()), torch.mm(x, W_up.t())
    a, h_down = triton_slot_mlp.gate_product_tokens(g, u, h, B_gate, B_up, A_down, plan.token_slots)
    y = torch.mm(a, W_down.t())
    triton_bgmv.expand_planes([y], h_down, plan.token_slots, [B_down])
    return y


def _takes(x: torch.Tensor, weights: list, plan: SlotPlan, A_stacks: list, B_stacks: list) -> bool:
    """What both forms need: the knobs on (the fused MLP is the gate's and the up's shared call
    carried further, so switching sharing off, a benchmark's per-layer case, switches it off
    too), Triton for these tensors, ranks the kernels take, nothing recorded for autograd, no
    autocast, the plan's tokens, contiguous operands, 2-D weights."""
    return (
        tuning.SLOT_MLP
        and tuning.SHARED_SIBLINGS
        and triton_slot_mlp.available(x, *weights, *A_stacks, *B_stacks)
        and triton_slot_mlp.takes_ranks(A_stacks)
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled(x.device.type)
        and plan.tokens == x.shape[0]
        and all(t.is_contiguous() for t in (x, *A_stacks, *B_stacks))
        and all(w.dim() == 2 for w in weights)
    )
