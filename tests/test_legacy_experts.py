"""Adapters trained on transformers 4's per-expert layers load onto transformers 5's expert stacks."""

import json

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.state import adapter_configs

E, H, I = 4, 32, 24  # experts, hidden size, expert intermediate size


def tiny_moe(kind: str):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = dict(vocab_size=64, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if kind == "mixtral":
        config = MixtralConfig(**common, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2)
    else:
        config = Qwen2MoeConfig(
            **common,
            intermediate_size=40,
            moe_intermediate_size=I,
            shared_expert_intermediate_size=40,
            num_experts=E,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
        )
    config._experts_implementation = "eager"  # float64 below; the grouped GEMM takes no float64
    torch.manual_seed(0)
    return (
        MixtralForCausalLM(config).double().eval() if kind == "mixtral" else Qwen2MoeForCausalLM(config).double().eval()
    )


# Per model: the transformers-4 name of the MoE block, its expert layers (name: (d_in, d_out)) and
# where each lands in transformers 5: (stack, row offset of its output in the stack) per layer name.
LAYOUTS = {
    "mixtral": (
        "block_sparse_moe",
        {"w1": (H, I), "w3": (H, I), "w2": (I, H)},
        {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", I), "w2": ("down_proj", 0)},
        "mlp",
    ),
    "qwen2_moe": (
        "mlp",
        {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)},
        {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", I), "down_proj": ("down_proj", 0)},
        "mlp",
    ),
}


def write_v4_adapter(directory, kind, ranks, alpha=4.0, rslora=False, extra_modules=()):
    """A PEFT file as transformers 4 models gave it: one (A, B) per expert layer, plus
    ``extra_modules`` (path -> (d_in, d_out)) adapted as they are."""
    block, layers, _, _ = LAYOUTS[kind]
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        for e in range(E):
            for name, (d_in, d_out) in layers.items():
                path = f"model.layers.{layer}.{block}.experts.{e}.{name}"
                r = ranks.get(name, 2)
                tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(r, d_in, generator=gen) * 0.3
                tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(d_out, r, generator=gen) * 0.3
        for name, (d_in, d_out) in extra_modules:
            path = f"model.layers.{layer}.{name}"
            tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(2, d_in, generator=gen) * 0.3
            tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(d_out, 2, generator=gen) * 0.3
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    targets = list(layers) + [name.rsplit(".", 1)[-1] for name, _ in extra_modules]
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": rslora,
        "rank_pattern": {k: v for k, v in ranks.items()},
        "task_type": "CAUSAL_LM",
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def merged_by_hand(kind, tensors, ranks, alpha, rslora, extra_modules=(), renamed=lambda name: name):
    """The transformers-5 model with each file update s·B·A added where transformers moves its layer."""
    model = tiny_moe(kind)
    block, layers, lands, new_block = LAYOUTS[kind]
    with torch.no_grad():
        for layer in range(2):
            decoder = model.model.layers[layer]
            experts = getattr(decoder, new_block).experts
            for name, (d_in, d_out) in layers.items():
                r = ranks.get(name, 2)
                s = alpha / (r**0.5 if rslora else r)
                stack, row = lands[name]
                for e in range(E):
                    key = f"base_model.model.model.layers.{layer}.{block}.experts.{e}.{name}"
                    update = s * tensors[key + ".lora_B.weight"].double() @ tensors[key + ".lora_A.weight"].double()
                    getattr(experts, stack)[e, row : row + d_out] += update
            for name, _ in extra_modules:
                key = f"base_model.model.model.layers.{layer}.{name}"
                update = (
                    (alpha / (2**0.5 if rslora else 2))
                    * tensors[key + ".lora_B.weight"].double()
                    @ tensors[key + ".lora_A.weight"].double()
                )
                decoder.get_submodule(renamed(name)).weight += update
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


CASES = {
    "mixtral": ("mixtral", {"w2": 3}, False, [("block_sparse_moe.gate", (H, E)), ("self_attn.q_proj", (H, H))]),
    "mixtral-rslora": ("mixtral", {}, True, []),
    "qwen2-moe-shared-expert": (
        "qwen2_moe",
        {"up_proj": 3},
        False,
        [("mlp.shared_expert.gate_proj", (H, 40)), ("self_attn.v_proj", (H, 2 * 8))],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_expert_files_land_on_the_stacks(case, tmp_path):
    """Each expert's update goes where transformers puts its weights (w1 and w3 concatenated into
    gate_up_proj, the router gate a bare weight now), checked against the updates added by hand,
    and the converted adapter saves as a file PEFT reads with the same outputs."""
    kind, ranks, rslora, extra = CASES[case]
    tensors = write_v4_adapter(tmp_path / "v4", kind, ranks, rslora=rslora, extra_modules=extra)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    expected = logits(
        merged_by_hand(
            kind, tensors, ranks, 4.0, rslora, extra, renamed=lambda n: n.replace("block_sparse_moe", "mlp")
        ),
        ids,
    )
    model = tiny_moe(kind)
    lorakit.load_adapter(model, tmp_path / "v4")
    assert not torch.allclose(logits(model, ids), logits(tiny_moe(kind), ids))
    # The file is fp32: folding s into B there rounds once (relative 6e-8).
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-6, atol=1e-6)
    assert adapter_configs(model)["default"].target_parameters  # the stacks are parameter targets now

    lorakit.save_adapter(model, tmp_path / "v5")
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_moe(kind), tmp_path / "v5").eval()
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-6, atol=1e-6)


def test_a_file_with_half_a_stack_is_refused_and_the_model_kept(tmp_path):
    tensors = write_v4_adapter(tmp_path / "v4", "mixtral", {})
    half = {k: v for k, v in tensors.items() if ".w3." not in k}  # w1 without w3: half of gate_up_proj
    save_file(half, str(tmp_path / "v4" / "adapter_model.safetensors"))
    model = tiny_moe("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match="only some of the 2 layers"):
        lorakit.load_adapter(model, tmp_path / "v4")
    assert lorakit.adapters(model) == [] and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_inspect_settles_the_ranks_of_converted_stacks(tmp_path):
    """A converted file holds gate_up_proj at rank 2 + 2 and down_proj at rank 3 (its rank
    pattern), nested under one module in an order the file does not record: inspect settles which
    is which from the expert count they must share, and reports each stack's update."""
    from lorakit.arithmetic import inspect_adapter
    from lorakit.layers.parameter import LoraParameter
    from lorakit.state import lora_layers

    write_v4_adapter(tmp_path / "v4", "mixtral", {"w2": 3})
    model = tiny_moe("mixtral")
    lorakit.load_adapter(model, tmp_path / "v4")
    lorakit.save_adapter(model, tmp_path / "v5")
    shown = {m.path: m for m in inspect_adapter(tmp_path / "v5").modules}
    for path, layer in lora_layers(model):
        if isinstance(layer, LoraParameter):
            m = shown[path]
            assert (m.rank, m.experts) == ({"gate_up_proj": 4, "down_proj": 3}[layer.parameter_name], E)
            assert m.norm == pytest.approx(float(layer.delta_weight("default").norm()), rel=1e-6)
