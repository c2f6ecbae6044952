"""The RLHF demo's data: booking requests answered as JSON or as prose, and a judge that a program runs.

The request messages are the demo task's (`lorakit.data.demo_task`: disjoint value pools for the
train and test splits), but the instruction names no format: "Note the booking details." An
answer is either the compact JSON the demo teaches or a prose sentence with the same facts.

* **SFT data** (`sft_records`): half the answers JSON, half prose, so that the supervised policy
  answers in either form — what a model fine-tuned on mixed human demonstrations does.
* **Preference pairs** (`preference_rows`, TRL's ``{"prompt", "chosen", "rejected"}``): the chosen
  answer is always the right JSON; the rejected one is the same facts in prose (most pairs) or JSON
  with one field wrong (from/to swapped, a seat count off by one, a made-up name), so that a
  reward model has to read the values, not only the first character.
* **The judge** (`judge`): 1.0 for JSON whose fields all equal the request's, 0.5 for JSON with
  the right keys and a wrong value, 0.0 for anything else. `win_rate` compares two policies'
  answers prompt by prompt with it (ties count one half), which is how the demo reports the DPO
  policy against the SFT one without trusting the learned reward model.
"""

from __future__ import annotations

import json
import random
from typing import Any

from .demo_task import KEYS, make_request
from .records import Record

INSTRUCTION = "Note the booking details."
P_PROSE_REJECTED = 0.7  # the rest of the rejected answers are JSON with one wrong field
# Names in no pool of the demo task: a rejected answer's made-up name (for a request that gives one
# or none). With ``null`` as the wrong name instead, DPO learned that a null name is bad and made
# names up for requests without one (docs/tasks.md, the RLHF demo).
INVENTED_NAMES = ("Alex Morgan", "Casey Quinn", "Jordan Riley", "Avery Brooks")


def prompt_for(message: str) -> str:
    return f"{INSTRUCTION}\n\nMessage: {message}"


def json_answer(fields: dict[str, Any]) -> str:
    return json.dumps(fields, ensure_ascii=False)


def prose_answer(fields: dict[str, Any], rng: random.Random) -> str:
    """The same facts as a sentence (no JSON)."""
    who = fields["name"] or "The traveller"
    n = fields["seats"]
    seats = f"{n} seat" if n == 1 else f"{n} seats"
    sentence = rng.choice(
        [
            f"{who} wants {seats} from {fields['from']} to {fields['to']} on {fields['date']}.",
            f"{who} is booking {seats} on the {fields['from']} to {fields['to']} flight, {fields['date']}.",
            f"Booking for {who}: {seats}, {fields['from']} to {fields['to']}, {fields['date']}.",
        ]
    )
    if fields["loyalty"]:
        sentence += f" Loyalty number {fields['loyalty']}."
    return sentence


def wrong_json_answer(fields: dict[str, Any], rng: random.Random) -> str:
    """JSON with the right keys and exactly one wrong value: from/to swapped, the seat count off by
    one, or a made-up name (in place of the request's, or where it gives none)."""
    wrong = dict(fields)
    flaw = rng.choice(["swap", "seats", "name"])
    if flaw == "swap":
        wrong["from"], wrong["to"] = fields["to"], fields["from"]
    elif flaw == "seats":
        wrong["seats"] = fields["seats"] + rng.choice([-1, 1]) if fields["seats"] > 1 else 2
    else:
        wrong["name"] = rng.choice([n for n in INVENTED_NAMES if n != fields["name"]])
    return json_answer(wrong)


def _requests(n: int, split: str, seed: int, salt: str):
    """``n`` distinct (message, fields) pairs of ``split``; deterministic for ``seed``."""
    rng = random.Random(f"lorakit-rlhf-demo:{seed}:{split}:{salt}")
    seen: set[str] = set()
    while len(seen) < n:
        message, fields = make_request(rng, split)
        if message not in seen:
            seen.add(message)
            yield message, fields, rng


def sft_records(n: int, split: str = "train", seed: int = 0) -> list[Record]:
    """``n`` prompt/completion records, answers alternating JSON and prose (one of each per pair)."""
    return [
        Record.from_prompt_completion(
            prompt_for(message), json_answer(fields) if i % 2 == 0 else prose_answer(fields, rng)
        )
        for i, (message, fields, rng) in enumerate(_requests(n, split, seed, "sft"))
    ]


def preference_rows(n: int, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """``n`` preference rows ``{"prompt", "chosen", "rejected", "fields"}`` (``fields``: the truth,
    for the judge; a preference reader ignores keys it does not know)."""
    rows = []
    for message, fields, rng in _requests(n, split, seed, "pairs"):
        if rng.random() < P_PROSE_REJECTED:
            rejected = prose_answer(fields, rng)
        else:
            rejected = wrong_json_answer(fields, rng)
        rows.append(
            {"prompt": prompt_for(message), "chosen": json_answer(fields), "rejected": rejected, "fields": fields}
        )
    return rows


def judge(answer: str, fields: dict[str, Any]) -> float:
    """1.0: JSON object with every field right; 0.5: JSON object with the right keys, a value wrong;
    0.0: anything else (prose, broken JSON, missing or extra keys)."""
    try:
        parsed = json.loads(answer.strip())
    except json.JSONDecodeError:
        return 0.0
    if not isinstance(parsed, dict) or set(parsed) != set(KEYS):
        return 0.0
    return 1.0 if all(parsed[k] == fields[k] for k in KEYS) else 0.5


def win_rate(answers: list[str], baseline: list[str], truths: list[dict[str, Any]]) -> float:
    """Share of prompts where ``answers`` is judged better than ``baseline`` (a tie counts 1/2)."""
    if not truths or not (len(answers) == len(baseline) == len(truths)):
        raise ValueError("win_rate needs one answer and one baseline answer per truth, and at least one")
    score = 0.0
    for a, b, truth in zip(answers, baseline, truths):
        ja, jb = judge(a, truth), judge(b, truth)
        score += 1.0 if ja > jb else 0.5 if ja == jb else 0.0
    return score / len(truths)


__all__ = ["judge", "preference_rows", "prompt_for", "sft_records", "win_rate"]
