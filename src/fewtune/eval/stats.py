"""Is a difference real? Paired bootstrap intervals and McNemar's test.

Two models scored on the same examples are compared by resampling *examples* (the same
resample for both models), recomputing each metric on the resample, and taking the
percentiles of the difference: scipy's ``bootstrap`` does the resampling, on example
indices, so any corpus-level metric (macro-F1, BLEU) fits. McNemar's exact test looks
only at the examples where exactly one of the two models is right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass
class Interval:
    low: float
    high: float
    level: float = 0.95

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "level": self.level}


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n: int, n_resamples: int = 1000,
                       level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of ``statistic(indices)`` over resamples of ``range(n)``."""
    from scipy.stats import bootstrap

    if n < 2:
        value = statistic(np.arange(n))
        return Interval(value, value, level)

    def vectorised(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.asarray(idx)
        if idx.ndim == 1:
            return np.asarray(statistic(idx.astype(int)))
        return np.array([statistic(row.astype(int)) for row in np.moveaxis(idx, axis, -1).reshape(-1, idx.shape[axis])])

    res = bootstrap((np.arange(n),), vectorised, vectorized=True, n_resamples=n_resamples, confidence_level=level,
                    method="percentile", rng=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return Interval(float(low), float(high), level)


def paired_difference(metric_a: Callable[[np.ndarray], float], metric_b: Callable[[np.ndarray], float], n: int,
                      n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Observed B - A on all n examples and its paired bootstrap interval."""
    every = np.arange(n)
    a, b = float(metric_a(every)), float(metric_b(every))
    interval = bootstrap_interval(lambda idx: metric_b(idx) - metric_a(idx), n, n_resamples, level, seed)
    return {"a": a, "b": b, "difference": b - a, "interval": interval.as_dict(),
            "significant": not interval.contains(0.0)}


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact McNemar test: binomial test on the discordant pairs (A right / B wrong vs the reverse)."""
    from scipy.stats import binomtest

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError("McNemar's test needs both models' results on the same examples")
    only_a = int((a & ~b).sum())
    only_b = int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_a_correct": only_a, "only_b_correct": only_b, "p_value": p}


# ---------------------------------------------------------------- fast statistics for resampling


def f1_codes(expected: np.ndarray, predicted: np.ndarray, n_classes: int, average: str = "macro") -> float:
    """Macro- or support-weighted F1 over the classes 0..n_classes-1 that occur (expected or predicted) from
    integer codes (a prediction may be code n_classes, "unparseable"). The same numbers as scikit-learn's
    ``f1_score(..., labels=<occurring classes>, zero_division=0)``, cheap enough for a thousand resamples."""
    k = n_classes + 1
    tp = np.bincount(expected[expected == predicted], minlength=k)[:n_classes].astype(float)
    support = np.bincount(expected, minlength=k)[:n_classes]
    predicted_count = np.bincount(predicted, minlength=k)[:n_classes]
    denom = support + predicted_count
    f1 = np.divide(2 * tp, denom, out=np.zeros(n_classes), where=denom > 0)
    if average == "macro":  # over the classes that occur, as classification_metrics does
        return float(f1[denom > 0].mean()) if (denom > 0).any() else 0.0
    if average == "weighted":
        return float((f1 * support).sum() / support.sum()) if support.sum() else 0.0
    raise ValueError(f"unknown average {average!r}")
