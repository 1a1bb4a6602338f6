"""`fewtune sweep CONFIG`: train every combination of a grid over several seeds (or folds), rank them.

With a few hundred examples one training run is one sample of a noisy quantity, so every
combination runs with several seeds (``train.seed``; without a validation file the held-out
split changes with the seed too, through ``data.seed``) or on K folds of the training file,
and the table reports mean ± sample standard deviation of the task metric over those runs.

Each run is a normal run directory, scored by the evaluation stage (`fewtune eval`) on
``--eval-data``, or else on its own validation split or held-out fold. ``sweep.jsonl``
gets one line per finished or failed run; re-running the same command skips what it holds.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import itertools
import json
import logging
import math
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewtune.config import MOVED_KEYS, TASK_METRICS, Config, ConfigError, build_config
from fewtune.data.dataset import split_examples
from fewtune.data.formats import DataError, Example, load_examples

log = logging.getLogger(__name__)

# set by the sweep itself for each run, so a grid over them would be silently overwritten
RESERVED = ("train.seed", "data.seed", "train.output_dir", "train.resume", "data.train", "data.validation",
            "data.val_ratio", "data.format", "data.dataset")
DEFAULT_METRIC = {"classification": "accuracy", "generation": "rougeL", "json": "field_f1", "perplexity": "perplexity"}


class SweepInterrupted(Exception):
    """Ctrl-C during a run: its checkpoint is saved and the same command continues the sweep."""


# ---------------------------------------------------------------- the grid


def _split_values(raw: str) -> list[str]:
    """v1,v2,... with commas inside [..], {..} or quotes kept (a list value such as [q_proj,v_proj])."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(raw):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(raw[start:i])
            start = i + 1
    parts.append(raw[start:])
    return [p.strip() for p in parts]


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg.model_dump(mode="json")
    for part in key.split("."):
        node = node[part]
    return node


def parse_grid(items: list[str], base: Config) -> dict[str, list]:
    """``KEY=V1,V2`` items -> {key: values as the config holds them}; each value is checked by the config."""
    grid: dict[str, list] = {}
    data = base.model_dump(mode="json")
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid '{item}' is not of the form section.key=v1,v2")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key in grid:
            raise ConfigError(f"--grid: '{key}' is given twice; put all its values in one --grid {key}=v1,v2,...")
        if key in RESERVED:
            raise ConfigError(f"--grid: '{key}' is set by the sweep for each run (seeds, splits) and cannot be swept"
                              + ("; use --seeds" if key.endswith(".seed") else ""))
        parts = _split_values(raw)
        if not raw.strip() or any(p == "" for p in parts):
            raise ConfigError(f"--grid '{item}': an empty value; give a comma-separated list such as {key}=v1,v2")
        values, seen = [], set()
        for part in parts:
            # the config's own override parsing and validation ("did you mean", ranges, types)
            value = _get(build_config(copy.deepcopy(data), [f"{key}={part}"], source=f"--grid {item}"), key)
            text = json.dumps(value, sort_keys=True)
            if text in seen:
                raise ConfigError(f"--grid '{item}': the value {part} is given twice")
            seen.add(text)
            values.append(value)
        grid[key] = values
    return grid


def expand_grid(grid: dict[str, list], random_n: int | None = None, random_seed: int = 0) -> list[dict]:
    """The cartesian product of the grid in order, or ``random_n`` distinct combinations of it (seeded)."""
    keys = list(grid)
    sizes = [len(grid[k]) for k in keys]
    total = math.prod(sizes)
    if random_n is None or random_n >= total:
        if random_n is not None:
            log.info("--random %d: the grid has only %d combinations; running all of them", random_n, total)
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    if random_n < 1:
        raise ConfigError(f"--random must be at least 1, got {random_n}")
    combos = []
    for index in sorted(random.Random(random_seed).sample(range(total), random_n)):  # no product in memory
        combo = {}
        for key, size in zip(reversed(keys), reversed(sizes)):  # mixed radix, last key fastest as in product
            index, pos = divmod(index, size)
            combo[key] = grid[key][pos]
        combos.append({k: combo[k] for k in keys})
    return combos


def parse_seeds(text: str) -> int | list[int]:
    """'3' -> three seeds counted from train.seed; '1,2,3' -> those seeds."""
    try:
        if "," not in text:
            return int(text)
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give a count (3) or a comma-separated list of integers (1,2,3)") from None


def resolve_seeds(seeds: int | list[int] | None, base_seed: int, kfold: int | None) -> list[int]:
    if seeds is None:
        seeds = 1 if kfold else 3  # folds are samples already
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {seeds}")
        return [base_seed + i for i in range(seeds)]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: give distinct seeds, got {seeds}")
    return list(seeds)


# ---------------------------------------------------------------- data: folds and splits


def kfold_split(examples: list[Example], k: int, seed: int) -> list[list[Example]]:
    """The folds of `fewtune data split --kfold` (:func:`fewtune.data.tools.kfold_examples`), with the sweep's errors."""
    from fewtune.data.tools import kfold_examples

    if k < 2:
        raise ConfigError(f"--kfold must be at least 2, got {k}")
    if len(examples) < k:
        source = examples[0].source if examples else "the training file"
        raise DataError(source, None, f"--kfold {k} needs at least {k} examples, there are {len(examples)}")
    return kfold_examples(examples, k, seed)


def _write_examples(path: Path, examples: list[Example]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for e in examples:
            fh.write(json.dumps({**e.to_dict(), "provenance": {"file": e.source, "line": e.line}},
                                ensure_ascii=False) + "\n")
    return str(path)


@dataclass
class Plan:
    """What every run trains on and is scored on, fixed before the first run."""

    mode: str  # kfold | holdout (split per seed) | validation (the config's file) | external (--eval-data only)
    files: dict[tuple[int | None, int | None], tuple[str, str | None]]  # (seed, fold) -> (train, validation)
    eval_data: str | None
    task: str
    labels: list[str] | None

    def data_for(self, seed: int, fold: int | None) -> tuple[str | None, str | None, str]:
        key = (None, fold) if self.mode == "kfold" else (seed if self.mode == "holdout" else None, None)
        train, val = self.files.get(key, (None, None))
        evaluated = self.eval_data or val
        assert evaluated is not None
        return train, val, evaluated


def plan_data(cfg: Config, out: Path, seeds: list[int], kfold: int | None, eval_data: str | None) -> Plan:
    from fewtune.eval.evaluate import detect_task, expected_label

    data = cfg.data
    if not data.train:
        raise DataError("<config>", None, "no training data: set data.train to a file")
    examples = load_examples(data.train, data.format, data.dataset)
    if not examples:
        raise DataError(data.train, None, "no examples")
    files: dict = {}
    if kfold is not None:
        if data.validation:
            raise ConfigError(f"--kfold splits data.train into folds, but the config also sets data.validation "
                              f"({data.validation}); remove it, or use --eval-data for a fixed test set")
        mode = "kfold"
        folds = kfold_split(examples, kfold, data.seed)
        for i, held_out in enumerate(folds):
            rest = [e for j, fold in enumerate(folds) if j != i for e in fold]
            files[(None, i)] = (_write_examples(out / "data" / f"fold-{i}" / "train.jsonl", rest),
                                _write_examples(out / "data" / f"fold-{i}" / "validation.jsonl", held_out))
    elif data.validation:
        mode = "validation"
        files[(None, None)] = (data.train, data.validation)
    elif data.val_ratio > 0:
        mode = "holdout"
        for seed in seeds:
            train, val = split_examples(examples, data.val_ratio, seed)
            if not val:
                raise DataError(data.train, None, f"data.val_ratio={data.val_ratio} holds out no example of "
                                f"{len(examples)}; raise it, or give --eval-data or --kfold")
            files[(seed, None)] = (_write_examples(out / "data" / f"seed-{seed}" / "train.jsonl", train),
                                   _write_examples(out / "data" / f"seed-{seed}" / "validation.jsonl", val))
    elif eval_data:
        mode = "external"
    else:
        raise ConfigError("nothing to score the runs on: the config has no validation data (data.validation is "
                          "empty and data.val_ratio is 0); give --eval-data FILE or --kfold K, or set data.val_ratio")
    scored = examples
    if eval_data:
        if not Path(eval_data).is_file():
            raise DataError(str(eval_data), None, "file not found (--eval-data)")
        scored = None if Path(eval_data).suffix.lower() == ".txt" else load_examples(eval_data)  # any format, as `fewtune eval` reads it
    elif mode == "validation":
        scored = load_examples(data.validation, data.format, data.dataset)
    task = cfg.eval.task or detect_task(eval_data or data.train, scored)
    labels = None
    if task == "classification":  # every label the runs can meet: a small fold may lack a class
        labels = sorted({expected_label(e) for e in examples + list(scored or [])})
    return Plan(mode, files, str(eval_data) if eval_data else None, task, labels)


# ---------------------------------------------------------------- running


@dataclass
class SweepResult:
    out_dir: Path
    metric: str
    task: str
    keys: list[str]
    rows: list[dict]
    records: list[dict]  # this sweep's runs, latest record of each
    trained: int  # runs executed by this call (not skipped)
    table: str = ""
    notes: list[str] = field(default_factory=list)


def _run_key(params: dict, seed: int, fold: int | None) -> str:
    return json.dumps([params, seed, fold], sort_keys=True)


def _run_dir(out: Path, params: dict, seed: int, fold: int | None) -> Path:
    name = ",".join(f"{k.split('.')[-1]}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
                    for k, v in params.items()) or "base"
    name = re.sub(r"[^\w.=,+-]", "_", name)[:60]
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
    return out / "runs" / f"{name}-{digest}" / (f"seed-{seed}" + (f"-fold-{fold}" if fold is not None else ""))


def _fingerprint(cfg: Config, eval_data: str | None, kfold: int | None, before_keys_moved: bool = False) -> str:
    """What identifies a sweep: the base config (less where runs go) and how runs are scored. With
    ``before_keys_moved``: as a sweep recorded before config.MOVED_KEYS moved identified the same one."""
    data = cfg.model_dump(mode="json")
    data["train"].pop("output_dir")
    data["train"].pop("resume")
    if before_keys_moved:
        data = _as_before_keys_moved(data)
    text = json.dumps({"config": data, "eval_data": eval_data, "kfold": kfold}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _as_before_keys_moved(data: dict) -> dict:
    """A dumped config with each moved key back at its old place, and without the eval section (new then)."""
    data = copy.deepcopy(data)
    for old, new in MOVED_KEYS.items():
        *new_parents, new_name = new.split(".")
        *old_parents, old_name = old.split(".")
        node = data
        for part in new_parents:
            node = node[part]
        value = node.pop(new_name)
        node = data
        for part in old_parents:
            node = node.setdefault(part, {})
        node[old_name] = value
    data.pop("eval")
    return data


def read_sweep(path: Path, fingerprint: str | tuple[str, ...] | None = None) -> dict[str, dict]:
    """The latest record of each run in a sweep.jsonl (a failed run retried later is replaced); every record
    must carry ``fingerprint`` (or one of them)."""
    if isinstance(fingerprint, str):
        fingerprint = (fingerprint,)
    records: dict[str, dict] = {}
    if not path.exists():
        return records
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
            key = _run_key(record["params"], record["seed"], record["fold"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(str(path), line, f"not a sweep record ({err}); fix or remove the line") from None
        if fingerprint and record.get("sweep") not in fingerprint:
            raise ConfigError(f"{path} holds runs of a different sweep (line {line}): the config, its overrides, "
                              "--eval-data or --kfold differ. Use another --out, or delete the file to start over")
        records[key] = record
    return records


def _run_config(base: dict, params: dict, seed: int, fold: int | None, plan: Plan, run_dir: Path) -> Config:
    train, val, _ = plan.data_for(seed, fold)
    sets = {**params, "train.seed": seed, "train.output_dir": str(run_dir), "train.resume": False,
            # with train.report_to, every run of the sweep is filed under one experiment in one tracking folder
            "train.tracking_dir": str(run_dir.parents[2] / "tracking"), "train.experiment": run_dir.parents[2].name}
    if plan.mode == "holdout":
        sets["data.seed"] = seed  # the split this run trains on was made with it
    if train is not None and plan.mode in ("kfold", "holdout"):
        sets.update({"data.train": train, "data.validation": val, "data.format": "messages", "data.dataset": None})
    return build_config(copy.deepcopy(base), [f"{k}={json.dumps(v)}" for k, v in sets.items()], source="sweep")


def _execute(cfg: Config, run_dir: Path, eval_file: str, plan: Plan) -> dict:
    from fewtune.eval.evaluate import evaluate
    from fewtune.train.loop import Interrupted, train

    start = time.time()
    resume = (run_dir / "checkpoints" / "latest").exists()  # a run stopped by Ctrl-C continues
    if resume:
        log.info("continuing %s from its checkpoint", run_dir)
    try:
        result = train(cfg, run_dir, resume=resume)
    except Interrupted as err:
        raise SweepInterrupted(f"sweep interrupted at step {err.step} of {run_dir} (checkpoint saved). Run the same "
                               "command again to continue: recorded runs are skipped, this one resumes") from None
    train_s = time.time() - start
    _free_memory()  # the trainer's model goes before the evaluation loads the run
    # the config's eval section, on the plan's task and labels; in the batches the run trained with, and on the
    # whole file whatever its format (the sweep's own splits are written as messages)
    settings = cfg.eval.model_copy(update={"task": plan.task, "labels": plan.labels, "batch_size": cfg.train.batch_size,
                                           "limit": None, "format": "auto"})
    evaluated = evaluate(str(run_dir), eval_file, settings, output_dir=run_dir / "eval", progress=False)
    metrics = {k: v for k, v in evaluated.metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
    if result.best_val_loss is not None:
        metrics["val_loss"] = result.best_val_loss
    return {"metrics": metrics, "steps": result.steps, "stopped_early": result.stopped_early,
            "train_s": round(train_s, 2)}


def sweep(cfg: Config, grid: list[str] | None = None, random_n: int | None = None,
          seeds: int | list[int] | None = None, kfold: int | None = None, eval_data: str | Path | None = None,
          metric: str | None = None, out: str | Path | None = None, random_seed: int = 0,
          retry_failed: bool = False) -> SweepResult:
    """Train and score every (combination, seed, fold); write sweep.jsonl and the ranked sweep.md."""
    if random_n is not None and not grid:
        raise ConfigError("--random N samples combinations of the --grid values; give --grid too")
    if kfold is not None and kfold < 2:
        raise ConfigError(f"--kfold must be at least 2, got {kfold}")
    out = Path(out) if out else Path(cfg.train.output_dir) / "sweep"
    values = parse_grid(list(grid or []), cfg)
    combos = expand_grid(values, random_n, random_seed)
    seed_list = resolve_seeds(seeds, cfg.train.seed, kfold)
    eval_data = str(eval_data) if eval_data else None
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_data(cfg, out, seed_list, kfold, eval_data)
    metric = metric or DEFAULT_METRIC[plan.task]
    allowed = (*(TASK_METRICS.get(plan.task) or ("perplexity", "mean_nll")), "val_loss")
    if metric not in allowed:
        raise ConfigError(f"--metric {metric!r} is not a {plan.task} metric; use one of {', '.join(allowed)}")

    fingerprint = _fingerprint(cfg, eval_data, kfold)
    path = out / "sweep.jsonl"
    # runs recorded before the config's keys moved belong to the same sweep
    records = read_sweep(path, (fingerprint, _fingerprint(cfg, eval_data, kfold, before_keys_moved=True)))
    folds: list[int | None] = list(range(kfold)) if kfold else [None]
    runs = [(params, seed, fold) for params in combos for seed in seed_list for fold in folds]

    def pending(run) -> bool:
        done = records.get(_run_key(*run))
        return done is None or (retry_failed and done["status"] == "failed")

    todo = [run for run in runs if pending(run)]
    failed = sum(records.get(_run_key(*run), {}).get("status") == "failed" for run in runs)
    if len(todo) < len(runs):
        log.info("skipping %d of %d runs already recorded in %s%s", len(runs) - len(todo), len(runs), path,
                 f" ({failed} of them failed; --retry-failed runs those again)" if failed and not retry_failed else "")
    base = cfg.model_dump(mode="json")
    for i, (params, seed, fold) in enumerate(todo, 1):
        run_dir = _run_dir(out, params, seed, fold)
        what = ", ".join(f"{k}={v}" for k, v in params.items()) or "the config as is"
        log.info("run %d/%d: %s, seed %d%s -> %s", i, len(todo), what, seed,
                 f", fold-{fold} of {kfold}" if fold is not None else "", run_dir)
        if records.get(_run_key(params, seed, fold)):  # a failed run tried again starts afresh
            shutil.rmtree(run_dir, ignore_errors=True)
        record = {"sweep": fingerprint, "params": params, "seed": seed, "fold": fold, "run_dir": str(run_dir)}
        start = time.time()
        try:
            run_cfg = _run_config(base, params, seed, fold, plan, run_dir)
            record.update(status="ok", **_execute(run_cfg, run_dir, plan.data_for(seed, fold)[2], plan))
        except SweepInterrupted:
            raise
        except Exception as err:  # noqa: BLE001  one bad combination must not end the sweep; it is recorded
            log.error("run %d/%d failed: %s: %s", i, len(todo), type(err).__name__, err,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            record.update(status="failed", error=f"{type(err).__name__}: {err}")
        record["wall_s"] = round(time.time() - start, 2)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        records[_run_key(params, seed, fold)] = record
        _free_memory()

    from fewtune.workflows.sweep_table import rank, write_table

    mine = [records[_run_key(*run)] for run in runs]
    result = SweepResult(out, metric, plan.task, list(values), rank(combos, mine, metric, plan.task), mine, len(todo))
    if not eval_data:
        result.notes.append("scored on the split that also chose each run's best checkpoint (optimistic); "
                            "--eval-data scores on a separate set")
    write_table(result, plan, seed_list, kfold)
    return result


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
