"""How good are back-translation and paraphrase by the embedded SmolLM2-135M-Instruct? A small table.

Six SNIPS English utterances (train files, one per intent, first utterance) and six Chinese car
commands (the demo's training file, first six) go through ``backtranslate`` and ``paraphrase``
(one candidate each, seed 0), exactly as ``fewtune augment --model smollm2-135m-instruct`` runs
them. Protected spans: SNIPS slot values, the car commands' JSON strings. Writes
benchmarks/results/backtranslate_examples.md; takes a few minutes on a CPU.

    .venv/bin/python benchmarks/backtranslate_examples.py
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import cpu_kind  # noqa: E402  (benchmarks/_machine.py)

from fewtune.augment.base import Resources, get_method  # noqa: E402
from fewtune.augment.spans import input_text, protected_spans, spans_kept  # noqa: E402
from fewtune.data.formats import Example, Message, load_examples  # noqa: E402
from fewtune.datasets.snips import find_snips, read_snips  # noqa: E402
from fewtune.models import DEFAULT_MODEL  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "backtranslate_examples.md"
INTENTS = ["AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook", "SearchScreeningEvent"]


def snips_examples() -> list[tuple[Example, list[str]]]:
    folder = find_snips()
    out = []
    for intent in INTENTS:
        text, label, slots, _ = read_snips(folder / f"train_{intent}.json")[0]
        values = [v for vs in slots.values() for v in ([vs] if isinstance(vs, str) else vs)]
        ex = Example([Message("user", text), Message("assistant", label)], label=label)
        out.append((ex, protected_spans(ex, values)))
    return out


def car_examples() -> list[tuple[Example, list[str]]]:
    examples = load_examples(ROOT / "src" / "fewtune" / "demo" / "data" / "car_commands_train.jsonl")[:6]
    return [(ex, protected_spans(ex)) for ex in examples]


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "(empty)"


def main() -> None:
    machine = cpu_kind()
    print(f"machine: {machine}", flush=True)
    resources = Resources(model=DEFAULT_MODEL)
    methods = {name: get_method(name).make({}, resources) for name in ("backtranslate", "paraphrase")}
    rows, kept = [], {name: [0, 0] for name in methods}
    start = time.time()
    for i, (ex, spans) in enumerate(snips_examples() + car_examples()):
        for name, augment in methods.items():
            cands = augment(ex, 1, random.Random(i), spans)
            result = input_text(cands[0].example) if cands else ""
            via = cands[0].params.get("via", "") if cands and name == "backtranslate" else ""
            ok = bool(cands) and not spans_kept(cands[0].example, spans)
            kept[name][0] += ok
            kept[name][1] += 1
            rows.append(f"| {name} | {cell(input_text(ex))} | {cell(', '.join(spans))} | {cell(via)} | {cell(result)} "
                        f"| {'yes' if ok else 'no'} |")
            print(rows[-1], flush=True)
    wall = time.time() - start
    summary = ", ".join(f"{name}: {k}/{n}" for name, (k, n) in kept.items())
    OUT.write_text(f"""# Back-translation and paraphrase by SmolLM2-135M-Instruct: examples

Written by `benchmarks/backtranslate_examples.py` (`{DEFAULT_MODEL}`, the embedded GGUF; one candidate per
input, seed = row number, default options: back-translation en→German→en and zh→English→zh at
temperature 0.7, paraphrase at 0.9 with one English and one Chinese few-shot pair). Machine: {machine};
{wall:.0f} s for the {len(rows)} rows. Protected spans: SNIPS slot values, the car commands' JSON strings;
"kept" is whether all of them survive verbatim (the pipeline rejects the candidate otherwise).

Protected spans kept: {summary}.

| method | source | protected | pivot text | result | kept |
|---|---|---|---|---|---|
""" + "\n".join(rows) + """

## What this shows

<!-- NOTES -->
""", encoding="utf-8")
    print(f"wrote {OUT} ({wall:.0f} s); spans kept: {summary}")


if __name__ == "__main__":
    main()
