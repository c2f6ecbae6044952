"""`lorakit train --task classify` end to end on the embedded model: the command a user runs."""

from __future__ import annotations

import json

import pytest

from tests.test_cli_e2e import lorakit

pytestmark = pytest.mark.e2e


def test_train_classify_on_the_embedded_model(tmp_path):
    data = tmp_path / "reviews.jsonl"
    with data.open("w") as f:
        for i in range(24):
            word = ["great", "lovely", "awful", "terrible"][i % 4]
            f.write(json.dumps({"text": f"The movie was {word}.", "label": "pos" if i % 4 < 2 else "neg"}) + "\n")
    out = tmp_path / "run"
    done = lorakit(
        "train", "--task", "classify", "--labels", "neg,pos", "--data", str(data), "--valid-ratio", "0.25",
        "--max-steps", "2", "--output-dir", str(out),
    )  # fmt: skip
    assert "accuracy" in done.stdout and "macro_f1" in done.stdout
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    assert json.loads((out / "labels.json").read_text()) == ["neg", "pos"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine", "label": "pos"}) + "\n" + json.dumps({"text": "no label"}) + "\n")
    refused = lorakit(
        "train", "--task", "classify", "--data", str(bad), "--output-dir", str(tmp_path / "r2"), check=False
    )
    assert refused.returncode != 0 and "bad.jsonl:line 2: 'label' is missing" in refused.stderr


def test_train_and_eval_token_classify_on_the_embedded_model(tmp_path):
    rows = []
    for i in range(16):
        name, city = ["Anna Berg", "Bob", "Carla Diaz", "Dmitri"][i % 4], ["Paris", "Rio de Janeiro"][i % 2]
        words = [*name.split(), "flew", "to", *city.split(), "."]
        tags = ["B-PER", *["I-PER"] * (len(name.split()) - 1), "O", "O", "B-LOC"]
        rows.append({"tokens": words, "tags": [*tags, *["I-LOC"] * (len(city.split()) - 1), "O"]})
    data = tmp_path / "ner.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    done = lorakit(
        "train", "--task", "token-classify", "--data", str(data), "--valid-ratio", "0.25", "--max-steps", "2",
        "--output-dir", str(out),
    )  # fmt: skip
    assert "token_accuracy" in done.stdout and "entity_f1" in done.stdout
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS" and config["modules_to_save"] == ["score"]
    assert json.loads((out / "labels.json").read_text()) == ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]
    adapter = str(out / "adapter")
    evaluated = lorakit("eval", "--task", "token-classify", "--adapter", adapter, "--data", str(data), "--json")
    result = json.loads(evaluated.stdout)
    assert result["examples"] == 16 and 0 <= result["token_accuracy"] <= 1 and "entity_f1" in result
