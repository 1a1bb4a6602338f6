"""`fewtune data check`: every problem in a data set, located by file, line and field.

Checks, in order: unreadable input and schema (:mod:`fewtune.data.collect`), separators
and stop sequences for the plain template, duplicates, conflicts and leakage
(:mod:`fewtune.quality.duplicates`), lengths in the model's tokens with truncation verdicts,
labels, and size (:mod:`fewtune.quality.stats`). Errors are problems that break training or
make its results wrong; warnings are worth a look. :func:`check_data` returns a
:class:`Report`; the command prints it and exits 1 when it holds errors.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fewtune.config import Config
from fewtune.data import collect as _collect
from fewtune.data.collect import Collected, Problem, collect
from fewtune.quality.duplicates import duplicate_problems, leakage_problems
from fewtune.quality.images import image_problems
from fewtune.data.encoding import ENCODING_NAMES, check_encoding, encoding_name, file_encoding, reading_encoding
from fewtune.data.formats import DataError, _resolve_source, read_records
from fewtune.data.render import RenderError, Template
from fewtune.quality.stats import Measure, Settings, label_stats, length_stats, measure, size_stats
from fewtune.quality.textstats import has_cjk

log = logging.getLogger(__name__)

SENTENCE_END = set(".?!。？！…\"'”’」』)）]】")


@dataclass
class Report:
    files: dict[str, str]  # role (train, validation) -> path
    problems: list[Problem] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # role -> stats
    measures: dict[str, list[Measure]] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def exit_code(self, strict: bool = False) -> int:
        return 1 if self.errors or (strict and self.warnings) else 0

    def counts(self) -> dict[str, dict[str, int]]:
        """check -> {"error": n, "warning": n}"""
        out: dict[str, dict[str, int]] = {}
        for p in self.problems:
            out.setdefault(p.check, {"error": 0, "warning": 0})[p.severity] += 1
        return out

    def to_dict(self) -> dict:
        return {"files": self.files, "errors": len(self.errors), "warnings": len(self.warnings),
                "by_check": self.counts(), "stats": self.stats, "problems": [p.to_dict() for p in self.problems]}


def collect_data(path: str | Path, fmt: str = "auto", dataset: str | None = None, rename: dict[str, str] | None = None,
                 fix=None, encoding: str | None = None) -> Collected:
    """:func:`~fewtune.data.collect.collect` reading in ``encoding`` (utf-8, auto or a codec name), never a
    traceback for a file's content: what `data check`, `stats`, `clean`, `split`, `convert` and `mix` read with.
    A file that cannot be opened at all (missing, a folder, unreadable) raises a DataError: there is
    nothing to report on.

    collect's hint for pretty-printed JSON objects parses the whole file once more with Python's
    json, which stops with a RecursionError at a value nested too deeply for it, or a ValueError
    at an integer of more than 4,300 digits (the reader has already reported that line). The file
    is then collected again without that hint.
    """
    with reading_encoding(encoding):
        try:
            data = collect(path, fmt, dataset, rename, fix)
        except DataError:
            raise
        except (RecursionError, ValueError) as err:
            if isinstance(err, ValueError) and "integer string conversion" not in str(err):
                raise  # a usage error (an unknown format), not the file's content
            log.debug("%s: collected again without the pretty-printed-objects hint (%s)", path, type(err).__name__)
            data = _collect_without_concatenation_hint(path, fmt, dataset, rename, fix)
    unopened = [p for p in data.problems if p.check == "read" and p.line is None and p.message.startswith(UNOPENED)]
    if unopened:  # no content to report on: one error, as for any path a command cannot open
        raise DataError(data.path, None, unopened[0].message)
    return data


# read_records' reasons for a file it could not open at all (an empty file is content, and a finding)
UNOPENED = ("file not found", "is a directory", "cannot be read", "too large to read")


def _collect_without_concatenation_hint(path, fmt, dataset, rename, fix) -> Collected:
    """What :func:`collect` does, less the one hint that re-parses the file (see :func:`collect_data`)."""
    source, mapped_fmt, mapping = _resolve_source(Path(path), dataset)  # collect got past this already
    fmt = mapped_fmt or fmt
    out = Collected(str(source), None if fmt == "auto" else fmt, their_names=dict(rename or {}))
    errors: list = []
    rows = list(read_records(source, errors))
    _collect._layout_problems(out, Path(source), [e for e in errors if not e.reason.startswith("malformed JSON")],
                              len(rows))
    for err in errors:
        out.add("error", "read", err.line, err.field, err.reason + _collect._read_hint(err.reason))
    for line, record in rows:
        out.records[line] = record
    if fix is not None:
        rows = [(line, fix(record)) for line, record in rows]
        out.fixed = dict(rows)
    _collect._convert_all(out, rows, fmt, mapping, rename)
    return out


def encoding_problem(data: Collected, encoding: str | None) -> Problem | None:
    """With ``--encoding auto``, a warning naming the encoding a file that is not UTF-8 was read in."""
    if not encoding or check_encoding(encoding) != "auto":
        return None
    codec = file_encoding(data.path)
    if codec in (None, "utf-8"):
        return None
    name = encoding_name(codec, Path(data.path).read_bytes())
    return Problem("warning", "read", data.path, None, None, f"read as {name} ({ENCODING_NAMES.get(codec, codec)}), "
                   f"detected by --encoding auto: --encoding {codec} says so explicitly; other tools expect UTF-8 "
                   f"(iconv -f {codec.upper()} -t UTF-8 FILE > FILE.utf8)")


def settings_from_config(cfg: Config) -> Settings:
    return Settings(max_length=cfg.data.max_length, epochs=cfg.train.epochs, max_steps=cfg.train.max_steps,
                    batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum)


def load_template(cfg: Config, model: str | None = None, tokenizer=None, kind: str | None = None):
    """(tokenizer, template, why-not): the model's tokenizer and the template training would use."""
    from fewtune.models import load_tokenizer

    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(model or cfg.model.name)
        except Exception as err:  # any failure to load only costs the token counts
            return None, None, f"token counts skipped: could not load the tokenizer of {model or cfg.model.name!r} ({err})"
    try:
        template = Template.from_config(tokenizer, cfg, kind)
    except RenderError as err:
        return None, None, f"token counts skipped: {err}"
    return tokenizer, template, None


def load_vision_quietly(cfg: Config, model: str | None = None):
    """(the model's image handling or None, why-not): a vision-language model's image processor, for image
    token counts; a text-only model gives (None, None)."""
    from fewtune.vision import VisionError, vision_for

    try:
        return vision_for(model or cfg.model.name, settings=cfg.model.vision), None
    except (VisionError, OSError, ValueError) as err:
        return None, f"image token counts skipped: {err}"


def common_ending(texts: list[str]) -> tuple[str, int]:
    """The separator-like ending most texts share (``" ->"``, ``"\\n\\n###\\n\\n"``, ``" END"``) and how many
    texts end with it; ("", 0) when there is none. Ordinary sentence punctuation and the ends of
    words (``面`` in 正面/负面) are not separators."""
    texts = [t for t in texts if t]
    best, first = "", 0
    for k in range(1, 33):
        suffixes = Counter(t[-k:] for t in texts if len(t) >= k)
        if not suffixes:
            break
        suffix, count = suffixes.most_common(1)[0]
        first = first or count
        # grow the ending while (nearly) all the texts that share its last character keep sharing it
        if count < max(2, len(texts) / 2) or count < 0.9 * first:
            break
        best = suffix
    start = next((i for i, ch in enumerate(best) if not (ch.isalnum() or ch == "_")), None)
    if start is None:
        return "", 0
    ending = best[start:]
    if not ending.strip() or set(ending.strip()) <= SENTENCE_END:
        return "", 0  # trailing whitespace or a full stop is not a separator (clean strips whitespace)
    return ending, sum(t.endswith(ending) for t in texts)


def template_problems(data: Collected, template: Template) -> None:
    """Separator and stop sequence checks for the plain template (OpenAI's legacy data checks)."""
    sep, stop = template.separator, template.stop
    prompts, completions = [], []
    for ex in data.examples:
        fields = ex.meta["fields"]
        for i, m in enumerate(ex.messages):
            is_reply = m.role == "assistant"
            text = m.content.rstrip()
            if sep.strip() and text.endswith(sep.rstrip()) and not is_reply:
                data.add("warning", "template", ex.line, fields[i], f"ends with the separator {sep!r}, and the plain "
                         "template adds it again: remove it from the data")
                text = text[: -len(sep.rstrip())]
            if stop.strip() and text.endswith(stop.rstrip()) and is_reply:
                data.add("warning", "template", ex.line, fields[i], f"ends with the stop sequence {stop!r}, and the "
                         "plain template adds it again: remove it from the data")
                text = text[: -len(stop.rstrip())]
            if sep in text:
                data.add("error", "template", ex.line, fields[i], f"contains the separator {sep!r}: the plain template "
                         f"ends every prompt with it, so the model would take this as the end of a prompt")
            if stop in text:
                data.add("error" if is_reply else "warning", "template", ex.line, fields[i],
                         f"contains the stop sequence {stop!r}: generation "
                         + ("would stop here, cutting this answer short" if is_reply else "stops at it; a model that "
                            "learns to repeat prompt text may stop early"))
        prompts.append((ex, ex.prompt_messages[-1].content if ex.prompt_messages else ""))
        completions.append((ex, ex.reference or ""))
    for what, items, added in (("prompt", prompts, f"separator {sep!r}"), ("completion", completions, f"stop {stop!r}")):
        ending, count = common_ending([t for _, t in items])
        if not ending:
            continue
        if count == len(items):
            data.add("warning", "template", None, what, f"all {count} {what}s end with {ending!r}: a legacy "
                     f"{'separator' if what == 'prompt' else 'stop sequence'} in the data, and the plain template "
                     f"adds its own {added} after it. Remove it from the data, or set model.{added.split()[0]} to it.")
            continue
        for ex, text in items:
            if not text.endswith(ending):
                field_name = ex.meta["fields"][len(ex.prompt_messages) - 1 if what == "prompt" else -1]
                data.add("warning", "template", ex.line, field_name, f"does not end with {ending!r} as {count} of "
                         f"{len(items)} {what}s do: {what}s that do not share one ending teach the model an "
                         f"inconsistent {'boundary' if what == 'prompt' else 'stop'}")
    if sep and not sep[-1].isspace():
        for ex, text in completions:
            if text and not text[0].isspace() and not has_cjk(text[0]):
                data.add("warning", "template", ex.line, ex.meta["fields"][-1], f"does not start with a space: the "
                         f"separator {sep!r} does not end in whitespace, and most tokenizers expect a word after it "
                         "to carry its leading space (\" yes\", not \"yes\")")


def length_problems(data: Collected, measures: list[Measure], max_length: int) -> None:
    by_line = {ex.line: ex for ex in data.examples}
    for m in measures:
        ex = by_line[m.line]
        reply_field = ex.meta["fields"][-1]
        if m.error:
            data.add("error", "length", m.line, None, f"the template cannot render this example: {m.error}")
        elif m.cut == "entirely":
            data.add("error", "length", m.line, reply_field, f"max_length={max_length} cuts the completion away "
                     f"entirely: the example is {m.total_tokens} tokens and its first trained token comes at "
                     f"position {m.first_trained}; training would learn nothing from it")
        elif m.cut == "partly":
            data.add("warning", "length", m.line, reply_field, f"max_length={max_length} cuts the completion: "
                     f"{m.completion_tokens - m.kept_completion_tokens} of its {m.completion_tokens} tokens are lost "
                     "(the model learns answers that stop mid-way)")
        elif m.total_tokens > max_length:
            data.add("warning", "length", m.line, None, f"{m.total_tokens} tokens > max_length={max_length}; "
                     "the cut part carries no loss")


def label_problems(data: Collected, stats: dict | None, settings: Settings) -> None:
    if not stats:
        return
    for label in stats["rare"]:
        data.add("warning", "labels", None, "label", f"class {label!r} has only {stats['counts'][label]} "
                 f"example(s) (fewer than {settings.min_per_class}): too few to learn or to measure")
    if stats["classes"] > 1 and stats["imbalance_ratio"] > settings.max_imbalance:
        top = next(iter(stats["counts"]))
        low = min(stats["counts"], key=stats["counts"].get)
        data.add("warning", "labels", None, "label", f"imbalanced classes: {top!r} has {stats['counts'][top]} "
                 f"examples, {low!r} {stats['counts'][low]} (ratio {stats['imbalance_ratio']}); accuracy will "
                 "flatter a model that always answers the big class; report per-class scores")
    unlabelled = sum(e.label is None for e in data.examples)
    if unlabelled and stats["labelled"]:
        data.add("warning", "labels", None, "label", f"{unlabelled} examples have no label while "
                 f"{stats['labelled']} do")


def unseen_label_problems(train_stats: dict | None, validation: Collected) -> int:
    known = set(train_stats["counts"]) if train_stats else set()
    unseen = 0
    for ex in validation.examples:
        if ex.label is not None and ex.label not in known:
            unseen += 1
            validation.add("error", "labels", ex.line, "label", f"label {ex.label!r} never occurs in training: "
                           "a model cannot learn to predict it")
    return unseen


def check_data(path: str | Path, validation: str | Path | None = None, cfg: Config | None = None, *,
               model: str | None = None, tokenizer=None, template: str | None = None, tokens: bool = True,
               fmt: str | None = None, dataset: str | None = None, rename: dict[str, str] | None = None,
               settings: Settings | None = None, progress: bool = True, encoding: str | None = None) -> Report:
    """Check a training file (and a validation file) and return every problem found.

    ``cfg`` supplies the model, template, max_length, format and epochs (defaults: the
    config defaults); ``model``/``tokenizer``/``template`` override it. ``tokens=False``
    skips the tokenizer (no token counts, no truncation verdicts). ``encoding``: utf-8 (the
    default), auto (detect, with a warning naming what was found) or a codec name, e.g. gb18030.
    """
    cfg = cfg or Config()
    settings = settings or settings_from_config(cfg)
    validation = validation if validation is not None else cfg.data.validation
    fmt = fmt or cfg.data.format
    dataset = dataset or cfg.data.dataset
    files = {"train": str(path), **({"validation": str(validation)} if validation else {})}
    report = Report(files)
    sets = {"train": collect_data(path, fmt, dataset, rename, encoding=encoding)}
    if validation:
        sets["validation"] = collect_data(validation, fmt, dataset, rename, encoding=encoding)
    for data in sets.values():
        detected = encoding_problem(data, encoding)
        if detected:
            report.problems.append(detected)
    tok = tmpl = vision = None
    if tokens:
        tok, tmpl, why_not = load_template(cfg, model, tokenizer, template)
        if why_not:
            report.problems.append(Problem("warning", "length", str(path), None, None, why_not))
        vision, why_not = load_vision_quietly(cfg, model)
        if why_not:
            report.problems.append(Problem("warning", "images", str(path), None, None, why_not))
    elif (template or cfg.model.template) == "plain":  # no tokenizer needed for the separator checks
        tmpl = Template("plain", cfg.model.separator, cfg.model.stop, cfg.data.system_prompt)
    for role, data in sets.items():
        stats: dict = {"format": data.fmt, "records": len(data.records), "examples": len(data.examples),
                       "rejected_lines": len(data.rejected)}
        if tmpl is not None and tmpl.kind == "plain":
            template_problems(data, tmpl)
        stats["duplicates"] = duplicate_problems(data)
        images = image_problems(data, vision)
        if images is not None:
            stats["images"] = images
        measures = measure(data.examples, tok, tmpl, settings.max_length, progress, desc=f"measuring {role}",
                           vision=vision)
        report.measures[role] = measures
        length_problems(data, measures, settings.max_length)
        stats["lengths"] = length_stats(measures, settings.max_length)
        stats["labels"] = label_stats(data.examples, settings.min_per_class)
        if role == "train":
            label_problems(data, stats["labels"], settings)
            stats["size"] = size_stats(measures, settings)
            if 0 < len(data.examples) < settings.min_examples:
                data.add("warning", "size", None, None, f"only {len(data.examples)} usable examples (fewer than "
                         f"{settings.min_examples}): expect noisy results; hold out a real validation set and "
                         "compare against the base model before trusting a gain")
        report.stats[role] = stats
    if "validation" in sets:
        train, val = sets["train"], sets["validation"]
        report.stats["validation"]["leakage"] = leakage_problems(train, val)
        report.stats["validation"]["unseen_labels"] = unseen_label_problems(report.stats["train"]["labels"], val)
    for data in sets.values():
        report.problems.extend(data.problems)
    return report


def data_stats(path: str | Path, cfg: Config | None = None, *, model: str | None = None, tokenizer=None,
               template: str | None = None, tokens: bool = True, fmt: str | None = None, dataset: str | None = None,
               rename: dict[str, str] | None = None, settings: Settings | None = None, plot: str | Path | None = None,
               progress: bool = True, encoding: str | None = None) -> Report:
    """The length, label and size part of :func:`check_data` alone, plus a token-length histogram PNG."""
    cfg = cfg or Config()
    settings = settings or settings_from_config(cfg)
    data = collect_data(path, fmt or cfg.data.format, dataset or cfg.data.dataset, rename, encoding=encoding)
    report = Report({"train": str(path)})
    detected = encoding_problem(data, encoding)
    if detected:
        report.problems.append(detected)
    if len(data.rejected):
        report.problems.append(Problem("warning", "read", data.path, None, None, f"{len(data.rejected)} records or "
                                       "lines could not be used and are left out of the statistics (see `data check`)"))
    tok = tmpl = vision = None
    if tokens:
        tok, tmpl, why_not = load_template(cfg, model, tokenizer, template)
        if why_not:
            report.problems.append(Problem("warning", "length", data.path, None, None, why_not))
        vision, why_not = load_vision_quietly(cfg, model)
        if why_not:
            report.problems.append(Problem("warning", "images", data.path, None, None, why_not))
    measures = measure(data.examples, tok, tmpl, settings.max_length, progress, vision=vision)
    report.measures["train"] = measures
    labels = label_stats(data.examples, settings.min_per_class)
    report.stats["train"] = {"format": data.fmt, "records": len(data.records), "examples": len(data.examples),
                             "lengths": length_stats(measures, settings.max_length), "labels": labels,
                             "size": size_stats(measures, settings)}
    if plot is not None:
        from fewtune.quality.stats import plot_token_lengths

        written = plot_token_lengths(measures, plot, settings.max_length,
                                     f"{Path(data.path).name}: {len(measures)} examples, "
                                     f"{tmpl.kind if tmpl else 'no'} template, {model or cfg.model.name}")
        report.stats["train"]["plot"] = str(written) if written else None
    return report
