"""`tokenize_records`: records -> training examples with loss masks, plus `DatasetStats`.

An example is ``{"input_ids": [...], "labels": [...]}`` with ``labels[i] == input_ids[i]`` on
supervised tokens and -100 elsewhere (the value Hugging Face models ignore in the loss).
Supervised means: the completion of prompt/completion records, assistant turns of chats, and
every token of text records; each time with the end-of-turn / EOS token, so the model learns to
stop.

The prompt is tokenized exactly as generation tokenizes it (the rendered text alone, with
``add_special_tokens=False``), and the answer's tokens follow as the model has to produce them
after it: no token merges across the prompt/answer boundary. For most tokenizers that is each
segment tokenized alone and concatenated. Tokenizers that prepend a dummy space to every call
(SentencePiece "▁" style, or byte-level "Ġ" with ``add_prefix_space``) need more care, see
`_encode_chunks`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import DataError
from .packing import IGNORE, n_supervised, pack_examples, truncate
from .records import Problems, Record
from .render import Renderer, Segment

log = logging.getLogger("lorakit.data.tokenize")


@dataclass
class DatasetStats:
    """What tokenization did to the data. Token counts are of the kept examples, before packing;
    ``supervised_tokens`` counts the tokens that contribute to the loss."""

    n_records: int = 0
    n_examples: int = 0  # what is returned: examples, or blocks when packed
    n_truncated: int = 0
    n_dropped_all_truncated: int = 0
    n_dropped_no_supervised: int = 0
    total_tokens: int = 0
    supervised_tokens: int = 0
    max_tokens: int = 0
    max_length: int | None = None
    packed: bool = False

    @property
    def mean_tokens(self) -> float:
        kept = self.n_records - self.n_dropped_all_truncated - self.n_dropped_no_supervised
        return self.total_tokens / kept if kept else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_tokens": round(self.mean_tokens, 2)}

    def summary(self) -> str:
        text = (f"{self.n_records} records -> {self.n_examples} {'blocks' if self.packed else 'examples'}, "
                f"{self.total_tokens} tokens (mean {self.mean_tokens:.1f}, max {self.max_tokens}), "
                f"{self.supervised_tokens} supervised")
        if self.n_truncated:
            text += f"; {self.n_truncated} truncated to max_length={self.max_length}"
        if self.n_dropped_all_truncated:
            text += f", {self.n_dropped_all_truncated} dropped (answer entirely cut off)"
        return text


def tokenize_records(records: list[Record], tokenizer: Any, max_length: int | None = None,
                     packing: bool = False) -> tuple[list[dict[str, list[int]]], DatasetStats]:
    """Tokenize ``records`` with loss masks; returns ``(examples, stats)``.

    ``max_length`` truncates each example from the right; examples whose supervised tokens were
    all cut off are dropped (and counted). ``packing=True`` (needs ``max_length``) puts whole
    examples, each truncated as above first, into blocks of at most ``max_length`` tokens, see
    `lorakit.data.packing`.

    Raises DataError up front for records the tokenizer cannot render (e.g. chat records without
    a chat template), and when no example survives truncation.
    """
    if not records:
        raise DataError("no records to tokenize (the dataset is empty)")
    if max_length is not None and max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    if packing and not max_length:
        raise DataError("packing needs max_length (the block size)")
    renderer = Renderer(tokenizer)
    problems = Problems("")
    rendered: list[list[Segment]] = []
    for i, record in enumerate(records):
        try:
            rendered.append(renderer.segments(record))
        except Exception as e:  # noqa: BLE001 - template errors come in many types; all are data problems
            problems.add(record.source or f"record {i + 1}", f"cannot render with this tokenizer: {e}")
    problems.raise_if_any("data for this tokenizer")

    encode = _encode_chunks if _adds_dummy_prefix(tokenizer) else _encode_segments
    stats = DatasetStats(n_records=len(records), max_length=max_length, packed=packing)
    examples = []
    for ids, labels in encode(tokenizer, rendered):
        ids, labels, was_truncated = truncate(ids, labels, max_length)
        stats.n_truncated += was_truncated
        if n_supervised(labels) == 0:
            if was_truncated:
                stats.n_dropped_all_truncated += 1
            else:
                stats.n_dropped_no_supervised += 1
            continue
        stats.total_tokens += len(ids)
        stats.supervised_tokens += n_supervised(labels)
        stats.max_tokens = max(stats.max_tokens, len(ids))
        examples.append({"input_ids": ids, "labels": labels})

    if not examples:
        why = (f"all {stats.n_dropped_all_truncated} had their answer cut off by max_length={max_length}; "
               f"raise max_length or shorten the prompts" if stats.n_dropped_all_truncated
               else "none has a token to learn from")
        raise DataError(f"no usable training examples: {why}")
    if packing:
        examples = pack_examples(examples, max_length)
    stats.n_examples = len(examples)
    log.info("tokenized: %s", stats.summary())
    if stats.n_dropped_all_truncated:
        log.warning("%d of %d examples dropped: max_length=%s cut off their whole answer",
                    stats.n_dropped_all_truncated, len(records), max_length)
    return examples, stats


def _encode_segments(tokenizer: Any, rendered: list[list[Segment]]):
    """Tokenize every segment separately (one batched call) and concatenate per example."""
    texts = [s.text for segments in rendered for s in segments]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    for segments in rendered:
        ids: list[int] = []
        labels: list[int] = []
        for segment in segments:
            piece = list(next(encoded))
            if segment.append_eos:
                piece.append(tokenizer.eos_token_id)
            ids.extend(piece)
            labels.extend(piece if segment.supervised else [IGNORE] * len(piece))
        yield ids, labels


# Plain text put before a text to tokenize it as a continuation: the dummy "▁" goes to the
# sentinel, and the tokens after it are the text's. Digits first: SentencePiece models split
# digits, so one never merges with what follows; the others are for a text it merges with.
_SENTINELS = ("0", "\n", ".", "|", "#", "~")


def _encode_chunks(tokenizer: Any, rendered: list[list[Segment]]):
    """For tokenizers that prepend a dummy "▁" (SentencePiece style) or "Ġ" (byte-level with
    ``add_prefix_space``) to every call.

    Tokenizing each segment alone would put a "▁" that is not in the text before every answer,
    and the whole text at once would merge tokens across the prompt/answer boundary
    (``"Answer: " + "Nairobi"`` -> ``":", "▁Nairobi"`` where generation sees ``":", "▁"``).
    So the text is cut into chunks where each supervised segment starts. The first chunk (the
    prompt) is tokenized alone, exactly as generation does; each later chunk (an answer and the
    context up to the next answer) is tokenized as a continuation (`_continuation`), without the
    dummy "▁". Within a chunk, tokens are labelled by their character offsets (`_token_segment`),
    and EOS is inserted after the tokens of an ``append_eos`` segment, even one with no text.
    """
    for segments in rendered:
        chunks: list[list[Segment]] = [[]]
        for s in segments:
            if s.supervised and chunks[-1]:
                chunks.append([])
            chunks[-1].append(s)
        ids: list[int] = []
        labels: list[int] = []
        after_text = False  # a chunk continues the text before it; only the very start is "▁"-prefixed
        for chunk in chunks:
            text = "".join(s.text for s in chunk)
            if after_text:
                chunk_ids, offsets = _continuation(tokenizer, text)
            else:
                enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                chunk_ids, offsets = enc["input_ids"], enc["offset_mapping"]
            after_text = after_text or bool(text)
            _label_chunk(tokenizer, chunk, text, chunk_ids, offsets, ids, labels)
        yield ids, labels


def _label_chunk(tokenizer: Any, chunk: list[Segment], text: str, chunk_ids: list[int],
                 offsets: list[tuple[int, int]], ids: list[int], labels: list[int]) -> None:
    """Append the chunk's tokens to ``ids``/``labels``, each labelled by its segment, and an EOS
    as each ``append_eos`` segment is left behind."""
    spans, pos = [], 0
    for s in chunk:
        spans.append((pos, pos + len(s.text), s))
        pos += len(s.text)
    index = {id(s): k for k, s in enumerate(chunk)}
    reached = 0  # segments before this one have been left: their EOS is placed

    def leave(upto: int) -> None:
        nonlocal reached
        for s in chunk[reached:upto]:
            if s.append_eos:
                ids.append(tokenizer.eos_token_id)
                labels.append(tokenizer.eos_token_id)
        reached = max(reached, upto)

    for token_id, (start, end) in zip(chunk_ids, offsets):
        k = index[id(_token_segment(text, start, end, spans) or chunk[-1])]
        leave(k)
        ids.append(token_id)
        labels.append(token_id if chunk[k].supervised else IGNORE)
    leave(len(chunk))


def _continuation(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``(ids, offsets)`` of ``text`` as tokenized after other text: with no dummy "▁" of its own.

    ``sentinel + text`` is tokenized and the sentinel's tokens (those starting before the text,
    the dummy "▁" among them) dropped. A sentinel is used only when no token spans it and the
    text: then no merge crossed the boundary, so the text's tokens are those it has after any text
    it does not merge with. Otherwise the next sentinel is tried; should every one merge with the
    text, the text is tokenized alone, dummy "▁" and all.
    """
    for sentinel in _SENTINELS:
        n = len(sentinel)
        enc = tokenizer(sentinel + text, add_special_tokens=False, return_offsets_mapping=True)
        pairs = list(zip(enc["input_ids"], enc["offset_mapping"]))
        if any(start < n < end for _, (start, end) in pairs):
            continue
        kept = [(token_id, (start - n, end - n)) for token_id, (start, end) in pairs if start >= n]
        return [t for t, _ in kept], [o for _, o in kept]
    log.warning("could not tokenize %r as a continuation; its first token may carry a dummy space", text[:40])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


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


def _adds_dummy_prefix(tokenizer: Any) -> bool:
    """True when tokenizing "a" alone yields a token with a leading space the text does not have:
    SentencePiece's "▁" (Llama-2, Mistral) or byte-level BPE's "Ġ" (``add_prefix_space=True``,
    RoBERTa-style). Such a tokenizer cannot tokenize an answer on its own without that space."""
    try:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])
    except Exception:  # noqa: BLE001 - a tokenizer we cannot probe: assume the common (byte-level) case
        return False
    return bool(tokens) and isinstance(tokens[0], str) and tokens[0].startswith(("\u2581", "\u0120"))
