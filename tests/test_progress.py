"""Issue 18: long phases show progress. Evaluation reports each batch (a callback, and a tqdm bar
when asked)."""

from __future__ import annotations

import torch

from lorakit.training.evaluate import eval_loss, evaluate

from .test_generate_errors import _tokenizer
from .tiny import tiny_llama


def _examples(n: int, length: int = 6) -> list[dict]:
    rows = ((torch.arange(n) * 3)[:, None] + torch.arange(length)[None, :]) % 4
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in rows]


def _collate(batch):
    ids = torch.tensor([b["input_ids"] for b in batch])
    return {
        "input_ids": ids,
        "labels": torch.tensor([b["labels"] for b in batch]),
        "attention_mask": torch.ones_like(ids),
    }


def test_evaluation_reports_every_batch_of_each_phase():
    calls = []
    pairs = [("hello world", "hello")] * 5
    result = evaluate(
        tiny_llama(),
        _tokenizer(),
        _examples(10),
        _collate,
        batch_size=4,
        pairs=pairs,
        max_new_tokens=2,
        on_progress=lambda *call: calls.append(call),
    )
    assert "exact_match" in result
    # loss: 3 batches of examples; answers: counted in answers, one batch of 16 here
    assert calls == [("loss", 1, 3), ("loss", 2, 3), ("loss", 3, 3), ("answers", 5, 5)]


def test_answers_are_reported_batch_by_batch(monkeypatch):
    calls = []
    evaluate(
        tiny_llama(),
        _tokenizer(),
        _examples(2),
        _collate,
        batch_size=16,
        pairs=[("hello", "world")] * 20,
        max_new_tokens=1,
        on_progress=lambda *call: calls.append(call),
    )
    assert [c for c in calls if c[0] == "answers"] == [("answers", 16, 20), ("answers", 20, 20)]


def test_a_progress_bar_shows_rate_and_eta(capsys):
    eval_loss(tiny_llama(), _examples(8), _collate, batch_size=4, progress=True)
    err = capsys.readouterr().err
    assert "eval loss" in err and "/2 [" in err and "batch/s" in err  # count, elapsed<ETA, rate
    eval_loss(tiny_llama(), _examples(8), _collate, batch_size=4)  # no bar unless asked
    assert capsys.readouterr().err == ""
