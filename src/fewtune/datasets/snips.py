"""Bringing the SNIPS NLU benchmark (2017 custom intent engines) into fewtune.

SNIPS ships one JSON document per intent and split, ``train_<Intent>.json`` and
``validate_<Intent>.json``: ``{"<Intent>": [{"data": [{"text": "..."}, {"text": "...",
"entity": "<slot>"}, ...]}, ...]}``. The utterance is the concatenation of the ``text``
pieces; pieces with an ``entity`` are slot values. Two tasks come out of it:

- ``intent``: classification records ``{"text", "label"}``;
- ``slots``: prompt/completion records whose completion is the JSON
  ``{"intent": ..., "slots": {slot: value}}`` (a slot named twice gets a list of values).

``SYSTEM_PROMPT`` is the one system message the SNIPS benchmarks give intent classification,
so the base model and the fine-tuned run see identical prompts.

Where: ``find_snips`` (an explicit folder, else ``$FEWTUNE_SHARED_DATA/snips``, else
``../shared/data/snips``; see ``fewtune.datasets.common``). The benchmarks' few-shot sets:
``write_intent_splits`` (a seeded sample of N training utterances per intent, all 700
validation utterances, optionally a dev sample disjoint from the training one).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from fewtune.data.formats import DataError
from fewtune.data.tools import write_jsonl
from fewtune.datasets.common import find_dataset

TASKS = ("intent", "slots")
INTENTS = ("AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook", "SearchCreativeWork",
           "SearchScreeningEvent")  # the 2017 custom intent engines
SYSTEM_PROMPT = ("Classify the user's request into exactly one of these intents: " + ", ".join(INTENTS) +
                 ". Answer with the intent name only.")


def snips_files(path: str | Path, split: str = "train") -> list[Path]:
    """The files of one split: a directory gives every ``<split>_*.json`` in it, a file itself."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(str(path), None, "not found (give a SNIPS directory or one of its JSON files)")
    files = sorted(path.glob(f"{split}_*.json"))
    if not files:
        found = sorted({p.name.split("_")[0] for p in path.glob("*_*.json")})
        raise DataError(str(path), None, f"no {split}_<Intent>.json files here"
                        + (f"; splits present: {', '.join(found)}" if found else ""))
    return files


def read_snips(path: str | Path) -> list[tuple[str, str, dict[str, str | list[str]], str]]:
    """(utterance, intent, slots, where) for every utterance in one SNIPS file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(str(path), None, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(str(path), err.lineno, f"malformed JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(doc, dict) or not doc:
        raise DataError(str(path), None, 'a SNIPS file is one object {"<Intent>": [utterances]}')
    out = []
    for intent, items in doc.items():
        if not isinstance(items, list):
            raise DataError(str(path), None, f"must be a list of utterances, got {type(items).__name__}", intent)
        for i, item in enumerate(items):
            where = f"{intent}[{i}]"
            pieces = item.get("data") if isinstance(item, dict) else None
            if not isinstance(pieces, list) or not pieces:
                raise DataError(str(path), None, "must be a non-empty list of text pieces", f"{where}.data")
            text, slots = [], {}
            for j, piece in enumerate(pieces):
                if not isinstance(piece, dict) or not isinstance(piece.get("text"), str):
                    raise DataError(str(path), None, 'each piece needs a string "text"', f"{where}.data[{j}]")
                text.append(piece["text"])
                entity = piece.get("entity")
                if entity is not None:
                    value = piece["text"].strip()
                    if entity in slots:  # the same slot twice in one utterance: keep both values
                        previous = slots[entity]
                        slots[entity] = (previous if isinstance(previous, list) else [previous]) + [value]
                    else:
                        slots[entity] = value
            utterance = "".join(text).strip()
            if not utterance:
                raise DataError(str(path), None, "the utterance is empty", f"{where}.data")
            out.append((utterance, intent, slots, f"{path.name}#{where}"))
    return out


def snips_records(path: str | Path, task: str = "intent", split: str = "train") -> list[dict]:
    """SNIPS utterances as fewtune records: classification (``intent``) or slot-filling JSON (``slots``)."""
    if task not in TASKS:
        raise ValueError(f"unknown SNIPS task {task!r}; use one of {', '.join(TASKS)}")
    rows = []
    for file in snips_files(path, split):
        for utterance, intent, slots, where in read_snips(file):
            if task == "intent":
                rows.append({"text": utterance, "label": intent, "source": where})
            else:
                target = json.dumps({"intent": intent, "slots": slots}, ensure_ascii=False)
                rows.append({"prompt": utterance, "completion": target, "source": where})
    return rows


# ---------------------------------------------------------------- where, and the benchmarks' splits


def find_snips(explicit: str | Path | None = None) -> Path:
    """The SNIPS folder (the 2017-06-custom-intent-engines files); DatasetNotFound names where it looked."""
    return find_dataset("snips", explicit, lambda path: (path / "validate_PlayMusic.json").is_file(),
                        hint="pass --snips DIR pointing at the nlu-benchmark 2017-06-custom-intent-engines files")


def intent_utterances(snips: str | Path, split: str, intent: str) -> list[str]:
    """The utterances of one intent's file of one split (``train`` or ``validate``)."""
    return [text for text, label, _, _ in read_snips(Path(snips) / f"{split}_{intent}.json") if label == intent]


def intent_conversation(text: str, intent: str) -> dict:
    """One intent example as the benchmarks train and score it: the shared system prompt, the utterance, the intent."""
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text},
                         {"role": "assistant", "content": intent}], "label": intent}


def write_intent_splits(snips: str | Path, out_dir: str | Path, per_intent: int = 40, seed: int = 0,
                        dev_per_intent: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl (per_intent sampled per intent, seeded) and validation.jsonl (all 700); their paths.

    With dev_per_intent, also dev.jsonl: that many further utterances per intent from the SNIPS
    train files, none of them in train.jsonl, for choosing settings without touching the 700
    validation utterances that serve as the test set. The training sample is the same with or
    without it (the dev sample uses its own random stream).
    """
    snips, out_dir = Path(snips), Path(out_dir)
    rng = random.Random(seed)
    train, val, rest = [], [], {}
    for intent in INTENTS:
        pool = intent_utterances(snips, "train", intent)
        chosen = rng.sample(pool, per_intent)
        train += [intent_conversation(t, intent) for t in chosen]
        val += [intent_conversation(t, intent) for t in intent_utterances(snips, "validate", intent)]
        taken = set(chosen)
        rest[intent] = [t for t in pool if t not in taken]
    rng.shuffle(train)
    if dev_per_intent:
        dev_rng = random.Random(seed + 1)
        dev = [intent_conversation(t, intent) for intent in INTENTS for t in dev_rng.sample(rest[intent], dev_per_intent)]
        write_jsonl(out_dir / "dev.jsonl", dev)
    return write_jsonl(out_dir / "train.jsonl", train), write_jsonl(out_dir / "validation.jsonl", val)
