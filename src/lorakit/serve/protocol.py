"""The OpenAI wire format the server speaks: request bodies, response objects, streaming chunks
and error bodies, for ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

Request bodies ignore fields they do not know (OpenAI and vLLM clients send many: ``user``,
``metadata``, vLLM's ``add_generation_prompt`` ...); fields the server knows but cannot honour
(``n`` > 1, ``logprobs``, ``echo``, penalties, ``logit_bias``) are refused with a 400 naming the
field rather than silently answered with something else. Responses go out through ``dump``,
which leaves out what OpenAI's API leaves out: ``usage`` where there is none (chunks, unless
``stream_options.include_usage`` asked), and a chat chunk's empty delta fields.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# OpenAI's error ``type`` per HTTP status (clients branch on the status; the type is for humans).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """``{"error": {"message", "type", "param", "code"}}``, OpenAI's error body."""

    error: ErrorDetail


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return ErrorBody(
        error=ErrorDetail(
            message=message, type=ERROR_TYPES.get(status, "invalid_request_error"), param=param, code=code
        )
    ).model_dump()


MAX_STOP_STRINGS = 16  # OpenAI takes 4; vLLM any number


class _Lenient(BaseModel):
    """Unknown fields are dropped, as OpenAI and vLLM do."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    """What both endpoints share: which model (base or adapter), how to sample, whether to stream.
    An explicit null means the default, as in OpenAI's API (some clients send every field)."""

    model: str | None = None  # None: the base model (vLLM picks its first model too)
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1
    top_p: float | None = Field(None, gt=0, le=1)  # None: 1
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = False  # vLLM's extension, used by load tests for fixed-length answers

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("n must be 1: this server returns one choice per request (send n requests instead)")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("presence and frequency penalties are not supported; leave them at 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        strings = [value] if isinstance(value, str) else value or []
        if any(not s for s in strings):
            raise ValueError("stop strings must not be empty")
        if len(strings) > MAX_STOP_STRINGS:  # each one is checked at every generated token
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_values(self) -> dict:
        """temperature, top_p, ignore_eos with nulls read as their defaults."""
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "ignore_eos": bool(self.ignore_eos),
        }

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. ``prompt``: a string, a list of one string, a list of token ids, or a
    list of one list of token ids (batches of prompts are refused: send one request each)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        if isinstance(prompt, str):
            return prompt
        if prompt and all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) != 1:
                raise ValueError("one prompt per request: send a request for each prompt")
            return prompt[0]
        if any(i < 0 for i in prompt):
            raise ValueError("token ids must not be negative")
        return prompt

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.logprobs is not None:
            raise ValueError("logprobs are not supported by this server")
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.best_of not in (None, 1):
            raise ValueError("best_of must be 1")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        return self


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict[str, str]:
        """The message as the chat template takes it: text parts joined, OpenAI's "developer"
        role (its new name for system) as "system", which every chat template knows."""
        if isinstance(self.content, list):
            text = "".join(part.text for part in self.content)
        else:
            text = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions. ``max_completion_tokens`` (OpenAI's newer name) wins over
    ``max_tokens``; with neither, the answer may run to the server's cap."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported by this server")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadAdapterRequest(_Lenient):
    """POST /v1/load_lora_adapter, as vLLM takes it."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(_Lenient):
    """POST /v1/unload_lora_adapter, as vLLM takes it (``lora_int_id`` is not used)."""

    lora_name: str = Field(min_length=1)


# ---- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """``cmpl-...`` / ``chatcmpl-...``: unguessable, so one client cannot name another's request."""
    return f"{prefix}-{secrets.token_hex(16)}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, and (``object`` the same, ``choices`` one delta each) a streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of GET /v1/models, as vLLM lists them: adapters have ``parent`` = the base id."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lorakit"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict:
    """The wire form of a response object (see the module's docstring)."""
    data = model.model_dump()
    if data.get("usage", 0) is None:
        del data["usage"]
    for choice in data.get("choices", ()):
        if "delta" in choice:
            choice["delta"] = {key: value for key, value in choice["delta"].items() if value is not None}
    return data
