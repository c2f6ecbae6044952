"""`lorakit demo --rlhf`: the SFT → reward model → DPO pipeline runs end to end and reports its
judgement (a tiny model saved as a folder and a few steps each: the plumbing, not the figures,
which docs/tasks.md records from the full demo on the embedded model)."""

from __future__ import annotations

import io
import json

import pytest

from lorakit.cli import demo_rlhf
from lorakit.data.preference_demo import judge

from .serve_double import echo_tokenizer
from .tiny import tiny_llama


def test_the_pipeline_trains_three_adapters_and_judges_both_policies(tmp_path, monkeypatch):
    model = tmp_path / "model"
    tiny_llama(vocab=512).save_pretrained(model)
    echo_tokenizer().save_pretrained(model)
    monkeypatch.setattr(demo_rlhf, "RLHF_SIZES", dict(sft_train=8, pairs_train=8, pairs_test=3))
    for name in ("SFT_TRAINING", "REWARD_TRAINING", "DPO_TRAINING"):
        monkeypatch.setattr(demo_rlhf, name, {**getattr(demo_rlhf, name), "max_steps": 2, "batch_size": 4})
    monkeypatch.setattr(demo_rlhf, "MAX_NEW_TOKENS", 6)
    root, out = tmp_path / "demo", io.StringIO()

    assert demo_rlhf.run_rlhf_demo(output_dir=str(root), model_name=str(model), out=out) == 0

    printed = out.getvalue()
    assert "reward model, held-out pairs:" in printed and "DPO vs SFT win rate" in printed
    results = json.loads((root / "results.json").read_text())
    assert set(results["policies"]) == {"SFT", "SFT + DPO"}
    assert all(len(answers) == 3 for answers in results["answers"].values())
    assert 0.0 <= results["dpo_win_rate"] <= 1.0 and 0.0 <= results["reward_accuracy"] <= 1.0
    # The table's figures are the judge's, recomputed here from the saved answers.
    truths = [json.loads(line)["fields"] for line in (root / "data" / "pairs_test.jsonl").read_text().splitlines()]
    for policy, row in results["policies"].items():
        scores = [judge(a, t) for a, t in zip(results["answers"][policy], truths)]
        assert row["judge_mean"] == pytest.approx(sum(scores) / 3)
    configs = {run: json.loads((root / run / "adapter" / "adapter_config.json").read_text()) for run in ("sft", "dpo")}
    reward = json.loads((root / "reward" / "adapter" / "adapter_config.json").read_text())
    assert reward["task_type"] == "SEQ_CLS" and all(c["task_type"] == "CAUSAL_LM" for c in configs.values())
    assert "ref_adapter" in (root / "dpo" / "train_config.yaml").read_text()

    # A second demo replaces the first; a folder of the user's is refused before anything is written.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="holds files that are not an earlier demo's"):
        demo_rlhf.run_rlhf_demo(output_dir=str(mine), model_name=str(model), out=io.StringIO())
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
