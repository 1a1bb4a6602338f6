"""`train.mixed_precision: auto` on a CPU, decided by timing the run's own training steps in each precision.

A linear-layer probe is not the run: on a 2-core Xeon with AMX a 512x512 bf16 linear ran at twice the
fp32 speed, yet training SmolLM2-135M with LoRA under bf16 ran at half the fp32 speed (attention's
backward pass, casts of the activations around every adapter). So ``auto`` builds the run's model
once per precision, times a few forward + backward passes on the run's first micro-batches, and
takes bf16 only if it is at least ``MIN_SPEEDUP`` faster. The answer is cached per machine, model,
method and batch shape (``$FEWTUNE_CACHE/precision.json``), so only the first run pays the probe.

The probe leaves no trace in the run: the random states are restored after it, so a run trains the
same whether its choice came from the cache or from a fresh measurement.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from fewtune.train import runtime

log = logging.getLogger(__name__)

from fewtune.precision import (CACHE_FILE, LINEAR_FLOOR, MIN_SPEEDUP, Decision, cache_key, machine_id,  # noqa: F401
                               read_cache, write_cache)
from fewtune import precision as _precision

PROBE_STEPS = 3  # micro-batches timed per precision; the first is a warm-up and not counted


def _cache_path() -> Path:
    return _precision._cache_path()


def decide(time_steps: Callable[[str], float], key: str, cache: Path | None = None,
           timed: str = "a training step") -> Decision:
    """:func:`fewtune.precision.decide` for a training run (the linear probe and the threshold as this
    module and fewtune.train.runtime hold them at the time of the call)."""
    return _precision.decide(time_steps, key, cache or _cache_path(), timed, linear=runtime.cpu_bf16_speedup,
                             min_speedup=MIN_SPEEDUP)


class RandomStates:
    """Saves Python's, NumPy's and torch's random states on entry and puts them back on exit."""

    def __enter__(self):
        import numpy as np

        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        return self

    def __exit__(self, *exc):
        import numpy as np

        py, npy, pt = self.states
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(pt)
        return False


def time_training_steps(build_loss_module: Callable[[str], tuple], batches: list, precision: str,
                        steps: int = PROBE_STEPS) -> float:
    """Median seconds of a forward + backward pass over ``batches`` (the first untimed) with the loss module
    ``build_loss_module(precision)`` returns as (loss_module, make_batch); no optimizer step is taken."""
    loss_module, make_batch = build_loss_module(precision)
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    times = []
    loss_module.train()
    try:
        for items in batches[:steps]:
            batch = make_batch(items)
            start = time.perf_counter()
            with context():
                loss, _ = loss_module(**batch)
            loss.backward()
            times.append(time.perf_counter() - start)
            loss_module.zero_grad(set_to_none=True)
    finally:
        del loss_module
    timed = times[1:] or times
    return statistics.median(timed)
