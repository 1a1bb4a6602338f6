"""Task metrics on generated text. (JSON extraction here; more tasks build on the same shape.)"""

from __future__ import annotations

import json
from typing import Any, Sequence


def parse_json(text: str) -> tuple[bool, Any]:
    """(valid, value): the whole output must be one JSON value, surrounding whitespace aside."""
    try:
        return True, json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return False, None


def _canonical(value: Any) -> Any:
    """Order-insensitive form for comparing extracted objects: lists compare as multisets."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return sorted((_canonical(v) for v in value), key=lambda v: json.dumps(v, ensure_ascii=False, sort_keys=True))
    return value


def json_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """JSON validity rate and exact match of the parsed objects (list order ignored)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    valid = exact = 0
    for pred, ref in zip(predictions, references):
        ok, value = parse_json(pred)
        ref_ok, ref_value = parse_json(ref)
        if not ref_ok:
            raise ValueError(f"reference is not valid JSON: {ref[:80]!r}")
        valid += ok
        exact += ok and _canonical(value) == _canonical(ref_value)
    n = len(predictions)
    return {"json_valid": valid / n, "exact_match": exact / n, "n": n}
