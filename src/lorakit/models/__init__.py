"""Base models: `load_model` by built-in alias, .gguf file, local directory or (cached) hub id."""

from .aliases import ALIASES, DEFAULT_MODEL
from .cache import cache_root
from .loader import load_model, resolve_device, resolve_dtype

__all__ = ["ALIASES", "DEFAULT_MODEL", "cache_root", "load_model", "resolve_device", "resolve_dtype"]
