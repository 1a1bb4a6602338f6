"""`fewtune tune DATA`: search the few settings that matter for small data, select honestly, retrain.

The search starts from what `fewtune suggest` writes for the data (its config is trial 0, so
the search is always compared with it) and varies the learning rate, the epochs, the batch
size and the LoRA rank (optionally label smoothing, NEFTune noise and LoRA dropout). Optuna
proposes the settings (TPE) and stops trials early (median pruning on the folds done so far,
and a bound: a trial that could not beat the best one even with perfect scores on its
remaining folds stops).

Selection never sees the test file. Each trial is scored by K-fold cross-validation over the
training file (stratified by label for classification): trained on K-1 folds without a
validation split of its own, so the epochs searched are the epochs trained, and scored on the
held-out fold. With ``--dev FILE`` each trial trains on the whole training file and is scored
on the dev file instead. The best settings are then trained on all the training data, and only
that model is scored on ``--test`` (once, at the end, reported apart from the search).

The wall-time budget covers the search and the final training: a trial is started only if all its
folds and the final training fit in what is left, by the time the folds already run took (per
training token, scaled by the tokens/s `suggest` measured at each batch size, so a batch-4 trial is
not costed at batch 8's speed); a proposal too long for the budget left is set aside and another is
asked for, so a slow machine spends its budget on trials that can finish. A fold is started only if
it and the final training still fit (the estimates can be wrong). Everything is written as it happens into the
tune folder (Optuna's journal file, one JSON line per fold run); the same command continues an
interrupted tune, reusing every finished fold, and Ctrl-C keeps what finished.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from fewtune.config import TASK_METRICS, Config, ConfigError, build_config
from fewtune.data.formats import DataError, load_examples
from fewtune.workflows.tune_report import LOWER_IS_BETTER, write_report

log = logging.getLogger(__name__)

UNIT_METRICS = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall", "rouge1", "rouge2",
                "rougeL", "exact_match", "json_valid", "field_f1", "field_precision", "field_recall")
DEFAULT_SEARCH = ("lr", "epochs", "batch_size", "r")
STUDY = "fewtune-tune"


class TuneInterrupted(Exception):
    """Ctrl-C during a tune: what finished is kept, and the same command continues."""


# ---------------------------------------------------------------- the search space


@dataclass(frozen=True)
class Dimension:
    """One searched setting: its name on the command line, the config key, and its range or choices."""

    name: str
    key: str
    kind: str  # log (float, log scale) | float | int | choice
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    def sample(self, trial) -> Any:
        if self.kind == "log":
            return trial.suggest_float(self.name, self.low, self.high, log=True)
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_categorical(self.name, list(self.choices))

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name} in {{{', '.join(map(str, self.choices))}}}"
        scale = " (log scale)" if self.kind == "log" else ""
        return f"{self.name} in [{self.low:g}, {self.high:g}]{scale}"


SEARCHABLE = ("lr", "epochs", "batch_size", "r", "label_smoothing", "neftune", "dropout")


def search_space(cfg: Config, n_train: int, names: Sequence[str] = DEFAULT_SEARCH,
                 batch_limit: int = 32) -> list[Dimension]:
    """The dimensions around ``cfg`` (suggest's config): each range contains the config's own value."""
    unknown = [n for n in names if n not in SEARCHABLE]
    if unknown:
        raise ConfigError(f"--search: unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SEARCHABLE)}")
    method = cfg.method.name
    dims = []
    for name in names:
        if name == "lr":
            lr = cfg.train.resolved_lr(method)
            dims.append(Dimension("lr", "train.lr", "log", lr / 4, lr * 4))
        elif name == "epochs":
            e = max(1, round(cfg.train.epochs))
            dims.append(Dimension("epochs", "train.epochs", "int", max(1, e // 3), min(25, max(3 * e, e + 2))))
        elif name == "batch_size":
            b = cfg.train.batch_size
            # powers of two from a quarter to four times suggest's batch, within memory and leaving >= 8 updates an epoch
            sizes = {s for s in (1, 2, 4, 8, 16, 32, 64) if b / 4 <= s <= b * 4 and s <= batch_limit
                     and math.ceil(n_train / s) >= 8}
            sizes.add(b)
            dims.append(Dimension("batch_size", "train.batch_size", "choice", choices=tuple(sorted(sizes))))
        elif name == "r":
            if method not in ("lora", "qlora"):
                raise ConfigError(f"--search r: the LoRA rank needs method lora, the config trains {method!r}")
            r = cfg.method.lora.r
            dims.append(Dimension("r", "method.lora.r", "choice", choices=tuple(sorted({4, 8, 16, r}))))
        elif name == "label_smoothing":
            dims.append(Dimension("label_smoothing", "regularise.label_smoothing", "float", 0.0, 0.2))
        elif name == "neftune":
            dims.append(Dimension("neftune", "regularise.neftune_alpha", "choice", choices=(0.0, 5.0, 10.0)))
        elif name == "dropout":
            if method not in ("lora", "qlora"):
                raise ConfigError(f"--search dropout: LoRA dropout needs method lora, the config trains {method!r}")
            dims.append(Dimension("dropout", "method.lora.dropout", "float", 0.0, 0.2))
    return dims


def base_params(cfg: Config, dims: Sequence[Dimension]) -> dict[str, Any]:
    """``cfg``'s own values of the searched settings: the first trial."""
    values = {"lr": cfg.train.resolved_lr(cfg.method.name), "epochs": max(1, round(cfg.train.epochs)),
              "batch_size": cfg.train.batch_size, "r": cfg.method.lora.r, "label_smoothing": cfg.regularise.label_smoothing,
              "neftune": cfg.regularise.neftune_alpha, "dropout": cfg.method.lora.dropout}
    return {d.name: values[d.name] for d in dims}


def overrides(cfg: Config, dims: Sequence[Dimension], params: dict[str, Any]) -> dict[str, Any]:
    """The config keys a trial sets; the LoRA alpha follows the rank (suggest's alpha / r ratio is kept)."""
    keys = {d.name: d.key for d in dims}
    sets = {keys[name]: value for name, value in params.items()}
    if "r" in params:
        ratio = cfg.method.lora.alpha / cfg.method.lora.r
        sets["method.lora.alpha"] = ratio * params["r"]
    return sets


# ---------------------------------------------------------------- budget and time


def parse_budget(text: str | None) -> float | None:
    """'30m', '1h', '1h30m', '90s' -> seconds (None: no budget)."""
    if text is None:
        return None
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text.strip().lower())
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", text.strip().lower()).strip():
        raise ConfigError(f"--budget {text!r}: give a time with units, e.g. 30m, 1h, 1h30m, 900s")
    seconds = sum(float(v) * {"h": 3600, "m": 60, "s": 1}[u] for v, u in parts)
    if seconds <= 0:
        raise ConfigError(f"--budget {text!r} is no time at all")
    return seconds


@dataclass
class TimeModel:
    """Seconds a run takes: ``per_token`` x training tokens x epochs, plus a fixed cost (loading, scoring).

    Fitted on the runs done so far; before the first, ``per_token`` comes from the throughput suggest
    measured (or a cautious CPU figure)."""

    per_token: float
    fixed: float = 20.0
    # measured training tokens/s by batch size (suggest's timing passes): a batch's token-epochs are weighted by
    # how much slower per token it ran than the fastest measured batch
    throughput: dict[int, float] = field(default_factory=dict)
    seen: list[tuple[float, float]] = field(default_factory=list)  # (token-epochs, seconds)

    def add(self, token_epochs: float, seconds: float) -> None:
        self.seen.append((token_epochs, seconds))
        rates = [s / t for t, s in self.seen if t > 0]
        if rates:
            self.per_token = statistics.median(rates)
            self.fixed = 0.0  # the observed seconds already include loading and scoring

    def estimate(self, token_epochs: float) -> float:
        return self.per_token * token_epochs + self.fixed

    def weight(self, batch_size: int) -> float:
        """Per-token cost of ``batch_size`` relative to the fastest measured batch (1.0 when not measured)."""
        rates = self.throughput
        if not rates:
            return 1.0
        rate = rates.get(batch_size)
        if rate is None:  # between measured sizes: the nearest one
            rate = rates[min(rates, key=lambda b: abs(math.log(b / batch_size)))]
        return max(rates.values()) / rate if rate > 0 else 1.0


# ---------------------------------------------------------------- results


@dataclass
class TrialResult:
    number: int
    params: dict[str, Any]
    state: str  # complete | pruned | failed
    fold_values: list[float]
    seconds: float
    note: str = ""

    @property
    def mean(self) -> float:
        return statistics.fmean(self.fold_values) if self.fold_values else float("nan")

    @property
    def std(self) -> float:
        return statistics.stdev(self.fold_values) if len(self.fold_values) > 1 else 0.0


@dataclass
class TuneResult:
    out_dir: Path
    metric: str
    task: str
    selection: str  # "3-fold cross-validation over N examples" or "the dev file X"
    trials: list[TrialResult]
    best: TrialResult
    baseline: TrialResult | None  # suggest's config (trial 0)
    comparison: dict | None  # best vs suggest's config on the held-out predictions: difference and interval
    importances: dict[str, float]
    final_dir: Path | None
    test: dict | None  # the final model on --test (None without it)
    wall_s: float
    budget_s: float | None
    stopped: str  # why the search stopped
    lines: list[str] = field(default_factory=list)  # the printed summary
    ensemble: dict | None = None  # with --ensemble: its members and, with --test, its metrics there


def _direction(metric: str) -> str:
    return "minimize" if metric in LOWER_IS_BETTER else "maximize"


# ---------------------------------------------------------------- the data plan


@dataclass
class Selection:
    """What each trial trains on and is scored on: (train file, scored file) per fold."""

    folds: list[tuple[str, str]]
    examples: list  # the training file's examples, read once
    description: str


def plan_selection(cfg: Config, out: Path, kfold: int, dev: str | None, seed: int) -> Selection:
    from fewtune.workflows.sweep import _write_examples, kfold_split

    examples = load_examples(cfg.data.train, cfg.data.format, cfg.data.dataset)
    if not examples:
        raise DataError(str(cfg.data.train), None, "no examples")
    if dev:
        if not Path(dev).is_file():
            raise DataError(str(dev), None, "file not found (--dev)")
        folds = [(str(cfg.data.train), str(dev))]
        what = f"the dev file {dev} (trained on all {len(examples)} training examples)"
    else:
        parts = kfold_split(examples, kfold, seed)
        folds = []
        for i, held_out in enumerate(parts):
            rest = [e for j, part in enumerate(parts) if j != i for e in part]
            folds.append((_write_examples(out / "data" / f"fold-{i}" / "train.jsonl", rest),
                          _write_examples(out / "data" / f"fold-{i}" / "held_out.jsonl", held_out)))
        what = f"{kfold}-fold cross-validation over the {len(examples)} training examples"
    return Selection(folds, examples, what)


def _fold_share(selection: Selection) -> float:
    """Share of the training file a fold run trains on."""
    k = len(selection.folds)
    return 1.0 if k == 1 else (k - 1) / k


# ---------------------------------------------------------------- one fold run


def _run_dir(out: Path, params: dict, fold: int) -> Path:
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return out / "runs" / f"{digest}" / f"fold-{fold}"


def _fold_config(base: dict, sets: dict[str, Any], train_file: str, run_dir: Path, seed: int) -> Config:
    """A fold run: the trial's settings, its training part, no validation split of its own (the held-out
    fold or the dev file scores it afterwards, so the epochs searched are the epochs trained)."""
    sets = {**sets, "data.train": train_file, "data.validation": None, "data.val_ratio": 0.0,
            "train.output_dir": str(run_dir), "train.resume": False, "train.seed": seed,
            # with --report-to, every fold run of the tune is filed under one experiment in one tracking folder
            "train.tracking_dir": str(run_dir.parents[2] / "tracking"), "train.experiment": run_dir.parents[2].name}
    if train_file != base["data"]["train"]:  # a fold file, written as messages
        sets.update({"data.format": "messages", "data.dataset": None})
    return build_config(copy.deepcopy(base), [f"{k}={json.dumps(v)}" for k, v in sets.items()], source="tune")


def run_fold(cfg: Config, run_dir: Path, scored_file: str | None, task: str, labels: list[str] | None) -> dict:
    """Train one run and score it on ``scored_file`` (None: train only): {"metrics", "train_s", "eval_s"}."""
    from fewtune.eval.evaluate import evaluate
    from fewtune.train.loop import Interrupted, train
    from fewtune.workflows.sweep import _free_memory

    start = time.time()
    resume = (run_dir / "checkpoints" / "latest").exists()
    try:
        train(cfg, run_dir, resume=resume)
    except Interrupted as err:
        raise TuneInterrupted(f"tune interrupted at step {err.step} of {run_dir} (checkpoint saved)") from None
    train_s = time.time() - start
    _free_memory()
    if scored_file is None:
        return {"metrics": {}, "train_s": round(train_s, 2), "eval_s": 0.0}
    settings = cfg.eval.model_copy(update={"task": task, "labels": labels, "batch_size": max(8, cfg.train.batch_size),
                                           "limit": None, "format": "auto"})
    evaluated = evaluate(str(run_dir), scored_file, settings, output_dir=run_dir / "eval", progress=False)
    metrics = {k: float(v) for k, v in evaluated.metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
    _free_memory()
    return {"metrics": metrics, "train_s": round(train_s, 2), "eval_s": round(time.time() - start - train_s, 2)}


# ---------------------------------------------------------------- the tune


def _fingerprint(cfg: Config, dims: Sequence[Dimension], selection: Selection, metric: str, seed: int) -> str:
    data = cfg.model_dump(mode="json")
    data["train"].pop("output_dir")
    text = json.dumps({"config": data, "space": [d.describe() for d in dims], "folds": selection.folds,
                       "metric": metric, "seed": seed}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_runs(path: Path) -> dict[str, dict]:
    runs: dict[str, dict] = {}
    if path.exists():
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if text.strip():
                try:
                    record = json.loads(text)
                    runs[record["key"]] = record
                except (json.JSONDecodeError, KeyError) as err:
                    raise DataError(str(path), line, f"not a tune run record ({err}); fix or remove the line") from None
    return runs


def _run_key(params: dict, fold: int) -> str:
    return json.dumps([params, fold], sort_keys=True)


BUDGET_NOTE = "stopped by the budget"
MAX_SET_ASIDE = 25  # proposals in a row that may be set aside as too long before the search ends


class _Search:
    """The search's state between trials: the study, the fold runs on record, the time model and the budget."""

    def __init__(self, study, cfg: Config, dims: Sequence[Dimension], selection: Selection, out: Path, metric: str,
                 task: str, labels: list[str] | None, seed: int, execute: Callable[..., dict],
                 clock: Callable[[], float], started: float, budget_s: float | None, tokens: float, times: TimeModel):
        self.study, self.cfg, self.dims, self.selection, self.out = study, cfg, dims, selection, out
        self.metric, self.task, self.labels, self.seed, self.execute = metric, task, labels, seed, execute
        self.clock, self.started, self.budget_s, self.tokens, self.times = clock, started, budget_s, tokens, times
        self.base = cfg.model_dump(mode="json")
        self.runs_path = out / "runs.jsonl"
        self.runs = _read_runs(self.runs_path)

    def finished(self) -> list:
        import optuna

        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return [t for t in self.study.trials if t.state in done]

    def best_value(self) -> float | None:
        import optuna

        done = [t for t in self.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        return self.study.best_value if done else None

    def _token_epochs(self, params: dict, share: float) -> float:
        """Training tokens x epochs of a run of ``params`` on ``share`` of the data, weighted by its batch's speed."""
        batch = params.get("batch_size", self.cfg.train.batch_size)
        return self.tokens * share * params.get("epochs", self.cfg.train.epochs) * self.times.weight(batch)

    def need(self, params: dict, folds: int = 1) -> float:
        """Estimated seconds of ``folds`` more folds of ``params`` and of the final training (of the best so far,
        or of ``params`` where that takes longer: it may become the best)."""
        finals = [params] if self.best_value() is None else [params, self.study.best_trial.params]
        return (folds * self.times.estimate(self._token_epochs(params, _fold_share(self.selection)))
                + max(self.times.estimate(self._token_epochs(p, 1.0)) for p in finals))

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - (self.clock() - self.started)

    def fits(self, params: dict, folds: int = 1) -> bool:
        return self.budget_s is None or self.need(params, folds) <= self.left()

    def folds_to_run(self, params: dict) -> int:
        """Folds of ``params`` not on record yet."""
        return sum(_run_key(params, fold) not in self.runs for fold in range(len(self.selection.folds)))

    def run_trial(self, trial, params: dict, check_budget: bool) -> str:
        """Run (or take from the record) each fold of ``params``, stopping early where the pruning rules or the
        budget say so; tell the study. Returns the trial's note ("" when it completed)."""
        import optuna

        states = optuna.trial.TrialState
        sets = overrides(self.cfg, self.dims, params)
        values: list[float] = []
        start = self.clock()
        state, note = states.COMPLETE, ""
        folds = len(self.selection.folds)
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()))
        for fold, (train_file, scored_file) in enumerate(self.selection.folds):
            key = _run_key(params, fold)
            record = self.runs.get(key)
            if record is None:
                if check_budget and fold > 0 and not self.fits(params):
                    state, note = states.FAIL, BUDGET_NOTE
                    break
                run_dir = _run_dir(self.out, params, fold)
                run_start = self.clock()
                try:
                    result = self.execute(_fold_config(self.base, sets, train_file, run_dir, self.seed), run_dir,
                                          scored_file, self.task, self.labels)
                except (TuneInterrupted, KeyboardInterrupt):
                    self.study.tell(trial, state=states.FAIL)
                    raise
                except Exception as err:  # noqa: BLE001  a failing setting is recorded, the search goes on
                    log.error("trial %d, fold %d failed: %s: %s", trial.number, fold, type(err).__name__, err)
                    state, note = states.FAIL, f"{type(err).__name__}: {err}"
                    break
                record = {"key": key, "trial": trial.number, "params": params, "fold": fold, "run_dir": str(run_dir),
                          "seconds": round(self.clock() - run_start, 2), **result}
                self.add_record(record)
                self.times.add(self._token_epochs(params, _fold_share(self.selection)), record["seconds"])
            values.append(record["metrics"][self.metric])
            trial.report(statistics.fmean(values), fold)
            best = self.best_value()
            if fold < folds - 1 and best is not None:
                if self.metric in UNIT_METRICS and not _can_beat(values, folds, best):
                    state, note = states.PRUNED, "cannot beat the best even with perfect folds left"
                    break
                if trial.should_prune():
                    state, note = states.PRUNED, "below the median of earlier trials"
                    break
        trial.set_user_attr("fold_values", values)
        trial.set_user_attr("seconds", round(self.clock() - start, 2))
        trial.set_user_attr("note", note)
        if state == states.COMPLETE:
            self.study.tell(trial, statistics.fmean(values))
        else:
            self.study.tell(trial, state=state)
        return note

    def add_record(self, record: dict) -> None:
        with open(self.runs_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.runs[record["key"]] = record


def tune(data: str | Path, model: str | None = None, *, trials: int | None = None, budget: str | float | None = None,
         metric: str | None = None, kfold: int = 3, dev: str | Path | None = None, test: str | Path | None = None,
         search: Sequence[str] = DEFAULT_SEARCH, out: str | Path | None = None, seed: int = 0,
         measure: bool = True, progress: bool = True, clock: Callable[[], float] = time.monotonic,
         execute: Callable[..., dict] = run_fold, final: bool = True,
         report_to: Sequence[str] = (), ensemble: bool = False,
         score_ensemble: Callable[..., dict] | None = None) -> TuneResult:
    """Search, select on folds (or ``dev``), retrain the winner on all the training data, score it on ``test``.

    ``ensemble``: the final model and the winning trial's K fold models make a cross-validation ensemble
    (:mod:`fewtune.eval.ensemble`), listed in ``ensemble.json`` and scored on ``test`` beside the final model.
    ``execute(cfg, run_dir, scored_file, task, labels)`` trains and scores one run, ``score_ensemble(out, test,
    task, labels, cfg)`` scores the ensemble (tests swap both for stand-ins); ``clock`` measures the budget."""
    import optuna

    from fewtune.advice.suggest import Rule, memory_batch_limit, suggest, write_config
    from fewtune.eval.evaluate import detect_task, expected_label
    from fewtune.models import DEFAULT_MODEL
    from fewtune.workflows.sweep import DEFAULT_METRIC

    started = clock()
    if trials is None and budget is None:
        raise ConfigError("give --trials N or --budget TIME (e.g. 30m): the search needs a limit")
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if dev is not None and kfold != 3:
        log.info("--dev given: trials are scored on it, --kfold is not used")
    if dev is not None and ensemble:
        raise ConfigError("--ensemble is made of the winning settings' fold models: it needs k-fold selection, "
                          "not --dev")
    budget_s = parse_budget(budget) if isinstance(budget, str) else budget
    data = str(Path(data).resolve())
    if not Path(data).is_file():
        raise DataError(data, None, "file not found")
    if test is not None and not Path(test).is_file():  # checked now, read only at the end
        raise DataError(str(test), None, "file not found (--test)")
    model = model or DEFAULT_MODEL

    suggestion = suggest(data, model, measure=measure, progress=progress)
    cfg = suggestion.config
    if report_to:  # checked like any config value
        cfg = build_config(cfg.model_dump(mode="json"), [f"train.report_to={json.dumps(list(report_to))}"],
                           source="--report-to")
    out = Path(out) if out else Path("runs") / "tune" / Path(data).stem
    out.mkdir(parents=True, exist_ok=True)
    selection = plan_selection(cfg, out, kfold, str(dev) if dev else None, seed)
    examples = selection.examples
    task = detect_task(data, examples) if cfg.eval.task in (None, "auto") else cfg.eval.task
    labels = sorted({expected_label(e) for e in examples}) if task == "classification" else None
    metric = metric or DEFAULT_METRIC[task]
    allowed = TASK_METRICS.get(task, ())
    if metric not in allowed:
        raise ConfigError(f"--metric {metric!r} is not a {task} metric; use one of {', '.join(allowed)}")
    train_n = round(len(selection.examples) * _fold_share(selection))
    limit, _ = memory_batch_limit(model, cfg.data.max_length)
    dims = search_space(cfg, train_n, search, batch_limit=limit)
    first = base_params(cfg, dims)
    tokens = float(sum(suggestion.profile.lengths))
    # per token at the fastest measured batch: TimeModel.weight scales it to each trial's batch size
    rate = max(suggestion.throughput.values()) if suggestion.throughput else None
    times = TimeModel(per_token=1.0 / rate if rate else 1.0 / 150.0, throughput=dict(suggestion.throughput or {}))

    fingerprint = _fingerprint(cfg, dims, selection, metric, seed)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    study = optuna.create_study(study_name=STUDY, storage=storage, direction=_direction(metric), sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if study.user_attrs.get("fingerprint") not in (None, fingerprint):
        raise ConfigError(f"{out} holds a tune of other data, settings, folds or metric; use another --out, or "
                          "delete the folder to start over")
    study.set_user_attr("fingerprint", fingerprint)
    _restart_unfinished(study, first)
    search = _Search(study, cfg, dims, selection, out, metric, task, labels, seed, execute, clock, started, budget_s,
                     tokens, times)
    stopped = ""
    interrupted: TuneInterrupted | None = None
    set_aside = 0  # proposals in a row too long for the budget left
    try:
        while True:
            n_done = len(search.finished())
            if trials is not None and n_done >= trials:
                stopped = f"{trials} trial(s) done"
                break
            trial = study.ask()
            params = {d.name: d.sample(trial) for d in dims}
            if n_done > 0 and not search.fits(params, search.folds_to_run(params)):
                trial.set_user_attr("set_aside", True)  # never run: not reported, not asked again on resume
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                whole = search.need(params, search.folds_to_run(params))
                log.info("trial %d set aside: its %d fold(s) and the final training need about %.1f min, %.1f min "
                         "left", trial.number, search.folds_to_run(params), whole / 60, search.left() / 60)
                set_aside += 1
                if set_aside < MAX_SET_ASIDE and search.left() > 0:
                    continue
                stopped = (f"budget: {search.left() / 60:.1f} min left; the last {set_aside} proposal(s) were too "
                           f"long to finish in it (the last needed about {whole / 60:.1f} min)")
                break
            set_aside = 0
            if search.run_trial(trial, params, check_budget=n_done > 0) == BUDGET_NOTE:
                stopped = "budget: the next fold would not have fit"
                break
    except (TuneInterrupted, KeyboardInterrupt) as err:
        interrupted = err if isinstance(err, TuneInterrupted) else TuneInterrupted("tune interrupted (Ctrl-C)")
    runs, base = search.runs, search.base

    results = _trial_results(study, dims)
    complete = [t for t in results if t.state == "complete"]
    if not complete:
        if interrupted:
            raise TuneInterrupted(f"{interrupted}; no trial finished yet. Run the same command to continue") from None
        raise ConfigError("no trial finished: " + "; ".join(t.note for t in results if t.note)[:500])
    best = min(complete, key=lambda t: t.mean) if metric in LOWER_IS_BETTER else max(complete, key=lambda t: t.mean)
    baseline = next((t for t in complete if t.params == first), None)
    comparison = _compare(runs, selection, baseline, best, metric, task, labels) if baseline and baseline is not best \
        else None
    importances = _importances(study)
    result = TuneResult(out, metric, task, selection.description, results, best, baseline, comparison, importances,
                        None, None, 0.0, budget_s, stopped or ("interrupted" if interrupted else ""))
    best_cfg = build_config(copy.deepcopy(base), [f"{k}={json.dumps(v)}" for k, v in overrides(cfg, dims, best.params).items()]
                            + ['data.val_ratio=0.0', 'data.validation=null', f'train.output_dir="{out / "final"}"',
                               f'train.seed={seed}'],  # the folds' seed: --seed seeds the final run too
                            source="tune")
    rules = suggestion.rules + [Rule(d.key, best.params[d.name], f"tune: best {metric} {best.mean:.4f} +- {best.std:.4f} "
                                     f"on {selection.description} (suggest's value: {_fmt(first[d.name])})")
                                for d in dims]
    write_config(best_cfg, rules, out / "best.yaml")
    if interrupted is None and final:
        result.final_dir = out / "final"
        key = _run_key({**best.params, "final_test": str(test) if test else None}, -1)
        if key not in runs:  # a finished tune run again reuses its final model
            search.add_record({"key": key, "trial": best.number, "params": best.params, "fold": None,
                               "run_dir": str(result.final_dir),
                               "test": _final(best_cfg, result.final_dir, test, task, labels, execute)})
        result.test = runs[key]["test"]
        if ensemble:
            result.ensemble = _ensemble(search, out, best, test, task, labels, best_cfg,
                                        score_ensemble or score_tune_ensemble)
    result.wall_s = clock() - started
    write_report(result, dims, first)
    if interrupted is not None:
        raise TuneInterrupted(f"{interrupted}. Finished trials are kept in {out}; run the same command to continue "
                              f"(best so far: trial {best.number}, {metric} {best.mean:.4f})")
    return result


def score_tune_ensemble(out: Path, test: str | Path, task: str, labels: list[str] | None, cfg: Config) -> dict:
    """The cross-validation ensemble's metrics on ``test`` (written to ``eval_test_ensemble/``)."""
    from fewtune.eval.ensemble import evaluate_ensemble, tune_members
    from fewtune.workflows.sweep import _free_memory

    settings = cfg.eval.model_copy(update={"task": task, "labels": labels, "batch_size": max(8, cfg.train.batch_size),
                                           "limit": None, "format": "auto"})
    result = evaluate_ensemble(tune_members(out), test, settings, out / "eval_test_ensemble", progress=False)
    _free_memory()
    return {"metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, list))
                        and not isinstance(v, bool)}, "eval_s": result.settings["seconds"]}


def _ensemble(search: "_Search", out: Path, best: TrialResult, test: str | Path | None, task: str,
              labels: list[str] | None, cfg: Config, score: Callable[..., dict]) -> dict:
    """List the cross-validation ensemble in ensemble.json; score it on ``test`` once (kept in runs.jsonl, so a
    finished tune run again reuses the score)."""
    members = [str(out / "final")] + [str(_run_dir(out, best.params, k)) for k in range(len(search.selection.folds))]
    info: dict[str, Any] = {"members": members, "trial": best.number, "params": best.params,
                            "combined_by": "mean label probability (choice scoring) or majority vote (generation)"}
    if test is not None:
        key = _run_key({**best.params, "ensemble_test": str(test)}, -1)
        if key not in search.runs:
            log.info("scoring the cross-validation ensemble (%d models) on %s", len(members), test)
            search.add_record({"key": key, "trial": best.number, "params": best.params, "fold": None,
                               "run_dir": str(out / "eval_test_ensemble"), "ensemble": members,
                               "test": {"file": str(test), **score(out, test, task, labels, cfg)}})
        info["test"] = search.runs[key]["test"]
    (out / "ensemble.json").write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return info


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _can_beat(values: list[float], folds: int, best: float) -> bool:
    """Whether the trial's mean over all folds could still beat ``best`` with perfect scores (1) on the rest."""
    return (sum(values) + (folds - len(values)) * 1.0) / folds > best


def _restart_unfinished(study, first: dict) -> None:
    """Trials a killed process left running are closed as failed and asked again (their finished folds are
    reused); on a new study, suggest's own settings are the first trial."""
    import optuna

    states = optuna.trial.TrialState
    finished = [t.params for t in study.trials if t.state in (states.COMPLETE, states.PRUNED)]
    waiting = [t.params for t in study.trials if t.state == states.WAITING]
    if not study.trials:
        study.enqueue_trial(first)
        return
    for t in study.trials:
        if t.state == states.RUNNING:
            study.tell(t.number, state=states.FAIL)
        if t.state in (states.RUNNING, states.FAIL) and t.params and t.user_attrs.get("note") in (None, BUDGET_NOTE) \
                and not t.user_attrs.get("set_aside") and t.params not in finished and t.params not in waiting:
            study.enqueue_trial(t.params)
            waiting.append(t.params)


def _trial_results(study, dims) -> list[TrialResult]:
    import optuna

    names = {optuna.trial.TrialState.COMPLETE: "complete", optuna.trial.TrialState.PRUNED: "pruned"}
    out = []
    for t in study.trials:
        if t.state not in names and not t.user_attrs.get("note"):
            continue  # asked but never run (the budget ended the search before it)
        out.append(TrialResult(t.number, dict(t.params), names.get(t.state, "failed"),
                               list(t.user_attrs.get("fold_values", [])), float(t.user_attrs.get("seconds", 0.0)),
                               t.user_attrs.get("note", "")))
    return out


def _importances(study) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA) over the completed trials; empty with fewer than 5 (a forest fitted
    to 3 points ranks the settings by chance)."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 5:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError) as err:  # e.g. every completed trial has the same settings
        log.info("no parameter importances: %s", err)
        return {}


def _held_out(runs: dict[str, dict], trial: TrialResult, folds: int) -> list[dict] | None:
    """The trial's per-example predictions on every held-out fold, in fold order (None if one is missing)."""
    from fewtune.eval.evaluate import read_json_lines

    records = []
    for fold in range(folds):
        run = runs.get(_run_key(trial.params, fold))
        path = Path(run["run_dir"]) / "eval" / "predictions.jsonl" if run else None
        if path is None or not path.exists():
            return None
        records += read_json_lines(path)
    return records


def _compare(runs, selection: Selection, baseline: TrialResult, best: TrialResult, metric: str, task: str,
             labels: list[str] | None) -> dict | None:
    """Best minus suggest's config on the pooled held-out predictions, with a paired bootstrap interval."""
    from fewtune.eval.compare import metric_functions
    from fewtune.eval.evaluate import EvalResult
    from fewtune.eval.stats import paired_difference

    a = _held_out(runs, baseline, len(selection.folds))
    b = _held_out(runs, best, len(selection.folds))
    if not a or not b or len(a) != len(b) or task not in ("classification", "generation", "json"):
        return None
    fa = metric_functions(task, EvalResult(task, {"labels": labels}, a), labels).get(metric)
    fb = metric_functions(task, EvalResult(task, {"labels": labels}, b), labels).get(metric)
    if fa is None or fb is None:
        return None
    return {**paired_difference(fa, fb, len(a)), "n": len(a)}


def _final(cfg: Config, run_dir: Path, test: str | Path | None, task: str, labels: list[str] | None,
           execute: Callable[..., dict]) -> dict | None:
    """Train the chosen settings on all the training data; score that model on ``test`` (read only now)."""
    log.info("final training on all the training data -> %s", run_dir)
    result = execute(cfg, run_dir, str(test) if test is not None else None, task, labels)
    return {"file": str(test), **result} if test is not None else None
