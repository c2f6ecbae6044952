"""AdaLoRA: SVD-form forward, budget schedule, importance masking, orthogonality term, export as
plain LoRA (exact, PEFT-loadable), and a training run that ends at the budget."""

import json
import math

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.state import lora_layers
from lorakit.training.config import TrainConfig
from lorakit.training.loop import run_loop
from lorakit.variants.adalora import AdaLoraSchedule, RankAllocator, budget, current_ranks, orthogonal_penalty

from .test_training_loop import collate, examples
from .tiny import tiny_llama

peft = pytest.importorskip("peft")


def adalora_model(r=6):
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=r, alpha=12, target_modules=["q_proj", "v_proj", "up_proj"], adalora=True))
    return model


def fill_singular_values(model):
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_E["default"].copy_(torch.randn(layer.rank("default"), generator=gen))


def test_forward_is_svd_form():
    model = adalora_model()
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # E starts at zero
    fill_singular_values(model)
    Q, P, E = layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"]
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * (x @ Q.T * E) @ P.T)


def test_budget_schedule():
    s = AdaLoraSchedule(target_r=2, tinit=10, tfinal=20)
    assert budget(0, 100, 60, 20, s) == 60 and budget(9, 100, 60, 20, s) == 60
    assert budget(80, 100, 60, 20, s) == 20 and budget(99, 100, 60, 20, s) == 20
    assert budget(45, 100, 60, 20, s) == int(20 + 40 * (1 - 35 / 70) ** 3)


def test_orthogonal_penalty_formula():
    model = adalora_model()
    terms = []
    for _, layer in lora_layers(model):
        Q, P = layer.lora_A["default"], layer.lora_B["default"]
        terms += [torch.linalg.norm(Q @ Q.T - torch.eye(6)), torch.linalg.norm(P.T @ P - torch.eye(6))]
    torch.testing.assert_close(orthogonal_penalty(model, "default"), torch.stack(terms).mean())


def test_allocator_masks_down_to_the_budget(ids):
    model = adalora_model()
    fill_singular_values(model)
    model(ids, labels=ids).loss.backward()
    allocator = RankAllocator(model, "default", AdaLoraSchedule(target_r=2), total_steps=10)
    allocator.update_importance()
    assert allocator.mask(9) == 2 * 6  # six modules, two ranks each on average
    assert sum(current_ranks(model, "default").values()) == 12


def test_final_phase_and_last_step_prune_whatever_delta_t(ids):
    model = adalora_model()
    fill_singular_values(model)
    model(ids, labels=ids).loss.backward()
    allocator = RankAllocator(model, "default", AdaLoraSchedule(target_r=2, tfinal=3, delta_t=4), total_steps=10)
    allocator.update_importance()
    allocator.mask(5)  # not a multiple of delta_t, before the final phase: nothing pruned
    assert sum(current_ranks(model, "default").values()) == 6 * 6
    for step in (7, 9):  # final phase, then the last step: neither a multiple of delta_t
        fill_singular_values(model)  # as the optimizer would move pruned E_i again
        assert allocator.mask(step) == 2 * 6
        assert sum(current_ranks(model, "default").values()) == 2 * 6


def test_export_is_exact_and_loads_in_peft(tmp_path, ids):
    model = adalora_model()
    fill_singular_values(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_E["default"][:4] = 0  # pruned ranks
        model.model.layers[1].mlp.up_proj.lora_E["default"].zero_()  # a module with nothing left
    expected = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 2
    assert config["rank_pattern"]["model.layers.1.mlp.up_proj"] == 1  # a zero rank-1 update
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-5, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_training_prunes_to_target_and_learns(tmp_path):
    model = adalora_model(r=8)
    cfg = TrainConfig(
        data="x",
        lr=5e-2,
        max_steps=20,
        batch_size=8,
        device="cpu",
        variant="adalora",
        r=8,
        schedule="constant",
        adalora_target_r=3,
        adalora_tinit=5,
        adalora_tfinal=5,
        adalora_delta_t=1,
    )
    result = run_loop(model, None, cfg, examples(32), collate, tmp_path, progress=False)
    losses = [r["loss"] for r in result.records if "loss" in r]
    assert losses[-1] < losses[0] - 0.05
    ranks = json.loads((tmp_path / "adalora_ranks_default.json").read_text())
    assert sum(ranks.values()) <= 3 * 6 and len(ranks) == 6
    lorakit.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {p: max(1, k) for p, k in ranks.items()}
    assert not math.isnan(losses[-1])


def test_resume_restores_importance_state(tmp_path):
    import shutil

    cfg = dict(
        data="x",
        lr=5e-2,
        max_steps=8,
        batch_size=8,
        device="cpu",
        variant="adalora",
        r=8,
        adalora_target_r=3,
        adalora_tinit=2,
        adalora_tfinal=2,
        save_every=3,
    )
    straight = adalora_model(r=8)
    run_loop(straight, None, TrainConfig(**cfg), examples(32), collate, tmp_path / "a", progress=False)
    interrupted = adalora_model(r=8)
    run_loop(interrupted, None, TrainConfig(**cfg), examples(32), collate, tmp_path / "b", progress=False)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000006")  # as if stopped after step 3
    resumed = adalora_model(r=8)
    run_loop(resumed, None, TrainConfig(**cfg, resume=True), examples(32), collate, tmp_path / "b", progress=False)
    for (_, a), (_, b) in zip(lora_layers(straight), lora_layers(resumed)):
        assert torch.equal(a.lora_E["default"], b.lora_E["default"])
        assert torch.equal(a.lora_A["default"], b.lora_A["default"])
