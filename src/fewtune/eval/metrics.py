"""Task metrics on model outputs: classification labels and JSON extraction.

Classification metrics come from scikit-learn; an output that maps to no label is its own
category (``UNPARSEABLE``): it counts against recall and shows as a column of the
confusion matrix. JSON extraction is scored on validity, exact match of the parsed
object, and field-level precision/recall/F1 where list fields compare as sets.
Text-overlap metrics (ROUGE, BLEU) live in ``text_metrics.py``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from typing import Any, Sequence

UNPARSEABLE = "<unparseable>"
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")


# ---------------------------------------------------------------- labels


def normalize_text(text: str) -> str:
    """Casefolded, punctuation and symbols replaced by spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in text)
    return " ".join(kept.split())


def map_to_label(output: str, labels: Sequence[str]) -> tuple[str, str]:
    """(label, how) for a generated output; (UNPARSEABLE, "none") when no single label fits.

    In order: the whole normalised output equals a label (spaces ignored, so "Play Music"
    is "PlayMusic"); its first line does; exactly one label occurs in it as whole words
    (as a substring for Chinese/Japanese/Korean labels, which have no word boundaries).
    Labels contained in a longer matching label do not count ("Music" in "PlayMusic").
    """
    keys = {label: normalize_text(label) for label in labels}
    norm = normalize_text(output)
    for label, key in keys.items():
        if key.replace(" ", "") == norm.replace(" ", ""):
            return label, "exact"
    first = normalize_text(output.strip().split("\n", 1)[0]) if output.strip() else ""
    for label, key in keys.items():
        if first and key.replace(" ", "") == first.replace(" ", ""):
            return label, "first_line"
    words = f" {norm} "
    found = []
    for label, key in keys.items():
        if not key:
            continue
        if _CJK.search(key):
            hit = key.replace(" ", "") in norm.replace(" ", "")
        else:
            hit = f" {key} " in words or f" {key.replace(' ', '')} " in words
        if hit:
            found.append(label)
    found = [a for a in found if not any(a != b and keys[a].replace(" ", "") in keys[b].replace(" ", "") for b in found)]
    if len(found) == 1:
        return found[0], "contains"
    return UNPARSEABLE, "none"


def classification_metrics(expected: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, macro/weighted P/R/F1, a per-class table and the confusion matrix (scikit-learn)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    if len(expected) != len(predicted):
        raise ValueError(f"{len(predicted)} predictions for {len(expected)} expected labels")
    if not expected:
        raise ValueError("no predictions to score")
    labels = list(labels)
    unknown = sorted(set(expected) - set(labels))
    if unknown:
        raise ValueError(f"expected labels not among the candidate labels: {unknown[:5]}")
    out: dict[str, Any] = {"n": len(expected), "accuracy": float(accuracy_score(expected, predicted))}
    # averages run over the labels that occur (expected or predicted), as scikit-learn does by default:
    # a label absent from a subset must not pull macro-F1 down with a 0
    occurring = [label for label in labels if label in set(expected) | set(predicted)]
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(expected, predicted, labels=occurring, average=average,
                                                     zero_division=0)
        out.update({f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)})
    p, r, f, s = precision_recall_fscore_support(expected, predicted, labels=labels, average=None, zero_division=0)
    out["per_class"] = {label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                        for i, label in enumerate(labels)}
    n_unparseable = sum(1 for x in predicted if x == UNPARSEABLE)
    out["unparseable"] = n_unparseable
    out["unparseable_rate"] = n_unparseable / len(predicted)
    axis = labels + ([UNPARSEABLE] if n_unparseable else [])
    matrix = confusion_matrix(expected, predicted, labels=axis)[:len(labels)]  # nothing is expected "unparseable"
    out["confusion"] = {"labels": axis, "matrix": matrix.tolist()}  # rows: expected labels, columns: predicted
    return out


def confused_pairs(confusion: dict, top: int = 10) -> list[dict]:
    """The most frequent (expected, predicted) mistakes, largest first."""
    labels, matrix = confusion["labels"], confusion["matrix"]
    pairs = [{"expected": labels[i], "predicted": labels[j], "count": matrix[i][j]}
             for i in range(len(matrix)) for j in range(len(matrix[i])) if i != j and matrix[i][j] > 0]
    return sorted(pairs, key=lambda p: (-p["count"], p["expected"], p["predicted"]))[:top]


# ---------------------------------------------------------------- JSON extraction


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


def json_fields(value: Any, path: str = "") -> set[tuple[str, str]]:
    """An object as a set of (field path, value) facts; a list field gives one fact per element.

    ``{"a": {"b": 1}, "c": ["x", "y"]}`` -> ``{("a.b", "1"), ("c", '"x"'), ("c", '"y"')}``.
    Lists are sets: order and duplicates do not matter; an empty list adds nothing.
    """
    if isinstance(value, dict):
        facts: set[tuple[str, str]] = set()
        for key, sub in value.items():
            facts |= json_fields(sub, f"{path}.{key}" if path else str(key))
        return facts
    if isinstance(value, list):
        return {(path, json.dumps(_canonical(v), ensure_ascii=False, sort_keys=True)) for v in value}
    return {(path, json.dumps(value, ensure_ascii=False))}


def _prf(tp: int, n_pred: int, n_ref: int) -> dict[str, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_ref if n_ref else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def json_example_scores(prediction: str, reference: str) -> dict:
    """Per-example JSON scores: validity, exact match and field counts (true positives, predicted, expected)."""
    ref_ok, ref_value = parse_json(reference)
    if not ref_ok:
        raise ValueError(f"reference is not valid JSON: {reference[:80]!r}")
    ok, value = parse_json(prediction)
    ref_facts = json_fields(ref_value)
    pred_facts = json_fields(value) if ok else set()
    return {"valid": ok, "exact": bool(ok and _canonical(value) == _canonical(ref_value)),
            "tp": len(pred_facts & ref_facts), "n_pred": len(pred_facts), "n_ref": len(ref_facts),
            "fields": {"tp": Counter(p for p, _ in pred_facts & ref_facts), "pred": Counter(p for p, _ in pred_facts),
                       "ref": Counter(p for p, _ in ref_facts)}}


def json_task_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Validity, exact match, micro field P/R/F1, per-field P/R/F1 and the invalid outputs (index, text)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    tp = n_pred = n_ref = valid = exact = 0
    per_field = {"tp": Counter(), "pred": Counter(), "ref": Counter()}
    invalid = []
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        s = json_example_scores(pred, ref)
        valid += s["valid"]
        exact += s["exact"]
        tp, n_pred, n_ref = tp + s["tp"], n_pred + s["n_pred"], n_ref + s["n_ref"]
        for k in per_field:
            per_field[k].update(s["fields"][k])
        if not s["valid"]:
            invalid.append({"index": i, "output": pred})
    n = len(predictions)
    micro = _prf(tp, n_pred, n_ref)
    fields = {f: {**_prf(per_field["tp"][f], per_field["pred"][f], per_field["ref"][f]), "support": per_field["ref"][f]}
              for f in sorted(set(per_field["pred"]) | set(per_field["ref"]))}
    return {"n": n, "json_valid": valid / n, "exact_match": exact / n, "field_precision": micro["precision"],
            "field_recall": micro["recall"], "field_f1": micro["f1"], "per_field": fields,
            "invalid_count": len(invalid), "invalid": invalid}
