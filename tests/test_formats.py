import json

import pytest

from fewtune.data.formats import DataError, load_examples
from tests.conftest import write_jsonl


def roles(example):
    return [(m.role, m.content) for m in example.messages]


def test_prompt_completion(tmp_path):
    ex = load_examples(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": " c"}]))[0]
    assert roles(ex) == [("user", "p"), ("assistant", " c")]
    assert (ex.line, ex.reference) == (1, " c")


def test_messages_with_weights(tmp_path):
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                        {"role": "assistant", "content": "a1", "weight": 0}, {"role": "user", "content": "u2"},
                        {"role": "assistant", "content": [{"type": "text", "text": "a2"}]}]}
    ex = load_examples(write_jsonl(tmp_path / "m.jsonl", [row]))[0]
    assert roles(ex) == [("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2")]
    assert [m.weight for m in ex.messages] == [None, None, 0.0, None, None]


def test_alpaca_with_system_and_history(tmp_path):
    row = {"instruction": "翻译", "input": "hello", "output": "你好", "system": "sys", "history": [["q0", "a0"]]}
    ex = load_examples(write_jsonl(tmp_path / "al.jsonl", [row]))[0]
    assert roles(ex) == [("system", "sys"), ("user", "q0"), ("assistant", "a0"), ("user", "翻译\nhello"),
                         ("assistant", "你好")]


def test_sharegpt_with_tools(tmp_path):
    row = {"conversations": [{"from": "human", "value": "weather?"},
                             {"from": "function_call", "value": '{"name": "w"}'},
                             {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}],
           "tools": '[{"name": "w"}]'}
    ex = load_examples(write_jsonl(tmp_path / "s.jsonl", [row]))[0]
    assert [m.role for m in ex.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert "Available tools" in ex.messages[0].content and ex.reference == "It is sunny."


def test_classification_and_qa(tmp_path):
    ex = load_examples(write_jsonl(tmp_path / "c.jsonl", [{"text": "好评", "label": "Positive"}]))[0]
    assert roles(ex) == [("user", "好评"), ("assistant", "Positive")] and ex.label == "Positive"
    qa = load_examples(write_jsonl(tmp_path / "q.jsonl", [{"question": "Q?", "answer": "A", "context": "C"}]))[0]
    assert roles(qa) == [("user", "C\n\nQ?"), ("assistant", "A")]


def test_json_array_keeps_line_numbers(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c",\n   "completion": "d"}\n]\n')
    examples = load_examples(path)
    assert [e.line for e in examples] == [2, 3] and examples[1].reference == "d"


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"good, really",pos\nbad,neg\n', encoding="utf-8")
    examples = load_examples(path)
    assert [(e.messages[0].content, e.label, e.line) for e in examples] == [("good, really", "pos", 2), ("bad", "neg", 3)]


def test_llamafactory_dataset_info(tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", [{"msgs": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    info = {"mychat": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "msgs"},
                       "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    ex = load_examples(tmp_path / "dataset_info.json", dataset="mychat")[0]
    assert roles(ex) == [("user", "hi"), ("assistant", "yo")]
    with pytest.raises(DataError, match="mychat"):
        load_examples(tmp_path / "dataset_info.json")


@pytest.mark.parametrize("content, line, message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', 2, "malformed JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"text": "t", "label": "l"}\n', 2, "mixed formats"),
    ('{"prompt": "a", "completion": ""}\n', 1, "is empty"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', 1, "unknown role"),
    ('{"foo": 1}\n', 1, "cannot tell the format"),
])
def test_errors_name_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_examples(path)
    assert info.value.line == line and str(path) in str(info.value)


def test_non_utf8_and_empty(tmp_path):
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataError, match="not UTF-8") as info:
        load_examples(bad)
    assert info.value.line == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_examples(empty)


# ---------------------------------------------------------------- the format registry

from fewtune.data import formats  # noqa: E402
from fewtune.data.collect import collect  # noqa: E402
from fewtune.data.formats import (  # noqa: E402
    FORMAT_REGISTRY,
    FORMATS,
    DataFormat,
    Message,
    detect_format,
    prompt_conversation,
    register_format,
    to_record,
)


def test_formats_are_the_registry_and_detection_goes_by_priority():
    assert FORMATS == ("prompt_completion", "messages", "alpaca", "sharegpt", "classification", "qa", "text")
    assert FORMATS == tuple(FORMAT_REGISTRY)
    both = {"messages": [], "conversations": [], "instruction": "i", "output": "o", "prompt": "p", "completion": "c",
            "question": "q", "answer": "a", "text": "t", "label": "l"}
    for expected in ("messages", "sharegpt", "alpaca", "prompt_completion", "qa", "classification"):
        assert detect_format(both) == expected
        del both[next(k for k in FORMAT_REGISTRY[expected].fields)]
    assert detect_format(both) is None
    # text is last and only alone: a text without its label, beside other fields, is no document to pretrain on
    assert detect_format({"text": "t", "label": "l"}) == "classification" and detect_format({"text": "t"}) == "text"
    assert detect_format({"text": "t", "output": "o"}) is None
    with pytest.raises(ValueError, match="registered already"):
        register_format(DataFormat("qa", ("question", "answer"), prompt=formats._qa_prompt, reply="answer"))


def test_a_record_that_is_only_a_prompt_is_read_as_its_format_reads_it():
    def conv(record):
        return [(m.role, m.content) for m in prompt_conversation(record, "p.jsonl", 3)]

    assert conv({"prompt": "p"}) == [("user", "p")]
    assert conv({"text": "t"}) == [("user", "t")]
    assert conv({"question": "q", "context": "c"}) == [("user", "c\n\nq")]
    assert conv({"instruction": "i", "input": "x", "system": "s", "history": [["u", "a"]]}) == [
        ("system", "s"), ("user", "u"), ("assistant", "a"), ("user", "i\nx")]
    assert conv({"input": "only"}) == [("user", "only")]
    assert conv({"messages": [{"role": "user", "content": "m"}]}) == [("user", "m")]
    full = {"question": "q", "context": "c", "answer": "a"}
    assert conv(full) == conv({"question": "q", "context": "c"})
    with pytest.raises(DataError, match=r"^p\.jsonl:3: field 'history': entry 0 must be"):
        prompt_conversation({"instruction": "i", "history": [["u"]]}, "p.jsonl", 3)
    with pytest.raises(DataError, match=r"^p\.jsonl:3: no prompt field found among \['foo'\]"):
        prompt_conversation({"foo": 1}, "p.jsonl", 3)


def test_a_new_format_is_one_entry(tmp_path):
    """Registered, a format is detected, read, checked (with its own field names), written and prompted."""
    entry = register_format(DataFormat("text_pair", ("input", "target"), prompt=formats._user_field("input"),
                                       reply="target"))
    try:
        path = write_jsonl(tmp_path / "pairs.jsonl", [{"input": "a", "target": "b"}, {"input": "c", "target": " "}])
        assert detect_format({"input": "a", "target": "b"}) == "text_pair"
        data = collect(path)
        assert data.fmt == "text_pair" and [roles(e) for e in data.examples] == [[("user", "a"), ("assistant", "b")]]
        assert [(p.line, p.field, p.message) for p in data.problems] == [(2, "target", "is empty")]
        with pytest.raises(DataError, match="field 'target': is empty"):
            load_examples(path)
        assert to_record(data.examples[0], "text_pair") == {"input": "a", "target": "b"}
        assert to_record(data.examples[0], "qa") == {"question": "a", "answer": "b"}
        assert prompt_conversation({"input": "a"}) == [Message("user", "a")]
        assert entry.sources(data.examples[0], {}) == ["input", "target"]
    finally:
        del FORMAT_REGISTRY["text_pair"]
    assert detect_format({"input": "a", "target": "b"}) is None
