"""The one place that patches a user's model: code that recognises model classes by their
``forward``'s source and gives their instances what lets several LoRA layers share one fused
call. lorakit otherwise only swaps layers; everything here is undone by ``remove_patches``.

    attention_siblings.py  q, k, v LoRA layers of one attention module share a record
    gated_mlp.py           gated MLPs get an instance ``forward`` through the fused MLP function
    slot_siblings.py       a serving pool's sibling projections share a record
    slot_mlp.py            a serving pool's gated MLPs get an instance ``forward`` through the fused MLP pass
    model_code.py          recognising a class by its code; the operands of a fused call

Built on ``layers`` (the LoRA layers' ``fused_operands``) and ``kernels`` (the fused functions).
"""

from __future__ import annotations

from torch import nn

from .attention_siblings import install_sibling_groups, remove_sibling_groups
from .gated_mlp import install_fused_mlps, remove_fused_mlps
from .slot_mlp import remove_slot_mlps


def install_patches(model: nn.Module) -> None:
    """Patch every recognised module whose projections are all LoRA layers (after adding adapters)."""
    install_fused_mlps(model)
    install_sibling_groups(model)


def remove_patches(model: nn.Module) -> None:
    """Undo ``install_patches`` (the plain model after ``unload``), and a serving pool's MLP
    patches (``slot_mlp``), which wrap the fused MLP's forward."""
    remove_slot_mlps(model)
    remove_fused_mlps(model)
    remove_sibling_groups(model)


__all__ = ["install_patches", "remove_patches"]
