"""Text generation helpers: batched (left-padded) answers for evaluation, streaming for the CLI."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from .data.render import Renderer
from .data.stop_tokens import stop_token_ids
from .errors import ConfigError, GenerationError


def check_generation_settings(
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    repetition_penalty: float = 1.0,
    flags: bool = False,
) -> None:
    """Raise :class:`ConfigError` for settings transformers would reject (or that mean nothing),
    before any model is loaded or thread started. ``flags=True`` names them as the CLI's flags."""

    def name(field: str) -> str:
        return "--" + field.replace("_", "-") if flags else field

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"{name('max_new_tokens')} must be a whole number of at least 1, got {max_new_tokens!r}")
    if not temperature >= 0:  # NaN included
        raise ConfigError(f"{name('temperature')} must not be negative, got {temperature!r}")
    if do_sample and temperature == 0:
        sample = "--sample" if flags else "do_sample=True"
        raise ConfigError(
            f"{name('temperature')} 0 cannot be sampled with: give a positive temperature, or leave out {sample} "
            "for greedy decoding"
        )
    if not 0 < top_p <= 1:
        raise ConfigError(f"{name('top_p')} must be in (0, 1], got {top_p!r}")
    if isinstance(repetition_penalty, bool) or not repetition_penalty > 0:  # NaN included
        raise ConfigError(
            f"{name('repetition_penalty')} must be positive (1: no penalty, above 1: repeat less), "
            f"got {repetition_penalty!r}"
        )


def _sampling_kwargs(do_sample: bool, temperature: float, top_p: float, repetition_penalty: float) -> dict:
    """What ``model.generate`` gets beyond the defaults (so that default settings decode as before)."""
    kwargs: dict = {}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    if repetition_penalty != 1.0:  # applies to greedy decoding too
        kwargs.update(repetition_penalty=float(repetition_penalty))
    return kwargs


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
    repetition_penalty: float = 1.0,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Completions of already-rendered ``prompts`` (chat template applied), in order.

    Prompts are left-padded so every row's answer starts at the same position; generation stops
    at EOS (or the chat end-of-turn token) per row. ``on_batch(n)`` is called after each batch
    with the number of prompts it answered (for progress bars).
    """
    check_generation_settings(max_new_tokens, do_sample, temperature, top_p, repetition_penalty)
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
                **_sampling_kwargs(do_sample, temperature, top_p, repetition_penalty),
            )
            out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
            if on_batch is not None:
                on_batch(len(chunk))
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
    repetition_penalty: float = 1.0,
) -> Iterator[str]:
    """Yield the answer's text piece by piece as tokens are generated (for terminals).

    Generation runs in a background thread; whatever fails there (a setting transformers rejects,
    running out of memory) ends the stream and is raised here, as :class:`GenerationError` (a
    rejected setting as :class:`ConfigError`), instead of leaving the caller waiting for tokens."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    check_generation_settings(max_new_tokens, do_sample, temperature, top_p, repetition_penalty)
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
        **_sampling_kwargs(do_sample, temperature, top_p, repetition_penalty),
    )
    failure: list[BaseException] = []

    def run() -> None:
        try:
            model.generate(**kwargs)
        except BaseException as exc:  # every failure goes to the caller's thread
            failure.append(exc)
            streamer.on_finalized_text("", stream_end=True)  # wakes the reader: the stream is over

    model.eval()
    thread = Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if failure:
        exc = failure[0]
        detail = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, ValueError):  # transformers' word for a setting it does not accept
            raise ConfigError(f"generation setting rejected: {detail}") from exc
        raise GenerationError(f"generation failed: {type(exc).__name__}: {detail}") from exc
