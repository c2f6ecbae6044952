"""Token classification (``task="token-classify"``): a tag for every word, e.g. named entities.

Data: ``{"tokens": [words], "tags": [a tag per word]}`` lines (`tag_data`). The model is loaded as
``AutoModelForTokenClassification`` (a Llama-style ``score`` or a BERT-style ``classifier`` over
every position); the head trains in full through ``modules_to_save`` as for sequence
classification (`Classify`, whose label order, head and saving this task shares), and the adapter
saves as PEFT's ``TOKEN_CLS``. Each word's tag sits on its first sub-token, -100 on the rest.

Loss: cross-entropy over the labelled sub-tokens (mean over the micro-batch's labelled tokens).
Metrics: loss, token accuracy (over labelled first sub-tokens) and, when the tags follow the BIO
scheme, entity-level precision, recall and F1 (micro, conlleval's rules: `metrics.entities`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.records import Problems
from ..errors import DataError
from .base import PreparedData
from .classify import Classify, ClassifyCollator
from .metrics import accuracy, entity_scores, tags_have_entities
from .sharding import gathered, my_batches
from .tag_data import IGNORE, WordAligner, read_tagged


class TokenClassify(Classify):
    name = "token-classify"
    model_task = "token-classification"
    peft_task_type = "TOKEN_CLS"
    read = staticmethod(read_tagged)

    def prepare_data(self, tokenizer):
        from ..data.tokenize import DatasetStats

        align = WordAligner(tokenizer, self.cfg.max_length)
        train = self._tokenize(self.train_items, align)
        valid = self._tokenize(self.valid_items, align)
        # One label per (kept) word.
        stats = DatasetStats.of_examples(train, sum(e["n_words"] for e in train), self.cfg.max_length)
        return PreparedData(train, valid, [], TagCollator(tokenizer), stats)

    def _tokenize(self, items, align: WordAligner) -> list[dict]:
        index = {label: i for i, label in enumerate(self.labels)}
        out, problems = [], Problems("")
        for item in items:
            try:
                out.append(align(item.tokens, [index[tag] for tag in item.tags]))
            except DataError as exc:  # a word with no sub-token: every such line reported at once
                problems.add(item.where, str(exc))
        problems.raise_if_any("token-classification data")
        return out

    def loss(self, forward, batch):
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)

    @torch.no_grad()
    def evaluate(self, model, tokenizer, examples, collate, pairs, cfg, device, accelerator, progress):
        was_training = model.training
        model.eval()
        size = cfg.batch_size
        parts = []  # (batch index, summed loss, [(predicted tag ids, gold tag ids) per sentence])
        try:
            for i in my_batches(math.ceil(len(examples) / size), accelerator):
                batch = {k: v.to(device) for k, v in collate(examples[i * size : (i + 1) * size]).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                labels = batch["labels"]
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
                predicted, kept = logits.argmax(-1).tolist(), (labels != IGNORE).tolist()
                sentences = [
                    ([p for p, k in zip(p_row, k_row) if k], [g for g, k in zip(g_row, k_row) if k])
                    for p_row, g_row, k_row in zip(predicted, labels.tolist(), kept)
                ]
                parts.append((i, float(loss), sentences))
        finally:
            model.train(was_training)
        parts = gathered(parts, accelerator)
        sentences = [s for part in parts for s in part[2]]
        predicted = [p for s in sentences for p in s[0]]
        gold = [g for s in sentences for g in s[1]]
        result = {
            "loss": sum(part[1] for part in parts) / len(gold) if gold else float("nan"),
            "token_accuracy": accuracy(predicted, gold),
        }
        if tags_have_entities(self.labels):
            tags = [([self.labels[t] for t in p], [self.labels[t] for t in g]) for p, g in sentences]
            result.update(entity_scores([p for p, _ in tags], [g for _, g in tags]))
        return result


class TagCollator(ClassifyCollator):
    """Right-pads ``input_ids`` (pad token, else EOS) and ``labels`` (-100); builds
    ``attention_mask``. Every tensor is (batch, longest example)."""

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise DataError("cannot collate an empty batch (no examples)")
        length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(example["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
