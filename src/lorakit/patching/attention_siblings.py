"""Routing an attention module's q, k and v projections through `SiblingProjectionsFunction`
(``kernels/sibling_projections.py``).

Attention code calls ``self.q_proj(hidden_states)``, ``self.k_proj(hidden_states)`` and
``self.v_proj(hidden_states)`` one after another (Llama, Mistral, Qwen, Gemma, Granite, OLMo
and most other transformers models). lorakit changes layers, not model code, so the three LoRA
layers of such a module share a `SiblingProjections` record: the first of them called computes
all three outputs in one fused call and keeps the other two, and each sibling called next with
the very same input tensor, unchanged since (``_version``), returns its kept output. Any other
call (another input, an input changed in place, an inference tensor, which has no ``_version``,
a sibling with a forward pre-hook that might change its input, torch.compile, a layer that
cannot take the fused path) drops what is kept and runs as a single layer, so the values are
always those of separate layers; only the work is shared. Modules are recognised by their
class's code, not by name.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..kernels.dispatch import call_in_autocast_dtype
from ..kernels.sibling_projections import SiblingProjectionsFunction
from .model_code import forward_code, fusable_projections

SIBLINGS = ("q_proj", "k_proj", "v_proj")


@functools.lru_cache(maxsize=None)
def calls_siblings_on_one_input(cls: type) -> bool:
    """True when ``cls.forward`` calls each of ``SIBLINGS`` once, on ``hidden_states``."""
    code = forward_code(cls)
    return code is not None and all(
        code.count(f"self.{name}(") == 1 and f"self.{name}(hidden_states)" in code for name in SIBLINGS
    )


def install_sibling_groups(model: nn.Module) -> None:
    """Give the q, k, v LoRA layers of every recognised attention module a shared record."""
    for module in model.modules():
        if not calls_siblings_on_one_input(type(module)):
            continue
        layers = [getattr(module, name, None) for name in SIBLINGS]
        if all(hasattr(layer, "lora_A") for layer in layers):
            group = SiblingProjections(layers)
            for layer in layers:
                layer.siblings = group


def remove_sibling_groups(model: nn.Module) -> None:
    """Undo ``install_sibling_groups``."""
    for module in model.modules():
        module.__dict__.pop("siblings", None)


class SiblingProjections:
    """The layers that one module calls on the same input, and the outputs computed ahead for them."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = tuple(layers)
        self.kept: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # position -> (input, version, output)

    def output(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``layer(x)`` from the shared computation, or None when ``layer`` must run alone."""
        if torch.compiler.is_compiling():
            return None
        position = self.layers.index(layer)
        kept = self.kept.pop(position, None)
        if kept is not None and kept[0] is x and kept[1] == x._version:
            return kept[2]
        self.kept.clear()  # a new input: whatever was kept is stale
        if x.is_inference():
            # An inference tensor (made under torch.inference_mode) has no version counter, and
            # inside inference mode it can still be changed in place: nothing would tell a kept
            # output from a stale one, so each projection runs alone (still fused).
            return None
        if any(sibling._forward_pre_hooks for sibling in self.layers):
            return None  # a pre-hook may give a sibling another input
        fusable = fusable_projections(self.layers, x)
        if fusable is None:
            return None
        plans, linear_tensors, magnitudes = fusable
        outputs = call_in_autocast_dtype(SiblingProjectionsFunction.apply, (x, *linear_tensors), plans, *magnitudes)
        self.kept = {i: (x, x._version, out) for i, out in enumerate(outputs) if i != position}
        return outputs[position]
