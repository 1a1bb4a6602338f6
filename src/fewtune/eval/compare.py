"""`fewtune compare A B [C ...]`: the same examples through several models, differences with intervals.

The first target is the baseline. For every other target and every metric of the task,
the table gives both values, the difference (target - baseline) and its 95% paired
bootstrap interval; accuracy also gets McNemar's exact test. Examples where the two
disagree are listed. With a general-ability file, perplexity there shows what
fine-tuning cost outside the task (forgetting).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fewtune.config import EvalSection
from fewtune.data.formats import DataError, load_examples
from fewtune.eval.evaluate import (EvalError, EvalResult, check_output_dir, detect_task, evaluate, expected_label,
                                   prompt_of)
from fewtune.eval.stats import bootstrap_interval, f1_codes, mcnemar, paired_difference
from fewtune.eval.text_metrics import bleu_from_statistics, bleu_statistics, bleu_tokenizer
from fewtune.generate import check_target, looks_like_run_dir, load_for_inference, read_template
from fewtune import precision as machine_precision
from fewtune.inference_precision import trained_precision

log = logging.getLogger(__name__)

# metrics compared per task (name -> higher is better, always here)
TASK_METRICS = {
    "classification": ("accuracy", "macro_f1", "weighted_f1"),
    "generation": ("rouge1", "rouge2", "rougeL", "bleu", "exact_match"),
    "json": ("json_valid", "exact_match", "field_f1"),
}


def metric_functions(task: str, result: EvalResult, labels: Sequence[str] | None = None) -> dict[str, Callable]:
    """For each compared metric, a function from example indices to the metric on those examples."""
    recs = result.predictions
    if task == "classification":
        labels = list(labels or result.metrics["labels"])
        code = {lab: i for i, lab in enumerate(labels)}
        exp = np.array([code[r["expected"]] for r in recs])
        pred = np.array([code.get(r["predicted"], len(labels)) for r in recs])
        correct = exp == pred
        return {"accuracy": lambda i: float(correct[i].mean()),
                "macro_f1": lambda i: f1_codes(exp[i], pred[i], len(labels), "macro"),
                "weighted_f1": lambda i: f1_codes(exp[i], pred[i], len(labels), "weighted")}
    if task == "generation":
        cols = {k: np.array([r[k] for r in recs], dtype=float) for k in ("rouge1", "rouge2", "rougeL")}
        exact = np.array([float(r["exact"]) for r in recs])
        refs = [r["expected"] for r in recs]
        stats = bleu_statistics([r["predicted"] for r in recs], refs, bleu_tokenizer(refs))
        out = {k: (lambda i, v=v: float(v[i].mean())) for k, v in cols.items()}
        out["bleu"] = lambda i: bleu_from_statistics(stats[i].sum(axis=0))
        out["exact_match"] = lambda i: float(exact[i].mean())
        return out
    if task == "json":
        valid = np.array([float(r["valid"]) for r in recs])
        exact = np.array([float(r["exact"]) for r in recs])
        counts = np.array([[r["field_tp"], r["field_pred"], r["field_ref"]] for r in recs], dtype=float)

        def field_f1(i):
            tp, n_pred, n_ref = counts[i].sum(axis=0)
            return 2 * tp / (n_pred + n_ref) if n_pred + n_ref else 0.0

        return {"json_valid": lambda i: float(valid[i].mean()), "exact_match": lambda i: float(exact[i].mean()),
                "field_f1": field_f1}
    raise ValueError(f"cannot compare task {task!r}")


def perplexity_function(result: EvalResult) -> Callable:
    nll = np.array([r["nll"] for r in result.predictions])
    tokens = np.array([r["tokens"] for r in result.predictions])
    return lambda i: math.exp(nll[i].sum() / tokens[i].sum())


def _name(target: str, taken: set[str]) -> str:
    base = Path(target).name or target
    base = re.sub(r"[^\w.-]+", "_", base)
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


def shared_system_prompt(targets: Sequence[str]) -> str | None:
    """The system prompt of the first run directory among the targets (plain models get it too)."""
    for t in targets:
        if looks_like_run_dir(t):
            prompt = read_template(Path(t) / "template.json").system_prompt
            if prompt:
                return prompt
    return None


def compare(targets: Sequence[str], data: str | Path, settings: EvalSection | None = None,
            output_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Evaluate every target on the same examples as ``settings`` say (with ``settings.general``: perplexity on
    that set too) and compare each with the first. Returns (and writes, into ``output_dir``) a dict."""
    s = settings or EvalSection()
    if len(targets) < 2:
        raise EvalError("compare needs at least two models or runs")
    for target in targets:  # every one checked before the first is evaluated
        check_target(str(target))
    general = s.general
    if general is not None and not Path(general).is_file():
        raise DataError(str(general), None, "is a directory, not a data file" if Path(general).is_dir()
                        else "file not found")
    check_output_dir(output_dir)
    examples = None if Path(data).suffix.lower() == ".txt" else load_examples(data, s.format)
    task = s.task or detect_task(data, examples)
    if task == "perplexity":
        raise EvalError("compare a perplexity set with --general; --data must be a task set")
    labels = s.labels
    if task == "classification" and not labels:
        labels = sorted({expected_label(e) for e in examples})
    system_prompt = prompt_of(s)
    if system_prompt is None:
        system_prompt = shared_system_prompt(targets)
    if s.shots and s.shots_from is None:  # every model gets the same shots: from the first run's training file
        from fewtune.generate import check_run_dir

        runs = [t for t in targets if looks_like_run_dir(t)]
        if runs:
            s = s.model_copy(update={"shots_from": check_run_dir(runs[0], for_inference=False)[0].data.train})
    taken: set[str] = set()
    names = [_name(t, taken) for t in targets]
    out = Path(output_dir) if output_dir else None
    on_task = s.model_copy(update={"task": task, "labels": labels})
    # the general set: perplexity of every window or example, whatever the task set's format
    on_general = s.model_copy(update={"task": "perplexity", "labels": None, "limit": s.general_limit,
                                      "batch_size": max(1, s.batch_size // 2), "format": "auto", "shots": 0})
    results: list[EvalResult] = []
    general_results: list[EvalResult] = []
    # one precision for every model compared: the differences are then the models', not the arithmetic's
    precision = shared_precision(s.precision, targets)
    for target, name in zip(targets, names):
        loaded = load_for_inference(str(target), system_prompt=None if looks_like_run_dir(target) else system_prompt,
                                    merge=True, precision=precision)
        if precision == "auto":
            precision = loaded.precision  # the first model's (measured) choice holds for the rest
        log.info("evaluating %s", target)
        results.append(evaluate(loaded, data, on_task, out / "models" / name if out else None, progress=progress))
        if general:
            general_results.append(evaluate(loaded, general, on_general,
                                            out / "models" / name / "general" if out else None, progress=progress))
        del loaded
        gc.collect()
    report = compare_results(results, names, labels, general_results, s.n_resamples, s.show)
    report.update({"data": str(data), "targets": list(map(str, targets)), "system_prompt": system_prompt})
    if general:
        report["general_data"] = str(general)
    if out:
        write_compare(report, out)
    return report


def write_compare(report: dict, output_dir: str | Path) -> Path:
    """compare.json and compare.md into the folder (which `fewtune report` reads)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["output_dir"] = str(out)
    (out / "compare.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    (out / "compare.md").write_text(compare_markdown(report), encoding="utf-8")
    return out


def compare_results(results: Sequence[EvalResult], names: Sequence[str], labels: Sequence[str] | None = None,
                    general_results: Sequence[EvalResult] = (), n_resamples: int = 1000, show: int = 20) -> dict:
    """The comparison of evaluation results on the same examples (the first is the baseline)."""
    task = results[0].task
    n = len(results[0].predictions)
    if any(r.task != task or len(r.predictions) != n for r in results):
        raise EvalError("compared results must be of one task on the same examples")
    labels = labels or results[0].metrics.get("labels")
    report: dict = {"task": task, "data": results[0].settings.get("data"), "n": n, "names": list(names),
                    "baseline": names[0], "mode": results[0].metrics.get("mode"), "n_resamples": n_resamples,
                    "metrics": {name: r.metrics for name, r in zip(names, results)},
                    "seconds": {name: r.settings.get("seconds") for name, r in zip(names, results)},
                    "comparisons": []}
    base_fns = metric_functions(task, results[0], labels)
    report["intervals"] = {}  # each model's own 95% interval per metric (for before/after bars)
    for name, res in zip(names, results):
        fns = metric_functions(task, res, labels)
        report["intervals"][name] = {m: bootstrap_interval(fns[m], n, n_resamples).as_dict() for m in TASK_METRICS[task]}
    for name, res in zip(names[1:], results[1:]):
        fns = metric_functions(task, res, labels)
        row: dict = {"a": names[0], "b": name, "metrics": {}}
        for metric in TASK_METRICS[task]:
            row["metrics"][metric] = paired_difference(base_fns[metric], fns[metric], n, n_resamples)
        if task == "classification":
            row["mcnemar"] = mcnemar([r["correct"] for r in results[0].predictions], [r["correct"] for r in res.predictions])
        disagree = [(a, b) for a, b in zip(results[0].predictions, res.predictions) if a["predicted"] != b["predicted"]]
        row["disagreements"] = len(disagree)
        row["disagreement_examples"] = [{"index": a["index"], "line": a.get("line"), "input": a["input"],
                                         "expected": a["expected"], names[0]: a["predicted"], name: b["predicted"]}
                                        for a, b in disagree[:show]]
        if general_results:
            g_a, g_b = general_results[0], general_results[names.index(name)]
            row["general"] = {"data": g_b.settings.get("data"), "unit": g_a.metrics["unit"],
                              "perplexity": paired_difference(perplexity_function(g_a), perplexity_function(g_b),
                                                              len(g_a.predictions), n_resamples)}
        report["comparisons"].append(row)
    if general_results:
        report["general"] = {name: g.metrics for name, g in zip(names, general_results)}
    return report


def _fmt(value: float, metric: str) -> str:
    return f"{value:.2f}" if metric in ("bleu", "perplexity") else f"{value:.3f}"


def compare_markdown(report: dict, show: int = 10) -> str:
    """The comparison as Markdown tables: metric, baseline, other, difference [95% CI]."""
    lines = [f"Task **{report['task']}** on `{report['data']}` ({report['n']} examples; "
             f"95% paired bootstrap intervals, {report['n_resamples']} resamples; baseline `{report['baseline']}`).", ""]
    for row in report["comparisons"]:
        lines += [f"| metric | {row['a']} | {row['b']} | difference | 95% CI | |", "|---|---:|---:|---:|---|---|"]
        for metric, d in row["metrics"].items():
            ci = d["interval"]
            lines.append(f"| {metric} | {_fmt(d['a'], metric)} | {_fmt(d['b'], metric)} | {d['difference']:+.3f} | "
                         f"[{ci['low']:+.3f}, {ci['high']:+.3f}] | {'significant' if d['significant'] else 'within noise'} |")
        if "general" in row:
            d = row["general"]["perplexity"]
            ci = d["interval"]
            lines.append(f"| perplexity on general set (lower is better) | {d['a']:.2f} | {d['b']:.2f} | "
                         f"{d['difference']:+.2f} | [{ci['low']:+.2f}, {ci['high']:+.2f}] | "
                         f"{'significant' if d['significant'] else 'within noise'} |")
        lines.append("")
        if "mcnemar" in row:
            m = row["mcnemar"]
            lines.append(f"McNemar's exact test: only {row['a']} right on {m['only_a_correct']}, only {row['b']} right "
                         f"on {m['only_b_correct']}; p = {m['p_value']:.3g}.")
        lines.append(f"The two disagree on {row['disagreements']} of {report['n']} examples.")
        if row["disagreement_examples"]:
            lines += ["", f"| line | input | expected | {row['a']} | {row['b']} |", "|---:|---|---|---|---|"]
            for ex in row["disagreement_examples"][:show]:
                cells = [str(ex.get("line", "")), ex["input"], ex["expected"], ex[row["a"]], ex[row["b"]]]
                lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")[:120] for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def shared_precision(setting: str, targets) -> str:
    """One precision for models compared side by side: ``setting`` unless auto; under auto what forces it
    (FEWTUNE_MIXED_PRECISION), else the first run directory's training precision (as
    fewtune.inference_precision.resolve would give it here), else auto (the caller then holds the first model's choice for the rest)."""
    import torch

    if setting != "auto" or machine_precision.forced_precision() is not None:
        return setting
    cpu = not torch.cuda.is_available()
    for target in targets:
        if looks_like_run_dir(target) and (trained := trained_precision(target)) is not None:
            if trained == "fp16" and cpu:
                return "bf16"
            if trained == "bf16" and cpu:
                return "no" if machine_precision.cpu_bf16_speedup() < machine_precision.LINEAR_FLOOR else "bf16"
            return trained
    return "auto"
