"""Which waiting requests join the running batch at the next step (iteration-level batching).

Requests wait in arrival order. At each step the scheduler walks them oldest first and admits
those that fit: rows under ``max_num_seqs``, the prefill under ``max_prefill_tokens`` (padded
tokens: rows are prefilled together, left-padded to the longest prompt), the KV memory under
``kv_cache_gb``, and the request's adapter in a device slot. The KV memory is charged as the
caches hold it, rows × columns. The running batch's ``DynamicCache`` left-pads every row to the
longest and trims columns no row uses any more (``batch_state.py``), so it may reach rows × the
most columns any one row may fill (its prompt + max_tokens), not the sum of the rows' own
lengths. Static rows
(``StaticBatch``: decode in CUDA graphs) hold ``max_num_seqs`` rows of L columns whatever the
rows use: the L the longest admitted row makes them grow to (they never shrink). A request whose
adapter is not resident yet stays waiting without holding up the requests behind it; the oldest
of them asks the pool to drain a slot for it (``urgent``), so a cold adapter gets one as soon as
that slot's rows finish instead of starving behind busy ones.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import AdapterLoadError, ConfigError, LorakitError
from .requests import Delta, RequestHandle


@dataclass
class EngineLimits:
    """What one engine accepts and holds at once (the server's command-line limits)."""

    max_num_seqs: int = 32  # rows decoded together
    max_queue: int = 256  # requests waiting to start; beyond it the server answers 429
    max_prompt_tokens: int = 4096  # a longer prompt is refused (400)
    max_tokens: int = 4096  # the largest max_tokens a request may ask (400 above it)
    max_prefill_tokens: int = 8192  # padded prompt tokens prefilled in one step
    kv_cache_gb: float | None = None  # KV bytes running rows may reserve (None: no limit)
    adapter_load_timeout: float = 30.0  # seconds a request waits for its adapter before a 503
    urgent_after: float = 0.5  # seconds the oldest waiting request waits before a slot is drained for it


@dataclass
class Waiting:
    """A submitted request that has not started yet."""

    handle: RequestHandle
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Admitted:
    handle: RequestHandle
    route: object
    arrived: float
    columns: int = 0  # the most KV columns its own tokens may fill (prompt + max_tokens)


class Scheduler:
    """The waiting queue and the admission decision (engine thread only, apart from ``waiting``)."""

    def __init__(
        self, limits: EngineLimits, pool, kv_bytes_per_token: int, static=None, device_memory: int | None = None
    ) -> None:
        """``static``: the engine's StaticBatch (None: DynamicCache decode). ``device_memory``: the
        bytes static rows may hold when ``kv_cache_gb`` is not given (the engine's share of the
        GPU's free memory: their buffers grow with the longest row for every row, so they get a
        budget either way; None: unbounded)."""
        self.limits = limits
        self.pool = pool
        self.kv_bytes_per_token = kv_bytes_per_token
        self.queue: deque[Waiting] = deque()
        self.static = static
        self.device_memory = device_memory
        self.static_columns = 0  # the most columns an admitted row may fill in the static rows
        budget = self._budget()
        if static is not None and budget is not None and self.static_bytes(1) > budget:
            given = (
                f"--kv-cache-gb {limits.kv_cache_gb:g}"
                if limits.kv_cache_gb is not None
                else f"the {budget / 2**30:.2f} GiB of free device memory it may take"
            )
            raise ConfigError(
                f"the static decode rows need {self.static_bytes(1) / 2**30:.2f} GiB of KV cache for "
                f"--max-num-seqs {static.capacity}, more than {given}; raise --kv-cache-gb or lower --max-num-seqs"
            )

    def _budget(self) -> int | None:
        if self.limits.kv_cache_gb is not None:
            return int(self.limits.kv_cache_gb * 2**30)
        return self.device_memory if self.static is not None else None

    def static_bytes(self, columns: int) -> int:
        """KV bytes the static rows hold once one of them fills ``columns`` columns."""
        return self.static.capacity * self.static.length_for(columns) * self.kv_bytes_per_token

    def most_columns(self) -> int | None:
        """The most tokens (prompt + max_tokens) one request may reserve under the KV budget,
        running alone (None: no budget). Over static rows: the longest L the buffers may grow to
        (every row gets L columns). ``Engine.submit`` refuses a request beyond it, which admitted
        alone would take more than the budget."""
        budget = self._budget()
        if budget is None:
            return None
        if self.static is None:
            return budget // self.kv_bytes_per_token
        length = self.static.length_for(1)
        while self.static_bytes(2 * length) <= budget:
            length *= 2
        return length

    def add(self, handle: RequestHandle) -> None:
        self.queue.append(Waiting(handle))

    def drop_finished(self) -> list[tuple[RequestHandle, Delta]]:
        """Take out waiting requests that were cancelled or waited too long for their adapter;
        returns each with the last delta it gets."""
        now = time.monotonic()
        kept: deque[Waiting] = deque()
        dropped = []
        for item in self.queue:
            request = item.handle.request
            prompt = len(request.prompt_ids)
            if item.handle.cancelled.is_set():
                dropped.append((item.handle, Delta("", [], prompt, 0, finish_reason="abort")))
            elif now - item.arrived > self.limits.adapter_load_timeout:
                message = (
                    f"adapter {request.adapter!r} could not be loaded within "
                    f"{self.limits.adapter_load_timeout:g} s; retry later"
                )
                dropped.append((item.handle, Delta("", [], prompt, 0, "error", message, 503)))
            else:
                kept.append(item)
        self.queue = kept
        return dropped

    def admit(self, running: int, running_columns: int) -> tuple[list[Admitted], list[tuple[RequestHandle, Delta]]]:
        """The requests to prefill now (with their pinned adapter routes and the columns each may
        fill), and those that failed (their adapter's files could not be read). ``running``: rows
        in the batch; ``running_columns``: the most columns one of them may fill (their
        ``Admitted.columns``; unused over static rows, whose buffers' length is the charge)."""
        limits = self.limits
        budget = self._budget()
        admitted: list[Admitted] = []
        failed = []
        longest = 0
        most_tokens = 0  # the largest max_tokens admitted in this prefill (its rows share one padding)
        widest = running_columns  # the most columns one running or admitted row may fill
        urgent_asked = False
        now = time.monotonic()
        for item in list(self.queue):
            if running + len(admitted) >= limits.max_num_seqs:
                break
            request = item.handle.request
            prompt = len(request.prompt_ids)
            own = prompt + request.sampling.max_tokens
            if self.static is None:  # every row as long as the longest may become
                held = (running + len(admitted) + 1) * max(widest, own) * self.kv_bytes_per_token
                over = budget is not None and held > budget
            else:  # buffers already grown cost nothing more; only growing them past the budget waits
                # Every row of one prefill is padded to its longest prompt: the row asking the most
                # tokens may end that far beyond the padding.
                columns = max(self.static_columns, max(longest, prompt) + max(most_tokens, request.sampling.max_tokens))
                held = self.static_bytes(columns)
                over = budget is not None and held > budget and held > self.static_bytes(self.static_columns)
            if over and (running or admitted):
                break  # oldest first: later requests do not jump a request that waits for memory
            if admitted and max(longest, prompt) * (len(admitted) + 1) > limits.max_prefill_tokens:
                break
            urgent = not urgent_asked and now - item.arrived >= limits.urgent_after
            try:
                route = self.pool.acquire(request.adapter, urgent=urgent)
            except LorakitError as exc:
                self.queue.remove(item)
                detail = str(exc) if isinstance(exc, AdapterLoadError) else f"adapter could not be loaded: {exc}"
                failed.append((item.handle, Delta("", [], prompt, 0, "error", detail, 503)))
                continue
            urgent_asked = urgent_asked or (route is None and request.adapter is not None)
            if route is None:
                continue  # its adapter is on its way; the requests behind it may go ahead
            self.queue.remove(item)
            admitted.append(Admitted(item.handle, route, item.arrived, own))
            longest = max(longest, prompt)
            most_tokens = max(most_tokens, request.sampling.max_tokens)
            widest = max(widest, own)
            if self.static is not None:
                self.static_columns = columns
        return admitted, failed
