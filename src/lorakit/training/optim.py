"""Optimizer and learning-rate schedule, with LoRA+ parameter groups.

LoRA+ (Hayou et al. 2024) gives B a learning rate ``ratio`` times A's: with B starting at zero and
A random, equal rates leave B under-trained; ratio 16 is the paper's default.

Optimizers (``--optimizer``): torch's AdamW, or bitsandbytes' AdamW with 8-bit states (``adamw8bit``:
blockwise-quantized moments, about a quarter of AdamW's state bytes; bitsandbytes keeps tensors of
fewer than 4,096 elements in 32 bits) and the paged ones (QLoRA's: state in CUDA unified memory,
paged to the host when the GPU runs short). Paging needs a CUDA GPU; elsewhere the paged ones run
unpaged, with lorakit's notice.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..errors import ConfigError
from ..quantization import INSTALL_HINT

log = logging.getLogger("lorakit.training")

# --optimizer: the bitsandbytes class of each (None: torch's AdamW), and the unpaged one it runs as
# where paging is not available.
OPTIMIZERS = {
    "adamw": None,
    "adamw8bit": "AdamW8bit",
    "paged_adamw": "PagedAdamW",
    "paged_adamw8bit": "PagedAdamW8bit",
}
UNPAGED = {"PagedAdamW": "AdamW", "PagedAdamW8bit": "AdamW8bit"}


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
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    loraplus_ratio: float | None = None,
    optimizer: str = "adamw",
    device: torch.device | str | None = None,
    **adamw_kwargs,
) -> torch.optim.Optimizer:
    """The trainer's AdamW: LoRA+ groups when ``loraplus_ratio`` is set, one group otherwise.

    ``optimizer`` is one of ``OPTIMIZERS`` (bitsandbytes' for all but "adamw"); ``device`` is where
    the parameters will train (None: where they are now), which decides whether paging is possible.
    """
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {' | '.join(OPTIMIZERS)}, got {optimizer!r}")
    groups = parameter_groups(model, lr, weight_decay, loraplus_ratio)
    if not groups:
        raise ConfigError("the model has no trainable parameters: add an adapter first (lorakit.add_adapter)")
    if OPTIMIZERS[optimizer] is not None:
        return _bitsandbytes_optimizer(optimizer, groups, lr, weight_decay, device, **adamw_kwargs)
    if "fused" not in adamw_kwargs and "foreach" not in adamw_kwargs:
        # One fused kernel over all the adapters' small tensors instead of several per tensor: an
        # adapter has hundreds of them, and the per-tensor loop takes several times as long
        # (docs/benchmarks.md).
        params = [p for group in groups for p in group["params"]]
        adamw_kwargs["fused"] = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **adamw_kwargs)


def _bitsandbytes_optimizer(
    optimizer: str, groups: list[dict], lr: float, weight_decay: float, device, **kwargs
) -> torch.optim.Optimizer:
    bnb = require_bitsandbytes(f"optimizer {optimizer}")
    name = OPTIMIZERS[optimizer]
    if device is None:
        device = groups[0]["params"][0].device
    device = torch.device(device)
    if name in UNPAGED and device.type != "cuda":
        # bitsandbytes would fall back by itself with a warning per optimizer; lorakit says it once,
        # and what it means for the run.
        log.warning(
            "optimizer %s: paging needs a CUDA GPU and the adapter trains on the %s; it runs unpaged "
            "(the same updates, the state held in memory)",
            optimizer,
            device.type,
        )
        name = UNPAGED[name]
    return getattr(bnb.optim, name)(groups, lr=lr, weight_decay=weight_decay, **kwargs)


def require_bitsandbytes(what: str):
    """The ``bitsandbytes`` module, or a one-line ConfigError naming the extra that installs it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"{what} needs bitsandbytes, which is not installed: {INSTALL_HINT}") from None
    return bitsandbytes


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """What a checkpoint's optimizer state is laid out for: "torch.AdamW", "bitsandbytes.AdamW8bit"...
    A paged optimizer's state is its unpaged twin's, so a paged run resumes unpaged and back."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    library = type(inner).__module__.split(".")[0]
    return f"{library}.{type(inner).__name__.replace('Paged', '')}"


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
