"""Preference data (reward model, DPO), in TRL's conventions, checked line by line before training.

Each line holds one pair, ``chosen`` preferred over ``rejected``:

* explicit prompt, standard: ``{"prompt": str, "chosen": str, "rejected": str}``, the completions
  following the prompt as a ``prompt``/``completion`` record's do;
* explicit prompt, conversational: ``{"prompt": [messages], "chosen": [messages], "rejected":
  [messages]}``, the prompt a conversation so far (its last turn the user's, usually), chosen and
  rejected the assistant's answer(s), a list of ``{role, content}`` messages ending with an
  assistant turn;
* implicit prompt: ``{"chosen": ..., "rejected": ...}``, each a whole text or a whole conversation.
  A reward model scores them as they are; DPO takes the messages the two conversations share at
  the start as the prompt (TRL's ``extract_prompt``) and needs an explicit prompt for texts.

An optional ``"margin"`` (a number) asks the reward model for ``r_chosen - r_rejected`` above it.
Other keys are ignored. Every problem of the file (missing ``rejected``, a completion of the wrong
type, a bad message...) is reported at once with file and line, as the other readers do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.readers import object_rows
from ..data.records import Problems, parse_messages, type_name
from ..errors import DataError

Messages = list[dict[str, str]]


@dataclass
class PreferencePair:
    """One line: ``chosen`` preferred over ``rejected``, after ``prompt`` (None: implicit)."""

    chosen: str | Messages
    rejected: str | Messages
    prompt: str | Messages | None = None
    margin: float = 0.0
    where: str = ""  # "FILE:line N", for the problems found after reading (rendering, DPO's prompt)

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """Every pair of a JSONL / JSON / Parquet file; DataError naming each bad line (all of them)."""
    problems = Problems(str(path))
    pairs = []
    for where, row in object_rows(path, problems, what="preference data"):
        pair = _parse(row, where, problems)
        if pair is not None:
            pair.where = f"{path}:{where}"
            pairs.append(pair)
    problems.raise_if_any("preference data")
    if not pairs:
        raise DataError(f"{path}: no preference pairs (the file is empty); expected {EXPECTED}")
    return pairs


EXPECTED = "objects with 'chosen' and 'rejected' (and usually 'prompt'), as TRL's preference datasets have"


def _parse(row: Any, where: str, problems: Problems) -> PreferencePair | None:
    if not isinstance(row, dict):
        problems.add(where, f"expected an object with 'chosen' and 'rejected', got {type_name(row)}")
        return None
    before = len(problems)
    missing = [key for key in ("chosen", "rejected") if key not in row]
    for key in missing:
        problems.add(where, f"missing key {key!r} (a preference pair needs 'chosen' and 'rejected')")
    prompt = row.get("prompt")
    margin = _margin(row.get("margin"), where, problems)
    if missing:
        return None
    if prompt is None:
        # Implicit prompt: both whole texts or both whole conversations (ending with the assistant).
        conversational = isinstance(row["chosen"], list)
        chosen = _side(row, "chosen", conversational, where, problems, whole=True)
        rejected = _side(row, "rejected", conversational, where, problems, whole=True)
    else:
        conversational = isinstance(prompt, list)
        if conversational:
            prompt = parse_messages(prompt, problems, where, "prompt", need_assistant=False)
        elif not isinstance(prompt, str) or not prompt.strip():
            what = "empty" if isinstance(prompt, str) else f"{type_name(prompt)}"
            problems.add(where, f"'prompt' must be a non-empty string or a list of messages, got {what}")
        chosen = _side(row, "chosen", conversational, where, problems, whole=False)
        rejected = _side(row, "rejected", conversational, where, problems, whole=False)
    if len(problems) > before:
        return None
    return PreferencePair(chosen, rejected, prompt, margin)


def _side(row: dict, key: str, conversational: bool, where: str, problems: Problems, whole: bool):
    """``row[key]``, a completion (or with ``whole`` a whole text/conversation), of the pair's kind."""
    value = row[key]
    if not conversational:
        if isinstance(value, str) and value.strip():
            return value
        like = "'prompt'" if not whole else "'chosen'"
        what = "empty" if isinstance(value, str) else type_name(value)
        problems.add(where, f"{key!r} must be a non-empty string like {like}, got {what}")
        return None
    if not isinstance(value, list):
        like = "a conversational 'prompt'" if not whole else "'chosen'"
        problems.add(where, f"{key!r} must be a list of messages like {like}, got {type_name(value)}")
        return None
    messages = parse_messages(value, problems, where, key, need_assistant=False)
    if messages and messages[-1]["role"] != "assistant":
        problems.add(where, f"{key!r} must end with an assistant message (the answer being compared)")
        return None
    return messages


def _margin(value: Any, where: str, problems: Problems) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problems.add(where, f"'margin' must be a finite number, got {value!r}")
        return 0.0
    return float(value)


def with_explicit_prompts(pairs: list[PreferencePair]) -> list[PreferencePair]:
    """DPO's pairs: an implicit prompt is the messages both conversations start with (TRL's
    ``extract_prompt``); a text pair without ``prompt``, or conversations that share no first
    message or differ only in the prompt, is a problem naming its line (all reported together)."""
    problems = Problems("")
    out = []
    for pair in pairs:
        if pair.prompt is not None:
            out.append(pair)
            continue
        if not pair.conversational:
            problems.add(pair.where, "DPO needs the prompt: add 'prompt' (the completions follow it)")
            continue
        shared = 0
        while shared < min(len(pair.chosen), len(pair.rejected)) and pair.chosen[shared] == pair.rejected[shared]:
            shared += 1
        chosen, rejected = pair.chosen[shared:], pair.rejected[shared:]
        if not shared or not chosen or not rejected:
            what = "share no first message" if not shared else "are the same conversation"
            problems.add(pair.where, f"'chosen' and 'rejected' {what}, so no prompt can be taken from them")
            continue
        if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
            problems.add(pair.where, "'chosen' and 'rejected' must differ from an assistant message on")
            continue
        out.append(PreferencePair(chosen, rejected, pair.chosen[:shared], pair.margin, pair.where))
    problems.raise_if_any("preference data for DPO")
    return out


def run_pairs(cfg) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """A run's (train, validation) pairs: ``cfg.data`` and ``cfg.valid_data``, or a seeded
    ``cfg.valid_ratio`` share of the training pairs held out."""
    train = read_preferences(cfg.data)
    valid = read_preferences(cfg.valid_data) if cfg.valid_data else []
    if cfg.valid_ratio and not cfg.valid_data:
        from ..data import split_records

        train, valid = split_records(train, cfg.valid_ratio, seed=cfg.seed)
    return train, valid
