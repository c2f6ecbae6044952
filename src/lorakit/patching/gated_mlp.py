"""Routing gated MLPs (``down(act(gate(x)) * up(x))``) through `GatedMlpFunction`
(``kernels/gated_mlp.py``).

lorakit changes layers, not model code, so the fused MLP is attached per module instance: an
MLP module whose class's ``forward`` is exactly the gated-MLP line that Llama, Mistral, Qwen,
Gemma and ~130 other transformers models share gets an instance ``forward`` that uses the fused
function when all three projections can (LoRA or DoRA, one active adapter, no dropout, not
under torch.compile; under autocast in autocast's dtype) and the class's own forward otherwise.
Recognising the code, not class names, means a model whose MLP does anything else (extra
dropout, other names) is left alone.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..kernels.dispatch import call_in_autocast_dtype
from ..kernels.gated_mlp import GatedMlpFunction
from .model_code import forward_code, fusable_projections

_EXPRESSION = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"
_FORMS = (f"defforward(self,x):down_proj={_EXPRESSION}returndown_proj", f"defforward(self,x):return{_EXPRESSION}")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@functools.lru_cache(maxsize=None)
def is_gated_mlp_class(cls: type) -> bool:
    """True when ``cls.forward`` is the plain gated-MLP line (comments and docstring aside)."""
    return forward_code(cls) in _FORMS


def install_fused_mlps(model: nn.Module) -> None:
    """Give every gated MLP whose three projections are LoRA layers the fused forward."""
    for module in model.modules():
        if "forward" in module.__dict__ or not is_gated_mlp_class(type(module)):
            continue
        if all(hasattr(getattr(module, p, None), "lora_A") for p in PROJECTIONS) and hasattr(module, "act_fn"):
            module.forward = FusedOrOriginalForward(module)


def remove_fused_mlps(model: nn.Module) -> None:
    """Undo ``install_fused_mlps`` (the plain model after ``unload``)."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), FusedOrOriginalForward):
            del module.forward


class FusedOrOriginalForward:
    """An MLP's instance ``forward``: the fused function when it applies, else the class's forward.

    A plain object rather than a bound function so that the model still pickles and deep-copies."""

    def __init__(self, mlp: nn.Module) -> None:
        self.mlp = mlp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = fused_mlp_forward(self.mlp, x)
        return type(self.mlp).forward(self.mlp, x) if out is None else out


def fused_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The MLP through `GatedMlpFunction`, or None when one projection needs its own path."""
    if torch.compiler.is_compiling():
        return None
    # None when a projection is not (or no longer) a fusable LoRA layer, or has dropout.
    fusable = fusable_projections([getattr(mlp, p) for p in PROJECTIONS], x)
    if fusable is None:
        return None
    plans, linear_tensors, magnitudes = fusable
    # Under autocast the three GEMMs run in its dtype, and so do the activation and the product
    # between them (neither is on autocast's fp32 list).
    return call_in_autocast_dtype(GatedMlpFunction.apply, (x, *linear_tensors), mlp.act_fn, plans, *magnitudes)
