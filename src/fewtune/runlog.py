"""The JSON-lines logs fewtune writes and reads back: a run's metrics.jsonl, predictions, sweep records.

One reader for all of them, so a damaged file reads the same everywhere: the file, the 1-based
line and what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path


class RunLogError(ValueError):
    """A JSON-lines file that is not what fewtune wrote (not UTF-8, a line that is not a JSON object)."""


def read_log(path: str | Path) -> list[dict]:
    """Every non-blank line of a JSON-lines file, each a JSON object."""
    return [record for _, record in numbered_records(path)]


def numbered_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; RunLogError naming the first bad line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RunLogError(f"{path} is damaged: not UTF-8 text") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunLogError(f"{path}:{number} is damaged: not a JSON line ({err.msg})") from None
        if not isinstance(record, dict):
            raise RunLogError(f"{path}:{number} is damaged: not a JSON object")
        out.append((number, record))
    return out


def append(path: str | Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def keep_until(path: str | Path, step: int) -> None:
    """Drop the records after ``step``: what an interrupted run logged past the checkpoint it resumes from."""
    path = Path(path)
    if path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
