"""Early stopping on the eval loss (--early-stopping-patience) and keeping the best adapter
(--save-best), both resuming bit-for-bit."""

import json
import shutil

import pytest
import torch

import lorakit
from lorakit import ConfigError
from lorakit.training import loop as loop_module
from lorakit.training.checkpoint import STATE_FILE
from lorakit.training.config import TrainConfig
from lorakit.training.loop import run_loop

from .test_training_loop import adapted_model, collate, examples, trainable_state
from .tiny import tiny_llama


def scripted_evals(monkeypatch, losses: dict[int, float]):
    """Evaluations whose loss is ``losses[step]`` (5.0 where not given): the seam in place of a
    real validation set whose loss stops improving. Logged as the real ones are."""

    def fake(
        accelerator, model, tokenizer, cfg, collate, eval_examples, eval_pairs, metrics, step, progress=True, task=None
    ):
        result = {"loss": losses.get(step, 5.0)}
        if metrics:
            metrics.add({"step": step, "eval_loss": result["loss"]})
        return result

    monkeypatch.setattr(loop_module, "_evaluate_and_log", fake)


def eval_steps(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if "eval_loss" in line]


BASE = dict(data="x", lr=1e-2, max_steps=12, batch_size=4, device="cpu", seed=1, eval_every=2)
# Best at step 4; steps 6 and 8 are no better: patience 2 stops at step 8.
LOSSES = {2: 1.0, 4: 0.8, 6: 0.9, 8: 0.85, 10: 0.5}


def test_training_stops_when_the_eval_loss_stops_improving(tmp_path, monkeypatch):
    scripted_evals(monkeypatch, LOSSES)
    cfg = TrainConfig(**BASE, early_stopping_patience=2)
    result = run_loop(
        adapted_model(), None, cfg, examples(), collate, tmp_path, eval_examples=examples(4), progress=False
    )
    assert result.steps == 8 and result.stopped_early and not result.interrupted
    assert (result.best_step, result.best_eval_loss) == (4, 0.8)
    assert eval_steps(tmp_path) == [2, 4, 6, 8]  # no second evaluation of step 8 at the end
    # patience 3 reaches step 10, which improves, and so the run's end
    scripted_evals(monkeypatch, LOSSES)
    longer = run_loop(
        adapted_model(),
        None,
        TrainConfig(**BASE, early_stopping_patience=3),
        examples(),
        collate,
        tmp_path / "longer",
        eval_examples=examples(4),
        progress=False,
    )
    assert longer.steps == 12 and not longer.stopped_early and longer.best_step == 10


def test_a_nan_eval_loss_is_no_improvement(tmp_path, monkeypatch):
    scripted_evals(monkeypatch, {2: float("nan"), 4: float("nan")})
    cfg = TrainConfig(**BASE, early_stopping_patience=2)
    result = run_loop(
        adapted_model(), None, cfg, examples(), collate, tmp_path, eval_examples=examples(4), progress=False
    )
    assert result.steps == 4 and result.best_step is None


@pytest.mark.parametrize("save_best", [False, True], ids=["last", "best"])
def test_early_stopping_resumes_bit_for_bit(tmp_path, monkeypatch, save_best):
    """The early-stopping state rides in the checkpoint: a run resumed at step 6 (one evaluation
    without improvement behind it) still stops at step 8, with the uninterrupted run's weights
    (step 8's; with save_best step 4's). Without that state it would count afresh and train on to
    step 12."""
    cfg = dict(**BASE, early_stopping_patience=2, save_best=save_best)
    scripted_evals(monkeypatch, LOSSES)
    straight = adapted_model()
    run_loop(
        straight,
        None,
        TrainConfig(**cfg),
        examples(),
        collate,
        tmp_path / "a",
        eval_examples=examples(4),
        progress=False,
    )

    scripted_evals(monkeypatch, LOSSES)
    first = adapted_model()
    out = tmp_path / "b"
    run_loop(
        first,
        None,
        TrainConfig(**cfg, save_every=2),
        examples(),
        collate,
        out,
        eval_examples=examples(4),
        progress=False,
    )
    shutil.rmtree(out / "checkpoints" / "step-0000008")  # as if the run had crashed after step 6
    torch.manual_seed(12345)
    resumed = adapted_model()
    result = run_loop(
        resumed,
        None,
        TrainConfig(**cfg, save_every=2, resume=True),
        examples(),
        collate,
        out,
        eval_examples=examples(4),
        progress=False,
    )
    assert result.steps == 8 and result.stopped_early and result.best_step == 4
    assert eval_steps(out) == [2, 4, 6, 8]
    for name, value in trainable_state(straight).items():
        assert torch.equal(trainable_state(resumed)[name], value), name


def test_save_best_leaves_the_best_evaluations_weights(tmp_path, monkeypatch):
    scripted_evals(monkeypatch, {2: 1.0, 4: 0.5, 6: 0.9, 8: 0.7})
    model = adapted_model()
    cfg = TrainConfig(**{**BASE, "max_steps": 8}, save_best=True, save_every=2)
    result = run_loop(model, None, cfg, examples(), collate, tmp_path, eval_examples=examples(4), progress=False)
    assert result.steps == 8 and result.best_step == 4 and not result.stopped_early
    at_step_4 = torch.load(tmp_path / "checkpoints" / "step-0000004" / STATE_FILE, weights_only=False)["trainable"]
    at_step_8 = torch.load(tmp_path / "checkpoints" / "step-0000008" / STATE_FILE, weights_only=False)["trainable"]
    state = trainable_state(model)
    assert all(torch.equal(state[name], value) for name, value in at_step_4.items())
    assert not all(torch.equal(state[name], value) for name, value in at_step_8.items())


def test_train_writes_the_best_adapter_and_records_its_step(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    scripted_evals(monkeypatch, {1: 1.0, 2: 0.5, 3: 0.9, 4: 0.7})
    options = dict(
        data="x", device="cpu", max_steps=4, batch_size=4, lr=1e-2, schedule="constant", eval_every=1, valid_ratio=0.25
    )
    monkeypatch.setattr(
        "lorakit.training.run.prepare_data",
        lambda cfg, tok: _with_validation(cfg, tok),
    )
    best = lorakit.train(loaded=(tiny_llama(), None), output_dir=str(tmp_path / "best"), save_best=True, **options)
    lorakit.train(
        loaded=(tiny_llama(), None),
        output_dir=str(tmp_path / "last"),
        max_steps=2,
        **{k: v for k, v in options.items() if k != "max_steps"},
    )
    result = json.loads((tmp_path / "best" / "result.json").read_text())
    assert result["adapter_step"] == 2 and result["best_step"] == 2 and result["best_eval_loss"] == 0.5
    assert best.best_step == 2 and best.steps == 4
    # The same run stopped after 2 steps (a constant rate: the same updates): save_best kept step 2's.
    saved = load_file(tmp_path / "best" / "adapter" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "last" / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)


def _with_validation(cfg, tokenizer):
    from types import SimpleNamespace

    from lorakit.training import run as run_module

    return run_module.PreparedData(
        examples(8), examples(4), [], collate, SimpleNamespace(summary=lambda: "", n_truncated=0)
    )


def test_early_stopping_and_save_best_need_evaluations(tmp_path):
    with pytest.raises(ConfigError, match="set eval_every"):
        TrainConfig(data="x", early_stopping_patience=2)
    with pytest.raises(ConfigError, match="save_best compares evaluations during training: set eval_every"):
        TrainConfig(data="x", save_best=True)
    with pytest.raises(ConfigError, match="integer >= 0"):
        TrainConfig(data="x", eval_every=1, early_stopping_patience=-1)
    cfg = TrainConfig(data="x", device="cpu", eval_every=1, early_stopping_patience=1, max_steps=1)
    with pytest.raises(ConfigError, match="give validation data"):
        run_loop(adapted_model(), None, cfg, examples(), collate, tmp_path / "loop", progress=False)
    assert not (tmp_path / "loop").exists()
    with pytest.raises(ConfigError, match="^early_stopping_patience compares evaluations: give validation data"):
        lorakit.train(
            data="x", model="no-such-model", output_dir=str(tmp_path / "run"), eval_every=1, early_stopping_patience=1
        )
    assert not (tmp_path / "run").exists()


def test_the_options_are_flags_with_help():
    import argparse

    from lorakit.cli.options import add_train_options, train_overrides

    parser = argparse.ArgumentParser()
    add_train_options(parser)
    args = parser.parse_args(["--early-stopping-patience", "3", "--save-best", "--eval-every", "5"])
    cfg = TrainConfig.from_sources({"data": "x"}, **train_overrides(args))
    assert (cfg.early_stopping_patience, cfg.save_best) == (3, True)
    assert "not improved for N evaluations" in " ".join(parser.format_help().split())
