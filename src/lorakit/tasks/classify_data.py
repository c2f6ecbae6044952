"""Sequence-classification data: ``{"text", "label"}`` lines, optionally with ``"text_pair"``.

Labels are strings or integers. Their order (label index = position) is ``--labels a,b,c`` when
given; else, when every training label is an integer, 0..max (the integer is the index); else the
training data's labels in first-seen order. The order is saved with the run (train_config.yaml's
``labels`` and ``labels.json``), so that a resumed run and a later reader map indices the same way.
Every line is checked before training, as `lorakit.data.read_records` does for causal-LM data: all
problems are reported together with file and line, and a validation label the training labels
lack is one of them. Token classification (`tag_data`) reads its lines through the same helpers
(`read_items`, `label_problem`, `label_order`, `check_labels`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.records import Problems
from ..errors import DataError


@dataclass
class LabeledText:
    text: str
    label: str  # as the data spells it; ints as their decimal string
    text_pair: str | None = None
    where: str = ""  # "FILE:line N", for errors found after reading (unknown labels)
    is_int: bool = False

    @property
    def labels(self) -> tuple[str]:
        return (self.label,)


def read_labeled(path: str | Path) -> list[LabeledText]:
    """Every row of a JSONL file (or a JSON list) as `LabeledText`; DataError naming each bad line."""
    return read_items(path, _parse, "classification data")


def read_items(path: str | Path, parse: Callable[[Any, str, Problems], Any], what: str) -> list:
    """``parse(row, where, problems)`` of every row of a JSONL file (or a JSON list), each item's
    ``where`` set to ``"FILE:line N"``; one DataError naming every bad line (``parse`` adds a
    problem and returns None for a bad row), or none when the file has no examples."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    problems = Problems(str(path))
    out = []
    for where, row in _rows(path, problems):
        item = parse(row, where, problems)
        if item is not None:
            item.where = f"{path}:{where}"
            out.append(item)
    problems.raise_if_any(what)
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def _rows(path: Path, problems: Problems):
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            problems.add(f"line {e.lineno}", f"invalid JSON ({e.msg})")
            return
        for i, row in enumerate(data):
            yield f"item {i}", row
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as e:
            problems.add(f"line {number}", f"invalid JSON ({e.msg} at column {e.colno})")


def _parse(row: Any, where: str, problems: Problems) -> LabeledText | None:
    if not isinstance(row, dict):
        problems.add(where, f"expected an object with text and label, got {type(row).__name__}")
        return None
    bad = False
    for key in ("text", "text_pair"):
        value = row.get(key)
        if key == "text_pair" and value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            what = "missing" if value is None else f"not a non-empty string ({value!r})"
            problems.add(where, f"{key!r} is {what}")
            bad = True
    label = row.get("label")
    wrong = label_problem(label)
    if wrong:
        problems.add(where, f"'label' is {wrong}")
        bad = True
    if bad:
        return None
    return LabeledText(row["text"], str(label), row.get("text_pair"), is_int=isinstance(label, int))


def label_problem(label: Any) -> str | None:
    """What is wrong with ``label`` as a class label (a string or an integer >= 0), or None."""
    # bool is an int subclass, and a JSON true is surely a mistake for a class label.
    if isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, int) and label < 0):
        return "missing" if label is None else f"{label!r} (must be a string or an integer >= 0)"
    return None


def label_order(train: list, fixed: list[str] | None) -> list[str]:
    """The labels by index; see the module docstring for the rule. ``train``: items with
    ``labels`` (their labels as strings) and ``is_int`` (all of them integers in the data)."""
    if fixed:
        if len(set(fixed)) != len(fixed):
            raise DataError(f"--labels lists a label twice: {fixed}")
        return list(fixed)
    if all(item.is_int for item in train):
        return [str(i) for i in range(max(int(label) for item in train for label in item.labels) + 1)]
    return list(dict.fromkeys(label for item in train for label in item.labels))


def check_labels(items: list, labels: list[str], what: str) -> None:
    """DataError naming the file and line of each label of ``items`` (see `label_order`) that
    ``labels`` lacks."""
    known = set(labels)
    problems = Problems("")
    for item in items:
        for label in dict.fromkeys(item.labels):  # a tag repeated on a line is reported once
            if label not in known:
                problems.add(item.where, f"label {label!r} is not one of the run's labels {labels}")
    problems.raise_if_any(what)
