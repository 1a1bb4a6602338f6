"""`data clean / split / convert / mix / stats`, the SNIPS converter and the `fewtune data` commands."""

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from fewtune.cli import app
from fewtune.quality.check import check_data, data_stats
from fewtune.quality.clean import clean_data
from fewtune.data.formats import DataError, load_examples
from fewtune.datasets.snips import snips_records
from fewtune.data.tools import convert_examples, convert_file, mix_files, split_file, to_record
from tests.conftest import write_jsonl


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- clean


def test_clean_accounts_for_every_line(tmp_path):
    path = tmp_path / "messy.jsonl"
    lines = [
        b'\xef\xbb\xbf{"prompt": "  hello  ", "completion": " world\\r\\n"}',  # 1 BOM, whitespace, CRLF: fixed, kept
        b'{"prompt": "hello", "completion": " world"}',  # 2 duplicate of 1 once 1 is stripped
        b'',  # 3 blank: not an example
        b'{"prompt": "caf\xe9", "completion": "x"}',  # 4 not UTF-8
        b'{"prompt": "broken", "completion": ',  # 5 malformed JSON
        b'{"prompt": "p", "completion": "   "}',  # 6 empty once stripped
        b'{"text": "t", "label": "l"}',  # 7 another format
        b'[1, 2]',  # 8 not an object
        b'{"prompt": "fine", "completion": "ok"}',  # 9 kept
        b'{"prompt": "Fine!", "completion": "OK"}',  # 10 near-duplicate: kept (not a safe removal)
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    out, rejects = tmp_path / "clean.jsonl", tmp_path / "rejects.jsonl"
    result = clean_data(path, out, rejects)
    examples = [n for n, raw in enumerate(lines, start=1) if raw.strip()]
    kept, rejected = read_jsonl(out), read_jsonl(rejects)
    assert len(kept) + len(rejected) == len(examples) == result.total == 9
    assert sorted(result.kept + [r["line"] for r in rejected]) == examples  # each line exactly once
    assert result.kept == [1, 9, 10]
    assert kept[0] == {"prompt": "hello", "completion": " world"}  # one leading space kept on the completion
    reasons = {r["line"]: " ".join(r["reasons"]) for r in rejected}
    assert "exact duplicate of line 1" in reasons[2]
    assert "not UTF-8" in reasons[4] and "\\xe9" in next(r for r in rejected if r["line"] == 4)["raw"]
    assert "malformed JSON" in reasons[5] and next(r for r in rejected if r["line"] == 5)["raw"].startswith('{"prompt": "broken"')
    assert "is empty" in reasons[6] and next(r for r in rejected if r["line"] == 6)["record"]["completion"] == "   "
    assert "classification" in reasons[7] and "JSON object" in reasons[8]
    assert result.notes == ["removed the byte-order mark"] and result.fixed["line_endings"] == 1
    assert not out.read_bytes().startswith(b"\xef\xbb\xbf")
    assert check_data(out, tokens=False, progress=False).errors == []


def test_clean_broken_json_array_keeps_the_unread_rest(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c",\n   "completion": oops},\n'
                    '  {"prompt": "e", "completion": "f"}\n]\n')
    result = clean_data(path, tmp_path / "c.json", tmp_path / "r.jsonl")
    assert result.kept == [2] and list(result.rejected) == [3]
    (reject,) = read_jsonl(tmp_path / "r.jsonl")
    assert '"prompt": "e"' in reject["raw"] and '"completion": oops' in reject["raw"]
    assert json.loads((tmp_path / "c.json").read_text()) == [{"prompt": "a", "completion": "b"}]


# ---------------------------------------------------------------- split


def test_split_is_stratified_seeded_and_complete(tmp_path):
    rows = [{"text": f"t{i}", "label": "a" if i % 4 else "b"} for i in range(80)]  # 60 a, 20 b
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    sizes = split_file(path, tmp_path / "s1", val_ratio=0.2, test_ratio=0.1, seed=7)
    parts = {name: read_jsonl(tmp_path / "s1" / f"{name}.jsonl") for name in ("train", "validation", "test")}
    assert sizes == {name: len(p) for name, p in parts.items()} and sum(sizes.values()) == 80
    assert sorted(r["text"] for p in parts.values() for r in p) == sorted(r["text"] for r in rows)
    assert Counter(r["label"] for r in parts["test"]) == {"a": 6, "b": 2}
    assert Counter(r["label"] for r in parts["validation"]) == {"a": 12, "b": 4}
    split_file(path, tmp_path / "s2", val_ratio=0.2, test_ratio=0.1, seed=7)
    split_file(path, tmp_path / "s3", val_ratio=0.2, test_ratio=0.1, seed=8)
    assert read_jsonl(tmp_path / "s2" / "test.jsonl") == parts["test"]
    assert read_jsonl(tmp_path / "s3" / "test.jsonl") != parts["test"]


def test_kfold(tmp_path):
    rows = [{"text": f"t{i}", "label": "a" if i < 15 else "b"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    sizes = split_file(path, tmp_path / "k", kfold=5, seed=1)
    assert sizes == {f"fold_{i}": 4 for i in range(1, 6)}
    held = []
    for i in range(1, 6):
        val = read_jsonl(tmp_path / "k" / f"fold_{i}" / "validation.jsonl")
        train = read_jsonl(tmp_path / "k" / f"fold_{i}" / "train.jsonl")
        assert len(train) == 16 and not {r["text"] for r in train} & {r["text"] for r in val}
        assert Counter(r["label"] for r in val) == {"a": 3, "b": 1}  # stratified
        held += [r["text"] for r in val]
    assert sorted(held) == sorted(r["text"] for r in rows)  # every example validated exactly once


def test_kfold_stratifies_only_when_every_label_fills_the_folds(caplog):
    from fewtune.data.formats import Example, Message
    from fewtune.data.tools import kfold_examples

    def examples(labels):
        return [Example([Message("user", f"t{i}"), Message("assistant", str(label))], "d.jsonl", i + 1, label)
                for i, label in enumerate(labels)]

    stratified = kfold_examples(examples(["a"] * 15 + ["b"] * 5), 5, seed=3)
    assert all(Counter(e.label for e in fold) == {"a": 3, "b": 1} for fold in stratified)
    assert [[e.line for e in f] for f in kfold_examples(examples(["a"] * 15 + ["b"] * 5), 5, seed=3)] == \
        [[e.line for e in f] for f in stratified]  # seeded
    with caplog.at_level("WARNING", logger="fewtune.data.tools"):
        plain = kfold_examples(examples(["a"] * 17 + ["b"] * 3), 5, seed=3)  # b has 3 < 5: KFold
    assert "not stratified" in caplog.text and "b: 3" in caplog.text
    assert [len(f) for f in plain] == [4] * 5
    assert sorted(e.line for f in plain for e in f) == list(range(1, 21))
    with pytest.raises(ValueError, match="2 <= K"):
        kfold_examples(examples(["a"] * 3), 4, seed=0)


def test_split_refuses_a_file_with_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError, match="(?s)d.jsonl:2.*data check"):
        split_file(path, tmp_path / "s")


# ---------------------------------------------------------------- convert


SOURCES = {
    "prompt_completion": [{"prompt": "打开车窗", "completion": '{"actions": ["打开车窗"]}'}, {"prompt": "Hi", "completion": " there"}],
    "classification": [{"text": "物流很快", "label": "Positive"}, {"text": "bad", "label": "Negative"}],
    "alpaca": [{"instruction": "Translate", "input": "hello", "output": "你好", "system": "sys",
                "history": [["q0", "a0"]]}, {"instruction": "Say hi", "input": "", "output": "hi"}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "weather?"}, {"from": "function_call", "value": '{"name": "w"}'},
                                    {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
                  "tools": '[{"name": "w"}]'}],
    "messages": [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                               {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"},
                               {"role": "assistant", "content": "a2"}]}],
}
FITS = {"prompt_completion": ["prompt_completion", "classification", "qa", "alpaca", "sharegpt", "messages"],
        "classification": ["prompt_completion", "classification", "qa", "alpaca", "sharegpt", "messages"],
        "alpaca": ["alpaca", "sharegpt", "messages"],
        "sharegpt": ["sharegpt", "messages"],
        "messages": ["alpaca", "sharegpt", "messages"],
        "qa": ["prompt_completion", "classification", "qa", "alpaca", "sharegpt", "messages"]}


def turns(examples):
    return [[(m.role, m.content) for m in e.messages] for e in examples]


@pytest.mark.parametrize("source", list(SOURCES))
def test_convert_round_trips_keep_content(tmp_path, source):
    original = write_jsonl(tmp_path / "in.jsonl", SOURCES[source])
    before = load_examples(original)
    for target in FITS[source]:
        there = tmp_path / f"{target}.jsonl"
        assert convert_file(original, there, target) == len(before)
        back = tmp_path / f"{target}.back.jsonl"
        convert_file(there, back, source if source in FITS[target] else "messages")
        assert turns(load_examples(there)) == turns(before), target
        assert turns(load_examples(back)) == turns(before), target


def test_convert_names_examples_a_format_cannot_hold(tmp_path):
    examples = load_examples(write_jsonl(tmp_path / "m.jsonl", SOURCES["messages"]))
    with pytest.raises(DataError, match=r"m.jsonl:1.*system/user/assistant/user/assistant"):
        convert_examples(examples, "prompt_completion")
    assert to_record(load_examples(write_jsonl(tmp_path / "c.jsonl", SOURCES["classification"]))[0], "classification") \
        == {"text": "物流很快", "label": "Positive"}


def test_convert_with_field_renames(tmp_path):
    path = write_jsonl(tmp_path / "fewclue.json", [{"id": 0, "sentence": "物流很快", "label": 1, "label_desc": "pos"}])
    convert_file(path, tmp_path / "out.jsonl", "classification", rename={"text": "sentence", "label": "label_desc"})
    assert read_jsonl(tmp_path / "out.jsonl") == [{"text": "物流很快", "label": "pos"}]


# ---------------------------------------------------------------- SNIPS


def write_snips(folder):
    folder.mkdir()
    train = {"GetWeather": [
        {"data": [{"text": "What's the weather in "}, {"text": "Paris", "entity": "city"}, {"text": " "},
                  {"text": "tomorrow", "entity": "timeRange"}]},
        {"data": [{"text": "Will it rain in "}, {"text": "Oslo", "entity": "city"}, {"text": " or "},
                  {"text": "Bergen", "entity": "city"}]}]}
    play = {"PlayMusic": [{"data": [{"text": "play some jazz"}]}]}
    (folder / "train_GetWeather.json").write_text(json.dumps(train, indent=2))
    (folder / "train_PlayMusic.json").write_text(json.dumps(play, indent=2))
    (folder / "validate_PlayMusic.json").write_text(json.dumps(play, indent=2))
    return folder


def test_snips_to_classification_and_slots(tmp_path):
    folder = write_snips(tmp_path / "snips")
    intents = snips_records(folder, "intent", "train")
    assert [(r["text"], r["label"]) for r in intents] == [("What's the weather in Paris tomorrow", "GetWeather"),
                                                         ("Will it rain in Oslo or Bergen", "GetWeather"),
                                                         ("play some jazz", "PlayMusic")]
    slots = snips_records(folder, "slots", "train")
    assert json.loads(slots[0]["completion"]) == {"intent": "GetWeather", "slots": {"city": "Paris", "timeRange": "tomorrow"}}
    assert json.loads(slots[1]["completion"])["slots"] == {"city": ["Oslo", "Bergen"]}
    assert json.loads(slots[2]["completion"]) == {"intent": "PlayMusic", "slots": {}}
    assert len(snips_records(folder, "intent", "validate")) == 1
    (folder / "train_Bad.json").write_text(json.dumps({"Bad": [{"data": [{"entity": "x"}]}]}))
    with pytest.raises(DataError, match=r"train_Bad.json: field 'Bad\[0\].data\[0\]'"):
        snips_records(folder, "intent", "train")


def test_one_snips_system_prompt_names_every_intent():
    from fewtune.datasets.snips import INTENTS, SYSTEM_PROMPT

    assert len(INTENTS) == 7 and all(intent in SYSTEM_PROMPT for intent in INTENTS)


# ---------------------------------------------------------------- mix


def test_mix_ratio_count_seed_and_provenance(tmp_path):
    domain = write_jsonl(tmp_path / "domain.jsonl", [{"prompt": f"d{i}", "completion": "x"} for i in range(3)])
    general = write_jsonl(tmp_path / "general.jsonl", [{"instruction": f"g{i}", "input": "", "output": "y"} for i in range(30)])
    sizes = mix_files(domain, general, tmp_path / "mix.jsonl", ratio=7, seed=1)
    rows = read_jsonl(tmp_path / "mix.jsonl")
    assert sizes == {"domain": 3, "general": 21, "total": 24} and len(rows) == 24
    assert Counter(r["provenance"]["set"] for r in rows) == {"domain": 3, "general": 21}
    assert {r["provenance"]["line"] for r in rows if r["provenance"]["set"] == "domain"} == {1, 2, 3}
    assert all(r["provenance"]["file"] == str(general) for r in rows if r["provenance"]["set"] == "general")
    assert len(load_examples(tmp_path / "mix.jsonl")) == 24  # the mix is a valid messages file
    mix_files(domain, general, tmp_path / "again.jsonl", ratio=7, seed=1)
    assert read_jsonl(tmp_path / "again.jsonl") == rows
    mix_files(domain, general, tmp_path / "other.jsonl", ratio=7, seed=2)
    assert read_jsonl(tmp_path / "other.jsonl") != rows
    assert mix_files(domain, general, tmp_path / "count.jsonl", count=5)["general"] == 5
    with pytest.raises(DataError, match="70 general examples wanted"):
        mix_files(domain, general, tmp_path / "too.jsonl", ratio=70 / 3)


# ---------------------------------------------------------------- stats and the commands


def test_stats_writes_a_token_length_histogram(tmp_path, tokenizer):
    rows = [{"prompt": "word " * (i % 17 + 1), "completion": "reply " * (i % 5 + 1)} for i in range(60)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = data_stats(path, tokenizer=tokenizer, plot=tmp_path / "len.png", progress=False)
    png = (tmp_path / "len.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    stats = report.stats["train"]
    assert stats["examples"] == 60 and stats["lengths"]["tokens"]["total"]["max"] > stats["lengths"]["tokens"]["total"]["min"]
    assert stats["size"]["tokens_per_epoch"] > 0 and stats["labels"] is None


def test_data_commands_end_to_end(tmp_path):
    runner = CliRunner()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    result = runner.invoke(app, ["data", "check", str(bad), "--no-tokens", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 1, result.output
    assert "bad.jsonl:2 completion: missing" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["errors"] == 1 and report["problems"][0]["line"] == 2 and report["problems"][0]["field"] == "completion"
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)])
    result = runner.invoke(app, ["data", "check", str(good), "--no-tokens"])
    assert result.exit_code == 0, result.output  # a size warning only
    assert runner.invoke(app, ["data", "check", str(good), "--no-tokens", "--strict"]).exit_code == 1
    result = runner.invoke(app, ["data", "clean", str(bad), "--out", str(tmp_path / "c.jsonl"), "--rejects",
                                 str(tmp_path / "r.jsonl")])
    assert result.exit_code == 0 and "2 input examples: 1 written" in result.output
    result = runner.invoke(app, ["data", "split", str(good), "--out-dir", str(tmp_path / "s"), "--val", "0.4"])
    assert result.exit_code == 0 and "train: 3, validation: 2" in result.output
    result = runner.invoke(app, ["data", "convert", str(good), "--to", "sharegpt", "--out", str(tmp_path / "g.jsonl")])
    assert result.exit_code == 0 and len(load_examples(tmp_path / "g.jsonl")) == 5
    snips = write_snips(tmp_path / "snips")
    result = runner.invoke(app, ["data", "convert", str(snips), "--from", "snips", "--to", "slots", "--out",
                                 str(tmp_path / "slots.jsonl")])
    assert result.exit_code == 0 and len(read_jsonl(tmp_path / "slots.jsonl")) == 3
    result = runner.invoke(app, ["data", "mix", str(good), str(tmp_path / "g.jsonl"), "--out", str(tmp_path / "m.jsonl"),
                                 "--count", "2"])
    assert result.exit_code == 0 and "7 examples" in result.output
    result = runner.invoke(app, ["data", "split", str(bad), "--out-dir", str(tmp_path / "x")])
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output


def test_check_and_stats_commands_take_the_config(tmp_path, tiny_model):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model:\n  name: {tiny_model}\ndata:\n  max_length: 48\ntrain:\n  epochs: 2\n  batch_size: 2\n")
    rows = [{"prompt": "word " * 30, "completion": "cut away"}] + [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "check", str(path), "--config", str(config), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    (cut,) = [p for p in report["problems"] if p["check"] == "length"]
    assert (cut["line"], cut["field"]) == (1, "completion") and "max_length=48" in cut["message"]
    size = report["stats"]["train"]["size"]
    assert size["epochs"] == 2 and size["steps_per_epoch"] == 2 and size["tokens_per_run"] == 2 * size["tokens_per_epoch"]
    result = runner.invoke(app, ["data", "stats", str(path), "--config", str(config), "--plot", str(tmp_path / "h.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "h.png").read_bytes().startswith(b"\x89PNG") and "max_length=48: 1 over" in result.output
