"""From config to rendered training and validation sets: load, split, render, vet."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field

from fewtune.config import DataSection
from fewtune.data.formats import DataError, Example, load_examples
from fewtune.data.render import Rendered, Template, render_conversation, render_text_chunks

log = logging.getLogger(__name__)


def split_examples(examples: list[Example], ratio: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded split; stratified by label when every example has one (classification)."""
    if ratio <= 0 or len(examples) < 2:
        return list(examples), []
    rng = random.Random(seed)
    if all(e.label is not None for e in examples):
        groups: dict[str, list[Example]] = defaultdict(list)
        for e in examples:
            groups[e.label].append(e)
        train, val = [], []
        for label in sorted(groups):
            members = groups[label][:]
            rng.shuffle(members)
            n_val = round(len(members) * ratio) if len(members) > 1 else 0
            val += members[:n_val]
            train += members[n_val:]
        rng.shuffle(train)
        rng.shuffle(val)
        return train, val
    shuffled = examples[:]
    rng.shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * ratio))
    return shuffled[n_val:], shuffled[:n_val]


@dataclass
class RenderedSet:
    items: list[Rendered]
    examples: list[Example]
    dropped: list[tuple[Example, str]] = field(default_factory=list)
    partly_truncated: int = 0

    @property
    def n_tokens(self) -> int:
        return sum(len(r) for r in self.items)


def render_set(examples: list[Example], tokenizer, template: Template, data: DataSection, what: str,
               vision=None) -> RenderedSet:
    """Render every example; one with nothing left to learn is an error (or dropped, if asked). ``vision``: the
    model's image handling (``fewtune.vision.Vision``), needed when examples have images."""
    out = RenderedSet([], [])
    bad: list[tuple[Example, str]] = []
    documents = pieces = 0
    for example in examples:
        if example.is_text:  # continued pretraining: a long document becomes several items, nothing is cut away
            chunks = render_text_chunks(example.messages[0].content, tokenizer, data.max_length)
            if not chunks:
                bad.append((example, "the text is shorter than two tokens: nothing to predict"))
            documents, pieces = documents + 1, pieces + len(chunks)
            out.items += chunks
            out.examples += [example] * len(chunks)
            continue
        rendered = render_conversation(example, tokenizer, template, data.max_length, data.prompt_loss_weight,
                                       vision=vision)
        # judged on completion tokens: with prompt_loss_weight > 0 an example whose answer is
        # cut away would still "train" on its prompt, which is not what anyone wants
        if rendered.completion_tokens == 0:
            if rendered.truncated and rendered.completion_tokens_before_truncation > 0:
                reason = (f"the completion is cut away entirely by max_length={data.max_length} "
                          f"(the prompt alone is {len(rendered)}+ tokens)")
            else:
                reason = "no token carries loss (no assistant turn, or all of them have weight 0)"
            bad.append((example, reason))
            continue
        if rendered.truncated:
            out.partly_truncated += 1
        out.items.append(rendered)
        out.examples.append(example)
    if bad and data.on_bad_example == "error":
        lines = [f"  {e.source}:{e.line}: {reason}" for e, reason in bad[:10]]
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(bad[0][0].source, bad[0][0].line,
                        f"{len(bad)} {what} example(s) would train on nothing:\n" + "\n".join(lines) + more +
                        "\nRaise data.max_length, fix the examples, or set data.on_bad_example=drop to skip them.")
    if bad:
        log.warning("dropped %d %s example(s) with nothing to learn (first: %s:%d: %s)", len(bad), what,
                    bad[0][0].source, bad[0][0].line, bad[0][1])
    if pieces > documents:
        log.info("%d %s documents: %d pieces of at most max_length=%d tokens (loss on every token)", documents,
                 what, pieces, data.max_length)
    if out.partly_truncated:
        log.warning("%d %s example(s) were cut at max_length=%d and lose part of their completion",
                    out.partly_truncated, what, data.max_length)
    out.dropped = bad
    return out


def load_train_val(data: DataSection) -> tuple[list[Example], list[Example]]:
    if not data.train:
        raise DataError("<config>", None, "no training data: set data.train to a file")
    train = load_examples(data.train, data.format, data.dataset)
    if data.validation:
        val = load_examples(data.validation, data.format, data.dataset)
    else:
        train, val = split_examples(train, data.val_ratio, data.seed)
    if not train:
        raise DataError(data.train, None, "no training examples left")
    return train, val
