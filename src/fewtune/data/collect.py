"""Reading a data file while collecting every problem, for `data check` and `data clean`.

The strict loader (:func:`fewtune.data.formats.load_examples`) stops at the first problem,
which is right for training. Checking needs the opposite: read everything that can be read,
and say what is wrong with each of the rest. This module does that on top of the same
functions (``read_records`` in collecting mode, ``detect_format``, ``convert_record``, and each
format's registry entry for the fields it needs and the field each message came from), so a
file that passes here loads the same way for training.
"""

from __future__ import annotations

import codecs
import difflib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fewtune.data.formats import (
    FORMAT_REGISTRY,
    DataError,
    Example,
    _apply_mapping,
    _resolve_source,
    convert_record,
    detect_format,
    read_records,
    with_absolute_images,
)


@dataclass
class Problem:
    severity: str  # "error" or "warning"
    check: str  # read, schema, template, duplicates, length, labels, size
    file: str
    line: int | None
    field: str | None
    message: str

    def to_dict(self) -> dict:
        return {"severity": self.severity, "check": self.check, "file": self.file, "line": self.line,
                "field": self.field, "message": self.message}

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {f'field {self.field!r}: ' if self.field else ''}{self.message}"


@dataclass
class Collected:
    """What could be read from one file, and what is wrong with the rest."""

    path: str  # the data file itself (a dataset_info.json resolves to the file it names)
    fmt: str | None  # the file's format (forced, or what most records look like)
    examples: list[Example] = field(default_factory=list)
    records: dict[int, dict] = field(default_factory=dict)  # line -> record as read (before renames)
    fixed: dict[int, dict] = field(default_factory=dict)  # line -> record after ``fix`` (when one is given)
    problems: list[Problem] = field(default_factory=list)
    rejected: dict[int, list[str]] = field(default_factory=dict)  # line -> reasons, for records and bad lines
    their_names: dict[str, str] = field(default_factory=dict)  # our field name -> the file's (from ``rename``)

    def add(self, severity: str, check: str, line: int | None, field_name: str | None, message: str) -> None:
        field_name = self.file_field(field_name)
        self.problems.append(Problem(severity, check, self.path, line, field_name, message))
        if severity == "error" and line is not None:
            self.rejected.setdefault(line, []).append(f"{f'{field_name}: ' if field_name else ''}{message}")

    def file_field(self, name: str | None) -> str | None:
        """A field as the file names it (``text`` read from ``sentence`` is reported as ``sentence``)."""
        if not name or not self.their_names:
            return name
        head = name.split("[", 1)[0].split(".", 1)[0]
        return self.their_names[head] + name[len(head):] if head in self.their_names else name


def rename_fields(record: dict, rename: dict[str, str] | None) -> dict:
    """``rename`` maps our field name to the file's (``{"text": "sentence"}``)."""
    if not rename:
        return record
    out = dict(record)
    for ours, theirs in rename.items():
        if theirs in record:
            out[ours] = out.pop(theirs) if theirs != ours else record[theirs]
    return out


def collect(path: str | Path, fmt: str = "auto", dataset: str | None = None,
            rename: dict[str, str] | None = None, fix: Callable[[dict], dict] | None = None) -> Collected:
    """Read a data file, converting every record that can be converted and recording every problem.

    ``rename`` maps our field names to the file's; ``fix`` rewrites each record before it is
    checked (``data clean`` passes its safe fixes, so the checks judge the cleaned record).
    """
    try:
        source, mapped_fmt, mapping = _resolve_source(Path(path), dataset)
    except (DataError, OSError, json.JSONDecodeError) as err:
        out = Collected(str(path), None)
        out.add("error", "read", getattr(err, "line", None), None, getattr(err, "reason", str(err)))
        return out
    if mapped_fmt:
        fmt = mapped_fmt
    if fmt != "auto" and fmt not in FORMAT_REGISTRY:  # a usage error, not a problem of the file
        raise ValueError(f"unknown format {fmt!r}; known formats: auto, {', '.join(FORMAT_REGISTRY)}")
    out = Collected(str(source), None if fmt == "auto" else fmt, their_names=dict(rename or {}))
    errors: list[DataError] = []
    rows = [(line, record) for line, record in read_records(source, errors)]
    _layout_problems(out, Path(source), errors, len(rows))
    for err in errors:
        out.add("error", "read", err.line, err.field, err.reason + _read_hint(err.reason))
    base = Path(source).parent
    rows = [(line, with_absolute_images(record, base)) for line, record in rows]  # written elsewhere, still found
    for line, record in rows:
        out.records[line] = record
    if fix is not None:
        rows = [(line, fix(record)) for line, record in rows]
        out.fixed = dict(rows)
    _convert_all(out, rows, fmt, mapping, rename)
    return out


def _layout_problems(out: Collected, source: Path, errors: list[DataError], n_rows: int) -> None:
    """BOM, and JSON arrays vs JSON lines confused with each other."""
    if not source.is_file():
        return
    raw = source.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        out.add("warning", "read", 1, None, "the file starts with a UTF-8 byte-order mark (BOM): fewtune skips it, but "
                "other tools read it as part of the first field name; `fewtune data clean` writes files without it")
    head = raw.lstrip(codecs.BOM_UTF8).lstrip()
    suffix = source.suffix.lower()
    if suffix == ".jsonl" and head.startswith(b"["):
        out.add("warning", "read", 1, None, "the file is named .jsonl but holds one JSON array; tools that expect "
                "JSON lines (one object per line) will fail on it")
    elif suffix == ".json" and head.startswith(b"{") and n_rows > 1 and not errors:
        out.add("warning", "read", 1, None, f"the file is named .json but holds JSON lines ({n_rows} objects, one per "
                "line); tools that expect one JSON document will fail on it (.jsonl says what it is)")
    if head.startswith(b"{") and any(e.reason.startswith("malformed JSON") for e in errors):
        objects = _concatenated_objects(raw.decode("utf-8-sig", errors="replace"))
        if objects > 1:
            out.add("error", "read", None, None, f"the file holds {objects} pretty-printed JSON objects one after "
                    "another: JSON lines needs each object on a single line; or wrap them in [ ... ] with commas "
                    "to make a JSON array")


def _concatenated_objects(text: str) -> int:
    decoder, pos, count = json.JSONDecoder(), 0, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            return count
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return 0
        if not isinstance(value, dict):
            return 0
        count += 1


def _read_hint(reason: str) -> str:
    if "got list" in reason and reason.startswith("each line"):
        return " (this line holds a JSON array: a file that is one JSON array must start with '[')"
    if "Unexpected UTF-8 BOM" in reason:
        return " (a byte-order mark inside the file: were files concatenated?)"
    return ""


def _guess_format(records: list[dict]) -> str | None:
    """The format whose required fields the records share most (to name what is missing)."""
    keys = Counter(k for r in records for k in r)
    # a format detected only alone (text) is never the guess: records with other fields are something else
    candidates = [f for f, entry in FORMAT_REGISTRY.items() if not entry.alone]
    best = max(candidates, key=lambda f: (sum(keys[k] for k in _fields(f)), -len(_fields(f))))
    return best if any(keys[k] for k in _fields(best)) else None


def _fields(fmt: str) -> tuple[str, ...]:
    """The fields a record of the format needs (from its registry entry)."""
    return FORMAT_REGISTRY[fmt].fields


def _convert_all(out: Collected, rows: list[tuple[int, dict]], fmt: str, mapping: dict | None,
                 rename: dict[str, str] | None) -> None:
    renamed = [(line, rename_fields(record, rename)) for line, record in rows]
    detected = {line: (fmt if fmt != "auto" else detect_format(record)) for line, record in renamed}
    if fmt == "auto":
        counts = Counter(f for f in detected.values() if f)
        out.fmt = counts.most_common(1)[0][0] if counts else _guess_format([r for _, r in renamed])
        if len(counts) > 1:
            summary = ", ".join(f"{n} {f}" for f, n in counts.most_common())
            out.add("error", "schema", None, None, f"mixed formats in one file ({summary}); records that are not "
                    f"{out.fmt} are reported line by line")
    if out.fmt is None:
        out.add("error", "schema", None, None, "no record looks like any supported format; fields seen: "
                f"{sorted({k for _, r in renamed for k in r})}; expected e.g. "
                + "; ".join(f"{f}: {', '.join(_fields(f))}" for f in FORMAT_REGISTRY))
        for line, _ in renamed:
            out.rejected.setdefault(line, []).append("no supported format")
        return
    for line, record in renamed:
        record_fmt = detected[line]
        if record_fmt is not None and record_fmt != out.fmt:
            out.add("error", "schema", line, None, f"this record is {record_fmt} but the file is {out.fmt} "
                    "(mixed formats in one file)")
            continue
        try:
            example = convert_record(record, out.fmt, out.path, line, mapping)
        except DataError as err:
            out.add("error", "schema", line, err.field, err.reason + _missing_hint(err, record, out.fmt))
            continue
        raw = _apply_mapping(record, out.fmt, mapping) if mapping else record
        example.meta["fields"] = FORMAT_REGISTRY[out.fmt].sources(example, raw)
        if not _structure_ok(out, example, line):
            continue
        out.examples.append(example)


def _missing_hint(err: DataError, record: dict, fmt: str) -> str:
    if err.reason != "missing" or not err.field:
        return ""
    entry = FORMAT_REGISTRY[fmt]
    known = set(entry.fields) | set(entry.optional)
    strangers = [k for k in record if k not in known]
    near = difflib.get_close_matches(err.field, strangers, n=1, cutoff=0.6)
    if near:
        return f" (the record has {near[0]!r}: a misspelling of {err.field!r}?)"
    return f" ({fmt} records need {', '.join(entry.fields)}; this one has {', '.join(sorted(record)) or 'no fields'})"


def _role_field(example: Example, index: int) -> str:
    name = example.meta["fields"][index]
    if name.endswith(".content"):
        return name[: -len("content")] + "role"
    if name.endswith(".value"):
        return name[: -len("value")] + "from"
    return name


def _structure_ok(out: Collected, example: Example, line: int) -> bool:
    """Chats must alternate user/assistant (tool turns after an assistant call), with system first."""
    msgs = example.messages
    if example.is_text:  # a raw document (format text): no turns to check; the reader refused an empty one
        return True
    ok = True
    for i, message in enumerate(msgs):
        where = example.meta["fields"][i]
        if message.role == "system" and i > 0:
            out.add("error", "schema", line, _role_field(example, i), "a system turn must be the first turn")
            ok = False
        if not message.content.strip():
            if message.role == "assistant":
                out.add("error", "schema", line, where, "is empty: an assistant turn with no text teaches nothing")
                ok = False
            else:
                out.add("warning", "schema", line, where, f"is empty ({message.role} turn)")
        if i == 0:
            continue
        before = msgs[i - 1].role
        if message.role == before and message.role in ("user", "assistant"):
            out.add("error", "schema", line, _role_field(example, i),
                    f"the chat does not alternate: two {message.role} turns in a row")
            ok = False
        elif message.role == "tool" and before not in ("assistant", "tool"):
            out.add("error", "schema", line, _role_field(example, i), f"a tool turn must follow an assistant turn "
                    f"(a tool call), not a {before} turn")
            ok = False
    turns = [m for m in msgs if m.role != "system"]
    if turns and turns[0].role != "user":
        out.add("warning", "schema", line, _role_field(example, msgs.index(turns[0])),
                f"the chat starts with a{'n' if turns[0].role == 'assistant' else ''} {turns[0].role} turn, not a user "
                "turn (many chat templates reject this)")
    if not msgs or msgs[-1].role != "assistant":
        out.add("error", "schema", line, _role_field(example, len(msgs) - 1) if msgs else None,
                "the chat does not end with an assistant turn: the last turn is what a model learns to answer")
        ok = False
    return ok
