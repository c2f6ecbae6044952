"""Choosing adapters: set_adapter, disable_adapters, adapter_batch, merge/unmerge, delete, unload."""

import pytest
import torch

import lorakit
from lorakit import AdapterNameError, AdapterStateError, LoraConfig
from lorakit.layers import LoraLayer, ModulesToSave

from .tiny import randomize_adapters, tiny_bert_classifier, tiny_llama


def two_adapter_model():
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name="a")
    lorakit.add_adapter(model, LoraConfig(r=2, alpha=8, target_modules=["up_proj", "q_proj"]), name="b")
    randomize_adapters(model, std=0.3)
    return model


def outputs_with(model, name, ids):
    if name is None:
        with lorakit.disable_adapters(model):
            return model(ids).logits
    lorakit.set_adapter(model, name)
    return model(ids).logits


def test_set_adapter_switches_and_combines(ids):
    model = two_adapter_model()
    base, a, b = (outputs_with(model, n, ids) for n in (None, "a", "b"))
    assert not torch.allclose(a, b) and not torch.allclose(a, base)
    lorakit.set_adapter(model, ["a", "b"])
    both = model(ids).logits
    assert not torch.allclose(both, a) and not torch.allclose(both, b)
    # Layer level: the updates of active adapters add up.
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 32)
    torch.testing.assert_close(q(x), q.base_layer(x) + q.lora_output(x, "a") + q.lora_output(x, "b"))


def test_disable_adapters_gives_base_and_restores(ids):
    model = tiny_llama()
    base = model(ids).logits
    lorakit.add_adapter(model, LoraConfig(target_modules="all-linear"))
    randomize_adapters(model)
    adapted = model(ids).logits
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)


def test_adapter_batch_rows_equal_single_adapter_runs(ids):
    model = two_adapter_model()
    names = ["b", None, "a"]
    singles = [outputs_with(model, name, ids[i : i + 1]) for i, name in enumerate(names)]
    with lorakit.adapter_batch(model, names):
        mixed = model(ids).logits
    for i in range(3):
        torch.testing.assert_close(mixed[i : i + 1], singles[i], rtol=1e-5, atol=1e-5)
    assert all(m.row_adapters is None for m in model.modules() if isinstance(m, LoraLayer))


def test_adapter_batch_with_modules_to_save(ids):
    model = tiny_bert_classifier()
    lorakit.add_adapter(model, LoraConfig(target_modules=["query"], modules_to_save=["classifier"]), name="x")
    lorakit.add_adapter(model, LoraConfig(target_modules=["value"], modules_to_save=["classifier"]), name="y")
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.modules_to_save["y"].weight.mul_(-1)
    names = ["y", "x", None]
    singles = [outputs_with(model, n, ids[i : i + 1]) for i, n in enumerate(names)]
    with lorakit.adapter_batch(model, names):
        mixed = model(ids).logits
    for i in range(3):
        torch.testing.assert_close(mixed[i : i + 1], singles[i], rtol=1e-5, atol=1e-5)


def test_adapter_batch_refusals(ids):
    model = two_adapter_model()
    with pytest.raises(AdapterNameError, match="unknown adapter 'c'"):
        with lorakit.adapter_batch(model, ["a", "c", None]):
            pass
    with pytest.raises(AdapterStateError, match="2 adapter names but the batch has 3 rows"):
        with lorakit.adapter_batch(model, ["a", "b"]):
            model(ids)
    lorakit.merge(model, "a")
    with pytest.raises(AdapterStateError, match="unmerge"):
        with lorakit.adapter_batch(model, ["a", "b", None]):
            pass


def test_merge_matches_and_refuses_double_merge(ids):
    model = two_adapter_model()
    lorakit.set_adapter(model, ["a", "b"])
    out = model(ids).logits
    lorakit.merge(model)
    torch.testing.assert_close(model(ids).logits, out, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterStateError, match="already merged"):
        lorakit.merge(model, "a")
    with pytest.raises(AdapterStateError, match="unmerge"):
        lorakit.set_adapter(model, "a")
    lorakit.unmerge(model)
    torch.testing.assert_close(model(ids).logits, out, rtol=1e-5, atol=1e-5)


def test_unknown_names_are_refused():
    model = two_adapter_model()
    for call in (
        lambda: lorakit.set_adapter(model, "zz"),
        lambda: lorakit.merge(model, ["zz"]),
        lambda: lorakit.delete_adapter(model, "zz"),
        lambda: lorakit.save_adapter(model, "/tmp/x", "zz"),
    ):
        with pytest.raises(AdapterNameError, match="unknown adapter 'zz'; this model's adapters: 'a', 'b'"):
            call()


def test_delete_adapter(ids):
    model = two_adapter_model()
    lorakit.delete_adapter(model, "a")
    assert lorakit.adapters(model) == ["b"]
    assert not isinstance(model.model.layers[0].self_attn.v_proj, LoraLayer)
    assert model.model.layers[0].self_attn.q_proj.adapter_names == ["b"]
    lorakit.merge(model, "b")
    with pytest.raises(AdapterStateError, match="merged"):
        lorakit.delete_adapter(model, "b")
    lorakit.unmerge(model)
    lorakit.delete_adapter(model, "b")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_unload_with_and_without_merge(ids):
    model = two_adapter_model()
    lorakit.set_adapter(model, ["a", "b"])
    out = model(ids).logits
    plain = lorakit.unload(model)
    assert plain is model and not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in model.modules())
    assert lorakit.adapters(model) == []
    torch.testing.assert_close(model(ids).logits, out, rtol=1e-5, atol=1e-5)
    reference = tiny_llama()
    base = reference(ids).logits
    model = two_adapter_model()
    lorakit.unload(model, merge=False)
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    assert set(model.state_dict()) == set(reference.state_dict())


def test_unload_keeps_trained_head():
    model = tiny_bert_classifier()
    lorakit.add_adapter(model, LoraConfig(target_modules=["query"], modules_to_save=["classifier"]))
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.fill_(0.25)
    lorakit.unload(model)
    assert isinstance(model.classifier, torch.nn.Linear) and torch.all(model.classifier.weight == 0.25)


def test_summary_mentions_every_adapter():
    model = two_adapter_model()
    text = lorakit.summary(model)
    assert (
        "adapter 'a': lora r=4" in text
        and "adapter 'b': lora r=2" in text
        and "[active]" in text
        and "[inactive]" in text
    )
