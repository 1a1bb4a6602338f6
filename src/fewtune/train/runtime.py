"""How a run uses the machine: mixed precision, CPU threads, fp32 master weights, checkpointing.

Mixed precision on a CPU is chosen by measurement, not by name: bfloat16 helps only where
the CPU has bf16 matrix instructions (AVX-512 BF16, AMX) and PyTorch's kernels use them.
Elsewhere bf16 matrix products fall back to slow generic kernels (an AVX2-only AMD EPYC:
a bf16 linear layer ran at about a fifth of the fp32 speed, a square bf16 matmul at 1/100;
oneDNN refuses bf16 there outright). A training run decides ``auto`` by timing its own steps in
both precisions (fewtune.train.precision_probe); the small linear-layer probe here rules bf16 out
cheaply where it is hopeless, and decides for launches of several processes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BF16_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this factor on the probe to be chosen on CPU

# the linear-layer probe and FEWTUNE_MIXED_PRECISION live in fewtune.precision (inference reads them too,
# without the training package); runtime's functions call them through these names
from fewtune.precision import PRECISION_ENV, _ENV_VALUES, _PROBE, _linear_seconds, cpu_bf16_speedup, forced_precision  # noqa: E402,F401


def resolve_mixed_precision(setting: str, cpu: bool | None = None) -> str:
    """'auto' -> 'bf16', 'fp16' or 'no' for this machine (or as FEWTUNE_MIXED_PRECISION forces); other
    settings pass through (checked)."""
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    if setting == "auto" and (forced := forced_precision()) is not None:
        log.info("mixed precision auto: %s=%s forces %s", PRECISION_ENV, os.environ[PRECISION_ENV],
                 "fp32" if forced == "no" else forced)
        setting = forced
    if setting == "fp16" and cpu:
        raise ValueError("train.mixed_precision=fp16 needs a GPU; on a CPU use bf16 or no")
    if setting != "auto":
        return setting
    if not cpu:
        # fp16 needs loss scaling (accelerate's GradScaler); bf16 does not, so it wins where supported
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    speedup = cpu_bf16_speedup()
    choice = "bf16" if speedup >= BF16_MIN_SPEEDUP else "no"
    log.info("mixed precision auto on CPU: bf16 matmul runs %.2fx the speed of fp32 -> %s", speedup,
             "bf16" if choice == "bf16" else "fp32")
    return choice


def reset_accelerate_precision(precision: str) -> None:
    """Let a single-process run use its own precision after an earlier run in this process used another.

    accelerate keeps one mixed-precision setting per process and refuses a second one; a Python user
    training twice (a sweep, a notebook, the test suite) with different precisions would hit that.
    """
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, precision):
        AcceleratorState._reset_state(True)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(num_threads: int | None, processes_on_this_machine: int = 1) -> int:
    """CPU threads for this process: as configured, else the cores this process may use / processes here.

    Launchers (torchrun, accelerate launch) set OMP_NUM_THREADS=1 for every process, which
    leaves most cores idle when there are fewer processes than cores.
    """
    n = num_threads or max(1, available_cores() // max(processes_on_this_machine, 1))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the cores this process may run on, CPU seconds of this process) so far; None where
    /proc is missing. Cores outside the process's affinity do not count: what runs there takes nothing from us."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except (OSError, AttributeError):
        return None
    busy = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in allowed:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
            busy += user + nice + system + irq + softirq + steal
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


class ThreadGovernor:
    """Fewer threads while other processes use part of the CPU, all of them again once they stop.

    PyTorch's OpenMP threads wait for each other at the end of every parallel operation, spinning
    for a while before they sleep. With as many threads as cores, a second busy process takes a core
    away from one of them, and every operation then waits for the thread that is off its core: on 2
    cores a LoRA step went from 1.6 to 6.4 s next to a single busy loop (4x for half the CPU). Every
    ``interval_s`` at a step boundary this measures how many of its cores the other processes used (their
    busy time in /proc/stat less this process's own) and trains on the cores left.
    """

    def __init__(self, threads: int, interval_s: float = 5.0, reserve: float = 0.6, clock=time.monotonic):
        self.max_threads, self.threads, self.interval_s, self.reserve = threads, threads, interval_s, reserve
        self.cores, self.clock = available_cores(), clock
        self.last = _cpu_seconds()
        self.last_wall = clock()
        self.changes: list[tuple[float, int]] = []  # (others' cores, threads) at each change

    @property
    def active(self) -> bool:
        return self.max_threads > 1 and self.last is not None

    def others_cores(self, now: tuple[float, float], wall: float) -> float:
        busy, own = now[0] - self.last[0], now[1] - self.last[1]
        return max(0.0, busy - own) / max(wall - self.last_wall, 1e-9)

    def target(self, others: float) -> int:
        """Threads for the cores the other processes leave: they count once they use more than 1 - reserve
        of a core (``reserve`` 0.6: 0.4 of a core is background noise; half a core is a competitor)."""
        return max(1, min(self.max_threads, self.cores - math.floor(others + self.reserve)))

    def after_step(self) -> int:
        """Called at each step boundary; returns the threads in use."""
        wall = self.clock()
        if not self.active or wall - self.last_wall < self.interval_s:
            return self.threads
        now = _cpu_seconds()
        if now is None:
            return self.threads
        others = self.others_cores(now, wall)
        self.last, self.last_wall = now, wall
        wanted = self.target(others)
        if wanted != self.threads:
            log.info("other processes used %.1f of %d cores over the last %.0f s: %d CPU thread%s now", others,
                     self.cores, self.interval_s, wanted, "" if wanted == 1 else "s")
            torch.set_num_threads(wanted)
            self.threads = wanted
            self.changes.append((round(others, 2), wanted))
        return self.threads


def keep_trainable_fp32(model) -> int:
    """Trainable parameters in float32 (optimizer state follows them); returns how many were cast.

    The frozen weights may be bf16/fp16 (``model.dtype``); autocast runs the matrix products
    in the low precision, while updates accumulate in float32, where small steps are not lost.
    """
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast


LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def store_frozen_low_precision(model, precision: str) -> int:
    """Frozen floating-point weights stored once in the run's low precision (bf16/fp16); returns how many.

    Under autocast a float32 weight is cast to bf16 at every use, every step, and the copies cost memory
    traffic; a frozen weight never changes, so it can be cast once. Trainable weights (and with them the
    optimizer state) stay float32. (The training loop skips this when model.dtype is set: those weights stay
    as the user asked.)
    """
    dtype = LOW_DTYPES.get(precision)
    if dtype is None:
        return 0
    cast = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype == torch.float32:
            p.data = p.data.to(dtype)
            cast += 1
    return cast


def _cast_unless_autocast(layer, x, dtype):
    """peft's input cast, skipped while autocast runs the layer (autocast casts for the product itself)."""
    if x is not None and torch.is_autocast_enabled(x.device.type):
        return x
    return type(layer)._cast_input_dtype(layer, x, dtype)


def skip_adapter_input_casts(model) -> int:
    """peft casts each adapter's input to the adapter's dtype (bf16 activations to float32) before the
    adapter's matrix products, which autocast then casts back to bf16: two copies of the activations per
    adapted layer and step for nothing. Those casts are skipped while autocast is on (outside it, for
    generation or merging, they happen as before). Returns the layers changed."""
    import types

    changed = 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled") and hasattr(type(module), "_cast_input_dtype"):
            module._cast_input_dtype = types.MethodType(_cast_unless_autocast, module)
            changed += 1
    return changed


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing")
    if hasattr(base, "activation_checkpointing_enable"):  # the name since transformers 5.x
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def run_precision(setting: str, checkpoints: list, resume: bool, measure=None) -> str:
    """The run's mixed precision. A resumed ``auto`` run keeps what its first session chose (``checkpoints``:
    the run's checkpoint folders, newest first): the probe behind ``auto`` is a timing, and a busy machine
    could tip it the other way halfway through a run. ``measure()``, when given, decides ``auto`` for a
    single process on a CPU by timing the run's own steps (fewtune.train.precision_probe); otherwise the
    linear-layer probe decides. ValueError for a setting this machine cannot run."""
    import json

    if setting == "auto" and resume and forced_precision() is None:
        for folder in checkpoints:
            try:
                chosen = json.loads((folder / "loop.json").read_text()).get("mixed_precision")
            except (OSError, ValueError):
                continue
            if chosen:
                log.info("mixed precision auto: %s, as the run's first session chose", chosen)
                return chosen
    single_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) == 1
    if setting == "auto" and measure is not None and forced_precision() is None and single_cpu:
        return measure()
    return resolve_mixed_precision(setting)


def make_accelerator(precision: str, num_threads: int | None):
    """accelerate's Accelerator for this launch: the processes torchrun/accelerate started, this precision,
    and on a CPU the threads each process should use. ValueError when the launch and accelerate disagree."""
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched == 1:
        reset_accelerate_precision(precision)
    # without cpu=True accelerate sees no distributed setup on a machine without GPUs, and
    # torchrun's processes would each train alone on all the data, into the same folder
    accelerator = Accelerator(mixed_precision=precision, cpu=launched > 1 and not torch.cuda.is_available())
    for kind in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{kind}", "").lower() == "true" and accelerator.distributed_type.value != kind:
            log.warning("the accelerate config asks for %s but this run is %s (accelerate uses %s with GPUs only)",
                        kind, accelerator.distributed_type.value, kind)
    if accelerator.num_processes != launched:
        raise ValueError(f"launched as {launched} processes but accelerate set up {accelerator.num_processes}: "
                         "check the launcher and its environment")
    if accelerator.device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        threads = configure_threads(num_threads, local)
        log.info("CPU threads per process: %d (mixed precision: %s)", threads, accelerator.mixed_precision)
    return accelerator
