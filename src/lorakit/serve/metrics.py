"""The server's Prometheus series: an ``EngineObserver`` the engine and the adapter pool report
to, plus what only the HTTP layer sees (time to first token, responses by status).

Each ``ServeMetrics`` has its own ``CollectorRegistry`` rather than prometheus_client's global
one, so that two servers in one process (tests, a notebook) do not collide, and /metrics shows
exactly this server's series. Counters are the source of truth (``rate()`` over them is how
Prometheus wants throughput); ``lorakit_generation_tokens_per_second`` is a convenience gauge for
a human looking at the raw page.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Request and first-token latencies of a small server: from tens of milliseconds to minutes.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
# Adapter loads: a slot write is milliseconds, a disk read up to seconds.
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ServeMetrics:
    """Implements ``serve.requests.EngineObserver``. ``base_name`` labels requests to the base
    model (the id clients send as ``model``), so that no adapter name can be mistaken for it.
    ``window`` is how many seconds the tokens/s gauge averages over."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, base_name: str = "base", window: float = 10.0, registry: CollectorRegistry | None = None):
        self.base_name = base_name
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorakit_requests",
            "Requests finished, by adapter and finish reason",
            ["adapter", "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "lorakit_prompt_tokens", "Prompt tokens of finished requests", ["adapter"], registry=r
        )
        self.generation_tokens = Counter(
            "lorakit_generation_tokens", "Generated tokens of finished requests", ["adapter"], registry=r
        )
        self.request_seconds = Histogram(
            "lorakit_request_seconds", "Time from submission to the last token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.first_token_seconds = Histogram(
            "lorakit_time_to_first_token_seconds",
            "Time from the HTTP request's arrival to its first text",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.waiting = Gauge("lorakit_waiting_requests", "Requests queued for admission", registry=r)
        self.running = Gauge("lorakit_running_requests", "Rows in the running batch", registry=r)
        self.step_seconds = Histogram("lorakit_step_seconds", "Engine step duration", buckets=STEP_BUCKETS, registry=r)
        self.step_tokens = Counter("lorakit_step_tokens", "Tokens processed by engine steps", ["phase"], registry=r)
        self.slot_events = Counter(
            "lorakit_adapter_slot_events", "Adapter slot hits, misses and evictions", ["kind"], registry=r
        )
        self.adapter_load_seconds = Histogram(
            "lorakit_adapter_load_seconds",
            "Adapter load time by tier (host: disk to memory; device: into a slot)",
            ["tier"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.http_responses = Counter(
            "lorakit_http_responses", "HTTP responses by route and status", ["route", "status"], registry=r
        )
        self.tokens_per_second = Gauge(
            "lorakit_generation_tokens_per_second", "Tokens generated per second over the last window", registry=r
        )
        self.tokens_per_second.set_function(self._recent_rate)
        self._window = window
        self._recent: deque[tuple[float, int]] = deque()  # (monotonic time, tokens generated in a step)
        self._lock = threading.Lock()  # steps append on the engine thread, scrapes read on the server's
        self._started = time.monotonic()

    # ---- EngineObserver --------------------------------------------------------------------

    def request_finished(
        self, adapter: str | None, finish_reason: str, prompt_tokens: int, completion_tokens: int, seconds: float
    ) -> None:
        label = adapter if adapter is not None else self.base_name
        self.requests.labels(label, finish_reason).inc()
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        self.generation_tokens.labels(label).inc(completion_tokens)
        self.request_seconds.observe(seconds)

    def step(self, running: int, waiting: int, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.step_seconds.observe(seconds)
        self.step_tokens.labels("prefill").inc(prefill_tokens)
        self.step_tokens.labels("decode").inc(decode_tokens)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, decode_tokens))
            self._forget_before(now - self._window)

    def slot_event(self, kind: str) -> None:
        self.slot_events.labels(kind).inc()

    def adapter_loaded(self, name: str, tier: str, seconds: float) -> None:
        self.adapter_load_seconds.labels(tier).observe(seconds)

    # ---- the HTTP layer's own ----------------------------------------------------------------

    def first_token(self, seconds: float) -> None:
        self.first_token_seconds.observe(seconds)

    def http_response(self, route: str, status: int) -> None:
        self.http_responses.labels(route, str(status)).inc()

    def render(self, stats: dict | None = None) -> bytes:
        """The exposition text; ``stats`` (``Engine.stats()``) refreshes the queue gauges, which
        an idle engine, taking no steps, would otherwise leave at their last value."""
        if stats:
            if "running" in stats:
                self.running.set(stats["running"])
            if "waiting" in stats:
                self.waiting.set(stats["waiting"])
        return generate_latest(self.registry)

    def _recent_rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._forget_before(now - self._window)
            tokens = sum(n for _, n in self._recent)
        return tokens / max(min(self._window, now - self._started), 1e-9)

    def _forget_before(self, cutoff: float) -> None:
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()


class ResponseCounter:
    """ASGI middleware counting responses by route and status (401s and 413s included, which the
    guard answers before any route). Paths outside ``routes`` count as "other", so that a client
    probing random paths cannot grow the series without bound."""

    def __init__(self, app, metrics: ServeMetrics, routes: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_response(route, message["status"])
            await send(message)

        await self.app(scope, receive, counted)
