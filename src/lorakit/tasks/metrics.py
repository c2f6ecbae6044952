"""Classification metrics without extra dependencies: accuracy and macro-F1; entity-level F1 of tag sequences."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """Share of predictions equal to the gold label (NaN for no examples)."""
    if not gold:
        return float("nan")
    return sum(p == g for p, g in zip(predicted, gold)) / len(gold)


def macro_f1(predicted: Sequence[int], gold: Sequence[int], n_labels: int) -> float:
    """Unweighted mean over labels of F1 = 2·TP / (2·TP + FP + FN).

    Labels that neither occur in ``gold`` nor are predicted are left out of the mean (their F1 is
    undefined, as in scikit-learn's ``zero_division`` handling, which would otherwise skew a
    validation set that lacks a rare label); NaN when no label is left.
    """
    scores = []
    for label in range(n_labels):
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else float("nan")


# Tag prefixes of the BIO (IOB2) scheme and of its BIOES extension: Begin, Inside, End, Single.
_PREFIXES = ("B-", "I-", "E-", "S-")


def tags_have_entities(labels: Sequence[str]) -> bool:
    """Whether a tag set names entities (some tag is B-X, I-X, E-X or S-X), so entity F1 applies."""
    return any(label[:2] in _PREFIXES for label in labels)


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one sentence's tags, as ``(type, start, end)`` word spans (end exclusive).

    conlleval's reading of BIO: an entity is a maximal span B-X I-X*; an I-X that does not continue
    an X entity (after O, or after another type) starts a new one, and so does every B-X. BIOES
    tags read alike (E-X closes its entity, S-X is a one-word entity); "O" is outside, and a tag
    without a prefix is read as I- of itself (the IO scheme).
    """
    found, kind, start = set(), None, 0

    def close(end: int) -> None:
        nonlocal kind
        if kind is not None:
            found.add((kind, start, end))
        kind = None

    for i, tag in enumerate(tags):
        prefix, name = (tag[0], tag[2:]) if tag[:2] in _PREFIXES else ("I", tag)
        if tag == "O":
            close(i)
            continue
        if prefix in "BS" or name != kind:  # B-/S- always, I-/E- unless they continue an X entity
            close(i)
            kind, start = name, i
        if prefix in "ES":
            close(i + 1)
    close(len(tags))
    return found


def entity_scores(predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro-averaged entity precision, recall and F1 over sentences (lists of tags): an entity
    counts as found only when its type, start and end all match (see `entities`).

    F1 = 2·TP / (2·TP + FP + FN); NaN for all three when neither side has an entity, and a score
    of 0 where only its denominator is 0 (nothing predicted: precision 0), as seqeval reports.
    """
    tp = n_predicted = n_gold = 0
    for p, g in zip(predicted, gold):
        p, g = entities(p), entities(g)
        tp, n_predicted, n_gold = tp + len(p & g), n_predicted + len(p), n_gold + len(g)
    if not n_predicted and not n_gold:
        nan = float("nan")
        return {"entity_precision": nan, "entity_recall": nan, "entity_f1": nan}
    return {
        "entity_precision": tp / n_predicted if n_predicted else 0.0,
        "entity_recall": tp / n_gold if n_gold else 0.0,
        "entity_f1": 2 * tp / (n_predicted + n_gold),
    }
