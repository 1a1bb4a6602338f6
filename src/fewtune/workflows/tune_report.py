"""What `fewtune tune` writes: every trial (trials.jsonl), the ranked table and the verdict (tune.md),
the parameter importances and the search's history as PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from fewtune.workflows.tune import Dimension, TrialResult, TuneResult

LOWER_IS_BETTER = ("val_loss", "perplexity", "mean_nll")  # metrics where lower wins; all others: higher


def _v(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 or abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _stat(t: "TrialResult") -> str:
    if not t.fold_values:
        return "-"
    return f"{t.mean:.4f} ± {t.std:.4f}" if len(t.fold_values) > 1 else f"{t.mean:.4f}"


def ranked(result: "TuneResult") -> list["TrialResult"]:
    """Completed trials best first, then pruned ones (by their partial mean), then failed ones."""
    sign = 1 if result.metric in LOWER_IS_BETTER else -1
    order = {"complete": 0, "pruned": 1, "failed": 2}
    return sorted(result.trials, key=lambda t: (order[t.state], sign * t.mean if t.fold_values else math.inf, t.number))


def verdict(result: "TuneResult", dims: Sequence["Dimension"], first: dict) -> list[str]:
    """The printed summary: the winner, why it won and by how much against suggest's own settings."""
    best, base, m = result.best, result.baseline, result.metric
    folds = len(best.fold_values)
    counts = {s: sum(t.state == s for t in result.trials) for s in ("complete", "pruned", "failed")}
    lines = [f"tune: {len(result.trials)} trial(s) ({counts['complete']} complete, {counts['pruned']} stopped early, "
             f"{counts['failed']} failed) in {result.wall_s / 60:.1f} min"
             + (f" of a {result.budget_s / 60:.0f} min budget" if result.budget_s else "")
             + (f"; stopped: {result.stopped}" if result.stopped else ""),
             f"selection: {result.selection}; the test file is read only by the final model"]
    settings = ", ".join(f"{k}={_v(v)}" for k, v in best.params.items())
    lines.append(f"best: trial {best.number} ({settings}): {m} {_stat(best)} over {folds} fold(s)")
    if base is None:
        lines.append("suggest's own settings (trial 0) did not finish, so there is no comparison with them")
    elif base is best:
        lines.append(f"suggest's own settings were not beaten: {m} {_stat(base)}; best.yaml keeps them")
    else:
        changed = [f"{d.name} {_v(first[d.name])} -> {_v(best.params[d.name])}" for d in dims
                   if best.params[d.name] != first[d.name]]
        lines.append(f"against suggest's settings (trial 0, {m} {_stat(base)}): {best.mean - base.mean:+.4f}"
                     + (f"; changed: {', '.join(changed)}" if changed else ""))
        c = result.comparison
        if c:
            iv = c["interval"]
            lines.append(f"  paired bootstrap over the {c['n']} held-out predictions: {c['difference']:+.4f} "
                         f"[{iv['low']:+.4f}, {iv['high']:+.4f}] ({iv['level']:.0%})"
                         + (": a real difference" if c["significant"] else ": within the noise (the interval holds 0)"))
    if result.importances:
        top = sorted(result.importances.items(), key=lambda kv: -kv[1])
        lines.append("what mattered in this search (fANOVA importance): " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    if result.final_dir:
        lines.append(f"final model (best settings, all the training data): {result.final_dir}")
    if result.test:
        tm = result.test.get("metrics", {})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in tm.items() if k in (m, "accuracy", "weighted_f1", "exact_match"))
        lines.append(f"test ({result.test['file']}), scored once: {shown}")
    if result.ensemble:
        n = len(result.ensemble["members"])
        et = result.ensemble.get("test")
        if et:
            em = et.get("metrics", {})
            shown = ", ".join(f"{k} {v:.4f}" for k, v in em.items() if k in (m, "accuracy", "weighted_f1", "exact_match")
                              and isinstance(v, float))
            alone = (result.test or {}).get("metrics", {}).get(m)
            lines.append(f"test, the cross-validation ensemble ({n} models: the final one and the {n - 1} fold models "
                         f"of trial {result.ensemble['trial']}): {shown}"
                         + (f" ({m} {em[m] - alone:+.4f} against the final model alone)"
                            if alone is not None and isinstance(em.get(m), float) else ""))
        else:
            lines.append(f"cross-validation ensemble ({n} models) listed in ensemble.json; score it with "
                         f"`fewtune eval {result.out_dir} --ensemble --data FILE`")
    return lines


def write_report(result: "TuneResult", dims: Sequence["Dimension"], first: dict) -> None:
    out = result.out_dir
    with open(out / "trials.jsonl", "w", encoding="utf-8") as fh:
        for t in result.trials:
            fh.write(json.dumps({"trial": t.number, "params": t.params, "state": t.state, "fold_values": t.fold_values,
                                 "mean": t.mean if t.fold_values else None, "std": t.std if t.fold_values else None,
                                 "seconds": t.seconds, "note": t.note}, ensure_ascii=False) + "\n")
    result.lines = verdict(result, dims, first)
    names = [d.name for d in dims]
    table = [f"| rank | trial | {' | '.join(names)} | {result.metric} (mean ± std) | folds | minutes | state |",
             "|---:|---:|" + "---:|" * len(names) + "---:|---|---:|---|"]
    for i, t in enumerate(ranked(result), 1):
        mark = " (suggest)" if t.params == first else ""
        state = t.state + (f": {t.note}" if t.note and t.state != "complete" else "")
        table.append(f"| {i} | {t.number}{mark} | " + " | ".join(_v(t.params.get(n, "")) for n in names)
                     + f" | {_stat(t)} | {', '.join(f'{v:.3f}' for v in t.fold_values)} | {t.seconds / 60:.1f} | {state} |")
    plots = [p for p in (plot_importances(result, out / "importance.png"), plot_history(result, out / "history.png")) if p]
    bullets = [f"  - {line.strip()}" if line.startswith("  ") else f"- {line}" for line in result.lines]
    text = ["# fewtune tune", "", *bullets, "",
            "Search space: " + "; ".join(d.describe() for d in dims) + ".", "", *table, ""]
    text += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "tune.md").write_text("\n".join(text) + "\n", encoding="utf-8")


def plot_importances(result: "TuneResult", path: Path) -> Path | None:
    if not result.importances:
        return None
    from fewtune.plots import BLUE, _pyplot, _save

    plt = _pyplot()
    items = sorted(result.importances.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(items)))
    ax.barh([k for k, _ in items], [v for _, v in items], color=BLUE)
    ax.set_xlabel("importance (fANOVA share of the variance of the metric)")
    ax.set_title(f"What mattered for {result.metric}")
    return _save(fig, plt, path)


def plot_history(result: "TuneResult", path: Path) -> Path | None:
    from fewtune.plots import BLUE, GREY, ORANGE, _pyplot, _save

    done = [t for t in result.trials if t.fold_values]
    if not done:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    complete = [t for t in done if t.state == "complete"]
    stopped = [t for t in done if t.state != "complete"]
    ax.scatter([t.number for t in complete], [t.mean for t in complete], color=BLUE, label="trial (mean over folds)")
    if stopped:
        ax.scatter([t.number for t in stopped], [t.mean for t in stopped], color=GREY, marker="x",
                   label="stopped early (folds done)")
    best, running = [], None
    for t in sorted(complete, key=lambda t: t.number):
        if running is None or (t.mean < running if result.metric in LOWER_IS_BETTER else t.mean > running):
            running = t.mean
        best.append((t.number, running))
    if best:
        ax.step([n for n, _ in best], [v for _, v in best], where="post", color=ORANGE, label="best so far")
    if result.baseline is not None:
        ax.axhline(result.baseline.mean, color=GREY, linestyle="--", linewidth=1, label="suggest's settings")
    ax.set_xlabel("trial")
    ax.set_ylabel(result.metric)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, plt, path)
