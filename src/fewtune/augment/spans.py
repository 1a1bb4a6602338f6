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


def _strings_from_target(example: Example) -> list[str]:
    reference = example.reference
    if not reference or reference.lstrip()[:1] not in "{[":
        return []
    try:
        return [s for s in _strings(json.loads(reference)) if s.strip()]
    except ValueError:
        return []


def _pieces_in(target: str, text: str, shortest: int = 2) -> list[str]:
    """The longest pieces of ``target`` that occur in ``text`` (recursively left and right of each match), of at
    least ``shortest`` characters; pieces without CJK characters are whole words of at least 3 characters ("on",
    or "eatles" of "The Beatles" in "the beatles", are not spans worth keeping)."""
    import difflib

    if len(target) < shortest:
        return []
    match = difflib.SequenceMatcher(None, target, text, autojunk=False).find_longest_match(0, len(target), 0, len(text))
    a, b, size = match.a, match.b, match.size
    cjk = any("\u4e00" <= ch <= "\u9fff" for ch in target[a:a + size])
    if not cjk:  # whole words only: drop a word cut at either end ("he Rolling Stones" -> "Rolling Stones")
        while size and b > 0 and text[b - 1].isalnum() and text[b].isalnum():
            a, b, size = a + 1, b + 1, size - 1
        while size and b + size < len(text) and text[b + size].isalnum() and text[b + size - 1].isalnum():
            size -= 1
    piece = target[a:a + size].strip()
    if len(piece) < (shortest if cjk else max(shortest, 3)):
        return []
    return [piece, *_pieces_in(target[:a], text, shortest), *_pieces_in(target[a + size:], text, shortest)]


def protected_spans(example: Example, extra: list[str] | None = None) -> list[str]:
    """The strings of ``example``'s input that must survive: the label, the target's JSON strings, ``extra``;
    only those that occur in the input, longest first (so a span inside another is not split apart). A target
    string the input says in other words contributes the longest pieces of it the input holds (关闭氛围灯 in
    "关闭香氛和氛围灯": 氛围灯 and 关闭)."""
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
    for target in _strings_from_target(example):
        if target not in text:  # said otherwise in the input ("关闭香氛和氛围灯" for 关闭氛围灯): keep its pieces
            spans.update(_pieces_in(target, text))
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
