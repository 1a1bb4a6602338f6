"""fewtune suggest: the rules on synthetic data sets of given sizes, the written config, the command."""

import math

import pytest
import torch
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
    result = suggest(classification(tmp_path, n), model=tiny_model, measure=False)
    cfg = result.config
    assert cfg.train.epochs == epochs and cfg.method.lora.r == rank and cfg.train.batch_size == batch
    assert cfg.method.name == "lora" and cfg.method.lora.alpha == 2 * rank
    assert f"n={n}" in rule(result, "train.epochs").reason
    assert f"{0.002 * n:.2f}" in rule(result, "train.batch_size").reason
    expected_lr = min(5e-4, max(1e-4, 5e-4 * math.sqrt(batch / 8)))  # a tiny model: the small-model reference
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
    lin = suggest(data, model=tiny_model, lr_rule="linear", measure=False)
    assert lin.config.train.lr == pytest.approx(min(5e-4, 5e-4 * 10 / 8))
    assert "kept within [0.0001, 0.0005]" in rule(lin, "train.lr").reason
    full = suggest(data, model=tiny_model, method="full", measure=False)
    assert full.config.method.name == "full" and full.config.train.lr == pytest.approx(1e-5 * math.sqrt(10 / 8), rel=1e-2)


def test_lora_lr_reference_follows_the_model_size(tmp_path, tiny_model, monkeypatch):
    import json

    from fewtune.advice import suggest as module

    # a Llama-3.2-1B-like shape: 16 x (4 x 2048^2 + 3 x 2048 x 8192) + 128256 x 2048 = about 1.34B
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
        "vocab_size": 128256, "num_attention_heads": 32, "num_key_value_heads": 8}))
    assert module.model_parameters(str(big)) == 16 * (4 * 2048**2 + 3 * 2048 * 8192) + 128256 * 2048
    lr, bounds, why = module.lora_lr_reference(str(big))
    assert (lr, bounds) == (2e-4, (1e-4, 2e-4)) and "1.3B parameters" in why
    small_lr, small_bounds, small_why = module.lora_lr_reference(tiny_model)
    assert (small_lr, small_bounds) == (5e-4, (1e-4, 5e-4)) and "< 1B" in small_why
    assert module.lora_lr_reference(str(tmp_path / "missing"))[:2] == (2e-4, (1e-4, 2e-4))  # unreadable: the usual
    # the whole suggestion follows: with a 2B-parameter count the reference is the usual 2e-4, and at batch 2 the
    # linear rule's 2e-4 x 2/8 = 5e-5 is kept at the 1e-4 floor
    data = classification(tmp_path, 1000)
    monkeypatch.setattr(module, "model_parameters", lambda name: 2_000_000_000)
    large = suggest(data, model=tiny_model, measure=False, lr_rule="linear")
    assert large.config.train.batch_size == 2 and large.config.train.lr == pytest.approx(1e-4)
    assert "kept within [0.0001, 0.0002]" in rule(large, "train.lr").reason and "2.0B" in rule(large, "train.lr").reason


def test_max_length_covers_99_percent_and_generation_task(tmp_path, tiny_model):
    result = suggest(generation(tmp_path, 200), model=tiny_model, measure=False)
    lengths = sorted(result.profile.lengths)
    assert result.profile.task == "generation"
    assert result.config.data.max_length % 32 == 0 and result.config.data.max_length >= lengths[math.ceil(0.99 * 200) - 1]
    assert not any("choice scoring" in r.reason for r in result.rules)
    assert result.config.eval.task is None and result.config.eval.metric == "loss"
    assert result.config.data.on_bad_example == "error"  # nothing longer than max_length


def test_long_outliers_are_dropped_not_fatal(tmp_path, tiny_model):
    rows = [{"prompt": f"short {i}", "completion": "ok"} for i in range(199)]
    rows.append({"prompt": "word " * 3000, "completion": "ok"})
    result = suggest(write_jsonl(tmp_path / "outlier.jsonl", rows), model=tiny_model, measure=False)
    assert result.config.data.max_length < 3000 and result.config.data.on_bad_example == "drop"
    assert "1 example(s) longer than" in rule(result, "data.on_bad_example").reason


def test_unbalanced_classes_are_flagged(tmp_path, tiny_model):
    result = suggest(classification(tmp_path, 300, ["a", "b"], [9, 1]), model=tiny_model, measure=False)
    assert any("unbalanced" in r.reason and "9.0" in r.reason for r in result.rules)


def test_written_config_loads_and_carries_reasons(tmp_path, tiny_model):
    out = tmp_path / "suggested.yaml"
    result = suggest(classification(tmp_path, 300), model=tiny_model, out=out, measure=False)
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
    # measured on the tiny model (32 training examples x 3 epochs: only batch 1 keeps 50 optimizer steps)
    assert "measured training tokens/s by batch size here (1: " in res.output and "train.batch_size = 1" in res.output
    bad = CliRunner().invoke(app, ["suggest", str(tmp_path / "missing.jsonl"), "--model", tiny_model])
    assert bad.exit_code == 2 and "missing.jsonl" in bad.output


MEASURED = {1: 100.0, 2: 180.0, 4: 300.0, 8: 400.0, 16: 410.0, 32: 380.0}


@pytest.fixture
def measured(monkeypatch):
    """throughput.measure replaced by fixed tokens/s per batch size (a CPU's usual shape: flat from 8 on)."""
    from fewtune.advice import throughput

    calls = []

    def fake(cfg, items, sizes, precision=None, seed=0, progress=True):
        calls.append((cfg.method.name, len(items), list(sizes)))
        return [throughput.Throughput(b, MEASURED[b], b * 50 / MEASURED[b]) for b in sizes]

    monkeypatch.setattr(throughput, "measure", fake)
    return calls


def test_measured_throughput_moves_the_batch_and_the_lr_follows(tmp_path, tiny_model, measured):
    result = suggest(classification(tmp_path, 1000), model=tiny_model, progress=False)
    # 0.2% of 1000 is 2; batch 8 runs within 5% of the fastest (16) and keeps 113 x 2 steps: 8
    assert result.config.train.batch_size == 8 and measured == [("lora", 1000, [1, 2, 4, 8, 16, 32])]
    why = rule(result, "train.batch_size").reason
    assert "8: 400" in why and "the 0.2% rule alone gives 2" in why and "113 steps per epoch x 2" in why
    assert result.config.train.lr == pytest.approx(5e-4)  # the small-model reference lr at the reference batch 8
    assert "to batch 8" in rule(result, "train.lr").reason


def test_measured_batch_keeps_enough_optimizer_steps(tmp_path, tiny_model, measured):
    # 70 examples: 56 train x 3 epochs; batch 4 would leave 42 steps (< 50), so 2 is the fastest allowed
    result = suggest(classification(tmp_path, 70), model=tiny_model, progress=False)
    assert result.config.train.batch_size == 2
    assert result.config.train.lr == pytest.approx(2.5e-4)  # 5e-4 x sqrt(2/8)
    tiny = suggest(classification(tmp_path, 20), model=tiny_model, progress=False)  # 16 x 5 epochs = 80 steps at 1
    assert tiny.config.train.batch_size == 1


def test_throughput_probe_times_real_training_passes(tmp_path, tiny_model):
    from fewtune.advice import throughput
    from fewtune.data.dataset import render_set
    from fewtune.data.formats import load_examples
    from fewtune.data.render import Template
    from fewtune.models import load_tokenizer

    data = classification(tmp_path, 60)
    cfg = suggest(data, model=tiny_model, measure=False).config
    tok = load_tokenizer(tiny_model)
    items = render_set(load_examples(data), tok, Template.from_config(tok, cfg), cfg.data, "training").items
    state = torch.get_rng_state()
    results = throughput.measure(cfg, items, [1, 4], progress=False)
    assert [r.batch_size for r in results] == [1, 4] and all(r.tokens_per_s > 0 and r.step_s > 0 for r in results)
    assert torch.equal(torch.get_rng_state(), state)  # the probe leaves no trace in the random stream


def test_a_larger_measured_batch_keeps_the_planned_optimizer_steps(tmp_path, tiny_model, measured):
    # 280 examples (252 train): the rule's batch 1 plans 252 x 3 = 756 steps; the measured batch 8 makes 32 a
    # epoch, so 3 epochs would be 96 steps: the epochs rise to 7 (224 steps, the 200 kept)
    result = suggest(classification(tmp_path, 280), model=tiny_model, progress=False)
    cfg = result.config
    assert cfg.train.batch_size == 8 and cfg.train.epochs == 7
    why = rule(result, "train.epochs").reason
    assert "raised to 7" in why and "32 steps per epoch" in why and "224" in why and "0.743" in why
    # the warm-up and evaluation rules count the raised epochs
    assert "of the 224 steps" in rule(result, "train.warmup_ratio").reason
    # 1000 examples: batch 8 keeps 113 x 2 = 226 >= 200 steps: the epochs stay
    assert suggest(classification(tmp_path, 1000), model=tiny_model, progress=False).config.train.epochs == 2
    # without measuring, the rule's own batch: nothing to raise
    assert suggest(classification(tmp_path, 280), model=tiny_model, measure=False).config.train.epochs == 3
