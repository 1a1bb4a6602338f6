"""What every benchmark prints about the machine, and how it rewrites a results file.

The CPU kind decides which precision is fast (AVX2-only machines have no native bf16; Intel Xeons
with AVX-512 BF16 and AMX run bf16 matrix products about 3x fp32), so each table says which kind
made it. Results files keep the notes written by hand below a marker line when a benchmark
rewrites its table above it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_kind(cores: bool = True) -> str:
    """'<model name> (amx_bf16, avx512_bf16), 2 cores' or '... (AVX2 only, no native bf16), 2 cores'."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = [f for f in BF16_FLAGS if f in cpu_flags()]
    kind = f"{name} ({', '.join(bf16) if bf16 else 'AVX2 only, no native bf16'})"
    return f"{kind}, {len(os.sched_getaffinity(0))} cores" if cores else kind


def write_keeping_notes(path: Path, generated: str, marker: str) -> None:
    """Write ``generated`` to ``path``, then the marker line and whatever followed it in the old file."""
    notes = ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if marker in old:
            notes = old[old.index(marker) + len(marker):]
    path.write_text(generated.rstrip("\n") + "\n\n" + marker + (notes if notes else "\n"), encoding="utf-8")
