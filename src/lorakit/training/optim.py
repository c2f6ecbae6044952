"""Optimizer and learning-rate schedule, with LoRA+ parameter groups.

LoRA+ (Hayou et al. 2024) gives B a learning rate ``ratio`` times A's: with B starting at zero and
A random, equal rates leave B under-trained; ratio 16 is the paper's default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, loraplus_ratio: float | None) -> list[dict]:
    """AdamW groups: B matrices at ``lr * loraplus_ratio`` (when set), everything else at ``lr``."""
    fast, normal = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_b = ".lora_B." in name or name.endswith(".lora_B")
        (fast if loraplus_ratio and is_b else normal).append(param)
    groups = [{"params": normal, "lr": lr, "weight_decay": weight_decay}]
    if fast:
        groups.append({"params": fast, "lr": lr * loraplus_ratio, "weight_decay": weight_decay})
    return [g for g in groups if g["params"]]


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.0, loraplus_ratio: float | None = None, **adamw_kwargs
) -> torch.optim.Optimizer:
    """The trainer's AdamW: LoRA+ groups when ``loraplus_ratio`` is set, one group otherwise."""
    groups = parameter_groups(model, lr, weight_decay, loraplus_ratio)
    if not groups:
        raise ConfigError("the model has no trainable parameters: add an adapter first (lorakit.add_adapter)")
    if "fused" not in adamw_kwargs and "foreach" not in adamw_kwargs:
        # One fused kernel over all the adapters' small tensors instead of several per tensor: an
        # adapter has hundreds of them, and the per-tensor loop takes several times as long
        # (docs/benchmarks.md).
        params = [p for group in groups for p in group["params"]]
        adamw_kwargs["fused"] = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **adamw_kwargs)


def loraplus_optimizer(
    model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0, **adamw_kwargs
) -> torch.optim.Optimizer:
    """AdamW with LoRA+'s learning rates: B matrices at ``lr * ratio``, everything else at ``lr``.

    For your own training loop; ``lorakit train --loraplus-ratio 16`` does the same.
    """
    return make_optimizer(model, lr, weight_decay, ratio, **adamw_kwargs)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Factor on the base lr at ``step`` (0-based): linear warmup, then cosine/linear decay to 0
    or constant."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps, schedule)
    )
