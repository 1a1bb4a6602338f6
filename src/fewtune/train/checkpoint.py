"""Checkpoints that resume exactly and are never half-written.

A checkpoint is a folder written under a temporary name and renamed into place; the ``latest``
file that names it is replaced atomically afterwards. A crash at any moment leaves ``latest``
pointing at a complete checkpoint.

accelerate's ``save_state`` writes what accelerate knows how to save: the optimizer
(``optimizer.bin``), the learning-rate schedule (``custom_checkpoint_0.pkl``, registered with
``register_for_checkpointing``), fp16's loss scaler (``scaler.pt``) and the random states of every
process (``random_states_<i>.pkl``). Its save hook writes ``trainable.safetensors`` (the weights
that train, e.g. LoRA's) in place of its full-model file: the frozen base is the base model's own
files, and for LoRA on an 8B model accelerate's file would add 16 GB of them. ``loop.json`` is the
loop position. ``load_state`` reads it all back, the trainable weights through its load hook.
Every process takes part in both; the main one completes the folder once all have written.

Each checkpoint carries ``manifest.json`` (size and SHA-256 of every file in it), so a
folder damaged afterwards (half copied to another machine, a zero-byte file, a flipped
byte) is found on resume, and the newest intact checkpoint is used instead, with a warning.
A full disk while saving leaves the previous checkpoint as ``latest`` and says how much
space a checkpoint needs.

accelerate's rotation (``ProjectConfiguration(total_limit=...)``) does not serve: it deletes the oldest
checkpoint before the new one is written, and its load_state takes the highest-numbered folder unchecked.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fewtune.files import atomic_write_text, file_sha256

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINABLE = "trainable.safetensors"
LOOP = "loop.json"
# a single-process checkpoint's files (accelerate's names; more processes add random_states_1.pkl, ...)
FILES = (TRAINABLE, "optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl", LOOP)
# before accelerate wrote the state: optimizer, schedule and the main process's random states in one file
LEGACY_STATE = "state.pt"
LEGACY_FILES = (TRAINABLE, LEGACY_STATE, LOOP)


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
        # written before manifests existed: a complete one has every file, each non-empty (best/: the weights)
        expected = (LEGACY_FILES if (folder / LEGACY_STATE).exists() else FILES if (folder / LOOP).exists()
                    else (TRAINABLE,))
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


def _cpu(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in weights.items()}


def save_weights(weights: dict[str, torch.Tensor], folder: Path) -> None:
    """Write trainable weights into a folder atomically (used for `best/` too)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        save_file(_cpu(weights), tmp / TRAINABLE)
        _write_manifest(tmp)
        _replace_dir(tmp, folder)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise _space_error(err, f"the best weights ({folder.name}/)", folder.parent, _state_bytes(weights),
                               None) from err
        raise


RANKED = "best-ranked"


def ranked_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / RANKED / f"step-{step:07d}"


def keep_ranked(run_dir: Path, ranked: list[dict], weights: dict[str, torch.Tensor] | None, step: int) -> None:
    """best-ranked/ after an evaluation: this step's weights written when it entered the ranking (``weights``),
    then every folder the ranking no longer names removed (also those a resume from an earlier checkpoint left
    behind), and ranking.json rewritten, best first."""
    root = Path(run_dir) / RANKED
    if weights is not None:
        save_weights(weights, ranked_folder(run_dir, step))
    if not root.is_dir():
        return
    kept = {ranked_folder(run_dir, e["step"]).name for e in ranked}
    for folder in root.iterdir():
        if folder.is_dir() and folder.name not in kept:
            shutil.rmtree(folder, ignore_errors=True)
    atomic_write_text(root / "ranking.json", json.dumps(ranked, indent=1))


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / TRAINABLE)


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _together(accelerator, error: BaseException | None) -> None:
    """Called by every process at the same point: re-raises this process's error, or fails because another
    process failed, so that no process waits forever at a later barrier for one that gave up."""
    failed = error is not None
    if accelerator.num_processes > 1:
        failed = bool(accelerator.reduce(torch.tensor(int(failed), device=accelerator.device), "max").item())
    if error is not None:
        raise error
    if failed:
        raise CheckpointError("another process failed while writing the checkpoint (its error says why)")


def _stage(accelerator, work: Callable[[], None]) -> None:
    error = None
    try:
        work()
    except BaseException as err:  # (re-raised by _together, once every process knows)
        error = err
    _together(accelerator, error)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def save_checkpoint(accelerator, run_dir: Path, step: int, trainable: Callable[[], dict[str, torch.Tensor]],
                    loop_state: dict, keep: int) -> Path:
    """Write checkpoint ``step-<step>``, point ``latest`` at it and keep the newest ``keep``; every process
    calls this at the same step. ``trainable``: the trainable weights (called on the main process)."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f"{final.name}.tmp-save"  # one name that every process knows
    main = accelerator.is_main_process
    pointer = root / "latest"
    previous = pointer.read_text().strip() if pointer.exists() else None

    def prepare() -> None:
        if main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash: none of its files may enter this one

    def write_trainable(models, model_states, output_dir) -> None:
        model_states.clear()  # accelerate writes no full-model file
        if main:
            save_file(_cpu(trainable()), Path(output_dir) / TRAINABLE)

    def write() -> None:
        handle = accelerator.register_save_state_pre_hook(write_trainable)
        try:
            accelerator.save_state(str(tmp))
        finally:
            handle.remove()
        if main:
            (tmp / LOOP).write_text(json.dumps(loop_state, indent=2))

    def complete() -> None:  # once every process has written its files
        if not main:
            return
        _write_manifest(tmp)
        _replace_dir(tmp, final)
        atomic_write_text(pointer, final.name)
        # keep the newest `keep` checkpoints; stray temporary folders from a crash go too
        done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and ".tmp-" not in p.name)
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stray in root.glob("*.tmp-*"):
            shutil.rmtree(stray, ignore_errors=True)

    try:
        for stage in (prepare, write, complete):
            _stage(accelerator, stage)
    except BaseException as err:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            # the previous checkpoint's size, else the weights and Adam's two moments of each
            need = (_folder_bytes(root / previous) if previous and (root / previous).is_dir()
                    else 3 * _state_bytes(trainable()) + (1 << 16))
            raise _space_error(err, f"checkpoint {final.name}", root, need, previous) from err
        raise
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


def read_loop_state(folder: Path) -> dict:
    """The loop position a checkpoint saved (and the run's inputs then), before anything is restored."""
    return json.loads((folder / LOOP).read_text())


def restore(accelerator, folder: Path, load_trainable: Callable[[dict[str, torch.Tensor]], None], optimizer,
            scheduler) -> None:
    """Put a checkpoint's trainable weights, optimizer, schedule and random states back; every process calls
    this. ``optimizer`` and ``scheduler`` are needed for a checkpoint in the format before accelerate's."""
    if (folder / LEGACY_STATE).exists():
        _restore_legacy(folder, load_trainable, optimizer, scheduler)
        return
    rng = folder / f"random_states_{accelerator.process_index}.pkl"
    if not rng.exists():  # accelerate would go on quietly
        log.warning("checkpoint %s has no random state for process %d (it was written by fewer processes): "
                    "the run will not continue exactly as an uninterrupted one would", folder.name,
                    accelerator.process_index)

    def read_trainable(models, input_dir) -> None:
        models.clear()  # there is no full-model file to load: the trainable weights are ours
        load_trainable(load_file(Path(input_dir) / TRAINABLE))

    handle = accelerator.register_load_state_pre_hook(read_trainable)
    try:
        accelerator.load_state(str(folder))
    finally:
        handle.remove()


def _restore_legacy(folder: Path, load_trainable, optimizer, scheduler) -> None:
    """A checkpoint from before accelerate wrote the state: state.pt held the optimizer, the schedule and the
    main process's random states (which every process took)."""
    state = torch.load(folder / LEGACY_STATE, weights_only=False)  # our own file: optimizer + RNG objects
    load_trainable(load_file(folder / TRAINABLE))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
