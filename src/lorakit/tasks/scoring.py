"""`score`: a reward model's rewards for texts, rendered exactly as reward training rendered its pairs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data.records import Problems
from ..data.render import Renderer
from ..data.tokenize import encode_segments
from ..errors import ConfigError, DataError
from .preference_tokens import sequence_segments

# An item to score: a whole text, a whole conversation (a list of {role, content}), or a
# (prompt, completion) pair of strings or of message lists, as preference data holds them.
Item = str | list | tuple


def score(
    model: nn.Module, tokenizer: Any, items: Sequence[Item], batch_size: int = 8, max_length: int | None = None
) -> list[float]:
    """The reward of each item under ``model``, a sequence-classification model with one output
    (a ``lorakit train --task reward`` adapter loaded on its base). Items are rendered with the
    chat template as training rendered the pairs (`lorakit.tasks.preference_tokens`); longer than
    ``max_length`` tokens they are cut from the right, as training cut them. Runs in eval mode
    under ``torch.no_grad``; the model's mode is restored afterwards."""
    if getattr(getattr(model, "config", None), "num_labels", None) != 1:
        raise ConfigError(
            "score needs a reward model: a sequence-classification model with one output "
            "(load_model(..., task='sequence-classification', num_labels=1) and a reward adapter)"
        )
    pad = model.config.pad_token_id
    if pad is None:
        raise ConfigError("the reward model's config has no pad_token_id, so its head cannot find each text's end")
    renderer = Renderer(tokenizer)
    problems = Problems("")
    rendered = []
    for i, item in enumerate(items):
        prompt, completion = item if isinstance(item, tuple) else (None, item)
        try:
            rendered.append(sequence_segments(renderer, prompt, completion))
        except Exception as e:  # noqa: BLE001 - template errors come in many types; all are input problems
            problems.add(f"item {i}", f"cannot render with this tokenizer: {e}")
    problems.raise_if_any("texts to score")
    ids = [seq[:max_length] if max_length else seq for seq, _ in encode_segments(tokenizer, rendered)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rewards: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                part = ids[start : start + batch_size]
                length = max(len(seq) for seq in part)
                input_ids = torch.full((len(part), length), pad, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                for row, seq in enumerate(part):
                    if not seq:
                        raise DataError(f"item {start + row}: the text tokenizes to nothing")
                    input_ids[row, : len(seq)] = torch.as_tensor(seq)
                    attention_mask[row, : len(seq)] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
                rewards += logits.squeeze(-1).float().tolist()
    finally:
        model.train(was_training)
    return rewards
