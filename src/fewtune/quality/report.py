"""Printing a check report: a summary table, the problems grouped, and the length/label/size tables."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fewtune.quality.check import Report
from fewtune.data.collect import Problem

CHECK_ORDER = ("read", "schema", "template", "duplicates", "images", "length", "labels", "size")


def _lines(lines: list[int | None], limit: int = 8) -> str:
    real = [str(n) for n in lines if n]
    if not real:
        return ""
    shown = ",".join(real[:limit])
    return f":{shown}" + (f" (+{len(real) - limit} more)" if len(real) > limit else "")


def group_problems(problems: list[Problem]) -> list[tuple[Problem, list[int | None]]]:
    """Problems with the same file, field and message, listed once with all their lines."""
    groups: dict[tuple, tuple[Problem, list[int | None]]] = {}
    for p in problems:
        key = (p.severity, p.check, p.file, p.field, p.message)
        groups.setdefault(key, (p, []))[1].append(p.line)
    return list(groups.values())


def print_problems(report: Report, console: Console, limit: int = 30) -> None:
    for severity, colour in (("error", "red"), ("warning", "yellow")):
        groups = [g for g in group_problems(report.problems) if g[0].severity == severity]
        groups.sort(key=lambda g: CHECK_ORDER.index(g[0].check) if g[0].check in CHECK_ORDER else 99)
        for problem, lines in groups[:limit]:
            field = f" [bold]{problem.field}[/bold]" if problem.field else ""
            console.print(f"[{colour}]{severity}[/{colour}] [dim]{problem.check}[/dim] "
                          f"{problem.file}{_lines(lines)}{field}: {problem.message}", markup=True, highlight=False,
                          soft_wrap=True)
        if len(groups) > limit:
            console.print(f"[{colour}]... {len(groups) - limit} more kinds of {severity}s (all are in --json)[/{colour}]")


def summary_table(report: Report) -> Table:
    table = Table(title="data check", show_lines=False)
    table.add_column("check")
    table.add_column("errors", justify="right")
    table.add_column("warnings", justify="right")
    counts = report.counts()
    for check in CHECK_ORDER:
        c = counts.get(check, {"error": 0, "warning": 0})
        table.add_row(check, f"[red]{c['error']}[/red]" if c["error"] else "0",
                      f"[yellow]{c['warning']}[/yellow]" if c["warning"] else "0")
    table.add_row("[bold]total[/bold]", str(len(report.errors)), str(len(report.warnings)))
    return table


def _fmt(stats: dict, key: str) -> str:
    value = stats.get(key, "")
    return f"{value:g}" if isinstance(value, float) else str(value)


def length_table(role: str, stats: dict) -> Table:
    lengths = stats["lengths"]
    table = Table(title=f"{role}: lengths ({stats['examples']} examples; languages: "
                        f"{', '.join(f'{k} {v}' for k, v in lengths['languages'].items())})")
    table.add_column("field")
    table.add_column("unit")
    for key in ("min", "median", "p95", "max", "mean"):
        table.add_column(key, justify="right")
    for unit in ("tokens", "chars", "words"):
        for name, s in (lengths.get(unit) or {}).items():
            if s:
                table.add_row(name, unit, *(_fmt(s, k) for k in ("min", "median", "p95", "max", "mean")))
    return table


def label_table(role: str, labels: dict, limit: int = 20) -> Table:
    table = Table(title=f"{role}: {labels['classes']} labels")
    table.add_column("label")
    table.add_column("examples", justify="right")
    table.add_column("share", justify="right")
    for label, count in list(labels["counts"].items())[:limit]:
        table.add_row(str(label), str(count), f"{labels['share'][label]:.1%}")
    if len(labels["counts"]) > limit:
        table.add_row(f"... {len(labels['counts']) - limit} more", "", "")
    return table


def print_stats(report: Report, console: Console) -> None:
    for role, stats in report.stats.items():
        if stats.get("examples"):
            console.print(length_table(role, stats))
        trunc = stats.get("lengths", {}).get("truncation")
        if trunc:
            console.print(f"{role}: max_length={trunc['max_length']}: {trunc['over_max_length']} over, completion cut "
                          f"partly in {trunc['completion_cut_partly']}, entirely in {trunc['completion_cut_entirely']}")
        if stats.get("labels"):
            labels = stats["labels"]
            console.print(label_table(role, labels))
            console.print(f"{role}: imbalance ratio {labels['imbalance_ratio']} (largest / smallest class)"
                          + (f"; classes under the minimum: {', '.join(map(str, labels['rare']))}" if labels["rare"] else ""))
        size = stats.get("size")
        if size and "tokens_per_epoch" in size:
            console.print(f"{role}: size: {size['examples']} examples, {size['steps_per_epoch']} steps/epoch "
                          f"(batch {size['batch_size']} x accum {size['grad_accum']}), {size['tokens_per_epoch']:,} "
                          f"tokens/epoch ({size['trained_tokens_per_epoch']:,} trained), {size['tokens_per_run']:,} "
                          f"tokens per run of {size['run_epochs']:g} epochs")
        dup = stats.get("duplicates")
        if dup:
            console.print(f"{role}: duplicates: {dup['exact_duplicates']} exact, {dup['near_duplicates']} near, "
                          f"{dup['conflicts']} conflicting inputs")
        images = stats.get("images")
        if images:
            cost = images.get("tokens_per_image")
            console.print(f"{role}: images: {images['images']} in {images['examples_with_images']} examples "
                          f"({images['distinct_pictures']} distinct pictures, {images['unreadable']} unreadable)"
                          + (f"; sizes {images['width']['min']}-{images['width']['max']} x "
                             f"{images['height']['min']}-{images['height']['max']} px" if "width" in images else "")
                          + (f"; tokens per image {cost['min']}-{cost['max']} (mean {cost['mean']:g})" if cost else ""))
        leak = stats.get("leakage")
        if leak:
            console.print(f"{role}: leakage: {leak['leaked_inputs']} of {leak['validation_examples']} inputs also in "
                          f"train ({leak['leaked_identical']} with the same output); "
                          f"{stats.get('unseen_labels', 0)} with labels unseen in train")


def write_json(report: Report, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")
    return path
