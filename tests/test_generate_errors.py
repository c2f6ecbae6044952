"""Generation settings are checked up front, and a failure in the streaming thread reaches the caller
(as a lorakit error) instead of leaving it waiting for tokens forever."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

import lorakit.generate as generate_module
from lorakit.cli.main import main
from lorakit.errors import ConfigError, GenerationError
from lorakit.generate import check_generation_settings, stream_generate

from .tiny import tiny_llama


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "hello": 2, "world": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def _save_tiny_model(directory: Path) -> Path:
    tiny_llama().save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    return directory


def _drain(iterator, timeout: float = 60.0) -> list:
    """``list(iterator)`` in a daemon thread: the pieces, or what it raised; fails if it hangs."""
    box: dict = {}

    def run():
        try:
            box["pieces"] = list(iterator)
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"streaming did not end within {timeout} s (it hangs)"
    if "error" in box:
        raise box["error"]
    return box["pieces"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(), _tokenizer()


def test_streaming_works(tiny):
    model, tokenizer = tiny
    pieces = _drain(stream_generate(model, tokenizer, "hello world", max_new_tokens=3))
    assert isinstance("".join(pieces), str)


@pytest.mark.parametrize(
    "settings, fragment",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a whole number of at least 1, got 0"),
        (dict(max_new_tokens=4, do_sample=True, temperature=-1.0), "temperature must not be negative, got -1.0"),
        (dict(max_new_tokens=4, do_sample=True, temperature=0.0), "leave out do_sample=True"),
        (dict(max_new_tokens=4, do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(max_new_tokens=4, top_p=1.5), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_settings_raise_instead_of_hanging(tiny, settings, fragment):
    model, tokenizer = tiny
    with pytest.raises(ConfigError, match=fragment):
        _drain(stream_generate(model, tokenizer, "hello world", **settings))


@pytest.mark.parametrize(
    "settings, fragment",
    [(dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=4, do_sample=True, temperature=-1.0), "temp")],
)
def test_a_setting_transformers_rejects_in_the_thread_is_raised_here(tiny, monkeypatch, settings, fragment):
    """Without lorakit's own check, transformers raises inside the streaming thread: that error
    must end the stream and reach the caller (it used to be printed there while the caller waited)."""
    monkeypatch.setattr(generate_module, "check_generation_settings", lambda *a, **k: None)
    model, tokenizer = tiny
    with pytest.raises(ConfigError, match=f"generation setting rejected: .*{fragment}"):
        _drain(stream_generate(model, tokenizer, "hello world", **settings))


def test_any_failure_in_the_thread_is_raised_here(tiny, monkeypatch):
    model, tokenizer = tiny

    def broken_generate(**kwargs):
        raise RuntimeError("CUDA out of memory\nTried to allocate 2 GiB")

    monkeypatch.setattr(model, "generate", broken_generate)
    with pytest.raises(GenerationError, match="generation failed: RuntimeError: CUDA out of memory Tried to"):
        _drain(stream_generate(model, tokenizer, "hello world", max_new_tokens=3))


def test_check_names_the_flags():
    check_generation_settings(256, False, 0.7, 0.9, flags=True)
    check_generation_settings(256, False, 0.0, 0.9, flags=True)  # greedy: temperature 0 is harmless
    with pytest.raises(ConfigError, match="--max-new-tokens must"):
        check_generation_settings(0, False, 0.7, 0.9, flags=True)
    with pytest.raises(ConfigError, match="--temperature 0 cannot be sampled with: .*leave out --sample"):
        check_generation_settings(8, True, 0.0, 0.9, flags=True)
    with pytest.raises(ConfigError, match="--temperature must not be negative"):
        check_generation_settings(8, False, float("nan"), 0.9, flags=True)
    with pytest.raises(ConfigError, match="--top-p must be in"):
        check_generation_settings(8, True, 0.7, -0.1, flags=True)


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be a whole number of at least 1, got 0"),
        (["--sample", "--temperature", "-1"], "--temperature must not be negative, got -1.0"),
        (["--temperature", "-1"], "--temperature must not be negative"),
        (["--top-p", "2"], r"--top-p must be in \(0, 1\]"),
    ],
)
def test_cli_refuses_bad_settings_before_loading(command, flags, fragment, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr("lorakit.cli.commands.load_with_adapters", no_loading)
    argv = [command, *(["hello"] if command == "generate" else []), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(fragment, err)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_reports_a_failure_in_the_thread_as_one_line(command, tmp_path, capsys, monkeypatch):
    """A setting that gets past lorakit's check but not transformers': one line, exit 2, no hang."""
    model_dir = _save_tiny_model(tmp_path / "model")
    monkeypatch.setattr(generate_module, "check_generation_settings", lambda *a, **k: None)
    monkeypatch.setattr("builtins.input", lambda prompt="": "hello")
    argv = [command, *(["hello"] if command == "generate" else []), "--model", str(model_dir)]
    argv += ["--max-new-tokens", "0"]
    box: dict = {}
    worker = threading.Thread(target=lambda: box.setdefault("rc", main(argv)), daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), f"lorakit {command} hangs"
    assert box["rc"] == 2
    err = capsys.readouterr().err
    assert err.startswith("error: generation setting rejected: ") and "max_new_tokens" in err
    assert err.count("\n") == 1
