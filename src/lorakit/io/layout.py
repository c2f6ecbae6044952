"""PEFT's file layout: file names and the mapping between lorakit modules and saved keys.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (older PEFT
versions wrote ``adapter_model.bin``). Keys are ``base_model.model.<module path>.<tensor>`` with
the adapter name stripped:

    <path>.lora_A.weight / <path>.lora_B.weight           linear and conv layers
    <path>.lora_embedding_A / <path>.lora_embedding_B     embeddings
    <path>.<variant's keys>                               a variant's own tensors (Variant.file_suffixes,
                                                          model_keys: DoRA's m, VeRA's vectors and pair)
    <path>.<param>                                        modules_to_save copies (e.g. lm_head.weight)
    <path>.base_layer.bias or <path>.bias                 trained biases (bias="all"/"lora_only")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import VARIANTS

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# Saved-key suffix -> (kind of factor), for every layer type; variants add theirs (factor_suffixes).
LORA_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_embedding_A": "lora_A",
    ".lora_embedding_B": "lora_B",
}


def factor_suffixes() -> dict[str, str]:
    """Every per-module key suffix a file may hold -> its slot: LoRA's and each registered
    variant's (``Variant.file_suffixes``: DoRA's magnitude, VeRA's vectors in the A/B slots)."""
    suffixes = dict(LORA_SUFFIXES)
    for variant in VARIANTS.values():
        suffixes.update(variant.file_suffixes)
    return suffixes


def model_key_owners() -> dict[str, str]:
    """Keys a file holds once per adapter (``Variant.model_keys``) -> the variant they belong to."""
    return {key: variant.name for variant in VARIANTS.values() for key in variant.model_keys}


def strip_prefix(key: str) -> str:
    """``key`` without PEFT's ``base_model.model.`` prefix."""
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


def split_factor_key(key: str, suffixes: dict[str, str] | None = None) -> tuple[str, str] | None:
    """``<path>.lora_A.weight`` -> (path, "lora_A"); None for other keys. ``suffixes``:
    ``factor_suffixes()``, gathered once by a caller that splits many keys."""
    for suffix, factor in (suffixes or factor_suffixes()).items():
        if key.endswith(suffix):
            return key[: -len(suffix)], factor
    return None


def group_factors(
    weights: dict[str, torch.Tensor],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A file's tensors as ({module path: {"lora_A"/"lora_B"/"magnitude": tensor}}, {other key: tensor}),
    keys without PEFT's ``base_model.model.`` prefix."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    suffixes = factor_suffixes()  # once per file, not once per tensor
    for key, value in weights.items():
        split = split_factor_key(strip_prefix(key), suffixes)
        if split is None:
            rest[strip_prefix(key)] = value
        else:
            path, factor = split
            factors.setdefault(path, {})[factor] = value
    return factors, rest


def task_type_of(model: object) -> str | None:
    """PEFT's task_type for a transformers model class (None when it is not one PEFT names)."""
    name = type(model).__name__
    for ending, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ):
        if name.endswith(ending):
            return task
    return None
