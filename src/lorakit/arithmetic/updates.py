"""An adapter's update on one layer, in the layout the arithmetic package works in.

Combination works in the *factor layout*: ΔW = B A with B (d_out, r), A (r, d_in), whatever the
layer type — so the dense update of a Conv1D (stored transposed), of an embedding (stored as
(num_embeddings, dim)) and of a convolution (a (C_out, C_in, *k) kernel, flattened to
(C_out, C_in·k)) are all plain (d_out, d_in) matrices here. ``to_weight_layout`` lays a result
out like the base weight again, for merging.

Per source kind:
- LoRA (rsLoRA, alpha/rank patterns, AdaLoRA's E, DyLoRA's live rank): B' = s B, A' = A (E folded).
- VeRA: B' = b ⊙ B_shared, A' = d ⊙ A_shared (the frozen pair sliced to the layer).
- DoRA: not low-rank: its effect on the weight is m/‖W0 + ΔW‖ · (W0 + ΔW) − W0 (norm per output
  unit), so it only has a dense form.
"""

from __future__ import annotations

import torch

from ..layers import LoraConv, LoraEmbedding, LoraLayer
from .factor import WORK_DTYPE, LowRank


def dense_only(layer: LoraLayer, name: str) -> bool:
    """Whether adapter ``name``'s update on ``layer`` is not its factors' ``s B A`` (DoRA)."""
    return not layer.variants[name].low_rank


def low_rank_update(layer: LoraLayer, name: str) -> LowRank:
    """The (non-DoRA) update of adapter ``name`` as factors in the factor layout (VeRA's from
    ``LoraLinear.factors``: its vectors times the shared pair)."""
    A, B, s = layer.factors(name)
    return LowRank(B.detach().flatten(1).to(WORK_DTYPE) * s, A.detach().flatten(1).to(WORK_DTYPE))


@torch.no_grad()
def dense_update(layer: LoraLayer, name: str) -> torch.Tensor:
    """What adapter ``name`` changes in the weight, (d_out, d_in) in the factor layout."""
    if not dense_only(layer, name):
        return low_rank_update(layer, name).dense()
    change, _ = layer.variants[name].merge_change(layer, name, check=False)  # what merging it adds to W0
    return from_weight_layout(layer, change.to(WORK_DTYPE))


def to_weight_layout(layer: LoraLayer, delta: torch.Tensor) -> torch.Tensor:
    """A (d_out, d_in) update laid out like ``layer.base_weight``."""
    if isinstance(layer, LoraConv):
        return delta.reshape(layer.base_weight.shape)
    if isinstance(layer, LoraEmbedding) or getattr(layer, "fan_in_fan_out", False):
        return delta.T
    return delta


def from_weight_layout(layer: LoraLayer, delta: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_weight_layout``."""
    if isinstance(layer, LoraConv):
        return delta.flatten(1)
    if isinstance(layer, LoraEmbedding) or getattr(layer, "fan_in_fan_out", False):
        return delta.T
    return delta


def adapter_factors(layer: LoraLayer, update: LowRank, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) shaped as ``layer``'s adapters of rank ``update.rank`` (scaling 1), in ``dtype``."""
    shape_a, shape_b = layer.adapter_shapes(update.rank)
    device = layer.base_weight.device
    return (
        update.A.reshape(shape_a).to(device, dtype).contiguous(),
        update.B.reshape(shape_b).to(device, dtype).contiguous(),
    )
