"""Training tasks: the causal-LM default is today's loop, and sequence classification (--task classify)."""

import json
import random

import pytest
import torch

import lorakit
from lorakit import ConfigError, DataError
from lorakit.tasks import make_task
from lorakit.tasks.classify import ClassifyCollator, classification_heads
from lorakit.tasks.metrics import accuracy, macro_f1
from lorakit.training.config import TrainConfig

from .tiny import tiny_bert_classifier


class CharTokenizer:
    """One token per character (ids 1..), 0 the pad token; a text pair is joined by a separator."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text, text_pair=None, truncation=False, max_length=None):
        ids = [1 + ord(c) % 100 for c in text] + ([101] + [1 + ord(c) % 100 for c in text_pair] if text_pair else [])
        return {"input_ids": ids[:max_length] if truncation and max_length else ids}


def tiny_llama_classifier(labels=2):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=labels,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).eval()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def separable(n, seed):
    """Texts of random letters; the label says whether a 'q' is among them (half the rows have one)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        letters = [rng.choice("abcdefgh") for _ in range(rng.randint(4, 8))]
        if i % 2:
            letters[rng.randrange(len(letters))] = "q"
        rows.append({"text": "".join(letters), "label": "yes" if i % 2 else "no"})
    return rows


def test_metrics_match_their_formulas():
    predicted, gold = [0, 0, 1, 2, 2, 1], [0, 1, 1, 2, 0, 1]
    assert accuracy(predicted, gold) == pytest.approx(4 / 6)
    # per label: 0: tp 1 fp 1 fn 1 -> 0.5; 1: tp 2 fp 0 fn 1 -> 0.8; 2: tp 1 fp 1 fn 0 -> 2/3
    assert macro_f1(predicted, gold, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1([0, 0], [0, 0], 5) == 1.0  # labels nobody saw or predicted are left out


def test_label_order_fixed_first_seen_or_integer(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": "b"}, {"text": "y", "label": "a"}])
    assert make_task(TrainConfig(data=data, task="classify")).labels == ["b", "a"]
    assert make_task(TrainConfig(data=data, task="classify", labels="a,b,c")).labels == ["a", "b", "c"]
    ints = write_jsonl(tmp_path / "i.jsonl", [{"text": "x", "label": 2}, {"text": "y", "label": 0}])
    assert make_task(TrainConfig(data=ints, task="classify")).labels == ["0", "1", "2"]
    with pytest.raises(ConfigError, match="task must be one of"):
        TrainConfig(data=data, task="nope")
    with pytest.raises(ConfigError, match="labels name a classifier"):
        TrainConfig(data=data, labels="a,b")


def test_bad_lines_and_unseen_labels_are_reported_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "a"}\n{"text": "", "label": "a"}\n{"text": "x"}\nnot json\n')
    with pytest.raises(DataError) as info:
        make_task(TrainConfig(data=str(bad), task="classify"))
    message = str(info.value)
    assert "line 2" in message and "line 3" in message and "'label' is missing" in message and "line 4" in message
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])
    valid = write_jsonl(tmp_path / "v.jsonl", [{"text": "x", "label": "a"}, {"text": "z", "label": "c"}])
    with pytest.raises(DataError, match=r"v\.jsonl:line 2: label 'c' is not one of"):
        make_task(TrainConfig(data=train, valid_data=valid, task="classify"))
    with pytest.raises(DataError, match=r"t\.jsonl:line 2: label 'b'"):
        make_task(TrainConfig(data=train, task="classify", labels="a"))


def test_collate_pads_right_and_keeps_one_label_per_row():
    batch = ClassifyCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_the_head_is_found_from_the_model():
    assert classification_heads(tiny_llama_classifier()) == ["score"]
    assert classification_heads(tiny_bert_classifier()) == ["classifier"]


def test_a_separable_task_is_learned_and_peft_loads_the_classifier(tmp_path):
    from peft import PeftModel

    train = write_jsonl(tmp_path / "train.jsonl", separable(256, seed=0))
    valid = write_jsonl(tmp_path / "valid.jsonl", separable(64, seed=1))
    model = tiny_llama_classifier()
    result = lorakit.train(
        loaded=(model, CharTokenizer()),
        task="classify",
        data=train,
        valid_data=valid,
        output_dir=str(tmp_path / "run"),
        device="cpu",
        r=8,
        alpha=16,
        lr=1e-2,
        epochs=6,
        batch_size=16,
        warmup_steps=5,
        progress=False,
    )
    assert result.final_eval["accuracy"] >= 0.95, result.final_eval
    assert result.final_eval["macro_f1"] >= 0.95
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == ["no", "yes"]
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and "score" in saved["modules_to_save"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in records) and all("loss" in r for r in records if "lr" in r)

    ids = torch.tensor([[1 + ord(c) % 100 for c in "abqcd"], [1 + ord(c) % 100 for c in "abfcd"]])
    mask = torch.ones_like(ids)
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        peft_model = PeftModel.from_pretrained(tiny_llama_classifier(), str(result.adapter_dir)).eval()
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        base = tiny_llama_classifier()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, ours)  # the head and adapter did change the logits


def test_text_pairs_on_an_encoder_classifier(tmp_path):
    rows = [{"text": t, "text_pair": p, "label": int(t == p)} for t, p in [("ab", "ab"), ("ab", "cd"), ("ef", "ef")]]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows * 4)
    model = tiny_bert_classifier(labels=2)
    result = lorakit.train(
        loaded=(model, CharTokenizer()),
        task="classify",
        data=data,
        output_dir=str(tmp_path / "run"),
        device="cpu",
        max_steps=2,
        batch_size=4,
        progress=False,
    )
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier"]
    assert not any(name.startswith("classifier.") and "lora_" in name for name, _ in model.named_parameters())
