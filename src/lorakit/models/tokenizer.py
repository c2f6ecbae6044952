"""Tokenizer facts shared by model loading and batching."""

from __future__ import annotations

from typing import Any


def pad_or_eos_id(tokenizer: Any, *, assign: bool = False) -> int | None:
    """The token id to pad with: the tokenizer's pad token, or EOS when it has none.

    None when the tokenizer has neither. ``assign=True`` also makes EOS the tokenizer's pad token
    when it has none, so that everything downstream (``padding=True``, ``generate``) pads alike;
    `load_model` hands out tokenizers set up this way.

    Why EOS: padded positions are masked out of attention and loss, so any token will do; EOS
    exists in every causal LM's vocabulary, whereas adding a new token would resize the embeddings.
    """
    if assign and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
