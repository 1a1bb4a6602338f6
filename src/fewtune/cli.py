"""The `fewtune` command: each subcommand is a thin wrapper over one stage function."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from fewtune.cli_errors import fail as _fail, run_stage as _run

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Supervised fine-tuning for small data sets.")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (CliRunner and pytest replace it between commands)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging(verbose: bool = False) -> None:
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: an application's own logging setup stays
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fewtune: %(message)s"))
        root.addHandler(handler)
    if not root.handlers[1:] and isinstance(root.handlers[0], _StderrHandler):
        root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "urllib3", "accelerate", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # peft reads transformers' deprecated alias on every adapter it wraps: one FutureWarning per run, about code
    # that is not the user's
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _options_error(err) -> Exception:
    """A pydantic error about command-line options, worded with the options' names (--max-new-tokens: ...)."""
    from fewtune.config import ConfigError

    def one(e: dict) -> str:
        msg = e["msg"].removeprefix("Value error, ")
        if not e["loc"]:  # a check across options
            return msg
        return f"--{'-'.join(str(x) for x in e['loc']).replace('_', '-')}: {msg} (got {e.get('input')!r})"

    return ConfigError("; ".join(one(e) for e in err.errors()))


def _section(config: Optional[Path], name: str, options: dict, none: tuple[str, ...] = ()):
    """Config section ``name`` of the --config file (or its defaults), the command-line options given on top
    (an option left at None was not given; those in ``none`` were given as None)."""
    from pydantic import ValidationError

    from fewtune.config import Config, load_config

    base = getattr(load_config(config), name) if config else Config.model_fields[name].annotation()
    values = {k: v for k, v in options.items() if (v is not None and v != []) or k in none}
    try:
        return type(base)(**{**base.model_dump(), **values})
    except ValidationError as err:  # an option out of range, e.g. --max-new-tokens 0
        raise _options_error(err) from None


def _generate_section(config: Optional[Path], overrides: dict):
    return _section(config, "generate", overrides)


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config (optional with --resume)")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="dotted overrides, e.g. train.lr=2e-4")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="continue this run directory from its last checkpoint")] = None,
    verbose: bool = False,
    report: Annotated[bool, typer.Option("--report", help="write RUN_DIR/report (Markdown + HTML) at the end")] = False,
    force: Annotated[bool, typer.Option("--force", help="with --resume: resume even if the data, model or training "
                                                         "keys changed since the checkpoint")] = False,
):
    """Fine-tune as the config says and write a run directory."""
    _setup_logging(verbose)
    from fewtune.config import load_config
    from fewtune.train.loop import train as run_training

    overrides = list(overrides or [])
    if config is not None and "=" in str(config):  # `fewtune train --resume RUN key=value`
        overrides.insert(0, str(config))
        config = None
    if resume is not None:
        from fewtune.runinfo import check_run_format

        _run(check_run_format, resume)  # before its config: a newer fewtune's config may have other keys
        config_path = config or resume / "config.yaml"
        cfg = _run(load_config, config_path, overrides + [f"train.output_dir={resume}", "train.resume=true"])
    elif config is None:
        _fail(ValueError("give a config file (or --resume RUN_DIR)"))
    else:
        cfg = _run(load_config, config, overrides)
    result = _run(run_training, cfg, force=force)
    if os.environ.get("RANK", "0") != "0":  # data-parallel launch: one summary line, from process 0
        return
    typer.echo(f"run directory: {result.run_dir}  (steps: {result.steps}, best validation loss: "
               f"{'n/a' if result.best_val_loss is None else f'{result.best_val_loss:.4f}'}, "
               f"{'early stop, ' if result.stopped_early else ''}{result.wall_s:.0f} s)")
    if report:
        from fewtune.eval.report import build_report

        typer.echo(f"report: {_run(build_report, result.run_dir)}")


PRECISION_HELP = ("auto | no | bf16: what the model computes in (auto: a run's training precision; another model's "
                  "by timed forward passes on a CPU)")


@app.command()
def generate(
    target: Annotated[str, typer.Argument(help="run directory, model folder, .gguf file or model name")],
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="a prompt (repeatable)")] = None,
    image: Annotated[Optional[list[str]], typer.Option("--image", help="an image file shown with every --prompt "
                                                       "(repeatable; vision-language models)")] = None,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="JSONL/JSON/CSV of prompts")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="JSONL to write")] = None,
    config: Annotated[Optional[Path], typer.Option(help="take the generate section from this config")] = None,
    system: Annotated[Optional[str], typer.Option(help="system prompt (for a run: replaces its own, e.g. when its examples carried different ones in the data)")] = None,
    max_new_tokens: Optional[int] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    repetition_penalty: Optional[float] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="extra stop string (repeatable)")] = None,
    num_return_sequences: Optional[int] = None,
    seed: Optional[int] = None,
    batch_size: Optional[int] = None,
    precision: Annotated[Optional[str], typer.Option(help=PRECISION_HELP)] = None,
):
    """Batched generation with the run's own template."""
    _setup_logging()
    from fewtune.data.formats import prompt_conversation, read_records, user_message
    from fewtune.generate import check_prompts, check_target, generate as run_generate, load_for_inference

    gen = _run(_generate_section, config, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                               top_p=top_p, repetition_penalty=repetition_penalty, stop=stop,
                                               num_return_sequences=num_return_sequences, seed=seed, batch_size=batch_size,
                                               precision=precision))
    if not prompt and not input:
        _fail(ValueError("give --prompt TEXT or --input FILE"))
    if image and not prompt:  # never dropped without a word: an --input file names its images in its records
        _fail(ValueError("--image goes with --prompt; the records of an --input file name their own images"))
    if output is not None and output.is_dir():
        _fail(IsADirectoryError(f"{output} is a directory: --output names the JSONL file to write"))
    _run(check_target, target)  # a missing or damaged run is refused before the prompts are read
    records: list[dict] = []
    conversations = []
    names = []  # how each prompt is called in an error: "--prompt 2", "prompts.jsonl line 7"
    for i, text in enumerate(prompt or [], 1):
        records.append({"prompt": text})
        conversations.append([_run(user_message, text, image or [])])
        names.append(f"--prompt {i}")
    if input:
        for line, record in _run(lambda: list(read_records(input))):
            records.append(record)
            conversations.append(_run(prompt_conversation, record, str(input), line))  # as training reads it
            names.append(f"{input} line {line}")
    _run(check_prompts, None, conversations, gen.max_new_tokens, names)  # empty ones: before loading the model
    loaded = _run(load_for_inference, target, system_prompt=system, merge=True, precision=gen.precision)
    outputs = _run(run_generate, loaded, conversations, gen, names=names)
    sink = _run(open, output, "w", encoding="utf-8") if output else None
    try:
        for record, conv, outs in zip(records, conversations, outputs):
            if sink:
                row = {"prompt": conv[-1].content, "output": outs[0] if len(outs) == 1 else outs}
                reference = next((record[k] for k in ("completion", "output", "answer", "label") if k in record), None)
                if reference is not None:
                    row["reference"] = reference
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                for out in outs:
                    typer.echo(out)
                if len(outputs) > 1 or len(outs) > 1:
                    typer.echo("---")
    finally:
        if sink:
            sink.close()
            typer.echo(f"wrote {len(outputs)} rows to {output}", err=True)


@app.command()
def chat(
    target: Annotated[str, typer.Argument(help="run directory, model folder, .gguf file or model name")],
    system: Annotated[Optional[str], typer.Option(help="system prompt (for a run: replaces its own, e.g. when its examples carried different ones in the data)")] = None,
    max_new_tokens: Optional[int] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    config: Optional[Path] = None,
    precision: Annotated[Optional[str], typer.Option(help=PRECISION_HELP)] = None,
    image: Annotated[Optional[list[str]], typer.Option("--image", help="an image file shown with your first "
                                                       "message (repeatable; vision-language models)")] = None,
):
    """Interactive terminal chat with the run's template. /image PATH shows a picture with your next message,
    /reset clears the history, /exit quits."""
    _setup_logging()
    from fewtune.data.formats import Message, user_message
    from fewtune.data.images import ImageError
    from fewtune.generate import PromptError, context_limit, fit_history, generate as run_generate, load_for_inference

    gen = _run(_generate_section, config, dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                               top_k=top_k, top_p=top_p, precision=precision))
    loaded = _run(load_for_inference, target, system_prompt=system, merge=True, precision=gen.precision)
    typer.echo(f"chatting with {loaded.source} ({loaded.template.kind} template). /reset clears, /exit quits"
               + (", /image PATH adds a picture." if loaded.vision is not None else "."))
    if image and loaded.vision is None:
        _fail(ValueError(f"--image: {loaded.source} is a text-only model"))
    history: list[Message] = []
    pending = list(image or [])  # images for the next message
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            typer.echo("")
            break
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = []
            typer.echo("(history cleared)")
            continue
        if text.strip().startswith("/image"):
            path = text.strip()[len("/image"):].strip()
            problem = (f"{loaded.source} is a text-only model" if loaded.vision is None
                       else "give the file: /image PATH" if not path else None)
            if problem:
                typer.secho(f"error: {problem}", fg=typer.colors.RED, err=True)
                continue
            pending.append(path)
            typer.echo(f"(image {path} goes with your next message)")
            continue
        if not text.strip():
            continue
        try:
            message = user_message(text, pending)
        except ImageError as err:
            pending = []
            typer.secho(f"error: {err} (not sent, the images dropped; the chat goes on)", fg=typer.colors.RED, err=True)
            continue
        # the history must leave room for the reply: the oldest turns go first; a message too long
        # by itself is refused and the chat goes on without it
        try:
            fitted, dropped = fit_history(loaded, history + [message], gen.max_new_tokens, name="your message")
        except (PromptError, ImageError) as err:
            typer.secho(f"error: {err} (not sent; the chat goes on)", fg=typer.colors.RED, err=True)
            continue
        if dropped:
            typer.secho(f"warning: dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} (user message and "
                        f"reply): the conversation no longer fit the model's context of {context_limit(loaded)} "
                        f"tokens with --max-new-tokens {gen.max_new_tokens}", fg=typer.colors.YELLOW, err=True)
        history, pending = fitted, []
        reply = run_generate(loaded, [history], gen, progress=False)[0][0]
        history.append(Message("assistant", reply))
        typer.echo(f"bot> {reply}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a LoRA or full fine-tuning run directory")],
    merged: Annotated[Optional[Path], typer.Option("--merged", help="folder for the merged transformers model")] = None,
    average: Annotated[Optional[str], typer.Option(
        "--average", help="best:K (the K best evaluations' weights, kept in best-ranked/) or last:K (the K newest "
        "checkpoints): average them into a new run directory first")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="the averaged run directory (default: beside the run, RUN-avg-best3)")] = None,
    gguf: Annotated[Optional[Path], typer.Option(
        "--gguf", help="write the merged model as one GGUF file (llama.cpp, Ollama), tokenizer and training "
        "chat template inside")] = None,
    quant: Annotated[str, typer.Option(help="GGUF weights: f32, f16, bf16, q8_0 or q4_0 (K-quants: run llama.cpp's "
                                            "llama-quantize on the f16 file)")] = "f16",
    check: Annotated[Optional[Path], typer.Option(
        "--check", help="with --gguf: reload the file and compare it with the merged model on this data file's "
                        "first 20 prompts (prompt tokens, greedy outputs, top-token agreement)")] = None,
):
    """Merge the adapter into the base weights and save a plain transformers model; or average several
    checkpoints of a run into a new run directory (--average), which eval/generate/compare take like any run."""
    _setup_logging()
    if out is not None and average is None:
        _fail(ValueError("--out names the averaged run: give --average best:K or last:K with it"))
    if check is not None and gguf is None:
        _fail(ValueError("--check compares a GGUF file with the merged model: give --gguf FILE.gguf with it"))
    if merged is None and average is None and gguf is None:
        _fail(ValueError("export needs --merged DIR (a plain transformers model), --gguf FILE.gguf and/or "
                         "--average best:K|last:K"))
    source = run_dir
    if average is not None:
        from fewtune.average import average_run

        source = _run(average_run, run_dir, average, out)
        typer.echo(f"averaged run written to {source}")
    if merged is not None:
        from fewtune.export import export_merged

        written = _run(export_merged, source, merged)
        typer.echo(f"merged model written to {written}")
    if gguf is not None:
        from fewtune.generate import load_for_inference
        from fewtune.gguf_export import check_gguf, export_gguf

        loaded = _run(load_for_inference, str(source), merge=True, precision="no")  # once, for both
        written = _run(export_gguf, source, gguf, quant, loaded)
        typer.echo(f"GGUF written to {written.path} ({quant}, {written.bytes / 2**20:.1f} MB, {written.tensors} tensors"
                   + (f"; left unquantized: {', '.join(written.kept_f32)}" if written.kept_f32 else "") + ")")
        if check is not None:
            result = _run(check_gguf, source, gguf, check, merged=loaded)
            speed = result["llama_cpp_tokens_per_s"]
            typer.echo(f"check on {result['examples']} prompts of {check}: same prompt tokens {result['same_prompt_tokens']}, "
                       f"same greedy output {result['same_greedy_output']}, top-token agreement "
                       f"{result['top_token_agreement']:.4f} over {result['positions']} positions; file "
                       f"{result['gguf_bytes'] / 2**20:.1f} MB vs {result['fp32_bytes'] / 2**20:.1f} MB in fp32; "
                       + (f"llama.cpp {speed:.1f} tokens/s" if speed else
                          "llama.cpp speed not measured (pip install llama-cpp-python)")
                       + f" (the fp32 model: {result['fp32_tokens_per_s']:.1f} tokens/s)")
            report_file = Path(str(gguf) + ".check.json")
            report_file.write_text(json.dumps({**result, "quant": quant, "source": str(source), "data": str(check)},
                                              indent=2))
            typer.echo(f"written: {report_file}")


SHOTS_HELP = ("K solved examples from the training file before every query (in-context, as earlier chat turns; "
              "classification: stratified by label); default 0")
SHOTS_FROM_HELP = "the file the shots are drawn from (default: the run's data.train)"
PROMPT_FILE_HELP = "system prompt (a role and instructions) from a file; replaces a run's own, like --system"


def _str(path: Optional[Path]) -> Optional[str]:
    return str(path) if path is not None else None


def _labels(values: Optional[list[str]]) -> Optional[list[str]]:
    """--labels a,b,c or --labels a --labels b."""
    if not values:
        return None
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


def _default_output(target: str, what: str) -> Path:
    from fewtune.generate import is_run_dir

    if is_run_dir(target):
        return Path(target) / what
    return Path("runs") / what / (Path(target).name or "model")


@app.command("eval")
def eval_(
    targets: Annotated[list[str], typer.Argument(help="run directory, model folder, .gguf file or model name; "
                                                 "several: scored as one ensemble")],
    data: Annotated[Path, typer.Option("--data", "-d", help="evaluation set (any data format; .txt for perplexity)")],
    config: Annotated[Optional[Path], typer.Option(help="take the eval section from this config (options override it)")] = None,
    task: Annotated[Optional[str], typer.Option(help="auto | classification | generation | json | perplexity (default: auto)")] = None,
    labels: Annotated[Optional[list[str]], typer.Option(help="candidate labels, comma-separated (default: those in --data)")] = None,
    mode: Annotated[Optional[str], typer.Option(help="classification: choice (score each label, the default) | generate")] = None,
    normalize: Annotated[Optional[bool], typer.Option("--normalize/--no-normalize", help="choice scoring: mean log-prob per token")] = None,
    limit: Annotated[Optional[int], typer.Option(help="only the first N examples")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="examples per batch (default: 8)")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="generation length (default: the run's, or label + 16)")] = None,
    window: Annotated[Optional[int], typer.Option(help="perplexity: tokens per window of a .txt file (default: 256)")] = None,
    system: Annotated[Optional[str], typer.Option(help="system prompt (for a run: replaces its own, e.g. when its examples carried different ones in the data)")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="folder for results.json and predictions.jsonl")] = None,
    report: Annotated[bool, typer.Option("--report", help="also write a Markdown/HTML report")] = False,
    precision: Annotated[Optional[str], typer.Option(help=PRECISION_HELP)] = None,
    shots: Annotated[Optional[int], typer.Option(help=SHOTS_HELP)] = None,
    shots_from: Annotated[Optional[Path], typer.Option(help=SHOTS_FROM_HELP)] = None,
    shots_seed: Annotated[Optional[int], typer.Option(help="seed of the shots' draw (default: 0)")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help=PROMPT_FILE_HELP)] = None,
    ensemble: Annotated[bool, typer.Option("--ensemble", help="TARGET is a `fewtune tune` folder: score its "
                                           "cross-validation ensemble (the final model and the winning trial's "
                                           "fold models)")] = False,
):
    """Task metrics with the training template: accuracy/F1, ROUGE/BLEU, JSON fields, perplexity.

    Several targets are one ensemble: choice-scoring probabilities averaged, generated outputs voted."""
    _setup_logging()
    from fewtune.eval.ensemble import evaluate_ensemble, tune_members
    from fewtune.eval.evaluate import evaluate
    from fewtune.eval.summary import print_eval

    settings = _run(_section, config, "eval", dict(task=task, labels=_labels(labels), mode=mode, normalize=normalize,
                                                   limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                   window=window, system_prompt=system, precision=precision,
                                                   shots=shots, shots_from=_str(shots_from), shots_seed=shots_seed,
                                                   prompt_file=_str(prompt_file)))
    if ensemble:
        if len(targets) != 1:
            _fail(ValueError("--ensemble takes one tune folder; to ensemble runs of your own, give them all "
                             "without --ensemble"))
        out = output or Path(targets[0]) / "eval_ensemble"
        targets = _run(tune_members, targets[0])
    elif len(targets) > 1:
        out = output or _default_output(targets[0], "eval_ensemble")
    else:
        out = output or _default_output(targets[0], "eval")
    if len(targets) > 1:
        result = _run(evaluate_ensemble, targets, data, settings, out)
    else:
        result = _run(evaluate, targets[0], data, settings, out)
    print_eval(result)
    typer.echo(f"results: {out / 'results.json'}, predictions: {out / 'predictions.jsonl'}")
    if report:
        from fewtune.eval.report import build_report

        typer.echo(f"report: {_run(build_report, out)}")


@app.command()
def compare(
    targets: Annotated[list[str], typer.Argument(help="two or more runs/models; the first is the baseline")],
    data: Annotated[Path, typer.Option("--data", "-d", help="evaluation set")],
    config: Annotated[Optional[Path], typer.Option(help="take the eval section from this config (options override it)")] = None,
    general: Annotated[Optional[Path], typer.Option(help="general-ability set (.txt or data file): perplexity, forgetting")] = None,
    general_limit: Annotated[Optional[int], typer.Option(help="windows/examples of --general to use (0: all; default: 200)")] = None,
    task: Annotated[Optional[str], typer.Option(help="auto | classification | generation | json (default: auto)")] = None,
    labels: Annotated[Optional[list[str]], typer.Option(help="candidate labels, comma-separated")] = None,
    mode: Annotated[Optional[str], typer.Option(help="classification: choice (the default) | generate")] = None,
    limit: Optional[int] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="examples per batch (default: 8)")] = None,
    max_new_tokens: Optional[int] = None,
    resamples: Annotated[Optional[int], typer.Option(help="bootstrap resamples (default: 1000)")] = None,
    system: Annotated[Optional[str], typer.Option(help="system prompt for plain models (default: the run's)")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o")] = None,
    report: Annotated[bool, typer.Option("--report", help="also write a Markdown/HTML report")] = False,
    precision: Annotated[Optional[str], typer.Option(help=PRECISION_HELP + "; one for every model compared")] = None,
    shots: Annotated[Optional[int], typer.Option(help=SHOTS_HELP + "; the same for every model")] = None,
    shots_from: Annotated[Optional[Path], typer.Option(help=SHOTS_FROM_HELP.replace("the run's", "the first run's"))] = None,
    shots_seed: Annotated[Optional[int], typer.Option(help="seed of the shots' draw (default: 0)")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="system prompt for plain models, from a file")] = None,
):
    """Same examples through each model: metrics side by side, differences with 95% bootstrap intervals."""
    _setup_logging()
    from fewtune.eval.compare import compare as run_compare
    from fewtune.eval.summary import print_compare

    settings = _run(_section, config, "eval", dict(
        general=str(general) if general else None, general_limit=None if general_limit == 0 else general_limit,
        task=task, labels=_labels(labels), mode=mode, limit=limit, batch_size=batch_size,
        max_new_tokens=max_new_tokens, n_resamples=resamples, system_prompt=system, precision=precision,
        shots=shots, shots_from=_str(shots_from), shots_seed=shots_seed, prompt_file=_str(prompt_file)),
        none=("general_limit",) if general_limit == 0 else ())
    out = output or _default_output(targets[-1], "compare")
    result = _run(run_compare, targets, data, settings, out)
    print_compare(result)
    typer.echo(f"written: {out / 'compare.json'}, {out / 'compare.md'}")
    if report:
        from fewtune.eval.report import build_report

        typer.echo(f"report: {_run(build_report, out)}")


@app.command()
def baseline(
    data: Annotated[Path, typer.Argument(help="the training file: where the shots come from")],
    test: Annotated[Path, typer.Option("--test", help="the test set every setting is scored on")],
    model: Annotated[Optional[str], typer.Option(help="the base model (default: the run's, else the embedded default)")] = None,
    run: Annotated[Optional[str], typer.Option(help="a fine-tuned run directory to weigh against the prompts")] = None,
    shots: Annotated[str, typer.Option(help="in-context example counts, comma-separated (0: zero-shot)")] = "0,1,4,8",
    shots_seed: Annotated[Optional[int], typer.Option(help="seed of the shots' draw (default: 0)")] = None,
    system: Annotated[Optional[str], typer.Option(help="system prompt for the base model (default: the run's)")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="the base model's system prompt from a file")] = None,
    config: Annotated[Optional[Path], typer.Option(help="take the eval section from this config (options override it)")] = None,
    task: Annotated[Optional[str], typer.Option(help="auto | classification | generation | json (default: auto)")] = None,
    labels: Annotated[Optional[list[str]], typer.Option(help="candidate labels, comma-separated")] = None,
    limit: Annotated[Optional[int], typer.Option(help="only the first N test examples")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="examples per batch (default: 8)")] = None,
    max_new_tokens: Optional[int] = None,
    precision: Annotated[Optional[str], typer.Option(help=PRECISION_HELP + "; one for every setting")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="default: RUN/baseline or runs/baseline")] = None,
):
    """Should I fine-tune? Zero-shot and K-shot prompting of the base model (and a fine-tuned run) on one test
    set: a table with 95% intervals and one line of advice."""
    _setup_logging()
    from fewtune.eval.baseline import baseline as run_baseline, markdown

    try:
        counts = [int(x) for x in shots.split(",") if x.strip()]
    except ValueError:
        _fail(ValueError(f"--shots {shots!r}: give counts separated by commas, e.g. 0,1,4,8"))
    settings = _run(_section, config, "eval", dict(task=task, labels=_labels(labels), limit=limit,
                                                   batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                   system_prompt=system, prompt_file=_str(prompt_file),
                                                   shots_seed=shots_seed, precision=precision))
    out = output or (Path(run) / "baseline" if run else Path("runs") / "baseline")
    result = _run(run_baseline, data, test, model, run, counts, settings, out)
    typer.echo(markdown(result, test, json.loads((out / "baseline.json").read_text())["n"]))
    typer.echo(f"written: {out / 'baseline.json'}, {out / 'baseline.md'}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory, or an eval/compare output folder")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="default: RUN_DIR/report")] = None,
):
    """Markdown + self-contained HTML report: config, data, curves, confusion matrix, errors, before/after."""
    _setup_logging()
    from fewtune.eval.report import build_report

    typer.echo(f"report: {_run(build_report, run_dir, output)}")


@app.command()
def demo(
    output_dir: Annotated[str, typer.Option(help="run directory")] = "runs/demo",
    overrides: Annotated[Optional[list[str]], typer.Argument(help="dotted overrides, e.g. train.epochs=1")] = None,
):
    """The main job end to end on the embedded default model: base vs fine-tuned on held-out data."""
    _setup_logging()
    from fewtune.demo.run import run_demo

    _run(run_demo, output_dir, list(overrides or []))


@app.command()
def suggest(
    data: Annotated[Path, typer.Argument(help="the training data file")],
    model: Annotated[Optional[str], typer.Option(help="model name or folder (default: the embedded default)")] = None,
    task: Annotated[str, typer.Option(help="auto, classification or generation")] = "auto",
    method: Annotated[str, typer.Option(help="auto, lora or full")] = "auto",
    lr_rule: Annotated[str, typer.Option(help="scale the learning rate to the batch size: sqrt or linear")] = "sqrt",
    out: Annotated[Optional[Path], typer.Option(help="write the config here (YAML with the reasons as comments)")] = None,
    measure: Annotated[bool, typer.Option("--measure/--no-measure", help="time training at batch sizes 1-32 here "
                                          "and weigh the tokens/s in the batch size (about half a minute)")] = True,
):
    """Read the data and write a complete config for it, printing every rule applied and the number behind it."""
    _setup_logging()
    from fewtune.models import DEFAULT_MODEL
    from fewtune.advice.suggest import suggest as suggest_config

    if task not in ("auto", "classification", "generation"):
        _fail(ValueError(f"--task must be auto, classification or generation, got {task!r}"))
    if method not in ("auto", "lora", "full"):
        _fail(ValueError(f"--method must be auto, lora or full, got {method!r}"))
    result = _run(suggest_config, data, model or DEFAULT_MODEL, task, lr_rule, method, out, measure)
    typer.echo(result.report())
    if out:
        typer.echo(f"config written to {out}; train with: fewtune train {out}")


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="YAML config: the base every combination starts from")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="dotted overrides for every run, e.g. train.max_steps=50")] = None,
    grid: Annotated[Optional[list[str]], typer.Option("--grid", help="KEY=V1,V2,... (repeatable): the cartesian product is run")] = None,
    random_n: Annotated[Optional[int], typer.Option("--random", help="run N combinations sampled from the grid instead of all")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="a count from train.seed (3) or a list (1,2,3); default 3, or 1 with --kfold")] = None,
    kfold: Annotated[Optional[int], typer.Option(help="K folds of the training file; each run holds one out")] = None,
    eval_data: Annotated[Optional[Path], typer.Option("--eval-data", help="score every run on this set (default: its validation split or fold)")] = None,
    metric: Annotated[Optional[str], typer.Option(help="ranking metric (default: accuracy, rougeL, field_f1 by task)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="sweep folder (default: TRAIN.OUTPUT_DIR/sweep)")] = None,
    random_seed: Annotated[int, typer.Option(help="seed of the --random sample")] = 0,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="run again the runs recorded as failed")] = False,
):
    """Train each grid combination over several seeds (or K folds) and rank them by mean ± std of the task metric."""
    _setup_logging()
    from fewtune.config import load_config
    from fewtune.workflows.sweep import SweepInterrupted, parse_seeds, sweep as run_sweep
    from fewtune.workflows.sweep_table import print_sweep

    cfg = _run(load_config, config, list(overrides or []))
    try:
        result = _run(run_sweep, cfg, grid, random_n, _run(parse_seeds, seeds) if seeds else None, kfold, eval_data,
                      metric, out, random_seed, retry_failed)
    except SweepInterrupted as err:
        typer.secho(str(err), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130)
    print_sweep(result)
    typer.echo(f"written: {result.out_dir / 'sweep.jsonl'}, {result.out_dir / 'sweep.md'}")


@app.command()
def tune(
    data: Annotated[Path, typer.Argument(help="the training data file (any supported format)")],
    model: Annotated[Optional[str], typer.Option(help="model name, folder or .gguf (default: the embedded default)")] = None,
    budget: Annotated[Optional[str], typer.Option(help="wall time for the search and the final training, e.g. 30m, 2h")] = None,
    trials: Annotated[Optional[int], typer.Option(help="stop after N trials (finished or stopped early)")] = None,
    metric: Annotated[Optional[str], typer.Option(help="selection metric (default: accuracy, rougeL, field_f1 by task)")] = None,
    kfold: Annotated[int, typer.Option(help="K folds of the training file score each trial")] = 3,
    dev: Annotated[Optional[Path], typer.Option(help="score trials on this file instead of folds (never the test file)")] = None,
    test: Annotated[Optional[Path], typer.Option(help="scored once, by the final model, after the search")] = None,
    search: Annotated[str, typer.Option(help="settings searched, from: lr, epochs, batch_size, r, label_smoothing, "
                                        "neftune, dropout")] = ",".join(("lr", "epochs", "batch_size", "r")),
    out: Annotated[Optional[Path], typer.Option(help="tune folder (default: runs/tune/<data file name>)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the folds, the sampler and the runs")] = 0,
    measure: Annotated[bool, typer.Option("--measure/--no-measure", help="let suggest time training here first")] = True,
    report_to: Annotated[Optional[list[str]], typer.Option("--report-to", help="tensorboard and/or mlflow: every "
                                                           "fold run filed under one experiment (repeatable)")] = None,
    ensemble: Annotated[bool, typer.Option("--ensemble", help="also keep the final model and the winning trial's "
                                           "fold models as one ensemble (ensemble.json), scored on --test beside "
                                           "the final model")] = False,
):
    """Search learning rate, epochs, batch size and LoRA rank from suggest's config, select by K-fold
    cross-validation (or --dev), retrain the winner on all the data, score it once on --test."""
    _setup_logging()
    from fewtune.workflows.tune import TuneInterrupted, tune as run_tune

    names = [s.strip() for s in search.split(",") if s.strip()]
    try:
        result = _run(run_tune, data, model, trials=trials, budget=budget, metric=metric, kfold=kfold, dev=dev,
                      test=test, search=names, out=out, seed=seed, measure=measure, report_to=report_to or (),
                      ensemble=ensemble)
    except TuneInterrupted as err:
        typer.secho(str(err), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130)
    typer.echo("\n".join(result.lines))
    typer.echo(f"written: {result.out_dir / 'tune.md'}, {result.out_dir / 'best.yaml'}, "
               f"{result.out_dir / 'trials.jsonl'}")


@app.command()
def serve(
    targets: Annotated[list[str], typer.Argument(help="run directories or models, optionally NAME=PATH; runs on one "
                                                 "base model share it and are chosen by the request's model field")],
    host: Annotated[str, typer.Option(help="address to listen on (default: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(help="require 'Authorization: Bearer KEY' on /v1/ requests")] = None,
    precision: Annotated[str, typer.Option(help="auto (the run's training precision), no (fp32) or bf16")] = "auto",
    max_queue: Annotated[int, typer.Option(help="requests that may wait; more get HTTP 429")] = 64,
    max_batch: Annotated[int, typer.Option(help="prompts generated together")] = 16,
    window_ms: Annotated[float, typer.Option(help="how long a request waits for others to batch with")] = 20.0,
):
    """An OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models) on fine-tuned runs."""
    _setup_logging()
    from fewtune.generate import check_target
    from fewtune.serve import serve as run_serve
    from fewtune.serve.engine import parse_targets

    if precision not in ("auto", "no", "bf16"):
        _fail(ValueError(f"--precision must be auto, no or bf16, got {precision!r}"))
    for _, path in _run(parse_targets, targets, broad=True):
        _run(check_target, path)  # a missing or damaged run is refused before anything loads
    _run(run_serve, targets, host, port, api_key, precision, max_queue, max_batch, window_ms)


@app.command()
def ui(
    workdir: Annotated[Path, typer.Argument(help="working folder: data files and runs are found and written here")] = Path("."),
    host: Annotated[str, typer.Option(help="address to listen on (default: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 7860,
    open_browser: Annotated[bool, typer.Option("--open", help="open the page in the default browser")] = False,
):
    """A web UI for the whole workflow: check data, train (form from the config schema), evaluate, chat."""
    _setup_logging()
    from fewtune.ui.app import launch

    if not workdir.is_dir():
        _fail(NotADirectoryError(f"{workdir} is not a folder"))
    _run(launch, workdir, host, port, open_browser, broad=True)  # a missing Gradio, a port in use


@app.command()
def doctor(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (or its metrics.jsonl)")],
    predictions: Annotated[Optional[Path], typer.Option(help="JSONL with prediction and reference per example")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the findings as JSON")] = False,
):
    """Read a run's curves and say what happened (overfitting, underfitting, instability...) and what to change."""
    from fewtune.advice.doctor import diagnose, format_findings

    try:
        findings = _run(diagnose, run_dir, predictions)
    except ValueError as err:  # metrics or predictions that are not what a run writes
        _fail(err)
    typer.echo(json.dumps([f.to_dict() for f in findings], indent=2) if as_json else format_findings(findings))


@app.command("pseudo-label")
def pseudo_label(
    run_dir: Annotated[Path, typer.Argument(help="a finished classification run (its config names the labeled data)")],
    unlabeled: Annotated[Path, typer.Option("--unlabeled", "-u", help="unlabeled records (JSONL, JSON array, CSV)")],
    config: Annotated[Optional[Path], typer.Option(help="config for the labeled data and retraining (default: the run's)")] = None,
    labels: Annotated[Optional[list[str]], typer.Option(help="candidate labels, comma-separated (default: the labeled data's)")] = None,
    threshold: Annotated[float, typer.Option(help="keep examples whose label probability is at least this, in (0, 1]")] = 0.9,
    balance: Annotated[bool, typer.Option(help="keep the labeled set's class proportions (scale: what the median class can fill)")] = True,
    max_per_class: Annotated[Optional[int], typer.Option(help="keep at most this many per class")] = None,
    epochs: Annotated[Optional[str], typer.Option(help="retraining epochs: a number, or auto (suggest's epochs for "
                                                  "the grown training set at the run's batch size); default: the "
                                                  "run's own")] = None,
    limit: Annotated[Optional[int], typer.Option(help="only the first N unlabeled prompts")] = None,
    rounds: Annotated[int, typer.Option(help="label-select-retrain rounds, each labeled by the newest run")] = 1,
    train: Annotated[bool, typer.Option(help="retrain on labeled + pseudo-labeled data (--no-train: only label)")] = True,
    out: Annotated[Optional[Path], typer.Option(help="output folder (default: RUN_DIR/pseudo)")] = None,
    rename: Annotated[Optional[list[str]], typer.Option("--map", help="rename a field: OURS=THEIRS, e.g. --map text=sentence")] = None,
    prompt_format: Annotated[str, typer.Option(help="the user turn from the record's fields, e.g. '评论：{text}'")] = "{text}",
    system: Annotated[Optional[str], typer.Option(help="system message for the prompts (default: the labeled examples' own)")] = None,
    normalize: Annotated[Optional[bool], typer.Option("--normalize/--no-normalize", help="confidence from per-token mean "
                                                      "log-probs (default: the config's eval.normalize)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="prompts scored together (default: the config's eval.batch_size)")] = None,
    exclude: Annotated[Optional[list[Path]], typer.Option(help="leave out prompts found in this file, e.g. the test set (repeatable)")] = None,
    precision: Annotated[Optional[str], typer.Option(help=PRECISION_HELP)] = None,
    ensemble: Annotated[bool, typer.Option("--ensemble", help="RUN_DIR is a `fewtune tune` folder: label with its "
                                           "cross-validation ensemble (final model + the winning trial's fold "
                                           "models), retrain the final model's config")] = False,
):
    """Label unlabeled data with a run, keep confident class-balanced examples, retrain on labeled + pseudo-labeled."""
    _setup_logging()
    from fewtune.data.cli import _rename
    from fewtune.generate import check_run_dir, looks_like_run_dir
    from fewtune.workflows.pseudo import PseudoError, PseudoSettings, pseudo_label as run_pseudo

    teachers: list[str] = []
    if ensemble:
        from fewtune.eval.ensemble import tune_members

        final, *teachers = _run(tune_members, run_dir)
        run_dir = Path(final)
    if looks_like_run_dir(run_dir):  # its format, config, template and tokenizer, before any data is read
        _run(check_run_dir, run_dir)

    def settings() -> PseudoSettings:
        from pydantic import ValidationError

        try:
            return PseudoSettings(threshold=threshold, balance=balance, max_per_class=max_per_class, limit=limit,
                                  rounds=rounds, train=train, rename=_rename(rename), prompt_format=prompt_format,
                                  system=system, exclude=exclude or [], epochs=epochs)
        except ValidationError as err:
            raise _options_error(err) from None

    # scored as the config (--config, else the run's own) says, the options given on top
    scoring_config = config or (run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else None)
    scoring = _run(_section, scoring_config, "eval", dict(labels=_labels(labels), normalize=normalize,
                                                          batch_size=batch_size, precision=precision))
    try:
        result = _run(run_pseudo, run_dir, unlabeled, _run(settings), scoring, out, config, teachers=teachers)
    except PseudoError as err:
        _fail(err)
    for s in result.rounds:
        t = s["training"]
        per_class = ", ".join(f"{lab} {c['kept']}" for lab, c in s["classes"].items())
        typer.echo(f"round {s['round']}: kept {s['kept']} of {s['pool']} ({per_class})"
                   + (f"; best validation {t['eval_metric']} {t['best']}, run: {t['run']}" if t else ""))
    typer.echo(f"summary: {result.out_dir / 'summary.md'}")


from fewtune.augment.cli import augment as augment_command  # noqa: E402
from fewtune.data.cli import app as data_app  # noqa: E402

app.command("augment")(augment_command)
app.add_typer(data_app, name="data")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
