"""Answer metrics for evaluation."""

from __future__ import annotations

import json
from typing import Any


def exact_match(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` gives the same answer as ``reference``.

    When the reference is JSON, both are parsed and compared as values: key order and
    whitespace do not matter, but types do (``1`` is not ``"1"``, ``true`` is not ``1``; ``3`` and
    ``3.0`` are the same number). A prediction that does not parse is wrong. When the reference is
    not JSON, the stripped strings must be equal.
    """
    reference_value, reference_ok = _parse(reference)
    if not reference_ok:
        return prediction.strip() == reference.strip()
    prediction_value, prediction_ok = _parse(prediction)
    return prediction_ok and _same(prediction_value, reference_value)


def _parse(text: str) -> tuple[Any, bool]:
    try:
        return json.loads(text.strip()), True
    except (json.JSONDecodeError, TypeError, ValueError):
        return None, False


def _same(a: Any, b: Any) -> bool:
    # Python's == says True == 1 and {"a": 1} == {"a": True}; JSON semantics keep them apart.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b
