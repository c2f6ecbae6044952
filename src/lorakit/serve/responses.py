"""From a submitted request's deltas to the HTTP answer: one JSON response, or server-sent events
in OpenAI's chunk format ending with ``data: [DONE]``; and the client's disconnect, watched all
the while, turned into ``RequestHandle.cancel()`` so that the engine drops the row.

The first delta is awaited before any status is sent, streaming or not: an adapter that fails
to load (the engine's first and only delta is an error) then answers 503 with an error body,
which a client can act on, instead of a 200 stream that breaks off.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from ..errors import AdapterLoadError, AdapterNameError, LorakitError, ServerBusyError
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    Usage,
    dump,
    error_body,
)
from .requests import Delta, RequestHandle


class ApiError(Exception):
    """An answer other than 200, sent as OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    @classmethod
    def from_lorakit(cls, exc: LorakitError) -> ApiError:
        """The engine's refusals: queue full 429, adapter not loadable 503, unknown adapter 404,
        anything else the client's to fix (prompt or max_tokens over a cap, a bad value) 400."""
        if isinstance(exc, ServerBusyError):
            return cls(429, str(exc), code="server_busy")
        if isinstance(exc, AdapterLoadError):
            return cls(503, str(exc), param="model", code="adapter_unavailable")
        if isinstance(exc, AdapterNameError):
            return cls(404, _message(exc), param="model", code="model_not_found")
        return cls(400, _message(exc), code="invalid_request")

    @classmethod
    def from_delta(cls, delta: Delta) -> ApiError:
        status = delta.error_kind or 500
        code = "adapter_unavailable" if status == 503 else "generation_error"
        return cls(status, delta.error or "generation failed", code=code)


def _message(exc: Exception) -> str:
    # KeyError subclasses (AdapterNameError) print their argument quoted; the message itself reads better.
    return exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)


async def _wait_for_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class WatchedHandle:
    """A request's handle while its client is watched: ``next()`` is the next delta, or None once
    the client has gone (the request is then cancelled). ``close()`` when done with it."""

    def __init__(self, handle: RequestHandle, receive: Callable[[], Awaitable[dict]]):
        self.handle = handle
        self.finished = False
        self._gone = asyncio.ensure_future(_wait_for_disconnect(receive))
        # The watcher cancels on its own, so that a request is dropped even where nobody is
        # awaiting its next delta (a stream response the server never got to start, say).
        self._gone.add_done_callback(self._on_disconnect)

    def _on_disconnect(self, watcher: asyncio.Future) -> None:
        if not watcher.cancelled() and not self.finished:
            self.handle.cancel()

    async def next(self) -> Delta | None:
        if self.finished:
            return None
        getter = asyncio.ensure_future(self.handle.__anext__())
        await asyncio.wait({getter, self._gone}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():  # a delta that came with the disconnect is still the client's
            delta = getter.result()
            self.finished = delta.finish_reason is not None
            return delta
        getter.cancel()
        self.handle.cancel()
        return None

    def close(self) -> None:
        self._gone.cancel()
        if not self.finished:
            self.handle.cancel()


class CompletionFormat:
    """/v1/completions: ``text_completion`` objects; a chunk carries text and finish_reason together."""

    prefix = "cmpl"

    def __init__(self, request_id: str, created: int, model: str):
        self.id, self.created, self.model = request_id, created, model

    def whole(self, text: str, finish_reason: str, usage: Usage) -> dict:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return dump(
            CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage)
        )

    def opening(self) -> list[dict]:
        return []

    def chunks(self, delta: Delta) -> list[dict]:
        if not delta.text and delta.finish_reason is None:
            return []
        choice = CompletionChoice(text=delta.text, finish_reason=delta.finish_reason)
        return [dump(CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice]))]

    def usage_chunk(self, usage: Usage) -> dict:
        return dump(CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[], usage=usage))


class ChatFormat(CompletionFormat):
    """/v1/chat/completions: as OpenAI streams it, a first chunk with the role, chunks with
    content, then one with an empty delta and the finish_reason."""

    prefix = "chatcmpl"

    def whole(self, text: str, finish_reason: str, usage: Usage) -> dict:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)
        return dump(
            ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage)
        )

    def opening(self) -> list[dict]:
        return [self._chunk(ChatDelta(role="assistant", content=""))]

    def chunks(self, delta: Delta) -> list[dict]:
        out = [self._chunk(ChatDelta(content=delta.text))] if delta.text else []
        if delta.finish_reason is not None:
            out.append(self._chunk(ChatDelta(), delta.finish_reason))
        return out

    def usage_chunk(self, usage: Usage) -> dict:
        return dump(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage))

    def _chunk(self, delta: ChatDelta, finish_reason: str | None = None) -> dict:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        return dump(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice]))


def usage_of(delta: Delta) -> Usage:
    """Token counts from the last delta (its counts are the request's totals so far)."""
    return Usage.of(delta.prompt_tokens, delta.completion_tokens)


async def first_delta(watched: WatchedHandle, on_first: Callable[[float], None], arrived: float) -> Delta | None:
    """The first delta (None: the client left first); an error delta becomes its ``ApiError``."""
    try:
        delta = await watched.next()
    except BaseException:  # the server shutting down: the engine must drop the row too
        watched.close()
        raise
    if delta is None:
        return None
    on_first(time.monotonic() - arrived)
    if delta.finish_reason == "error":
        watched.close()
        raise ApiError.from_delta(delta)
    return delta


async def whole_response(watched: WatchedHandle, first: Delta, fmt: CompletionFormat) -> dict | None:
    """The non-streamed answer (None when the client left before it was done)."""
    try:
        parts, delta = [first.text], first
        while delta.finish_reason is None:
            delta = await watched.next()
            if delta is None:
                return None
            parts.append(delta.text)
    finally:
        watched.close()
    if delta.finish_reason == "error":
        raise ApiError.from_delta(delta)
    return fmt.whole("".join(parts), delta.finish_reason, usage_of(delta))


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def event_stream(
    watched: WatchedHandle, first: Delta, fmt: CompletionFormat, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: the chunks, a usage chunk when asked, ``data: [DONE]``. An error
    after the stream began is sent as an error event (the status is already 200), as vLLM does."""
    try:
        for chunk in fmt.opening():
            yield _event(chunk)
        delta: Delta | None = first
        while delta is not None:
            if delta.finish_reason == "error":
                yield _event(ApiError.from_delta(delta).body())
                break
            for chunk in fmt.chunks(delta):
                yield _event(chunk)
            if delta.finish_reason is not None:
                if include_usage:
                    yield _event(fmt.usage_chunk(usage_of(delta)))
                break
            delta = await watched.next()
        if delta is None:
            return  # the client has gone: nobody to tell
        yield "data: [DONE]\n\n"
    finally:
        watched.close()
