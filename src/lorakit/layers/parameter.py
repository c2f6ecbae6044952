"""`LoraParameter`: LoRA on a weight that is a parameter of a module rather than a layer of its own.

Mixture-of-experts blocks store their experts as one stacked parameter (transformers 5:
``experts.gate_up_proj`` of shape (E, d_out, d_in), read inside the block's own forward), so there
is no linear layer to wrap. The adapter then changes the parameter itself, each expert by its own
low-rank update:

    W_e = W0_e + s B_e A_e      A_e: (r, d_in),  B_e: (d_out, r),  e = 0 .. E-1

A 2-D parameter (d_out, d_in) is the case E = 1. A 3-D parameter is (E, d_out, d_in), or
(E, d_in, d_out) when its module says ``is_transposed`` (gpt-oss-style experts).

The factors are stored as PEFT stores them (``target_parameters``), so the files interoperate:
A is (E·r, d_in) with expert e's rows at [e·r, (e+1)·r); B is (d_out, r·E) with expert e's
columns at e, E + e, 2E + e, ... (a (d_out, r, E) array, flattened).

forward calls the module with the adapted parameter in place of its own
(``torch.func.functional_call``), built as W0 + s Σ B_e A_e in one batched GEMM per adapter: the
module's code never sees lorakit, and the frozen W0 is not written. The adapted weight is a tensor
the size of the parameter for every forward (as in PEFT), so this suits expert stacks, while
linear layers take the lighter ``LoraLinear``. What the module saves of it for backward is rebuilt
there instead of kept (``rebuilt_weights.py``).

Several parameters of one module are adapted by nested wrappers, the first registered parameter
innermost (``base_layer.base_layer...``), which is where PEFT's files put them; the outermost
wrapper gathers every level's weight into one call. No dropout (it has no input to act on), no
DoRA, and no per-row adapter batches, as in PEFT.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from ..errors import AdapterStateError, TargetError
from .base import LoraLayer
from .rebuilt_weights import rebuilt_in_backward


class LoraParameter(LoraLayer):
    """LoRA on parameter ``parameter_name`` of ``base_layer`` (a module, or another
    ``LoraParameter`` around it); see the module docstring for the formula and layouts."""

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = tuple(self.base_weight.shape)
        if not self.base_weight.is_floating_point():
            raise TargetError(
                f"parameter {parameter_name!r} is {self.base_weight.dtype}; LoRA adapts floating-point "
                "weights (a quantized stack needs its dequantized form)"
            )
        if len(shape) == 2:
            self.num_experts, self._out, self._in, self.transposed = 1, shape[0], shape[1], False
        elif len(shape) == 3:
            self.transposed = bool(getattr(self.owner, "is_transposed", False))
            self.num_experts = shape[0]
            self._out, self._in = (shape[2], shape[1]) if self.transposed else (shape[1], shape[2])
        else:
            raise TargetError(
                f"parameter {parameter_name!r} has shape {shape}; LoRA adapts 2-D (d_out, d_in) "
                "and 3-D (experts, d_out, d_in) parameters"
            )

    @property
    def owner(self) -> nn.Module:
        """The module that holds the parameter (below any other ``LoraParameter``)."""
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    @property
    def base_weight(self) -> torch.Tensor:
        return getattr(self.owner, self.parameter_name)

    @property
    def in_dim(self) -> int:
        return self._in

    @property
    def out_dim(self) -> int:
        return self._out

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (self.num_experts * r, self._in), (self._out, r * self.num_experts)

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0] // self.num_experts

    def expert_factors(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs) with lhs @ rhs = B_e A_e per expert laid out like the parameter:
        (E, d_out, r) @ (E, r, d_in), or their transposes for a transposed parameter."""
        experts = self.num_experts
        A_e = A.reshape(experts, -1, A.shape[-1])  # (E, r, d_in)
        B_e = B.reshape(B.shape[0], -1, experts).permute(2, 0, 1)  # (E, d_out, r)
        if self.transposed:
            return A_e.transpose(1, 2), B_e.transpose(1, 2)
        return B_e, A_e

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s B_e A_e`` for every expert, shaped like the parameter, float32 (or wider)."""
        A, B, s = self.factors(name)
        lhs, rhs = self.expert_factors(A, B)
        return (torch.bmm(lhs, rhs) * s).reshape(self.base_weight.shape)

    def adapted_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """``weight + s B_e A_e`` in ``weight``'s dtype, differentiable in A and B."""
        A, B, s = self.live_factors(name)
        lhs, rhs = self.expert_factors(A.to(weight.dtype), B.to(weight.dtype))
        if weight.dim() == 2:
            return torch.addmm(weight, lhs[0], rhs[0], alpha=s)
        return torch.baddbmm(weight, lhs, rhs, alpha=s)

    def pending_adapters(self) -> list[str]:
        """The adapters whose update forward adds (active, not merged, not disabled)."""
        if self.disabled:
            return []
        if self.row_adapters is not None:
            raise AdapterStateError(
                f"parameter {self.parameter_name!r} is adapted as a whole (target_parameters), "
                "so one batch cannot mix its adapters; run each adapter's rows as a batch of "
                "their own"
            )
        return [n for n in self.active_adapters if n in self.lora_A and n not in self.merged_adapters]

    def weight_with(self, names: list[str]) -> torch.Tensor:
        """W0 plus the updates of ``names``, each taken against W0 and added, as for every LoRA layer."""
        weight = self.base_weight
        for name in names:
            weight = self.adapted_weight(weight, name)
        return weight

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        overrides: dict[str, torch.Tensor] = {}
        recipes = []
        module: nn.Module = self
        while isinstance(module, LoraParameter):  # the outermost wrapper speaks for the whole nest
            names = module.pending_adapters()
            if names:
                weight = module.weight_with(names)
                overrides[module.parameter_name] = weight
                recipes.append((weight, partial(module.weight_with, names)))
            module = module.base_layer
        if not overrides:
            return module(*args, **kwargs)
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            # Nothing is saved without autograd; a compiled graph chooses what to keep itself.
            return torch.func.functional_call(module, overrides, args, kwargs)
        with rebuilt_in_backward(recipes):
            return torch.func.functional_call(module, overrides, args, kwargs)

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name!r}, experts={self.num_experts}, " + super().extra_repr()
