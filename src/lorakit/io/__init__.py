"""Adapter files in the ecosystem's format (PEFT's layout): `save_adapter`, `load_adapter`."""

from .load import load_adapter
from .save import save_adapter

__all__ = ["load_adapter", "save_adapter"]
