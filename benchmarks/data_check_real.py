"""Run `data check` on the real public data sets in ../shared/data and tabulate what it finds.

    python benchmarks/data_check_real.py [--data ../shared/data] [--model smollm2-135m-instruct]

Prints a markdown table (one row per train/validation pair) and writes it, with the exact
settings, to benchmarks/results/data_check_real.md. The data folder is found as
fewtune.datasets finds it (--data, else $FEWTUNE_SHARED_DATA, else ../shared/data). SNIPS is
converted first with the project's own converter (``fewtune data convert --from snips``) into a
temporary folder; FewCLUE is read with fewtune.datasets.fewclue's field map.
The data sets are read in place, never copied into the project.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from fewtune.data.tools import write_jsonl
from fewtune.datasets.common import DatasetNotFound, find_shared_data
from fewtune.datasets.fewclue import FIELD_MAP, SPLITS
from fewtune.datasets.snips import snips_records
from fewtune.models import load_tokenizer
from fewtune.quality.check import check_data

ROOT = Path(__file__).resolve().parent.parent


def jobs(data: Path, tmp: Path) -> list[dict]:
    fewclue = data / "fewclue"
    lf = data / "llamafactory-demo" / "dataset_info.json"
    for task, name in (("intent", "classification"), ("slots", "slots")):
        for split in ("train", "validate"):
            write_jsonl(tmp / f"snips_{split}_{name}.jsonl", snips_records(data / "snips", task, split))
    out = [
        dict(name="snips intent (train vs validate)", train=tmp / "snips_train_classification.jsonl",
             val=tmp / "snips_validate_classification.jsonl"),
        dict(name="snips slots JSON (train vs validate)", train=tmp / "snips_train_slots.jsonl",
             val=tmp / "snips_validate_slots.jsonl"),
    ]
    for task, rename in FIELD_MAP.items():
        for val in ("dev", "test"):
            out.append(dict(name=f"fewclue {task} (train vs {Path(SPLITS[val]).stem})",
                            train=fewclue / task / SPLITS["train"], val=fewclue / task / SPLITS[val], rename=rename))
        out.append(dict(name=f"fewclue {task} (dev vs test_public)", train=fewclue / task / SPLITS["dev"],
                        val=fewclue / task / SPLITS["test"], rename=rename))
    for name in ("alpaca_en_demo", "alpaca_zh_demo", "glaive_toolcall_en_demo", "glaive_toolcall_zh_demo", "identity"):
        out.append(dict(name=f"llamafactory {name}", train=lf, dataset=name))
    return out


def row(job: dict, report) -> list[str]:
    t, v = report.stats["train"], report.stats.get("validation", {})
    trunc = t["lengths"].get("truncation", {})
    dup = t["duplicates"]
    labels = t.get("labels")
    leak = v.get("leakage")
    return [job["name"], str(t["examples"]), str(dup["exact_duplicates"]), str(dup["near_duplicates"]),
            str(dup["conflicts"]),
            f"{leak['leaked_inputs']}/{leak['validation_examples']}" if leak else "-",
            f"{labels['classes']} / {labels['imbalance_ratio']}" if labels else "-",
            str(t["lengths"]["tokens"]["total"]["median"]), str(t["lengths"]["tokens"]["total"]["max"]),
            f"{trunc.get('over_max_length', 0)} ({trunc.get('completion_cut_partly', 0)} / "
            f"{trunc.get('completion_cut_entirely', 0)})",
            f"{t['size'].get('tokens_per_epoch', 0):,}", f"{len(report.errors)} / {len(report.warnings)}"]


HEADER = ["data set", "examples", "exact dup", "near dup", "conflicts", "leaked val inputs", "classes / imbalance",
          "median tokens", "max tokens", "over 512 (cut partly / entirely)", "tokens/epoch", "errors / warnings"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="the shared data folder (default: $FEWTUNE_SHARED_DATA, "
                                                      "else ../shared/data)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    try:
        data = find_shared_data(args.data)
    except DatasetNotFound as err:
        print(f"{err}: nothing to check", file=sys.stderr)
        return 1
    tokenizer = load_tokenizer(args.model)
    rows = []
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs(data, Path(tmp)):
            report = check_data(job["train"], job.get("val"), model=args.model, tokenizer=tokenizer,
                                rename=job.get("rename"), dataset=job.get("dataset"), progress=False)
            rows.append(row(job, report))
            print(f"checked {job['name']}", file=sys.stderr)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)] + ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    out = ROOT / "benchmarks" / "results" / "data_check_real.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# `data check` on the shared real data sets\n\nTokenizer and template: {args.model} (chat template, "
                   f"its default system prompt included), max_length 512, 3 epochs, batch 8. Duplicates, conflicts "
                   f"and lengths are for the first file of each pair; leakage is validation inputs also found in "
                   f"it. Made by `PYTHONPATH=src python benchmarks/data_check_real.py` in "
                   f"{time.time() - start:.0f} s (2 shared CPU cores).\n\n{table}\n", encoding="utf-8")
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
