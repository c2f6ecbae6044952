"""Rendering records to text, split into supervised and unsupervised segments.

A record becomes a list of `Segment`s whose texts concatenate to exactly what the model reads.
Supervised segments are the completion / assistant turns (plus their end-of-turn marker, so the
model learns to stop); everything else (system prompt, user turns, template scaffolding) is
context only.

Assistant spans are found without the template's ``{% generation %}`` markers (few templates
have them): the conversation is rendered prefix by prefix. The text of ``messages[:i]`` with
``add_generation_prompt=True`` must be a prefix of the full rendering; the assistant turn ``i``
starts right after it, which is exactly where generation starts at inference time. Templates that
are not prefix-consistent (e.g. ones that inject a default system prompt only when messages exist)
fall back to locating the assistant's text in the full rendering.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

from .records import Record
from .stop_tokens import stop_token_ids

log = logging.getLogger("lorakit.data.render")


class RenderError(Exception):
    """A record could not be rendered with this tokenizer (collected into a DataError upstream)."""


@dataclass
class Segment:
    """A piece of the rendered example. ``append_eos``: add the EOS token id after its tokens
    (used when neither the template nor the text ends the turn with a stop token)."""

    text: str
    supervised: bool
    append_eos: bool = False


class EvalPair(NamedTuple):
    """A rendered prompt (ready for generation) and the reference answer it should produce."""

    prompt: str
    reference: str


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


class Renderer:
    """Renders records for one tokenizer; tokenizer facts (stop tokens, BOS) are looked up once."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.chat = has_chat_template(tokenizer)
        ids = stop_token_ids(tokenizer)
        self.stop_strings = [t for t in tokenizer.convert_ids_to_tokens(ids) if t]
        self.has_eos = tokenizer.eos_token_id is not None
        self.bos_text = self._bos_text()

    def _bos_text(self) -> str:
        """The BOS token as text when the tokenizer adds one by default (Llama-style).

        Plain (template-less) renderings put it in the *text*, as chat templates do with
        ``{{ bos_token }}``, so the evaluation prompt string carries it too and is tokenized with
        ``add_special_tokens=False`` everywhere.
        """
        tok = self.tokenizer
        if tok.bos_token_id is None or not tok.bos_token:
            return ""
        ids = tok("x", add_special_tokens=True)["input_ids"]
        return tok.bos_token if ids and ids[0] == tok.bos_token_id else ""

    # -- training -----------------------------------------------------------------------------

    def segments(self, record: Record) -> list[Segment]:
        """The record's text as supervised / unsupervised segments (raises RenderError)."""
        if record.kind == "text":
            return [Segment(self.bos_text + (record.text or ""), True, append_eos=self.has_eos)]
        if record.kind == "prompt_completion":
            if self.chat:
                return self._chat_segments(_as_messages(record))
            # Without a template the two strings are simply concatenated: the user's data must
            # carry its own separator (e.g. a prompt ending in "\nAnswer: ").
            return [
                Segment(self.bos_text + (record.prompt or ""), False),
                Segment(record.completion or "", True, append_eos=self.has_eos),
            ]
        if not self.chat:
            raise RenderError(
                "chat records need a tokenizer with a chat template, and this one has none; "
                "use prompt/completion records or set tokenizer.chat_template"
            )
        return self._chat_segments(record.messages or [])

    def _chat_segments(self, messages: list[dict[str, str]]) -> list[Segment]:
        full = self._apply(messages, generation_prompt=False)
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        segments: list[Segment] = []
        cursor = 0
        for i in assistant_turns:
            start, end, stopped = self._assistant_span(full, messages, i, cursor)
            segments.append(Segment(full[cursor:start], False))
            # Only the final turn gets an explicit EOS when the template has no end marker:
            # the model has to stop after the last answer, and generation stops at EOS.
            segments.append(
                Segment(full[start:end], True, append_eos=not stopped and i == assistant_turns[-1] and self.has_eos)
            )
            cursor = end
        segments.append(Segment(full[cursor:], False))
        return [s for s in segments if s.text or s.append_eos]

    def _assistant_span(self, full: str, messages: list[dict[str, str]], i: int, cursor: int) -> tuple[int, int, bool]:
        """``(start, end, ends_with_stop_token)`` of assistant turn ``i`` in ``full``."""
        content = messages[i]["content"].strip()  # some templates trim the content
        start = None
        try:
            prefix = self._apply(messages[:i], generation_prompt=True) if i else None
        except Exception:  # noqa: BLE001 - templates may reject partial conversations; fall back below
            prefix = None
        if prefix is not None and len(prefix) >= cursor and full.startswith(prefix):
            start = len(prefix)
        found = full.find(content, _after_turns(full, messages[:i], cursor) if start is None else start)
        if found < 0:
            raise RenderError(
                f"the chat template changed the text of assistant turn messages[{i}], "
                f"so its tokens cannot be located for the loss mask"
            )
        if start is None:
            start = found
        end = found + len(content)
        # Supervise the template's end-of-turn token (e.g. <|im_end|>) right after the content:
        # predicting it is what makes the fine-tuned model stop.
        best = None
        for stop in self.stop_strings:
            at = full.find(stop, end)
            if at >= 0 and not full[end:at].strip() and (best is None or at < best[0]):
                best = (at, at + len(stop))
        return (start, best[1], True) if best else (start, end, False)

    def _apply(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        if not isinstance(text, str):  # defensive: some versions return a list for batched input
            raise RenderError(f"apply_chat_template returned {type(text).__name__}, expected text")
        return text

    # -- evaluation and generation ------------------------------------------------------------

    def prompt(self, user_text: str) -> str:
        """``user_text`` rendered as the text a completion follows in training: one user turn with
        the generation prompt, or, without a template, the text itself after the BOS text."""
        if self.chat:
            return self._apply([{"role": "user", "content": user_text}], generation_prompt=True)
        return self.bos_text + user_text

    def conversation_prompt(self, messages: list[dict[str, str]]) -> str:
        """A conversation so far (its last message the user's) rendered for the next assistant
        turn. Without a chat template there is no way to mark turns, so the last user message
        stands alone, rendered as ``prompt`` does (what a completion-trained adapter expects)."""
        if self.chat:
            return self._apply(messages, generation_prompt=True)
        return self.prompt(messages[-1]["content"])

    def eval_pair(self, record: Record) -> EvalPair | None:
        """(rendered prompt, reference) for records with a final answer; None for the others."""
        if record.kind == "prompt_completion":
            return EvalPair(self.prompt(record.prompt or ""), (record.completion or "").strip())
        if record.kind == "chat" and record.messages and record.messages[-1]["role"] == "assistant" and self.chat:
            prompt = self._apply(record.messages[:-1], generation_prompt=True)
            return EvalPair(prompt, record.messages[-1]["content"].strip())
        return None


def _after_turns(full: str, earlier: list[dict[str, str]], cursor: int) -> int:
    """Where the text of the ``earlier`` messages since the last assistant turn ends in ``full``
    (``cursor`` is where that assistant turn ended).

    Without a usable prefix the assistant's text is searched for, and it must not be found inside
    an earlier turn (a user asking "Say Paris" before the answer "Paris"): each earlier message's
    text is located in order first. A message the template rewrote is skipped.
    """
    last_assistant = max((j for j, m in enumerate(earlier) if m["role"] == "assistant"), default=-1)
    position = cursor
    for message in earlier[last_assistant + 1 :]:
        at = full.find(message["content"].strip(), position)
        if at >= 0:
            position = at + len(message["content"].strip())
    return position


def _as_messages(record: Record) -> list[dict[str, str]]:
    return [{"role": "user", "content": record.prompt or ""}, {"role": "assistant", "content": record.completion or ""}]


def eval_pairs(records: list[Record], tokenizer: Any) -> list[EvalPair]:
    """For exact-match evaluation: ``(prompt, reference)`` per prompt/completion record, and per
    chat record whose last turn is the assistant's (the prompt is every earlier turn rendered
    with ``add_generation_prompt=True``; the reference is the stripped final answer).

    Other records (plain text, chats ending in a user turn) have no reference and are skipped,
    so the result lines up with ``records`` only when all records have one (e.g. the demo data).
    Prompts are text to be tokenized with ``add_special_tokens=False``, as `generate_batch` does.
    """
    renderer = Renderer(tokenizer)
    pairs = [renderer.eval_pair(r) for r in records]
    skipped = sum(p is None for p in pairs)
    if skipped:
        log.info("eval pairs: %d of %d records have no final answer to compare and were skipped", skipped, len(records))
    return [p for p in pairs if p is not None]
