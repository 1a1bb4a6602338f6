"""Reading data files and converting every supported format to one conversation form.

Formats (detected from the fields of each record, or forced with ``format``):

- ``prompt_completion``: ``{"prompt", "completion"}`` (OpenAI legacy fine-tuning)
- ``messages``: ``{"messages": [{"role", "content", "weight"?}]}`` (OpenAI chat)
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?}``
- ``sharegpt``: ``{"conversations": [{"from", "value"}], "system"?, "tools"?}``
- ``classification``: ``{"text", "label"}``
- ``qa``: ``{"question", "answer", "context"?}``
- ``text``: ``{"text", "id"?}`` and no other field (else ``format: text`` must be given), or a ``.txt`` file: raw text for continued pretraining (loss on every
  token, no chat template); a ``.txt`` file holds one document per blank-line-separated block, or
  one per line when it has no blank line

Each format is one entry of ``FORMAT_REGISTRY`` (:func:`register_format`): its fields, reader,
writer and detection priority; ``FORMATS`` lists the names.

Files: JSON lines, a JSON array, or CSV; or a LLaMA-Factory ``dataset_info.json`` with a
dataset name, whose column mapping is honoured. Every problem is reported with the file,
the 1-based line and the field.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import io
import json
import logging
import re
import sys
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from fewtune.data.images import IMAGE_PLACEHOLDER, ImageError, count_placeholders, load_image, resolve_image
from fewtune.data.encoding import (ENCODING_NAMES, LINE_BREAK, LINE_BREAK_BYTES, NON_ASCII_BYTES, ascii_compatible,
                                   chosen_encoding, detect_encoding, encoding_name, read_hint, reading_codec, split_lines,
                                   utf8_read_as_other, without_bom)

ROLES = ("system", "user", "assistant", "tool")
TEXT_ROLE = "text"  # the one message of a raw-text example (format text): rendered as is, every token trained
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
    "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool",
}
SHAREGPT_TAGS = {"user": "human", "assistant": "gpt", "tool": "observation", "system": "system"}
log = logging.getLogger(__name__)


class DataError(ValueError):
    """A problem in a data file, located by file, line and field."""

    def __init__(self, file: str, line: int | None, message: str, field: str | None = None):
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {f'field {field!r}: ' if field else ''}{message}")


@dataclass
class Message:
    role: str
    content: str
    weight: float | None = None  # None: 1 for assistant turns, prompt_loss_weight for the rest
    # the images this message shows, one per <image> placeholder in ``content``, in order (fewtune.data.images)
    images: tuple[str, ...] = ()


@dataclass
class Example:
    """The internal conversation form every format converts to."""

    messages: list[Message]
    source: str = ""
    line: int = 0
    label: str | None = None  # classification label, kept for stratified splits and metrics
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_messages(self) -> list[Message]:
        """Everything before the final assistant turn: what a model sees at inference."""
        if self.messages and self.messages[-1].role == "assistant":
            return self.messages[:-1]
        return self.messages

    @property
    def reference(self) -> str | None:
        """The final assistant turn: the expected output."""
        if self.messages and self.messages[-1].role == "assistant":
            return self.messages[-1].content
        return None

    @property
    def images(self) -> list[str]:
        """Every image of the conversation, in order."""
        return [ref for m in self.messages for ref in m.images]

    @property
    def is_text(self) -> bool:
        """A raw-text document (format text) rather than a conversation."""
        return len(self.messages) == 1 and self.messages[0].role == TEXT_ROLE

    @property
    def input_text(self) -> str:
        """The last user turn (or the last prompt turn): what reports show as the example's input."""
        users = [m.content for m in self.prompt_messages if m.role == "user"]
        return users[-1] if users else self.prompt_messages[-1].content

    def to_dict(self) -> dict:
        row: dict[str, Any] = {"messages": [
            {"role": m.role, "content": m.content, **({"weight": m.weight} if m.weight is not None else {})}
            for m in self.messages
        ]}
        if self.images:  # LLaMA-Factory's layout: <image> placeholders in the text, the files in one list
            row["images"] = self.images
        if self.label is not None:
            row["label"] = self.label
        return row


# ---------------------------------------------------------------- reading files

MAX_DEPTH = 100  # lists and objects inside each other; no data format nests anywhere near this deep
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB]|\\u[dD][c-fC-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _decode(path: Path, raw: bytes, encoding: str, problems: list[DataError] | None) -> str:
    """The file's text; undecodable bytes raise (strict) or are reported line by line and replaced."""
    codec = reading_codec(raw, encoding)
    if encoding == "auto" and codec != "utf-8-sig" and problems is None:
        # the strict reader (training) says so here; the data commands, which collect, report it themselves
        log.warning("%s: read as %s (detected by --encoding auto)", path, encoding_name(codec, raw))
    if codec != "utf-8-sig" and utf8_read_as_other(raw, codec):
        first = NON_ASCII_BYTES.search(raw)
        line = len(LINE_BREAK_BYTES.findall(raw, 0, first.start())) + 1 if first else 1
        raise DataError(str(path), line, f"the file is valid UTF-8 but it was to be read as {encoding_name(codec)}, "
                        "which would garble its text" + (" (the first non-ASCII character is on this line)" if first
                                                         else "") + ": leave out --encoding (UTF-8 is the default) or "
                        "use --encoding auto")
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as err:
        text = _undecodable(path, raw, codec, err, problems)
    return without_bom(text, codec)


def _undecodable(path: Path, raw: bytes, codec: str, err: UnicodeDecodeError,
                 problems: list[DataError] | None) -> str:
    utf8 = codec == "utf-8-sig"
    what = "UTF-8" if utf8 else encoding_name(codec)
    detected = detect_encoding(raw)
    hint = (f": the file looks like {encoding_name(detected, raw)} ({ENCODING_NAMES.get(detected, detected)}); "
            f"{read_hint(detected)}") if detected else ""
    # utf-8-sig counts positions after the byte-order mark
    at = err.start + (len(codecs.BOM_UTF8) if utf8 and raw.startswith(codecs.BOM_UTF8) else 0)
    line = len(LINE_BREAK_BYTES.findall(raw, 0, at)) + 1
    if detected and not ascii_compatible(detected) or not ascii_compatible(codec.replace("-sig", "")):
        # UTF-16 read as UTF-8 (or the reverse) has no lines worth reporting one by one
        raise DataError(str(path), line, f"not {what} text (byte 0x{raw[at]:02x} at offset {at})"
                        + (hint or "; name the file's encoding with --encoding")) from None
    if problems is None:
        start = max(raw.rfind(b"\n", 0, at), raw.rfind(b"\r", 0, at)) + 1
        raise DataError(str(path), line, f"not {what} text (byte 0x{raw[at]:02x} at column {at - start + 1})"
                        + (hint or "; if the file is in another encoding, name it with --encoding (e.g. cp1252)")
                        ) from None
    for number, chunk in enumerate(LINE_BREAK_BYTES.split(raw), start=1):
        try:
            chunk.decode(codec if number == 1 else codec.replace("-sig", ""))
        except UnicodeDecodeError as bad:
            if detected:  # one message for every such line, so the report lists them together
                problems.append(DataError(str(path), number, f"not {what} text{hint}"))
            else:
                problems.append(DataError(str(path), number, f"not {what} text (byte 0x{chunk[bad.start]:02x} at "
                                          f"column {bad.start + 1})"))
    return raw.decode(codec, errors="replace")  # keeps the layout; the bad lines are reported (BOM: see _decode)


def read_records(path: str | Path, problems: list[DataError] | None = None,
                 encoding: str | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line, record) from JSON lines, a JSON array or CSV, raising DataError on bad input.

    With ``problems`` (a list), bad input is appended to it instead and reading goes on past
    it where the layout allows (JSON lines, CSV; a JSON array stops at a malformed element).
    ``data check`` and ``data clean`` use that to report every problem, not just the first.
    One thing raises even then: a file whose lines cannot be told apart in the encoding asked
    for (UTF-16 read as UTF-8, say), because there are no lines to report on.

    ``encoding``: ``utf-8`` (None means that too, unless :func:`reading_encoding` set another),
    a Python codec name such as ``gb18030``, or ``auto`` (detect; without ``problems``, a log
    warning names what was found). A file that is not in the encoding is an error naming the encoding it looks like,
    never text read with replacement characters.
    """
    path = Path(path)
    encoding = chosen_encoding(encoding)
    if path.is_dir():
        yield from _stop(problems, DataError(str(path), None, "is a directory, not a data file"))
        return
    if not path.is_file():
        yield from _stop(problems, DataError(str(path), None, "file not found"))
        return
    reported = len(problems) if problems is not None else 0
    try:
        raw = path.read_bytes()
        text = _decode(path, raw, encoding, problems)
    except OSError as err:
        yield from _stop(problems, DataError(str(path), None, f"cannot be read: {err.strerror or err}"))
        return
    except MemoryError:
        yield from _stop(problems, DataError(str(path), None, "too large to read into memory "
                                             f"({path.stat().st_size:,} bytes)"))
        return
    if not text.strip():
        yield from _stop(problems, DataError(str(path), None, "the file is empty"))
        return
    # lines with bytes not in the encoding are reported; records holding them are left out, never
    # read with replacement characters (their raw text is what `data clean` keeps)
    bad = {e.line for e in problems[reported:]} if problems is not None else set()
    if path.suffix.lower() in (".csv", ".tsv"):
        yield from _read_csv(path, text, problems, bad)
    elif path.suffix.lower() == ".txt":
        yield from _read_txt(text, bad)
    elif text.lstrip().startswith("["):
        yield from _read_json_array(path, text, problems, bad)
    else:
        yield from _read_jsonl(path, text, problems, bad)


def _left_out(path: Path, start: int, end: int, bad: set[int], what: str) -> DataError | None:
    """The record on lines start..end holds an undecodable line: the error for its first line, if that is not
    one of them (each undecodable line has its own already)."""
    inside = sorted(n for n in bad if start <= n <= end)
    if not inside or start in bad:
        return None
    return DataError(str(path), start, f"this {what} holds text that is not in the file's encoding on line "
                     f"{inside[0]} (reported there); it is left out")


def _stop(problems: list[DataError] | None, error: DataError) -> Iterator[tuple[int, dict]]:
    if problems is None:
        raise error
    problems.append(error)
    yield from ()


def _value_problem(value: Any, text: str) -> str | None:
    """Why a parsed JSON value cannot be a record's content: nested too deeply, or a lone surrogate."""
    deep = text.count("[") + text.count("{") > MAX_DEPTH  # cheap tests first: most records need no walk
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    if not (deep or surrogates):
        return None
    stack = [(value, 1)]  # iterative: a walk by recursion would hit the limit the parser did not
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item) if surrogates else None
            if found:
                return (f"a string holds a lone surrogate escape \\u{ord(found.group()):04x} (half of a UTF-16 pair, "
                        "so not a character: the text was cut in the middle of an emoji or similar)")
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                return f"nested more than {MAX_DEPTH} levels deep (lists and objects inside each other)"
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return None


def _parse(text: str, decoder: json.JSONDecoder | None = None, pos: int = 0) -> tuple[Any, int, str | None, int]:
    """(value, end, why-not, error position): one JSON value, every way it can fail as a reason."""
    try:
        if decoder is None:
            value, end = json.loads(text), len(text)
        else:
            value, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as err:
        return None, pos, f"malformed JSON: {err.msg}", err.pos
    except RecursionError:
        return None, pos, ("nested too deeply for the JSON parser (about 1,000 levels of [ ] and { }; no data "
                           "format nests more than a few)"), pos
    except ValueError as err:  # an integer with more digits than Python converts
        limit = sys.get_int_max_str_digits()
        why = f"a number has more than {limit:,} digits" if "digits" in str(err) else str(err)
        return None, pos, f"cannot read this JSON: {why}", pos
    why = _value_problem(value, text[pos:end])
    return (None, end, why, pos) if why else (value, end, None, pos)


def _read_jsonl(path: Path, text: str, problems: list[DataError] | None = None,
                bad: set[int] = frozenset()) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(split_lines(text), start=1):
        if not line.strip() or number in bad:
            continue
        record, _, why, at = _parse(line)
        if why is None and not isinstance(record, dict):
            why = f"each line must be a JSON object, got {type(record).__name__}"
        elif why is not None and why.startswith("malformed JSON"):
            why += f" (column {at + 1})"
        if why is not None:
            error = DataError(str(path), number, why)
            if problems is None:
                raise error
            problems.append(error)
            continue
        yield number, record


def _read_txt(text: str, bad: set[int] = frozenset()) -> Iterator[tuple[int, dict]]:
    """A plain-text file as ``{"text"}`` records: blank lines separate documents; a file without any blank
    line (one review or sentence per line) has one document per line. Each record's line is its first."""
    lines = split_lines(text)
    filled = [i for i, line in enumerate(lines) if line.strip()]
    # blank lines only before the first or after the last line of text do not separate anything
    per_line = not filled or all(lines[i].strip() for i in range(filled[0], filled[-1] + 1))
    doc: list[str] = []
    first = 0
    for number, line in enumerate(lines, start=1):
        if number in bad:
            continue
        if line.strip() and per_line:
            yield number, {"text": line.rstrip()}
        elif line.strip():
            first = first or number
            doc.append(line.rstrip())
        elif doc:
            yield first, {"text": "\n".join(doc)}
            doc, first = [], 0
    if doc:
        yield first, {"text": "\n".join(doc)}


class _Lines:
    """1-based line and column of a position in a text, with \\n, \\r\\n and a lone \\r as line breaks."""

    def __init__(self, text: str):
        self.starts = [0] + [m.end() for m in LINE_BREAK.finditer(text)]

    def line(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos)

    def column(self, pos: int) -> int:
        return pos - self.starts[self.line(pos) - 1] + 1


def _read_json_array(path: Path, text: str, problems: list[DataError] | None = None,
                     bad: set[int] = frozenset()) -> Iterator[tuple[int, dict]]:
    """Decode element by element so each record keeps the line it starts on."""
    decoder = json.JSONDecoder()
    lines = _Lines(text)
    pos = text.index("[") + 1
    index = 0
    previous_line = 0
    expect_element = True  # after '[' or ',': an element (or, at the very start, ']')

    def fail(at: int, message: str) -> DataError:
        return DataError(str(path), lines.line(at), f"malformed JSON: {message} (line {lines.line(at)}, column "
                         f"{lines.column(at)}); the rest of the file is not read")

    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            yield from _stop(problems, DataError(str(path), lines.line(pos), "malformed JSON: the array is not closed"))
            return
        if text[pos] == "]":
            if expect_element and index:  # [a, ] is not JSON
                yield from _stop(problems, fail(pos, "a comma before ']'"))
            else:
                rest = text[pos + 1:].strip()
                if rest:
                    yield from _stop(problems, DataError(str(path), lines.line(pos + 1 + text[pos + 1:].index(rest[0])),
                                                         "malformed JSON: more text after the array's closing ']'"))
            return
        if not expect_element:
            if text[pos] != ",":
                yield from _stop(problems, fail(pos, "expected ',' or ']' after an array element"))
                return
            pos += 1
            expect_element = True
            continue
        line = lines.line(pos)
        record, end, why, at = _parse(text, decoder, pos)
        if why is not None and end == pos:  # the element could not be parsed: no resync
            if problems is None:
                raise DataError(str(path), lines.line(at), f"{why} (line {lines.line(at)}, column {lines.column(at)})")
            # collecting: report the element's first line (what a reader of the file looks for)
            problems.append(DataError(str(path), line, f"{why} (line {lines.line(at)}, column {lines.column(at)}), in "
                                      "the array element that starts on this line; the rest of the file is not read"))
            return
        pos, expect_element = end, False
        if why is None and not isinstance(record, dict):
            why = f"array element {index} must be a JSON object, got {type(record).__name__}"
        elif why is None and line == previous_line and problems is not None:
            # check and clean tell records apart by their line; two on one line would be one record to them
            why = (f"array element {index} starts on the same line as the one before it: `data check`, `clean` and "
                   "`split` tell records apart by line, so each element must start on its own line (training reads "
                   "the file as it is). Write it one record per line, e.g. with "
                   "json.dump(records, f, ensure_ascii=False, indent=1)")
        index += 1
        previous_line = line
        if bad and any(line <= n <= lines.line(end - 1) for n in bad):
            error = _left_out(path, line, lines.line(end - 1), bad, "array element")
            if error is not None and problems is not None:
                problems.append(error)
            continue
        if why is not None:
            error = DataError(str(path), line, why)
            if problems is None:
                raise error
            problems.append(error)
            continue
        yield line, record


def _read_csv(path: Path, text: str, problems: list[DataError] | None = None,
              bad: set[int] = frozenset()) -> Iterator[tuple[int, dict]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))  # a long text is for the length check to judge, not csv
    try:
        yield from _csv_rows(path, text, delimiter, problems, bad)
    finally:
        csv.field_size_limit(limit)


def _csv_rows(path: Path, text: str, delimiter: str, problems: list[DataError] | None,
              bad: set[int]) -> Iterator[tuple[int, dict]]:
    # newline="": quoted fields keep their line breaks; lines break at \n, \r\n and \r as everywhere else
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)

    def report(error: DataError) -> None:
        if problems is None:
            raise error
        problems.append(error)

    header = None
    while header is None:
        try:
            header = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            report(DataError(str(path), reader.line_num, f"unreadable CSV header: {err}"))
            return
        if not header:
            header = None
    if not header:
        yield from _stop(problems, DataError(str(path), 1, "CSV has no header row"))
        return
    end = reader.line_num
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        report(DataError(str(path), end, f"the header names the column(s) {', '.join(map(repr, twice))} more than "
                         "once; the later column would replace the earlier one"))
        return
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            end = reader.line_num
            report(DataError(str(path), start, f"unreadable CSV row: {err}"))
            continue
        end = reader.line_num
        if not row:
            continue
        if bad and any(start <= n <= end for n in bad):
            error = _left_out(path, start, end, bad, "row")
            if error is not None:
                report(error)
            continue
        span = f" (the row runs from line {start} to {end}: an unclosed double quote?)" if end > start else ""
        nul = next((i for i, v in enumerate(row) if "\x00" in v), None)
        if nul is not None:
            report(DataError(str(path), start, "holds a NUL byte (0x00): binary data, or a UTF-16 file read as "
                             "UTF-8?", header[nul] if nul < len(header) else None))
            continue
        if len(row) > len(header):
            report(DataError(str(path), start, f"row has more columns than the header ({len(header)}){span}"))
            continue
        if len(row) < len(header):
            missing = header[len(row):]
            report(DataError(str(path), start, f"row is missing columns: {', '.join(missing)}{span}", missing[0]))
            continue
        yield start, dict(zip(header, row))


# ---------------------------------------------------------------- the formats: one registry entry each
#
# A format is one ``DataFormat`` entry: the fields that identify it, how a record of it is read
# (record -> Example) and written (Example -> record, for `data convert --to`), and where it
# stands when a record fits more than one format. Detection, reading, the strict loader, `data
# check`'s field names, `data convert` and `generate --input` all read this table.

PromptReader = Callable[[dict, str, int], list[Message]]


@dataclass(frozen=True)
class DataFormat:
    """One data format.

    Reading is ``read`` (record, file, line -> Example, a DataError naming the field), or, for a
    format of one prompt and one reply, ``prompt`` (record, file, line -> the messages before the
    reply) with ``reply`` (the field holding the reply): the reader is then the prompt plus the
    reply as the assistant turn, and a record without the reply is a prompt that ``generate
    --input`` reads with ``prompt`` alone, so inference is given exactly what training renders.
    """

    name: str
    fields: tuple[str, ...]  # a record holding all of them is of this format; each one is required
    read: Callable[[dict, str, int], Example] | None = None
    prompt: PromptReader | None = None
    reply: str | None = None
    label: bool = False  # the reply is a class label (kept as Example.label for stratified splits and metrics)
    write: Callable[[Example], dict] | None = None  # default for prompt/reply formats: one field each
    optional: tuple[str, ...] = ()  # fields read when present (named in hints for misspelt fields)
    priority: int = 100  # a record holding the fields of several formats is of the lowest
    sources: Callable[[Example, dict], list[str]] | None = None  # the field each message came from, for `data check`
    columns: Callable[[dict, dict], dict] | None = None  # a LLaMA-Factory dataset_info entry's renames
    alone: bool = False  # detected only in a record with no fields but its own and ``optional`` ones (a text
    # with a misspelt label is then a classification record to report, not a document)

    @property
    def prompt_fields(self) -> tuple[str, ...]:
        """The fields a record that is only a prompt holds (all of them for chat formats)."""
        return tuple(f for f in self.fields if f != self.reply)


FORMAT_REGISTRY: dict[str, DataFormat] = {}


def register_format(fmt: DataFormat) -> DataFormat:
    """Add a format to the table (filling in the reader, writer and field names a prompt/reply format implies)."""
    if fmt.name in FORMAT_REGISTRY:
        raise ValueError(f"data format {fmt.name!r} is registered already")
    if fmt.read is None and (fmt.prompt is None or fmt.reply not in fmt.fields):
        raise ValueError(f"data format {fmt.name!r} needs a reader, or a prompt reader and a reply among its fields")
    if fmt.prompt is not None and fmt.reply is not None:
        fmt = replace(fmt, read=fmt.read or partial(_read_prompt_reply, fmt),
                      write=fmt.write or partial(_write_prompt_reply, fmt),
                      sources=fmt.sources or partial(_prompt_reply_sources, fmt))
    elif fmt.sources is None:
        fmt = replace(fmt, sources=partial(_first_field_sources, fmt))
    FORMAT_REGISTRY[fmt.name] = fmt
    return fmt


def get_format(fmt: str, file: str = "", line: int = 0) -> DataFormat:
    """The registry entry of a format name; DataError (at ``file``:``line``) for an unknown one."""
    if fmt not in FORMAT_REGISTRY:
        raise DataError(file, line, f"unknown format '{fmt}'; known formats: {', '.join(FORMAT_REGISTRY)}")
    return FORMAT_REGISTRY[fmt]


def _by_priority() -> list[DataFormat]:
    return sorted(FORMAT_REGISTRY.values(), key=lambda f: f.priority)  # stable: registration order breaks ties


def detect_format(record: dict) -> str | None:
    """The format whose fields the record holds (the highest in priority when several fit), else None."""
    return next((f.name for f in _by_priority() if all(k in record for k in f.fields)
                 and (not f.alone or set(record) <= {*f.fields, *f.optional})), None)


def convert_record(record: dict, fmt: str, file: str = "", line: int = 0, mapping: dict | None = None) -> Example:
    """Convert one record of a known format to an Example (DataError on schema problems)."""
    if mapping:
        record = _apply_mapping(record, fmt, mapping)
    return get_format(fmt, file, line).read(record, file, line)


def prompt_conversation(record: dict, file: str = "", line: int = 0) -> list[Message]:
    """A record as the conversation a model continues at inference: what training renders, less the reply.

    A record of a format is read as training reads it (its final assistant turn dropped); a
    record that lacks only its reply (``prompt`` without ``completion``, ``text`` without
    ``label``, a QA ``question`` and ``context`` without ``answer``, an alpaca ``instruction``
    with ``system``/``history`` but no ``output``) is read by that format's prompt reader, the
    one training uses too. A record holding only ``input`` is that text as the user turn; so is one
    holding only ``text`` (a classification input, not a document to continue).
    """
    fmt = detect_format(record)
    if fmt is not None and fmt != "text":
        return convert_record(record, fmt, file, line).prompt_messages
    for entry in _by_priority():
        if entry.prompt is not None and all(k in record for k in entry.prompt_fields):
            return entry.prompt(record, file, line)
    if isinstance(record.get("input"), str):  # an alpaca input with no instruction: what `generate` always took
        return [Message("user", record["input"])]
    raise DataError(file, line, f"no prompt field found among {sorted(record)}")


def get_writer(fmt: str) -> Callable[[Example], dict]:
    """The format's writer (Example -> record), or ValueError naming the formats that can be written."""
    entry = FORMAT_REGISTRY.get(fmt)
    if entry is None or entry.write is None:
        known = [name for name, e in FORMAT_REGISTRY.items() if e.write is not None]
        raise ValueError(f"unknown target format {fmt!r}; use one of {', '.join(known)}")
    return entry.write


def to_record(example: Example, fmt: str) -> dict:
    """One Example in a format; DataError when the format cannot hold the conversation."""
    if example.images and fmt not in IMAGE_FORMATS:
        raise DataError(example.source, example.line, f"this example has {len(example.images)} image(s), which format "
                        f"{fmt} cannot hold: write {' or '.join(IMAGE_FORMATS)}")
    return get_writer(fmt)(example)


def _apply_mapping(record: dict, fmt: str, mapping: dict) -> dict:
    """Rename a LLaMA-Factory dataset_info entry's columns and tags to this module's names."""
    entry = FORMAT_REGISTRY.get(fmt)
    return entry.columns(record, mapping) if entry is not None and entry.columns else dict(record)


def _read_prompt_reply(fmt: DataFormat, record: dict, file: str, line: int) -> Example:
    msgs = fmt.prompt(record, file, line)
    reply = _text(record, fmt.reply, file, line)
    return Example([*msgs, Message("assistant", reply)], file, line, label=reply if fmt.label else None)


def _prompt_reply_sources(fmt: DataFormat, example: Example, raw: dict) -> list[str]:
    return [fmt.prompt_fields[0]] * (len(example.messages) - 1) + [fmt.reply]


def _first_field_sources(fmt: DataFormat, example: Example, raw: dict) -> list[str]:
    return [fmt.fields[0]] * len(example.messages)


def _single_turn(example: Example, what: str) -> tuple[str, str]:
    roles = [m.role for m in example.messages]
    if roles != ["user", "assistant"]:
        raise DataError(example.source, example.line, f"{what} holds one prompt and one reply; this example has the "
                        f"turns {'/'.join(roles)} (use messages, sharegpt or alpaca)")
    return example.messages[0].content, example.messages[1].content


def _write_prompt_reply(fmt: DataFormat, example: Example) -> dict:
    prompt, reply = _single_turn(example, fmt.name)
    if fmt.label and example.label is not None:
        reply = example.label
    return {fmt.prompt_fields[0]: prompt, fmt.reply: reply}


def _text(record: dict, key: str, file: str, line: int, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise DataError(file, line, "missing", key)
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(file, line, f"must be a string, got {type(value).__name__}", key)
    if required and not value.strip():
        raise DataError(file, line, "is empty", key)
    return value


def _image_part(part: dict, file: str, line: int, where: str) -> str:
    """The image reference of an image content part: OpenAI's ``{"type": "image_url", "image_url": {"url"}}``
    (or the URL as a plain string), or ``{"type": "image", "image": ...}``."""
    value = part.get("image_url") if part.get("type") == "image_url" else part.get("image")
    if isinstance(value, dict):
        value = value.get("url")
    try:
        return resolve_image(value, Path(file).parent if file else None)
    except ImageError as err:
        raise DataError(file, line, str(err), where) from None


def _content(value: Any, file: str, line: int, where: str, images: list[str] | None = None) -> str:
    """A message's text; image parts become ``<image>`` placeholders with their references added to ``images``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
            if kind in ("image_url", "image") and images is not None:
                images.append(_image_part(part, file, line, f"{where}[{i}]"))
                texts.append(IMAGE_PLACEHOLDER)
                continue
            if kind != "text" or not isinstance(part.get("text"), str):
                # never dropped silently: an audio or file part is nothing a model here can learn from
                raise DataError(file, line, f"content part {i} is of type {kind!r}; text and image parts are "
                                "supported", where)
            texts.append(part["text"])
        return "".join(texts)
    if isinstance(value, dict):  # structured content (a function call's arguments) as JSON text
        return json.dumps(value, ensure_ascii=False)
    raise DataError(file, line, f"content must be a string, got {type(value).__name__}", where)


def _messages(turns: Any, key: str, role_key: str, content_key: str, roles: dict | None, file: str, line: int) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise DataError(file, line, "must be a non-empty list of turns", key)
    msgs = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(file, line, f"must be an object, got {type(turn).__name__}", where)
        raw_role = turn.get(role_key)
        role = roles.get(raw_role) if roles else raw_role
        if role not in ROLES:
            known = sorted(roles) if roles else list(ROLES)
            raise DataError(file, line, f"unknown role {raw_role!r}; expected one of {', '.join(known)}", f"{where}.{role_key}")
        if turn.get(content_key) is None and turn.get("tool_calls"):
            # OpenAI assistant tool calls: content is null and the calls are what is learned
            turn = {**turn, content_key: json.dumps(turn["tool_calls"], ensure_ascii=False)}
        if content_key not in turn or turn[content_key] is None:
            raise DataError(file, line, "missing", f"{where}.{content_key}")
        weight = turn.get("weight")
        if weight is not None and not (isinstance(weight, (int, float)) and 0 <= weight <= 1):
            raise DataError(file, line, f"must be a number in [0, 1], got {weight!r}", f"{where}.weight")
        images: list[str] = []
        msgs.append(Message(role, _content(turn[content_key], file, line, f"{where}.{content_key}", images),
                            float(weight) if weight is not None else None, tuple(images)))
    return msgs


def with_absolute_images(record: Any, base_dir: str | Path) -> Any:
    """The record with relative image paths made absolute (its ``images`` list and image content parts), so that
    written to another folder (a split, a cleaned copy) it still finds its pictures; other records unchanged."""
    if not isinstance(record, dict):
        return record

    def fix(ref):
        try:
            return resolve_image(ref, base_dir) if isinstance(ref, str) and not ref.startswith("data:") else ref
        except ImageError:
            return ref  # a remote URL stays as it is (the reader reports it)

    out = record
    if isinstance(record.get("images"), list):
        out = {**out, "images": [fix(ref) for ref in record["images"]]}
    for key, content_key in (("messages", "content"), ("conversations", "value")):
        turns = record.get(key)
        if not isinstance(turns, list) or not any(isinstance(t, dict) and isinstance(t.get(content_key), list)
                                                  for t in turns):
            continue
        new_turns = []
        for turn in turns:
            parts = turn.get(content_key) if isinstance(turn, dict) else None
            if isinstance(parts, list):
                fixed = []
                for part in parts:
                    if isinstance(part, dict) and part.get("type") == "image_url":
                        url = part.get("image_url")
                        url = {**url, "url": fix(url.get("url"))} if isinstance(url, dict) else fix(url)
                        part = {**part, "image_url": url}
                    elif isinstance(part, dict) and part.get("type") == "image":
                        part = {**part, "image": fix(part.get("image"))}
                    fixed.append(part)
                turn = {**turn, content_key: fixed}
            new_turns.append(turn)
        out = {**out, key: new_turns}
    return out


def _attach_images(example: Example, record: dict, file: str, line: int, key: str = "images") -> Example:
    """LLaMA-Factory's record-level ``images`` given to the messages whose ``<image>`` placeholders they fill,
    in order. The counts must agree: an image without a place (or a place without an image) is an error."""
    refs = record.get(key)
    if refs is None or refs == []:
        return example
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list):
        raise DataError(file, line, f"must be a list of image paths, got {type(refs).__name__}", key)
    if any(m.images for m in example.messages):
        raise DataError(file, line, "images are given both as content parts and in the record's list; use one", key)
    resolved = []
    for i, ref in enumerate(refs):
        try:
            resolved.append(resolve_image(ref, Path(file).parent if file else None))
        except ImageError as err:
            raise DataError(file, line, str(err), f"{key}[{i}]") from None
    places = [count_placeholders(m.content) for m in example.messages]
    if sum(places) != len(resolved):
        raise DataError(file, line, f"{len(resolved)} image{'s' * (len(resolved) != 1)} but {sum(places)} "
                        f"{IMAGE_PLACEHOLDER} placeholder{'s' * (sum(places) != 1)} in the messages: each image needs "
                        f"one {IMAGE_PLACEHOLDER} where it stands", key)
    given, messages = 0, []
    for m, n in zip(example.messages, places):
        messages.append(replace(m, images=tuple(resolved[given:given + n])) if n else m)
        given += n
    return replace(example, messages=messages)


def user_message(text: str, images: list[str] | tuple[str, ...] = (), base_dir: str | Path | None = None) -> Message:
    """A user turn typed at a prompt (``--prompt``, chat) with image files: at its ``<image>`` placeholders when
    it has as many as there are images, else the images go first. ImageError for a file that is not local, missing
    or not an image (said before anything is generated)."""
    refs = tuple(resolve_image(ref, base_dir if base_dir is not None else Path.cwd()) for ref in images)
    for ref in refs:
        load_image(ref)
    places = count_placeholders(text)
    if refs and places != len(refs):
        if places:
            raise ImageError(f"{len(refs)} image(s) given but the text has {places} {IMAGE_PLACEHOLDER} placeholder(s)")
        text = IMAGE_PLACEHOLDER * len(refs) + text
    return Message("user", text, images=refs)


def _user_field(key: str) -> PromptReader:
    """The prompt reader of a format whose prompt is one field, as the user turn."""
    return lambda record, file, line: [Message("user", _text(record, key, file, line))]


# qa

def _qa_prompt(record: dict, file: str, line: int) -> list[Message]:
    question = _text(record, "question", file, line)
    context = _text(record, "context", file, line, required=False)
    return [Message("user", f"{context}\n\n{question}" if context.strip() else question)]


# text

def _read_text(record: dict, file: str, line: int) -> Example:
    return Example([Message(TEXT_ROLE, _text(record, "text", file, line))], file, line)  # _text refuses an empty one


def _write_text(example: Example) -> dict:
    if not example.is_text:
        raise DataError(example.source, example.line, "format text holds raw documents; this example is a "
                        "conversation (use messages, sharegpt or alpaca)")
    return {"text": example.messages[0].content}


# messages

def _read_messages(record: dict, file: str, line: int) -> Example:
    label = record.get("label")
    if isinstance(label, (dict, list)):  # a label is one class name; a structure cannot be counted or split by
        raise DataError(file, line, f"must be a string, got {type(label).__name__}", "label")
    example = Example(_messages(record.get("messages"), "messages", "role", "content", None, file, line), file, line,
                      label=label)
    return _attach_images(example, record, file, line)


def _messages_sources(example: Example, raw: dict) -> list[str]:
    return [f"messages[{i}].content" for i in range(len(example.messages))]


# alpaca

def _alpaca_prompt(record: dict, file: str, line: int) -> list[Message]:
    msgs = []
    system = _text(record, "system", file, line, required=False)
    if system.strip():
        msgs.append(Message("system", system))
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(file, line, "must be a list of [user, assistant] pairs", "history")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(file, line, f"entry {i} must be a [user, assistant] pair of strings", "history")
        msgs += [Message("user", pair[0]), Message("assistant", pair[1])]
    instruction = _text(record, "instruction", file, line)
    extra = _text(record, "input", file, line, required=False)
    msgs.append(Message("user", f"{instruction}\n{extra}" if extra.strip() else instruction))
    return msgs


def _write_alpaca(example: Example) -> dict:
    msgs = example.messages
    body: list[Message] = msgs[1:] if msgs and msgs[0].role == "system" else msgs
    pairs = [body[i: i + 2] for i in range(0, len(body), 2)]
    if not pairs or any([m.role for m in p] != ["user", "assistant"] for p in pairs):
        raise DataError(example.source, example.line, "alpaca holds user/assistant pairs (after an optional system "
                        f"turn); this example has the turns {'/'.join(m.role for m in msgs)} (use messages or sharegpt)")
    row: dict[str, Any] = {"instruction": pairs[-1][0].content, "input": "", "output": pairs[-1][1].content}
    if body is not msgs:
        row["system"] = msgs[0].content
    if len(pairs) > 1:
        row["history"] = [[u.content, a.content] for u, a in pairs[:-1]]
    return row


def _alpaca_sources(example: Example, raw: dict) -> list[str]:
    names = ["system"] if example.messages[0].role == "system" else []
    for k in range(len(raw.get("history") or [])):
        names += [f"history[{k}][0]", f"history[{k}][1]"]
    return names + ["instruction", "output"]


def _alpaca_columns(record: dict, mapping: dict) -> dict:
    columns, out = mapping.get("columns", {}), dict(record)
    for ours, default in (("instruction", "prompt"), ("input", "query"), ("output", "response"),
                          ("system", "system"), ("history", "history")):
        source = columns.get(default)
        if source and source in record:
            out[ours] = record[source]
    return out


# sharegpt

def _read_sharegpt(record: dict, file: str, line: int) -> Example:
    msgs = _messages(record.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES, file, line)
    system = record.get("system")
    tools = record.get("tools")
    if tools:
        tools_text = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
        system = (f"{system}\n\n" if system else "") + f"Available tools:\n{tools_text}"
    if system and not (msgs and msgs[0].role == "system"):
        msgs.insert(0, Message("system", system))
    return _attach_images(Example(msgs, file, line), record, file, line)


def _write_sharegpt(example: Example) -> dict:
    msgs = example.messages
    system = msgs[0].content if msgs and msgs[0].role == "system" else None
    turns = msgs[1:] if system is not None else msgs
    row = {"conversations": [{"from": SHAREGPT_TAGS[m.role], "value": m.content} for m in turns]}
    if example.images:
        row["images"] = example.images
    return {**row, "system": system} if system is not None else row


def _sharegpt_sources(example: Example, raw: dict) -> list[str]:
    n = len(example.messages)
    offset = n - len(raw.get("conversations") or [])  # a system turn made from `system`/`tools`
    return ["system" if i < offset else f"conversations[{i - offset}].value" for i in range(n)]


def _sharegpt_columns(record: dict, mapping: dict) -> dict:
    columns, tags, out = mapping.get("columns", {}), mapping.get("tags", {}), dict(record)
    source = columns.get("messages", "conversations")
    role_tag, content_tag = tags.get("role_tag", "from"), tags.get("content_tag", "value")
    role_names = {tags.get("user_tag", "human"): "human", tags.get("assistant_tag", "gpt"): "gpt",
                  tags.get("system_tag", "system"): "system", tags.get("observation_tag", "observation"): "observation",
                  tags.get("function_tag", "function_call"): "function_call"}
    out["conversations"] = [
        {"from": role_names.get(t.get(role_tag), t.get(role_tag)), "value": t.get(content_tag)} if isinstance(t, dict) else t
        for t in (record.get(source) or [])
    ]
    for key in ("system", "tools", "images"):
        if columns.get(key) in record:
            out[key] = record[columns[key]]
    return out


for _entry in (  # FORMATS keeps this order; detection goes by priority
    DataFormat("prompt_completion", ("prompt", "completion"), prompt=_user_field("prompt"), reply="completion",
               priority=40),
    DataFormat("messages", ("messages",), read=_read_messages, write=Example.to_dict, optional=("label", "images"),
               priority=10, sources=_messages_sources),
    DataFormat("alpaca", ("instruction", "output"), prompt=_alpaca_prompt, reply="output", write=_write_alpaca,
               optional=("input", "system", "history"), priority=30, sources=_alpaca_sources, columns=_alpaca_columns),
    DataFormat("sharegpt", ("conversations",), read=_read_sharegpt, write=_write_sharegpt, optional=("system", "tools", "images"),
               priority=20, sources=_sharegpt_sources, columns=_sharegpt_columns),
    DataFormat("classification", ("text", "label"), prompt=_user_field("text"), reply="label", label=True,
               priority=60),
    DataFormat("qa", ("question", "answer"), prompt=_qa_prompt, reply="answer", optional=("context",), priority=50),
    # last: a record with a text and a label is classification; text alone is a document to pretrain on
    DataFormat("text", ("text",), read=_read_text, write=_write_text, optional=("id",), priority=90, alone=True),
):
    register_format(_entry)

FORMATS = tuple(FORMAT_REGISTRY)  # the names (config's data.format); code here reads the registry itself
IMAGE_FORMATS = ("messages", "sharegpt")  # the formats whose records carry images (LLaMA-Factory's `images` list)


def _resolve_source(path: Path, dataset: str | None,
                    encoding: str | None = None) -> tuple[Path, str | None, dict | None]:
    """A dataset_info.json plus a dataset name resolves to that dataset's file and mapping."""
    if path.name != "dataset_info.json":
        return path, None, None
    where = str(path)
    info = _whole_json(path, encoding)
    if not isinstance(info, dict):
        raise DataError(where, 1, "a dataset_info.json must hold one JSON object of datasets, got "
                        f"{type(info).__name__}")
    if not dataset:
        raise DataError(where, None, f"a dataset_info.json needs `data.dataset` (one of: {', '.join(info)})")
    if dataset not in info:
        raise DataError(where, None, f"no dataset named {dataset!r}; it lists: {', '.join(info)}")
    entry = info[dataset]
    if not isinstance(entry, dict):
        raise DataError(where, None, f"dataset {dataset!r} must be an object, got {type(entry).__name__}")
    if "file_name" not in entry:
        raise DataError(where, None, f"dataset {dataset!r} has no local file_name (hub datasets cannot be read offline)")
    fmt = entry.get("formatting", "alpaca")
    for key, kind in (("file_name", str), ("formatting", str), ("columns", dict), ("tags", dict)):
        if key in entry and not isinstance(entry[key], kind):
            raise DataError(where, None, f"dataset {dataset!r}: {key!r} must be "
                            f"{'a string' if kind is str else 'an object'}, got {type(entry[key]).__name__}")
    if fmt not in FORMAT_REGISTRY:
        raise DataError(where, None, f"dataset {dataset!r}: unknown formatting {fmt!r}; fewtune reads "
                        f"{', '.join(FORMAT_REGISTRY)}")
    return path.parent / entry["file_name"], fmt, entry


def _whole_json(path: Path, encoding: str | None) -> Any:
    """The one JSON document in a small file (a dataset_info.json), every failure a DataError."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(str(path), None, f"cannot be read: {err.strerror or err}") from None
    text = _decode(path, raw, chosen_encoding(encoding), None)
    value, _, why, at = _parse(text)
    if why is not None:
        lines = _Lines(text)
        raise DataError(str(path), lines.line(at), f"{why} (line {lines.line(at)}, column {lines.column(at)})")
    return value


def load_examples(path: str | Path, fmt: str = "auto", dataset: str | None = None,
                  encoding: str = "utf-8") -> list[Example]:
    """Read a data file into Examples; the first schema problem raises a DataError.

    ``encoding``: ``utf-8``, ``auto`` or a codec name, as for :func:`read_records`.
    """
    source, mapped_fmt, mapping = _resolve_source(Path(path), dataset, encoding)
    if mapped_fmt:
        fmt = mapped_fmt
    examples = []
    seen_formats: set[str] = set()
    for line, record in read_records(source, encoding=encoding):
        record_fmt = fmt if fmt != "auto" else detect_format(record)
        if record_fmt is None:
            raise DataError(str(source), line, f"cannot tell the format from the fields {sorted(record)}; "
                            f"set data.format to one of {', '.join(FORMAT_REGISTRY)}")
        seen_formats.add(record_fmt)
        if len(seen_formats) > 1:
            raise DataError(str(source), line, f"mixed formats in one file: {' and '.join(sorted(seen_formats))}")
        examples.append(convert_record(record, record_fmt, str(source), line, mapping))
    return examples
