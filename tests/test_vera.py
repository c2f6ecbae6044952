"""VeRA: formula (float64), shared projection, counts, merge, PEFT interop both ways, refusals."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit import ConfigError, LoraConfig, TargetError
from lorakit.state import lora_layers

from .tiny import tiny_llama, train_steps

peft = pytest.importorskip("peft")


def vera_config(**kw):
    return LoraConfig(**{"r": 4, "target_modules": ["q_proj", "up_proj"], "use_vera": True, **kw})


def perturb(model):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for params in (layer.lora_A, layer.lora_B):
                for p in params.values():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_formula_and_shared_projection():
    net = nn.Sequential(nn.Linear(6, 5, dtype=torch.float64), nn.Linear(5, 9, dtype=torch.float64))
    lorakit.add_adapter(net, LoraConfig(r=3, target_modules=["0", "1"], use_vera=True, projection_prng_key=7))
    first, second = net[0], net[1]
    assert first.vera_projection["default"] is second.vera_projection["default"]
    projection = first.vera_projection["default"]
    assert projection.vera_A.shape == (3, 6) and projection.vera_B.shape == (9, 3)
    from peft.tuners.vera.model import _kaiming_init  # same draw as PEFT: files without projections interop

    gen = torch.Generator().manual_seed(7)
    assert torch.equal(projection.vera_A, _kaiming_init((3, 6), generator=gen))
    assert torch.equal(projection.vera_B, _kaiming_init((9, 3), generator=gen))
    assert torch.all(first.lora_A["default"] == 0.1) and torch.count_nonzero(first.lora_B["default"]) == 0
    perturb(net)
    x = torch.randn(4, 5, dtype=torch.float64)
    d, b = second.lora_A["default"], second.lora_B["default"]
    A, B = projection.vera_A[:, :5].double(), projection.vera_B[:9].double()
    torch.testing.assert_close(second(x), second.base_layer(x) + b * ((d * (x @ A.T)) @ B.T), rtol=1e-12, atol=1e-12)


def test_counts_merge_and_training(ids):
    model = tiny_llama()
    lorakit.add_adapter(model, vera_config())
    expected = sum(4 + layer.out_dim for _, layer in lora_layers(model))
    assert lorakit.trainable_parameters(model)[0] == expected
    assert not any(".vera_A" in k for k in model.state_dict())  # the shared pair is not repeated per layer
    losses = train_steps(model, ids, 6, lr=5e-2)
    assert losses[-1] < losses[0]
    out = model(ids).logits
    lorakit.merge(model)
    torch.testing.assert_close(model(ids).logits, out, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    torch.testing.assert_close(model(ids).logits, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_interop_both_ways(tmp_path, ids, save_projection):
    model = tiny_llama()
    lorakit.add_adapter(model, vera_config(save_projection=save_projection, projection_prng_key=11))
    perturb(model)
    expected = model(ids).logits
    lorakit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)

    peft_model = peft.get_peft_model(
        tiny_llama(), peft.VeraConfig(r=4, target_modules=["q_proj", "up_proj"], save_projection=save_projection)
    ).eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "vera_lambda" in n:
                p.copy_(torch.randn_like(p))
    expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "peft")
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_refusals():
    with pytest.raises(ConfigError, match="VeRA shares one random pair of one rank"):
        vera_config(rank_pattern={"q_proj": 2})
    with pytest.raises(ConfigError, match="use_dora"):
        vera_config(use_dora=True)
    model = tiny_llama()
    with pytest.raises(TargetError, match="VeRA adapts linear layers only"):
        lorakit.add_adapter(model, vera_config(target_modules=["q_proj", "embed_tokens"]))
    assert lorakit.adapters(model) == []


def test_projection_follows_model_to():
    model = tiny_llama()
    lorakit.add_adapter(model, vera_config())
    model.to(torch.float64)
    layers = [layer for _, layer in lora_layers(model)]
    assert layers[0].vera_projection["default"].vera_A.dtype == torch.float64
    assert layers[0].vera_projection["default"] is layers[-1].vera_projection["default"]
