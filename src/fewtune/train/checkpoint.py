"""Checkpoints that resume exactly and are never half-written.

A checkpoint is a folder (trainable weights, optimizer, scheduler, RNG states, loop
position) written under a temporary name and renamed into place; the ``latest`` file
that names it is replaced atomically afterwards. A crash at any moment leaves ``latest``
pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(weights: dict[str, torch.Tensor], folder: Path) -> None:
    """Write trainable weights into a folder atomically (used for `best/` too)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "trainable.safetensors")
    _replace_dir(tmp, folder)


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "trainable.safetensors")


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], optimizer, scheduler,
                    loop_state: dict, keep: int) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=root))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "state.pt")
        (tmp / "loop.json").write_text(json.dumps(loop_state, indent=2))
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name)
    # keep the newest `keep` checkpoints; stray temporary folders from a crash go too
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and ".tmp-" not in p.name)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stray in root.glob("*.tmp-*"):
        shutil.rmtree(stray, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    folder = run_dir / "checkpoints" / pointer.read_text().strip()
    return folder if (folder / "loop.json").exists() else None


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    weights = load_file(folder / "trainable.safetensors")
    state = torch.load(folder / "state.pt", weights_only=False)  # our own file: optimizer + RNG objects
    loop_state = json.loads((folder / "loop.json").read_text())
    return weights, state, loop_state
