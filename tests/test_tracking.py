"""train.report_to: what a tiny run writes to TensorBoard event files and an MLflow SQLite store, read back;
a resumed run continues its MLflow run; a sweep files its runs under one experiment; a missing package
says what to install."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

pytest.importorskip("tensorboardX")
mlflow = pytest.importorskip("mlflow")

from fewtune.runlog import read_log  # noqa: E402
from fewtune.train.loop import TrainingError, train  # noqa: E402
from fewtune.train.tracking import mlflow_uri  # noqa: E402


def tensorboard_events(folder: Path) -> list:
    """Every Event in the TFRecord files under ``folder`` (length, crc, payload, crc per record)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            payload = data[at + 12:at + 12 + length]
            events.append(event_pb2.Event.FromString(payload))
            at += 12 + length + 4
    return events


def scalars(events, tag: str) -> dict[int, float]:
    return {e.step: v.simple_value for e in events for v in e.summary.value if v.tag == tag and v.HasField("simple_value")}


def test_tensorboard_and_mlflow_receive_config_metrics_and_artifacts(make_config, tmp_path):
    cfg = make_config(train__report_to='["tensorboard","mlflow"]', train__max_steps=4)
    run = tmp_path / "run"
    train(cfg, run)
    records = [r for r in read_log(run / "metrics.jsonl") if "train_loss" in r]
    assert len(records) == 4

    events = tensorboard_events(run / "tracking" / "tensorboard")
    logged = scalars(events, "train_loss")
    assert sorted(logged) == [r["step"] for r in records]
    for r in records:
        assert logged[r["step"]] == pytest.approx(r["train_loss"], rel=1e-6)
    assert any(v.tag == "loss_curve" and v.HasField("image") for e in events for v in e.summary.value)

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(run / "tracking"))
    experiment = client.get_experiment_by_name("fewtune")
    (found,) = client.search_runs([experiment.experiment_id])
    assert float(found.data.params["train.lr"]) == cfg.train.lr
    assert found.data.params["method.lora.r"] == "4"
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "train_loss")}
    assert history == pytest.approx({r["step"]: r["train_loss"] for r in records})
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"loss.png", "summary.json", "config.yaml"} <= artifacts
    assert found.info.status == "FINISHED"


def test_a_resumed_run_continues_its_mlflow_run(make_config, tmp_path):
    from fewtune.train.loop import Interrupted

    cfg = make_config(train__report_to='["mlflow"]', train__max_steps=4, train__save_every=1)
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(cfg, run, stop_after=2)
    first = json.loads((run / "tracking.json").read_text())["mlflow_run_id"]
    train(cfg, run, resume=True)
    assert json.loads((run / "tracking.json").read_text())["mlflow_run_id"] == first
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(run / "tracking"))
    runs = client.search_runs([client.get_experiment_by_name("fewtune").experiment_id])
    assert [r.info.run_id for r in runs] == [first]
    assert sorted(m.step for m in client.get_metric_history(first, "train_loss")) == [1, 2, 3, 4]


def test_a_sweep_files_its_runs_under_one_experiment(make_config, tmp_path):
    from fewtune.workflows.sweep import sweep

    cfg = make_config(train__report_to='["mlflow"]', train__max_steps=2)
    result = sweep(cfg, grid=["train.lr=1e-3,2e-3"], seeds=1, out=tmp_path / "lr-sweep")
    assert all(r["status"] == "ok" for r in result.records)
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(tmp_path / "lr-sweep" / "tracking"))
    experiment = client.get_experiment_by_name("lr-sweep")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(float(r.data.params["train.lr"]) for r in runs) == [1e-3, 2e-3]
    assert all(r.info.run_name.startswith("runs/") for r in runs)


def test_a_missing_tracker_package_says_what_to_install(make_config, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(TrainingError, match="pip install mlflow-skinny"):
        train(make_config(train__report_to='["mlflow"]', train__max_steps=1), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training
