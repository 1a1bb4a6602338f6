"""Should these data sets be fine-tuned? `fewtune baseline` on SNIPS-40 and the car commands.

    python benchmarks/prompting_baseline.py [--datasets snips40,car50] [--shots 0,1,4,8] [--seed 0]

For each data set (the files benchmarks/augment.py prepares: same training, test sets), the embedded
SmolLM2-135M-Instruct zero-shot and K-shot (shots from the training file, stratified by intent for
SNIPS, seeded) against the fine-tuned run augment.py trained on that training file with seed 0 and no
augmentation (`runs/augment/DATASET/none-seed0`; run `python benchmarks/augment.py --datasets DATASET
--arms none --seeds 0` first if it is missing). The base model gets the run's system prompt and chat
template, as `fewtune baseline` does. Writes benchmarks/results/prompting_baseline.md (with the CPU
kind and the commands), above the hand-written notes; each setting's eval output stays under
runs/baseline/DATASET.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import augment as aug  # benchmarks/augment.py: the data sets
from fewtune.config import EvalSection
from fewtune.eval.baseline import baseline, markdown
from _machine import cpu_kind, write_keeping_notes  # noqa: E402  (benchmarks/_machine.py)

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "results" / "prompting_baseline.md"
NOTES = "<!-- written by hand below this line; prompting_baseline.py keeps it when it rewrites the tables -->"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", default="snips40,car50")
    parser.add_argument("--shots", default="0,1,4,8")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"CPU: {cpu_kind()}; torch threads {torch.get_num_threads()}", flush=True)
    parts = ["# Prompting baseline: zero-shot and K-shot prompting against fine-tuning", "",
             f"Command: `python benchmarks/prompting_baseline.py {' '.join(sys.argv[1:])}`, "
             f"{time.strftime('%Y-%m-%d')}; {cpu_kind()}, torch {torch.__version__}.", ""]
    for dataset in args.datasets.split(","):
        files = aug.prepare(dataset)
        run = aug.WORK / dataset / "none-seed0"
        if not (run / "config.yaml").is_file():
            raise SystemExit(f"{run} is missing: python benchmarks/augment.py --datasets {dataset} --arms none --seeds 0")
        settings = EvalSection(**{**aug.eval_settings(dataset, files).model_dump(), "shots_seed": args.seed})
        start = time.time()
        result = baseline(files["train"], files["test"], run=str(run), settings=settings,
                          shots=[int(k) for k in args.shots.split(",")], output_dir=ROOT / "runs" / "baseline" / dataset)
        n = len([line for line in aug._lines(files["test"]) if line.strip()])
        text = markdown(result, files["test"].relative_to(ROOT), n).replace("# Prompting baseline", "## " + dataset, 1)
        parts += [text.strip(), "",
                  f"Same as `fewtune baseline {files['train'].relative_to(ROOT)} --test "
                  f"{files['test'].relative_to(ROOT)} --run {run.relative_to(ROOT)} --shots {args.shots}` "
                  f"({time.time() - start:.0f} s in all, load average {os.getloadavg()[0]:.1f}).", ""]
        print("\n".join(parts[-3:]), flush=True)
    write_keeping_notes(TABLE, "\n".join(parts), NOTES)
    print("\n".join(parts))


if __name__ == "__main__":
    main()
