"""Checkpoint averaging against the single best checkpoint, on the same runs.

    python benchmarks/averaging.py [--datasets snips40,eprstmt] [--seeds 0,1,2] [--average best:3] [--fp32]
        [--table-only]

Each (data set, seed) trains once with the config augment.py's `none` arm uses (suggest's config plus the
data set's recipe, the validation split made from the training file with the run's seed; same data, test
and dev files: benchmarks/augment.py), keeping the weights of its 3 best evaluations (`train.keep_best`).
Then, on the same test set:
- best: the run as training left it (the single best evaluation's weights, best/);
- average: `fewtune export RUN --average best:3` (the mean of the 3 best evaluations' trainable weights).
The dev scores are there to say which a user would pick without looking at the test set.

Appends one JSON line per (data set, seed) to benchmarks/results/averaging.jsonl (a rerun skips what is
there) and writes the table to benchmarks/results/averaging.md, above the hand-written notes. Runs alone
on the machine (it trains); prints and records the CPU kind. While runs/augment/PAUSE exists it waits
before its next run, like augment.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

import augment as aug  # benchmarks/augment.py: the data sets, their configs and scoring
from fewtune.average import average_run
from fewtune.config import build_config
from fewtune.data.tools import split_file
from fewtune.eval.evaluate import evaluate
from fewtune.train.loop import train
from _machine import cpu_kind, write_keeping_notes  # noqa: E402  (benchmarks/_machine.py)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "averaging"
RESULTS = ROOT / "benchmarks" / "results" / "averaging.jsonl"
TABLE = ROOT / "benchmarks" / "results" / "averaging.md"
NOTES = "<!-- written by hand below this line; averaging.py keeps it when it rewrites the table -->"


def run_one(dataset: str, seed: int, files: dict[str, Path], spec: str, fp32: bool, code: str, command: str) -> dict:
    run_dir = WORK / dataset / f"seed{seed}"
    for old in (run_dir, run_dir.with_name(run_dir.name + "-avg")):
        if old.exists():
            shutil.rmtree(old)  # a run that did not reach RESULTS starts over
    start = time.time()
    values = aug.base_values(dataset, files, fp32)
    split_file(files["train"], run_dir / "data", val_ratio=values["data"]["val_ratio"], seed=seed)
    values["data"].update(train=str(run_dir / "data" / "train.jsonl"), validation=str(run_dir / "data" / "validation.jsonl"),
                          val_ratio=0.0, seed=seed)
    values["train"].update(seed=seed, output_dir=str(run_dir), num_threads=torch.get_num_threads(),
                           keep_best=max(values["train"].get("keep_best", 1), int(spec.split(":")[1])))
    cfg = build_config(values, source=f"averaging benchmark {dataset}")
    summary = train(cfg, run_dir)
    train_s = time.time() - start
    averaged = average_run(run_dir, spec, run_dir.with_name(run_dir.name + "-avg"))
    record = json.loads((averaged / "averaged.json").read_text())
    settings = aug.eval_settings(dataset, files)
    scores = {}
    for arm, target in (("best", run_dir), ("average", averaged)):
        for split in ("test", "dev"):
            result = evaluate(str(target), files[split], settings, output_dir=target / f"eval_{split}")
            scores[f"{arm}_{split}"] = aug.score(dataset, settings, result)
    evaluations = sum(1 for r in aug.read_lines(run_dir / "metrics.jsonl") if "val_loss" in r)
    return {"dataset": dataset, "seed": seed, "model": aug.MODELS[dataset], "average": spec,
            "metric": "accuracy" if aug.is_classification(dataset) else "exact_match", **scores,
            "averaged_steps": [c["step"] for c in record["checkpoints"]], "best_step": summary_best(run_dir),
            "evaluations": evaluations, "steps": summary.steps, "eval_metric": cfg.eval.metric,
            "train_s": round(train_s, 1), "wall_s": round(time.time() - start, 1), "load": os.getloadavg()[0],
            "cpu": cpu_kind(cores=False), "precision": cfg.train.mixed_precision, "code": code, "command": command}


def summary_best(run_dir: Path) -> int | None:
    return json.loads((run_dir / "summary.json").read_text()).get("best_step")


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(rows: list[dict]) -> str:
    lines = ["# Checkpoint averaging vs the single best checkpoint", "",
             "Command: `python benchmarks/averaging.py` (see its docstring). Same runs, same test sets: `best` is the run "
             "as training left it, `average` is `fewtune export RUN --average best:3`. Mean ± std over seeds; "
             "Δ is average - best, per seed.", "",
             "| data set | model | metric | seeds | best (test) | average (test) | Δ test per seed | best (dev) | "
             "average (dev) | averaged steps (best first) | CPU |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---|---|"]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        rs = sorted((r for r in rows if r["dataset"] == dataset), key=lambda r: r["seed"])
        deltas = ", ".join(f"{r['average_test'] - r['best_test']:+.3f}" for r in rs)
        steps = "; ".join(f"s{r['seed']}: {', '.join(map(str, r['averaged_steps']))} of {r['steps']}" for r in rs)
        cpus = ", ".join(sorted({r["cpu"] for r in rs}))
        lines.append(f"| {dataset} | {rs[0]['model']} | {rs[0]['metric']} | {len(rs)} | "
                     f"{_ms([r['best_test'] for r in rs])} | {_ms([r['average_test'] for r in rs])} | {deltas} | "
                     f"{_ms([r['best_dev'] for r in rs])} | {_ms([r['average_dev'] for r in rs])} | {steps} | {cpus} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", default="snips40,eprstmt")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--average", default="best:3")
    parser.add_argument("--fp32", action="store_true", help="train and evaluate in fp32 (as augment.py --fp32)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if args.fp32:
        os.environ["FEWTUNE_MIXED_PRECISION"] = "no"
    print(f"CPU: {cpu_kind()}; torch threads {torch.get_num_threads()}", flush=True)
    code, command = aug.code_version(), " ".join(["python benchmarks/averaging.py", *sys.argv[1:]])
    done = aug.read_lines(RESULTS)
    if not args.table_only:
        for dataset in args.datasets.split(","):
            files = aug.prepare(dataset)
            for seed in [int(s) for s in args.seeds.split(",")]:
                if any((r["dataset"], r["seed"], r["average"]) == (dataset, seed, args.average) for r in done):
                    continue
                aug.wait_while_paused()
                print(f"== {dataset} / seed {seed}", flush=True)
                row = run_one(dataset, seed, files, args.average, args.fp32, code, command)
                done.append(row)
                print(json.dumps(row, ensure_ascii=False), flush=True)
                with RESULTS.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                write_keeping_notes(TABLE, table(aug.read_lines(RESULTS)), NOTES)
    text = table(aug.read_lines(RESULTS))
    write_keeping_notes(TABLE, text, NOTES)
    print(text)


if __name__ == "__main__":
    main()
