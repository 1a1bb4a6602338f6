"""Checkpoint averaging: one set of weights from several kept checkpoints of a run.

With a few hundred examples the validation curve is noisy and the single best evaluation is partly
luck; the mean of the weights of a few good points of one run (the same basin: same start, nearby
steps) is often at least as good and steadier. Only the trainable weights are averaged (the adapter,
or the unfrozen layers of a full fine-tuning run), in float32, and written as a new run directory
that `eval`, `generate`, `compare` and `export --merged` take like any other.

Sources:

- ``best:K``: the K best evaluations, ranked as the run picked its best (``eval.metric``; ties go to
  the lower validation loss). Training keeps their weights in ``best-ranked/`` (``train.keep_best``,
  default 3); ``best:1`` is ``best/``.
- ``last:K``: the K newest checkpoints in ``checkpoints/`` (``train.keep_checkpoints``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SPEC = re.compile(r"^(best|last):([1-9][0-9]*)$")
# what an averaged run copies from its source: everything that says how to load and prompt the model
COPIED = ("config.yaml", "template.json", "fewtune.json", "tokenizer", "data", "summary.json")


class AverageError(ValueError):
    """An averaging request that cannot be met, worded for the user."""


@dataclass
class Source:
    folder: Path
    step: int | None
    val_loss: float | None = None
    metric: float | None = None


def parse_spec(spec: str) -> tuple[str, int]:
    match = SPEC.match(spec.strip())
    if not match:
        raise AverageError(f"--average {spec!r}: give best:K or last:K (K >= 1), e.g. best:3")
    return match.group(1), int(match.group(2))


def _step(folder: Path) -> int | None:
    match = re.search(r"step-(\d+)", folder.name)
    return int(match.group(1)) if match else None


def select(run_dir: Path, spec: str) -> list[Source]:
    """The checkpoints ``spec`` names, each verified against its manifest."""
    from fewtune.train import checkpoint as ckpt

    kind, k = parse_spec(spec)
    if kind == "best":
        ranking = run_dir / ckpt.RANKED / "ranking.json"
        if ranking.is_file():
            ranked = json.loads(ranking.read_text())
            sources = [Source(ckpt.ranked_folder(run_dir, e["step"]), e["step"], e.get("val_loss"), e.get("metric"))
                       for e in ranked]
        elif (run_dir / "best").is_dir():
            sources = [Source(run_dir / "best", _best_step(run_dir))]
        else:
            sources = []
        if len(sources) < k:
            raise AverageError(
                f"best:{k} needs the weights of {k} evaluations; {run_dir} kept {len(sources)} "
                f"({'best-ranked/' if ranking.is_file() else 'best/ only'}). Train with train.keep_best >= {k} "
                "(and validation data, so there are evaluations to rank), or use last:K")
    else:
        folders = ckpt.checkpoints_newest_first(run_dir)
        sources = [Source(f, _step(f)) for f in folders]
        if len(sources) < k:
            raise AverageError(f"last:{k} needs {k} checkpoints; {run_dir / 'checkpoints'} holds {len(sources)}. "
                               f"Train with train.keep_checkpoints >= {k}, or average fewer")
    chosen = sources[:k]
    for source in chosen:
        problem = ckpt.verify(source.folder)
        if problem:
            raise AverageError(f"{source.folder} is damaged ({problem}): average without it (a smaller K)")
    return chosen


def _best_step(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("best_step")
    except (OSError, ValueError):
        return None


def average_weights(folders: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the trainable weights saved in ``folders`` (float32 sums, each tensor returned
    in its saved dtype). Every folder must hold the same tensors with the same shapes."""
    from fewtune.train import checkpoint as ckpt

    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for i, folder in enumerate(folders):
        weights = ckpt.load_weights(folder)
        if i == 0:
            total = {k: v.float().clone() for k, v in weights.items()}
            dtypes = {k: v.dtype for k, v in weights.items()}
            continue
        if weights.keys() != total.keys():
            odd = sorted(set(weights) ^ set(total))[0]
            raise AverageError(f"{folder} and {folders[0]} hold different tensors (e.g. {odd}): not one run's checkpoints")
        for name, value in weights.items():
            if value.shape != total[name].shape:
                raise AverageError(f"{name} has shape {tuple(value.shape)} in {folder} and "
                                   f"{tuple(total[name].shape)} in {folders[0]}")
            total[name] += value.float()
    return {k: (v / len(folders)).to(dtypes[k]) for k, v in total.items()}


def default_output(run_dir: Path, spec: str) -> Path:
    kind, k = parse_spec(spec)
    return run_dir.with_name(f"{run_dir.name}-avg-{kind}{k}")


def average_run(run_dir: str | Path, spec: str, out_dir: str | Path | None = None) -> Path:
    """Average the checkpoints ``spec`` names into a new run directory (``out_dir``, by default beside the run:
    RUN-avg-best3). Returns it."""
    from fewtune.generate import check_run_dir, load_for_inference, looks_like_run_dir
    from fewtune.methods import get_method, load_trainable_state

    run_dir = Path(run_dir)
    if not looks_like_run_dir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a fewtune run directory: give the folder `fewtune train` wrote")
    cfg, _ = check_run_dir(run_dir)
    sources = select(run_dir, spec)
    out = Path(out_dir) if out_dir is not None else default_output(run_dir, spec)
    if out.resolve() == run_dir.resolve():
        raise AverageError("--out must differ from the run directory: the averaged run is written beside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: give another --out or remove it")
    weights = average_weights([s.folder for s in sources])
    loaded = load_for_inference(str(run_dir), precision="no")  # float32, adapter not merged: its own weights
    model = loaded.model
    params = dict(model.named_parameters())
    unknown = [n for n in weights if n not in params]
    if unknown:
        raise AverageError(f"the checkpoints hold {unknown[0]}, which the run's saved model does not have: "
                           "were they written by another method or model?")
    load_trainable_state(model, weights)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in COPIED:
        src = run_dir / name
        if src.is_dir():
            shutil.copytree(src, tmp / name)
        elif src.is_file():
            shutil.copy2(src, tmp / name)
    model.save_pretrained(tmp / get_method(cfg.method.name).saves)
    record = {"source_run": str(run_dir.resolve()), "average": spec,
              "checkpoints": [{"folder": str(s.folder.relative_to(run_dir)), "step": s.step, "val_loss": s.val_loss,
                               "metric": s.metric} for s in sources],
              "eval_metric": cfg.eval.metric}
    (tmp / "averaged.json").write_text(json.dumps(record, indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    log.info("averaged %d checkpoints of %s (steps %s) into %s", len(sources), run_dir,
             ", ".join(str(s.step) for s in sources), out)
    return out
