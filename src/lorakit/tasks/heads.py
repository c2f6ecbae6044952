"""A sequence-classification model's head, found rather than named, and trained with the adapter.

Shared by the tasks that load ``AutoModelForSequenceClassification`` (classify, reward): the head
is whatever the model has beside its base model (``model.base_model``), so that any architecture
works (Llama-style ``score``, BERT-style ``classifier``). It trains in full through
``modules_to_save`` and is kept out of the adapter's targets; the adapter is then saved with
task_type ``SEQ_CLS`` (the model's class says so), which is how PEFT loads it with the head.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import ConfigError
from ..models.tokenizer import pad_or_eos_id


def classification_heads(model: nn.Module) -> list[str]:
    """Names of the model's top-level modules with parameters outside its base model: the head."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ConfigError(f"{type(model).__name__} has no separate base model, so no classification head to find")
    return [
        name
        for name, child in model.named_children()
        if child is not base and next(child.parameters(), None) is not None
    ]


def with_head_saved(model: nn.Module, config):
    """``config`` (a LoraConfig) with the model's head in ``modules_to_save`` and out of the targets."""
    heads = classification_heads(model)
    # The head and everything inside it, as full paths: modules_to_save may not carry LoRA layers.
    inside = [f"{h}.{n}" if n else h for h in heads for n, _ in model.get_submodule(h).named_modules()]
    exclude = config.exclude_modules
    if exclude is None:
        exclude = inside
    elif isinstance(exclude, str):
        exclude = f"(?:{exclude})|(?:{'|'.join(map(re.escape, inside))})"
    else:
        exclude = [*exclude, *inside]
    saved = list(dict.fromkeys([*(config.modules_to_save or []), *heads]))
    return config.replace(modules_to_save=saved, exclude_modules=exclude)


def set_pad_token(model: nn.Module, tokenizer) -> None:
    """Give the model's config a pad token id (the tokenizer's, else EOS) when it has none: decoder
    heads read each row's last real token through ``pad_token_id``."""
    if getattr(model.config, "pad_token_id", None) is None and tokenizer is not None:
        model.config.pad_token_id = pad_or_eos_id(tokenizer)
