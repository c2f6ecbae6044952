"""The tokens that end a model's turn: one definition of "stop" for training and generation."""

from __future__ import annotations


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the chat template's end-of-turn token when the tokenizer has one."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids
