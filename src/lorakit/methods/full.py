"""Full fine-tuning: every weight of the model trains; no adapter.

Saved: the whole model in ``output_dir/model/`` (``save_pretrained``, safetensors, in the model's
dtype; the tokenizer beside it when the run has one), so ``--model runs/x/model`` loads it like any
local model. That is the model's full size (about 540 MB for the fp32 135M model): a sweep can drop
it once the run is measured (``keep_weights: false``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .base import Method


class FullFineTuning(Method):
    name = "full"
    title = "full fine-tuning"

    def prepare(self, model: nn.Module, task, cfg) -> nn.Module:
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def save(self, trained: nn.Module, out_dir: Path, tokenizer=None) -> Path:
        folder = out_dir / "model"
        if hasattr(trained, "save_pretrained"):
            trained.save_pretrained(str(folder), safe_serialization=True)
        else:  # a plain nn.Module: its state dict (shared tensors written once)
            from safetensors.torch import save_model

            folder.mkdir(parents=True, exist_ok=True)
            save_model(trained, str(folder / "model.safetensors"))
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(folder))
        return folder
