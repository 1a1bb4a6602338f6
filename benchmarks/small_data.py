"""Small-data results: zero-shot vs the usual LoRA recipe vs `fewtune suggest` vs the best found.

    python benchmarks/small_data.py [--datasets snips,eprstmt,tnews]
        [--setups zero,usual,suggest,best] [--seeds 0,1,2] [--test-limit N | --test-per-class N]
        [--dev | --dev-only] [--threads N] [--table-only] [--tune-budget 30m] [--paired SETUP_A,SETUP_B]

Data (read in place from the shared data folder, never copied; see fewtune.datasets): SNIPS with
40 training utterances per intent (evaluated on the 700 validation utterances), FewCLUE eprstmt
(train 160, test_public 610) and FewCLUE tnews (train 1,185, test_public 2,010); snips10 (SNIPS at 10
per intent, same test) and car50 (the demo's Chinese car commands to JSON: 50 for training, the first 100
of its test file, exact match in the accuracy column and field F1 in the F1 column). English runs use
smollm2-135m-instruct, Chinese runs gemma3-270m (`make setup-gemma`), which tokenises Chinese far better.

Setups (recipes in benchmarks/configs/):
- zero: the base model, choice scoring (deterministic: one run);
- usual: configs/small_data_usual.yaml, LoRA r=8 (alpha 16, no dropout) on all linear layers,
  lr 1e-4, 3 epochs, batch 8, cosine, warmup 0.1, loss on completions, no held-out split,
  evaluated by greedy generation;
- suggest: the config `fewtune suggest TRAIN --model M` writes (timing training passes on this machine
  to weigh the batch size, as it does for a user; the row records the batch, epochs and lr it chose),
  evaluated by choice scoring as it advises; rows named "suggest --no-measure" ran the config written
  without timing (the 0.2% batch rule), as every suggest row did until 2026-12-06; rows named "suggest (LoRA lr
  2e-4 at batch 8)" ran before 2026-12-07, when suggest's LoRA reference for models under 1B rose to 5e-4;
- best: the unmeasured suggest config (--no-measure) plus the changes in configs/small_data_best_<dataset>.yaml (BEST),
  evaluated by choice scoring;
- suggest+KEY=VALUE[+KEY=VALUE...]: a candidate for BEST, the unmeasured suggest config with dotted changes,
  e.g. suggest+regularise.label_smoothing=0.1;
- tune: `fewtune tune TRAIN --model M --budget B --kfold 3 --seed S` (3-fold cross-validation over the
  training file, never the test file), then its final model (best settings, all the training data) scored
  by choice scoring; the row's wall time is the whole tune (search + final training + test scoring) and
  the budget it had (--tune-budget, default 30m);
- tune+pseudo (FewCLUE sets, which come with unlabeled data): `fewtune pseudo-label` on the tune row's final
  model, with the settings given once here (PSEUDO) and chosen on no test score: the first 2,000 sentences of
  FewCLUE's unlabeled.json (the test and dev sentences left out), kept at label probability >= 0.9, in the
  labeled set's class proportions, at most as many per class as the largest labeled class has; one round,
  retrained from the base model with the tuned config unchanged. Needs the tune row of the same seed; the wall
  time is the tune's plus the labeling and retraining.
- tune+pseudo+folds (FewCLUE sets): tune+ensemble with the tune+pseudo row's self-trained model in the final
  model's place (it plus the tune's 3 fold models, label probabilities averaged with equal weights); nothing
  trained; fixed before any of its test scores (2026-12-07).
- tune+pseudo2 (FewCLUE sets): tune+pseudo's second round, as `pseudo-label --rounds 2` runs it: the tune+pseudo
  row's retrained model labels the same pool afresh, the same PSEUDO settings keep, the tune's config retrains
  from the base model on the labeled + newly kept examples; the wall time adds both rounds to the tune's.
- tune+pseudo-all (FewCLUE sets): tune+pseudo keeping every confident example (class proportions, no per-class
  cap; PSEUDO_ALL) and retraining for the epochs suggest gives the grown set at the tuned batch size
  (`--epochs auto`) instead of the tune's own; fixed before any of its runs.
- tune+ensemble: the tune row's cross-validation ensemble, `fewtune eval TUNE --ensemble` (its final model and
  the winning trial's 3 fold models; choice-scoring probabilities averaged, generated outputs voted), on the
  same test set; nothing is trained. Needs the tune row of the same seed; the wall time is the tune's plus
  scoring the 4 models. The rule was fixed before any of its test scores were seen.
- tune+ensemble+pseudo (FewCLUE sets): tune+pseudo with the tune's CV ensemble as the teacher
  (`fewtune pseudo-label TUNE --ensemble`: the unlabeled pool labeled by the final model and the 3 fold models,
  label probabilities averaged), the same PSEUDO settings, the retrained model scored alone (one model to
  deploy). Fixed before any of its runs.
Rows under other names (e.g. "suggest (loss-selected)") were run by earlier versions of a setup;
benchmarks/results/small_data.md says which.

BEST is chosen on a dev set, never on the test set: SNIPS's dev.jsonl (140 further train
utterances, none in the 280) or FewCLUE's dev_few_all.json (disjoint from train and test).
`--dev` scores each new run on it as well, `--dev-only` scores finished runs; those scores go to
benchmarks/results/small_data_dev.jsonl and into the table's dev column.

`--paired A,B` trains nothing: for each data set and seed it compares two finished setups on the same test
examples from their stored predictions (accuracy B - A with a paired bootstrap 95% interval, McNemar's exact
test) and writes the table to benchmarks/results/small_data_paired.md (one section per pair, the others kept).

Every (dataset, setup, seed) appends one JSON line to benchmarks/results/small_data.jsonl (a
rerun skips what is there; the file is committed, so the table survives a fresh clone), and the
table goes to benchmarks/results/small_data.md. Text under the NOTES marker in that file is
written by hand and kept when the table is rewritten. Lines marked "restored" were recovered
from an earlier table; a "summary" line carries a group's numbers whose per-run values were lost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import yaml

from fewtune.advice.suggest import suggest
from fewtune.config import EvalSection, build_config, dotted_keys, load_config
from fewtune.datasets import fewclue
from fewtune.datasets.common import DatasetNotFound
from fewtune.datasets.snips import find_snips, write_intent_splits
from fewtune.eval.evaluate import evaluate
from fewtune.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"
WORK = ROOT / "runs" / "small_data"
RESULTS = ROOT / "benchmarks" / "results" / "small_data.jsonl"
DEV_RESULTS = ROOT / "benchmarks" / "results" / "small_data_dev.jsonl"  # dev-set scores: what BEST is chosen by
TABLE = ROOT / "benchmarks" / "results" / "small_data.md"
NOTES = "<!-- written by hand below this line; small_data.py keeps it when it rewrites the table -->"
MODELS = {"snips": "smollm2-135m-instruct", "eprstmt": "gemma3-270m", "tnews": "gemma3-270m",
          "snips10": "smollm2-135m-instruct", "car50": "smollm2-135m-instruct"}
# car50 is the demo's JSON extraction task: scored by exact match (the accuracy column) and field F1 (the F1 column)
JSON_TASKS = ("car50",)
USUAL = CONFIGS / "small_data_usual.yaml"  # LLaMA-Factory's defaults for LoRA SFT, the recipe most users start from


def best_changes(dataset: str) -> dict[str, object]:
    """The "best" setup's changes on top of suggest's config (dotted keys), from configs/small_data_best_<dataset>.yaml
    (checked against the config schema; how each was chosen is written there)."""
    path = CONFIGS / f"small_data_best_{dataset}.yaml"
    if not path.is_file():
        return {}
    load_config(path)  # an unknown key fails here, naming the nearest valid one
    return dotted_keys(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


BEST: dict[str, dict] = {dataset: best_changes(dataset) for dataset in MODELS}


def best_candidate(dataset: str) -> str | None:
    """The candidate setup whose config is suggest + BEST[dataset]: its rows are the data set's best."""
    changes = BEST.get(dataset) or {}
    return "suggest+" + "+".join(f"{key}={value}" for key, value in changes.items()) if changes else None


def _car50(out: Path) -> tuple[Path, Path]:
    """The first 50 demo car commands (train), the next 50 (dev) and the first 100 test commands, as conversations
    with the demo's system prompt (what zero-shot needs to know the JSON format; every setup then sees it)."""
    from fewtune.demo.car_commands import SYSTEM_PROMPT as CAR_SYSTEM

    data = Path(__file__).resolve().parents[1] / "src" / "fewtune" / "demo" / "data"

    def write(path: Path, lines: list[str]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [json.loads(line) for line in lines]
        path.write_text("".join(json.dumps({"messages": [{"role": "system", "content": CAR_SYSTEM},
                                                         {"role": "user", "content": r["prompt"]},
                                                         {"role": "assistant", "content": r["completion"]}]},
                                           ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path

    train = (data / "car_commands_train.jsonl").read_text(encoding="utf-8").splitlines()
    test = (data / "car_commands_test.jsonl").read_text(encoding="utf-8").splitlines()
    write(out / "dev.jsonl", train[50:100])
    return write(out / "train.jsonl", train[:50]), write(out / "test.jsonl", test[:100])


def prepare(dataset: str) -> tuple[Path, Path]:
    """Write the dataset as fewtune conversations (system prompt naming the labels): (train, test)."""
    out = WORK / dataset / "data"
    try:
        if dataset == "car50":
            return _car50(out)
        if dataset == "snips10":
            return write_intent_splits(find_snips(), out, per_intent=10, dev_per_intent=20)
        if dataset == "snips":
            return write_intent_splits(find_snips(), out, dev_per_intent=20)  # dev.jsonl: for choosing BEST
        return fewclue.write_splits(dataset, out)  # with FewCLUE's dev set as dev.jsonl, for choosing BEST
    except DatasetNotFound as err:
        raise SystemExit(str(err)) from None


def per_class_subset(test_file: Path, per_class: int) -> Path:
    """The first per_class test examples of each label, in file order, as test-per-class-N.jsonl."""
    seen: dict[str, int] = {}
    keep = []
    for line in test_file.read_text(encoding="utf-8").splitlines():
        label = json.loads(line)["label"]
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            keep.append(line)
    out = test_file.with_name(f"test-per-class-{per_class}.jsonl")
    out.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    return out


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def split_setup(setup: str) -> tuple[str, list[str]]:
    """'suggest+regularise.label_smoothing=0.1' -> ('suggest', ['regularise.label_smoothing=0.1']): a named setup
    with dotted changes on top (the candidates tried for BEST); 'tune+pseudo' -> ('tune', ['pseudo'])."""
    base, *extra = setup.split("+")
    if (base not in ("zero", "usual", "suggest", "best", "tune") or (extra and base == "zero")
            or (base == "tune" and extra not in ([], ["pseudo"], ["pseudo2"], ["pseudo-all"], ["ensemble"],
                                                 ["ensemble", "pseudo"], ["pseudo", "folds"]))):
        raise SystemExit(f"unknown setup {setup!r}: zero, usual, suggest, best, tune, tune+pseudo, tune+pseudo2, "
                         "tune+pseudo-all, tune+pseudo+folds, "
                         "tune+ensemble, tune+ensemble+pseudo, or suggest+KEY=VALUE+...")
    return base, extra


# tune+pseudo's self-training settings, fixed before any of its runs (none chosen on a test score): a pool of the
# first 2,000 unlabeled sentences, confidence >= 0.9 (pseudo-label's default), the labeled class proportions, and
# per class at most as many as the largest labeled class has (run_pseudo adds it: about 2x the labeled set at most)
PSEUDO = {"limit": 2000, "threshold": 0.9, "rounds": 1}
# tune+pseudo-all (fixed before any of its runs, 2026-12-07): the same pool and threshold, every confident example
# kept (the class proportions still hold, no per-class cap), retrained for the epochs suggest gives the grown set at
# the tuned batch size (`--epochs auto`: 2 for 1,000+ examples, not the 10 the tune chose for 160)
PSEUDO_ALL = {"limit": 2000, "threshold": 0.9, "rounds": 1, "epochs": "auto"}


def result_row(dataset: str, setup: str, seed: int) -> dict | None:
    """The recorded row of a finished (dataset, setup, seed), or None."""
    return next((r for r in read_lines(RESULTS) if (r["dataset"], r["setup"], r.get("seed")) == (dataset, setup, seed)),
                None)


def run_pseudo(dataset: str, seed: int, train_file: Path, run_dir: Path, ensemble: bool = False,
               keep_all: bool = False, second_round: bool = False) -> tuple[str, dict]:
    """Self-train the tune row's final model on FewCLUE's unlabeled data: (the new run, extra fields for the row,
    the tune's own seconds among them). ``ensemble``: the tune's CV ensemble labels the pool; ``keep_all``:
    PSEUDO_ALL's settings; ``second_round``: the tune+pseudo row's retrained model labels the pool again (PSEUDO's
    settings, the tune's config retrains from the base model): `pseudo-label --rounds 2`'s second round."""
    from fewtune.workflows.pseudo import PseudoSettings, pseudo_label

    if dataset not in fewclue.TASKS:
        raise SystemExit(f"tune+pseudo needs unlabeled data: only {', '.join(fewclue.TASKS)} have it here")
    tune_row = result_row(dataset, "tune", seed)
    final = run_dir_for(dataset, "tune", seed) / "final"
    if tune_row is None or not (final / "summary.json").is_file():
        raise SystemExit(f"tune+pseudo on {dataset} seed {seed} starts from the tune row's final model: run "
                         f"--setups tune --seeds {seed} first")
    task_dir = fewclue.find_fewclue(dataset)
    per_class = None if keep_all else max(Counter(json.loads(line)["label"]
                                                  for line in train_file.read_text(encoding="utf-8").splitlines()).values())
    chosen = PSEUDO_ALL if keep_all else PSEUDO
    settings = PseudoSettings(**chosen, max_per_class=per_class, rename={"text": "sentence"},
                              exclude=[task_dir / fewclue.SPLITS["test"], task_dir / fewclue.SPLITS["dev"]])
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a run that did not reach RESULTS starts over
    teachers: list[str] = []
    labeler, config, before_s = final, None, 0.0
    if second_round:
        first_row = result_row(dataset, "tune+pseudo", seed)
        first = run_dir_for(dataset, "tune+pseudo", seed) / "summary.json"
        if first_row is None or not first.is_file():
            raise SystemExit(f"tune+pseudo2 on {dataset} seed {seed} continues the tune+pseudo row: run --setups "
                             f"tune+pseudo --seeds {seed} first")
        labeler = Path(json.loads(first.read_text(encoding="utf-8"))["rounds"][-1]["training"]["run"])
        config, before_s = final / "config.yaml", first_row["pseudo_s"]  # the labeled data and training: the tune's
    if ensemble:
        from fewtune.eval.ensemble import tune_members

        teachers = tune_members(final.parent)[1:]
    result = pseudo_label(labeler, task_dir / fewclue.SPLITS["unlabeled"], settings,
                          scoring=EvalSection(task="classification", labels=labels_of(train_file), batch_size=16),
                          out_dir=run_dir, config=config, progress=False, teachers=teachers)
    last = result.rounds[-1]
    if not last.get("training"):
        raise SystemExit(f"tune+pseudo on {dataset} seed {seed}: nothing was confident enough to keep ({last['pool']} "
                         "in the pool); no retraining")
    extra = {"tune_accuracy": round(tune_row["accuracy"], 4), "tune_s": tune_row["train_s"] + before_s,
             **({"first_round_s": before_s} if second_round else {}), "budget": tune_row["budget"],
             "trials": tune_row["trials"], "pseudo_pool": last["pool"], "pseudo_kept": last["kept"],
             "pseudo_per_class": {label: c["kept"] for label, c in last["classes"].items()},
             "pseudo_settings": {**chosen, "max_per_class": per_class},
             **({"pseudo_epochs": last["epochs"]["value"]} if last.get("epochs") else {}),
             **({"teachers": len(teachers) + 1} if teachers else {})}
    return last["training"]["run"], extra


ENSEMBLES = ("tune+ensemble", "tune+pseudo+folds")


def ensemble_members(dataset: str, setup: str, seed: int) -> list[str]:
    """An ensemble setup's models: the tune's final model (tune+ensemble) or the tune+pseudo row's self-trained model
    (tune+pseudo+folds), then the tune's winning fold models."""
    from fewtune.eval.ensemble import tune_members

    members = tune_members(run_dir_for(dataset, "tune", seed))
    if setup == "tune+pseudo+folds":
        first = run_dir_for(dataset, "tune+pseudo", seed) / "summary.json"
        if not first.is_file():
            raise SystemExit(f"{setup} on {dataset} seed {seed} needs the tune+pseudo row: run --setups tune+pseudo "
                             f"--seeds {seed} first")
        members[0] = json.loads(first.read_text(encoding="utf-8"))["rounds"][-1]["training"]["run"]
    return members


def tune_row_for(dataset: str, seed: int, setup: str) -> dict:
    """The tune row a tune+... setup builds on (SystemExit when it has not run)."""
    row = result_row(dataset, "tune", seed)
    if row is None or not (run_dir_for(dataset, "tune", seed) / "final" / "summary.json").is_file():
        raise SystemExit(f"{setup} on {dataset} seed {seed} starts from the tune row's models: run --setups tune "
                         f"--seeds {seed} first")
    return row


def run_dir_for(dataset: str, setup: str, seed: int, run_as: str | None = None) -> Path:
    # rows renamed after the fact (run_as) keep the folder they ran in
    name = (run_as or setup).split(" ")[0]
    return WORK / dataset / (re.sub(r"[^A-Za-z0-9._-]+", "_", name) + f"-seed{seed}")


def config_for(dataset: str, setup: str, train_file: Path, seed: int, run_dir: Path):
    model = MODELS[dataset]
    setup, extra = split_setup(setup)
    if setup == "usual":
        recipe = yaml.safe_load(USUAL.read_text(encoding="utf-8"))
        values = _merge(recipe, {"model": {"name": model}, "data": {"train": str(train_file)}})
    else:
        # plain `suggest` is what a user gets: training passes timed on this machine weigh the batch size (and the
        # epochs follow it); `best` and the candidates build on the unmeasured config (the 0.2% batch rule), as
        # they did when they ran
        values = suggest(train_file, model=model, measure=setup == "suggest" and not extra,
                         progress=False).config.model_dump()
    # paths go in as values, not as dotted overrides (which parse as YAML)
    values = _merge(values, {"data": {"seed": seed},
                             "train": {"seed": seed, "output_dir": str(run_dir), "num_threads": torch.get_num_threads()}})
    changes = [f"{key}={value}" for key, value in BEST[dataset].items()] if setup == "best" else []
    changes += extra
    return build_config(values, changes, source=f"small_data {dataset}/{setup}")


def run_one(dataset: str, setup: str, seed: int, train_file: Path, test_file: Path, limit: int | None,
            code: str, tune_budget: str = "30m") -> dict:
    run_dir = run_dir_for(dataset, setup, seed)
    start = time.time()
    train_s = 0.0
    extra: dict = {}
    if setup in ENSEMBLES:
        tune_row = tune_row_for(dataset, seed, setup)
        target, system = ensemble_members(dataset, setup, seed), None
        train_s = tune_row["train_s"]
        if setup == "tune+pseudo+folds":  # the self-training it reuses counts too
            train_s += result_row(dataset, "tune+pseudo", seed)["pseudo_s"]
        extra = {"tune_accuracy": round(tune_row["accuracy"], 4), "tune_s": train_s,
                 "budget": tune_row["budget"], "trials": tune_row["trials"], "best_params": tune_row.get("best_params")}
        if run_dir.exists():
            shutil.rmtree(run_dir)
    elif setup in ("tune+pseudo", "tune+pseudo2", "tune+pseudo-all", "tune+ensemble+pseudo"):
        target, extra = run_pseudo(dataset, seed, train_file, run_dir, ensemble=setup == "tune+ensemble+pseudo",
                                   keep_all=setup == "tune+pseudo-all", second_round=setup == "tune+pseudo2")
        system = None
        extra["pseudo_s"] = round(time.time() - start, 1)
        train_s = extra["tune_s"] + extra["pseudo_s"]  # the whole cost: the tune it starts from, then labeling + retraining
    elif setup == "tune":
        from fewtune.workflows.tune import tune

        # resumable: an interrupted tune continues from its journal in run_dir
        metric = "exact_match" if dataset in JSON_TASKS else "accuracy"
        result = tune(train_file, MODELS[dataset], budget=tune_budget, kfold=3, seed=seed, out=run_dir, metric=metric,
                      progress=False)
        train_s = time.time() - start
        target, system = str(result.final_dir), None
        extra = {"budget": tune_budget, "trials": len(result.trials), "best_params": result.best.params,
                 "cv_accuracy": round(result.best.mean, 4),
                 "suggest_cv_accuracy": round(result.baseline.mean, 4) if result.baseline else None}
    elif split_setup(setup)[0] == "zero":
        target = MODELS[dataset]
        system = json.loads(test_file.read_text(encoding="utf-8").splitlines()[0])["messages"][0]["content"]
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a run that did not reach RESULTS starts over
        cfg = config_for(dataset, setup, train_file, seed, run_dir)
        extra = {"batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs, "lr": cfg.train.lr}
        train(cfg, run_dir)
        train_s = time.time() - start
        target, system = str(run_dir), None
    if dataset in JSON_TASKS:
        mode = "generate"
        settings = EvalSection(task="json", limit=limit, batch_size=16, system_prompt=system)
    else:
        mode = "generate" if split_setup(setup)[0] == "usual" else "choice"
        settings = EvalSection(task="classification", labels=labels_of(train_file), mode=mode, limit=limit,
                               batch_size=16, system_prompt=system)
    if setup in ENSEMBLES:
        from fewtune.eval.ensemble import evaluate_ensemble

        result = evaluate_ensemble(target, test_file, settings, output_dir=run_dir / "eval_test", progress=False)
        extra["members"] = [{"target": str(Path(r["target"]).relative_to(WORK)), "score": r[k]}
                            for r in result.metrics["members"] for k in r if k not in ("target", "seconds")]
    else:
        result = evaluate(target, test_file, settings, output_dir=run_dir / "eval_test")
    m = result.metrics
    # tune+pseudo's wall time counts the tune it started from (its own run is labeling, retraining and scoring)
    wall_s = round(time.time() - start + (extra["tune_s"] if setup.startswith("tune+") else 0.0), 1)
    scores = ({"accuracy": m["exact_match"], "macro_f1": m["field_f1"], "metric": "exact_match / field_f1"}
              if dataset in JSON_TASKS else {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
    return {"dataset": dataset, "setup": setup, "seed": seed, "model": MODELS[dataset], "mode": mode,
            **scores, "n_test": len(result.predictions),
            "train_s": round(train_s, 1), "eval_s": round(result.settings["seconds"], 1),
            "wall_s": wall_s, "load": os.getloadavg()[0], "code": code, **extra}


def labels_of(train_file: Path) -> list[str]:
    return sorted({json.loads(line)["label"] for line in train_file.read_text(encoding="utf-8").splitlines()})


def score_dev(dataset: str, setup: str, seed: int, train_file: Path, code: str, run_as: str | None = None) -> dict:
    """Accuracy of a finished run on the data set's dev file (choice scoring): the number BEST is chosen by."""
    dev_file = WORK / dataset / "data" / "dev.jsonl"
    if split_setup(setup)[0] == "zero":
        target = MODELS[dataset]
        system = json.loads(dev_file.read_text(encoding="utf-8").splitlines()[0])["messages"][0]["content"]
        out = run_dir_for(dataset, setup, seed) / "eval_dev"
    elif setup in ENSEMBLES:
        target, system, out = None, None, run_dir_for(dataset, setup, seed) / "eval_dev"
    else:
        run_dir = model_dir = run_dir_for(dataset, setup, seed, run_as)
        if (run_dir / "summary.json").is_file() and not (run_dir / "config.yaml").is_file():
            # a pseudo-label folder (tune+pseudo...): its last round's run is the model the row scored
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
            model_dir = Path(summary["rounds"][-1]["training"]["run"])
        elif (run_dir / "final" / "config.yaml").is_file():  # a tune folder: its final model
            model_dir = run_dir / "final"
        if not (model_dir / "config.yaml").is_file():
            raise SystemExit(f"{model_dir}: no finished run to score on the dev set")
        target, system, out = str(model_dir), None, run_dir / "eval_dev"
    if dataset in JSON_TASKS:
        settings = EvalSection(task="json", batch_size=16, system_prompt=system)
    else:
        settings = EvalSection(task="classification", labels=labels_of(train_file), mode="choice", batch_size=16,
                               system_prompt=system)
    if setup in ENSEMBLES:
        from fewtune.eval.ensemble import evaluate_ensemble

        result = evaluate_ensemble(ensemble_members(dataset, setup, seed), dev_file, settings, output_dir=out,
                                   progress=False)
    else:
        result = evaluate(target, dev_file, settings, output_dir=out)
    m = result.metrics
    if dataset in JSON_TASKS:
        m = {"accuracy": m["exact_match"], "macro_f1": m["field_f1"]}
    return {"dataset": dataset, "setup": setup, "seed": seed, "dev_accuracy": m["accuracy"],
            "dev_macro_f1": m["macro_f1"], "n_dev": len(result.predictions), "eval_s": round(result.settings["seconds"], 1),
            "code": code}


def code_version() -> str:
    """The commit the code came from (+dirty when the tree had uncommitted changes): results outlive code. Read
    once at start: the modules are imported then, and HEAD may move while a long benchmark runs."""
    import subprocess

    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks/*.py") else "")


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(rows: list[dict], dev_rows: list[dict] = ()) -> str:
    lines = ["# Small-data results: zero-shot, the usual recipe, `fewtune suggest`, the best found", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, no GPU. "
             "Command: `PYTHONPATH=src python benchmarks/small_data.py` (see its docstring for the setups). "
             "Mean ± standard deviation over seeds (seeds vary the data order, the validation split and the "
             "adapter initialisation); wall time is training plus evaluation of one run. Raw results, one line "
             "per run: `small_data.jsonl` beside this file.", "",
             "The dev column is accuracy on a dev set outside both training and test data (SNIPS: 140 further "
             "train utterances; FewCLUE: its `dev_few_all.json`), by choice scoring: `best` is chosen by it, "
             "never by the test column.", "",
             "| data set | model | setup | evaluated by | seeds | accuracy | macro-F1 | test examples | dev accuracy "
             "| wall time / run |",
             "|---|---|---|---|---:|---|---|---:|---|---:|"]
    order = {"zero": 0, "usual": 1, "suggest (loss-selected)": 2, "suggest-acc (ties: first)": 3,
             "suggest --no-measure": 4, "suggest (LoRA lr 2e-4 at batch 8)": 4, "suggest": 4,
             "best": 6, "tune": 7, "tune+pseudo (scarcest class sets the scale)": 8,
             "tune+pseudo": 8, "tune+pseudo2": 8, "tune+pseudo+folds": 8, "tune+pseudo-all": 8, "tune+ensemble": 8, "tune+ensemble+pseudo": 8}  # candidates (suggest+KEY=VALUE) sort between suggest and best
    notes: list[str] = []
    groups: dict[tuple, list[dict]] = {}
    summaries = {(r["dataset"], r["setup"]): r for r in rows if r.get("summary")}
    for r in rows:
        if not r.get("summary"):
            groups.setdefault((r["dataset"], r["setup"]), []).append(r)
    def rank(key: tuple) -> int:
        if key[1] == best_candidate(key[0]):
            return order["best"]
        return order.get(key[1], 5 if "+" in key[1] else 9)

    for key, rs in sorted(groups.items(), key=lambda kv: (kv[0][0], rank(kv[0]), kv[0][1])):
        ds, setup = key
        devs = [d for d in dev_rows if (d["dataset"], d["setup"]) == key]
        dev = (f"{_ms([d['dev_accuracy'] for d in devs])} ({', '.join(str(d['seed']) for d in devs)}; n={devs[0]['n_dev']})"
               if devs else "-")
        summary = summaries.get(key, {})
        f1s = [r["macro_f1"] for r in rs]
        # a restored group whose per-run values were lost keeps its old numbers from the summary line
        f1 = _ms(f1s) if None not in f1s else summary.get("macro_f1", "-")
        walls = [r["wall_s"] for r in rs if r.get("wall_s") is not None]
        wall = f"{statistics.mean(walls):.0f} s" if walls else (f"{summary['wall_s']} s" if summary.get("wall_s") else "-")
        shown = f"**best**: {setup}" if setup == best_candidate(ds) else setup
        if setup == "tune":
            counts = sorted({r["trials"] for r in rs})
            shown = f"tune ({rs[0].get('budget', '?')} budget, {span(counts)} trial{'' if counts == [1] else 's'})"
        elif setup == "tune+pseudo+folds":
            shown = "tune+pseudo's model + the tune's 3 fold models (CV ensemble, nothing trained)"
        elif setup in ("tune+pseudo", "tune+pseudo2", "tune+pseudo-all", "tune+ensemble+pseudo"):
            kept = f"{span(sorted({r['pseudo_kept'] for r in rs}))} of {rs[0]['pseudo_pool']}"
            epochs = "/".join(f"{e:g}" for e in sorted({r.get("pseudo_epochs") or 0 for r in rs}))
            shown = {"tune+pseudo": f"tune + pseudo-label ({kept} unlabeled kept)",
                     "tune+pseudo2": f"tune + pseudo-label, 2 rounds (round 2: {kept} kept, labeled by round 1's model)",
                     "tune+pseudo-all": f"tune + pseudo-label, every confident one ({kept} unlabeled kept; retrained "
                                        f"{epochs} epochs)",
                     "tune+ensemble+pseudo": f"tune + pseudo-label by its CV ensemble ({kept} unlabeled kept; one "
                                             "model)"}[setup]
        elif setup == "tune+ensemble":
            shown = f"tune + its CV ensemble (final + {len(rs[0]['members']) - 1} fold models, nothing trained)"
        evaluated = "choice scoring" if rs[0]["mode"] != "generate" else (
            "generation: exact match, field F1" if rs[0].get("metric") else "generation")
        lines.append(f"| {ds} | {rs[0]['model']} | {shown} | {evaluated} "
                     f"| {', '.join(str(r['seed']) for r in rs)} | {_ms([r['accuracy'] for r in rs])} "
                     f"| {f1} | {rs[0]['n_test']} | {dev} | {wall} |")
        notes += [f"- {ds} / {setup} / seed {r['seed']}: {r['note']}" for r in rs if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    runs = [r for r in rows if not r.get("summary")]
    restored = [r for r in runs if r.get("restored")]
    if restored:
        lines += ["", f"{len(restored)} of {len(runs)} runs are restored from the table of 2026-11-21 (commit 3e97b6d): "
                  "their accuracy per seed was kept there, their macro-F1 and wall time only per group; means and spreads "
                  "recomputed from 3-decimal values can differ from that table in the last digit."]
    high = [r for r in runs if (r.get("load") or 0) > os.cpu_count()]
    if high:
        lines += ["", f"{len(high)} of {len(runs) - len(restored)} new runs finished with the load average above the "
                  "core count (other jobs shared the CPU): their wall times are inflated."]
    return "\n".join(lines) + "\n"


def span(values: list) -> str:
    """Sorted values as the table shows them: one value, or 'lowest-highest'."""
    return "-".join(map(str, values[::max(1, len(values) - 1)]))


def write_table(rows: list[dict], dev_rows: list[dict] = ()) -> str:
    """The generated table, followed by the hand-written notes already in the file (if any)."""
    text = table(rows, dev_rows)
    old = TABLE.read_text(encoding="utf-8") if TABLE.is_file() else ""
    text += "\n" + NOTES + old.split(NOTES, 1)[1] if NOTES in old else ""
    TABLE.write_text(text, encoding="utf-8")
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", default="snips,eprstmt,tnews")
    parser.add_argument("--setups", default="zero,usual,suggest,best")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test examples only")
    parser.add_argument("--test-per-class", type=int, default=None,
                        help="evaluate on the first N test examples of each label (a balanced subset; "
                             "tnews's test file is sorted by label, so --test-limit would keep 4 of 15 classes)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--dev", action="store_true",
                        help="also score each new run on the data set's dev file (choosing BEST looks only at these)")
    parser.add_argument("--dev-only", action="store_true",
                        help="score finished runs (--datasets/--setups/--seeds) on the dev file; train nothing")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from the results file")
    parser.add_argument("--tune-budget", default="30m", help="wall time of the tune setup's search + final training")
    parser.add_argument("--paired", default=None, metavar="A,B",
                        help="compare two finished setups seed by seed on their stored test predictions; train nothing")
    args = parser.parse_args()
    if args.paired:
        pair = tuple(args.paired.split(","))
        if len(pair) != 2:
            raise SystemExit(f"--paired takes two setups, e.g. tune,tune+pseudo; got {args.paired!r}")
        text = paired_table(args.datasets.split(","), pair, [int(s) for s in args.seeds.split(",")])
        path = TABLE.parent / "small_data_paired.md"
        # one section per pair: this pair's is replaced, the others kept
        sections = re.split(r"(?m)^(?=# Paired comparison: )", path.read_text(encoding="utf-8")) if path.exists() else []
        title = text.splitlines()[0]
        kept = [sec.rstrip() + "\n" for sec in sections if sec.strip() and sec.splitlines()[0] != title]
        path.write_text("\n".join(kept + [text]), encoding="utf-8")
        print(text)
        return
    code = code_version()  # once, at start: HEAD may move while a long benchmark runs
    if args.threads:
        torch.set_num_threads(args.threads)
    done = read_lines(RESULTS)
    scored = read_lines(DEV_RESULTS)

    def record(path: Path, row: dict) -> None:
        print(json.dumps(row), flush=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def dev(dataset: str, setup: str, seed: int, train_file: Path, run_as: str | None = None) -> None:
        if not any(r["dataset"] == dataset and r["setup"] == setup and r["seed"] == seed for r in scored):
            print(f"== dev: {dataset} / {setup} / seed {seed}", flush=True)
            scored.append(score_dev(dataset, setup, seed, train_file, code, run_as))
            record(DEV_RESULTS, scored[-1])

    if args.dev_only:
        for dataset in args.datasets.split(","):
            train_file, _ = prepare(dataset)
            for setup in args.setups.split(","):
                for seed in [int(s) for s in args.seeds.split(",")]:
                    row = next((r for r in done if (r["dataset"], r["setup"], r.get("seed")) == (dataset, setup, seed)
                                and not r.get("restored")), None)
                    if row is not None or split_setup(setup)[0] == "zero":
                        dev(dataset, setup, seed, train_file, (row or {}).get("run_as"))
    elif not args.table_only:
        for dataset in args.datasets.split(","):
            train_file, test_file = prepare(dataset)
            if args.test_per_class:
                test_file = per_class_subset(test_file, args.test_per_class)
            seeds = [int(s) for s in args.seeds.split(",")]
            # seeds outermost, so partial results cover every setup
            for seed, setup in [(seed, setup) for seed in seeds for setup in args.setups.split(",")]:
                if setup == "zero" and seed != seeds[0]:
                    continue  # the base model is deterministic: one run
                if any(r["dataset"] == dataset and r["setup"] == setup and r.get("seed") == seed for r in done):
                    continue
                print(f"== {dataset} / {setup} / seed {seed}", flush=True)
                row = run_one(dataset, setup, seed, train_file, test_file, args.test_limit, code, args.tune_budget)
                done.append(row)
                record(RESULTS, row)
                if args.dev:
                    dev(dataset, setup, seed, train_file)
    # other processes' lines too
    print(write_table(read_lines(RESULTS), read_lines(DEV_RESULTS)))


def paired_table(datasets: list[str], pair: tuple[str, str], seeds: list[int]) -> str:
    """Setup B against setup A per data set and seed, on the test examples both were scored on (their stored
    predictions): accuracy difference with a paired bootstrap interval, and McNemar's exact test."""
    import numpy as np

    from fewtune.eval.stats import mcnemar, paired_difference

    def correct(setup: str, dataset: str, seed: int) -> dict[int, bool] | None:
        path = run_dir_for(dataset, setup, seed) / "eval_test" / "predictions.jsonl"
        if not path.is_file():
            return None
        # classification records say "correct", the JSON task's (car50, exact match) "exact"
        return {r["index"]: bool(r["correct"] if "correct" in r else r["exact"])
                for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}

    a_name, b_name = pair
    lines = [f"# Paired comparison: {b_name} against {a_name}", "",
             f"Command: `PYTHONPATH=src python benchmarks/small_data.py --paired {a_name},{b_name} --datasets "
             f"{','.join(datasets)} --seeds {','.join(map(str, seeds))}`. Same test examples, each run's stored "
             "predictions (`eval_test/predictions.jsonl`); B - A accuracy with a paired bootstrap 95% interval "
             "(1,000 resamples of the examples), the examples only one of them gets right, McNemar's exact test.", "",
             "| data set | seed | n | A accuracy | B accuracy | B - A [95% interval] | only A right | only B right "
             "| McNemar p |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for dataset in datasets:
        for seed in seeds:
            a, b = correct(a_name, dataset, seed), correct(b_name, dataset, seed)
            if a is None or b is None:
                missing = a_name if a is None else b_name
                lines.append(f"| {dataset} | {seed} | - | - | - | no stored predictions of {missing} | - | - | - |")
                continue
            if a.keys() != b.keys():
                raise SystemExit(f"{dataset} seed {seed}: {a_name} and {b_name} were scored on different test examples")
            keys = sorted(a)
            ca, cb = np.array([a[k] for k in keys], dtype=float), np.array([b[k] for k in keys], dtype=float)
            d = paired_difference(lambda idx: float(ca[idx].mean()), lambda idx: float(cb[idx].mean()), len(keys))
            m = mcnemar(ca.astype(bool), cb.astype(bool))
            lines.append(f"| {dataset} | {seed} | {len(keys)} | {d['a']:.3f} | {d['b']:.3f} | {d['difference']:+.3f} "
                         f"[{d['interval']['low']:+.3f}, {d['interval']['high']:+.3f}] | {m['only_a_correct']} "
                         f"| {m['only_b_correct']} | {m['p_value']:.3g} |")
    return "\n".join(lines) + "\n"


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


if __name__ == "__main__":
    main()
