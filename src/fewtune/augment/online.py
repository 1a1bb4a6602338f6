"""Augmentation during training (``data.augment``): each epoch, a fresh augmentation of some training examples.

Every epoch, each task training example (not a validation example, not a replayed general example)
is, with chance ``prob``, replaced for that epoch by one augmentation of it, made by one method drawn
from ``methods`` (the model-free ones: eda, noise). The draw uses a generator seeded by
``(seed, epoch, index)`` only, so an epoch's data is the same in every process and after a resume,
and the number of examples (hence steps per epoch and the schedule) never changes.

An augmentation that fails the checks the offline pipeline makes cheaply (empty, unchanged, a
protected span lost: the label or a JSON target string no longer in the input) or that would train
on nothing once rendered is not used: the original stays for that epoch, and the epoch's log line
counts it.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field

from fewtune.augment.base import Resources
from fewtune.augment.methods import get_method
from fewtune.augment.spans import input_text, protected_spans, spans_kept
from fewtune.data.render import render_conversation
from fewtune.quality.textstats import normalize

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    epoch: int
    replaced: Counter = field(default_factory=Counter)  # method -> examples replaced this epoch
    kept_original: Counter = field(default_factory=Counter)  # reason -> examples whose augmentation was not used
    drawn: int = 0  # examples drawn for augmentation (chance prob each)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "drawn": self.drawn, "replaced": dict(self.replaced),
                "kept_original": dict(self.kept_original)}


class OnlineAugmenter:
    """The training set of each epoch: ``items`` with some replaced by renders of fresh augmentations."""

    def __init__(self, section, seed: int, rendered, augmentable: list[int], tokenizer, template, data,
                 vision=None):
        self.section, self.seed, self.vision = section, seed, vision
        self.rendered, self.augmentable = rendered, augmentable
        self.tokenizer, self.template, self.data = tokenizer, template, data
        resources = Resources()
        self.augmenters = {name: get_method(name).make(section.options.get(name), resources)
                           for name in section.methods}
        self._spans: dict[int, list[str]] = {}
        self._cached: tuple[int, list] | None = None

    @property
    def active(self) -> bool:
        return bool(self.section.methods) and self.section.prob > 0 and bool(self.augmentable)

    def _spans_of(self, index: int) -> list[str]:
        if index not in self._spans:
            self._spans[index] = protected_spans(self.rendered.examples[index])
        return self._spans[index]

    def _one(self, index: int, rng: random.Random, stats: EpochStats):
        """The rendered augmentation of example ``index`` (None: keep the original, with the reason counted)."""
        methods = self.section.methods
        name = methods[rng.randrange(len(methods))]
        example, spans = self.rendered.examples[index], self._spans_of(index)
        candidates = self.augmenters[name](example, 1, rng, list(spans))
        if not candidates:
            stats.kept_original["nothing to change"] += 1
            return None
        cand = candidates[0].example
        text = input_text(cand)
        if not normalize(text):
            stats.kept_original["empty"] += 1
            return None
        if (normalize(text) == normalize(input_text(example))
                and cand.images == example.images):  # an image method changes only those
            stats.kept_original["unchanged"] += 1
            return None
        if spans_kept(cand, spans):
            stats.kept_original["protected span lost"] += 1
            return None
        rendered = render_conversation(cand, self.tokenizer, self.template, self.data.max_length,
                                       self.data.prompt_loss_weight, vision=self.vision)
        if rendered.completion_tokens == 0:
            stats.kept_original["nothing to learn once rendered"] += 1
            return None
        stats.replaced[name] += 1
        return rendered

    def epoch_items(self, epoch: int) -> tuple[list, EpochStats | None]:
        """The items of ``epoch`` (the same list object for repeated calls within an epoch) and what changed."""
        if not self.active:
            return self.rendered.items, None
        if self._cached and self._cached[0] == epoch:
            return self._cached[1], None
        items = list(self.rendered.items)
        stats = EpochStats(epoch)
        for index in self.augmentable:
            rng = random.Random(f"{self.seed}:{epoch}:{index}")
            if rng.random() >= self.section.prob:
                continue
            stats.drawn += 1
            new = self._one(index, rng, stats)
            if new is not None:
                items[index] = new
        self._cached = (epoch, items)
        return items, stats


def build_online_augmenter(cfg, rendered, task_examples, tokenizer, template, vision=None) -> OnlineAugmenter:
    """The augmenter of a run: ``task_examples`` are the training examples augmentation may change (the
    data set's own, not replayed general ones)."""
    section = cfg.data.augment
    ids = {id(e) for e in task_examples}
    augmentable = [i for i, e in enumerate(rendered.examples) if id(e) in ids]
    seed = cfg.train.seed if section.seed is None else section.seed
    return OnlineAugmenter(section, seed, rendered, augmentable, tokenizer, template, cfg.data, vision)
