"""Duplicates, conflicts and train/validation leakage.

Two examples are *exact* duplicates when every turn is the same text; *near* duplicates
when they are the same after :func:`normalize` (case, whitespace, full-/half-width forms,
punctuation), which catches the copies that differ by a trailing space or a Chinese
comma. A *conflict* is the same (normalised) input with a different output: for
classification that is two labels for one text, which no model can learn.
"""

from __future__ import annotations

from fewtune.data.collect import Collected
from fewtune.data.formats import Example
from fewtune.quality.textstats import normalize


# a message's images are part of what it says: one question about two pictures is two inputs
def exact_key(example: Example) -> tuple:
    return tuple((m.role, m.content, *m.images) for m in example.messages) + ((example.label,) if example.label else ())


def near_key(example: Example) -> tuple:
    return tuple((m.role, normalize(m.content), *m.images) for m in example.messages)


def input_key(example: Example) -> tuple:
    return tuple((m.role, normalize(m.content), *m.images) for m in example.prompt_messages)


def output_of(example: Example) -> str:
    return example.label if example.label is not None else (example.reference or "")


def _output_field(example: Example) -> str | None:
    fields = example.meta.get("fields") or [None]
    return "label" if example.label is not None else fields[-1]


def duplicate_problems(data: Collected) -> dict:
    """Add exact/near duplicate and conflict problems to ``data``; return the counts."""
    exact: dict[tuple, int] = {}
    near: dict[tuple, int] = {}
    inputs: dict[tuple, tuple[int, str]] = {}
    counts = {"exact_duplicates": 0, "near_duplicates": 0, "conflicts": 0}
    for example in data.examples:
        line = example.line
        key = exact_key(example)
        if key in exact:
            counts["exact_duplicates"] += 1
            data.add("warning", "duplicates", line, None, f"exact duplicate of line {exact[key]}")
            continue
        exact[key] = line
        nkey = near_key(example)
        if nkey in near:
            counts["near_duplicates"] += 1
            data.add("warning", "duplicates", line, None, f"near-duplicate of line {near[nkey]} (the same text "
                     "after normalising case, whitespace, full-/half-width forms and punctuation)")
            continue
        near[nkey] = line
        ikey = input_key(example)
        output = output_of(example)
        if ikey in inputs and normalize(inputs[ikey][1]) != normalize(output):
            first_line, first_output = inputs[ikey]
            counts["conflicts"] += 1
            if example.label is not None:
                data.add("error", "duplicates", line, _output_field(example), f"conflicting label: the same input as "
                         f"line {first_line} is labelled {first_output!r} there and {output!r} here")
            else:
                there, here = _contrast(first_output, output)
                data.add("warning", "duplicates", line, _output_field(example), f"the same input as line {first_line} "
                         f"with a different output ({there!r} there, {here!r} here)")
        elif ikey not in inputs:
            inputs[ikey] = (line, output)
    return counts


def leakage_problems(train: Collected, validation: Collected) -> dict:
    """Validation examples whose input (normalised) also occurs in training: their scores mean little."""
    seen: dict[tuple, tuple[int, str]] = {}
    for example in train.examples:
        seen.setdefault(input_key(example), (example.line, normalize(output_of(example))))
    leaked = identical = 0
    for example in validation.examples:
        hit = seen.get(input_key(example))
        if hit is None:
            continue
        leaked += 1
        same_output = hit[1] == normalize(output_of(example))
        identical += same_output
        validation.add("error", "duplicates", example.line, None,
                       f"leakage: the same input as {train.path}:{hit[0]}"
                       f"{' with the same output' if same_output else ' (with a different output)'}; "
                       "validation scores on it measure memory, not generalisation")
    return {"leaked_inputs": leaked, "leaked_identical": identical, "validation_examples": len(validation.examples)}


def _contrast(a: str, b: str, width: int = 60) -> tuple[str, str]:
    """Both texts cut to ``width`` characters around where they first differ."""
    start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, start - 10)

    def cut(text: str) -> str:
        piece = text[start: start + width]
        return ("…" if start else "") + piece + ("…" if start + width < len(text) else "")

    return cut(a), cut(b)
