"""BitFit (Ben Zaken et al. 2022): only the bias terms train — every ``*.bias`` parameter.

Llama-family models (the embedded SmolLM2 among them) have no biases at all, so plain BitFit has
nothing to train there and is refused with that reason. ``bitfit-added`` is the variant for such
models: a zero bias is added to each of the run's target modules (``target_modules``, all linear
layers by default) and only those train — BitFit's budget (one vector per layer output) on a model
that was built without one. The zero start leaves the model's outputs unchanged before training.

Saved: the trained tensors (biases, and a task's head) in ``output_dir/trained/``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .base import Method, freeze_all, save_trained_tensors, task_modules, unfreeze_modules


def bias_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters() if name == "bias" or name.endswith(".bias")]


class BitFit(Method):
    name = "bitfit"
    title = "BitFit"

    def prepare(self, model: nn.Module, task, cfg) -> nn.Module:
        biases = bias_names(model)
        if not biases:
            raise ConfigError(
                f"method bitfit trains bias terms, and {type(model).__name__} has none (Llama-family models are "
                "built without biases): use method bitfit-added (zero biases added to the target modules, then "
                "trained), or another method"
            )
        freeze_all(model)
        params = dict(model.named_parameters())
        for name in biases:
            params[name].requires_grad_(True)
        unfreeze_modules(model, task_modules(model, task, cfg))
        return model

    def save(self, trained: nn.Module, out_dir: Path, tokenizer=None) -> Path:
        return save_trained_tensors(trained, out_dir / "trained", self.name, {})


class BitFitAdded(BitFit):
    name = "bitfit-added"
    title = "BitFit (added biases)"

    def prepare(self, model: nn.Module, task, cfg) -> nn.Module:
        from ..targets import find_targets

        config = cfg.lora_config()
        config = task.lora_config(model, config) if task is not None else config
        added = []
        for name, module in find_targets(model, config):
            if not isinstance(module, nn.Linear):
                raise ConfigError(
                    f"method bitfit-added adds biases to linear layers, and target {name!r} is a "
                    f"{type(module).__name__}: choose linear target_modules"
                )
            if module.bias is None:
                weight = module.weight
                module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=weight.dtype, device=weight.device))
                added.append(module)
        model.__dict__["_lorakit_added_biases"] = added  # for restore
        freeze_all(model)
        for name, module in find_targets(model, config):
            module.bias.requires_grad_(True)
        unfreeze_modules(model, task_modules(model, task, cfg))
        return model

    def restore(self, model: nn.Module, snapshot) -> None:
        for module in model.__dict__.pop("_lorakit_added_biases", []):
            module.bias = None
        super().restore(model, {p: flag for p, flag in snapshot.items() if p is not None})
