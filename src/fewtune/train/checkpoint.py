"""Checkpoints that resume exactly and are never half-written.

A checkpoint is a folder (trainable weights, optimizer, scheduler, RNG states, loop
position) written under a temporary name and renamed into place; the ``latest`` file
that names it is replaced atomically afterwards. A crash at any moment leaves ``latest``
pointing at a complete checkpoint.

Each checkpoint carries ``manifest.json`` (size and SHA-256 of every file in it), so a
folder damaged afterwards (half copied to another machine, a zero-byte file, a flipped
byte) is found on resume, and the newest intact checkpoint is used instead, with a warning.
A full disk while saving leaves the previous checkpoint as ``latest`` and says how much
space a checkpoint needs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fewtune.files import atomic_write_text, file_sha256

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FILES = ("trainable.safetensors", "state.pt", "loop.json")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written (disk full) or read (damaged), worded for the user."""


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def verify(folder: Path) -> str | None:
    """None when the folder matches its manifest, else what is wrong (the first damaged file)."""
    if not folder.is_dir():
        return "the folder is missing"
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        # written before manifests existed: a complete one has every file, each non-empty
        expected = FILES if (folder / "loop.json").exists() or (folder / "state.pt").exists() else FILES[:1]
        missing = [name for name in expected if not (folder / name).is_file() or (folder / name).stat().st_size == 0]
        return f"{missing[0]} is missing or empty" if missing else None
    try:
        manifest = json.loads(manifest_path.read_text())
        items = manifest.items()
    except (ValueError, AttributeError, OSError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, expected in items:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("bytes"):
            return f"{name} has {size} bytes, {expected.get('bytes')} were written"
        if file_sha256(path) != expected.get("sha256"):
            return f"{name} does not match its checksum (changed after it was written)"
    return None


def _space_error(err: OSError, what: str, folder: Path, need: int, kept: str | None) -> CheckpointError:
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    previous = f"the previous checkpoint {kept} is still the latest" if kept else "no earlier checkpoint exists"
    return CheckpointError(
        f"no space left on the device while writing {what} in {folder}: it needs about {_size(need)} "
        f"and {_size(free)} are free; {previous}. Free some space, then resume "
        f"(fewtune train --resume {folder.parent if folder.name in ('checkpoints', 'best') else folder})")


def _size(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _state_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state: what a checkpoint of it needs on disk, roughly."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


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
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "trainable.safetensors")
        _write_manifest(tmp)
        _replace_dir(tmp, folder)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise _space_error(err, f"the best weights ({folder.name}/)", folder.parent, _state_bytes(weights),
                               None) from err
        raise


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
    previous = (root / "latest").read_text().strip() if (root / "latest").exists() else None
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=root))
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "trainable.safetensors")
        torch.save(state, tmp / "state.pt")
        (tmp / "loop.json").write_text(json.dumps(loop_state, indent=2))
        _write_manifest(tmp)
        _replace_dir(tmp, final)
        atomic_write_text(root / "latest", final.name)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            need = _state_bytes(weights) + _state_bytes(state) + (1 << 16)
            raise _space_error(err, f"checkpoint {final.name}", root, need, previous) from err
        raise
    # keep the newest `keep` checkpoints; stray temporary folders from a crash go too
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and ".tmp-" not in p.name)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stray in root.glob("*.tmp-*"):
        shutil.rmtree(stray, ignore_errors=True)
    return final


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """The checkpoint ``latest`` names, then the other complete-looking ones, newest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and ".tmp-" not in p.name
                   and not p.name.endswith(".old")), reverse=True)
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.exists() else None
    if named is not None:
        done = [named] + [p for p in done if p != named]
    return done


def newest_intact_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files match their checksums; warns about each damaged one it skips.

    None when the run has no checkpoint at all; CheckpointError when it has some and all are damaged.
    """
    candidates = checkpoints_newest_first(run_dir)
    damaged: list[str] = []
    for folder in candidates:
        problem = verify(folder)
        if problem is None:
            if damaged:
                log.warning("checkpoint %s is damaged; resuming from the previous good one, %s",
                            damaged[0].split(":")[0], folder.name)
            return folder
        damaged.append(f"{folder.name}: {problem}")
        log.warning("checkpoint %s", damaged[-1].replace(": ", " is damaged: ", 1))
    if candidates:
        raise CheckpointError(f"every checkpoint in {run_dir / 'checkpoints'} is damaged ({'; '.join(damaged)}): "
                              "nothing to resume from. Start the run again without --resume")
    return None


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    weights = load_file(folder / "trainable.safetensors")
    state = torch.load(folder / "state.pt", weights_only=False)  # our own file: optimizer + RNG objects
    loop_state = json.loads((folder / "loop.json").read_text())
    return weights, state, loop_state
