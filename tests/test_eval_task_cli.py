"""`lorakit eval --task classify|token-classify`: a trained classifier's adapter evaluated with its
task's metrics, the label order read from the run; wrong inputs refused in one line.

The CLI runs in this process (`lorakit.cli.main.main`) on tiny BERT directories: the command's
whole path without the embedded model."""

from __future__ import annotations

import json
import shutil

import pytest

from lorakit.cli.main import main

from .test_token_classify import save_tiny, tagged, write_jsonl


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    """A token-classify run of a tiny BERT: (model dir, run dir, validation file)."""
    tmp = tmp_path_factory.mktemp("tok")
    model = save_tiny(tmp, "bert", labels=4)
    train = write_jsonl(tmp / "train.jsonl", tagged(64, seed=0))
    valid = write_jsonl(tmp / "valid.jsonl", tagged(12, seed=1))
    out = tmp / "run"
    assert main(["train", "--task", "token-classify", "--model", str(model), "--data", train, "--valid-data", valid,
                 "--output-dir", str(out), "--max-steps", "6", "--lr", "1e-2", "--device", "cpu"]) == 0  # fmt: skip
    return model, out, valid


def test_eval_token_classify_gives_the_runs_final_metrics(token_run, capsys):
    model, out, valid = token_run
    code, printed, _ = run(capsys, "eval", "--task", "token-classify", "--model", model, "--adapter", out / "adapter",
                           "--data", valid, "--device", "cpu", "--json")  # fmt: skip
    assert code == 0
    result, final = json.loads(printed), json.loads((out / "result.json").read_text())["final_eval"]
    assert result["examples"] == 12
    for key in ("loss", "token_accuracy", "entity_precision", "entity_recall", "entity_f1"):
        assert result[key] == pytest.approx(final[key], abs=1e-6), key
    code, printed, _ = run(capsys, "eval", "--task", "token-classify", "--model", model, "--adapter", out / "adapter",
                           "--data", valid, "--device", "cpu")  # fmt: skip
    assert code == 0 and "token_accuracy" in printed and "entity_f1" in printed


def test_eval_refuses_what_does_not_fit(token_run, capsys, tmp_path):
    model, out, valid = token_run
    adapter = out / "adapter"
    code, _, err = run(capsys, "eval", "--model", model, "--adapter", adapter, "--data", valid)
    assert code == 2 and "task_type TOKEN_CLS" in err and "--task token-classify" in err
    code, _, err = run(capsys, "eval", "--task", "classify", "--model", model, "--adapter", adapter, "--data", valid)
    assert code == 2 and "evaluate it with --task token-classify" in err
    unseen = write_jsonl(
        tmp_path / "unseen.jsonl", [{"tokens": ["anna", "met", "rome"], "tags": ["B-PER", "O", "B-CITY"]}]
    )
    code, _, err = run(
        capsys, "eval", "--task", "token-classify", "--model", model, "--adapter", adapter, "--data", unseen
    )
    assert code == 2 and "unseen.jsonl:line 1: label 'B-CITY' is not one of the run's labels" in err
    code, _, err = run(capsys, "eval", "--task", "token-classify", "--model", model, "--adapter", adapter,
                       "--data", valid, "--ranks", "2,4")  # fmt: skip
    assert code == 2 and "--ranks applies to --task causal-lm only" in err
    alone = shutil.copytree(adapter, tmp_path / "elsewhere" / "adapter")  # no labels.json beside it
    code, _, err = run(
        capsys, "eval", "--task", "token-classify", "--model", model, "--adapter", alone, "--data", valid
    )
    assert code == 2 and "no label order found" in err and "labels.json" in err


def test_eval_classify_gives_the_runs_final_metrics(tmp_path, capsys):
    model = save_tiny(tmp_path, "bert", labels=2, head="sequence")
    rows = [{"text": " ".join(r["tokens"]), "label": "city" if "B-LOC" in r["tags"][:2] else "name"}
            for r in tagged(48, seed=2)]  # fmt: skip
    train, valid = write_jsonl(tmp_path / "train.jsonl", rows[:36]), write_jsonl(tmp_path / "valid.jsonl", rows[36:])
    out = tmp_path / "run"
    assert main(["train", "--task", "classify", "--model", str(model), "--data", train, "--valid-data", valid,
                 "--output-dir", str(out), "--max-steps", "4", "--device", "cpu"]) == 0  # fmt: skip
    capsys.readouterr()
    code, printed, _ = run(capsys, "eval", "--task", "classify", "--model", model, "--adapter", out / "adapter",
                           "--data", valid, "--device", "cpu", "--json")  # fmt: skip
    assert code == 0
    result, final = json.loads(printed), json.loads((out / "result.json").read_text())["final_eval"]
    for key in ("loss", "accuracy", "macro_f1"):
        assert result[key] == pytest.approx(final[key], abs=1e-6), key


def test_label_order_from_labels_json_or_a_classifiers_config(tmp_path):
    from transformers import BertConfig

    from lorakit import ConfigError
    from lorakit.tasks.classify import config_labels, saved_labels

    named = BertConfig(architectures=["BertForTokenClassification"], id2label={0: "O", 1: "B-PER"})
    assert config_labels(named) == ["O", "B-PER"]
    assert config_labels(BertConfig(architectures=["BertForTokenClassification"], num_labels=2)) is None  # LABEL_i
    assert config_labels(BertConfig(architectures=["BertModel"], id2label={0: "O", 1: "B-PER"})) is None
    (tmp_path / "a" / "adapter").mkdir(parents=True)
    (tmp_path / "a" / "labels.json").write_text('["neg", "pos"]')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "labels.json").write_text('["pos", "neg"]')
    assert saved_labels([tmp_path / "a" / "adapter"]) == ["neg", "pos"]  # the run folder above the adapter
    assert saved_labels([tmp_path / "c"]) is None
    with pytest.raises(ConfigError, match="different labels"):
        saved_labels([tmp_path / "a" / "adapter", tmp_path / "b"])
