"""``fewtune ui``: the whole workflow in a browser on one machine, built with Gradio.

Why Gradio: its components are the ones this workflow needs (tables, images, a line plot that
refreshes on a timer, a chat box, file upload), it is what LLaMA-Factory's LlamaBoard is built on,
so users know its look, and its front end ships inside the wheel: the page loads no script or
font from the network. (The theme's fonts are named local fonts below: Gradio's default theme
would fetch Google Fonts.) It runs on FastAPI and uvicorn, as ``fewtune serve`` does.

Four tabs, each a thin layer over the function the matching command calls:

- Data: ``fewtune data check`` (findings table, token-length histogram);
- Train: a form generated from the config schema (fewtune.ui.form), filled by ``fewtune suggest``,
  started as a ``fewtune train`` process (fewtune.ui.jobs) with its loss curve refreshed every second;
- Evaluate: ``fewtune eval`` for one model, ``fewtune compare`` for several (metrics with 95%
  bootstrap intervals, confusion matrices, the examples two models disagree on);
- Chat: one conversation with a run or model, with its training template and stop sequences.

The server binds to 127.0.0.1 unless told otherwise and never opens a public share link.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fewtune.ui.form import NONE_CHOICE, Field, schema_fields, to_config, widget_values
from fewtune.ui.jobs import TrainingJob

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".csv")
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".fewtune-ui", "checkpoints"}
# sections of the form open at the start; the rest sit in closed accordions
OPEN_SECTIONS = ("model", "data", "method", "train")
FONTS = ["Noto Sans CJK SC", "Noto Sans", "DejaVu Sans", "ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["Noto Sans Mono CJK SC", "DejaVu Sans Mono", "ui-monospace", "monospace"]


class UIError(ValueError):
    """A problem to show in the page (wrong path, bad form value)."""


def require_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check
    try:
        import gradio as gr
    except ImportError:
        raise UIError("fewtune ui needs Gradio: pip install 'fewtune[ui]' (or pip install gradio)") from None
    return gr


def find_files(root: Path, suffixes: tuple[str, ...] = DATA_SUFFIXES, limit: int = 200, depth: int = 4) -> list[str]:
    """Data files under ``root`` (relative paths), skipping virtual environments and run internals."""
    found: list[str] = []

    def walk(folder: Path, level: int) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            return
        for entry in entries:
            if len(found) >= limit:
                return
            if entry.is_dir():
                if entry.name not in SKIP_DIRS and not entry.name.startswith(".") and level < depth:
                    walk(entry, level + 1)
            elif entry.suffix.lower() in suffixes and entry.name not in ("metrics.jsonl", "predictions.jsonl"):
                found.append(str(entry.relative_to(root)))

    walk(root, 0)
    return found


def find_runs(root: Path, limit: int = 100) -> list[str]:
    """Run directories under ``root`` (those with an adapter or model and a config), newest first."""
    from fewtune.generate import is_run_dir

    runs = []
    for config in root.glob("**/config.yaml"):
        if any(part in SKIP_DIRS for part in config.parts) or len(runs) >= limit:
            continue
        if is_run_dir(config.parent):
            runs.append(config.parent)
    runs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [str(p.relative_to(root)) for p in runs]


def resolve(root: Path, path: str | None, what: str) -> Path:
    if not path or not str(path).strip():
        raise UIError(f"give the {what}")
    p = Path(str(path).strip()).expanduser()
    p = p if p.is_absolute() else root / p
    if not p.exists():
        raise UIError(f"{what} not found: {p}")
    return p


def _target(root: Path, value: str) -> str:
    """A run directory or model folder under root, or a model name as given."""
    value = value.strip()
    candidate = root / value
    return str(candidate) if value and candidate.exists() else value


# ----------------------------------------------------------------------------------- data


def preview(file: Path, n: int = 8) -> list[list[Any]]:
    """The first examples as the training reads them: line, input (the last user turn), expected output."""
    from fewtune.data.dataset import load_examples

    try:
        examples = load_examples(file)[:n]
    except (ValueError, OSError) as err:  # the findings say what is wrong with the file
        return [["", f"(no preview: {err})", ""]]
    return [[e.line, e.input_text[:300], (e.reference or e.label or "")[:200]] for e in examples]


def check_file(root: Path, path: str, model: str, out_dir: Path) -> tuple[str, list[list[Any]], str | None]:
    """Markdown summary, findings rows (errors first) and the token-length histogram (PNG path) of one file."""
    from fewtune.config import Config
    from fewtune.quality.check import check_data
    from fewtune.quality.stats import plot_token_lengths

    file = resolve(root, path, "data file")
    cfg = Config()
    report = check_data(file, None, cfg, model=_target(root, model) if model.strip() else None, progress=False)
    problems = sorted(report.problems, key=lambda p: (p.severity != "error", p.check, p.line or 0))
    rows = [[p.severity, p.check, p.line if p.line is not None else "", p.field or "", p.message] for p in problems]
    stats = report.stats.get("train", {})  # empty when the file could not be read (the findings say why)
    lines = [f"**{file.name}**: {stats.get('examples', 0)} examples; {len(report.errors)} errors, "
             f"{len(report.warnings)} warnings" + (" (clean)" if not report.problems else "")]
    total = stats.get("lengths", {}).get("tokens", {}).get("total")
    if total:
        lines.append(f"tokens per example: median {total['median']}, max {total['max']} "
                     f"(data.max_length {cfg.data.max_length})")
    counts = (stats.get("labels") or {}).get("counts")
    if counts:
        lines.append("labels: " + ", ".join(f"{k} {v}" for k, v in list(counts.items())[:20]))
    plot = None
    if report.measures.get("train"):
        out_dir.mkdir(parents=True, exist_ok=True)
        png = out_dir / f"lengths-{time.strftime('%H%M%S')}-{file.stem}.png"
        made = plot_token_lengths(report.measures["train"], png, cfg.data.max_length, title=file.name)
        plot = str(made) if made else None
    return "\n\n".join(lines), rows, plot


# ----------------------------------------------------------------------------------- evaluate


def evaluate_targets(root: Path, targets: list[str], data: str, limit: int | None,
                     out_dir: Path) -> tuple[list[list[Any]], list[str], list[list[Any]], str]:
    """Metrics rows (metric, then one "value [low, high]" per model), confusion-matrix PNGs, disagreement rows
    and a Markdown note, for one model (fewtune eval) or several (fewtune compare, the first the baseline)."""
    from fewtune.config import EvalSection
    from fewtune.eval.compare import compare, compare_results
    from fewtune.eval.evaluate import evaluate
    from fewtune.eval.report_plots import confusion_matrix

    targets = [_target(root, t) for t in targets if t and t.strip()]
    if not targets:
        raise UIError("choose at least one run or model")
    file = resolve(root, data, "evaluation data")
    settings = EvalSection(limit=int(limit) if limit else None)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = out_dir / f"eval-{stamp}"
    if len(targets) == 1:
        result = evaluate(targets[0], file, settings, out, progress=False)
        name = Path(targets[0]).name or targets[0]
        report = compare_results([result], [name], result.metrics.get("labels"))
    else:
        report = compare(targets, file, settings, out, progress=False)
    names = report["names"]
    intervals = report["intervals"]
    rows = [[metric] + [f"{report['metrics'][name][metric]:.3f} [{intervals[name][metric]['low']:.3f}, "
                        f"{intervals[name][metric]['high']:.3f}]" for name in names] for metric in intervals[names[0]]]
    images = []
    for name in names:
        confusion = report["metrics"][name].get("confusion")
        if confusion:
            images.append(str(confusion_matrix(confusion, out / f"confusion-{name}.png", title=name)))
    note = [f"{report['task']} on `{file.name}`, {report['n']} examples; 95% bootstrap intervals. "
            f"Results in `{out}`."]
    for comp in report["comparisons"]:
        note.append(f"{comp['b']} vs {comp['a']}: " + ", ".join(
            f"{m} {d['difference']:+.3f} [{d['interval']['low']:+.3f}, {d['interval']['high']:+.3f}]"
            + ("" if d["significant"] else " (within noise)") for m, d in comp["metrics"].items())
            + f"; they disagree on {comp['disagreements']} examples.")
    first = report["comparisons"][:1]  # the table lists the baseline against the second model
    disagreements = [[ex.get("line", ""), ex["input"][:300], ex["expected"], ex[c["a"]], ex[c["b"]]]
                     for c in first for ex in c["disagreement_examples"]]
    return rows, images, disagreements, "\n\n".join(note)


# ----------------------------------------------------------------------------------- chat


class ChatModels:
    """The model of the chat tab, loaded once per (target, system prompt)."""

    def __init__(self):
        self.key = None
        self.loaded = None

    def get(self, target: str, system: str | None):
        from fewtune.generate import load_for_inference

        key = (target, system)
        if self.key != key:
            self.loaded = None  # free the previous model before loading the next
            self.loaded = load_for_inference(target, system_prompt=system, merge=True)
            self.key = key
        return self.loaded


def chat_reply(models: ChatModels, root: Path, target: str, system: str, history: list[dict], message: str,
               temperature: float, top_k: int, top_p: float, max_new_tokens: int, stop: str) -> str:
    from fewtune.config import GenerateSection
    from fewtune.data.formats import Message
    from fewtune.generate import fit_history, generate

    if not target or not target.strip():
        raise UIError("choose a run or model to chat with")
    if not message or not message.strip():
        raise UIError("type a message")
    loaded = models.get(_target(root, target), system.strip() or None)
    gen = GenerateSection(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                          top_k=int(top_k) if top_k else None, top_p=float(top_p) if top_p and top_p < 1 else None,
                          stop=[s for s in (stop or "").splitlines() if s])
    turns = [Message(m["role"], _text(m["content"])) for m in history if m.get("role") in ("user", "assistant")]
    fitted, _ = fit_history(loaded, turns + [Message("user", message)], gen.max_new_tokens, name="your message")
    return generate(loaded, [fitted], gen, progress=False)[0][0]


def _text(content: Any) -> str:
    """A chat message's content as text (Gradio may hand back a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text(c.get("text", "") if isinstance(c, dict) else c) for c in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


# ----------------------------------------------------------------------------------- the page


def _widget(gr, field: Field):
    label = field.key
    info = field.description[:160] or None
    elem_id = "cfg-" + field.key.replace(".", "-").replace("_", "-")
    if field.kind == "bool":
        return gr.Checkbox(label=label, info=info, elem_id=elem_id)
    if field.kind == "choice":
        choices = [c for c in field.choices if c is not None]
        choices = ([NONE_CHOICE] if field.nullable else []) + [str(c) for c in choices]
        return gr.Dropdown(choices=choices, label=label, info=info, elem_id=elem_id)
    if field.kind in ("int", "float"):
        return gr.Number(label=label, info=info, precision=0 if field.kind == "int" else None, elem_id=elem_id)
    return gr.Textbox(label=label, info=info, lines=1, elem_id=elem_id,
                      placeholder="null" if field.nullable else None)


def build_app(workdir: str | Path = "."):
    """The Gradio Blocks app, rooted at ``workdir`` (data paths and run directories are relative to it)."""
    gr = require_gradio()
    import pandas as pd

    from fewtune.config import Config

    root = Path(workdir).resolve()
    scratch = root / ".fewtune-ui"
    fields = schema_fields()
    job = TrainingJob(root)
    models = ChatModels()

    def shown(err: Exception) -> str:
        return f"**Error:** {err}"

    with gr.Blocks(title="fewtune") as app:
        gr.Markdown(f"# fewtune\nWorking folder: `{root}`")
        with gr.Tab("Data", elem_id="tab-data"):
            with gr.Row():
                data_path = gr.Dropdown(choices=find_files(root), label="data file (path under the working folder)",
                                        allow_custom_value=True, elem_id="data-path", scale=3)
                data_upload = gr.File(label="or upload one", file_types=list(DATA_SUFFIXES), type="filepath", scale=2)
            check_model = gr.Textbox(label="model (for token counts and the template)", value=Config().model.name,
                                     elem_id="data-model")
            check_button = gr.Button("Check", variant="primary", elem_id="data-check")
            check_summary = gr.Markdown(elem_id="data-summary")
            findings = gr.Dataframe(headers=["severity", "check", "line", "field", "message"], label="findings",
                                    wrap=True, elem_id="data-findings", interactive=False,
                                    column_widths=["9%", "9%", "6%", "10%", "66%"])
            lengths_plot = gr.Image(label="token lengths", type="filepath", elem_id="data-lengths", interactive=False)
            first = gr.Dataframe(headers=["line", "input", "expected output"], label="first examples, as training "
                                 "reads them", wrap=True, elem_id="data-preview", interactive=False,
                                 column_widths=["8%", "62%", "30%"])

            def on_upload(file):
                if not file:
                    return gr.update()
                uploads = root / "uploads"
                uploads.mkdir(exist_ok=True)
                target = uploads / Path(file).name
                shutil.copyfile(file, target)
                rel = str(target.relative_to(root))
                return gr.update(choices=find_files(root), value=rel)

            def on_check(path, model):
                try:
                    summary, rows, plot = check_file(root, path, model, scratch)
                except Exception as err:  # shown in the page, not a stack trace
                    return shown(err), [], None, []
                return (summary, rows or [["", "", "", "", "no problems found"]], plot,
                        preview(resolve(root, path, "data file")))

            data_upload.upload(on_upload, data_upload, data_path)
            check_button.click(on_check, [data_path, check_model], [check_summary, findings, lengths_plot, first])

        with gr.Tab("Train", elem_id="tab-train"):
            gr.Markdown("Every key of the YAML config, as `fewtune train` reads it; **Suggest** fills the form from "
                        "the training file named in `data.train`.")
            with gr.Row():
                suggest_button = gr.Button("Suggest settings", elem_id="train-suggest")
                start_button = gr.Button("Start training", variant="primary", elem_id="train-start")
                stop_button = gr.Button("Stop", variant="stop", elem_id="train-stop")
            status = gr.Markdown("No training started yet.", elem_id="train-status")
            curve = gr.LinePlot(x="step", y="loss", color="series", label="loss (blue: training, orange: validation)",
                                elem_id="train-curve",
                                color_map={"training": "#3182bd", "validation": "#e6550d"},
                                height=340)
            reasons = gr.Markdown(elem_id="train-reasons")
            widgets = []
            for section in dict.fromkeys(f.section for f in fields):
                with gr.Accordion(section, open=section in OPEN_SECTIONS):
                    for f in fields:
                        if f.section == section:
                            widgets.append(_widget(gr, f))
            log_box = gr.Textbox(label="training log (last lines)", lines=8, interactive=False, elem_id="train-log")
            timer = gr.Timer(1.0, active=False)

            def on_suggest(*values):
                try:
                    cfg = to_config(fields, list(values))
                    if not cfg.data.train:
                        raise UIError("set data.train first")
                    from fewtune.advice.suggest import suggest

                    data = resolve(root, cfg.data.train, "training file")
                    result = suggest(data, model=_target(root, cfg.model.name), progress=False)
                except Exception as err:
                    return [gr.update() for _ in fields] + [shown(err)]
                new = result.config
                new = new.model_copy(update={"train": new.train.model_copy(update={"output_dir": cfg.train.output_dir})})
                text = "**suggest**:\n\n" + "\n".join(f"- {r}" for r in result.rules)
                return widget_values(fields, new) + [text]

            def progress_outputs():
                p = job.progress()
                # Gradio's plot keeps the series of its first drawing: no frame before the first record (an empty
                # one leaves no series at all), and both series in every frame, a missing one as a row without a
                # value. Typed columns: an untyped one makes the axis categorical.
                rows = list(p.curve)
                for series in ("training", "validation"):
                    if p.curve and not any(r["series"] == series for r in rows):
                        rows.append({"step": p.curve[0]["step"], "loss": float("nan"), "series": series})
                frame = pd.DataFrame(rows, columns=["step", "loss", "series"]).astype(
                    {"step": "int64", "loss": "float64", "series": "str"}) if rows else None
                return p.summary(), frame, job.log_tail(), gr.Timer(active=job.running)

            def on_start(*values):
                try:
                    cfg = to_config(fields, list(values))
                    if not cfg.data.train:
                        raise UIError("set data.train (a data file under the working folder)")
                    resolve(root, cfg.data.train, "training file")
                    job.start(cfg)
                except (ValueError, OSError, RuntimeError) as err:  # a bad form value, an occupied run directory
                    return shown(err), gr.update(), gr.update(), gr.Timer(active=job.running)
                return progress_outputs()

            def on_stop():
                job.stop()
                return progress_outputs()

            suggest_button.click(on_suggest, widgets, widgets + [reasons])
            start_button.click(on_start, widgets, [status, curve, log_box, timer])
            stop_button.click(on_stop, None, [status, curve, log_box, timer])
            timer.tick(progress_outputs, None, [status, curve, log_box, timer])
            app.load(lambda: widget_values(fields, Config()), None, widgets)

        with gr.Tab("Evaluate", elem_id="tab-eval"):
            with gr.Row():
                targets = gr.Dropdown(choices=find_runs(root), multiselect=True, allow_custom_value=True, scale=3,
                                      label="runs or models (the first is the baseline when several are chosen)",
                                      elem_id="eval-targets")
                eval_data = gr.Dropdown(choices=find_files(root), allow_custom_value=True, label="evaluation data",
                                        elem_id="eval-data", scale=3)
                eval_limit = gr.Number(None, label="first N examples (0 or empty: all)", precision=0, elem_id="eval-limit",
                                       scale=1)
            eval_button = gr.Button("Evaluate", variant="primary", elem_id="eval-run")
            eval_note = gr.Markdown(elem_id="eval-note")
            metrics_table = gr.Dataframe(label="metrics, value [95% interval]", elem_id="eval-metrics", interactive=False)
            confusion = gr.Gallery(label="confusion matrices", elem_id="eval-confusion", columns=2, height=520)
            disagreements = gr.Dataframe(headers=["line", "input", "expected", "baseline", "other"], wrap=True,
                                         label="examples the baseline and the second model disagree on",
                                         elem_id="eval-disagreements", interactive=False)
            refresh = gr.Button("Refresh the lists of runs and files", size="sm")

            def on_eval(chosen, data, limit):
                try:
                    rows, images, disagree, note = evaluate_targets(root, chosen or [], data, limit, scratch)
                except Exception as err:
                    return shown(err), gr.update(), [], []
                names = [Path(_target(root, t)).name or t for t in chosen]
                table = pd.DataFrame(rows, columns=["metric"] + names)
                pairs = pd.DataFrame(disagree, columns=["line", "input", "expected", names[0], names[1]]) \
                    if len(names) > 1 else []
                return note, table, images, pairs

            eval_button.click(on_eval, [targets, eval_data, eval_limit],
                              [eval_note, metrics_table, confusion, disagreements])
            refresh.click(lambda: (gr.update(choices=find_runs(root)), gr.update(choices=find_files(root))),
                          None, [targets, eval_data])

        with gr.Tab("Chat", elem_id="tab-chat"):
            with gr.Row():
                chat_target = gr.Dropdown(choices=find_runs(root) + [Config().model.name], allow_custom_value=True,
                                          label="run or model", elem_id="chat-target", scale=3)
                chat_system = gr.Textbox(label="system prompt (empty: the run's own, if its config has one)", scale=3,
                                         elem_id="chat-system")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)",
                                        elem_id="chat-temperature")
                top_k = gr.Slider(0, 200, value=0, step=1, label="top-k (0: off)", elem_id="chat-top-k")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p (1: off)", elem_id="chat-top-p")
                max_tokens = gr.Slider(1, 1024, value=128, step=1, label="max new tokens", elem_id="chat-max-tokens")
            stop = gr.Textbox(label="extra stop sequences, one per line", lines=2, elem_id="chat-stop")
            chatbot = gr.Chatbot(label="conversation", elem_id="chat-box", height=380)
            with gr.Row():
                message = gr.Textbox(label="message", scale=5, elem_id="chat-message")
                send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
            chat_error = gr.Markdown(elem_id="chat-error")

            def on_send(target, system, history, text, temp, k, p, max_new, stops):
                history = list(history or [])
                try:
                    reply = chat_reply(models, root, target, system, history, text, temp, k, p, max_new, stops)
                except Exception as err:
                    return history, text, shown(err)
                history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
                return history, "", ""

            chat_inputs = [chat_target, chat_system, chatbot, message, temperature, top_k, top_p, max_tokens, stop]
            send.click(on_send, chat_inputs, [chatbot, message, chat_error])
            message.submit(on_send, chat_inputs, [chatbot, message, chat_error])
            clear.click(lambda: ([], ""), None, [chatbot, chat_error])
    app.fewtune_job = job  # for tests and for shutdown
    return app


def theme(gr):
    """Gradio's default look with local fonts only (its default fetches Google Fonts)."""
    return gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)


def launch(workdir: str | Path = ".", host: str = "127.0.0.1", port: int = 7860, open_browser: bool = False):
    gr = require_gradio()
    app = build_app(workdir)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the UI listens on %s: anyone who can reach this machine can use it (it has no login)", host)
    try:
        app.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=False,
                                                      inbrowser=open_browser, theme=theme(gr), show_error=True,
                                                      allowed_paths=[str(Path(workdir).resolve())])
    finally:
        app.fewtune_job.stop()
