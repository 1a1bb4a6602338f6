"""How a run uses the machine: mixed precision, CPU threads, fp32 master weights, checkpointing.

Mixed precision on a CPU is chosen by measurement, not by name: bfloat16 helps only where
the CPU has bf16 matrix instructions (AVX-512 BF16, AMX) and PyTorch's kernels use them.
Elsewhere a bf16 matrix product is emulated and can be 10-100x slower than float32 (an
AVX2-only AMD EPYC measured 0.95 GFLOP/s in bf16 against 180 in fp32). So ``auto`` times a
small matrix product both ways and picks bf16 only when it is clearly faster.
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger(__name__)

_PROBE: dict[str, float] = {}
BF16_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this factor on the probe to be chosen on CPU


def _matmul_seconds(dtype: torch.dtype, size: int = 256, reps: int = 3) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: kernel selection, allocation
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return best


def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a 256x256 matrix product on this CPU (measured once per process)."""
    if "bf16" not in _PROBE:
        _PROBE["bf16"] = _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)
    return _PROBE["bf16"]


def resolve_mixed_precision(setting: str, cpu: bool | None = None) -> str:
    """'auto' -> 'bf16', 'fp16' or 'no' for this machine; other settings pass through (checked)."""
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
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


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing")
    if hasattr(base, "activation_checkpointing_enable"):  # the name since transformers 5.x
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
