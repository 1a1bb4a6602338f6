"""What a run was trained from, recorded in every checkpoint so a resume cannot mix two runs.

A resumed run must continue the same training: same data, same model, same training keys.
The checkpoint stores a SHA-256 of each data file, of the rendered examples (which also
covers the tokenizer, template and max_length), a cheap fingerprint of the model's files,
and the resolved config. ``changes`` lists what differs now, worded for the user; the
trainer refuses to resume on any of them unless forced.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from fewtune.config import Config, dotted_keys, moved_key
from fewtune.files import file_sha256

# keys that may differ on resume without changing what the finished run means: where it is written,
# how long it goes on (extending a run is what resume is for), how often it logs and saves, threads, and the
# eval keys that only `fewtune eval`, `compare` and `pseudo-label` read
RESUME_MAY_CHANGE = ("train.output_dir", "train.resume", "train.max_steps", "train.epochs", "train.log_every",
                     "train.num_threads", "train.adapt_threads", "train.save_every", "train.keep_checkpoints",
                     "train.keep_best",
                     "train.cache_tokenized", "train.report_to", "train.tracking_dir", "train.experiment",
                     "eval.early_stopping.", "generate.", "eval.limit", "eval.batch_size", "eval.window",
                     "eval.format", "eval.system_prompt", "eval.general", "eval.general_limit", "eval.n_resamples",
                     "eval.show")
# paths are compared by the content they point to, not by how they are spelt
FILE_KEYS = ("data.train", "data.validation", "data.replay.general", "regularise.ewc.general")
EDGE_BYTES = 1 << 20  # of each weight file's start and end: enough to tell two checkpoints apart, cheap for 8B


def model_fingerprint(name: str) -> str:
    """The model's config and weight files (names, sizes, first and last MiB); a hub id stands for itself."""
    from fewtune.models import EMBEDDED, resolve_model_path

    path = Path(name).expanduser()
    if name not in EMBEDDED and path.suffix != ".gguf" and not path.exists():
        return f"hub:{name}"  # the same whether it downloads or (offline) comes from the local hub cache
    try:
        folder = Path(resolve_model_path(name))
    except Exception:  # noqa: BLE001 - an unloadable model fails later with its own message
        return f"unresolved:{name}"
    if not folder.is_dir():
        return f"hub:{name}"
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "config.json" or path.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as fh:
                digest.update(fh.read(EDGE_BYTES))
                if size > 2 * EDGE_BYTES:
                    fh.seek(-EDGE_BYTES, 2)
                    digest.update(fh.read())
    return digest.hexdigest()


def rendered_hash(*sets) -> str:
    """Token ids and loss weights of every rendered example, and the bytes of the pictures a vision-language
    example shows (their token ids depend only on the picture's size: an edited picture would pass unseen)."""
    from fewtune.data.images import image_bytes

    digest = hashlib.sha256()
    pictures: dict[str, bytes] = {}  # one read per picture, however many examples show it
    for rendered_set in sets:
        digest.update(struct.pack("<q", len(rendered_set.items)))
        for item in rendered_set.items:
            digest.update(struct.pack(f"<q{len(item.input_ids)}q", len(item.input_ids), *item.input_ids))
            digest.update(struct.pack(f"<{len(item.loss_weights)}d", *item.loss_weights))
            for ref in getattr(item, "images", ()):
                if ref not in pictures:
                    pictures[ref] = hashlib.sha256(image_bytes(ref)).digest()
                digest.update(pictures[ref])
    return digest.hexdigest()


def run_inputs(cfg: Config, train_set, val_set) -> dict:
    flat = dotted_keys(cfg.model_dump(mode="json"))
    files = {key: file_sha256(Path(flat[key])) for key in FILE_KEYS if flat.get(key) and Path(flat[key]).is_file()}
    config = {k: v for k, v in flat.items()
              if k not in FILE_KEYS and k != "model.name" and not k.startswith(RESUME_MAY_CHANGE)}
    return {"files": files, "rendered": rendered_hash(train_set, val_set), "model": model_fingerprint(cfg.model.name),
            "model_name": cfg.model.name, "config": config}


def _current_keys(recorded: dict) -> dict:
    """A checkpoint's flat keys under their current names (a checkpoint from before a key moved), less those
    that may change now."""
    renamed = {moved_key(key) or key: value for key, value in recorded.items()}
    return {key: value for key, value in renamed.items() if not key.startswith(RESUME_MAY_CHANGE)}


def changes(saved: dict, now: dict) -> list[str]:
    """What differs between the inputs a checkpoint recorded and the current ones, one line each.

    Keys are compared under their current names (config.MOVED_KEYS); a key the checkpoint does not record was
    added since, and compares as its default."""
    found = []
    saved_files = _current_keys(saved.get("files", {}))
    for key in sorted(set(saved_files) | set(now["files"])):
        before, after = saved_files.get(key), now["files"].get(key)
        if before != after:
            found.append(f"{key}: the file's contents changed (sha256 {str(before)[:12]} -> {str(after)[:12]})")
    if saved.get("model") != now["model"]:
        found.append(f"model.name: the model changed ({saved.get('model_name')!r}, fingerprint "
                     f"{str(saved.get('model'))[:12]} -> {now['model_name']!r}, {now['model'][:12]})")
    old_config = _current_keys(saved.get("config", {}))
    defaults = dotted_keys(Config().model_dump(mode="json"))
    for key in sorted(set(old_config) | set(now["config"])):
        before = old_config.get(key, defaults.get(key))
        if before != now["config"].get(key):
            found.append(f"{key}: {before!r} -> {now['config'].get(key)!r}")
    if saved.get("rendered") != now["rendered"] and not found:
        found.append("the rendered training examples differ (tokenizer, template, data or a picture changed)")
    return found
