"""Files written by lorakit load in PEFT, and PEFT's load in lorakit, with the same logits."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig

from .tiny import randomize_adapters, tiny_bert_classifier, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

CASES = {
    "llama-rslora-patterns": (
        tiny_llama,
        dict(
            r=4,
            alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 5},
        ),
    ),
    "llama-embedding": (tiny_llama, dict(r=4, alpha=16, target_modules=["embed_tokens", "o_proj"])),
    "llama-layers": (tiny_llama, dict(r=2, alpha=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[1])),
    "bert-modules-to-save": (
        tiny_bert_classifier,
        dict(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
    "gpt2-conv1d": (tiny_gpt2, dict(r=4, alpha=8, target_modules=["c_attn", "c_fc"])),
}

PEFT_KEYS = {"alpha": "lora_alpha"}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def perturb_peft_weights(model):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


# PEFT itself refuses a regex / "all-linear" with layers_to_transform; lorakit accepts it and
# writes the explicit module list, so the file still loads in PEFT.
LORAKIT_ONLY = {
    "llama-all-linear-layers": (tiny_llama, dict(r=2, alpha=4, target_modules="all-linear", layers_to_transform=[1]))
}


@pytest.mark.parametrize("case", list(CASES) + list(LORAKIT_ONLY))
def test_lorakit_to_peft(case, tmp_path, ids):
    make, kwargs = (CASES | LORAKIT_ONLY)[case]
    model = make()
    lorakit.add_adapter(model, LoraConfig(**kwargs))
    randomize_adapters(model, std=0.2)
    for _, wrapper in lorakit.state.saved_modules(model):
        with torch.no_grad():
            wrapper.modules_to_save["default"].weight.mul_(2)
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_lorakit(case, tmp_path, ids):
    make, kwargs = CASES[case]
    peft_kwargs = {PEFT_KEYS.get(k, k): v for k, v in kwargs.items()}
    peft_model = peft.get_peft_model(make(), peft.LoraConfig(**peft_kwargs)).eval()
    perturb_peft_weights(peft_model)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    model = make()
    lorakit.load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_peft_merge_agrees_with_lorakit_merge(tmp_path, ids):
    model = tiny_gpt2()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, std=0.2)
    lorakit.save_adapter(model, tmp_path)
    merged_here = lorakit.unload(model).state_dict()
    merged_peft = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).merge_and_unload().state_dict()
    for key, value in merged_here.items():
        torch.testing.assert_close(merged_peft[key], value, rtol=1e-5, atol=1e-6)


# PEFT saves a PiSSA/OLoRA adapter unconverted unless asked: A and B trained against the residual
# W0 - s B0 A0, the file's init naming the decomposition. PEFT's loader recomputes it on the
# original base; lorakit must do the same (loading the weights onto W0 as they are is wrong).
@pytest.mark.parametrize("init,dora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_an_unconverted_peft_pissa_file_loads_onto_the_original_base(init, dora, tmp_path, ids):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=init, use_dora=dora
    )
    peft_model = peft.get_peft_model(tiny_llama(), config).eval()
    perturb_peft_weights(peft_model)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    assert torch.allclose(
        logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft"), ids), expected, atol=1e-5
    )  # PEFT's own reading of the file
    model = tiny_llama()
    original = logits(model, ids)
    lorakit.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    lorakit.save_adapter(model, tmp_path / "converted")  # written against the original W0
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "converted").eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)
    lorakit.delete_adapter(model, "default")  # gives the residual's part back to W0
    torch.testing.assert_close(logits(model, ids), original, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["orthogonal", "eva", "mica", False])
def test_peft_inits_that_leave_the_base_alone_load_as_their_weights(init, tmp_path, ids):
    """EVA, orthogonal and MiCA only choose the starting A and B: the file says everything.
    (EVA needs activations to initialise, so its file is a plain one with PEFT's init value.)"""
    drawn = init if init in ("orthogonal", "mica") else True
    peft_model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=drawn)
    ).eval()
    perturb_peft_weights(peft_model)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    _set_peft_init(tmp_path, init)
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa_niter_2", "corda", "loftq", "lora_ga"])
def test_peft_files_whose_changed_base_cannot_be_rebuilt_are_refused(init, tmp_path, ids):
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    perturb_peft_weights(peft_model)
    peft_model.save_pretrained(tmp_path)
    _set_peft_init(tmp_path, init)
    model = tiny_llama()
    before = logits(model, ids)
    with pytest.raises(lorakit.errors.AdapterFileError, match="path_initial_model_for_weight_conversion"):
        lorakit.load_adapter(model, tmp_path)
    assert lorakit.adapters(model) == [] and torch.equal(logits(model, ids), before)


def test_hot_swap_refuses_an_unconverted_pissa_file(tmp_path):
    peft_model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    )
    peft_model.save_pretrained(tmp_path)
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(lorakit.errors.AdapterFileError, match="save it with save_adapter"):
        lorakit.hotswap_adapter(model, tmp_path)


def _set_peft_init(directory, init):
    """Rewrite a saved PEFT file's init_lora_weights (as PEFT would have written it for ``init``)."""
    import json

    file = directory / "adapter_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | {"init_lora_weights": init}))
