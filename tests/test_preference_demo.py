"""The RLHF demo's synthetic data and its judge (lorakit.data.preference_demo)."""

from __future__ import annotations

import json
import random

from lorakit.data.preference_demo import (
    json_answer,
    judge,
    preference_rows,
    prose_answer,
    sft_records,
    win_rate,
    wrong_json_answer,
)

FIELDS = {"name": "Ana Silva", "from": "Lisbon", "to": "Oslo", "date": "14 March", "seats": 3, "loyalty": None}


def test_the_judge_scores_right_json_wrong_json_and_prose():
    rng = random.Random(0)
    assert judge(json_answer(FIELDS), FIELDS) == 1.0
    assert judge("  " + json_answer(FIELDS) + "\n", FIELDS) == 1.0
    for _ in range(20):
        assert judge(wrong_json_answer(FIELDS, rng), FIELDS) == 0.5
    assert judge(prose_answer(FIELDS, rng), FIELDS) == 0.0
    assert judge('{"name": "Ana Silva"}', FIELDS) == 0.0  # keys missing
    assert judge("[1, 2]", FIELDS) == 0.0 and judge("{not json", FIELDS) == 0.0


def test_win_rate_counts_ties_as_half():
    right, prose = json_answer(FIELDS), prose_answer(FIELDS, random.Random(1))
    assert win_rate([right, right], [prose, right], [FIELDS, FIELDS]) == 0.75
    assert win_rate([prose], [right], [FIELDS]) == 0.0


def test_splits_are_deterministic_disjoint_and_chosen_always_wins():
    train, test = preference_rows(40, "train"), preference_rows(20, "test")
    assert train == preference_rows(40, "train")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert not {r["fields"]["from"] for r in train} & {r["fields"]["from"] for r in test}
    for row in train + test:
        assert judge(row["chosen"], row["fields"]) == 1.0 > judge(row["rejected"], row["fields"])
    assert any(judge(r["rejected"], r["fields"]) == 0.5 for r in train)  # some wrong-value JSON
    assert any(judge(r["rejected"], r["fields"]) == 0.0 for r in train)  # and prose


def test_sft_answers_mix_json_and_prose():
    records = sft_records(10)
    kinds = [r.completion.startswith("{") for r in records]
    assert kinds.count(True) == 5 and kinds.count(False) == 5
    assert all(json.loads(r.completion) for r, is_json in zip(records, kinds) if is_json)
