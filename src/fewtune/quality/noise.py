"""Which labels are probably wrong? Out-of-fold probabilities and confident learning.

`fewtune data noise FILE` splits a classification set into K stratified folds, fine-tunes one run on
each K-1 folds (the config given, or `suggest`'s for the whole set) and scores the held-out fold by
choice scoring: every candidate label's exact log-probability as a completion of the prompt, turned
into probabilities over the labels. Every example is thus scored by a model that never saw it. Those
out-of-fold probabilities go to confident learning (cleanlab's ``find_label_issues``: per-class
confidence thresholds, a joint estimate of given against true labels, and the examples it attributes
to label noise), ranked by self-confidence (the probability of the given label), each with the label
the models prefer.

Written under ``--out``: ``folds/fold-k/`` (the fold's training file, its run, ``probs.jsonl``: a fold
already scored is not trained again, so an interrupted search resumes), ``oof_probs.jsonl`` (every
example's probabilities), ``label_issues.jsonl`` (the flagged examples, most suspicious first). With
``--clean FILE`` the set is written without the flagged examples (records as read; ``--relabel``
keeps them with the suggested label instead), and ``--rejects FILE`` gets the ones left out or changed.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from fewtune.config import Config, build_config, load_config

log = logging.getLogger(__name__)


class NoiseError(ValueError):
    """A set or setting the label-noise search cannot work with, worded for the user."""


@dataclass
class Issue:
    index: int  # position in the file's examples
    line: int
    text: str
    given: str
    suggested: str
    p_given: float
    p_suggested: float
    quality: float  # cleanlab's label quality score (self-confidence): low is suspicious

    def to_dict(self) -> dict:
        return {"line": self.line, "input": self.text, "given": self.given, "suggested": self.suggested,
                "p_given": round(self.p_given, 4), "p_suggested": round(self.p_suggested, 4),
                "quality": round(self.quality, 4)}


@dataclass
class NoiseResult:
    labels: list[str]
    issues: list[Issue]  # most suspicious first
    n: int
    out: Path
    oof_accuracy: float  # how often the out-of-fold argmax is the given label
    fold_seconds: list[float] = field(default_factory=list)
    clean_file: Path | None = None
    rejects_file: Path | None = None


def softmax(logprobs: list[float]) -> list[float]:
    top = max(logprobs)
    exps = [math.exp(lp - top) for lp in logprobs]
    total = sum(exps)
    return [e / total for e in exps]


def label_probabilities(target, examples, labels: list[str], batch_size: int = 8,
                        progress: bool = True) -> list[list[float]]:
    """Each example's probabilities over ``labels`` under a run or model: exact choice scores (no pruning),
    normalised over the candidates."""
    from fewtune.eval.scoring import choice_scores
    from fewtune.generate import Loaded, load_for_inference

    loaded = target if isinstance(target, Loaded) else load_for_inference(str(target), merge=True)
    scores = choice_scores(loaded.model, loaded.tokenizer, loaded.template, [e.prompt_messages for e in examples],
                           labels, batch_size=batch_size, progress=progress, prune=False)
    return [softmax(list(s.logprobs)) for s in scores]


def _fold_config(base: Config, train_file: Path, run_dir: Path) -> Config:
    raw = base.model_dump(mode="json")
    raw["data"].update({"train": str(train_file), "validation": None, "val_ratio": 0.0, "format": "messages",
                        "dataset": None})
    raw["train"].update({"output_dir": str(run_dir), "resume": False})  # no validation: the held-out fold is scored
    return build_config(raw, [], source="data noise")


def _write_examples(path: Path, examples) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    return path


def _base_config(data: Path, config: str | Path | None, model: str | None, overrides: list[str]) -> Config:
    if config is not None:
        cfg = load_config(config, overrides)
        if model:
            cfg = build_config(cfg.model_dump(mode="json"), [f"model.name={json.dumps(model)}", *overrides])
        return cfg
    from fewtune.advice.suggest import suggest
    from fewtune.models import DEFAULT_MODEL

    suggestion = suggest(data, model or DEFAULT_MODEL, task="classification", measure=False, progress=False)
    log.info("fold runs use suggest's config for %s:\n%s", data, suggestion.report())
    return build_config(suggestion.config.model_dump(mode="json"), overrides)


def find_label_noise(data: str | Path, out: str | Path, *, config: str | Path | None = None, model: str | None = None,
                     overrides: list[str] | None = None, folds: int = 5, seed: int = 0, fmt: str = "auto",
                     batch_size: int = 16, clean: str | Path | None = None, rejects: str | Path | None = None,
                     relabel: bool = False, progress: bool = True) -> NoiseResult:
    """Out-of-fold label probabilities for a classification set, and the examples confident learning
    attributes to label noise (see the module notes)."""
    import time

    import numpy as np

    from fewtune.data.tools import kfold_examples, load_checked, write_jsonl
    from fewtune.train.loop import train

    if (clean is None) != (rejects is None):
        raise NoiseError("give --clean and --rejects together: the examples left out or changed go to the rejects file")
    if folds < 2:
        raise NoiseError(f"--folds must be at least 2, got {folds}")
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise NoiseError("finding label issues needs the cleanlab package: pip install 'cleanlab>=2.9'") from None
    data = Path(data)
    checked = load_checked(data, fmt)
    examples = checked.examples
    missing = [e for e in examples if e.label is None]
    if missing:
        raise NoiseError(f"{data}:{missing[0].line}: label-noise finding is for classification sets (a label on "
                         f"every example); {len(missing)} example(s) have none")
    labels = sorted({e.label for e in examples})
    small = sorted((sum(e.label == lab for e in examples), lab) for lab in labels)
    if len(labels) < 2:
        raise NoiseError(f"{data}: one label only ({labels[0]!r}): there is nothing to confuse it with")
    if small[0][0] < folds:
        raise NoiseError(f"{data}: label {small[0][1]!r} has {small[0][0]} example(s), fewer than --folds {folds}: "
                         "every fold needs some of each label (use fewer folds)")
    out = Path(out)
    base = _base_config(data, config, model, list(overrides or []))
    parts = kfold_examples(examples, folds, seed)
    index_of = {id(e): i for i, e in enumerate(examples)}
    probs: list[list[float] | None] = [None] * len(examples)
    seconds = []
    for k, held in enumerate(parts):
        fold_dir = out / "folds" / f"fold-{k}"
        probs_file = fold_dir / "probs.jsonl"
        lines = [e.line for e in held]
        done = None
        if probs_file.is_file():
            rows = [json.loads(x) for x in probs_file.read_text(encoding="utf-8").splitlines() if x.strip()]
            if [r["line"] for r in rows] == lines and all(list(r["probs"]) == labels for r in rows):
                done = rows
        if done is None:
            start = time.time()
            rest = [e for j, part in enumerate(parts) if j != k for e in part]
            train_file = _write_examples(fold_dir / "train.jsonl", rest)
            run_dir = fold_dir / "run"
            log.info("fold %d/%d: training on %d examples, scoring %d", k + 1, folds, len(rest), len(held))
            train(_fold_config(base, train_file, run_dir), run_dir,
                  resume=(run_dir / "checkpoints" / "latest").exists())
            fold_probs = label_probabilities(run_dir, held, labels, batch_size, progress)
            done = [{"line": e.line, "probs": dict(zip(labels, p))} for e, p in zip(held, fold_probs)]
            write_jsonl(probs_file, done)
            seconds.append(round(time.time() - start, 1))
        for e, row in zip(held, done):
            probs[index_of[id(e)]] = [row["probs"][lab] for lab in labels]
    matrix = np.array(probs, dtype=float)
    given = np.array([labels.index(e.label) for e in examples])
    write_jsonl(out / "oof_probs.jsonl", [{"line": e.line, "label": e.label, "probs": dict(zip(labels, map(float, p)))}
                                          for e, p in zip(examples, matrix)])
    ranked = find_label_issues(given, matrix, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(given, matrix)
    issues = []
    for i in ranked:
        best = int(matrix[i].argmax())
        issues.append(Issue(int(i), examples[i].line, examples[i].input_text, examples[i].label, labels[best],
                            float(matrix[i, given[i]]), float(matrix[i, best]), float(quality[i])))
    write_jsonl(out / "label_issues.jsonl", [x.to_dict() for x in issues])
    result = NoiseResult(labels, issues, len(examples), out, float((matrix.argmax(1) == given).mean()), seconds)
    if clean is not None:
        result.clean_file, result.rejects_file = _write_clean(checked, issues, Path(clean), Path(rejects), relabel)
    return result


def _write_clean(checked, issues: list[Issue], clean: Path, rejects: Path, relabel: bool) -> tuple[Path, Path]:
    """The set without its flagged examples (or with their labels replaced), records as read; the rest to
    ``rejects`` with what the search found."""
    from fewtune.data.formats import get_writer, to_record
    from fewtune.data.tools import write_jsonl

    by_index = {x.index: x for x in issues}
    kept, rejected = [], []
    for i, e in enumerate(checked.examples):
        record = checked.records[e.line]
        issue = by_index.get(i)
        if issue is None:
            kept.append(record)
            continue
        rejected.append({"record": record, "line": e.line, "issue": issue.to_dict(),
                         "action": "relabelled" if relabel else "left out"})
        if relabel:
            kept.append(_relabelled(record, e, issue.suggested, checked.fmt, to_record, get_writer))
    write_jsonl(clean, kept)
    write_jsonl(rejects, rejected)
    return clean, rejects


def _relabelled(record: dict, example, label: str, fmt: str, to_record, get_writer) -> dict:
    """The record with the new label where the format keeps it (a ``label`` field, the final assistant turn)."""
    from dataclasses import replace

    from fewtune.data.formats import Message

    messages = [*example.messages[:-1], Message("assistant", label)]
    changed = replace(example, messages=messages, label=label)
    new = to_record(changed, fmt)
    return {**record, **new, **({"label": label} if "label" in record else {})}


def summary_lines(result: NoiseResult, limit: int = 15) -> list[str]:
    share = len(result.issues) / result.n if result.n else 0.0
    lines = [f"{result.n} examples, {len(result.labels)} labels; out-of-fold accuracy {result.oof_accuracy:.3f}; "
             f"{len(result.issues)} probable label issue(s) ({share:.1%})"]
    for x in result.issues[:limit]:
        text = x.text if len(x.text) <= 60 else x.text[:57] + "..."
        lines.append(f"  line {x.line}: {x.given!r} -> {x.suggested!r} (p {x.p_given:.2f} vs {x.p_suggested:.2f})  "
                     f"{text}")
    if len(result.issues) > limit:
        lines.append(f"  ... and {len(result.issues) - limit} more in {result.out / 'label_issues.jsonl'}")
    return lines
