"""fewtune suggest: the rules on synthetic data sets of given sizes, the written config, the command."""

import math

import pytest
import yaml
from typer.testing import CliRunner

from fewtune.cli import app
from fewtune.config import load_config
from fewtune.advice.suggest import epochs_rule, suggest
from tests.conftest import write_jsonl

INTENTS = ["music", "weather", "book", "rate"]


def classification(tmp_path, n, labels=INTENTS, weights=None):
    labels = [l for l, w in zip(labels, weights or [1] * len(labels)) for _ in range(w)]
    rows = [{"text": f"request number {i} please", "label": labels[i % len(labels)]} for i in range(n)]
    return write_jsonl(tmp_path / f"cls{n}.jsonl", rows)


def generation(tmp_path, n):
    rows = [{"prompt": f"write a sentence about item {i}", "completion": f"item {i} is " + "very " * (i % 7) + "nice"}
            for i in range(n)]
    return write_jsonl(tmp_path / f"gen{n}.jsonl", rows)


def rule(result, key):
    return next(r for r in result.rules if r.key == key)


@pytest.mark.parametrize("n, epochs, rank, batch", [(20, 5, 4, 1), (30, 3, 4, 1), (300, 3, 4, 1),
                                                     (1000, 2, 8, 2), (5200, 2, 16, 10)])
def test_rules_by_data_size(tmp_path, tiny_model, n, epochs, rank, batch):
    result = suggest(classification(tmp_path, n), model=tiny_model)
    cfg = result.config
    assert cfg.train.epochs == epochs and cfg.method.lora.r == rank and cfg.train.batch_size == batch
    assert cfg.method.name == "lora" and cfg.method.lora.alpha == 2 * rank
    assert f"n={n}" in rule(result, "train.epochs").reason
    assert f"{0.002 * n:.2f}" in rule(result, "train.batch_size").reason
    expected_lr = min(2e-4, max(1e-4, 2e-4 * math.sqrt(batch / 8)))
    assert cfg.train.lr == pytest.approx(expected_lr, rel=1e-2)
    assert cfg.train.weight_decay == 0.01 and cfg.train.max_grad_norm == 1.0 and cfg.train.warmup_ratio == 0.1
    assert cfg.eval.early_stopping.enabled
    assert result.profile.task == "classification" and len(result.profile.labels) == 4
    assert any("choice scoring" in r.reason for r in result.rules)
    assert cfg.eval.task == "classification" and cfg.eval.metric == "accuracy"


def test_epochs_rule_follows_the_legacy_formula():
    assert epochs_rule(10)[0] == 10 and "min(25, 100 // 10)" in epochs_rule(10)[1]
    assert epochs_rule(3)[0] == 25  # 100 // 3 = 33, capped at 25
    assert epochs_rule(33)[0] == 3  # 33 * 3 = 99 < 100 -> 100 // 33 = 3
    assert epochs_rule(34)[0] == 3
    assert epochs_rule(20000)[0] == 1 and "25000 // 20000" in epochs_rule(20000)[1]


def test_linear_rule_and_full_method(tmp_path, tiny_model):
    data = classification(tmp_path, 5200)
    lin = suggest(data, model=tiny_model, lr_rule="linear")
    assert lin.config.train.lr == pytest.approx(min(2e-4, 2e-4 * 10 / 8))
    assert "kept within [0.0001, 0.0002]" in rule(lin, "train.lr").reason
    full = suggest(data, model=tiny_model, method="full")
    assert full.config.method.name == "full" and full.config.train.lr == pytest.approx(1e-5 * math.sqrt(10 / 8), rel=1e-2)


def test_max_length_covers_99_percent_and_generation_task(tmp_path, tiny_model):
    result = suggest(generation(tmp_path, 200), model=tiny_model)
    lengths = sorted(result.profile.lengths)
    assert result.profile.task == "generation"
    assert result.config.data.max_length % 32 == 0 and result.config.data.max_length >= lengths[math.ceil(0.99 * 200) - 1]
    assert not any("choice scoring" in r.reason for r in result.rules)
    assert result.config.eval.task is None and result.config.eval.metric == "loss"
    assert result.config.data.on_bad_example == "error"  # nothing longer than max_length


def test_long_outliers_are_dropped_not_fatal(tmp_path, tiny_model):
    rows = [{"prompt": f"short {i}", "completion": "ok"} for i in range(199)]
    rows.append({"prompt": "word " * 3000, "completion": "ok"})
    result = suggest(write_jsonl(tmp_path / "outlier.jsonl", rows), model=tiny_model)
    assert result.config.data.max_length < 3000 and result.config.data.on_bad_example == "drop"
    assert "1 example(s) longer than" in rule(result, "data.on_bad_example").reason


def test_unbalanced_classes_are_flagged(tmp_path, tiny_model):
    result = suggest(classification(tmp_path, 300, ["a", "b"], [9, 1]), model=tiny_model)
    assert any("unbalanced" in r.reason and "9.0" in r.reason for r in result.rules)


def test_written_config_loads_and_carries_reasons(tmp_path, tiny_model):
    out = tmp_path / "suggested.yaml"
    result = suggest(classification(tmp_path, 300), model=tiny_model, out=out)
    text = out.read_text()
    assert "# written by `fewtune suggest`" in text and "lr: " in text
    lr_line = next(l for l in text.splitlines() if l.strip().startswith("lr:"))
    assert "scaled by the sqrt rule" in lr_line
    assert load_config(out) == result.config
    assert set(yaml.safe_load(text)) == {"model", "data", "method", "train", "regularise", "eval", "generate"}


def test_suggest_command(tmp_path, tiny_model):
    out = tmp_path / "cfg.yaml"
    res = CliRunner().invoke(app, ["suggest", str(classification(tmp_path, 40)), "--model", tiny_model,
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "train.epochs = 3" in res.output and "n=40" in res.output and out.is_file()
    bad = CliRunner().invoke(app, ["suggest", str(tmp_path / "missing.jsonl"), "--model", tiny_model])
    assert bad.exit_code == 2 and "missing.jsonl" in bad.output
