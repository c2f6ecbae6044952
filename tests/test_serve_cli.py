"""`lorakit serve` (cli/serve_command.py): flags, the errors reported before a model loads, the
wiring of model, pool, engine and app, and (e2e, once the engine is there) the real command
serving the embedded model over loopback."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import subprocess
import sys
import time
import types

import pytest

from lorakit.cli import serve_command
from lorakit.cli.main import main
from lorakit.errors import ConfigError

from .serve_double import EchoEngine, EchoPool, echo_tokenizer


def _adapter(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    return folder


def test_adapter_specs(tmp_path):
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "runs" / "b")
    assert serve_command.parse_adapter_specs([f"first={a}", str(b)]) == {"first": a, "b": b}
    with pytest.raises(ConfigError, match="twice"):
        serve_command.parse_adapter_specs([f"x={a}", f"x={b}"])
    with pytest.raises(ConfigError, match="adapter_config.json"):
        serve_command.parse_adapter_specs([f"x={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="NAME=DIR"):
        serve_command.parse_adapter_specs([f"={a}"])


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("0.0.0.0", False), ("::", False)],
)
def test_loopback(host, loopback):
    assert serve_command.is_loopback(host) is loopback


def _busy_port():
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    sock.listen()
    return sock


def test_errors_come_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import lorakit.models

    monkeypatch.setattr(lorakit.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.delenv("LORAKIT_API_KEY", raising=False)
    assert main(["serve", "--allow-runtime-adapters"]) == 2
    assert "--adapter-dir" in capsys.readouterr().err
    assert main(["serve", "--adapter", f"x={tmp_path}"]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    assert main(["serve", "--adapter-dir", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["serve", "--served-model-name", "x", "--adapter", f"x={_adapter(tmp_path / 'x')}"]) == 2
    assert "base model's id" in capsys.readouterr().err
    with _busy_port() as busy:
        port = str(busy.getsockname()[1])
        assert main(["serve", "--host", "0.0.0.0", "--port", port]) == 2
        err = capsys.readouterr().err
        assert "without an API key" in err and "cannot listen on 0.0.0.0" in err
        assert main(["serve", "--host", "0.0.0.0", "--port", port, "--api-key", "k"]) == 2
        assert "without an API key" not in capsys.readouterr().err


def test_missing_extra_names_the_install(monkeypatch, capsys):
    monkeypatch.setattr(serve_command, "_importable", lambda name: name != "uvicorn")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: lorakit serve needs uvicorn: pip install 'lorakit[serve]'"


@dataclasses.dataclass
class _SpecLimits:
    """EngineLimits as serve_spec.md gives it: a flag the CLI passes must be one of these fields."""

    max_num_seqs: int = 32
    max_queue: int = 256
    max_prompt_tokens: int = 4096
    max_tokens: int = 4096
    max_prefill_tokens: int = 8192
    kv_cache_gb: float | None = None
    adapter_load_timeout: float = 30.0


@pytest.mark.parametrize(
    "decode_flags, decode", [(["--cuda-graphs"], "graphs"), (["--enforce-eager"], "dynamic"), ([], "auto")]
)
def test_wiring_of_model_pool_engine_and_app(tmp_path, monkeypatch, capsys, decode_flags, decode):
    """cmd_serve with the engine modules replaced by test doubles of the spec'd signatures: which
    arguments reach the pool and the engine, and that the app it runs serves them."""
    from .http_server import running_server

    httpx = pytest.importorskip("httpx")
    tokenizer = echo_tokenizer()
    made = {}

    def pool_double(model, *, max_loras=8, max_cpu_loras=64, max_lora_rank=64, observer=None, base_dir=None):
        made["pool"] = dict(max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank)
        made["observer"] = observer
        return EchoPool(base_dir=base_dir)

    def engine_double(model, tok, pool, *, model_id, limits, observer=None, decode="auto"):
        made["limits"], made["decode"] = limits, decode
        engine = EchoEngine(tok, model_id=model_id, observer=observer)
        engine.pool = pool
        made["engine"] = engine
        return engine

    monkeypatch.setitem(sys.modules, "lorakit.serve.adapter_pool", types.SimpleNamespace(AdapterPool=pool_double))
    engine_module = types.SimpleNamespace(Engine=engine_double, EngineLimits=_SpecLimits)
    monkeypatch.setitem(sys.modules, "lorakit.serve.engine", engine_module)
    import lorakit.models

    monkeypatch.setattr(
        lorakit.models, "load_model", lambda *a, **k: (types.SimpleNamespace(eval=lambda: None), tokenizer)
    )

    def serve_briefly(engine, app, sock, verbose=False):
        # in place of the engine's run and uvicorn: the app on a test server, queried, then stopped
        sock.close()
        engine.start()
        headers = {"Authorization": "Bearer k"}
        with running_server(app) as url:
            made["cards"] = httpx.get(f"{url}/v1/models", headers=headers).json()["data"]
            body = {"lora_name": "fresh", "lora_path": "fresh"}
            made["load"] = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=headers).status_code
            body = {"model": "one", "prompt": "Hello there!"}
            made["answer"] = httpx.post(f"{url}/v1/completions", json=body, headers=headers).json()
        engine.stop()

    monkeypatch.setattr(serve_command, "_run", serve_briefly)
    root = tmp_path / "adapters"
    a = _adapter(root / "a")
    _adapter(root / "fresh")
    argv = ["serve", "--adapter-dir", str(root), "--adapter", f"one={a}", "--served-model-name", "base"]
    argv += ["--port", "0", "--max-loras", "3", "--max-num-seqs", "5", "--kv-cache-gb", "1.5", "--api-key", "k"]
    argv += ["--allow-runtime-adapters", *decode_flags]
    assert main(argv) == 0
    assert "serving base with 1 adapter(s) at http://127.0.0.1:" in capsys.readouterr().out
    assert made["pool"] == {"max_loras": 3, "max_cpu_loras": 64, "max_lora_rank": 64}
    assert made["limits"] == _SpecLimits(max_num_seqs=5, kv_cache_gb=1.5)
    assert made["decode"] == decode
    assert made["observer"] is not None and made["engine"].observer is made["observer"]
    assert [(c["id"], c["parent"]) for c in made["cards"]] == [("base", None), ("one", "base")]
    assert made["load"] == 200
    assert made["answer"]["choices"][0]["text"] == "Hello there!"
    assert not made["engine"]._thread.is_alive()  # stopped when the server returned


# ---- the real command, end to end ----------------------------------------------------------


def _engine_available() -> bool:
    return all(importlib.util.find_spec(f"lorakit.serve.{m}") is not None for m in ("engine", "adapter_pool"))


@pytest.mark.e2e
@pytest.mark.skipif(not _engine_available(), reason="lorakit.serve.engine is not in this build yet")
def test_lorakit_serve_end_to_end(tmp_path, embedded_model):
    openai = pytest.importorskip("openai")
    import torch

    import lorakit

    model, _ = embedded_model
    root = tmp_path / "adapters"
    for i, name in enumerate(["a", "b"]):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name=name)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if f"lora_B.{name}" in key:
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
        lorakit.save_adapter(model, root / name, name=name)
        lorakit.delete_adapter(model, name)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "lorakit", "serve", "--adapter-dir", str(root), "--port", str(port)]
    argv += ["--adapter", f"a={root / 'a'}", "--adapter", f"b={root / 'b'}", "--dtype", "float32", "--device", "cpu"]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        deadline = time.monotonic() + 300
        while True:
            try:
                ids = [m.id for m in client.models.list()]
                break
            except openai.APIConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not come up:\n{server.stdout.read()}") from None
                time.sleep(0.5)
        assert ids == ["smollm2-135m", "a", "b"]
        for name in ids:
            kwargs = dict(model=name, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=12)
            whole = client.chat.completions.create(temperature=0, **kwargs)
            streamed = client.chat.completions.create(temperature=0, stream=True, **kwargs)
            text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            assert text == whole.choices[0].message.content and whole.usage.completion_tokens > 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_cuda_graphs_and_enforce_eager_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--cuda-graphs", "--enforce-eager"])
    assert "not allowed with argument" in capsys.readouterr().err
