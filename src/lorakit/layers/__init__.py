"""LoRA layers: one class per base layer type, all sharing `LoraLayer`'s adapter bookkeeping."""

from __future__ import annotations

from torch import nn

from ..quantization import quantized_bits
from .base import LoraLayer
from .conv import LoraConv
from .embedding import LoraEmbedding
from .linear import LoraLinear, is_conv1d
from .modules_to_save import ModulesToSave
from .quantized import LoraQuantizedLinear

__all__ = [
    "LoraLayer",
    "LoraLinear",
    "LoraEmbedding",
    "LoraConv",
    "ModulesToSave",
    "LoraQuantizedLinear",
    "is_conv1d",
    "lora_class_for",
]


def lora_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class that can wrap ``module``, or None if its type is not supported."""
    if quantized_bits(module) is not None:  # bitsandbytes' layers subclass nn.Linear: checked first
        return LoraQuantizedLinear
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoraConv
    return None
