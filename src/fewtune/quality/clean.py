"""`fewtune data clean`: the safe fixes, and nothing lost.

Safe fixes: strip whitespace around every text, normalise line endings to ``\\n``, drop the
byte-order mark, remove exact duplicates (after those fixes), and set aside every record or
line that fails the schema checks. Every input example ends up in exactly one of two files:
the clean file (records in their own format, in input order) or the rejects file (JSON
lines ``{"line", "reasons", "record" | "raw"}``), so nothing is silently dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewtune.quality.duplicates import exact_key
from fewtune.data.encoding import encoding_name, reading_codec, split_lines, without_bom
from fewtune.data.formats import DataError

SAME_LINE = "starts on the same line as the one before it"  # the reader's reason for a one-line JSON array
_UNDECODABLE = re.compile(r"not \S+ text")  # the reader's reason for bytes not in the file's encoding


@dataclass
class CleanResult:
    kept: list[int] = field(default_factory=list)  # input lines written to the clean file, in order
    rejected: dict[int, list[str]] = field(default_factory=dict)  # input line -> reasons
    fixed: dict[str, int] = field(default_factory=lambda: {"whitespace": 0, "line_endings": 0})
    notes: list[str] = field(default_factory=list)  # whole-file remarks (BOM removed, empty file)

    @property
    def total(self) -> int:
        return len(self.kept) + len(self.rejected)


def _fix_text(text: str, key: str | None, keep_leading_space: bool, fixed: dict[str, int]) -> str:
    new = text.replace("\r\n", "\n").replace("\r", "\n")
    if new != text:
        fixed["line_endings"] += 1
    stripped = new.strip()
    # a completion's leading space can be part of the format (plain template after a separator
    # like "->"), so one space stays where there was leading whitespace
    if keep_leading_space and key == "completion" and new[:1].isspace() and stripped:
        stripped = " " + stripped
    if stripped != new:
        fixed["whitespace"] += 1
    return stripped


def fix_record(record: Any, fixed: dict[str, int], keep_leading_space: bool = True, key: str | None = None) -> Any:
    """The record with every string stripped and its line endings normalised (recursively)."""
    if isinstance(record, str):
        return _fix_text(record, key, keep_leading_space, fixed)
    if isinstance(record, dict):
        return {k: fix_record(v, fixed, keep_leading_space, k) for k, v in record.items()}
    if isinstance(record, list):
        return [fix_record(v, fixed, keep_leading_space, key) for v in record]
    return record


def _raw_lines(raw: bytes, codec: str) -> list[str]:
    """The file's lines as the readers number them, undecodable bytes kept visible as \\xNN escapes."""
    return split_lines(without_bom(raw.decode(codec, errors="backslashreplace"), codec))


def clean_data(path: str | Path, out: str | Path, rejects: str | Path, fmt: str = "auto", dataset: str | None = None,
               rename: dict[str, str] | None = None, keep_leading_space: bool = True,
               encoding: str | None = None) -> CleanResult:
    """Write the clean records to ``out`` and every other input example, with its reasons, to ``rejects``.

    ``encoding``: the input's (utf-8, the default; auto; or a codec name such as gb18030); the
    output is always UTF-8 without a byte-order mark.
    """
    from fewtune.quality.check import collect_data

    result = CleanResult()
    data = collect_data(path, fmt, dataset, rename, fix=lambda r: fix_record(r, result.fixed, keep_leading_space),
                        encoding=encoding)
    source = Path(data.path)
    whole_file = [p for p in data.problems if p.line is None and p.severity == "error"]
    unread = [p for p in data.problems if p.check == "read" and p.severity == "error"]
    if not source.is_file() or (source.name == "dataset_info.json" and unread):
        # nothing to account for line by line: the file (or the dataset_info entry naming it) cannot be read
        first = (unread or whole_file or [None])[0]
        raise DataError(data.path, first.line if first else None, first.message if first else "file not found")
    raw_bytes = source.read_bytes()
    codec = reading_codec(raw_bytes, encoding)
    if raw_bytes.startswith(b"\xef\xbb\xbf"):
        result.notes.append("removed the byte-order mark")
    if codec != "utf-8-sig":
        result.notes.append(f"read as {encoding_name(codec, raw_bytes)}, written as UTF-8")
    rejected: dict[int, list[str]] = {line: list(reasons) for line, reasons in data.rejected.items()}
    raw = _raw_lines(raw_bytes, codec)
    is_array = "\n".join(raw).lstrip(" \t\r\n").startswith("[")
    good = {ex.line: ex for ex in data.examples}
    seen: dict[tuple, int] = {}
    for line in sorted(good):
        if line in rejected:
            continue
        key = exact_key(good[line])
        if key in seen:
            rejected[line] = [f"exact duplicate of line {seen[key]} (after stripping whitespace)"]
        else:
            seen[key] = line
    for line in data.records:
        if line not in good and line not in rejected:  # converted nowhere and no reason given: never drop silently
            rejected[line] = ["could not be converted"]
    out_path, rejects_path = Path(out), Path(rejects)
    for p in (out_path, rejects_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    kept_records = []
    for line in sorted(data.records):
        if line not in rejected:
            result.kept.append(line)
            kept_records.append(data.fixed[line])
    fatal = [n for n, reasons in rejected.items() if any("the rest of the file is not read" in r for r in reasons)]
    starts = sorted(set(data.records) | set(rejected))
    with rejects_path.open("w", encoding="utf-8") as sink:
        for line in sorted(rejected):
            row: dict[str, Any] = {"line": line, "reasons": rejected[line]}
            if line in data.records:
                row["record"] = data.records[line]  # as it was in the input
            if line not in data.records or any(_UNDECODABLE.match(r) or SAME_LINE in r for r in rejected[line]):
                # the raw text, too, where the record read is not all there was: undecodable bytes, or
                # the other elements of a JSON array on this line
                row["raw"] = _raw_text(raw, line, starts, line in fatal, is_array)
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
    result.rejected = rejected
    _write_records(out_path, kept_records)
    if not data.records and not rejected:
        result.notes.extend(p.message for p in whole_file)
    return result


def _raw_text(raw: list[str], line: int, starts: list[int], fatal: bool, is_array: bool) -> str:
    """The input text of the example starting on ``line``: up to the next example (a CSV row or array element
    can span lines), or, where the reader stopped (a broken JSON array), the whole unread rest of the file."""
    later = [s for s in starts if s > line]
    upto = len(raw) if fatal or not later else later[0] - 1
    lines = raw[line - 1: upto]
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()
    if is_array and not fatal and not later and len(lines) > 1 and lines[-1].strip() == "]":
        lines.pop()  # the array's closing bracket belongs to no element
    return "\n".join(lines)


def _write_records(path: Path, records: list[dict]) -> None:
    if path.suffix.lower() == ".json":  # a JSON array, one record per line, for tools that want one document
        body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
        path.write_text(f"[\n{body}\n]\n" if records else "[]\n", encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
