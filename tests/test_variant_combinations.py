"""rsLoRA and the PiSSA/OLoRA inits combine with the variants: outputs kept at init, exact round trips."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig

from .tiny import tiny_llama, train_steps

COMBOS = [
    dict(use_dora=True, init="pissa", use_rslora=True),
    dict(use_dora=True, init="olora"),
    dict(lora_fa=True, init="pissa"),
    dict(lora_fa=True, use_rslora=True),
    dict(dylora=True, init="olora"),
    dict(adalora=True, use_rslora=True),
]


@pytest.mark.parametrize("flags", COMBOS, ids=lambda f: "+".join(f"{k}={v}" for k, v in f.items()))
def test_combination_keeps_outputs_trains_and_round_trips(flags, ids, tmp_path):
    model = tiny_llama()
    before = model(ids).logits
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"], seed=0, **flags))
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-5)
    losses = train_steps(model, ids, 4, lr=2e-2)
    assert losses[-1] < losses[0]
    expected = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-4, atol=1e-5)
    lorakit.merge(model)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
