"""Training throughput per batch size on this machine, for `fewtune suggest`'s batch rule.

On a CPU a batch of one trains several times slower per token than a batch of eight (each step's
fixed costs, and matrix products too thin to use the cores), so a batch size chosen from the data
set's size alone (the 0.2% rule gives 1 below 750 examples) can triple a run's time. The probe
builds the model exactly as training would (fewtune.train.loop.build_training_model: the method,
packing, the precision), and times forward + backward passes over micro-batches drawn from the
data set's own rendered examples at each candidate size; no optimizer step is taken and the
random states are restored afterwards.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

CANDIDATES = (1, 2, 4, 8, 16, 32)
STEPS = 3  # timed passes per batch size, after one warm-up; the median counts


@dataclass
class Throughput:
    batch_size: int
    tokens_per_s: float
    step_s: float


def probe_precision() -> str:
    """What the probe trains in: what FEWTUNE_MIXED_PRECISION forces, bf16 on a GPU that has it, else fp32
    (on a CPU the precision is chosen per run by timed steps; the ranking of batch sizes is what counts)."""
    from fewtune.train import runtime

    forced = runtime.forced_precision()
    if forced is not None:
        return "bf16" if forced == "fp16" and not torch.cuda.is_available() else forced
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def measure(cfg, items: list, batch_sizes, precision: str | None = None, seed: int = 0,
            progress: bool = True) -> list[Throughput]:
    """Tokens per second of training passes at each of ``batch_sizes`` (ascending) on ``items`` (Rendered
    examples of the data set), with the model ``cfg`` describes. A size that runs out of memory ends the probe."""
    from fewtune.train import precision_probe
    from fewtune.train.batching import collate, pack
    from fewtune.train.loop import build_training_model

    precision = precision or probe_precision()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    results: list[Throughput] = []
    with precision_probe.RandomStates():
        model, loss_module, _, _, packing = build_training_model(cfg, precision)
        loss_module.to(device).train()
        pad = cfg_pad_id(cfg)
        make = (lambda chunk: pack(chunk, cfg.train.share_prefix)) if packing else (lambda chunk: collate(chunk, pad))
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                    ) if precision in ("bf16", "fp16") else nullcontext
        rng = random.Random(seed)
        bar = tqdm(total=len(batch_sizes), desc="throughput by batch size", disable=not progress, dynamic_ncols=True)
        for size in batch_sizes:
            times, tokens = [], []
            try:
                for _ in range(STEPS + 1):
                    chunk = [items[rng.randrange(len(items))] for _ in range(size)]
                    batch = {k: v.to(device) for k, v in make(chunk).items()}
                    start = time.perf_counter()
                    with autocast():
                        loss, _ = loss_module(**batch)
                    loss.backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                    tokens.append(sum(len(r) for r in chunk))
                    loss_module.zero_grad(set_to_none=True)
            except torch.OutOfMemoryError:
                log.info("batch %d ran out of memory: the probe stops there", size)
                break
            finally:
                bar.update(1)
            step = statistics.median(times[1:])
            results.append(Throughput(size, statistics.median(t / s for t, s in zip(tokens[1:], times[1:])), step))
        bar.close()
        del model, loss_module
    return results


def cfg_pad_id(cfg) -> int:
    from fewtune.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.name)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def choose(results: list[Throughput], low: int, high: int, train_n: int, epochs: float, min_updates: int,
           tolerance: float = 0.05) -> tuple[int, str] | None:
    """The batch size to train with: among the measured sizes in [low, high] that still give at least
    ``min_updates`` optimizer steps, the fastest per token, or the smallest within ``tolerance`` of it
    (more updates at the same speed). None when no measured size qualifies."""
    import math

    fits = [r for r in results if low <= r.batch_size <= high
            and math.ceil(train_n / r.batch_size) * epochs >= min_updates]
    if not fits:
        return None
    best = max(r.tokens_per_s for r in fits)
    pick = min((r for r in fits if r.tokens_per_s >= (1 - tolerance) * best), key=lambda r: r.batch_size)
    table = ", ".join(f"{r.batch_size}: {r.tokens_per_s:.0f}" for r in results)
    return pick.batch_size, (f"measured training tokens/s by batch size here ({table}); of the sizes that keep at "
                             f"least {min_updates} optimizer steps, batch {pick.batch_size} is the fastest or the "
                             f"smallest within {tolerance:.0%} of it ({math.ceil(train_n / pick.batch_size)} steps "
                             f"per epoch x {epochs:g})")
