"""Fused LoRA / DoRA computations behind the layers' interface (see ``dispatch.py``): tensors in,
tensors out. The knobs that tune them are in ``tuning.py``."""

from .dispatch import FusedOperands, fused_linear, merge_directions
from .dora_linear import DoraLinearFunction
from .lora_linear import LoraLinearFunction

__all__ = ["FusedOperands", "fused_linear", "merge_directions", "LoraLinearFunction", "DoraLinearFunction"]
