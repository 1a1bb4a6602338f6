"""auto's precision on a CPU, chosen by timing the run's own training steps (fewtune.train.precision_probe),
and the bf16 path it may choose: frozen weights stored in bf16, trainable ones and the optimizer in float32."""

import json

import pytest
import torch

from fewtune.train import precision_probe as probe
from fewtune.train import runtime
from fewtune.train.loop import Trainer

from tests.precision import BF16_U


def _timer(fp32: float, bf16: float, calls: list):
    def time_steps(precision: str) -> float:
        calls.append(precision)
        return {"no": fp32, "bf16": bf16}[precision]
    return time_steps


@pytest.fixture
def fast_linear(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 2.0)


@pytest.mark.parametrize("fp32,bf16,chosen", [(1.0, 0.5, "bf16"), (1.0, 0.95, "no"), (1.0, 2.0, "no"),
                                              (1.0, 1.0 / probe.MIN_SPEEDUP, "bf16")])
def test_the_faster_precision_is_chosen_and_cached(tmp_path, fast_linear, fp32, bf16, chosen):
    cache, calls = tmp_path / "precision.json", []
    first = probe.decide(_timer(fp32, bf16, calls), "key-a", cache)
    assert (first.chosen, first.how, calls) == (chosen, "measured", ["no", "bf16"])
    assert first.speedup == pytest.approx(fp32 / bf16)
    assert ("bf16" if chosen == "bf16" else "fp32") in first.describe() and f"{fp32:.3f} s in fp32" in first.describe()
    # the next run on this machine, model and batch shape reads the answer instead of timing again
    again = probe.decide(_timer(9.0, 9.0, calls), "key-a", cache)
    assert (again.chosen, again.how, again.fp32_s, again.bf16_s) == (chosen, "cached", fp32, bf16)
    assert calls == ["no", "bf16"] and "measured earlier" in again.describe()
    # another key (another model, batch size, machine...) is measured on its own
    other = probe.decide(_timer(1.0, 0.1, calls), "key-b", cache)
    assert other.chosen == "bf16" and calls[2:] == ["no", "bf16"]
    assert set(json.loads(cache.read_text())) == {"key-a", "key-b"}


def test_no_step_is_timed_where_bf16_is_hopeless(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 0.2)  # an AVX2-only CPU
    calls = []
    decision = probe.decide(_timer(1.0, 0.1, calls), "key", tmp_path / "precision.json")
    assert (decision.chosen, decision.how, calls) == ("no", "linear probe", [])
    assert "0.20x the fp32 speed" in decision.describe()


def test_a_damaged_or_unwritable_cache_only_means_measuring_again(tmp_path, fast_linear):
    damaged = tmp_path / "precision.json"
    damaged.write_text("{not json")
    calls = []
    assert probe.decide(_timer(1.0, 0.5, calls), "k", damaged).chosen == "bf16" and len(calls) == 2
    blocked = tmp_path / "a-file" / "precision.json"
    (tmp_path / "a-file").write_text("")
    assert probe.decide(_timer(1.0, 0.5, calls), "k", blocked).how == "measured" and len(calls) == 4


def test_the_cache_key_separates_what_changes_the_timing():
    base = dict(model="m", method="lora", batch_size=8, packing=True, share_prefix=True, gradient_checkpointing=False)
    keys = {probe.cache_key(**base)}
    for change in (dict(model="n"), dict(method="full"), dict(batch_size=1), dict(packing=False),
                   dict(share_prefix=False), dict(gradient_checkpointing=True)):
        keys.add(probe.cache_key(**{**base, **change}))
    assert len(keys) == 7
    assert probe.cache_key(**base) == probe.cache_key(**base)
    assert "threads=" in probe.machine_id() and "torch=" in probe.machine_id()


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache of this test's own (the session's would already hold the tiny model's answer)."""
    monkeypatch.setattr(probe, "_cache_path", lambda: tmp_path / "precision.json")


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _losses(run_dir):
    return [r["train_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


@pytest.mark.parametrize("faster", ["bf16", "no"])
def test_auto_trains_in_what_the_timed_steps_chose(make_config, tmp_path, monkeypatch, fast_linear, faster,
                                                   fresh_accelerate_state, own_cache):
    monkeypatch.delenv(runtime.PRECISION_ENV, raising=False)
    timed = []

    def fake_time(build, batches, precision, steps=probe.PROBE_STEPS):
        loss_module, make_batch = build(precision)  # the probe's model is the run's model in that precision
        timed.append((precision, len(batches), next(p.dtype for p in loss_module.parameters() if not p.requires_grad)))
        return 0.1 if precision == faster else 1.0

    monkeypatch.setattr(probe, "time_training_steps", fake_time)
    trainer = Trainer(make_config(train__mixed_precision="auto", train__max_steps=2))
    assert trainer.accelerator.mixed_precision == faster
    assert timed == [("no", probe.PROBE_STEPS, torch.float32), ("bf16", probe.PROBE_STEPS, torch.bfloat16)]
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert frozen == ({torch.bfloat16} if faster == "bf16" else {torch.float32})
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    trainer.fit()
    start = next(r for r in map(json.loads, (trainer.run_dir / "metrics.jsonl").read_text().splitlines())
                 if r.get("event") == "start")
    assert start["mixed_precision"] == faster and "0.100 s" in start["precision_choice"]


def test_the_probe_leaves_no_trace_in_the_run(make_config, tmp_path, monkeypatch, fresh_accelerate_state, own_cache):
    """A run whose choice was measured (the probe built models and ran steps, drawing random numbers) trains
    exactly as the same run whose choice came from the cache."""
    monkeypatch.delenv(runtime.PRECISION_ENV, raising=False)
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 2.0)
    monkeypatch.setattr(probe, "MIN_SPEEDUP", 1e9)  # whatever the timings: fp32, so both runs are comparable
    settings = dict(train__mixed_precision="auto", train__max_steps=3, method__lora__dropout=0.1)
    first = Trainer(make_config(train__output_dir=str(tmp_path / "a"), **settings))
    assert first.precision_decision.how == "measured"
    first.fit()
    second = Trainer(make_config(train__output_dir=str(tmp_path / "b"), **settings))
    assert second.precision_decision.how == "cached"
    second.fit()
    assert _losses(first.run_dir) == _losses(second.run_dir) and len(_losses(first.run_dir)) == 3


def test_bf16_frozen_weights_give_the_fp32_loss_within_bf16_rounding(make_config, tmp_path, fresh_accelerate_state):
    """The first step's loss (before any update) in fp32 and on the bf16 path (frozen weights in bf16, so the
    residual stream between blocks is bf16 too). The tiny model has 2 layers: the embedding output, each
    block's 2 sub-layer outputs and the final norm are rounded once to bf16 (relative error u each, 6
    roundings) and each product's output once more; 16u bounds the loss's relative difference."""
    settings = dict(train__max_steps=1, method__lora__dropout=0.0, data__val_ratio=0)
    losses = {}
    for precision in ("no", "bf16"):
        trainer = Trainer(make_config(train__output_dir=str(tmp_path / precision), train__mixed_precision=precision,
                                      **settings))
        frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
        assert frozen == {torch.float32 if precision == "no" else torch.bfloat16}
        losses[precision] = _losses(trainer.fit().run_dir)[0]
    assert losses["bf16"] != losses["no"]  # the bf16 path really ran
    assert losses["bf16"] == pytest.approx(losses["no"], rel=16 * BF16_U)


def test_adapter_inputs_are_not_cast_under_autocast_but_still_are_outside_it(make_config, fresh_accelerate_state):
    trainer = Trainer(make_config(train__mixed_precision="bf16", train__max_steps=1))
    layer = next(m for m in trainer.model.modules() if hasattr(m, "lora_A"))
    x = torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._cast_input_dtype(x, torch.float32) is x
        assert layer(x).dtype == torch.bfloat16
    outside = layer._cast_input_dtype(x, torch.float32)
    assert outside.dtype == torch.float32
    assert layer(x).dtype == torch.bfloat16  # generation without autocast still runs the bf16 layer
