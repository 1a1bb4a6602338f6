"""Data-parallel training: 2 CPU processes (gloo, launched by torchrun) reach the same result
as one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fewtune.config import build_config
from fewtune.train.loop import train
from tests.precision import GRAD_RTOL_BF16, LOSS_RTOL_BF16, PRECISIONS

SRC = Path(__file__).resolve().parents[1] / "src"


def _settings(tiny_model, data, out, batch_size, precision) -> dict:
    return {
        "model": {"name": tiny_model},
        "data": {"train": str(data), "val_ratio": 0.2, "max_length": 64},
        "method": {"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "train": {"output_dir": str(out), "max_steps": 4, "batch_size": batch_size, "lr": 1e-3,
                  "warmup_ratio": 0.0, "seed": 3, "cache_tokenized": False, "mixed_precision": precision},
        "eval": {"every": 2},
    }


def _metrics(run_dir: Path, key: str) -> list[float]:
    return [json.loads(l)[key] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if f'"{key}"' in l]


@PRECISIONS
def test_two_processes_match_one_process(tiny_model, pc_data, tmp_path, precision):
    """2 processes x batch 2 = 1 process x batch 4 (tolerances: tests/precision.py)."""
    single = train(build_config(_settings(tiny_model, pc_data, tmp_path / "single", 4, precision)))
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(_settings(tiny_model, pc_data, tmp_path / "ddp", 2, precision)))
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fewtune.cli", "train", str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_dir = tmp_path / "ddp"
    start = json.loads((ddp_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start"
    assert _metrics(ddp_dir, "tokens") == _metrics(single.run_dir, "tokens")  # same global batches
    losses, single_losses = _metrics(ddp_dir, "train_loss"), _metrics(single.run_dir, "train_loss")
    norms, single_norms = _metrics(ddp_dir, "grad_norm"), _metrics(single.run_dir, "grad_norm")
    assert len(losses) == len(norms) == 4
    if precision == "bf16":
        # the first step sees the same weights in both: the loss within u, the gradient's norm within the
        # norm-wise gradient tolerance (|‖a‖ - ‖b‖| <= ‖a - b‖); later steps follow Adam (tests/precision.py)
        assert losses[0] == pytest.approx(single_losses[0], rel=LOSS_RTOL_BF16)
        assert norms[0] == pytest.approx(single_norms[0], rel=GRAD_RTOL_BF16)
        return
    assert losses == pytest.approx(single_losses, rel=1e-4)
    assert norms == pytest.approx(single_norms, rel=1e-4)
    assert _metrics(ddp_dir, "val_loss") == pytest.approx(_metrics(single.run_dir, "val_loss"), rel=1e-4)
    a = load_file(single.run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(ddp_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5)


def test_two_processes_checkpoint_their_own_random_states_and_resume_to_the_same_result(tiny_model, pc_data,
                                                                                        tmp_path):
    """accelerate's save_state writes each process's random states (random_states_<i>.pkl) and load_state gives
    each its own back: with dropout, a 2-process run resumed from step 2 ends where the uninterrupted one does."""
    settings = _settings(tiny_model, pc_data, tmp_path / "straight", 2, "no")
    settings["method"]["lora"]["dropout"] = 0.1
    settings["train"]["save_every"] = 2
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "fewtune.cli", "train"]
    proc = subprocess.run(launch + [str(config)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight = tmp_path / "straight"
    step2 = straight / "checkpoints" / "step-0000002"
    written = json.loads((step2 / "manifest.json").read_text())  # what every process wrote, checksummed
    assert {"trainable.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"} <= written.keys()
    assert not any(name.startswith(("model", "pytorch_model")) for name in written)  # no full-model file
    states = [torch.load(step2 / f"random_states_{i}.pkl", weights_only=False)["torch_manual_seed"] for i in (0, 1)]
    assert not torch.equal(*states)  # the processes' dropout streams differ: one state for both would not do
    # the same run as if stopped after step 2
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000004")
    (resumed / "checkpoints" / "latest").write_text("step-0000002")
    for done in ("adapter", "summary.json"):
        shutil.rmtree(resumed / done) if (resumed / done).is_dir() else (resumed / done).unlink()
    proc = subprocess.run(launch + ["--resume", str(resumed)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(l)["step"] for l in (resumed / "metrics.jsonl").read_text().splitlines()
            if '"train_loss"' in l] == [1, 2, 3, 4]
    assert _metrics(resumed, "train_loss") == pytest.approx(_metrics(straight, "train_loss"), rel=1e-6)
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name])


@pytest.mark.parametrize("name,kind,processes", [
    ("ddp", "MULTI_GPU", 2), ("multi_node", "MULTI_GPU", 8), ("fsdp", "FSDP", 2),
    ("deepspeed_zero2", "DEEPSPEED", 2), ("deepspeed_zero3", "DEEPSPEED", 2)])
def test_shipped_accelerate_configs_load(name, kind, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == kind and config.num_processes == processes
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
