"""`tokenize_records`: records -> training examples with loss masks, plus `DatasetStats`.

An example is ``{"input_ids": [...], "labels": [...]}`` with ``labels[i] == input_ids[i]`` on
supervised tokens and -100 elsewhere (the value Hugging Face models ignore in the loss).
Supervised means: the completion of prompt/completion records, assistant turns of chats, and
every token of text records; each time with the end-of-turn / EOS token, so the model learns to
stop.

Segments are tokenized one by one and concatenated, so the prompt part is tokenized exactly as
the evaluation/generation prompt will be (no token merges across the prompt/answer boundary).
Tokenizers that prepend a dummy space to every call (SentencePiece "▁" style) would corrupt that,
so for them the whole text is tokenized at once and the mask is set from character offsets: a
token is supervised when any of its characters, leading whitespace aside, is (`_token_segment`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import DataError
from .packing import IGNORE, pack_examples
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

    encode = _encode_joint if _adds_dummy_prefix(tokenizer) else _encode_segments
    stats = DatasetStats(n_records=len(records), max_length=max_length, packed=packing)
    examples = []
    for ids, labels in encode(tokenizer, rendered):
        if max_length is not None and len(ids) > max_length:
            stats.n_truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
            if _n_supervised(labels) == 0:
                stats.n_dropped_all_truncated += 1
                continue
        elif _n_supervised(labels) == 0:
            stats.n_dropped_no_supervised += 1
            continue
        stats.total_tokens += len(ids)
        stats.supervised_tokens += _n_supervised(labels)
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


def _n_supervised(labels: list[int]) -> int:
    # Position 0 never contributes: a causal LM predicts token t from the tokens before it.
    return sum(1 for label in labels[1:] if label != IGNORE)


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


def _encode_joint(tokenizer: Any, rendered: list[list[Segment]]):
    """Tokenize each example's whole text once and label each token by `_token_segment`.
    EOS is inserted after the last token of an ``append_eos`` segment."""
    for segments in rendered:
        text = "".join(s.text for s in segments)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans, pos = [], 0
        for s in segments:
            spans.append((pos, pos + len(s.text), s))
            pos += len(s.text)
        ids: list[int] = []
        labels: list[int] = []
        pending_eos = None
        for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            segment = _token_segment(text, start, end, spans) or segments[-1]
            if pending_eos is not None and segment is not pending_eos:
                ids.append(tokenizer.eos_token_id)
                labels.append(tokenizer.eos_token_id)
                pending_eos = None
            ids.append(token_id)
            labels.append(token_id if segment.supervised else IGNORE)
            if segment.append_eos:
                pending_eos = segment
        if pending_eos is not None:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        yield ids, labels


def _token_segment(text: str, start: int, end: int, spans: list[tuple[int, int, Segment]]) -> Segment | None:
    """The segment a token covering ``text[start:end]`` belongs to (None past the end).

    A SentencePiece token carries the space before its word ("▁yes" covers " yes"), and that
    space may be the prompt's last character ("[INST] q [/INST] " + "yes"). Judged by its first
    character, such a token would be masked as prompt, and a one-token answer would lose its only
    token. So leading whitespace is skipped, and a token that reaches into a supervised segment
    belongs to it: a token straddling the prompt/answer boundary is learned rather than lost.
    An all-whitespace token stays with the segment of its first character.
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
    """True when tokenizing "a" alone yields a token with a leading SentencePiece space."""
    try:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])
    except Exception:  # noqa: BLE001 - a tokenizer we cannot probe: assume the common (byte-level) case
        return False
    return bool(tokens) and isinstance(tokens[0], str) and tokens[0].startswith("\u2581")
