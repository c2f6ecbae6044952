"""The HTTP server (serve/app.py) over loopback: the real uvicorn server on 127.0.0.1, driven by the
official ``openai`` client and by raw HTTP (httpx).

The engine behind it here is a TEST DOUBLE (tests/serve_double.py: it echoes the prompt's tokens
back through real ``RequestHandle``s), so these tests pin the HTTP layer: routes, the OpenAI wire
format, streaming, auth, limits, errors and cancellation. The engine's own outputs are tested
against the real engine (tests/test_serve_engine*.py).
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from lorakit.serve.app import build_app  # noqa: E402
from lorakit.serve.metrics import ServeMetrics  # noqa: E402

from .http_server import running_server  # noqa: E402
from .serve_double import EchoEngine, echo_tokenizer  # noqa: E402

KEY = "sk-test-0123456789"
BASE = "echo-base"
ADAPTERS = ["alpha", "beta", "team/gamma", "delta:v2"]
AUTH = {"Authorization": f"Bearer {KEY}"}


def _adapter_dir(root, name: str):
    folder = root / name.replace("/", "_").replace(":", "_")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return echo_tokenizer()


@pytest.fixture(scope="module")
def engine(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    metrics = ServeMetrics(base_name=BASE)
    engine = EchoEngine(tokenizer, model_id=BASE, observer=metrics)
    engine.metrics = metrics
    for name in ADAPTERS:
        engine.pool.register(name, _adapter_dir(root, name))
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def url(engine):
    with running_server(build_app(engine, api_key=KEY, max_body_bytes=64 * 1024, metrics=engine.metrics)) as url:
        yield url


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=20)


@pytest.fixture
def http(url):
    with httpx.Client(base_url=url, headers=AUTH, timeout=20) as http:
        yield http


@pytest.fixture(autouse=True)
def _engine_running(request):
    """Each test starts with the double running and nothing failing, whatever the last test left."""
    yield
    if "engine" in request.fixturenames:
        engine = request.getfixturevalue("engine")
        engine.paused.clear()
        engine.failing.clear()


def _echo(tokenizer, text: str, n: int | None = None) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.decode(ids[:n] if n is not None else ids, skip_special_tokens=True)


def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ---- models, completions, chat --------------------------------------------------------------


def test_models_lists_the_base_once_then_each_adapter_with_its_parent(client, http):
    ids = [m.id for m in client.models.list()]
    assert ids == [BASE, *ADAPTERS]
    data = http.get("/v1/models").json()
    assert data["object"] == "list"
    base, *adapters = data["data"]
    assert base["parent"] is None and base["object"] == "model" and base["owned_by"] == "lorakit"
    assert all(card["parent"] == BASE for card in adapters)


def test_completion_echoes_with_usage_and_finish_reason(client, engine, tokenizer):
    prompt = "The quick brown fox jumps over the lazy dog."
    result = client.completions.create(model=BASE, prompt=prompt, max_tokens=64)
    n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert result.id.startswith("cmpl-") and result.object == "text_completion" and result.model == BASE
    assert result.choices[0].text == prompt
    assert result.choices[0].finish_reason == "stop"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (n_prompt, n_prompt)
    assert result.usage.total_tokens == 2 * n_prompt
    assert engine.submitted[-1].adapter is None

    short = client.completions.create(model="alpha", prompt=prompt, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.choices[0].text == _echo(tokenizer, prompt, 3)
    assert engine.submitted[-1].adapter == "alpha"


@pytest.mark.parametrize(
    "prompt", [[17, 42, 99, 7], ["Hello there!"], [[17, 42, 99, 7]]], ids=["ids", "one-string", "one-id-list"]
)
def test_completion_prompt_forms(client, engine, tokenizer, prompt):
    result = client.completions.create(model=BASE, prompt=prompt, max_tokens=16)
    ids = engine.submitted[-1].prompt_ids
    expected = prompt[0] if isinstance(prompt[0], list) else prompt if isinstance(prompt[0], int) else None
    if expected is not None:
        assert ids == expected
    else:
        assert ids == tokenizer.encode(prompt[0], add_special_tokens=False)
    assert result.choices[0].text == tokenizer.decode(ids, skip_special_tokens=True)


def test_chat_renders_messages_and_picks_the_adapter(client, engine, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    result = client.chat.completions.create(model="team/gamma", messages=messages, max_completion_tokens=64)
    request = engine.submitted[-1]
    assert request.adapter == "team/gamma"
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert request.prompt_ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == tokenizer.decode(request.prompt_ids, skip_special_tokens=True)
    assert result.usage.prompt_tokens == len(request.prompt_ids)


def test_chat_content_parts_and_developer_role(client, engine, tokenizer):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there!"}]},
    ]
    client.chat.completions.create(model=BASE, messages=messages, max_tokens=4)
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    rendered = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    assert engine.submitted[-1].prompt_ids == tokenizer.encode(rendered, add_special_tokens=False)


def test_sampling_fields_reach_the_engine(client, engine):
    client.chat.completions.create(
        model="beta",
        messages=[{"role": "user", "content": "Hi"}],
        temperature=0.7,
        top_p=0.9,
        seed=1234,
        stop=["\n\n", "END"],
        max_tokens=5,
        max_completion_tokens=7,  # the newer name wins
        extra_body={"some_unknown_field": [1, 2], "user": "x"},  # unknown fields are ignored
    )
    sampling = engine.submitted[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.seed, sampling.max_tokens) == (0.7, 0.9, 1234, 7)
    assert sampling.stop == ["\n\n", "END"]
    client.completions.create(model=BASE, prompt="Hi", stop="x")
    assert engine.submitted[-1].sampling.stop == ["x"]
    assert engine.submitted[-1].sampling.max_tokens == 16  # OpenAI's completions default


# ---- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [None, "Paris"])
def test_streamed_completion_concatenates_to_the_whole_one(client, stop):
    prompt = "What is the capital of France? Paris. Hello there!"
    whole = client.completions.create(model="alpha", prompt=prompt, max_tokens=64, stop=stop)
    chunks = list(
        client.completions.create(
            model="alpha", prompt=prompt, max_tokens=64, stop=stop, stream=True, stream_options={"include_usage": True}
        )
    )
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len(text_chunks) > 3  # it did stream
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    if stop:
        assert whole.choices[0].text == prompt[: prompt.index(stop)]


def test_streamed_chat_role_first_then_content_then_finish(client):
    messages = [{"role": "user", "content": "Zwölf Boxkämpfer jagen Viktor 東京"}]
    whole = client.chat.completions.create(model="delta:v2", messages=messages, max_tokens=64)
    chunks = list(client.chat.completions.create(model="delta:v2", messages=messages, max_tokens=64, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked
    assert all(c.object == "chat.completion.chunk" and c.id.startswith("chatcmpl-") for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content and "東京" in text


def test_raw_stream_is_sse_ending_with_done(http):
    body = {"model": BASE, "prompt": "Hello there!", "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] > 0
    assert all("usage" not in json.loads(line[6:]) for line in lines[:-2])


# ---- auth and limits -------------------------------------------------------------------------


def test_api_key_is_needed_everywhere_but_health(url):
    with httpx.Client(base_url=url, timeout=10) as anonymous:
        assert anonymous.get("/health").status_code == 200
        for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"), ("GET", "/x")]:
            response = anonymous.request(method, path, json={})
            assert response.status_code == 401, path
            assert _error(response)["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
        wrong = anonymous.get("/v1/models", headers={"Authorization": f"Bearer {KEY}x"})
        assert wrong.status_code == 401
        assert anonymous.get("/v1/models", headers={"Authorization": KEY}).status_code == 401  # no scheme
        assert anonymous.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_health_follows_the_engine(engine, url, monkeypatch):
    assert httpx.get(f"{url}/health").status_code == 200
    monkeypatch.setattr(engine, "stats", lambda: {"running": 0, "waiting": 0, "alive": False})
    assert httpx.get(f"{url}/health").status_code == 503


def test_key_from_the_environment(engine, monkeypatch):
    monkeypatch.setenv("LORAKIT_API_KEY", "from-env")
    with running_server(build_app(engine)) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    monkeypatch.delenv("LORAKIT_API_KEY")
    with running_server(build_app(engine)) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 200  # no key configured: open


def test_body_over_the_bound_is_413(http):
    big = {"model": BASE, "prompt": "x" * (70 * 1024)}
    response = http.post("/v1/completions", json=big)
    assert response.status_code == 413 and _error(response)["code"] == "request_too_large"

    def chunks():  # no content-length: counted while read
        for _ in range(70):
            yield b"x" * 1024

    response = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": BASE}, "prompt"),
        ({"model": BASE, "prompt": "hi", "n": 2}, "n"),
        ({"model": BASE, "prompt": "hi", "logprobs": 1}, None),
        ({"model": BASE, "prompt": "hi", "temperature": 5}, "temperature"),
        ({"model": BASE, "prompt": "hi", "top_p": 0}, "top_p"),
        ({"model": BASE, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"model": BASE, "prompt": ["a", "b"]}, "prompt"),
        ({"model": BASE, "prompt": "hi", "stop": [""]}, "stop"),
        ({"model": BASE, "prompt": "hi", "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"model": BASE, "prompt": "hi", "seed": 2**64}, "seed"),
        ({"model": BASE, "prompt": ""}, "prompt"),
        ({"model": BASE, "prompt": "hi", "max_tokens": 10_000}, None),  # over the engine's cap
        ({"model": BASE, "prompt": [10**6]}, None),  # a token id outside the vocabulary
    ],
)
def test_bad_completion_bodies_are_400(http, body, param):
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param


@pytest.mark.parametrize(
    "body",
    [
        {"model": BASE, "messages": []},
        {"model": BASE, "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "logprobs": True},
        {"model": BASE, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    ],
)
def test_bad_chat_bodies_are_400(http, body):
    assert http.post("/v1/chat/completions", json=body).status_code == 400


def test_bad_json_is_400_not_422(http, client):
    response = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and _error(response)["code"] == "invalid_json"
    assert http.post("/v1/completions", json=[1, 2]).status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt="hi", n=2)


def test_unknown_model_is_404(client, http):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    response = http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 404
    assert _error(response)["code"] == "model_not_found" and _error(response)["param"] == "model"
    assert http.get("/v1/nothing-here").status_code == 404


def test_full_queue_is_429_and_the_queued_requests_still_finish(engine, url, client):
    engine.paused.set()
    body = {"model": BASE, "prompt": "Hello there!", "max_tokens": 4}
    with concurrent.futures.ThreadPoolExecutor(engine.limits.max_queue) as pool:
        queued = [
            pool.submit(httpx.post, f"{url}/v1/completions", json=body, headers=AUTH, timeout=20)
            for _ in range(engine.limits.max_queue)
        ]
        _wait_for(lambda: engine.stats()["waiting"] == engine.limits.max_queue)
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(**body)
        assert refused.value.status_code == 429
        engine.paused.clear()
        assert [f.result().status_code for f in queued] == [200] * engine.limits.max_queue


def test_adapter_load_failure_is_503_and_the_rest_keep_serving(engine, client, http):
    engine.failing.add("beta")
    with pytest.raises(openai.InternalServerError) as failed:
        client.completions.create(model="beta", prompt="hi")
    assert failed.value.status_code == 503
    body = {"model": "beta", "messages": [{"role": "user", "content": "x"}], "stream": True}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 503 and _error(response)["code"] == "adapter_unavailable"
    assert client.completions.create(model="alpha", prompt="hi").choices[0].text == "hi"


# ---- cancellation ----------------------------------------------------------------------------


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_while_waiting_cancels_the_request(engine, url, stream):
    engine.paused.set()
    before = len(engine.handles)
    body = {"model": BASE, "prompt": "Hello there!", "stream": stream}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up: its connection closes
        httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=0.5)
    _wait_for(lambda: len(engine.handles) > before)
    _wait_for(engine.handles[before].cancelled.is_set, timeout=5)


def test_disconnect_mid_stream_cancels_the_row(tokenizer, tmp_path):
    slow = EchoEngine(tokenizer, model_id=BASE, step_seconds=0.05)
    slow.start()
    try:
        with running_server(build_app(slow)) as url:
            body = {"model": BASE, "prompt": "Hello there!", "max_tokens": 64, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        break  # the first chunk: then hang up
            handle = slow.handles[-1]
            _wait_for(handle.cancelled.is_set, timeout=5)
            time.sleep(0.2)
            assert slow.stats()["running"] == 0  # the row left the batch long before its 64 tokens
    finally:
        slow.stop()


# ---- runtime adapters ------------------------------------------------------------------------


def test_runtime_adapter_routes_are_off_by_default(http):
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/tmp"})
    assert response.status_code == 404 and _error(response)["code"] == "runtime_adapters_off"
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"}).status_code == 404
    assert "alpha" in [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_load_and_unload_adapters_at_run_time(tokenizer, tmp_path):
    root = tmp_path / "adapters"
    _adapter_dir(root, "fresh")
    outside = _adapter_dir(tmp_path, "outside")
    engine = EchoEngine(tokenizer, model_id=BASE)
    engine.pool = type(engine.pool)(base_dir=root)
    engine.start()
    try:
        app = build_app(engine, api_key=KEY, allow_runtime_adapters=True, adapter_dir=root)
        with running_server(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=10) as http:
            load = "/v1/load_lora_adapter"
            response = http.post(load, json={"lora_name": "fresh", "lora_path": "fresh"})
            assert response.status_code == 200, response.text
            cards = http.get("/v1/models").json()["data"]
            assert [(c["id"], c["parent"]) for c in cards] == [(BASE, None), ("fresh", BASE)]
            answer = http.post("/v1/completions", json={"model": "fresh", "prompt": "hi"})
            assert answer.json()["choices"][0]["text"] == "hi" and engine.submitted[-1].adapter == "fresh"

            for path in ["../outside", str(outside), "fresh/../../outside"]:
                refused = http.post(load, json={"lora_name": "escape", "lora_path": path})
                assert refused.status_code == 400 and _error(refused)["code"] == "path_refused", path
            assert http.post(load, json={"lora_name": "fresh", "lora_path": "fresh"}).status_code == 400  # twice
            assert http.post(load, json={"lora_name": BASE, "lora_path": "fresh"}).status_code == 400
            assert http.post(load, json={"lora_name": "bad name!", "lora_path": "fresh"}).status_code == 400
            assert http.post(load, json={"lora_name": "x", "lora_path": "missing"}).status_code == 400
            assert http.post(load, json={"lora_name": "x"}).status_code == 400

            assert http.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
            assert http.post("/v1/completions", json={"model": "fresh", "prompt": "hi"}).status_code == 404
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 404
    finally:
        engine.stop()


# ---- metrics ---------------------------------------------------------------------------------


def test_metrics_parse_and_count(client, http):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model="alpha", prompt="Hello there!", max_tokens=4)
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    for name in [
        "lorakit_requests",
        "lorakit_prompt_tokens",
        "lorakit_generation_tokens",
        "lorakit_request_seconds",
        "lorakit_time_to_first_token_seconds",
        "lorakit_waiting_requests",
        "lorakit_running_requests",
        "lorakit_generation_tokens_per_second",
        "lorakit_adapter_slot_events",
        "lorakit_adapter_load_seconds",
        "lorakit_http_responses",
    ]:
        assert name in families, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("lorakit_requests_total", (("adapter", "alpha"), ("finish_reason", "length")))] >= 1
    assert samples[("lorakit_generation_tokens_total", (("adapter", "alpha"),))] >= 4
    ok = ("lorakit_http_responses_total", (("route", "/v1/completions"), ("status", "200")))
    assert samples[ok] >= 1


# ---- the load bench ----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_load_bench_loses_nothing(url, stream, monkeypatch):
    """bench/serve_load.py's measurement against the server (here over the double): every request
    answered, spread over the base and every adapter, the token counts added up."""
    import asyncio
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "serve_load", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    report = asyncio.run(
        bench.run_load(f"{url}/v1", api_key=KEY, requests=20, concurrency=4, max_tokens=6, stream=stream, max_words=40)
    )
    assert report["statuses"] == {"200": 20}, report["errors"]
    assert (report["sent"], report["answered"], report["lost"], report["server_errors"]) == (20, 20, 0, 0)
    assert report["generated_tokens"] == 20 * 6  # ignore_eos: each answer is max_tokens long
    assert report["per_model"] == {name: 4 for name in [BASE, *ADAPTERS]}
    assert not bench.failed(report) and report["latency_p99_s"] >= report["latency_p50_s"] > 0
    if stream:
        assert report["first_token_p50_s"] is not None


def test_explicit_nulls_mean_the_defaults(http, engine):
    """Some clients send every field, unset ones as null: OpenAI reads them as the defaults."""
    nulls = {key: None for key in ["temperature", "top_p", "n", "stream", "stop", "seed", "presence_penalty"]}
    response = http.post("/v1/completions", json={"model": BASE, "prompt": "Hello there!", "max_tokens": None, **nulls})
    assert response.status_code == 200, response.text
    sampling = engine.submitted[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.stop) == (1.0, 1.0, [])
    assert sampling.max_tokens == engine.limits.max_tokens  # no cap asked: the server's
    assert http.post("/v1/completions", json={"model": BASE, "prompt": "x", "stop": ["a"] * 17}).status_code == 400


def test_unload_during_traffic_lets_running_requests_finish(tokenizer, tmp_path):
    root = tmp_path / "adapters"
    _adapter_dir(root, "busy")
    slow = EchoEngine(tokenizer, model_id=BASE, step_seconds=0.02)
    slow.pool = type(slow.pool)(base_dir=root)
    slow.start()
    try:
        app = build_app(slow, allow_runtime_adapters=True, adapter_dir=root)
        with running_server(app) as url, httpx.Client(base_url=url, timeout=10) as http:
            assert (
                http.post("/v1/load_lora_adapter", json={"lora_name": "busy", "lora_path": "busy"}).status_code == 200
            )
            body = {"model": "busy", "prompt": "Hello there!", "max_tokens": 20, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data: {"))
                assert http.post("/v1/unload_lora_adapter", json={"lora_name": "busy"}).status_code == 200
                assert http.post("/v1/completions", json={"model": "busy", "prompt": "x"}).status_code == 404
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    finally:
        slow.stop()
