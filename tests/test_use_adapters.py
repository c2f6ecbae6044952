"""`lorakit.use_adapters`: exactly the named adapters run inside the block, everything comes back after."""

import pytest
import torch

import lorakit
from lorakit import AdapterNameError, AdapterStateError, LoraConfig
from lorakit.state import adapter_modules

from .test_control import outputs_with, two_adapter_model
from .tiny import tiny_bert_classifier


def flags(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


def test_exactly_the_named_adapters_run_and_the_state_comes_back(ids):
    model = two_adapter_model()
    base, a, b = (outputs_with(model, n, ids) for n in (None, "a", "b"))
    lorakit.set_adapter(model, ["a", "b"])
    for p in model.model.layers[0].self_attn.q_proj.lora_A.values():
        p.requires_grad_(False)  # a frozen adapter tensor must stay frozen after the block
    before = flags(model)
    with lorakit.use_adapters(model, []):
        torch.testing.assert_close(model(ids).logits, base)
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with lorakit.use_adapters(model, "a") as same:
        assert same is model
        torch.testing.assert_close(model(ids).logits, a)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all(n.endswith(".a") for n in trained)  # b's tensors are frozen inside
    assert flags(model) == before
    assert lorakit.state.active_adapters(model) == ["a", "b"]
    with lorakit.use_adapters(model, ["b"]):
        torch.testing.assert_close(model(ids).logits, b)


def test_restored_when_the_block_raises_and_nested_in_disable_and_batch(ids):
    model = two_adapter_model()
    lorakit.set_adapter(model, "a")
    before = flags(model)
    with pytest.raises(RuntimeError, match="boom"):
        with lorakit.use_adapters(model, ["b"]):
            for p in model.parameters():
                p.requires_grad_(True)  # whatever the block does to the flags is undone
            raise RuntimeError("boom")
    assert flags(model) == before and lorakit.state.active_adapters(model) == ["a"]
    with lorakit.disable_adapters(model):
        with lorakit.use_adapters(model, ["a"]):  # the named adapter runs even inside disable_adapters
            a = model(ids).logits
        assert all(m.disabled for m in adapter_modules(model))
    torch.testing.assert_close(a, model(ids).logits)
    with lorakit.adapter_batch(model, ["b", None]):
        with lorakit.use_adapters(model, []):
            assert all(m.row_adapters is None for m in adapter_modules(model))
        assert all(m.row_adapters is not None for m in adapter_modules(model))


def test_refusals_leave_the_model_as_it_was(ids):
    model = two_adapter_model()
    with pytest.raises(AdapterNameError, match="unknown adapter 'c'"):
        with lorakit.use_adapters(model, ["a", "c"]):
            pass
    lorakit.merge(model, ["b"])
    with pytest.raises(AdapterStateError, match="unmerge"):
        with lorakit.use_adapters(model, []):
            pass
    assert lorakit.state.active_adapters(model) == ["b"]


def test_modules_to_save_follow_the_named_adapter():
    model = tiny_bert_classifier()
    config = LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    lorakit.add_adapter(model, config, name="x")
    lorakit.add_adapter(model, config, name="y")
    with torch.no_grad():
        model.classifier.modules_to_save["x"].weight.add_(1.0)
    ids = torch.tensor([[1, 2, 3]])
    with lorakit.use_adapters(model, []):
        base = model(ids).logits
        assert not model.classifier.modules_to_save["x"].weight.requires_grad
    with lorakit.use_adapters(model, ["x"]):
        assert not torch.allclose(model(ids).logits, base)
        assert model.classifier.modules_to_save["x"].weight.requires_grad
        assert not model.classifier.modules_to_save["y"].weight.requires_grad
    with pytest.raises(AdapterStateError, match="only one of them"):
        with lorakit.use_adapters(model, ["x", "y"]):
            pass
