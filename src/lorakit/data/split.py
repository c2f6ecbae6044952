"""Train/validation splits: by a seeded ratio, or from a separate file."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TypeVar

from ..errors import DataError
from .readers import read_records
from .records import Record

log = logging.getLogger("lorakit.data.split")

T = TypeVar("T")


def split_records(records: list[T], valid_ratio: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """``(train, valid)``: a seeded random ``valid_ratio`` share held out, both in input order.

    Deterministic for a given ``seed`` and input (it depends on nothing else, not even the global
    random state), so a resumed or repeated run validates on the same records. At least one record
    goes to each side; a dataset too small for that is refused.
    """
    if not 0 <= valid_ratio < 1:
        raise DataError(f"valid_ratio must be in [0, 1), got {valid_ratio!r}")
    if valid_ratio == 0:
        return list(records), []
    if len(records) < 2:
        raise DataError(
            f"cannot split {len(records)} record(s) into train and validation; "
            f"add data or give a separate validation file"
        )
    n_valid = min(max(1, round(len(records) * valid_ratio)), len(records) - 1)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)  # a private generator: the global state is left alone
    held_out = set(order[:n_valid])
    train = [r for i, r in enumerate(records) if i not in held_out]
    valid = [r for i, r in enumerate(records) if i in held_out]
    log.info(
        "split %d records: %d train, %d validation (ratio %.3g, seed %d)",
        len(records),
        len(train),
        len(valid),
        valid_ratio,
        seed,
    )
    return train, valid


def load_splits(
    train_path: str | Path, valid_path: str | Path | None = None, valid_ratio: float = 0.0, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Read the training file and its validation records: from ``valid_path`` when given
    (``valid_ratio`` is then ignored), else a seeded ``valid_ratio`` split, else none."""
    records = read_records(train_path)
    if valid_path:
        return records, read_records(valid_path)
    return split_records(records, valid_ratio, seed=seed)
