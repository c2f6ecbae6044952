"""QLoRA: LoRA on bitsandbytes 4-bit / 8-bit bases (``lorakit.quantize``, ``layers/quantized.py``).

Real bitsandbytes on the CPU (fp32 compute), real tiny transformers models; values against the
formula over bitsandbytes' own dequantization, and against PEFT's QLoRA.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import AdapterStateError, ConfigError, LoraConfig, TargetError
from lorakit.layers import LoraLinear, LoraQuantizedLinear
from lorakit.state import lora_layers
from tests.tiny import randomize_adapters, tiny_llama

bnb = pytest.importorskip("bitsandbytes")


def quantized_llama(method: str = "nf4", **options):
    return lorakit.quantize(tiny_llama(hidden=64), method, **options)


def dequantize_4bit(module: nn.Module) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)


def packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized tensor of the model (packed codes, absmax, nested state), cloned."""
    state = {}
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        path = path.replace(".base_layer", "")
        if type(weight).__name__ == "Params4bit":
            for key, value in weight.quant_state.as_dict(packed=True).items():
                if isinstance(value, torch.Tensor):
                    state[f"{path}.{key}"] = value.clone()
            state[f"{path}.weight"] = weight.data.clone()
    return state


# --- quantize() ----------------------------------------------------------------------------------
def test_quantize_replaces_linears_but_the_head():
    model = quantized_llama()
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is bnb.nn.Linear4bit and q.weight.quant_type == "nf4" and q.weight.compress_statistics
    assert q.compute_dtype == torch.float32  # CPU default
    assert type(model.lm_head) is nn.Linear
    skipped = lorakit.quantize(tiny_llama(hidden=64), "fp4", double_quant=False, skip=["mlp.down_proj"])
    assert type(skipped.model.layers[1].mlp.down_proj) is nn.Linear
    assert skipped.model.layers[1].mlp.up_proj.weight.quant_type == "fp4"
    assert not skipped.model.layers[1].mlp.up_proj.weight.compress_statistics


def test_quantize_errors(monkeypatch):
    with pytest.raises(ConfigError, match="nf4, fp4, int8"):
        lorakit.quantize(tiny_llama(), "int4")
    with pytest.raises(ConfigError, match="name no linear layer"):
        lorakit.quantize(tiny_llama(), "nf4", skip=["qproj"])
    with pytest.raises(ConfigError, match="compute_dtype"):
        lorakit.quantize(tiny_llama(), "nf4", compute_dtype="int8")
    adapted = lorakit.add_adapter(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="quantize the base model first"):
        lorakit.quantize(adapted)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match=r'pip install "lorakit\[qlora\]"'):
        lorakit.quantize(tiny_llama())


def test_parameter_count_is_the_dense_models():
    dense = tiny_llama(hidden=64)
    total = sum(p.numel() for p in dense.parameters())
    assert lorakit.trainable_parameters(lorakit.quantize(dense))[1] == total  # a 4-bit parameter counts as two


# --- the quantized base-layer kind ---------------------------------------------------------------
def test_base_output_is_x_times_dequantized_weight():
    model = quantized_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    layer = model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, LoraQuantizedLinear)
    x = torch.randn(3, 5, 64)
    expected = x @ dequantize_4bit(layer.base_layer).T
    torch.testing.assert_close(layer.base_output_without_bias(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(layer.base_layer(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_adapter_shapes_are_the_real_sizes_and_forward_is_the_formula(method):
    model = quantized_llama(method)
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    layer = model.model.layers[0].mlp.down_proj  # 128 -> 64
    assert layer.lora_A["default"].shape == (4, 128) and layer.lora_B["default"].shape == (64, 4)
    assert layer.lora_A["default"].dtype == torch.float32
    randomize_adapters(model, 0.1)
    x = torch.randn(2, 3, 128)
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    expected = layer.base_layer(x) + s * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected)
    layers = [name for name, l in lora_layers(model) if isinstance(l, LoraQuantizedLinear)]
    assert len(layers) == 14 and "lm_head" not in layers


def test_only_adapters_get_gradients():
    model = quantized_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    before = packed_state(model)
    model.train()
    ids = torch.randint(0, 128, (2, 9))
    model(ids, labels=ids).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    after = packed_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_dora_on_4bit_takes_its_norm_from_the_dequantized_weight():
    model = quantized_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["v_proj"], variant="dora"))
    layer = model.model.layers[0].self_attn.v_proj
    W0 = dequantize_4bit(layer.base_layer)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(), W0.norm(dim=1))
    randomize_adapters(model, 0.1)
    x = torch.randn(4, 64)
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    W = W0 + s * B @ A
    expected = F.linear(x, layer.lora_magnitude_vector["default"][:, None] * W / W.norm(dim=1, keepdim=True))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["adalora", "dylora", "lora-fa"])
def test_other_variants_run_on_4bit(variant):
    model = quantized_llama()
    config = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], variant=variant)
    lorakit.add_adapter(model, config)
    ids = torch.randint(0, 128, (2, 6))
    model.train()
    model(ids, labels=ids).loss.backward()


def test_refused_combinations_say_why():
    with pytest.raises(TargetError, match="VeRA cannot adapt a quantized"):
        lorakit.add_adapter(quantized_llama(), LoraConfig(r=4, target_modules=["q_proj"], variant="vera"))
    for init in ("pissa", "olora"):
        with pytest.raises(TargetError, match="residual W0"):
            lorakit.add_adapter(quantized_llama(), LoraConfig(r=4, target_modules=["q_proj"], init=init))
    with pytest.raises(TargetError, match="quantized"):
        lorakit.add_adapter(
            quantized_llama(), LoraConfig(r=4, target_modules=None, target_parameters=["self_attn.q_proj.weight"])
        )


# --- merging -------------------------------------------------------------------------------------
def adapted(method: str = "nf4", std: float = 0.02):
    model = quantized_llama(method)
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, std)
    return model


def test_plain_merge_on_4bit_refuses_with_the_loss():
    model = adapted()
    before = packed_state(model)
    with pytest.raises(AdapterStateError, match=r"keeps \d+\.\d% of adapter 'default'.*unload\(model, merge=True\)"):
        lorakit.merge(model)
    after = packed_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and not lorakit.control.merged_adapters(model)


def test_requantized_merge_reports_the_surviving_share_and_unmerges_bit_for_bit():
    model = adapted()
    ids = torch.randint(0, 128, (2, 8))
    before, logits = packed_state(model), model(ids).logits
    layer = model.model.layers[0].self_attn.q_proj
    expected = layer.surviving_share("default")
    report = lorakit.merge(model, requantize=True)
    shares = report["default"]
    assert set(shares) == {name for name, _ in lora_layers(model)}
    assert all(-1 < share < 1 for share in shares.values())
    assert shares["model.layers.0.self_attn.q_proj"] == pytest.approx(expected)
    # The layer computes with quantize(W0 + sBA): check that one against the formula.
    merged = dequantize_4bit(layer.base_layer)
    W0 = layer.unmerged_weight()
    kept = merged - W0
    delta = layer.delta_weight("default")
    assert float((kept * delta).sum() / (delta * delta).sum()) == pytest.approx(
        shares["model.layers.0.self_attn.q_proj"]
    )
    lorakit.unmerge(model)
    after = packed_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_unload_dequantizes_and_merges_exactly(method, variant):
    model = quantized_llama(method)
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear", variant=variant))
    randomize_adapters(model, 0.05)
    ids = torch.randint(0, 128, (2, 8))
    x = torch.randn(3, 64)
    layer = model.model.layers[0].self_attn.q_proj
    if method == "nf4":
        expected_layer = layer(x)
    logits = model(ids).logits
    lorakit.unload(model, merge=True)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype == torch.float32
    assert not any(isinstance(m, (LoraLinear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
    if method == "nf4":  # int8's base forward quantizes activations too: only the whole model is compared
        torch.testing.assert_close(q(x), expected_layer, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    else:
        assert (model(ids).logits - logits).abs().max() < 0.05 * logits.abs().max()


def test_unload_without_merge_gives_back_the_quantized_model():
    model = adapted()
    before = packed_state(model)
    lorakit.unload(model, merge=False)
    assert type(model.model.layers[0].self_attn.q_proj) is bnb.nn.Linear4bit
    after = packed_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dequantize_makes_every_layer_dense():
    model = quantized_llama()
    q = model.model.layers[1].mlp.up_proj
    W = dequantize_4bit(q)
    lorakit.dequantize(model, "bf16")
    dense = model.model.layers[1].mlp.up_proj
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.bfloat16
    torch.testing.assert_close(dense.weight.float(), W.to(torch.bfloat16).float(), rtol=0, atol=0)


# --- files ---------------------------------------------------------------------------------------
def test_adapter_saves_in_peft_layout_and_loads_on_a_full_precision_base(tmp_path):
    model = adapted()
    lorakit.save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    assert tensors[key].shape == (4, 128)
    assert not any("base_layer" in k or "absmax" in k for k in tensors)
    dense = tiny_llama(hidden=64)
    name = lorakit.load_adapter(dense, tmp_path / "a")
    layer = dense.model.layers[0].mlp.down_proj
    assert type(layer) is LoraLinear
    torch.testing.assert_close(layer.lora_A[name], model.model.layers[0].mlp.down_proj.lora_A["default"])


def test_peft_qlora_gives_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted(std=0.1)
    lorakit.save_adapter(model, tmp_path / "a")
    other = quantized_llama()  # quantizing the same weights gives the same codes
    peft_model = peft.PeftModel.from_pretrained(other, tmp_path / "a")
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ids = torch.randint(0, 128, (2, 8))
    torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    fresh = quantized_llama()
    lorakit.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_peft_quantized_model_takes_lorakit_adapters_in_place():
    model = quantized_llama()
    copy.deepcopy(model)  # a quantized model deep-copies (trainers and EMA do this)
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    assert "nf4" in repr(model.model.layers[0].self_attn.q_proj)


def test_a_one_percent_update_is_mostly_rounded_away_by_requantizing():
    """The issue's trap (peft#2586): an update 1% the norm of W0 keeps ~1% of itself in NF4."""
    model = lorakit.quantize(tiny_llama(hidden=256, layers=1), "nf4")
    lorakit.add_adapter(model, LoraConfig(r=16, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].normal_(generator=torch.Generator().manual_seed(0))
        layer.lora_B["default"].mul_(0.01 * layer.unmerged_weight().norm() / layer.delta_weight("default").norm())
    share = lorakit.merge(model, requantize=True)["default"]["model.layers.0.self_attn.q_proj"]
    assert 0 < share < 0.05


# --- load_model(quantize=...) -----------------------------------------------------------------------
def test_load_model_quantizes_a_directory_through_transformers(tmp_path):
    from lorakit.models import load_model
    from tests.test_models import save_tiny_model

    save_tiny_model(tmp_path / "m")
    model, _ = load_model(str(tmp_path / "m"), quantize="nf4", double_quant=False)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is bnb.nn.Linear4bit and q.weight.quant_type == "nf4" and not q.weight.compress_statistics
    assert q.compute_dtype == torch.float32 and type(model.lm_head) is nn.Linear
    assert not q.support_avx512bf16_for_cpu  # no bf16 repacking in eval (quantization.keep_standard_packing)
    # The same codes as lorakit.quantize on the same weights.
    dense, _ = load_model(str(tmp_path / "m"))
    lorakit.quantize(dense, "nf4", double_quant=False)
    assert torch.equal(dense.model.layers[0].self_attn.q_proj.weight.data, q.weight.data)
    with pytest.raises(ConfigError, match="quantize must be one of"):
        load_model(str(tmp_path / "m"), quantize="q4")


@pytest.mark.e2e
def test_the_embedded_model_loads_quantized_and_takes_an_adapter():
    from lorakit.models import load_model

    model, tokenizer = load_model("smollm2-135m", quantize="nf4")
    assert type(model.model.layers[0].mlp.down_proj) is bnb.nn.Linear4bit
    lorakit.add_adapter(model, LoraConfig(r=8, target_modules="all-linear"))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    model.train()
    model(ids, labels=ids).loss.backward()
    layer = model.model.layers[0].mlp.down_proj
    assert layer.lora_A["default"].shape == (8, 1536) and layer.lora_A["default"].grad is not None


# --- lorakit export of a QLoRA adapter ------------------------------------------------------------
def qlora_adapter(tmp_path, variant: str = "lora"):
    """A tiny model folder, an adapter trained (randomized) on its NF4 quantization, and that
    quantized model with the adapter."""
    from lorakit.models import load_model
    from tests.test_models import save_tiny_model

    save_tiny_model(tmp_path / "m")
    model, _ = load_model(str(tmp_path / "m"), quantize="nf4")
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear", variant=variant))
    randomize_adapters(model, 0.05)
    lorakit.save_adapter(model, tmp_path / "run" / "adapter")
    return model


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_export_of_a_quantized_run_computes_what_the_trained_model_did(tmp_path, variant):
    from transformers import AutoModelForCausalLM

    from lorakit.cli.main import main

    trained = qlora_adapter(tmp_path, variant)
    # The run's options beside its adapter say how the base was quantized.
    (tmp_path / "run" / "train_config.yaml").write_text("quantize: nf4\ndouble_quant: true\n")
    argv = ["export", "--model", str(tmp_path / "m"), "--adapter", str(tmp_path / "run" / "adapter")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 100, (2, 8))
    torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=1e-4, atol=1e-4)


def test_export_onto_the_original_weights_says_what_the_adapter_never_saw(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit.cli.main import main

    qlora_adapter(tmp_path)
    argv = ["export", "--model", str(tmp_path / "m"), "--adapter", str(tmp_path / "run" / "adapter")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--quantize", "nf4", "--base", "original"]) == 0
    assert "never saw" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    lorakit.load_adapter(dense, tmp_path / "run" / "adapter")
    lorakit.unload(dense, merge=True)
    for a, b in zip(exported.parameters(), dense.parameters()):
        torch.testing.assert_close(a, b)
    assert main([*argv, "--out", str(tmp_path / "out2"), "--base", "original"]) == 2
    assert "--base is for adapters trained on a quantized base" in capsys.readouterr().err


def test_dequantize_keeps_an_adapted_models_outputs():
    model = adapted()
    ids = torch.randint(0, 128, (2, 8))
    logits = model(ids).logits
    lorakit.dequantize(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer) is LoraLinear and type(layer.base_layer) is nn.Linear
    torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5)
    lorakit.merge(model)  # a dense weight now: exact
    torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_adapter_batch_on_a_quantized_model_matches_each_row_alone():
    model = quantized_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear"), "a")
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear", seed=3), "b")
    randomize_adapters(model, 0.05)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad(), lorakit.adapter_batch(model, ["a", "b"]):
        mixed = model(ids).logits
    for row, name in enumerate(["a", "b"]):
        lorakit.set_adapter(model, name)
        torch.testing.assert_close(mixed[row], model(ids[row : row + 1]).logits[0], rtol=1e-5, atol=1e-5)
