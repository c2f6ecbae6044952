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


class Classify(Task):
    name = "classify"
    model_task = "sequence-classification"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.packing:
            raise ConfigError("packing joins examples into one sequence; a classification example needs its own")
        self.train_items = read_labeled(cfg.data)
        self.valid_items = read_labeled(cfg.valid_data) if cfg.valid_data else []
        if cfg.valid_ratio and not cfg.valid_data:
            from ..data import split_records

            self.train_items, self.valid_items = split_records(self.train_items, cfg.valid_ratio, seed=cfg.seed)
        self.labels = label_order(self.train_items, cfg.labels)
        check_labels(self.train_items, self.labels, "training data")
        check_labels(self.valid_items, self.labels, "validation data")
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
                "load it as a sequence-classification model with num_labels set"
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
        lengths = [len(e["input_ids"]) for e in train]
        stats = DatasetStats(
            n_records=len(train),
            n_examples=len(train),
            n_truncated=sum(e["truncated"] for e in train),
            total_tokens=sum(lengths),
            supervised_tokens=len(train),  # one label per example
            max_tokens=max(lengths),
            max_length=self.cfg.max_length,
        )
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
