"""Injecting adapters: which modules, what trains, initialisations, and refusals that change nothing."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, TargetError
from lorakit.layers import LoraEmbedding, ModulesToSave
from lorakit.state import lora_layers

from .tiny import (
    adapted_llama,
    model_loss_and_grads,
    randomize_adapters,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    train_steps,
)


def adapted_paths(model):
    return [name for name, _ in lora_layers(model)]


def test_model_keeps_its_class_and_outputs_at_init(ids):
    model = tiny_llama()
    before = model(ids).logits
    same = lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    assert same is model and type(model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_target_forms():
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(target_modules=["q_proj", "self_attn.v_proj"]))
    assert adapted_paths(model) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(target_modules=r".*layers\.1\.mlp\.(up|down)_proj"))
    assert adapted_paths(model) == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_all_linear_skips_the_output_head_and_honours_filters():
    model = tiny_llama()
    lorakit.add_adapter(
        model, LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"], layers_to_transform=[1])
    )
    paths = adapted_paths(model)
    assert "lm_head" not in paths and len(paths) == 6
    assert all(p.startswith("model.layers.1.") and not p.endswith("o_proj") for p in paths)


def test_gpt2_all_linear_uses_conv1d():
    model = tiny_gpt2()
    lorakit.add_adapter(model, LoraConfig(target_modules="all-linear"))
    layers = dict(lora_layers(model))
    assert set(p.rsplit(".", 1)[-1] for p in layers) == {"c_attn", "c_proj", "c_fc"}
    assert all(layer.fan_in_fan_out for layer in layers.values())


def test_llama_7b_count_on_meta_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    lorakit.add_adapter(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainable, total = lorakit.trainable_parameters(model)
    assert trainable == 4_194_304 == 32 * 2 * 8 * (4096 + 4096)
    assert total == 6_738_415_616 + trainable


def test_count_matches_formula_per_layer():
    model = tiny_llama(hidden=32)
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    expected = sum(4 * (layer.in_dim + layer.out_dim) for _, layer in lora_layers(model))
    assert lorakit.trainable_parameters(model)[0] == expected
    assert f"trainable params: {expected:,}" in lorakit.summary(model)


def test_only_adapters_train_and_base_stays_bit_for_bit(ids):
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear", dropout=0.1))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    train_steps(model, ids, 3)
    assert any(p.abs().sum() > 0 for _, l in lora_layers(model) for p in l.lora_B.values())
    lorakit.unload(model, merge=False)
    after = model.state_dict()
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base)


def test_bias_options():
    model = tiny_bert_classifier()
    lorakit.add_adapter(model, LoraConfig(target_modules=["query", "value"], bias="lora_only"))
    biases = sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))
    assert biases and all(n.endswith(("query.base_layer.bias", "value.base_layer.bias")) for n in biases)
    model = tiny_bert_classifier()
    lorakit.add_adapter(model, LoraConfig(target_modules=["query"], bias="all"))
    n_bias = sum(1 for n, _ in model.named_parameters() if n.endswith("bias"))
    assert sum(1 for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")) == n_bias


def test_modules_to_save_trains_a_copy(ids):
    model = tiny_bert_classifier()
    head_before = model.classifier.weight.clone()
    lorakit.add_adapter(model, LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
    assert isinstance(model.classifier, ModulesToSave)
    copy = model.classifier.modules_to_save["default"]
    assert copy.weight.requires_grad and not model.classifier.original_module.weight.requires_grad
    with torch.no_grad():
        copy.weight.add_(1.0)
    out = model(ids).logits
    with lorakit.disable_adapters(model):
        base_out = model(ids).logits
    assert not torch.allclose(out, base_out)
    assert torch.equal(model.classifier.original_module.weight, head_before)


def test_embedding_target():
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    assert isinstance(model.model.embed_tokens, LoraEmbedding)
    assert isinstance(model.get_input_embeddings(), LoraEmbedding)


def test_seed_gives_the_same_adapter():
    first, second = tiny_llama(), tiny_llama()
    torch.manual_seed(1)
    lorakit.add_adapter(first, LoraConfig(target_modules="all-linear", seed=7))
    torch.manual_seed(2)
    lorakit.add_adapter(second, LoraConfig(target_modules="all-linear", seed=7))
    for (_, a), (_, b) in zip(lora_layers(first), lora_layers(second)):
        assert torch.equal(a.lora_A["default"], b.lora_A["default"])


def test_default_and_gaussian_inits_start_at_zero_update():
    for init in ("default", "gaussian"):
        model = tiny_llama()
        lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], init=init))
        for _, layer in lora_layers(model):
            assert layer.lora_A["default"].abs().sum() > 0
            assert torch.count_nonzero(layer.lora_B["default"]) == 0
            assert torch.count_nonzero(layer.delta_weight("default")) == 0


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_decomposition_inits_keep_outputs_and_save_against_original_base(init, ids, tmp_path):
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(ids).logits
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"], init=init))
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-5)
    layer = model.model.layers[0].self_attn.q_proj
    W0 = original["model.layers.0.self_attn.q_proj.weight"].double()
    if init == "pissa":  # (pissa_niter's top part: test_randomized_svd_finds_the_top_singular_triplets)
        U, S, Vh = torch.linalg.svd(W0)
        top = (U[:, :4] * S[:4]) @ Vh[:4]
        torch.testing.assert_close(layer.delta_weight("default").double(), top, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.double() + layer.delta_weight("default").double(), W0, rtol=1e-4, atol=1e-5)
    # Train a little, then the saved file must reproduce the trained model on the ORIGINAL base.
    with torch.no_grad():
        for _, l in lora_layers(model):
            l.lora_B["default"].add_(0.05)
    trained = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids).logits, trained, rtol=1e-4, atol=1e-5)
    lorakit.unload(model, merge=False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=1e-5, atol=1e-6)


def test_randomized_svd_finds_the_top_singular_triplets():
    """pissa_niter_<N>'s randomized SVD against the exact one (float64), on a spectrum that decays
    past rank r as trained weights' do; the same seed gives the same factors."""
    from lorakit.initialization import top_singular_triplets

    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(64, 48, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen, dtype=torch.float64))
    S = 0.6 ** torch.arange(48, dtype=torch.float64)
    W = (U * S) @ V.T
    exact = top_singular_triplets(W, 4, None)
    fast = top_singular_triplets(W, 4, 2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(fast[1], S[:4], rtol=1e-10, atol=0)
    top = (exact[0] * exact[1]) @ exact[2]
    torch.testing.assert_close((fast[0] * fast[1]) @ fast[2], top, rtol=0, atol=1e-10)
    again = top_singular_triplets(W, 4, 2, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(fast, again))


def test_two_adapters_on_one_model():
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]), name="a")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), name="b")
    assert lorakit.adapters(model) == ["a", "b"]
    q = model.model.layers[0].self_attn.q_proj
    assert q.adapter_names == ["a", "b"] and q.active_adapters == ["b"]
    assert model.model.layers[0].self_attn.v_proj.active_adapters == ["b"]


# --- refusals that leave the model untouched ------------------------------------------------


def snapshot(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()
    }


def assert_untouched(model, snap):
    modules, state = snapshot(model)
    assert modules == snap[0]
    assert state.keys() == snap[1].keys() and all(torch.equal(state[k], snap[1][k]) for k in state)


def test_no_match_suggests_close_names():
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(TargetError) as err:
        lorakit.add_adapter(model, LoraConfig(target_modules=["qproj"]))
    message = str(err.value)
    assert "no module matched" in message
    assert "did you mean 'q_proj'" in message and "down_proj" in message
    assert_untouched(model, snap)
    assert all(p.requires_grad for p in model.parameters())


def test_every_listed_name_must_match_a_module():
    """A typo beside a valid name is refused (PEFT only refuses a list where nothing matches), in
    one line with a hint, and the model is left as it was; modules_to_save likewise."""
    model = tiny_llama()
    snap = snapshot(model)
    for config, fragment in (
        (LoraConfig(target_modules=["qproj", "v_proj"]), "'qproj' (did you mean 'q_proj'"),
        (
            LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokns"]),
            "did you mean 'embed_tokens'",
        ),
    ):
        with pytest.raises(TargetError) as err:
            lorakit.add_adapter(model, config)
        message = str(err.value)
        assert "no module matched" in message and fragment in message and "\n" not in message
        assert_untouched(model, snap)
        assert lorakit.adapters(model) == []


def test_listed_names_that_filters_remove_are_not_typos(caplog):
    """An entry whose modules layers_to_transform or exclude_modules then drop names something;
    an exclude entry that names nothing excludes nothing: a warning with a hint, not an error."""
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    assert adapted_paths(model) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    model = tiny_llama()
    with caplog.at_level("WARNING", logger="lorakit.targets"):
        lorakit.add_adapter(model, LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj", "oproj"]))
    assert adapted_paths(model) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert "'oproj' matches no module" in caplog.text and "did you mean 'o_proj'" in caplog.text


def test_a_load_does_not_require_every_listed_target(tmp_path):
    """PEFT files list target kinds generously (for several model families); the weights decide."""
    import json

    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "c_attn"]}))
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path)
    assert adapted_paths(fresh) == adapted_paths(model)


def test_unsupported_layer_named_explicitly():
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(TargetError, match="LlamaAttention, which LoRA cannot adapt.*q_proj"):
        lorakit.add_adapter(model, LoraConfig(target_modules=["self_attn"]))
    assert_untouched(model, snap)


def test_duplicate_name_refused():
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(target_modules=["q_proj"]))
    snap = snapshot(model)
    with pytest.raises(lorakit.AdapterNameError, match="already exists"):
        lorakit.add_adapter(model, LoraConfig(target_modules=["v_proj"]))
    assert_untouched(model, snap)


def test_failure_midway_leaves_no_half_injected_model():
    model = tiny_llama(hidden=32)
    snap = snapshot(model)
    # rank 40 fits q_proj (32x32) for default init but not PiSSA: the last layers fail in planning.
    with pytest.raises(TargetError, match="needs r <="):
        lorakit.add_adapter(model, LoraConfig(r=40, target_modules=["q_proj"], init="pissa"))
    assert_untouched(model, snap)
    assert lorakit.adapters(model) == []


def test_root_module_cannot_be_replaced():
    with pytest.raises(TargetError):
        lorakit.add_adapter(nn.Linear(3, 3), LoraConfig(target_modules=".*"))


def test_new_layers_follow_the_models_mode(ids):
    model = tiny_llama()  # in eval mode
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear", dropout=0.5, modules_to_save=["lm_head"]))
    assert not any(m.training for m in model.modules())
    randomize_adapters(model)
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)  # no dropout in eval
    model.train()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], dropout=0.5), name="second")
    assert all(m.training for m in model.modules())


def test_torch_compile_full_graph_matches_eager(ids):
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear", dropout=0.1))
    randomize_adapters(model, 0.1)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # tracing only: no graph breaks
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_training_step_compiles_to_one_graph(ids, use_dora):
    """Forward and backward of a training step under torch.compile(fullgraph=True), fused path
    on: one graph (DoRA's cached base norms are bypassed while compiling, without a graph break),
    and the eager loss and gradients."""
    model = adapted_llama(use_dora, dtype=torch.float32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    compiled_loss, compiled_grads = model_loss_and_grads(model, ids, True, forward=compiled)
    eager_loss, eager_grads = model_loss_and_grads(model, ids, True)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "use_dora, hint", [(False, True), (True, True), (True, False)], ids=["lora", "dora", "dora-without-hint"]
)
def test_batches_on_both_sides_of_the_merge_choice_share_one_dynamic_graph(use_dora, hint, monkeypatch):
    """The fused path's merge-or-factor choice reads the traced batch's token count without a
    guard. After the first shape's graph and one dynamic graph (traced at 80 tokens: merged), a
    batch of 40 tokens (factored in eager: the break-even is 64 for LoRA, 48 for DoRA at
    d_in = 32) compiles nothing new and still gives eager's loss and gradients. Without torch's
    ``optimization_hint`` (before 2.13) the dynamic graph is factored, likewise without a guard.
    Both graphs hold the fused functions (not the reference path, which has no choice to make)."""
    from lorakit.kernels import dispatch

    if not hint:
        monkeypatch.setattr(dispatch, "optimization_hint", None)
    torch._dynamo.reset()  # dynamo remembers which sizes varied per code object, across models
    model = adapted_llama(use_dora, dtype=torch.float32)
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module.code)
        return graph_module.forward

    compiled = torch.compile(model, backend=record, fullgraph=True)
    for length in (16, 40, 20):
        ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
        compiled_loss, compiled_grads = model_loss_and_grads(model, ids, True, forward=compiled)
    assert len(graphs) == 2 and all("autograd_function_apply" in code for code in graphs)
    eager_loss, eager_grads = model_loss_and_grads(model, ids, True)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
