"""Validation during training: the loss, the task metric, and whether a checkpoint is the new best."""

from __future__ import annotations

import random

import torch

from fewtune.config import TASK_METRICS, Config, EarlyStoppingSection
from fewtune.train.state import LoopState


@torch.no_grad()
def validation_loss(loss_module, items, make_batch, accelerator, batch_size: int) -> float | None:
    """The loss-weighted mean validation loss over every process's share; None without validation data."""
    if not items:
        return None
    loss_module.eval()
    total = torch.zeros(2, device=accelerator.device)
    shard = items[accelerator.process_index::accelerator.num_processes]
    for i in range(0, len(shard), batch_size):
        batch = {k: v.to(accelerator.device) for k, v in make_batch(shard[i:i + batch_size]).items()}
        with accelerator.autocast():
            loss_sum, weight = loss_module(**batch)
        total += torch.stack([loss_sum.float(), weight.float()])
    total = accelerator.reduce(total, "sum")
    loss_module.train()
    return (total[0] / total[1]).item()


def task_metrics(model, tokenizer, template, cfg: Config, run_dir: str, accelerator, train_examples,
                 val_examples) -> dict[str, float]:
    """eval.task's metrics on the validation set (or a seeded sample of it); {} when no task metric is asked.

    Scored as `fewtune eval` scores (eval.mode, eval.labels, eval.normalize, eval.max_new_tokens), in batches
    of train.batch_size. Raises PromptError when a validation prompt leaves no room for the generation."""
    settings = cfg.eval
    if settings.task not in TASK_METRICS or not val_examples:
        return {}
    from fewtune.eval.evaluate import expected_label, task_metrics as evaluate_task
    from fewtune.generate import Loaded

    examples = val_examples
    if settings.sample and settings.sample < len(examples):
        examples = random.Random(cfg.train.seed).sample(examples, settings.sample)
    labels = settings.labels
    if settings.task == "classification" and not labels:
        labels = sorted({expected_label(e) for e in train_examples + val_examples})
    scoring = settings.model_copy(update={"labels": labels, "batch_size": cfg.train.batch_size})
    model.eval()
    try:
        with accelerator.autocast():
            metrics, _ = evaluate_task(Loaded(model, tokenizer, template, cfg, run_dir), examples, scoring,
                                       cfg.generate, progress=False)
    finally:
        model.train()
    return {k: float(metrics[k]) for k in TASK_METRICS[settings.task] if k in metrics}


def improved(state: LoopState, val: float, task: dict[str, float], metric: str, es: EarlyStoppingSection) -> bool:
    """Whether this evaluation beats the best so far: by validation loss, or by a task metric (higher is
    better; ties go to the lower loss)."""
    if metric == "loss":
        return state.best_val is None or val < state.best_val - es.min_delta
    best = state.best_metric
    # on a small validation set accuracy ties often (25/28 three times); on a tie the lower loss wins, where
    # keeping the first would keep the least trained of equally accurate checkpoints
    return best is None or task[metric] > best + es.min_delta or (best <= task[metric] and val < state.best_val)


def rank_key(entry: dict, metric: str) -> tuple:
    """Best first: the lower validation loss, or the higher task metric with ties to the lower loss (as
    :func:`improved` decides)."""
    return (entry["val_loss"],) if metric == "loss" else (-entry["metric"], entry["val_loss"])


def update_ranking(ranked: list[dict], entry: dict, metric: str, keep: int) -> bool:
    """Put this evaluation (``{step, val_loss, metric}``) into the best-first ``ranked`` list if it is among the
    best ``keep``; True when it entered. An equal earlier evaluation stays ahead of it."""
    candidates = sorted(ranked + [entry], key=lambda e: rank_key(e, metric))[:keep]
    ranked[:] = candidates
    return any(e is entry for e in candidates)
