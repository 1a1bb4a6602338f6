"""In-context examples ("shots") for a prompting baseline: K training examples before every query.

Before fine-tuning, practitioners try a prompt: a role and instructions (the system prompt, or
``--prompt-file``) and a few solved examples. Here the K examples are earlier user/assistant turns of
the conversation, in the model's own chat template, placed after any system message and before the
example's own turns, so the query is rendered exactly as without shots and as training renders it.
The same K examples precede every query of a set (the usual K-shot prompt; choice scoring then runs
them once, as the prefix the whole set shares).

Chosen from a pool file (the training file), seeded, never an example whose input is one of the
evaluated inputs; for classification stratified by label: one example of each label in turn (labels
in a seeded order) until K are taken, so 4 shots over 7 labels are 4 different labels, 8 shots are
every label once and one twice.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from fewtune.data.formats import DataError, Example, Message, load_examples


class ShotsError(ValueError):
    """Shots that cannot be drawn as asked, worded for the user."""


def _input(example: Example) -> str:
    return example.input_text.strip()  # what eval reports as an example's input


def _turns(example: Example) -> list[Message]:
    """A solved example as conversation turns: its own turns without system messages, its answer last."""
    if example.reference is None:
        raise DataError(example.source, example.line, "a shot needs an answer (a final assistant turn)")
    return [Message(m.role, m.content) for m in example.messages if m.role != "system"]


def pick_shots(pool: Sequence[Example], k: int, seed: int, avoid: Sequence[Example] = (),
               stratify: bool = False) -> list[Example]:
    """K examples of ``pool`` (seeded), none whose input is an input of ``avoid``; stratified by label when asked."""
    if k <= 0:
        return []
    banned = {_input(e) for e in avoid}
    usable = [e for e in pool if e.reference is not None and _input(e) not in banned]
    if len(usable) < k:
        raise ShotsError(f"{k} shots asked, but the pool has {len(usable)} usable examples (with an answer, and an "
                         f"input that is not one of the {len(banned)} evaluated): give a larger --shots-from file")
    rng = random.Random(seed)
    if not stratify:
        return rng.sample(usable, k)
    by_label: dict[str, list[Example]] = {}
    for e in usable:
        by_label.setdefault(str(e.label if e.label is not None else e.reference), []).append(e)
    labels = sorted(by_label)
    rng.shuffle(labels)
    for group in by_label.values():
        rng.shuffle(group)
    chosen: list[Example] = []
    while len(chosen) < k:
        for label in labels:
            if by_label[label] and len(chosen) < k:
                chosen.append(by_label[label].pop())
    rng.shuffle(chosen)  # no label order for the model to copy
    return chosen


def with_shots(example: Example, shots: Sequence[Example]) -> Example:
    """The example with the shots' turns after its leading system messages."""
    if not shots:
        return example
    lead = 0
    while lead < len(example.messages) and example.messages[lead].role == "system":
        lead += 1
    turns = [t for shot in shots for t in _turns(shot)]
    return replace(example, messages=example.messages[:lead] + turns + example.messages[lead:])


def shot_pool(shots_from: str | None, run_config, fmt: str = "auto") -> tuple[Path, list[Example]]:
    """The pool file: ``shots_from``, else the run's training file (data.train); ShotsError when neither."""
    if shots_from is None and run_config is not None:
        shots_from = run_config.data.train
    if shots_from is None:
        raise ShotsError("--shots needs examples to draw from: give --shots-from TRAIN_FILE (a run directory "
                         "uses its own training file)")
    path = Path(shots_from)
    if not path.is_file():
        raise ShotsError(f"--shots-from {path}: " + ("is a directory, not a data file" if path.is_dir()
                                                      else "file not found"))
    return path, load_examples(path, fmt)


def read_prompt_file(path: str | Path) -> str:
    """An instruction written by the user (a role, what to do, the output format): the system prompt."""
    path = Path(path)
    if not path.is_file():
        raise ShotsError(f"--prompt-file {path}: " + ("is a directory" if path.is_dir() else "file not found"))
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ShotsError(f"--prompt-file {path} is empty")
    return text
