"""The Markdown and JSON summaries `fewtune pseudo-label` writes: per round, and across rounds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def round_markdown(summary: dict, baseline: dict | None) -> str:
    lines = [f"# Pseudo-labeling round {summary['round']}", "",
             f"Labeled by `{summary['labeled_by']}` on `{summary['unlabeled']}`: {summary['pool']} prompts scored "
             f"(skipped: {', '.join(f'{n} {why}' for why, n in summary['skipped'].items()) or 'none'}).",
             f"Threshold {summary['threshold']} on the {'length-normalised ' if summary['normalize'] else ''}"
             f"label probability; balance: {summary['balance']}; max per class: {summary['max_per_class'] or 'none'}.",
             "", "| class | scored | above threshold | kept |", "|---|---:|---:|---:|"]
    for lab, c in summary["classes"].items():
        lines.append(f"| {lab} | {c['scored']} | {c['above_threshold']} | {c['kept']} |")
    lines += ["", f"Kept {summary['kept']} examples; mean confidence of the kept {fmt(summary['mean_confidence_kept'])}, "
              f"of all scored {fmt(summary['mean_confidence_all'])}."]
    t = summary.get("training")
    if summary.get("stopped"):
        lines += ["", f"Stopped: {summary['stopped']}."]
    if t:
        lines += ["", f"Training: {summary['train_labeled']} labeled + {summary['kept']} pseudo-labeled examples -> "
                  f"`{t['run']}` ({t['steps']} steps"
                  + (f", {summary['epochs']['value']:g} epochs instead of the run's {summary['epochs']['was']:g}: "
                     f"{summary['epochs']['why']}" if summary.get("epochs") else "")
                  + f"); best validation {t['eval_metric']} {fmt(t['best'])}"
                  + (f" (labeling run: {fmt(baseline['best'])})" if baseline and baseline["eval_metric"] == t["eval_metric"]
                     else "") + "."]
    return "\n".join(lines) + "\n"


def write_summary(path_stem: Path, summary: dict, markdown: str) -> None:
    path_stem.with_suffix(".json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    path_stem.with_suffix(".md").write_text(markdown, encoding="utf-8")


def overview_markdown(labels: Sequence[str], rounds: Sequence[dict], baseline: dict | None) -> str:
    b = baseline
    lines = ["# Pseudo-labeling", "", f"Labels: {', '.join(labels)}. Each round's details: `round_K/summary.md`.",
             "", "| round | labeled by | kept | mean confidence (kept) | best validation |", "|---|---|---:|---:|---|"]
    if b:
        lines.append(f"| 0 | (the given run) | - | - | {b['eval_metric']} {fmt(b['best'])} |")
    for s in rounds:
        t = s["training"]
        trained = f"{t['eval_metric']} {fmt(t['best'])}" if t else "not trained"
        lines.append(f"| {s['round']} | `{s['labeled_by']}` | {s['kept']} | {fmt(s['mean_confidence_kept'])} | {trained} |")
    return "\n".join(lines) + "\n"
