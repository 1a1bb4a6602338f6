"""The report's figures: learning curves, confusion matrix, per-class bars, before/after with intervals."""

from __future__ import annotations

from pathlib import Path

from fewtune.plots import BLUE, GREEN, GREY, ORANGE, _pyplot, _save, plot_learning_curve


def learning_curves(records: list[dict], path: Path) -> Path | None:
    """The run's learning curves (:func:`fewtune.plots.plot_learning_curve`, also the run's loss.png)."""
    return plot_learning_curve(records, path)


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
