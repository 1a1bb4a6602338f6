"""Protected spans: the strings an augmentation must leave exactly as they are.

For a classification example, the label when it occurs in the input (``播放音乐`` in a PlayMusic
utterance). For an extraction example whose target is JSON, every string the target quotes that
occurs in the input (the car-command parse's ``actions`` and ``conditions``): if the augmented input
no longer holds one of them, the target no longer matches the input, and the pipeline rejects it.
"""

from __future__ import annotations

import json
from typing import Any

from fewtune.data.formats import Example


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def input_text(example: Example) -> str:
    return "\n".join(m.content for m in example.prompt_messages if m.role == "user")


def protected_spans(example: Example, extra: list[str] | None = None) -> list[str]:
    """The strings of ``example``'s input that must survive: the label, the target's JSON strings, ``extra``;
    only those that occur in the input, longest first (so a span inside another is not split apart)."""
    text = input_text(example)
    found: list[str] = []
    if example.label:
        found.append(example.label)
    reference = example.reference
    if reference and reference.lstrip()[:1] in "{[":
        try:
            found += _strings(json.loads(reference))
        except ValueError:
            pass
    found += extra or []
    spans = {s for s in found if s.strip() and s in text}
    return sorted(spans, key=lambda s: (-len(s), s))


def split_protected(text: str, protected: list[str]) -> list[tuple[str, bool]]:
    """``text`` as consecutive pieces ``(piece, locked)``: locked pieces are protected spans (kept whole),
    the rest may be changed. Joining the pieces gives ``text`` back."""
    pieces: list[tuple[str, bool]] = []
    i, start = 0, 0
    spans = sorted(protected, key=lambda s: (-len(s), s))
    while i < len(text):
        hit = next((s for s in spans if s and text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        if start < i:
            pieces.append((text[start:i], False))
        pieces.append((hit, True))
        i = start = i + len(hit)
    if start < len(text):
        pieces.append((text[start:], False))
    return pieces


def spans_kept(candidate: Example, spans: list[str]) -> list[str]:
    """The protected spans missing from ``candidate``'s input (empty: all kept)."""
    text = input_text(candidate)
    return [s for s in spans if s not in text]
