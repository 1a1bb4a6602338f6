"""Faults lose nothing: SIGTERM, damaged checkpoints, a full disk, resuming against changed inputs,
and the wall time of a run that was resumed."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fewtune.config import save_config
from fewtune.train import checkpoint as ckpt
from fewtune.train import runtime
from fewtune.train.loop import Interrupted, Trainer, TrainingError, train
from tests.conftest import write_jsonl

SRC = Path(__file__).resolve().parents[1] / "src"


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["train_loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in l]


def steps(run_dir: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if "train_loss" in l]


def test_sigterm_checkpoints_exits_143_and_resumes_to_the_same_final_loss(make_config, tmp_path):
    """A real SIGTERM (what SLURM, Kubernetes and `timeout` send) to a real `fewtune train` process."""
    # auto's choice is a timing: the in-process twin and the child process must not choose differently
    settings = dict(train__max_steps=200, train__batch_size=2, eval__early_stopping__enabled=False,
                    eval__every=1000, method__lora__dropout=0.1,
                    train__mixed_precision=runtime.resolve_mixed_precision("auto"))
    straight = train(make_config(train__output_dir=str(tmp_path / "straight"), **settings))
    run = tmp_path / "term"
    cfg = make_config(train__output_dir=str(run), **settings)
    save_config(cfg, tmp_path / "c.yaml")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "fewtune.cli", "train", str(tmp_path / "c.yaml")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait until training is under way
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) > 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, output
    assert "stopped by SIGTERM" in output and f"fewtune train --resume {run}" in output
    assert "Traceback" not in output
    step = int((run / "checkpoints" / "latest").read_text().split("-")[1])
    assert 2 <= step < 200
    done = subprocess.run([sys.executable, "-m", "fewtune.cli", "train", "--resume", str(run)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert steps(run) == list(range(1, 201))  # every step once: none lost, none repeated
    assert losses(run) == pytest.approx(losses(straight.run_dir), rel=1e-6)  # the same training, to the end


def _interrupted_run(make_config, out: Path, **extra):
    """A run stopped after 4 steps with checkpoints at steps 2 and 4, and its uninterrupted twin."""
    settings = dict(train__max_steps=6, train__save_every=2, train__batch_size=2, train__keep_checkpoints=2, **extra)
    straight = train(make_config(train__output_dir=str(out / "straight"), **settings))
    cfg = make_config(train__output_dir=str(out / "run"), **settings)
    with pytest.raises(Interrupted):
        train(cfg, stop_after=4)
    root = out / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-0000002", "step-0000004"]
    return cfg, straight, root


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 7] ^= 0x10  # inside the tensor data, past the header: it would load without complaint
    path.write_bytes(bytes(data))


DAMAGE = {
    "half-copied folder": lambda f: (f / "optimizer.bin").unlink(),
    "truncated file": lambda f: (f / "trainable.safetensors").write_bytes(
        (f / "trainable.safetensors").read_bytes()[:100]),
    "zero-byte file": lambda f: (f / "loop.json").write_bytes(b""),
    "flipped byte": lambda f: _flip_a_byte(f / "trainable.safetensors"),
    "missing folder": lambda f: shutil.rmtree(f),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_falls_back_to_the_previous_good_one(make_config, tmp_path, damage, caplog):
    cfg, straight, root = _interrupted_run(make_config, tmp_path)
    DAMAGE[damage](root / "step-0000004")
    with caplog.at_level(logging.WARNING, logger="fewtune.train.checkpoint"):
        result = train(cfg, resume=True)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "step-0000004 is damaged" in warning and "step-0000002" in warning, warning
    assert result.steps == 6
    # resumed from step 2: steps 3 and 4 ran again, and the run still equals the uninterrupted one
    assert steps(tmp_path / "run") == list(range(1, 7))
    assert losses(tmp_path / "run") == pytest.approx(losses(straight.run_dir), rel=1e-6)


def test_every_checkpoint_damaged_refuses_to_resume(make_config, tmp_path):
    cfg, _, root = _interrupted_run(make_config, tmp_path)
    for folder in ("step-0000002", "step-0000004"):
        _flip_a_byte(root / folder / "trainable.safetensors")
    with pytest.raises(TrainingError, match=r"every checkpoint in .* is damaged \(step-0000004: trainable.safetensors "
                                            r"does not match its checksum.*nothing to resume from"):
        train(cfg, resume=True)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_how_much_space_is_needed(make_config, tmp_path,
                                                                                     monkeypatch):
    cfg = make_config(train__max_steps=4, train__save_every=2, train__output_dir=str(tmp_path / "full"))
    real_save = ckpt.save_file
    calls = {"n": 0}

    def disk_fills_up(tensors, path, *a, **k):
        calls["n"] += "checkpoints" in str(path)
        if calls["n"] == 2:  # the second checkpoint's first file: the disk is full
            Path(path).write_bytes(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", disk_fills_up)
    with pytest.raises(TrainingError) as info:
        train(cfg)
    message = str(info.value)
    assert "no space left on the device while writing checkpoint step-0000004" in message
    assert "it needs about" in message and " are free" in message
    assert "the previous checkpoint step-0000002 is still the latest" in message
    assert "fewtune train --resume" in message
    root = tmp_path / "full" / "checkpoints"
    assert (root / "latest").read_text() == "step-0000002" and ckpt.verify(root / "step-0000002") is None
    assert not list(root.glob("*.tmp-*"))  # the half-written one is gone
    number, unit = message.split("needs about ")[1].split(" and ")[0].split()
    needed = float(number) * {"bytes": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[unit]
    written = sum(p.stat().st_size for p in (root / "step-0000002").iterdir())
    assert 0.5 * written <= needed <= 2 * written  # the estimate is the size a checkpoint really takes
    monkeypatch.setattr(ckpt, "save_file", real_save)  # space freed: the run resumes and finishes
    assert train(cfg, resume=True).steps == 4


def test_a_full_disk_while_saving_the_best_weights_is_one_clear_error(make_config, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(TrainingError, match=r"no space left on the device while writing the best weights \(best/\)"):
        train(make_config(train__max_steps=2))


def _change_data(cfg, tmp_path):
    path = Path(cfg.data.train)
    path.write_text(path.read_text(encoding="utf-8") + json.dumps({"prompt": "新的", "completion": "行"}) + "\n",
                    encoding="utf-8")
    return cfg, "data.train: the file's contents changed"


def _change_model(cfg, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(cfg.model.name, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(other)})}), "model.name: the model changed"


def _change_key(cfg, tmp_path):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 5e-3})}), "train.lr: 0.001 -> 0.005"


@pytest.mark.parametrize("change", [_change_data, _change_model, _change_key], ids=["data", "model", "train key"])
def test_resume_refuses_changed_inputs_unless_forced(make_config, tmp_path, change, caplog):
    cfg = make_config(train__max_steps=6, train__output_dir=str(tmp_path / "run"))
    with pytest.raises(Interrupted):
        train(cfg, stop_after=3)
    changed, what = change(cfg, tmp_path)
    with pytest.raises(TrainingError, match="its inputs changed since checkpoint step-0000003") as info:
        train(changed, resume=True)
    assert what in str(info.value) and "--force" in str(info.value)
    with caplog.at_level(logging.WARNING, logger="fewtune.train.loop"):
        assert train(changed, resume=True, force=True).steps == 6
    assert what in " ".join(r.getMessage() for r in caplog.records)


def test_resume_accepts_what_may_change(make_config, tmp_path):
    """A longer run, the same data under another path: nothing that changes what was trained so far."""
    cfg = make_config(train__max_steps=6, train__output_dir=str(tmp_path / "run"))
    with pytest.raises(Interrupted):
        train(cfg, stop_after=3)
    moved = tmp_path / "moved.jsonl"
    shutil.copy(cfg.data.train, moved)
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 8, "log_every": 2}),
                                    "data": cfg.data.model_copy(update={"train": str(moved)})})
    assert train(longer, resume=True).steps == 8


def test_summary_wall_time_adds_up_every_session_of_a_resumed_run(make_config, tmp_path, monkeypatch):
    import types

    from fewtune.train import loop as loop_module

    cfg = make_config(train__max_steps=6, train__output_dir=str(tmp_path / "run"), train__save_every=2)
    slow_step, offset = Trainer._train_step, [0.0]
    clock = types.SimpleNamespace(time=lambda: time.time() + offset[0])  # the loop's clock, real time + offset

    def slow(self, micro):
        offset[0] += 100.0  # each step of the first session takes 100 s on the loop's clock, however busy the machine
        return slow_step(self, micro)

    monkeypatch.setattr(loop_module, "time", clock)
    monkeypatch.setattr(Trainer, "_train_step", slow)
    with pytest.raises(Interrupted):
        train(cfg, stop_after=4)
    first = json.loads((tmp_path / "run" / "checkpoints" / "step-0000004" / "loop.json").read_text())["wall_s"]
    assert first >= 400.0
    monkeypatch.setattr(Trainer, "_train_step", slow_step)  # the second session runs in real time
    started = time.time()
    train(cfg, resume=True)
    second = time.time() - started
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert second < 400.0  # so the last session alone cannot explain the total
    assert first < summary["wall_s"] <= first + second  # both sessions, not only the last one


def test_a_resumed_auto_run_keeps_the_precision_its_first_session_chose(make_config, tmp_path, monkeypatch):
    """auto is a timing: a busy machine could tip it the other way between two sessions of one run."""
    monkeypatch.delenv(runtime.PRECISION_ENV, raising=False)
    cfg = make_config(train__max_steps=4, train__output_dir=str(tmp_path / "run"), train__mixed_precision="auto")
    from fewtune.train import precision_probe

    def measures(chosen: str):
        return lambda time_steps, key, cache=None: precision_probe.Decision(chosen, "measured", 1.0, 0.5, 3.0)

    monkeypatch.setattr(precision_probe, "decide", measures("bf16"))  # the first session measures bf16 as faster
    with pytest.raises(Interrupted):
        train(cfg, stop_after=2)
    monkeypatch.setattr(precision_probe, "decide", measures("no"))  # the second one would measure the opposite
    trainer = Trainer(cfg, resume=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert trainer.fit(resume=True).steps == 4
    assert Trainer(cfg).accelerator.mixed_precision == "no"  # a new run measures afresh


def test_damaged_best_weights_end_the_run_on_its_last_weights_with_a_warning(make_config, tmp_path, caplog,
                                                                          monkeypatch):
    cfg = make_config(train__max_steps=6, eval__every=2, train__output_dir=str(tmp_path / "run"))
    with pytest.raises(Interrupted):
        train(cfg, stop_after=4)
    _flip_a_byte(tmp_path / "run" / "best" / "trainable.safetensors")
    monkeypatch.setattr(Trainer, "_evaluate", lambda self: False)  # no later evaluation replaces best/
    with caplog.at_level(logging.WARNING, logger="fewtune.train.loop"):
        assert train(cfg, resume=True).steps == 6
    assert "the best weights in" in caplog.text and "are damaged (trainable.safetensors does not match" in caplog.text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_weights_damaged"] and summary["best_step"] == 6  # it says which weights it kept


def test_resume_refuses_a_run_directory_a_newer_fewtune_wrote(make_config, tmp_path):
    from fewtune.runinfo import MARKER, RUN_FORMAT

    cfg = make_config(train__max_steps=4, train__output_dir=str(tmp_path / "run"))
    with pytest.raises(Interrupted):
        train(cfg, stop_after=2)
    marker = tmp_path / "run" / MARKER
    assert json.loads(marker.read_text())["run_format"] == RUN_FORMAT  # training writes the marker
    marker.write_text(json.dumps({"run_format": RUN_FORMAT + 1, "fewtune_version": "9.0"}))
    with pytest.raises(TrainingError, match=r"written by fewtune 9.0 .*upgrade fewtune"):
        train(cfg, resume=True)


def test_a_process_that_fails_while_checkpointing_stops_the_others_too(tmp_path):
    """Every process learns at each stage of a save whether another one failed, and raises instead of waiting at
    the next barrier for a process that gave up; latest stays on the previous checkpoint, no half one is left."""
    accelerator = runtime.make_accelerator("no", None)
    flags: list[int] = []

    class OneOfTwo:  # this (main) process, in a run of two whose other process fails while writing its files
        num_processes = 2

        def __getattr__(self, name):
            return getattr(accelerator, name)

        def reduce(self, tensor, op):
            assert op == "max"
            flags.append(int(tensor))
            return torch.ones_like(tensor) if len(flags) == 5 else tensor  # the second save's writing stage

    weights = lambda: {"w": torch.ones(3)}  # noqa: E731
    ckpt.save_checkpoint(OneOfTwo(), tmp_path, 1, weights, {"step": 1}, keep=2)
    with pytest.raises(ckpt.CheckpointError, match="another process failed while writing the checkpoint"):
        ckpt.save_checkpoint(OneOfTwo(), tmp_path, 2, weights, {"step": 2}, keep=2)
    assert flags == [0, 0, 0, 0, 0]  # prepare, write, complete; prepare, write (this process was fine)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step-0000001" and ckpt.verify(root / "step-0000001") is None
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001"]
