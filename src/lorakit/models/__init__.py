"""Base models: `load_model` by built-in alias, .gguf file, local directory or (cached) hub id.

transformers is imported only when a model is loaded, so this package imports without it.
"""

from .aliases import ALIASES, DEFAULT_MODEL, WheelModel, describe_aliases
from .cache import cache_root, model_cache_dir
from .device import resolve_device, resolve_dtype
from .loader import TASKS, load_model

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "TASKS",
    "WheelModel",
    "cache_root",
    "describe_aliases",
    "load_model",
    "model_cache_dir",
    "resolve_device",
    "resolve_dtype",
]
