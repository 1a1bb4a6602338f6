"""PNG plots people would rather look at than read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BLUE, ORANGE, GREEN, GREY = "#3182bd", "#e6550d", "#31a354", "#969696"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")  # long label names and a legend below the axes must not be cut off
    plt.close(fig)
    return path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    from fewtune.runlog import read_log

    return read_log(path)


# ---------------------------------------------------------------- learning curves


@dataclass
class KeptCheckpoint:
    """The evaluation whose weights the run kept, and what chose it."""

    step: int
    metric: str | None  # "loss", a task metric (eval.metric: "accuracy", ...), None when not recorded yet
    value: float | None  # that metric's validation value at the step: the marked point
    val_loss: float | None

    @property
    def label(self) -> str:
        loss = f"validation loss {self.val_loss:.4f}" if self.val_loss is not None else "validation loss"
        if self.metric is None:
            return f"best checkpoint so far: step {self.step}, {loss}"
        if self.metric == "loss":
            return f"kept checkpoint: step {self.step}, lowest {loss}"
        value = f" {self.value:.4f}" if self.value is not None else ""
        return f"kept checkpoint: step {self.step}, best validation {self.metric}{value} (eval.metric; {loss})"


def kept_checkpoint(records: list[dict]) -> KeptCheckpoint | None:
    """The checkpoint a run kept, from its metrics.jsonl records.

    A finished run's last ``end`` event names it (``best_step``, chosen by ``eval_metric``, as
    summary.json records them); a run without one yet has the last evaluation flagged ``best``;
    an older log with neither, the lowest validation loss. None without validation.
    """
    evals = [r for r in records if "val_loss" in r]
    ends = [r for r in records if r.get("event") == "end"]
    if ends:
        end = ends[-1]
        step, metric = end.get("best_step"), end.get("eval_metric") or "loss"
        if step is None:
            return None
        at = [r for r in evals if r["step"] == step]  # the last one: a resumed run may evaluate a step again
        row = at[-1] if at else {}
        val_loss = row.get("val_loss", end.get("best_val_loss"))
        value = val_loss if metric == "loss" else row.get(f"val_{metric}", end.get("best_metric"))
        return KeptCheckpoint(step, metric, value, val_loss)
    if not evals:
        return None
    flagged = [r for r in evals if r.get("best")]
    if flagged:
        return KeptCheckpoint(flagged[-1]["step"], None, flagged[-1]["val_loss"], flagged[-1]["val_loss"])
    best = min(evals, key=lambda r: r["val_loss"])
    return KeptCheckpoint(best["step"], "loss", best["val_loss"], best["val_loss"])


def learning_curve_figure(records: list[dict]):
    """(figure, kept checkpoint) for a run's records, or None with nothing to plot.

    Training loss per step (and a running mean), validation loss and, on a second axis, up
    to two validation task metrics (the one that chose the checkpoint first). The kept
    checkpoint is circled on the curve of the metric that chose it and marked by a dotted line.
    """
    from fewtune.config import TASK_METRICS

    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    kept = kept_checkpoint(records)
    chosen = f"val_{kept.metric}" if kept and kept.metric not in (None, "loss") else None
    logged = {k for r in records if "val_loss" in r for k in r if k.startswith("val_") and k != "val_loss"}
    order = [chosen] + [f"val_{m}" for metrics in TASK_METRICS.values() for m in metrics]
    metric_keys = [k for k in dict.fromkeys(order) if k in logged][:2]  # e.g. accuracy and macro-F1
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="train loss (per step)")
        window = max(1, len(losses) // 15)
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
            ax.plot(steps, smooth, color=BLUE, linewidth=2, label=f"train loss ({window}-step mean)")
    if val:
        vs, vl = zip(*val)
        ax.plot(vs, vl, "o-", color=ORANGE, linewidth=2, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per weighted token")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    marked_on = ax
    if metric_keys:
        ax2 = ax.twinx()
        for key, color in zip(metric_keys, (GREEN, "#756bb1")):
            s, v = zip(*[(r["step"], r[key]) for r in records if key in r])
            ax2.plot(s, v, "s--", color=color, linewidth=1.8, label=key.replace("val_", "validation "))
        ax2.set_ylabel("validation task metric")
        if all(0 <= r.get(k, 0) <= 1 for r in records for k in metric_keys):
            ax2.set_ylim(0, 1.05)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
        if chosen in metric_keys and kept.value is not None:
            marked_on = ax2
    if kept is not None:
        ax.axvline(kept.step, color=GREY, linestyle=":", linewidth=1)
        y = kept.value if marked_on is not ax else kept.val_loss
        if y is not None:
            handles.append(marked_on.scatter([kept.step], [y], s=160, facecolors="none", edgecolors="black",
                                             zorder=5, gid="kept-checkpoint"))
        else:
            handles.append(plt.Line2D([], [], color=GREY, linestyle=":"))
        labels.append(kept.label)
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, fontsize=8, frameon=False)
    ax.set_title("Learning curves")
    return fig, kept


def plot_learning_curve(records: list[dict], out_path: str | Path) -> Path | None:
    """Write :func:`learning_curve_figure` as a PNG; None with nothing to plot."""
    drawn = learning_curve_figure(records)
    if drawn is None:
        return None
    return _save(drawn[0], _pyplot(), Path(out_path))


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """A run's ``loss.png``: the learning curves of its metrics.jsonl, the kept checkpoint circled."""
    return plot_learning_curve(read_metrics(metrics_path), out_path)
