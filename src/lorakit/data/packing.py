"""Packing: put several tokenized examples into one block of at most ``block_size`` tokens.

Greedy, in input order: whole examples are added to the current block while they fit, and the
next block starts when one does not. An example is never split across blocks, so its answer is
always trained in the same block as its prompt, and no block starts mid-example: a block's first
token, whose label a causal LM never uses (nothing precedes it), is an example's first token,
which is not trained unpacked either. Each token keeps its own label, so the loss mask of every
example survives: prompt tokens stay -100, completion tokens stay supervised.

Blocks are not padded here (their lengths vary up to ``block_size``); the `Collator` pads each
batch with -100 labels and a zero attention mask.

Note on attention: a packed block is one sequence to the model, so tokens of an example can
attend to the examples before it in the same block (there is no block-diagonal mask), and
position ids run on across example boundaries. Each example ends with EOS, which in practice
teaches the model that text after EOS is unrelated; the usual trade-off is a little
cross-example leakage for much less padding. Leave packing off for short runs on small data or
when exact per-example behaviour matters.
"""

from __future__ import annotations

import logging

from ..errors import ConfigError

log = logging.getLogger("lorakit.data.packing")

IGNORE = -100


def truncate(ids: list[int], labels: list[int], max_length: int | None) -> tuple[list[int], list[int], bool]:
    """``(ids, labels, was_truncated)``: the example cut from the right to at most ``max_length``
    tokens (None: no limit). The one truncation rule of `tokenize_records` and `pack_examples`."""
    if max_length is None or len(ids) <= max_length:
        return ids, labels, False
    return ids[:max_length], labels[:max_length], True


def n_supervised(labels: list[int]) -> int:
    """How many tokens contribute to the loss. Position 0 never does: a causal LM predicts token
    t from the tokens before it, and nothing precedes the first (of an example or of a block)."""
    return sum(1 for label in labels[1:] if label != IGNORE)


def pack_examples(examples: list[dict[str, list[int]]], block_size: int) -> list[dict[str, list[int]]]:
    """Blocks of whole examples, each block at most ``block_size`` tokens, in input order.

    An example longer than ``block_size`` is truncated from the right to ``block_size`` tokens
    (as ``tokenize_records(max_length=...)`` does) and fills a block alone. An example with no
    supervised token after its first (e.g. its answer was truncated away) is dropped, since it
    would add no loss and only cost compute.
    """
    if block_size < 2:
        raise ConfigError(f"block_size must be at least 2 tokens, got {block_size}")
    blocks: list[dict[str, list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    truncated = skipped = n_tokens = 0
    for example in examples:
        example_ids, example_labels, was_truncated = truncate(example["input_ids"], example["labels"], block_size)
        truncated += was_truncated
        # Its first label is unused when it starts a block, so it cannot be all it has to learn.
        if n_supervised(example_labels) == 0:
            skipped += 1
            continue
        if len(ids) + len(example_ids) > block_size:
            blocks.append({"input_ids": ids, "labels": labels})
            ids, labels = [], []
        ids.extend(example_ids)
        labels.extend(example_labels)
        n_tokens += len(example_ids)
    if ids:
        blocks.append({"input_ids": ids, "labels": labels})
    notes = [f"{truncated} examples truncated to the block size"] if truncated else []
    notes += [f"{skipped} examples without supervised tokens dropped"] if skipped else []
    fill = n_tokens / (len(blocks) * block_size) if blocks else 0.0
    log.info(
        "packed %d examples (%d tokens) into %d blocks of at most %d tokens (%.0f%% full)%s",
        len(examples) - skipped,
        n_tokens,
        len(blocks),
        block_size,
        100 * fill,
        "; " + ", ".join(notes) if notes else "",
    )
    return blocks
