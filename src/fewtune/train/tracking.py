"""Experiment tracking (``train.report_to``): TensorBoard and MLflow through accelerate's tracker classes.

Everything stays on this machine: TensorBoard writes event files (tensorboardX is enough, no
TensorBoard install needed), MLflow a SQLite store with the artifacts beside it, so nothing needs a
server, an account or a network, and nothing prompts. A run logs its whole config as
hyperparameters (dotted keys), every record it writes to metrics.jsonl (numbers only, at its
step), and at the end the loss plot and summary as artifacts (TensorBoard: the plot as an image).

Files go under ``train.tracking_dir`` (default RUN_DIR/tracking): ``tensorboard/<experiment>/<run>/``
and ``mlflow.db`` + ``mlflow-artifacts/``. sweep and tune point all their runs at one folder and
one experiment, so the trials of a search sit side by side. A resumed run continues the same
MLflow run (its id is kept in RUN_DIR/tracking.json).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fewtune.config import Config, dotted_keys

log = logging.getLogger(__name__)

INSTALL = {"tensorboard": "pip install tensorboardX", "mlflow": "pip install mlflow-skinny"}


class TrackingError(RuntimeError):
    """A tracker asked for in train.report_to is not installed."""


def check_installed(names: list[str]) -> None:
    import importlib.util

    for name in names:
        module = "tensorboardX" if name == "tensorboard" else "mlflow"
        if name == "tensorboard" and importlib.util.find_spec("tensorboard") is not None:
            continue
        if importlib.util.find_spec(module) is None:
            raise TrackingError(f"train.report_to asks for {name}, which is not installed: {INSTALL[name]}")


def tracking_dir(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.train.tracking_dir) if cfg.train.tracking_dir else run_dir / "tracking"


def mlflow_uri(folder: Path) -> str:
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


class Trackers:
    """The run's trackers (none when train.report_to is empty); call only on the main process."""

    def __init__(self, cfg: Config, run_dir: Path, resumed: bool = False):
        self.trackers: list[Any] = []
        names = list(dict.fromkeys(cfg.train.report_to))
        if not names:
            return
        check_installed(names)
        folder = tracking_dir(cfg, run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        state_file = run_dir / "tracking.json"
        state = json.loads(state_file.read_text()) if resumed and state_file.exists() else {}
        run_name = run_dir.name if cfg.train.tracking_dir is None else _relative_name(run_dir, folder)
        for name in names:
            if name == "tensorboard":
                from accelerate.tracking import TensorBoardTracker

                tracker = TensorBoardTracker(f"{cfg.train.experiment}/{run_name}", folder / "tensorboard")
            else:
                import mlflow
                from accelerate.tracking import MLflowTracker

                mlflow.set_tracking_uri(mlflow_uri(folder))
                tracker = MLflowTracker(cfg.train.experiment, str((folder / "mlflow-artifacts").resolve()),
                                        run_id=state.get("mlflow_run_id"), run_name=run_name)
            tracker.start()
            self.trackers.append(tracker)
        if "mlflow" in names:
            state["mlflow_run_id"] = self._mlflow().tracker.info.run_id
            state_file.write_text(json.dumps(state))
        if not state.get("configured"):
            params = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                      for k, v in dotted_keys(cfg.model_dump(mode="json")).items()}
            params = {k: ("None" if v is None else v) for k, v in params.items()}
            for tracker in self.trackers:
                tracker.store_init_configuration(params)
            state["configured"] = True
            state_file.write_text(json.dumps(state))

    @classmethod
    def none(cls) -> "Trackers":
        """No trackers (before the run directory is set up, and on processes other than the main one)."""
        empty = cls.__new__(cls)
        empty.trackers = []
        return empty

    def close(self) -> None:
        """Close every tracker without artifacts (a run stopped early or failed)."""
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

    def _mlflow(self):
        return next(t for t in self.trackers if t.name == "mlflow")

    def log(self, record: dict) -> None:
        if not self.trackers:
            return
        values = {k: v for k, v in record.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and v == v}
        if values:
            for tracker in self.trackers:
                tracker.log(values, step=int(record.get("step", 0)))

    def finish(self, run_dir: Path) -> None:
        """The artifacts, then close every tracker."""
        if not self.trackers:
            return
        files = [run_dir / name for name in ("loss.png", "summary.json", "config.yaml") if (run_dir / name).exists()]
        for tracker in self.trackers:
            try:
                if tracker.name == "mlflow":
                    import mlflow

                    for path in files:
                        mlflow.log_artifact(str(path))
                elif tracker.name == "tensorboard" and (run_dir / "loss.png").exists():
                    import matplotlib.image

                    image = matplotlib.image.imread(run_dir / "loss.png")
                    tracker.writer.add_image("loss_curve", image, dataformats="HWC")
            finally:
                tracker.finish()
        self.trackers = []


def _relative_name(run_dir: Path, folder: Path) -> str:
    """A sweep's or tune's run named by its path under their folder (runs/<combination>/seed-0 ...)."""
    try:
        return str(run_dir.resolve().relative_to(folder.resolve().parent))
    except ValueError:
        return run_dir.name
