"""Sequence classification (``task="classify"``): a classification head trained with the adapter.

The model is loaded as ``AutoModelForSequenceClassification`` (decoder models get a Llama-style
``score`` head and read each row's last real token through ``config.pad_token_id``; encoder models
a BERT-style ``classifier``). The head is found from the model and trains with the adapter
(`lorakit.tasks.heads`); the adapter is saved as PEFT's ``SEQ_CLS``.

Loss: mean cross-entropy of the logits over the batch's examples. Metrics: loss, accuracy, macro-F1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..models.tokenizer import pad_or_eos_id
from ..safe_files.atomic import write_text_atomically
from .base import PreparedData, Task
from .classify_data import check_labels, label_order, read_labeled
from .heads import classification_heads, set_pad_token, with_head_saved  # noqa: F401 (classification_heads: imported from here too)
from .metrics import accuracy, macro_f1
from .sharding import gathered, my_batches

LABELS_FILE = "labels.json"


def saved_labels(adapter_dirs: Sequence[str | Path]) -> list[str] | None:
    """The label order saved with the runs of ``adapter_dirs`` (``labels.json`` in an adapter's
    folder or in the run folder above it); None when none has one. Adapters that disagree are
    refused: they were trained for different heads."""
    found: dict[str, list[str]] = {}
    for adapter in map(Path, adapter_dirs):
        for file in (adapter / LABELS_FILE, adapter.parent / LABELS_FILE):
            if file.is_file():
                try:
                    labels = json.loads(file.read_text(encoding="utf-8"))
                except ValueError as exc:
                    raise ConfigError(f"{file} is not valid JSON ({exc}): write the labels as a JSON list") from None
                if not isinstance(labels, list) or not labels:
                    raise ConfigError(f"{file} must hold a non-empty JSON list of labels, got {labels!r:.80}")
                found[str(file)] = [str(label) for label in labels]
                break
    if len({tuple(labels) for labels in found.values()}) > 1:
        raise ConfigError(f"the adapters were trained on different labels ({found}): evaluate one at a time")
    return next(iter(found.values()), None)


def config_labels(config) -> list[str] | None:
    """The labels of a model config that describes a trained classifier (its ``architectures``
    end in ``ForSequenceClassification`` / ``ForTokenClassification`` and its ``id2label`` names
    the labels), by index; else None."""
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in architectures):
        return None
    id2label = {int(i): str(label) for i, label in (getattr(config, "id2label", None) or {}).items()}
    labels = [id2label.get(i) for i in range(len(id2label))]
    # transformers' placeholders (LABEL_0, LABEL_1, ...) name no order anyone trained with.
    if None in labels or labels == [f"LABEL_{i}" for i in range(len(labels))]:
        return None
    return labels


class Classify(Task):
    name = "classify"
    model_task = "sequence-classification"
    uses_labels = True
    peft_task_type = "SEQ_CLS"
    #: reads one data file into items with ``labels`` and ``is_int`` (see `classify_data.label_order`)
    read = staticmethod(read_labeled)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.packing:
            raise ConfigError(
                "packing joins examples into one sequence; a classification example needs its own: drop --packing"
            )
        self.train_items = self.read(cfg.data)
        self.valid_items = self.read(cfg.valid_data) if cfg.valid_data else []
        if cfg.valid_ratio and not cfg.valid_data:
            from ..data import split_records

            self.train_items, self.valid_items = split_records(self.train_items, cfg.valid_ratio, seed=cfg.seed)
        self.labels = label_order(self.train_items, cfg.labels)
        check_labels(self.train_items, self.labels, "labels of the data")
        check_labels(self.valid_items, self.labels, "labels of the validation data")
        cfg.labels = list(self.labels)  # train_config.yaml records the order; a resumed run keeps it

    def load_kwargs(self) -> dict:
        return {
            "task": self.model_task,
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {label: i for i, label in enumerate(self.labels)},
        }

    def prepare_model(self, model: nn.Module, tokenizer) -> None:
        n = getattr(model.config, "num_labels", None)
        if n != len(self.labels):
            raise ConfigError(
                f"the model classifies into {n} labels and the data has {len(self.labels)} ({self.labels}): "
                f"load it as a {self.model_task} model with num_labels set"
            )
        model.config.id2label = dict(enumerate(self.labels))
        model.config.label2id = {label: i for i, label in enumerate(self.labels)}
        set_pad_token(model, tokenizer)

    def lora_config(self, model: nn.Module, config):
        return with_head_saved(model, config)

    def prepare_data(self, tokenizer):
        from ..data.tokenize import DatasetStats

        train = self._tokenize(self.train_items, tokenizer)
        valid = self._tokenize(self.valid_items, tokenizer)
        stats = DatasetStats.of_examples(train, len(train), self.cfg.max_length)  # one label per example
        return PreparedData(train, valid, [], ClassifyCollator(tokenizer), stats)

    def _tokenize(self, items, tokenizer) -> list[dict]:
        index = {label: i for i, label in enumerate(self.labels)}
        out = []
        for item in items:
            full = tokenizer(item.text, item.text_pair)["input_ids"]
            ids = tokenizer(item.text, item.text_pair, truncation=True, max_length=self.cfg.max_length)["input_ids"]
            if not ids:
                raise DataError(f"{item.where}: the text tokenizes to nothing")
            out.append({"input_ids": list(ids), "label": index[item.label], "truncated": len(full) > len(ids)})
        return out

    def loss(self, forward, batch):
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model, tokenizer, examples, collate, pairs, cfg, device, accelerator, progress):
        was_training = model.training
        model.eval()
        size = cfg.batch_size
        parts = []  # (batch index, summed loss, predictions, gold)
        try:
            for i in my_batches(math.ceil(len(examples) / size), accelerator):
                batch = {k: v.to(device) for k, v in collate(examples[i * size : (i + 1) * size]).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
                parts.append((i, float(loss), logits.argmax(-1).tolist(), batch["labels"].tolist()))
        finally:
            model.train(was_training)
        parts = gathered(parts, accelerator)
        predicted = [p for part in parts for p in part[2]]
        gold = [g for part in parts for g in part[3]]
        return {
            "loss": sum(part[1] for part in parts) / len(gold) if gold else float("nan"),
            "accuracy": accuracy(predicted, gold),
            "macro_f1": macro_f1(predicted, gold, len(self.labels)),
        }

    def save(self, out_dir: Path) -> None:
        write_text_atomically(Path(out_dir) / LABELS_FILE, json.dumps(self.labels) + "\n")


class ClassifyCollator:
    """Right-pads ``input_ids`` (pad token, else EOS) and builds ``attention_mask``; ``labels`` is (batch,)."""

    def __init__(self, tokenizer=None, pad_token_id: int | None = None) -> None:
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = pad_or_eos_id(tokenizer)
        self.pad_token_id = int(pad_token_id or 0)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("cannot collate an empty batch (no examples)")
        length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = 1
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
