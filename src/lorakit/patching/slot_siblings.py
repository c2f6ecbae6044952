"""Giving a serving pool's sibling projections a shared record (``layers/slot_siblings.py``):
attention's q, k and v, and a gated MLP's gate and up, where the module's ``forward`` is recognised
as calling them on one input (``attention_siblings``, ``gated_mlp``), and at least two of them
serve slots. Attributes of the LoRA layers only; the model's code is not touched.
"""

from __future__ import annotations

from torch import nn

from ..layers.linear import LoraLinear
from ..layers.slot_siblings import SlotSiblings
from .attention_siblings import SIBLINGS, calls_siblings_on_one_input
from .gated_mlp import is_gated_mlp_class

MLP_SIBLINGS = ("gate_proj", "up_proj")


def install_slot_siblings(model: nn.Module) -> int:
    """Give every recognised module's projections with slot stacks a shared record (anew: records
    from an earlier call are dropped first, as stacks may have appeared since). Returns how many
    records were installed."""
    remove_slot_siblings(model)
    installed = 0
    for module in model.modules():
        if calls_siblings_on_one_input(type(module)):
            names = SIBLINGS
        elif is_gated_mlp_class(type(module)):
            names = MLP_SIBLINGS
        else:
            continue
        layers = [getattr(module, name, None) for name in names]
        layers = [layer for layer in layers if isinstance(layer, LoraLinear) and layer.slot_stack is not None]
        if len(layers) >= 2:
            record = SlotSiblings(layers)
            for layer in layers:
                layer.slot_siblings = record
            installed += 1
    return installed


def remove_slot_siblings(model: nn.Module) -> None:
    """Undo ``install_slot_siblings``."""
    for module in model.modules():
        module.__dict__.pop("slot_siblings", None)
