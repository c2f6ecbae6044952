"""The HTTP server over the real engine and the embedded model (fp32), driven by the official
`openai` client over loopback: streamed text equals the whole answer, usage counts are the
tokens, seeded sampling repeats whatever shares the batch, adapters load and unload during
traffic, and a client that disconnects frees its row."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import lorakit
from lorakit.state import lora_layers
from tests.http_server import running_server

pytestmark = pytest.mark.e2e
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

QUESTION = [{"role": "user", "content": "Write a short poem about the sea."}]


def _save_adapters(root):
    from lorakit.models import load_model

    model, _ = load_model("smollm2-135m", device="cpu")
    for i, name in enumerate(["poet", "critic", "late"]):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                if name in layer.lora_B:
                    layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=gen) * 0.05)
        lorakit.save_adapter(model, root / name, name)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lorakit.models import load_model
    from lorakit.serve.adapter_pool import AdapterPool
    from lorakit.serve.app import build_app
    from lorakit.serve.engine import Engine, EngineLimits
    from lorakit.serve.metrics import ServeMetrics

    root = tmp_path_factory.mktemp("served")
    _save_adapters(root)
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    model = model.float().eval()
    metrics = ServeMetrics(base_name="smollm2-135m")
    pool = AdapterPool(model, max_loras=2, observer=metrics, base_dir=root)
    pool.register("poet", root / "poet")
    pool.register("critic", root / "critic")
    engine = Engine(
        model, tokenizer, pool, model_id="smollm2-135m", limits=EngineLimits(max_num_seqs=8), observer=metrics
    )
    engine.start()
    app = build_app(engine, api_key="", allow_runtime_adapters=True, adapter_dir=root, metrics=metrics)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        yield client, engine, url, root
    engine.stop()


def test_stream_equals_whole_answer_and_usage_counts_tokens(server):
    client, engine, _, _ = server
    for model in ("smollm2-135m", "poet"):
        kwargs = dict(model=model, messages=QUESTION, max_tokens=20, temperature=0)
        whole = client.chat.completions.create(**kwargs)
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert whole.usage.prompt_tokens == len(engine.chat_ids(QUESTION))
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
        reason = whole.choices[0].finish_reason
        assert reason == "stop" or whole.usage.completion_tokens == 20
    # adapters change the answer (their B is far from zero)
    base = client.completions.create(model="smollm2-135m", prompt="The sea is", max_tokens=12, temperature=0)
    poet = client.completions.create(model="poet", prompt="The sea is", max_tokens=12, temperature=0)
    assert base.choices[0].text != poet.choices[0].text


def test_seeded_sampling_repeats_whatever_shares_the_batch(server):
    client, *_ = server
    kwargs = dict(model="critic", prompt="Once upon a time", max_tokens=16, temperature=0.9, top_p=0.95, seed=42)
    alone = client.completions.create(**kwargs).choices[0].text
    others = []
    threads = [
        threading.Thread(
            target=lambda m=m: others.append(
                client.completions.create(model=m, prompt="Tell me a story", max_tokens=24, temperature=1.0)
            )
        )
        for m in ("poet", "smollm2-135m", "poet")
    ]
    for t in threads:
        t.start()
    crowded = client.completions.create(**kwargs).choices[0].text
    for t in threads:
        t.join()
    assert crowded == alone
    different = client.completions.create(**{**kwargs, "seed": 7}).choices[0].text
    assert different != alone


def test_adapter_loaded_and_unloaded_during_traffic(server):
    client, engine, url, root = server
    import httpx

    long_running = []
    thread = threading.Thread(
        target=lambda: long_running.append(
            client.completions.create(
                model="poet", prompt="Count: 1, 2, 3,", max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
            )
        )
    )
    thread.start()
    response = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(root / "late")})
    assert response.status_code == 200, response.text
    assert "late" in [m.id for m in client.models.list()]
    late = client.completions.create(model="late", prompt="The sea is", max_tokens=8, temperature=0)
    assert late.usage.completion_tokens > 0
    response = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "poet"})
    assert response.status_code == 200, response.text
    thread.join(timeout=300)
    assert long_running and long_running[0].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="poet", prompt="x", max_tokens=2)
    escape = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(root / "..")})
    assert escape.status_code == 400


def test_a_client_that_disconnects_frees_its_row(server):
    client, engine, _, _ = server
    stream = client.completions.create(
        model="critic",
        prompt="List numbers:",
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["running"] == 0


def test_metrics_count_the_traffic(server):
    import httpx

    client, _, url, _ = server
    client.completions.create(model="critic", prompt="Hello", max_tokens=2, temperature=0)
    text = httpx.get(f"{url}/metrics").text
    assert 'lorakit_requests_total{adapter="critic"' in text
    assert 'lorakit_adapter_slot_events_total{kind="miss"}' in text
