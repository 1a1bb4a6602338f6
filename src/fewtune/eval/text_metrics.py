"""Text-overlap metrics for generation: ROUGE-1/2/L, BLEU, exact match, length.

Chinese has no spaces, so word-based tokenizers see a whole sentence as one token (or, as
rouge-score's default does, drop it entirely). Here ROUGE runs on a tokenizer that makes
every CJK character a token and keeps other words whole, and BLEU uses sacrebleu's ``zh``
tokenizer when the references contain Chinese, its standard ``13a`` otherwise.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from fewtune.eval.metrics import _CJK, normalize_text

_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W_]+", re.UNICODE)


class CJKTokenizer:
    """rouge-score tokenizer: lowercased; each CJK character one token, other runs of letters/digits one token."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


def has_cjk(texts: Sequence[str]) -> bool:
    return any(_CJK.search(t) for t in texts)


def bleu_tokenizer(references: Sequence[str]) -> str:
    return "zh" if has_cjk(references) else "13a"


def _bleu(tokenize: str):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=tokenize)


def bleu_statistics(predictions: Sequence[str], references: Sequence[str], tokenize: str) -> np.ndarray:
    """Per-example BLEU sufficient statistics (hyp len, ref len, 4 matches, 4 totals): corpus BLEU of
    any subset is :func:`bleu_from_statistics` of their sum (what paired bootstrap needs)."""
    stats = _bleu(tokenize)._extract_corpus_statistics(list(predictions), [list(references)])
    return np.asarray(stats, dtype=np.int64).reshape(len(predictions), -1)


def bleu_from_statistics(summed: np.ndarray) -> float:
    from sacrebleu.metrics import BLEU

    s = [int(x) for x in summed]
    return float(BLEU.compute_bleu(correct=s[2:6], total=s[6:10], sys_len=s[0], ref_len=s[1]).score)


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-example ROUGE-1/2/L F-measures (CJK-aware tokenization, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CJKTokenizer())
    out = {k: np.zeros(len(predictions)) for k in ("rouge1", "rouge2", "rougeL")}
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        scores = scorer.score(ref, pred)
        for k in out:
            out[k][i] = scores[k].fmeasure
    return out


def exact_matches(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """1 where prediction and reference agree after normalisation (case, punctuation, whitespace)."""
    return np.array([normalize_text(p) == normalize_text(r) for p, r in zip(predictions, references)], dtype=float)


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus ROUGE-1/2/L (mean F), BLEU, exact match and mean lengths (in ROUGE tokens)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    rouge = rouge_scores(predictions, references)
    tokenize = bleu_tokenizer(references)
    bleu = bleu_from_statistics(bleu_statistics(predictions, references, tokenize).sum(axis=0))
    tok = CJKTokenizer()
    return {"n": len(predictions), **{k: float(v.mean()) for k, v in rouge.items()}, "bleu": bleu,
            "bleu_tokenize": tokenize, "exact_match": float(exact_matches(predictions, references).mean()),
            "mean_length": float(np.mean([len(tok.tokenize(p)) for p in predictions])),
            "mean_reference_length": float(np.mean([len(tok.tokenize(r)) for r in references]))}
