"""Experiment tracking through accelerate's trackers (--report-to): TensorBoard files read back,
W&B offline, a missing package as a one-line error."""

import json
from pathlib import Path

import numpy as np
import pytest

from lorakit import ConfigError
from lorakit.training import launch
from lorakit.training.config import TrainConfig
from lorakit.training.loop import run_loop

from .test_training_loop import adapted_model, collate, examples


def test_report_to_takes_trackers_comma_separated_or_as_a_list():
    assert TrainConfig(data="x").trackers() == []
    assert TrainConfig(data="x", report_to="tensorboard, wandb").report_to == "tensorboard,wandb"
    assert TrainConfig(data="x", report_to=["TensorBoard"]).trackers() == ["tensorboard"]
    with pytest.raises(ConfigError, match="report_to must be tensorboard | wandb | mlflow | none"):
        TrainConfig(data="x", report_to="tensorbord")
    with pytest.raises(ConfigError, match="cannot be combined"):
        TrainConfig(data="x", report_to="none,wandb")


def test_a_missing_tracker_package_says_what_to_install(monkeypatch):
    real = launch.importlib.util.find_spec
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(ConfigError) as caught:
        launch.make_accelerator(TrainConfig(data="x", device="cpu", report_to="tensorboard,mlflow"))
    message = str(caught.value)
    assert "\n" not in message and "pip install mlflow" in message and "lorakit[track]" in message


def test_train_checks_the_tracker_package_before_loading_anything(tmp_path, monkeypatch):
    import lorakit

    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install wandb"):
        lorakit.train(
            data="x", model="no-such-model", output_dir=str(tmp_path / "run"), device="cpu", report_to="wandb"
        )
    assert not (tmp_path / "run").exists()


def test_tensorboard_logs_what_metrics_jsonl_logs(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(
        data="x",
        lr=1e-2,
        max_steps=4,
        batch_size=8,
        device="cpu",
        eval_every=2,
        output_dir=str(tmp_path),
        report_to="tensorboard",
    )
    run_loop(adapted_model(), None, cfg, examples(), collate, tmp_path, eval_examples=examples(8), progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    runs = list((tmp_path / "tracking" / "lorakit").glob("events.out.tfevents.*"))
    assert len(runs) == 1
    events = EventAccumulator(str(runs[0].parent))
    events.Reload()
    for tag in ("loss", "lr", "tokens_per_s", "eval_loss", "eval_perplexity"):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = [(line["step"], float(np.float32(line[tag]))) for line in lines if tag in line]
        assert logged == expected and expected, tag  # TensorBoard keeps float32
    assert [e.step for e in events.Scalars("eval_loss")] == [2, 4]
    (hparams,) = [path.read_text() for path in (tmp_path / "tracking" / "lorakit").glob("*/hparams.yml")]
    assert "lr: 0.01" in hparams and "report_to: tensorboard" in hparams


def test_wandb_offline_writes_its_run_under_the_output_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = TrainConfig(
        data="x", lr=1e-2, max_steps=2, batch_size=8, device="cpu", output_dir=str(out), report_to="wandb"
    )
    run_loop(adapted_model(), None, cfg, examples(), collate, out, progress=False)
    runs = list(Path(out, "tracking", "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_the_new_options_are_flags_with_help():
    import argparse

    from lorakit.cli.options import add_train_options, train_overrides

    parser = argparse.ArgumentParser()
    add_train_options(parser)
    args = parser.parse_args(["--report-to", "tensorboard,wandb"])
    cfg = TrainConfig.from_sources({"data": "x"}, **train_overrides(args))
    assert cfg.trackers() == ["tensorboard", "wandb"]
    helptext = " ".join(parser.format_help().split())
    assert "experiment trackers" in helptext


def test_a_failed_run_closes_its_trackers_with_the_steps_it_logged(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls = []

    def failing_collate(batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory, say")
        return collate(batch)

    cfg = TrainConfig(
        data="x", max_steps=4, batch_size=8, device="cpu", output_dir=str(tmp_path), report_to="tensorboard"
    )
    accelerator = launch.make_accelerator(cfg)
    ended = []
    real_end = accelerator.end_training
    accelerator.end_training = lambda: ended.append(1) or real_end()
    with pytest.raises(RuntimeError, match="out of memory"):
        run_loop(
            adapted_model(), None, cfg, examples(), failing_collate, tmp_path, accelerator=accelerator, progress=False
        )
    assert ended == [1]  # W&B marks the run finished, TensorBoard's writer is closed
    events = EventAccumulator(str(tmp_path / "tracking" / "lorakit"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
