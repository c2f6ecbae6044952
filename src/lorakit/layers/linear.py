"""`LoraLinear`: LoRA on ``nn.Linear`` and on transformers' ``Conv1D`` (GPT-2's transposed linear).

    h = W0 x + b + s * B (A dropout(x))       A: (r, d_in)   B: (d_out, r)

``Conv1D`` stores its weight as (d_in, d_out) and computes ``x @ W + b``; the adapter is the same
(A, B) pair, only the dense update is transposed when merged ("fan_in_fan_out" in PEFT's terms).

VeRA adapters (see ``layers/vera.py``) live here too: their two trained tensors are the scaling
vectors, kept in the same slots — ``lora_A[name]`` holds d (r,), ``lora_B[name]`` holds b (d_out,) —
so adding, freezing, counting, saving and deleting work as for LoRA; ``vera_projection[name]`` is
the frozen random pair they scale:  h = W0 x + b ⊙ (B_s (d ⊙ (A_s x))).

``forward`` is the one place that chooses between the reference formula (``LoraLayer.forward``)
and the fused functions of ``kernels/``: ``fused_operands`` says whether a call is covered and
hands the kernels its tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import FusedOperands, fused_linear
from ..kernels.casting import accumulation_dtype
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
        self.vera_projection = nn.ModuleDict()
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
        # --- variant-specific: what each variant changes on the fused path --------------------
        # (VeRA, DoRA, AdaLoRA, DyLoRA; LoRA-FA's frozen A needs nothing here.) Everything else in
        # this method is the same for every variant.
        if name in modules["vera_projection"]._modules:
            return None  # VeRA: the shared random pair scaled by vectors is not a fused (A, B)
        magnitude = modules["lora_magnitude_vector"]._parameters.get(name)  # DoRA's m, else None
        if magnitude is not None and dropout is not None:
            return None  # DoRA's fused function has no dropout
        if name in modules["lora_E"]._parameters or name in state["nested_rank"]:
            A, B, scaling = self.live_factors(name)  # AdaLoRA / DyLoRA: derived factors
        else:
            A, B = modules["lora_A"]._parameters[name], modules["lora_B"]._parameters[name]
            scaling = state["scaling"][name]
        # --- end of the variant-specific block ---------------------------------------------------
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

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        if name in self.vera_projection:
            del self.vera_projection[name]

    def peft_key(self, name: str, slot: str) -> str:
        if name in self.vera_projection:
            return {"lora_A": "vera_lambda_d", "lora_B": "vera_lambda_b"}[slot]
        return super().peft_key(name, slot)

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
        if name in self.vera_projection:
            d, b = self.lora_A[name], self.lora_B[name]
            A, B = (t.to(d.dtype) for t in self.vera_projection[name].sliced(self.in_dim, self.out_dim))
            return b * F.linear(d * F.linear(x, A), B)
        A, B, s = self.live_factors(name)
        return F.linear(F.linear(x, A), B) * s

    def base_output_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.unmerged_weight().to(x.dtype)
        return x @ weight if self.fan_in_fan_out else F.linear(x, weight)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with ``s B A`` the update, in float32 or wider; for VeRA the shared pair
        scaled by its vectors, ``(d ⊙ A_s, b ⊙ B_s, 1)`` of shapes (r, d_in), (d_out, r)."""
        if name not in self.vera_projection:
            return super().factors(name)
        d, b = (t.to(accumulation_dtype(t.dtype)) for t in (self.lora_A[name], self.lora_B[name]))
        A, B = (t.to(d.dtype) for t in self.vera_projection[name].sliced(self.in_dim, self.out_dim))
        return d[:, None] * A, b[:, None] * B, 1.0

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.dense_update(*self.factors(name))

    def dense_update(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        """``s * B A`` laid out like the base weight (transposed for Conv1D)."""
        delta = (B @ A) * scaling
        return delta.T if self.fan_in_fan_out else delta
