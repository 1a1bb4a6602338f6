"""The label-consistency filter: does a judge model still read the source's label in an augmentation?

The judge (a trained run, or any model) scores every label by choice scoring
(:func:`fewtune.eval.scoring.choice_scores`, the same path as ``fewtune eval``). The labels' summed
log-probabilities are turned into probabilities over the label set (a softmax), and a candidate is
rejected only when the judge predicts *another* label *and* is sure of it (probability at least
``threshold``). An unsure judge rejects nothing: a weak base model would otherwise throw away good
augmentations on noise.
"""

from __future__ import annotations

import math
from typing import Sequence

from fewtune.augment.base import AugmentError
from fewtune.data.formats import Example, Message


class LabelConsistency:
    def __init__(self, target: str, labels: Sequence[str], threshold: float = 0.8, batch_size: int = 8):
        if not labels:
            raise AugmentError("label consistency needs the label set: no source example has a label")
        if not 0 < threshold <= 1:
            raise AugmentError(f"consistency threshold {threshold}: give a probability in (0, 1]")
        self.target, self.labels, self.threshold, self.batch_size = target, list(labels), threshold, batch_size
        self.loaded = None

    def probabilities(self, conversations: list[list[Message]]) -> list[list[float]]:
        """Per conversation, the probability of each label (in ``self.labels`` order)."""
        from fewtune.eval.scoring import choice_scores
        from fewtune.generate import load_for_inference

        if self.loaded is None:
            self.loaded = load_for_inference(self.target)
        loaded = self.loaded
        scores = choice_scores(loaded.model, loaded.tokenizer, loaded.template, conversations, self.labels,
                               batch_size=self.batch_size, progress=len(conversations) >= 50)
        return [softmax(s.logprobs) for s in scores]

    def check(self, sources: list[Example], candidates: list[Example]) -> list[str | None]:
        """For each candidate, why it is rejected (``"label changed: A -> B (p=0.93)"``), or None."""
        if len(sources) != len(candidates):
            raise ValueError(f"{len(sources)} sources for {len(candidates)} candidates: give one source each")
        if not candidates:
            return []
        probs = self.probabilities([c.prompt_messages for c in candidates])
        reasons: list[str | None] = []
        for source, p in zip(sources, probs):
            best = max(range(len(p)), key=p.__getitem__)
            predicted = self.labels[best]
            if source.label is not None and predicted != source.label and p[best] >= self.threshold:
                reasons.append(f"label changed: {source.label} -> {predicted} (p={p[best]:.2f})")
            else:
                reasons.append(None)
        return reasons


def softmax(logprobs: Sequence[float]) -> list[float]:
    top = max(logprobs)
    exp = [math.exp(lp - top) for lp in logprobs]
    total = sum(exp)
    return [e / total for e in exp]
