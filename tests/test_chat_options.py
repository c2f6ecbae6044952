"""Issue 18: `generate` and `chat` take --repetition-penalty, checked up front and passed on to
transformers' generate."""

from __future__ import annotations

import pytest

from lorakit.cli import commands
from lorakit.cli.main import main
from lorakit.errors import ConfigError
from lorakit.generate import check_generation_settings, generate_batch, stream_generate

from .test_generate_errors import _drain, _tokenizer
from .tiny import tiny_llama


def _recording_generate(model, seen: list):
    real = model.generate

    def generate(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    model.generate = generate
    return model


@pytest.mark.parametrize("penalty", [0.0, -1.0, float("nan")])
def test_a_repetition_penalty_must_be_positive(penalty):
    with pytest.raises(ConfigError, match="repetition_penalty must be positive .* got"):
        check_generation_settings(8, False, 0.7, 0.9, penalty)
    with pytest.raises(ConfigError, match="--repetition-penalty must be positive"):
        check_generation_settings(8, False, 0.7, 0.9, penalty, flags=True)
    check_generation_settings(8, False, 0.7, 0.9, 1.2)


def test_the_repetition_penalty_reaches_transformers_generate():
    seen: list = []
    model, tokenizer = _recording_generate(tiny_llama(), seen), _tokenizer()
    _drain(stream_generate(model, tokenizer, "hello world", max_new_tokens=2, repetition_penalty=1.3))
    generate_batch(model, tokenizer, ["hello", "world"], max_new_tokens=2, repetition_penalty=1.5)
    _drain(stream_generate(model, tokenizer, "hello world", max_new_tokens=2))  # the default: not passed
    assert [kwargs.get("repetition_penalty") for kwargs in seen] == [1.3, 1.5, None]
    with pytest.raises(ConfigError, match="repetition_penalty must be positive"):
        generate_batch(model, tokenizer, ["hello"], max_new_tokens=2, repetition_penalty=0)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_refuses_a_bad_repetition_penalty_before_loading(command, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(commands, "load_with_adapters", no_loading)
    argv = [command, *(["hello"] if command == "generate" else []), "--repetition-penalty", "0"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "error: --repetition-penalty must be positive (1: no penalty, above 1: repeat less), got 0.0\n"
    )
