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
