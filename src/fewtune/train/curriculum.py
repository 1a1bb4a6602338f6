"""Curriculum learning (``data.curriculum``): the order of the training data in the first epochs, easy
examples first, hard ones last, shuffled within difficulty buckets.

Difficulty is the example's length in tokens, or the base model's mean loss on its
completion (measured once before training, hence here in train/ rather than in the data
pipeline). The ordered examples are cut into ``buckets`` equal groups; each group is
shuffled with the epoch's seed, so the order goes from easy to hard without being a fixed
sort. The loop takes ``Curriculum.batch_order(epoch)`` in place of its shuffled batches.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from fewtune.config import CurriculumSection
from fewtune.train.batching import collate

log = logging.getLogger(__name__)


@torch.no_grad()
def base_losses(loss_module, items, pad_id: int, device, batch_size: int = 8, progress: bool = True) -> list[float]:
    """Mean completion-token loss of each rendered example under the model as it is now."""
    was_training = loss_module.training
    loss_module.eval()
    out = []
    for i in tqdm(range(len(items)), desc="curriculum: base loss", disable=not progress or len(items) < 2,
                  dynamic_ncols=True):
        batch = {k: v.to(device) for k, v in collate([items[i]], pad_id).items()}
        loss_sum, weight = loss_module(**batch)
        out.append((loss_sum / weight).item())
    loss_module.train(was_training)
    return out


def curriculum_order(difficulty: list[float], buckets: int, seed: int, epoch: int) -> list[int]:
    """Example indices from easy to hard, shuffled within each of ``buckets`` equal-size groups."""
    ranked = sorted(range(len(difficulty)), key=lambda i: (difficulty[i], i))
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    buckets = max(1, min(buckets, len(ranked)))
    bounds = [round(b * len(ranked) / buckets) for b in range(buckets + 1)]
    order = []
    for lo, hi in zip(bounds, bounds[1:]):
        group = ranked[lo:hi]
        order += [group[j] for j in torch.randperm(len(group), generator=generator).tolist()]
    return order


def curriculum_batches(difficulty: list[float], buckets: int, batch_size: int, world: int, rank: int, seed: int,
                       epoch: int) -> list[list[int]]:
    """This process's share of each global batch, the batches in easy-to-hard order."""
    order = curriculum_order(difficulty, buckets, seed, epoch)
    step = batch_size * world
    batches = [order[i:i + step] for i in range(0, len(order), step)]
    return [b[rank * batch_size:(rank + 1) * batch_size] for b in batches]


class Curriculum:
    """Easy-to-hard batches in the first ``settings.epochs`` epochs (difficulty: one number per example)."""

    def __init__(self, settings: CurriculumSection, difficulty: list[float], batch_size: int, world: int,
                 rank: int, seed: int):
        self.settings, self.difficulty = settings, difficulty
        self.batch_size, self.world, self.rank, self.seed = batch_size, world, rank, seed

    def batch_order(self, epoch: int) -> list[list[int]] | None:
        """The epoch's batches in easy-to-hard order, or None once the curriculum epochs are over."""
        if epoch >= self.settings.epochs:
            return None
        return curriculum_batches(self.difficulty, self.settings.buckets, self.batch_size, self.world, self.rank,
                                  self.seed, epoch)


def build_curriculum(settings: CurriculumSection, *, lengths: list[int], loss_module, train_items, pad_id: int,
                     accelerator, batch_size: int, seed: int, progress: bool) -> Curriculum | None:
    """The run's curriculum (None with ``order: none``); ``loss`` measures the model as it is now, the base."""
    if settings.order == "none":
        return None
    if settings.order == "length":
        difficulty = [float(n) for n in lengths]
    else:
        log.info("curriculum: measuring the base model's loss on %d training examples", len(train_items))
        difficulty = base_losses(loss_module, train_items, pad_id, accelerator.device, progress=progress)
    return Curriculum(settings, difficulty, batch_size, accelerator.num_processes, accelerator.process_index, seed)
