"""Evaluation: token-weighted loss and perplexity, and exact match of generated answers.

Under DDP (``accelerator`` with several processes) each process takes every world-th batch and the
per-batch results are gathered and combined in batch order, so the metrics are exactly those of
one process evaluating the whole set.

Progress: ``progress=True`` shows a tqdm bar per phase (loss batches, then generated answers) with
rate and ETA, as the training bar does; ``on_progress(phase, done, total)`` is called after each
batch of a phase (``phase`` is ``"loss"`` or ``"answers"``, counted in batches and answers), for
callers that report progress their own way. Under DDP both count this process's share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..generate import generate_batch
from ..tasks.sharding import gathered, my_batches


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged run reports a large number rather than inf."""
    return math.exp(min(loss, 50.0))


ProgressCallback = Callable[[str, int, int], None]  # (phase, done, total)

PHASES = {"loss": ("eval loss", "batch"), "answers": ("eval answers", "answer")}


class _Progress:
    """One phase's progress: a tqdm bar (when ``show``) and the caller's callback (when given)."""

    def __init__(self, phase: str, total: int, show: bool, callback: ProgressCallback | None) -> None:
        from tqdm.auto import tqdm

        desc, unit = PHASES[phase]
        self.phase, self.total, self.done, self.callback = phase, total, 0, callback
        self.bar: Any = tqdm(total=total, disable=not show, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        if self.callback is not None:
            self.callback(self.phase, self.done, self.total)

    def close(self) -> None:
        self.bar.close()


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    examples: list[dict],
    collate: Callable,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    accelerator=None,
    progress: bool = False,
    on_progress: ProgressCallback | None = None,
) -> float:
    """Mean cross-entropy over every supervised token of ``examples`` (not a mean of batch means);
    NaN when no token is supervised (an empty or fully masked set has no loss, not a loss of 0).
    ``progress``/``on_progress``: see the module docstring (phase ``"loss"``)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    parts = []  # (batch index, summed loss, supervised tokens)
    mine = my_batches(math.ceil(len(examples) / batch_size), accelerator)
    report = _Progress("loss", len(mine), progress, on_progress)
    try:
        for i in mine:
            batch = {k: v.to(device) for k, v in collate(examples[i * batch_size : (i + 1) * batch_size]).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())  # causal LMs predict token t+1 from t
            if n:
                parts.append((i, float(model(**batch).loss) * n, n))
            report.update(1)
    finally:
        report.close()
        model.train(was_training)
    parts = gathered(parts, accelerator)
    total, count = sum(part[1] for part in parts), sum(part[2] for part in parts)
    return total / count if count else float("nan")


def evaluate(
    model: nn.Module,
    tokenizer,
    examples: list[dict],
    collate: Callable,
    batch_size: int = 8,
    pairs: list[tuple[str, str]] | None = None,
    max_examples: int | None = None,
    max_new_tokens: int = 64,
    device: torch.device | str | None = None,
    accelerator=None,
    progress: bool = False,
    on_progress: ProgressCallback | None = None,
) -> dict:
    """``{"loss", "perplexity"}`` plus, when (prompt, reference) ``pairs`` are given,
    ``"exact_match"`` (fraction) and ``"predictions"`` (list of dicts). With an ``accelerator`` of
    several processes, every process must call this; each evaluates its share and all get the result.
    ``progress=True`` shows a bar per phase, and ``on_progress(phase, done, total)`` is told of each
    batch (see the module docstring)."""
    loss = eval_loss(
        model,
        examples[:max_examples] if max_examples else examples,
        collate,
        batch_size,
        device,
        accelerator,
        progress=progress,
        on_progress=on_progress,
    )
    result: dict = {"loss": loss, "perplexity": perplexity(loss)}
    if pairs:
        from ..data.metrics import exact_match

        pairs = pairs[:max_examples] if max_examples else pairs
        answers = _generate_answers(
            model,
            tokenizer,
            [p for p, _ in pairs],
            max_new_tokens,
            max(batch_size, 16),
            accelerator,
            progress,
            on_progress,
        )
        hits = [exact_match(answer, reference) for answer, (_, reference) in zip(answers, pairs)]
        result["exact_match"] = sum(hits) / len(hits)
        result["predictions"] = [
            {"prompt": p, "reference": r, "prediction": a, "correct": h} for (p, r), a, h in zip(pairs, answers, hits)
        ]
    return result


def _generate_answers(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    accelerator,
    progress: bool = False,
    on_progress: ProgressCallback | None = None,
) -> list[str]:
    """Greedy answers to ``prompts``, in order; under DDP each process generates whole batches
    (the same batches, hence the same padding, as one process would)."""
    mine = list(my_batches(math.ceil(len(prompts) / batch_size), accelerator))
    my_prompts = [p for i in mine for p in prompts[i * batch_size : (i + 1) * batch_size]]
    report = _Progress("answers", len(my_prompts), progress, on_progress)
    try:
        answers = generate_batch(
            model, tokenizer, my_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, on_batch=report.update
        )
    finally:
        report.close()
    # Only the last batch of all can be short, and it comes last here too: split back by batch.
    parts = [(i, answers[k * batch_size : (k + 1) * batch_size]) for k, i in enumerate(mine)]
    return [answer for _, batch in gathered(parts, accelerator) for answer in batch]
