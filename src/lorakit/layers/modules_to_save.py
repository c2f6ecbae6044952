"""`ModulesToSave`: a module trained in full, with one trainable copy per adapter.

Some modules must be trained whole rather than through a low-rank update: a freshly initialised
classification head, say. Each adapter that names the module in ``modules_to_save`` gets its own
deep copy; the original stays frozen and is used when no adapter with a copy is active.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import AdapterStateError
from .routing import RowRouting


class ModulesToSave(nn.Module):
    """Holds ``original_module`` and a ``modules_to_save[name]`` copy per adapter."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: RowRouting | None = None

    def add_adapter(self, name: str, trainable: bool = True) -> None:
        """Give adapter ``name`` its own copy of the original module."""
        module = copy.deepcopy(self.original_module)
        for param in module.parameters():
            param.requires_grad_(trainable)
        self.modules_to_save[name] = module

    def remove_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def current(self) -> nn.Module:
        """The module ``forward`` runs now: the first active adapter's copy, else the original."""
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def __getattr__(self, name: str) -> Any:
        # Code around the module keeps reading `head.weight`, `head.out_features`...
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "original_module" not in modules or name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.current(), name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.row_adapters is None or self.disabled:
            return self.current()(x, *args, **kwargs)
        return self._forward_per_row(x, *args, **kwargs)

    def _forward_per_row(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = None
        for name, index in self.row_adapters.groups(x.shape[0], x.device).items():
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            part = module(x.index_select(0, index), *args, **kwargs)
            if not isinstance(part, torch.Tensor):
                raise AdapterStateError(
                    f"adapter_batch cannot route {type(module).__name__}, whose output is not a tensor"
                )
            if out is None:
                out = part.new_zeros((x.shape[0], *part.shape[1:]))
            out = out.index_copy(0, index, part)
        return out
