"""Ensembles: several runs scored as one model on a data file (`fewtune eval A B C --data ...`).

With a few hundred examples one training run is partly luck: the seed, the data order and which
examples a cross-validation fold left out move test accuracy by a point or two. Several models
that disagree on different examples are steadier together. `fewtune tune` trains K fold models of
the winning settings anyway; with the final model they make a cross-validation ensemble at no
extra training cost (``tune --ensemble``; :func:`tune_members` lists them).

How members are combined, by task:

- classification by choice scoring: the mean over members of each label's probability (the
  softmax over the labels' summed log-probabilities, or their per-token means with ``normalize``);
  every label is scored exactly (no pruning), so the probabilities are true ones. The record's
  ``logprobs`` are the logs of the mean probabilities.
- classification by generation, generation and json: a majority vote over the members' outputs
  (stripped text); a tie goes to the output of the earliest member among the tied, so the first
  target given (for a tune: its final model) decides when no majority exists.

Members are loaded and scored one at a time (one model in memory). Each member's own results go to
``members/<k>/`` under the output folder, so its score sits next to the ensemble's.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

from fewtune.config import EvalSection
from fewtune.data.formats import load_examples
from fewtune.eval.evaluate import (EvalError, EvalResult, check_output_dir, evaluate, score_generation, score_json,
                                   write_results)
from fewtune.eval.metrics import classification_metrics
from fewtune.eval.scoring import ChoiceScore

# the metric each task reports per member in the ensemble's results (the one `tune` selects by)
MEMBER_METRIC = {"classification": "accuracy", "generation": "rougeL", "json": "field_f1"}


def vote(outputs: Sequence[str]) -> int:
    """Index of the member whose output wins the majority vote (stripped text); ties: the earliest member."""
    keys = [o.strip() for o in outputs]
    counts = Counter(keys)
    top = max(counts.values())
    return next(i for i, k in enumerate(keys) if counts[k] == top)


def label_probabilities(record: dict, labels: Sequence[str], normalize: bool) -> list[float]:
    """One member's probability of each label for one example, from its choice-scoring record."""
    if record.get("bounded"):
        raise EvalError("an ensemble needs every label scored exactly; this record kept upper bounds for "
                        f"{', '.join(record['bounded'])}")
    return ChoiceScore([record["logprobs"][lab] for lab in labels],
                       [record["n_tokens"][lab] for lab in labels]).probabilities(normalize)


def mean_probabilities(per_member: Sequence[Sequence[float]]) -> tuple[list[float], int]:
    """The members' label probabilities averaged, and the index of the highest mean (ties: the earlier label)."""
    mean = [sum(col) / len(per_member) for col in zip(*per_member)]
    return mean, max(range(len(mean)), key=lambda j: (mean[j], -j))


def combine(task: str, members: Sequence[EvalResult], examples, normalize: bool = False) -> tuple[dict, list[dict]]:
    """The ensemble's metrics and per-example records from its members' results on the same examples."""
    first = members[0]
    n = len(first.predictions)
    if any(len(m.predictions) != n for m in members):
        raise EvalError("the members scored different numbers of examples; give them the same data and limit")
    if task == "classification" and first.metrics.get("mode") == "choice":
        labels = list(first.metrics["labels"])
        if any(list(m.metrics["labels"]) != labels for m in members):
            raise EvalError("the members were scored on different label sets")
        records = []
        for i in range(n):
            mean, best = mean_probabilities([label_probabilities(m.predictions[i], labels, normalize) for m in members])
            rec = first.predictions[i]
            records.append({"index": i, "line": rec["line"], "input": rec["input"], "expected": rec["expected"],
                            "predicted": labels[best], "correct": labels[best] == rec["expected"],
                            "probability": round(mean[best], 4),
                            "logprobs": {lab: round(math.log(max(p, 1e-300)), 4) for lab, p in zip(labels, mean)},
                            "members": [m.predictions[i]["predicted"] for m in members]})
        metrics = classification_metrics([r["expected"] for r in records], [r["predicted"] for r in records], labels)
        metrics.update({"mode": "choice", "labels": labels, "length_normalized": normalize})
        return metrics, records
    # a vote: classification by generation, generation, json
    winners = [vote([m.predictions[i]["predicted"] for m in members]) for i in range(n)]
    if task == "classification":
        labels = list(first.metrics["labels"])
        records = []
        for i, w in enumerate(winners):
            rec = members[w].predictions[i]
            records.append({**rec, "index": i, "members": [m.predictions[i]["predicted"] for m in members]})
        metrics = classification_metrics([r["expected"] for r in records], [r["predicted"] for r in records], labels)
        metrics.update({"mode": first.metrics.get("mode"), "labels": labels, "length_normalized": None})
        return metrics, records
    outputs = [members[w].predictions[i]["predicted"] for i, w in enumerate(winners)]
    metrics, records = (score_json if task == "json" else score_generation)(examples, outputs)
    for i, rec in enumerate(records):
        rec["voted_for"] = winners[i]
    return metrics, records


def evaluate_ensemble(targets: Sequence[str], data: str | Path, settings: EvalSection | None = None,
                      output_dir: str | Path | None = None, progress: bool = True) -> EvalResult:
    """Score ``targets`` (run directories or models) as one ensemble on ``data``; each member is evaluated as
    `fewtune eval` would (its own template and system prompt), then combined (see the module notes)."""
    targets = [str(t) for t in targets]
    if len(targets) < 2:
        raise EvalError("an ensemble needs at least two runs or models")
    if len(set(targets)) != len(targets):
        raise EvalError("a run is given twice: each ensemble member once")
    s = settings or EvalSection()
    check_output_dir(output_dir)
    if s.task == "perplexity" or (s.task is None and Path(data).suffix.lower() == ".txt"):
        raise EvalError("an ensemble is scored on a task set (classification, generation, json), not perplexity")
    members: list[EvalResult] = []
    for k, target in enumerate(targets):
        sub = Path(output_dir) / "members" / str(k) if output_dir is not None else None
        members.append(evaluate(target, data, s, sub, progress=progress, exact=True))
    task = members[0].task
    if any(m.task != task for m in members):
        raise EvalError(f"the members were scored as different tasks ({', '.join(m.task for m in members)}); "
                        "give --task")
    examples = None
    if task in ("generation", "json"):  # voted outputs are scored against the examples' references
        examples = load_examples(data, s.format)
        examples = examples[:s.limit] if s.limit else examples
    metrics, records = combine(task, members, examples, bool(s.normalize))
    metric = MEMBER_METRIC[task]
    metrics["members"] = [{"target": t, metric: m.metrics.get(metric), "seconds": m.settings.get("seconds")}
                          for t, m in zip(targets, members)]
    metrics["combined_by"] = ("mean label probability" if task == "classification" and metrics.get("mode") == "choice"
                              else "majority vote (ties: the earliest member)")
    seconds = sum(m.settings.get("seconds") or 0.0 for m in members)
    settings_used = {**members[0].settings, "target": "ensemble of " + ", ".join(targets), "members": targets,
                     "seconds": round(seconds, 2),
                     "examples_per_s": round(len(records) / seconds, 2) if seconds > 0 else None}
    result = EvalResult(task, metrics, records, settings_used)
    if output_dir is not None:
        result.output_dir = write_results(result, output_dir)
        (Path(output_dir) / "members.json").write_text(json.dumps(targets, ensure_ascii=False, indent=2) + "\n",
                                                        encoding="utf-8")
    return result


def tune_members(tune_dir: str | Path) -> list[str]:
    """A finished tune's cross-validation ensemble: its final model first, then the winning trial's K fold models
    in fold order, read from the tune's ``runs.jsonl``. EvalError when the final model is not trained yet, or
    when the tune selected on a dev file (one run of the winning settings, on the same data as the final one)."""
    from fewtune.eval.evaluate import read_json_lines

    tune_dir = Path(tune_dir)
    runs_file, final = tune_dir / "runs.jsonl", tune_dir / "final"
    if not runs_file.exists():
        raise EvalError(f"{tune_dir} is not a tune folder (no runs.jsonl)")
    records = read_json_lines(runs_file)
    finals = [r for r in records if r.get("fold") is None and Path(r["run_dir"]) == final]
    if not finals or not (final / "summary.json").exists():
        raise EvalError(f"{tune_dir}: the final model has not been trained yet (run the tune to its end)")
    params = finals[-1]["params"]
    folds = {r["fold"]: r["run_dir"] for r in records if r.get("fold") is not None and r.get("params") == params}
    if len(folds) < 2:
        raise EvalError(f"{tune_dir} selected on a dev file: no fold models of the winning settings to ensemble "
                        "(the ensemble needs k-fold selection)")
    missing = [d for d in folds.values() if not (Path(d) / "summary.json").exists()]
    if missing:
        raise EvalError(f"fold run {missing[0]} is missing or unfinished: the ensemble needs every fold model")
    return [str(final)] + [folds[k] for k in sorted(folds)]
