"""The `lorakit demo` task: extract flight-booking details from a free-text request as JSON.

Example prompt (after a fixed instruction)::

    Hi, this is Priya Natarajan. could you book 3 seats on the Lisbon to Oslo flight on 14 March?
    My loyalty number is QX-48213.

and its completion::

    {"name": "Priya Natarajan", "from": "Lisbon", "to": "Oslo", "date": "14 March", "seats": 3,
     "loyalty": "QX-48213"}

Why this task: a LoRA adapter on a ~135M model learns quickly to *copy spans* into a fixed
*output format*, which is what this needs; every value appears verbatim in the message (seats
as digits, dates as written), so nothing needs arithmetic or conversion, which small models
learn slowly. It still requires real extraction: many phrasings, fields in varying order,
optional fields (name, loyalty) that are sometimes absent and then ``null``. The test split
draws every value from pools disjoint from training's (names, cities, months, seat counts,
loyalty-code letters), so memorising training values scores nothing. Phrasings are shared by both
splits: the demo measures extraction of unseen values, which LoRA teaches a 135M model in a few
minutes; unseen phrasings as well need far more steps than a CPU demo affords.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from ..errors import ConfigError
from ..safe_files.atomic import write_text_atomically
from . import demo_pools as pools
from .records import Record

log = logging.getLogger("lorakit.data.demo_task")

KEYS = ("name", "from", "to", "date", "seats", "loyalty")
INSTRUCTION = "Extract the booking as JSON with keys name, from, to, date, seats, loyalty (null if missing)."
SPLITS = {"train": 0, "test": 1}
P_NAME, P_LOYALTY = 0.85, 0.6  # how often the optional fields are present


def make_request(rng: random.Random, split: str = "train") -> tuple[str, dict]:
    """One ``(message, fields)`` pair of ``split`` ("train" or "test"), drawn from ``rng``."""
    side = SPLITS[split]
    pick = lambda pair: rng.choice(pair[side])  # noqa: E731 - the split's half of a (train, test) pool

    name = f"{pick(pools.FIRST_NAMES)} {pick(pools.LAST_NAMES)}" if rng.random() < P_NAME else None
    src, dst = rng.sample(pools.CITIES[side], 2)
    month, day = pick(pools.MONTHS), rng.randint(1, 28)
    date = f"{day} {month}" if rng.random() < 0.6 else f"{month} {day}"
    n = pick(pools.SEATS)
    code = None
    if rng.random() < P_LOYALTY:
        letters = pools.CODE_LETTERS[side]
        code = f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randint(10000, 99999)}"

    phrasings = lambda pair: pair[0] + pair[1]  # noqa: E731 - phrasings are shared by both splits
    core = rng.choice(phrasings(pools.CORE)).format(n=n, src=src, dst=dst, date=date, **_nouns(n))
    parts = [core]
    if code:
        loyalty = rng.choice(phrasings(pools.LOYALTY)).format(code=code)
        parts.insert(rng.randrange(2), loyalty)  # before or after the request
    if name and rng.random() < 0.6:
        parts.insert(0, rng.choice(phrasings(pools.INTROS)).format(name=name))
    else:
        opener = rng.choice(pools.OPENERS)
        if opener:
            parts.insert(0, opener)
        if name:
            parts.append(rng.choice(phrasings(pools.SIGNATURES)).format(name=name))
    message = " ".join(
        _capitalize(p) if i == 0 or parts[i - 1].endswith((".", "?", "!", ")")) else p for i, p in enumerate(parts)
    )
    fields = {"name": name, "from": src, "to": dst, "date": date, "seats": n, "loyalty": code}
    return message, fields


def make_record(rng: random.Random, split: str = "train") -> Record:
    """A prompt/completion Record: instruction + message -> compact JSON with `KEYS` in order."""
    message, fields = make_request(rng, split)
    prompt = f"{INSTRUCTION}\n\nMessage: {message}"
    return Record.from_prompt_completion(prompt, json.dumps(fields, ensure_ascii=False))


def demo_records(n: int, split: str = "train", seed: int = 0) -> list[Record]:
    """``n`` distinct records of ``split``; the same ``seed`` always gives the same records."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if n < 1:
        raise ConfigError(f"the demo needs at least 1 {split} record, got n={n}")
    # A string seed is hashed deterministically (unlike hash()), and keeps the splits' streams apart.
    rng = random.Random(f"lorakit-demo:{seed}:{split}")
    records: list[Record] = []
    seen: set[str] = set()
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 50 * n + 100:
            raise ConfigError(f"could not draw {n} distinct {split} requests; ask for fewer")
        record = make_record(rng, split)
        if record.prompt not in seen:
            seen.add(record.prompt)
            records.append(record)
    return records


def write_demo_dataset(out_dir: str | Path, n_train: int = 480, n_test: int = 40, seed: int = 0) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (prompt/completion lines) to ``out_dir``.

    Returns ``{"train": path, "test": path}``. Deterministic for a given ``seed``; the test split
    shares no names, cities, dates, seat counts or loyalty codes with the training split. Both
    splits are drawn before anything is written, and each file is renamed into place whole, so a
    bad argument or an interruption never leaves a truncated or mismatched pair behind.
    """
    out = Path(out_dir)
    texts = {
        split: "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in demo_records(n, split, seed))
        for split, n in (("train", n_train), ("test", n_test))
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, text in texts.items():
        paths[split] = out / f"{split}.jsonl"
        write_text_atomically(paths[split], text)
    log.info("demo dataset: %d train and %d test records in %s", n_train, n_test, out)
    return paths


def _nouns(n: int) -> dict[str, str]:
    one = n == 1
    return {
        "seats": "seat" if one else "seats",
        "tickets": "ticket" if one else "tickets",
        "people": "person" if one else "people",
        "passengers": "passenger" if one else "passengers",
    }


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]
