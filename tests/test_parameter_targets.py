"""LoRA on parameters (``target_parameters``): mixture-of-experts stacks and other bare weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterStateError, ConfigError, TargetError
from lorakit.layers.parameter import LoraParameter
from lorakit.state import lora_layers

from .tiny import randomize_adapters

EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def tiny_mixtral(dtype=torch.float32):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    if dtype == torch.float64:
        config._experts_implementation = "eager"  # the default grouped GEMM takes no float64
    torch.manual_seed(0)
    return MixtralForCausalLM(config).to(dtype).eval()


class Experts(nn.Module):
    """Three stacked expert weights, every token through every expert (weights 1/E); stored
    (E, d_out, d_in), or (E, d_in, d_out) with ``is_transposed`` like gpt-oss's experts."""

    def __init__(self, experts=3, dim=8, hidden=12, transposed=False):
        super().__init__()
        self.is_transposed = transposed

        def stack(d_out, d_in):
            return nn.Parameter(torch.randn((experts, d_in, d_out) if transposed else (experts, d_out, d_in)) * 0.3)

        self.up, self.gate, self.down = stack(hidden, dim), stack(hidden, dim), stack(dim, hidden)

    def _times(self, x, weight):
        return x @ weight if self.is_transposed else F.linear(x, weight)

    def forward(self, x):
        out = 0
        for e in range(self.up.shape[0]):
            h = F.silu(self._times(x, self.gate[e])) * self._times(x, self.up[e])
            out = out + self._times(h, self.down[e]) / self.up.shape[0]
        return out


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(8, 8) * 0.3)  # a 2-D weight that is no layer

    def forward(self, x):
        return x @ self.mix.T


class Block(nn.Module):
    def __init__(self, transposed=False):
        super().__init__()
        torch.manual_seed(0)
        self.pre = Mixer()
        self.experts = Experts(transposed=transposed)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.experts(self.pre(x)))


def expected_weight(layer: LoraParameter, name: str) -> torch.Tensor:
    """W0 + s B_e A_e written out per expert from PEFT's layout: A rows [e r, (e+1) r), B columns
    e, E + e, 2E + e, ..., in float64."""
    A, B, s = layer.lora_A[name].double(), layer.lora_B[name].double(), layer.scaling[name]
    experts, r = layer.num_experts, A.shape[0] // layer.num_experts
    W = layer.base_weight.double().clone()
    if W.dim() == 2:
        return W + s * B @ A
    for e in range(experts):
        update = s * B[:, [k * experts + e for k in range(r)]] @ A[e * r : (e + 1) * r]  # (d_out, d_in)
        W[e] += update.T if layer.transposed else update
    return W


def logits_with_weights(model, ids, weights):
    """The model's output with each (module, parameter name) replaced by the given tensor."""
    saved = {}
    with torch.no_grad():
        for (module, param), value in weights.items():
            saved[(module, param)] = getattr(module, param).clone()
            getattr(module, param).copy_(value)
    try:
        with lorakit.disable_adapters(model), torch.no_grad():
            out = model(ids)
    finally:
        with torch.no_grad():
            for (module, param), value in saved.items():
                getattr(module, param).copy_(value)
    return getattr(out, "logits", out)


def wrapped_weights(model, name="default"):
    return {
        (layer.owner, layer.parameter_name): expected_weight(layer, name)
        for _, layer in lora_layers(model)
        if isinstance(layer, LoraParameter)
    }


@pytest.mark.parametrize("transposed", [False, True])
def test_each_expert_gets_its_own_update(transposed):
    model = Block(transposed).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    lorakit.add_adapter(model, LoraConfig(r=2, alpha=6, target_parameters=["mix", "experts.up", "experts.down"]))
    randomize_adapters(model)
    assert {p for p, l in lora_layers(model)} == {"pre", "experts", "experts.base_layer"}
    torch.testing.assert_close(model(x), logits_with_weights(model, x, wrapped_weights(model)), rtol=1e-12, atol=1e-12)


def test_mixtral_experts_and_attention_together(ids):
    model = tiny_mixtral(torch.float64)
    ids = ids % 64
    base = model(ids).logits
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS))
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)  # B = 0: no change at init
    randomize_adapters(model, std=0.3)
    expected = logits_with_weights(
        model,
        ids,
        wrapped_weights(model)
        | {
            (layer.base_layer, "weight"): layer.base_weight.double() + layer.delta_weight("default")
            for _, layer in lora_layers(model)
            if not isinstance(layer, LoraParameter)
        },
    )
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-10, atol=1e-10)


def test_gradients_reach_only_the_factors_and_match_the_formula():
    model = Block().double()
    x = torch.randn(6, 8, dtype=torch.float64)
    lorakit.add_adapter(model, LoraConfig(r=2, target_parameters=["experts.up", "experts.down"]))
    randomize_adapters(model)
    model(x).square().sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "experts.lora_A.default",
        "experts.lora_B.default",
        "experts.base_layer.lora_A.default",
        "experts.base_layer.lora_B.default",
    }
    # Reference: the same function of A and B written out per expert, differentiated by autograd.
    layers = [l for _, l in lora_layers(model)]
    leaves = [
        (l.lora_A["default"].detach().clone().requires_grad_(), l.lora_B["default"].detach().clone().requires_grad_())
        for l in layers
    ]
    experts = model.experts.base_layer.base_layer
    originals = {l.parameter_name: getattr(experts, l.parameter_name).detach().clone() for l in layers}

    def adapted(layer, A, B):
        E, r = layer.num_experts, A.shape[0] // layer.num_experts
        rows = [
            originals[layer.parameter_name][e]
            + layer.scaling["default"] * B[:, [k * E + e for k in range(r)]] @ A[e * r : (e + 1) * r]
            for e in range(E)
        ]
        return torch.stack(rows)

    weights = {l.parameter_name: adapted(l, A, B) for l, (A, B) in zip(layers, leaves)}
    out = torch.func.functional_call(experts, weights, (model.pre(x),))
    model.head(out).square().sum().backward()
    for layer, (A, B) in zip(layers, leaves):
        torch.testing.assert_close(layer.lora_A["default"].grad, A.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.lora_B["default"].grad, B.grad, rtol=1e-10, atol=1e-12)


def test_merge_unmerge_unload_and_delete():
    model = Block().double()
    x = torch.randn(6, 8, dtype=torch.float64)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.add_adapter(model, LoraConfig(r=2, target_parameters=["mix", "experts.up", "experts.down"]))
    randomize_adapters(model)
    adapted = model(x)
    lorakit.merge(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-12, atol=1e-12)
    lorakit.unmerge(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-12, atol=1e-12)
    lorakit.delete_adapter(model, "default")
    assert list(model.state_dict()) == list(original) and type(model.experts) is Experts
    for key, value in original.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-14)
    lorakit.add_adapter(model, LoraConfig(r=2, target_parameters=["experts.up", "experts.down"]))
    randomize_adapters(model)
    adapted = model(x)
    plain = lorakit.unload(model)
    assert type(plain.experts) is Experts and not any("lora" in k for k in plain.state_dict())
    torch.testing.assert_close(plain(x), adapted, rtol=1e-12, atol=1e-12)


def test_two_adapters_add_and_switch():
    model = Block().double()
    x = torch.randn(6, 8, dtype=torch.float64)
    config = LoraConfig(r=2, target_parameters=["experts.up"])
    lorakit.add_adapter(model, config, "a")
    lorakit.add_adapter(model, config.replace(r=3), "b")
    randomize_adapters(model)
    layer = model.experts
    both = expected_weight(layer, "a") + expected_weight(layer, "b") - layer.base_weight.double()
    lorakit.set_adapter(model, ["a", "b"])
    torch.testing.assert_close(
        model(x), logits_with_weights(model, x, {(layer.owner, "up"): both}), rtol=1e-12, atol=1e-12
    )
    lorakit.set_adapter(model, "b")
    torch.testing.assert_close(
        model(x),
        logits_with_weights(model, x, {(layer.owner, "up"): expected_weight(layer, "b")}),
        rtol=1e-12,
        atol=1e-12,
    )
    with pytest.raises(TargetError, match="same parameters"):
        lorakit.add_adapter(model, LoraConfig(r=2, target_parameters=["experts.up", "experts.down"]), "c")
    assert lorakit.adapters(model) == ["a", "b"]


def test_save_and_load_round_trip(tmp_path):
    model = Block()
    x = torch.randn(6, 8)
    lorakit.add_adapter(
        model,
        LoraConfig(
            r=2,
            target_modules=["head"],
            target_parameters=["experts.up", "experts.down"],
            rank_pattern={"experts.down": 3},
        ),
    )
    randomize_adapters(model)
    expected = model(x)
    lorakit.save_adapter(model, tmp_path)
    fresh = Block()
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), expected, rtol=1e-6, atol=1e-6)
    assert fresh.experts.lora_A["default"].shape == (9, 12)  # down: rank 3 × 3 experts, d_in 12


def test_refusals_leave_the_model_alone():
    with pytest.raises(ConfigError, match="dropout"):
        LoraConfig(r=2, target_modules=["head"], target_parameters=["experts.up"], dropout=0.1)
    with pytest.raises(ConfigError, match="use_dora"):
        LoraConfig(r=2, target_parameters=["experts.up"], use_dora=True)
    with pytest.raises(ConfigError, match="target_parameters must be a list"):
        LoraConfig(r=2, target_parameters="experts.up")
    model = Block()
    before = [type(m) for m in model.modules()]
    with pytest.raises(TargetError, match=r"no parameter matched .*experts\.up"):
        lorakit.add_adapter(model, LoraConfig(r=2, target_parameters=["experts.upp"]))
    with pytest.raises(TargetError, match=r"no parameter matched 'experts\.upp' \(did you mean 'experts\.up'"):
        lorakit.add_adapter(model, LoraConfig(r=2, target_parameters=["experts.gate", "experts.upp"]))
    with pytest.raises(TargetError, match="adapt it one way"):
        lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["head"], target_parameters=["head.weight"]))
    assert [type(m) for m in model.modules()] == before and lorakit.adapters(model) == []
    lorakit.add_adapter(model, LoraConfig(r=2, target_parameters=["experts.up"]), "a")
    lorakit.add_adapter(model, LoraConfig(r=2, target_parameters=["experts.up"]), "b")
    with pytest.raises(TargetError, match="target_parameters"):
        lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["experts"]), "c")
    with pytest.raises(AdapterStateError, match="cannot mix"):
        with lorakit.adapter_batch(model, ["a", "b"]):
            model(torch.randn(2, 8))
    with pytest.raises(ConfigError, match="no nested ranks"):
        lorakit.truncate(model, 1, "a")


def test_training_moves_the_experts_loss(ids):
    from .tiny import train_steps

    model = tiny_mixtral()
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_parameters=EXPERT_PARAMS))
    losses = train_steps(model, ids % 64, steps=8)
    assert losses[-1] < losses[0] - 0.1


PEFT_CASES = {
    "mixtral": (
        tiny_mixtral,
        dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS),
        lambda: torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3)),
    ),
    "three-stacks-transposed": (
        lambda: Block(transposed=True),
        dict(r=2, lora_alpha=6, target_parameters=["up", "gate", "down", "pre.mix"], rank_pattern={"experts.down": 3}),
        lambda: torch.randn(6, 8, generator=torch.Generator().manual_seed(3)),
    ),
}


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(inputs)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_files_move_between_lorakit_and_peft(case, tmp_path):
    """The nesting PEFT writes (first registered parameter innermost, under base_layer) and its
    (E·r, d_in) / (d_out, r·E) factor layout, both ways."""
    peft = pytest.importorskip("peft")
    make, kwargs, inputs = PEFT_CASES[case]
    x = inputs()
    model = make()
    ours = {("alpha" if k == "lora_alpha" else k): v for k, v in kwargs.items()}
    lorakit.add_adapter(model, LoraConfig(**ours))
    randomize_adapters(model, std=0.3)
    expected = _outputs(model, x)
    lorakit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(_outputs(theirs, x), expected, rtol=1e-5, atol=1e-5)

    peft_model = peft.get_peft_model(make(), peft.LoraConfig(**kwargs)).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    expected = _outputs(peft_model, x)
    peft_model.save_pretrained(tmp_path / "peft")
    model = make()
    lorakit.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(_outputs(model, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.e2e
def test_the_cli_trains_inspects_and_exports_expert_adapters(tmp_path, embedded_model):
    """`lorakit train --target-parameters` on a mixture-of-experts model saved to disk, as a user
    with their own Mixtral-style checkpoint would run it; then inspect and export."""
    import json

    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    from lorakit.data import write_demo_dataset

    from .test_cli_e2e import lorakit as run_cli

    _, tokenizer = embedded_model
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = write_demo_dataset(tmp_path / "data", n_train=16, n_test=2, seed=1)
    run_cli(
        "train",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(data["train"]),
        "--output-dir",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--r",
        "4",
        "--target-modules",
        "none",
        "--target-parameters",
        "experts.gate_up_proj,experts.down_proj",
        "--max-new-tokens",
        "4",
    )
    adapter = tmp_path / "run" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["target_parameters"] == EXPERT_PARAMS and saved["target_modules"] is None
    shown = run_cli("inspect", str(adapter)).stdout
    assert "4x96x32" in shown and "4x32x48" in shown  # (experts, d_out, d_in) of gate_up and down
    run_cli("export", "--model", str(tmp_path / "model"), "--adapter", str(adapter), "--out", str(tmp_path / "merged"))
    assert (
        run_cli(
            "generate", "--model", str(tmp_path / "model"), "--adapter", str(adapter), "--max-new-tokens", "4", "Hello"
        ).returncode
        == 0
    )
    evaluated = json.loads(
        run_cli(
            "eval",
            "--model",
            str(tmp_path / "model"),
            "--adapter",
            str(adapter),
            "--data",
            str(data["test"]),
            "--json",
            "--no-generate",
        ).stdout
    )
    assert evaluated["loss"] > 0
    from lorakit.cli.commands import load_with_adapters  # what eval/generate/chat load: merged, not rebuilt per token

    loaded, _, names = load_with_adapters(str(tmp_path / "model"), [str(adapter)], "cpu", "float32")
    assert lorakit.state.merged_adapters(loaded) == names

    ids = torch.randint(0, len(tokenizer), (1, 12))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    lorakit.load_adapter(model, adapter)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
        with lorakit.disable_adapters(model):
            assert not torch.allclose(model(ids).logits, merged(ids).logits, atol=1e-4)


def test_compiles_as_one_graph():
    """functional_call inside the wrapper traces: one full graph, eager's values and gradients."""
    model = Block()
    x = torch.randn(6, 8)
    lorakit.add_adapter(
        model, LoraConfig(r=2, target_modules=["head"], target_parameters=["experts.up", "experts.down"])
    )
    randomize_adapters(model, std=0.3)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for forward in (model, compiled):
        loss = forward(x).square().sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_hot_swap_into_an_expert_slot_needs_its_rank():
    model = Block()
    x = torch.randn(6, 8)
    config = LoraConfig(r=2, target_parameters=["experts.up"])
    lorakit.add_adapter(model, config, "slot")
    lorakit.add_adapter(model, config.replace(alpha=5), "b")
    lorakit.add_adapter(model, config.replace(r=1), "small")
    randomize_adapters(model, std=0.3)
    lorakit.set_adapter(model, "b")
    expected = model(x)
    lorakit.hotswap_adapter(model, "b", "slot")
    lorakit.set_adapter(model, "slot")
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(AdapterStateError, match="slot's rank"):
        lorakit.hotswap_adapter(model, "small", "slot")


def test_all_linear_on_a_mixture_of_experts_model_says_the_experts_stay_frozen(caplog):
    model = tiny_mixtral()
    with caplog.at_level("WARNING", logger="lorakit"):
        lorakit.add_adapter(model, LoraConfig(r=2, target_modules="all-linear"))
    assert "--target-parameters experts.down_proj,experts.gate_up_proj" in caplog.text
    caplog.clear()
    lorakit.delete_adapter(model, "default")
    with caplog.at_level("WARNING", logger="lorakit"):
        lorakit.add_adapter(model, LoraConfig(r=2, target_modules="all-linear", target_parameters=EXPERT_PARAMS))
    assert "stay frozen" not in caplog.text


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_rebuilds_the_adapted_experts_with_the_same_gradients(checkpointing, monkeypatch, ids):
    """The stack W0 + s B A is not kept from forward to backward (rebuilt_weights.py), and the
    gradients equal those of keeping it, with transformers' gradient checkpointing too."""
    import contextlib
    import gc
    import weakref

    import lorakit.layers.parameter as parameter

    model = tiny_mixtral()  # the default grouped-GEMM experts
    ids = ids % 64
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS))
    randomize_adapters(model, std=0.3)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    built = []
    original = parameter.LoraParameter.weight_with

    def recorded(self, names):
        weight = original(self, names)
        if torch.is_grad_enabled():
            built.append(weakref.ref(weight))
        return weight

    monkeypatch.setattr(parameter.LoraParameter, "weight_with", recorded)
    loss = model(ids, labels=ids).loss
    gc.collect()
    assert built and all(ref() is None for ref in built)  # none of the forward's stacks is alive
    loss.backward()
    rebuilt = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    monkeypatch.setattr(parameter, "rebuilt_in_backward", lambda recipes: contextlib.nullcontext())
    kept = _grads(model, ids)
    assert rebuilt.keys() == kept.keys()
    for name, grad in kept.items():
        torch.testing.assert_close(rebuilt[name], grad, rtol=1e-6, atol=1e-7)


def test_hooks_around_the_call_still_see_every_other_saved_tensor(monkeypatch, ids):
    """torch applies only the innermost saved-tensor hooks: the rebuilt-stack hooks must hand every
    tensor that is not an adapted stack to the ones around them (activation checkpointing,
    offloading), or those would silently keep what they were meant to drop."""
    import contextlib

    import lorakit.layers.parameter as parameter

    model = tiny_mixtral()
    ids = ids % 64
    lorakit.add_adapter(model, LoraConfig(r=2, target_parameters=EXPERT_PARAMS))
    randomize_adapters(model, std=0.3)
    stacks = []  # held, so that no later tensor reuses a stack's memory and is mistaken for it
    original = parameter.LoraParameter.weight_with

    def recorded(self, names):
        weight = original(self, names)
        stacks.append(weight)
        return weight

    monkeypatch.setattr(parameter.LoraParameter, "weight_with", recorded)

    def outer_counts():
        seen = {"stack views": 0, "other": 0}

        def pack(tensor):
            in_stack = any(tensor.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for s in stacks)
            seen["stack views" if in_stack else "other"] += 1
            return tensor

        stacks.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(ids, labels=ids).loss.backward()
        return seen

    rebuilt = outer_counts()
    monkeypatch.setattr(parameter, "rebuilt_in_backward", lambda recipes: contextlib.nullcontext())
    kept = outer_counts()
    assert kept["stack views"] > 0 and rebuilt["stack views"] == 0
    assert rebuilt["other"] == kept["other"]


def test_peft_all_linear_on_a_mixture_of_experts_model_loads(tmp_path, ids):
    """PEFT reads "all-linear" on a transformers-5 MoE model as the transformers-4 layers: the
    router's weight and the expert stacks (gate_up_proj at rank 2r) become parameter targets in its
    file. lorakit loads that file to the same outputs."""
    peft = pytest.importorskip("peft")
    ids = ids % 64
    theirs = peft.get_peft_model(tiny_mixtral(), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        expected = theirs(ids).logits
    theirs.save_pretrained(tmp_path)
    model = tiny_mixtral()
    lorakit.load_adapter(model, tmp_path)
    assert "gate.weight" in lorakit.state.adapter_configs(model)["default"].target_parameters
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
