"""lorakit under ``torch.inference_mode()``: every layer kind, variant, path and state gives the
values it gives under ``torch.no_grad()``.

Serving code, evaluation harnesses and many users wrap inference in inference mode, where
activations are inference tensors: they have no version counter and cannot be saved for
backward, so any cache keyed on ``_version`` or kept across calls must not meet them.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.state import lora_layers
from lorakit.variants.dylora import set_nested_rank

from .test_parameter_targets import EXPERT_PARAMS, tiny_mixtral
from .tiny import randomize_adapters, tiny_gpt2, tiny_llama

VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "vera": {"use_vera": True},
    "adalora": {"adalora": True},
    "lora_fa": {"lora_fa": True},
    "dylora": {"dylora": True},
}


def visible(model, name: str = "default") -> None:
    """Non-zero A and B (fresh B is zero), AdaLoRA's singular values non-zero (they start at 0),
    DoRA's magnitudes off the norms, DyLoRA at a nested rank below r: every term shows."""
    randomize_adapters(model, 0.1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            kind = layer.variants[name].name
            if kind == "adalora":
                E = layer.lora_E[name]
                E.copy_(torch.randn(E.shape, generator=gen, dtype=E.dtype))
            if kind == "dora":
                m = layer.lora_magnitude_vector[name]
                m.mul_(torch.linspace(0.5, 1.5, m.numel(), dtype=m.dtype).reshape(m.shape))
    if lorakit.adapters(model) and model._lorakit_configs[name].dylora:
        set_nested_rank(model, 2, name)


def adapted_llama(variant: str = "lora", name: str = "default", model=None):
    model = tiny_llama().double() if model is None else model
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear", **VARIANTS[variant]), name)
    visible(model, name)
    return model


def assert_same_under_inference_mode(run) -> torch.Tensor:
    """``run()`` under inference mode equals ``run()`` under no_grad (and runs on inference tensors)."""
    with torch.no_grad():
        want = run()
    with torch.inference_mode():
        got = run()
    assert got.is_inference()
    torch.testing.assert_close(got, want)
    return got


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant(variant, fast, ids):
    model = adapted_llama(variant)
    lorakit.set_fast_path(model, fast)
    with torch.no_grad(), lorakit.disable_adapters(model):
        base = model(ids).logits
    got = assert_same_under_inference_mode(lambda: model(ids).logits)
    assert not torch.allclose(got, base)  # the adapter shows in the output


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("variant", ["lora", "dora", "vera", "adalora"])
def test_merged(variant, fast, ids):
    model = adapted_llama(variant)
    lorakit.set_fast_path(model, fast)
    with torch.no_grad():
        unmerged = model(ids).logits
    lorakit.merge(model)
    merged = assert_same_under_inference_mode(lambda: model(ids).logits)
    torch.testing.assert_close(merged, unmerged)


def test_merge_and_unmerge_inside_inference_mode_then_train(ids):
    """Merging inside inference mode writes the (normal) weights in place; what it keeps (DoRA's
    norms) must not stop the unmerge or a training step afterwards."""
    model = adapted_llama("dora")
    with torch.no_grad():
        want = model(ids).logits
    with torch.inference_mode():
        lorakit.merge(model)
        torch.testing.assert_close(model(ids).logits, want)
    lorakit.unmerge(model)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_inference_then_training(fast, ids):
    """Whatever the fast path keeps between calls (q/k/v outputs, DoRA's ‖W0‖²) is not an inference
    tensor that a later training step would have to save for backward."""
    model = adapted_llama("dora")
    lorakit.set_fast_path(model, fast)
    with torch.inference_mode():
        model(ids)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_adapter_batch(fast, ids):
    model = adapted_llama("lora", "a")
    adapted_llama("dora", "b", model=model)
    lorakit.set_fast_path(model, fast)

    def mixed():
        with lorakit.adapter_batch(model, ["b", None, "a"]):
            return model(ids).logits

    got = assert_same_under_inference_mode(mixed)
    for row, name in enumerate(["b", None, "a"]):
        if name is None:
            with torch.no_grad(), lorakit.disable_adapters(model):
                want = model(ids[row : row + 1]).logits
        else:
            lorakit.set_adapter(model, name)
            with torch.no_grad():
                want = model(ids[row : row + 1]).logits
        torch.testing.assert_close(got[row : row + 1], want)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_generate(merged, fast):
    model = adapted_llama("lora")
    lorakit.set_fast_path(model, fast)
    if merged:
        lorakit.merge(model)
    prompt = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        got = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


def _gpt2():
    model = tiny_gpt2().double()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))  # GPT-2's Conv1D layers
    return model, lambda ids: model(ids).logits


def _embedding():
    model = tiny_llama().double()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["embed_tokens", "lm_head"]))
    return model, lambda ids: model(ids).logits


def _conv2d():
    torch.manual_seed(0)
    model = ConvNet().double().eval()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["conv", "head"]))
    images = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    return model, lambda ids: model(images)


def _experts():
    model = tiny_mixtral(torch.float64)
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS))
    return model, lambda ids: model(ids % 64).logits


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize(
    "build", [_gpt2, _embedding, _conv2d, _experts], ids=["conv1d", "embedding", "conv2d", "experts"]
)
def test_every_layer_kind(build, fast, ids):
    model, run = build()
    visible(model)
    lorakit.set_fast_path(model, fast)
    with torch.no_grad(), lorakit.disable_adapters(model):
        base = run(ids)
    got = assert_same_under_inference_mode(lambda: run(ids))
    assert not torch.allclose(got, base)
    lorakit.merge(model)
    assert_same_under_inference_mode(lambda: run(ids))


def test_siblings_keep_nothing_from_inference_tensors(ids):
    """q, k, v of an inference-mode input each take their own fused call: an inference tensor has
    no version counter, so nothing would tell a kept output from one of an input since changed."""
    model = adapted_llama("lora")
    attention = model.model.layers[0].self_attn
    group = attention.q_proj.siblings
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        want = [attention.q_proj(x), attention.k_proj(x)]
    with torch.inference_mode():
        x = x.clone()
        q = attention.q_proj(x)
        assert group.kept == {}
        x.mul_(-1)  # allowed in inference mode, and invisible to a version check
        k = attention.k_proj(x)
    torch.testing.assert_close(q, want[0])
    torch.testing.assert_close(k, -want[1])  # k_proj has no bias: k(-x) = -k(x)
