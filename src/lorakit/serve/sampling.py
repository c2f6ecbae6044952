"""Choosing each row's next token from its logits: greedy, temperature and nucleus (top-p)
sampling, each row with its own random generator so that a seeded request draws the same tokens
whatever else shares its batch."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .requests import SamplingParams


def check_sampling(params: SamplingParams, max_tokens_cap: int) -> None:
    """Raise :class:`ConfigError` (HTTP 400) for values that mean nothing, naming the OpenAI field."""
    if isinstance(params.max_tokens, bool) or not isinstance(params.max_tokens, int) or params.max_tokens < 1:
        raise ConfigError(f"max_tokens must be a whole number of at least 1, got {params.max_tokens!r}")
    if params.max_tokens > max_tokens_cap:
        raise ConfigError(f"max_tokens {params.max_tokens} is over this server's limit of {max_tokens_cap}")
    if not (isinstance(params.temperature, (int, float)) and 0 <= params.temperature <= 100):
        raise ConfigError(f"temperature must be a number from 0 (greedy) up, got {params.temperature!r}")
    if not (isinstance(params.top_p, (int, float)) and 0 < params.top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1], got {params.top_p!r}")
    if params.seed is not None and (isinstance(params.seed, bool) or not isinstance(params.seed, int)):
        raise ConfigError(f"seed must be a whole number, got {params.seed!r}")
    if any(not isinstance(s, str) or not s for s in params.stop):
        raise ConfigError("stop must be a non-empty string or a list of non-empty strings")


def row_generator(params: SamplingParams, device: torch.device, fallback: torch.Generator) -> torch.Generator | None:
    """The generator a sampled row draws from: seeded by the request, else from the engine's own
    stream; greedy rows need none."""
    if params.temperature == 0:
        return None
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=fallback))
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**63)
    return generator


def next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """``sample``'s tokens on the host."""
    return sample(logits, params, generators).tolist()


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """One token per row from ``logits`` (rows, vocab), (rows,) int64 on their device (nothing
    waits for the device here). Greedy rows take the argmax (the first one on ties, as
    ``generate`` does); sampled rows scale by 1/temperature, keep the smallest set of tokens whose
    probability reaches top_p, and draw from it with the row's generator."""
    chosen = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.temperature == 0:
            continue
        row = logits[i].float() / p.temperature
        if p.top_p < 1:
            row = _nucleus(row, p.top_p)
        probs = torch.softmax(row, dim=-1)
        chosen[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return chosen


def _nucleus(row: torch.Tensor, top_p: float) -> torch.Tensor:
    """``row`` (vocab,) with every token outside the top-p nucleus set to -inf; the most likely
    token always stays."""
    ordered, order = torch.sort(row, descending=True)
    cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
    # A token stays when the mass before it is under top_p.
    drop = (cumulative - torch.softmax(ordered, dim=-1)) >= top_p
    drop[0] = False
    masked = ordered.masked_fill(drop, -math.inf)
    return torch.empty_like(row).scatter_(0, order, masked)
