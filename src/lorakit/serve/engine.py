"""`Engine`: one thread that owns the model and decodes every running request together.

Each step: take new submissions, drop cancelled rows, admit waiting requests (``scheduler.py``),
prefill them as one left-padded batch with their adapters routed per row, sample their first
tokens, join them to the running batch (``batch_state.py``), then decode one token for every
running row and let finished rows leave. Requests for different adapters share every forward:
the adapter pool (``adapter_pool.py``) routes each row to its adapter's device slot.

Other threads only call ``submit`` (and ``stats``); answers come back through each request's
``RequestHandle``.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..data.render import Renderer
from ..data.stop_tokens import stop_token_ids
from ..errors import AdapterNameError, ConfigError, ServerBusyError
from ..kernels.host_copy import host_to_device
from .batch_state import BatchState, check_cache_kind
from .detokenize import TextStream
from .requests import Delta, EngineObserver, GenerationRequest, NullObserver, Outbox, RequestHandle, SamplingParams
from .sampling import check_sampling, next_tokens, row_generator, sample
from .scheduler import Admitted, EngineLimits, Scheduler
from .static_batch import StaticBatch

__all__ = ["Engine", "EngineLimits"]


@dataclass
class _Row:
    """A running request: its place in the batch is its index in ``Engine._rows``."""

    handle: RequestHandle
    route: object
    params: SamplingParams
    generator: torch.Generator | None
    text: TextStream
    stop_ids: set[int]
    prompt_tokens: int
    arrived: float
    completion_tokens: int = 0
    last_token: int = 0
    static_row: int = -1  # its row of the StaticBatch, when the engine decodes over one
    columns: int = 0  # the most KV columns its own tokens may fill (prompt + max_tokens)


@dataclass
class _InFlight:
    """A decode step launched and not yet read: its rows, in its order, their sampled tokens
    ((rows,) on the device), and on a GPU their copy on its way to pinned host memory with the
    event that marks it done (reading it waits for this step only, not for the one after)."""

    rows: list[_Row]
    tokens: torch.Tensor
    host: torch.Tensor
    ready: torch.cuda.Event | None

    @staticmethod
    def launched(rows: list[_Row], tokens: torch.Tensor) -> _InFlight:
        if tokens.device.type != "cuda":
            return _InFlight(rows, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _InFlight(rows, tokens, host, ready)

    def read(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


class Engine:
    """Continuous batching over one model and its adapter pool; see the module docstring.

    ``overlap`` (static rows only): launch each decode step from the previous step's samples on
    the device, then read those samples and handle their text on the host while the GPU runs the
    new step (see ``_decode_overlapped``). False: every step waits for its tokens first."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        pool,
        *,
        model_id: str,
        limits: EngineLimits | None = None,
        observer: EngineObserver | None = None,
        seed: int = 0,
        decode: str = "auto",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pool = pool
        self.model_id = model_id
        self.limits = limits or EngineLimits()
        self.observer = observer or NullObserver()
        self.device = next(model.parameters()).device
        self.renderer = Renderer(tokenizer)
        self.eos_ids = set(stop_token_ids(tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_context = getattr(model.config, "max_position_embeddings", None) or 10**9
        # transformers renamed the forward's cache argument (past_key_values -> cache).
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._incoming: queue.Queue[RequestHandle] = queue.Queue()
        self._pending = 0  # submitted and not yet started (incoming + waiting), for the 429 check
        self._pending_lock = threading.Lock()
        self._rows: list[_Row] = []
        self._outbox = Outbox()  # the deltas of the current step, sent when it ends
        self._batch: BatchState | None = None
        self._stop = threading.Event()
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        self._seeds = torch.Generator().manual_seed(seed)
        self.overlap = True
        self._inflight: _InFlight | None = None
        self.failure: BaseException | None = None
        self.decode_mode = _decode_mode(decode, self.device)
        self._chosen = decode == "auto"  # graphs chosen for the device, not asked for: fall back quietly
        self._static = None
        try:
            if self.decode_mode != "dynamic":
                graphs = self.decode_mode == "graphs"
                self._static = StaticBatch(
                    model, self.limits.max_num_seqs, graphs=graphs, pool=pool, forward=self._static_forward
                )
            self.scheduler = self._new_scheduler()
        except ConfigError as exc:
            if not self._chosen:
                raise
            self._decode_dynamically(exc)

    # --- prompts ---------------------------------------------------------------------------
    def completion_ids(self, prompt: str | list[int]) -> list[int]:
        """The token ids of a completions prompt: ids pass through; text is tokenized with the
        tokenizer's special tokens (BOS where it adds one), as vLLM tokenizes it."""
        if isinstance(prompt, list):
            vocab = len(self.tokenizer)
            if not prompt or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
                raise ConfigError(f"a token-id prompt must be a non-empty list of ids in [0, {vocab})")
            return list(prompt)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """A conversation rendered for the assistant's next turn exactly as training renders it
        (the chat template, BOS text included), tokenized without adding special tokens."""
        if not messages or messages[-1].get("role") not in ("user", "system", "tool"):
            raise ConfigError("messages must be a non-empty list ending with a user message")
        text = self.renderer.conversation_prompt(messages)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # --- submitting ------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue ``request``; raises ConfigError (bad values, over the caps), AdapterNameError (an
        adapter the pool does not know) or ServerBusyError (the queue is full)."""
        if self.failure is not None or (self._thread is not None and not self._running.is_set()):
            raise ServerBusyError(f"the engine stopped: {self.failure or 'shut down'}")
        prompt = len(request.prompt_ids)
        if prompt == 0:
            raise ConfigError("the prompt is empty")
        # The KV cache one request may reserve alone (--kv-cache-gb, or static rows' share of the
        # GPU): beyond it, admitting the request would take more memory than the server may.
        room = self.scheduler.most_columns()
        if request.sampling.max_tokens is None:  # as many as the context, the KV room and the cap allow
            context = self.max_context if room is None else min(self.max_context, room)
            request.sampling.max_tokens = max(1, min(self.limits.max_tokens, context - prompt))
        check_sampling(request.sampling, self.limits.max_tokens)
        if prompt > self.limits.max_prompt_tokens:
            raise ConfigError(
                f"the prompt has {prompt} tokens, over this server's limit of {self.limits.max_prompt_tokens}"
            )
        if prompt + request.sampling.max_tokens > self.max_context:
            raise ConfigError(
                f"prompt ({prompt} tokens) + max_tokens ({request.sampling.max_tokens}) is over the model's "
                f"context of {self.max_context} tokens; ask for fewer tokens"
            )
        if room is not None and prompt + request.sampling.max_tokens > room:
            raise ConfigError(
                f"prompt ({prompt} tokens) + max_tokens ({request.sampling.max_tokens}) needs more KV cache "
                f"than this server holds for one request ({room} tokens); ask for fewer tokens"
            )
        if request.adapter is not None and request.adapter not in self.pool.names():
            raise AdapterNameError(f"the model {request.adapter!r} does not exist")
        with self._pending_lock:
            if self._pending >= self.limits.max_queue:
                raise ServerBusyError(f"{self._pending} requests are waiting already; retry later")
            self._pending += 1
        handle = RequestHandle(request, loop)
        self._incoming.put(handle)
        return handle

    def stats(self) -> dict:
        return {"running": len(self._rows), "waiting": self._pending, "alive": self.is_alive()}

    def is_alive(self) -> bool:
        return self._running.is_set()

    # --- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        """Check the model can be batched (one token's prefill) and start the engine thread."""
        self._warm_up()
        self._running.set()
        self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run the engine in the calling thread until ``stop`` (from another thread or a signal
        handler). ``lorakit serve`` runs it in the main thread, the HTTP server in another: on the
        CPU, torch's OpenMP workers answer the small operations of a LoRA forward far later when
        they are started from a secondary thread (docs/benchmarks.md, serving)."""
        self._warm_up()
        self._running.set()
        self._thread = threading.current_thread()
        self._run()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _warm_up(self) -> None:
        from transformers import DynamicCache

        route = self.pool.acquire(None)
        try:
            cache = DynamicCache(config=self.model.config)
            ids = torch.tensor([[self.pad_id]], device=self.device)
            self._forward(ids, torch.ones_like(ids), torch.zeros_like(ids), cache, [route])
            check_cache_kind(cache)
            if self._static is not None:  # one step over the static rows (with graphs: captured)
                try:
                    rows = self._static.admit(cache, torch.ones_like(ids))
                    self._static.step(rows, [self.pad_id], [route])
                    self._static.release(rows[0])
                except Exception as exc:
                    if not self._chosen:
                        raise ConfigError(
                            f"decoding over static rows does not fit this model ({type(exc).__name__}: {exc}); "
                            "leave --cuda-graphs off"
                        ) from exc
                    self._decode_dynamically(exc)
        finally:
            self.pool.release(route)

    def _decode_dynamically(self, why: Exception) -> None:
        """Leave the CUDA graphs "auto" chose for the ``DynamicCache``'s eager steps, saying why."""
        warnings.warn(
            f"decoding without CUDA graphs ({type(why).__name__}: {why}); --enforce-eager silences this",
            stacklevel=3,
        )
        self.decode_mode, self._static = "dynamic", None
        self.scheduler = self._new_scheduler()

    def _new_scheduler(self) -> Scheduler:
        """The admission rules for the decode mode in use (static rows charge their buffers)."""
        static = self._static
        memory = _static_rows_memory(self.device) if static is not None else None
        return Scheduler(self.limits, self.pool, _kv_bytes_per_token(self.model), static=static, device_memory=memory)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self._step()
                self._outbox.flush()
                if not busy:
                    self._wait_for_work()
        except BaseException as exc:  # the engine must not die silently: every row learns why
            self.failure = exc
            self._fail_everything(f"the engine failed: {type(exc).__name__}: {exc}")
            raise
        finally:
            self._running.clear()
            if self.failure is None:  # a clean stop: the step in flight's tokens still go out
                try:
                    self._settle()
                except Exception:
                    pass
            self._fail_everything("the server is shutting down")

    def _wait_for_work(self) -> None:
        """Sleep until a request arrives (or briefly, while waiting requests wait for adapters)."""
        timeout = 0.005 if self.scheduler.queue else 0.1
        try:
            handle = self._incoming.get(timeout=timeout)
        except queue.Empty:
            return
        self.scheduler.add(handle)

    def _step(self) -> bool:
        """One iteration; False when there was nothing to do."""
        started = time.perf_counter()
        while True:
            try:
                self.scheduler.add(self._incoming.get_nowait())
            except queue.Empty:
                break
        for handle, delta in self.scheduler.drop_finished():
            self._unqueue()
            self._send_last(handle, delta, None, time.monotonic())
        self._leave_all([i for i, row in enumerate(self._rows) if row.handle.cancelled.is_set()], "abort")
        if not self._rows:
            self._inflight = None  # a step of rows that have all left since: nothing to read
        admitted, failed = self.scheduler.admit(len(self._rows), max((r.columns for r in self._rows), default=0))
        for handle, delta in failed:
            self._unqueue()
            self._send_last(handle, delta, handle.request.adapter, time.monotonic())
        prefill = decode = 0
        if admitted:
            self._settle()  # the step in flight read first: the next one starts from host tokens
            prefill = self._prefill(admitted)
            self._outbox.flush()  # the first tokens go out now, not after this step's decode
        if self._rows:
            decode = self._decode()
        if not (admitted or decode):
            return bool(failed)
        self.observer.step(len(self._rows), len(self.scheduler.queue), prefill, decode, time.perf_counter() - started)
        return True

    # --- forwards --------------------------------------------------------------------------
    def _forward(self, ids, mask, positions, cache, routes) -> torch.Tensor:
        """Last-position logits (rows, vocab) of one forward with row i routed to routes[i]."""
        self.pool.set_rows(routes)
        with torch.inference_mode():
            return self._static_forward(ids, mask, positions, cache)

    def _static_forward(self, ids, mask, positions, cache) -> torch.Tensor:
        """Last-position logits (rows, vocab) of one forward as the rows are routed now (the
        static batch's decode steps call it directly: ``static_batch.py`` routes them)."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_argument: cache},
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]

    def _prefill(self, admitted: list[Admitted]) -> int:
        from transformers import DynamicCache

        prompts = [a.handle.request.prompt_ids for a in admitted]
        length = max(map(len, prompts))
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, length - len(prompt) :] = torch.tensor(prompt)
            mask[i, length - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        rows = [self._new_row(a) for a in admitted]
        for _ in admitted:
            self._unqueue()
        try:
            logits = self._forward(ids, mask, positions, cache, [r.route for r in rows])
            static_rows = self._static.admit(cache, mask) if self._static is not None else None
        except Exception as exc:  # out of memory, say: these rows fail, the engine goes on
            for row in rows:
                self._finish(row, "error", "", f"the prefill failed: {type(exc).__name__}: {exc}")
            return 0
        if static_rows is not None:
            for row, static_row in zip(rows, static_rows):
                row.static_row = static_row
        elif self._batch is None:
            self._batch = BatchState(cache, mask)
        else:
            self._batch.join(BatchState(cache, mask))
        start = len(self._rows)
        self._rows.extend(rows)
        try:
            self._emit(logits, range(start, len(self._rows)))
        except Exception as exc:  # sampling refused the logits (NaN, say): these rows fail
            self._leave_all(list(range(start, len(self._rows))), "error", f"the prefill failed: {exc}")
        return int(mask.numel())

    def _decode(self) -> int:
        """One decode step of the running rows; returns how many rows it computed."""
        if self._static is not None and self.overlap:
            return self._decode_overlapped()
        self._settle()  # overlap switched off meanwhile: the step in flight first
        routes = [r.route for r in self._rows]
        count = len(self._rows)
        try:
            if self._static is not None:
                with torch.inference_mode():
                    logits = self._static.step(
                        [r.static_row for r in self._rows], [r.last_token for r in self._rows], routes
                    )
            else:
                ids = torch.tensor([[row.last_token] for row in self._rows], device=self.device)
                mask, positions = self._batch.step_inputs()
                logits = self._forward(ids, mask, positions, self._batch.cache, routes)
            self._emit(logits, range(count))
        except Exception as exc:
            self._leave_all(
                list(range(len(self._rows))), "error", f"the decode step failed: {type(exc).__name__}: {exc}"
            )
        return count

    def _decode_overlapped(self) -> int:
        """Launch the next decode step, then read the step before it. The next step's input
        tokens are that step's samples, taken on the device, so the host does not wait for the
        GPU before launching; it then copies those samples to the host (waiting only for the step
        before) and handles their text while the GPU runs the new step, as vLLM's asynchronous
        scheduling does. Rows the step before ends by length are left out of the new step, their
        static rows freed at once (a freed row computes a dummy token at column 0; kept, it would
        write its key past its last column, which may be past the buffers); rows it ends
        otherwise (EOS, a stop string) compute one token more, which is dropped. Returns how many
        rows the new step computes."""
        previous, self._inflight = self._inflight, None
        if previous is None:
            rows, tokens = list(self._rows), [row.last_token for row in self._rows]
        else:  # the running rows are the previous step's, less those that left (``_settle``)
            position = {id(row): i for i, row in enumerate(previous.rows)}
            rows = []
            for row in self._rows:
                if not self._ends_by_length(row, pending=1):
                    rows.append(row)
                elif row.static_row >= 0:
                    self._static.release(row.static_row)
                    row.static_row = -1
            index = host_to_device([position[id(row)] for row in rows], self.device)
            tokens = previous.tokens.index_select(0, index) if rows else None
        if rows:
            try:
                with torch.inference_mode():
                    logits = self._static.step([r.static_row for r in rows], tokens, [r.route for r in rows])
                    sampled = sample(logits, [r.params for r in rows], [r.generator for r in rows])
                self._inflight = _InFlight.launched(rows, sampled)
            except Exception as exc:
                failure = f"the decode step failed: {type(exc).__name__}: {exc}"
                if previous is not None:  # the step before computed its tokens: they go out first
                    try:
                        self._apply(previous)
                    except Exception:
                        pass
                self._leave_all(list(range(len(self._rows))), "error", failure)
                return 0
        if previous is not None:
            self._apply(previous)
        return len(rows)

    def _apply(self, step: _InFlight) -> None:
        """Read a launched step's tokens and hand them to its rows that are still running."""
        tokens = step.read()
        present = {id(row): i for i, row in enumerate(self._rows)}
        self._emit_tokens([(present[id(row)], t) for row, t in zip(step.rows, tokens) if id(row) in present])

    def _settle(self) -> None:
        """Read the step in flight, if any: before a prefill adds rows, whose first tokens are on
        the host (the next step starts from host tokens)."""
        if self._inflight is not None:
            step, self._inflight = self._inflight, None
            self._apply(step)

    def _ends_by_length(self, row: _Row, pending: int = 0) -> bool:
        """True when ``row`` is finished by its length once it has ``pending`` more tokens."""
        made = row.completion_tokens + pending
        return made >= row.params.max_tokens or row.prompt_tokens + made >= self.max_context

    # --- rows ------------------------------------------------------------------------------
    def _new_row(self, admitted: Admitted) -> _Row:
        request = admitted.handle.request
        params = request.sampling
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        return _Row(
            handle=admitted.handle,
            route=admitted.route,
            params=params,
            generator=row_generator(params, self.device, self._seeds),
            text=TextStream(self.tokenizer, params.stop),
            stop_ids=stop_ids,
            prompt_tokens=len(request.prompt_ids),
            arrived=admitted.arrived,
            columns=admitted.columns,
        )

    def _emit(self, logits: torch.Tensor, indices: range) -> None:
        """Sample the rows ``indices`` from their logits (one row each, same order), send their
        text, and let the rows that finished leave."""
        rows = [self._rows[i] for i in indices]
        tokens = next_tokens(logits, [r.params for r in rows], [r.generator for r in rows])
        self._emit_tokens(list(zip(indices, tokens)))

    def _emit_tokens(self, tokens: list[tuple[int, int]]) -> None:
        """Give each row (index, its next token) its token, send the text, and let the rows that
        finished leave."""
        finished: dict[int, tuple[str, str]] = {}  # row index -> (finish reason, its last text)
        for i, token in tokens:
            row = self._rows[i]
            row.completion_tokens += 1
            row.last_token = token
            if token in row.stop_ids:  # EOS or end of turn: the token ends the text, not part of it
                finished[i] = ("stop", "")
                continue
            piece = row.text.add(token)
            if row.text.stopped:
                finished[i] = ("stop", piece)
            elif self._ends_by_length(row):
                finished[i] = ("length", piece)
            else:
                self._outbox.add(row.handle, Delta(piece, [token], row.prompt_tokens, row.completion_tokens))
        self._leave(finished)

    def _leave(self, finished: dict[int, tuple[str, str]], error: str | None = None) -> None:
        """Rows ``finished`` (index -> (finish reason, text not sent yet)) get their last delta and
        leave the batch."""
        if not finished:
            return
        # The rows leave before any device operation, so a failing device cannot finish them twice.
        leaving = [self._rows[i] for i in finished]
        keep = [i for i in range(len(self._rows)) if i not in finished]
        self._rows = [self._rows[i] for i in keep]
        for row, (reason, piece) in zip(leaving, finished.values()):
            self._finish(row, reason, piece, error)
        if self._static is not None:
            for row in leaving:
                if row.static_row >= 0:
                    self._static.release(row.static_row)
        elif not keep:
            self._batch = None
        else:
            self._batch.keep(torch.tensor(keep, device=self.device))

    def _leave_all(self, indices: list[int], reason: str, error: str | None = None) -> None:
        self._leave({i: (reason, "") for i in indices}, error)

    def _finish(self, row: _Row, reason: str, piece: str, error: str | None = None) -> None:
        """Send a row's last delta and give back its slot."""
        text = piece + (row.text.finish() if reason in ("stop", "length") else "")
        token = [row.last_token] if reason in ("stop", "length") else []
        delta = Delta(text, token, row.prompt_tokens, row.completion_tokens, reason, error, 500 if error else None)
        self.pool.release(row.route)
        self._send_last(row.handle, delta, row.handle.request.adapter, row.arrived)

    def _send_last(self, handle: RequestHandle, delta: Delta, adapter: str | None, arrived: float) -> None:
        self._outbox.add(handle, delta)
        self.observer.request_finished(
            adapter, delta.finish_reason, delta.prompt_tokens, delta.completion_tokens, time.monotonic() - arrived
        )

    def _unqueue(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _fail_everything(self, message: str) -> None:
        """Every running and waiting request gets an error as its last delta (the engine stops)."""
        self._inflight = None
        try:
            try:
                self._leave_all(list(range(len(self._rows))), "error", message)
            except Exception:  # a broken device: the rows left, with their last deltas, before it failed
                self._rows, self._batch = [], None
            while True:
                try:
                    self.scheduler.add(self._incoming.get_nowait())
                except queue.Empty:
                    break
            for item in list(self.scheduler.queue):
                request = item.handle.request
                self._send_last(
                    item.handle,
                    Delta("", [], len(request.prompt_ids), 0, "error", message, 503),
                    request.adapter,
                    item.arrived,
                )
            self.scheduler.queue.clear()
        finally:
            self._outbox.flush()


def _decode_mode(decode: str, device: torch.device) -> str:
    """How decode steps run: "dynamic" (``DynamicCache`` joined and trimmed per step, eager),
    "static" (``StaticBatch``'s fixed buffers, eager) or "graphs" (the same in CUDA graphs, which
    need Triton for the slot kernels' graph path). "auto": graphs on a CUDA device with Triton
    (a GPU's decode step is launch-bound; docs/benchmarks.md), else dynamic (the CPU's launches
    cost nothing, and the dynamic cache attends fewer columns)."""
    from ..kernels.triton_support import triton

    if decode == "auto":
        return "graphs" if device.type == "cuda" and triton is not None else "dynamic"
    if decode not in ("dynamic", "static", "graphs"):
        raise ConfigError(f"decode must be auto, dynamic, static or graphs; got {decode!r}")
    if decode == "graphs" and (device.type != "cuda" or triton is None):
        raise ConfigError("--cuda-graphs needs the model on a CUDA device and Triton installed; leave it off")
    return decode


STATIC_MEMORY_SHARE = 0.8  # of the GPU's free memory at start, for static rows without --kv-cache-gb


def _static_rows_memory(device: torch.device) -> int | None:
    """The bytes static rows may hold without ``--kv-cache-gb``: a share of the device's free
    memory once the model and adapter slots are in (the rest for prefill activations and the
    graphs' pools), as vLLM sizes its cache from ``--gpu-memory-utilization``. None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(STATIC_MEMORY_SHARE * free)


def _kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes of keys and values one token keeps in the cache (every layer), from the config."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", 1)
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * itemsize
