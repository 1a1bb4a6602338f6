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

import hashlib
import json
import logging
import platform
import random
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from fewtune.train import runtime

log = logging.getLogger(__name__)

MIN_SPEEDUP = 1.1  # bf16 steps must be this much faster than fp32 ones to be chosen
LINEAR_FLOOR = 0.8  # below this linear-probe ratio bf16 is hopeless here: no step is timed (AVX2 machines: ~0.2)
PROBE_STEPS = 3  # micro-batches timed per precision; the first is a warm-up and not counted
CACHE_FILE = "precision.json"


@dataclass
class Decision:
    chosen: str  # "bf16" or "no"
    how: str  # "measured", "cached" or "linear probe"
    fp32_s: float | None = None  # median seconds of a timed forward + backward pass
    bf16_s: float | None = None
    linear_speedup: float | None = None
    timed: str = "a training step"  # what the two timings are of (inference times a forward pass)

    @property
    def speedup(self) -> float | None:
        return self.fp32_s / self.bf16_s if self.fp32_s and self.bf16_s else None

    def describe(self) -> str:
        name = "bf16" if self.chosen == "bf16" else "fp32"
        if self.how == "linear probe":
            return (f"{name}: a bf16 linear layer runs {self.linear_speedup:.2f}x the fp32 speed here, so nothing "
                    "was timed")
        timed = (f"{self.timed} took {self.fp32_s:.3f} s in fp32 and {self.bf16_s:.3f} s in bf16 "
                 f"({self.speedup:.2f}x; bf16 needs {MIN_SPEEDUP:.2f}x)")
        scope = "model, method and batch size" if self.timed == "a training step" else "model"
        return f"{name}: {timed}" + (f" (measured earlier on this machine for this {scope})"
                                   if self.how == "cached" else "")


def machine_id() -> str:
    """What makes timings comparable: the CPU model and its matrix instructions, the threads, torch."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "+".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "base"
    return f"{name}|{isa}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def cache_key(model: str, method: str, batch_size: int, packing: bool, share_prefix: bool,
              gradient_checkpointing: bool) -> str:
    parts = [machine_id(), model, method, f"batch={batch_size}", f"packing={packing}/{share_prefix}",
             f"checkpointing={gradient_checkpointing}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _cache_path() -> Path:
    from fewtune.models import cache_dir

    return cache_dir() / CACHE_FILE


def read_cache(path: Path | None = None) -> dict:
    path = path or _cache_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(key: str, decision: Decision, path: Path | None = None) -> None:
    """Best effort: a cache that cannot be written only means the next run measures again."""
    path = path or _cache_path()
    data = read_cache(path)
    data[key] = {**asdict(decision), "how": "measured", "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        tmp.replace(path)
    except OSError as err:
        log.debug("precision cache not written (%s): %s", path, err)


def decide(time_steps: Callable[[str], float], key: str, cache: Path | None = None,
           timed: str = "a training step") -> Decision:
    """bf16 or fp32 ("no"): from the cache, else from ``time_steps(precision)`` (seconds of one timed pass:
    ``timed`` says of what), unless a bf16 linear layer is far slower than fp32 here."""
    cached = read_cache(cache).get(key)
    if isinstance(cached, dict) and cached.get("chosen") in ("bf16", "no"):
        return Decision(cached["chosen"], "cached", cached.get("fp32_s"), cached.get("bf16_s"),
                        cached.get("linear_speedup"), timed)
    linear = runtime.cpu_bf16_speedup()
    if linear < LINEAR_FLOOR:
        return Decision("no", "linear probe", linear_speedup=linear, timed=timed)
    log.info("precision auto: timing %s in fp32 and in bf16 (once per machine and model%s)", timed,
             ", method and batch shape" if timed == "a training step" else "")
    fp32_s, bf16_s = time_steps("no"), time_steps("bf16")
    chosen = "bf16" if fp32_s / bf16_s >= MIN_SPEEDUP else "no"
    decision = Decision(chosen, "measured", fp32_s, bf16_s, linear, timed)
    write_cache(key, decision, cache)
    return decision


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
