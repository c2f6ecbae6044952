"""`combine` / `compress` on tiny transformers models: outputs, files (lorakit and PEFT), variants,
and failed calls that leave the model untouched."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AdapterStateError, ConfigError, LoraConfig
from lorakit.layers import LoraLayer
from lorakit.state import lora_layers

from .tiny import randomize_adapters, tiny_bert_classifier, tiny_gpt2, tiny_llama


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def two_adapters(make=tiny_llama):
    model = make()
    targets = ["c_attn", "c_fc"] if make is tiny_gpt2 else ["q_proj", "v_proj", "up_proj"]
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=targets), "a")
    lorakit.add_adapter(
        model, LoraConfig(r=2, alpha=3, use_rslora=True, target_modules=targets[:2], alpha_pattern={targets[0]: 5}), "b"
    )
    randomize_adapters(model, std=0.2)
    return model


def dense(model, name):
    return {
        path: layer.delta_weight(name).detach().double() for path, layer in lora_layers(model) if name in layer.lora_A
    }


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_linear_combination_equals_both_adapters_at_once(make, ids):
    model = two_adapters(make)
    lorakit.set_adapter(model, ["a", "b"])
    both = logits(model, ids)
    report = lorakit.combine(model, ["a", "b"], [1.0, 1.0], "linear", "ab")
    assert lorakit.state.active_adapters(model) == ["ab"]  # new adapters become active, as add_adapter's do
    torch.testing.assert_close(logits(model, ids), both, rtol=1e-5, atol=1e-5)
    assert report.exact


def test_weighted_combination_as_adapter_and_into_base_agree(ids):
    model = two_adapters()
    lorakit.combine(model, ["a", "b"], [0.8, -1.5], "linear", "ab")
    expected = logits(model, ids)
    lorakit.set_adapter(model, "a")
    lorakit.combine(model, ["a", "b"], [0.8, -1.5], "linear", into_base=True)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_svd_error_matches_the_dense_truth():
    model = two_adapters()
    report = lorakit.combine(model, ["a", "b"], [1.0, 0.5], "svd", "low", rank=2)
    truth = {p: d_a + 0.5 * dense(model, "b").get(p, 0) for p, d_a in dense(model, "a").items()}
    stored = dense(model, "low")
    for layer in report.layers:
        expected = float((truth[layer.path] - stored[layer.path]).norm() / truth[layer.path].norm())
        assert layer.rel_error == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert layer.rank == 2
    assert 0 < report.total_error < 1


def test_saved_combination_reloads_in_lorakit_and_peft(tmp_path, ids):
    peft = pytest.importorskip("peft")
    model = two_adapters()
    lorakit.combine(model, ["a", "b"], [0.6, 1.4], "linear", "ab")  # ranks 6, 6, 4: a rank_pattern is needed
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path, "ab")
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, ids), expected, rtol=1e-5, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-5, atol=1e-5)


def test_combined_adapter_merges_like_any_other(ids):
    model = two_adapters()
    lorakit.combine(model, ["a", "b"], [1.0, 1.0], "ties", "t", density=0.5)
    expected = logits(model, ids)
    lorakit.merge(model, "t")
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)


def test_dora_source_is_merged_through_its_effective_update(ids):
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True), "d")
    randomize_adapters(model, std=0.2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_magnitude_vector["d"].mul_(1.3)
    expected = logits(model, ids)
    # Into the base: m/‖W0+ΔW‖·(W0+ΔW) − W0 exactly (DoRA's merge).
    report = lorakit.combine(model, ["d"], [1.0], "linear", into_base=True)
    assert report.exact
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    # As an adapter: not low-rank, so SVD'd; at full rank nothing is lost.
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True), "d")
    randomize_adapters(model, std=0.2)
    expected = logits(model, ids)
    report = lorakit.combine(model, ["d"], [1.0], "linear", "plain", rank=32)
    assert not lorakit.state.adapter_configs(model)["plain"].use_dora
    assert report.max_error < 1e-6
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="DoRA"):
        lorakit.compress(model, "d", 2)


@pytest.mark.parametrize("variant", ["vera", "adalora"])
def test_vera_and_adalora_sources(variant, ids):
    model = tiny_llama()
    extra = dict(use_vera=True) if variant == "vera" else dict(adalora=True)
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **extra), "v")
    randomize_adapters(model, std=0.2)
    if variant == "adalora":
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_E["v"].copy_(torch.tensor([1.0, 0.0, -0.5, 2.0]))
    expected = logits(model, ids)
    report = lorakit.combine(model, ["v"], [1.0], "linear", "plain")
    assert report.exact
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_compress_in_place_keeps_state_and_reports_error(tmp_path, ids):
    model = two_adapters()
    lorakit.set_adapter(model, ["a", "b"])
    before = dense(model, "a")
    report = lorakit.compress(model, "a", 2)
    assert lorakit.state.active_adapters(model) == ["a", "b"]
    after = dense(model, "a")
    for layer in report.layers:
        truth = before[layer.path]
        assert layer.rank == 2 and model.get_submodule(layer.path).rank("a") == 2
        assert layer.rel_error == pytest.approx(float((truth - after[layer.path]).norm() / truth.norm()), rel=1e-4)
    lorakit.save_adapter(model, tmp_path, "a")
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    lorakit.set_adapter(model, "a")
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    # At or above the current rank nothing is lost.
    expected = logits(model, ids)
    assert lorakit.compress(model, "a", 8).exact
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_compress_keeps_modules_to_save(tmp_path, ids):
    peft = pytest.importorskip("peft")
    model = tiny_bert_classifier()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    randomize_adapters(model, std=0.2)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.mul_(2)  # a copy that differs from the base
    lorakit.compress(model, "default", 4)  # rank unchanged: exact, only re-factorised
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-5, atol=1e-5)


def test_failed_calls_leave_the_model_untouched(ids):
    model = two_adapters()
    lorakit.merge(model, "a")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterStateError, match="unmerge"):
        lorakit.combine(model, ["a", "b"], [1.0, 1.0], "linear", "x")
    lorakit.unmerge(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (
        lambda: lorakit.combine(model, ["a", "b"], [1.0], "linear", "x"),
        lambda: lorakit.combine(model, ["a", "b"], None, "ties", "b"),
        lambda: lorakit.combine(model, ["a", "nope"], None, "linear", "x"),
        lambda: lorakit.compress(model, "a", 0),
        lambda: lorakit.compress(model, "a", 2, new_name="b"),
    ):
        with pytest.raises(lorakit.LorakitError):
            call()
        assert lorakit.adapters(model) == ["a", "b"]
        now = model.state_dict()
        assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_pissa_and_modules_to_save_sources_are_refused():
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init="pissa"), "p")
    with pytest.raises(ConfigError, match="save it and load it back"):
        lorakit.combine(model, ["p"], [1.0], "linear", "x")
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "m")
    with pytest.raises(ConfigError, match="modules_to_save"):
        lorakit.combine(model, ["m"], [1.0], "linear", "x")


class Nested(nn.Module):
    """A top-level ``fc`` and a ``block.fc``: the name ``fc`` read as a suffix selects both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 6)
        self.block = nn.Module()
        self.block.fc = nn.Linear(6, 6)
        self.block.proj = nn.Linear(6, 6)

    def forward(self, x):
        return self.block.proj(self.block.fc(self.fc(x)))


def assert_reloads_alike(model, name, tmp_path):
    """Saved and loaded again (lorakit, then PEFT when installed), ``name`` gives the same outputs."""
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    lorakit.set_adapter(model, name)
    with torch.no_grad():
        expected = model(x)
    lorakit.save_adapter(model, tmp_path, name)
    fresh = Nested()
    lorakit.load_adapter(fresh, tmp_path)
    adapted = sorted(path for path, _ in lora_layers(model) if name in model.get_submodule(path).lora_A)
    assert sorted(path for path, _ in lora_layers(fresh)) == adapted
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
    try:
        import peft
    except ImportError:
        return
    theirs = peft.PeftModel.from_pretrained(Nested(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-6)


def test_combined_adapter_on_a_top_level_name_does_not_spread_to_its_namesakes(tmp_path):
    # Written as the list ["fc"], the combined adapter's targets also selected block.fc: install
    # failed with a KeyError (and a saved file would have loaded onto block.fc too).
    model = Nested()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules="^fc$"), "a")
    randomize_adapters(model, std=0.3)
    lorakit.combine(model, ["a"], [0.5], "linear", "c")
    assert not isinstance(model.block.fc, LoraLayer)
    assert_reloads_alike(model, "c", tmp_path)


@pytest.mark.parametrize("how", ["combine", "compress"])
def test_per_module_ranks_of_namesakes_stay_apart(how, tmp_path):
    # fc gets rank 4 (3 after compress), block.fc and block.proj rank 2: a rank_pattern key "fc"
    # would also give block.fc the larger rank when the file is loaded (lorakit and PEFT alike).
    model = Nested()
    lorakit.add_adapter(model, LoraConfig(r=2, alpha=2, target_modules=["fc", "proj"], rank_pattern={"^fc$": 4}), "a")
    randomize_adapters(model, std=0.3)
    if how == "combine":
        lorakit.combine(model, ["a"], [1.0], "linear", "c")
        name = "c"
    else:
        lorakit.compress(model, "a", 3)
        name = "a"
    assert model.fc.rank(name) == (4 if how == "combine" else 3) and model.block.fc.rank(name) == 2
    assert_reloads_alike(model, name, tmp_path)


def test_into_base_failing_midway_changes_no_weight(monkeypatch):
    model = two_adapters()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real, calls = lorakit.arithmetic.build.combine_layer, []

    def fail_on_the_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(lorakit.arithmetic.build, "combine_layer", fail_on_the_second_layer)
    for method in ("linear", "ties"):
        calls.clear()
        with pytest.raises(RuntimeError, match="out of memory"):
            lorakit.combine(model, ["a", "b"], [1.0, 1.0], method, into_base=True)
        now = model.state_dict()
        assert now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def test_into_base_write_interrupted_puts_back_what_it_wrote():
    from lorakit.arithmetic.build import assign_all

    first, second = torch.zeros(3), torch.zeros(2)
    with pytest.raises(RuntimeError):  # the second copy fails (shape mismatch) after the first was written
        assign_all([(first, torch.ones(3)), (second, torch.ones(5))])
    assert torch.equal(first, torch.zeros(3)) and torch.equal(second, torch.zeros(2))


def test_into_base_adds_both_updates_to_a_tied_weight():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["embed_tokens", "lm_head"]), "a")
    randomize_adapters(model, std=0.2)
    tied = model.lm_head.base_weight
    expected = tied.detach().clone() + sum(layer.delta_weight("a").detach() for _, layer in lora_layers(model))
    lorakit.combine(model, ["a"], [1.0], "linear", into_base=True)
    torch.testing.assert_close(tied.detach(), expected, rtol=1e-5, atol=1e-6)


def test_compress_keeps_a_lora_fa_adapters_a_frozen():
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_fa=True))
    randomize_adapters(model, std=0.2)
    lorakit.compress(model, "default", 2)
    for _, layer in lora_layers(model):
        assert layer.rank("default") == 2
        assert not layer.lora_A["default"].requires_grad and layer.lora_B["default"].requires_grad
    assert lorakit.state.adapter_configs(model)["default"].lora_fa
