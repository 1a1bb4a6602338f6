"""Terminal summaries of `fewtune eval` and `fewtune compare` results (rich tables)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from fewtune.eval.evaluate import EvalResult

HEADLINE = {
    "classification": ("accuracy", "macro_f1", "macro_precision", "macro_recall", "weighted_f1", "unparseable_rate"),
    "generation": ("rouge1", "rouge2", "rougeL", "bleu", "exact_match", "mean_length", "mean_reference_length"),
    "json": ("json_valid", "exact_match", "field_precision", "field_recall", "field_f1", "invalid_count"),
    "perplexity": ("perplexity", "mean_nll", "tokens", "n"),
}


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def print_eval(result: EvalResult, console: Console | None = None) -> None:
    console = console or Console()
    m, s = result.metrics, result.settings
    unit = m.get("unit", "example") if result.task == "perplexity" else "example"
    console.print(f"{s.get('target')} on {s.get('data')}: {result.task}, {m.get('n')} {unit}s"
                  + (f", {m['mode']} mode" if m.get("mode") else ""))
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in HEADLINE[result.task]:
        if key in m and m[key] is not None:
            table.add_row(key, _value(m[key]))
    table.add_row("seconds", _value(s.get("seconds")))
    console.print(table)
    if m.get("members"):
        metric = next(k for k in m["members"][0] if k not in ("target", "seconds"))
        members = Table(title=f"ensemble of {len(m['members'])} ({m.get('combined_by')}): each member alone")
        members.add_column("member")
        members.add_column(metric, justify="right")
        for row in m["members"]:
            members.add_row(row["target"], _value(row[metric]) if row[metric] is not None else "-")
        members.add_row("ensemble", _value(m.get(metric)) if m.get(metric) is not None else "-")
        console.print(members)
    if result.task == "classification":
        per = Table(title="per class")
        for col in ("label", "precision", "recall", "f1", "support"):
            per.add_column(col, justify="left" if col == "label" else "right")
        for label, row in m["per_class"].items():
            per.add_row(label, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
        console.print(per)
    if result.task == "json" and m.get("invalid"):
        console.print(f"{m['invalid_count']} invalid outputs, first: {m['invalid'][0]['output'][:100]!r}")


def print_compare(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    for row in report["comparisons"]:
        table = Table(title=f"{report['task']}: {row['b']} vs {row['a']}, {report['n']} examples",
                      caption=f"{report['data']}; 95% paired bootstrap intervals ({report['n_resamples']} resamples)")
        for col in ("metric", row["a"], row["b"], "difference", "95% CI", ""):
            table.add_column(col, justify="left" if col in ("metric", "") else "right")
        items = list(row["metrics"].items())
        if "general" in row:
            items.append(("perplexity (general set, lower is better)", row["general"]["perplexity"]))
        for metric, d in items:
            ci = d["interval"]
            table.add_row(metric, _value(d["a"]), _value(d["b"]), f"{d['difference']:+.4f}",
                          f"[{ci['low']:+.4f}, {ci['high']:+.4f}]", "significant" if d["significant"] else "within noise")
        console.print(table)
        if "mcnemar" in row:
            mc = row["mcnemar"]
            console.print(f"McNemar: only {row['a']} right {mc['only_a_correct']}, only {row['b']} right "
                          f"{mc['only_b_correct']}, p = {mc['p_value']:.3g}")
        console.print(f"disagreements: {row['disagreements']} of {report['n']}")
