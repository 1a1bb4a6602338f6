"""`fewtune data ...`: check, clean, stats, split, convert, mix. Each is a thin wrapper over one function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Check, clean and reshape data sets before training.")

FormatOpt = Annotated[str, typer.Option("--format", help="auto, or force one: prompt_completion, messages, alpaca, "
                                                           "sharegpt, classification, qa, text")]
DatasetOpt = Annotated[Optional[str], typer.Option(help="dataset name when FILE is a LLaMA-Factory dataset_info.json")]
MapOpt = Annotated[Optional[list[str]], typer.Option("--map", help="rename a field: OURS=THEIRS, e.g. "
                                                                   "--map text=sentence (repeatable)")]
ModelOpt = Annotated[Optional[str], typer.Option(help="tokenizer for token counts (default: the config's model)")]
ConfigOpt = Annotated[Optional[Path], typer.Option(help="training config: model, template, max_length, epochs ...")]
EncodingOpt = Annotated[str, typer.Option(help="the input files' text encoding: utf-8; auto (detect UTF-8, UTF-16/32 "
                                               "with a byte-order mark, GBK/GB18030 Chinese); or a codec name, e.g. "
                                               "gb18030, cp1252")]


def _call(fn, *args, **kwargs):
    """Run a stage function; the errors users cause become one red line and exit code 2."""
    from fewtune.cli_errors import run_stage

    return run_stage(fn, *args, broad=True, **kwargs)


def _note_encoding(encoding: str, *files: Path) -> None:
    """With --encoding auto, say which input was not UTF-8 and what it was read as."""
    if encoding.lower() != "auto":
        return
    from fewtune.data.encoding import encoding_name, file_encoding

    for file in files:
        codec = file_encoding(file)
        if codec not in (None, "utf-8"):
            typer.secho(f"warning: {file} read as {encoding_name(codec, Path(file).read_bytes())} (detected by "
                        f"--encoding auto; --encoding {codec} says so explicitly)", fg=typer.colors.YELLOW, err=True)


def _markup_safe(report):
    """The report with file names, fields and messages escaped for rich markup: they come from the data, and
    a field named ``[/x]`` would otherwise stop the printing with a MarkupError (or ``[red]`` vanish)."""
    from dataclasses import replace

    from rich.markup import escape

    return replace(report, problems=[replace(p, file=escape(p.file), field=escape(p.field) if p.field else p.field,
                                             message=escape(p.message)) for p in report.problems])


def _plain_console():
    """For the statistics tables, whose labels and names come from the data: no markup at all."""
    from rich.console import Console

    return Console(highlight=False, markup=False)


def _rename(pairs: list[str] | None) -> dict[str, str] | None:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise typer.BadParameter(f"--map {pair!r}: use OURS=THEIRS, e.g. text=sentence")
        ours, theirs = pair.split("=", 1)
        out[ours.strip()] = theirs.strip()
    return out or None


def _settings(cfg, max_length, min_examples, min_per_class, max_imbalance):
    from fewtune.quality.check import settings_from_config

    s = settings_from_config(cfg)
    for key, value in (("max_length", max_length), ("min_examples", min_examples), ("min_per_class", min_per_class),
                       ("max_imbalance", max_imbalance)):
        if value is not None:
            setattr(s, key, value)
    return s


def _config(path: Optional[Path]):
    from fewtune.config import Config, load_config

    return _call(load_config, path) if path else Config()


@app.command()
def check(
    file: Annotated[Path, typer.Argument(help="data file (JSONL, JSON array, CSV) or a dataset_info.json")],
    val: Annotated[Optional[Path], typer.Option("--val", help="validation file: also checked, and for leakage")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the full report here")] = None,
    strict: Annotated[bool, typer.Option(help="warnings fail too (exit 1)")] = False,
    fmt: FormatOpt = "auto",
    dataset: DatasetOpt = None,
    rename: MapOpt = None,
    template: Annotated[Optional[str], typer.Option(help="auto, chat or plain (plain adds separator/stop checks)")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="default: the config's data.max_length (512)")] = None,
    min_examples: Annotated[Optional[int], typer.Option(help="warn below this many examples (100)")] = None,
    min_per_class: Annotated[Optional[int], typer.Option(help="warn for classes with fewer examples (5)")] = None,
    max_imbalance: Annotated[Optional[float], typer.Option(help="warn above this largest/smallest class ratio (10)")] = None,
    tokens: Annotated[bool, typer.Option(help="count tokens with the model's tokenizer")] = True,
    show: Annotated[int, typer.Option(help="kinds of problems to print per severity")] = 30,
    encoding: EncodingOpt = "utf-8",
):
    """Report every problem in a data set (file, line, field, reason). Exit 1 on errors."""
    from rich.console import Console

    from fewtune.quality.check import check_data
    from fewtune.quality.report import print_problems, print_stats, summary_table, write_json

    cfg = _config(config)
    settings = _settings(cfg, max_length, min_examples, min_per_class, max_imbalance)
    report = _call(check_data, file, val, cfg, model=model, template=template, tokens=tokens,
                   fmt=None if fmt == "auto" else fmt, dataset=dataset, rename=_rename(rename), settings=settings,
                   encoding=encoding)
    console = Console(highlight=False)
    print_problems(_markup_safe(report), console, limit=show)
    print_stats(report, _plain_console())
    console.print(summary_table(report))
    if json_out:
        typer.echo(f"report written to {_call(write_json, report, json_out)}")
    code = report.exit_code(strict)
    verdict = "clean" if not report.problems else (f"{len(report.errors)} errors, {len(report.warnings)} warnings")
    typer.secho(f"{verdict}: exit {code}", fg=typer.colors.RED if code else typer.colors.GREEN)
    raise typer.Exit(code)


@app.command()
def stats(
    file: Annotated[Path, typer.Argument(help="data file or dataset_info.json")],
    model: ModelOpt = None,
    config: ConfigOpt = None,
    plot: Annotated[Optional[Path], typer.Option(help="token-length histogram PNG (default: FILE.lengths.png)")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the statistics here")] = None,
    fmt: FormatOpt = "auto",
    dataset: DatasetOpt = None,
    rename: MapOpt = None,
    template: Annotated[Optional[str], typer.Option(help="auto, chat or plain")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="default: the config's data.max_length (512)")] = None,
    encoding: EncodingOpt = "utf-8",
):
    """Lengths (tokens, characters, words), labels and size, with a histogram of token lengths."""
    from rich.console import Console

    from fewtune.quality.check import data_stats
    from fewtune.quality.report import print_stats, write_json

    cfg = _config(config)
    settings = _settings(cfg, max_length, None, None, None)
    plot = plot or Path(f"{dataset or Path(file).stem}.lengths.png")
    report = _call(data_stats, file, cfg, model=model, template=template, fmt=None if fmt == "auto" else fmt,
                   dataset=dataset, rename=_rename(rename), settings=settings, plot=plot, encoding=encoding)
    console = Console(highlight=False)
    for problem in _markup_safe(report).problems:
        console.print(f"[yellow]warning[/yellow] {problem}")
    print_stats(report, _plain_console())
    if report.stats["train"].get("plot"):
        typer.echo(f"histogram written to {report.stats['train']['plot']}")
    if json_out:
        typer.echo(f"statistics written to {_call(write_json, report, json_out)}")


@app.command()
def clean(
    file: Annotated[Path, typer.Argument(help="data file or dataset_info.json")],
    out: Annotated[Path, typer.Option(help="clean records (JSON lines; a .json name writes a JSON array)")],
    rejects: Annotated[Path, typer.Option(help="every other input example, with its reasons (JSON lines)")],
    fmt: FormatOpt = "auto",
    dataset: DatasetOpt = None,
    rename: MapOpt = None,
    keep_leading_space: Annotated[bool, typer.Option(help="keep one leading space on completions")] = True,
    encoding: EncodingOpt = "utf-8",
):
    """Safe fixes (strip, line endings, exact duplicates, schema failures set aside); nothing is lost."""
    from fewtune.quality.clean import clean_data

    result = _call(clean_data, file, out, rejects, fmt, dataset, _rename(rename),
                   keep_leading_space, encoding)
    for note in result.notes:
        typer.echo(note)
    typer.echo(f"{result.total} input examples: {len(result.kept)} written to {out}, {len(result.rejected)} to "
               f"{rejects}; fixed {result.fixed['whitespace']} texts' surrounding whitespace and "
               f"{result.fixed['line_endings']} texts' line endings")


@app.command()
def split(
    file: Annotated[Path, typer.Argument(help="data file or dataset_info.json")],
    out_dir: Annotated[Path, typer.Option(help="writes train.jsonl, validation.jsonl (, test.jsonl) or fold_K/")],
    val: Annotated[float, typer.Option("--val", help="validation share")] = 0.1,
    test: Annotated[float, typer.Option("--test", help="test share")] = 0.0,
    seed: int = 42,
    kfold: Annotated[Optional[int], typer.Option(help="write K folds (each: train.jsonl, validation.jsonl)")] = None,
    fmt: FormatOpt = "auto",
    dataset: DatasetOpt = None,
    rename: MapOpt = None,
    encoding: EncodingOpt = "utf-8",
):
    """Seeded train/validation/test split, stratified by label for classification; or K folds."""
    from fewtune.data.tools import split_file

    sizes = _call(split_file, file, out_dir, val, test, seed, kfold, fmt, dataset, _rename(rename), encoding)
    _note_encoding(encoding, file)
    typer.echo(", ".join(f"{name}: {n}" for name, n in sizes.items()) + f"  (written under {out_dir})")


@app.command()
def convert(
    file: Annotated[Path, typer.Argument(help="data file, dataset_info.json, or a SNIPS directory/file with --from snips")],
    to: Annotated[str, typer.Option(help="messages, sharegpt, alpaca, prompt_completion, classification, qa, text; "
                                         "with --from snips: classification (intents) or slots (JSON)")],
    out: Annotated[Path, typer.Option(help="JSON lines to write")],
    source_format: Annotated[str, typer.Option("--from", help="auto, a format name, or snips")] = "auto",
    split_name: Annotated[str, typer.Option("--split", help="SNIPS split: train or validate")] = "train",
    dataset: DatasetOpt = None,
    rename: MapOpt = None,
    encoding: Annotated[str, typer.Option(help="the input's text encoding (not for --from snips): utf-8, auto, or "
                                               "a codec name, e.g. gb18030")] = "utf-8",
):
    """Convert between formats (round trips keep the content); or bring in SNIPS."""
    from fewtune.data.tools import convert_file, write_jsonl

    if source_format == "snips":
        from fewtune.datasets.snips import snips_records

        task = {"classification": "intent", "intent": "intent", "slots": "slots"}.get(to)
        if task is None:
            typer.secho("error: with --from snips, --to is classification or slots", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        rows = _call(snips_records, file, task, split_name)
        write_jsonl(out, rows)
        typer.echo(f"{len(rows)} SNIPS {split_name} utterances written to {out} as {task} examples")
        return
    n = _call(convert_file, file, out, to, source_format, dataset, _rename(rename), encoding)
    _note_encoding(encoding, file)
    typer.echo(f"{n} examples written to {out} as {to}")


@app.command()
def mix(
    domain: Annotated[Path, typer.Argument(help="your task's data (all of it is used)")],
    general: Annotated[Path, typer.Argument(help="general instruction data to sample from")],
    out: Annotated[Path, typer.Option(help="mixed JSON lines (messages format, with a provenance field)")],
    ratio: Annotated[Optional[float], typer.Option(help="general examples per domain example, e.g. 7")] = None,
    count: Annotated[Optional[int], typer.Option(help="or a fixed number of general examples")] = None,
    seed: int = 42,
    rename: MapOpt = None,
    encoding: EncodingOpt = "utf-8",
):
    """Domain data plus a seeded sample of general data (against forgetting), shuffled."""
    from fewtune.data.tools import mix_files

    sizes = _call(mix_files, domain, general, out, ratio, count, seed, _rename(rename), encoding)
    _note_encoding(encoding, domain, general)
    typer.echo(f"{sizes['total']} examples written to {out}: {sizes['domain']} domain + {sizes['general']} general")


@app.command()
def score(
    file: Annotated[Path, typer.Argument(help="data file to score")],
    model: Annotated[Optional[str], typer.Option(help="score under this model (default: the embedded default)")] = None,
    run: Annotated[Optional[Path], typer.Option(help="or under a fine-tuned run (its template too)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="per-example scores, JSON lines (default: FILE.scores.jsonl)")] = None,
    keep: Annotated[Optional[Path], typer.Option(help="the examples kept, records as read (with --drop-worst/--drop-flagged)")] = None,
    rejects: Annotated[Optional[Path], typer.Option(help="the examples left out, with their scores and reasons")] = None,
    drop_worst: Annotated[float, typer.Option(help="leave out this percentage of highest-loss examples")] = 0.0,
    drop_flagged: Annotated[bool, typer.Option(help="leave out every flagged example too")] = False,
    batch_size: int = 8,
    precision: Annotated[str, typer.Option(help="auto, no (float32) or bf16")] = "auto",
    fmt: FormatOpt = "auto",
):
    """Per-example completion loss under a model or run, plus length, repetition and language signals; flags
    outliers with reasons, and writes a filtered file plus rejects (nothing lost)."""
    from fewtune.models import DEFAULT_MODEL
    from fewtune.quality.score import score_data, summary_lines

    if model is not None and run is not None:
        from fewtune.cli_errors import fail

        fail(ValueError("give --model or --run, not both"))
    target = str(run) if run is not None else (model or DEFAULT_MODEL)
    out = out or file.with_name(file.stem + ".scores.jsonl")
    result = _call(score_data, file, target, out, keep, rejects, drop_worst, drop_flagged, fmt, batch_size, precision)
    for line in summary_lines(result):
        typer.echo(line)
    typer.echo(f"scores written to {out}")
    if keep is not None:
        typer.echo(f"{result.kept} examples written to {keep}, {result.rejected} to {rejects}")


@app.command()
def noise(
    file: Annotated[Path, typer.Argument(help="classification data file (a label on every example)")],
    out: Annotated[Path, typer.Option(help="folder for the fold runs, out-of-fold probabilities and label_issues.jsonl")],
    config: Annotated[Optional[Path], typer.Option(help="training config of the fold runs (default: suggest's for FILE)")] = None,
    model: Annotated[Optional[str], typer.Option(help="base model of the fold runs (default: the config's, or the embedded default)")] = None,
    folds: Annotated[int, typer.Option(help="K: each example is scored by a run trained on the other K-1 folds")] = 5,
    seed: Annotated[int, typer.Option(help="seed of the stratified fold split")] = 0,
    clean: Annotated[Optional[Path], typer.Option(help="write the set without the flagged examples (records as read)")] = None,
    rejects: Annotated[Optional[Path], typer.Option(help="with --clean: the flagged examples, with what was found")] = None,
    relabel: Annotated[bool, typer.Option(help="with --clean: keep flagged examples with the suggested label")] = False,
    batch_size: int = 16,
    fmt: FormatOpt = "auto",
    overrides: Annotated[Optional[list[str]], typer.Argument(help="dotted config overrides for the fold runs, e.g. train.epochs=3")] = None,
):
    """Find probably wrong labels: K-fold runs score every example out of fold (choice scoring), and confident
    learning (cleanlab) ranks the examples whose given label the models doubt, each with the label they prefer."""
    from fewtune.quality.noise import find_label_noise, summary_lines

    result = _call(find_label_noise, file, out, config=config, model=model, overrides=overrides, folds=folds,
                   seed=seed, fmt=fmt, batch_size=batch_size, clean=clean, rejects=rejects, relabel=relabel)
    for line in summary_lines(result):
        typer.echo(line)
    typer.echo(f"out-of-fold probabilities: {out / 'oof_probs.jsonl'}; issues: {out / 'label_issues.jsonl'}")
    if clean is not None:
        typer.echo(f"cleaned set: {clean} ({'relabelled' if relabel else 'flagged examples left out'}); "
                   f"flagged: {rejects}")
