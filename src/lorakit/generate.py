"""Text generation helpers: batched (left-padded) answers for evaluation, streaming for the CLI."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .data.render import Renderer
from .data.stop_tokens import stop_token_ids


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[str]:
    """Completions of already-rendered ``prompts`` (chat template applied), in order.

    Prompts are left-padded so every row's answer starts at the same position; generation stops
    at EOS (or the chat end-of-turn token) per row.
    """
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kwargs = dict(
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_token_ids(tokenizer),
            )
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [o.strip() for o in outputs]


def render_prompt(tokenizer, user_text: str) -> str:
    """A single user turn rendered with the chat template (plain text if there is none), exactly as
    training renders the prompt of a prompt/completion record (BOS text included): the model is
    asked in the form it was trained on. Tokenize it with ``add_special_tokens=False``."""
    return Renderer(tokenizer).prompt(user_text)


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Iterator[str]:
    """Yield the answer's text piece by piece as tokens are generated (for terminals)."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(tokenizer),
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    model.eval()
    thread = Thread(target=model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
