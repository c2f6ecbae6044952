"""Issue 18: `chat` has line editing and a --system prompt; `generate` and `chat` take
--repetition-penalty, checked up front and passed on to transformers' generate."""

from __future__ import annotations

import sys

import pytest

import lorakit.generate as generate_module
from lorakit.cli import commands
from lorakit.cli.main import main
from lorakit.errors import ConfigError
from lorakit.generate import check_generation_settings, generate_batch, stream_generate

from .test_generate_errors import _drain, _tokenizer
from .tiny import tiny_llama

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


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


def _chat(monkeypatch, argv, lines, template=TEMPLATE):
    """Run `lorakit chat` on the tiny model with ``lines`` typed; (exit status, [(prompt, settings)])."""
    tokenizer = _tokenizer()
    tokenizer.chat_template = template
    monkeypatch.setattr(commands, "load_with_adapters", lambda *a, **k: (tiny_llama(), tokenizer, []))
    typed = iter(lines)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    calls = []

    def fake_stream(model, tokenizer, prompt, **settings):
        calls.append((prompt, settings))
        yield "ok"

    monkeypatch.setattr(generate_module, "stream_generate", fake_stream)
    return main(["chat", *argv]), calls


def test_chat_system_prompt_opens_every_conversation(monkeypatch, capsys):
    rc, calls = _chat(
        monkeypatch,
        ["--system", "Answer in JSON.", "--repetition-penalty", "1.2"],
        ["hi", "more", "/reset", "again", ""],
    )
    assert rc == 0
    prompts = [prompt for prompt, _ in calls]
    assert prompts[0] == "<system>Answer in JSON.\n<user>hi\n<assistant>"
    assert prompts[1] == "<system>Answer in JSON.\n<user>hi\n<assistant>ok\n<user>more\n<assistant>"
    assert prompts[2] == "<system>Answer in JSON.\n<user>again\n<assistant>"  # /reset keeps the system message
    assert all(settings["repetition_penalty"] == 1.2 for _, settings in calls)


def test_chat_without_system_prompt_has_no_system_turn(monkeypatch):
    rc, calls = _chat(monkeypatch, [], ["hi", ""])
    assert rc == 0 and calls[0][0] == "<user>hi\n<assistant>"
    assert calls[0][1]["repetition_penalty"] == 1.0


def test_chat_system_prompt_needs_a_chat_template(monkeypatch, capsys):
    rc, calls = _chat(monkeypatch, ["--system", "Be brief."], ["hi", ""], template=None)
    assert rc == 2 and not calls
    assert capsys.readouterr().err.startswith("error: --system needs a tokenizer with a chat template")


def test_chat_turns_on_line_editing_where_readline_exists(monkeypatch, capsys):
    pytest.importorskip("readline")
    assert commands._line_editing() is True
    monkeypatch.setitem(sys.modules, "readline", None)  # as where the module is missing: import fails
    assert commands._line_editing() is False
    rc, _ = _chat(monkeypatch, [], [""])
    assert rc == 0 and "no line editing" in capsys.readouterr().out
