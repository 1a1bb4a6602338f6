"""SNIPS intent detection: the base model vs a LoRA run, with intervals, and evaluation speed.

    nice -n 10 python benchmarks/snips_eval.py [--work runs/snips] [--snips DIR] [--batch-size 8]
        [--skip-generate] [--train-only] [--note TEXT]

Trains on 40 examples per intent (seeded; benchmarks/configs/snips_eval_lora.yaml, LLaMA-Factory's
default LoRA recipe: r=8 on all linear layers, lr 1e-4, 3 epochs, batch 8, cosine, warmup 0.1,
no held-out split) and evaluates both models on the 700 validation utterances by choice scoring
and by greedy generation. Prints a table and writes it to benchmarks/results/snips_eval.md; the run's
report (docs/example_report/) is built from the same results. A finished run in --work is
reused, an interrupted one resumed. Text under the NOTES marker in the results file is written
by hand and kept when the table is rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import yaml

from fewtune.config import EvalSection, build_config
from fewtune.datasets.common import DatasetNotFound
from fewtune.datasets.snips import INTENTS, SYSTEM_PROMPT, find_snips, write_intent_splits
from fewtune.eval.compare import compare_results, write_compare
from fewtune.eval.evaluate import EvalResult, evaluate, write_results
from fewtune.eval.report import build_report
from fewtune.generate import load_for_inference

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "benchmarks" / "configs" / "snips_eval_lora.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "snips_eval.md"
NOTES = "<!-- written by hand below this line; snips_eval.py keeps it when it rewrites the table -->"


def train_run(train_file: Path, run_dir: Path) -> dict:
    """Train (or resume, or reuse) the LoRA run; its summary."""
    if (run_dir / "summary.json").is_file() and (run_dir / "adapter").is_dir():
        return json.loads((run_dir / "summary.json").read_text())
    from fewtune.train.loop import train

    settings = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    settings["data"]["train"] = str(train_file)  # paths as values, not as dotted overrides (which parse as YAML)
    settings["train"]["output_dir"] = str(run_dir)
    resume = (run_dir / "checkpoints").is_dir()
    result = train(build_config(settings, source=str(RECIPE)), resume=resume)
    return json.loads((Path(result.run_dir) / "summary.json").read_text())


def evaluate_both_ways(target: str, val_file: Path, batch_size: int, skip_generate: bool) -> dict[str, EvalResult]:
    loaded = load_for_inference(target, system_prompt=SYSTEM_PROMPT)
    out = {"choice": evaluate(loaded, val_file, EvalSection(task="classification", labels=list(INTENTS), mode="choice",
                                                   batch_size=batch_size))}
    print(f"{target}: choice scoring {out['choice'].settings['seconds']} s, accuracy {out['choice'].metrics['accuracy']:.3f}",
          flush=True)
    if not skip_generate:
        out["generate"] = evaluate(loaded, val_file, EvalSection(task="classification", labels=list(INTENTS),
                                                            mode="generate", batch_size=16))
        print(f"{target}: generation {out['generate'].settings['seconds']} s, "
              f"accuracy {out['generate'].metrics['accuracy']:.3f}", flush=True)
    return out


def _ci(report: dict, name: str, metric: str) -> str:
    v = report["metrics"][name][metric]
    ci = report["intervals"][name][metric]
    return f"{v:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def table(reports: dict[str, dict], summary: dict, train_s: float | None, loads: list[tuple[str, tuple]],
          threads: int, step_s: float, note: str | None) -> str:
    lines = ["# SNIPS intent detection: base vs LoRA (smollm2-135m-instruct)", "",
             "Train: 40 utterances per intent (280; seed 0) from `../shared/data/snips` train files. "
             "Evaluate: the 700 validation utterances (100 per intent). LoRA r=8 (alpha 16, no dropout) on all "
             "linear layers, lr 1e-4, 3 epochs, batch 8, cosine, warmup 0.1 (LLaMA-Factory's default recipe); "
             "the final weights are evaluated (no held-out split). 95% bootstrap intervals over the 700 examples "
             "(1,000 resamples); differences are paired.", "",
             "| model | evaluation | accuracy [95% CI] | macro-F1 [95% CI] | unparseable | time (700 ex.) |",
             "|---|---|---|---|---:|---:|"]
    for mode, rep in reports.items():
        for name in rep["names"]:
            m = rep["metrics"][name]
            lines.append(f"| {name} | {'choice scoring' if mode == 'choice' else 'greedy generation'} | "
                         f"{_ci(rep, name, 'accuracy')} | {_ci(rep, name, 'macro_f1')} | "
                         f"{m['unparseable'] if mode == 'generate' else '-'} | {rep['seconds'][name]:.1f} s |")
    lines += ["", "| evaluation | metric | fine-tuned - base | 95% CI (paired) | McNemar p |", "|---|---|---:|---|---:|"]
    for mode, rep in reports.items():
        row = rep["comparisons"][0]
        for metric in ("accuracy", "macro_f1"):
            d = row["metrics"][metric]
            lines.append(f"| {mode} | {metric} | {d['difference']:+.3f} | [{d['interval']['low']:+.3f}, "
                         f"{d['interval']['high']:+.3f}] | {row['mcnemar']['p_value']:.2g} |" if metric == "accuracy" else
                         f"| {mode} | {metric} | {d['difference']:+.3f} | [{d['interval']['low']:+.3f}, "
                         f"{d['interval']['high']:+.3f}] | |")
    lines += ["", f"Training: {summary['steps']} steps, {summary['train_tokens_seen']:,} tokens, "
              f"{step_s:.0f} s summed over the steps' own times in metrics.jsonl"
              + (f", {train_s:.0f} s wall in this invocation" if train_s else "") + ".",
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
              f"torch {torch.__version__} with {threads} thread(s).",
              "Load average (1/5/15 min) while measuring: " + "; ".join(f"{what} {l[0]:.1f}/{l[1]:.1f}/{l[2]:.1f}"
                                                                     for what, l in loads) + ".",
              "Other jobs shared the 2 cores during this run whenever the load average is above 2: "
              "timings are then inflated.", ""]
    if note:
        lines += [f"Note: {note}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/snips", help="data, run and results folder")
    parser.add_argument("--snips", default=None, help="the SNIPS folder (default: ../shared/data/snips)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per choice-scoring batch")
    parser.add_argument("--skip-generate", action="store_true", help="choice scoring only")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--note", default=None, help="a sentence for the results file (how the run went)")
    args = parser.parse_args()
    work = Path(args.work)
    try:
        train_file, val_file = write_intent_splits(find_snips(args.snips), work / "data")
    except DatasetNotFound as err:
        raise SystemExit(str(err)) from None
    loads = [("start", os.getloadavg())]
    t = time.time()
    summary = train_run(train_file, work / "lora")
    train_s = time.time() - t if time.time() - t > 60 else None
    loads.append(("after training", os.getloadavg()))
    if args.train_only:
        print(summary)
        return
    base = evaluate_both_ways("smollm2-135m-instruct", val_file, args.batch_size, args.skip_generate)
    loads.append(("after the base model", os.getloadavg()))
    tuned = evaluate_both_ways(str(work / "lora"), val_file, args.batch_size, args.skip_generate)
    loads.append(("after the fine-tuned run", os.getloadavg()))
    reports = {}
    for mode in base:
        rep = compare_results([base[mode], tuned[mode]], ["base", "fine-tuned"], list(INTENTS))
        write_compare(rep, work / f"compare_{mode}")
        reports[mode] = rep
    # the run's report: its own evaluation and the before/after comparison (choice scoring)
    run = work / "lora"
    write_results(tuned["choice"], run / "eval")
    if (run / "compare").exists():
        shutil.rmtree(run / "compare")
    write_compare(reports["choice"], run / "compare")
    html = build_report(run)
    docs = ROOT / "docs" / "example_report"
    if docs.exists():
        shutil.rmtree(docs)
    shutil.copytree(html.parent, docs)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_s = sum(r.get("step_s", 0.0) for r in records)
    text = table(reports, summary, train_s, loads, torch.get_num_threads(), step_s, args.note)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else ""
    RESULTS.write_text(text + ("\n" + NOTES + old.split(NOTES, 1)[1] if NOTES in old else ""), encoding="utf-8")
    print(text)
    print(f"written: {RESULTS}; report: {docs / 'report.html'}")


if __name__ == "__main__":
    main()
