"""SNIPS intent detection as fewtune data: 40 training examples per intent, 700 validation.

Reads ../shared/data/snips (the snipsco/nlu-benchmark 2017-06 custom-intent-engines files);
the utterance is the concatenation of the `text` pieces, the label the intent. Every
example carries the same system message listing the intents, so the base model and the
fine-tuned run see identical prompts.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from fewtune.datasets.snips import INTENTS, SYSTEM_PROMPT, read_snips  # noqa: E402  (the one SNIPS reader)

SNIPS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "snips"


def find_snips(explicit: str | None = None) -> Path:
    candidates = [Path(explicit)] if explicit else [SNIPS_DIR, Path("/work/shared/data/snips")]
    for path in candidates:
        if (path / "validate_PlayMusic.json").is_file():
            return path
    raise SystemExit(f"SNIPS data not found (looked in {', '.join(map(str, candidates))}); "
                     "pass --snips DIR pointing at the nlu-benchmark 2017-06-custom-intent-engines files")


def read_split(snips: Path, split: str, intent: str) -> list[str]:
    """The utterances of one intent's file of one split (``train`` or ``validate``)."""
    return [text for text, label, _, _ in read_snips(snips / f"{split}_{intent}.json") if label == intent]


def example(text: str, intent: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text},
                         {"role": "assistant", "content": intent}], "label": intent}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def convert(snips: Path, out_dir: Path, per_intent: int = 40, seed: int = 0,
            dev_per_intent: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl (per_intent sampled per intent, seeded) and validation.jsonl (all 700).

    With dev_per_intent, also dev.jsonl: that many further utterances per intent from the SNIPS
    train files, none of them in train.jsonl, for choosing settings without touching the 700
    validation utterances that serve as the test set. The training sample is the same with or
    without it (the dev sample uses its own random stream).
    """
    rng = random.Random(seed)
    train, val, rest = [], [], {}
    for intent in INTENTS:
        pool = read_split(snips, "train", intent)
        chosen = rng.sample(pool, per_intent)
        train += [example(t, intent) for t in chosen]
        val += [example(t, intent) for t in read_split(snips, "validate", intent)]
        taken = set(chosen)
        rest[intent] = [t for t in pool if t not in taken]
    rng.shuffle(train)
    if dev_per_intent:
        dev_rng = random.Random(seed + 1)
        dev = [example(t, intent) for intent in INTENTS for t in dev_rng.sample(rest[intent], dev_per_intent)]
        write_jsonl(out_dir / "dev.jsonl", dev)
    return write_jsonl(out_dir / "train.jsonl", train), write_jsonl(out_dir / "validation.jsonl", val)
