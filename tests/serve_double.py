"""TEST DOUBLE of ``lorakit.serve.engine.Engine`` (and of its ``AdapterPool``) for the HTTP layer's
tests: no model. It answers every request by echoing the request's prompt tokens back, one token
per step for every running request (as continuous batching does), decoded incrementally with a
real Hugging Face tokenizer, with stop strings held back and cut as the engine's contract says.

It keeps the engine's interface (serve_spec.md): ``submit`` from any thread raising the same
errors (unknown adapter, full queue, bad values), ``RequestHandle`` pushed from its own thread,
``cancel`` honoured at the next step, ``stats``. What it adds for tests: ``paused`` (hold every
request, to fill the queue or wait on a disconnect), ``failing`` (adapters whose load fails: the
first delta is an error with ``error_kind`` 503) and ``submitted`` (what reached the engine).
The real engine's tests go through the same server with the real model.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import AdapterFileError, AdapterNameError, ConfigError, ServerBusyError
from lorakit.serve.requests import Delta, GenerationRequest, RequestHandle

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "Hello there! General Kenobi. Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. 東京",
    "def add(a, b):\n    return a + b\n# numbers 0123456789, punctuation .,;:!?()[]{}",
]
NAME = re.compile(r"[A-Za-z0-9._\-/:]{1,128}")


def echo_tokenizer():
    """A small byte-level BPE tokenizer with a ChatML template (trained here: no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


class EchoPool:
    """The adapter pool's registry half: names and directories (no weights)."""

    def __init__(self, base_dir: Path | None = None):
        self.base_dir = Path(base_dir).resolve() if base_dir is not None else None
        self._dirs: dict[str, Path] = {}
        self._lock = threading.Lock()

    def register(self, name: str, directory) -> None:
        if not NAME.fullmatch(name):
            raise AdapterNameError(f"adapter name {name!r} is not allowed (letters, digits, . _ - / :)")
        path = Path(directory).resolve()
        if self.base_dir is not None and not path.is_relative_to(self.base_dir):
            raise AdapterFileError(f"{path} is outside the adapter directory {self.base_dir}")
        if not (path / "adapter_config.json").is_file():
            raise AdapterFileError(f"{path} has no adapter_config.json")
        with self._lock:
            self._dirs[name] = path

    def unregister(self, name: str) -> None:
        with self._lock:
            if name not in self._dirs:
                raise AdapterNameError(f"no adapter named {name!r}")
            del self._dirs[name]

    def names(self) -> list[str]:
        with self._lock:
            return list(self._dirs)

    def directory(self, name: str) -> Path:
        return self._dirs[name]


@dataclass
class EchoLimits:
    max_queue: int = 8
    max_prompt_tokens: int = 512
    max_tokens: int = 64


@dataclass
class _Row:
    handle: RequestHandle
    started: float
    sent_text: str = ""
    generated: int = 0
    last: Delta | None = None


class EchoEngine:
    """Test double of the serving engine (see the module's docstring)."""

    def __init__(
        self, tokenizer, *, model_id="echo-base", limits: EchoLimits | None = None, step_seconds=0.002, observer=None
    ):
        self.tokenizer = tokenizer
        self.observer = observer
        self.model_id = model_id
        self.limits = limits or EchoLimits()
        self.pool = EchoPool()
        self.step_seconds = step_seconds
        self.paused = threading.Event()
        self.failing: set[str] = set()
        self.submitted: list[GenerationRequest] = []
        self.handles: list[RequestHandle] = []
        self._waiting: list[RequestHandle] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def completion_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if any(i >= len(self.tokenizer) for i in prompt):
            raise ConfigError(f"token ids must be below the vocabulary size {len(self.tokenizer)}")
        return list(prompt)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def submit(self, request: GenerationRequest, loop=None) -> RequestHandle:
        if request.adapter is not None and request.adapter not in self.pool.names():
            raise AdapterNameError(f"no adapter named {request.adapter!r}")
        if len(request.prompt_ids) > self.limits.max_prompt_tokens:
            raise ConfigError(f"the prompt has {len(request.prompt_ids)} tokens, over the cap")
        if request.sampling.max_tokens is None:  # as the engine does (a double without a context)
            request.sampling.max_tokens = self.limits.max_tokens
        if request.sampling.max_tokens > self.limits.max_tokens:
            raise ConfigError(f"max_tokens {request.sampling.max_tokens} is over the server's cap")
        handle = RequestHandle(request, loop)
        with self._lock:
            if len(self._waiting) >= self.limits.max_queue:
                raise ServerBusyError(f"the queue is full ({self.limits.max_queue} waiting): retry later")
            self._waiting.append(handle)
            self.submitted.append(request)
            self.handles.append(handle)
        return handle

    def stats(self) -> dict:
        with self._lock:
            return {"running": self._running_count, "waiting": len(self._waiting)}

    _running_count = 0

    def _run(self) -> None:
        rows: list[_Row] = []
        while not self._stop.is_set():
            time.sleep(self.step_seconds)
            if not self.paused.is_set():
                with self._lock:
                    rows += [_Row(handle, time.monotonic()) for handle in self._waiting]
                    self._waiting.clear()
            with self._lock:  # a waiting request may be cancelled too
                for handle in [h for h in self._waiting if h.cancelled.is_set()]:
                    self._waiting.remove(handle)
                    handle.push(Delta("", [], len(handle.request.prompt_ids), 0, finish_reason="abort"))
            began = time.monotonic()
            running = len(rows)
            rows = [row for row in rows if not self._step(row)]
            self._running_count = len(rows)
            if running and self.observer is not None:
                self.observer.step(running, len(self._waiting), 0, running, time.monotonic() - began)

    def _step(self, row: _Row) -> bool:
        """One token for one row; True when the row is done."""
        done = self._advance(row)
        if done and self.observer is not None:
            request, delta = row.handle.request, row.last
            self.observer.request_finished(
                request.adapter,
                delta.finish_reason,
                delta.prompt_tokens,
                delta.completion_tokens,
                time.monotonic() - row.started,
            )
        return done

    def _advance(self, row: _Row) -> bool:
        def push(delta: Delta) -> None:
            row.last = delta
            row.handle.push(delta)

        request = row.handle.request
        prompt_tokens = len(request.prompt_ids)
        if row.handle.cancelled.is_set():
            push(Delta("", [], prompt_tokens, row.generated, finish_reason="abort"))
            return True
        if request.adapter in self.failing:
            push(
                Delta("", [], prompt_tokens, 0, "error", f"adapter {request.adapter!r} failed to load", error_kind=503)
            )
            return True
        token = request.prompt_ids[row.generated % prompt_tokens]
        row.generated += 1
        ids = [request.prompt_ids[i % prompt_tokens] for i in range(row.generated)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        finish = None
        stops = [text.find(s) for s in request.sampling.stop if s in text]
        if stops:
            text, finish = text[: min(stops)], "stop"
        elif row.generated >= request.sampling.max_tokens:
            finish = "length"
        elif row.generated >= prompt_tokens and not request.sampling.ignore_eos:
            finish = "stop"  # the whole prompt echoed: the double's "end of sequence"
        if finish is None:
            # Hold back a possible stop string's beginning, and a cut multi-byte character.
            hold = max((len(s) - 1 for s in request.sampling.stop), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
        new = text[len(row.sent_text) :] if len(text) >= len(row.sent_text) else ""
        row.sent_text += new
        push(Delta(new, [token], prompt_tokens, row.generated, finish_reason=finish))
        return finish is not None
