"""Bad input never ends in a traceback (issue 13): the readers, `data check` and `data clean`.

Every reader (JSON lines, JSON array, CSV/TSV, ``read_records``, ``load_examples``) and the
stage functions behind `fewtune data check` and `fewtune data clean` are fed random bytes,
truncated JSON, values nested past Python's recursion limit, a 50 MB line, NUL bytes, mixed
line endings, byte-order marks and files in other encodings. Each case must end in parsed
data or in a DataError (or, for check, a finding in its report) naming the file, the 1-based
line and the reason; `clean` must account for every input line. docs/reliability_data.md
lists the kinds and what a user sees for each.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fewtune.quality.check import check_data, collect_data
from fewtune.quality.clean import clean_data
from fewtune.data.cli import app
from fewtune.data.encoding import detect_encoding, split_lines
from fewtune.data.formats import DataError, load_examples, read_records

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
# problems about a whole file carry no line
WHOLE_FILE = ("the file is empty", "file not found", "is a directory", "too large to read", "cannot be read",
              "no record looks like any supported format", "mixed formats in one file", "the file holds",
              "CSV has no header row")
runner = CliRunner()


_scratch = {"dir": None, "n": 0}


@pytest.fixture(autouse=True, scope="module")
def scratch_dir():
    """One folder for every file these tests write (hypothesis runs hundreds of examples)."""
    with tempfile.TemporaryDirectory(prefix="fewtune-bad-input-") as folder:
        _scratch["dir"] = Path(folder)
        yield
    _scratch["dir"] = None


def write(data: bytes, suffix: str = ".jsonl", name: str = "data") -> Path:
    _scratch["n"] += 1
    path = _scratch["dir"] / str(_scratch["n"]) / f"{name}{suffix}"
    path.parent.mkdir()
    path.write_bytes(data)
    return path


def n_lines(raw: bytes) -> int:
    return len(split_lines(raw.decode("utf-8", errors="replace")))


def assert_located(err: DataError, path: Path, raw: bytes) -> None:
    """A DataError names the file, the 1-based line (or is about the whole file) and a reason."""
    assert err.file == str(path) and err.reason.strip()
    if err.line is None:
        assert err.reason.startswith(WHOLE_FILE), err
        assert str(err).startswith(f"{path}: ")
    else:
        assert 1 <= err.line <= max(n_lines(raw), 1), err
        assert str(err).startswith(f"{path}:{err.line}: ")


def strict(fn, path: Path, raw: bytes):
    """Parsed data, or None after a located DataError; any other exception fails the test."""
    try:
        return fn()
    except DataError as err:
        assert_located(err, path, raw)
        return None


def collecting(path: Path, raw: bytes) -> tuple[list[tuple[int, dict]], list[DataError]]:
    """read_records collecting its problems: only a file with no lines in UTF-8 (UTF-16/32) raises."""
    problems: list[DataError] = []
    try:
        records = list(read_records(path, problems))
    except DataError as err:
        assert_located(err, path, raw)
        assert "looks like UTF-16" in err.reason or "looks like UTF-32" in err.reason, err
        return [], []
    for err in problems:
        assert_located(err, path, raw)
    return records, problems


def assert_report_located(report, path: Path, raw: bytes) -> None:
    for p in report.problems:
        assert p.file == str(path) and p.message.strip()
        if p.check == "read" and p.line is None:
            assert p.message.startswith(WHOLE_FILE + ("read as ",)), p
        if p.line is not None:
            assert 1 <= p.line <= max(n_lines(raw), 1), p


def clean_accounts(path: Path, raw: bytes, expected_lines: set[int] | None = None):
    """Run clean; every example is written to exactly one file, each reject with its line and reasons."""
    out, rejects = path.with_name("clean.jsonl"), path.with_name("rejects.jsonl")
    try:
        result = clean_data(path, out, rejects)
    except DataError as err:  # only when there is no line to account for: the file as a whole is unreadable
        assert_located(err, path, raw)
        assert err.line in (None, 1) and ("UTF-16" in err.reason or "UTF-32" in err.reason
                                           or err.reason.startswith(WHOLE_FILE)), err
        return None
    kept, rejected = result.kept, result.rejected
    assert not set(kept) & set(rejected)
    assert len(kept) == len(set(kept))
    # JSON lines end at \n only: a U+2028 inside a string is not a line break (str.splitlines would split there)
    rows = [json.loads(line) for line in rejects.read_text(encoding="utf-8").split("\n") if line]
    assert [r["line"] for r in rows] == sorted(rejected)
    for r in rows:
        assert r["reasons"] and all(isinstance(x, str) and x for x in r["reasons"])
        assert "record" in r or "raw" in r
    written = [line for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert len(written) == len(kept)
    for line in kept + list(rejected):
        assert 1 <= line <= n_lines(raw)
    if expected_lines is not None:
        assert set(kept) | set(rejected) == expected_lines
    return result


def jsonl_example_lines(raw: bytes) -> set[int]:
    """The non-blank lines of a JSON lines file: each one an example to keep or reject."""
    text = raw.decode("utf-8-sig", errors="replace")
    return {n for n, line in enumerate(split_lines(text), start=1) if line.strip()}


# ---------------------------------------------------------------- strategies

FIELDS = ["prompt", "completion", "messages", "conversations", "instruction", "input", "output", "text", "label",
          "question", "answer", "context", "system", "history", "tools", "weight", "promt"]
ROLES = ["user", "assistant", "system", "tool", "human", "gpt", "robot", None, 3]
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", "  ", "这部电影很好看", "a\u2028b", "x\x85y", "\x00", "line\r\nend", " ->", "\ufeffbom", "😀", "END",
     "[/b]", "[red]"])  # the last two: rich markup, for the CLI's printing
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS) | TEXT, inner, max_size=3),
    max_leaves=6)
TURN = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": TEXT | JSON_VALUES},
                             optional={"weight": st.sampled_from([0, 0.5, 1, 2, -1, "1", None])})
RECORD = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES | TEXT, max_size=4),
    st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT}),
    st.fixed_dictionaries({"text": TEXT, "label": TEXT | JSON_VALUES}),
    st.fixed_dictionaries({"messages": st.lists(TURN, max_size=4)}, optional={"label": JSON_VALUES}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries({"from": st.sampled_from(ROLES),
                                                                            "value": TEXT}), max_size=3)}),
)
DEPTHS = st.sampled_from([2, 99, 100, 101, 999, 1000, 1001, 5000, 100_000])


def nested(depth: int, opener: str = "[") -> str:
    closer = "]" if opener == "[" else "}"
    inner = "" if opener == "[" else '"k": 1'
    if opener == "{":
        return '{"k": ' * (depth - 1) + "{}" + "}" * (depth - 1)
    return opener * depth + inner + closer * depth


@st.composite
def jsonl_line(draw) -> bytes:
    kind = draw(st.sampled_from(["record", "record", "truncated", "deep", "bytes", "nul", "bom", "blank", "array",
                                 "scalar", "surrogate", "bigint", "gbk"]))
    ascii_only = draw(st.booleans())
    if kind == "record":
        return json.dumps(draw(RECORD), ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    if kind == "truncated":
        text = json.dumps(draw(RECORD), ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
        return text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    if kind == "deep":
        return f'{{"prompt": {nested(draw(DEPTHS), draw(st.sampled_from("[{")))}, "completion": "c"}}'.encode()
    if kind == "bytes":
        return draw(st.binary(max_size=40)).replace(b"\n", b"").replace(b"\r", b"")
    if kind == "nul":
        return b'{"prompt": "a\x00b", "completion": "c"}'
    if kind == "bom":
        return b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}'
    if kind == "blank":
        return draw(st.sampled_from([b"", b"  ", b"\t"]))
    if kind == "array":
        return b'[{"prompt": "a", "completion": "b"}]'
    if kind == "scalar":
        return draw(st.sampled_from([b"1", b'"text"', b"null", b"true", b"NaN", b"-Infinity"]))
    if kind == "gbk":  # a line from a Chinese Windows tool pasted into a UTF-8 file
        return json.dumps({"text": "这部电影很好看", "label": "正面"}, ensure_ascii=False).encode("gbk")
    if kind == "surrogate":
        return b'{"prompt": "cut \\ud83d here", "completion": "\\ud83d\\ude00"}'
    return b'{"prompt": ' + b"7" * 5000 + b', "completion": "c"}'


@st.composite
def jsonl_file(draw) -> bytes:
    lines = draw(st.lists(jsonl_line(), max_size=8))
    endings = draw(st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=len(lines), max_size=len(lines)))
    body = b"".join(line + end for line, end in zip(lines, endings))
    if draw(st.booleans()):
        body = body.rstrip(b"\r\n")  # no final line break
    if draw(st.booleans()):
        body = b"\xef\xbb\xbf" + body
    # a file whose first character is '[' is read as a JSON array: keep this one JSON lines
    if body.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        body = b'{"prompt": "first", "completion": "line"}\n' + body
    return body


@st.composite
def json_array_file(draw) -> tuple[bytes, set[int] | None]:
    """A JSON array, one element per line; with the lines elements start on when it is well formed."""
    elements = draw(st.lists(st.one_of(RECORD.map(json.dumps), st.sampled_from(["1", '"s"', "null", "[]"]),
                                       DEPTHS.map(lambda d: '{"prompt": ' + nested(d) + "}")), max_size=6))
    starts = {n + 2 for n in range(len(elements))}  # "[" is line 1
    ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = "[" + ending + ("," + ending).join(elements) + ending + "]" + ending
    raw = text.encode("utf-8", "surrogatepass")
    damage = draw(st.sampled_from(["none", "none", "truncate", "bytes", "one line", "no comma", "trailing comma"]))
    if damage == "none":
        return raw, starts if elements else None
    if damage == "truncate":
        return raw[: draw(st.integers(1, max(len(raw) - 1, 1)))], None
    if damage == "bytes":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:], None
    if damage == "one line":
        return ("[" + ", ".join(elements) + "]").encode("utf-8", "surrogatepass"), None
    if damage == "no comma":
        return text.replace("," + ending, ending, 1).encode("utf-8", "surrogatepass"), None
    return text.replace(ending + "]", "," + ending + "]").encode("utf-8", "surrogatepass"), None


CSV_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=10) | st.sampled_from(
    ['say "hi"', "a,b", "two\nlines", "cr\rlf", "", "  ", "这部电影很好看"])


@st.composite
def csv_file(draw) -> bytes:
    delimiter = draw(st.sampled_from([",", "\t"]))
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator=draw(st.sampled_from(["\n", "\r\n", "\r"])))
    writer.writerow(draw(st.sampled_from([["text", "label"], ["prompt", "completion"], ["text", "text"], ["x"]])))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["row", "row", "short", "long", "nul", "raw", "quote"]))
        if kind == "row":
            writer.writerow([draw(CSV_TEXT), draw(CSV_TEXT)])
        elif kind == "short":
            writer.writerow([draw(CSV_TEXT)])
        elif kind == "long":
            writer.writerow([draw(CSV_TEXT), draw(CSV_TEXT), draw(CSV_TEXT)])
        elif kind == "nul":
            writer.writerow(["a\x00b", "c"])
        elif kind == "quote":
            buffer.write('"an unclosed quote' + delimiter + "x\n")
        else:
            buffer.write(draw(st.text(max_size=10)))
    raw = buffer.getvalue().encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        raw = b"\xef\xbb\xbf" + raw
    return raw


# ---------------------------------------------------------------- properties: random input


@FAST
@given(raw=st.binary(max_size=600), suffix=st.sampled_from(SUFFIXES))
@example(raw=b"", suffix=".jsonl")  # an empty file: "the file is empty", a whole-file finding
@example(raw=b"\xff\xfe{\x00}\x00", suffix=".jsonl")  # UTF-16 with a byte-order mark
@example(raw=b"\x00" * 10, suffix=".csv")
@example(raw=b"[" * 3000, suffix=".json")
@example(raw=b"text\xff,label\n", suffix=".csv")
def test_random_bytes_every_reader(raw, suffix):
    path = write(raw, suffix)
    strict(lambda: list(read_records(path)), path, raw)
    strict(lambda: load_examples(path), path, raw)
    strict(lambda: load_examples(path, encoding="auto"), path, raw)
    collecting(path, raw)


@FAST
@given(raw=st.binary(max_size=400), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_check_and_clean(raw, suffix):
    path = write(raw, suffix)
    report = strict(lambda: check_data(path, tokens=False, progress=False), path, raw)
    if report is not None:
        assert_report_located(report, path, raw)
    clean_accounts(path, raw, jsonl_example_lines(raw) if suffix == ".jsonl" and not raw.lstrip(
        b"\xef\xbb\xbf \t\r\n").startswith(b"[") and detect_encoding(raw) not in ("utf-16-le", "utf-16-be") else None)


@FAST
@given(raw=jsonl_file())
def test_jsonl_lines_each_parsed_or_located(raw):
    path = write(raw, ".jsonl")
    records = strict(lambda: list(read_records(path)), path, raw)
    strict(lambda: load_examples(path), path, raw)
    collected, problems = collecting(path, raw)
    assert {line for line, _ in collected} | {e.line for e in problems if e.line} == jsonl_example_lines(raw)
    if records is not None:
        assert records == collected and not problems
    report = strict(lambda: check_data(path, tokens=False, progress=False), path, raw)
    assert report is not None  # JSON lines problems are findings, never a stop
    assert_report_located(report, path, raw)
    clean_accounts(path, raw, jsonl_example_lines(raw))


@FAST
@given(case=json_array_file())
def test_json_array_elements_parsed_or_located(case):
    raw, starts = case
    path = write(raw, ".json")
    strict(lambda: list(read_records(path)), path, raw)
    strict(lambda: load_examples(path), path, raw)
    collected, problems = collecting(path, raw)
    if starts is not None:  # well formed: every element is a record or a located problem, up to where reading stops
        stops = [e.line for e in problems if "the rest of the file is not read" in e.reason]
        starts = {s for s in starts if not stops or s <= min(stops)}  # (a value too deep for Python's parser)
        assert {line for line, _ in collected} | {e.line for e in problems} == starts
    report = strict(lambda: check_data(path, tokens=False, progress=False), path, raw)
    if report is not None:
        assert_report_located(report, path, raw)
    clean_accounts(path, raw, starts)


@FAST
@given(raw=csv_file())
def test_csv_rows_parsed_or_located(raw):
    text = raw.decode("utf-8", errors="replace")
    path = write(raw, ".tsv" if "\t" in text.splitlines()[0] else ".csv")
    strict(lambda: list(read_records(path)), path, raw)
    strict(lambda: load_examples(path), path, raw)
    collected, problems = collecting(path, raw)
    report = strict(lambda: check_data(path, tokens=False, progress=False), path, raw)
    if report is not None:
        assert_report_located(report, path, raw)
    clean_accounts(path, raw, {line for line, _ in collected} | {e.line for e in problems if e.line and e.line > 1}
                   if not any(e.line == 1 and "header" in e.reason for e in problems) else None)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(st.binary(max_size=200), jsonl_file()), command=st.sampled_from(["check", "clean", "stats"]))
def test_cli_never_shows_a_traceback(raw, command):
    path = write(raw, ".jsonl")
    args = {"check": ["check", str(path), "--no-tokens"],
            "stats": ["stats", str(path), "--plot", str(path.with_suffix(".png"))],
            "clean": ["clean", str(path), "--out", str(path.with_name("o.jsonl")),
                      "--rejects", str(path.with_name("r.jsonl"))]}[command]
    if command == "stats":
        args += ["--model", str(path.with_name("no-such-model"))]  # no tokenizer: lengths without tokens
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (0, 1, 2) and "Traceback" not in result.output


def test_cli_prints_text_from_the_data_as_text(tmp_path):
    """Field names and labels are printed, not read as rich markup ('[/x]' used to raise a MarkupError)."""
    path = write(b'{"text": "a", "label": "[/x]"}\n{"text": "b", "label": "[red]"}\n{"[/y]": 1}\n')
    result = runner.invoke(app, ["check", str(path), "--no-tokens", "--json", str(tmp_path)])  # --json: a folder
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2
    assert "class '[/x]' has only 1" in result.output and "[red]" in result.output and "[/y]" in result.output
    assert f"error: {tmp_path}: is a directory" in result.output  # the path, then what is wrong, like every command
    result = runner.invoke(app, ["stats", str(path), "--model", str(tmp_path / "none"), "--json", str(tmp_path)])
    assert result.exit_code == 2 and "│ [/x]  │" in result.output


# ---------------------------------------------------------------- the kinds one by one


@pytest.mark.parametrize("depth", [101, 1000, 100_000])
@pytest.mark.parametrize("layout", ["jsonl", "json", "deep_then_broken"])
def test_deeply_nested_values(depth, layout):
    value = nested(depth)
    raw = {"jsonl": f'{{"prompt": "a", "completion": "b"}}\n{{"prompt": {value}, "completion": "c"}}\n',
           "json": f'[\n{{"prompt": "a", "completion": "b"}},\n{{"prompt": {value}, "completion": "c"}}\n]\n',
           # collect's hint for pretty-printed objects re-parses the file: that must not stop at the deep line
           "deep_then_broken": (f'{{"prompt": "a", "completion": "b"}}\n{{"k": {value}}}\n'
                                             '{broken\n')}[layout]
    raw = raw.encode()
    path = write(raw, ".json" if layout == "json" else ".jsonl")
    first, deep = (2, 3) if layout == "json" else (1, 2)  # the array's "[" is line 1
    with pytest.raises(DataError, match=r"nested (more than 100 levels deep|too deeply)") as info:
        list(read_records(path))
    assert info.value.line == deep
    report = check_data(path, tokens=False, progress=False)
    assert any(p.line == deep and "nested" in p.message for p in report.errors)
    result = clean_accounts(path, raw)
    assert result.kept == [first] and deep in result.rejected


def test_a_50_mb_line():
    big = "长" * 10 + "x" * 50_000_000
    raw = (json.dumps({"prompt": big, "completion": " y"}, ensure_ascii=False) + "\n").encode()
    path = write(raw)
    [(line, record)] = list(read_records(path))
    assert line == 1 and record["prompt"] == big
    assert load_examples(path)[0].messages[0].content == big
    assert clean_accounts(path, raw, {1}).kept == [1]
    broken = write(raw[: 40_000_000])  # cut short: one located error, quickly
    report = check_data(broken, tokens=False, progress=False)
    assert [(p.line, p.message[:40]) for p in report.errors if p.check == "read"] == [
        (1, "malformed JSON: Unterminated string star")]
    field = write(b'text,label\n"' + b"x" * 50_000_000 + b'",pos\n', ".csv")  # over csv's 128 KiB field limit
    assert len(next(iter(read_records(field)))[1]["text"]) == 50_000_000
    medium = write((json.dumps({"prompt": "y" * 5_000_000, "completion": "z"}) + "\n").encode())
    assert check_data(medium, tokens=False, progress=False).errors == []


def test_nul_bytes():
    raw = b'{"prompt": "a\x00b", "completion": "c"}\n{"prompt": "escaped \\u0000 is text", "completion": "d"}\n'
    path = write(raw)
    with pytest.raises(DataError, match="Invalid control character") as info:
        load_examples(path)
    assert info.value.line == 1
    assert clean_accounts(path, raw, {1, 2}).kept == [2]
    table = write(b"text,label\na\x00b,pos\nfine,neg\n", ".csv")
    with pytest.raises(DataError, match="NUL byte") as info:
        list(read_records(table))
    assert (info.value.line, info.value.field) == (2, "text")


def test_mixed_line_endings_and_line_separators_inside_strings():
    raw = ('{"prompt": "a", "completion": "b"}\r\n{"prompt": "c", "completion": "d"}\r'
           '{"prompt": "e\u2028f\x85g", "completion": "h"}\n\r\n{"prompt": "i", "completion": ').encode()
    path = write(raw)
    problems: list[DataError] = []
    records = list(read_records(path, problems))
    assert [line for line, _ in records] == [1, 2, 3] and records[2][1]["prompt"] == "e\u2028f\x85g"
    assert [(e.line, e.reason[:14]) for e in problems] == [(5, "malformed JSON")]
    result = clean_accounts(path, raw, {1, 2, 3, 5})
    assert result.kept == [1, 2, 3] and result.rejected[5][0].startswith("malformed JSON")
    array = write(b'[\r{"prompt": "a", "completion": "b"},\r\n{"prompt": "c", "completion": }\n]')
    with pytest.raises(DataError) as info:
        list(read_records(array.rename(array.with_suffix(".json"))))
    assert info.value.line == 3 and "(line 3, column 31)" in info.value.reason


def test_byte_order_marks():
    raw = b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n\xef\xbb\xbf{"prompt": "c", "completion": "d"}\n'
    path = write(raw)
    data = collect_data(path)
    assert [p.line for p in data.problems if "starts with a UTF-8 byte-order mark" in p.message] == [1]
    assert any(p.line == 2 and "were files concatenated" in p.message for p in data.problems)
    result = clean_accounts(path, raw, {1, 2})
    assert result.kept == [1] and result.notes == ["removed the byte-order mark"]
    table = write(b"\xef\xbb\xbftext,label\r\nhello,pos\r\n", ".csv")
    assert list(read_records(table)) == [(2, {"text": "hello", "label": "pos"})]


def test_truncated_json():
    raw = b'[\n{"prompt": "a", "completion": "b"},\n{"prompt": "c", "compl'
    path = write(raw, ".json")
    with pytest.raises(DataError, match="Unterminated string") as info:
        load_examples(path)
    assert info.value.line == 3
    result = clean_accounts(path, raw, {2, 3})
    assert result.kept == [2] and "the rest of the file is not read" in result.rejected[3][0]
    jsonl = write(b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "compl')
    with pytest.raises(DataError, match="malformed JSON") as info:
        load_examples(jsonl)
    assert info.value.line == 2


def test_malformed_json_arrays_are_not_read_past():
    for text, line, reason in (('[\n{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n]', 3,
                                "expected ',' or ']'"),
                               ('[\n{"prompt": "a", "completion": "b"},\n]', 3, "a comma before ']'"),
                               ('[\n{"prompt": "a", "completion": "b"}\n]\n{"x": 1}', 4, "more text after")):
        path = write(text.encode(), ".json")
        with pytest.raises(DataError, match=reason) as info:
            load_examples(path)
        assert info.value.line == line


def test_json_array_on_one_line():
    """json.dump without indent: training reads it, check and clean cannot tell its records apart by line."""
    raw = json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]).encode()
    path = write(raw, ".json")
    assert len(load_examples(path)) == 2
    report = check_data(path, tokens=False, progress=False)
    assert any(p.line == 1 and "starts on the same line" in p.message for p in report.errors)
    result = clean_accounts(path, raw, {1})
    row = json.loads(path.with_name("rejects.jsonl").read_text())
    assert result.kept == [] and row["raw"] == raw.decode()  # both records are in the rejects file


def test_numbers_surrogates_and_labels_that_are_not_text():
    raw = (b'{"prompt": ' + b"9" * 5000 + b', "completion": "c"}\n'
           b'{"prompt": "cut \\udc00", "completion": "c"}\n'
           b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
           b'"label": {"x": 1}}\n'
           b'{"prompt": "emoji \\ud83d\\ude00 is fine", "completion": "c"}\n')
    path = write(raw)
    problems: list[DataError] = []
    assert [line for line, _ in read_records(path, problems)] == [3, 4]
    assert [(e.line, e.reason[:20]) for e in problems] == [(1, "cannot read this JSO"), (2, "a string holds a lon")]
    assert "more than 4,300 digits" in problems[0].reason
    report = check_data(path, tokens=False, progress=False)
    assert any(p.line == 3 and p.field == "label" for p in report.errors)
    clean_accounts(path, raw, {1, 2, 3, 4})


def test_csv_field_limits_quotes_and_headers():
    unclosed = write(b'text,label\n"never closed,pos\nnext,neg\n', ".csv")
    with pytest.raises(DataError, match="runs from line 2 to 3: an unclosed double quote") as info:
        list(read_records(unclosed))
    assert info.value.line == 2
    twice = write(b"text,text,label\na,b,c\n", ".csv")
    with pytest.raises(DataError, match="more than once") as info:
        list(read_records(twice))
    assert info.value.line == 1
    multiline = write(b'text,label\n"two\nlines",pos\n', ".csv")
    assert list(read_records(multiline)) == [(2, {"text": "two\nlines", "label": "pos"})]  # the break is kept


def test_unreadable_files_and_bad_dataset_info(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="is a directory"):
        load_examples(tmp_path)
    with pytest.raises(DataError, match="is a directory"):
        clean_data(tmp_path, tmp_path / "o.jsonl", tmp_path / "r.jsonl")
    with pytest.raises(DataError, match="file not found"):  # nothing to report on: an error, not a report
        check_data(tmp_path / "missing.jsonl", tokens=False, progress=False)
    for command in (["check", str(tmp_path), "--no-tokens"], ["stats", str(tmp_path / "missing.jsonl")],
                    ["split", str(tmp_path), "--out-dir", str(tmp_path / "s")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and result.output.strip().startswith(f"error: {command[1]}: ")
        assert len(result.output.strip().splitlines()) == 1
    info = tmp_path / "dataset_info.json"
    for content, match in ((b"{\xff}", "not UTF-8"), (b"[1]", "one JSON object"),
                           (b'{"a": ' * 5000, "nested too deeply"),
                           (b'{"d": {"file_name": "x.json", "columns": [1]}}', "'columns' must be an object"),
                           (b'{"d": {"file_name": "x.json", "formatting": "openai"}}', "unknown formatting")):
        info.write_bytes(content)
        with pytest.raises(DataError, match=match):
            load_examples(info, dataset="d")
        assert any(match.split()[0] in p.message for p in check_data(info, dataset="d", tokens=False,
                                                                      progress=False).errors)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(DataError, match="too large to read into memory"):
        load_examples(data)
    denied = PermissionError(13, "Permission denied")
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(denied))
    with pytest.raises(DataError, match="cannot be read: Permission denied"):
        load_examples(data)


# ---------------------------------------------------------------- encodings

ROWS = [{"text": "这部电影很好看，强烈推荐！", "label": "正面"}, {"text": "剧情拖沓，浪费时间。", "label": "负面"},
        {"text": "还行吧，一般般", "label": "中性"}]
COMMON = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学"
          "法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天"
          "，。！？、：；“”（）")


def gbk_file(rows=ROWS, codec="gbk", suffix=".jsonl", ending="\r\n") -> Path:
    if suffix == ".csv":
        body = "text,label" + ending + "".join(f"{r['text']},{r['label']}{ending}" for r in rows)
    else:
        body = "".join(json.dumps(r, ensure_ascii=False) + ending for r in rows)
    return write(body.encode(codec), suffix)


def test_gbk_file_read_as_utf8_names_the_encoding():
    path = gbk_file()
    with pytest.raises(DataError, match=r"looks like GBK .*--encoding gb18030") as info:
        load_examples(path)
    assert info.value.line == 1 and "not UTF-8 text (byte 0xd5 at column 11)" in info.value.reason
    report = check_data(path, tokens=False, progress=False)
    read = [p for p in report.errors if p.check == "read"]
    assert [p.line for p in read] == [1, 2, 3] and len({p.message for p in read}) == 1  # one message, every line
    assert "GBK" in read[0].message and "--encoding gb18030" in read[0].message and "iconv" in read[0].message
    result = clean_accounts(path, path.read_bytes(), {1, 2, 3})
    assert result.kept == []  # never written with replacement characters
    assert all("\ufffd" not in json.dumps(e.messages[0].content) for e in collect_data(path).examples)
    # one GBK line in a UTF-8 CSV, the second line of a quoted row: the row is reported where it starts
    raw = 'text,label\r\nfine,pos\r\n"two\r\n'.encode() + "行文字".encode("gbk") + b'",neg\r\nlast,pos\r\n'
    table = write(raw, ".csv")
    data = collect_data(table)
    assert sorted(data.records) == [2, 5]
    assert {p.line: p.message[:20] for p in data.problems if p.check == "read"} == {
        3: "this row holds text ", 4: "not UTF-8 text: the "}
    result = clean_accounts(table, raw, {2, 3, 4, 5})
    assert result.kept == [2, 5]


@pytest.mark.parametrize("encoding", ["gb18030", "gbk", "auto"])
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_gbk_file_read_with_encoding(encoding, suffix, caplog):
    path = gbk_file(suffix=suffix)
    examples = load_examples(path, encoding=encoding)
    assert [(e.messages[0].content, e.label) for e in examples] == [(r["text"], r["label"]) for r in ROWS]
    if encoding == "auto":
        assert "read as GBK (detected by --encoding auto)" in caplog.text
    report = check_data(path, tokens=False, progress=False, encoding=encoding)
    assert not [p for p in report.errors if p.check == "read"]
    assert any("read as GBK" in p.message for p in report.warnings) == (encoding == "auto")
    out = path.with_name("clean.jsonl")
    result = clean_data(path, out, path.with_name("rejects.jsonl"), encoding=encoding)
    assert result.kept == ([1, 2, 3] if suffix == ".jsonl" else [2, 3, 4])
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == ROWS
    assert "read as GBK, written as UTF-8" in result.notes


@settings(max_examples=30, deadline=None)
@given(texts=st.lists(st.text(alphabet=COMMON + "abc 123", min_size=1, max_size=30).filter(
    lambda t: any(c in COMMON for c in t)), min_size=1, max_size=5), codec=st.sampled_from(["gbk", "gb18030"]))
def test_chinese_in_gbk_round_trips(texts, codec):
    rows = [{"text": t, "label": "正面"} for t in texts]
    path = gbk_file(rows, codec)
    assert detect_encoding(path.read_bytes()) == "gb18030"
    assert [e.messages[0].content for e in load_examples(path, encoding="auto")] == texts
    assert [e.messages[0].content for e in load_examples(path, encoding="gb18030")] == texts
    with pytest.raises(DataError, match="looks like GBK"):
        load_examples(path)


def test_gb18030_only_characters():
    rows = [{"text": "𠀀 and 喆 and 😀", "label": "正面"}, *ROWS]  # not in GBK: four-byte GB18030
    path = gbk_file(rows, "gb18030")
    with pytest.raises(DataError, match="looks like GB18030"):
        load_examples(path)
    with pytest.raises(DataError, match="not GBK text"):
        load_examples(path, encoding="gbk")
    assert [e.messages[0].content for e in load_examples(path, encoding="auto")] == [r["text"] for r in rows]


def test_other_encodings_are_not_taken_for_chinese():
    for sentence in ("café au lait, crème brûlée", "Über naïve Façade, señor", "Ça va? Très bien, merci."):
        raw = json.dumps({"text": sentence, "label": "x"}, ensure_ascii=False).encode("cp1252") + b"\n"
        path = write(raw)
        assert detect_encoding(raw) is None
        with pytest.raises(DataError, match=r"not UTF-8 text \(byte 0x[0-9a-f]{2} at column \d+\); if the") as info:
            load_examples(path, encoding="auto")
        assert "GBK" not in str(info.value)
        assert load_examples(path, encoding="cp1252")[0].messages[0].content == sentence


def test_utf16_and_wrong_encoding_options():
    path = write(json.dumps(ROWS[0], ensure_ascii=False).encode("utf-16") + "\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=r"looks like UTF-16 .*--encoding utf-16"):
        check_data(path, tokens=False, progress=False)
    assert load_examples(path, encoding="auto")[0].messages[0].content == ROWS[0]["text"]
    utf8 = write(json.dumps(ROWS[0], ensure_ascii=False).encode() + b"\n")
    with pytest.raises(DataError, match="valid UTF-8 .* would garble"):
        load_examples(utf8, encoding="gb18030")
    with pytest.raises(ValueError, match="unknown encoding 'klingon'"):
        load_examples(utf8, encoding="klingon")


def test_cli_encoding_option(tmp_path):
    path = gbk_file()
    result = runner.invoke(app, ["check", str(path), "--no-tokens"])
    assert result.exit_code == 1 and "looks like GBK" in result.output and "--encoding gb18030" in result.output
    result = runner.invoke(app, ["check", str(path), "--no-tokens", "--encoding", "auto"])
    assert result.exit_code == 0 and "read as GBK" in result.output
    out, rejects = tmp_path / "clean.jsonl", tmp_path / "rejects.jsonl"
    result = runner.invoke(app, ["clean", str(path), "--out", str(out), "--rejects", str(rejects),
                                 "--encoding", "gb18030"])
    assert result.exit_code == 0 and "read as GBK, written as UTF-8" in result.output
    written = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert written == [r["text"] for r in ROWS]
    result = runner.invoke(app, ["convert", str(path), "--to", "messages", "--out", str(tmp_path / "m.jsonl"),
                                 "--encoding", "auto"])
    assert result.exit_code == 0 and "read as GBK" in result.output
    result = runner.invoke(app, ["split", str(path), "--out-dir", str(tmp_path / "s"), "--encoding", "gb18030"])
    assert result.exit_code == 0
    result = runner.invoke(app, ["check", str(path), "--no-tokens", "--encoding", "klingon"])
    assert result.exit_code == 2 and "unknown encoding 'klingon'" in result.output
    deep = write(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n{broken\n")
    result = runner.invoke(app, ["check", str(deep), "--no-tokens"])
    assert result.exit_code == 1 and "nested too deeply" in result.output and result.exception is not None
    assert isinstance(result.exception, SystemExit)
