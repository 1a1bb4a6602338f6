"""Training next to another busy process: alone vs beside a fixed competing load, threads fixed vs adapted.

    python benchmarks/busy_machine.py [--steps 8] [--warmup 3] [--precision no]

The workload is train_speed.py's (benchmarks/configs/train_speed.yaml: SNIPS intent prompts,
SmolLM2-135M, LoRA r=8, batch 8). Each arm trains in its own child process for ``--warmup`` +
``--steps`` optimizer steps; only the timed steps count. The competing load is one process running
a pure-Python busy loop (one core's worth, for as long as the arm runs), started before the arm.

- fixed:   train.adapt_threads=false: as many threads as cores, whatever else runs;
- adapted: train.adapt_threads=true (the default): fewtune.train.runtime.ThreadGovernor moves to the
           cores the other processes leave, measured every 5 s from /proc/stat.

With one of 2 cores taken, a run that scaled with its CPU share would take at most 2x as long as
alone; the table gives each arm's slowdown against its own time alone. Writes
benchmarks/results/busy_machine.md (text below the NOTES marker is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from _machine import cpu_kind  # noqa: E402  (benchmarks/_machine.py)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "benchmarks" / "configs" / "train_speed.yaml"
OUT = ROOT / "benchmarks" / "results" / "busy_machine.md"
NOTES = "<!-- written by hand below this line; busy_machine.py keeps it when it rewrites the results -->"
BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def worker(spec: dict) -> dict:
    import yaml

    from fewtune.config import build_config
    from fewtune.datasets.snips import SYSTEM_PROMPT, find_snips, snips_records
    from fewtune.train.loop import Trainer

    tmp = Path(spec["tmp"])
    rows = [{"text": r["text"], "label": r["label"]} for r in snips_records(find_snips(), "intent", "train")]
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    base = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    base["data"].update(train=str(data), system_prompt=SYSTEM_PROMPT)
    total = spec["warmup"] + spec["steps"]
    overrides = [f"train.max_steps={total}", f"train.output_dir={tmp / 'run'}", "eval.every=null",
                 "train.save_every=null", "data.val_ratio=0", "data.validation=null", "train.batch_size=8",
                 "eval.early_stopping.enabled=false", f"train.mixed_precision={spec['precision']}",
                 f"train.adapt_threads={str(spec['adapt']).lower()}"]
    trainer = Trainer(build_config(base, overrides, source=str(RECIPE)))
    marks: list[float] = []

    class Mark:
        def on_step_begin(self, t):
            pass

        def on_step_end(self, t):
            marks.append(time.perf_counter())

    trainer.callbacks.append(Mark())
    trainer.fit()
    records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    threads = [r.get("threads") for r in records if "train_loss" in r]
    timed = marks[spec["warmup"] - 1:]
    return {"s_per_step": (timed[-1] - timed[0]) / (len(timed) - 1), "threads": threads[spec["warmup"]:],
            "precision": trainer.accelerator.mixed_precision}


def run_arm(adapt: bool, busy: bool, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"tmp": tmp, "adapt": adapt, "steps": args.steps, "warmup": args.warmup, "precision": args.precision}
        hog = None
        if busy:
            hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=3600)])
            time.sleep(1.0)
        load_before = os.getloadavg()[0]
        try:
            out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                 text=True, check=False)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        if out.returncode != 0:
            sys.exit(f"arm failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        return {**result, "adapt": adapt, "busy": busy, "load_before": load_before}


def write_table(rows: list[dict], args, machine: str) -> str:
    alone = {r["adapt"]: r["s_per_step"] for r in rows if not r["busy"]}
    lines = ["# Training next to a busy process", "",
             f"Command: `python benchmarks/busy_machine.py --steps {args.steps} --warmup {args.warmup} "
             f"--precision {args.precision}`", "",
             f"Machine: {machine}. Workload: SNIPS prompts, SmolLM2-135M, LoRA r=8, batch 8, precision "
             f"{rows[0]['precision']}; {args.warmup} warm-up steps, then {args.steps} timed steps per arm, each arm "
             "in its own process. Competing load: one process in a pure-Python busy loop (one core).", "",
             "| threads | competing load | s/step | slowdown vs alone | threads over the timed steps |",
             "|---|---|---:|---:|---|"]
    for r in rows:
        slow = r["s_per_step"] / alone[r["adapt"]] if r["adapt"] in alone else float("nan")
        used = sorted(set(t for t in r["threads"] if t is not None))
        lines.append(f"| {'adapted' if r['adapt'] else 'fixed'} | {'one busy process' if r['busy'] else 'none'} "
                     f"| {r['s_per_step']:.2f} | {slow:.2f}x | {', '.join(map(str, used)) or 'as set'} |")
    lines += ["", "With one core of two taken, a run that slowed in proportion to its lost CPU share would take 2.00x "
              "as long as alone (a 1-thread run loses less: it kept one core to itself)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="no", help="train.mixed_precision of every arm (default fp32)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    machine = cpu_kind()
    print(f"CPU: {machine}", flush=True)
    rows = []
    for adapt in (False, True):
        for busy in (False, True):
            print(f"== threads {'adapted' if adapt else 'fixed'}, {'beside a busy process' if busy else 'alone'}",
                  flush=True)
            rows.append(run_arm(adapt, busy, args))
            print(json.dumps(rows[-1]), flush=True)
    table = write_table(rows, args, machine)
    notes = ""
    if OUT.exists() and NOTES in OUT.read_text(encoding="utf-8"):
        notes = OUT.read_text(encoding="utf-8").split(NOTES, 1)[1]
    OUT.write_text(table + "\n" + NOTES + notes, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
