"""`SlotSiblings`: a serving pool's projections of one input (attention's q, k, v; an MLP's gate
and up) through one multi-adapter call for all of them.

    out_k = x W_kᵀ + b_k + B_k[s_n] A_k[s_n] x[n]      x: (..., d_in), out_k: (..., d_k)

A decode step makes BGMV's two launches per adapted projection; replayed in a CUDA graph, each
launch is a node costing a few microseconds whatever its work (docs/benchmarks.md). Projections
that the model calls on the same input, one after another, share a record: the first of them
called computes every sibling's base GEMM and one shrink and one expand for all of them
(``triton_bgmv.sibling_bgmv``: two launches for all of them, where each alone makes two), keeps
the others' outputs, and each sibling then called with the very same input tensor returns its
kept output. A prefill's rows (each row one slot) share the
shrink instead: one batched GEMM with the siblings' A stacked reads x once for all of them
(``multi_lora.siblings_then_base``). Any other call (another input, a DoRA slot, a bias in a
prefill, tokens in short runs) drops what is kept, and each layer runs alone
(``LoraLinear.slots_only``).

The pool gives records only to modules whose ``forward`` code is recognised as calling the
siblings on one input (``patching/slot_siblings.py``). Under ``torch.inference_mode``, where a
server runs, tensors keep no version counter, so the record trusts that recognised code not to
change the input in place between the calls, and checks only that it is the same tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import triton_bgmv, tuning
from ..kernels.multi_lora import SlotPlan, shared_form, siblings_then_base
from .linear import calls_hooks


class SlotSiblings:
    """The layers (LoRA layers with slot stacks) that one module calls on the same input, and the
    outputs computed ahead for them; see the module docstring."""

    def __init__(self, layers: list[nn.Module]) -> None:
        if not 2 <= len(layers) <= 3:
            raise ValueError(f"slot siblings are two or three projections; got {len(layers)}")
        self.layers = tuple(layers)
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # position -> (input, output)

    def output(self, layer: nn.Module, x: torch.Tensor, x2: torch.Tensor, plan: SlotPlan) -> torch.Tensor | None:
        """``layer(x)`` with the rows' slots added (``plan``), from the shared call; None when
        ``layer`` must run alone. x2: x as (N, d_in)."""
        position = self.layers.index(layer)
        kept = self.kept.pop(position, None)
        if kept is not None and kept[0] is x:
            return kept[1]
        self.kept.clear()  # a new input: whatever was kept is stale
        outs = self._shared(layer, x, x2, plan)
        if outs is None:
            return None
        self.kept = {i: (x, out) for i, out in enumerate(outs) if i != position}
        return outs[position]

    def _shared(self, caller: nn.Module, x: torch.Tensor, x2: torch.Tensor, plan: SlotPlan) -> list | None:
        """Every sibling's output on x, or None when the shared call does not cover them."""
        form = shared_form(plan, x)
        if form is None:
            return None  # neither shared form applies (the CPU's decode batches): no checks per layer
        operands = self._operands(caller, x, plan)
        if operands is None:
            return None
        weights, biases, stacks = zip(*operands)
        A_stacks, B_stacks = [s.A for s in stacks], [s.B for s in stacks]
        if form == "tokens":  # the stacks share x's dtype and device (``shared_slot_operands``)
            # A decode batch: the base GEMMs, then one shrink and one expand for all of them.
            outs = [F.linear(x, weight, bias) for weight, bias in zip(weights, biases)]
            if plan.graphed or plan.present:
                flat = [out.view(-1, out.shape[-1]) for out in outs]
                triton_bgmv.sibling_bgmv(flat, x2, plan.token_slots, A_stacks, B_stacks)
            return outs
        # A prefill's rows: one shrink over the A stacked, each product written, its base onto it.
        flat = siblings_then_base(x2, list(weights), list(biases), plan, A_stacks, B_stacks)
        if flat is None:
            return None
        return [out.view(*x.shape[:-1], out.shape[-1]) for out in flat]

    def _operands(self, caller: nn.Module, x: torch.Tensor, plan: SlotPlan) -> list | None:
        """(weight, bias, stack) of each sibling when they can share a call on x, else None."""
        if not tuning.SHARED_SIBLINGS:
            return None
        return shared_slot_operands(self.layers, caller.__dict__["row_adapters"], x, plan)


def shared_slot_operands(layers, routing, x: torch.Tensor, plan: SlotPlan) -> list | None:
    """(weight, bias, stack) of each of ``layers`` (LoRA layers) when one call may compute them
    all for ``routing``'s rows: every layer on the fast path, a plain linear layer on x's device
    without hooks, serving those rows from a stack of x's dtype without a DoRA slot, outside autocast; else
    None. x (..., d): the first layer's input (only its dtype and device are read)."""
    if torch.is_autocast_enabled(x.device.type):
        return None
    operands = []
    for layer in layers:
        state = layer.__dict__
        stack = state.get("slot_stack")
        if (
            stack is None
            or not state.get("fast_path")  # a layer kept on its reference forward
            or state.get("row_adapters") is not routing
            or state["disabled"]
            or state["merged_adapters"]
            or stack.gm1 is not None
            or stack.dtype != x.dtype
            or stack.A.shape[0] != plan.num_slots
        ):
            return None
        base = state["_modules"]["base_layer"]
        if type(base) is not nn.Linear or base._parameters["weight"].device != x.device:
            return None
        # A hook (accelerate's offloading, a user's) would see its module skipped: the shared
        # call runs the others' GEMMs itself.
        if calls_hooks(layer) or calls_hooks(base):
            return None
        operands.append((base._parameters["weight"], base._parameters["bias"], stack))
    return operands
