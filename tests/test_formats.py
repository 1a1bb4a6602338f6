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
