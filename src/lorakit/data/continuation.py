"""Tokenizing prompts and answers for tokenizers that prepend a dummy space to every call.

SentencePiece-style tokenizers ("▁") and byte-level ones with ``add_prefix_space`` ("Ġ") give the
first token of every call a leading space. Tokenizing an answer alone would give it that space,
which the model does not produce after its prompt; so each text after the first is tokenized as
the continuation of a sentinel whose own tokens are then dropped (`encode_chunks`).
``tokenize.py`` sends such tokenizers here (`adds_dummy_prefix`); every other tokenizer takes
its segments one by one.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from typing import Any

from .packing import IGNORE
from .render import Segment

log = logging.getLogger("lorakit.data.tokenize")


# Plain text put before a text to tokenize it as a continuation: the dummy "▁" goes to the
# sentinel, and the tokens after it are the text's. Digits first: SentencePiece models split
# digits, so one never merges with what follows; the others are for a text it merges with.
_SENTINELS = ("0", "\n", ".", "|", "#", "~")
# The "sentinel" of the text's very start: none, so it is tokenized alone, dummy "▁" and all,
# exactly as generation tokenizes a prompt.
_AT_START = ("",)

# One chunk to tokenize: its segments, their text, and the sentinels to try before that text.
_Job = tuple[list[Segment], str, tuple[str, ...]]
_BATCH = 1024  # examples per batched tokenizer call


def encode_chunks(tokenizer: Any, rendered: list[list[Segment]]):
    """For tokenizers that prepend a dummy "▁" (SentencePiece style) or "Ġ" (byte-level with
    ``add_prefix_space``) to every call.

    Tokenizing each segment alone would put a "▁" that is not in the text before every answer,
    and the whole text at once would merge tokens across the prompt/answer boundary
    (``"Answer: " + "Nairobi"`` -> ``":", "▁Nairobi"`` where generation sees ``":", "▁"``).
    So the text is cut into chunks where each supervised segment starts (`_chunks`). The first
    chunk (the prompt) is tokenized alone, exactly as generation does; each later chunk (an answer
    and the context up to the next answer) as a continuation of the text before it, see
    `_sentinel_finder`.

    Fast tokenizers get a batch of chunks in one call and are cut by character offsets
    (`_encode_by_offsets`); slow ones have no offsets and are cut by comparing token ids
    (`_encode_by_ids`).
    """
    sentinels = _sentinel_finder(tokenizer)
    encode = _encode_by_offsets if getattr(tokenizer, "is_fast", False) else _encode_by_ids
    # Batches of examples rather than all at once: as fast, and the offsets (~100 bytes a token
    # as Python tuples) are held for one batch only.
    for first in range(0, len(rendered), _BATCH):
        chunked = [_chunks(segments) for segments in rendered[first : first + _BATCH]]
        encoded = iter(encode(tokenizer, _jobs(chunked, sentinels)))
        for chunks in chunked:
            yield _join(tokenizer, chunks, [next(encoded) for _ in chunks])


def _chunks(segments: list[Segment]) -> list[list[Segment]]:
    """``segments`` cut before each supervised one: every chunk is an answer followed by the
    context up to the next answer, except the first, which may be context (a prompt) only."""
    chunks: list[list[Segment]] = [[]]
    for s in segments:
        if s.supervised and chunks[-1]:
            chunks.append([])
        chunks[-1].append(s)
    return chunks


def _jobs(chunked: list[list[list[Segment]]], sentinels: Callable[[str], tuple[str, ...]]) -> list[_Job]:
    """Every chunk of every example, in order, with the sentinels for the text before it."""
    jobs = []
    for chunks in chunked:
        before = ""  # each example starts afresh
        for chunk in chunks:
            text = "".join(s.text for s in chunk)
            jobs.append((chunk, text, sentinels(before)))
            before = text or before
    return jobs


def _join(
    tokenizer: Any, chunks: list[list[Segment]], encoded: list[tuple[list[int], int]]
) -> tuple[list[int], list[int]]:
    """One example's ``(ids, labels)`` from its chunks' ``(ids, number of answer tokens)``: each
    chunk's answer tokens, supervised and followed by EOS when the answer asks for one (even an
    empty answer), then its context."""
    ids: list[int] = []
    labels: list[int] = []
    for chunk, (chunk_ids, n_answer) in zip(chunks, encoded):
        answer, context = chunk_ids[:n_answer], chunk_ids[n_answer:]
        if chunk[0].supervised and chunk[0].append_eos:
            answer = answer + [tokenizer.eos_token_id]
        ids += answer + context
        labels += answer + [IGNORE] * len(context)
    return ids, labels


def _sentinel_finder(tokenizer: Any) -> Callable[[str], tuple[str, ...]]:
    """``before -> the sentinels to try, in order, for a text that follows before``.

    At the very start there is none (`_AT_START`). After an added token (``[/INST]``,
    ``<|im_start|>``) the token itself comes first: the text after it is tokenized on its own in
    the whole text too, so this gives the tokens the whole text has there, which are those the
    model produces after that prompt (legacy Llama tokenizers put a "▁" after every special token;
    other tokenizers do not). After plain text, the `_SENTINELS`.
    """
    by_last_char: dict[str, list[str]] = {}  # a cheap look-up where there are hundreds of added tokens
    for token in sorted(getattr(tokenizer, "get_added_vocab", dict)(), key=len, reverse=True):
        if token:
            by_last_char.setdefault(token[-1], []).append(token)

    def sentinels(before: str) -> tuple[str, ...]:
        if not before:
            return _AT_START
        added = next((t for t in by_last_char.get(before[-1], ()) if before.endswith(t)), None)
        return (added, *_SENTINELS) if added else _SENTINELS

    return sentinels


def _encode_by_offsets(tokenizer: Any, jobs: list[_Job]) -> list[tuple[list[int], int]]:
    """``(ids, number of answer tokens)`` per chunk, for fast tokenizers: every chunk after its
    first sentinel in one batched call, the sentinel's tokens cut off by offsets; a chunk that
    sentinel merged with tries the others (`_continuation`)."""
    encoded = tokenizer(
        [sentinels[0] + text for _, text, sentinels in jobs], add_special_tokens=False, return_offsets_mapping=True
    )
    out = []
    for (chunk, text, sentinels), ids, offsets in zip(jobs, encoded["input_ids"], encoded["offset_mapping"]):
        cut = _after_sentinel(ids, offsets, len(sentinels[0]))
        ids, offsets = cut if cut is not None else _continuation(tokenizer, text, sentinels[1:])
        out.append((ids, _answer_length(chunk, text, offsets)))
    return out


def _continuation(
    tokenizer: Any, text: str, sentinels: tuple[str, ...] = _SENTINELS
) -> tuple[list[int], list[tuple[int, int]]]:
    """``(ids, offsets)`` of ``text`` as tokenized after other text: with no dummy "▁" of its own.

    ``sentinel + text`` is tokenized and the sentinel's tokens dropped (`_after_sentinel`), with
    the first sentinel no token spans together with the text: then no merge crossed the boundary,
    so the text's tokens are those it has after any text it does not merge with. Should every one
    merge with the text, the text is tokenized alone, dummy "▁" and all.
    """
    for sentinel in sentinels:
        enc = tokenizer(sentinel + text, add_special_tokens=False, return_offsets_mapping=True)
        cut = _after_sentinel(enc["input_ids"], enc["offset_mapping"], len(sentinel))
        if cut is not None:
            return cut
    log.warning("could not tokenize %r as a continuation; its first token may carry a dummy space", text[:40])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def _after_sentinel(
    ids: list[int], offsets: list[tuple[int, int]], n: int
) -> tuple[list[int], list[tuple[int, int]]] | None:
    """The tokens of ``sentinel + text`` (``n = len(sentinel)``) that are the text's, with offsets
    into the text: those starting in it (the dummy "▁" starts in the sentinel). None when a token
    spans both, that is when the sentinel merged with the text."""
    if n == 0:
        return list(ids), list(offsets)
    if any(start < n < end for start, end in offsets):
        return None
    kept = [(token_id, (start - n, end - n)) for token_id, (start, end) in zip(ids, offsets) if start >= n]
    return [t for t, _ in kept], [o for _, o in kept]


def _answer_length(chunk: list[Segment], text: str, offsets: list[tuple[int, int]]) -> int:
    """How many of the chunk's tokens are its answer's (0 for a prompt chunk): those
    `_token_segment` gives to the answer. They come first (a token goes to the answer or to the
    context after it, in text order), so the count is found by bisection."""
    if not chunk[0].supervised:
        return 0
    spans, pos = [], 0
    for s in chunk:
        spans.append((pos, pos + len(s.text), s))
        pos += len(s.text)

    def past_answer(i: int) -> bool:
        return (_token_segment(text, *offsets[i], spans) or chunk[-1]) is not chunk[0]

    return bisect.bisect_left(range(len(offsets)), True, key=past_answer)


def _encode_by_ids(tokenizer: Any, jobs: list[_Job]) -> list[tuple[list[int], int]]:
    """``(ids, number of answer tokens)`` per chunk, for tokenizers without offsets (slow,
    pure-Python ones): token boundaries are found by comparing token ids, see `_ids_after`.

    The answer's tokens are those of the answer alone (after the same sentinel) when the chunk's
    tokens start with them: always when a special token (``<|im_end|>``) ends the answer. Should a
    token span the end of the answer and the context after it (fast tokenizers give it to the
    answer), the two are tokenized apart instead: the answer as generated on its own, the context
    as its continuation.
    """
    out = []
    for chunk, text, sentinels in jobs:
        ids = _ids_after(tokenizer, text, sentinels)
        answer = chunk[0].text if chunk[0].supervised else ""
        answer_ids = _ids_after(tokenizer, answer, sentinels) if answer else []
        if ids[: len(answer_ids)] != answer_ids:
            ids = answer_ids + _ids_after(tokenizer, text[len(answer) :], _SENTINELS)
        out.append((ids, len(answer_ids)))
    return out


def _ids_after(tokenizer: Any, text: str, sentinels: tuple[str, ...]) -> list[int]:
    """`_continuation` by token ids: ``sentinel + text`` is cut after the sentinel's own tokens
    when it starts with them (then the first tokens are exactly the sentinel's text, so none spans
    the boundary); else the next sentinel is tried, and at last the text alone."""
    for sentinel in sentinels:
        before = tokenizer(sentinel, add_special_tokens=False)["input_ids"] if sentinel else []
        ids = tokenizer(sentinel + text, add_special_tokens=False)["input_ids"]
        if ids[: len(before)] == before:
            return ids[len(before) :]
    log.warning("could not tokenize %r as a continuation; its first token may carry a dummy space", text[:40])
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _token_segment(text: str, start: int, end: int, spans: list[tuple[int, int, Segment]]) -> Segment | None:
    """The segment a token covering ``text[start:end]`` belongs to (None past the end).

    A token that reaches into a supervised segment belongs to it: one straddling the end of an
    answer and the context after it ("s\n") is learned rather than lost. Leading whitespace does
    not count (a SentencePiece token "▁yes" carries the space before its word, which may end the
    segment before), and an all-whitespace token stays with the segment of its first character.
    """
    end = min(end, len(text))
    core = start
    while core < end and text[core].isspace():
        core += 1
    if core == end:  # all whitespace, or an empty span (some added tokens report (i, i))
        return next((s for a, b, s in spans if a <= start < b), None)
    overlapping = [s for a, b, s in spans if a < end and core < b]
    return next((s for s in overlapping if s.supervised), overlapping[0] if overlapping else None)


def adds_dummy_prefix(tokenizer: Any) -> bool:
    """True when tokenizing "a" alone yields a token with a leading space the text does not have:
    SentencePiece's "▁" (Llama-2, Mistral) or byte-level BPE's "Ġ" (``add_prefix_space=True``,
    RoBERTa-style). Such a tokenizer cannot tokenize an answer on its own without that space."""
    try:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])
    except Exception:  # noqa: BLE001 - a tokenizer we cannot probe: assume the common (byte-level) case
        return False
    return bool(tokens) and isinstance(tokens[0], str) and tokens[0].startswith(("\u2581", "\u0120"))
