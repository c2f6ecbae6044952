"""Giving a serving pool's gated MLPs the fused call over a prefill's rows
(``layers/slot_mlp.py``): an MLP whose forward is the recognised gated-MLP line
(``gated_mlp.is_gated_mlp_class``) and whose three projections serve slots gets an instance
``forward`` that tries the fused call and otherwise runs the forward it had (the class's, or the
training patch's ``FusedOrOriginalForward``). An instance forward of any other kind (a user's) is
left alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..layers.linear import LoraLinear
from ..layers.slot_mlp import slot_mlp_output
from .gated_mlp import PROJECTIONS, FusedOrOriginalForward, is_gated_mlp_class


def install_slot_mlps(model: nn.Module) -> int:
    """Give every recognised gated MLP whose three projections serve slots the fused call (anew:
    what an earlier call installed is removed first). Returns how many MLPs have it."""
    remove_slot_mlps(model)
    installed = 0
    for module in model.modules():
        if not is_gated_mlp_class(type(module)) or not hasattr(module, "act_fn"):
            continue
        layers = [getattr(module, name, None) for name in PROJECTIONS]
        if not all(isinstance(layer, LoraLinear) and layer.slot_stack is not None for layer in layers):
            continue
        previous = module.__dict__.get("forward")
        if previous is not None and not isinstance(previous, FusedOrOriginalForward):
            continue
        module.forward = SlotMlpForward(module, previous)
        installed += 1
    return installed


def remove_slot_mlps(model: nn.Module) -> None:
    """Undo ``install_slot_mlps``: each MLP gets back the forward it had."""
    for module in model.modules():
        patched = module.__dict__.get("forward")
        if isinstance(patched, SlotMlpForward):
            del module.forward
            if patched.previous is not None:
                module.forward = patched.previous


class SlotMlpForward:
    """An MLP's instance ``forward``: the fused call over slots when it applies, else the forward
    the MLP had. A plain object, so that the model still pickles and deep-copies."""

    def __init__(self, mlp: nn.Module, previous: Callable | None) -> None:
        self.mlp = mlp
        self.previous = previous

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = slot_mlp_output(self.mlp, x)
        if out is not None:
            return out
        return self.previous(x) if self.previous is not None else type(self.mlp).forward(self.mlp, x)
