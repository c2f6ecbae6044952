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

from ..kernels import FusedOperands, fused_linear
from .base import LoraLayer


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
