"""`fewtune eval`: task metrics for a model or run on a data file, with the training template.

Tasks: ``classification`` (choice scoring or generation), ``generation`` (ROUGE, BLEU,
exact match), ``json`` (validity, exact match, field-level P/R/F1) and ``perplexity``
(plain text windows, or the assistant turns of a data file). Every prompt comes from
``render_conversation``, the function training uses. Writes ``results.json`` (every
metric, settings, timing) and ``predictions.jsonl`` (one line per example).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fewtune.config import EVAL_TASKS, EvalSection, GenerateSection
from fewtune.data.formats import DataError, Example, load_examples
from fewtune.data.render import render_conversation
from fewtune.eval.metrics import (classification_metrics, json_example_scores, json_task_metrics,
                                  map_to_label, parse_json)
from fewtune.eval.scoring import choice_scores, image_choice_scores, label_continuation, sequence_nll, text_windows
from fewtune.eval.text_metrics import generation_metrics, rouge_scores
from fewtune.generate import Loaded, check_target, generate, load_for_inference

log = logging.getLogger(__name__)

TASKS = EVAL_TASKS
MODES = ("choice", "generate")


class EvalError(ValueError):
    """A bad evaluation request (unknown task or mode, nothing to compare, ...), worded for the user."""


@dataclass
class EvalResult:
    task: str
    metrics: dict[str, Any]
    predictions: list[dict] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    output_dir: Path | None = None


# ---------------------------------------------------------------- inputs


def expected_label(example: Example) -> str:
    label = example.label if example.label is not None else example.reference
    if label is None:
        raise DataError(example.source, example.line, "classification needs a `label` or a final assistant turn", "label")
    return str(label)


def detect_task(path: str | Path, examples: Sequence[Example] | None) -> str:
    if Path(path).suffix.lower() == ".txt":
        return "perplexity"
    assert examples is not None
    if examples and all(e.is_text for e in examples):  # raw documents (format text): how well the model predicts them
        return "perplexity"
    if all(e.label is not None for e in examples):
        return "classification"
    if all(e.reference is not None for e in examples):
        refs_json = [parse_json(e.reference) for e in examples]
        if all(ok and isinstance(v, (dict, list)) for ok, v in refs_json):
            return "json"
        return "generation"
    first = next(e for e in examples if e.reference is None)
    raise DataError(first.source, first.line, "no expected output (final assistant turn) to evaluate against; "
                    "give --task perplexity for plain text")


def _references(examples: Sequence[Example]) -> list[str]:
    refs = []
    for e in examples:
        if e.reference is None:
            raise DataError(e.source, e.line, "no expected output: the example must end with an assistant turn")
        refs.append(e.reference)
    return refs


# ---------------------------------------------------------------- tasks on examples


def classify(loaded: Loaded, examples: Sequence[Example], labels: Sequence[str], mode: str = "choice",
             batch_size: int = 8, normalize: bool = False, max_new_tokens: int | None = None,
             progress: bool = True, exact: bool = False) -> tuple[dict, list[dict]]:
    """Classification metrics and per-example records, by choice scoring or by generation.

    ``exact``: choice scoring gives every label its full log-probability (by default labels that cannot win
    keep an upper bound, listed in the record's ``bounded``): what an ensemble's averaged probabilities need."""
    if mode not in MODES:
        raise EvalError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    expected = [expected_label(e) for e in examples]
    labels = list(labels)
    missing = sorted(set(expected) - set(labels))
    if missing:
        first = next(e for e, x in zip(examples, expected) if x in missing)
        raise DataError(first.source, first.line, f"label {expected[examples.index(first)]!r} is not among the "
                        f"candidate labels ({', '.join(labels)})", "label")
    records: list[dict] = []
    conversations = [e.prompt_messages for e in examples]
    if mode == "choice":
        # only the winner counts here, so labels that provably cannot win are not scored in full
        if loaded.vision is not None and any(m.images for c in conversations for m in c):
            scores = image_choice_scores(loaded.model, loaded.tokenizer, loaded.template, loaded.vision,
                                         conversations, labels, progress=progress)
        else:
            scores = choice_scores(loaded.model, loaded.tokenizer, loaded.template, conversations, labels,
                                   batch_size=batch_size, progress=progress, prune=not exact, normalize=normalize)
        for i, (example, score) in enumerate(zip(examples, scores)):
            predicted = labels[score.best(normalize)]
            records.append({"index": i, "line": example.line, "input": example.input_text, "expected": expected[i],
                            "predicted": predicted, "correct": predicted == expected[i],
                            "logprobs": {lab: round(lp, 4) for lab, lp in zip(labels, score.logprobs)},
                            "n_tokens": dict(zip(labels, score.n_tokens)),
                            # labels left at their upper bound (first token only): they could not win
                            "bounded": [lab for lab, ok in zip(labels, score.exact or []) if not ok]})
    else:
        if max_new_tokens is None:
            longest = max(len(label_continuation(conversations[0], lab, loaded.tokenizer, loaded.template,
                                                 vision=loaded.vision)) for lab in labels)
            max_new_tokens = longest + 16
        gen = GenerateSection(max_new_tokens=max_new_tokens, batch_size=batch_size)
        outputs = generate(loaded, conversations, gen, progress=progress, names=_names(examples))
        for i, (example, out) in enumerate(zip(examples, outputs)):
            predicted, how = map_to_label(out[0], labels)
            records.append({"index": i, "line": example.line, "input": example.input_text, "expected": expected[i],
                            "predicted": predicted, "correct": predicted == expected[i], "output": out[0],
                            "mapped_by": how})
    metrics = classification_metrics(expected, [r["predicted"] for r in records], labels)
    metrics.update({"mode": mode, "labels": labels, "length_normalized": normalize if mode == "choice" else None})
    return metrics, records


def _names(examples: Sequence[Example]) -> list[str]:
    """How a prompt too long for the model is named in the error: its file and line."""
    return [f"{e.source} line {e.line}" if e.line else f"{e.source} example {i + 1}"
            for i, e in enumerate(examples)]


def _generate_outputs(loaded: Loaded, examples: Sequence[Example], gen: GenerateSection, progress: bool) -> list[str]:
    return [o[0] for o in generate(loaded, [e.prompt_messages for e in examples], gen, progress=progress,
                                   names=_names(examples))]


def generation_task(loaded: Loaded, examples: Sequence[Example], gen: GenerateSection,
                    progress: bool = True) -> tuple[dict, list[dict]]:
    return score_generation(examples, _generate_outputs(loaded, examples, gen, progress))


def score_generation(examples: Sequence[Example], preds: Sequence[str]) -> tuple[dict, list[dict]]:
    """Generation metrics and per-example records of outputs ``preds`` against the examples' references."""
    refs = _references(examples)
    metrics = generation_metrics(preds, refs)
    rouge = rouge_scores(preds, refs)
    records = [{"index": i, "line": e.line, "input": e.input_text, "expected": r, "predicted": p,
                "exact": p.strip() == r.strip(), **{k: round(float(v[i]), 4) for k, v in rouge.items()}}
               for i, (e, r, p) in enumerate(zip(examples, refs, preds))]
    return metrics, records


def json_task(loaded: Loaded, examples: Sequence[Example], gen: GenerateSection,
              progress: bool = True) -> tuple[dict, list[dict]]:
    for e, r in zip(examples, _references(examples)):  # a bad reference is refused before anything generates
        if not parse_json(r)[0]:
            raise DataError(e.source, e.line, "the expected output is not valid JSON", "reference")
    return score_json(examples, _generate_outputs(loaded, examples, gen, progress))


def score_json(examples: Sequence[Example], preds: Sequence[str]) -> tuple[dict, list[dict]]:
    """JSON-task metrics and per-example records of outputs ``preds`` against the examples' references."""
    refs = _references(examples)
    metrics = json_task_metrics(preds, refs)
    records = []
    for i, (e, r, p) in enumerate(zip(examples, refs, preds)):
        s = json_example_scores(p, r)
        records.append({"index": i, "line": e.line, "input": e.input_text, "expected": r, "predicted": p,
                        "valid": s["valid"], "exact": s["exact"], "field_tp": s["tp"], "field_pred": s["n_pred"],
                        "field_ref": s["n_ref"]})
    return metrics, records


def perplexity_task(loaded: Loaded, path: str | Path, limit: int | None, batch_size: int = 4, window: int = 256,
                    fmt: str = "auto", progress: bool = True) -> tuple[dict, list[dict]]:
    """Perplexity of a plain-text file (windows of ``window`` tokens) or of a data file's assistant turns."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(str(path), None, "file not found")
        items = text_windows(path.read_text(encoding="utf-8"), loaded.tokenizer, window)
        if not items:
            raise DataError(str(path), None, "the text is empty")
        unit = "window"
    else:
        items = []
        for e in load_examples(path, fmt):
            r = render_conversation(e, loaded.tokenizer, loaded.template)
            if sum(r.loss_weights[1:]) <= 0:
                raise DataError(e.source, e.line, "no assistant tokens to score")
            items.append((r.input_ids, r.loss_weights))
        unit = "example"
    items = items[:limit] if limit else items
    records, nll, tokens = [], 0.0, 0.0
    for i, s in enumerate(sequence_nll(loaded.model, items, batch_size=batch_size, progress=progress)):
        records.append({"index": i, "nll": round(s.nll, 4), "tokens": s.tokens})
        nll, tokens = nll + s.nll, tokens + s.tokens
    metrics = {"n": len(items), "unit": unit, "tokens": tokens, "mean_nll": nll / tokens,
               "perplexity": math.exp(nll / tokens), "window": window if unit == "window" else None}
    return metrics, records


def task_metrics(loaded: Loaded, examples: Sequence[Example], settings: EvalSection, gen: GenerateSection | None = None,
                 progress: bool = True, exact: bool = False) -> tuple[dict, list[dict]]:
    """The metrics of ``settings.task`` on already loaded examples (what `evaluate` and the trainer call).

    ``settings.labels`` None: the examples' own; ``settings.max_new_tokens`` None: the longest label + 16 for
    classification, ``gen``'s otherwise."""
    task, batch_size, max_new_tokens = settings.task, settings.batch_size, settings.max_new_tokens
    if task == "classification":
        labels = settings.labels or sorted({expected_label(e) for e in examples})
        return classify(loaded, examples, labels, settings.mode, batch_size, settings.normalize, max_new_tokens,
                        progress, exact)
    gen = (gen or GenerateSection()).model_copy(update={"temperature": 0.0, "num_return_sequences": 1,
                                                         "batch_size": batch_size})
    if max_new_tokens is not None:
        gen.max_new_tokens = max_new_tokens
    if task == "generation":
        return generation_task(loaded, examples, gen, progress)
    if task == "json":
        return json_task(loaded, examples, gen, progress)
    raise EvalError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")


# ---------------------------------------------------------------- the stage function


def _as_loaded(target: str | Loaded, system_prompt: str | None, precision: str = "auto") -> Loaded:
    if isinstance(target, Loaded):
        return target
    return load_for_inference(str(target), system_prompt=system_prompt, merge=True, precision=precision)


def evaluate(target: str | Loaded, data: str | Path, settings: EvalSection | None = None,
             output_dir: str | Path | None = None, progress: bool = True, exact: bool = False) -> EvalResult:
    """Evaluate a run directory or model on a data file as ``settings`` say (None: the defaults, the task
    detected); write results.json and predictions.jsonl into ``output_dir`` if given. ``exact``: every
    label's full choice-scoring log-probability (see :func:`classify`)."""
    s = settings or EvalSection()
    check_output_dir(output_dir)
    if not isinstance(target, Loaded):
        check_target(str(target))  # a missing or damaged run is refused before the data is read
    examples = None
    if not (s.task == "perplexity" or (s.task is None and Path(data).suffix.lower() == ".txt")):
        examples = load_examples(data, s.format)
        if not examples:
            raise DataError(str(data), None, "no examples")
    task = s.task or detect_task(data, examples)
    system_prompt = prompt_of(s)
    loaded = _as_loaded(target, system_prompt, s.precision)
    shots_used: dict = {}
    if s.shots:
        if task == "perplexity":
            raise EvalError("--shots is for task sets (classification, generation, json), not perplexity")
        from fewtune.eval.shots import pick_shots, shot_pool, with_shots

        pool_file, pool = shot_pool(s.shots_from, loaded.config, s.format)
        shots = pick_shots(pool, s.shots, s.shots_seed, avoid=examples, stratify=task == "classification")
        examples = [with_shots(e, shots) for e in examples]
        shots_used = {"shots": s.shots, "shots_from": str(pool_file), "shots_seed": s.shots_seed,
                      "shot_lines": [e.line for e in shots]}
    start = time.time()
    if task == "perplexity":
        metrics, records = perplexity_task(loaded, data, s.limit, s.batch_size, s.window, s.format, progress)
    else:
        assert examples is not None
        labels = s.labels
        if task == "classification" and not labels:
            labels = sorted({expected_label(e) for e in examples})  # from the whole file, before the limit
        subset = examples[:s.limit] if s.limit else examples
        gen = loaded.config.generate if loaded.config else None  # a run's max_new_tokens and stop strings
        metrics, records = task_metrics(loaded, subset, s.model_copy(update={"task": task, "labels": labels}), gen,
                                        progress, exact)
    wall = time.time() - start
    settings_used = {"target": loaded.source, "data": str(data), "task": task,
                     "mode": s.mode if task == "classification" else None, "limit": s.limit,
                     "batch_size": s.batch_size, "template": loaded.template.kind, "precision": loaded.precision,
                     "system_prompt": loaded.template.system_prompt, "seconds": round(wall, 2),
                     "examples_per_s": round(len(records) / wall, 2) if wall > 0 else None,
                     **({"prompt_file": s.prompt_file} if s.prompt_file else {}), **shots_used}
    result = EvalResult(task, metrics, records, settings_used)
    if output_dir is not None:
        result.output_dir = write_results(result, output_dir)
    return result


def prompt_of(s: EvalSection) -> str | None:
    """The system prompt the settings ask for: eval.prompt_file's text, or eval.system_prompt (not both)."""
    if s.prompt_file is None:
        return s.system_prompt
    if s.system_prompt is not None:
        raise EvalError("give the system prompt once: --system or --prompt-file, not both")
    from fewtune.eval.shots import read_prompt_file

    return read_prompt_file(s.prompt_file)


def check_output_dir(output_dir: str | Path | None) -> None:
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise EvalError(f"{output_dir} is a file: --output names a folder (results.json and predictions.jsonl "
                        "are written into it)")


def write_results(result: EvalResult, output_dir: str | Path) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"task": result.task, "settings": result.settings,
                                                  "metrics": result.metrics}, ensure_ascii=False, indent=2),
                                      encoding="utf-8")
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for record in result.predictions:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return out


def read_results(output_dir: str | Path) -> EvalResult:
    out = Path(output_dir)
    data = read_json(out / "results.json")
    preds_path = out / "predictions.jsonl"
    preds = read_json_lines(preds_path) if preds_path.exists() else []
    if not isinstance(data, dict) or not {"task", "metrics"} <= set(data):
        raise EvalError(f"{out / 'results.json'} is damaged: no 'task' and 'metrics' (is it from `fewtune eval`?)")
    return EvalResult(data["task"], data["metrics"], preds, data.get("settings", {}), out)


def read_json(path: Path):
    """A JSON file a fewtune stage wrote, or EvalError naming it when it is damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise EvalError(f"{path} is damaged: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise EvalError(f"{path} is damaged: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def read_json_lines(path: Path) -> list:
    """A JSONL file a fewtune stage wrote (predictions, metrics), or EvalError naming the bad line."""
    from fewtune.runlog import RunLogError, read_log

    try:
        return read_log(path)
    except RunLogError as err:
        raise EvalError(str(err)) from None

