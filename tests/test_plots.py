"""Learning-curve plots mark the checkpoint the run kept, chosen by loss or by a task metric."""

import json

import pytest

from fewtune.eval.report_plots import learning_curves
from fewtune.plots import kept_checkpoint, learning_curve_figure, plot_loss_curve


def run_log(eval_metric: str) -> list[dict]:
    """A 30-step run evaluated at steps 10, 20, 30: the loss is lowest at 20, the accuracy highest at 30."""
    records = [{"step": 0, "event": "start", "trainable_params": 10}]
    records += [{"step": s, "train_loss": 2.0 - s / 30, "lr": 1e-3} for s in range(1, 31)]
    evals = [(10, 1.0, 0.5), (20, 0.7, 0.6), (30, 0.9, 0.8)]
    best_loss = best_acc = None
    for step, loss, acc in evals:
        if eval_metric == "loss":
            better = best_loss is None or loss < best_loss
        else:
            better = best_acc is None or acc > best_acc
        if better:
            best_loss, best_acc, best_step = loss, acc, step
        row = {"step": step, "epoch": step / 30, "val_loss": loss, "best": better}
        if eval_metric != "loss":
            row.update(val_accuracy=acc, val_macro_f1=acc - 0.1)
        records.append(row)
    records.append({"step": 30, "event": "end", "steps": 30, "best_val_loss": best_loss, "best_step": best_step,
                    "eval_metric": eval_metric, "best_metric": None if eval_metric == "loss" else best_acc})
    return records


def marked(fig):
    """(axis label, [(step, value)], legend label) of the circled point in a learning-curve figure."""
    found = [(ax, c) for ax in fig.axes for c in ax.collections if c.get_gid() == "kept-checkpoint"]
    assert len(found) == 1
    ax, circle = found[0]
    legend = next(a.get_legend() for a in fig.axes if a.get_legend())
    labels = [t.get_text() for t in legend.get_texts()]
    return ax.get_ylabel(), [tuple(p) for p in circle.get_offsets().tolist()], [x for x in labels if "checkpoint" in x]


def test_a_loss_chosen_run_circles_the_lowest_validation_loss(tmp_path):
    records = run_log("loss")
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_loss_curve(path, tmp_path / "loss.png") == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    fig, kept = learning_curve_figure(records)
    assert (kept.step, kept.metric, kept.value) == (20, "loss", 0.7)
    axis, points, labels = marked(fig)
    assert axis == "loss per weighted token" and points == [(20, 0.7)]
    assert labels == ["kept checkpoint: step 20, lowest validation loss 0.7000"]


def test_an_accuracy_chosen_run_circles_the_kept_checkpoint_not_the_lowest_loss(tmp_path):
    records = run_log("accuracy")
    fig, kept = learning_curve_figure(records)
    assert (kept.step, kept.metric, kept.value, kept.val_loss) == (30, "accuracy", 0.8, 0.9)
    axis, points, labels = marked(fig)
    assert axis == "validation task metric" and points == [(30, 0.8)]  # on the accuracy curve, at best_step
    assert labels == ["kept checkpoint: step 30, best validation accuracy 0.8000 (eval.metric; "
                      "validation loss 0.9000)"]
    # the report's learning curves are the same plot
    assert learning_curves(records, tmp_path / "learning_curves.png") == tmp_path / "learning_curves.png"
    assert (tmp_path / "learning_curves.png").read_bytes().startswith(b"\x89PNG")


def test_the_kept_checkpoint_without_an_end_event():
    records = [r for r in run_log("accuracy") if r.get("event") != "end"]  # still training, or interrupted
    kept = kept_checkpoint(records)
    assert (kept.step, kept.metric, kept.value) == (30, None, 0.9)  # the last evaluation flagged best
    assert kept.label == "best checkpoint so far: step 30, validation loss 0.9000"
    older = [{k: v for k, v in r.items() if k != "best"} for r in records]  # a log from before the flag
    assert (kept_checkpoint(older).step, kept_checkpoint(older).metric) == (20, "loss")
    assert kept_checkpoint([r for r in records if "val_loss" not in r]) is None
    no_validation = [r for r in records if "val_loss" not in r] + [{"step": 30, "event": "end", "best_step": None,
                                                                     "eval_metric": "loss"}]
    assert kept_checkpoint(no_validation) is None
    fig, kept = learning_curve_figure(no_validation)
    assert kept is None and not [c for ax in fig.axes for c in ax.collections]
    assert learning_curve_figure([]) is None


def test_a_resumed_run_uses_its_last_end_event():
    first = run_log("accuracy")
    records = first[:-1] + [dict(first[-1], best_step=20, best_metric=0.6)] + first[-4:]
    kept = kept_checkpoint(records)
    assert (kept.step, kept.value) == (30, pytest.approx(0.8))
