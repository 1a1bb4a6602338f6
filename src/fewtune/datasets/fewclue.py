"""FewCLUE's few-shot Chinese classification tasks (CLUEbenchmark/FewCLUE ``datasets/<task>/``).

Each task folder holds JSON lines files: ``train_few_all.json``, ``dev_few_all.json``,
``test_public.json`` (labeled) and ``unlabeled.json``. Two tasks are used here:

- ``eprstmt``: e-commerce review sentiment, ``{"id", "sentence", "label"}`` with label
  ``Positive`` or ``Negative``;
- ``tnews``: news-title classification, 15 classes, ``{"label", "label_desc", "sentence",
  "keywords", "id"}``; ``label_index2en2zh.json`` (JSON lines ``{"label", "label_desc",
  "label_zh"}``) gives each class its Chinese name, which is the label the benchmarks train on.

Where: ``find_fewclue(task)`` (an explicit task folder, else ``$FEWTUNE_SHARED_DATA/fewclue/<task>``,
else ``../shared/data/fewclue/<task>``; see ``fewtune.datasets.common``). ``write_splits`` writes
train/dev/test as fewtune conversations whose system prompt names the labels.
"""

from __future__ import annotations

import json
from pathlib import Path

from fewtune.data.formats import DataError
from fewtune.data.tools import write_jsonl
from fewtune.datasets.common import find_dataset

TASKS = ("eprstmt", "tnews")
SPLITS = {"train": "train_few_all.json", "dev": "dev_few_all.json", "test": "test_public.json",
          "unlabeled": "unlabeled.json"}
# the renames `fewtune data check/convert --map` needs to read a task's files as classification records
FIELD_MAP = {"eprstmt": {"text": "sentence"}, "tnews": {"text": "sentence", "label": "label_desc"}}
EPRSTMT_SYSTEM_PROMPT = "判断这条商品评论的情感倾向。只回答 Positive 或 Negative。"


def find_fewclue(task: str, explicit: str | Path | None = None) -> Path:
    """The folder of one FewCLUE task; DatasetNotFound names where it looked."""
    if task not in TASKS:
        raise ValueError(f"unknown FewCLUE task {task!r}; use one of {', '.join(TASKS)}")
    return find_dataset(f"fewclue/{task}", explicit, lambda path: (path / SPLITS["train"]).is_file(),
                        hint="the FewCLUE data is expected in ../shared/data/fewclue")


def read_fewclue(path: str | Path) -> list[dict]:
    """The rows of one FewCLUE JSON lines file (blank lines skipped)."""
    path = Path(path)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(str(path), None, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(str(path), number, f"malformed JSON: {err.msg} (column {err.colno})") from None
    return rows


def tnews_label_names(task_dir: str | Path) -> dict[str, str]:
    """tnews's English label names (``label_desc``) mapped to their Chinese names (``label_zh``), in file order."""
    return {r["label_desc"]: r["label_zh"] for r in read_fewclue(Path(task_dir) / "label_index2en2zh.json")}


def system_prompt(task: str, task_dir: str | Path) -> str:
    """The one system message a task's examples carry: the question and the labels to answer with."""
    if task == "eprstmt":
        return EPRSTMT_SYSTEM_PROMPT
    names = tnews_label_names(task_dir)
    return "这条新闻标题属于哪一类？只回答类别名，从这些类别中选一个：" + "、".join(names.values()) + "。"


def conversations(task: str, task_dir: str | Path, split: str) -> list[dict]:
    """One split of a task as fewtune conversations (system prompt, sentence, label) with a ``label`` field."""
    task_dir = Path(task_dir)
    system = system_prompt(task, task_dir)
    names = tnews_label_names(task_dir) if task == "tnews" else None
    out = []
    for i, row in enumerate(read_fewclue(task_dir / SPLITS[split]), 1):
        try:
            label = names[row["label_desc"]] if names is not None else row["label"]
            sentence = row["sentence"]
        except KeyError as err:
            raise DataError(str(task_dir / SPLITS[split]), i, f"missing or unknown {err}") from None
        out.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": sentence},
                                 {"role": "assistant", "content": label}], "label": label})
    return out


def write_splits(task: str, out_dir: str | Path, task_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write train.jsonl, dev.jsonl (FewCLUE's dev set: for choosing settings, never the test set) and
    test.jsonl (``test_public``) under out_dir; the train and test paths."""
    task_dir = find_fewclue(task, task_dir)
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "dev.jsonl", conversations(task, task_dir, "dev"))
    return (write_jsonl(out_dir / "train.jsonl", conversations(task, task_dir, "train")),
            write_jsonl(out_dir / "test.jsonl", conversations(task, task_dir, "test")))
