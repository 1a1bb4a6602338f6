"""Multi-stage training: a run that starts from the weights another run trained (``model.init_from``).

The usual chain is continued pretraining on raw domain text (``data.format: text``), then task SFT.
Stage 2 starts from stage 1 by **merging**: a weight adapter of stage 1 (LoRA, DoRA, IA3) is folded
into its base once and saved as a plain transformers folder (``STAGE1/merged``), and stage 2 trains
its own method on that folder as its base model. Merging rather than continuing stage 1's adapter:

- stage 2 is free to use another method, rank, target modules or learning rate, and its adapter
  starts at zero as any fresh adapter does, so the task training is the one `suggest` and `tune`
  reason about;
- what stage 1 learnt stays in the frozen base: stage 2's small adapter cannot wander off it the
  way continued training of the same adapter on 160 labelled examples can;
- the result is still standard: stage 2's ``adapter/`` is a peft adapter whose base is the merged
  folder, and ``export --merged`` / ``--gguf`` work on it unchanged.

A stage-1 run that trained the whole model (``full``) is used as it is (its ``model/`` folder);
prompt-learning runs (virtual tokens) cannot be merged and are refused. The merged folder carries a
digest of the adapter it came from and is rebuilt when the stage-1 run changed. Every run started
this way writes ``lineage.json``: the stages in order, each with its run, data, format and method.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from fewtune.config import Config

log = logging.getLogger(__name__)

MERGED = "merged"  # the folder inside a stage-1 run holding its adapter merged into its base
STAMP = "fewtune-merge.json"  # inside it: which adapter it was merged from
LINEAGE = "lineage.json"


class StageError(ValueError):
    """A run that cannot be started from, worded for the user."""


def _digest(folder: Path) -> str:
    """sha256 over a folder's files (names and bytes, sorted): which weights a merge was made from."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _stage_run(init_from: str) -> tuple[Path, Config]:
    from fewtune.generate import RunDirError, check_run_dir, looks_like_run_dir

    run = Path(init_from).expanduser().resolve()
    if not looks_like_run_dir(run):
        what = "does not exist" if not run.exists() else "is not a folder" if not run.is_dir() else \
            "is not a fewtune run directory"
        raise StageError(f"model.init_from: {run} {what}: give the folder an earlier `fewtune train` wrote")
    try:
        stage_cfg, _ = check_run_dir(run)
    except (RunDirError, ValueError, OSError) as err:
        raise StageError(f"model.init_from: {err}") from None
    return run, stage_cfg


def start_model(run: Path, stage_cfg: Config) -> tuple[Path, str]:
    """The model folder a run started from ``run`` trains on, and how it was made from that run."""
    from fewtune.methods import get_method

    method = get_method(stage_cfg.method.name)
    if method.saves == "model":
        folder = run / "model"
        if not (folder / "config.json").is_file():
            raise StageError(f"model.init_from: {run} has no model/ folder: that run did not finish")
        return folder, f"the whole model {stage_cfg.method.name} trained ({folder})"
    if not method.mergeable:
        raise StageError(f"model.init_from: {run} trained {stage_cfg.method.name}, whose virtual tokens are not "
                         "weights of the model and cannot be merged into it; start from a lora, ia3 or full run")
    adapter = run / "adapter"
    if not adapter.is_dir():
        raise StageError(f"model.init_from: {run} has no adapter/ folder: that run did not finish (resume it "
                         f"with `fewtune train --resume {run}`)")
    folder, digest = run / MERGED, _digest(adapter)
    stamp = folder / STAMP
    try:
        fresh = json.loads(stamp.read_text(encoding="utf-8")).get("adapter_sha256") == digest
    except (OSError, ValueError, AttributeError):
        fresh = False
    if not fresh:
        from fewtune.export import export_merged

        log.info("model.init_from: merging %s's adapter into %s (once; later stages reuse it)", run,
                 stage_cfg.model.name)
        stamp.unlink(missing_ok=True)  # a merge cut short leaves no stamp, so it is made again
        export_merged(run, folder)
        stamp.write_text(json.dumps({"adapter_sha256": digest, "run": str(run)}, indent=2), encoding="utf-8")
    return folder, f"{stage_cfg.method.name} adapter merged into {stage_cfg.model.name} ({folder})"


def resolve(cfg: Config) -> tuple[Config, list[dict]]:
    """The config a run trains with and the stages before it. With ``model.init_from``: a copy whose
    model.name is the model it starts from, and the earlier stages (from that run's lineage.json), the
    last one saying how this run starts from it. Without: the config itself and []."""
    if not cfg.model.init_from:
        return cfg, []
    run, stage_cfg = _stage_run(cfg.model.init_from)
    folder, how = start_model(run, stage_cfg)
    named = cfg.model.name if "name" in cfg.model.model_fields_set else None
    if named not in (None, str(folder), stage_cfg.model.name):
        raise StageError(f"model.name is {named!r} but model.init_from {run} was trained on "
                         f"{stage_cfg.model.name!r}: leave model.name out (it becomes {folder})")
    try:
        earlier = json.loads((run / LINEAGE).read_text(encoding="utf-8"))["stages"]
        if not isinstance(earlier, list) or not earlier:
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):  # a run from before lineage.json: what its config says
        earlier = [stage_entry(stage_cfg, run, None)]
    out = cfg.model_copy(deep=True)
    out.model.name = str(folder)
    out.model.init_from = str(run)
    return out, [*earlier[:-1], {**earlier[-1], "next_stage_starts_from": how}]


def stage_entry(cfg: Config, run: Path, examples) -> dict:
    """One stage of a lineage: its run, base model, method, data (and whether the data was raw text)."""
    data = cfg.data.train
    entry = {"run": str(Path(run).resolve()), "model": cfg.model.name, "method": cfg.method.name,
             "data": str(Path(data).expanduser().resolve()) if data else None, "format": cfg.data.format,
             "epochs": cfg.train.epochs, "lr": cfg.train.lr}
    if examples is not None:
        entry["training"] = ("continued pretraining (raw text)" if examples and all(e.is_text for e in examples)
                             else "supervised fine-tuning")
        entry["examples"] = len({id(e) for e in examples})  # a long document's pieces count once
    return entry


def write_lineage(run_dir: Path, stages: list[dict]) -> Path:
    """lineage.json: the stages that made this run, oldest first, this run last."""
    path = Path(run_dir) / LINEAGE
    path.write_text(json.dumps({"stages": stages}, ensure_ascii=False, indent=2), encoding="utf-8")
    return path
