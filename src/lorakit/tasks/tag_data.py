"""Token-classification data: ``{"tokens": [words], "tags": [one tag per word]}`` lines, and the
alignment of word tags to sub-tokens.

Tags are strings (``"B-PER"``) or integers; their order follows the rules of sequence
classification (`classify_data`: ``--labels``, else 0..max for integer tags, else first seen),
and every line is checked before training with the same reader, so that all bad lines (a tag
list of the wrong length, a missing key, a validation tag the training data lacks) are reported
together with file and line.

Alignment, the Hugging Face convention: each word's FIRST sub-token carries the word's tag, its
other sub-tokens and the special tokens carry -100 (ignored by the loss and the metrics). A
tokenizer with ``word_ids()`` (a fast one) tokenizes the word list in one call
(``is_split_into_words=True``); any other is called word by word and the pieces joined. Either
way the words are spaced as running text tokenizes them: byte-level BPE (GPT-2, Llama 3, SmolLM)
marks a word's leading space in its first piece (``Ġworld``), so every word but the first gets
a leading space where that reproduces the sentence's own tokenization (`word_spacing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data.records import Problems
from ..errors import DataError
from .classify_data import label_problem, read_items

IGNORE = -100  # the label cross-entropy and the metrics skip


@dataclass
class TaggedWords:
    tokens: list[str]  # the words
    tags: list[str]  # one per word, as the data spells them; ints as their decimal string
    where: str = ""  # "FILE:line N"
    is_int: bool = False  # every tag an integer

    @property
    def labels(self) -> list[str]:
        return self.tags


def read_tagged(path) -> list[TaggedWords]:
    """Every row of a JSONL file (or a JSON list) as `TaggedWords`; DataError naming each bad line."""
    return read_items(path, _parse, "token-classification data")


def _parse(row: Any, where: str, problems: Problems) -> TaggedWords | None:
    if not isinstance(row, dict):
        problems.add(where, f"expected an object with tokens and tags, got {type(row).__name__}")
        return None
    words, tags = row.get("tokens"), row.get("tags")
    n = len(problems)
    for key, value in (("tokens", words), ("tags", tags)):
        if not isinstance(value, list) or not value:
            what = "missing" if value is None else f"not a non-empty list ({value!r:.60})"
            problems.add(where, f"{key!r} is {what}: give one word per item in 'tokens' and its tag in 'tags'")
    if len(problems) > n:
        return None
    for i, word in enumerate(words):
        if not isinstance(word, str) or not word.strip():
            problems.add(where, f"tokens[{i}] is {word!r}: every word must be a non-empty string")
    for i, tag in enumerate(tags):
        wrong = label_problem(tag)
        if wrong:
            problems.add(where, f"tags[{i}] is {wrong}")
    if len(words) != len(tags):
        problems.add(where, f"{len(tags)} tags for {len(words)} tokens: give exactly one tag per word")
    if len(problems) > n:
        return None
    return TaggedWords(list(words), [str(tag) for tag in tags], is_int=all(isinstance(t, int) for t in tags))


# A two-word sentence whose pieces show whether words after the first need a leading space.
_PROBE = ("Hello", "world")


def word_spacing(tokenizer) -> str:
    """``" "`` when words after the first must carry a leading space to tokenize as the sentence
    does (byte-level BPE), else ``""`` (WordPiece, SentencePiece and any tokenizer where both
    spellings agree)."""
    sentence = tokenizer(" ".join(_PROBE), add_special_tokens=False)["input_ids"]
    plain = _pieces(tokenizer, list(_PROBE), "")[0]
    if plain == sentence:
        return ""
    return " " if _pieces(tokenizer, list(_PROBE), " ")[0] == sentence else ""


def _has_word_ids(tokenizer) -> bool:
    return bool(getattr(tokenizer, "is_fast", False))


def _pieces(tokenizer, words: list[str], space: str) -> tuple[list[int], list[int]]:
    """``(ids, word index per id)`` of ``words`` without special tokens."""
    spaced = [word if i == 0 else space + word for i, word in enumerate(words)]
    if _has_word_ids(tokenizer):
        encoded = tokenizer(spaced, is_split_into_words=True, add_special_tokens=False)
        return list(encoded["input_ids"]), list(encoded.word_ids())
    ids, index = [], []
    for i, word in enumerate(spaced):
        piece = tokenizer(word, add_special_tokens=False)["input_ids"]
        ids += piece
        index += [i] * len(piece)
    return ids, index


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (``[CLS]``/``[SEP]``, BOS),
    found around a probe's tokens since tokenizer APIs differ in how they would say so."""
    bare = tokenizer(_PROBE[0], add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE[0])["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare) :])
    return [], []  # the specials merged into the text's pieces: add none rather than guess


class WordAligner:
    """Tokenizes tagged words into ``input_ids`` and per-token ``labels`` (see the module
    docstring). The tokenizer is probed once (`word_spacing`, `special_tokens`)."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.space = word_spacing(tokenizer)
        self.before, self.after = special_tokens(tokenizer)
        room = max_length - len(self.before) - len(self.after)
        if room < 1:
            raise DataError(f"max_length={max_length} leaves no room for a word beside the special tokens")
        self.room = room

    def __call__(self, words: list[str], tags: list[int]) -> dict:
        """``{"input_ids": (T,), "labels": (T,), "n_words": words kept, "truncated": bool}``;
        labels hold ``tags[w]`` at word w's first sub-token and -100 elsewhere. Raises DataError
        for a word that tokenizes to nothing (it could carry no tag)."""
        ids, word_of = _pieces(self.tokenizer, words, self.space)
        empty = sorted(set(range(len(words))) - set(w for w in word_of if w is not None))
        if empty:
            raise DataError(f"word {empty[0]} ({words[empty[0]]!r}) tokenizes to nothing, so it cannot carry a tag")
        truncated = len(ids) > self.room
        ids, word_of = ids[: self.room], word_of[: self.room]
        labels, previous = [], None
        for w in word_of:
            labels.append(IGNORE if w is None or w == previous else tags[w])
            previous = w
        n_specials = len(self.before), len(self.after)
        return {
            "input_ids": [*self.before, *ids, *self.after],
            "labels": [IGNORE] * n_specials[0] + labels + [IGNORE] * n_specials[1],
            "n_words": len(set(w for w in word_of if w is not None)),
            "truncated": truncated,
        }
