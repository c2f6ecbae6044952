"""The variant protocol (layers/variant.py): a variant defined here, in the test file alone, is added,
trained (with a training hook), merged, saved and loaded by the unchanged rest of lorakit."""

import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.config import VARIANTS, register_variant
from lorakit.layers.variant import Variant
from lorakit.state import lora_layers
from lorakit.training.config import TrainConfig
from lorakit.training.loop import run_loop
from lorakit.variants.hooks import TrainingHooks

from .test_training_loop import collate, examples
from .tiny import tiny_llama

SLOT = "lora_gate"


class GateClamp(TrainingHooks):
    """Keeps every gate in [0, 2] after each optimizer step and counts the steps it saw."""

    checkpoint_key = "gated"

    def __init__(self, model, name):
        super().__init__(name)
        self.model, self.steps = model, 0

    def after_step(self, step):
        self.steps += 1
        with torch.no_grad():
            for _, layer in lora_layers(self.model):
                if self.name in layer.lora_A:
                    layer.lora_gate[self.name].clamp_(0, 2)

    def state_dict(self):
        return {"steps": self.steps}

    def finish(self, out_dir, write):
        if write:
            (out_dir / f"gate_steps_{self.name}.json").write_text(json.dumps(self.steps))
        return f"gates clamped {self.steps} times"


class GatedLora(Variant):
    """h = W0 x + g * s * B A x with one trained gate g per layer (starting at 1)."""

    name = "gated"
    title = "gated LoRA"
    peft_type = "GATED_LORA"
    slots = (SLOT,)
    file_slots = {"gate": SLOT}
    file_suffixes = {"." + SLOT: "gate"}

    def peft_config(self, config, data):
        return {**data, "peft_type": self.peft_type}

    def read_peft_config(self, data):
        return {**data, "variant": self.name}

    def attach(self, layer, name, planned_layer, trainable):
        gate = planned_layer.extras.get("gate", torch.ones((), dtype=planned_layer.A.dtype))
        layer.slot(SLOT)[name] = nn.Parameter(gate.clone(), requires_grad=trainable)

    def live_factors(self, layer, name):
        A, B, s = super().live_factors(layer, name)
        return A, B * layer.lora_gate[name], s  # the gate folded into B: forward, merge, fast path

    def fused_factors(self, layer, name):
        return (*self.live_factors(layer, name), None)

    def extra_tensors(self, layer, name):
        return {"gate": layer.lora_gate[name]}

    def read_extras(self, layer_plan, found):
        super().read_extras(layer_plan, found)
        layer_plan.extras["gate"] = found["gate"]

    def trainer(self, model, name, run, total_steps):
        return GateClamp(model, name)


@pytest.fixture
def gated():
    variant = register_variant(GatedLora())
    yield variant
    del VARIANTS[variant.name]


def gated_model(seed=0):
    model = tiny_llama()
    lorakit.add_adapter(
        model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], variant="gated", seed=seed)
    )
    return model


def test_a_variant_defined_outside_lorakit_adds_trains_merges_saves_and_loads(gated, ids, tmp_path):
    model = gated_model()
    layers = [layer for _, layer in lora_layers(model)]
    assert all(layer.variants["default"] is gated and layer.lora_gate["default"].requires_grad for layer in layers)
    trainable, _ = lorakit.trainable_parameters(model)
    assert trainable == sum(layer.lora_A["default"].numel() + layer.lora_B["default"].numel() + 1 for layer in layers)
    assert "adapter 'default': gated" in lorakit.summary(model)

    cfg = TrainConfig(
        data="x",
        lr=5e-2,
        max_steps=5,
        batch_size=4,
        device="cpu",
        variant="gated",
        r=4,
        target_modules=["q_proj", "down_proj"],
    )
    result = run_loop(model, None, cfg, examples(16), collate, tmp_path / "run", progress=False)
    assert result.notes == ["gates clamped 5 times"]  # what `lorakit train` prints at the end
    assert json.loads((tmp_path / "run" / "gate_steps_default.json").read_text()) == 5
    gates = torch.stack([layer.lora_gate["default"].detach() for layer in layers])
    assert not torch.equal(gates, torch.ones_like(gates)) and bool(((gates >= 0) & (gates <= 2)).all())

    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        layer = layers[0]
        x = torch.randn(3, layer.in_dim, dtype=torch.float64)
        A, B, g = (
            t.detach().double() for t in (layer.lora_A["default"], layer.lora_B["default"], layer.lora_gate["default"])
        )
        W0 = layer.base_layer.weight.double()
        formula = x @ W0.T + g * 2.0 * (x @ A.T @ B.T)  # s = alpha / r = 2
        torch.testing.assert_close(layer.double()(x), formula)
        layer.float()

        lorakit.merge(model)
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
        lorakit.unmerge(model)

    lorakit.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "GATED_LORA"
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-5, atol=1e-6)
    lorakit.delete_adapter(fresh, "default")
    assert not any(True for _ in lora_layers(fresh))


def test_one_adapter_has_one_variant(gated):
    with pytest.raises(lorakit.ConfigError, match="one variant"):
        LoraConfig(r=2, target_modules=["q_proj"], variant="gated", use_dora=True)
    with pytest.raises(lorakit.ConfigError, match="variant must be one of"):
        LoraConfig(r=2, target_modules=["q_proj"], variant="gatedd")
    config = LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    assert config.variant == "dora" and config.replace(variant="gated").use_dora is False
    assert config.replace(use_dora=False).variant == "lora"
