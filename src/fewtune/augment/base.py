"""The augmentation registry: one ``AugmentMethod`` entry per method, and what every method is given.

A method turns one example into up to ``n`` candidate examples (``Candidate``: the new example and
the parameters that made it). It changes only the turns ``augmentable_turns`` names (the user
turns; never the system prompt, never an assistant target unless the method says so), and never
touches a protected span (:mod:`fewtune.augment.spans`). Filtering (unchanged, duplicates,
leakage, lost spans, label changes) is the pipeline's job (:mod:`fewtune.augment.pipeline`), so a
method only proposes.

Builders are named ``"module:function"`` and imported when used, as in ``fewtune.methods``, so the
table (the config reads it) loads neither jieba, nltk nor torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from importlib import import_module
from typing import Any, Callable, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from fewtune.data.formats import Example, Message


class AugmentError(ValueError):
    """A method that cannot run here (a lexicon or model missing: the message says what to install) or bad options."""


class Options(BaseModel):
    """Base of every method's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Candidate:
    example: Example  # the augmented example (same label, same assistant target unless the method extends a dialogue)
    params: dict[str, Any] = field(default_factory=dict)  # what was done: JSON-serialisable, written as provenance


@dataclass
class Resources:
    """What a builder may need besides its options: the language model for LLM methods (loaded once)."""

    model: str | None = None  # a run directory, a model folder, a .gguf, or a hub id (what --model names)
    generator: Any = None  # filled in lazily by the LLM methods (fewtune.augment.llm)
    language: str | None = None  # "en" / "zh" when known for the whole file; None: per text (textstats.language)


class Augmenter(Protocol):
    def __call__(self, example: Example, n: int, rng: random.Random, protected: list[str]) -> list[Candidate]:
        """Up to ``n`` candidates for ``example``; ``protected``: strings that must survive verbatim."""


@dataclass(frozen=True)
class AugmentMethod:
    name: str
    kind: Literal["text", "llm", "image"]
    options: type[Options]
    build: str  # "module:function": (options, resources) -> Augmenter
    online: bool = False  # cheap and model-free: may run afresh each epoch during training (data.augment)
    description: str = ""

    def builder(self) -> Callable[[Options, Resources], Augmenter]:
        module, function = self.build.split(":")
        return getattr(import_module(module), function)

    def make(self, options: dict | Options | None = None, resources: Resources | None = None) -> Augmenter:
        opts = options if isinstance(options, Options) else self.options(**(options or {}))
        return self.builder()(opts, resources or Resources())


AUGMENT_METHODS: dict[str, AugmentMethod] = {}


def register_method(method: AugmentMethod) -> AugmentMethod:
    if method.name in AUGMENT_METHODS:
        raise ValueError(f"augmentation method {method.name!r} is registered already")
    AUGMENT_METHODS[method.name] = method
    return method


def augmentable_turns(example: Example) -> list[int]:
    """Indices of the turns a text method may rewrite: every user turn (the system prompt and the
    assistant targets stay as they are, so the answer cannot change)."""
    return [i for i, m in enumerate(example.messages) if m.role == "user" and m.content.strip()]


def with_turns(example: Example, new: dict[int, str], meta: dict | None = None) -> Example:
    """A copy of ``example`` with the turns at the given indices replaced (weights, label, source kept)."""
    messages = [replace(m, content=new[i]) if i in new else replace(m) for i, m in enumerate(example.messages)]
    return Example(messages, example.source, example.line, example.label, {**example.meta, **(meta or {})})


def with_messages(example: Example, messages: list[Message], meta: dict | None = None) -> Example:
    return Example(messages, example.source, example.line, example.label, {**example.meta, **(meta or {})})
