"""Multi-stage training on FewCLUE eprstmt: continued pretraining on unlabeled reviews, then the task, against
the task alone.

    python benchmarks/multistage.py [--reviews 2000] [--seeds 0,1] [--table-only]

Stage 1 (once): LoRA continued pretraining of gemma3-270m (the model augment.py trains eprstmt on) on
--reviews reviews from eprstmt's unlabeled.json (seeded sample; every review that also occurs in the train,
dev or test file is left out, and duplicates), one per line in a .txt file (`data.format` text: loss on every
token, packed), 1 epoch. Its effect on the domain: perplexity of 300 other unlabeled reviews under the base
model and under stage 1.
Stage 2, per seed, two arms with augment.py's eprstmt config (suggest's) and validation split:
- `without`: task SFT from the base model (augment.py's `none` arm);
- `with`: the same SFT with `model.init_from: STAGE1` (the stage-1 adapter merged into the base).
Both scored on eprstmt's test_public (610) by choice scoring. Precision: train.mixed_precision auto (what
trains faster here, the same for both arms), recorded per row.

Rows go to benchmarks/results/multistage.jsonl (a rerun skips what is there); the table to
benchmarks/results/multistage.md, above the hand-written notes. Runs alone (it trains); prints and records
the CPU kind. Waits before its next run while runs/multistage/PAUSE exists.
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

import augment as aug  # benchmarks/augment.py: the data sets, their configs and scoring
from fewtune.config import EvalSection, build_config
from fewtune.data.tools import split_file
from fewtune.datasets.fewclue import SPLITS, find_fewclue, read_fewclue
from fewtune.eval.evaluate import evaluate
from fewtune.train.loop import train
from _machine import cpu_kind, write_keeping_notes  # noqa: E402  (benchmarks/_machine.py)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "multistage"
RESULTS = ROOT / "benchmarks" / "results" / "multistage.jsonl"
TABLE = ROOT / "benchmarks" / "results" / "multistage.md"
NOTES = "<!-- written by hand below this line; multistage.py keeps it when it rewrites the table -->"
DATASET = "eprstmt"
HELD_OUT = 300


def corpus(n: int, seed: int = 0) -> tuple[Path, Path, int]:
    """reviews.txt (n unlabeled reviews, one per line) and heldout.jsonl ({"text"} rows); how many unlabeled
    reviews were left out because a labelled file holds them."""
    task_dir = find_fewclue(DATASET)
    labelled = {r["sentence"] for split in ("train", "dev", "test") for r in read_fewclue(task_dir / SPLITS[split])}
    seen, pool, leaked = set(), [], 0
    for r in read_fewclue(task_dir / SPLITS["unlabeled"]):
        text = " ".join(r["sentence"].split())  # one review per line: no line breaks inside
        if r["sentence"] in labelled:
            leaked += 1
        elif text and text not in seen:
            seen.add(text)
            pool.append(text)
    random.Random(seed).shuffle(pool)
    WORK.mkdir(parents=True, exist_ok=True)
    reviews = WORK / "reviews.txt"
    reviews.write_text("".join(t + "\n" for t in pool[:n]), encoding="utf-8")
    held = WORK / "heldout.jsonl"
    held.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in pool[n:n + HELD_OUT]),
                    encoding="utf-8")
    return reviews, held, leaked


def stage1(reviews: Path, held: Path, leaked: int, code: str, command: str) -> dict:
    run_dir = WORK / "stage1"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    values = {"model": {"name": aug.MODELS[DATASET]},
              "data": {"train": str(reviews), "val_ratio": 0.05, "max_length": 256, "seed": 0},
              "method": {"name": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05}},
              "train": {"output_dir": str(run_dir), "epochs": 1, "batch_size": 16, "lr": 2e-4, "warmup_ratio": 0.03,
                        "scheduler": "cosine", "num_threads": torch.get_num_threads(), "adapt_threads": False},
              "eval": {"every": 50}}
    cfg = build_config(values, source="multistage benchmark stage 1")
    start = time.time()
    summary = train(cfg, run_dir)
    train_s = time.time() - start
    perplexity = {}
    for name, target in (("base", aug.MODELS[DATASET]), ("stage1", str(run_dir))):
        settings = EvalSection(precision="no", batch_size=8)  # both in fp32: the same arithmetic for the comparison
        perplexity[name] = evaluate(target, held, settings, output_dir=WORK / f"perplexity-{name}").metrics["perplexity"]
    end = next(r for r in aug.read_lines(run_dir / "metrics.jsonl") if r.get("event") == "end")
    return {"kind": "stage1", "dataset": DATASET, "model": aug.MODELS[DATASET], "reviews": len(aug._lines(reviews)),
            "left_out_as_labelled": leaked, "held_out": HELD_OUT, "tokens": end.get("train_tokens_seen"),
            "steps": summary.steps, "train_s": round(train_s, 1), "tokens_per_s": round(end["train_tokens_seen"] / train_s, 1),
            "perplexity_base": perplexity["base"], "perplexity_stage1": perplexity["stage1"],
            "precision": json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0]).get("mixed_precision"),
            "cpu": cpu_kind(cores=False), "code": code, "command": command}


def stage2(arm: str, seed: int, code: str, command: str) -> dict:
    files = aug.prepare(DATASET)
    run_dir = WORK / f"{arm}-seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    start = time.time()
    values = aug.base_values(DATASET, files, fp32=False)
    values["train"]["mixed_precision"] = "auto"
    split_file(files["train"], run_dir / "data", val_ratio=values["data"]["val_ratio"], seed=seed)
    values["data"].update(train=str(run_dir / "data" / "train.jsonl"), validation=str(run_dir / "data" / "validation.jsonl"),
                          val_ratio=0.0, seed=seed)
    values["train"].update(seed=seed, output_dir=str(run_dir), num_threads=torch.get_num_threads())
    if arm == "with":
        values["model"]["init_from"] = str(WORK / "stage1")
    cfg = build_config(values, source=f"multistage benchmark {arm}")
    summary = train(cfg, run_dir)
    train_s = time.time() - start
    settings = aug.eval_settings(DATASET, files)
    test = evaluate(str(run_dir), files["test"], settings, output_dir=run_dir / "eval_test")
    start_event = next(r for r in aug.read_lines(run_dir / "metrics.jsonl") if r.get("event") == "start")
    return {"kind": "stage2", "dataset": DATASET, "arm": arm, "seed": seed, "test": aug.score(DATASET, settings, test),
            "n_test": len(test.predictions), "steps": summary.steps, "train_s": round(train_s, 1),
            "wall_s": round(time.time() - start, 1), "precision": start_event.get("mixed_precision"),
            "load": os.getloadavg()[0], "cpu": cpu_kind(cores=False), "code": code, "command": command}


def wait_while_paused() -> None:
    pause = WORK / "PAUSE"
    if pause.exists():
        print(f"paused: waiting until {pause} is removed", flush=True)
    while pause.exists():
        time.sleep(5)


def table(rows: list[dict]) -> str:
    lines = ["# Multi-stage training: continued pretraining on unlabeled reviews, then eprstmt SFT", "",
             "Command: `python benchmarks/multistage.py` (see its docstring). Model gemma3-270m; stage 1: LoRA r=16 "
             "on raw reviews (`data.format` text), 1 epoch; stage 2: augment.py's eprstmt config, `with` starting "
             "from stage 1 (`model.init_from`, adapter merged), `without` from the base model; test: eprstmt "
             "test_public (610), accuracy.", ""]
    s1 = [r for r in rows if r["kind"] == "stage1"]
    if s1:
        r = s1[-1]
        lines += ["| stage 1 data | tokens | time | tokens/s | precision | perplexity of 300 held-out reviews: base | "
                  "after stage 1 | CPU |", "|---|---:|---:|---:|---|---:|---:|---|",
                  f"| {r['reviews']} unlabeled reviews ({r['left_out_as_labelled']} left out: in a labelled file) | "
                  f"{r['tokens']:,} | {r['train_s'] / 60:.1f} min | {r['tokens_per_s']:.0f} | {r['precision']} | "
                  f"{r['perplexity_base']:.2f} | {r['perplexity_stage1']:.2f} | {r['cpu']} |", ""]
    s2 = [r for r in rows if r["kind"] == "stage2"]
    if s2:
        lines += ["| SFT starting from | seeds | test accuracy | per seed | train time | precision |",
                  "|---|---:|---:|---|---:|---|"]
        for arm in ("without", "with"):
            rs = sorted((r for r in s2 if r["arm"] == arm), key=lambda r: r["seed"])
            if not rs:
                continue
            what = "the base model" if arm == "without" else "stage 1 (merged)"
            lines.append(f"| {what} | {len(rs)} | {aug._ms([r['test'] for r in rs])} | "
                         f"{', '.join(format(r['test'], '.3f') for r in rs)} | "
                         f"{statistics.mean(r['train_s'] for r in rs):.0f} s | "
                         f"{', '.join(sorted({str(r['precision']) for r in rs}))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reviews", type=int, default=2000)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    print(f"CPU: {cpu_kind()}; torch threads {torch.get_num_threads()}", flush=True)
    code, command = aug.code_version(), " ".join(["python benchmarks/multistage.py", *sys.argv[1:]])
    done = aug.read_lines(RESULTS)

    def record(row: dict) -> None:
        done.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        write_keeping_notes(TABLE, table(aug.read_lines(RESULTS)), NOTES)

    if not args.table_only:
        if not any(r["kind"] == "stage1" for r in done):
            reviews, held, leaked = corpus(args.reviews)
            wait_while_paused()
            print("== stage 1: continued pretraining", flush=True)
            record(stage1(reviews, held, leaked, code, command))
        for seed in [int(s) for s in args.seeds.split(",")]:
            for arm in ("with", "without"):
                if any(r["kind"] == "stage2" and (r["arm"], r["seed"]) == (arm, seed) for r in done):
                    continue
                wait_while_paused()
                print(f"== {arm} / seed {seed}", flush=True)
                record(stage2(arm, seed, code, command))
    text = table(aug.read_lines(RESULTS))
    write_keeping_notes(TABLE, text, NOTES)
    print(text)


if __name__ == "__main__":
    main()
