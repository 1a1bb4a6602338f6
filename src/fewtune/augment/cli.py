"""`fewtune augment`: a thin wrapper over :func:`fewtune.augment.pipeline.augment_file`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml


def _split(values: Optional[list[str]]) -> list[str]:
    """Repeated options, each of which may hold a comma-separated list."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def parse_option_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``["eda.alpha_sr=0.2", "paraphrase.temperature=1.0"]`` -> ``{"eda": {"alpha_sr": 0.2}, ...}`` (values as YAML)."""
    options: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        method, dot, name = key.strip().partition(".")
        if not sep or not dot or not method or not name:
            raise ValueError(f"--set {pair!r}: expected METHOD.OPTION=VALUE, e.g. eda.alpha_sr=0.2")
        options.setdefault(method, {})[name] = yaml.safe_load(value) if value.strip() else ""
    return options


def methods_table():
    """The method table as the user sees it: name, kind, whether data.augment can run it each epoch, options."""
    from rich.table import Table

    from fewtune.augment.base import AUGMENT_METHODS
    from fewtune.augment import methods as _  # noqa: F401  (fills the table)

    table = Table(title="augmentation methods (--set METHOD.OPTION=VALUE; data.augment.options)")
    for column in ("method", "kind", "each epoch", "options (default)", "what it does"):
        table.add_column(column, overflow="fold")
    for name, method in AUGMENT_METHODS.items():
        options = ", ".join(f"{key}={field.default!r}" for key, field in method.options.model_fields.items()
                            if key != "examples")
        table.add_row(name, method.kind, "yes" if method.online else "no (fewtune augment, then data mix)",
                      options, method.description)
    return table


def augment(
    file: Annotated[Optional[Path], typer.Argument(help="data to augment (any format `fewtune data check` reads)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="output JSON lines, same format as FILE: originals in order, each "
                                                     "followed by its augmentations (with an 'augment' provenance "
                                                     "field)")] = None,
    methods: Annotated[Optional[list[str]], typer.Option("--methods", "-m", help="methods, comma-separated or "
                       "repeated: eda, noise, backtranslate, paraphrase, dialogue, image")] = None,
    per_example: Annotated[int, typer.Option(help="candidates per example from each method")] = 1,
    model: Annotated[Optional[str], typer.Option(help="LLM for backtranslate/paraphrase/dialogue: a run directory, "
                                                      "a model folder, a .gguf or a hub id")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="validation/test files (repeatable): augmentations that "
                       "match one of their inputs are rejected as leakage")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="a method option: METHOD.OPTION=VALUE "
                    "(repeatable), e.g. eda.alpha_sr=0.2, noise.p_homophone=0.3")] = None,
    protect: Annotated[Optional[list[str]], typer.Option(help="a further string never changed (repeatable)")] = None,
    consistency: Annotated[Optional[str], typer.Option(help="a run or model that rejects classification "
                           "augmentations whose label it confidently predicts as another")] = None,
    threshold: Annotated[float, typer.Option(help="--consistency: reject at this probability of another label")] = 0.8,
    min_similarity: Annotated[float, typer.Option(help="examples without a label: reject augmentations less similar "
                              "than this to their source (0..1; 0: off)")] = 0.3,
    max_length_ratio: Annotated[float, typer.Option(help="reject augmentations whose user text is this many times "
                                "longer or shorter than their source's (0: off)")] = 2.0,
    only_new: Annotated[bool, typer.Option("--only-new", help="write the augmentations only (for `fewtune data "
                        "mix`)")] = False,
    seed: int = 42,
    fmt: Annotated[str, typer.Option("--format", help="auto, or the input's format")] = "auto",
    encoding: Annotated[str, typer.Option(help="the input's text encoding (utf-8, auto, or a codec name)")] = "utf-8",
    list_methods: Annotated[bool, typer.Option("--list-methods", help="print the methods and their options, "
                            "then stop")] = False,
):
    """Grow a small data set: new examples that keep every label and quoted answer, none matching validation/test data."""
    from rich.console import Console

    from fewtune.augment.pipeline import AugmentSettings, augment_file, summary_table
    from fewtune.cli_errors import run_stage

    if list_methods:
        Console().print(methods_table())
        return
    if file is None or out is None:
        typer.echo("error: give the data FILE and --out AUGMENTED.jsonl (or --list-methods)", err=True)
        raise typer.Exit(2)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = run_stage(parse_option_overrides, set_ or [], broad=True)
    settings = AugmentSettings(methods=_split(methods), per_example=per_example, options=options, seed=seed,
                               model=model, exclude=_split(exclude), min_similarity=min_similarity,
                               max_length_ratio=max_length_ratio,
                               consistency=consistency, consistency_threshold=threshold, only_new=only_new,
                               protect=list(protect or []))
    result = run_stage(augment_file, file, out, settings, fmt, encoding=encoding, broad=True)
    Console().print(summary_table(result))
    typer.echo(f"written: {result.out}, {result.rejects}, {result.summary_path}")
