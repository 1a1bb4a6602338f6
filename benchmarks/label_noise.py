"""Label-noise finding on SNIPS-40 with planted noise: how well `fewtune data noise` finds it, and what
cleaning is worth on the test set.

    python benchmarks/label_noise.py [--noise 0.1] [--folds 5] [--seeds 0,1,2] [--table-only]

1. Plant: 10% of SNIPS-40's 280 training utterances (seeded, --plant-seed 0) get another intent, drawn
   uniformly from the other six (the `label` field and the final assistant turn both change).
2. Find: `fewtune data noise` on the noisy file (K-fold runs with the config augment.py's `none` arm uses:
   suggest's config plus configs/augment_snips.yaml, fp32), then precision and recall of the flagged set
   against the planted flips, and how often the suggested label is the true one.
3. Train on the noisy file and on the cleaned one (flagged examples left out), 3 seeds each, same config and
   validation split rule as augment.py (the split taken from the file trained on, with the run's seed), and
   score both on SNIPS's 700 validation utterances (the test set here).

Rows go to benchmarks/results/label_noise.jsonl (a rerun skips what is there); the table to
benchmarks/results/label_noise.md, above the hand-written notes. Runs alone (it trains); prints and records
the CPU kind. Waits before its next run while runs/label_noise/PAUSE exists.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

import augment as aug  # benchmarks/augment.py: the data sets, their configs and scoring
from fewtune.config import build_config
from fewtune.data.tools import split_file
from fewtune.eval.evaluate import evaluate
from fewtune.quality.noise import find_label_noise
from fewtune.train.loop import train
from _machine import cpu_kind, write_keeping_notes  # noqa: E402  (benchmarks/_machine.py)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "label_noise"
RESULTS = ROOT / "benchmarks" / "results" / "label_noise.jsonl"
TABLE = ROOT / "benchmarks" / "results" / "label_noise.md"
NOTES = "<!-- written by hand below this line; label_noise.py keeps it when it rewrites the table -->"
DATASET = "snips40"


def plant(train_file: Path, out: Path, share: float, seed: int) -> tuple[Path, dict[int, str]]:
    """The training file with ``share`` of its labels flipped to another label; {line: true label}."""
    rows = [json.loads(line) for line in train_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = sorted({r["label"] for r in rows})
    rng = random.Random(seed)
    flipped = sorted(rng.sample(range(len(rows)), round(share * len(rows))))
    truth = {}
    for i in flipped:
        true = rows[i]["label"]
        wrong = rng.choice([lab for lab in labels if lab != true])
        rows[i]["label"] = wrong
        assert rows[i]["messages"][-1]["role"] == "assistant" and rows[i]["messages"][-1]["content"] == true
        rows[i]["messages"][-1]["content"] = wrong
        truth[i + 1] = true
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out, truth


def find(noisy: Path, truth: dict[int, str], folds: int, code: str, command: str) -> dict:
    files = aug.prepare(DATASET)
    values = aug.base_values(DATASET, {**files, "train": noisy}, fp32=True)
    values["train"]["num_threads"] = torch.get_num_threads()
    config = WORK / "folds.yaml"
    config.write_text(yaml.safe_dump(build_config(values).model_dump(mode="json"), allow_unicode=True), encoding="utf-8")
    start = time.time()
    result = find_label_noise(noisy, WORK / "finder", config=config, folds=folds, seed=0,
                              clean=WORK / "cleaned.jsonl", rejects=WORK / "rejects.jsonl")
    flagged = {x.line: x.suggested for x in result.issues}
    hits = [line for line in flagged if line in truth]
    return {"kind": "finder", "dataset": DATASET, "n": result.n, "planted": len(truth), "flagged": len(flagged),
            "true_positives": len(hits), "precision": len(hits) / len(flagged) if flagged else 0.0,
            "recall": len(hits) / len(truth), "suggested_true_label": sum(flagged[x] == truth[x] for x in hits),
            "oof_accuracy": result.oof_accuracy, "folds": folds, "wall_s": round(time.time() - start, 1),
            "fold_s": result.fold_seconds, "cpu": cpu_kind(cores=False), "code": code, "command": command}


def train_one(arm: str, train_file: Path, seed: int, code: str, command: str) -> dict:
    files = aug.prepare(DATASET)
    run_dir = WORK / f"{arm}-seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a run that did not reach RESULTS starts over
    start = time.time()
    values = aug.base_values(DATASET, {**files, "train": train_file}, fp32=True)
    parts = split_file(train_file, run_dir / "data", val_ratio=values["data"]["val_ratio"], seed=seed)
    values["data"].update(train=str(run_dir / "data" / "train.jsonl"), validation=str(run_dir / "data" / "validation.jsonl"),
                          val_ratio=0.0, seed=seed)
    values["train"].update(seed=seed, output_dir=str(run_dir), num_threads=torch.get_num_threads())
    cfg = build_config(values, source=f"label-noise benchmark {arm}")
    summary = train(cfg, run_dir)
    train_s = time.time() - start
    settings = aug.eval_settings(DATASET, files)
    test = evaluate(str(run_dir), files["test"], settings, output_dir=run_dir / "eval_test")
    return {"kind": "train", "dataset": DATASET, "arm": arm, "seed": seed, "test": aug.score(DATASET, settings, test),
            "n_test": len(test.predictions), "n_train": parts["train"], "n_validation": parts["validation"],
            "steps": summary.steps, "train_s": round(train_s, 1), "wall_s": round(time.time() - start, 1),
            "load": os.getloadavg()[0], "cpu": cpu_kind(cores=False), "precision": cfg.train.mixed_precision,
            "code": code, "command": command}


def wait_while_paused() -> None:
    pause = WORK / "PAUSE"
    if pause.exists():
        print(f"paused: waiting until {pause} is removed", flush=True)
    while pause.exists():
        time.sleep(5)


def table(rows: list[dict]) -> str:
    lines = ["# Label-noise finding on SNIPS-40 with planted noise", "",
             "Command: `python benchmarks/label_noise.py` (see its docstring). 10% of the 280 training labels flipped "
             "(seeded); `fewtune data noise` with 5-fold runs of augment.py's SNIPS config (fp32); test: SNIPS's 700 "
             "validation utterances.", ""]
    finder = [r for r in rows if r["kind"] == "finder"]
    if finder:
        f = finder[-1]
        lines += ["| planted | flagged | true positives | precision | recall | suggested label = true label | "
                  "out-of-fold accuracy (vs noisy labels) | wall time | CPU |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
                  f"| {f['planted']} of {f['n']} | {f['flagged']} | {f['true_positives']} | {f['precision']:.3f} | "
                  f"{f['recall']:.3f} | {f['suggested_true_label']} of {f['true_positives']} | {f['oof_accuracy']:.3f} | "
                  f"{f['wall_s'] / 60:.1f} min ({f['folds']} folds) | {f['cpu']} |", ""]
    trained = [r for r in rows if r["kind"] == "train"]
    if trained:
        lines += ["| trained on | examples (train + validation) | seeds | test accuracy | per seed | train time | CPU |",
                  "|---|---:|---:|---:|---|---:|---|"]
        for arm in dict.fromkeys(r["arm"] for r in trained):
            rs = sorted((r for r in trained if r["arm"] == arm), key=lambda r: r["seed"])
            lines.append(f"| {arm} | {rs[0]['n_train']} + {rs[0]['n_validation']} | {len(rs)} | "
                         f"{aug._ms([r['test'] for r in rs])} | {', '.join(format(r['test'], '.3f') for r in rs)} | "
                         f"{statistics.mean(r['train_s'] for r in rs):.0f} s | "
                         f"{', '.join(sorted({r['cpu'] for r in rs}))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--plant-seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    os.environ["FEWTUNE_MIXED_PRECISION"] = "no"  # as augment.py --fp32: the SNIPS rows there are fp32
    print(f"CPU: {cpu_kind()}; torch threads {torch.get_num_threads()}", flush=True)
    code, command = aug.code_version(), " ".join(["python benchmarks/label_noise.py", *sys.argv[1:]])
    done = aug.read_lines(RESULTS)

    def record(row: dict) -> None:
        done.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        write_keeping_notes(TABLE, table(aug.read_lines(RESULTS)), NOTES)

    if not args.table_only:
        files = aug.prepare(DATASET)
        noisy, truth = plant(files["train"], WORK / "noisy.jsonl", args.noise, args.plant_seed)
        if not any(r["kind"] == "finder" for r in done):
            wait_while_paused()
            print("== finding label issues", flush=True)
            record(find(noisy, truth, args.folds, code, command))
        for seed in [int(s) for s in args.seeds.split(",")]:
            for arm, path in (("noisy", noisy), ("cleaned", WORK / "cleaned.jsonl")):
                if any(r["kind"] == "train" and (r["arm"], r["seed"]) == (arm, seed) for r in done):
                    continue
                wait_while_paused()
                print(f"== {arm} / seed {seed}", flush=True)
                record(train_one(arm, path, seed, code, command))
    text = table(aug.read_lines(RESULTS))
    write_keeping_notes(TABLE, text, NOTES)
    print(text)


if __name__ == "__main__":
    main()
