"""`Record`: one training example as the user wrote it, before any tokenizer is involved.

Three record shapes are understood, matching what fine-tuning datasets usually look like:

* ``prompt_completion``: ``{"prompt": ..., "completion": ...}`` (loss on the completion only);
* ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (loss on assistant turns only);
* ``text``: ``{"text": ...}`` (loss on every token).

Two common instruction formats are read as ``chat`` records, rendered as the same conversation
written with ``messages`` would be:

* alpaca: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional, joined to the
  instruction after a blank line as alpaca's prompt does; an optional ``system`` column too);
* ShareGPT: ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}``
  (``human``/``gpt``/``system``, also ``user``/``assistant``, become user/assistant/system).

This module turns one parsed row (a dict) into a `Record` or into a list of problems. Problems
are collected by `Problems` so that a file with several mistakes is reported in one go, before
any training starts, instead of failing on the first bad line (or, worse, mid-run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError

log = logging.getLogger("lorakit.data.records")

KINDS = ("prompt_completion", "chat", "text")
ROLES = ("system", "user", "assistant", "tool")
# Every key a shape reads: what --data-columns may map a dataset's columns to.
FIELDS = ("prompt", "completion", "messages", "text", "instruction", "input", "output", "system", "conversations")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
# How many problems a DataError message spells out; the rest are only counted.
MAX_REPORTED = 5


@dataclass
class Record:
    """One example. ``kind`` says which of the other fields are set.

    ``source`` is ``"file:line"`` (or ``"file:row N"``) so later stages, such as rendering with a
    chat template, can still point at the offending line.
    """

    kind: str
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"unknown record kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    @classmethod
    def from_prompt_completion(cls, prompt: str, completion: str, source: str = "") -> Record:
        return cls("prompt_completion", prompt=prompt, completion=completion, source=source)

    @classmethod
    def from_messages(cls, messages: list[dict[str, str]], source: str = "") -> Record:
        return cls("chat", messages=[{"role": m["role"], "content": m["content"]} for m in messages], source=source)

    @classmethod
    def from_text(cls, text: str, source: str = "") -> Record:
        return cls("text", text=text, source=source)

    def to_dict(self) -> dict[str, Any]:
        """The record in its JSONL shape (what `read_records` reads back)."""
        if self.kind == "prompt_completion":
            return {"prompt": self.prompt, "completion": self.completion}
        if self.kind == "chat":
            return {"messages": [dict(m) for m in self.messages or []]}
        return {"text": self.text}


class Problems:
    """Collects ``(where, what)`` problems for one file and raises them as a single DataError.

    ``path`` prefixes every location; pass "" when each ``where`` already names its file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[tuple[str, str]] = []

    def add(self, where: str, what: str) -> None:
        self.items.append((where, what))

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self, what: str = "data") -> None:
        if not self.items:
            return
        n = len(self.items)
        prefix = f"{self.path}:" if self.path else ""
        shown = "\n".join(f"  {prefix}{where}: {msg}" for where, msg in self.items[:MAX_REPORTED])
        more = f"\n  ... and {n - MAX_REPORTED} more" if n > MAX_REPORTED else ""
        head = f"{self.path + ': ' if self.path else ''}{n} problem{'s' if n != 1 else ''} in the {what}"
        if n > MAX_REPORTED:
            head += f" (the first {MAX_REPORTED} shown)"
        raise DataError(f"{head}:\n{shown}{more}\nFix the file and run again; nothing was trained.")


def detect_kind(row: dict[str, Any]) -> str | None:
    """Which shape ``row`` claims to be, from its keys (None when it has none of them).

    The check is by key presence, not by validity, so that a row with ``"prompt"`` but no
    ``"completion"`` is reported as a missing key rather than as an unknown shape.
    """
    if "messages" in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "instruction" in row or "output" in row:  # before text: alpaca datasets often carry a "text" column too
        return "alpaca"
    if "text" in row:
        return "text"
    return None


EXPECTED = "'prompt' + 'completion', 'messages', 'text', alpaca 'instruction' + 'output', or ShareGPT 'conversations'"


def parse_row(row: Any, source: str, problems: Problems, where: str) -> Record | None:
    """Validate one row; on success return a Record, otherwise add problems and return None."""
    if not isinstance(row, dict):
        problems.add(where, f"expected a JSON object, got {_type_name(row)}")
        return None
    kind = detect_kind(row)
    if kind is None:
        keys = ", ".join(repr(k) for k in list(row)[:6]) or "none"
        problems.add(where, f"no recognised keys (has {keys}); expected {EXPECTED}")
        return None
    if kind == "prompt_completion":
        prompt = _text_field(row, "prompt", problems, where)
        completion = _text_field(row, "completion", problems, where)
        if prompt is None or completion is None:
            return None
        return Record.from_prompt_completion(prompt, completion, source)
    if kind == "text":
        text = _text_field(row, "text", problems, where)
        return None if text is None else Record.from_text(text, source)
    if kind == "alpaca":
        messages = _alpaca_messages(row, problems, where)
    elif kind == "sharegpt":
        messages = _messages(row["conversations"], problems, where, "conversations", "from", "value", SHAREGPT_ROLES)
        if messages is not None and isinstance(row.get("system"), str) and row["system"].strip():
            messages = [{"role": "system", "content": row["system"]}, *messages]
    else:
        messages = _messages(row["messages"], problems, where)
    return None if messages is None else Record("chat", messages=messages, source=source)


def _alpaca_messages(row: dict[str, Any], problems: Problems, where: str) -> list[dict[str, str]] | None:
    """An alpaca row as [system,] user, assistant: the user's message is the instruction, then the
    input (when there is one) after a blank line, as alpaca's prompt separates them."""
    instruction = _text_field(row, "instruction", problems, where)
    output = _text_field(row, "output", problems, where)
    extra = {}
    for key in ("input", "system"):  # optional; empty (or null, in a dataset's column) means none
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            problems.add(where, f"{key!r} must be a string, got {_type_name(value)}")
            return None
        extra[key] = value if value and value.strip() else None
    if instruction is None or output is None:
        return None
    user = instruction if extra["input"] is None else f"{instruction}\n\n{extra['input']}"
    system = [{"role": "system", "content": extra["system"]}] if extra["system"] else []
    return [*system, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _text_field(row: dict[str, Any], key: str, problems: Problems, where: str) -> str | None:
    if key not in row:
        problems.add(where, f"missing key {key!r}")
        return None
    value = row[key]
    if not isinstance(value, str):
        problems.add(where, f"{key!r} must be a string, got {_type_name(value)}")
        return None
    if not value.strip():
        problems.add(where, f"{key!r} is empty")
        return None
    return value


def _messages(
    value: Any,
    problems: Problems,
    where: str,
    name: str = "messages",
    role_key: str = "role",
    content_key: str = "content",
    roles: dict[str, str] | None = None,
    need_assistant: bool = True,
) -> list[dict[str, str]] | None:
    """The turns of a conversation; ``roles`` maps the format's role names to lorakit's (ShareGPT's
    ``from``: ``human`` is ``user``), None takes lorakit's own (`ROLES`). ``need_assistant``: a
    conversation without an assistant turn is a problem (a preference pair's prompt has none)."""
    roles = roles or {r: r for r in ROLES}
    if not isinstance(value, list):
        shape = f"{{{role_key}, {content_key}}}"
        problems.add(where, f"{name!r} must be a list of {shape} objects, got {_type_name(value)}")
        return None
    if not value:
        problems.add(where, f"{name!r} is empty")
        return None
    out: list[dict[str, str]] = []
    before = len(problems)
    for i, message in enumerate(value):
        at = f"{name}[{i}]"
        if not isinstance(message, dict):
            keys = f"{role_key!r} and {content_key!r}"
            problems.add(where, f"{at} must be an object with {keys}, got {_type_name(message)}")
            continue
        for key in (role_key, content_key):
            if key not in message:
                problems.add(where, f"{at} is missing key {key!r}")
        if role_key not in message or content_key not in message:
            continue
        role, content = message[role_key], message[content_key]
        if not isinstance(role, str) or role not in roles:
            problems.add(where, f"{at} has unknown {role_key} {role!r}; expected one of {', '.join(roles)}")
            continue
        role = roles[role]
        if not isinstance(content, str):
            problems.add(where, f"{at} ({role}) content must be a string, got {_type_name(content)}")
            continue
        if not content.strip():
            problems.add(where, f"{at} ({role}) content is empty")
            continue
        out.append({"role": role, "content": content})
    if len(problems) > before:
        return None
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        # Nothing would be supervised: the example would silently contribute no loss.
        problems.add(where, "conversation has no 'assistant' turn, so there is nothing to learn from it")
        return None
    return out


def parse_messages(
    value: Any, problems: Problems, where: str, name: str = "messages", need_assistant: bool = True
) -> list[dict[str, str]] | None:
    """A list of ``{role, content}`` messages checked as ``messages`` rows are (problems added, None
    when any); ``name`` is the key errors name."""
    return _messages(value, problems, where, name, need_assistant=need_assistant)


def type_name(value: Any) -> str:
    """How errors name a JSON value's type ("a list", "a number", "null")."""
    return _type_name(value)


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
