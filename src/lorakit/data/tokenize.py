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
``continuation.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import DataError
from .continuation import adds_dummy_prefix, encode_chunks
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

    @classmethod
    def of_examples(cls, examples: list[dict], supervised_tokens: int, max_length: int | None) -> DatasetStats:
        """The stats of examples tokenized one per record (the classification tasks), each a dict
        with ``input_ids`` and ``truncated``; ``supervised_tokens``: the labels they carry."""
        lengths = [len(e["input_ids"]) for e in examples]
        return cls(
            n_records=len(examples),
            n_examples=len(examples),
            n_truncated=sum(e["truncated"] for e in examples),
            total_tokens=sum(lengths),
            supervised_tokens=supervised_tokens,
            max_tokens=max(lengths, default=0),
            max_length=max_length,
        )

    @property
    def mean_tokens(self) -> float:
        kept = self.n_records - self.n_dropped_all_truncated - self.n_dropped_no_supervised
        return self.total_tokens / kept if kept else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_tokens": round(self.mean_tokens, 2)}

    def summary(self) -> str:
        text = (
            f"{self.n_records} records -> {self.n_examples} {'blocks' if self.packed else 'examples'}, "
            f"{self.total_tokens} tokens (mean {self.mean_tokens:.1f}, max {self.max_tokens}), "
            f"{self.supervised_tokens} supervised"
        )
        if self.n_truncated:
            text += f"; {self.n_truncated} truncated to max_length={self.max_length}"
        if self.n_dropped_all_truncated:
            text += f", {self.n_dropped_all_truncated} dropped (answer entirely cut off)"
        return text


def tokenize_records(
    records: list[Record], tokenizer: Any, max_length: int | None = None, packing: bool = False
) -> tuple[list[dict[str, list[int]]], DatasetStats]:
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

    stats = DatasetStats(n_records=len(records), max_length=max_length, packed=packing)
    examples = []
    for ids, labels in encode_segments(tokenizer, rendered):
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
        why = (
            f"all {stats.n_dropped_all_truncated} had their answer cut off by max_length={max_length}; "
            f"raise max_length or shorten the prompts"
            if stats.n_dropped_all_truncated
            else "none has a token to learn from"
        )
        raise DataError(f"no usable training examples: {why}")
    if packing:
        examples = pack_examples(examples, max_length)
    stats.n_examples = len(examples)
    log.info("tokenized: %s", stats.summary())
    if stats.n_dropped_all_truncated:
        log.warning(
            "%d of %d examples dropped: max_length=%s cut off their whole answer",
            stats.n_dropped_all_truncated,
            len(records),
            max_length,
        )
    return examples, stats


def encode_segments(tokenizer: Any, rendered: list[list[Segment]]) -> Iterator[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` of each rendered example (its `Segment`s), as training tokenizes it:
    labels are the ids on supervised segments and -100 elsewhere; no truncation."""
    encode = encode_chunks if adds_dummy_prefix(tokenizer) else _encode_segments
    yield from encode(tokenizer, rendered)


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
