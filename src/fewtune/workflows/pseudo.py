"""`fewtune pseudo-label`: self-training on unlabeled data with a finished classification run.

Each round:

1. **label**: every unlabeled example is choice-scored by the newest model (round 1: the
   given run; round k: round k-1's run). Its confidence is the softmax over the labels'
   summed log-probabilities (or, with ``normalize``, per-token means), taken at the argmax.
2. **select**: examples with confidence >= ``threshold`` are candidates. With ``balance``
   (the default) the kept counts follow the labeled training set's class proportions, on a
   scale the median class can fill: no class keeps more than its share, and a class with
   fewer candidates than its share keeps all of them without shrinking the others (with the
   scarcest class setting the scale, one class the unlabeled pool hardly holds would cut every
   class to a handful: FewCLUE tnews, 15 classes, 1 of 2,000 confident "stock" titles kept 15
   examples in all). With two classes the scale is the scarcer one's, so the proportions hold
   exactly. ``max_per_class`` caps every class. Within a class the most confident are kept.
3. **retrain**: the labeled training examples plus the kept ones (``pseudo.jsonl``, rows
   marked ``pseudo: true`` with their confidence) go to ``train.jsonl``; the run's config,
   pointed at it, trains a new run from the base model into ``round_k/run``. Validation is
   the run's own labeled validation set (the same split), never pseudo-labeled data.

With ``teachers`` (``--ensemble``: a tune's fold models) every round labels with an ensemble: the
newest model and the teachers, each label's probability averaged over them (the argmax is the
label, its mean probability the confidence). Several models that learnt from different folds are
wrong on fewer of the confident examples than one is.

Every round labels the whole unlabeled pool afresh: an example kept in round 1 may get
another label, or be dropped, in round 2; pseudo-labels never accumulate across rounds.

Prompts are built as the labeled examples' prompts are: the user turn is ``prompt_format``
filled with the record's fields (default ``{text}``; ``rename`` maps fields first, e.g.
``{"text": "sentence"}`` for FewCLUE), preceded by the system message every labeled
example carries (if they share one) or ``system``; the run's template (and its
``data.system_prompt``) renders them through the one render function. Prompts that are
empty, repeated, a labeled example's, or in an ``exclude`` file (a test set) are left out
and counted in the summary. A round that keeps nothing is not retrained and ends the rounds.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal, Sequence

from pydantic import Field

from fewtune.config import Config, EvalSection, Section, load_config
from fewtune.data.collect import rename_fields
from fewtune.data.dataset import load_train_val
from fewtune.data.formats import DataError, Example, Message, read_records
from fewtune.data.tools import write_jsonl
from fewtune.eval.scoring import ChoiceScore
from fewtune.workflows.pseudo_report import fmt, mean, overview_markdown, round_markdown, write_summary

log = logging.getLogger(__name__)

MAX_LABELS = 100  # more distinct answers than this is a generation task, not a label set


class PseudoError(ValueError):
    """A bad pseudo-labeling request, worded for the user."""


class PseudoSettings(Section):
    """What `fewtune pseudo-label` keeps and how it reads the unlabeled data (the scoring itself: an eval
    section's labels, normalize and batch_size)."""

    threshold: float = Field(0.9, description="Keep an example whose label probability is at least this, in "
                             "(0, 1].")
    balance: bool = Field(True, description="Keep the labeled training set's class proportions, on the scale the "
                          "median class can fill (a scarcer class keeps all its confident examples).")
    max_per_class: int | None = Field(None, description="Keep at most this many per class; None: no cap.")
    limit: int | None = Field(None, description="Only the first N unlabeled prompts; None: all of them.")
    rounds: int = Field(1, description="Label-select-retrain rounds, each labeled by the newest run.")
    train: bool = Field(True, description="Retrain on labeled + pseudo-labeled data; false: only label (one round).")
    epochs: float | Literal["auto"] | None = Field(None, description="Retraining epochs; None: the run's own; "
                                                   "auto: suggest's epochs for the grown training set at the run's "
                                                   "batch size (a run tuned on 100 examples for 10 epochs, retrained "
                                                   "on 1,500, gets 2); either replaces the run's train.max_steps.")
    rename: dict[str, str] | None = Field(None, description="Field renames applied to each unlabeled record "
                                          "first, ours to theirs (e.g. text: sentence).")
    prompt_format: str = Field("{text}", description="The user turn, filled with the record's fields.")
    system: str | None = Field(None, description="System message before each prompt; None: the one every "
                               "labeled example carries (if they share one); empty: none.")
    exclude: list[Path] = Field([], description="Files whose prompts are left out of the pool, e.g. the test set.")


@dataclass
class Unlabeled:
    line: int
    messages: list[Message]  # the prompt: [system,] user
    record_id: object = None


@dataclass
class Scored:
    index: int  # position in the unlabeled pool
    label: str
    confidence: float
    probs: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- confidence and selection


def label_probabilities(score: ChoiceScore, normalize: bool = False) -> list[float]:
    """Softmax over the labels' summed (or, normalized, per-token mean) log-probabilities."""
    return score.probabilities(normalize)


def score_to_label(index: int, score: ChoiceScore, labels: Sequence[str], normalize: bool = False) -> Scored:
    probs = label_probabilities(score, normalize)
    best = score.best(normalize)
    return Scored(index, labels[best], probs[best], dict(zip(labels, probs)))


def class_targets(above: dict[str, int], labels: Sequence[str], labeled_counts: dict[str, int],
                  balance: bool = True, max_per_class: int | None = None) -> dict[str, int]:
    """How many examples to keep per class, given how many are above the threshold.

    Without balance: all of them, capped at ``max_per_class``. With balance: class c keeps
    min(A_c, floor(L_c * r)), A_c = min(above_c, cap), L_c its labeled count (equal shares if some
    label has no labeled example), r = the low median over classes of A_k / L_k: no class keeps
    more than its labeled share at that scale, at least half the classes fill their share, and a
    scarce class keeps what it has instead of cutting the others down to its size. With two
    classes the low median is the minimum: the labeled proportions exactly.
    """
    cap = max_per_class if max_per_class is not None else math.inf
    available = {lab: min(above.get(lab, 0), cap) for lab in labels}
    if not balance:
        return {lab: int(n) for lab, n in available.items()}
    shares = {lab: labeled_counts.get(lab, 0) for lab in labels}
    if any(n <= 0 for n in shares.values()):
        shares = {lab: 1 for lab in labels}
    ratios = sorted(Fraction(int(available[lab]), shares[lab]) for lab in labels)
    ratio = ratios[(len(ratios) - 1) // 2]  # the low median
    return {lab: min(int(available[lab]), math.floor(shares[lab] * ratio)) for lab in labels}


def select(scored: Sequence[Scored], labels: Sequence[str], threshold: float, labeled_counts: dict[str, int],
           balance: bool = True, max_per_class: int | None = None) -> tuple[list[Scored], dict[str, dict[str, int]]]:
    """The examples to keep (in pool order) and per class: scored (argmax), above threshold, kept."""
    above: dict[str, list[Scored]] = {lab: [] for lab in labels}
    for s in scored:
        if s.confidence >= threshold:
            above[s.label].append(s)
    targets = class_targets({lab: len(v) for lab, v in above.items()}, labels, labeled_counts, balance, max_per_class)
    kept = []
    for lab in labels:
        kept += sorted(above[lab], key=lambda s: (-s.confidence, s.index))[:targets[lab]]
    predicted = Counter(s.label for s in scored)
    counts = {lab: {"scored": predicted.get(lab, 0), "above_threshold": len(above[lab]), "kept": targets[lab]}
              for lab in labels}
    return sorted(kept, key=lambda s: s.index), counts


# ---------------------------------------------------------------- inputs


def candidate_labels(examples: Sequence[Example], given: Sequence[str] | None) -> list[str]:
    if given:
        labels = list(dict.fromkeys(given))
    else:
        labels = sorted({str(e.label if e.label is not None else e.reference) for e in examples
                         if (e.label if e.label is not None else e.reference) is not None})
        if len(labels) > MAX_LABELS:
            raise PseudoError(f"the labeled data has {len(labels)} distinct answers: it does not look like "
                              "classification; give the candidate labels with --labels")
    if len(labels) < 2:
        raise PseudoError(f"pseudo-labeling needs at least two candidate labels, found {labels or 'none'}; "
                          "give them with --labels a,b")
    return labels


def labeled_counts(examples: Sequence[Example]) -> dict[str, int]:
    return dict(Counter(str(e.label if e.label is not None else e.reference) for e in examples))


def shared_system(examples: Sequence[Example], system: str | None) -> str | None:
    """The system message to put before each unlabeled prompt: ``system``, or the one all labeled examples share."""
    if system is not None:
        return system or None
    found = {e.messages[0].content if e.messages and e.messages[0].role == "system" else None for e in examples}
    if len(found) > 1:
        raise PseudoError(f"the labeled examples carry {len(found)} different system messages (or some none); "
                          "give the one for the unlabeled prompts with --system (\"\" for none)")
    shapes = Counter(tuple(m.role for m in e.prompt_messages if m.role != "system") for e in examples)
    if set(shapes) != {("user",)}:
        log.warning("labeled prompts have the turn patterns %s; unlabeled prompts are one user turn",
                    ", ".join("/".join(s) for s in shapes))
    return found.pop()


def _affix(texts: Sequence[str], suffix: bool) -> str:
    texts = [t[::-1] for t in texts] if suffix else list(texts)
    first = texts[0]
    n = min(len(t) for t in texts)
    i = 0
    while i < n and all(t[i] == first[i] for t in texts):
        i += 1
    out = first[:i]
    return out[::-1] if suffix else out


def check_prompt_shape(labeled: Sequence[Example], pool: Sequence[Unlabeled], prompt_format: str) -> None:
    """Warn when every labeled user turn shares a wording (``Review: ...``) the unlabeled ones lack."""
    users = [m.content for e in labeled for m in e.prompt_messages[-1:] if m.role == "user"]
    mine = [u.messages[-1].content for u in pool]
    if len(users) < 5 or not mine:
        return
    for suffix in (False, True):
        common = _affix(users, suffix)
        if len(common.strip()) >= 3 and _affix(mine + [common], suffix) != common:
            log.warning("every labeled prompt %s %r but the unlabeled prompts do not: give --prompt-format with "
                        "that wording (now %r) so they are rendered as in training",
                        "ends with" if suffix else "starts with", common, prompt_format)


def read_unlabeled(path: str | Path, rename: dict[str, str] | None = None, prompt_format: str = "{text}",
                   system: str | None = None, limit: int | None = None) -> tuple[list[Unlabeled], dict[str, list[int]]]:
    """Unlabeled records as prompts (``prompt_format`` filled with each record's renamed fields),
    and the lines skipped, by reason: an empty prompt, or the same prompt as an earlier line."""
    path = Path(path)
    pool: list[Unlabeled] = []
    skipped: dict[str, list[int]] = {"empty prompt": [], "duplicate within the unlabeled file": []}
    seen: set[str] = set()
    for line, record in read_records(path):
        record = rename_fields(record, rename)
        try:
            text = prompt_format.format_map(record)
        except KeyError as err:
            name = err.args[0]
            hint = f" (map it with --map {name}=THEIR_FIELD, or set --prompt-format)" if name == "text" else ""
            raise DataError(str(path), line, f"missing; the record has {sorted(record)}{hint}", name) from None
        except (ValueError, IndexError, AttributeError) as err:
            raise PseudoError(f"--prompt-format {prompt_format!r} is not a valid format string: {err}") from None
        if not text.strip():
            skipped["empty prompt"].append(line)
            continue
        if text.strip() in seen:
            skipped["duplicate within the unlabeled file"].append(line)
            continue
        seen.add(text.strip())
        pool.append(Unlabeled(line, ([Message("system", system)] if system else []) + [Message("user", text)],
                              record.get("id")))
        if limit and len(pool) >= limit:
            break
    if not pool:
        raise DataError(str(path), None, "no unlabeled examples with a prompt")
    return pool, skipped


def drop_known(pool: list[Unlabeled], known: set[str]) -> tuple[list[Unlabeled], list[int]]:
    """Leave out unlabeled prompts whose text is in ``known`` (labeled examples, or an --exclude file's)."""
    kept = [u for u in pool if u.messages[-1].content.strip() not in known]
    return kept, [u.line for u in pool if u.messages[-1].content.strip() in known]


# ---------------------------------------------------------------- one round


def label_pool(model_dir: str | Path, pool: Sequence[Unlabeled], labels: Sequence[str], batch_size: int = 8,
               normalize: bool = False, progress: bool = True, precision: str = "auto") -> list[Scored]:
    """Choice-score every unlabeled prompt with a run (its own template) and take the argmax label."""
    from fewtune.eval.scoring import choice_scores
    from fewtune.generate import load_for_inference

    loaded = load_for_inference(str(model_dir), merge=True, precision=precision)
    try:
        scores = choice_scores(loaded.model, loaded.tokenizer, loaded.template, [u.messages for u in pool], labels,
                               batch_size=batch_size, progress=progress)
        return [score_to_label(i, s, labels, normalize) for i, s in enumerate(scores)]
    finally:
        del loaded
        gc.collect()  # the next round trains a fresh model: do not hold two in memory


def label_pool_ensemble(model_dirs: Sequence[str | Path], pool: Sequence[Unlabeled], labels: Sequence[str],
                        batch_size: int = 8, normalize: bool = False, progress: bool = True,
                        precision: str = "auto") -> list[Scored]:
    """:func:`label_pool` by several runs (one in memory at a time): each label's probability averaged over them,
    the argmax (ties: the earlier label) with its mean probability as the confidence."""
    from fewtune.eval.ensemble import mean_probabilities

    if len(model_dirs) == 1:
        return label_pool(model_dirs[0], pool, labels, batch_size, normalize, progress, precision)
    per_model = [label_pool(model_dir, pool, labels, batch_size, normalize, progress, precision)
                 for model_dir in model_dirs]  # each in pool order
    out = []
    for i in range(len(pool)):
        probs, best = mean_probabilities([[scored[i].probs[lab] for lab in labels] for scored in per_model])
        out.append(Scored(i, labels[best], probs[best], dict(zip(labels, probs))))
    return out


def _pseudo_rows(pool: Sequence[Unlabeled], kept: Sequence[Scored], source: str, round_no: int) -> list[dict]:
    rows = []
    for s in kept:
        u = pool[s.index]
        messages = [{"role": m.role, "content": m.content} for m in u.messages] + \
                   [{"role": "assistant", "content": s.label}]
        provenance = {"set": "pseudo", "file": source, "line": u.line, "round": round_no,
                      **({"id": u.record_id} if u.record_id is not None else {})}
        rows.append({"messages": messages, "label": s.label, "pseudo": True, "confidence": round(s.confidence, 6),
                     "provenance": provenance})
    return rows


def _labeled_rows(examples: Sequence[Example]) -> list[dict]:
    return [{**e.to_dict(), "provenance": {"set": "labeled", "file": e.source, "line": e.line}} for e in examples]


def round_config(cfg: Config, round_dir: Path, train_rows: list[dict], val_examples: Sequence[Example]) -> Config:
    """The run's config pointed at labeled + pseudo-labeled data, validating on the labeled validation set."""
    rc = cfg.model_copy(deep=True)
    rc.data.train = str(write_jsonl(round_dir / "train.jsonl", train_rows))
    rc.data.format = "messages"
    rc.data.dataset = None
    if val_examples:
        rc.data.validation = str(write_jsonl(round_dir / "validation.jsonl", _labeled_rows(val_examples)))
    else:
        rc.data.validation = None
        rc.data.val_ratio = 0.0  # no validation before: none now, and never a split of pseudo-labels
    rc.train.output_dir = str(round_dir / "run")
    rc.train.resume = False
    return rc


def retrain_epochs(epochs: float | str, n: int, batch: int) -> tuple[float, str]:
    """A round's training epochs: a number as given, or ``auto``: suggest's rule for ``n`` examples at ``batch``."""
    if epochs == "auto":
        from fewtune.advice.suggest import epochs_for_size

        return epochs_for_size(n, batch)
    return float(epochs), "given (--epochs)"


def training_result(run_dir: str | Path) -> dict | None:
    """The best validation figure of a finished run (from its summary.json)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text(encoding="utf-8"))
    metric = s.get("eval_metric", "loss")
    best = s.get("best_val_loss") if metric == "loss" else s.get("best_metric")
    return {"run": str(run_dir), "eval_metric": metric, "best": best, "best_val_loss": s.get("best_val_loss"),
            "steps": s.get("steps"), "train_examples": s.get("train_examples"), "val_examples": s.get("val_examples")}


# ---------------------------------------------------------------- the stage function


@dataclass
class PseudoResult:
    out_dir: Path
    labels: list[str]
    rounds: list[dict]  # each round's summary (as written to round_k/summary.json)
    baseline: dict | None  # the labeling run's own training result


def pseudo_label(run_dir: str | Path, unlabeled: str | Path, settings: PseudoSettings | None = None,
                 scoring: EvalSection | None = None, out_dir: str | Path | None = None,
                 config: str | Path | None = None, progress: bool = True,
                 teachers: Sequence[str | Path] = ()) -> PseudoResult:
    """Label ``unlabeled`` with a finished run, keep the confident examples class-balanced, retrain; as often as
    ``settings.rounds`` says. ``scoring`` (labels, normalize, batch_size; None: the config's eval section);
    ``config``: the labeled data and retraining (None: the run's own config); ``teachers``: runs that label with
    the newest model as one ensemble in every round (see the module notes)."""
    p = settings or PseudoSettings()
    threshold, balance, max_per_class, rounds = p.threshold, p.balance, p.max_per_class, p.rounds
    if not 0 < threshold <= 1:
        raise PseudoError(f"--threshold must be in (0, 1], got {threshold}")
    for name, value in (("--rounds", rounds), ("--limit", p.limit), ("--max-per-class", max_per_class)):
        if value is not None and value < 1:
            raise PseudoError(f"{name} must be at least 1, got {value}")
    if isinstance(p.epochs, float) and p.epochs <= 0:
        raise PseudoError(f"--epochs must be above 0 or auto, got {p.epochs:g}")
    if not p.train and rounds > 1:
        raise PseudoError("--no-train labels once: later rounds need the model trained in the round before")
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise PseudoError(f"{run} is not a fewtune run directory (no config.yaml): give the folder `fewtune train` wrote")
    for teacher in teachers:
        if not (Path(teacher) / "config.yaml").is_file():
            raise PseudoError(f"{teacher} is not a fewtune run directory (no config.yaml): an ensemble member must be "
                              "a finished run")
    cfg = load_config(config or run / "config.yaml")
    scoring = scoring or cfg.eval
    train_ex, val_ex = load_train_val(cfg.data)
    labeled = train_ex + val_ex
    labels = candidate_labels(labeled, scoring.labels)
    outside = sorted(set(labeled_counts(labeled)) - set(labels))
    if outside:
        log.warning("labeled examples have labels outside --labels (kept in training as they are): %s", ", ".join(outside))
    system_text = shared_system(labeled, p.system)
    pool, skipped = read_unlabeled(unlabeled, p.rename, p.prompt_format, system_text, p.limit)
    pool, skipped["already a labeled example"] = drop_known(
        pool, {m.content.strip() for e in labeled for m in e.prompt_messages[-1:]})
    for path in p.exclude:  # e.g. the test set: its inputs must not become training data
        held, _ = read_unlabeled(path, p.rename, p.prompt_format)
        pool, lines = drop_known(pool, {u.messages[-1].content.strip() for u in held})
        skipped[f"in {path}"] = lines
    if not pool:
        raise DataError(str(unlabeled), None, "nothing to label: every prompt is a labeled example or in an --exclude file")
    check_prompt_shape(train_ex, pool, p.prompt_format)
    for why, lines in skipped.items():
        if lines:
            log.info("skipped %d unlabeled line(s): %s (first: line %d)", len(lines), why, lines[0])
    counts_labeled = labeled_counts(train_ex)
    out = Path(out_dir) if out_dir else run / "pseudo"
    baseline = training_result(run)
    model_dir, summaries = run, []
    for r in range(1, rounds + 1):
        round_dir = out / f"round_{r}"
        round_dir.mkdir(parents=True, exist_ok=True)
        members = [str(model_dir), *map(str, teachers)]
        log.info("round %d/%d: labeling %d prompts with %s", r, rounds, len(pool),
                 model_dir if len(members) == 1 else f"an ensemble of {len(members)} runs ({model_dir} and {len(teachers)} more)")
        scored = label_pool_ensemble(members, pool, labels, scoring.batch_size, scoring.normalize, progress,
                                     scoring.precision)
        kept, classes = select(scored, labels, threshold, counts_labeled, balance, max_per_class)
        kept_ids = {s.index for s in kept}
        write_jsonl(round_dir / "scores.jsonl", [
            {"line": pool[s.index].line, **({"id": pool[s.index].record_id} if pool[s.index].record_id is not None else {}),
             "text": pool[s.index].messages[-1].content, "predicted": s.label, "confidence": round(s.confidence, 6),
             "probs": {k: round(v, 6) for k, v in s.probs.items()}, "kept": s.index in kept_ids} for s in scored])
        pseudo_rows = _pseudo_rows(pool, kept, str(unlabeled), r)
        write_jsonl(round_dir / "pseudo.jsonl", pseudo_rows)
        summary = {"round": r, "labeled_by": str(model_dir) if len(members) == 1 else
                   f"{model_dir} + {len(teachers)} ensemble member(s), label probabilities averaged",
                   **({"ensemble": members} if len(members) > 1 else {}), "unlabeled": str(unlabeled), "pool": len(pool),
                   "skipped": {why: len(lines) for why, lines in skipped.items() if lines}, "labels": labels,
                   "threshold": threshold, "normalize": scoring.normalize,
                   "balance": ("labeled class proportions" if all(counts_labeled.get(lab) for lab in labels)
                               else "equal per class") if balance else "off",
                   "max_per_class": max_per_class, "classes": classes, "kept": len(kept),
                   "mean_confidence_kept": mean([s.confidence for s in kept]),
                   "mean_confidence_all": mean([s.confidence for s in scored]),
                   "train_labeled": len(train_ex), "training": None}
        log.info("round %d: kept %d of %d (%s)", r, len(kept), len(pool),
                 ", ".join(f"{lab}: {c['kept']} kept / {c['above_threshold']} above / {c['scored']} scored"
                           for lab, c in classes.items()))
        if not kept and p.train:  # retraining on the labeled data alone would repeat the run; so would later rounds
            summary["stopped"] = "nothing kept: not retrained, no further rounds"
            log.warning("round %d: no example kept%s; lower --threshold. Stopping: %s", r,
                        " (class balance: a class had none above the threshold)" if balance else "", summary["stopped"])
        elif p.train:
            from fewtune.train.loop import train as run_training

            rc = round_config(cfg, round_dir, _labeled_rows(train_ex) + pseudo_rows, val_ex)
            if p.epochs is not None:
                rc.train.epochs, why = retrain_epochs(p.epochs, len(train_ex) + len(pseudo_rows), rc.train.batch_size)
                if rc.train.max_steps is not None:  # it would override the epochs asked for
                    why += f"; the run's train.max_steps ({rc.train.max_steps}) dropped so the epochs count"
                    rc.train.max_steps = None
                summary["epochs"] = {"value": rc.train.epochs, "was": cfg.train.epochs, "why": why}
                log.info("round %d: %g epochs (the run had %g): %s", r, rc.train.epochs, cfg.train.epochs, why)
            log.info("round %d: training on %d labeled + %d pseudo-labeled examples into %s", r, len(train_ex),
                     len(pseudo_rows), rc.train.output_dir)
            run_training(rc)
            summary["training"] = training_result(rc.train.output_dir)
            model_dir = Path(rc.train.output_dir)
            t = summary["training"]
            log.info("round %d: best validation %s %s (labeling run: %s)", r, t["eval_metric"], fmt(t["best"]),
                     fmt(baseline["best"]) if baseline else "n/a")
        write_summary(round_dir / "summary", summary, round_markdown(summary, baseline))
        summaries.append(summary)
        if summary.get("stopped"):
            break
    write_summary(out / "summary", {"run": str(run), "labels": labels, "baseline": baseline, "rounds": summaries},
                  overview_markdown(labels, summaries, baseline))
    return PseudoResult(out, labels, summaries, baseline)
