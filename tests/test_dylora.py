"""DyLoRA: nested-rank forward, rank sampling in the trainer, and truncation without retraining."""

import random

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.state import lora_layers
from lorakit.training.config import TrainConfig
from lorakit.training.loop import run_loop
from lorakit.variants.dylora import nested_rank, sample_nested_rank

from .test_training_loop import collate, examples
from .tiny import randomize_adapters, tiny_llama


@pytest.mark.parametrize("rslora", [False, True])
def test_nested_rank_is_the_first_b_ranks(rslora):
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj"], dylora=True, use_rslora=rslora))
    randomize_adapters(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 32)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    scale = 16 / (3**0.5 if rslora else 3)
    with nested_rank(model, 3):
        torch.testing.assert_close(layer(x), layer.base_layer(x) + scale * x @ A[:3].T @ B[:, :3].T)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.scaling["default"] * x @ A.T @ B.T)


def test_truncate_equals_nested_rank_and_round_trips(tmp_path, ids):
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=8, alpha=16, target_modules="all-linear", dylora=True))
    randomize_adapters(model, 0.2)
    with nested_rank(model, 2):
        expected = model(ids).logits
    lorakit.truncate(model, 2)
    assert all(layer.rank("default") == 2 for _, layer in lora_layers(model))
    torch.testing.assert_close(model(ids).logits, expected)
    assert "r=2" in lorakit.summary(model)
    lorakit.save_adapter(model, tmp_path)
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(lorakit.ConfigError):
        lorakit.truncate(model, 0)


def test_trainer_samples_ranks_and_every_rank_learns(tmp_path):
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=8, alpha=8, target_modules="all-linear", dylora=True, seed=0))
    data = examples(32)
    from lorakit.training.evaluate import eval_loss

    before = {b: None for b in (1, 2, 4, 8)}
    for b in before:
        with nested_rank(model, b):
            before[b] = eval_loss(model, data, collate)
    run_loop(
        model,
        None,
        TrainConfig(data="x", lr=2e-2, max_steps=30, batch_size=8, device="cpu"),
        data,
        collate,
        tmp_path,
        progress=False,
    )
    assert all(not layer.nested_rank for _, layer in lora_layers(model))  # reset after training
    after = {}
    for b in before:
        with nested_rank(model, b):
            after[b] = eval_loss(model, data, collate)
    assert all(after[b] < before[b] - 0.01 for b in before), (before, after)
    assert after[1] > after[2] > after[4] > after[8]  # more ranks, lower loss: the nesting works


@pytest.mark.parametrize("flags", [dict(use_vera=True), dict(adalora=True)], ids=["vera", "adalora"])
def test_truncate_refuses_adapters_without_a_rank_prefix(flags, ids):
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], **flags))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.ConfigError, match="compress"):
        lorakit.truncate(model, 2)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert lorakit.state.adapter_configs(model)["default"].r == 4
    model(ids)  # still runs


def test_sampled_rank_covers_ranks_above_r_from_rank_pattern():
    model = tiny_llama()
    lorakit.add_adapter(
        model, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 6}, dylora=True)
    )
    attn = model.model.layers[0].self_attn
    drawn = set()
    for seed in range(100):
        b = sample_nested_rank(model, random.Random(seed))
        drawn.add(b)
        # Each layer at min(b, its own rank): what truncate(model, b) would keep.
        assert attn.q_proj.live_factors("default")[0].shape[0] == min(b, 6)
        assert attn.v_proj.live_factors("default")[0].shape[0] == min(b, 2)
    assert drawn == set(range(1, 7))


def test_trainer_trains_the_ranks_above_r(tmp_path):
    model = tiny_llama()
    lorakit.add_adapter(
        model,
        LoraConfig(r=2, alpha=4, target_modules=["q_proj"], rank_pattern={"layers.0.*q_proj": 6}, dylora=True, seed=0),
    )
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.rank("default") == 6 and not q_proj.lora_B["default"].any()  # B starts at zero
    run_loop(
        model,
        None,
        TrainConfig(data="x", lr=1e-2, max_steps=6, batch_size=8, device="cpu"),
        examples(16),
        collate,
        tmp_path,
        progress=False,
    )
    assert q_proj.lora_B["default"][:, 2:].any()  # ranks above r got trained (that all are drawn: the test above)


@pytest.mark.parametrize("change", ["set", "context", "sample", "reset"])
def test_nested_rank_of_a_merged_adapter_is_refused(change, ids):
    """The rank decides ``delta_weight``, which unmerging subtracts: changing it while merged
    would leave the wrong change behind in W0 (as truncating would; also refused)."""
    from lorakit.variants.dylora import set_nested_rank

    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"], dylora=True))
    randomize_adapters(model, 0.2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if change == "reset":  # merged at rank 3: going back to full rank is a change too
        set_nested_rank(model, 3)
    lorakit.merge(model)
    merged = model(ids).logits
    with pytest.raises(lorakit.AdapterStateError, match="merged; unmerge it"):
        if change == "set":
            set_nested_rank(model, 2)
        elif change == "context":
            with nested_rank(model, 2):
                pass
        elif change == "sample":
            sample_nested_rank(model, random.Random(0))
        else:
            set_nested_rank(model, None)
    torch.testing.assert_close(model(ids).logits, merged, rtol=0, atol=0)
    lorakit.unmerge(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=1e-6, atol=1e-6)


def test_nested_rank_refuses_an_unknown_adapter_or_a_rank_below_one():
    """A misspelt name used to change nothing, silently (the CLI's rank table measured the full
    adapter at every rank)."""
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], dylora=True))
    with pytest.raises(lorakit.AdapterNameError, match="unknown adapter 'adapter0'"):
        with nested_rank(model, 2, "adapter0"):
            pass
    for bad in (0, -1, 2.5, True):
        with pytest.raises(lorakit.ConfigError, match="nested rank"):
            with nested_rank(model, bad):
                pass
    with nested_rank(model, 2):
        assert all(layer.nested_rank["default"] == 2 for _, layer in lora_layers(model))
