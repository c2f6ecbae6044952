"""`lorakit train --task dpo | reward` and `lorakit score` end to end on the embedded model."""

from __future__ import annotations

import json

import pytest

from tests.test_cli_e2e import lorakit

pytestmark = pytest.mark.e2e


def prefs(path, n=8):
    """Valid JSON beats prose, as the issue's judge-able task has it."""
    with path.open("w") as f:
        for i in range(n):
            good = json.dumps({"name": f"item{i}", "count": i})
            f.write(
                json.dumps({"prompt": f"Give item {i} as JSON.", "chosen": good, "rejected": f"Item {i}, {i} of them."})
            )
            f.write("\n")
    return str(path)


def test_train_dpo_on_the_embedded_model(tmp_path, embedded_model):
    data = prefs(tmp_path / "prefs.jsonl")
    out = tmp_path / "dpo"
    done = lorakit(
        "train", "--task", "dpo", "--data", data, "--valid-ratio", "0.25", "--beta", "0.2", "--max-steps", "2",
        "--batch-size", "2", "--max-length", "64", "--output-dir", str(out),
    )  # fmt: skip
    assert "rewards/accuracies" in done.stdout and "rewards/margins" in done.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(
        {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(r) for r in steps
    )
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # a fresh adapter is the reference: log 2
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert "beta: 0.2" in (out / "train_config.yaml").read_text()
    evaluated = json.loads(
        lorakit("eval", "--task", "dpo", "--adapter", str(out / "adapter"), "--data", data, "--json").stdout
    )
    assert evaluated["examples"] == 8 and 0 <= evaluated["rewards/accuracies"] <= 1
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(evaluated)
    assert evaluated["rewards/margins"] == pytest.approx(evaluated["rewards/chosen"] - evaluated["rewards/rejected"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
        + "\n"
        + json.dumps({"prompt": "a", "chosen": "b"})
        + "\n"
    )
    refused = lorakit("train", "--task", "dpo", "--data", str(bad), "--output-dir", str(tmp_path / "r2"), check=False)
    assert refused.returncode == 2 and "bad.jsonl:line 2: missing key 'rejected'" in refused.stderr
    assert not (tmp_path / "r2").exists()


def test_train_a_reward_model_and_score_with_it(tmp_path, embedded_model):
    data = prefs(tmp_path / "prefs.jsonl")
    out = tmp_path / "reward"
    done = lorakit(
        "train", "--task", "reward", "--data", data, "--valid-ratio", "0.25", "--max-steps", "2", "--batch-size", "2",
        "--max-length", "64", "--center-rewards", "0.01", "--output-dir", str(out),
    )  # fmt: skip
    assert "accuracy" in done.stdout and "margin" in done.stdout
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    scored = lorakit("score", "--adapter", str(out / "adapter"), "--data", data, "--json")
    result = json.loads(scored.stdout)
    assert len(result["pairs"]) == 8 and 0 <= result["accuracy"] <= 1
    assert result["pairs"][0]["where"].endswith("prefs.jsonl:line 1")
    evaluated = json.loads(
        lorakit("eval", "--task", "reward", "--adapter", str(out / "adapter"), "--data", data, "--json").stdout
    )
    # The task's evaluation and `lorakit score` read the same pairs through separate code.
    assert evaluated["examples"] == 8 and evaluated["accuracy"] == pytest.approx(result["accuracy"])
    texts = lorakit(
        "score",
        "--adapter",
        str(out / "adapter"),
        "--prompt",
        "Give item 0 as JSON.",
        "--text",
        '{"name": "item0", "count": 0}',
        "--json",
    )
    assert json.loads(texts.stdout)[0]["reward"] == pytest.approx(result["pairs"][0]["chosen"], abs=1e-4)
    wrong = lorakit("score", "--adapter", str(tmp_path), "--text", "x", check=False)
    assert wrong.returncode == 2 and "no adapter_config.json" in wrong.stderr
