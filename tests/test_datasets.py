"""The public data set readers (fewtune.datasets): where the data is found, the error when it is not, and the
conversion to fewtune records, on small hand-made files laid out like the real ones; plus one check on the
real shared data when it is there."""

import json
import random
import re
from pathlib import Path

import pytest

from fewtune.data.formats import DataError, load_examples
from fewtune.data.tools import convert_file
from fewtune.datasets import common, fewclue
from fewtune.datasets.common import ENV_VAR, DatasetNotFound, find_dataset, find_shared_data
from fewtune.datasets.snips import INTENTS, SYSTEM_PROMPT, find_snips, write_intent_splits


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- hand-made copies of the real layouts


def write_snips(folder: Path, n_train: int = 6, n_val: int = 3) -> Path:
    """train_<Intent>.json and validate_<Intent>.json for every intent, as snipsco/nlu-benchmark ships them."""
    folder.mkdir(parents=True)
    for intent in INTENTS:
        for split, n in (("train", n_train), ("validate", n_val)):
            utterances = [{"data": [{"text": f"{split} {intent} number "}, {"text": str(i), "entity": "n"}]}
                          for i in range(n)]
            (folder / f"{split}_{intent}.json").write_text(json.dumps({intent: utterances}, indent=2))
    return folder


def write_fewclue(root: Path) -> Path:
    """fewclue/eprstmt and fewclue/tnews with the real files' fields (JSON lines, tnews's label table)."""
    epr = root / "eprstmt"
    epr.mkdir(parents=True)
    for name, n in (("train_few_all", 4), ("dev_few_all", 2), ("test_public", 3)):
        rows = [{"id": i, "sentence": f"{name} 评论{i}", "label": "Positive" if i % 2 else "Negative"} for i in range(n)]
        (epr / f"{name}.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "\n",
                                          encoding="utf-8")
    (epr / "unlabeled.json").write_text(json.dumps({"sentence": "没有标签", "id": 0}, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    tnews = root / "tnews"
    tnews.mkdir()
    labels = [("100", "news_story", "故事"), ("101", "news_culture", "文化"), ("103", "news_sports", "体育")]
    (tnews / "label_index2en2zh.json").write_text(
        "".join(json.dumps({"label": code, "label_desc": desc, "label_zh": zh}, ensure_ascii=False) + "\n"
                for code, desc, zh in labels), encoding="utf-8")
    for name, n in (("train_few_all", 6), ("dev_few_all", 3), ("test_public", 3)):
        rows = [{"label": int(labels[i % 3][0]), "label_desc": labels[i % 3][1], "sentence": f"{name} 标题{i}",
                 "keywords": "词", "id": i} for i in range(n)]
        (tnews / f"{name}.json").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")
    return root


# ---------------------------------------------------------------- where the data is found


def test_an_explicit_path_then_the_environment_variable(tmp_path, monkeypatch):
    snips = write_snips(tmp_path / "mine" / "snips")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "mine"))
    assert find_snips() == snips
    other = write_snips(tmp_path / "other")
    assert find_snips(other) == other  # an explicit folder wins over the variable
    assert find_shared_data() == tmp_path / "mine"


def test_beside_the_repository_or_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(common, "REPO", tmp_path / "nowhere" / "repo")
    work = tmp_path / "checkout"
    work.mkdir()
    snips = write_snips(tmp_path / "shared" / "data" / "snips")
    monkeypatch.chdir(work)
    assert find_snips().resolve() == snips.resolve()  # ../shared/data beside the working directory
    monkeypatch.setattr(common, "REPO", work)
    elsewhere = tmp_path / "nowhere" / "deep"  # its ../shared/data does not exist
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert find_snips().resolve() == snips.resolve()  # ../shared/data beside the repository


def test_missing_data_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(DatasetNotFound, match=re.escape(f"snips data not found (looked in {tmp_path / 'empty' / 'snips'}); "
                                                        "pass --snips DIR")):
        find_snips()
    with pytest.raises(DatasetNotFound, match=re.escape(f"shared data folder is missing (looked in {tmp_path / 'empty'})")):
        find_shared_data()
    (tmp_path / "empty" / "snips").mkdir(parents=True)  # a folder of that name without the SNIPS files
    with pytest.raises(DatasetNotFound, match="looked in"):
        find_snips()
    with pytest.raises(DatasetNotFound, match=re.escape(f"fewclue/tnews data not found (looked in {tmp_path / 'x'})")):
        fewclue.find_fewclue("tnews", tmp_path / "x")
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setattr(common, "REPO", tmp_path / "a" / "repo")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFound) as err:
        find_dataset("sst2")
    assert str(tmp_path / "a" / "shared" / "data" / "sst2") in str(err.value)
    assert str(tmp_path.parent / "shared" / "data" / "sst2") in str(err.value) and ENV_VAR in str(err.value)


# ---------------------------------------------------------------- SNIPS: the benchmarks' few-shot splits


def test_snips_splits_sample_per_intent_with_a_seed(tmp_path):
    snips = write_snips(tmp_path / "snips")
    train, val = write_intent_splits(snips, tmp_path / "a", per_intent=2, seed=3, dev_per_intent=3)
    rows, val_rows, dev_rows = read_jsonl(train), read_jsonl(val), read_jsonl(tmp_path / "a" / "dev.jsonl")
    assert sorted(r["label"] for r in rows) == sorted(INTENTS * 2)
    assert len(val_rows) == 3 * len(INTENTS) and len(dev_rows) == 3 * len(INTENTS)
    first = rows[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[0]["content"] == SYSTEM_PROMPT and first[2]["content"] == rows[0]["label"]
    assert first[1]["content"].startswith(f"train {rows[0]['label']} number ")
    assert all(m["messages"][1]["content"].startswith("validate ") for m in val_rows)
    texts = lambda rs: {r["messages"][1]["content"] for r in rs}  # noqa: E731
    assert not texts(rows) & texts(dev_rows)  # the dev sample never overlaps training
    # the same seed gives the same files; the dev sample does not move the training sample
    again, _ = write_intent_splits(snips, tmp_path / "b", per_intent=2, seed=3)
    assert again.read_text() == train.read_text() and not (tmp_path / "b" / "dev.jsonl").exists()
    other, _ = write_intent_splits(snips, tmp_path / "c", per_intent=2, seed=4)
    assert other.read_text() != train.read_text()
    # the sample is random.Random(seed).sample of each intent's pool, in INTENTS order, then shuffled
    rng = random.Random(3)
    expected = [(t, i) for i in INTENTS for t in rng.sample([f"train {i} number {n}" for n in range(6)], 2)]
    rng.shuffle(expected)
    assert [(r["messages"][1]["content"], r["label"]) for r in rows] == expected
    assert len(load_examples(train)) == 2 * len(INTENTS)  # fewtune reads what it wrote


# ---------------------------------------------------------------- FewCLUE


def test_fewclue_splits_as_conversations(tmp_path, monkeypatch):
    write_fewclue(tmp_path / "shared" / "fewclue")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "shared"))
    train, test = fewclue.write_splits("eprstmt", tmp_path / "epr")
    rows = read_jsonl(train)
    assert [r["label"] for r in rows] == ["Negative", "Positive", "Negative", "Positive"]
    assert rows[1]["messages"] == [{"role": "system", "content": fewclue.EPRSTMT_SYSTEM_PROMPT},
                                   {"role": "user", "content": "train_few_all 评论1"},
                                   {"role": "assistant", "content": "Positive"}]
    assert len(read_jsonl(test)) == 3 and len(read_jsonl(tmp_path / "epr" / "dev.jsonl")) == 2  # blank line skipped
    train, test = fewclue.write_splits("tnews", tmp_path / "tn")
    rows = read_jsonl(train)
    assert [r["label"] for r in rows] == ["故事", "文化", "体育"] * 2  # the Chinese names from label_index2en2zh.json
    system = rows[0]["messages"][0]["content"]
    assert system == "这条新闻标题属于哪一类？只回答类别名，从这些类别中选一个：故事、文化、体育。"
    assert [r["messages"][1]["content"] for r in read_jsonl(test)] == [f"test_public 标题{i}" for i in range(3)]
    assert {e.label for e in load_examples(train)} == {"故事", "文化", "体育"}


def test_fewclue_field_map_reads_the_raw_files_as_classification(tmp_path):
    root = write_fewclue(tmp_path / "fewclue")
    for task, labels in (("eprstmt", {"Positive", "Negative"}), ("tnews", {"news_story", "news_culture", "news_sports"})):
        out = tmp_path / f"{task}.jsonl"
        convert_file(root / task / fewclue.SPLITS["train"], out, "classification", rename=fewclue.FIELD_MAP[task])
        assert {r["label"] for r in read_jsonl(out)} == labels
        assert all(r["text"].startswith("train_few_all ") for r in read_jsonl(out))


def test_fewclue_errors_name_the_file_and_line(tmp_path):
    root = write_fewclue(tmp_path / "fewclue")
    with pytest.raises(ValueError, match="unknown FewCLUE task 'afqmc'"):
        fewclue.find_fewclue("afqmc")
    bad = root / "tnews" / "dev_few_all.json"
    bad.write_text(bad.read_text(encoding="utf-8") + '{"sentence": "x", "label_desc": "news_game"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"dev_few_all.json:4: missing or unknown 'news_game'"):
        fewclue.write_splits("tnews", tmp_path / "out", root / "tnews")
    bad.write_text('{"sentence": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"dev_few_all.json:1: malformed JSON"):
        fewclue.conversations("tnews", root / "tnews", "dev")


# ---------------------------------------------------------------- the real data, when it is there


def test_the_real_shared_data(tmp_path):
    try:
        find_shared_data()
        snips = find_snips()
        tasks = {task: fewclue.find_fewclue(task) for task in fewclue.TASKS}
    except DatasetNotFound as err:
        pytest.skip(f"the shared public data sets are not here: {err}")
    train, val = write_intent_splits(snips, tmp_path / "snips", dev_per_intent=20)
    assert len(read_jsonl(train)) == 40 * 7 and len(read_jsonl(val)) == 700
    dev = {r["messages"][1]["content"] for r in read_jsonl(tmp_path / "snips" / "dev.jsonl")}
    assert len(dev) == 140 and not dev & {r["messages"][1]["content"] for r in read_jsonl(train)}
    sizes = {"eprstmt": (160, 160, 610, 2), "tnews": (1185, 1098, 2010, 15)}
    for task, folder in tasks.items():
        train, test = fewclue.write_splits(task, tmp_path / task, folder)
        rows = read_jsonl(train)
        n_dev = len(read_jsonl(tmp_path / task / "dev.jsonl"))
        assert (len(rows), n_dev, len(read_jsonl(test)), len({r["label"] for r in rows})) == sizes[task]
