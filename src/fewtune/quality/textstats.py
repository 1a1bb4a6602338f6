"""Text measures that work for Chinese and English alike: normalisation, language, words.

Chinese has no spaces, so "words" there come from jieba's segmentation; English words are
whitespace-separated. Characters are counted the same way for both, which is why the
reports give characters *and* words: 20 characters is a phrase in English and a sentence
in Chinese.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import unicodedata

# CJK ideographs (with extension A and compatibility forms), kana and hangul
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_WORDLIKE = re.compile(r"\w", re.UNICODE)


def normalize(text: str) -> str:
    """The text near-duplicate detection compares: NFKC (full-width letters, digits and
    punctuation become half-width), case-folded, without whitespace and punctuation.

    ``"Ｈｅｌｌｏ，  World!"`` and ``"hello world"`` normalise to the same string, as do
    ``"今天 天气好。"`` and ``"今天天气好"``.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if not (ch.isspace() or unicodedata.category(ch).startswith("P")))


def has_cjk(text: str) -> bool:
    return _CJK.search(text) is not None


def language(text: str) -> str:
    """'en' (no CJK), 'zh' (CJK, maybe with some English words), 'mixed' (more English words than
    CJK characters; one character is roughly one English word's worth of meaning)."""
    cjk = len(_CJK.findall(text))
    if not cjk:
        return "en"
    return "zh" if cjk >= len(_LATIN_WORD.findall(text)) else "mixed"


_jieba = None


def _segmenter():
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)  # it logs its dictionary loading at INFO otherwise
        jieba.initialize()
        _jieba = jieba
    return _jieba


def words(text: str) -> list[str]:
    """Words: jieba segmentation when the text has CJK characters, whitespace splitting otherwise.
    Tokens without a letter, digit or ideograph (spaces, punctuation) are not words."""
    if has_cjk(text):
        return [w for w in _segmenter().lcut(text) if _WORDLIKE.search(w)]
    return text.split()


def summary(values: list[int | float]) -> dict:
    """min / median / p95 / max / mean of a list (empty dict for no values)."""
    if not values:
        return {}
    ordered = sorted(values)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]  # nearest rank
    return {"min": ordered[0], "median": statistics.median(ordered), "p95": p95, "max": ordered[-1],
            "mean": round(statistics.fmean(ordered), 1)}
