"""Training runs started from the web UI: a ``fewtune train`` process per run, watched through its files.

A run is an ordinary ``python -m fewtune train CONFIG`` process, so it behaves exactly as on the command
line (same checks, same run directory, resumable with ``fewtune train --resume``), and the UI's server
stays responsive while it trains. Progress is read from the run's ``metrics.jsonl``; Stop sends SIGTERM,
which the training loop answers by finishing the step and writing a checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fewtune.config import Config


@dataclass
class Progress:
    state: str  # idle | running | finished | stopped | failed
    step: int = 0
    total_steps: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    elapsed_s: float = 0.0
    curve: list[dict] = field(default_factory=list)  # {"step", "loss", "series"} for the plot
    run_dir: str | None = None
    message: str = ""

    def summary(self) -> str:
        if self.state == "idle":
            return "No training started yet."
        parts = [f"**{self.state}**", f"step {self.step}" + (f" / {self.total_steps}" if self.total_steps else "")]
        if self.train_loss is not None:
            parts.append(f"training loss {self.train_loss:.4f}")
        if self.val_loss is not None:
            parts.append(f"validation loss {self.val_loss:.4f}")
        parts.append(f"{self.elapsed_s:.0f} s")
        text = " · ".join(parts)
        if self.run_dir:
            text += f"\n\nRun directory: `{self.run_dir}`"
        if self.message:
            text += f"\n\n{self.message}"
        return text


def read_progress(run_dir: Path) -> Progress:
    """What the run's metrics.jsonl says so far (a line being written is skipped)."""
    progress = Progress("running")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return progress
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        step = record.get("step", 0)
        if record.get("event") == "start":
            progress.total_steps = record.get("total_steps")
        elif record.get("event") == "end":
            progress.total_steps = record.get("total_steps", progress.total_steps)
        if "train_loss" in record:
            progress.step, progress.train_loss = step, record["train_loss"]
            progress.elapsed_s = record.get("elapsed_s", progress.elapsed_s)
            progress.curve.append({"step": step, "loss": record["train_loss"], "series": "training"})
        if "val_loss" in record:
            progress.val_loss = record["val_loss"]
            progress.curve.append({"step": step, "loss": record["val_loss"], "series": "validation"})
    return progress


class TrainingJob:
    """One training process at a time (one machine: two would slow each other several times over)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.run_dir: Path | None = None
        self.log_path: Path | None = None
        self.started = 0.0
        self.stop_requested = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, cfg: Config) -> Path:
        if self.running:
            raise RuntimeError("a training run is still going: stop it first (one run at a time on this machine)")
        run_dir = Path(cfg.train.output_dir)
        if not run_dir.is_absolute():
            run_dir = self.workdir / run_dir
        if run_dir.exists() and any(run_dir.iterdir()) and not cfg.train.resume:
            raise FileExistsError(f"{run_dir} already holds a run: choose another train.output_dir, or tick "
                                  "train.resume to continue it")
        ui_dir = self.workdir / ".fewtune-ui"
        ui_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        config_path = ui_dir / f"{run_dir.name}-{stamp}.yaml"
        data = cfg.model_dump(mode="json")
        data["train"]["output_dir"] = str(run_dir)
        config_path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
        self.log_path = ui_dir / f"{run_dir.name}-{stamp}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "w", encoding="utf-8") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen([sys.executable, "-m", "fewtune", "train", str(config_path)],
                                            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.run_dir, self.started, self.stop_requested = run_dir, time.time(), False
        return run_dir

    def stop(self) -> bool:
        """Ask the run to stop after its current step (it writes a checkpoint first); False if none runs."""
        if not self.running:
            return False
        self.stop_requested = True
        self.process.send_signal(signal.SIGTERM)
        return True

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
        return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])

    def progress(self) -> Progress:
        if self.process is None or self.run_dir is None:
            return Progress("idle")
        progress = read_progress(self.run_dir)
        code = self.process.poll()
        if code is None:  # while it runs, the wall time; afterwards the run's own (from metrics.jsonl)
            progress.elapsed_s = time.time() - self.started
        if code is None:
            progress.state = "stopping" if self.stop_requested else "running"
        elif code == 0:
            progress.state, progress.run_dir = "finished", str(self.run_dir)
        elif self.stop_requested:
            progress.state, progress.run_dir = "stopped", str(self.run_dir)
            progress.message = f"Stopped with a checkpoint: continue with `fewtune train --resume {self.run_dir}`."
        else:
            progress.state = "failed"
            progress.message = f"The training process exited with code {code}:\n\n```\n{self.log_tail()}\n```"
        return progress

    def wait(self, timeout: float | None = None) -> int | None:
        if self.process is None:
            return None
        return self.process.wait(timeout)
