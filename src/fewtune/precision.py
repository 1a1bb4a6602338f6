"""Choosing between bf16 and fp32 by measurement: what training (fewtune.train) and inference
(fewtune.inference_precision) share, kept out of the training package so that loading a model for
generation does not import it.

- ``FEWTUNE_MIXED_PRECISION=no|bf16|fp16`` forces what ``auto`` picks, for every command;
- :func:`cpu_bf16_speedup` times a small linear layer in both precisions: where bf16 runs far slower
  (AVX2-only CPUs, ~0.2x) nothing else is timed;
- :func:`decide` times the real work in both precisions (training steps, forward passes) and caches
  the answer per machine and key in ``$FEWTUNE_CACHE/precision.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_PROBE: dict[str, float] = {}


def _linear_seconds(autocast_bf16: bool, rows: int = 256, size: int = 512, reps: int = 3) -> float:
    """Best time of the operation training runs most: a linear layer, fp32 or under bf16 autocast."""
    x = torch.randn(rows, size)
    w = torch.randn(size, size)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else nullcontext()
    best = float("inf")
    with context:
        F.linear(x, w)  # warm-up: kernel selection, allocation
        for _ in range(reps):
            start = time.perf_counter()
            F.linear(x, w)
            best = min(best, time.perf_counter() - start)
    return best


def cpu_bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of a 256x512x512 linear layer on this CPU (measured once per process)."""
    if "bf16" not in _PROBE:
        _PROBE["bf16"] = _linear_seconds(False) / _linear_seconds(True)
    return _PROBE["bf16"]


# `auto` obeys this variable when it is set: a developer on an AVX2 machine can run everything as an AMX
# machine would (bf16), and the other way round; CI runs the precision-sensitive tests under both
PRECISION_ENV = "FEWTUNE_MIXED_PRECISION"
_ENV_VALUES = {"no": "no", "fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def forced_precision() -> str | None:
    """The precision FEWTUNE_MIXED_PRECISION forces on ``auto`` ('no', 'bf16', 'fp16'), or None when unset."""
    raw = os.environ.get(PRECISION_ENV, "").strip().lower()
    if not raw or raw == "auto":
        return None
    if raw not in _ENV_VALUES:
        raise ValueError(f"{PRECISION_ENV}={raw!r} is not a precision: use one of no, fp32, bf16, fp16 (or unset it)")
    return _ENV_VALUES[raw]


MIN_SPEEDUP = 1.1  # bf16 steps must be this much faster than fp32 ones to be chosen
LINEAR_FLOOR = 0.8  # below this linear-probe ratio bf16 is hopeless here: no step is timed (AVX2 machines: ~0.2)
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
           timed: str = "a training step", linear: Callable[[], float] | None = None,
           min_speedup: float | None = None) -> Decision:
    """bf16 or fp32 ("no"): from the cache, else from ``time_steps(precision)`` (seconds of one timed pass:
    ``timed`` says of what), unless a bf16 linear layer (``linear()``, default :func:`cpu_bf16_speedup`) is far
    slower than fp32 here. bf16 needs ``min_speedup`` (default MIN_SPEEDUP)."""
    min_speedup = MIN_SPEEDUP if min_speedup is None else min_speedup
    cached = read_cache(cache).get(key)
    if isinstance(cached, dict) and cached.get("chosen") in ("bf16", "no"):
        return Decision(cached["chosen"], "cached", cached.get("fp32_s"), cached.get("bf16_s"),
                        cached.get("linear_speedup"), timed)
    linear = (linear or cpu_bf16_speedup)()
    if linear < LINEAR_FLOOR:
        return Decision("no", "linear probe", linear_speedup=linear, timed=timed)
    log.info("precision auto: timing %s in fp32 and in bf16 (once per machine and model%s)", timed,
             ", method and batch shape" if timed == "a training step" else "")
    fp32_s, bf16_s = time_steps("no"), time_steps("bf16")
    chosen = "bf16" if fp32_s / bf16_s >= min_speedup else "no"
    decision = Decision(chosen, "measured", fp32_s, bf16_s, linear, timed)
    write_cache(key, decision, cache)
    return decision
