"""End to end: `lorakit merge`, `inspect` and `export` as a user runs them, on the real embedded model."""

import json

import pytest
import torch

import lorakit

from .test_cli_e2e import lorakit as run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, embedded_model):
    """Two different adapters on the real model (q,v and all-linear), saved as a user's runs would be."""
    from lorakit.models import load_model

    out = tmp_path_factory.mktemp("adapters")
    model, _ = load_model("smollm2-135m")
    for name, targets, seed in (("a", ["q_proj", "v_proj"], 1), ("b", "all-linear", 2)):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets, seed=seed), name=name)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, p in model.named_parameters():
                if f".lora_B.{name}" in param_name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        lorakit.save_adapter(model, out / name, name=name)
    return out


def test_merge_inspect_export(two_adapters, tmp_path):
    a, b = two_adapters / "a", two_adapters / "b"
    done = run_cli(
        "merge",
        "--adapter",
        str(a),
        "--adapter",
        str(b),
        "--weights",
        "0.7",
        "-0.3",
        "--out",
        str(tmp_path / "mix"),
        "--json",
    )
    report = json.loads(done.stdout[done.stdout.index("{") :])
    assert report["max_error"] == 0.0  # linear stays exact

    done = run_cli("inspect", str(tmp_path / "mix"), "--plot", str(tmp_path / "spectra.png"), "--json")
    info = json.loads(done.stdout[done.stdout.index("{") :])
    assert len(info["modules"]) == 210 and (tmp_path / "spectra.png").stat().st_size > 1000

    run_cli("export", "--adapter", str(tmp_path / "mix"), "--out", str(tmp_path / "merged"), "--dtype", "float32")
    from transformers import AutoModelForCausalLM

    from lorakit.models import load_model

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32)
    model, _ = load_model("smollm2-135m")
    lorakit.load_adapter(model, a, name="a")
    lorakit.load_adapter(model, b, name="b")
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])
    with torch.no_grad():
        # 0.7·ΔW_a − 0.3·ΔW_b, computed here without the merge code: scale each adapter's B.
        for _, layer in lorakit.state.lora_layers(model):
            for name, weight in (("a", 0.7), ("b", -0.3)):
                if name in layer.lora_B:
                    layer.lora_B[name].mul_(weight)
        lorakit.set_adapter(model, ["a", "b"])
        want = model(ids).logits
        got = plain(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gguf_export_of_the_embedded_model_loads_back_and_answers_alike(two_adapters, tmp_path):
    """`export --format gguf` on the real SmolLM2 (Llama, tied head, byte-level BPE with chat
    template): transformers' GGUF loader gives back the merged model's logits and greedy answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.models import load_model

    a = two_adapters / "a"
    out = tmp_path / "gguf"
    run_cli("export", "--adapter", str(a), "--format", "gguf", "--gguf-dtype", "f32", "--out", str(out))
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    model, original = load_model("smollm2-135m", dtype="float32")
    lorakit.load_adapter(model, a, name="a")
    lorakit.unload(model, merge=True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = original.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    again = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert torch.equal(ids["input_ids"], again["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids["input_ids"]).logits, model(ids["input_ids"]).logits, rtol=1e-4, atol=1e-4
        )
    want = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(loaded.generate(**ids, max_new_tokens=8, do_sample=False), want)
