"""Preference data: every bad line named with file and line before training; the tasks' options checked."""

import json

import pytest

from lorakit import ConfigError, DataError
from lorakit.tasks import make_task
from lorakit.tasks.preference_data import read_preferences
from lorakit.training.config import TrainConfig

USER = [{"role": "user", "content": "Hi"}]
SAID = [{"role": "assistant", "content": "Hello"}]


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_every_bad_line_is_reported_with_file_and_line(tmp_path):
    path = write(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "Q", "chosen": "a", "rejected": "b"},  # fine
            {"prompt": "Q", "chosen": "a"},  # 2: no rejected
            {"prompt": "Q", "chosen": 3, "rejected": "b"},  # 3: wrong type
            {"prompt": USER, "chosen": "a", "rejected": SAID},  # 4: a string where messages go
            {"prompt": USER, "chosen": USER, "rejected": SAID},  # 5: chosen not the assistant's
            "not json",  # 6
            {"prompt": "Q", "chosen": "a", "rejected": "b", "margin": "big"},  # 7
            {"prompt": USER, "chosen": [{"role": "robot", "content": "x"}], "rejected": SAID},  # 8
        ],
    )
    with pytest.raises(DataError) as info:
        read_preferences(path)
    message = str(info.value)
    for expected in (
        "prefs.jsonl:line 2: missing key 'rejected'",
        "prefs.jsonl:line 3: 'chosen' must be a non-empty string",
        "prefs.jsonl:line 4: 'chosen' must be a list of messages",
        "prefs.jsonl:line 5: 'chosen' must end with an assistant message",
        "prefs.jsonl:line 6: invalid JSON",
    ):
        assert expected in message, message
    assert "line 7" in message or "more" in message  # beyond the first five, counted
    assert "nothing was trained" in message


def test_margins_implicit_prompts_and_conversations_are_read(tmp_path):
    path = write(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "Q", "chosen": "a", "rejected": "b", "margin": 1.5, "id": 7},
            {"chosen": "Q a", "rejected": "Q b"},
            {"prompt": USER, "chosen": SAID, "rejected": [{"role": "assistant", "content": "Bye"}]},
        ],
    )
    pairs = read_preferences(path)
    assert [p.margin for p in pairs] == [1.5, 0.0, 0.0]
    assert pairs[1].prompt is None and pairs[2].conversational and pairs[2].where.endswith("prefs.jsonl:line 3")


def test_dpo_refuses_bad_data_and_implicit_text_before_the_model_loads(tmp_path):
    bad = write(
        tmp_path / "bad.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "a"}]
    )
    with pytest.raises(DataError, match=r"bad\.jsonl:line 2: missing key 'rejected'"):
        make_task(TrainConfig(data=bad, task="dpo"))
    implicit = write(tmp_path / "implicit.jsonl", [{"chosen": "Q a", "rejected": "Q b"}])
    with pytest.raises(DataError, match=r"implicit\.jsonl:line 1: DPO needs the prompt"):
        make_task(TrainConfig(data=implicit, task="dpo"))
    same = write(
        tmp_path / "same.jsonl", [{"chosen": [*USER, *SAID], "rejected": [{"role": "user", "content": "X"}, *SAID]}]
    )
    with pytest.raises(DataError, match="share no first message"):
        make_task(TrainConfig(data=same, task="dpo"))
    valid = write(tmp_path / "valid.jsonl", [{"prompt": "Q", "rejected": "b"}])
    with pytest.raises(DataError, match=r"valid\.jsonl:line 1: missing key 'chosen'"):
        make_task(TrainConfig(data=str(tmp_path / "implicit.jsonl"), valid_data=valid, task="reward"))
    with pytest.raises(DataError, match="file not found"):
        make_task(TrainConfig(data=str(tmp_path / "missing.jsonl"), task="reward"))
    with pytest.raises(ConfigError, match="packing"):
        make_task(TrainConfig(data=bad, task="dpo", packing=True, max_length=64))


def test_options_are_checked_and_belong_to_their_task(tmp_path):
    data = str(tmp_path / "x.jsonl")
    assert TrainConfig(data=data, task="dpo", beta=0.5, dpo_loss="ipo").beta == 0.5
    for options, match in (
        ({"task": "dpo", "beta": 0}, "beta must be a positive number"),
        ({"task": "dpo", "dpo_loss": "kto"}, "dpo_loss must be one of sigmoid | ipo | hinge"),
        ({"task": "dpo", "label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"task": "dpo", "dpo_loss": "hinge", "label_smoothing": 0.1}, "applies to the sigmoid loss"),
        ({"task": "reward", "center_rewards": -1}, "center_rewards must be a number >= 0"),
        ({"beta": 0.3}, "beta is for task=dpo, and this run is task=causal-lm: add --task dpo"),
        (
            {"task": "reward", "precompute_ref": True, "ref_adapter": "d"},
            "ref_adapter, precompute_ref are for task=dpo",
        ),
        ({"task": "dpo", "center_rewards": 0.01}, "center_rewards is for task=reward"),
    ):
        with pytest.raises(ConfigError, match=match):
            TrainConfig(data=data, **options)
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        make_task(TrainConfig(data=data, task="dpo", ref_adapter=str(tmp_path)))
