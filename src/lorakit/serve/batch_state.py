"""The running batch's key/value cache: rows join after their prefill and leave when they finish.

Rows are left-padded to one length T: the cache holds (rows, heads, T, head_dim) per layer, the
attention mask (rows, T) marks real tokens, and each row's next position id is its count of real
tokens, so a row computes exactly what it would alone (padding is masked, positions are the
row's own). Joining pads the shorter side on the left and concatenates along the batch; leaving
selects rows and drops the leading columns that only padding still occupies.

This works over transformers' ``DynamicCache`` for any causal LM whose layers keep full
attention (``DynamicLayer``); sliding-window or linear-attention layers are refused at start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _layers(cache) -> list:
    return list(cache.layers)


def check_cache_kind(cache) -> None:
    """Raise for caches whose layers this batch cannot pad, join and trim."""
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in _layers(cache) if type(layer) is not DynamicLayer}
    if kinds:
        raise NotImplementedError(
            f"lorakit serve batches full-attention caches only; this model's cache has {sorted(kinds)} layers "
            "(serve it with vLLM: lorakit serve --engine vllm)"
        )


class BatchState:
    """The cache, attention mask (rows, T) and next positions (rows,) of the running rows."""

    def __init__(self, cache, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask
        self.positions = mask.sum(dim=1)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def join(self, other: BatchState) -> None:
        """Append ``other``'s rows after this batch's (left-padding the shorter one)."""
        length = max(self.length, other.length)
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache)):
            mine.keys = torch.cat([_pad_left(mine.keys, length), _pad_left(theirs.keys, length)])
            mine.values = torch.cat([_pad_left(mine.values, length), _pad_left(theirs.values, length)])
        self.mask = torch.cat([_pad_left(self.mask, length, dim=1), _pad_left(other.mask, length, dim=1)])
        self.positions = torch.cat([self.positions, other.positions])

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the batch), in that order, and drop columns that are
        padding in every row left."""
        unused = int(self.mask[rows].any(dim=0).long().argmax())  # first column some row still uses
        for layer in _layers(self.cache):
            layer.keys = layer.keys[rows, :, unused:]
            layer.values = layer.values[rows, :, unused:]
        self.mask = self.mask[rows, unused:]
        self.positions = self.positions[rows]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask, position ids) for a decode step of one token per row: the mask grows by
        one real column, the position is the row's count of real tokens so far."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        positions = self.positions.unsqueeze(1)
        self.positions = self.positions + 1
        return self.mask, positions


def _pad_left(tensor: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    """``tensor`` with zeros before its entries along ``dim`` up to ``length``."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - dim - 1) + [missing, 0]
    return F.pad(tensor, pad)
