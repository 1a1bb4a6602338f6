"""`data check`: every check finds its problem, on the line and field where it is."""

import json

from fewtune.config import build_config
from fewtune.quality.check import check_data, common_ending
from fewtune.data.collect import collect
from fewtune.data.render import Template, render_conversation
from fewtune.quality.stats import Settings
from fewtune.quality.textstats import language, normalize, words
from tests.conftest import write_jsonl


def found(report_or_data, check=None, line=None, field=None, severity=None, contains=None):
    """The problems matching every given attribute."""
    problems = report_or_data.problems
    return [p for p in problems
            if (check is None or p.check == check) and (line is None or p.line == line)
            and (field is None or p.field == field) and (severity is None or p.severity == severity)
            and (contains is None or contains in p.message)]


def check(path, **kw):
    kw.setdefault("tokens", False)
    kw.setdefault("progress", False)
    return check_data(path, **kw)


def pc(n, start=0):
    return [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(start, start + n)]


# ---------------------------------------------------------------- unreadable input


def test_malformed_json_lines_are_all_reported_with_parser_message(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [json.dumps(r) for r in pc(5)]
    rows[1] = '{"prompt": "a", "completion": '
    rows[3] = '{"prompt": "b" "completion": "c"}'
    path.write_text("\n".join(rows) + "\n")
    data = collect(path)
    errors = found(data, "read", severity="error")
    assert [(p.line, "malformed JSON" in p.message) for p in errors] == [(2, True), (4, True)]
    assert "Expecting value" in errors[0].message and "Expecting ',' delimiter" in errors[1].message
    assert [e.line for e in data.examples] == [1, 3, 5]  # reading went on past both


def test_json_array_in_jsonl_and_lines_in_json(tmp_path):
    arr = tmp_path / "a.jsonl"
    arr.write_text(json.dumps(pc(2), indent=1))
    assert found(collect(arr), "read", line=1, severity="warning", contains="holds one JSON array")
    lines = tmp_path / "l.json"
    write_jsonl(lines, pc(3))
    assert found(collect(lines), "read", line=1, severity="warning", contains="holds JSON lines")
    one_line_array = tmp_path / "o.jsonl"
    one_line_array.write_text(json.dumps(pc(1)[0]) + "\n" + json.dumps(pc(2)) + "\n")
    assert found(collect(one_line_array), "read", line=2, severity="error", contains="holds a JSON array")
    pretty = tmp_path / "p.jsonl"
    pretty.write_text("\n".join(json.dumps(r, indent=2) for r in pc(3)))
    assert found(collect(pretty), "read", severity="error", contains="3 pretty-printed JSON objects")


def test_broken_json_array_element_reported_at_its_first_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c",\n   "completion": oops},\n'
                    '  {"prompt": "e", "completion": "f"}\n]\n')
    data = collect(path)
    (error,) = found(data, "read", severity="error")
    assert error.line == 3 and "line 4" in error.message and "rest of the file is not read" in error.message
    assert [e.line for e in data.examples] == [2]


def test_csv_missing_columns(tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\ngood,pos\nbad\n\"fine, ok\",pos\n", encoding="utf-8")
    data = collect(rows)
    assert found(data, "read", line=3, field="label", severity="error", contains="missing columns")
    assert [e.line for e in data.examples] == [2, 4]
    header = tmp_path / "header.csv"
    header.write_text("text,lbl\ngood,pos\n", encoding="utf-8")
    assert found(collect(header), "schema", line=2, field="label", severity="error", contains="'lbl'")


def test_non_utf8_bom_and_empty(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "d"}\n'
                     b'{"prompt": "e", "completion": "f"}\n')
    data = collect(path)
    assert found(data, "read", line=1, severity="warning", contains="byte-order mark")
    assert found(data, "read", line=2, severity="error", contains="not UTF-8 text (byte 0xe9")
    assert 2 in data.rejected and 1 not in data.rejected and 3 not in data.rejected
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert found(collect(empty), "read", severity="error", contains="empty")
    assert found(collect(tmp_path / "missing.jsonl"), "read", severity="error", contains="not found")


# ---------------------------------------------------------------- schema


def test_missing_empty_and_wrongly_typed_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "a", "completion": "b"},
        {"prompt": "a"},
        {"prompt": "c", "completoin": "d"},
        {"prompt": "  ", "completion": "e"},
        {"prompt": ["x"], "completion": "f"},
    ])
    data = collect(path)
    assert found(data, "schema", line=2, field="completion", contains="missing")
    assert found(data, "schema", line=3, field="completion", contains="misspelling")
    assert found(data, "schema", line=4, field="prompt", contains="is empty")
    assert found(data, "schema", line=5, field="prompt", contains="must be a string, got list")
    assert [e.line for e in data.examples] == [1]


def test_chat_structure(tmp_path):
    def chat(*turns):
        return {"messages": [{"role": r, "content": c} for r, c in turns]}

    path = write_jsonl(tmp_path / "chat.jsonl", [
        chat(("system", "s"), ("user", "u"), ("assistant", "a")),  # fine
        chat(("user", "u"), ("robot", "a")),  # unknown role
        chat(("user", "u"), ("user", "u2"), ("assistant", "a")),  # not alternating
        chat(("user", "u"), ("assistant", "a"), ("user", "u2")),  # does not end with assistant
        chat(("user", "u"), ("system", "s"), ("assistant", "a")),  # system not first
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": 5}]},  # wrong type
        chat(("user", "u"), ("assistant", " ")),  # empty reply
        chat(("assistant", "hello"), ("user", "u"), ("assistant", "a")),  # starts with the assistant
    ])
    data = collect(path)
    assert found(data, "schema", line=2, field="messages[1].role", contains="unknown role 'robot'")
    assert found(data, "schema", line=3, field="messages[1].role", contains="does not alternate")
    assert found(data, "schema", line=4, field="messages[2].role", contains="does not end with an assistant turn")
    assert found(data, "schema", line=5, field="messages[1].role", contains="system turn must be the first")
    assert found(data, "schema", line=6, field="messages[1].content", contains="must be a string, got int")
    assert found(data, "schema", line=7, field="messages[1].content", contains="is empty")
    assert found(data, "schema", line=8, field="messages[0].role", severity="warning", contains="starts with an assistant")
    assert [e.line for e in data.examples] == [1, 8]


def test_sharegpt_fields_name_the_file_turns(tmp_path):
    row = {"system": "be brief", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"},
                                                   {"from": "gpt", "value": "a"}]}
    data = collect(write_jsonl(tmp_path / "s.jsonl", [row]))
    assert found(data, "schema", line=1, field="conversations[1].from", contains="two user turns")


def test_mixed_formats(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", pc(3) + [{"text": "t", "label": "l"}])
    data = collect(path)
    assert data.fmt == "prompt_completion"
    assert found(data, "schema", line=4, contains="this record is classification but the file is prompt_completion")
    assert found(data, "schema", line=None, contains="mixed formats in one file (3 prompt_completion, 1 classification)")


# ---------------------------------------------------------------- separators and stop sequences (plain template)


def test_separator_and_stop_inside_texts(tmp_path):
    rows = pc(4)
    rows[1]["prompt"] = "first part\n\n###\n\nsecond part"
    rows[2]["completion"] = "it is THE END of it"
    rows[3]["prompt"] = "how does THE END go"
    report = check(write_jsonl(tmp_path / "d.jsonl", rows), template="plain")
    assert found(report, "template", line=2, field="prompt", severity="error", contains="contains the separator")
    assert found(report, "template", line=3, field="completion", severity="error", contains="stop sequence ' END'")
    assert found(report, "template", line=4, field="prompt", severity="warning", contains="stop sequence ' END'")
    assert not found(check(write_jsonl(tmp_path / "d.jsonl", rows)), "template")  # chat template: not relevant


def test_common_ending_and_stop_legacy_checks(tmp_path):
    rows = [{"prompt": f"review {i} ->", "completion": f" good {i}\n"} for i in range(6)]
    rows[4]["prompt"] = "review 4"  # lacks the ending the others share
    report = check(write_jsonl(tmp_path / "d.jsonl", rows), template="plain")
    assert found(report, "template", line=5, field="prompt", contains="does not end with ' ->' as 5 of 6")
    assert len(found(report, "template", contains="does not end with")) == 1
    rows[4]["prompt"] = "review 4 ->"
    for i, r in enumerate(rows):
        r["completion"] = f" good {i} END" if i != 2 else " good 2"
    report = check(write_jsonl(tmp_path / "d.jsonl", rows), template="plain")
    assert found(report, "template", line=None, field="prompt", contains="all 6 prompts end with ' ->'")
    assert found(report, "template", line=3, field="completion", contains="does not end with ' END' as 5 of 6")
    assert common_ending(["正面", "负面", "正面"]) == ("", 0)  # the end of a word is not a separator
    assert common_ending(["a.", "b.", "c."]) == ("", 0)  # nor is a full stop


def test_missing_leading_space_when_separator_has_no_trailing_space(tmp_path):
    rows = [{"prompt": "colour of the sky", "completion": "blue"}, {"prompt": "of grass", "completion": " green"},
            {"prompt": "天空的颜色", "completion": "蓝色"}]
    cfg = build_config({"model": {"separator": " ->"}})
    report = check(write_jsonl(tmp_path / "d.jsonl", rows), cfg=cfg, template="plain")
    assert [p.line for p in found(report, "template", contains="does not start with a space")] == [1]
    assert found(report, "template", line=1, field="completion")


# ---------------------------------------------------------------- duplicates, conflicts, leakage


def test_exact_and_near_duplicates_english_and_chinese(tmp_path):
    rows = [
        {"prompt": "Hello, World", "completion": "hi"},
        {"prompt": "今天天气好。", "completion": "是的"},
        {"prompt": "Hello, World", "completion": "hi"},  # exact duplicate of 1
        {"prompt": "ＨＥＬＬＯ  world!", "completion": "Hi"},  # full-width, case, punctuation: near 1
        {"prompt": "今天 天气好", "completion": "是的！"},  # Chinese punctuation and space: near 2
        {"prompt": "Hello World, again", "completion": "hi"},
    ]
    report = check(write_jsonl(tmp_path / "d.jsonl", rows))
    assert found(report, "duplicates", line=3, contains="exact duplicate of line 1")
    assert found(report, "duplicates", line=4, contains="near-duplicate of line 1")
    assert found(report, "duplicates", line=5, contains="near-duplicate of line 2")
    assert not found(report, "duplicates", line=6)
    assert report.stats["train"]["duplicates"] == {"exact_duplicates": 1, "near_duplicates": 2, "conflicts": 0}
    assert normalize("Ｈｅｌｌｏ，  World!") == normalize("hello world") == "helloworld"


def test_conflicts(tmp_path):
    labels = write_jsonl(tmp_path / "c.jsonl", [{"text": "物流很快", "label": "Positive"}, {"text": "x", "label": "Negative"},
                                                {"text": "物流很快。", "label": "Negative"}])
    report = check(labels)
    assert found(report, "duplicates", line=3, field="label", severity="error",
                 contains="labelled 'Positive' there and 'Negative' here")
    outputs = write_jsonl(tmp_path / "o.jsonl", [{"prompt": "Write a poem", "completion": "Roses"},
                                                 {"prompt": "write a poem", "completion": "Violets"}])
    assert found(check(outputs), "duplicates", line=2, field="completion", severity="warning",
                 contains="same input as line 1 with a different output")


def test_leakage_between_train_and_validation(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pc(5))
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "new one", "completion": "x"},
                                               {"prompt": "Question 3.", "completion": "answer 3"},
                                               {"prompt": "question 4", "completion": "other"}])
    report = check(train, validation=val)
    leaks = found(report, "duplicates", contains="leakage")
    assert [(p.file, p.line) for p in leaks] == [(str(val), 2), (str(val), 3)]
    assert f"{train}:4 with the same output" in leaks[0].message and "different output" in leaks[1].message
    assert report.stats["validation"]["leakage"] == {"leaked_inputs": 2, "leaked_identical": 1, "validation_examples": 3}


# ---------------------------------------------------------------- lengths


def test_token_lengths_match_render_and_truncation_verdicts(tmp_path, tokenizer):
    rows = [{"prompt": "short question", "completion": "short answer"},
            {"prompt": "word " * 60, "completion": "an answer that is cut part of the way through " * 2},
            {"prompt": "word " * 120, "completion": "never seen"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = check(path, tokens=True, tokenizer=tokenizer, settings=Settings(max_length=100))
    assert found(report, "length", line=3, field="completion", severity="error", contains="cuts the completion away entirely")
    assert found(report, "length", line=2, field="completion", severity="warning", contains="cuts the completion")
    assert not found(report, "length", line=1)
    template = Template.for_tokenizer(tokenizer)
    examples = collect(path).examples
    full = [render_conversation(e, tokenizer, template) for e in examples]
    tokens = report.stats["train"]["lengths"]["tokens"]
    assert tokens["total"]["max"] == max(len(r) for r in full)
    assert tokens["completion"]["min"] == min(sum(w > 0 for w in r.loss_weights) for r in full)
    trunc = report.stats["train"]["lengths"]["truncation"]
    assert trunc == {"max_length": 100, "over_max_length": 2, "completion_cut_partly": 1, "completion_cut_entirely": 1}


def test_chinese_and_english_character_and_word_counts(tmp_path):
    rows = [{"prompt": "我们今天下午去公园散步", "completion": "好的"}, {"prompt": "we walk in the park today", "completion": "ok"}]
    report = check(write_jsonl(tmp_path / "d.jsonl", rows))
    lengths = report.stats["train"]["lengths"]
    assert lengths["languages"] == {"zh": 1, "en": 1}
    assert lengths["chars"]["prompt"]["max"] == 25 and lengths["chars"]["prompt"]["min"] == 11
    assert lengths["words"]["prompt"]["max"] == 6  # the English sentence: whitespace words
    assert 2 <= len(words("我们今天下午去公园散步")) < 11  # jieba words, fewer than characters
    assert language("Please translate 你好 into English") == "mixed" and language("你好 world") == "zh"


# ---------------------------------------------------------------- labels and size


def test_label_distribution_rare_imbalance_and_unseen(tmp_path):
    rows = ([{"text": f"good {i}", "label": "pos"} for i in range(24)] + [{"text": f"bad {i}", "label": "neg"}
                                                                          for i in range(6)]
            + [{"text": "meh", "label": "neutral"}, {"text": "so so", "label": "neutral"}])
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "great", "label": "pos"}, {"text": "awful", "label": "angry"}])
    report = check(train, validation=val)
    labels = report.stats["train"]["labels"]
    assert labels["counts"] == {"pos": 24, "neg": 6, "neutral": 2} and labels["imbalance_ratio"] == 12.0
    assert found(report, "labels", field="label", contains="class 'neutral' has only 2")
    assert found(report, "labels", field="label", contains="imbalanced classes: 'pos' has 24")
    (unseen,) = found(report, "labels", severity="error")
    assert (unseen.file, unseen.line, unseen.field) == (str(val), 2, "label") and "'angry'" in unseen.message


def test_size_warning_and_tokens_per_epoch_and_run(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", pc(12))
    cfg = build_config({"train": {"epochs": 2, "batch_size": 4}})
    report = check(path, cfg=cfg, tokens=True, tokenizer=tokenizer)
    assert found(report, "size", severity="warning", contains="only 12 usable examples")
    template = Template.for_tokenizer(tokenizer)
    expected = sum(len(render_conversation(e, tokenizer, template, 512)) for e in collect(path).examples)
    size = report.stats["train"]["size"]
    assert size["tokens_per_epoch"] == expected and size["tokens_per_run"] == 2 * expected
    assert size["steps_per_epoch"] == 3
    big = write_jsonl(tmp_path / "big.jsonl", pc(100))
    assert not found(check(big), "size")


def test_exit_code_and_strict(tmp_path):
    clean = write_jsonl(tmp_path / "ok.jsonl", pc(120))
    report = check(clean)
    assert not report.problems and report.exit_code() == 0
    warn = write_jsonl(tmp_path / "warn.jsonl", pc(120) + pc(1))  # a duplicate: a warning
    report = check(warn)
    assert report.warnings and not report.errors
    assert report.exit_code() == 0 and report.exit_code(strict=True) == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", pc(120) + [{"prompt": "x"}])
    assert check(bad).exit_code() == 1


def test_renamed_fields_are_reported_by_the_files_own_names(tmp_path):
    rows = [{"id": 0, "sentence": "物流很快", "label_desc": "pos"}, {"id": 1, "sentence": "", "label_desc": "neg"},
            {"id": 2, "sentence": "物流很快", "label_desc": "neg"}]
    report = check(write_jsonl(tmp_path / "fewclue.json", rows), rename={"text": "sentence", "label": "label_desc"})
    assert found(report, "schema", line=2, field="sentence", contains="is empty")
    assert found(report, "duplicates", line=3, field="label_desc", contains="conflicting label")
