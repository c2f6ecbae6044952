"""Evaluation: token-weighted loss and perplexity, and exact match of generated answers."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..generate import generate_batch


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged run reports a large number rather than inf."""
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def eval_loss(model: nn.Module, examples: list[dict], collate: Callable, batch_size: int = 8,
              device: torch.device | str | None = None) -> float:
    """Mean cross-entropy over every supervised token of ``examples`` (not a mean of batch means);
    NaN when no token is supervised (an empty or fully masked set has no loss, not a loss of 0)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size]).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())  # causal LMs predict token t+1 from t
        if n:
            total += float(model(**batch).loss) * n
            count += n
    model.train(was_training)
    return total / count if count else float("nan")


def evaluate(model: nn.Module, tokenizer, examples: list[dict], collate: Callable, batch_size: int = 8,
             pairs: list[tuple[str, str]] | None = None, max_examples: int | None = None, max_new_tokens: int = 64,
             device: torch.device | str | None = None) -> dict:
    """``{"loss", "perplexity"}`` plus, when (prompt, reference) ``pairs`` are given,
    ``"exact_match"`` (fraction) and ``"predictions"`` (list of dicts)."""
    loss = eval_loss(model, examples[:max_examples] if max_examples else examples, collate, batch_size, device)
    result: dict = {"loss": loss, "perplexity": perplexity(loss)}
    if pairs:
        from ..data.metrics import exact_match

        pairs = pairs[:max_examples] if max_examples else pairs
        answers = generate_batch(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens,
                                 batch_size=max(batch_size, 16))
        hits = [exact_match(answer, reference) for answer, (_, reference) in zip(answers, pairs)]
        result["exact_match"] = sum(hits) / len(hits)
        result["predictions"] = [{"prompt": p, "reference": r, "prediction": a, "correct": h}
                                 for (p, r), a, h in zip(pairs, answers, hits)]
    return result
