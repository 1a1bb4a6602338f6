"""`fewtune report RUN_DIR`: what a run did and whether it helped, as Markdown and self-contained HTML.

Reads what the other stages wrote: a run directory (config.yaml, summary.json,
metrics.jsonl) and the `eval/` and `compare/` folders inside it, or an eval or compare
output folder on its own. Writes report.md, report.html (every image embedded, so the
file can be mailed) and the PNG figures beside them.
"""

from __future__ import annotations

import base64
import html
from collections import Counter
from pathlib import Path

from fewtune.eval import report_plots as plots
from fewtune.eval.evaluate import EvalError, EvalResult, read_json, read_json_lines, read_results
from fewtune.eval.metrics import confused_pairs
from fewtune.generate import check_run_dir, looks_like_run_dir

HEADLINE = {"classification": ("accuracy", "macro_f1", "macro_precision", "macro_recall", "weighted_f1", "unparseable_rate"),
            "generation": ("rouge1", "rouge2", "rougeL", "bleu", "exact_match", "mean_length"),
            "json": ("json_valid", "exact_match", "field_precision", "field_recall", "field_f1", "invalid_count"),
            "perplexity": ("perplexity", "mean_nll", "tokens")}


class Doc:
    """A small document (headings, paragraphs, tables, images, code) rendered to Markdown and to HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def heading(self, text: str, level: int = 2):
        self.blocks.append(("h", level, text))

    def para(self, text: str):
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list], right: set[int] | None = None):
        self.blocks.append(("table", header, [[str(c) for c in r] for r in rows], right or set()))

    def image(self, path: Path, alt: str):
        self.blocks.append(("img", path, alt))

    def code(self, text: str):
        self.blocks.append(("code", text))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                _, header, rows, right = b
                cell = lambda c: c.replace("|", "\\|").replace("\n", " ")  # noqa: E731
                out.append("| " + " | ".join(map(cell, header)) + " |")
                out.append("|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|")
                out += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1].name})")
            elif b[0] == "code":
                out.append("```\n" + b[1].rstrip() + "\n```")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        parts = []
        for b in self.blocks:
            if b[0] == "h":
                parts.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                parts.append(f"<p>{html.escape(b[1])}</p>")
            elif b[0] == "table":
                _, header, rows, right = b
                th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
                body = "".join("<tr>" + "".join(f'<td{" class=num" if i in right else ""}>{html.escape(c)}</td>'
                                                for i, c in enumerate(r)) + "</tr>" for r in rows)
                parts.append(f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(b[1].read_bytes()).decode("ascii")
                parts.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
            elif b[0] == "code":
                parts.append(f"<pre>{html.escape(b[1])}</pre>")
        style = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:.9em}"
                 "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}"
                 "th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}"
                 "img{max-width:100%}figure{margin:1em 0}figcaption{color:#666;font-size:.85em}"
                 "pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em}")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _short(path) -> str:
    """A path relative to the working directory when it is inside it (reports get moved and shared)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError, TypeError):
        return str(path)


def _f(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _locate(path: Path) -> tuple[Path | None, EvalResult | None, dict | None]:
    run = None
    if looks_like_run_dir(path):  # its format and config.yaml are checked before anything is read
        check_run_dir(path, for_inference=False)
        run = path
    compare = None
    for c in (path, path / "compare"):
        if (c / "compare.json").is_file():
            compare = read_json(c / "compare.json")
            if not isinstance(compare, dict) or "names" not in compare:
                raise EvalError(f"{c / 'compare.json'} is damaged: no 'names' (is it from `fewtune compare`?)")
            compare["_dir"] = str(c)
            break
    result = None
    for e in (path, path / "eval"):
        if (e / "results.json").is_file():
            result = read_results(e)
            break
    if result is None and compare is not None:  # the last compared model (typically the fine-tuned run)
        last = Path(compare["_dir"]) / "models" / compare["names"][-1]
        if (last / "results.json").is_file():
            result = read_results(last)
    if run is None and result is None and compare is None:
        raise EvalError(f"{path}: nothing to report (no config.yaml, results.json or compare.json; "
                        "run `fewtune train`, `fewtune eval` or `fewtune compare` first)")
    return run, result, compare


def _worst(result: EvalResult, k: int = 10) -> tuple[list[str], list[list[str]]]:
    recs, task = result.predictions, result.task
    cut = lambda s: str(s).replace("\n", " ")[:160]  # noqa: E731
    if task == "classification":
        wrong = [r for r in recs if not r["correct"]]
        if wrong and "logprobs" in wrong[0]:
            for r in wrong:
                r["_margin"] = r["logprobs"][r["predicted"]] - r["logprobs"][r["expected"]]
            wrong.sort(key=lambda r: -r["_margin"])
            # a pruned expected label carries an upper bound, so its margin is a lower bound
            at_least = lambda r: "≥ " if r["expected"] in r.get("bounded", []) else ""  # noqa: E731
            return (["line", "input", "expected", "predicted", "log-prob margin"],
                    [[r.get("line", ""), cut(r["input"]), r["expected"], r["predicted"], f"{at_least(r)}{r['_margin']:.2f}"]
                     for r in wrong[:k]])
        wrong.sort(key=lambda r: r["predicted"] != "<unparseable>")
        return (["line", "input", "expected", "predicted", "output"],
                [[r.get("line", ""), cut(r["input"]), r["expected"], r["predicted"], cut(r.get("output", ""))] for r in wrong[:k]])
    if task == "generation":
        worst = sorted(recs, key=lambda r: r["rougeL"])[:k]
        return (["line", "input", "expected", "predicted", "ROUGE-L"],
                [[r.get("line", ""), cut(r["input"]), cut(r["expected"]), cut(r["predicted"]), f"{r['rougeL']:.3f}"] for r in worst])
    if task == "json":
        def f1(r):
            return 2 * r["field_tp"] / (r["field_pred"] + r["field_ref"]) if r["field_pred"] + r["field_ref"] else 1.0
        worst = sorted(recs, key=lambda r: (r["valid"], f1(r)))[:k]
        return (["line", "input", "expected", "predicted", "valid", "field F1"],
                [[r.get("line", ""), cut(r["input"]), cut(r["expected"]), cut(r["predicted"]), r["valid"], f"{f1(r):.2f}"]
                 for r in worst])
    return [], []


def build_report(path: str | Path, output: str | Path | None = None) -> Path:
    """Write report.md, report.html and the PNGs into ``output`` (default PATH/report); return the HTML path."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} {'is a file, not a folder' if path.exists() else 'does not exist'}: give a "
                                "run directory or an eval/compare output folder")
    run, result, compare = _locate(path)
    out = Path(output) if output else path / "report"
    out.mkdir(parents=True, exist_ok=True)
    doc = Doc()
    doc.heading(f"fewtune report: {path.name}", 1)
    summary = read_json(run / "summary.json") if run and (run / "summary.json").is_file() else None
    if summary is not None and not isinstance(summary, dict):
        raise EvalError(f"{run / 'summary.json'} is damaged: not a JSON object")
    if run:
        doc.heading("Configuration")
        doc.code((run / "config.yaml").read_text(encoding="utf-8"))
        doc.heading("Data")
        if summary:
            rows = [[k.replace("_", " "), _f(summary.get(k))] for k in
                    ("train_examples", "val_examples", "dropped_examples", "partly_truncated", "train_tokens_seen",
                     "steps", "total_steps", "best_step", "best_val_loss", "eval_metric", "best_metric", "stopped_early",
                     "wall_s", "trainable_params", "total_params") if k in summary]
            doc.table(["", "value"], rows, {1})
        else:
            doc.para("The run has no summary.json: it did not finish.")
        records = read_json_lines(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
        png = plots.learning_curves(records, out / "learning_curves.png")
        if png:
            doc.heading("Learning curves")
            doc.image(png, "Training loss per step, validation loss and validation task metric; dotted: best checkpoint")
    if result is not None:
        _result_section(doc, result, out)
    if compare is not None:
        _compare_section(doc, compare, out)
    (out / "report.md").write_text(doc.markdown(), encoding="utf-8")
    (out / "report.html").write_text(doc.html(f"fewtune report: {path.name}"), encoding="utf-8")
    return out / "report.html"


def _result_section(doc: Doc, result: EvalResult, out: Path) -> None:
    m, s = result.metrics, result.settings
    doc.heading(f"Evaluation: {result.task}")
    doc.para(f"Model {_short(s.get('target'))} on {_short(s.get('data'))}: {m.get('n')} examples"
             + (f", {m['mode']} mode" if m.get("mode") else "") + f", {s.get('seconds')} s.")
    doc.table(["metric", "value"], [[k, _f(m[k])] for k in HEADLINE[result.task] if m.get(k) is not None], {1})
    if result.task == "classification":
        expected = Counter(r["expected"] for r in result.predictions)
        doc.para("Evaluation set: " + ", ".join(f"{lab} {n}" for lab, n in sorted(expected.items())) + ".")
        doc.table(["label", "precision", "recall", "F1", "support"],
                  [[lab, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"]]
                   for lab, r in m["per_class"].items()], {1, 2, 3, 4})
        doc.image(plots.confusion_matrix(m["confusion"], out / "confusion_matrix.png"), "Confusion matrix (rows: expected)")
        doc.image(plots.per_class_bars(m["per_class"], out / "per_class.png"), "Per-class precision, recall and F1")
        doc.heading("Error analysis")
        pairs = confused_pairs(m["confusion"])
        if pairs:
            doc.para("Most confused label pairs:")
            doc.table(["expected", "predicted as", "count"], [[p["expected"], p["predicted"], p["count"]] for p in pairs], {2})
    elif result.task == "json":
        if m.get("per_field"):
            doc.table(["field", "precision", "recall", "F1", "support"],
                      [[f, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"]]
                       for f, r in m["per_field"].items()], {1, 2, 3, 4})
        if m.get("invalid"):
            doc.para(f"{m['invalid_count']} invalid outputs, for example: "
                     + "; ".join(repr(x["output"][:80]) for x in m["invalid"][:3]))
    header, rows = _worst(result)
    if rows:
        if result.task != "classification":
            doc.heading("Error analysis")
        doc.para("Worst examples" + (" (most confidently wrong first):" if result.task == "classification" else ":"))
        doc.table(header, rows)


def _compare_section(doc: Doc, compare: dict, out: Path) -> None:
    doc.heading("Before / after")
    doc.para(f"{', '.join(compare['names'])} on {_short(compare['data'])} ({compare['n']} examples, task {compare['task']}). "
             f"Intervals: 95% bootstrap over examples ({compare['n_resamples']} resamples); differences are paired.")
    ints = compare.get("intervals", {})
    rows = []
    for metric in compare["comparisons"][0]["metrics"]:
        row = [metric]
        for name in compare["names"]:
            v = compare["metrics"][name].get(metric)
            ci = ints.get(name, {}).get(metric)
            row.append(f"{v:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]" if ci and v is not None else _f(v))
        rows.append(row)
    doc.table(["metric"] + compare["names"], rows, set(range(1, len(compare["names"]) + 1)))
    for c in compare["comparisons"]:
        diff_rows = [[metric, f"{d['difference']:+.3f}", f"[{d['interval']['low']:+.3f}, {d['interval']['high']:+.3f}]",
                      "significant" if d["significant"] else "within noise"] for metric, d in c["metrics"].items()]
        if "general" in c:
            d = c["general"]["perplexity"]
            diff_rows.append([f"perplexity on {Path(c['general']['data']).name} (lower is better)",
                              f"{d['a']:.2f} -> {d['b']:.2f} ({d['difference']:+.2f})",
                              f"[{d['interval']['low']:+.2f}, {d['interval']['high']:+.2f}]",
                              "significant" if d["significant"] else "within noise"])
        doc.para(f"{c['b']} minus {c['a']}:")
        doc.table(["metric", "difference", "95% CI", ""], diff_rows, {1})
        if "mcnemar" in c:
            mc = c["mcnemar"]
            doc.para(f"McNemar's exact test: only {c['a']} right on {mc['only_a_correct']} examples, only {c['b']} "
                     f"right on {mc['only_b_correct']}; p = {mc['p_value']:.3g}. They disagree on {c['disagreements']}.")
        if c["disagreement_examples"]:
            doc.table(["line", "input", "expected", c["a"], c["b"]],
                      [[e.get("line", ""), str(e["input"])[:120], e["expected"], e[c["a"]], e[c["b"]]]
                       for e in c["disagreement_examples"][:10]])
    if compare["task"] in ("classification", "generation", "json"):
        doc.image(plots.before_after(compare, out / "before_after.png"), "Each model's metrics with 95% intervals")
