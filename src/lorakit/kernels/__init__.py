"""Fused LoRA / DoRA computations behind the layers' interface (see ``dispatch.py``)."""

from .dispatch import fused_forward, merge_directions
from .dora_linear import DoraLinearFunction
from .lora_linear import LoraLinearFunction

__all__ = ["fused_forward", "merge_directions", "LoraLinearFunction", "DoraLinearFunction"]
