"""The report's figures: learning curves, confusion matrix, per-class bars, before/after with intervals."""

from __future__ import annotations

from pathlib import Path

from fewtune.config import TASK_METRICS
from fewtune.plots import _pyplot

BLUE, ORANGE, GREEN, GREY = "#3182bd", "#e6550d", "#31a354", "#969696"


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")  # long label names must not be cut at the edges
    plt.close(fig)
    return path


def learning_curves(records: list[dict], path: Path) -> Path | None:
    """Train loss per step (+ running mean), validation loss and, on a second axis, the task metric."""
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    logged = {k for r in records if "val_loss" in r for k in r if k.startswith("val_") and k != "val_loss"}
    order = [f"val_{m}" for metrics in TASK_METRICS.values() for m in metrics]
    metric_keys = [k for k in dict.fromkeys(order) if k in logged][:2]  # e.g. accuracy and macro-F1
    if not train and not val:
        return None
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
    if metric_keys:
        ax2 = ax.twinx()
        colors = [GREEN, "#756bb1", "#636363", "#d6616b"]
        for key, color in zip(metric_keys, colors):
            points = [(r["step"], r[key]) for r in records if key in r]
            s, v = zip(*points)
            ax2.plot(s, v, "s--", color=color, linewidth=1.8, label=key.replace("val_", "validation "))
        ax2.set_ylabel("validation task metric")
        if all(0 <= r.get(k, 0) <= 1 for r in records for k in metric_keys):
            ax2.set_ylim(0, 1.05)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    best = [r for r in records if r.get("best")]
    if best:
        b = best[-1]
        ax.axvline(b["step"], color=GREY, linestyle=":", linewidth=1)
        handles.append(plt.Line2D([], [], color=GREY, linestyle=":"))
        labels.append(f"best checkpoint (step {b['step']})")
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=3, fontsize=8, frameon=False)
    ax.set_title("Learning curves")
    return _save(fig, plt, path)


def confusion_matrix(confusion: dict, path: Path, title: str = "Confusion matrix") -> Path:
    """Counts, rows = expected, columns = predicted; each cell also shaded by its row share."""
    import numpy as np

    labels, matrix = confusion["labels"], np.array(confusion["matrix"])
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    n = len(labels)
    plt = _pyplot()
    size = max(4.5, 0.62 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=110)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(range(n), labels, rotation=40, ha="right", fontsize=9)
    ax.set_yticks(range(matrix.shape[0]), labels[:matrix.shape[0]], fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("expected")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the expected class")
    return _save(fig, plt, path)


def per_class_bars(per_class: dict, path: Path, title: str = "Per-class precision, recall, F1") -> Path:
    import numpy as np

    labels = list(per_class)
    x = np.arange(len(labels))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels) + 2), 4.2), dpi=110)
    for k, (key, color) in enumerate((("precision", BLUE), ("recall", ORANGE), ("f1", GREEN))):
        ax.bar(x + (k - 1) * 0.27, [per_class[lab][key] for lab in labels], 0.27, color=color, label=key)
    ax.set_xticks(x, [f"{lab}\n(n={per_class[lab]['support']})" for lab in labels], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.18)  # room for the legend above the 1.0 line
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=3, loc="upper left")
    ax.set_title(title)
    return _save(fig, plt, path)


def before_after(report: dict, path: Path) -> Path:
    """Each compared metric per model (bars, with the model's own 95% interval as error bars)."""
    import numpy as np

    names = report["names"]
    metrics = list(report["comparisons"][0]["metrics"])
    scale = {m: (0.01 if m == "bleu" else 1.0) for m in metrics}  # BLEU is 0..100
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(metrics) + 2), 4.2), dpi=110)
    x = np.arange(len(metrics))
    width = 0.8 / len(names)
    colors = [GREY, BLUE, ORANGE, GREEN, "#756bb1"]
    for k, name in enumerate(names):
        values = [report["metrics"][name][m] * scale[m] if m in report["metrics"][name] else np.nan for m in metrics]
        ints = report.get("intervals", {}).get(name, {})
        err = None
        if ints:
            err = np.array([[max(0.0, v - ints[m]["low"] * scale[m]), max(0.0, ints[m]["high"] * scale[m] - v)]
                            for m, v in zip(metrics, values)]).T
        bars = ax.bar(x + (k - (len(names) - 1) / 2) * width, values, width, yerr=err, capsize=3,
                      color=colors[k % len(colors)], label=name)
        for rect, v in zip(bars, values):
            ax.text(rect.get_x() + rect.get_width() / 2, 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8,
                    color="white" if v > 0.08 else "black")
    ax.set_xticks(x, [m + (" (/100)" if m == "bleu" else "") for m in metrics])
    ax.set_ylim(0, 1.18)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=len(names), loc="upper left")
    ax.set_title(f"Before / after on {report['n']} examples (error bars: 95% bootstrap interval)")
    return _save(fig, plt, path)
