"""Packing: concatenate tokenized examples into fixed-length blocks (no padding wasted).

Each token keeps its own label, so the loss mask of every example survives packing: prompt
tokens stay -100, completion tokens stay supervised.

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


def pack_examples(examples: list[dict[str, list[int]]], block_size: int) -> list[dict[str, list[int]]]:
    """Blocks of exactly ``block_size`` tokens (the last one may be shorter), in input order.

    A block whose labels are all -100 (possible at the tail, or when a long prompt spans a
    whole block) is dropped, since it would add no loss and only cost compute.
    """
    if block_size < 2:
        raise ConfigError(f"block_size must be at least 2 tokens, got {block_size}")
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        ids.extend(example["input_ids"])
        labels.extend(example["labels"])
    blocks = []
    skipped = 0
    for start in range(0, len(ids), block_size):
        block_labels = labels[start:start + block_size]
        # Position 0's label is never used by a causal LM (it predicts t+1 from t).
        if all(label == IGNORE for label in block_labels[1:]):
            skipped += 1
            continue
        blocks.append({"input_ids": ids[start:start + block_size], "labels": block_labels})
    log.info("packed %d examples (%d tokens) into %d blocks of %d tokens%s", len(examples), len(ids),
             len(blocks), block_size, f"; {skipped} blocks without supervised tokens dropped" if skipped else "")
    return blocks
