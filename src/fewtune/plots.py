"""PNG plots people would rather look at than read."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Training loss per step (and a smoothed line) with validation loss points and the best one marked."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps, losses = zip(*train)
    ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="train loss (per step)")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="#3182bd", linewidth=2, label=f"train loss ({window}-step mean)")
    if val:
        vsteps, vlosses = zip(*val)
        ax.plot(vsteps, vlosses, "o-", color="#e6550d", linewidth=2, label="validation loss")
        best = min(val, key=lambda t: t[1])
        ax.scatter([best[0]], [best[1]], s=160, facecolors="none", edgecolors="black", zorder=5,
                   label=f"best: {best[1]:.4f} @ step {best[0]}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per weighted token)")
    ax.set_title("Learning curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
