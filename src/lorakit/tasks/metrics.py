"""Classification metrics without extra dependencies: accuracy and macro-F1."""

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
