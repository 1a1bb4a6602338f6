"""The optimizer, the learning-rate schedule and the order examples are seen in, per epoch."""

from __future__ import annotations

import math

import torch

from fewtune.config import TrainSection


def epoch_batches(lengths: list[int], batch_size: int, world: int, rank: int, seed: int, epoch: int,
                  group_by_length: bool = False) -> list[list[int]]:
    """This process's share of each global batch of the epoch (global batch = batch_size * world).

    A seeded permutation per epoch, so a resumed run sees exactly the examples an uninterrupted
    run would. With ``group_by_length``, the shuffled order is cut into windows of 32 global
    batches, each window is sorted by length and cut into batches, and the batches are shuffled:
    batches of similar length waste little on padding, and their order stays random.
    """
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    n = len(lengths)
    order = torch.randperm(n, generator=generator).tolist()
    step = batch_size * world
    if group_by_length:
        window = step * 32
        order = [j for i in range(0, n, window) for j in sorted(order[i:i + window], key=lambda j: -lengths[j])]
    batches = [order[i:i + step] for i in range(0, n, step)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [b[rank * batch_size:(rank + 1) * batch_size] for b in batches]


def build_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "norm" not in name.lower() else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # one fused kernel for all tensors instead of a Python loop over hundreds of small LoRA
    # matrices (about 9x faster per step on CPU); float32 trainables are kept for this
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused or None)


def build_scheduler(optimizer, train: TrainSection, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(train.scheduler, train.scheduler)
    extra = {"num_cycles": train.num_cycles} if name == "cosine_with_restarts" else {}
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(train.warmup_ratio * total_steps),
                         num_training_steps=total_steps, scheduler_specific_kwargs=extra)
