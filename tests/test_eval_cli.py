"""`fewtune eval`, `compare`, `report` end to end on tiny models, and the task metric during training."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fewtune.cli import app
from fewtune.config import ConfigError, EvalSection
from fewtune.eval.evaluate import evaluate
from fewtune.train.loop import train
from tests.conftest import write_jsonl

runner = CliRunner()
INTENTS = {"PlayMusic": ["play some jazz", "put on a song by queen", "play music please"],
           "GetWeather": ["weather in paris", "will it rain tomorrow", "forecast for rome"],
           "BookRestaurant": ["book a table", "reserve dinner for two", "a table at a pizzeria"]}


@pytest.fixture
def intents(tmp_path) -> Path:
    rows = [{"text": f"{t} {k}", "label": label} for label, texts in INTENTS.items() for t in texts for k in range(3)]
    return write_jsonl(tmp_path / "intents.jsonl", rows)


def _ok(result):
    assert result.exit_code == 0, result.output
    return result.output


def test_eval_classification_writes_results_and_predictions(tiny_model, intents, tmp_path):
    out = tmp_path / "ev"
    text = _ok(runner.invoke(app, ["eval", tiny_model, "--data", str(intents), "-o", str(out), "--limit", "12",
                                   "--batch-size", "5"]))
    assert "accuracy" in text and "per class" in text
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "classification" and results["metrics"]["n"] == 12
    assert set(results["metrics"]["labels"]) == set(INTENTS)  # from the whole file, not just the first 12
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and all(set(p["logprobs"]) == set(INTENTS) for p in preds)
    assert results["metrics"]["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / 12)
    for p in preds:  # the prediction is the argmax of the recorded scores
        assert p["predicted"] == max(p["logprobs"], key=p["logprobs"].get)


def test_eval_generate_mode_counts_unparseable(tiny_model, intents, tmp_path):
    result = evaluate(tiny_model, intents, EvalSection(mode="generate", limit=4, batch_size=4, max_new_tokens=3),
                      progress=False)
    # a random tiny model writes no label: every output is its own "unparseable" category
    assert all(r["mapped_by"] in ("exact", "first_line", "contains", "none") for r in result.predictions)
    n_unparseable = sum(r["predicted"] == "<unparseable>" for r in result.predictions)
    assert result.metrics["unparseable"] == n_unparseable
    if n_unparseable:
        assert result.metrics["confusion"]["labels"][-1] == "<unparseable>"


def test_eval_generation_json_and_perplexity_tasks(tiny_model, tmp_path):
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "翻译: hello", "completion": "你好"},
                                               {"prompt": "say hi", "completion": "hi there"}])
    r = evaluate(tiny_model, gen, EvalSection(max_new_tokens=4), progress=False)
    assert r.task == "generation" and {"rouge1", "rougeL", "bleu", "exact_match"} <= set(r.metrics)
    assert r.metrics["bleu_tokenize"] == "zh"
    js = write_jsonl(tmp_path / "js.jsonl", [{"prompt": "打开车窗", "completion": '{"actions": ["打开车窗"]}'}])
    r = evaluate(tiny_model, js, EvalSection(max_new_tokens=4), progress=False, output_dir=tmp_path / "js_out")
    assert r.task == "json" and r.metrics["invalid_count"] == len(r.metrics["invalid"])
    assert (tmp_path / "js_out" / "predictions.jsonl").read_text().count("\n") == 1
    txt = tmp_path / "general.txt"
    txt.write_text("Small models forget. 小模型也会遗忘。" * 20, encoding="utf-8")
    r = evaluate(tiny_model, txt, EvalSection(window=32), progress=False)
    assert r.task == "perplexity" and r.metrics["unit"] == "window" and r.metrics["perplexity"] > 1
    r2 = evaluate(tiny_model, gen, EvalSection(task="perplexity"), progress=False)  # assistant turns of a data file
    assert r2.metrics["unit"] == "example" and r2.metrics["n"] == 2


def test_eval_errors_are_one_clear_line(tiny_model, intents, tmp_path):
    bad = runner.invoke(app, ["eval", tiny_model, "--data", str(intents), "--task", "poetry"])
    assert bad.exit_code == 2 and "unknown task 'poetry'" in bad.output
    bad = runner.invoke(app, ["eval", tiny_model, "--data", str(intents), "--labels", "PlayMusic,GetWeather",
                              "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "intents.jsonl:" in bad.output and "not among the candidate labels" in bad.output
    missing = runner.invoke(app, ["eval", tiny_model, "--data", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "file not found" in missing.output


def test_eval_reads_a_config_s_eval_section_under_its_options(tiny_model, intents, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("eval:\n  limit: 5\n  batch_size: 3\n  labels: [PlayMusic, GetWeather, BookRestaurant]\n")
    out = tmp_path / "ev"
    _ok(runner.invoke(app, ["eval", tiny_model, "--data", str(intents), "--config", str(cfg), "--limit", "7",
                            "-o", str(out)]))
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["limit"] == 7 and results["settings"]["batch_size"] == 3  # the option wins
    assert results["metrics"]["labels"] == ["PlayMusic", "GetWeather", "BookRestaurant"]  # the config's order
    bad = runner.invoke(app, ["eval", tiny_model, "--data", str(intents), "--limit", "0"])
    assert bad.exit_code == 2 and "--limit: Input should be greater than 0 (got 0)" in bad.output


def test_task_metric_during_training_picks_the_best_checkpoint(make_config, intents):
    with pytest.raises(ConfigError, match="needs eval.task"):
        make_config(eval__metric="accuracy")
    with pytest.raises(ConfigError, match="not a classification metric"):
        make_config(eval__task="classification", eval__metric="rougeL")
    cfg = make_config(data__train=str(intents), data__val_ratio=0.34, eval__task="classification",
                      eval__metric="macro_f1", eval__every=2, train__max_steps=6, eval__sample=6,
                      eval__early_stopping__enabled="false")
    result = train(cfg)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert evals and all({"val_accuracy", "val_macro_f1"} <= set(r) for r in evals)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    best = max(evals, key=lambda r: (r["val_macro_f1"], -r["val_loss"]))  # ties in the metric: the lower loss
    assert summary["eval_metric"] == "macro_f1" and summary["best_metric"] == pytest.approx(best["val_macro_f1"])
    assert summary["best_step"] == best["step"]


def test_compare_and_report(make_config, tiny_model, intents, tmp_path):
    run = train(make_config(data__train=str(intents), train__max_steps=3, train__lr=5e-3)).run_dir
    general = tmp_path / "general.txt"
    general.write_text("A general text about many things. " * 30)
    out = tmp_path / "cmp"
    text = _ok(runner.invoke(app, ["compare", tiny_model, str(run), "--data", str(intents), "--general", str(general),
                                   "-o", str(out), "--resamples", "200", "--report"]))
    assert "difference" in text and "McNemar" in text
    report = json.loads((out / "compare.json").read_text())
    row = report["comparisons"][0]
    assert set(row["metrics"]) == {"accuracy", "macro_f1", "weighted_f1"}
    for d in row["metrics"].values():
        assert d["interval"]["low"] <= d["difference"] <= d["interval"]["high"]
        assert d["difference"] == pytest.approx(d["b"] - d["a"])
    assert row["disagreements"] == len([1 for a, b in zip(*(
        [json.loads(x) for x in (out / "models" / n / "predictions.jsonl").read_text().splitlines()]
        for n in report["names"])) if a["predicted"] != b["predicted"]])
    assert "general" in row and row["general"]["perplexity"]["a"] > 1
    assert (out / "report" / "report.html").exists() and (out / "report" / "before_after.png").exists()
    # the run's own report: config, curves, the compare folder's before/after
    _ok(runner.invoke(app, ["eval", str(run), "--data", str(intents)]))
    import shutil

    shutil.copytree(out, run / "compare")
    text = _ok(runner.invoke(app, ["report", str(run)]))
    folder = run / "report"
    html = (folder / "report.html").read_text()
    for png in ("learning_curves.png", "confusion_matrix.png", "per_class.png", "before_after.png"):
        assert (folder / png).stat().st_size > 5000
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html
    md = (folder / "report.md").read_text()
    for section in ("## Configuration", "## Learning curves", "## Evaluation: classification", "## Error analysis",
                    "## Before / after", "Most confused label pairs", "Worst examples"):
        assert section in md
    nothing = runner.invoke(app, ["report", str(tmp_path)])
    assert nothing.exit_code == 2 and "nothing to report" in nothing.output
