"""Issue 18: long phases show progress. Evaluation reports each batch (a callback, and a tqdm bar
when asked), and `train` hands over the data summary before the training loop starts."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import lorakit
from lorakit.training import run as run_module
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


def test_train_hands_over_the_data_summary_before_the_loop_starts(tmp_path, monkeypatch):
    events = []
    stats = SimpleNamespace(summary=lambda: "8 examples", n_truncated=0, n_records=8)
    monkeypatch.setattr(
        run_module,
        "prepare_data",
        lambda cfg, tokenizer: run_module.PreparedData(_examples(8), [], [], _collate, stats),
    )
    real_loop = run_module.run_loop

    def loop(*args, **kwargs):
        events.append("loop")
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(run_module, "run_loop", loop)
    lorakit.train(
        loaded=(tiny_llama(), None),
        data="x",
        output_dir=str(tmp_path / "run"),
        device="cpu",
        max_steps=1,
        batch_size=4,
        progress=False,
        on_data=lambda s: events.append(s.summary()),
    )
    assert events == ["8 examples", "loop"]


def test_cli_train_prints_the_data_summary_first(tmp_path, monkeypatch, capsys):
    from lorakit.cli.main import main

    def fake_train(config, on_data=None, **overrides):
        on_data(SimpleNamespace(summary=lambda: "8 examples"))
        print("TRAINING")
        out = tmp_path / "run"
        return SimpleNamespace(
            main_process=True,
            interrupted=False,
            steps=1,
            final_eval=None,
            notes=[],
            adapter_dir=out / "adapter",
            output_dir=out,
            memory=None,
        )

    monkeypatch.setattr("lorakit.training.train", fake_train)
    assert main(["train", "--data", "d.jsonl"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("data: 8 examples\nTRAINING\n") and out.count("data: ") == 1
