"""DyLoRA (Valipour et al. 2023): one adapter that works at every rank b <= r.

Training: each step samples b uniformly from 1..r (the largest rank of any layer, with
``rank_pattern``) and runs the adapter truncated to its first b ranks (a layer of smaller rank at
its full rank), ``h = W0 x + (alpha/b) B[:, :b] A[:b] x``, so every prefix of the ranks learns to
stand on its own. Afterwards ``truncate(model, b)`` keeps the first b ranks, with no retraining.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..config import register_variant
from ..errors import AdapterStateError, ConfigError
from ..layers.parameter import LoraParameter
from ..layers.variant import Variant
from ..state import adapter_configs, lora_layers, require_adapters
from .hooks import TrainingHooks


class DyLora(Variant):
    """Plain LoRA whose training runs each step at a sampled nested rank (``DyLoraTraining``)."""

    name = "dylora"
    title = "DyLoRA"
    legacy_flag = "dylora"
    parameter_targets = False

    def trainer(self, model: nn.Module, name: str, run, total_steps: int) -> TrainingHooks:
        return DyLoraTraining(model, name, run.seed)


class DyLoraTraining(TrainingHooks):
    """One rank per step for all layers, drawn from (seed, step) so that a resumed run agrees."""

    compile_note = (
        "DyLoRA draws a rank per step, and torch.compile compiles a graph per rank (up to r of "
        "them, eager past torch._dynamo.config.recompile_limit): expect slow first steps"
    )

    def __init__(self, model: nn.Module, name: str, seed: int) -> None:
        super().__init__(name)
        self.model, self.seed = model, seed

    def before_step(self, step: int) -> None:
        sample_nested_rank(self.model, random.Random(self.seed * 7919 + step), self.name)

    def after_step(self, step: int) -> None:
        set_nested_rank(self.model, None, self.name)

    def abandon_step(self) -> None:
        set_nested_rank(self.model, None, self.name)


def set_nested_rank(model: nn.Module, rank: int | None, name: str = "default") -> None:
    """Run adapter ``name`` at its first ``rank`` ranks (None: full rank) until changed again.

    Refused for an unknown or merged adapter (the rank decides the change that unmerging
    subtracts) and for a rank below 1."""
    require_adapters(model, [name])
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"a nested rank is a whole number >= 1 (or None: full rank), got {rank!r}")
    layers = [layer for _, layer in lora_layers(model) if name in layer.lora_A]
    _require_nestable(name, layers)
    if any(name in layer.merged_adapters for layer in layers):
        raise AdapterStateError(f"adapter {name!r} is merged; unmerge it before changing its nested rank")
    for layer in layers:
        if rank is None:
            layer.nested_rank.pop(name, None)
        else:
            layer.nested_rank[name] = rank


def _require_nestable(name: str, layers: list) -> None:
    """Parameter targets interleave their experts' ranks (layers/parameter.py): no prefix of A's
    rows is a lower-rank adapter there."""
    if any(isinstance(layer, LoraParameter) for layer in layers):
        raise ConfigError(
            f"adapter {name!r} adapts parameters (target_parameters), whose per-expert factors have "
            "no nested ranks to cut"
        )


def sample_nested_rank(model: nn.Module, rng: random.Random, name: str = "default") -> int:
    """Draw b uniformly from 1..R for adapter ``name`` and apply it (one b for all layers).

    R is the largest rank any layer has (``rank_pattern`` can go above ``r``), and each layer runs
    at min(b, its own rank): every rank of every layer gets trained, and the states trained are
    those ``truncate(model, b)`` and ``nested_rank(model, b)`` produce."""
    top = max((layer.rank(name) for _, layer in lora_layers(model) if name in layer.lora_A), default=None)
    rank = rng.randint(1, adapter_configs(model)[name].r if top is None else top)
    set_nested_rank(model, rank, name)
    return rank


@contextmanager
def nested_rank(model: nn.Module, rank: int | None, name: str = "default") -> Iterator[nn.Module]:
    """Within the block, adapter ``name`` runs at rank ``rank``."""
    set_nested_rank(model, rank, name)
    try:
        yield model
    finally:
        set_nested_rank(model, None, name)


@torch.no_grad()
def truncate(model: nn.Module, rank: int, name: str = "default") -> None:
    """Keep only the first ``rank`` ranks of adapter ``name`` (scaling becomes alpha/rank).

    Exact for a DyLoRA-trained adapter: the result computes what the adapter computed at nested
    rank ``rank`` during training. Layers already at rank <= ``rank`` are left as they are.
    """
    require_adapters(model, [name])
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    config = adapter_configs(model)[name]
    if not config.variant_object.nested_ranks:
        raise ConfigError(
            f"adapter {name!r} is a {config.variant} adapter, whose ranks cannot be cut to a prefix; use "
            f"lorakit.compress(model, {name!r}, {rank}) for the best rank-limited plain LoRA adapter "
            "instead"
        )
    layers = [layer for _, layer in lora_layers(model) if name in layer.lora_A]
    _require_nestable(name, layers)
    if any(name in layer.merged_adapters for layer in layers):
        raise AdapterStateError(f"adapter {name!r} is merged; unmerge it before truncating")
    if any(name in layer.init_factors for layer in layers):
        raise AdapterStateError(f"adapter {name!r} has a PiSSA/OLoRA init; truncating it would not match its base")
    for layer in layers:
        if layer.rank(name) <= rank:
            continue
        layer.nested_rank[name] = rank
        A, B, scaling = layer.live_factors(name)
        layer.nested_rank.pop(name)
        for holder, value in ((layer.lora_A, A), (layer.lora_B, B)):
            trainable = holder[name].requires_grad
            holder[name] = nn.Parameter(value.contiguous().clone(), requires_grad=trainable)
        layer.scaling[name] = scaling
    # alpha stays: a rank-b adapter's scaling is alpha/b (alpha/sqrt(b)), what the layers now use.
    adapter_configs(model)[name] = config.replace(
        r=min(rank, config.r),
        rank_pattern={k: min(v, rank) for k, v in config.rank_pattern.items()},
    )


register_variant(DyLora())
