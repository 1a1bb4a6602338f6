"""Reading data files and converting every supported format to one conversation form.

Formats (detected from the fields of each record, or forced with ``format``):

- ``prompt_completion``: ``{"prompt", "completion"}`` (OpenAI legacy fine-tuning)
- ``messages``: ``{"messages": [{"role", "content", "weight"?}]}`` (OpenAI chat)
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?}``
- ``sharegpt``: ``{"conversations": [{"from", "value"}], "system"?, "tools"?}``
- ``classification``: ``{"text", "label"}``
- ``qa``: ``{"question", "answer", "context"?}``

Files: JSON lines, a JSON array, or CSV; or a LLaMA-Factory ``dataset_info.json`` with a
dataset name, whose column mapping is honoured. Every problem is reported with the file,
the 1-based line and the field.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

FORMATS = ("prompt_completion", "messages", "alpaca", "sharegpt", "classification", "qa")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
    "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool",
}


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

    def to_dict(self) -> dict:
        row: dict[str, Any] = {"messages": [
            {"role": m.role, "content": m.content, **({"weight": m.weight} if m.weight is not None else {})}
            for m in self.messages
        ]}
        if self.label is not None:
            row["label"] = self.label
        return row


# ---------------------------------------------------------------- reading files


def read_records(path: str | Path, problems: list[DataError] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line, record) from JSON lines, a JSON array or CSV, raising DataError on bad input.

    With ``problems`` (a list), bad input is appended to it instead and reading goes on past
    it where the layout allows (JSON lines, CSV; a JSON array stops at a malformed element).
    ``data check`` and ``data clean`` use that to report every problem, not just the first.
    """
    path = Path(path)
    if not path.is_file():
        yield from _stop(problems, DataError(str(path), None, "file not found"))
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        error = DataError(str(path), line, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})")
        if problems is None:
            raise error from None
        problems.extend(_undecodable_lines(path, raw))
        text = raw.decode("utf-8-sig", errors="replace")  # keeps the layout; the bad lines are reported
    if not text.strip():
        yield from _stop(problems, DataError(str(path), None, "the file is empty"))
        return
    if path.suffix.lower() in (".csv", ".tsv"):
        yield from _read_csv(path, text, problems)
    elif text.lstrip().startswith("["):
        yield from _read_json_array(path, text, problems)
    else:
        yield from _read_jsonl(path, text, problems)


def _stop(problems: list[DataError] | None, error: DataError) -> Iterator[tuple[int, dict]]:
    if problems is None:
        raise error
    problems.append(error)
    yield from ()


def _undecodable_lines(path: Path, raw: bytes) -> list[DataError]:
    errors = []
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            chunk.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            errors.append(DataError(str(path), number, f"not UTF-8 text (byte 0x{chunk[err.start]:02x} at column {err.start + 1})"))
    return errors


def _read_jsonl(path: Path, text: str, problems: list[DataError] | None = None) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            error = DataError(str(path), number, f"malformed JSON: {err.msg} (column {err.colno})")
            if problems is None:
                raise error from None
            problems.append(error)
            continue
        if not isinstance(record, dict):
            error = DataError(str(path), number, f"each line must be a JSON object, got {type(record).__name__}")
            if problems is None:
                raise error
            problems.append(error)
            continue
        yield number, record


def _read_json_array(path: Path, text: str, problems: list[DataError] | None = None) -> Iterator[tuple[int, dict]]:
    """Decode element by element so each record keeps the line it starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    index = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            yield from _stop(problems, DataError(str(path), text.count("\n", 0, pos) + 1,
                                                 "malformed JSON: the array is not closed"))
            return
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            if problems is None:
                raise DataError(str(path), err.lineno, f"malformed JSON: {err.msg} (column {err.colno})") from None
            # collecting: report the element's first line (what a reader of the file looks for); no resync
            problems.append(DataError(str(path), line, f"malformed JSON in the array element starting on this line: "
                                      f"{err.msg} (line {err.lineno}, column {err.colno}); the rest of the file is not read"))
            return
        if not isinstance(record, dict):
            error = DataError(str(path), line, f"array element {index} must be a JSON object, got {type(record).__name__}")
            if problems is None:
                raise error
            problems.append(error)
            index += 1
            continue
        index += 1
        yield line, record


def _read_csv(path: Path, text: str, problems: list[DataError] | None = None) -> Iterator[tuple[int, dict]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    if not reader.fieldnames:
        yield from _stop(problems, DataError(str(path), 1, "CSV has no header row"))
        return
    for row in reader:
        error = None
        if None in row:
            error = DataError(str(path), reader.line_num, f"row has more columns than the header ({len(reader.fieldnames)})")
        else:
            missing = [k for k, v in row.items() if v is None]
            if missing:
                error = DataError(str(path), reader.line_num, f"row is missing columns: {', '.join(missing)}", missing[0])
        if error is not None:
            if problems is None:
                raise error
            problems.append(error)
            continue
        yield reader.line_num, dict(row)


# ---------------------------------------------------------------- detecting and converting


def detect_format(record: dict) -> str | None:
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "question" in keys and "answer" in keys:
        return "qa"
    if "text" in keys and "label" in keys:
        return "classification"
    return None


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


def _content(value: Any, file: str, line: int, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                # never dropped silently: a text model cannot learn from an image part
                raise DataError(file, line, f"content part {i} is of type {kind!r}; only text parts are supported", where)
            texts.append(part["text"])
        return "".join(texts)
    if isinstance(value, dict):  # structured content (a function call's arguments) as JSON text
        return json.dumps(value, ensure_ascii=False)
    raise DataError(file, line, f"content must be a string, got {type(value).__name__}", where)


def convert_record(record: dict, fmt: str, file: str = "", line: int = 0, mapping: dict | None = None) -> Example:
    """Convert one record of a known format to an Example (DataError on schema problems)."""
    if mapping:
        record = _apply_mapping(record, fmt, mapping)
    if fmt == "prompt_completion":
        msgs = [Message("user", _text(record, "prompt", file, line)),
                Message("assistant", _text(record, "completion", file, line))]
        return Example(msgs, file, line)
    if fmt == "classification":
        text = _text(record, "text", file, line)
        label = _text(record, "label", file, line)
        return Example([Message("user", text), Message("assistant", label)], file, line, label=label)
    if fmt == "qa":
        question = _text(record, "question", file, line)
        context = _text(record, "context", file, line, required=False)
        prompt = f"{context}\n\n{question}" if context.strip() else question
        return Example([Message("user", prompt), Message("assistant", _text(record, "answer", file, line))], file, line)
    if fmt == "alpaca":
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
        msgs.append(Message("assistant", _text(record, "output", file, line)))
        return Example(msgs, file, line)
    if fmt == "messages":
        return Example(_messages(record.get("messages"), "messages", "role", "content", None, file, line), file, line,
                       label=record.get("label"))
    if fmt == "sharegpt":
        msgs = _messages(record.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES, file, line)
        system = record.get("system")
        tools = record.get("tools")
        if tools:
            tools_text = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
            system = (f"{system}\n\n" if system else "") + f"Available tools:\n{tools_text}"
        if system and not (msgs and msgs[0].role == "system"):
            msgs.insert(0, Message("system", system))
        return Example(msgs, file, line)
    raise DataError(file, line, f"unknown format '{fmt}'; known formats: {', '.join(FORMATS)}")


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
        msgs.append(Message(role, _content(turn[content_key], file, line, f"{where}.{content_key}"),
                            float(weight) if weight is not None else None))
    return msgs


def _apply_mapping(record: dict, fmt: str, mapping: dict) -> dict:
    """Rename a LLaMA-Factory dataset_info entry's columns and tags to this module's names."""
    columns = mapping.get("columns", {})
    tags = mapping.get("tags", {})
    out = dict(record)
    if fmt == "alpaca":
        for ours, default in (("instruction", "prompt"), ("input", "query"), ("output", "response"),
                              ("system", "system"), ("history", "history")):
            source = columns.get(default)
            if source and source in record:
                out[ours] = record[source]
    elif fmt == "sharegpt":
        source = columns.get("messages", "conversations")
        role_tag, content_tag = tags.get("role_tag", "from"), tags.get("content_tag", "value")
        role_names = {tags.get("user_tag", "human"): "human", tags.get("assistant_tag", "gpt"): "gpt",
                      tags.get("system_tag", "system"): "system", tags.get("observation_tag", "observation"): "observation",
                      tags.get("function_tag", "function_call"): "function_call"}
        out["conversations"] = [
            {"from": role_names.get(t.get(role_tag), t.get(role_tag)), "value": t.get(content_tag)} if isinstance(t, dict) else t
            for t in (record.get(source) or [])
        ]
        for key in ("system", "tools"):
            if columns.get(key) in record:
                out[key] = record[columns[key]]
    return out


def _resolve_source(path: Path, dataset: str | None) -> tuple[Path, str | None, dict | None]:
    """A dataset_info.json plus a dataset name resolves to that dataset's file and mapping."""
    if path.name != "dataset_info.json":
        return path, None, None
    info = json.loads(path.read_text(encoding="utf-8"))
    if not dataset:
        raise DataError(str(path), None, f"a dataset_info.json needs `data.dataset` (one of: {', '.join(info)})")
    if dataset not in info:
        raise DataError(str(path), None, f"no dataset named {dataset!r}; it lists: {', '.join(info)}")
    entry = info[dataset]
    if "file_name" not in entry:
        raise DataError(str(path), None, f"dataset {dataset!r} has no local file_name (hub datasets cannot be read offline)")
    fmt = entry.get("formatting", "alpaca")
    return path.parent / entry["file_name"], fmt, entry


def load_examples(path: str | Path, fmt: str = "auto", dataset: str | None = None) -> list[Example]:
    """Read a data file into Examples; the first schema problem raises a DataError."""
    source, mapped_fmt, mapping = _resolve_source(Path(path), dataset)
    if mapped_fmt:
        fmt = mapped_fmt
    examples = []
    seen_formats: set[str] = set()
    for line, record in read_records(source):
        record_fmt = fmt if fmt != "auto" else detect_format(record)
        if record_fmt is None:
            raise DataError(str(source), line, f"cannot tell the format from the fields {sorted(record)}; "
                            f"set data.format to one of {', '.join(FORMATS)}")
        seen_formats.add(record_fmt)
        if len(seen_formats) > 1:
            raise DataError(str(source), line, f"mixed formats in one file: {' and '.join(sorted(seen_formats))}")
        examples.append(convert_record(record, record_fmt, str(source), line, mapping))
    return examples
