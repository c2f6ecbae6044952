"""The frozen model: nothing trains; the run evaluates the base model as loaded (the floor any
fine-tuning has to beat). It needs validation data, and saves nothing but its metrics."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .base import Method, freeze_all


class Frozen(Method):
    name = "frozen"
    title = "frozen base"
    trains = False

    def prepare(self, model: nn.Module, task, cfg) -> nn.Module:
        freeze_all(model)
        return model

    def save(self, trained: nn.Module, out_dir: Path, tokenizer=None) -> None:
        return None
