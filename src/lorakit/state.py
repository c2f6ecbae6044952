"""Where lorakit keeps its per-model bookkeeping, and how to walk a model's LoRA modules.

The model stays the user's own class: lorakit adds one plain attribute, a dict of the adapters'
configs (name -> LoraConfig, in the order they were added), and finds everything else by walking
the module tree.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .config import LoraConfig
from .errors import AdapterNameError
from .layers import LoraLayer, ModulesToSave

_CONFIGS_ATTR = "_lorakit_configs"


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The model's adapters: name -> config (an empty dict for a model without adapters)."""
    configs = model.__dict__.get(_CONFIGS_ATTR)
    if configs is None:
        configs = {}
        model.__dict__[_CONFIGS_ATTR] = configs
    return configs


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def adapter_modules(model: nn.Module) -> Iterator[LoraLayer | ModulesToSave]:
    """Every module that holds per-adapter state (LoRA layers and modules_to_save wrappers)."""
    for module in model.modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield module


def require_adapters(model: nn.Module, names: list[str]) -> None:
    """Raise AdapterNameError naming the first unknown adapter."""
    known = adapter_configs(model)
    for name in names:
        if name not in known:
            listing = ", ".join(repr(n) for n in known) or "none (call lorakit.add_adapter first)"
            raise AdapterNameError(f"unknown adapter {name!r}; this model's adapters: {listing}")


def active_adapters(model: nn.Module) -> list[str]:
    """The names currently active (as set by add_adapter / load_adapter / set_adapter)."""
    for module in adapter_modules(model):
        return list(module.active_adapters)
    return []


def merged_adapters(model: nn.Module) -> list[str]:
    merged: dict[str, None] = {}
    for _, layer in lora_layers(model):
        merged.update(dict.fromkeys(layer.merged_adapters))
    return list(merged)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
