"""Preference pairs as token ids, rendered exactly as causal-LM training renders prompt and answer,
and their batches: the chosen rows first, then the rejected ones, so that one forward sees both.

A pair with a prompt becomes two sequences, prompt + chosen and prompt + rejected, each rendered
as the ``prompt``/``completion`` record (or, conversational, the ``messages`` record) training
would render (`lorakit.data.render`: the chat template, the end-of-turn token, BOS and EOS as
there), with a completion mask on the compared answer's tokens only: an assistant turn inside a
multi-turn prompt is context. An implicit-prompt pair (the reward model's) is two whole texts or
conversations.

Sequences longer than ``max_length`` are cut from the right (the prompt is kept, as TRL's
``keep_start``); a DPO pair left without a completion token on either side is dropped, counted
in the statistics.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.packing import IGNORE
from ..data.records import Problems, Record
from ..data.render import Renderer, Segment
from ..data.tokenize import DatasetStats, encode_segments
from ..errors import DataError
from .preference_data import PreferencePair

SIDES = ("chosen", "rejected")


def encode_pairs(
    pairs: list[PreferencePair], tokenizer: Any, max_length: int | None, need_completion: bool = True
) -> tuple[list[dict], DatasetStats]:
    """``(examples, stats)``; an example is ``{chosen_ids, chosen_mask, rejected_ids, rejected_mask,
    margin}`` (masks 1 on the compared answer's tokens). ``need_completion``: drop pairs that
    truncation left without a completion token (DPO); a reward model keeps every pair."""
    renderer = Renderer(tokenizer)
    problems = Problems("")
    rendered: list[list[Segment]] = []
    for pair in pairs:
        for side in SIDES:
            try:
                rendered.append(pair_segments(renderer, pair, side))
            except Exception as e:  # noqa: BLE001 - template errors come in many types; all are data problems
                problems.add(pair.where, f"cannot render {side!r} with this tokenizer: {e}")
    problems.raise_if_any("preference data for this tokenizer")
    encoded = iter(encode_segments(tokenizer, rendered))
    stats = DatasetStats(n_records=len(pairs), max_length=max_length)
    examples = []
    for pair in pairs:
        example: dict[str, Any] = {"margin": pair.margin}
        truncated = False
        for side in SIDES:
            ids, labels = next(encoded)
            mask = [int(label != IGNORE) for label in labels]
            if max_length is not None and len(ids) > max_length:
                ids, mask, truncated = ids[:max_length], mask[:max_length], True
            example[f"{side}_ids"], example[f"{side}_mask"] = ids, mask
        stats.n_truncated += truncated
        if need_completion and not (any(example["chosen_mask"]) and any(example["rejected_mask"])):
            stats.n_dropped_all_truncated += 1
            continue
        lengths = [len(example["chosen_ids"]), len(example["rejected_ids"])]
        stats.total_tokens += sum(lengths)
        stats.supervised_tokens += sum(example["chosen_mask"]) + sum(example["rejected_mask"])
        stats.max_tokens = max(stats.max_tokens, *lengths)
        examples.append(example)
    stats.n_examples = len(examples)
    if not examples:
        raise DataError(
            f"no usable preference pairs: the prompts of all {len(pairs)} fill max_length={max_length}; "
            "raise --max-length or shorten the prompts"
        )
    return examples, stats


def pair_segments(renderer: Renderer, pair: PreferencePair, side: str) -> list[Segment]:
    """The rendered sequence of ``pair``'s prompt and its ``side`` completion (see `sequence_segments`)."""
    return sequence_segments(renderer, pair.prompt, pair.chosen if side == "chosen" else pair.rejected)


def sequence_segments(renderer: Renderer, prompt: str | list | None, completion: str | list) -> list[Segment]:
    """``prompt`` and ``completion`` rendered as training renders them (prompt None: ``completion`` is a
    whole text or conversation); the supervised segments are the completion's. Raises what
    rendering raises."""
    if prompt is None:
        whole = Record.from_messages(completion) if isinstance(completion, list) else Record.from_text(completion)
        return renderer.segments(whole)
    if isinstance(prompt, str):
        return renderer.segments(Record.from_prompt_completion(prompt, completion))
    segments = renderer.segments(Record.from_messages([*prompt, *completion]))
    # Training would supervise every assistant turn; here those inside the prompt are context.
    earlier = sum(message["role"] == "assistant" for message in prompt)
    for segment in segments:
        if segment.supervised and earlier:
            segment.supervised, earlier = False, earlier - 1
    return segments


class PreferenceCollator:
    """A batch of B pairs as 2B rows, chosen rows then rejected rows (TRL's order), right-padded.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` (2B, L) long, ``margin`` (B,)
    float, and ``ref_chosen_logps`` / ``ref_rejected_logps`` (B,) float when the examples carry
    precomputed reference log-probabilities.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("cannot collate an empty batch (no preference pairs)")
        rows = [(e[f"{side}_ids"], e[f"{side}_mask"]) for side in SIDES for e in examples]
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        completion_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (ids, mask) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            completion_mask[row, : len(ids)] = torch.as_tensor(mask, dtype=torch.long)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "margin": torch.tensor([float(e["margin"]) for e in examples]),
        }
        if "ref_chosen_logps" in examples[0]:
            for key in ("ref_chosen_logps", "ref_rejected_logps"):
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        return batch
