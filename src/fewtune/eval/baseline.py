"""Should I fine-tune at all? Zero-shot and K-shot prompting of the base model against a fine-tuned run.

`fewtune baseline TRAIN --test TEST [--run RUN]` evaluates, on one test set and with one precision:
the base model zero-shot and with K in-context examples from TRAIN for each K of ``--shots`` (the same
draw rule as ``eval --shots``: stratified for classification, seeded, never a test input), and the
fine-tuned run when given. The table gives each setting's headline metric with its 95% bootstrap
interval; the advice compares the fine-tuned run with the best prompt on the same examples (paired
bootstrap): fine-tune when the run is better beyond the interval, keep the prompt when it is worse,
and say so when the two cannot be told apart.

The prompt stays close to the training prompt: the base model gets the run's system prompt (from its
template) unless ``--system``/``--prompt-file`` gives another, and the run's own chat template.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from fewtune.config import EvalSection
from fewtune.data.formats import DataError, load_examples
from fewtune.eval.evaluate import EvalError, EvalResult, detect_task, evaluate, expected_label, prompt_of
from fewtune.eval.stats import bootstrap_interval, paired_difference
from fewtune.generate import check_run_dir, check_target, load_for_inference

log = logging.getLogger(__name__)

HEADLINE = {"classification": "accuracy", "generation": "rougeL", "json": "exact_match"}


@dataclass
class Baseline:
    task: str
    metric: str
    rows: list[dict] = field(default_factory=list)  # setting, value, interval, seconds, output
    advice: str = ""
    comparison: dict | None = None
    model: str = ""
    run: str | None = None

    def to_dict(self) -> dict:
        return {"task": self.task, "metric": self.metric, "model": self.model, "run": self.run, "rows": self.rows,
                "comparison": self.comparison, "advice": self.advice}


def _fmt(row: dict) -> str:
    iv = row["interval"]
    return f"{row['value']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"


def advise(rows: list[dict], comparison: dict | None, metric: str) -> str:
    prompting = [r for r in rows if r["kind"] == "prompt"]
    best = max(prompting, key=lambda r: r["value"])
    reach = f"{best['setting']} reaches {best['value']:.2f} {metric}"
    if comparison is None:
        return f"{reach}; give --run RUN (a fine-tuned run) to see whether fine-tuning beats it."
    d, iv = comparison["difference"], comparison["interval"]
    gap = f"fine-tuning {d:+.2f} [{iv['low']:+.2f}, {iv['high']:+.2f}]"
    if iv["low"] > 0:
        return f"{reach}; {gap}: fine-tune."
    if iv["high"] < 0:
        return f"{reach}; {gap}: the prompt is better than this run; keep prompting (or fix the training)."
    return (f"{reach}; {gap}: no difference this test set can show; the prompt is cheaper to run and maintain, "
            "fine-tune only for other reasons (latency, context length, format control).")


def baseline(train_file: str | Path, test_file: str | Path, model: str | None = None, run: str | None = None,
             shots: list[int] = (0, 1, 4, 8), settings: EvalSection | None = None,
             output_dir: str | Path | None = None, progress: bool = True) -> Baseline:
    s = settings or EvalSection()
    if not shots or any(k < 0 for k in shots):
        raise EvalError("--shots takes counts >= 0, e.g. 0,1,4,8")
    train_file, test_file = Path(train_file), Path(test_file)
    for path, what in ((train_file, "training"), (test_file, "test")):
        if not path.is_file():
            raise DataError(str(path), None, f"{what} file: " + ("is a directory" if path.is_dir() else "file not found"))
    run_cfg, run_template = (check_run_dir(run) if run is not None else (None, None))
    model = model or (run_cfg.model.name if run_cfg is not None else None)
    if model is None:
        from fewtune.models import DEFAULT_MODEL

        model = DEFAULT_MODEL
    check_target(model)
    test = load_examples(test_file, s.format)
    task = s.task or detect_task(test_file, test)
    if task == "perplexity":
        raise EvalError("baseline compares task metrics: give a classification, generation or JSON test set")
    labels = s.labels
    if task == "classification" and not labels:
        labels = sorted({expected_label(e) for e in test + load_examples(train_file, s.format)})
    system_prompt = prompt_of(s)
    if system_prompt is None and run_template is not None:
        system_prompt = run_template.system_prompt  # prompt the base model as the run was trained
    template_kind = run_template.kind if run_template is not None else "auto"
    out = Path(output_dir) if output_dir is not None else None
    common = s.model_copy(update={"task": task, "labels": labels, "shots_from": str(train_file), "prompt_file": None,
                                  "system_prompt": None})
    result = Baseline(task, HEADLINE[task], model=model, run=run)
    loaded = load_for_inference(model, template_kind=template_kind, system_prompt=system_prompt, merge=True,
                                precision=s.precision)
    evaluated: list[tuple[dict, EvalResult]] = []
    for k in shots:
        name = "zero-shot" if k == 0 else f"{k}-shot"
        log.info("baseline: %s on %s", name, model)
        res = evaluate(loaded, test_file, common.model_copy(update={"shots": k}),
                       out / name if out else None, progress=progress)
        evaluated.append(({"setting": name, "kind": "prompt", "shots": k}, res))
    precision = loaded.precision
    del loaded
    if run is not None:
        tuned = load_for_inference(run, merge=True, precision=precision if s.precision == "auto" else s.precision)
        res = evaluate(tuned, test_file, common.model_copy(update={"shots": 0}), out / "fine-tuned" if out else None,
                       progress=progress)
        evaluated.append(({"setting": "fine-tuned", "kind": "run", "shots": 0}, res))
    from fewtune.eval.compare import metric_functions

    n = len(evaluated[0][1].predictions)
    functions = []
    for row, res in evaluated:
        fn = metric_functions(task, res, labels)[result.metric]
        functions.append(fn)
        row.update(value=float(res.metrics[result.metric]),
                   interval=bootstrap_interval(fn, n, s.n_resamples).as_dict(),
                   seconds=res.settings.get("seconds"), shot_lines=res.settings.get("shot_lines", []))
        result.rows.append(row)
    if run is not None:
        prompts = [i for i, r in enumerate(result.rows) if r["kind"] == "prompt"]
        best = max(prompts, key=lambda i: result.rows[i]["value"])
        result.comparison = {"against": result.rows[best]["setting"],
                             **paired_difference(functions[best], functions[-1], n, s.n_resamples)}
    result.advice = advise(result.rows, result.comparison, result.metric)
    if out is not None:
        write_baseline(result, out, test_file, n)
    return result


def markdown(result: Baseline, test_file: str | Path, n: int) -> str:
    lines = [f"# Prompting baseline: {result.model}" + (f" vs {result.run}" if result.run else ""), "",
             f"Test set: `{test_file}` ({n} examples), task {result.task}; {result.metric} with its 95% bootstrap "
             "interval.", "",
             f"| setting | {result.metric} [95% interval] | seconds |", "|---|---|---:|"]
    for row in result.rows:
        lines.append(f"| {row['setting']} | {_fmt(row)} | {row['seconds']} |")
    lines += ["", f"**Advice:** {result.advice}", ""]
    return "\n".join(lines)


def write_baseline(result: Baseline, out: Path, test_file: str | Path, n: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "baseline.json").write_text(json.dumps({**result.to_dict(), "test": str(test_file), "n": n},
                                                  ensure_ascii=False, indent=2), encoding="utf-8")
    (out / "baseline.md").write_text(markdown(result, test_file, n), encoding="utf-8")
