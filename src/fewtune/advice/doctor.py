"""`fewtune doctor RUN_DIR`: read a run's curves, say what happened and what to change.

Input is the trainer's metrics.jsonl: step records ({step, epoch, train_loss, lr,
grad_norm, ...}) and evaluation records ({step, val_loss, ...} plus any task metric as
extra keys). Per-class collapse needs predictions (a JSONL file with `prediction` and
`reference` or `label`); without one the doctor says it cannot tell. Every finding quotes
the numbers it rests on.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fewtune.runinfo import MARKER, check_run_format
from fewtune.runlog import numbered_records

# thresholds, named so the report can quote them
SPIKE_FACTOR = 2.0  # a train loss above this many times the median of the previous window
SPIKE_WINDOW = 10
SPIKE_MIN_RISE = 0.1  # nats: a rise smaller than this is never a spike, whatever the ratio
NOISY_SHARE = 0.10  # more single-step spikes than this share of steps: the curve is just noisy
BLOCK = 25  # on a noisy curve, spikes are judged on medians of blocks of this many steps
FLAT_DROP = 0.10  # underfitting: the train loss fell by less than this fraction
HIGH_LOSS = 1.0  # nats per completion token: above this at the end counts as high
OVERFIT_RISE = 0.02  # validation loss this fraction above its best at the end
STILL_FALLING = 0.20  # still improving: validation loss fell by this fraction over the second half of evaluations
COLLAPSE_SHARE = 0.8  # one class predicted for at least this share of examples

EVAL_KEYS = {"step", "epoch", "val_loss", "best", "event"}


@dataclass
class Finding:
    kind: str  # overfitting, underfitting, still_improving, instability, label_collapse, loss_metric_gap, ok, note, unknown
    message: str
    suggestions: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "suggestions": self.suggestions, "numbers": self.numbers}


@dataclass
class Curves:
    train: list[tuple[int, float]]  # (step, train_loss)
    grad_norm: list[tuple[int, float]]
    val: list[tuple[int, float]]  # (step, val_loss)
    metrics: dict[str, list[tuple[int, float]]]  # task metrics from evaluation records
    selected_by: str | None = None  # the metric that chose the best checkpoint (eval.metric), when logged


def _json_objects(path: Path):
    return numbered_records(path)  # (RunLogError is a ValueError, as doctor's callers expect)


def read_curves(path: str | Path) -> Curves:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if (path.parent / MARKER).exists():  # a run a newer fewtune wrote may log other records
        check_run_format(path.parent)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: doctor reads the metrics.jsonl a training run writes")
    train, grad, val, metrics, selected_by = [], [], [], {}, None
    for number, rec in _json_objects(path):
        if "event" in rec:
            selected_by = rec.get("eval_metric", selected_by)
            continue
        step = rec.get("step")
        try:
            if "train_loss" in rec:
                train.append((step, float(rec["train_loss"])))
                if rec.get("grad_norm") is not None:
                    grad.append((step, float(rec["grad_norm"])))
            if "val_loss" in rec:
                val.append((step, float(rec["val_loss"])))
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{number}: a loss that is not a number") from None
        if "val_loss" in rec:
            for key, value in rec.items():
                if key not in EVAL_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics.setdefault(key, []).append((step, float(value)))
    if not train:
        raise ValueError(f"{path}: no record with train_loss: is this a fewtune run's metrics.jsonl?")
    return Curves(train, grad, val, metrics, selected_by)


def lower_is_better(name: str) -> bool:
    return any(w in name.lower() for w in ("loss", "error", "perplexity", "ppl", "wer", "cer"))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _window(curve: list[tuple[int, float]], frac: float = 0.2) -> int:
    return max(1, round(len(curve) * frac))


def _is_spike(value: float, ref: float) -> bool:
    return value > SPIKE_FACTOR * ref and value - ref > SPIKE_MIN_RISE


def _spikes(losses: list[tuple[int, float]]) -> list[tuple[int, float, float]]:
    """(step, loss, reference): steps whose loss rises above the median of the window before."""
    out = []
    for i in range(SPIKE_WINDOW, len(losses)):
        ref = statistics.median(v for _, v in losses[i - SPIKE_WINDOW:i])
        if _is_spike(losses[i][1], ref):
            out.append((losses[i][0], losses[i][1], ref))
    return out


def _block_spikes(losses: list[tuple[int, float]]) -> list[tuple[int, float, float]]:
    """(first step, block median, previous block median) for blocks of BLOCK steps that rise above the one before."""
    blocks = [losses[i:i + BLOCK] for i in range(0, len(losses) - BLOCK + 1, BLOCK)]
    medians = [(b[0][0], statistics.median(v for _, v in b)) for b in blocks]
    return [(step, value, ref) for (_, ref), (step, value) in zip(medians, medians[1:]) if _is_spike(value, ref)]


def check_instability(c: Curves) -> list[Finding]:
    found = []
    bad = [(s, v) for s, v in c.train + c.val + c.grad_norm if not math.isfinite(v)]
    if bad:
        found.append(Finding("instability", f"{len(bad)} non-finite value(s) (NaN/inf), first at step {bad[0][0]}",
                             ["lower train.lr", "keep train.max_grad_norm at 1.0", "raise train.warmup_ratio",
                              "use model.dtype=float32 or bfloat16 instead of float16"],
                             {"non_finite": len(bad), "first_step": bad[0][0]}))
    losses = [(s, v) for s, v in c.train if math.isfinite(v)]
    spikes = _spikes(losses)
    checked = max(1, len(losses) - SPIKE_WINDOW)
    noisy = len(spikes) / checked > NOISY_SHARE
    if noisy:
        # Per-step losses this jumpy (small batches: one example's loss is not the next one's) say
        # nothing by themselves; a real instability damages the weights, so the loss stays up.
        single = len(spikes)
        spikes = _block_spikes(losses)
        found.append(Finding("note", f"the train loss is noisy from step to step: {single} of {checked} steps are more "
                             f"than {SPIKE_FACTOR:g}x the median of the {SPIKE_WINDOW} before, as expected when each step "
                             f"sees few examples; spikes are judged on medians of {BLOCK}-step blocks instead",
                             ["raise train.batch_size or train.grad_accum for smoother curves (not required)"],
                             {"single_step_spikes": single, "steps_checked": checked}))
    if spikes:
        s, v, ref = spikes[0]
        what = f"the median of steps {s}-{s + BLOCK - 1}" if noisy else "train loss"
        found.append(Finding("instability", f"{len(spikes)} loss spike(s): first at step {s}, {what} {v:.3f} against "
                             f"a median of {ref:.3f} over the {BLOCK if noisy else SPIKE_WINDOW} steps before (more than {SPIKE_FACTOR:g}x)",
                             ["lower train.lr", "keep train.max_grad_norm at 1.0", "raise train.warmup_ratio",
                              "raise train.batch_size or train.grad_accum"],
                             {"spikes": len(spikes), "first_step": s, "loss": v, "median_before": ref,
                              "sustained_over": BLOCK if noisy else 1}))
    return found


def check_overfitting(c: Curves) -> list[Finding]:
    if len(c.val) < 3:
        return []
    best_i = min(range(len(c.val)), key=lambda i: c.val[i][1])
    best_step, best = c.val[best_i]
    last_step, last = c.val[-1]
    if best_i == len(c.val) - 1 or last <= best * (1 + OVERFIT_RISE):
        return []
    at_best = [v for s, v in c.train if s <= best_step][-_window(c.train):]
    after = [v for s, v in c.train if s > best_step][-_window(c.train):]
    if not at_best or not after or _mean(after) >= _mean(at_best):
        return []
    return [Finding("overfitting", f"validation loss turned up at step {best_step} ({best:.4f}) and ended at "
                    f"{last:.4f} at step {last_step} (+{100 * (last / best - 1):.1f}%) while the train loss kept "
                    f"falling ({_mean(at_best):.4f} -> {_mean(after):.4f})",
                    [f"train for fewer steps (the loss was best at step {best_step}; "
                     + (f"this run kept the checkpoint with the best {c.selected_by} instead, so compare the two)"
                        if c.selected_by and c.selected_by != "loss" else "early stopping keeps it)"),
                     "lower train.lr", "use a smaller method.lora.r", "add data or augmentation",
                     "regularise: regularise.label_smoothing=0.1, regularise.neftune_alpha=5, method.lora.dropout=0.1"],
                    {"best_step": best_step, "best_val_loss": best, "last_val_loss": last,
                     "train_loss_at_best": _mean(at_best), "train_loss_end": _mean(after)})]


def check_underfitting(c: Curves) -> list[Finding]:
    w = _window(c.train)
    if len(c.train) < 4:
        return []
    start, end = _mean([v for _, v in c.train[:w]]), _mean([v for _, v in c.train[-w:]])
    if not (math.isfinite(start) and math.isfinite(end)) or start <= 0:
        return []
    drop = (start - end) / start
    val_end = c.val[-1][1] if c.val else end
    if drop < FLAT_DROP and min(end, val_end) > HIGH_LOSS:
        return [Finding("underfitting", f"the train loss barely moved ({start:.4f} -> {end:.4f}, {100 * drop:.1f}% "
                        f"< {100 * FLAT_DROP:.0f}%) and stays high (validation {val_end:.4f} > {HIGH_LOSS})",
                        ["raise train.lr", "train more epochs", "use a larger method.lora.r or method.name=full",
                         "check that the completions are what the model should learn (fewtune data check)"],
                        {"train_start": start, "train_end": end, "drop": drop, "val_end": val_end})]
    return []


def check_still_improving(c: Curves) -> list[Finding]:
    """The run ended while validation loss was still clearly falling: it stopped too early.

    On small data a run of a few dozen steps often ends this way (the cosine schedule flattens the end,
    so the last step alone looks converged); training the same examples for twice the steps doubled
    exact match on 40 car commands (benchmarks/results/augment.md)."""
    if len(c.val) < 4:
        return []
    if c.val[-1][1] > min(v for _, v in c.val) * (1 + OVERFIT_RISE):  # it turned (overfitting's finding)
        return []
    mid_step, mid = c.val[(len(c.val) - 1) // 2]
    last_step, last = c.val[-1]
    if mid <= 0 or (mid - last) / mid < STILL_FALLING:
        return []
    return [Finding("still_improving", f"validation loss was at its lowest at the end and still falling: "
                    f"{mid:.4f} at step {mid_step} -> {last:.4f} at step {last_step} "
                    f"(-{100 * (mid - last) / mid:.0f}% over the second half): the run stopped while it was improving",
                    ["train more epochs (train.epochs; early stopping ends it when validation turns)",
                     "with very few examples, repeat them or add augmentations (fewtune augment): either gives "
                     "more steps per epoch"],
                    {"mid_step": mid_step, "mid_val_loss": mid, "last_step": last_step, "last_val_loss": last})]


def check_loss_metric_gap(c: Curves) -> list[Finding]:
    """One finding when the task metrics peak away from the validation-loss minimum, led by the metric that
    matters most (the one that selected checkpoints, else accuracy, else macro-F1)."""
    if not c.val:
        return []
    best_loss_step = min(c.val, key=lambda sv: sv[1])[0]
    gaps = {}  # metric -> (best step, best value, value at the loss's best step)
    for name, curve in c.metrics.items():
        if len(curve) < 2:
            continue
        best_step, best = (min if lower_is_better(name) else max)(curve, key=lambda sv: sv[1])
        at_loss_best = dict(curve).get(best_loss_step)
        if best_step != best_loss_step and at_loss_best is not None and abs(best - at_loss_best) > 1e-9:
            gaps[name] = (best_step, best, at_loss_best)
    if not gaps:
        return []
    selected = f"val_{c.selected_by}" if c.selected_by and c.selected_by != "loss" else None
    name = next((m for m in (selected, "val_accuracy", "accuracy", "val_macro_f1", "macro_f1") if m in gaps), next(iter(gaps)))
    best_step, best, at_loss_best = gaps[name]
    others = [f"{m} at step {g[0]}" for m, g in gaps.items() if m != name]
    message = (f"validation loss was best at step {best_loss_step} but {name} was best at step {best_step} "
               f"({best:.4f} against {at_loss_best:.4f} at step {best_loss_step}): the loss does not track the task "
               "metric" + (f" (also best away from the loss minimum: {', '.join(others)})" if others else ""))
    if selected:
        first = (f"this run already kept the checkpoint with the best {c.selected_by} (eval.metric), not the "
                 "one with the lowest loss")
    else:
        first = "choose the checkpoint by the task metric, not the validation loss (eval.task, eval.metric)"
    return [Finding("loss_metric_gap", message,
                    [first, "for classification, evaluate by choice scoring",
                     "a rising loss with a rising metric is overconfidence: label smoothing helps"],
                    {"metric": name, "best_loss_step": best_loss_step, "best_metric_step": best_step,
                     "best_metric": best, "metric_at_best_loss": at_loss_best, "selected_by": c.selected_by,
                     "others": {m: g[0] for m, g in gaps.items() if m != name}})]


def check_label_collapse(predictions: str | Path | None) -> list[Finding]:
    if predictions is None:
        return [Finding("unknown", "label collapse: cannot tell, no predictions file (JSONL with 'prediction' and "
                        "'reference'); pass --predictions FILE")]
    if Path(predictions).is_dir():
        raise IsADirectoryError(f"{predictions} is a directory: --predictions is a JSONL file (e.g. RUN/eval/predictions.jsonl)")
    if not Path(predictions).is_file():
        raise FileNotFoundError(f"{predictions} not found: --predictions is a JSONL file with 'prediction' and 'reference'")
    preds, refs = [], []
    for number, rec in _json_objects(Path(predictions)):
        # fewtune eval writes predicted/expected; other tools prediction/reference (or label)
        pred = rec.get("prediction", rec.get("predicted"))
        if pred is None:
            raise ValueError(f"{predictions}:{number}: no 'prediction' (or 'predicted') field")
        preds.append(str(pred).strip())
        ref = rec.get("reference", rec.get("expected", rec.get("label")))
        if ref is not None:
            refs.append(str(ref).strip())
    if not preds:
        return [Finding("unknown", f"label collapse: cannot tell, {predictions} holds no prediction")]
    top, count = Counter(preds).most_common(1)[0]
    share = count / len(preds)
    ref_classes = len(set(refs))
    ref_share = Counter(refs)[top] / len(refs) if refs else None
    if share >= COLLAPSE_SHARE and (ref_classes > 1 or not refs) and (ref_share is None or ref_share < share - 0.2):
        return [Finding("label_collapse", f"'{top}' is predicted for {count} of {len(preds)} examples "
                        f"({100 * share:.0f}% >= {100 * COLLAPSE_SHARE:.0f}%)"
                        + (f", though it is the reference for only {100 * ref_share:.0f}% of {ref_classes} classes"
                           if ref_share is not None else ""),
                        ["balance the classes (fewtune data check shows the label counts)",
                         "lower train.lr or train fewer steps", "evaluate by choice scoring",
                         "use label_smoothing and check the prompt names every class"],
                        {"class": top, "share": share, "reference_share": ref_share, "classes": ref_classes})]
    return [Finding("note", f"no label collapse in {predictions}: the most predicted class, '{top}', has {count} of "
                    f"{len(preds)} predictions ({100 * share:.0f}%)", [], {"class": top, "share": share})]


def find_predictions(run_dir: Path) -> Path | None:
    """RUN/predictions.jsonl, else the newest RUN/*/predictions.jsonl (`fewtune eval RUN` writes RUN/eval/)."""
    if (run_dir / "predictions.jsonl").is_file():
        return run_dir / "predictions.jsonl"
    found = sorted(run_dir.glob("*/predictions.jsonl"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def diagnose(run_dir: str | Path, predictions: str | Path | None = None) -> list[Finding]:
    """All findings for a run directory (or a metrics.jsonl path). The function `fewtune doctor` calls."""
    c = read_curves(run_dir)
    if predictions is None and Path(run_dir).is_dir():
        predictions = find_predictions(Path(run_dir))
    findings = (check_instability(c) + check_overfitting(c) + check_underfitting(c) + check_still_improving(c)
                + check_loss_metric_gap(c))
    if all(f.kind == "note" for f in findings):
        end = _mean([v for _, v in c.train[-_window(c.train):]])
        val = f", validation loss best {min(v for _, v in c.val):.4f}" if c.val else ", no validation loss logged"
        findings.append(Finding("ok", f"no problem in the curves: {len(c.train)} steps, train loss "
                                f"{c.train[0][1]:.4f} -> {end:.4f}{val}"))
    return findings + check_label_collapse(predictions)


def format_findings(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"[{f.kind}] {f.message}")
        lines += [f"    - {s}" for s in f.suggestions]
    return "\n".join(lines)
