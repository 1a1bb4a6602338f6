"""The ranked table of a sweep: one row per combination, mean ± std over its seeds/folds, best first."""

from __future__ import annotations

import json
import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fewtune.workflows.sweep import Plan, SweepResult


# the metrics shown per task beside the ranking one, and those where lower is better
SHOWN = {"classification": ("accuracy", "macro_f1"), "generation": ("rougeL", "bleu", "exact_match"),
         "json": ("field_f1", "exact_match", "json_valid"), "perplexity": ("perplexity",)}
LOWER_IS_BETTER = {"val_loss", "perplexity", "mean_nll"}


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); no std for a single run."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _columns(metric: str, task: str, records: list[dict]) -> list[str]:
    columns = [metric] + [m for m in SHOWN.get(task, ()) if m != metric]
    if metric != "val_loss" and any("val_loss" in r.get("metrics", {}) for r in records):
        columns.append("val_loss")
    return columns


def rank(combos: list[dict], records: list[dict], metric: str, task: str) -> list[dict]:
    """One row per combination (failed runs counted, not dropped), best mean first, all-failed last."""
    columns = _columns(metric, task, records)
    rows = []
    for params in combos:
        mine = [r for r in records if r["params"] == params]
        ok = [r for r in mine if r["status"] == "ok"]
        stats = {}
        for name in columns:
            values = [r["metrics"][name] for r in ok if r["metrics"].get(name) is not None]
            stats[name] = dict(zip(("mean", "std"), mean_std(values)), n=len(values))
        rows.append({"params": params, "runs": len(mine), "ok": len(ok), "failed": len(mine) - len(ok),
                     "stats": stats, "wall_s": mean_std([r["wall_s"] for r in ok or mine])[0],
                     "errors": [r["error"] for r in mine if r["status"] == "failed"]})
    sign = 1 if metric in LOWER_IS_BETTER else -1
    rows.sort(key=lambda row: (row["stats"][metric]["mean"] is None, sign * (row["stats"][metric]["mean"] or 0.0)))
    return rows


def _value(v) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)


def _stat(s: dict, ok: int) -> str:
    if s["mean"] is None:
        return "failed" if ok == 0 else "n/a"  # finished runs without this metric (val_loss with no validation)
    return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["std"] is not None else " (1 run)")


def cells(result: "SweepResult") -> tuple[list[str], list[list[str]]]:
    columns = list(result.rows[0]["stats"]) if result.rows else [result.metric]
    header = ["rank", *result.keys, "runs", *columns, "wall s"]
    body = []
    for i, row in enumerate(result.rows, 1):
        runs = str(row["ok"]) + (f" ({row['failed']} failed)" if row["failed"] else "")
        wall = f"{row['wall_s']:.1f}" if row["wall_s"] is not None else "n/a"
        body.append([str(i) if row["ok"] else "-", *(_value(row["params"][k]) for k in result.keys), runs,
                     *(_stat(row["stats"][c], row["ok"]) for c in columns), wall])
    return header, body


def write_table(result: "SweepResult", plan: "Plan", seeds: list[int], kfold: int | None) -> None:
    header, body = cells(result)
    direction = "lower" if result.metric in LOWER_IS_BETTER else "higher"
    scored_on = {"kfold": f"the held-out fold of {kfold}", "holdout": "each seed's held-out validation split",
                 "validation": "the config's validation file", "external": "--eval-data"}[plan.mode]
    samples = f"seeds {', '.join(map(str, seeds))}" + (f" x {kfold} folds" if kfold else "")
    lines = [f"# Sweep: {len(result.rows)} combination(s) x {samples}: {len(result.records)} runs", "",
             f"Task: {result.task}; ranked by **{result.metric}** ({direction} is better), scored on "
             f"{plan.eval_data or scored_on}.",
             "Each cell is the mean ± sample standard deviation (n - 1) over the combination's finished runs; "
             "wall s is the mean time per run (training and scoring).", ""]
    lines += [f"Note: {n}." for n in result.notes] + ([""] if result.notes else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    failed = [r for r in result.records if r["status"] == "failed"]
    if failed:
        lines += ["", f"## Failed runs ({len(failed)})", ""]
        lines += [f"- {r['run_dir']} (seed {r['seed']}" + (f", fold-{r['fold']}" if r["fold"] is not None else "")
                  + f"): {r['error'].splitlines()[0] if r['error'] else ''}" for r in failed]
    result.table = "\n".join(lines) + "\n"
    (result.out_dir / "sweep.md").write_text(result.table, encoding="utf-8")


def print_sweep(result: "SweepResult", console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: no width to fit, keep each row on one line
            console = Console(width=200)
    header, body = cells(result)
    direction = "lower" if result.metric in LOWER_IS_BETTER else "higher"
    table = Table(title=f"sweep: {result.task}, ranked by {result.metric} ({direction} is better)",
                  caption="mean ± sample std over seeds/folds")
    for name in header:
        table.add_column(name, justify="left" if name in result.keys else "right")
    for row in body:
        table.add_row(*row)
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}")
