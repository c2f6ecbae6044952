"""`Collator`: pads a list of tokenized examples into a batch of torch tensors."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import ConfigError, DataError
from ..models.tokenizer import pad_or_eos_id
from .packing import IGNORE

log = logging.getLogger("lorakit.data.collate")


class Collator:
    """Right-pads ``input_ids`` (with the pad token), ``labels`` (with -100) and builds
    ``attention_mask`` (1 on real tokens). Returns ``torch.long`` tensors of shape (batch, length).

    ``pad_to_multiple_of`` rounds the length up (e.g. 8 for tensor cores). Right padding suits
    training and loss evaluation; generation pads on the left itself (see `generate_batch`).
    Without a pad token the EOS id is used: padded positions are masked out of attention and
    loss, so the id's value does not matter.
    """

    def __init__(
        self, tokenizer: Any = None, pad_token_id: int | None = None, pad_to_multiple_of: int | None = None
    ) -> None:
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = pad_or_eos_id(tokenizer)  # reads only: the caller's tokenizer is left as is
        if pad_token_id is None:
            log.warning("no pad or EOS token id: padding with 0 (masked out, so harmless)")
            pad_token_id = 0
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of must be >= 1 (or None for no rounding), got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("cannot collate an empty batch (no examples)")
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(examples)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for row, example in enumerate(examples):
            ids = example["input_ids"]
            n = len(ids)
            input_ids[row, :n] = torch.as_tensor(ids, dtype=torch.long)
            # Examples without labels (e.g. raw prompts) are trained on every token.
            labels[row, :n] = torch.as_tensor(example.get("labels", ids), dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
