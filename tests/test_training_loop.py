"""The training loop on a tiny model: schedules, LoRA+ groups, metrics, checkpoints, bit-for-bit resume."""

import json
import math

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.training.config import TrainConfig
from lorakit.training.loop import epoch_batches, run_loop
from lorakit.training.optim import lr_multiplier, parameter_groups

from .tiny import tiny_llama


def examples(n=24, length=10):
    rows = ((torch.arange(n) * 5)[:, None] + torch.arange(length)[None, :]) % 128
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in rows]


def collate(batch):
    ids = torch.tensor([b["input_ids"] for b in batch])
    return {"input_ids": ids, "labels": torch.tensor([b["labels"] for b in batch]), "attention_mask": torch.ones_like(ids)}


def adapted_model():
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.1, seed=0))
    return model


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_schedules():
    assert lr_multiplier(0, 10, 2, "cosine") == 0.5 and lr_multiplier(1, 10, 2, "cosine") == 1.0
    assert lr_multiplier(2, 10, 2, "cosine") == 1.0
    assert lr_multiplier(6, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_multiplier(9, 10, 0, "constant") == 1.0


def test_loraplus_groups():
    model = adapted_model()
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.0, loraplus_ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".lora_B." in names[id(p)] for p in groups[1]["params"])
    assert all(".lora_A." in names[id(p)] for p in groups[0]["params"])
    assert len(parameter_groups(model, 1e-3, 0.0, None)) == 1


def test_epoch_order_is_seeded():
    assert epoch_batches(10, 3, 0, 1) == epoch_batches(10, 3, 0, 1)
    assert epoch_batches(10, 3, 0, 1) != epoch_batches(10, 3, 0, 2)
    assert sorted(i for b in epoch_batches(10, 3, 0, 0) for i in b) == list(range(10))


def test_loop_trains_logs_and_plots(tmp_path):
    model = adapted_model()
    cfg = TrainConfig(data="x", lr=1e-2, max_steps=6, batch_size=8, grad_accum=2, device="cpu", eval_every=3)
    result = run_loop(model, None, cfg, examples(), collate, tmp_path, eval_examples=examples(8), progress=False)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train_lines] == list(range(1, 7))
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    assert [l["step"] for l in lines if "eval_loss" in l] == [3, 6]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert result.steps == 6 and not result.interrupted


def test_resume_is_bit_for_bit(tmp_path):
    cfg = dict(data="x", lr=1e-2, max_steps=6, batch_size=4, grad_accum=2, device="cpu", seed=3)
    straight = adapted_model()
    run_loop(straight, None, TrainConfig(**cfg), examples(), collate, tmp_path / "a", progress=False)

    first = adapted_model()
    run_loop(first, None, TrainConfig(**{**cfg, "max_steps": 6, "save_every": 2}), examples(), collate,
             tmp_path / "b", progress=False)
    # Simulate a crash after step 4: keep checkpoints up to step 4 and resume in a fresh process state.
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000006")
    torch.manual_seed(12345)  # whatever the RNG state was, resume must restore it
    resumed = adapted_model()
    run_loop(resumed, None, TrainConfig(**{**cfg, "resume": True}), examples(), collate, tmp_path / "b", progress=False)
    for name, value in trainable_state(straight).items():
        assert torch.equal(trainable_state(resumed)[name], value), name
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_saves_a_checkpoint(tmp_path, monkeypatch):
    model = adapted_model()
    calls = {"n": 0}
    original = model.forward

    def interrupting_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 3 (2 micro-batches per step)
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", interrupting_forward)
    cfg = TrainConfig(data="x", lr=1e-2, max_steps=6, batch_size=4, grad_accum=2, device="cpu")
    result = run_loop(model, None, cfg, examples(), collate, tmp_path, progress=False)
    assert result.interrupted and result.steps == 1
    assert (tmp_path / "checkpoints" / "step-0000001" / "adapter" / "adapter_model.safetensors").is_file()


def test_public_loraplus_optimizer():
    model = adapted_model()
    optimizer = lorakit.loraplus_optimizer(model, lr=2e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [2e-4, 16 * 2e-4]


def test_fast_and_reference_paths_train_the_same_adapter(tmp_path):
    """Three optimizer steps (dropout on, grad accumulation) through the trainer on each path."""
    states = []
    for fast in (True, False):
        model = adapted_model()
        lorakit.set_fast_path(model, fast)
        cfg = TrainConfig(data="x", lr=1e-2, max_steps=3, batch_size=8, grad_accum=2, device="cpu", seed=0,
                          fast_path=fast)
        run_loop(model, None, cfg, examples(), collate, tmp_path / str(fast), progress=False)
        states.append(trainable_state(model))
    for name, value in states[1].items():
        torch.testing.assert_close(states[0][name], value, rtol=1e-4, atol=1e-5, msg=name)
