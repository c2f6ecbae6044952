"""LoRA and its variants (DoRA, VeRA, AdaLoRA, ...): lorakit's own adapter, the default method."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..inject import add_adapter
from .base import Method


class Lora(Method):
    name = "lora"
    title = "LoRA"

    def snapshot(self, model: nn.Module):
        from ..state import active_adapters

        return super().snapshot(model), active_adapters(model)

    def prepare(self, model: nn.Module, task, cfg) -> nn.Module:
        config = cfg.lora_config()
        add_adapter(model, task.lora_config(model, config) if task is not None else config)
        if task is not None and hasattr(task, "activate"):
            task.activate(model, "default")  # DPO with a reference adapter: both run, this one trains
        return model

    def restore(self, model: nn.Module, snapshot) -> None:
        from ..control import set_adapter
        from ..inject import delete_adapter
        from ..state import adapter_configs

        trains, active = snapshot
        if "default" in adapter_configs(model):
            delete_adapter(model, "default")
        super().restore(model, trains)
        if active:
            set_adapter(model, active)

    def save(self, trained: nn.Module, out_dir: Path, tokenizer=None) -> Path:
        from ..io import save_adapter

        save_adapter(trained, out_dir / "adapter")
        return out_dir / "adapter"
