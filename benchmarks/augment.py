"""What augmentation is worth on small data: no augmentation vs each method vs the best combination vs on-the-fly EDA.

    python benchmarks/augment.py [--datasets snips10,snips40,car50,eprstmt] [--arms none,eda,noise,...]
        [--seeds 0,1,2] [--per-example 1] [--fp32] [--table-only]

Data (read in place, never copied; see fewtune.datasets), the same test sets as small_data.py:
- snips10 / snips40: 10 / 40 SNIPS training utterances per intent (seeded sample), tested on the 700
  validation utterances by choice scoring; dev: 20 further training utterances per intent (140);
- car50: the first 50 of the demo's Chinese car commands, tested on the first 100 of its test file by
  exact match of the parsed JSON (generation); dev: the next 50 training commands;
- eprstmt: FewCLUE (160 train, 610 test_public), gemma3-270m (`make setup-gemma`); dev: dev_few_all.

Every run trains with the config `fewtune suggest` writes for the data set's original training file
plus the data set's recipe in benchmarks/configs/augment_<name>.yaml (so an arm changes only the data), on that file less a validation split made *before* augmenting
(suggest's val_ratio, stratified, seeded by the run's seed); the augmentations are made from the rest
only, with the validation, dev and test files given to `--exclude`, so no augmentation can leak.

Arms:
- none: no augmentation;
- METHOD[+METHOD...]: `fewtune augment --methods ... --per-example N` on the training part (LLM methods
  use the embedded SmolLM2-135M-Instruct as the paraphraser/translator);
- online-eda: `data.augment: {methods: [eda], prob: 0.5}`: EDA afresh each epoch, no new examples;
- repeat, repeatK: the control for the augmented arms' longer training: each training example written
  1 + N times (N = --per-example), or K times, so the run has the steps of an arm that kept every
  augmentation of one method (of K - 1 methods at N = 1), and only what the extra lines say differs
  (copies here, variants there);
- best: the arm whose mean dev score is highest among those run on the most seeds, over the seeds they all ran
  (never chosen on the test column). `Δ vs none` and `Δ vs repeat` compare the seeds both arms ran (named when not all).

Each (data set, arm, seed) appends a JSON line to benchmarks/results/augment.jsonl (a rerun skips what
is there), with the test and dev scores, steps, augmentations kept and rejected by reason, examples
dropped by max_length (suggest's, for the originals) and what `fewtune doctor` says of the run; the table goes to benchmarks/results/augment.md, above the hand-written notes. The CPU kind
is printed and recorded. While a file `runs/augment/PAUSE` exists the script waits before starting its next
run (to free the CPU for another measurement without losing a run half done). `--fp32` forces mixed_precision "no" (on AMX machines auto's bf16 is slower
for this model today: issue 16).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from fewtune.advice.doctor import diagnose
from fewtune.advice.suggest import suggest
from fewtune.augment.pipeline import AugmentSettings, augment_file
from fewtune.config import EvalSection, build_config, load_config
from fewtune.data.tools import split_file
from fewtune.datasets import fewclue
from fewtune.datasets.common import DatasetNotFound
from fewtune.datasets.snips import find_snips, write_intent_splits
from fewtune.demo.car_commands import SYSTEM_PROMPT as CAR_SYSTEM
from fewtune.eval.evaluate import evaluate
from fewtune.models import DEFAULT_MODEL
from fewtune.train.loop import train
from _machine import cpu_kind  # noqa: E402  (benchmarks/_machine.py)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "augment"
CONFIGS = ROOT / "benchmarks" / "configs"
RESULTS = ROOT / "benchmarks" / "results" / "augment.jsonl"
TABLE = ROOT / "benchmarks" / "results" / "augment.md"
PAUSE = WORK / "PAUSE"
NOTES = "<!-- written by hand below this line; augment.py keeps it when it rewrites the table -->"
DEMO_DATA = ROOT / "src" / "fewtune" / "demo" / "data"
MODELS = {"snips10": DEFAULT_MODEL, "snips40": DEFAULT_MODEL, "car50": DEFAULT_MODEL, "eprstmt": "gemma3-270m"}
RECIPES = {"snips10": "augment_snips.yaml", "snips40": "augment_snips.yaml", "car50": "augment_car50.yaml"}
LLM = DEFAULT_MODEL  # the paraphraser / translator of the LLM arms


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def prepare(dataset: str) -> dict[str, Path]:
    """The data set's train, test and dev files (written under runs/augment/DATASET/data)."""
    out = WORK / dataset / "data"
    try:
        if dataset.startswith("snips"):
            train_file, test = write_intent_splits(find_snips(), out, per_intent=int(dataset[5:]), dev_per_intent=20)
            return {"train": train_file, "test": test, "dev": out / "dev.jsonl"}
        if dataset == "car50":
            rows = _lines(DEMO_DATA / "car_commands_train.jsonl")
            return {"train": _write(out / "train.jsonl", rows[:50]), "dev": _write(out / "dev.jsonl", rows[50:100]),
                    "test": _write(out / "test.jsonl", _lines(DEMO_DATA / "car_commands_test.jsonl")[:100])}
        train_file, test = fewclue.write_splits(dataset, out)
        return {"train": train_file, "test": test, "dev": out / "dev.jsonl"}
    except DatasetNotFound as err:
        raise SystemExit(str(err)) from None


def is_classification(dataset: str) -> bool:
    return dataset != "car50"


def labels_of(path: Path) -> list[str]:
    return sorted({json.loads(line)["label"] for line in _lines(path)})


def is_repeat(arm: str) -> bool:
    return re.fullmatch(r"repeat\d*", arm) is not None


def copies(arm: str, per_example: int) -> int:
    """How many times a repeat arm writes each example: repeatK K times, repeat 1 + per_example times."""
    return int(arm[6:]) if arm[6:] else 1 + per_example


def recipe(dataset: str) -> dict:
    """The data set's changes on top of suggest's config (RECIPES; none for eprstmt: suggest's config as it is)."""
    if dataset not in RECIPES:
        return {}
    path = CONFIGS / RECIPES[dataset]
    load_config(path)  # an unknown key fails here, naming the nearest valid one
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def base_values(dataset: str, files: dict[str, Path], fp32: bool) -> dict:
    values = _merge(suggest(files["train"], model=MODELS[dataset], measure=False).config.model_dump(), recipe(dataset))
    if dataset == "car50" and values["data"]["system_prompt"] != CAR_SYSTEM:
        raise SystemExit("configs/augment_car50.yaml must train with the demo's system prompt")
    if fp32:
        values["train"]["mixed_precision"] = "no"
    # the threads stay as they are whatever else runs (train.adapt_threads would move to fewer, and another thread
    # count can round differently): a busy machine shows in the wall times only (the table flags those runs)
    values["train"]["adapt_threads"] = False
    return values


def eval_settings(dataset: str, files: dict[str, Path]) -> EvalSection:
    if is_classification(dataset):
        return EvalSection(task="classification", labels=labels_of(files["train"]), mode="choice", batch_size=16)
    return EvalSection(task="json", mode="generate", max_new_tokens=80, batch_size=25)


def score(dataset: str, settings: EvalSection, result) -> float:
    return result.metrics["accuracy" if is_classification(dataset) else "exact_match"]


def run_one(dataset: str, arm: str, seed: int, files: dict[str, Path], per_example: int, fp32: bool,
            code: str, command: str) -> dict:
    run_dir = WORK / dataset / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', arm)}-seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a run that did not reach RESULTS starts over
    start = time.time()
    values = base_values(dataset, files, fp32)
    parts = split_file(files["train"], run_dir / "data", val_ratio=values["data"]["val_ratio"], seed=seed)
    fit, val = run_dir / "data" / "train.jsonl", run_dir / "data" / "validation.jsonl"
    augment_s, counts = 0.0, {}
    train_file = fit
    if is_repeat(arm):
        train_file = _write(run_dir / "data" / "repeated.jsonl",
                            [line for line in _lines(fit) for _ in range(copies(arm, per_example))])
    elif arm not in ("none", "online-eda"):
        result = augment_file(fit, run_dir / "data" / "augmented.jsonl",
                              AugmentSettings(methods=arm.split("+"), per_example=per_example, seed=seed, model=LLM,
                                              exclude=[str(val), str(files["dev"]), str(files["test"])]))
        augment_s, counts = time.time() - start, {m: c.to_dict() for m, c in result.counts.items()}
        train_file = result.out
        # max_length is suggest's for the originals; an augmentation whose answer it would cut away entirely is
        # dropped (and counted) rather than failing the run. The originals fit, or suggest says drop itself.
        values["data"]["on_bad_example"] = "drop"
    values["data"].update(train=str(train_file), validation=str(val), val_ratio=0.0, seed=seed)
    if arm == "online-eda":
        values["data"]["augment"] = {"methods": ["eda"], "prob": 0.5}
    values["train"].update(seed=seed, output_dir=str(run_dir), num_threads=torch.get_num_threads())
    cfg = build_config(values, source=f"augment benchmark {dataset}/{arm}")
    t0 = time.time()
    summary = train(cfg, run_dir)
    train_s = time.time() - t0
    settings = eval_settings(dataset, files)
    test = evaluate(str(run_dir), files["test"], settings, output_dir=run_dir / "eval_test")
    dev = evaluate(str(run_dir), files["dev"], settings, output_dir=run_dir / "eval_dev")
    n_train = len(_lines(train_file))
    start_event = next(r for r in read_lines(run_dir / "metrics.jsonl") if r.get("event") == "start")
    # what `fewtune doctor RUN` says of the curves and of the test predictions
    doctor = [{"kind": f.kind, "message": f.message}
              for f in diagnose(run_dir, run_dir / "eval_test" / "predictions.jsonl")]
    return {"dataset": dataset, "arm": arm, "seed": seed, "model": MODELS[dataset], "per_example": per_example,
            "metric": "accuracy" if is_classification(dataset) else "exact_match",
            "test": score(dataset, settings, test), "dev": score(dataset, settings, dev),
            "n_test": len(test.predictions), "n_dev": len(dev.predictions), "n_train": n_train,
            "n_original": parts["train"], "dropped": start_event.get("dropped", 0), "steps": summary.steps,
            "stopped_early": summary.stopped_early,
            "augment": counts, "augment_s": round(augment_s, 1), "train_s": round(train_s, 1),
            "wall_s": round(time.time() - start, 1), "load": os.getloadavg()[0], "cpu": cpu_kind(cores=False),
            "precision": cfg.train.mixed_precision, "code": code, "command": command,
            "doctor": doctor}


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def best_arm(rows: list[dict], dataset: str) -> str | None:
    """The augmentation arm with the highest mean dev score; candidates are the arms run on the most seeds, compared
    on the seeds they all ran (ties: the first run); none and repeat are references."""
    arms: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["dataset"] == dataset and r["arm"] != "none" and not is_repeat(r["arm"]):
            arms.setdefault(r["arm"], {})[r["seed"]] = r["dev"]
    if not arms:
        return None
    most = max(len(d) for d in arms.values())
    arms = {a: d for a, d in arms.items() if len(d) == most}
    common = set.intersection(*(set(d) for d in arms.values()))
    return max(arms, key=lambda a: statistics.mean(v for k, v in arms[a].items() if not common or k in common))


# the command of the rows written before each row recorded its own
FIRST_COMMAND = ("python benchmarks/augment.py --datasets snips10,car50 --arms none,eda,noise,online-eda --seeds 0,1,2 "
                 "--per-example 1 --fp32")


def _paired(rs: list[dict], ref: list[dict]) -> tuple[list[dict], list[dict]]:
    """Both arms' runs on the seeds both ran: a seed changes the validation split and the start, and one bad
    seed moves a mean by more than most arms differ."""
    seeds = {r["seed"] for r in rs} & {r["seed"] for r in ref}
    return [r for r in rs if r["seed"] in seeds], [r for r in ref if r["seed"] in seeds]


def _delta(rs: list[dict], ref: list[dict] | None) -> str:
    if not ref or rs is ref:
        return ""
    a, b = _paired(rs, ref)
    if not a:
        return "no common seed"
    delta = f"{statistics.mean(r['test'] for r in a) - statistics.mean(r['test'] for r in b):+.3f}"
    if len(a) < max(len(rs), len(ref)):
        seeds = sorted(r["seed"] for r in a)
        delta += f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
    return delta


def matched_repeat(groups: dict[tuple, list[dict]], dataset: str, arm: str, per_example: int) -> list[dict] | None:
    """The runs of the repeat arm that has as many lines as ``arm`` would have kept every augmentation."""
    if arm == "none" or arm.startswith("online") or is_repeat(arm):
        return None
    want = 1 + len(arm.split("+")) * per_example
    return next((rs for (ds, a), rs in groups.items()
                 if ds == dataset and is_repeat(a) and copies(a, rs[0]["per_example"]) == want), None)


def table(rows: list[dict]) -> str:
    cpus = sorted({r["cpu"] for r in rows})
    commands = list(dict.fromkeys(r.get("command", FIRST_COMMAND) for r in rows))
    lines = ["# What augmentation is worth on small data", "",
             f"Machine: {', '.join(cpus)}; {os.cpu_count()} cores, torch {torch.__version__}, no GPU. "
             "Mean ± standard deviation over seeds (a seed changes the validation split, the augmentations, the data "
             "order and the adapter initialisation). `dev` is the dev-set score that `best` is chosen by; the test "
             "column is never looked at for choosing. `repeat` and `repeatK` are the controls for the longer "
             "training of the augmented arms: the same training examples written 1 + N (or K) times, so "
             "`Δ vs repeat` (against the repeat arm with the steps an arm would have had if it kept every "
             "augmentation) is what the variants add beyond more steps. Raw results: `augment.jsonl` beside this "
             "file; the script's docstring says how each arm is made.", "", "Commands, in the order they ran:", "",
             *[f"    {c}" for c in commands], "",
             "| data set | arm | augmentations | seeds | test | Δ vs none | Δ vs repeat | dev | train examples | steps "
             "| kept / generated | wall time / run |",
             "|---|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["arm"]), []).append(r)
    order = lambda kv: (kv[0][0], 0 if kv[0][1] == "none" else 1 if is_repeat(kv[0][1]) else 2, kv[0][1])  # noqa: E731
    for (ds, arm), rs in sorted(groups.items(), key=order):
        kept = sum(c["kept"] for r in rs for c in r["augment"].values())
        generated = sum(c["generated"] for r in rs for c in r["augment"].values())
        shown = arm
        if arm == best_arm(rows, ds):
            none = groups.get((ds, "none"))
            a, b = _paired(rs, none) if none else ([], [])
            below = bool(a) and statistics.mean(r["dev"] for r in a) <= statistics.mean(r["dev"] for r in b)
            shown = f"**best (dev)**: {arm}" + (" (below none on dev)" if below else "")
        made = ("-" if arm == "none" else "each epoch, prob 0.5" if arm.startswith("online")
                else f"each example {copies(arm, rs[0]['per_example'])} times" if is_repeat(arm)
                else f"{rs[0]['per_example']} per example and method")
        lines.append(f"| {ds} ({rs[0]['metric']}, n={rs[0]['n_test']}) | {shown} | {made} "
                     f"| {', '.join(str(r['seed']) for r in rs)} "
                     f"| {_ms([r['test'] for r in rs])} | {_delta(rs, groups.get((ds, 'none')))} "
                     f"| {_delta(rs, matched_repeat(groups, ds, arm, rs[0]['per_example']))} "
                     f"| {_ms([r['dev'] for r in rs])} "
                     f"| {statistics.mean(r['n_train'] for r in rs):.0f} | {statistics.mean(r['steps'] for r in rs):.0f} "
                     f"| {f'{kept} / {generated}' if generated else '-'} "
                     f"| {statistics.mean(r['wall_s'] for r in rs):.0f} s |")
    high = [r for r in rows if (r.get("load") or 0) > (os.cpu_count() or 2)]
    if high:
        lines += ["", f"{len(high)} of {len(rows)} runs finished with the load average above the core count "
                  "(other jobs shared the CPU): their wall times are inflated."]
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict]) -> str:
    text = table(rows)
    old = TABLE.read_text(encoding="utf-8") if TABLE.is_file() else ""
    text += "\n" + NOTES + old.split(NOTES, 1)[1] if NOTES in old else "\n" + NOTES + "\n"
    TABLE.write_text(text, encoding="utf-8")
    return text


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in _lines(path) if line.strip()] if path.is_file() else []


def code_version() -> str:
    import subprocess

    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks/*.py") else "")


def wait_while_paused() -> None:
    if PAUSE.exists():
        print(f"paused: waiting until {PAUSE} is removed", flush=True)
    while PAUSE.exists():
        time.sleep(5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", default="snips10,car50,snips40,eprstmt")
    parser.add_argument("--arms", default="none,repeat,eda,noise,backtranslate,paraphrase,eda+noise,repeat3,online-eda")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--per-example", type=int, default=1, help="augmentations asked per example and method")
    parser.add_argument("--fp32", action="store_true", help="train in fp32 (mixed_precision: no), and run the "
                        "augmenting LLM and the evaluation in fp32 too (FEWTUNE_MIXED_PRECISION=no)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if args.fp32:  # inference follows auto too (paraphrase/backtranslate models): the table's earlier rows ran fp32
        os.environ["FEWTUNE_MIXED_PRECISION"] = "no"
    print(f"CPU: {cpu_kind()}; torch threads {torch.get_num_threads()}", flush=True)
    code = code_version()
    command = " ".join(["python benchmarks/augment.py", *sys.argv[1:]])
    done = read_lines(RESULTS)
    if not args.table_only:
        for dataset in args.datasets.split(","):
            files = prepare(dataset)
            # seeds outermost, so partial results cover every arm
            for seed in [int(s) for s in args.seeds.split(",")]:
                for arm in args.arms.split(","):
                    if any((r["dataset"], r["arm"], r["seed"]) == (dataset, arm, seed) for r in done):
                        continue
                    wait_while_paused()
                    print(f"== {dataset} / {arm} / seed {seed}", flush=True)
                    row = run_one(dataset, arm, seed, files, args.per_example, args.fp32, code, command)
                    done.append(row)
                    print(json.dumps(row, ensure_ascii=False), flush=True)
                    with RESULTS.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    write_table(read_lines(RESULTS))
    print(write_table(read_lines(RESULTS)))


if __name__ == "__main__":
    main()
