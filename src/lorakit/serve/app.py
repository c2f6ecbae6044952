"""The OpenAI-compatible HTTP server over an ``Engine``: vLLM's routes, so clients move both ways.

    GET  /health                  200 while the engine runs (the one route without a key)
    GET  /metrics                 Prometheus text
    GET  /v1/models               the base model, then every adapter (``parent`` = the base id)
    POST /v1/completions          ``prompt`` as the engine's ``completion_ids`` tokenizes it
    POST /v1/chat/completions     ``messages`` rendered by ``chat_ids``, exactly as training renders them
    POST /v1/load_lora_adapter    {lora_name, lora_path}: off unless ``allow_runtime_adapters``
    POST /v1/unload_lora_adapter  {lora_name}

A request's ``model`` picks the adapter: the base id (or none) runs the base, an adapter's name
runs that adapter. The engine thread owns the model; the app only submits requests, registers
adapters with the pool and reads the engine's stats, all of which may be called from any thread.
Every refusal is OpenAI's error body: 400 (a bad body: not FastAPI's 422), 401, 404, 413, 429, 503.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import AdapterNameError, LorakitError
from .guard import Guard
from .metrics import ResponseCounter, ServeMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    ModelCard,
    ModelList,
    UnloadAdapterRequest,
    error_body,
    new_id,
    now,
)
from .requests import GenerationRequest, SamplingParams
from .responses import (
    ApiError,
    ChatFormat,
    CompletionFormat,
    WatchedHandle,
    event_stream,
    first_delta,
    whole_response,
)

logger = logging.getLogger("lorakit.serve")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a 4,096-token prompt is ~20 KB of JSON; chats carry history
ROUTES = frozenset(
    {
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
    }
)


def build_app(
    engine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allow_runtime_adapters: bool = False,
    adapter_dir: str | Path | None = None,
    metrics: ServeMetrics | None = None,
) -> FastAPI:
    """The ASGI app over a started (or about to be started) ``engine``.

    ``api_key``: None reads ``LORAKIT_API_KEY`` (unset or empty: no key needed). ``adapter_dir``:
    runtime loads must name a path that resolves inside it (relative paths are taken from it).
    ``metrics``: the observer the engine and pool report to (``ServeMetrics``); without one the
    app keeps its own, which then shows only what the HTTP layer sees.
    """
    key = api_key if api_key is not None else os.environ.get("LORAKIT_API_KEY") or None
    metrics = metrics or ServeMetrics(base_name=engine.model_id)
    root = Path(adapter_dir).resolve() if adapter_dir is not None else None
    if allow_runtime_adapters and root is None:
        logger.warning("runtime adapter loading is on with no adapter directory: clients may name any path")
    started = now()
    loaded_at: dict[str, int] = {}  # adapter name -> when it was loaded at run time (for /v1/models)

    # No /docs or /openapi.json: the open surface is /health alone.
    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(LorakitError)
    async def _lorakit_error(request: Request, exc: LorakitError) -> JSONResponse:
        return await _api_error(request, ApiError.from_lorakit(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_body(exc), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed: %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal server error (see the server's log)"), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        # 503 once the engine thread has died (``stats()["alive"]`` False): a supervisor restarts us.
        return Response(status_code=200 if engine.stats().get("alive", True) else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(engine.stats()), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [ModelCard(id=engine.model_id, created=started, root=engine.model_id)]
        cards += [
            ModelCard(id=name, created=loaded_at.get(name, started), root=name, parent=engine.model_id)
            for name in engine.pool.names()
        ]
        return ModelList(data=cards).model_dump()

    def adapter_for(model: str | None) -> str | None:
        if model is None or model == engine.model_id:
            return None
        if model in engine.pool.names():
            return model
        raise ApiError(
            404,
            f"the model `{model}` does not exist: GET /v1/models lists the base model and its adapters",
            param="model",
            code="model_not_found",
        )

    def sampling(body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None) -> SamplingParams:
        # None: the engine gives what the model's context, the KV budget and the cap leave.
        return SamplingParams(
            max_tokens=max_tokens,
            seed=body.seed,
            stop=body.stop_list(),
            **body.sampling_values(),
        )

    async def answer(request: Request, body, fmt: CompletionFormat, adapter: str | None, prompt_ids: list[int], params):
        arrived = time.monotonic()
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_request")
        generation = GenerationRequest(fmt.id, prompt_ids, adapter, params)
        handle = engine.submit(generation, loop=asyncio.get_running_loop())
        watched = WatchedHandle(handle, request.receive)
        first = await first_delta(watched, metrics.first_token, arrived)
        if first is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        if body.stream:  # None (an explicit null) does not stream
            events = event_stream(watched, first, fmt, body.include_usage())
            headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # proxies must not hold chunks
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        whole = await whole_response(watched, first, fmt)
        return JSONResponse(whole) if whole is not None else Response(status_code=499)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        model = body.model or engine.model_id
        fmt = CompletionFormat(new_id(CompletionFormat.prefix), now(), model)
        adapter = adapter_for(body.model)  # an unknown model is refused before the prompt is tokenized
        prompt_ids = engine.completion_ids(body.prompt)
        return await answer(request, body, fmt, adapter, prompt_ids, sampling(body, body.max_tokens))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        model = body.model or engine.model_id
        fmt = ChatFormat(new_id(ChatFormat.prefix), now(), model)
        adapter = adapter_for(body.model)
        prompt_ids = engine.chat_ids([m.as_dict() for m in body.messages])
        return await answer(request, body, fmt, adapter, prompt_ids, sampling(body, body.requested_max_tokens()))

    def runtime_adapters_on() -> None:
        if not allow_runtime_adapters:
            # vLLM answers 404 here too: the route is not there unless the server was started with it.
            raise ApiError(
                404,
                "loading adapters at run time is off: start the server with --allow-runtime-adapters",
                code="runtime_adapters_off",
            )

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest) -> Response:
        runtime_adapters_on()
        if body.lora_name == engine.model_id:
            raise ApiError(400, "an adapter cannot take the base model's name", param="lora_name")
        if body.lora_name in engine.pool.names():
            raise ApiError(400, f"the adapter `{body.lora_name}` is already loaded", param="lora_name")
        path = Path(body.lora_path).expanduser()
        if root is not None:
            path = (root / path).resolve()  # an absolute lora_path replaces root here: checked next
            if not path.is_relative_to(root):
                raise ApiError(
                    400,
                    "lora_path must be inside the server's adapter directory",
                    param="lora_path",
                    code="path_refused",
                )
        try:
            engine.pool.register(body.lora_name, path)  # reads the config only; weights load on first use
        except AdapterNameError as exc:  # here: a name the pool does not accept
            raise ApiError(400, str(exc.args[0]), param="lora_name") from exc
        loaded_at[body.lora_name] = now()
        logger.info("adapter %s registered from %s", body.lora_name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest) -> Response:
        runtime_adapters_on()
        try:
            engine.pool.unregister(body.lora_name)  # rows already running with it finish first
        except AdapterNameError as exc:
            raise ApiError(404, f"no adapter named `{body.lora_name}` is loaded", param="lora_name") from exc
        loaded_at.pop(body.lora_name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # Plain ASGI middleware, outside routing: unknown paths need the key too, and the counter sees
    # the guard's 401s and 413s. The last added runs first.
    app.add_middleware(Guard, api_key=key, max_body_bytes=max_body_bytes)
    app.add_middleware(ResponseCounter, metrics=metrics, routes=ROUTES)
    return app


def _validation_body(exc: RequestValidationError) -> dict:
    """FastAPI's validation errors as one 400 error body naming the first bad field."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    if first.get("type") == "json_invalid":
        return error_body(
            400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}", code="invalid_json"
        )
    message = first.get("msg", "invalid request")
    message = message.removeprefix("Value error, ")
    return error_body(400, f"{param}: {message}" if param else message, param=param, code="invalid_request")
