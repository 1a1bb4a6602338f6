"""Bad input, never a traceback: every command given a missing file, a folder where a file belongs (or
a file where a folder belongs), a damaged run directory or one a newer fewtune wrote answers with
one line on stderr naming the path, and exit code 2.

The run directory here is built by hand from the tiny model (what `fewtune train` writes for a full
fine-tuning run), so no test trains; each fault damages a copy of it. docs/reliability_cli.md lists
every case with the line the user sees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fewtune.cli import app
from fewtune.config import build_config, save_config
from fewtune.data.render import Template
from fewtune.runinfo import MARKER, RUN_FORMAT
from tests.conftest import write_jsonl

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src"
LABELED = [{"text": f"{t} {k}", "label": label} for label, texts in
           {"music": ["play jazz", "put on a song"], "weather": ["rain tomorrow", "forecast for rome"]}.items()
           for t in texts for k in range(3)]


@pytest.fixture(scope="session")
def base(tmp_path_factory, tiny_models, tokenizer) -> dict[str, Path]:
    """A complete run directory (full fine-tuning layout) and the files the commands read."""
    root = tmp_path_factory.mktemp("cli-errors")
    labeled = write_jsonl(root / "labeled.jsonl", LABELED)
    unlabeled = write_jsonl(root / "unlabeled.jsonl", [{"text": "play some music"}, {"text": "sunny today?"}])
    run = root / "run"
    run.mkdir()
    cfg = build_config({"model": {"name": tiny_models["llama"]}, "method": {"name": "full"},
                        "data": {"train": str(labeled), "val_ratio": 0.3},
                        "train": {"output_dir": str(run), "max_steps": 1, "batch_size": 2}})
    save_config(cfg, run / "config.yaml")
    Template.for_tokenizer(tokenizer).save(run / "template.json")
    tokenizer.save_pretrained(run / "tokenizer")
    shutil.copytree(tiny_models["llama"], run / "model")
    (run / MARKER).write_text(json.dumps({"run_format": RUN_FORMAT, "fewtune_version": "test"}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "epoch": 0, "train_loss": 3.0 - s / 10}) + "\n"
                                               for s in range(1, 6)))
    (run / "summary.json").write_text(json.dumps({"steps": 5, "best_val_loss": None}))
    config = root / "c.yaml"
    save_config(cfg, config)
    return {"root": root, "run": run, "tiny": Path(tiny_models["llama"]), "labeled": labeled, "unlabeled": unlabeled,
            "config": config}


def copy_run(base, tmp_path: Path) -> Path:
    """A copy of the base run; the weight and tokenizer folders are links (faults never touch them)."""
    run = tmp_path / "run"
    run.mkdir()
    for entry in base["run"].iterdir():
        if entry.is_dir():
            os.symlink(entry, run / entry.name)
        else:
            shutil.copy(entry, run / entry.name)
    return run


def error_lines(stderr: str) -> list[str]:
    """stderr without transformers' weight-loading progress bars (drawn when a model loads before the error)."""
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if line.strip() and not re.search(r"\d+%\|", line)]


def assert_one_line_error(result, path) -> str:
    """Exit code 2, exactly one line on stderr, naming the path; no traceback anywhere."""
    assert "Traceback" not in result.output
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = error_lines(result.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    assert str(path) in lines[0], (str(path), lines[0])
    return lines[0]


# ---------------------------------------------------------------- run directories: unreadable, newer

def _garbage(path: Path) -> None:
    path.write_text("train: [unclosed\n  : :\n")


def _own(run: Path, folder: str) -> Path:
    """Replace the link to a shared folder by a copy this test may damage."""
    target = (run / folder).resolve()
    (run / folder).unlink()
    shutil.copytree(target, run / folder)
    return run / folder


def _adapter_damaged(run: Path) -> None:
    (run / "model").unlink()  # a LoRA run: adapter/ instead of model/
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{")


def _newer(run: Path) -> None:
    (run / MARKER).write_text(json.dumps({"run_format": RUN_FORMAT + 1, "fewtune_version": "99.0"}))


# fault -> (damage the run copy, the path the message must name: relative to the run, or None for the run)
RUN_FAULTS = {
    "missing": (None, None),  # the run directory does not exist
    "file": (None, None),  # a file given where the run directory belongs
    "config_garbage": (lambda r: _garbage(r / "config.yaml"), "config.yaml"),
    "config_missing": (lambda r: (r / "config.yaml").unlink(), "config.yaml"),
    "config_invalid": (lambda r: (r / "config.yaml").write_text("train:\n  lrr: 1\n"), "config.yaml"),
    "template_missing": (lambda r: (r / "template.json").unlink(), "template.json"),
    "template_corrupt": (lambda r: (r / "template.json").write_text("{not json"), "template.json"),
    "template_not_a_template": (lambda r: (r / "template.json").write_text('{"colour": "blue"}'), "template.json"),
    "tokenizer_missing": (lambda r: (r / "tokenizer").unlink(), "tokenizer"),
    "tokenizer_damaged": (lambda r: (_own(r, "tokenizer") / "tokenizer_config.json").write_text("{"), "tokenizer"),
    "model_config_damaged": (lambda r: (_own(r, "model") / "config.json").write_text("{"), "model"),
    "model_weights_damaged": (lambda r: (_own(r, "model") / "model.safetensors").write_bytes(b"\0" * 4), "model"),
    "adapter_damaged": (_adapter_damaged, "adapter"),
    "weights_missing": (lambda r: (r / "model").unlink(), None),
    "format_newer": (_newer, None),
    "marker_damaged": (lambda r: (r / MARKER).write_text("garbage"), MARKER),
    "metrics_corrupt": (lambda r: (r / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0}\nnot json\n'),
                        "metrics.jsonl"),
    "metrics_missing": (lambda r: (r / "metrics.jsonl").unlink(), "metrics.jsonl"),
    "summary_corrupt": (lambda r: (r / "summary.json").write_text("{"), "summary.json"),
}
INFERENCE = ["missing", "file", "config_garbage", "config_missing", "config_invalid", "template_missing",
             "template_corrupt", "template_not_a_template", "tokenizer_missing", "tokenizer_damaged",
             "model_config_damaged", "model_weights_damaged", "adapter_damaged", "weights_missing", "format_newer",
             "marker_damaged"]
# which faults each reader of a run directory is given: those in what it reads
READERS = {
    "generate": INFERENCE, "chat": INFERENCE, "export": INFERENCE, "eval": INFERENCE, "compare": INFERENCE,
    "pseudo-label": INFERENCE,
    "report": ["missing", "file", "config_garbage", "config_missing", "config_invalid", "format_newer",
               "marker_damaged", "metrics_corrupt", "summary_corrupt"],
    "doctor": ["missing", "file", "format_newer", "marker_damaged", "metrics_corrupt", "metrics_missing"],
    "train --resume": ["missing", "file", "config_garbage", "config_missing", "config_invalid", "format_newer",
                       "marker_damaged"],
}


def _args(command: str, run: Path, base, tmp_path: Path) -> tuple[list[str], str | None]:
    r = str(run)
    return {
        "generate": (["generate", r, "--prompt", "hi", "--max-new-tokens", "2"], None),
        "chat": (["chat", r], "/exit\n"),
        "export": (["export", r, "--merged", str(tmp_path / "merged")], None),
        "eval": (["eval", r, "--data", str(base["labeled"]), "-o", str(tmp_path / "ev")], None),
        "compare": (["compare", str(base["tiny"]), r, "--data", str(base["labeled"]), "-o", str(tmp_path / "cmp")], None),
        "pseudo-label": (["pseudo-label", r, "--unlabeled", str(base["unlabeled"]), "--no-train",
                          "--out", str(tmp_path / "pseudo")], None),
        "report": (["report", r, "-o", str(tmp_path / "report")], None),
        "doctor": (["doctor", r], None),
        "train --resume": (["train", "--resume", r], None),
    }[command]


RUN_CASES = []
for _command, _faults in READERS.items():
    for _fault in _faults:
        RUN_CASES.append(pytest.param(_command, _fault, id=f"{_command.replace(' --', '-')}-{_fault}"))


@pytest.mark.parametrize("command,fault", RUN_CASES)
def test_a_damaged_or_newer_run_directory_is_one_line(command, fault, base, tmp_path):
    damage, named = RUN_FAULTS[fault]
    if fault == "missing":
        run = expected = tmp_path / "no-such-run"
    elif fault == "file":
        run = expected = tmp_path / "notes.txt"
        run.write_text("not a run\n")
    else:
        run = copy_run(base, tmp_path)
        damage(run)
        expected = run / named if named else run
    args, stdin = _args(command, run, base, tmp_path)
    line = assert_one_line_error(runner.invoke(app, args, input=stdin), expected)
    if fault == "format_newer":
        assert "upgrade fewtune" in line and "99.0" in line


def test_an_intact_run_directory_is_read(base, tmp_path):
    """The hand-built run is what the readers accept: the faults above are the only difference."""
    run = copy_run(base, tmp_path)
    out = runner.invoke(app, ["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["report", str(run), "-o", str(tmp_path / "report")])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["doctor", str(run)])
    assert out.exit_code == 0, out.output


def test_an_older_run_without_a_marker_is_read_as_format_1(base, tmp_path):
    run = copy_run(base, tmp_path)
    (run / MARKER).unlink()
    out = runner.invoke(app, ["report", str(run), "-o", str(tmp_path / "report")])
    assert out.exit_code == 0, out.output


# ---------------------------------------------------------------- files: missing, a folder, a file for a folder

def _file_cases():
    """(id, args(base, tmp) -> (argv, stdin), the path the message must name). M: missing, D: a folder, F: a file."""
    M = lambda t: t / "missing.jsonl"  # noqa: E731
    D = lambda t: t / "a-folder"  # noqa: E731
    F = lambda t: t / "notes.txt"  # noqa: E731
    out = lambda t: str(t / "out.jsonl")  # noqa: E731
    cases = [
        ("train-config-missing", lambda b, t: ["train", str(M(t))], M),
        ("train-config-folder", lambda b, t: ["train", str(D(t))], D),
        ("generate-target-missing", lambda b, t: ["generate", str(M(t) / "model"), "-p", "hi"], lambda t: M(t) / "model"),
        ("generate-target-file", lambda b, t: ["generate", str(F(t)), "-p", "hi"], F),
        ("generate-input-missing", lambda b, t: ["generate", str(b["tiny"]), "-i", str(M(t))], M),
        ("generate-input-folder", lambda b, t: ["generate", str(b["tiny"]), "-i", str(D(t))], D),
        ("generate-config-missing", lambda b, t: ["generate", str(b["tiny"]), "-p", "hi", "--config", str(M(t))], M),
        ("generate-config-folder", lambda b, t: ["generate", str(b["tiny"]), "-p", "hi", "--config", str(D(t))], D),
        ("generate-output-folder", lambda b, t: ["generate", str(b["tiny"]), "-p", "hi", "-o", str(D(t))], D),
        ("chat-target-missing", lambda b, t: ["chat", str(M(t) / "model")], lambda t: M(t) / "model"),
        ("chat-target-file", lambda b, t: ["chat", str(F(t))], F),
        ("chat-config-folder", lambda b, t: ["chat", str(b["tiny"]), "--config", str(D(t))], D),
        ("export-merged-file", lambda b, t: ["export", str(b["run"]), "--merged", str(F(t))], F),
        ("eval-data-missing", lambda b, t: ["eval", str(b["tiny"]), "--data", str(M(t))], M),
        ("eval-data-folder", lambda b, t: ["eval", str(b["tiny"]), "--data", str(D(t))], D),
        ("eval-output-file", lambda b, t: ["eval", str(b["tiny"]), "--data", str(b["labeled"]), "-o", str(F(t))], F),
        ("compare-data-missing", lambda b, t: ["compare", str(b["tiny"]), str(b["tiny"]), "--data", str(M(t))], M),
        ("compare-data-folder", lambda b, t: ["compare", str(b["tiny"]), str(b["tiny"]), "--data", str(D(t))], D),
        ("compare-general-missing", lambda b, t: ["compare", str(b["tiny"]), str(b["tiny"]), "--data", str(b["labeled"]),
                                                  "--general", str(M(t))], M),
        ("compare-target-missing", lambda b, t: ["compare", str(b["tiny"]), str(M(t) / "model"), "--data",
                                                 str(b["labeled"])], lambda t: M(t) / "model"),
        ("report-results-corrupt", lambda b, t: ["report", str(D(t))], lambda t: D(t) / "results.json"),
        ("suggest-data-missing", lambda b, t: ["suggest", str(M(t)), "--model", str(b["tiny"])], M),
        ("suggest-data-folder", lambda b, t: ["suggest", str(D(t)), "--model", str(b["tiny"])], D),
        ("suggest-out-folder", lambda b, t: ["suggest", str(b["labeled"]), "--model", str(b["tiny"]), "--out",
                                             str(D(t))], D),
        ("sweep-config-missing", lambda b, t: ["sweep", str(M(t))], M),
        ("sweep-config-folder", lambda b, t: ["sweep", str(D(t))], D),
        ("sweep-config-garbage", lambda b, t: ["sweep", str(F(t))], F),
        ("doctor-predictions-missing", lambda b, t: ["doctor", str(b["run"]), "--predictions", str(M(t))], M),
        ("doctor-predictions-folder", lambda b, t: ["doctor", str(b["run"]), "--predictions", str(D(t))], D),
        ("doctor-predictions-corrupt", lambda b, t: ["doctor", str(b["run"]), "--predictions", str(F(t))], F),
        ("pseudo-label-unlabeled-missing", lambda b, t: ["pseudo-label", str(b["run"]), "-u", str(M(t)), "--no-train",
                                                         "--out", str(t / "p")], M),
        ("pseudo-label-unlabeled-folder", lambda b, t: ["pseudo-label", str(b["run"]), "-u", str(D(t)), "--no-train",
                                                        "--out", str(t / "p")], D),
        ("pseudo-label-config-missing", lambda b, t: ["pseudo-label", str(b["run"]), "-u", str(b["unlabeled"]),
                                                      "--config", str(M(t)), "--no-train", "--out", str(t / "p")], M),
        # fewtune data ...: src/fewtune/data is another change's; its behaviour is checked here all the same
        ("data-check-missing", lambda b, t: ["data", "check", str(M(t)), "--no-tokens"], M),
        ("data-check-folder", lambda b, t: ["data", "check", str(D(t)), "--no-tokens"], D),
        ("data-stats-missing", lambda b, t: ["data", "stats", str(M(t)), "--model", str(b["tiny"])], M),
        ("data-stats-folder", lambda b, t: ["data", "stats", str(D(t)), "--model", str(b["tiny"])], D),
        ("data-clean-missing", lambda b, t: ["data", "clean", str(M(t)), "--out", out(t), "--rejects",
                                             str(t / "r.jsonl")], M),
        ("data-clean-folder", lambda b, t: ["data", "clean", str(D(t)), "--out", out(t), "--rejects",
                                            str(t / "r.jsonl")], D),
        ("data-clean-out-folder", lambda b, t: ["data", "clean", str(b["labeled"]), "--out", str(D(t)), "--rejects",
                                                str(t / "r.jsonl")], D),
        ("data-split-missing", lambda b, t: ["data", "split", str(M(t)), "--out-dir", str(t / "s")], M),
        ("data-split-folder", lambda b, t: ["data", "split", str(D(t)), "--out-dir", str(t / "s")], D),
        ("data-split-out-dir-file", lambda b, t: ["data", "split", str(b["labeled"]), "--out-dir", str(F(t))], F),
        ("data-convert-missing", lambda b, t: ["data", "convert", str(M(t)), "--to", "sharegpt", "--out", out(t)], M),
        ("data-convert-folder", lambda b, t: ["data", "convert", str(D(t)), "--to", "sharegpt", "--out", out(t)], D),
        ("data-convert-out-folder", lambda b, t: ["data", "convert", str(b["labeled"]), "--to", "sharegpt", "--out",
                                                  str(D(t))], D),
        ("data-mix-missing", lambda b, t: ["data", "mix", str(M(t)), str(b["labeled"]), "--ratio", "1", "--out",
                                           out(t)], M),
        ("data-mix-folder", lambda b, t: ["data", "mix", str(D(t)), str(b["labeled"]), "--ratio", "1", "--out",
                                          out(t)], D),
        ("data-mix-out-folder", lambda b, t: ["data", "mix", str(b["labeled"]), str(b["labeled"]), "--ratio", "1",
                                              "--out", str(D(t))], D),
    ]
    return [pytest.param(build, path, id=name) for name, build, path in cases]


@pytest.mark.parametrize("build,path", _file_cases())
def test_a_missing_file_or_the_wrong_kind_of_path_is_one_line(build, path, base, tmp_path):
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-folder" / "results.json").write_text("{")  # for report: an eval folder with damaged results
    (tmp_path / "notes.txt").write_text("train: [unclosed\n  : :\n")  # a file that is no config, run or JSONL
    result = runner.invoke(app, build(base, tmp_path), input="/exit\n")
    assert_one_line_error(result, path(tmp_path))


# ---------------------------------------------------------------- bad values given on the command line

@pytest.mark.parametrize("args,named", [
    pytest.param(["generate", "{tiny}", "-p", "hi", "--max-new-tokens", "0"], "--max-new-tokens", id="max-new-tokens-0"),
    pytest.param(["generate", "{tiny}", "-p", "hi", "--top-p", "1.5"], "--top-p", id="top-p-1.5"),
    pytest.param(["chat", "{tiny}", "--temperature", "-1"], "--temperature", id="chat-temperature-negative"),
    pytest.param(["generate", "{tiny}", "-p", "   "], "--prompt 1 is empty", id="prompt-whitespace"),
    pytest.param(["train", "{config}", "train.lrr=1"], "did you mean 'train.lr'", id="override-misspelt"),
    pytest.param(["train", "{config}", "lr=1e-4"], "did you mean 'train.lr'", id="override-no-section"),
    pytest.param(["train", "{config}", "method.r=4"], "did you mean 'method.lora.r'", id="override-wrong-section"),
    pytest.param(["train", "{config}", "method.name=ia3", "method.ia3.feedforward_modules=[mlp]"],
                 "method.ia3.target_modules", id="method-error"),
    pytest.param(["eval", "{tiny}", "--data", "{labeled}", "--task", "nonsense"], "unknown task 'nonsense'",
                 id="eval-unknown-task"),
])
def test_a_bad_value_is_one_line(args, named, base, tmp_path):
    argv = [a.format(**{k: str(v) for k, v in base.items()}) for a in args]
    if argv[0] == "train":
        argv.append(f"train.output_dir={tmp_path / 'run'}")
    assert_one_line_error(runner.invoke(app, argv, input="/exit\n"), named)


# ---------------------------------------------------------------- the real program, in a process of its own

@pytest.mark.parametrize("fault", ["format_newer", "config_garbage"])
def test_the_installed_command_prints_one_line_and_exits_2(fault, base, tmp_path):
    run = copy_run(base, tmp_path)
    damage, named = RUN_FAULTS[fault]
    damage(run)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-m", "fewtune.cli", "generate", str(run), "--prompt", "hi"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(run) in lines[0], lines
    assert "Traceback" not in proc.stderr + proc.stdout
