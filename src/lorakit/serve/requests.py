"""What a request asks of the engine and what comes back: the one interface between the HTTP
server (``app.py``) and the engine thread (``engine.py``).

A request is submitted from any thread and answered by a ``RequestHandle``, which receives one
``Delta`` per engine step that produced text for it, the last one with a ``finish_reason``.
Handles work from plain threads (``next_delta``, ``collect``) and from asyncio (``async for``): the engine
pushes through ``loop.call_soon_threadsafe`` when the handle was made on an event loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class SamplingParams:
    """How one request samples. temperature 0 is greedy; ``seed`` makes a sampled request
    repeatable whatever else is in the batch (each row has its own generator)."""

    max_tokens: int | None = 16  # None: as many as the model's context (and the server's cap) allow
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # strings that end the text (not included in it)
    stop_token_ids: list[int] = field(default_factory=list)  # besides EOS and end-of-turn
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    """One completion: the prompt's token ids (already rendered and tokenized), the adapter to
    run it with (None: the base model) and how to sample."""

    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    sampling: SamplingParams


@dataclass
class Delta:
    """What a step produced for one request. ``text`` is new text since the previous delta (text
    that might become a stop string is held back until it cannot); the last delta has a
    ``finish_reason``: "stop" (EOS, end of turn or a stop string), "length" (max_tokens),
    "abort" (cancelled) or "error" (``error`` says why; ``error_kind`` is an HTTP status hint)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    error_kind: int | None = None


class RequestHandle:
    """The receiving end of one request. Iterate it (``async for`` on an event loop, or
    ``next_delta`` from a thread) until a delta with a ``finish_reason`` arrives; ``cancel`` asks
    the engine to drop the row at its next step (a client disconnect)."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request = request
        self.cancelled = threading.Event()
        self._loop = loop
        self._async_queue: asyncio.Queue[Delta] | None = asyncio.Queue() if loop is not None else None
        self._queue: queue.Queue[Delta] = queue.Queue()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def cancel(self) -> None:
        self.cancelled.set()

    def push(self, delta: Delta) -> None:
        """Called by the engine thread."""
        if self._loop is not None:
            _hand_over(self._loop, [(self, delta)])
        else:
            self._queue.put(delta)

    def next_delta(self, timeout: float | None = None) -> Delta:
        """The next delta (blocking; for handles made without an event loop)."""
        return self._queue.get(timeout=timeout)

    def collect(self, timeout: float | None = None) -> tuple[list[int], str, Delta]:
        """Wait for the whole completion (handles made without an event loop): its token ids,
        its text and its last delta (finish reason, error, counts). ``timeout`` bounds each wait
        for the next delta (``queue.Empty`` beyond it)."""
        tokens, text = [], ""
        while True:
            delta = self.next_delta(timeout=timeout)
            tokens += delta.token_ids
            text += delta.text
            if delta.finish_reason is not None:
                return tokens, text, delta

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> Delta:
        if self._async_queue is None:
            raise TypeError("this handle was made without an event loop; use next_delta()")
        if getattr(self, "_finished", False):
            raise StopAsyncIteration
        delta = await self._async_queue.get()
        if delta.finish_reason is not None:
            self._finished = True
        return delta


class Outbox:
    """The deltas of one engine step, handed to each event loop in one call: a handle's ``push``
    wakes its loop once per delta (a write to the loop's wake-up socket), so a step of 64 rows
    woke the server's loop 64 times; here once per loop and step. Handles made without a loop get
    their deltas at once. Deltas of one handle keep their order."""

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Delta]]] = {}

    def add(self, handle: RequestHandle, delta: Delta) -> None:
        if handle._loop is None:
            handle.push(delta)
        else:
            self._by_loop.setdefault(handle._loop, []).append((handle, delta))

    def flush(self) -> None:
        """Send what the step produced (engine thread, at the end of each step)."""
        for loop, items in self._by_loop.items():
            _hand_over(loop, items)
        self._by_loop.clear()


def _hand_over(loop: asyncio.AbstractEventLoop, items: list[tuple[RequestHandle, Delta]]) -> None:
    """Queue ``items``' deltas on their handles from ``loop``'s thread, in one wake-up of it."""
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        for handle, _ in items:
            handle.cancelled.set()


def _deliver(items: list[tuple[RequestHandle, Delta]]) -> None:
    for handle, delta in items:
        handle._async_queue.put_nowait(delta)


class EngineObserver(Protocol):
    """What the engine and the adapter pool report (metrics.py turns it into Prometheus series).
    Every method is called from the engine thread (or the pool's loader thread) and must be cheap."""

    def request_finished(
        self, adapter: str | None, finish_reason: str, prompt_tokens: int, completion_tokens: int, seconds: float
    ) -> None: ...

    def step(self, running: int, waiting: int, prefill_tokens: int, decode_tokens: int, seconds: float) -> None: ...

    def slot_event(self, kind: str) -> None:
        """kind: "hit" (adapter already in a device slot), "miss" (had to be written into one),
        "eviction" (an adapter left its slot for another)."""

    def adapter_loaded(self, name: str, tier: str, seconds: float) -> None:
        """tier: "host" (read from disk into host memory) or "device" (written into a slot)."""


class NullObserver:
    """The observer that records nothing (engines built without a server)."""

    def request_finished(self, *args, **kwargs) -> None:
        pass

    def step(self, *args, **kwargs) -> None:
        pass

    def slot_event(self, *args, **kwargs) -> None:
        pass

    def adapter_loaded(self, *args, **kwargs) -> None:
        pass
