"""`LoraLinear`: LoRA on ``nn.Linear`` and on transformers' ``Conv1D`` (GPT-2's transposed linear).

    h = W0 x + b + s * B (A dropout(x))       A: (r, d_in)   B: (d_out, r)

``Conv1D`` stores its weight as (d_in, d_out) and computes ``x @ W + b``; the adapter is the same
(A, B) pair, only the dense update is transposed when merged ("fan_in_fan_out" in PEFT's terms).

``forward`` is the one place that chooses between the reference formula (``LoraLayer.forward``)
and the fused functions of ``kernels/``: ``fused_operands`` says whether a call is covered and
hands the kernels its tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterStateError
from ..kernels import FusedOperands, fused_linear
from ..kernels.multi_lora import add_multi_lora, lora_then_base
from .base import LoraLayer
from .slot_stack import SlotStack


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (checked by name so transformers need not be imported)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class LoraLinear(LoraLayer):
    """LoRA around a linear layer; see the module docstring for the formula and shapes."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.unit_dim = 1 if self.fan_in_fan_out else 0
        # Use the fused path (``kernels/``) when it applies; False forces the reference forward.
        self.fast_path = True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.fast_path and not args and not kwargs:
            if self.__dict__["row_adapters"] is not None:
                out = self.slots_only(x)
                if out is not None:
                    return out
            # q, k and v of one attention module share a fused call (patching/attention_siblings.py).
            siblings = self.__dict__.get("siblings")
            out = siblings.output(self, x) if siblings is not None else None
            if out is not None:
                return out
            operands = self.fused_operands(x)
            if operands is not None:
                return fused_linear(x, operands)
        return super().forward(x, *args, **kwargs)

    def fused_operands(self, x: torch.Tensor) -> FusedOperands | None:
        """The tensors of this call on x (..., d_in) for the fused functions, or None when the call
        is not covered (see ``kernels/dispatch.py``) and the reference forward must run. A and B
        come back in x's dtype, except under autocast, where the kernels cast everything."""
        # Runs on every call of every layer, so it reads the module's dicts directly: nn.Module's
        # attribute lookup (and LoraLayer's fallback to the base layer) cost more host time than
        # the rank-r GEMMs it guards (docs/benchmarks.md).
        state = self.__dict__
        if not state.get("fast_path") or state["disabled"] or state["row_adapters"] is not None:
            return None
        modules = state["_modules"]
        base = modules["base_layer"]
        if type(base) is not nn.Linear:
            return None
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        active = state["active_adapters"]
        if weight.requires_grad or len(active) != 1 or state["merged_adapters"]:
            return None
        name = active[0]
        if name not in modules["lora_A"]._parameters:
            return None
        dropout = modules["lora_dropout"]._modules[name]
        dropout = dropout if type(dropout) is nn.Dropout and dropout.training and dropout.p > 0 else None
        # What the adapter's variant computes on the fused path: None keeps it on the reference
        # path (VeRA); DoRA adds its magnitude, AdaLoRA and nested ranks derive A and B.
        fused = state["variants"][name].fused_factors(self, name)
        if fused is None:
            return None
        A, B, scaling, magnitude = fused
        if magnitude is not None and dropout is not None:
            return None  # the fused function with a magnitude (DoRA's) has no dropout
        if torch.is_autocast_enabled(x.device.type):
            return FusedOperands(weight, bias, A, B, scaling, magnitude, dropout)  # the kernels cast
        if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype) or A.dtype != B.dtype:
            return None
        if A.dtype != x.dtype:
            if not (A.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)):
                return None
            # fp32 adapters on a half-precision base: computed in the base's dtype (as autocast
            # would), their gradients summed back into fp32 by autograd.
            A, B = A.to(x.dtype), B.to(x.dtype)
        return FusedOperands(weight, bias, A, B, scaling, magnitude, dropout)

    # --- routed batches: many adapters through the multi-adapter kernels ------------------------
    def slots_only(self, x: torch.Tensor) -> torch.Tensor | None:
        """A serving pool's forward when no row names an adapter (every row a slot or the base)
        and nothing is recorded for autograd: W0 x + b, then the rows' slots added in place by
        ``add_multi_lora`` (a prefill's rows: their products first, W0 x accumulated onto them,
        ``lora_then_base``). None when the call is not that one (the general routed path runs).
        A decode step makes this call once per adapted projection, so it reads the module's dicts
        directly, as ``fused_operands`` does (the general path's host time is most of a GPU
        decode step's; docs/benchmarks.md)."""
        state = self.__dict__
        routing, stack = state["row_adapters"], state.get("slot_stack")
        if stack is None or routing.stack_names or state["disabled"] or state["merged_adapters"]:
            return None
        base = state["_modules"]["base_layer"]
        if type(base) is not nn.Linear or torch.is_grad_enabled():
            return None
        if calls_hooks(base):
            return None  # the base layer must be called (accelerate's offloading moves its weight)
        bias, weight = base._parameters["bias"], base._parameters["weight"]
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        plan = routing.slot_plan(x.shape[0], x2.shape[0], x.device)
        siblings = state.get("slot_siblings")
        if siblings is not None and plan is not None:
            # q, k and v (gate and up) of one module share one call (layers/slot_siblings.py).
            out = siblings.output(self, x, x2, plan)
            if out is not None:
                return out
        if plan is not None:
            # A prefill's rows: the adapters' products first, the base GEMM accumulated onto them.
            out2 = lora_then_base(x2, weight, bias, plan, stack.A, stack.B, stack.gm1)
            if out2 is not None:
                return out2.view(*x.shape[:-1], out2.shape[-1])
        out = F.linear(x, weight, bias)
        if plan is not None:
            _add_slots(out.view(-1, out.shape[-1]), x2, plan, stack, bias)
        return out

    def add_stacked(self, x: torch.Tensor, base_out: torch.Tensor, named: list[str]) -> tuple[torch.Tensor, set[str]]:
        """The rows' slots of ``slot_stack``, and the named adapters a stack can serve (see
        ``stackable``), added by ``kernels/multi_lora.py``; returns (result, names served)."""
        routing = self.row_adapters
        stack = self.__dict__.get("slot_stack")
        rows, d_in = x.shape[0], x.shape[-1]
        x2 = x.reshape(-1, d_in)
        tokens = x2.shape[0]
        slot_plan = routing.slot_plan(rows, tokens, x.device) if stack is not None else None
        served = self.stackable(named, x, base_out)
        if slot_plan is None and not served:
            return base_out, set()
        out2 = base_out.reshape(tokens, -1)
        bias = self.output_bias()
        if slot_plan is not None:
            if self.merged_adapters and stack.gm1 is not None:
                raise AdapterStateError("serving DoRA adapters from slots needs the model's adapters unmerged")
            out2 = _add_slots(out2, x2, slot_plan, stack, bias)
        if served:
            named_stack = self.named_stack(routing.stack_names, served, x2.dtype)
            plan = routing.name_plan(rows, tokens, x.device)
            out2 = add_multi_lora(out2, x2, plan, named_stack.A, named_stack.B, named_stack.gm1, bias)
        return out2.reshape(base_out.shape), served

    def stackable(self, named: list[str], x: torch.Tensor, base_out: torch.Tensor) -> set[str]:
        """The adapters among ``named`` that a stack serves: LoRA-family adapters whose forward
        the fused kernels compute (the variant's ``fused_factors``; DoRA included), dropout
        inactive, nothing autograd must see (no grad, or every tensor involved frozen), the
        fast path on, and x in the base weight's dtype."""
        state = self.__dict__
        if not named or not state.get("fast_path") or x.dtype != self.base_weight.dtype:
            return set()
        grad = torch.is_grad_enabled() and (x.requires_grad or base_out.requires_grad)
        served = set()
        for name in named:
            dropout = state["_modules"]["lora_dropout"]._modules[name]
            if type(dropout) is nn.Dropout and dropout.training and dropout.p > 0:
                continue
            variant = state["variants"][name]
            if variant.fused_factors(self, name) is None:
                continue
            if torch.is_grad_enabled() and (grad or any(t.requires_grad for t in variant.trained_tensors(self, name))):
                continue
            served.add(name)
        return served

    def named_stack(self, names: tuple[str, ...], served: set[str], dtype: torch.dtype) -> SlotStack:
        """A `SlotStack` with adapter ``names[k - 1]`` in slot k for those in ``served`` (zero
        otherwise), cached until the adapters' tensors change (identity and version), or the
        names, or the dtype."""
        key = (names, tuple(sorted(served)), dtype, tuple(self._fingerprint(n) for n in names if n in served))
        cached = self.__dict__.get("_named_stack")
        if cached is not None and cached[0] == key and None not in key[3]:
            return cached[1]
        factors = {name: self.variants[name].fused_factors(self, name) for name in served}
        stack = SlotStack(self, len(names) + 1, max(A.shape[0] for A, _, _, _ in factors.values()), dtype)
        for k, name in enumerate(names, start=1):
            if name in factors:
                A, B, s, magnitude = factors[name]
                stack.write(k, A.detach(), B.detach(), s, None if magnitude is None else magnitude.detach())
        self.__dict__["_named_stack"] = (key, stack)
        return stack

    def _fingerprint(self, name: str) -> tuple | None:
        """What a stack built from adapter ``name`` depends on; None when it cannot be told
        (inference tensors keep no version counter)."""
        # Runs per layer per routed forward: the module's dicts directly (as fused_operands does).
        state = self.__dict__
        modules = state["_modules"]
        variant = state["variants"][name]
        tensors = [
            modules["lora_A"]._parameters[name],
            modules["lora_B"]._parameters[name],
            modules["base_layer"]._parameters["weight"],
        ]
        for slot in variant.slots:  # the variant's own tensors (DoRA's m, AdaLoRA's E)
            holder = modules.get(slot)
            if holder is not None and name in holder._parameters:
                tensors.append(holder._parameters[name])
        try:
            versions = tuple((id(t), t._version) for t in tensors)
        except RuntimeError:
            return None
        return versions, state["scaling"][name], state["nested_rank"].get(name), id(variant)

    @property
    def in_dim(self) -> int:
        weight = self.base_weight
        return weight.shape[0] if self.fan_in_fan_out else weight.shape[1]

    @property
    def out_dim(self) -> int:
        weight = self.base_weight
        return weight.shape[1] if self.fan_in_fan_out else weight.shape[0]

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_dim), (self.out_dim, r)

    def apply_lora(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B, s = self.live_factors(name)
        return F.linear(F.linear(x, A), B) * s

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.unmerged_weight().to(x.dtype)
        return x @ weight if self.fan_in_fan_out else F.linear(x, weight)

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.dense_update(*self.factors(name))

    def dense_update(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        """``s * B A`` laid out like the base weight (transposed for Conv1D)."""
        delta = (B @ A) * scaling
        return delta.T if self.fan_in_fan_out else delta


def calls_hooks(module: nn.Module) -> bool:
    """True when calling ``module`` runs hooks: its own forward (pre-)hooks, or accelerate's
    ``_hf_hook`` (which moves an offloaded weight in). Code that would use its weight without
    calling it (the serving pool's lean paths) must call it instead."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or "_hf_hook" in module.__dict__


def _add_slots(out2: torch.Tensor, x2: torch.Tensor, plan, stack: SlotStack, bias) -> torch.Tensor:
    """The rows' slots of ``stack`` added to ``out2`` (N, d_out) for x2 (N, d_in), in the stack's dtype."""
    xs = x2 if x2.dtype == stack.dtype else x2.to(stack.dtype)
    return add_multi_lora(out2, xs, plan, stack.A, stack.B, stack.gm1, bias)
