"""`lorakit export --format gguf | gguf-adapter` on a tiny Llama with a small byte-level BPE
tokenizer: the file read back with gguf's reader matches the merged model tensor by tensor (q and
k rows in llama.cpp's interleaved order), and loads back through transformers' GGUF loader (the
path lorakit's own .gguf models take) with the same logits."""

import numpy as np
import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.cli.main import main
from lorakit.models.gguf_export import permute_for_llama_cpp

from .test_data import _train_tokenizer
from .tiny import randomize_adapters, tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama with a BPE tokenizer and chat template, and an adapter saved as a run's."""
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = _train_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    model = tiny_llama(vocab=len(tokenizer))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS), "a")
    randomize_adapters(model, std=0.2)
    lorakit.save_adapter(model, root / "run" / "adapter", "a")
    return root, tokenizer


def merged(setup):
    root, _ = setup
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    lorakit.load_adapter(model, root / "run" / "adapter", name="a")
    lorakit.unload(model, merge=True)
    return model


def export(setup, out, *extra):
    root, _ = setup
    argv = ["export", "--model", str(root / "base"), "--adapter", str(root / "run" / "adapter"), "--out", str(out)]
    return main([*argv, *extra])


def read(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def as_stored(key, weight, config):
    """The merged model's tensor as the GGUF file holds it: q and k rows permuted to llama.cpp's order."""
    if key.endswith("q_proj.weight"):
        return permute_for_llama_cpp(weight, config.num_attention_heads)
    if key.endswith("k_proj.weight"):
        return permute_for_llama_cpp(weight, config.num_key_value_heads)
    return weight


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gguf_holds_the_merged_weights_and_llama_cpp_metadata(setup, tmp_path, capsys, dtype):
    import gguf

    assert export(setup, tmp_path / "out", "--format", "gguf", "--gguf-dtype", dtype) == 0
    assert f"model: {tmp_path / 'out' / 'model.gguf'}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.gguf"]
    fields, tensors = read(tmp_path / "out" / "model.gguf")
    model = merged(setup)
    config = model.config
    assert fields["general.architecture"] == "llama"
    expected = {
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": 32,
        "llama.block_count": 2,
        "llama.feed_forward_length": 64,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 8,
        "llama.vocab_size": config.vocab_size,
        "general.file_type": 1 if dtype == "f16" else 0,
        "general.quantization_version": 2,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
    }
    assert {key: fields[key] for key in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    _, tokenizer = setup
    vocab = tokenizer.get_vocab()
    assert len(fields["tokenizer.ggml.tokens"]) == config.vocab_size
    assert all(fields["tokenizer.ggml.tokens"][i] == token for token, i in vocab.items())
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert fields["tokenizer.ggml.token_type"][tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert len(fields["tokenizer.ggml.merges"]) > 100
    assert (fields["tokenizer.ggml.add_bos_token"], fields["tokenizer.ggml.add_eos_token"]) == (False, False)
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    state = model.state_dict()
    assert set(tensors) == {names.get_name(k, try_suffixes=(".weight",)) for k in state}
    for key, weight in state.items():
        stored = tensors[names.get_name(key, try_suffixes=(".weight",))]
        want = as_stored(key, weight, config).numpy()
        assert stored.data.dtype == (np.float16 if dtype == "f16" and weight.ndim == 2 else np.float32), key
        got = np.asarray(stored.data).reshape(want.shape)
        if dtype == "f32":
            np.testing.assert_array_equal(got, want, err_msg=key)
        else:
            np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=key)


def test_gguf_loads_back_through_transformers_and_lorakit_with_the_same_logits(setup, tmp_path, monkeypatch):
    from lorakit.models import load_model

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    assert export(setup, tmp_path / "out", "--format", "gguf", "--gguf-dtype", "f32") == 0
    loaded, tokenizer = load_model(str(tmp_path / "out" / "model.gguf"), dtype="float32", device="cpu")
    _, original = setup
    text = "What is the capital of France? Paris. 12345"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    ids = torch.tensor([original(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(setup)(ids).logits, rtol=1e-5, atol=1e-5)


def test_gguf_adapter_is_llama_cpps_lora_format(setup, tmp_path, capsys):
    import gguf

    assert export(setup, tmp_path / "out", "--format", "gguf-adapter") == 0
    assert f"adapter: {tmp_path / 'out' / 'adapter.gguf'}" in capsys.readouterr().out
    fields, tensors = read(tmp_path / "out" / "adapter.gguf")
    assert (fields["general.type"], fields["adapter.type"], fields["adapter.lora.alpha"]) == ("adapter", "lora", 0.0)
    assert fields["general.architecture"] == "llama"
    root, _ = setup
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    config = base.config
    base_state, merged_state = base.state_dict(), merged(setup).state_dict()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert len(tensors) == 2 * 2 * len(TARGETS)
    for key, weight in merged_state.items():
        name = names.get_name(key, try_suffixes=(".weight",))
        if name + ".lora_a" not in tensors:
            continue
        a = np.asarray(tensors[name + ".lora_a"].data).reshape(4, -1)
        b = np.asarray(tensors[name + ".lora_b"].data).reshape(-1, 4)
        # alpha 0: llama.cpp applies B A at scale 1, the adapter's own scale folded into B.
        base_weight = as_stored(key, base_state[key], config).numpy()
        np.testing.assert_allclose(base_weight + b @ a, as_stored(key, weight, config).numpy(), atol=1e-5)


def test_gguf_export_refuses_what_it_cannot_write(setup, tmp_path, capsys):
    assert export(setup, tmp_path / "x", "--gguf-dtype", "f16") == 2
    assert capsys.readouterr().err == "error: --gguf-dtype is for --format gguf\n"
    assert export(setup, tmp_path / "x", "--format", "gguf", "--dtype", "bfloat16") == 2
    assert "--dtype is for --format safetensors" in capsys.readouterr().err
    gpt2 = tiny_gpt2()
    gpt2.save_pretrained(tmp_path / "gpt2")
    _, tokenizer = setup
    tokenizer.save_pretrained(tmp_path / "gpt2")
    lorakit.add_adapter(gpt2, LoraConfig(r=2, target_modules=["c_attn"]), "g")
    lorakit.save_adapter(gpt2, tmp_path / "g", "g")
    argv = ["export", "--model", str(tmp_path / "gpt2"), "--adapter", str(tmp_path / "g"), "--format", "gguf"]
    assert main([*argv, "--out", str(tmp_path / "y")]) == 2
    assert "GGUF export supports the Llama architecture" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("variant", ["vera", "adalora", "dylora", "dora"])
def test_gguf_adapter_holds_every_low_rank_variants_factors_and_refuses_dora(tmp_path, variant):
    import gguf

    from lorakit.errors import ConfigError
    from lorakit.models.gguf_export import write_adapter_gguf

    model = tiny_llama()
    base = {key: weight.clone() for key, weight in model.state_dict().items()}
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=["k_proj", "down_proj"], variant=variant), "a")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    if variant == "dora":
        with pytest.raises(ConfigError, match="not a low-rank B·A"):
            write_adapter_gguf(model, "a", tmp_path / "a.gguf")
        assert not (tmp_path / "a.gguf").exists()
        return
    write_adapter_gguf(model, "a", tmp_path / "a.gguf")
    _, tensors = read(tmp_path / "a.gguf")
    lorakit.unload(model, merge=True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    checked = 0
    for key, weight in model.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight",))
        if name + ".lora_a" in tensors:
            a, b = (np.asarray(tensors[name + suffix].data) for suffix in (".lora_a", ".lora_b"))
            want = as_stored(key, weight, model.config).numpy()
            np.testing.assert_allclose(as_stored(key, base[key], model.config).numpy() + b @ a, want, atol=1e-5)
            checked += 1
    assert checked == 4


def test_an_interrupted_gguf_export_leaves_nothing_and_a_folder_with_files_is_refused(
    setup, tmp_path, capsys, monkeypatch
):
    import lorakit.models.gguf_export as gguf_export

    real = gguf_export.write_model_gguf

    def interrupted(model, tokenizer, path, *args, **kwargs):
        real(model, tokenizer, path, *args, **kwargs)
        raise KeyboardInterrupt  # the file written, not yet published

    monkeypatch.setattr(gguf_export, "write_model_gguf", interrupted)
    assert export(setup, tmp_path / "out", "--format", "gguf") == 130
    assert list(tmp_path.iterdir()) == []  # no folder, no hidden temporary one
    monkeypatch.undo()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.gguf").write_text("an earlier export")
    assert export(setup, tmp_path / "out", "--format", "gguf") == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "out" / "model.gguf").read_text() == "an earlier export"


def test_pre_tokenizers_get_llama_cpps_names():
    from lorakit.errors import ConfigError
    from lorakit.models.gguf_export import _pre_tokenizer_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert _pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert (
        _pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, byte_level]}}) == "smollm"
    )
    with pytest.raises(ConfigError, match="Metaspace"):
        _pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}})
    llama3 = [{"type": "Split", "pattern": {"Regex": "..."}}, {**byte_level, "use_regex": False}]
    with pytest.raises(ConfigError):
        _pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": llama3}})
