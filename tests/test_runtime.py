"""Mixed precision, threads, gradient checkpointing and the tokenization cache."""

import json
import logging
import time

import pytest
import torch

from fewtune.data import cache as cache_module
from fewtune.data.cache import cached_render_set
from fewtune.data.dataset import load_train_val
from fewtune.data.render import Template
from fewtune.train import runtime
from fewtune.train.loop import Trainer


def test_auto_precision_on_cpu_follows_the_probe(monkeypatch):
    monkeypatch.delenv(runtime.PRECISION_ENV, raising=False)
    speedup = runtime.cpu_bf16_speedup()
    assert speedup > 0
    assert runtime.resolve_mixed_precision("auto", cpu=True) == ("bf16" if speedup >= runtime.BF16_MIN_SPEEDUP else "no")
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 3.0)
    assert runtime.resolve_mixed_precision("auto", cpu=True) == "bf16"
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 0.05)
    assert runtime.resolve_mixed_precision("auto", cpu=True) == "no"
    assert runtime.resolve_mixed_precision("bf16", cpu=True) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        runtime.resolve_mixed_precision("fp16", cpu=True)


@pytest.mark.parametrize("value,expected", [("bf16", "bf16"), ("no", "no"), ("fp32", "no"), ("BF16", "bf16"),
                                            ("auto", None), ("", None)])
def test_the_environment_forces_what_auto_picks(monkeypatch, value, expected):
    monkeypatch.setenv(runtime.PRECISION_ENV, value)
    for probe in (3.0, 0.05):  # whatever the probe measures
        monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda probe=probe: probe)
        picked = runtime.resolve_mixed_precision("auto", cpu=True)
        assert picked == (expected or ("bf16" if probe >= runtime.BF16_MIN_SPEEDUP else "no"))
    assert runtime.resolve_mixed_precision("no", cpu=True) == "no"  # an explicit setting is not overridden


def test_a_bad_forced_precision_is_one_clear_error(monkeypatch, make_config):
    from fewtune.train.loop import TrainingError

    monkeypatch.setenv(runtime.PRECISION_ENV, "half")
    with pytest.raises(TrainingError, match="FEWTUNE_MIXED_PRECISION='half' is not a precision: use one of no, fp32"):
        Trainer(make_config(train__mixed_precision="auto"))
    if not torch.cuda.is_available():
        monkeypatch.setenv(runtime.PRECISION_ENV, "fp16")
        with pytest.raises(TrainingError, match="fp16 needs a GPU"):
            Trainer(make_config(train__mixed_precision="auto"))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process; these tests change it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16"])
def test_bf16_path_runs_on_cpu_with_fp32_trainables(make_config, model_dtype, fresh_accelerate_state):
    trainer = Trainer(make_config(train__mixed_precision="bf16", model__dtype=model_dtype, train__max_steps=2))
    assert trainer.accelerator.mixed_precision == "bf16"
    seen = []
    layer = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Linear))
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    result = trainer.fit()
    handle.remove()
    assert result.steps == 2 and seen and all(d == torch.bfloat16 for d in seen)  # autocast was on
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    states = [s for s in trainer.optimizer.state_dict()["state"].values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    losses = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in losses if "train_loss" in m)


def test_gradient_checkpointing_gives_the_same_training(make_config, tmp_path):
    settings = dict(train__max_steps=2, method__lora__dropout=0.0, data__val_ratio=0)
    plain = Trainer(make_config(train__output_dir=str(tmp_path / "a"), **settings))
    ckpt = Trainer(make_config(train__output_dir=str(tmp_path / "b"), train__gradient_checkpointing=True, **settings))
    on = lambda t: any(getattr(m, "gradient_checkpointing", False) for m in t.base_model.modules())
    assert on(ckpt) and not on(plain)
    plain.fit()
    ckpt.fit()
    a = {n: p for n, p in plain.model.named_parameters() if p.requires_grad}
    for n, p in ckpt.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, a[n], rtol=1e-4, atol=1e-6)


def test_thread_settings():
    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads(1) == 1 == torch.get_num_threads()
        cores = runtime.available_cores()
        assert runtime.configure_threads(None, 2) == max(1, cores // 2)
        assert runtime.configure_threads(None, 1) == cores
    finally:
        torch.set_num_threads(before)


def test_rendering_is_cached_and_keyed_by_its_inputs(make_config, tokenizer, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr("fewtune.data.cache._cache_dir", lambda: tmp_path / "cache")
    cfg = make_config()
    template = Template.for_tokenizer(tokenizer, system_prompt=None)
    train, _ = load_train_val(cfg.data)
    first = cached_render_set(train, tokenizer, template, cfg.data, "training")
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    calls = []
    real = cache_module.render_set
    monkeypatch.setattr(cache_module, "render_set", lambda *a: calls.append(a) or real(*a))
    with caplog.at_level(logging.INFO, logger="fewtune.data.cache"):
        again = cached_render_set(train, tokenizer, template, cfg.data, "training")
    assert not calls and "from the cache" in caplog.text
    assert [r.input_ids for r in again.items] == [r.input_ids for r in first.items]
    assert [r.loss_weights for r in again.items] == [r.loss_weights for r in first.items]
    assert again.examples == first.examples
    # another max_length, another template or other examples: not the cached entry
    longer = cfg.data.model_copy(update={"max_length": 200})
    for args in ((train, template, longer), (train, Template.for_tokenizer(tokenizer, system_prompt="x"), cfg.data),
                 (train[:-1], template, cfg.data)):
        calls.clear()
        cached_render_set(args[0], tokenizer, args[1], args[2], "training")
        assert calls
    # an unreadable entry is rendered again, not trusted
    for path in (tmp_path / "cache").glob("*.json"):
        path.write_text("{broken")
    with caplog.at_level(logging.WARNING, logger="fewtune.data.cache"):
        redone = cached_render_set(train, tokenizer, template, cfg.data, "training")
    assert "unreadable" in caplog.text and [r.input_ids for r in redone.items] == [r.input_ids for r in first.items]


def test_thread_governor_trains_on_the_cores_other_processes_leave(monkeypatch, caplog):
    """The governor's arithmetic on a 2-core machine, with /proc/stat's readings scripted: (machine busy s,
    own CPU s) per reading."""
    readings = iter([(0.0, 0.0), (20.0, 10.0), (35.0, 20.0), (55.0, 35.0), (65.0, 45.0), (85.0, 65.0)])
    monkeypatch.setattr(runtime, "_cpu_seconds", lambda: next(readings))
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    clock = iter([0.0, 1.0, 10.0, 20.0, 30.0, 40.0, 50.0])
    before = torch.get_num_threads()
    try:
        governor = runtime.ThreadGovernor(2, interval_s=5.0, clock=lambda: next(clock))
        assert governor.active
        with caplog.at_level(logging.INFO, logger="fewtune.train.runtime"):
            assert governor.after_step() == 2  # 1 s since the start: too soon to measure
            assert governor.after_step() == 1  # others used (20 - 10) / 10 s = 1 core of 2
            assert torch.get_num_threads() == 1
            assert governor.after_step() == 1  # (15 - 10) / 10 = 0.5 core: still a competitor
            assert governor.after_step() == 1  # (20 - 15) / 10 = 0.5
            assert governor.after_step() == 2  # (10 - 10) / 10 = 0: it stopped
            assert governor.after_step() == 2  # (20 - 20) / 10 = 0
        assert governor.changes == [(1.0, 1), (0.0, 2)]
        assert "other processes used 1.0 of 2 cores" in caplog.text and "1 CPU thread now" in caplog.text
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("others,cores,expected", [(0.0, 2, 2), (0.3, 2, 2), (0.5, 2, 1), (1.0, 2, 1), (1.9, 2, 1),
                                                   (1.0, 8, 7), (2.5, 8, 5), (0.0, 8, 8)])
def test_thread_governor_target(monkeypatch, others, cores, expected):
    monkeypatch.setattr(runtime, "available_cores", lambda: cores)
    assert runtime.ThreadGovernor(cores).target(others) == expected


def test_thread_governor_reads_this_machine():
    reading = runtime._cpu_seconds()
    if reading is None:
        pytest.skip("no /proc/stat here")
    busy, own = reading
    assert busy > 0 and 0 < own
    # CPU time of our own: the clock counts in ticks (10 ms), and a busy machine may schedule us late
    deadline, later = time.monotonic() + 30, reading
    while later[1] <= own and time.monotonic() < deadline:
        sum(i * i for i in range(100_000))
        later = runtime._cpu_seconds()
    assert later[1] > own and later[0] >= busy


def test_training_reports_its_threads_and_a_set_thread_count_is_kept(make_config, tmp_path):
    adaptive = Trainer(make_config(train__max_steps=2, train__output_dir=str(tmp_path / "a"), train__adapt_threads=True))
    fixed = Trainer(make_config(train__max_steps=2, train__num_threads=1, train__output_dir=str(tmp_path / "b")))
    assert fixed.threads is None
    if runtime.available_cores() > 1:
        assert adaptive.threads is not None and adaptive.threads.max_threads == runtime.available_cores()
        result = adaptive.fit()
        steps = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["threads"] for r in steps if "train_loss" in r] == [runtime.available_cores()] * 2
        assert torch.get_num_threads() == runtime.available_cores()
